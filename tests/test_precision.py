"""--precision: what `auto` picks per hardware, the Trainer's autocast and layout, and loss
math that stays fp32 under autocast."""
import pytest
import torch

from abd_fast.precision import (auto_precision, autocast, channels_last, image_dtype,
                                resolve_precision)

AVX2_EPYC = {"fpu", "sse2", "avx", "avx2", "fma", "f16c"}
AVX512_NO_BF16 = AVX2_EPYC | {"avx512f", "avx512bw", "avx512vl", "avx512_vbmi"}
SAPPHIRE_RAPIDS = AVX512_NO_BF16 | {"avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                                    "amx_int8"}


@pytest.mark.parametrize("device,flags,cuda_bf16,expected", [
    ("cpu", AVX2_EPYC, None, "fp32"),                  # this project's AMD machine
    ("cpu", AVX512_NO_BF16, None, "fp32"),             # AVX-512 without bf16 math: emulated
    ("cpu", SAPPHIRE_RAPIDS, None, "bf16"),            # AMX-BF16 + AVX512-BF16
    ("cpu", AVX512_NO_BF16 | {"avx512_bf16"}, None, "bf16"),   # Cooper Lake / Zen 4
    ("cpu", AVX2_EPYC | {"amx_bf16"}, None, "bf16"),
    ("cpu", set(), None, "fp32"),                      # flags unknown: the safe choice
    ("cuda", set(), True, "bf16"),                     # Ampere and later
    ("cuda", set(), False, "fp16"),                    # older GPUs: fp16 + GradScaler
    ("mps", SAPPHIRE_RAPIDS, None, "fp32"),
])
def test_auto_precision_by_hardware(device, flags, cuda_bf16, expected):
    assert auto_precision(device, flags, cuda_bf16=cuda_bf16) == expected


def test_resolve_precision():
    assert resolve_precision("auto", "cpu") == auto_precision("cpu")
    assert resolve_precision(None, "cpu") == auto_precision("cpu")
    for p in ("fp32", "bf16", "fp16"):
        assert resolve_precision(p, "cpu") == p
    with pytest.raises(ValueError, match="--precision must be one of auto, fp32, bf16, fp16"):
        resolve_precision("fp8", "cpu")


def test_channels_last_and_image_dtype_follow_the_precision():
    assert not channels_last("fp32")  # explicit fp32: today's layout and results
    assert all(channels_last(p) for p in ("auto", None, "bf16", "fp16"))
    assert image_dtype("cpu") == torch.float32
    with autocast("cpu", "bf16"):
        assert image_dtype("cpu") == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert image_dtype("cpu") == torch.float32


def _attention(q, k, v, causal, **autocast_kw):
    """scaled_dot_product_attention under autocast(cpu, ...): its output, the name of the
    backward node (which kernel ran) and the gradients of q, k, v for a fixed upstream."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with autocast("cpu", **autocast_kw):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    node = out.grad_fn.name()
    out.backward(torch.ones_like(out))  # outside the context, as the Trainer's backward
    return out.detach(), node, [t.grad for t in (q, k, v)]


def test_cpu_low_precision_runs_math_attention_and_fp32_keeps_torchs_choice():
    q, k, v = (torch.randn(6, 4, 13, 16) for _ in range(3))   # (batch, heads, tokens, dim)

    def own_pick(dtype):  # torch's kernel without our context
        x = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        return torch.nn.functional.scaled_dot_product_attention(*x, is_causal=True).grad_fn.name()
    # the reason for the switch: on a CPU torch picks its flash kernel for bf16 (when a torch
    # release stops doing so, the switch may no longer be needed: re-measure, PERFORMANCE.md)
    assert "Flash" in own_pick(torch.bfloat16)
    bf16 = [t.bfloat16() for t in (q, k, v)]
    assert "Flash" not in _attention(*bf16, True, precision="bf16")[1]   # the math kernel
    assert _attention(*bf16, True, precision="bf16",
                      math_attention=False)[1] == own_pick(torch.bfloat16)
    assert _attention(q, k, v, True, precision="fp32")[1] == own_pick(torch.float32)
    assert torch.backends.cuda.flash_sdp_enabled()   # the switch is scoped to the context


@pytest.mark.parametrize("shape,causal", [((9, 4, 13, 32), True),    # text tower, odd length
                                          ((7, 2, 5, 24), False),    # attention pool
                                          ((3, 12, 50, 64), False)])  # ViT-B/32's tokens
def test_math_attention_is_as_accurate_as_flash_in_bf16(shape, causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    ref, _, ref_grads = _attention(q, k, v, causal, precision="fp32")

    def errors(**kw):
        out, _, grads = _attention(*(t.bfloat16() for t in (q, k, v)), causal,
                                   precision="bf16", **kw)
        return [float((a.double() - b).norm() / b.norm())
                for a, b in zip([out] + grads, [ref] + ref_grads)]
    math, flash = errors(), errors(math_attention=False)
    assert max(math) < 1e-2                              # bf16's rounding, nothing more
    assert all(m <= 1.25 * f for m, f in zip(math, flash)), (math, flash)


# ---- the Trainer's precision and layout, on a toy CLIP (a conv tower and a text bag) --------

from abd_fast.data.loader import Batch  # noqa: E402
from abd_fast.engine import Trainer  # noqa: E402


class ToyClip(torch.nn.Module):
    """CLIP's interface, tiny: model(x, tokens) -> (image features, text features, scale)."""

    def __init__(self, dim=16):
        super().__init__()
        self.visual = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                                          torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                          torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                          torch.nn.Linear(8, dim))
        self.text = torch.nn.EmbeddingBag(50, dim)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x, tokens):
        img = torch.nn.functional.normalize(self.visual(x), dim=-1)
        txt = torch.nn.functional.normalize(self.text(tokens), dim=-1)
        return img, txt, self.logit_scale.exp()


class FakeLoader:
    """n_batches fixed batches of `batch_size` uint8 8x8 images, ids and token rows."""

    def __init__(self, n_batches=3, batch_size=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.batch_size = batch_size
        self.batches = [Batch(images=torch.randint(0, 256, (batch_size, 3, 8, 8),
                                                   dtype=torch.uint8, generator=g),
                              ids=torch.arange(batch_size) + k * batch_size,
                              captions=torch.randint(0, 50, (batch_size, 5), generator=g))
                        for k in range(n_batches)]
        self.start = 0

    def __len__(self):
        return len(self.batches)

    def set_epoch(self, epoch, start_batch=0):
        self.start = start_batch

    def __iter__(self):
        return iter(self.batches[self.start:])


def toy_loss(seen=None):
    """The stages' pattern: images normalized by the fused op in the autocast dtype, the
    model's forward, the fused CLIP loss. seen: a list collecting what each call observed."""
    from abd_fast.ops import clip_loss, normalize_images

    def loss_fn(model, batch, epoch):
        x = normalize_images(batch.images, (0.5,) * 3, (0.25,) * 3,
                             out_dtype=image_dtype("cpu"))
        img, txt, scale = model(x, batch.captions)
        if seen is not None:
            seen.append({"autocast": torch.is_autocast_enabled("cpu"), "x": x.dtype,
                         "features": img.dtype})
        return clip_loss(img, txt, scale)
    return loss_fn


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
def test_trainer_precision_autocast_and_layout(tmp_path, precision):
    seen = []
    model = ToyClip()
    trainer = Trainer(model, FakeLoader(), toy_loss(seen), lr=1e-2, epochs=1, warmup=0,
                      output_dir=tmp_path, precision=precision, progress=False)
    summary = trainer.fit()
    conv = model.visual[0].weight
    assert trainer.precision == resolve_precision(precision, "cpu")
    assert trainer.channels_last == (precision != "fp32")
    assert conv.is_contiguous(memory_format=torch.channels_last) == (precision != "fp32")
    low = trainer.precision == "bf16"
    assert seen and all(s == {"autocast": low, "x": torch.bfloat16 if low else torch.float32,
                              "features": torch.bfloat16 if low else torch.float32}
                        for s in seen)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights fp32
    assert summary["step"] == 3 and torch.isfinite(torch.tensor(summary["loss"]))


def test_trainer_auto_precision_is_this_machines(tmp_path):
    trainer = Trainer(ToyClip(), FakeLoader(), toy_loss(), lr=1e-2, epochs=1, warmup=0,
                      output_dir=tmp_path, progress=False)
    assert trainer.precision == auto_precision("cpu")

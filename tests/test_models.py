"""Model factory and safe weight loading."""
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from abd_fast.models import (WeightsError, create_model, image_spec, load_state_dict,
                             load_weights, tiny_models)

TINY = "abd-tiny-vit"


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_model_builds_offline():
    assert TINY in tiny_models()
    model = create_model(TINY)
    spec = image_spec(model)
    assert spec.size == 32 and len(spec.mean) == 3
    img = model.encode_image(torch.rand(2, 3, spec.size, spec.size))
    assert img.shape[0] == 2


def test_unknown_model_names_the_flag():
    with pytest.raises(ValueError, match="--model 'ViT-Q-99'"):
        create_model("ViT-Q-99")
    with pytest.raises(ValueError, match="not a known architecture"):
        create_model("hf-hub:laion/CLIP-ViT-B-32")


@pytest.mark.parametrize("fmt", ["safetensors", "torch", "torch-wrapped", "torchscript"])
def test_weights_round_trip(tmp_path, fmt):
    torch.manual_seed(1)
    src = create_model(TINY)
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    elif fmt == "torch":
        torch.save(src.state_dict(), path)
    elif fmt == "torch-wrapped":  # open_clip training checkpoints: {"state_dict": ...} under DDP
        torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in
                                               src.state_dict().items()}}, path)
    else:
        scripted = torch.jit.script(src)
        scripted.save(str(path))
    torch.manual_seed(2)
    dst = create_model(TINY, pretrained=path)
    assert same_weights(src, dst)


def test_torchscript_reader_runs_no_code(tmp_path):
    """The TorchScript reader returns tensors only; classes of the archive are never built."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 4)
            self.register_buffer("scale", torch.tensor([2.0]))

        def forward(self, x):
            return self.lin(x) * self.scale
    path = tmp_path / "net.pt"
    torch.jit.script(Net()).save(str(path))
    state = load_state_dict(path)
    assert set(state) == {"lin.weight", "lin.bias", "scale"}
    assert torch.equal(state["scale"], torch.tensor([2.0]))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_payload_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"visual.proj": torch.zeros(2), "x": _Payload(marker)}, path)
    with pytest.raises(WeightsError, match="refused"):
        create_model(TINY, pretrained=path)
    assert not marker.exists()
    # the same payload hidden in a TorchScript-looking archive
    ts = tmp_path / "evil_ts.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(ts))
    import zipfile
    with zipfile.ZipFile(ts) as z:
        members = {n: z.read(n) for n in z.namelist()}
    data_pkl = next(n for n in members if n.endswith("/data.pkl"))
    members[data_pkl] = pickle.dumps(_Payload(marker), protocol=2)
    with zipfile.ZipFile(ts, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    with pytest.raises(WeightsError, match="refusing to load global"):
        load_state_dict(ts)
    assert not marker.exists()


def test_weights_that_do_not_fit(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"visual.proj": torch.zeros(3, 3)}, str(path))
    with pytest.raises(WeightsError, match="does not fit this architecture"):
        create_model(TINY, pretrained=path)
    with pytest.raises(WeightsError, match="no such file"):
        create_model(TINY, pretrained=tmp_path / "missing.pt")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(WeightsError, match="not a readable checkpoint"):
        load_state_dict(junk)


def test_image_size_override_interpolates_vit_positions(tmp_path):
    src = create_model(TINY)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    big = create_model(TINY, pretrained=path, image_size=64)
    assert image_spec(big).size == 64
    assert big.encode_image(torch.rand(1, 3, 64, 64)).shape[0] == 1


def test_cached_tokenizer_gives_the_tokenizers_rows():
    from abd_fast.models import CachedTokenizer, get_tokenizer
    tok = get_tokenizer("abd-tiny-rn")
    assert isinstance(tok, CachedTokenizer) and tok.context_length == 32
    plain = tok.tokenizer
    small = CachedTokenizer(plain, size=3)
    texts = ["a photo of a star", "a red circle", "a photo of a star", "two blue squares"]
    for batch in (texts, texts[1:], ["new words here", "a red circle"] * 2, texts):
        torch.testing.assert_close(small(batch), plain(batch), rtol=0, atol=0)
        assert len(small.rows) <= 3  # bounded: the oldest captions go first
    # a batch longer than the cache still gets every row
    torch.testing.assert_close(small(texts + ["x", "y", "z"]), plain(texts + ["x", "y", "z"]),
                               rtol=0, atol=0)
    torch.testing.assert_close(small("one caption"), plain("one caption"), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["abd-tiny-rn", "abd-tiny-vit"])
def test_text_tower_gives_the_same_features_for_trimmed_token_batches(name):
    """A token batch cut after its longest caption (trim_tokens) gives the features of the
    full-context batch (causal mask, EOT pooling), and their gradients; a full-length batch
    is open_clip's own encode_text bit for bit."""
    import open_clip

    from abd_fast.models import get_tokenizer, trim_tokens
    model = create_model(name)
    assert model.short_text
    tok = get_tokenizer(name)
    captions = ["a photo of a star", "x",
                "two small red circles next to a large blue square on green grass at noon"]
    full = tok(captions)
    short = trim_tokens(full)
    assert short.shape[1] < full.shape[1] and short.shape[1] % 8 == 0
    assert torch.equal(short, full[:, :short.shape[1]])
    assert torch.equal(full[:, short.shape[1]:], torch.zeros_like(full[:, short.shape[1]:]))
    assert torch.equal(model.encode_text(full), open_clip.CLIP.encode_text(model, full))
    ref = open_clip.CLIP.encode_text(model, full)
    got = model.encode_text(short)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    g_ref = torch.autograd.grad(ref.square().sum(), list(model.transformer.parameters()))
    g_got = torch.autograd.grad(got.square().sum(), list(model.transformer.parameters()))
    for a, b in zip(g_got, g_ref):  # sums over other widths: AVX-512 blocks them otherwise
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # through the whole model, as the training loops call it
    img = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(model(img, short)[1], model(img, full)[1], rtol=1e-5, atol=1e-6)
    # the tokenizer's trimmed batches
    trimmed = get_tokenizer(name, trim=True)
    assert torch.equal(trimmed(captions), short)
    assert trimmed(["a b"]).shape[1] == 8


def test_trim_tokens_rounds_to_few_shapes():
    from abd_fast.models import trim_tokens
    for context, step in ((32, 8), (77, 24)):
        widths = set()
        for last in range(context):
            t = torch.zeros(2, context, dtype=torch.long)
            t[1, :last + 1] = 5
            w = trim_tokens(t).shape[1]
            assert last < w <= context and (w % step == 0 or w == context)
            widths.add(w)
        assert len(widths) <= 4


def test_only_text_towers_where_trimming_is_exact_take_short_batches():
    """A text tower without a causal mask (every position sees every other) must not be fed
    trimmed batches: create_model leaves it as open_clip built it."""
    from abd_fast.models import _accept_short_text
    model = create_model(TINY)
    del model.encode_text  # back to open_clip's
    model.attn_mask = torch.zeros_like(model.attn_mask)
    _accept_short_text(model)
    assert not model.short_text and "encode_text" not in vars(model)


def test_channels_last_computes_1x1_convolutions_as_matrix_products():
    """to_channels_last makes exactly the 1x1, stride-1 convolutions PointwiseConv2d, keeps
    the weights, and the tower's features and gradients are the convolutions' (fp32: up to
    the order of the sums; bf16 autocast: up to bf16 rounding); on=False gives back the
    convolutions bit for bit."""
    import copy

    from abd_fast.models import PointwiseConv2d, to_channels_last
    torch.manual_seed(0)
    conv_model = create_model("abd-tiny-rn").to(memory_format=torch.channels_last)
    model = to_channels_last(copy.deepcopy(conv_model))
    pointwise = [m for m in model.modules() if type(m) is PointwiseConv2d]
    convs = [m for m in conv_model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(pointwise) == sum(m.kernel_size == (1, 1) and m.stride == (1, 1) for m in convs)
    assert 0 < len(pointwise) < len(convs)
    assert same_weights(model, conv_model)
    img = torch.rand(5, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    params = [p for _, p in model.visual.named_parameters()]
    ref_params = [p for _, p in conv_model.visual.named_parameters()]
    got, ref = model.encode_image(img), conv_model.encode_image(img)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(got.square().sum(), params)
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_params)
    # through batch norms and a dozen layers the fp32 sums' order shows, and some gradients are
    # 0 but for rounding: the whole gradient, relative to its norm
    a, b = (torch.cat([g.flatten() for g in gs]) for gs in (grads, ref_grads))
    assert float((a - b).norm() / b.norm()) < 1e-4
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-3 * float(b.abs().max()))
    with torch.autocast("cpu", torch.bfloat16):
        got, ref = model.encode_image(img), conv_model.encode_image(img)
    assert got.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), rtol=0.05, atol=0.05)
    back = to_channels_last(model, False)
    assert not any(type(m) is PointwiseConv2d for m in back.modules())
    plain = create_model("abd-tiny-rn")
    plain.load_state_dict(back.state_dict())
    x = img.contiguous()
    assert torch.equal(back.encode_image(x), plain.encode_image(x))


@pytest.mark.parametrize("bias", [False, True])
def test_pointwise_conv_matches_conv2d_on_odd_shapes(bias):
    """PointwiseConv2d against F.conv2d on odd batch, channel and spatial sizes, with and
    without bias: outputs and the gradients of input, weight and bias (fp32), the channels-last
    layout of its output, torch.compile(fullgraph=True), and the convolution itself off the
    CPU (the meta device stands in for CUDA)."""
    import torch.nn.functional as F

    from abd_fast.models import PointwiseConv2d, to_channels_last
    torch.manual_seed(1)
    for n, c, o, h, w in ((3, 5, 7, 1, 1), (2, 13, 6, 3, 5), (1, 1, 1, 2, 2)):
        layer = to_channels_last(torch.nn.Sequential(torch.nn.Conv2d(c, o, 1, bias=bias)))[0]
        assert type(layer) is PointwiseConv2d
        x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        y = layer(x)
        ref = F.conv2d(x, layer.weight, layer.bias)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
        assert y.is_contiguous(memory_format=torch.channels_last)
        g = torch.randn_like(ref)
        inputs = [x, layer.weight] + ([layer.bias] if bias else [])
        for a, b in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))
    meta = layer.to("meta")
    assert meta(torch.empty(2, c, 4, 4, device="meta")).shape == (2, o, 4, 4)
    # not a 1x1 stride-1 convolution: left alone
    strided = to_channels_last(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1, stride=2),
                                                   torch.nn.Conv2d(3, 4, 3)))
    assert all(type(m) is torch.nn.Conv2d for m in strided)

"""Numeric precision of the training loops: which autocast dtype, which memory layout.

    precision = resolve_precision("auto", device)     # "bf16" or "fp32" (or "fp16")
    with autocast(device, precision): loss = loss_fn(...)
    x = normalize_images(images, mean, std, out_dtype=image_dtype(device))

auto picks bf16 autocast only where the hardware runs it fast: a GPU (fp16 with a GradScaler
on one without bf16), or a CPU with AMX-BF16 or AVX512-BF16, whose oneDNN kernels take bf16
natively (a quick probe on such a Xeon: a ViT-B/32 forward + backward 1.69x faster than
fp32). Elsewhere, e.g. a CPU with AVX2 only, bf16 is emulated and slower than fp32, so auto
is fp32. Explicit "fp32" is today's arithmetic exactly (NCHW, no autocast); "bf16"/"fp16"
autocast the forward pass; parameters, optimizer states and loss accumulation stay fp32.

Channels-last: the convolution towers run channels-last (their weights, hence their
activations and gradients) under every precision but an explicit "fp32". It is oneDNN's
native layout: bf16 with NCHW inputs was once measured ~5x slower than fp32 under load on the
AMX Xeon, and in fp32 the demo's defend step ran 1.19x faster channels-last on the AVX2 EPYC
(bench/step.py, docs/PERFORMANCE.md). On a CPU the 1x1 convolutions then run as the matrix
products they are (abd_fast.models.to_channels_last, PointwiseConv2d: oneDNN's convolutions
are slow at a ResNet tower's small last stages). Explicit "fp32" keeps NCHW: a different
layout picks different kernels, whose rounding differs, and "fp32" promises today's results
bit for bit.
For the same reason it keeps the text batches at their full context (trim_text) and updates
the token embedding densely (sparse_rows).
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# CPU features whose presence makes bf16 matrix math faster than fp32 (/proc/cpuinfo names).
FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags: /proc/cpuinfo's `flags`, else torch's own capability query
    (the features it reports as present, under the same names)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        caps = torch._C._cpu._get_cpu_capability()
    except (AttributeError, RuntimeError):
        return frozenset()
    return frozenset(k for k, v in caps.items() if v is True)


def auto_precision(device_type: str, flags=None, cuda_bf16: bool | None = None) -> str:
    """What `--precision auto` means on a device: "bf16" on a GPU with bf16 ("fp16" on an older
    one) and on a CPU with any of FAST_BF16_CPU_FLAGS; "fp32" otherwise. flags: the CPU's
    feature names (default: this CPU's); cuda_bf16: whether the GPU has bf16 (default: asks)."""
    if device_type == "cuda":
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else "fp16"
    if device_type == "cpu":
        flags = cpu_flags() if flags is None else frozenset(flags)
        return "bf16" if flags & set(FAST_BF16_CPU_FLAGS) else "fp32"
    return "fp32"


def resolve_precision(precision: str | None, device) -> str:
    """"auto" (or None) -> auto_precision(device); checks the name."""
    precision = precision or "auto"
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    device = torch.device(device)
    return auto_precision(device.type) if precision == "auto" else precision


def channels_last(requested: str | None) -> bool:
    """Whether the convolution towers run channels-last under the --precision `requested`
    (before resolving auto): always but for an explicit "fp32" (module doc)."""
    return requested != "fp32"


def trim_text(requested: str | None) -> bool:
    """Whether training cuts each token batch after its longest caption
    (abd_fast.models.trim_tokens) under the --precision `requested`: like channels-last,
    always but for an explicit "fp32". The result is the same in exact arithmetic (causal
    mask, EOT pooling) but the attention's sums run over fewer columns, whose rounding may
    differ on some CPU; an explicit "fp32" keeps today's results bit for bit. On the demo's
    captions (11 tokens median of a 32-token context) it skips about a third of the text
    tower's work (docs/PERFORMANCE.md)."""
    return channels_last(requested)


def sparse_rows(requested: str | None, device) -> bool:
    """Whether training on `device` takes the token embedding's gradient as the rows looked up
    (sparse) and runs AdamW's kernel on the rows that have had a gradient
    (abd_fast.engine.SparseRowAdamW): on a CPU, under every --precision `requested` but an
    explicit "fp32", like channels-last. The optimizer's result is the fused AdamW's to the
    bit for the same gradient, but a token repeated in a batch has its gradient rows summed
    in another order, and "fp32" promises today's results bit for bit. Not on a GPU, where
    the dense update costs little and finding the rows would wait for the device."""
    return channels_last(requested) and torch.device(device).type == "cpu"


def autocast(device, precision: str, math_attention: bool | None = None):
    """The autocast context of a resolved precision (disabled for fp32). On a CPU under bf16 or
    fp16 it also makes scaled_dot_product_attention run its math kernel (math_attention: None =
    that default; False keeps torch's choice, True forces it). The backend is picked in the
    forward pass, so the backward that follows outside the context uses it too.

    Why: torch's CPU flash-attention kernel is slow in bf16 for the short sequences of CLIP
    towers, its backward above all (9 ms per call against 1 ms forward, on the demo's 16-token
    text batches), while math's is two matrix products. Measured on the AVX512-BF16 EPYC
    (bench/step.py --paths default,default-flash; docs/PERFORMANCE.md, "Attention on a CPU"):
    the demo's defend step 1.45x faster, ViT-B-32's forward + backward 1.20x. In fp32 the two
    kernels were level there, so fp32 keeps torch's choice (and an explicit fp32 its
    arithmetic bit for bit). Math is as accurate in bf16: it casts to fp32 for its products
    and softmax (tests/test_precision.py). A GPU keeps torch's choice (flash is fast there)."""
    device_type = torch.device(device).type
    if precision == "fp32":
        return torch.autocast(device_type, enabled=False)
    cast = torch.autocast(device_type, dtype=DTYPES[precision])
    if math_attention is None:
        math_attention = device_type == "cpu"
    return _with_math_attention(cast) if math_attention else cast


@contextlib.contextmanager
def _with_math_attention(cast):
    with cast, sdpa_kernel(SDPBackend.MATH):
        yield


def image_dtype(device) -> torch.dtype:
    """The dtype the fused image ops should write for the model: autocast's dtype when autocast
    is on (the first convolution or patch embedding then takes the batch without a cast),
    float32 otherwise."""
    device_type = torch.device(device).type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.float32


@contextlib.contextmanager
def full_precision(device):
    """Autocast off inside (for loss math that loses too much in bf16: similarity graphs,
    KL terms, nearest-neighbour search); inputs must be cast to fp32 by the caller."""
    with torch.autocast(torch.device(device).type, enabled=False):
        yield

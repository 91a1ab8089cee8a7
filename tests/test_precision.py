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
    assert not channels_last("fp32", "cpu")
    assert channels_last("bf16", "cpu") and channels_last("fp16", "cuda")
    assert image_dtype("cpu") == torch.float32
    with autocast("cpu", "bf16"):
        assert image_dtype("cpu") == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert image_dtype("cpu") == torch.float32

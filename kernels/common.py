"""What the Triton kernels share: their input checks' error type, the interpreter switch and
the launch device.

`interpreted()` is the one place that decides whether Triton runs under its interpreter
(TRITON_INTERPRET=1, CPU tensors); abd_fast.ops asks it too. Triton reads the variable when a
kernel is defined, so the answer is fixed at the first call (cached).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch


def check(cond: bool, msg: str):
    """The C++ ops raise RuntimeError (TORCH_CHECK); so do their Triton twins."""
    if not cond:
        raise RuntimeError(msg)


@functools.lru_cache(maxsize=None)
def interpreted() -> bool:
    """True when Triton runs its interpreter (TRITON_INTERPRET=1) rather than compiling."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def num_sms(device: torch.device, interpreter: int) -> int:
    """The streaming multiprocessors of a CUDA device; `interpreter` on CPU (under the
    interpreter the count only shapes the launch grid, which each kernel chooses)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return interpreter

"""Loading the compiled extensions and choosing a backend per call.

Backends: "cpu" (C++/OpenMP, abd_fast._C), "cuda" (CUDA C++, abd_fast._C_cuda),
"triton" (abd_fast.kernels; on CPU tensors only under TRITON_INTERPRET=1) and "reference"
(plain PyTorch). The choice is the `backend=` argument, else the ABD_FAST_BACKEND
environment variable, else by device: CPU tensors -> "cpu", CUDA tensors -> "cuda".
"""
from __future__ import annotations

import functools
import importlib
import json
import os
from pathlib import Path

import torch

from abd_fast.kernels.common import interpreted

BACKENDS = ("cpu", "cuda", "triton", "reference")
ENV_VAR = "ABD_FAST_BACKEND"


def _missing_cpu_flags() -> list[str]:
    """CPU features the extension was compiled for (setup.py) that this CPU lacks."""
    config = Path(__file__).resolve().parents[1] / "_build_config.json"
    try:
        wanted = json.loads(config.read_text())["cpu_flags"]
        with open("/proc/cpuinfo") as f:
            have = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except (OSError, ValueError, KeyError):
        return []
    return [flag for flag in wanted if flag not in have]


@functools.lru_cache(maxsize=None)
def extension(name: str) -> str | None:
    """Imports abd_fast.<name> (which registers its kernels); returns an error text or None."""
    missing = _missing_cpu_flags()
    if missing:
        return (f"the extension was built for CPU features this machine lacks ({', '.join(missing)}); "
                "rebuild it here (scripts/setup.sh), or with ABD_FAST_PORTABLE=1 for any x86-64")
    try:
        importlib.import_module(f"abd_fast.{name}")
        return None
    except ImportError as e:
        return str(e)


def _ensure_schemas():
    err = extension("_C")
    if err is not None:
        raise RuntimeError(
            f"abd_fast's C++ extension is not built ({err}). Run scripts/setup.sh, or "
            "`pip install --no-build-isolation -e .`; backend='reference' works without it.")


@torch.compiler.assume_constant_result
def resolve(backend: str | None, device) -> str:
    """The backend to run on tensors of `device` (a constant for torch.compile)."""
    backend = backend or os.environ.get(ENV_VAR) or None
    if backend is None:
        backend = "cuda" if device.type == "cuda" else "cpu"
        if backend == "cuda" and extension("_C_cuda") is not None:
            backend = "triton"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (from backend= or {ENV_VAR}); "
                         f"expected one of {BACKENDS}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got {device}")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend 'cuda' needs CUDA tensors, got {device}")
        err = extension("_C_cuda")
        if err is not None:
            raise RuntimeError(f"abd_fast was built without CUDA kernels ({err}); rebuild with nvcc "
                               "available, or use backend='triton'")
    if backend == "triton" and device.type == "cpu" and not interpreted():
        raise ValueError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                         "abd_fast is imported")
    if backend in ("cpu", "cuda"):
        _ensure_schemas()
    return backend

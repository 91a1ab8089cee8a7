"""Fused image ops: a trigger or perturbation on the selected rows of a batch, clamp to
[0,1] and CLIP normalization, in one pass over the pixels (uint8 or float in, fp32/bf16 out).

The op `abd_fast::image_op` has CPU (C++) and CUDA kernels; `abd_fast::image_op_triton`
runs the Triton kernels. Both share the autograd and fake registrations below, so
torch.compile(fullgraph=True) traces them. The math is abd_fast.ops.reference.image_op.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import reference
from ._backend import extension, resolve

Norm = Union[None, Tensor, Sequence[float]]


# ---- the Triton op (same schema as the C++ abd_fast::image_op) --------------------------

@torch.library.custom_op("abd_fast::image_op_triton", mutates_args=())
def image_op_triton(images: Tensor, kind: str, src: Optional[Tensor], loc: Optional[Tensor],
                    rows: Optional[Tensor], alpha: float, eps: float, mean: Optional[Tensor],
                    std: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    from abd_fast.kernels import image_ops
    return image_ops.image_op_forward(images, kind, src, loc, rows, alpha, eps, mean, std,
                                      out_dtype)


@torch.library.custom_op("abd_fast::image_op_backward_triton", mutates_args=())
def image_op_backward_triton(grad_out: Tensor, images: Tensor, kind: str, src: Tensor,
                             loc: Optional[Tensor], rows: Optional[Tensor], alpha: float,
                             eps: float, std: Optional[Tensor]) -> Tensor:
    from abd_fast.kernels import image_ops
    return image_ops.image_op_backward(grad_out, images, kind, src, loc, rows, alpha, eps, std)


# ---- autograd and fake implementations, shared by both ops ------------------------------

def _fake_forward(images, kind, src, loc, rows, alpha, eps, mean, std, out_dtype):
    return images.new_empty(images.shape, dtype=out_dtype)


def _fake_backward(grad_out, images, kind, src, loc, rows, alpha, eps, std):
    return torch.empty_like(src)


def _setup_context(ctx, inputs, output):
    images, kind, src, loc, rows, alpha, eps, mean, std, out_dtype = inputs
    if kind == "warp" and src.requires_grad:
        # Refused here, when the call is recorded, rather than when backward reaches it.
        raise ValueError("the fused warp has no gradient with respect to its grid: pass "
                         "grid.detach() (or compute the warp under torch.no_grad()), or use "
                         "backend='reference' (grid_sample) to differentiate through the grid")
    ctx.save_for_backward(images, src, loc, rows, std)
    ctx.kind, ctx.alpha, ctx.eps = kind, alpha, eps


def _autograd(backward_op):
    def backward(ctx, grad):
        images, src, loc, rows, std = ctx.saved_tensors
        grad_src = None
        if ctx.needs_input_grad[2]:
            grad_src = backward_op(grad, images, ctx.kind, src, loc, rows, ctx.alpha, ctx.eps, std)
        return None, None, grad_src, None, None, None, None, None, None, None
    return backward


def _register(fwd: str, bwd: str):
    torch.library.register_fake(fwd)(_fake_forward)
    torch.library.register_fake(bwd)(_fake_backward)
    bwd_op = getattr(torch.ops.abd_fast, bwd.split("::")[1])
    torch.library.register_autograd(fwd, _autograd(bwd_op), setup_context=_setup_context)


_register("abd_fast::image_op_triton", "abd_fast::image_op_backward_triton")
if extension("_C") is None:
    _register("abd_fast::image_op", "abd_fast::image_op_backward")


# ---- public API --------------------------------------------------------------------------

def _norm_params(mean: Norm, std: Norm, C: int, device) -> tuple[Optional[Tensor], Optional[Tensor]]:
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is None:
        return None, None
    out = []
    for name, v in (("mean", mean), ("std", std)):
        t = torch.as_tensor(v, dtype=torch.float32, device=device).reshape(-1)
        if t.numel() != C:
            raise ValueError(f"{name} has {t.numel()} values, the images have {C} channels")
        out.append(t.contiguous())
    return out[0], out[1]


def _image_op(images: Tensor, kind: str, src, loc, rows, alpha: float, eps: float, mean: Norm,
              std: Norm, out_dtype: torch.dtype, backend: Optional[str]) -> Tensor:
    if images.dim() != 4:
        raise ValueError(f"images must be [B,C,H,W], got shape {tuple(images.shape)}")
    if images.requires_grad:
        raise ValueError("the fused image ops do not differentiate with respect to images; "
                         "pass images.detach()")
    dtype = reference.compute_dtype(images, src)
    if src is not None:
        src = src.to(dtype).contiguous()
    if rows is not None:
        rows = rows.to(device=images.device, dtype=torch.bool).reshape(-1).contiguous()
    mean, std = _norm_params(mean, std, images.shape[1], images.device)
    images = images.contiguous()
    which = resolve(backend, images.device)
    if which == "reference":
        return reference.image_op(images, kind, src, loc, rows, alpha, eps, mean, std, out_dtype)
    op = torch.ops.abd_fast.image_op_triton if which == "triton" else torch.ops.abd_fast.image_op
    return op(images, kind, src, loc, rows, float(alpha), float(eps), mean, std, out_dtype)


def _locations(ys, xs, B: int, device) -> Tensor:
    if ys is None or xs is None:
        raise ValueError("kind 'patch' needs ys and xs (top-left corner of the patch per row)")
    ys = torch.as_tensor(ys, device=device).to(torch.int64).expand(B)
    xs = torch.as_tensor(xs, device=device).to(torch.int64).expand(B)
    return torch.stack([ys, xs], dim=1).contiguous()


def apply_trigger(images: Tensor, kind: str, *, rows: Optional[Tensor] = None,
                  patch: Optional[Tensor] = None, ys=None, xs=None,
                  pattern: Optional[Tensor] = None, alpha: Optional[float] = None,
                  grid: Optional[Tensor] = None, mean: Norm = None, std: Norm = None,
                  out_dtype: torch.dtype = torch.float32, backend: Optional[str] = None) -> Tensor:
    """Applies a backdoor trigger to the selected rows, then clamps and normalizes every row.

    images: [B,C,H,W] uint8 (0..255) or float in [0,1]. rows: bool [B], the rows that get the
    trigger (all when None). Per kind, with x the image in [0,1]:
      "patch": patch [C,h,w] (shared) or [B,C,h,w], in [0,1], pasted with its top-left corner at
               (ys[b], xs[b]) (int tensors [B] or ints); patch pixels outside the image are dropped
      "blend": (1 - alpha) * x + alpha * pattern, pattern [C,H,W] or [B,C,H,W]
      "add":   x + pattern (e.g. SIG's sinusoid), pattern [C,H,W] or [B,C,H,W]
      "warp":  bilinear resampling along grid [H,W,2] or [B,H,W,2] (grid_sample semantics:
               (x, y) in [-1,1], align_corners=True, zeros outside)
      "none":  no trigger (only clamp and normalization)
    Then v = clamp(v, 0, 1) and, when mean and std ([C] each) are given, (v - mean) / std.
    Returns [B,C,H,W] of out_dtype. Differentiable with respect to patch and pattern.
    """
    B = images.shape[0]
    alpha_v, eps_v, src, loc = 0.0, math.inf, None, None
    if kind == "patch":
        if patch is None:
            raise ValueError("kind 'patch' needs patch=[C,h,w] or [B,C,h,w]")
        src, loc = patch, _locations(ys, xs, B, images.device)
    elif kind in ("blend", "add"):
        if pattern is None:
            raise ValueError(f"kind {kind!r} needs pattern=[C,H,W] or [B,C,H,W]")
        src = pattern
        if kind == "blend":
            if alpha is None or not 0.0 <= float(alpha) <= 1.0:
                raise ValueError(f"kind 'blend' needs alpha in [0, 1], got {alpha}")
            alpha_v = float(alpha)
    elif kind == "warp":
        if grid is None:
            raise ValueError("kind 'warp' needs grid=[H,W,2] or [B,H,W,2]")
        src = grid
    elif kind != "none":
        raise ValueError(f"unknown trigger kind {kind!r}; expected patch, blend, add, warp or none")
    return _image_op(images, kind, src, loc, rows, alpha_v, eps_v, mean, std, out_dtype, backend)


def apply_perturbation(images: Tensor, delta: Tensor, *, mode: str, eps: float = 0.03,
                       box: Optional[tuple[int, int]] = None, rows: Optional[Tensor] = None,
                       mean: Norm = None, std: Norm = None,
                       out_dtype: torch.dtype = torch.float32,
                       backend: Optional[str] = None) -> Tensor:
    """Applies a (universal) adversarial perturbation, then clamps and normalizes.

    mode "linf":  x + clamp(delta, -eps, eps), delta [C,H,W] (universal) or [B,C,H,W]
    mode "patch": delta [C,h,w] with values in [0,1] replaces the pixels of the box whose
                  top-left corner is box=(y, x)
    images, rows, mean, std and out_dtype as in apply_trigger. Differentiable w.r.t. delta.
    """
    if mode == "linf":
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        return _image_op(images, "add", delta, None, rows, 0.0, float(eps), mean, std, out_dtype,
                         backend)
    if mode == "patch":
        if box is None:
            raise ValueError("mode 'patch' needs box=(y, x), the top-left corner of the patch")
        loc = _locations(box[0], box[1], images.shape[0], images.device)
        return _image_op(images, "patch", delta, loc, rows, 0.0, math.inf, mean, std, out_dtype,
                         backend)
    raise ValueError(f"unknown perturbation mode {mode!r}; expected 'linf' or 'patch'")


def normalize_images(images: Tensor, mean: Norm, std: Norm,
                     out_dtype: torch.dtype = torch.float32, backend: Optional[str] = None) -> Tensor:
    """uint8 or [0,1] images -> clamp -> (x - mean) / std in out_dtype, in one pass."""
    return _image_op(images, "none", None, None, None, 0.0, math.inf, mean, std, out_dtype,
                     backend)


# ---- the CPU output pool (csrc/cpu/output_pool.h) -------------------------------------------
# The CPU kernels take outputs of 1 MB or more from a pool that keeps a block after its tensor
# dies, for the next call of the same size: a training loop then writes into memory it already
# has instead of a fresh mapping the OS must fault in and zero (40 % of the op at 224 px).
# It keeps at most ABD_FAST_CPU_POOL_MB megabytes of unused blocks (default 1024; 0: off).

def _pool():
    err = extension("_C")
    if err is not None:
        raise RuntimeError(f"abd_fast's C++ extension is not built ({err}); the CPU output pool "
                           "is part of it. Run scripts/setup.sh.")
    from abd_fast import _C
    return _C


def cpu_pool_stats() -> dict:
    """{"cached_bytes": unused blocks kept, "live_bytes": blocks behind live tensors,
    "reused" / "fresh": allocations served from a kept block / newly mapped, "limit_bytes",
    "unknown_blocks": blocks given back that the pool never handed out (left alone)}."""
    return _pool().cpu_pool_stats()


def set_cpu_pool_limit(megabytes: float) -> float:
    """Keeps at most `megabytes` of unused blocks from now on (0 turns the pool off), freeing
    the oldest kept blocks over it. Returns the previous limit in megabytes."""
    if not megabytes >= 0:
        raise ValueError(f"the CPU output pool limit must be >= 0 megabytes, got {megabytes}")
    return _pool().set_cpu_pool_limit(int(megabytes * 2**20)) / 2**20


def release_cpu_pool() -> None:
    """Gives every unused block back to the OS (the limit stays)."""
    _pool().release_cpu_pool()

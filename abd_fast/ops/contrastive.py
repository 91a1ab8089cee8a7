"""Fused InfoNCE and CLIP losses that never materialize the N x M logits.

`abd_fast::contrastive_forward/backward` (C++ CPU and CUDA kernels) and their Triton twins
compute the loss over tiles with an online log-sum-exp and recompute the tiles in the
backward pass (Inf-CL's scheme). The symmetric CLIP loss takes the row and the column
log-sum-exp from the same tiles. Memory: O((N + M) * D) plus one tile.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from ._backend import extension, resolve


# ---- the Triton op (same schema as the C++ abd_fast::contrastive_forward) ---------------

@torch.library.custom_op("abd_fast::contrastive_forward_triton", mutates_args=())
def contrastive_forward_triton(q: Tensor, k: Tensor, scale: Tensor, offset: int,
                               symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    from abd_fast.kernels import info_nce
    return info_nce.contrastive_forward(q, k, scale, offset, symmetric)


@torch.library.custom_op("abd_fast::contrastive_backward_triton", mutates_args=())
def contrastive_backward_triton(grad_loss: Tensor, q: Tensor, k: Tensor, scale: Tensor,
                                row_lse: Tensor, col_lse: Tensor, offset: int,
                                symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    from abd_fast.kernels import info_nce
    return info_nce.contrastive_backward(grad_loss, q, k, scale, row_lse, col_lse, offset,
                                         symmetric)


# ---- autograd and fake implementations, shared by both ops ------------------------------

def _acc_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fake_forward(q, k, scale, offset, symmetric):
    acc = _acc_dtype(q)
    return (q.new_empty((), dtype=acc), q.new_empty(q.shape[0], dtype=acc),
            q.new_empty(k.shape[0] if symmetric else 0, dtype=acc))


def _fake_backward(grad_loss, q, k, scale, row_lse, col_lse, offset, symmetric):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    q, k, scale, offset, symmetric = inputs
    _, row_lse, col_lse = output
    ctx.save_for_backward(q, k, scale, row_lse, col_lse)
    ctx.offset, ctx.symmetric = offset, symmetric
    ctx.mark_non_differentiable(row_lse, col_lse)


def _autograd(backward_op):
    def backward(ctx, grad_loss, _grad_row_lse, _grad_col_lse):
        q, k, scale, row_lse, col_lse = ctx.saved_tensors
        gq, gk, gs = backward_op(grad_loss, q, k, scale, row_lse, col_lse, ctx.offset,
                                 ctx.symmetric)
        return gq, gk, gs, None, None
    return backward


def _register(fwd: str, bwd: str):
    torch.library.register_fake(fwd)(_fake_forward)
    torch.library.register_fake(bwd)(_fake_backward)
    bwd_op = getattr(torch.ops.abd_fast, bwd.split("::")[1])
    torch.library.register_autograd(fwd, _autograd(bwd_op), setup_context=_setup_context)


_register("abd_fast::contrastive_forward_triton", "abd_fast::contrastive_backward_triton")
if extension("_C") is None:
    _register("abd_fast::contrastive_forward", "abd_fast::contrastive_backward")


# ---- public API --------------------------------------------------------------------------

def _scale_tensor(logit_scale, like: Tensor) -> Tensor:
    if isinstance(logit_scale, Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must hold one value, got shape {tuple(logit_scale.shape)}")
        return logit_scale
    return torch.tensor(float(logit_scale), dtype=_acc_dtype(like), device=like.device)


def _check_features(q: Tensor, k: Tensor):
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"features must be [N,D] and [M,D] with one D, got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")


def _contrastive(q, k, logit_scale, offset, symmetric, backend):
    _check_features(q, k)
    scale = _scale_tensor(logit_scale, q)
    which = resolve(backend, q.device)
    if which == "reference":
        if symmetric:
            return reference.clip_loss(q, k, scale)
        return reference.info_nce(q, k, scale, offset)
    if q.dtype != k.dtype:
        k = k.to(q.dtype)
    op = (torch.ops.abd_fast.contrastive_forward_triton if which == "triton"
          else torch.ops.abd_fast.contrastive_forward)
    return op(q, k, scale, offset, symmetric)[0]


def info_nce(q: Tensor, k: Tensor, logit_scale, offset: int = 0, *,
             backend: Optional[str] = None) -> Tensor:
    """InfoNCE: mean over rows i of q of -log softmax(logit_scale * q @ k.T)[i, offset + i].

    q [N,D], k [M,D] (float32, float64, bfloat16 or float16; accumulation in fp32 or fp64),
    logit_scale: the multiplier (not its log), a number or a one-element tensor.
    offset: column of row 0's positive (rank * N when k is gathered from all ranks); requires
    offset + N <= M. Returns a 0-dim fp32 tensor (fp64 for fp64 inputs); differentiable with
    respect to q, k and logit_scale.
    """
    if not 0 <= offset <= k.shape[0] - q.shape[0]:
        raise ValueError(f"offset {offset} + N {q.shape[0]} must be at most M {k.shape[0]}")
    return _contrastive(q, k, logit_scale, int(offset), False, backend)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, *,
              backend: Optional[str] = None) -> Tensor:
    """The CLIP loss (info_nce(I, T) + info_nce(T, I)) / 2 for paired [N,D] features.

    Both directions come from the same tiles (row and column log-sum-exp in one pass).
    """
    if image_features.shape != text_features.shape:
        raise ValueError(f"image and text features must have one shape, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    return _contrastive(image_features, text_features, logit_scale, 0, True, backend)

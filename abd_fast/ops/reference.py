"""Plain-PyTorch reference implementations: the specification of every fused op.

The fused backends (C++ CPU, CUDA, Triton) are tested against these functions. They favour
clarity over speed, but are vectorized, so they also serve as the eager baseline in bench/.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = ("none", "patch", "blend", "add", "warp")


def compute_dtype(*tensors):
    """float64 when any floating input is float64 (gradcheck), float32 otherwise."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) \
        else torch.float32


def to_unit(images, dtype):
    """uint8 0..255 -> [0,1]; floating images are taken as already in [0,1]."""
    if images.dtype == torch.uint8:
        return images.to(dtype) / 255
    return images.to(dtype)


def image_op(images, kind, src=None, loc=None, rows=None, alpha=0.0, eps=float("inf"),
             mean=None, std=None, out_dtype=torch.float32):
    """Reference for the fused image op (see abd_fast.ops.image for the public API).

    images [B,C,H,W] uint8 or float in [0,1]. Per selected row b (rows[b] True, all if None):
      none : v = x
      patch: v = src[c, y-ly, x-lx] inside the box with top-left loc[b] = (ly, lx), x outside;
             src [C,h,w] shared or [B,C,h,w] per sample; patch pixels outside the image are dropped
      blend: v = (1-alpha) x + alpha src,   src [C,H,W] or [B,C,H,W]
      add  : v = x + clamp(src, -eps, eps), src [C,H,W] or [B,C,H,W]
      warp : v = grid_sample(x, src, bilinear, zeros padding, align_corners=True),
             src [H,W,2] or [B,H,W,2] in grid_sample's (x, y) order
    then every row: v = clamp(v, 0, 1); out = (v - mean[c]) / std[c] if mean/std are given.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    dtype = compute_dtype(images, src)
    x = to_unit(images, dtype)
    B, C, H, W = x.shape
    if kind == "none":
        v = x
    elif kind == "patch":
        p = src.to(dtype)
        h, w = p.shape[-2:]
        iy = torch.arange(H, device=x.device)[None, :] - loc[:, 0:1]          # [B,H]
        ix = torch.arange(W, device=x.device)[None, :] - loc[:, 1:2]          # [B,W]
        inside = ((iy >= 0) & (iy < h))[:, :, None] & ((ix >= 0) & (ix < w))[:, None, :]
        iyc, ixc = iy.clamp(0, h - 1), ix.clamp(0, w - 1)
        if p.dim() == 3:
            pv = p[:, iyc[:, :, None], ixc[:, None, :]].transpose(0, 1)       # [B,C,H,W]
        else:
            b = torch.arange(B, device=x.device)[:, None, None]
            pv = p.permute(0, 2, 3, 1)[b, iyc[:, :, None], ixc[:, None, :]].permute(0, 3, 1, 2)
        v = torch.where(inside[:, None], pv, x)
    elif kind == "blend":
        v = (1 - alpha) * x + alpha * src.to(dtype)
    elif kind == "add":
        v = x + src.to(dtype).clamp(-eps, eps)
    else:  # warp
        grid = src.to(dtype)
        grid = grid.expand(B, H, W, 2) if grid.dim() == 3 else grid
        v = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    if rows is not None:
        v = torch.where(rows[:, None, None, None], v, x)
    v = v.clamp(0, 1)
    if mean is not None:
        v = (v - mean.to(dtype)[:, None, None]) / std.to(dtype)[:, None, None]
    return v.to(out_dtype)


def info_nce(q, k, logit_scale, offset=0):
    """mean_i of -log softmax(logit_scale * q @ k.T)[i, offset + i]. q [N,D], k [M,D]."""
    dtype = compute_dtype(q, k)
    logits = logit_scale.to(dtype) * q.to(dtype) @ k.to(dtype).T
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels)


def clip_loss(image_features, text_features, logit_scale):
    """(info_nce(I, T) + info_nce(T, I)) / 2, the symmetric CLIP loss."""
    return (info_nce(image_features, text_features, logit_scale)
            + info_nce(text_features, image_features, logit_scale)) / 2

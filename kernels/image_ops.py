"""Triton kernels of the fused image op (`abd_fast::image_op_triton` and its backward).

Same math and conventions as the C++ kernels (csrc/cpu/image_ops.cpp, csrc/common/image_math.h):
  * compute type ACC: float64 when images or src is float64, else float32 (backward: src's
    dtype, as the C++ op)
  * uint8 pixels -> v * acc(1/255); floating pixels are taken as already in [0,1]
  * clamp(v, 0, 1) with NaN propagation, then (v - acc(mean[c])) * (1 / acc(std[c]))
  * torch.clamp's gradient passes where lo <= v <= hi (bounds included)
  * warp: bilinear, zeros padding, align_corners=True (grid_sample), grid in (x, y) order

Forward: grid (plane groups, pixel blocks). A program owns a [R, BLOCK] tile: R consecutive
planes p = b*C + c of the [B*C, H*W] image (R = 1 unless the planes are small) times BLOCK
pixels; each pixel is read once and written once. KIND (none/patch/blend/add/warp), the input
dtype, rows and normalization are compile-time constants, so every variant is a straight-line
kernel. Unselected rows (rows[b] False) only clamp and normalize: their src loads are masked
off and cost no memory traffic.

Backward (gradient with respect to src, kinds patch/blend/add): deterministic, no atomics;
every src element is written by exactly one program, which loops over the batch rows that read
it, as the CPU kernel does. Tiles are [RB batch rows, RC src planes, BLOCK pixels]:
  * per-sample src [B,C,h,w]: one row reads each element; RB = 1, RC src planes per program.
  * shared src [C,h,w]: grid (C / RC, pixel blocks); the program walks the batch in chunks of
    RB rows, loading [RB, RC, BLOCK] tiles of grad_out (and images), summing each chunk along
    the rows with tl.sum (a fixed tree order), chunks in order: identical results run to run.

Tile sizes (`_plane_tiles`; one config, no autotuning): BLOCK is the plane size rounded up to
a power of two, capped at 1024 pixels (512 for warp); R (RC) fills the tile up to 1024
elements (512 for warp, whose 4 taps per pixel make [R, BLOCK, 4] gathers); on a GPU the tile
is then shrunk (R first, then BLOCK, not below 256 elements) while the launch would have fewer
than 4 programs per SM, so small images and the shared-src backward (grid of only C x pixel
blocks) still fill an A100/H100. RB (shared src) makes the [RB, RC, BLOCK] tile up to 2048
elements. num_warps 4 (8 for warp): 8 elements (8 taps) per thread. ptxas (AOT builds for
sm_80/sm_90, fp32 compute): 31-55 registers, warp 64, backward 40-76; no spills.
Under the interpreter a program costs ~1 ms of Python whatever its size, so there the tile
element budget is 8x larger (BLOCK unchanged): fewer, larger programs, same code paths.

Scalar arguments alpha, eps and 1/255 are annotated float64, so that the float64 (gradcheck)
path keeps them in full precision; inside the kernel they become acc_t(x) through
tl.full([], x, ACC), which also works under TRITON_INTERPRET=1 where scalars arrive as Python
floats. fp32 reciprocals use tl.math.div_rn (Triton's `/` on fp32 is approximate).
The per-pixel math is written inline rather than in @triton.jit helpers: no difference on a
GPU, but under the interpreter each helper call costs about a millisecond.
The interpreter converts fp32 -> bf16 by truncation where a GPU rounds to nearest even, so under
the interpreter bf16 outputs are rounded explicitly first (RNE_BF16; a no-op path on GPU).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import check, interpreted, num_sms, on_device

KINDS = {"none": 0, "patch": 1, "blend": 2, "add": 3, "warp": 4}
_IMAGE_DTYPES = (torch.uint8, torch.float32, torch.float64, torch.bfloat16, torch.float16)
_OUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}
_MAX_BLOCK = 1024  # pixels per tile row
_TILE = 1024  # elements per tile (forward, per-sample backward)


def _parse_kind(kind: str) -> int:
    check(kind in KINDS, f"abd_fast::image_op: unknown kind '{kind}'; expected none, patch, "
                          "blend, add or warp")
    return KINDS[kind]


def _check_image_op(images, kind: int, src, loc, rows, mean, std, out_dtype):
    """Mirror of check_image_op in csrc/common/checks.h; returns (B, C, H, W, h, w, bstride)."""
    check(images.dim() == 4, f"image_op: images must be [B,C,H,W], got {list(images.shape)}")
    check(images.is_contiguous(), "image_op: images must be contiguous")
    check(images.dtype in _IMAGE_DTYPES,
           "image_op: images must be uint8, float32, float64, bfloat16 or float16, got "
           f"{images.dtype}")
    check(out_dtype in _OUT_DTYPES,
           "image_op: out_dtype must be float32, float64, bfloat16 or float16")
    B, C, H, W = images.shape
    h, w, bstride = H, W, 0
    dev = images.device
    if kind != KINDS["none"]:
        check(src is not None, "image_op: kind needs src")
        s = src
        check(s.device == dev, f"image_op: src must be on {dev}")
        check(s.is_contiguous(), "image_op: src must be contiguous")
        check(s.dtype in (torch.float32, torch.float64),
               "image_op: src must be float32 or float64")
        if kind == KINDS["warp"]:
            check(s.dim() in (3, 4) and s.shape[-1] == 2 and s.shape[-3] == H
                   and s.shape[-2] == W,
                   "image_op: warp grid must be [H,W,2] or [B,H,W,2] with H,W of the images")
        else:
            check(s.dim() in (3, 4), "image_op: src must be [C,h,w] or [B,C,h,w]")
            check(s.shape[-3] == C, f"image_op: src has {s.shape[-3]} channels, images {C}")
            if kind == KINDS["patch"]:
                h, w = s.shape[-2], s.shape[-1]
                check(loc is not None and loc.dim() == 2 and loc.shape[0] == B
                       and loc.shape[1] == 2 and loc.dtype == torch.int64
                       and loc.is_contiguous() and loc.device == dev,
                       f"image_op: patch needs loc, int64 [B,2] (top-left y, x) on {dev}")
            else:
                check(s.shape[-2] == H and s.shape[-1] == W,
                       "image_op: pattern must match the image size")
        if s.dim() == 4:
            check(s.shape[0] == B, f"image_op: per-sample src has {s.shape[0]} rows, images {B}")
            bstride = s.stride(0)
    if rows is not None:
        check(rows.dim() == 1 and rows.shape[0] == B and rows.dtype == torch.bool
               and rows.device == dev and rows.is_contiguous(),
               f"image_op: rows must be a bool [B] tensor on {dev}")
    check((mean is None) == (std is None), "image_op: give both mean and std or neither")
    if mean is not None:
        for t in (mean, std):
            check(t.dim() == 1 and t.shape[0] == C and t.dtype == torch.float32
                   and t.device == dev and t.is_contiguous(),
                   f"image_op: mean and std must be float32 [C] on {dev}")
    return B, C, H, W, h, w, bstride


def _tile_elems(device: torch.device) -> int:
    # Under the interpreter a program costs ~1 ms of Python whatever its size, so tiles are
    # 8x larger there (more planes per program; BLOCK keeps its GPU value).
    return _TILE if device.type == "cuda" else 8 * _TILE


def _plane_tiles(n_planes: int, plane: int, device: torch.device,
                 shrink: int = 1) -> tuple[int, int]:
    """(R, BLOCK): tiles of R planes x BLOCK pixels, about _TILE / shrink elements; on a GPU
    shrunk (R first, then BLOCK, down to 256 elements) while there are < 4 programs per SM."""
    tile = _tile_elems(device) // shrink
    block = min(_MAX_BLOCK // shrink, triton.next_power_of_2(plane))
    r = min(triton.next_power_of_2(n_planes), max(1, tile // block))
    target = 4 * num_sms(device, 0)  # interpreter: the number of programs does not matter
    while r * block > 256 and triton.cdiv(n_planes, r) * triton.cdiv(plane, block) < target:
        if r > 1:
            r //= 2
        else:
            block //= 2
    return r, block


# ---- kernels ----------------------------------------------------------------------------

@triton.jit
def _image_fwd_kernel(img_ptr, src_ptr, loc_ptr, rows_ptr, mean_ptr, std_ptr, out_ptr,
                      NP, C, H, W, h, w, src_bstride,
                      alpha_f: tl.float64, eps_f: tl.float64, inv255_f: tl.float64,
                      KIND: tl.constexpr, IS_U8: tl.constexpr, HAS_ROWS: tl.constexpr,
                      HAS_NORM: tl.constexpr, ACC: tl.constexpr, RNE_BF16: tl.constexpr,
                      R: tl.constexpr, BLOCK: tl.constexpr):
    pl = tl.program_id(0) * R + tl.arange(0, R)  # planes b * C + c
    pv = pl < NP
    b = pl // C
    c = pl % C
    HW = H * W
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = pv[:, None] & (offs < HW)[None, :]
    idx = pl.to(tl.int64)[:, None] * HW + offs[None, :]
    x = tl.load(img_ptr + idx, mask=m, other=0).to(ACC)
    if IS_U8:
        inv255 = tl.full([], inv255_f, ACC)
        x = x * inv255
    v = x
    if KIND != 0:
        if HAS_ROWS:
            sel = (tl.load(rows_ptr + b, mask=pv, other=0) != 0)[:, None]
            ms = m & sel  # src loads of unselected rows are masked off
        else:
            ms = m
        s_base = src_ptr + (b.to(tl.int64) * src_bstride)[:, None]
        if KIND == 1:  # patch: box with top-left (ly, lx); patch pixels outside are dropped
            ly = tl.load(loc_ptr + 2 * b, mask=pv, other=0)
            lx = tl.load(loc_ptr + 2 * b + 1, mask=pv, other=0)
            py = (offs // W)[None, :] - ly[:, None]
            px = (offs % W)[None, :] - lx[:, None]
            inside = (py >= 0) & (py < h) & (px >= 0) & (px < w)
            p = tl.load(s_base + (c[:, None] * h + py) * w + px, mask=ms & inside,
                        other=0).to(ACC)
            v = tl.where(inside, p, x)
        elif KIND == 2:  # blend: (1 - alpha) x + alpha s
            alpha = tl.full([], alpha_f, ACC)
            p = tl.load(s_base + (c * HW)[:, None] + offs[None, :], mask=ms, other=0).to(ACC)
            v = (1 - alpha) * x + alpha * p
        elif KIND == 3:  # add: x + clamp(s, -eps, eps)
            eps = tl.full([], eps_f, ACC)
            p = tl.load(s_base + (c * HW)[:, None] + offs[None, :], mask=ms, other=0).to(ACC)
            p = tl.where(p < -eps, -eps, p)
            v = x + tl.where(p > eps, eps, p)
        else:  # warp: bilinear, zeros padding, align_corners=True
            g = s_base + offs[None, :] * 2
            gx = tl.load(g, mask=ms, other=0).to(ACC)
            gy = tl.load(g + 1, mask=ms, other=0).to(ACC)
            # tl.full: H, W may be specialized to constexpr 1 on GPU; * 0.5 is exactly / 2
            ix = (gx + 1) * 0.5 * tl.full([], W - 1, ACC)
            iy = (gy + 1) * 0.5 * tl.full([], H - 1, ACC)
            # points beyond one pixel outside sample only zeros; clamping keeps the casts defined
            xhi = tl.full([], W + 1, ACC)
            yhi = tl.full([], H + 1, ACC)
            ix = tl.where(ix < -2, -2, tl.where(ix > xhi, xhi, ix))
            iy = tl.where(iy < -2, -2, tl.where(iy > yhi, yhi, iy))
            fx = tl.floor(ix)
            fy = tl.floor(iy)
            # the 4 taps as one [R, BLOCK, 4] gather: corner k = 2 * dy + dx
            k = tl.arange(0, 4)
            dy = (k // 2)[None, None, :]
            dx = (k % 2)[None, None, :]
            yy = fy.to(tl.int32)[:, :, None] + dy
            xx = fx.to(tl.int32)[:, :, None] + dx
            wy = tl.where(dy == 0, ((fy + 1) - iy)[:, :, None], (iy - fy)[:, :, None])
            wx = tl.where(dx == 0, ((fx + 1) - ix)[:, :, None], (ix - fx)[:, :, None])
            ok = ms[:, :, None] & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            t = tl.load(img_ptr + (pl.to(tl.int64) * HW)[:, None, None] + yy * W + xx,
                        mask=ok, other=0).to(ACC)
            if IS_U8:
                t = t * inv255
            v = tl.sum(tl.where(ok, (wy * wx) * t, 0), axis=2)
        if HAS_ROWS:
            v = tl.where(sel, v, x)
    v = tl.where(v < 0, 0, v)  # clamp(v, 0, 1); NaN propagates
    v = tl.where(v > 1, 1, v)
    if HAS_NORM:
        mu = tl.load(mean_ptr + c, mask=pv, other=0).to(ACC)
        sd = tl.load(std_ptr + c, mask=pv, other=1).to(ACC)
        if ACC == tl.float32:  # IEEE 1/std (fp32 `/` is approximate in Triton)
            inv = tl.math.div_rn(tl.full([R], 1.0, ACC), sd)
        else:
            inv = 1.0 / sd
        v = (v - mu[:, None]) * inv[:, None]
    if RNE_BF16:  # interpreter only: round to nearest even first (it truncates fp32 -> bf16)
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    tl.store(out_ptr + idx, v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _image_bwd_kernel(gout_ptr, img_ptr, src_ptr, loc_ptr, rows_ptr, std_ptr, gsrc_ptr,
                      B, C, H, W, h, w,
                      alpha_f: tl.float64, eps_f: tl.float64, inv255_f: tl.float64,
                      KIND: tl.constexpr, PER_SAMPLE: tl.constexpr, IS_U8: tl.constexpr,
                      HAS_ROWS: tl.constexpr, HAS_NORM: tl.constexpr, ACC: tl.constexpr,
                      RB: tl.constexpr, RC: tl.constexpr, BLOCK: tl.constexpr):
    # Tile [RB batch rows, RC src planes, BLOCK pixels]. A program owns RC planes x BLOCK pixels
    # of src (planes b*C + c of a per-sample src, channels c of a shared one) and loops over
    # the batch rows that read them: the single row b = plane // C per sample (RB = 1), or all
    # B rows of a shared src in chunks of RB, each chunk summed along its rows by tl.sum.
    sp = tl.program_id(0) * RC + tl.arange(0, RC)
    if PER_SAMPLE:
        spv = sp < B * C
    else:
        spv = sp < C
    c = sp % C
    hw = h * w
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    om = offs < hw
    py = (offs // w)[None, None, :]
    px = (offs % w)[None, None, :]
    sidx = sp.to(tl.int64)[:, None] * hw + offs[None, :]
    sm = spv[:, None] & om[None, :]
    s = tl.load(src_ptr + sidx, mask=sm, other=0).to(ACC)[None, :, :]  # [1, RC, BLOCK]
    if HAS_NORM:
        sd = tl.load(std_ptr + c, mask=spv, other=1).to(ACC)
        if ACC == tl.float32:  # IEEE 1/std (fp32 `/` is approximate in Triton)
            inv = tl.math.div_rn(tl.full([RC], 1.0, ACC), sd)[None, :, None]
        else:
            inv = (1.0 / sd)[None, :, None]
    else:
        inv = tl.full([1, 1, 1], 1.0, ACC)
    # d(out)/d(src) where the final clamp passes: patch (the value is src) passes where
    # 0 <= s <= 1; blend: alpha; add: 1 where -eps <= s <= eps
    if KIND == 1:
        d = tl.where((s >= 0) & (s <= 1), inv, 0)
    elif KIND == 2:
        alpha = tl.full([], alpha_f, ACC)
        d = alpha
    else:
        eps = tl.full([], eps_f, ACC)
        d = tl.where((s >= -eps) & (s <= eps), 1, 0).to(ACC)
        s_add = tl.where(s < -eps, -eps, s)
        s_add = tl.where(s_add > eps, eps, s_add)  # clamp(s, -eps, eps), the value added
    if IS_U8:
        inv255 = tl.full([], inv255_f, ACC)
    if PER_SAMPLE:
        n_rows = 1
    else:
        n_rows = B
    gs = tl.zeros([RC, BLOCK], ACC)
    for b0 in range(0, n_rows, RB):  # batch chunks in order: a deterministic sum
        if PER_SAMPLE:
            bb = (sp // C)[None, :]  # [1, RC]
            bv = spv[None, :]
        else:
            bb = (b0 + tl.arange(0, RB))[:, None]  # [RB, 1]
            bv = (bb < B) & spv[None, :]
        if HAS_ROWS:
            bv = bv & (tl.load(rows_ptr + bb, mask=bv, other=0) != 0)
        plane = ((bb * C + c[None, :]).to(tl.int64) * H * W)[:, :, None]  # image planes
        bv3 = bv[:, :, None] & om[None, None, :]
        if KIND == 1:
            y = tl.load(loc_ptr + 2 * bb, mask=bv, other=0)[:, :, None] + py
            x = tl.load(loc_ptr + 2 * bb + 1, mask=bv, other=0)[:, :, None] + px
            ok = bv3 & (y >= 0) & (y < H) & (x >= 0) & (x < W)
            go = tl.load(gout_ptr + plane + y * W + x, mask=ok, other=0).to(ACC)
            t = tl.where(ok, go * d, 0)
        else:
            pix = plane + offs[None, None, :]
            go = tl.load(gout_ptr + pix, mask=bv3, other=0).to(ACC)
            xv = tl.load(img_ptr + pix, mask=bv3, other=0).to(ACC)
            if IS_U8:
                xv = xv * inv255
            if KIND == 2:
                v = (1 - alpha) * xv + alpha * s
            else:
                v = xv + s_add
            ok = bv3 & (v >= 0) & (v <= 1)  # clamp(v, 0, 1) passes the gradient
            t = tl.where(ok, go * inv * d, 0)
        gs += tl.sum(t, axis=0)
    tl.store(gsrc_ptr + sidx, gs, mask=sm)


# ---- host functions ---------------------------------------------------------------------

def image_op_forward(images: torch.Tensor, kind: str, src: Optional[torch.Tensor],
                     loc: Optional[torch.Tensor], rows: Optional[torch.Tensor], alpha: float,
                     eps: float, mean: Optional[torch.Tensor], std: Optional[torch.Tensor],
                     out_dtype: torch.dtype) -> torch.Tensor:
    """Triton forward of abd_fast::image_op (same arguments and result as the C++ op)."""
    k = _parse_kind(kind)
    B, C, H, W, h, w, bstride = _check_image_op(images, k, src, loc, rows, mean, std, out_dtype)
    out = torch.empty(images.shape, dtype=out_dtype, device=images.device)
    if out.numel() == 0:
        return out
    dbl = images.dtype == torch.float64 or (src is not None and src.dtype == torch.float64)
    acc = torch.float64 if dbl else torch.float32
    HW = H * W
    # warp gathers 4 taps per pixel: half-size tiles keep it at ~8 taps per thread
    r, block = _plane_tiles(B * C, HW, images.device, shrink=2 if k == KINDS["warp"] else 1)
    grid = (triton.cdiv(B * C, r), triton.cdiv(HW, block))
    with on_device(images.device):
        _image_fwd_kernel[grid](
            images, src if k != 0 else images, loc if k == 1 else images,
            rows if rows is not None else images, mean if mean is not None else images,
            std if std is not None else images, out,
            B * C, C, H, W, h, w, bstride, float(alpha), float(eps), 1.0 / 255.0,
            KIND=k, IS_U8=images.dtype == torch.uint8, HAS_ROWS=rows is not None,
            HAS_NORM=mean is not None, ACC=_TL_ACC[acc],
            RNE_BF16=interpreted() and out_dtype == torch.bfloat16, R=r, BLOCK=block,
            num_warps=8 if k == KINDS["warp"] else 4)
    return out


def image_op_backward(grad_out: torch.Tensor, images: torch.Tensor, kind: str, src: torch.Tensor,
                      loc: Optional[torch.Tensor], rows: Optional[torch.Tensor], alpha: float,
                      eps: float, std: Optional[torch.Tensor]) -> torch.Tensor:
    """Triton gradient of image_op with respect to src (kinds patch, blend, add); same shape
    and dtype as src. Deterministic: no atomics, fixed summation order over the batch."""
    k = _parse_kind(kind)
    check(k in (1, 2, 3),
           f"image_op_backward: kind '{kind}' has no gradient with respect to src")
    check(src is not None, "image_op: kind needs src")
    B, C, H, W, h, w, bstride = _check_image_op(images, k, src, loc, rows, std, std,
                                                grad_out.dtype)
    check(tuple(grad_out.shape) == tuple(images.shape),
           "image_op_backward: grad_out must match images")
    check(grad_out.device == images.device,
           f"image_op_backward: grad_out must be on {images.device}")
    gout = grad_out.contiguous()
    gsrc = torch.empty_like(src)
    if gsrc.numel() == 0:
        return gsrc
    if images.numel() == 0:
        return gsrc.zero_()
    acc = torch.float64 if src.dtype == torch.float64 else torch.float32  # as the C++ kernel
    per_sample = bstride != 0
    n_src = (B if per_sample else 1) * C  # src planes
    rc, block = _plane_tiles(n_src, h * w, images.device)
    # batch rows per step for a shared src: the [RB, RC, BLOCK] tile up to 2 * _TILE elements
    rb = 1 if per_sample else min(triton.next_power_of_2(B),
                                  max(1, 2 * _tile_elems(images.device) // (rc * block)))
    grid = (triton.cdiv(n_src, rc), triton.cdiv(h * w, block))
    with on_device(images.device):
        _image_bwd_kernel[grid](
            gout, images, src, loc if k == 1 else images, rows if rows is not None else images,
            std if std is not None else images, gsrc,
            B, C, H, W, h, w, float(alpha), float(eps), 1.0 / 255.0,
            KIND=k, PER_SAMPLE=per_sample, IS_U8=images.dtype == torch.uint8,
            HAS_ROWS=rows is not None, HAS_NORM=std is not None, ACC=_TL_ACC[acc], RB=rb, RC=rc,
            BLOCK=block, num_warps=4)
    return gsrc


__all__ = ["image_op_forward", "image_op_backward", "KINDS"]

"""Triton kernels of the fused InfoNCE / CLIP loss (`abd_fast::contrastive_forward_triton` and
`abd_fast::contrastive_backward_triton`); same semantics as the C++ ops (csrc/ops.cpp,
csrc/cpu/contrastive.cpp). The N x M logits L = s * q @ k.T are never materialized.

Notation: q [N,D], k [M,D], s = scale (read from memory inside the kernels, never .item(), so no
GPU sync), S = q @ k.T (raw dots, accumulated in fp32, fp64 for fp64 inputs), L = s * S.
Positive of row i: column offset + i. row_lse_i = logsumexp_j L_ij; col_lse_j = logsumexp_i L_ij.

Forward (`_fwd_kernel`), grid (row groups, column splits). A program owns RB_PER row blocks
of BM rows and CB_PER column blocks of BN columns and walks its tiles column block
by column block (outer), row block by row block (inner). Each [BM, BN] tile is one tl.dot per D
chunk of BD into an fp32 accumulator; then
  * row statistics (running max, sum of exp) are merged online into a per-split partial buffer
    row_part [n_splits, N] (read-modify-write by the one program owning those rows in that
    split; a tl.debug_barrier per column block makes the stores visible to the whole CTA),
  * column statistics (symmetric loss only) are merged online in registers over the group's
    rows and stored once per column block into col_part [n_groups, M],
  * the positive logit L_{i, offset+i} is picked out of the one tile that holds it.
A cheap torch merge of the partials (log-sum-exp across splits / groups) gives row_lse, col_lse
and the loss. No atomics: every buffer element has one writer, so results are deterministic.

Backward: dLoss/dL_ij = w * G_ij with G_ij = P_ij [+ Q_ij] - c [j == offset + i], P = row softmax
exp(L - row_lse), Q = column softmax exp(L - col_lse) (symmetric), w = grad/N (grad/(2N)
symmetric) and c = w_pos / w = 1 (2 symmetric). G is in [-2, 2], which keeps it representable
when cast to bf16/fp16 for the tensor-core dots (bf16: as hi + lo parts, see BF16_SPLIT_G);
w and s are applied once, in fp32, at the end.
  * `_dq_kernel`, grid (row blocks, D-output chunks of BDO): loops over all column blocks,
    recomputes the S tile (tl.dot over D chunks), forms G and accumulates dq += G @ k[:, chunk]
    in fp32; dq = (s w) acc. Programs of the first D chunk also accumulate sum_ij G_ij S_ij over
    their rows; grad_scale = w * (sum of these per-row-block partials), summed by torch in a
    fixed order.
  * `_dk_kernel`, grid (column blocks, D-output chunks): loops over the row blocks, recomputes
    the tile and accumulates dk += G.T @ q[:, chunk].
Deterministic (no atomics); the D-output chunking bounds the accumulator to BM x BDO fp32
registers, at the price of recomputing S once per extra chunk when D > BDO.

Block-size heuristic (`_config`, `_FWD`/`_BWD`; one config per dtype, no autotuning):
  * a per-dtype table (see _FWD/_BWD) picked from ptxas resource usage of AOT builds for sm_80
    and sm_90 (no spills): 16-bit inputs: forward 64x64 tiles, BD 64, 8 warps; backward 64x64,
    BD 64, BDO 128, 8 warps (a 64x128 fp32 accumulator is 32 registers per thread).
    fp32 (FMA dots) and fp64 use 32..64-wide tiles and BD 16..32.
  * every size is then shrunk to next_pow2 of N, M or D (not below 16, tl.dot's minimum), so a
    3 x 300 problem does not run 64-row tiles.
  * D-output chunks: D = 512 / 768 / 1024 (CLIP ViT-B / L / H) use 4 / 6 / 8 chunks of 128 for
    16-bit inputs; each chunk's programs recompute S. BDO = 256 halves that (212-255 registers).
  * Forward split: about 2 programs per SM (4 under the interpreter, to exercise the merges):
    non-symmetric: one row block per group, columns split so that n_row_blocks * n_splits
    reaches the target; symmetric: about sqrt(target) splits and groups each, so the partials
    stay small for large batches.
Memory besides the outputs: forward 2 * n_splits * N + 2 * n_groups * M (symmetric) + N floats
of the accumulation type (e.g. N = M = 65536 on 132 SMs: 16 splits and 17 groups, 17 MB in
fp32, against 16 GB for the logits); backward one float per row block.

Precision: bf16/fp16 inputs go to tl.dot as they are (fp32 accumulation); fp32 inputs use
input_precision="ieee" (FP32_DOT_PRECISION; no TF32, the results match the fp32 reference to
~1e-6); fp64 dots accumulate in fp64. exp runs in the accumulation type.

Interpreter (TRITON_INTERPRET=1): tl.dot on bfloat16 is wrong there (numpy sees the raw uint16
bits), so under the interpreter bf16 tiles are upcast to fp32 just before each tl.dot
(UPCAST_DOT). bf16 -> fp32 is exact and bf16 products are exact in fp32, so the result is what
the bf16 tensor-core dot with fp32 accumulation computes. fp16, fp32 and fp64 dots run as on GPU.
The interpreter also converts fp32 -> bf16 by truncation where a GPU rounds to nearest even;
under the interpreter the bf16 gradients are therefore rounded explicitly first (RNE_BF16).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import check, interpreted, num_sms, on_device

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# bf16 backward: feed dL/dlogits to the dq/dk MMAs as bf16 hi + lo (two MMAs) instead of one
# bf16 operand. One bf16 operand (8 mantissa bits) gave gradient errors up to 1.6x plain
# PyTorch's bf16 error over 30 seeds of tests/test_contrastive.py's low-precision test (limit
# 2x); hi + lo matches the C++ fp32 kernel (<= 0.95x) at 1.5x the backward MMA work when
# D <= BDO (less for larger D, where the recomputation dominates).
BF16_SPLIT_G = True

# tl.dot input precision for fp32 features. "ieee" (FMA, no tensor cores) matches the fp32
# reference to ~1e-6 as the tests require; "tf32x3" or "bf16x6" would use the tensor cores at
# near-fp32 accuracy (not verifiable under the interpreter, which ignores input_precision).
FP32_DOT_PRECISION = "ieee"


def _check_contrastive(q, k, scale, offset: int, symmetric: bool):
    """Mirror of check_contrastive in csrc/common/checks.h."""
    check(q.dim() == 2 and k.dim() == 2 and q.shape[1] == k.shape[1],
           f"contrastive: q [N,D] and k [M,D] must share D, got {list(q.shape)} and "
           f"{list(k.shape)}")
    check(q.dtype == k.dtype, "contrastive: q and k must share a dtype")
    check(q.dtype in _FLOAT_DTYPES,
           "contrastive: features must be float32, float64, bfloat16 or float16")
    check(q.device == k.device and scale.device == q.device,
           "contrastive: q, k and scale must be on one device")
    check(scale.numel() == 1, "contrastive: scale must hold one value")
    check(scale.dtype.is_floating_point, "contrastive: scale must be a floating tensor")
    check(q.shape[0] > 0, "contrastive: empty batch")
    if symmetric:
        check(q.shape[0] == k.shape[0] and offset == 0,
               "contrastive: the symmetric loss needs N == M and offset 0")
    else:
        check(offset >= 0 and offset + q.shape[0] <= k.shape[0],
               f"contrastive: positives offset {offset} + N {q.shape[0]} exceed M {k.shape[0]}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32



# Block sizes per feature dtype: forward (BM, BN, BD, num_warps, num_stages) and backward
# (BM, BN, BD, BDO, num_warps, num_stages). Chosen from ptxas resource usage of AOT builds for
# sm_80 and sm_90 (D and strides divisible by 16): no register spills, <= 64 KB shared memory.
#   16-bit fwd 64x64x64, 8 warps:  85-128 registers;  bwd BDO 128, 8 warps: 142-203 registers
#   fp32   fwd 64x64x16, 8 warps: 120-176 registers;  bwd 32x32x16, BDO 64:  128-137 registers
#   fp64   fwd 32x32x16, 4 warps:  94-124 registers;  bwd 32x32x16, BDO 32:  158-168 registers
# (16-bit bwd with BDO 256 needs 212-255 registers and spills a little on sm_90; fp32 dots
# are FMA-based with input_precision="ieee" and need small tiles on sm_80.)
# Forward and backward use the same BD: the backward then recomputes S with the same
# summation order as the forward, so P = exp(s S - row_lse) is consistent with row_lse
# (with fp32 BD 32 forward / 16 backward, gradients at scale 100 were 4x less accurate).
_FWD = {"16bit": (64, 64, 64, 8, 3), "fp32": (64, 64, 16, 8, 2), "fp64": (32, 32, 16, 4, 2)}
_BWD = {"16bit": (64, 64, 64, 128, 8, 3), "fp32": (32, 32, 16, 64, 4, 2),
        "fp64": (32, 32, 16, 32, 4, 2)}


def _config(N: int, M: int, D: int, dtype: torch.dtype, backward: bool) -> dict:
    """Block sizes: the table above, shrunk to the problem (powers of two, >= 16 for tl.dot)."""
    key = {torch.float32: "fp32", torch.float64: "fp64"}.get(dtype, "16bit")
    np2 = triton.next_power_of_2
    if backward:
        bm, bn, bd, bdo, warps, stages = _BWD[key]
    else:
        (bm, bn, bd, warps, stages), bdo = _FWD[key], 16
    return dict(BM=min(bm, max(16, np2(N))), BN=min(bn, max(16, np2(M))),
                BD=min(bd, max(16, np2(D))), BDO=min(bdo, max(16, np2(D))),
                num_warps=warps, num_stages=stages)


def _split(n_rb: int, n_cb: int, symmetric: bool, device: torch.device):
    """(rows blocks per group, column blocks per split, n_groups, n_splits) of the forward."""
    # interpreter: target 4 programs, enough to exercise the split/group merges
    target = 2 * num_sms(device, 2)
    if symmetric:
        n_splits = min(n_cb, max(1, math.isqrt(target)))
        n_groups = min(n_rb, max(1, triton.cdiv(target, n_splits)))
    else:
        n_groups = n_rb
        n_splits = min(n_cb, max(1, triton.cdiv(target, n_rb)))
    rb_per, cb_per = triton.cdiv(n_rb, n_groups), triton.cdiv(n_cb, n_splits)
    return rb_per, cb_per, triton.cdiv(n_rb, rb_per), triton.cdiv(n_cb, cb_per)


# ---- kernels ----------------------------------------------------------------------------
# Helpers are avoided inside loops on purpose: under the interpreter each @triton.jit helper
# call costs about a millisecond; the one used below (_tile_dots) is called once per tile.

@triton.jit
def _tile_dots(q_ptr, k_ptr, rows, rv, cols, cv, D, sq0, sq1, sk0, sk1,
               ACC: tl.constexpr, UPCAST_DOT: tl.constexpr, PREC: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """S = q[rows] @ k[cols].T as a [BM, BN] ACC tile (fp32 for 16-bit/fp32 inputs)."""
    acc = tl.zeros([BM, BN], ACC)
    q_row = q_ptr + rows.to(tl.int64)[:, None] * sq0
    k_row = k_ptr + cols.to(tl.int64)[:, None] * sk0
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        dv = (dd < D)[None, :]
        a = tl.load(q_row + dd[None, :] * sq1, mask=rv[:, None] & dv, other=0.0)
        b = tl.load(k_row + dd[None, :] * sk1, mask=cv[:, None] & dv, other=0.0)
        if UPCAST_DOT:  # interpreter only: its tl.dot cannot multiply bf16
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    return acc


@triton.jit
def _round_to_bf16_grid(x):
    """Interpreter only: x (fp32) rounded to the nearest bf16 value, ties to even, still as fp32.

    The interpreter converts fp32 -> bf16 by truncation (a GPU rounds to nearest even), which
    doubles the rounding error of bf16 results; after this rounding its truncation is exact.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, scale_ptr, row_m_ptr, row_l_ptr, col_m_ptr, col_l_ptr, diag_ptr,
                N, M, D, offset, sq0, sq1, sk0, sk1, RB_PER, CB_PER,
                SYM: tl.constexpr, ACC: tl.constexpr, UPCAST_DOT: tl.constexpr,
                PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    grp = tl.program_id(0)
    spl = tl.program_id(1)
    rb0 = grp * RB_PER
    rb1 = tl.minimum(rb0 + RB_PER, tl.cdiv(N, BM))
    cb0 = spl * CB_PER
    cb1 = tl.minimum(cb0 + CB_PER, tl.cdiv(M, BN))
    s = tl.load(scale_ptr).to(ACC)
    row_m = row_m_ptr + spl.to(tl.int64) * N
    row_l = row_l_ptr + spl.to(tl.int64) * N
    for cb in range(cb0, cb1):
        cols = cb * BN + tl.arange(0, BN)
        cv = cols < M
        if SYM:
            cm = tl.full([BN], float("-inf"), ACC)
            cl = tl.zeros([BN], ACC)
        for rb in range(rb0, rb1):
            rows = rb * BM + tl.arange(0, BM)
            rv = rows < N
            L = _tile_dots(q_ptr, k_ptr, rows, rv, cols, cv, D, sq0, sq1, sk0, sk1,
                           ACC, UPCAST_DOT, PREC, BM, BN, BD) * s
            # row statistics: merge this tile into the split's partial (first block: fresh)
            Lr = tl.where(cv[None, :], L, float("-inf"))
            old = rv & (cb > cb0)
            m_old = tl.load(row_m + rows, mask=old, other=float("-inf"))
            l_old = tl.load(row_l + rows, mask=old, other=0.0)
            m_new = tl.maximum(m_old, tl.max(Lr, axis=1))
            l_new = l_old * tl.exp(m_old - m_new) + tl.sum(tl.exp(Lr - m_new[:, None]), axis=1)
            tl.store(row_m + rows, m_new, mask=rv)
            tl.store(row_l + rows, l_new, mask=rv)
            # the positive logit of row i (column offset + i) lies in exactly one tile
            pos = rows + offset
            hit = cols[None, :] == pos[:, None]
            tl.store(diag_ptr + rows, tl.sum(tl.where(hit, L, 0.0), axis=1),
                     mask=rv & (pos >= cb * BN) & (pos < cb * BN + BN))
            if SYM:  # column statistics over the group's rows, online in registers
                Lc = tl.where(rv[:, None], L, float("-inf"))
                cm_new = tl.maximum(cm, tl.max(Lc, axis=0))
                cl = cl * tl.exp(cm - cm_new) + tl.sum(tl.exp(Lc - cm_new[None, :]), axis=0)
                cm = cm_new
        if SYM:
            tl.store(col_m_ptr + grp.to(tl.int64) * M + cols, cm, mask=cv)
            tl.store(col_l_ptr + grp.to(tl.int64) * M + cols, cl, mask=cv)
        # the next column block re-reads row_m/row_l, possibly through other threads
        tl.debug_barrier()


@triton.jit
def _dq_kernel(q_ptr, k_ptr, scale_ptr, gl_ptr, row_lse_ptr, col_lse_ptr, dq_ptr, gs_ptr,
               N, M, D, offset, sq0, sq1, sk0, sk1, sdq0, sdq1,
               SYM: tl.constexpr, ACC: tl.constexpr, UPCAST_DOT: tl.constexpr,
               PREC: tl.constexpr, SPLIT_G: tl.constexpr, RNE_BF16: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDO: tl.constexpr):
    rb = tl.program_id(0)
    dc = tl.program_id(1)
    s = tl.load(scale_ptr).to(ACC)
    if SYM:  # w = grad / (2N), c_pos = w_pos / w
        n_w = tl.full([], 2 * N, ACC)
        c_pos = 2.0
    else:  # w = grad / N
        n_w = tl.full([], N, ACC)
        c_pos = 1.0
    if ACC == tl.float32:  # IEEE division (fp32 `/` is approximate in Triton)
        w = tl.math.div_rn(tl.load(gl_ptr).to(ACC), n_w)
    else:
        w = tl.load(gl_ptr).to(ACC) / n_w
    rows = rb * BM + tl.arange(0, BM)
    rv = rows < N
    r_lse = tl.load(row_lse_ptr + rows, mask=rv, other=0.0).to(ACC)
    do = dc * BDO + tl.arange(0, BDO)
    dov = do < D
    acc = tl.zeros([BM, BDO], ACC)
    gs = tl.zeros([BM], ACC)
    for cb in range(0, tl.cdiv(M, BN)):
        cols = cb * BN + tl.arange(0, BN)
        cv = cols < M
        S = _tile_dots(q_ptr, k_ptr, rows, rv, cols, cv, D, sq0, sq1, sk0, sk1,
                       ACC, UPCAST_DOT, PREC, BM, BN, BD)
        L = S * s
        P = tl.exp(L - r_lse[:, None])
        if SYM:
            c_lse = tl.load(col_lse_ptr + cols, mask=cv, other=0.0).to(ACC)
            P += tl.exp(L - c_lse[None, :])
        G = P - tl.where(cols[None, :] == (rows + offset)[:, None], c_pos, 0.0)
        G = tl.where(rv[:, None] & cv[None, :], G, 0.0)
        gs += tl.sum(G * S, axis=1)
        kt = tl.load(k_ptr + cols.to(tl.int64)[:, None] * sk0 + do[None, :] * sk1,
                     mask=cv[:, None] & dov[None, :], other=0.0)
        g_op = G.to(kt.dtype)  # bf16/fp16 operands for the tensor cores; G is in [-2, 2]
        if SPLIT_G:  # bf16: G = hi + lo, two MMAs, ~16 mantissa bits instead of 8
            g_lo = (G - g_op.to(ACC)).to(kt.dtype)
        if UPCAST_DOT:
            g_op = g_op.to(tl.float32)
            kt = kt.to(tl.float32)
            if SPLIT_G:
                g_lo = g_lo.to(tl.float32)
        acc = tl.dot(g_op, kt, acc, input_precision=PREC)
        if SPLIT_G:
            acc = tl.dot(g_lo, kt, acc, input_precision=PREC)
    dq = acc * (s * w)
    if RNE_BF16:
        dq = _round_to_bf16_grid(dq)
    tl.store(dq_ptr + rows.to(tl.int64)[:, None] * sdq0 + do[None, :] * sdq1,
             dq.to(dq_ptr.dtype.element_ty), mask=rv[:, None] & dov[None, :])
    if dc == 0:
        tl.store(gs_ptr + rb, tl.sum(gs, axis=0) * w)


@triton.jit
def _dk_kernel(q_ptr, k_ptr, scale_ptr, gl_ptr, row_lse_ptr, col_lse_ptr, dk_ptr,
               N, M, D, offset, sq0, sq1, sk0, sk1, sdk0, sdk1,
               SYM: tl.constexpr, ACC: tl.constexpr, UPCAST_DOT: tl.constexpr,
               PREC: tl.constexpr, SPLIT_G: tl.constexpr, RNE_BF16: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDO: tl.constexpr):
    cb = tl.program_id(0)
    dc = tl.program_id(1)
    s = tl.load(scale_ptr).to(ACC)
    if SYM:  # w = grad / (2N), c_pos = w_pos / w
        n_w = tl.full([], 2 * N, ACC)
        c_pos = 2.0
    else:  # w = grad / N
        n_w = tl.full([], N, ACC)
        c_pos = 1.0
    if ACC == tl.float32:  # IEEE division (fp32 `/` is approximate in Triton)
        w = tl.math.div_rn(tl.load(gl_ptr).to(ACC), n_w)
    else:
        w = tl.load(gl_ptr).to(ACC) / n_w
    cols = cb * BN + tl.arange(0, BN)
    cv = cols < M
    if SYM:
        c_lse = tl.load(col_lse_ptr + cols, mask=cv, other=0.0).to(ACC)
    do = dc * BDO + tl.arange(0, BDO)
    dov = do < D
    acc = tl.zeros([BN, BDO], ACC)
    for rb in range(0, tl.cdiv(N, BM)):
        rows = rb * BM + tl.arange(0, BM)
        rv = rows < N
        r_lse = tl.load(row_lse_ptr + rows, mask=rv, other=0.0).to(ACC)
        S = _tile_dots(q_ptr, k_ptr, rows, rv, cols, cv, D, sq0, sq1, sk0, sk1,
                       ACC, UPCAST_DOT, PREC, BM, BN, BD)
        L = S * s
        P = tl.exp(L - r_lse[:, None])
        if SYM:
            P += tl.exp(L - c_lse[None, :])
        G = P - tl.where(cols[None, :] == (rows + offset)[:, None], c_pos, 0.0)
        G = tl.where(rv[:, None] & cv[None, :], G, 0.0)
        qt = tl.load(q_ptr + rows.to(tl.int64)[:, None] * sq0 + do[None, :] * sq1,
                     mask=rv[:, None] & dov[None, :], other=0.0)
        g_op = G.to(qt.dtype)
        if SPLIT_G:
            g_lo = (G - g_op.to(ACC)).to(qt.dtype)
        if UPCAST_DOT:
            g_op = g_op.to(tl.float32)
            qt = qt.to(tl.float32)
            if SPLIT_G:
                g_lo = g_lo.to(tl.float32)
        acc = tl.dot(tl.trans(g_op), qt, acc, input_precision=PREC)
        if SPLIT_G:
            acc = tl.dot(tl.trans(g_lo), qt, acc, input_precision=PREC)
    dk = acc * (s * w)
    if RNE_BF16:
        dk = _round_to_bf16_grid(dk)
    tl.store(dk_ptr + cols.to(tl.int64)[:, None] * sdk0 + do[None, :] * sdk1,
             dk.to(dk_ptr.dtype.element_ty), mask=cv[:, None] & dov[None, :])


# ---- host functions ---------------------------------------------------------------------

def _consts(dtype: torch.dtype) -> dict:
    acc = _acc_dtype(dtype)
    # fp32/fp64 operands: exact ("ieee") dots; 16-bit operands: Triton's default (the input
    # precision only matters for fp32 operands)
    prec = FP32_DOT_PRECISION if dtype == torch.float32 else (
        "ieee" if dtype == torch.float64 else None)
    return dict(ACC=tl.float64 if acc == torch.float64 else tl.float32,
                UPCAST_DOT=interpreted() and dtype == torch.bfloat16, PREC=prec)


def _lse_merge(m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """log-sum-exp across the partials [P, X] (max m, sum l of exp(. - m)) -> [X]."""
    mx = m.amax(0)
    return mx + torch.log((l * torch.exp(m - mx)).sum(0))


def contrastive_forward(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, offset: int,
                        symmetric: bool):
    """(loss, row_lse, col_lse) as abd_fast::contrastive_forward (see csrc/ops.cpp)."""
    _check_contrastive(q, k, scale, offset, symmetric)
    N, D = q.shape
    M = k.shape[0]
    acc = _acc_dtype(q.dtype)
    dev = q.device
    cfg = _config(N, M, D, q.dtype, backward=False)
    BM, BN = cfg["BM"], cfg["BN"]
    n_rb, n_cb = triton.cdiv(N, BM), triton.cdiv(M, BN)
    rb_per, cb_per, n_groups, n_splits = _split(n_rb, n_cb, symmetric, dev)
    row_m = torch.empty((n_splits, N), dtype=acc, device=dev)
    row_l = torch.empty_like(row_m)
    col_m = torch.empty((n_groups if symmetric else 0, M), dtype=acc, device=dev)
    col_l = torch.empty_like(col_m)
    diag = torch.empty(N, dtype=acc, device=dev)
    with on_device(dev):
        _fwd_kernel[(n_groups, n_splits)](
            q, k, scale, row_m, row_l, col_m if symmetric else row_m,
            col_l if symmetric else row_l, diag,
            N, M, D, offset, q.stride(0), q.stride(1), k.stride(0), k.stride(1), rb_per, cb_per,
            SYM=symmetric, BM=BM, BN=BN, BD=cfg["BD"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], **_consts(q.dtype))
    row_lse = _lse_merge(row_m, row_l)
    loss = (row_lse - diag).mean()
    if symmetric:
        col_lse = _lse_merge(col_m, col_l)
        loss = (loss + (col_lse - diag).mean()) / 2
    else:
        col_lse = torch.empty(0, dtype=acc, device=dev)
    return loss, row_lse, col_lse


def contrastive_backward(grad_loss: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         scale: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor,
                         offset: int, symmetric: bool):
    """(grad_q, grad_k, grad_scale) as abd_fast::contrastive_backward (see csrc/ops.cpp)."""
    _check_contrastive(q, k, scale, offset, symmetric)
    N, D = q.shape
    M = k.shape[0]
    acc = _acc_dtype(q.dtype)
    dev = q.device
    check(row_lse.dtype == acc and row_lse.numel() == N
           and (not symmetric or (col_lse.dtype == acc and col_lse.numel() == M)),
           "contrastive_backward: row_lse/col_lse do not match contrastive_forward's outputs")
    check(grad_loss.numel() == 1 and grad_loss.device == dev,
           "contrastive_backward: grad_loss must be one value on the features' device")
    row_lse = row_lse.contiguous()
    col_lse = col_lse.contiguous() if symmetric else row_lse
    cfg = _config(N, M, D, q.dtype, backward=True)
    BM, BN, BDO = cfg["BM"], cfg["BN"], cfg["BDO"]
    n_rb, n_cb = triton.cdiv(N, BM), triton.cdiv(M, BN)
    n_dc = max(1, triton.cdiv(D, BDO))  # >= 1: the first chunk's programs write grad_scale
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    gs = torch.empty(n_rb, dtype=acc, device=dev)
    consts = _consts(q.dtype)
    bf16 = q.dtype == torch.bfloat16
    common = dict(SYM=symmetric, SPLIT_G=bf16 and BF16_SPLIT_G, RNE_BF16=bf16 and interpreted(),
                  BM=BM, BN=BN, BD=cfg["BD"], BDO=BDO, num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"], **consts)
    with on_device(dev):
        _dq_kernel[(n_rb, n_dc)](
            q, k, scale, grad_loss, row_lse, col_lse, dq, gs,
            N, M, D, offset, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            dq.stride(0), dq.stride(1), **common)
        _dk_kernel[(n_cb, n_dc)](
            q, k, scale, grad_loss, row_lse, col_lse, dk,
            N, M, D, offset, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            dk.stride(0), dk.stride(1), **common)
    grad_scale = gs.sum().to(scale.dtype).reshape(scale.shape)
    return dq, dk, grad_scale


__all__ = ["contrastive_forward", "contrastive_backward"]

"""Fused LayerNorm (+ residual add): y = LN(x) and (y, h) = (LN(x + residual), x + residual).

Anatomy (see DESIGN.md): Triton kernels -> launchers -> torch.library custom ops -> autograd.Function ->
PyTorch reference -> public functionals and an ``nn.LayerNorm``-compatible module.

Kernels work on a (M, D) view: M = prod(leading dims), rows addressed by a row stride, last dim unit-stride.
Statistics are fp32; mean and rstd (M,) are saved for the backward. dweight/dbias are reduced
deterministically: each backward program sums its own contiguous block of rows into a (G, D) fp32 partial,
then kernels/colsum.py adds the G partials in a fixed order (no atomics: bit-equal run to run).
"""

from __future__ import annotations

import functools
import itertools
from typing import ContextManager, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from flashvit.kernels._aot import AotSpec, runtime_spec
from flashvit.kernels._dispatch import (
    FLOAT_DTYPES,
    HAS_TRITON,
    INTERPRET,
    Launcher,
    apply,
    cdiv,
    check_same_device,
    check_tensor,
    check_triton_dtypes,
    custom_op,
    get_backend,
    in_graph_step,
    launch,
    needs_grad,
    next_pow2,
    once_differentiable,
    pushed,
    row_stride,
    rows2d,
    tl,
    triton,
    use_triton,
)
from flashvit.kernels.colsum import colsum_partials

# Under the 'auto' backend on CUDA, run these kernels or eager PyTorch? Earlier runs (H200 run1/run2, H100
# run3 + diag) found the calls host-bound (~55 us of CPU per Triton launch); launches now go through
# _dispatch.Launcher. Measured on an H100 with Triton 3.6, bf16, rows = 256*197
# (bench/results/2026-11-26-h100-run4-ops/ops.csv): forward 1.23-2.16x eager at D = 384-1280 (with or
# without the add); forward+backward 0.91x / 0.74x (LN / add+LN) at D = 384, 0.78x / 1.12x at D = 768,
# 1.18-1.68x at D >= 1024. End to end (2026-11-26-h100-run4/model.csv, flashvit[ln=triton] vs flashvit):
# ViT-B/16 training 1.19x vs 1.15x timm, ViT-L/16 1.18x vs 1.12x (that run's ViT-S rows are not used: timm's
# own ViT-S step ran slower than the run before). So 'auto' runs the kernels without autograd at every width
# and with autograd from D = AUTO_MIN_D_TRAINING (below it the op rows lose: host-bound). Inside a step a CUDA
# graph replays (_dispatch.graph_step: flashvit.capture_cuda_graph) the host time is gone and device time
# decides: the kernels at every width (run 6's device-time rows, 2026-11-26-h100-run6/ops-graph.csv, fwd+bwd:
# 3.32x eager at D = 384, 2.88x with the add, 1.75-2.45x at 768-1280).
AUTO_TRITON = True
AUTO_MIN_D_TRAINING = 768

MAX_D = 8192  # one row lives in registers: BLOCK_N = next_pow2(D) <= 8192
MIN_BLOCK_N = 64  # smaller rows pad to 64 lanes and pack more rows per program
TILE = 2048  # target elements per program tile (ROWS x BLOCK_N)
# Backward: rows per program. Short enough that ~M/BWD_ROWS_PER_PROG programs keep every SM busy
# (a one-wave grid looping over ~200 rows each was latency-bound: bench/results, H200, 0.4-0.7x eager).
BWD_ROWS_PER_PROG = 32

if HAS_TRITON:
    _jit = triton.jit
else:  # pragma: no cover - no triton on this platform; the kernels are never launched

    def _jit(fn):
        return fn


# ---------------------------------------------------------------------------------------------
# Kernels


@_jit
def _dev_ln_fwd_load(X, R, H, r64, cols, mask, stride_x, stride_r, stride_h, sc, HAS_RES: tl.constexpr,
                     HAS_SCALE: tl.constexpr):
    # One column chunk (ROWS, C) of the LN input in fp32: x (times sc (ROWS,) with HAS_SCALE, rounded to x's
    # dtype), or h = that + r (HAS_RES), rounded to h's dtype and stored, as eager `x + residual` does.
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        x = (x * sc[:, None]).to(X.dtype.element_ty).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + r64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(H.dtype.element_ty)
        tl.store(H + r64 * stride_h + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    return x


@_jit
def _dev_ln_fwd_store(Y, W, B, r64, cols, mask, xc, rstd, stride_y, w, b, WB_LOADED: tl.constexpr):
    # y = xc·rstd·w + b of one column chunk. w and b are loaded at x's shape (ROWS, C), each row its copy (L1
    # hits): loaded as (C,), they took x's layout through shared memory, two conversions a program (sm_90 SASS,
    # D = 768 at 2 rows, 8 warps: 11 barriers and 40 registers that way, 7 and 32 this way). WB_LOADED: given
    # (``w``, ``b``: the pipelined loop's, loaded once a program), else loaded here.
    if not WB_LOADED:
        wb = cols[None, :] + 0 * r64.to(tl.int32)  # (ROWS, C)
        w = tl.load(W + wb, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + wb, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w.to(tl.float32) + b.to(tl.float32)
    tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@_jit
def _dev_ln_fwd_wb(W, B, cols, N, ROWS: tl.constexpr):
    # The pipelined loop's w and b (ROWS, C) as stored, loaded once a program: a load in the loop would be
    # pipelined too (cp.async, past L1) and read them from L2 again every tile.
    wb = cols[None, :] + 0 * tl.arange(0, ROWS)[:, None]
    return tl.load(W + wb, mask=wb < N, other=0.0), tl.load(B + wb, mask=wb < N, other=0.0)


@_jit
def _dev_ln_fwd_rows(X, R, W, B, Y, H, Mean, Rstd, S, rows, M, N, stride_x, stride_r, stride_y, stride_h, eps, T,
                     w, b, w2, b2, BLOCK_N: tl.constexpr, HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr,
                     BLOCK_N2: tl.constexpr, WB_LOADED: tl.constexpr):
    # LN (and the add) of rows (ROWS,); w, b, w2, b2: WB_LOADED's (else placeholders).
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]  # (ROWS, BLOCK_N)
    r64 = rows.to(tl.int64)[:, None]  # int64: M * stride can pass 2^31
    if HAS_SCALE:
        sc = tl.load(S + rows // T, mask=row_mask, other=0.0).to(tl.float32)  # (ROWS,)
    else:
        sc = 1.0  # (unused)
    x = _dev_ln_fwd_load(X, R, H, r64, cols, mask, stride_x, stride_r, stride_h, sc, HAS_RES, HAS_SCALE)
    # x0 (ROWS,): each row's first element (what the tile holds at column 0; a cached reload), the shift of the
    # sums below: a row of equal values gives x - x0 = 0 exactly, so y = b exactly (an fp32 sum / N is off by
    # ulps there, which rstd ~ eps^-1/2 magnifies), and large offsets cancel before the sums.
    x0 = tl.load(X + rows.to(tl.int64) * stride_x, mask=row_mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        x0 = (x0 * sc).to(X.dtype.element_ty).to(tl.float32)
    if HAS_RES:
        r0 = tl.load(R + rows.to(tl.int64) * stride_r, mask=row_mask, other=0.0).to(tl.float32)
        x0 = (x0 + r0).to(H.dtype.element_ty).to(tl.float32)  # h's first element, the same rounding
    d = tl.where(mask, x - x0[:, None], 0.0)
    sum_d = tl.sum(d, axis=1)
    if BLOCK_N2 > 0:
        cols2 = BLOCK_N + tl.arange(0, BLOCK_N2)
        col_mask2 = cols2 < N
        mask2 = row_mask[:, None] & col_mask2[None, :]
        x2 = _dev_ln_fwd_load(X, R, H, r64, cols2, mask2, stride_x, stride_r, stride_h, sc, HAS_RES, HAS_SCALE)
        d2 = tl.where(mask2, x2 - x0[:, None], 0.0)
        sum_d += tl.sum(d2, axis=1)
    mean_d = sum_d / N  # (ROWS,) mean - x0
    xc = tl.where(mask, d - mean_d[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1)
    if BLOCK_N2 > 0:
        xc2 = tl.where(mask2, d2 - mean_d[:, None], 0.0)
        var += tl.sum(xc2 * xc2, axis=1)
    mean = x0 + mean_d  # (saved: the backward's x - mean is 0 on a row of equal values too)
    rstd = 1.0 / tl.sqrt(var / N + eps)  # (ROWS,)
    _dev_ln_fwd_store(Y, W, B, r64, cols, mask, xc, rstd, stride_y, w, b, WB_LOADED)
    if BLOCK_N2 > 0:
        _dev_ln_fwd_store(Y, W, B, r64, cols2, mask2, xc2, rstd, stride_y, w2, b2, WB_LOADED)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@_jit
def _ln_fwd_kernel(
    X, R, W, B, Y, H, Mean, Rstd, S,  # X, R: (M, N) row-strided; W, B: (N,); Y, H: (M, N) row-strided; Mean, Rstd: (M,)
    M, N, stride_x, stride_r, stride_y, stride_h, eps, T,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr, HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_N2: tl.constexpr, PIPE: tl.constexpr, TILES: tl.constexpr,
):
    # HAS_SCALE (with HAS_RES): h = x·s + r, S (M / T,) one factor for each sample's T rows (stochastic depth:
    # 0 or 1 / keep_prob); x·s in fp32, rounded to x's dtype first, as eager's drop_path(x) + r.
    # BLOCK_N2 > 0: a row is two column chunks, BLOCK_N + BLOCK_N2 (384 = 256 + 128), not one padded power of two
    # (the backward's layout; see LN_BWD_CHUNKS).
    # PIPE = 0: a program LNs one tile of ROWS rows. PIPE > 0 (LN_PIPE): TILES consecutive tiles a program, in a
    # loop Triton pipelines PIPE stages deep: the next tiles' loads go to shared memory (cp.async) while this one
    # reduces, so an SM keeps reads in flight through the reductions without more registers (a one-tile program
    # has none in flight there). (Not persistent programs: a grid sized to fill the SMs would need each build's
    # occupancy, and ptxas gives the same tile 40 to 80 registers a thread.)
    pid = tl.program_id(0)
    if PIPE > 0:
        cols = tl.arange(0, BLOCK_N)
        w, b = _dev_ln_fwd_wb(W, B, cols, N, ROWS)
        if BLOCK_N2 > 0:
            cols2 = BLOCK_N + tl.arange(0, BLOCK_N2)
            w2, b2 = _dev_ln_fwd_wb(W, B, cols2, N, ROWS)
        else:
            w2, b2 = w, b  # (placeholders)
        for t in tl.range(0, TILES, num_stages=PIPE):  # (rows past M: masked, no traffic)
            rows = (pid * TILES + t) * ROWS + tl.arange(0, ROWS)
            _dev_ln_fwd_rows(X, R, W, B, Y, H, Mean, Rstd, S, rows, M, N, stride_x, stride_r, stride_y, stride_h,
                             eps, T, w, b, w2, b2, BLOCK_N, HAS_RES, HAS_SCALE, BLOCK_N2, True)
    else:
        _dev_ln_fwd_rows(X, R, W, B, Y, H, Mean, Rstd, S, pid * ROWS + tl.arange(0, ROWS), M, N, stride_x,
                         stride_r, stride_y, stride_h, eps, T, 0.0, 0.0, 0.0, 0.0, BLOCK_N, HAS_RES, HAS_SCALE,
                         BLOCK_N2, False)


@_jit
def _dev_ln_bwd_raw(DY, X, r64, cols, mask, stride_dy, stride_x):
    # One column chunk of ROWS rows of x and dy, as stored (ROWS, C); masked lanes read 0.
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0)
    return x, dy


@_jit
def _dev_ln_bwd_next(DY, X, DHO, r64, cols, mask, stride_dy, stride_x, stride_dho, HAS_DHO: tl.constexpr):
    # PREFETCH: the next rows' x, dy and (HAS_DHO) dh_out of one column chunk, as stored; dho 0.0 without.
    x, dy = _dev_ln_bwd_raw(DY, X, r64, cols, mask, stride_dy, stride_x)
    if HAS_DHO:
        dho = tl.load(DHO + r64 * stride_dho + cols[None, :], mask=mask, other=0.0)
    else:
        dho = 0.0
    return x, dy, dho


@_jit
def _dev_ln_bwd_ahead(DY, X, DHO, Mean, Rstd, rows, ok, cols, col_mask, cols2, col_mask2, stride_dy, stride_x,
                      stride_dho, HAS_DHO: tl.constexpr, BLOCK_N2: tl.constexpr):
    # PREFETCH: rows (ROWS,) where ok of both column chunks (the second: BLOCK_N2 > 0, else placeholders), as
    # stored, and their mean and rstd: (x, dy, dho, x2, dy2, dho2, mean, rstd).
    r64 = rows.to(tl.int64)[:, None]
    x, dy, dho = _dev_ln_bwd_next(DY, X, DHO, r64, cols, ok[:, None] & col_mask[None, :], stride_dy, stride_x,
                                  stride_dho, HAS_DHO)
    if BLOCK_N2 > 0:
        x2, dy2, dho2 = _dev_ln_bwd_next(DY, X, DHO, r64, cols2, ok[:, None] & col_mask2[None, :], stride_dy,
                                         stride_x, stride_dho, HAS_DHO)
    else:
        x2, dy2, dho2 = x, dy, 0.0
    mean = tl.load(Mean + rows, mask=ok, other=0.0)
    rstd = tl.load(Rstd + rows, mask=ok, other=0.0)
    return x, dy, dho, x2, dy2, dho2, mean, rstd


@_jit
def _dev_ln_bwd_math(x, dy, W, cols, col_mask, mean, rstd, w, W_LOADED: tl.constexpr):
    # (xhat, w·dy, dy) (ROWS, C) fp32 and the chunk's two row sums (ROWS, 2), sum(xhat·w·dy) and sum(w·dy),
    # joined: one cross-warp exchange for both. W_LOADED: w (C,) given (the pipelined loop's, loaded once).
    x = x.to(tl.float32)
    dy = dy.to(tl.float32)
    # masked lanes: x, dy, w read 0, so xhat there (finite) meets a zero in every product that uses it
    xhat = (x - mean[:, None]) * rstd[:, None]
    if not W_LOADED:
        w = tl.load(W + cols, mask=col_mask, other=0.0)  # (C,) reloaded: fewer live registers
    wdy = dy * w.to(tl.float32)[None, :]
    return xhat, wdy, dy, tl.sum(tl.join(xhat * wdy, wdy), axis=1)


@_jit
def _dev_ln_bwd_load(DY, X, W, r64, cols, mask, col_mask, stride_dy, stride_x, mean, rstd, w,
                     W_LOADED: tl.constexpr):
    # One column chunk of ROWS rows loaded, then _dev_ln_bwd_math's values.
    x, dy = _dev_ln_bwd_raw(DY, X, r64, cols, mask, stride_dy, stride_x)
    return _dev_ln_bwd_math(x, dy, W, cols, col_mask, mean, rstd, w, W_LOADED)


@_jit
def _dev_ln_bwd_store(DX, DHO, r64, cols, mask, xhat, wdy, c1, c2, rstd, stride_dx, stride_dho,
                      HAS_DHO: tl.constexpr, dho, DHO_LOADED: tl.constexpr):
    # dx of one column chunk: (w·dy - (xhat·c1 + c2))·rstd, plus the h output's own gradient (HAS_DHO), loaded
    # here or, DHO_LOADED, given (``dho``, as stored; else a placeholder). Returns (dx as stored, dho) in fp32
    # (dho 0.0 without HAS_DHO) for COLSUMS.
    dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
    if HAS_DHO:  # h was also an output: its own gradient joins the one through LN
        if DHO_LOADED:
            dho = dho.to(tl.float32)
        else:
            dho = tl.load(DHO + r64 * stride_dho + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dx += dho
    else:
        dho = 0.0
    dx = dx.to(DX.dtype.element_ty)
    tl.store(DX + r64 * stride_dx + cols[None, :], dx, mask=mask)
    return dx.to(tl.float32), dho


@_jit
def _dev_ln_bwd_sums(dxs, hos, dx, dho, S_DX, S_HO, rows, row_mask, T, HAS_S_DX: tl.constexpr,
                     HAS_S_HO: tl.constexpr):
    # COLSUMS: the (ROWS, C) running sums of dx·s_dx and dh_out·s_ho, s one factor for each sample's T rows
    # (stochastic depth's; 1 without). Rows past M hold dx = 0 (rstd and dh_out read 0); columns past N are
    # never stored.
    if HAS_S_DX:
        dx = dx * tl.load(S_DX + rows // T, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    if HAS_S_HO:
        dho = dho * tl.load(S_HO + rows // T, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    return dxs + dx, hos + dho


@_jit
def _ln_bwd_kernel(
    DY, X, W, Mean, Rstd, DHO, DX, DWP, DBP,  # DY, X, DHO, DX: (M, N) row-strided; W: (N,); DWP, DBP: (G, N) fp32
    DXP, DHP, S_DX, S_HO,  # COLSUMS: DXP, DHP (G, N) fp32; S_DX, S_HO (M / T,) per-sample factors (or placeholders)
    M, N, stride_dy, stride_x, stride_dho, stride_dx, rows_per_prog, T,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr, HAS_DHO: tl.constexpr, BLOCK_N2: tl.constexpr,
    PREFETCH: tl.constexpr, COLSUMS: tl.constexpr, HAS_S_DX: tl.constexpr, HAS_S_HO: tl.constexpr,
    PIPE: tl.constexpr,
):
    # Program g owns rows [g * rows_per_prog, (g + 1) * rows_per_prog): a fixed order, so dw/db are deterministic.
    # BLOCK_N2 > 0 (use_ln_chunks): a row is two column chunks, BLOCK_N + BLOCK_N2 (768 = 512 + 256), not one
    # padded power of two (1024: a quarter of the lanes idle).
    # PREFETCH (use_ln_prefetch): each step loads the next ROWS rows' x, dy, dh, mean, rstd before its cross-warp
    # sums and stores, so a program's loads stay in flight through them (the loop is not pipelined otherwise:
    # ptxas, Triton 3.6, no LDGSTS); the next rows past the program's own are masked off, no traffic.
    # COLSUMS: also the column sums of dx (as stored) and of dh_out over the program's rows, each row scaled by
    # its sample's factor (HAS_S_DX, HAS_S_HO): in a pre-norm block the bias gradients of the linears whose
    # outputs join the residual stream there (proj: dx, fc2: dh_out), without another pass over either.
    # PIPE > 0 (LN_PIPE; without PREFETCH): Triton pipelines the loop PIPE stages deep, the next steps' x, dy,
    # dh, mean, rstd loaded into shared memory (cp.async) while this one reduces; w loaded once a program.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    dw_acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    dxs_acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)  # (COLSUMS; else unused)
    hos_acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    if BLOCK_N2 > 0:
        cols2 = BLOCK_N + tl.arange(0, BLOCK_N2)
        col_mask2 = cols2 < N
        dw_acc2 = tl.zeros((ROWS, BLOCK_N2), dtype=tl.float32)
        db_acc2 = tl.zeros((ROWS, BLOCK_N2), dtype=tl.float32)
        dxs_acc2 = tl.zeros((ROWS, BLOCK_N2), dtype=tl.float32)
        hos_acc2 = tl.zeros((ROWS, BLOCK_N2), dtype=tl.float32)
    else:  # placeholders (a second chunk's names, unused)
        cols2, col_mask2 = cols, col_mask
    if PIPE > 0:  # (in the loop, a load of w would be pipelined too: from L2 again every step)
        w_pre = tl.load(W + cols, mask=col_mask, other=0.0)
        w2_pre = tl.load(W + cols2, mask=col_mask2, other=0.0) if BLOCK_N2 > 0 else w_pre
    else:
        w_pre, w2_pre = 0.0, 0.0  # (placeholders)
    row0 = pid * rows_per_prog
    if PREFETCH:  # the first step's rows
        rows_n = row0 + tl.arange(0, ROWS)
        x_n, dy_n, dho_n, x2_n, dy2_n, dho2_n, mean_n, rstd_n = _dev_ln_bwd_ahead(
            DY, X, DHO, Mean, Rstd, rows_n, rows_n < M, cols, col_mask, cols2, col_mask2, stride_dy, stride_x,
            stride_dho, HAS_DHO, BLOCK_N2)
    else:  # placeholders: the stores load dho themselves
        dho_n, dho2_n = 0.0, 0.0
    for i in tl.range(0, rows_per_prog, ROWS, num_stages=PIPE if PIPE > 0 else None):
        rows = row0 + i + tl.arange(0, ROWS)  # (ROWS,)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        if BLOCK_N2 > 0:
            mask2 = row_mask[:, None] & col_mask2[None, :]
        dho, dho2 = dho_n, dho2_n  # (placeholders without PREFETCH)
        if PREFETCH:
            x, dy, mean, rstd = x_n, dy_n, mean_n, rstd_n
            if BLOCK_N2 > 0:
                x2, dy2 = x2_n, dy2_n
            rows_n = rows + ROWS
            x_n, dy_n, dho_n, x2_n, dy2_n, dho2_n, mean_n, rstd_n = _dev_ln_bwd_ahead(
                DY, X, DHO, Mean, Rstd, rows_n, (rows_n < M) & (i + ROWS < rows_per_prog), cols, col_mask, cols2,
                col_mask2, stride_dy, stride_x, stride_dho, HAS_DHO, BLOCK_N2)
            xhat, wdy, dy, sums = _dev_ln_bwd_math(x, dy, W, cols, col_mask, mean, rstd, 0.0, False)
            if BLOCK_N2 > 0:
                xhat2, wdy2, dy2, sums2 = _dev_ln_bwd_math(x2, dy2, W, cols2, col_mask2, mean, rstd, 0.0, False)
                sums += sums2
        else:
            mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
            rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
            xhat, wdy, dy, sums = _dev_ln_bwd_load(DY, X, W, r64, cols, mask, col_mask, stride_dy, stride_x, mean,
                                                   rstd, w_pre, PIPE > 0)
            if BLOCK_N2 > 0:
                xhat2, wdy2, dy2, sums2 = _dev_ln_bwd_load(DY, X, W, r64, cols2, mask2, col_mask2, stride_dy,
                                                            stride_x, mean, rstd, w2_pre, PIPE > 0)
                sums += sums2
        c1, c2 = tl.split(sums / N)  # (ROWS,) each
        dx, dho = _dev_ln_bwd_store(DX, DHO, r64, cols, mask, xhat, wdy, c1, c2, rstd, stride_dx, stride_dho,
                                    HAS_DHO, dho, PREFETCH)
        dw_acc += dy * xhat
        db_acc += dy
        if COLSUMS:
            dxs_acc, hos_acc = _dev_ln_bwd_sums(dxs_acc, hos_acc, dx, dho, S_DX, S_HO, rows, row_mask, T, HAS_S_DX,
                                                HAS_S_HO)
        if BLOCK_N2 > 0:
            dx2, dho2 = _dev_ln_bwd_store(DX, DHO, r64, cols2, mask2, xhat2, wdy2, c1, c2, rstd, stride_dx,
                                          stride_dho, HAS_DHO, dho2, PREFETCH)
            dw_acc2 += dy2 * xhat2
            db_acc2 += dy2
            if COLSUMS:
                dxs_acc2, hos_acc2 = _dev_ln_bwd_sums(dxs_acc2, hos_acc2, dx2, dho2, S_DX, S_HO, rows, row_mask, T,
                                                      HAS_S_DX, HAS_S_HO)
    poff = pid.to(tl.int64) * N
    tl.store(DWP + poff + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    tl.store(DBP + poff + cols, tl.sum(db_acc, axis=0), mask=col_mask)
    if COLSUMS:
        tl.store(DXP + poff + cols, tl.sum(dxs_acc, axis=0), mask=col_mask)
        tl.store(DHP + poff + cols, tl.sum(hos_acc, axis=0), mask=col_mask)
    if BLOCK_N2 > 0:
        tl.store(DWP + poff + cols2, tl.sum(dw_acc2, axis=0), mask=col_mask2)
        tl.store(DBP + poff + cols2, tl.sum(db_acc2, axis=0), mask=col_mask2)
        if COLSUMS:
            tl.store(DXP + poff + cols2, tl.sum(dxs_acc2, axis=0), mask=col_mask2)
            tl.store(DHP + poff + cols2, tl.sum(hos_acc2, axis=0), mask=col_mask2)


# ---------------------------------------------------------------------------------------------
# Launch configuration: a function of D only, so AOT_SPECS can list every choice.


@functools.cache
def _config(d: int) -> Tuple[int, int, int, int]:
    """(BLOCK_N, ROWS, forward num_warps, backward num_warps) for feature size ``d``.

    Small rows pack several per program (tile ROWS x BLOCK_N >= TILE), ~8 elements per thread per tensor.
    The forward caps at 16 warps (no spills at 8192); the backward, with more live tiles, goes to 32.
    """
    block_n = max(MIN_BLOCK_N, next_pow2(d))
    rows = max(1, TILE // block_n)
    return block_n, rows, _warps(rows, block_n, 16), _warps(rows, block_n, 32)


def _warps(rows: int, block_n: int, cap: int) -> int:
    """num_warps for a (rows, block_n) tile: ~8 elements a thread, 4 to ``cap`` warps."""
    return min(max((rows * block_n) // 256, 4), cap)


FWD_STAGES = 1  # no loop in the forward
BWD_STAGES = 2

# The backward's rows as two column chunks, a power of two and the next power of two above the rest (768 = 512 +
# 256, 1280 = 1024 + 256, 384 = 256 + 128: every ViT width but 1024 exactly), instead of one block padded to a
# power of two. Device time in run 6 (2026-11-26-h100-run6/ops-graph.csv, fwd+bwd minus fwd) put the backward at
# 78% of copy bandwidth at D = 1024 (no padding), 66-67% at 768 and 1280 (a quarter and 3/8 of the lanes idle):
# the loop's work per row is the padded width's. Not yet timed (graph rows [chunks]), so by default (None) the
# GPU's autotuner decides with the prefetch below: both layouts are among its configs (_ln_bwd_tuned_auto).
# True / False force one (the other flag then defaults to off); the interpreter runs the padded block.
LN_BWD_CHUNKS: Optional[bool] = None
MIN_CHUNK = 32  # no narrower second chunk (65 = 64 + 32, not 64 + 1)
_ln_chunks: List[bool] = []  # innermost use_ln_chunks() last


def use_ln_chunks(on: bool) -> ContextManager[None]:
    """Force the backward's column chunks (LN_BWD_CHUNKS) on or off inside a ``with`` block."""
    return pushed(_ln_chunks, bool(on))


def _bwd_chunks_on() -> Optional[bool]:
    """The forced column chunks, or None: the autotuner's choice."""
    return _ln_chunks[-1] if _ln_chunks else LN_BWD_CHUNKS


# The backward's loop loads the next rows while it reduces and stores the current ones (PREFETCH in
# _ln_bwd_kernel): ptxas (Triton 3.6, sm_90) shows the loop's loads unpipelined, so a program has loads in flight
# only between its cross-warp sums. Not yet timed (graph rows [prefetch], [chunks+prefetch]), so by default
# (None) the GPU's autotuner decides: PREFETCH is a parameter of its backward configs, both values per tile
# and layout (_ln_bwd_tuned_auto); the interpreter runs without. True / False force it (chunks then off
# unless forced too).
LN_BWD_PREFETCH: Optional[bool] = None
_ln_prefetch: List[bool] = []  # innermost use_ln_prefetch() last


def use_ln_prefetch(on: bool) -> ContextManager[None]:
    """Force the backward's next-rows prefetch (LN_BWD_PREFETCH) on or off inside a ``with`` block."""
    return pushed(_ln_prefetch, bool(on))


def _bwd_prefetch() -> Optional[bool]:
    """The forced prefetch, or None: the autotuner's choice."""
    return _ln_prefetch[-1] if _ln_prefetch else LN_BWD_PREFETCH


def _chunk_layout(d: int, block_n: int) -> Tuple[int, int]:
    """(BLOCK_N, BLOCK_N2) as two column chunks for feature size ``d`` (``block_n``: its padded block) where
    they cover fewer lanes than ``block_n``, the second at least MIN_CHUNK wide, else (block_n, 0)."""
    if d <= MIN_BLOCK_N:
        return block_n, 0
    first = 1 << (d.bit_length() - 1)  # the largest power of two <= d
    second = max(MIN_CHUNK, next_pow2(d - first)) if d > first else 0
    return (first, second) if second and first + second < block_n else (block_n, 0)


def _bwd_chunks(d: int, block_n: int) -> Tuple[int, int]:
    """The backward's (BLOCK_N, BLOCK_N2) where the layout is not the autotuner's: the chunks when forced on
    (use_ln_chunks), else the padded block."""
    return _chunk_layout(d, block_n) if _bwd_chunks_on() else (block_n, 0)


# The forward's rows as column chunks too (BLOCK_N2 in _ln_fwd_kernel). Run 8's backward autotuner picked them at D =
# 384 (2026-11-28-h100-run8/ops-graph.json, its rows' notes: BLOCK_N=256, BLOCK_N2=128), the width whose forward
# ran furthest from copy bandwidth there (82%, 0.90x torch.compile; targets.txt). Not yet timed in the forward, so
# by default (None) the GPU's autotuner decides between the padded block and the chunks (_ln_fwd_tuned_auto);
# True / False force one; the interpreter runs the padded block.
LN_FWD_CHUNKS: Optional[bool] = None
_ln_fwd_chunks: List[bool] = []  # innermost use_ln_fwd_chunks() last


def use_ln_fwd_chunks(on: bool) -> ContextManager[None]:
    """Force the forward's column chunks (LN_FWD_CHUNKS) on or off inside a ``with`` block."""
    return pushed(_ln_fwd_chunks, bool(on))


def _fwd_chunks_on() -> Optional[bool]:
    """The forward's forced column chunks, or None: the autotuner's choice."""
    return _ln_fwd_chunks[-1] if _ln_fwd_chunks else LN_FWD_CHUNKS


# The loops' software pipeline (PIPE in both kernels). A one-tile forward program has no reads in flight while it
# reduces, nor has a backward step without the prefetch. H200 run 3 put LayerNorm's forward furthest from copy
# bandwidth at the widths with the fewest bytes a tile, while the fused add's forward, twice the bytes a tile,
# met the bound at the same tiles (2026-11-28-h200-run3/ops-graph.json; H100 run 8's likewise, by less): too few
# bytes in flight. Triton 3.6 and 3.8 (sm_80, sm_90) pipeline every load of a `tl.range(num_stages=k)` loop
# through shared memory (cp.async): the forward as programs of PIPE_TILES tiles each, the backward's step loop.
# Not yet timed, so by default (None) the GPU's autotuners decide (FWD_PIPES, BWD_PIPES among their configs); 0 or
# k forces it; the interpreter runs without unless forced.
LN_PIPE: Optional[int] = None
# Depths the autotuners try: a forward program keeps (depth - 1) tiles in flight (3 KB at D = 768: 2 rows, bf16);
# a backward step is 2-3 tensors of a tile.
FWD_PIPES = (3, 5)
BWD_PIPES = (3,)
PIPE_TILES = 8  # the pipelined forward's tiles a program: the loop's first loads wait, the rest overlap
# The forward's autotuner is keyed on the width, not on M, while the pipelined grid is 8x smaller: its configs are
# tried (by _ln_fwd_tuned_auto) only from this many rows on (ViT training: 128-256 images of 197 tokens), and
# fewer rows take the one-tile configs alone (_ln_fwd_tuned_auto_one; at ViT-B inference batch 1, 99 tiles at
# D = 768 would make 13 programs), so a pick made at one M is not run at a very different one.
PIPE_MIN_ROWS = 16384
_ln_pipe: List[int] = []  # innermost use_ln_pipe() last


def use_ln_pipe(stages: int) -> ContextManager[None]:
    """Force the loops' pipeline depth (LN_PIPE: 0 off, else ``stages`` >= 2) inside a ``with`` block."""
    if stages != 0 and stages < 2:
        raise ValueError(f"use_ln_pipe: stages must be 0 (off) or >= 2, got {stages}")
    return pushed(_ln_pipe, int(stages))


def _pipe() -> Optional[int]:
    """The forced pipeline depth, or None: the autotuner's choice."""
    return _ln_pipe[-1] if _ln_pipe else LN_PIPE


def _pipe_at(block: int, pipe: Optional[int]) -> int:
    """The pipeline depth a launch that is not the autotuner's takes for padded block ``block``: the forced one
    (0 unless forced, or past PIPE_MAX_BLOCK)."""
    return pipe if pipe and block <= PIPE_MAX_BLOCK else 0


def _fwd_grid(m: int, meta: dict) -> Tuple[int]:
    """The forward's grid for ``m`` rows: a program a tile, or (PIPE) TILES tiles a program."""
    return (cdiv(m, meta["ROWS"] * (meta["TILES"] if meta["PIPE"] else 1)),)


# On a GPU an autotuner also tries a few alternatives to _config's (ROWS, num_warps), per BLOCK_N, keyed
# on D, the dtypes and the fused add: tiles of TILE (the default, first), 2·TILE and TILE/2 elements, and TILE
# and 2·TILE with half the warps (~16 elements a thread: twice the bytes in flight per thread). Run 5's
# device-time rows (2026-11-26-h100-run5/ops-graph.csv) put the widths that pad most, D = 384 and 1280,
# furthest from copy bandwidth; in run 6 (-run6/ops-graph.csv) the half-warp TILE was picked there and the
# forward reached 85-99%, the backward (fwd+bwd 62-88%) not, hence 2·TILE at half the warps too. The forward
# tries 2·TILE at a quarter of the warps too (~32 elements a thread): H200 run 4 put plain LayerNorm's forward
# further from copy bandwidth than the fused add (twice the bytes a tile) at every width, at D = 768 and 1280 on
# the same tile (2026-11-28-h200-run4/targets.txt; the picks in ops-graph.json's notes), and its D = 768 took
# about D = 1024's time for 3/4 of the bytes: bound by bytes in flight an SM, which registers cap (ptxas, sm_90,
# bf16, D = 768: 42 registers a thread at 2 rows, ~10 programs an SM, 30 KB of x in flight; 70 at 4 rows, 7
# programs, 43 KB). And tiles of one warp (ONE_WARP_MAX_BLOCK: min(1024 / BLOCK_N, 8) rows, 16-32 elements a
# thread): the row sums are then warp shuffles alone, no shared memory and no barrier. That is torch.compile's own
# LayerNorm (Inductor's persistent inner reductions up to 1024 wide: one warp, since pytorch/pytorch#168981), ahead
# of ours at D = 384-1024 in H200 run 4 (compile(eager) rows of 2026-11-28-h200-run4/ops-graph.json) and behind at
# 1280 (2048 lanes: not one warp there). ptxas (Triton 3.8, sm_90, bf16, D = 768): one warp, 1 row, 64 registers,
# no barrier, 552 instructions a thread (17.7K a row), against the default's 2 rows at 8 warps, 32 registers, 7
# barriers, 31.7K a row; an SM holds 32 such programs (its block limit), 48 KB of x in flight. The backward tries
# one warp (no prefetch: 255 registers there) and two (~16 elements a thread; ptxas at D = 768: 208 and 122
# registers, 0 and 10 barriers a step, 34K and 35K instructions a row against the default's 55K).
# The backward keeps BWD_ROWS_PER_PROG rows per program (its grid and partial buffer do not depend on the choice),
# so its ROWS must divide that. The interpreter runs the default.
ONE_WARP_MAX_BLOCK = 1024


def _one_warp_rows(block_n: int) -> int:
    """ROWS of a one-warp tile (Inductor's): 1024 lanes, at most 8 rows."""
    return max(1, min(ONE_WARP_MAX_BLOCK // block_n, 8))


def _gpu_rows_per_prog(rows: int) -> int:
    """Backward rows per program on a GPU for the default ROWS ``rows`` (the grid does not depend on the config)."""
    return rows * max(1, BWD_ROWS_PER_PROG // rows)


def _fwd_choices(block_n: int) -> List[Tuple[int, int]]:
    out = []
    for tile in (TILE, 2 * TILE, TILE // 2):
        rows = max(1, tile // block_n)
        out.append((rows, _warps(rows, block_n, 16)))
    for tile in (TILE, 2 * TILE):
        rows = max(1, tile // block_n)
        out.append((rows, _warps(rows, block_n // 2, 16)))
    rows = max(1, 2 * TILE // block_n)  # (~32 elements a thread)
    out.append((rows, _warps(rows, block_n // 4, 16)))
    if block_n <= ONE_WARP_MAX_BLOCK:
        out.append((_one_warp_rows(block_n), 1))
    return list(dict.fromkeys(out))


def _pipe_choices(fwd: bool, block_n: int) -> List[Tuple[int, int]]:
    """(ROWS, warps) of the pipelined loops (PIPE): a TILE-element step at ~8 and at ~16 elements a thread."""
    # The forward's ~16 since H200 run 4, whose autotuner never picked the pipelined forward (its notes in
    # 2026-11-28-h200-run4/ops-graph.json), then only at ~8: D = 768's 2 rows at 8 warps (ptxas and SASS, Triton
    # 3.8, sm_90, bf16, depth 3: 48 registers a thread, 5 programs an SM, 10 barriers a tile); at 4 warps 72
    # registers, 7 programs, 6 barriers (depth 5: 80, 6, 8), so more tiles in flight an SM. Not yet timed.
    rows, cap = max(1, TILE // block_n), 16 if fwd else 32
    out = [(rows, _warps(rows, block_n, cap)), (rows, _warps(rows, block_n // 2, cap))]
    if not fwd and block_n <= ONE_WARP_MAX_BLOCK:  # (the backward's one-warp step: see _bwd_choices)
        out.append((_one_warp_rows(block_n), 1))
    return list(dict.fromkeys(out))


def _bwd_choices(block_n: int) -> List[Tuple[int, int]]:
    out = []
    for tile in (TILE, TILE // 2):
        rows = max(1, tile // block_n)
        out.append((rows, _warps(rows, block_n, 32)))
    per_prog = _gpu_rows_per_prog(max(1, TILE // block_n))
    for tile in (TILE, 2 * TILE):
        rows = max(1, tile // block_n)
        if per_prog % rows == 0:
            out.append((rows, _warps(rows, block_n // 2, 32)))
    if block_n <= ONE_WARP_MAX_BLOCK:  # one and two warps (the row sums without or with one exchange)
        rows = _one_warp_rows(block_n)
        out += [(rows, 1), (rows, 2)]
    return list(dict.fromkeys(out))


def _block_sizes() -> List[int]:
    out, b = [], MIN_BLOCK_N
    while b <= MAX_D:
        out.append(b)
        b *= 2
    return out


# Padded blocks above this take no prefetch: ptxas (Triton 3.6 and 3.8, sm_80 / sm_90, bf16) spills 8-60 bytes a
# thread at 8192 with it (64 registers a thread there), none up to 4096.
PREFETCH_MAX_BLOCK = 4096
# and no pipelined loop (PIPE): at 8192 a depth-5 forward's stages (fp32, the add's two inputs: 4 x 64 KiB) do not
# fit in an SM's shared memory.
PIPE_MAX_BLOCK = 4096


def _prefetch_ok(block: int, warps: int) -> bool:
    """Whether the backward's prefetch compiles without spills for padded block ``block`` at ``warps``: not past
    PREFETCH_MAX_BLOCK, nor on one warp (ptxas, Triton 3.8, sm_90, bf16: 255 registers a thread at D = 768, spills
    at D = 384's padded 512 lanes)."""
    return block <= PREFETCH_MAX_BLOCK and warps > 1


def _choices(fwd: bool, block: int, pipe: int) -> List[Tuple[int, int]]:
    """The (ROWS, warps) choices of the forward or the backward for padded block ``block``, pipelined or not."""
    if pipe:
        return _pipe_choices(fwd, block) if block <= PIPE_MAX_BLOCK else []
    return _fwd_choices(block) if fwd else _bwd_choices(block)


def _prune(fwd: bool):
    def prune(configs, named_args, **kwargs):  # the choices of the padded block (the chunks' sum, rounded up)
        want = set(_choices(fwd, next_pow2(kwargs["BLOCK_N"] + kwargs.get("BLOCK_N2", 0)), kwargs["PIPE"]))
        # a forced prefetch: not on one warp (_prefetch_ok); past PREFETCH_MAX_BLOCK it runs as asked
        return [c for c in configs if (c.kwargs["ROWS"], c.num_warps) in want
                and not (kwargs.get("PREFETCH") and c.num_warps == 1)]
    return prune


def _auto_bwd_prune(configs, named_args, **kwargs):
    """The backward's configs for width N where the autotuner picks the layout and the prefetch: N's padded block
    and its column chunks (_chunk_layout), each with the padded block's (ROWS, warps) choices; the prefetch where
    _prefetch_ok; with the column sums (COLSUMS), no pipelined one-warp step (ptxas, Triton 3.8, sm_90, bf16: 255
    registers and a spill at D = 1024)."""
    n = named_args["N"]
    block = _config(n)[0]
    layouts = {(block, 0), _chunk_layout(n, block)}
    return [c for c in configs if (c.kwargs["ROWS"], c.num_warps) in _choices(False, block, c.kwargs["PIPE"])
            and (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_N2"]) in layouts
            and not (c.kwargs["PREFETCH"] and not _prefetch_ok(block, c.num_warps))
            and not (kwargs.get("COLSUMS") and c.kwargs["PIPE"] and c.num_warps == 1)]


def _layouts(block: int) -> List[Tuple[int, int]]:
    """A padded block's layout and every two-chunk layout under it: half the block + a power of two from MIN_CHUNK
    to a quarter (the autotuners' candidates; each width prunes them to its own two)."""
    seconds = [MIN_CHUNK << i for i in range(block.bit_length()) if MIN_CHUNK << i <= block // 4]
    return [(block, 0)] + [(block // 2, c2) for c2 in seconds]


def _auto_fwd_prune(configs, named_args, **kwargs):
    """The forward's configs for width N where the autotuner picks the layout and the pipeline: N's padded block
    and its column chunks (_chunk_layout), each with the padded block's (ROWS, warps) choices, one-tile and
    (up to PIPE_MAX_BLOCK) pipelined."""
    n = named_args["N"]
    block = _config(n)[0]
    layouts = {(block, 0), _chunk_layout(n, block)}
    return [c for c in configs if (c.kwargs["ROWS"], c.num_warps) in _choices(True, block, c.kwargs["PIPE"])
            and (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_N2"]) in layouts]


def _auto_fwd_configs(pipes: Tuple[int, ...] = (0, *FWD_PIPES)) -> list:
    """Every block's layouts (_layouts) times its (ROWS, warps) choices, one-tile (PIPE 0) and pipelined (PIPE_TILES
    tiles a program) at each of ``pipes``."""
    return [triton.Config({"BLOCK_N": bn1, "BLOCK_N2": bn2, "ROWS": r, "PIPE": pipe,
                           "TILES": PIPE_TILES if pipe else 1}, num_warps=w, num_stages=FWD_STAGES)
            for block in _block_sizes() for (bn1, bn2), pipe in itertools.product(_layouts(block), pipes)
            for r, w in _choices(True, block, pipe)]


def _auto_bwd_configs() -> list:
    """Every block's padded layout and every two-chunk layout under it (half the block + a power of two from
    MIN_CHUNK to a quarter), times its (ROWS, warps) choices, times the prefetch off / on; and the pipelined
    loop's choices (PIPE, without the prefetch)."""
    out = []
    for block in _block_sizes():
        forms = ((False, 0), (True, 0), *((False, k) for k in BWD_PIPES))  # (prefetch, pipe): not both
        for (bn1, bn2), (pf, pipe) in itertools.product(_layouts(block), forms):
            for r, w in _choices(False, block, pipe):
                out.append(triton.Config({"BLOCK_N": bn1, "BLOCK_N2": bn2, "ROWS": r, "PREFETCH": pf, "PIPE": pipe},
                                         num_warps=w, num_stages=BWD_STAGES))
    return out


if HAS_TRITON and not INTERPRET:
    def _tuned(kernel, fwd: bool, stages: int, key: List[str]):
        every = sorted({c for bn in _block_sizes() for c in _choices(fwd, bn, 0)})
        return triton.autotune([triton.Config({"ROWS": r}, num_warps=w, num_stages=stages) for r, w in every],
                               key=key, prune_configs_by={"early_config_prune": _prune(fwd)})(kernel)

    _ln_fwd_tuned = Launcher(_tuned(_ln_fwd_kernel, True, FWD_STAGES, ["N", "HAS_RES", "BLOCK_N2", "PIPE"]))
    # LN_FWD_CHUNKS None: the layout (padded block or column chunks) too
    _ln_fwd_tuned_auto, _ln_fwd_tuned_auto_one = (Launcher(triton.autotune(
        _auto_fwd_configs(pipes), key=["N", "HAS_RES"], prune_configs_by={"early_config_prune": _auto_fwd_prune})(
        _ln_fwd_kernel)) for pipes in ((0, *FWD_PIPES), (0,)))  # (from PIPE_MIN_ROWS rows on; below)
    _ln_bwd_tuned = Launcher(_tuned(_ln_bwd_kernel, False, BWD_STAGES, ["N", "HAS_DHO", "BLOCK_N2", "PREFETCH",
                                                                        "COLSUMS", "PIPE"]))

    # LN_BWD_CHUNKS, LN_BWD_PREFETCH and LN_PIPE None: the layout (padded block or column chunks), the prefetch and
    # the pipeline too
    _ln_bwd_tuned_auto = Launcher(triton.autotune(_auto_bwd_configs(), key=["N", "HAS_DHO", "COLSUMS"],
                                                  prune_configs_by={"early_config_prune": _auto_bwd_prune})(
        _ln_bwd_kernel))


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (tests swap it for a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _rows_per_prog(device: torch.device, rows: int, m: int) -> int:
    """Backward rows per program (a multiple of ROWS); the interpreter uses few, long programs."""
    if device.type != "cuda":
        return rows * cdiv(cdiv(m, rows), 4)
    return _gpu_rows_per_prog(rows)


def _param_dtype(h_dtype: torch.dtype, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.dtype:
    """Kernels take weight/bias in the LN input's dtype or fp32 (anything else is cast to fp32)."""
    p = weight if weight is not None else bias
    if p is None:
        return h_dtype
    return p.dtype if p.dtype in (h_dtype, torch.float32) else torch.float32


def _param(p: Optional[torch.Tensor], d: int, dtype: torch.dtype, device: torch.device, fill: float) -> torch.Tensor:
    """``p`` as a (D,) unit-stride tensor of ``dtype``; a constant ``fill`` stands in for an absent one."""
    if p is None:
        return torch.full((d,), fill, dtype=dtype, device=device)
    if p.dtype != dtype:
        p = p.to(dtype)
    return p if p.stride(0) == 1 else p.contiguous()


def _h_dtype(x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.dtype:
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


# ---------------------------------------------------------------------------------------------
# Launchers


def layer_norm_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], eps: float, x_scale: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Launch the forward: returns (y, h or None, mean (M,), rstd (M,)); y and h are contiguous, h's dtype.
    ``x_scale`` (with a residual): (B,), x.shape[0] == B, h = x·x_scale[b] + residual."""
    shape, dev = x.shape, x.device
    d = shape[-1]
    has_res = residual is not None
    hd = _h_dtype(x, residual)
    if x_scale is not None and has_res:  # (B,), its own dtype (a few bytes)
        x_scale = x_scale.reshape(-1).contiguous()
    if has_res and x.dtype != residual.dtype and torch.float32 not in (x.dtype, residual.dtype):
        x, residual = x.float(), residual.float()  # fp16 + bf16: both to the promoted fp32
    x2 = rows2d(x)
    m = x2.shape[0]
    y = _empty(shape, hd, dev)
    h = _empty(shape, hd, dev) if has_res else None
    mean = _empty((m,), torch.float32, dev)  # (separate: a custom op's outputs may not alias)
    rstd = _empty((m,), torch.float32, dev)
    if m == 0 or d == 0:
        return y, h, mean, rstd
    pd = _param_dtype(hd, weight, bias)
    w, b = _param(weight, d, pd, dev, 1.0), _param(bias, d, pd, dev, 0.0)
    y2 = y.view(m, d)
    sx = row_stride(x2)
    if has_res:
        r2 = rows2d(residual)
        h2, sr = h.view(m, d), row_stride(r2)
    else:
        r2, h2, sr = x2, y2, sx
    block_n, rows, warps, _ = _config(d)
    has_scale = x_scale is not None and has_res
    sc = x_scale if has_scale else mean  # (B,) (a placeholder without)
    args = (x2, r2, w, b, y2, h2, mean, rstd, sc, m, d, sx, sr, d, d, eps, m // sc.shape[0] if has_scale else 1)
    forced, pipe = _fwd_chunks_on(), _pipe()
    bn1, bn2 = _chunk_layout(d, block_n) if forced else (block_n, 0)  # (where the autotuner does not pick them)
    consts = dict(HAS_RES=has_res, HAS_SCALE=has_scale)

    def grid(meta):
        return _fwd_grid(m, meta)
    if not INTERPRET and forced is None and pipe is None:
        (_ln_fwd_tuned_auto if m >= PIPE_MIN_ROWS else _ln_fwd_tuned_auto_one)(grid, args, consts)
        return y, h, mean, rstd
    p = _pipe_at(block_n, pipe)  # (where the autotuner does not pick the layout or the pipeline)
    consts.update(BLOCK_N=bn1, BLOCK_N2=bn2, PIPE=p, TILES=PIPE_TILES if p else 1)
    if INTERPRET:
        launch(_ln_fwd_kernel, grid(dict(consts, ROWS=rows)), *args, ROWS=rows, num_warps=warps,
               num_stages=FWD_STAGES, **consts)
    else:
        _ln_fwd_tuned(grid, args, consts)
    return y, h, mean, rstd


def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                   dh_out: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward of y = LN(x): returns (dx [+ dh_out], dwdb) with dwdb = stack(dweight, dbias), (2, D).

    ``x`` is the LN input (h for the fused add). dx has x's dtype; dwdb has the kernel's parameter dtype
    (see ``_param_dtype``) and is computed even when weight/bias are absent (callers drop it).
    """
    return _ln_bwd_launch(dy, x, weight, bias, mean, rstd, dh_out, False, None, None,
                          _param_dtype(x.dtype, weight, bias))


def layer_norm_bwd_colsums(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                           dh_out: torch.Tensor, dx_scale: Optional[torch.Tensor] = None,
                           dh_out_scale: Optional[torch.Tensor] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``layer_norm_bwd`` with dh_out, plus colsums (2, D) fp32: the column sums of dx (as stored) and of dh_out
    over x's rows, each row times its sample's factor where ``dx_scale`` / ``dh_out_scale`` (B,) is given (x
    (B, ..., D): the factor of row r is scale[r // (rows / B)]). In a pre-norm block's LN2 these are the bias
    gradients of proj (dx) and fc2 (dh_out), summed in the pass that writes dx."""
    dx, sums = _ln_bwd_launch(dy, x, weight, bias, mean, rstd, dh_out, True, dx_scale, dh_out_scale)
    pd = _param_dtype(x.dtype, weight, bias)
    return dx, _as(sums[:2], pd), sums[2:]


def _ln_bwd_launch(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   mean: torch.Tensor, rstd: torch.Tensor, dh_out: Optional[torch.Tensor], colsums: bool,
                   dx_scale: Optional[torch.Tensor], dh_out_scale: Optional[torch.Tensor],
                   sums_dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dx, sums (2 or 4 with ``colsums``, D) in ``sums_dtype``: dweight, dbias[, sum of dx·s, sum of dh_out·s])."""
    shape, dev, xd = x.shape, x.device, x.dtype
    d = shape[-1]
    x2, dy2 = rows2d(x), rows2d(dy)
    m = x2.shape[0]
    dx = _empty(shape, xd, dev)
    n_sums = 4 if colsums else 2
    if m == 0 or d == 0:
        return dx, torch.zeros((n_sums, d), dtype=sums_dtype, device=dev)
    w = _param(weight, d, _param_dtype(xd, weight, bias), dev, 1.0)
    sdy = row_stride(dy2)
    if dh_out is not None:
        dho2 = rows2d(dh_out)
        sdho = row_stride(dho2)
    else:
        dho2, sdho = dy2, sdy
    samples = shape[0] if len(shape) > 1 else m
    for s in (dx_scale, dh_out_scale):
        if s is not None and (s.shape != (samples,) or m % samples):
            raise ValueError(f"a per-sample factor must be ({samples},) over {m} rows, got {tuple(s.shape)}")
    block_n, rows, _, warps = _config(d)
    bn1, bn2 = _bwd_chunks(d, block_n)  # (where the autotuner does not pick the layout)
    rows_per_prog = _rows_per_prog(dev, rows, m)
    g = cdiv(m, rows_per_prog)
    partial = _empty((n_sums, g, d), torch.float32, dev)
    parts = partial.unbind(0)  # (G, D) each, one call for every view
    dxp, dhp = parts[2:] if colsums else parts
    s_dx = dx_scale.contiguous() if dx_scale is not None else mean  # (placeholders without)
    s_ho = dh_out_scale.contiguous() if dh_out_scale is not None else mean
    args = (dy2, x2, w, mean, rstd, dho2, dx.view(m, d), parts[0], parts[1], dxp, dhp, s_dx, s_ho, m, d, sdy,
            row_stride(x2), sdho, d, rows_per_prog, m // samples)
    consts = dict(HAS_DHO=dh_out is not None, COLSUMS=colsums, HAS_S_DX=dx_scale is not None,
                  HAS_S_HO=dh_out_scale is not None)
    prefetch, pipe = _bwd_prefetch(), _pipe()
    fixed_pipe = 0 if prefetch else _pipe_at(block_n, pipe)  # (not both: the prefetch's loads are the pipeline's)
    if INTERPRET:
        launch(_ln_bwd_kernel, (g,), *args, BLOCK_N=bn1, BLOCK_N2=bn2, ROWS=rows, PREFETCH=bool(prefetch),
               PIPE=fixed_pipe, num_warps=warps, num_stages=BWD_STAGES, **consts)
    elif prefetch is None and _bwd_chunks_on() is None and pipe is None:  # every choice's ROWS divides
        _ln_bwd_tuned_auto((g,), args, consts)  # rows_per_prog: the same grid
    else:
        _ln_bwd_tuned((g,), args, dict(BLOCK_N=bn1, BLOCK_N2=bn2, PREFETCH=bool(prefetch), PIPE=fixed_pipe,
                                       **consts))
    return dx, colsum_partials(partial, sums_dtype)  # (n, G, D) fp32 partials -> (n, D), in a fixed order


# ---------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile (no graph break), with fake implementations for shapes.


def _fake_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty((m,), dtype=torch.float32), x.new_empty((m,), dtype=torch.float32)


@custom_op("layer_norm_fwd")
def _layer_norm_fwd_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, _, mean, rstd = layer_norm_fwd(x, None, weight, bias, eps)
    return y, mean, rstd


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, eps):
    return (x.new_empty(x.shape), *_fake_stats(x))


@custom_op("add_layer_norm_fwd")
def _add_layer_norm_fwd_op(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], eps: float, x_scale: Optional[torch.Tensor] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, h, mean, rstd = layer_norm_fwd(x, residual, weight, bias, eps, x_scale)
    return y, h, mean, rstd


@_add_layer_norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps, x_scale=None):
    hd = _h_dtype(x, residual)
    return (x.new_empty(x.shape, dtype=hd), x.new_empty(x.shape, dtype=hd), *_fake_stats(x))


@custom_op("layer_norm_bwd")
def _layer_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                       dh_out: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return layer_norm_bwd(dy, x, weight, bias, mean, rstd, dh_out)


@_layer_norm_bwd_op.register_fake
def _(dy, x, weight, bias, mean, rstd, dh_out):
    pd = _param_dtype(x.dtype, weight, bias)
    d = x.shape[-1]
    return x.new_empty(x.shape), x.new_empty((2, d), dtype=pd)


# ---------------------------------------------------------------------------------------------
# Autograd


def _param_grads(ctx, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 dwdb: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    i = ctx.w_index
    need = ctx.needs_input_grad
    need_w, need_b = weight is not None and need[i], bias is not None and need[i + 1]
    if not (need_w or need_b):
        return None, None
    dw, db = dwdb.unbind(0)  # (D,) each, one call for both views
    return (_as(dw, weight.dtype) if need_w else None), (_as(db, bias.dtype) if need_b else None)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class LayerNormFn(torch.autograd.Function):
    """y = LN(x) through the Triton kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = _layer_norm_fwd_op(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.w_index = 1
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dwdb = _layer_norm_bwd_op(dy, x, weight, bias, mean, rstd, None)
        return (dx, *_param_grads(ctx, weight, bias, dwdb), None)


class AddLayerNormFn(torch.autograd.Function):
    """(y, h) = (LN(x·s + residual), x·s + residual) through the Triton kernels; s = x_scale per sample, or 1."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, x_scale=None):
        y, h, mean, rstd = _add_layer_norm_fwd_op(x, residual, weight, bias, eps, x_scale)
        need_ds = x_scale is not None and x_scale.requires_grad
        ctx.save_for_backward(h, weight, bias, mean, rstd, x_scale, x if need_ds else None)
        ctx.w_index = 2
        ctx.dtypes = (x.dtype, residual.dtype)
        return y, h

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_out):
        h, weight, bias, mean, rstd, x_scale, x = ctx.saved_tensors
        dh, dwdb = _layer_norm_bwd_op(dy, h, weight, bias, mean, rstd, dh_out)
        dx_dtype, dr_dtype = ctx.dtypes
        dx = ds = None
        if ctx.needs_input_grad[0]:
            dx = _as(dh, dx_dtype)
            if x_scale is not None:  # x's dtype first, then the factor (eager's order: the add's cast, drop_path's
                # multiply); in place on a cast copy, out of place where dx is dh (dr's too)
                s = _per_sample(x_scale, dx)
                dx = (dx * s).to(dx_dtype) if dx is dh else dx.mul_(s)
        if x is not None:  # x_scale takes grads: the sum over each sample's elements of dh ⊙ x
            ds = (dh.float() * x.float()).reshape(x.shape[0], -1).sum(1).to(x_scale.dtype).view(x_scale.shape)
        dr = _as(dh, dr_dtype) if ctx.needs_input_grad[1] else None
        return (dx, dr, *_param_grads(ctx, weight, bias, dwdb), None, ds)


def _per_sample(x_scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x_scale (B,) or (B, 1, ..., 1) as (B, 1, ..., 1), to broadcast over ``like`` (B, ...)."""
    return x_scale.reshape((-1,) + (1,) * (like.dim() - 1))


def _scaled(x: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
    """x·x_scale[b] in the wider of the two dtypes, rounded to x's: eager's drop_path(x) (timm's mask in x's dtype:
    the same; transformers' x / keep_prob: an fp32 factor, not rounded to x's dtype first)."""
    return (x * _per_sample(x_scale, x)).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Reference, validation, dispatch


def _validate(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
              residual: Optional[torch.Tensor] = None) -> None:
    check_tensor("x", x, min_ndim=1)
    d = x.shape[-1]
    if residual is not None:
        check_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)}; expected {tuple(x.shape)} (the shape of x)")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(name, p, ndim=1)
            if p.shape[0] != d:
                raise ValueError(f"{name} has shape {tuple(p.shape)}; expected ({d},) (the last dim of x)")
    check_same_device(x=x, residual=residual, weight=weight, bias=bias)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")


def _run_triton(x: torch.Tensor, backend: Optional[str], **others: Optional[torch.Tensor]) -> bool:
    """Triton when dispatch says so and the kernels cover the input; a forced 'triton' raises otherwise."""
    d = x.shape[-1]
    auto = AUTO_TRITON
    if auto and d < AUTO_MIN_D_TRAINING and not in_graph_step() and needs_grad(x, *others.values()):
        # 'auto' trains on eager below it, host-bound (but for a step a CUDA graph replays)
        auto = False
    if not use_triton(x, backend, auto=auto):
        return False
    if 1 <= d <= MAX_D and x.dtype in FLOAT_DTYPES and all(t is None or t.dtype in FLOAT_DTYPES
                                                           for t in others.values()):
        return True
    if (backend if backend is not None else get_backend()) == "triton":  # forced: say why it cannot run
        check_triton_dtypes(x=x, **others)
        raise ValueError(f"the LayerNorm kernels take a last dim from 1 to {MAX_D}, got {d}")
    return False


def layer_norm_reference(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim in plain PyTorch (weight/bias cast to x's dtype)."""
    w = weight.to(x.dtype) if weight is not None else None
    b = bias.to(x.dtype) if bias is not None else None
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def add_layer_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                             bias: Optional[torch.Tensor], eps: float = 1e-5, x_scale: Optional[torch.Tensor] = None
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual, or x·x_scale[b] + residual (rounded as eager's drop_path(x) + residual); (LN(h), h)."""
    h = x + residual if x_scale is None else _scaled(x, x_scale) + residual
    return layer_norm_reference(h, weight, bias, eps), h


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float = 1e-5,
               *, backend: Optional[str] = None) -> torch.Tensor:
    """LayerNorm over the last dim of ``x`` (any leading shape), fp32 statistics.

    ``weight``/``bias``: (D,) or None, in x's dtype or fp32. Output has x's dtype.
    ``backend``: None (the dispatch default), 'auto', 'torch' or 'triton'.
    """
    _validate(x, weight, bias, eps)
    if _run_triton(x, backend, weight=weight, bias=bias):
        return apply(LayerNormFn, x, weight, bias, float(eps))
    return layer_norm_reference(x, weight, bias, eps)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], eps: float = 1e-5, *, x_scale: Optional[torch.Tensor] = None,
                   backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pre-norm fusion: ``h = x + residual``; returns ``(LN(h), h)`` in one pass.

    ``x_scale``: (B,) or (B, 1, ..., 1) for x of shape (B, ...), a factor per sample on x before the add,
    ``h = x·x_scale[b] + residual``: stochastic depth's ``residual + drop_path(x)`` (x_scale = keep mask /
    keep_prob, see ``flashvit.vit.model.drop_path_scale``) in the same pass. x·x_scale is computed in fp32 and
    rounded to x's dtype first, as eager's drop_path(x) is (a factor in x's dtype, timm's mask, gives x * s; an
    fp32 one, transformers' x / keep_prob). Gradients flow to x_scale too where it takes them.
    ``h`` (and so ``y``) has the promoted dtype of x and residual; both outputs take gradients.
    """
    _validate(x, weight, bias, eps, residual)
    if x_scale is not None:
        _validate_scale(x_scale, x)
    if _run_triton(x, backend, residual=residual, weight=weight, bias=bias, x_scale=x_scale):
        return apply(AddLayerNormFn, x, residual, weight, bias, float(eps), x_scale)
    return add_layer_norm_reference(x, residual, weight, bias, eps, x_scale)


def _validate_scale(x_scale: torch.Tensor, x: torch.Tensor) -> None:
    check_tensor("x_scale", x_scale)
    b = x.shape[0]
    if x.dim() < 2 or tuple(x_scale.shape) not in ((b,), (b,) + (1,) * (x.dim() - 1)):
        raise ValueError(f"x_scale has shape {tuple(x_scale.shape)}; expected one factor per sample of x "
                         f"{tuple(x.shape)}: ({b},) or ({b}{', 1' * (x.dim() - 1)})")
    check_same_device(x=x, x_scale=x_scale)


class LayerNorm(nn.LayerNorm):
    """Drop-in ``nn.LayerNorm`` (same parameters and state dict) that runs the fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1:
            return super().forward(x)
        return layer_norm(x, self.weight, self.bias, self.eps)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor, x_scale: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(LN(h), h), h = x + residual, or x·x_scale[b] + residual (see :func:`add_layer_norm`)."""
        if len(self.normalized_shape) != 1:
            h = x + residual if x_scale is None else _scaled(x, x_scale) + residual
            return super().forward(h), h
        return add_layer_norm(x, residual, self.weight, self.bias, self.eps, x_scale=x_scale)


# ---------------------------------------------------------------------------------------------
# Every launch configuration the launchers can choose (DESIGN.md: the AOT compile gate).

_TT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_LOW = (torch.float16, torch.bfloat16)


def _dtype_combos(with_residual: bool) -> List[Tuple[torch.dtype, torch.dtype, torch.dtype]]:
    """(x, residual, param) dtypes the forward can see after the launcher's casts."""
    pairs = [(t, t) for t in FLOAT_DTYPES]
    if with_residual:
        pairs += [(lo, torch.float32) for lo in _LOW] + [(torch.float32, lo) for lo in _LOW]
    out = []
    for xd, rd in pairs:
        hd = torch.promote_types(xd, rd)
        for pd in dict.fromkeys((hd, torch.float32)):
            out.append((xd, rd, pd))
    return out


def _fwd_spec(block_n: int, rows: int, warps: int, xd: torch.dtype, rd: torch.dtype, pd: torch.dtype,
              has_res: bool, tag: str = "", scale: Optional[torch.dtype] = None, block_n2: int = 0,
              pipe: int = 0) -> AotSpec:
    hd = torch.promote_types(xd, rd)
    has_scale = scale is not None  # S: the per-sample factor's dtype (timm's mask: x's; transformers': fp32)
    sig = {"X": f"*{_TT[xd]}", "R": f"*{_TT[rd]}", "W": f"*{_TT[pd]}", "B": f"*{_TT[pd]}", "Y": f"*{_TT[hd]}",
           "H": f"*{_TT[hd]}", "Mean": "*fp32", "Rstd": "*fp32", "S": f"*{_TT[scale]}" if has_scale else "*fp32",
           "M": "i32", "N": "i32", "stride_x": "i32", "stride_r": "i32", "stride_y": "i32", "stride_h": "i32",
           "eps": "fp32", "T": "i32", "BLOCK_N": "constexpr", "ROWS": "constexpr", "HAS_RES": "constexpr",
           "HAS_SCALE": "constexpr", "BLOCK_N2": "constexpr", "PIPE": "constexpr", "TILES": "constexpr"}
    tag += (",scale" if scale == xd else f",scale={_TT[scale]}") if has_scale else ""
    tag += f",pipe{pipe}" if pipe else ""
    chunks = f"+{block_n2}" if block_n2 else ""
    return runtime_spec(_ln_fwd_kernel, sig, {"BLOCK_N": block_n, "ROWS": rows, "HAS_RES": has_res,
                                              "HAS_SCALE": has_scale, "BLOCK_N2": block_n2, "PIPE": pipe,
                                              "TILES": PIPE_TILES if pipe else 1}, warps, FWD_STAGES,
                        f"ln_fwd[BLOCK_N={block_n}{chunks},x={_TT[xd]},r={_TT[rd]},w={_TT[pd]},res={int(has_res)}"
                        f"{tag}]",
                        div16=("N", "stride_x", "stride_r", "stride_y", "stride_h"))  # ViT widths: 16 | D


def _bwd_spec(block_n: int, rows: int, warps: int, xd: torch.dtype, pd: torch.dtype, has_dho: bool,
              tag: str = "", block_n2: int = 0, prefetch: bool = False, colsums: bool = False,
              scale: Optional[torch.dtype] = None, pipe: int = 0) -> AotSpec:
    """A backward config; ``colsums`` (layer_norm_bwd_colsums) with both per-sample factors in ``scale``'s dtype
    (None: without factors)."""
    t = _TT[xd]
    st = _TT[scale] if scale is not None else "fp32"  # (the placeholder: mean)
    sig = {"DY": f"*{t}", "X": f"*{t}", "W": f"*{_TT[pd]}", "Mean": "*fp32", "Rstd": "*fp32", "DHO": f"*{t}",
           "DX": f"*{t}", "DWP": "*fp32", "DBP": "*fp32", "DXP": "*fp32", "DHP": "*fp32", "S_DX": f"*{st}",
           "S_HO": f"*{st}", "M": "i32", "N": "i32", "stride_dy": "i32", "stride_x": "i32", "stride_dho": "i32",
           "stride_dx": "i32", "rows_per_prog": "i32", "T": "i32", "BLOCK_N": "constexpr", "ROWS": "constexpr",
           "HAS_DHO": "constexpr", "BLOCK_N2": "constexpr", "PREFETCH": "constexpr", "COLSUMS": "constexpr",
           "HAS_S_DX": "constexpr", "HAS_S_HO": "constexpr", "PIPE": "constexpr"}
    chunks = f"+{block_n2}" if block_n2 else ""
    tag += ",prefetch" if prefetch else ""
    tag += f",pipe{pipe}" if pipe else ""
    tag += (f",colsums{'*' + st if scale is not None else ''}") if colsums else ""
    return runtime_spec(_ln_bwd_kernel, sig, {"BLOCK_N": block_n, "ROWS": rows, "HAS_DHO": has_dho,
                                              "BLOCK_N2": block_n2, "PREFETCH": prefetch, "COLSUMS": colsums,
                                              "HAS_S_DX": scale is not None, "HAS_S_HO": scale is not None,
                                              "PIPE": pipe}, warps,
                        BWD_STAGES, f"ln_bwd[BLOCK_N={block_n}{chunks},x={t},w={_TT[pd]},dh={int(has_dho)}{tag}]",
                        div16=("N", "stride_dy", "stride_x", "stride_dho", "stride_dx"))


def _aot_specs() -> List[AotSpec]:
    """The default config (_config) for every dtype combination; the autotuner's alternatives in bf16."""
    specs: List[AotSpec] = []
    bf, f32 = torch.bfloat16, torch.float32
    for block_n in _block_sizes():
        _, rows, fwd_warps, bwd_warps = _config(block_n)
        for has_res in (False, True):
            specs += [_fwd_spec(block_n, rows, fwd_warps, xd, rd, pd, has_res) for xd, rd, pd in _dtype_combos(has_res)]
        # stochastic depth's factor per sample (x_scale): bf16 branch + bf16 or fp32 (autocast) stream, and fp32;
        # the factor in x's dtype (timm's mask) and, for a bf16 branch, in fp32 (transformers' 1 / keep_prob)
        for xd, rd, pd, sd in ((bf, bf, bf, bf), (bf, f32, f32, bf), (f32, f32, f32, f32), (bf, f32, f32, f32)):
            specs.append(_fwd_spec(block_n, rows, fwd_warps, xd, rd, pd, True, scale=sd))
        for has_dho in (False, True):
            specs += [_bwd_spec(block_n, rows, bwd_warps, xd, pd, has_dho) for xd, _, pd in _dtype_combos(False)]
        for r, w in _fwd_choices(block_n)[1:]:
            specs.append(_fwd_spec(block_n, r, w, bf, bf, bf, True, f",ROWS={r},w{w}"))
        for r, w in _bwd_choices(block_n)[1:]:
            specs.append(_bwd_spec(block_n, r, w, bf, bf, True, f",ROWS={r},w{w}"))
        for has_dho in (False, True):  # the prefetch the autotuner may pick (LN_BWD_PREFETCH None)
            if block_n <= PREFETCH_MAX_BLOCK:
                specs.append(_bwd_spec(block_n, rows, bwd_warps, bf, bf, has_dho, "", 0, True))
        # the block's LN2 with the column sums (layer_norm_bwd_colsums): bf16, and fp32 (autocast's stream), without
        # and with per-sample factors in either dtype
        for xd, sd in ((bf, None), (bf, bf), (f32, None), (f32, f32), (f32, bf)):
            specs.append(_bwd_spec(block_n, rows, bwd_warps, xd, xd, True, "", 0, False, True, sd))
    with use_ln_chunks(True):  # the column chunks (use_ln_chunks) at ViT's widths, every backward choice in bf16
        for d in (192, 384, 768, 1280):
            block_n = _config(d)[0]
            bn1, bn2 = _bwd_chunks(d, block_n)
            for r, w in _bwd_choices(block_n):
                for prefetch in (False, True) if _prefetch_ok(block_n, w) else (False,):  # (use_ln_prefetch, alone
                    specs.append(_bwd_spec(bn1, r, w, bf, bf, True, f",ROWS={r},w{w}", bn2, prefetch))  # and w/ chunks)
                    if prefetch:
                        specs.append(_bwd_spec(block_n, r, w, bf, bf, True, f",ROWS={r},w{w}", 0, True))
    # the forward's column chunks, every autotuner choice in bf16 (with and without the add) at ViT's widths, and
    # the default tile with stochastic depth's factor and in fp32 (autocast's residual stream)
    for d in (192, 384, 768, 1280, 1536):
        block_n = _config(d)[0]
        bn1, bn2 = _chunk_layout(d, block_n)
        for (r, w), has_res in itertools.product(_fwd_choices(block_n), (False, True)):
            specs.append(_fwd_spec(bn1, r, w, bf, bf, bf, has_res, f",ROWS={r},w{w}", None, bn2))
        _, rows, fwd_warps, _ = _config(d)
        specs.append(_fwd_spec(bn1, rows, fwd_warps, bf, bf, bf, True, "", bf, bn2))
        specs.append(_fwd_spec(bn1, rows, fwd_warps, bf, f32, f32, True, "", None, bn2))
    # the pipelined loops (PIPE) in bf16: every padded block up to PIPE_MAX_BLOCK at its first choice and depth,
    # and every choice and depth of both layouts at ViT's widths
    for block_n in _block_sizes():
        if block_n <= PIPE_MAX_BLOCK:
            r, w = _pipe_choices(True, block_n)[0]
            specs += [_fwd_spec(block_n, r, w, bf, bf, bf, res, f",ROWS={r},w{w}", pipe=FWD_PIPES[0])
                      for res in (False, True)]
            r, w = _pipe_choices(False, block_n)[0]
            specs.append(_bwd_spec(block_n, r, w, bf, bf, True, f",ROWS={r},w{w}", pipe=BWD_PIPES[0]))
    for d in (384, 768, 1280):
        block_n = _config(d)[0]
        for bn1, bn2 in dict.fromkeys(((block_n, 0), _chunk_layout(d, block_n))):
            for (r, w), res, pipe in itertools.product(_pipe_choices(True, block_n), (False, True), FWD_PIPES):
                specs.append(_fwd_spec(bn1, r, w, bf, bf, bf, res, f",ROWS={r},w{w}", None, bn2, pipe))
            for (r, w), pipe in itertools.product(_pipe_choices(False, block_n), BWD_PIPES):
                specs.append(_bwd_spec(bn1, r, w, bf, bf, True, f",ROWS={r},w{w}", bn2, pipe=pipe))
    # and ViT-B's width at the first choice and deepest depth in the other dtypes the autotuners see: fp16, fp32,
    # autocast's (a bf16 branch, an fp32 residual stream and parameters); the backward's column sums in fp32
    block_n, f16 = _config(768)[0], torch.float16
    (rf, wf), (rb, wb) = _pipe_choices(True, block_n)[0], _pipe_choices(False, block_n)[0]
    for xd, rd, pd in ((f16, f16, f16), (f32, f32, f32), (bf, f32, f32)):
        specs.append(_fwd_spec(block_n, rf, wf, xd, rd, pd, True, f",ROWS={rf},w{wf}", pipe=FWD_PIPES[-1]))
    for rd, sd in ((bf, bf), (f32, f32)):  # stochastic depth's factor (x's dtype; fp32 on an fp32 stream)
        specs.append(_fwd_spec(block_n, rf, wf, bf, rd, rd, True, f",ROWS={rf},w{wf}", sd, pipe=FWD_PIPES[-1]))
    for xd in (f16, f32):  # (the backward's x is h: fp32 under autocast's)
        specs.append(_bwd_spec(block_n, rb, wb, xd, xd, True, f",ROWS={rb},w{wb}", pipe=BWD_PIPES[-1]))
    specs.append(_bwd_spec(block_n, rb, wb, f32, f32, True, f",ROWS={rb},w{wb}", 0, False, True, f32, BWD_PIPES[-1]))
    # the column sums' autotuner choices in bf16 at the ViT widths the block runs the LayerNorm kernels at
    sums = {}  # (768's padded block is 1024's)
    for d in (768, 1024, 1280):
        for c in _auto_bwd_prune(_auto_bwd_configs(), {"N": d}, COLSUMS=True):
            k = c.kwargs
            spec = _bwd_spec(k["BLOCK_N"], k["ROWS"], c.num_warps, bf, bf, True, f",ROWS={k['ROWS']},w{c.num_warps}",
                             k["BLOCK_N2"], k["PREFETCH"], True, pipe=k["PIPE"])
            sums[spec.name] = spec
    return list({sp.name: sp for sp in specs + list(sums.values())}.values())  # (each once: the lists overlap)


AOT_SPECS: List[AotSpec] = _aot_specs() if HAS_TRITON else []

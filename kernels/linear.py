"""GEMM with fused epilogues: y = act(x·Wᵀ + b) (+ residual), forward and backward.

Used for every Linear of a ViT block: qkv (bias), proj (bias + residual), fc1 (bias + GELU),
fc2 (bias + residual).

Anatomy (DESIGN.md §2): Triton kernels -> launchers -> torch.library custom ops -> LinearFn ->
linear_reference -> linear() -> FusedMLP.

GEMM paths, picked per call by ``_choose_path`` (table ``GEMM_TABLE`` + override):
  * ``triton``: our tiled GEMM with the epilogue (bias, GELU, residual, saving z) in registers.
  * ``tma``: the same epilogue on a persistent GEMM whose fp16/bf16 operands stream through TMA tensor
    descriptors (sm_90+, and the interpreter). Other GPUs, fp32, and operands that break TMA's rules
    (16-byte aligned base and row stride, unit last stride) take the ``triton`` kernel.
  * ``cublas``: torch.addmm (cuBLAS, bias in its epilogue) + ONE fused Triton elementwise kernel for GELU
    + residual.
  * ``hybrid``: ``tma`` for the GEMMs that carry an epilogue beyond the bias (GELU and its saved z, a
    residual, act' in the MLP's dH GEMM: what fusing saves a pass over memory), cuBLAS for the plain ones
    (dX, dW) and wherever TMA cannot run. ``auto`` takes it for calls without autograd on big sm_90 GEMMs
    (``AUTO_INFERENCE_GEMM``, ``AUTO_INFERENCE_MIN_FLOP``); in training it is experimental (bench rows
    ``[gemm=hybrid]``, ``[mlp=hybrid]``).
Override: ``linear(..., gemm="triton"|"tma"|"cublas"|"hybrid"|"auto")``, the ``use_gemm(...)`` context, or the
``FLASHVIT_GEMM`` environment variable (read at call time).

Backward of GELU: we SAVE the pre-activation z = x·Wᵀ + b (an extra (M, N) store in the forward
epilogue) instead of recomputing it. Recomputing z is a full second GEMM (2·M·N·K FLOPs) in the
backward, while the store costs M·N·elt bytes of bandwidth: for ViT-B fc1 (K = 768, bf16, H100) that is
~1/3 of the forward GEMM's time against ~1× for the recompute. GELU cannot be inverted from its
output (not monotonic below z ≈ -0.75), so the saved output h cannot stand in. The price is memory:
z is the size of h, which fc2 keeps anyway, so fc1's saved activations double. z is only written when
autograd needs it (no extra store at inference).
For one linear, dZ = dY·gelu'(z) is one small elementwise kernel that also writes per-row-chunk column
sums of dZ (db, deterministic, no atomics); dX = dZ·W and dW = dZᵀ·X are then plain GEMMs (the same
kernel). Fusing gelu'(z) into those GEMMs' operand loads would re-read z in both and redo the erf for
every tile. In an MLP (``mlp`` / ``FusedMLP``) the hidden gradient dH = dY·W2 comes out of fc2's dX GEMM,
so there gelu'(z) goes into that GEMM's epilogue, with fc1's bias grad as per-tile column sums
(``linear_dact_bwd``): dH is never written, and the dZ pass disappears.
GEMM tiles 128 or more columns wide run their epilogue on two column halves (less register pressure); TMA tiles
256 wide that read a residual or z tile or store z, on four quarters (less shared memory).
Weight gradients (dW = dZᵀ·X: a few output tiles over K = tokens) split K across programs on our GEMM paths
(``split_k``: fp32 partials, then a fixed-order sum), so they fill the GPU. The TMA GEMM's autotuner also tries
reading the epilogue's residual or z tile before the K loop (PREFETCH) where registers allow; a GPU picks.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from flashvit.kernels import rope as _rope
from flashvit.kernels._aot import AotSpec, runtime_spec
from flashvit.kernels._dispatch import (
    FLOAT_DTYPES,
    HAS_TRITON,
    INTERPRET,
    Launcher,
    apply,
    autocast_dtype,
    cdiv,
    check_same_device,
    check_tensor,
    check_triton_dtypes,
    cuda_major,
    custom_op,
    flat2d,
    launch,
    needs_grad,
    next_pow2,
    pushed,
    sm_count,
    use_triton,
)
from flashvit.kernels.colsum import colsum_partials

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - platforms without Triton use the reference path only
    triton = None
    tl = None

ACTIVATIONS = (None, "gelu", "gelu_tanh")
_ACT_CODE = {None: 0, "gelu": 1, "gelu_tanh": 2}
GEMM_PATHS = ("auto", "triton", "tma", "cublas", "hybrid")

# ---------------------------------------------------------------------------------------------
# Triton kernels

# Row granularity of the column-sum partials a DACT GEMM writes: every BLOCK_M a GEMM config can use is a
# multiple of it (checked below), so their number, cdiv(M, PART_BM), is known before the autotuner picks one.
_PART_BM = 32
_EPI_SPLIT_N = 128  # GEMM tiles at least this wide run their epilogue on two column halves
_EPI_QUARTER_N = 256  # TMA tiles this wide that stage a residual or z tile: on four column quarters
_SPLIT_ALIGN = 256  # split-K: K per split and the partial buffer's rows per split are multiples of this

if HAS_TRITON:
    PART_BM = tl.constexpr(_PART_BM)
    EPI_SPLIT_N = tl.constexpr(_EPI_SPLIT_N)
    EPI_QUARTER_N = tl.constexpr(_EPI_QUARTER_N)

    @triton.jit
    def _dev_gelu_cdf(z):
        # fp32 z -> (Φ(z), exp(−z²/2)) for exact GELU where the result is stored in 16 bits: Φ by Abramowitz &
        # Stegun 7.1.26, which reuses that exponential (|error| of Φ + z·φ <= 2.6e-7, as torch's own fp32
        # gelu_backward on CPU; 16-bit rounding is 1e3 times that), in about half the instructions of libdevice's
        # erf + exp: with those the elementwise passes were compute-bound (sm_90 SASS of the bf16 dZ pass at 8x256
        # w4: 952 instructions for a thread's 16 elements; 584 with this).
        e = tl.exp2(z * z * -0.7213475204444817)  # exp(−z²/2)
        u = 1.0 + 0.2316418883 * tl.abs(z)  # 0.3275911 / √2: A&S's 1 + p·x at x = |z| / √2
        t = tl.math.rsqrt(u * u)  # 1 / u on one MUFU op (a division adds range fix-ups); u² = inf gives t = 0
        q = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
        q = q * e  # erfc(|z| / √2)
        return tl.where(z >= 0.0, 1.0 - 0.5 * q, 0.5 * q), e

    @triton.jit
    def _dev_act(zin, ACT: tl.constexpr, OUT16: tl.constexpr):
        # z (any float dtype) -> fp32 act(z): 1 = exact erf GELU (OUT16, a result stored in 16 bits:
        # _dev_gelu_cdf; else libdevice's erf), 2 = tanh GELU, 0 = identity. A device function, compiled into each
        # kernel that calls it (the AOT gate skips _dev_* names).
        z = zin.to(tl.float32)
        if ACT == 1 and OUT16:
            cdf, _ = _dev_gelu_cdf(z)
            y = z * cdf
        elif ACT == 1:
            y = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
        elif ACT == 2:
            u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
            y = 0.5 * z * (2.0 - 2.0 / (tl.exp2(u * 2.8853900817779268) + 1.0))  # 1 + tanh(u)
        else:
            y = z
        return y

    @triton.jit
    def _dev_dact(zin, ACT: tl.constexpr):
        # z in its stored dtype -> fp32 act'(z): 1 = exact GELU, Φ(z) + z·φ(z) (z stored in 16 bits, as dZ then is:
        # _dev_gelu_cdf); 2 = tanh GELU, ½(1 + t) + ½·z·(1 − t²)·du/dz.
        z = zin.to(tl.float32)
        if ACT == 1 and zin.dtype != tl.float32:
            cdf, e = _dev_gelu_cdf(z)
            d = cdf + z * e * 0.3989422804014327
        elif ACT == 1:
            d = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
        else:
            u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
            t = 1.0 - 2.0 / (tl.exp2(u * 2.8853900817779268) + 1.0)
            d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
        return d

    @triton.jit
    def _dev_colsum(part_ptr, acc, keep, pid_m, offs_n, N, P, BLOCK_M: tl.constexpr):
        # part (P, N) fp32, P = cdiv(M, PART_BM): this tile's column sums of acc (BLOCK_M, BLOCK_N) over its
        # kept rows go to part row pid_m·R, zeros to its other R - 1 rows (R = BLOCK_M / PART_BM), so every row
        # of part is written whatever BLOCK_M the autotuner picked, and summing part over rows is deterministic.
        first = pid_m.to(tl.int64) * (BLOCK_M // PART_BM)
        n_ok = offs_n < N
        tl.store(part_ptr + first * N + offs_n, tl.sum(tl.where(keep, acc, 0.0), axis=0), mask=n_ok)
        for j in tl.static_range(1, BLOCK_M // PART_BM):
            tl.store(part_ptr + (first + j) * N + offs_n, tl.zeros_like(offs_n).to(tl.float32),
                     mask=n_ok & (first + j < P))

    @triton.jit
    def _dev_rope_pair(x1, x2, c1, rope_ptr, rows, on_rows, c2, R_D):
        # The two members of each rotated pair, (BM, K) fp32 each at columns c1 and c2 (K,) of the head (d = c % R_D):
        # y1 = x1·cos(d1) − x2·sin(d1), y2 = x2·cos(d2) + x1·sin(d2); rows off the table (on_rows false) pass as they are.
        d1 = (c1 % R_D)[None, :]
        d2 = (c2 % R_D)[None, :]
        s1 = tl.load(rope_ptr + rows + d1, mask=on_rows, other=0.0).to(tl.float32)
        k1 = tl.load(rope_ptr + rows + R_D + d1, mask=on_rows, other=1.0).to(tl.float32)
        s2 = tl.load(rope_ptr + rows + d2, mask=on_rows, other=0.0).to(tl.float32)
        k2 = tl.load(rope_ptr + rows + R_D + d2, mask=on_rows, other=1.0).to(tl.float32)
        return x1 * k1 - x2 * s1, x2 * k2 + x1 * s2

    @triton.jit
    def _dev_rope(acc, offs_m, on, rope_ptr, R_TOK, R_P, R_COLS, R_D, stride_rt, BLOCK_M: tl.constexpr,
                  WIDTH: tl.constexpr, ROPE: tl.constexpr):
        # acc (BM, WIDTH) fp32 at rows offs_m, columns on .. on + WIDTH: RoPE on the columns < R_COLS (q and k of a
        # packed qkv, R_D-wide heads) of tokens (row % R_TOK) >= R_P. rope (R_TOK - R_P, 2·R_D) fp32 rows =
        # cat(sin, cos), row stride stride_rt. ROPE == 1: pairs (2i, 2i + 1) (EVA-02's; any even WIDTH);
        # ROPE > 1: rotate_half pairs (i, i + D/2) with D = ROPE = R_D, a power of two dividing WIDTH (DINOv3's:
        # whole heads in the chunk, their halves brought side by side by a reshape).
        tok = offs_m % R_TOK
        rows = (tl.maximum(tok - R_P, 0)).to(tl.int64)[:, None] * stride_rt
        if ROPE == 1:
            x1, x2 = tl.split(tl.reshape(acc, (BLOCK_M, WIDTH // 2, 2)))  # even, odd columns
            c1 = on + 2 * tl.arange(0, WIDTH // 2)
            c2 = c1 + 1
        else:
            # (BM, heads, 2, D/2) -> (BM, heads, D/2, 2) -> first and second halves, (BM, heads·D/2) each
            x1, x2 = tl.split(tl.reshape(tl.permute(tl.reshape(acc, (BLOCK_M, WIDTH // ROPE, 2, ROPE // 2)),
                                                    (0, 1, 3, 2)), (BLOCK_M, WIDTH // 2, 2)))
            j = tl.arange(0, WIDTH // 2)
            c1 = on + (j // (ROPE // 2)) * ROPE + j % (ROPE // 2)
            c2 = c1 + ROPE // 2
        on_rows = (tok >= R_P)[:, None] & (c1 < R_COLS)[None, :]
        y1, y2 = _dev_rope_pair(x1, x2, c1, rope_ptr, rows, on_rows, c2, R_D)
        if ROPE == 1:
            y = tl.reshape(tl.join(y1, y2), (BLOCK_M, WIDTH))
        else:
            y = tl.reshape(tl.permute(tl.reshape(tl.join(y1, y2), (BLOCK_M, WIDTH // ROPE, ROPE // 2, 2)),
                                      (0, 1, 3, 2)), (BLOCK_M, WIDTH))
        return y

    @triton.jit
    def _dev_epilogue(acc, pre, offs_m, offs_n, om, on, M, N, pid_m, bias_ptr, scale_ptr, res_ptr, c_out, z_io, part_ptr, P,
                      stride_rm, stride_rn, stride_cm, stride_cn, rope_ptr, R_TOK, R_P, R_COLS, R_D, stride_rt,
                      HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
                      SAVE_Z: tl.constexpr, DACT: tl.constexpr, BLOCK_M: tl.constexpr, DESC: tl.constexpr, PRE: tl.constexpr,
                      ROPE: tl.constexpr, WIDTH: tl.constexpr):
        # acc (BM, BNe) fp32: the output tile's columns offs_n (rows offs_m; (om, on) its corner). c_out and z_io
        # are TMA descriptors with DESC (block (BM, BNe)), else pointers with the C strides. PRE: ``pre`` is the
        # z (DACT) or residual tile at acc's positions, already loaded. ROPE (0: none; bias only besides it):
        # _dev_rope after the bias; WIDTH = BNe.
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        rows = offs_m[:, None].to(tl.int64)
        if DACT != 0:  # TMA reads past the edges as zeros; the pointer loads are masked
            if PRE:
                zt = pre
            elif DESC:
                zt = z_io.load([om, on])
            else:
                zt = tl.load(z_io + rows * stride_cm + offs_n[None, :] * stride_cn, mask=mask, other=0.0)
            acc = acc * _dev_dact(zt, DACT)
            if P > 0:
                _dev_colsum(part_ptr, acc, mask, pid_m, offs_n, N, P, BLOCK_M)
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if ROPE:
            acc = _dev_rope(acc, offs_m, on, rope_ptr, R_TOK, R_P, R_COLS, R_D, stride_rt, BLOCK_M, WIDTH, ROPE)
        if SAVE_Z:
            if DESC:
                z_io.store([om, on], acc.to(z_io.dtype))
            else:
                tl.store(z_io + rows * stride_cm + offs_n[None, :] * stride_cn, acc.to(z_io.dtype.element_ty),
                         mask=mask)
        if DESC:  # (the output's dtype: GELU's cheaper form where y is stored in 16 bits)
            y = _dev_act(acc, ACT, c_out.dtype != tl.float32)
        else:
            y = _dev_act(acc, ACT, c_out.dtype.element_ty != tl.float32)
        if HAS_SCALE:  # LayerScale's γ (N,) on the fp32 result: W and b stay unscaled (no fp16 underflow of γ·W)
            y = y * tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if HAS_RES:
            if PRE:
                r = pre
            else:
                r = tl.load(res_ptr + rows * stride_rm + offs_n[None, :] * stride_rn, mask=mask, other=0.0)
            y = y + r.to(tl.float32)
        if DESC:
            c_out.store([om, on], y.to(c_out.dtype))
        else:
            tl.store(c_out + rows * stride_cm + offs_n[None, :] * stride_cn, y.to(c_out.dtype.element_ty), mask=mask)

    @triton.jit
    def _dev_halves(t, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
        # (BM, WIDTH) -> its column halves, (BM, WIDTH / 2) each
        return tl.split(tl.permute(tl.reshape(t, (BLOCK_M, 2, WIDTH // 2)), (0, 2, 1)))

    @triton.jit
    def _dev_epilogue_halves(acc, pre, offs_m, om, on, M, N, pid_m, bias_ptr, scale_ptr, res_ptr, c_out, z_io, part_ptr, P,
                             stride_rm, stride_rn, stride_cm, stride_cn, rope_ptr, R_TOK, R_P, R_COLS, R_D, stride_rt,
                             HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
                             SAVE_Z: tl.constexpr, DACT: tl.constexpr, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr,
                             DESC: tl.constexpr, PRE: tl.constexpr, ROPE: tl.constexpr):
        # acc, pre (BM, WIDTH) at columns on .. on + WIDTH: _dev_epilogue on each column half.
        a0, a1 = _dev_halves(acc, BLOCK_M, WIDTH)
        if PRE:
            p0, p1 = _dev_halves(pre, BLOCK_M, WIDTH)
        else:
            p0, p1 = a0, a1
        offs_n = on + tl.arange(0, WIDTH // 2)
        _dev_epilogue(a0, p0, offs_m, offs_n, om, on, M, N, pid_m, bias_ptr, scale_ptr, res_ptr, c_out, z_io, part_ptr, P,
                      stride_rm, stride_rn, stride_cm, stride_cn, rope_ptr, R_TOK, R_P, R_COLS, R_D, stride_rt, HAS_BIAS,
                      HAS_SCALE, ACT, HAS_RES, SAVE_Z, DACT, BLOCK_M, DESC, PRE, ROPE, WIDTH // 2)
        _dev_epilogue(a1, p1, offs_m, offs_n + WIDTH // 2, om, on + WIDTH // 2, M, N, pid_m, bias_ptr, scale_ptr, res_ptr,
                      c_out, z_io, part_ptr, P, stride_rm, stride_rn, stride_cm, stride_cn, rope_ptr, R_TOK, R_P, R_COLS,
                      R_D, stride_rt, HAS_BIAS, HAS_SCALE, ACT, HAS_RES, SAVE_Z, DACT, BLOCK_M, DESC, PRE, ROPE, WIDTH // 2)

    @triton.jit
    def _dev_epilogue_tile(acc, pre, offs_m, om, on, M, N, pid_m, bias_ptr, scale_ptr, res_ptr, c_out, z_io, part_ptr, P,
                           stride_rm, stride_rn, stride_cm, stride_cn, rope_ptr, R_TOK, R_P, R_COLS, R_D, stride_rt,
                           HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
                           SAVE_Z: tl.constexpr, DACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           DESC: tl.constexpr, PRE: tl.constexpr, ROPE: tl.constexpr):
        # Tiles 128+ wide run the epilogue on two column halves: half the fp32 values live at once (the
        # whole-tile form spilled ~1-2.5 KB per thread at sm_90 with GELU + z + residual; ptxas via kernels/_aot).
        # TMA tiles 256 wide whose epilogue reads a residual or z tile, or stores z, go by quarters: the staged
        # tiles are then small enough for 4 pipeline stages of 128x256x64 in sm_90's shared memory (3 with an
        # unaligned residual; see tma_config_fits). pre (BM, BN): see _dev_epilogue (any tensor when not PRE).
        # HAS_RES: 0, 1 or 2 here (see _res_mode); any nonzero value reads the residual.
        if DESC and BLOCK_N >= EPI_QUARTER_N and (SAVE_Z or DACT != 0 or HAS_RES):
            h0, h1 = _dev_halves(acc, BLOCK_M, BLOCK_N)
            if PRE:
                q0, q1 = _dev_halves(pre, BLOCK_M, BLOCK_N)
            else:
                q0, q1 = h0, h1
            _dev_epilogue_halves(h0, q0, offs_m, om, on, M, N, pid_m, bias_ptr, scale_ptr, res_ptr, c_out, z_io, part_ptr, P,
                                 stride_rm, stride_rn, stride_cm, stride_cn, rope_ptr, R_TOK, R_P, R_COLS, R_D, stride_rt,
                                 HAS_BIAS, HAS_SCALE, ACT, HAS_RES, SAVE_Z, DACT, BLOCK_M, BLOCK_N // 2, DESC, PRE, ROPE)
            _dev_epilogue_halves(h1, q1, offs_m, om, on + BLOCK_N // 2, M, N, pid_m, bias_ptr, scale_ptr, res_ptr, c_out,
                                 z_io, part_ptr, P, stride_rm, stride_rn, stride_cm, stride_cn, rope_ptr, R_TOK, R_P, R_COLS,
                                 R_D, stride_rt, HAS_BIAS, HAS_SCALE, ACT, HAS_RES, SAVE_Z, DACT, BLOCK_M, BLOCK_N // 2,
                                 DESC, PRE, ROPE)
        elif BLOCK_N >= EPI_SPLIT_N:
            _dev_epilogue_halves(acc, pre, offs_m, om, on, M, N, pid_m, bias_ptr, scale_ptr, res_ptr, c_out, z_io, part_ptr,
                                 P, stride_rm, stride_rn, stride_cm, stride_cn, rope_ptr, R_TOK, R_P, R_COLS, R_D, stride_rt,
                                 HAS_BIAS, HAS_SCALE, ACT, HAS_RES, SAVE_Z, DACT, BLOCK_M, BLOCK_N, DESC, PRE, ROPE)
        else:
            _dev_epilogue(acc, pre, offs_m, on + tl.arange(0, BLOCK_N), om, on, M, N, pid_m, bias_ptr, scale_ptr, res_ptr,
                          c_out, z_io, part_ptr, P, stride_rm, stride_rn, stride_cm, stride_cn, rope_ptr, R_TOK, R_P, R_COLS,
                          R_D, stride_rt, HAS_BIAS, HAS_SCALE, ACT, HAS_RES, SAVE_Z, DACT, BLOCK_M, DESC, PRE, ROPE, BLOCK_N)

    @triton.jit(do_not_specialize=["M", "N", "M_KEY"])
    def _gemm_kernel(
        a_ptr, b_ptr, bias_ptr, scale_ptr, res_ptr, c_ptr, z_ptr, part_ptr, rope_ptr,
        M, N, K, M_KEY, P, K_SPLIT, stride_cs,
        stride_am, stride_ak, stride_bk, stride_bn,
        stride_rm, stride_rn, stride_cm, stride_cn, R_TOK, R_P, R_COLS, R_D, stride_rt,
        HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, SAVE_Z: tl.constexpr,
        DACT: tl.constexpr, ALLOW_TF32: tl.constexpr, ROPE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # C (M, N) = act(A (M, K) · B (K, N) + bias (N,)) + R (M, N); Z (M, N) = pre-activation.
        # Forward: A = x, B = Wᵀ (strides of W swapped). Backward: dX = dZ·W, dW = dZᵀ·X.
        # DACT (backward through an activation, no other epilogue): C = (A·B) ⊙ act'(Z) with Z read at C's
        # positions, and its column sums (P, N) into part (see _dev_colsum; P = 0: none).
        # M_KEY only feeds the autotuning key (M rounded up to a power of two).
        # Split-K (grid axis 1, no epilogue): program (tile, s) sums K range [s·K_SPLIT, (s + 1)·K_SPLIT) ∩ [0, K)
        # into C + s·stride_cs, fp32 partials the host adds up (K_SPLIT = K, one split: the plain GEMM).
        pid = tl.program_id(0)
        k0 = tl.program_id(1) * K_SPLIT
        k_len = tl.minimum(K - k0, K_SPLIT)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        # grouped ordering: GROUP_M row-tiles share each B column-tile while it sits in L2
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # rows/cols past the edge wrap around for the loads (always in bounds, no M/N masks in the
        # main loop); they are masked at the store.
        offs_am = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
        offs_bn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + k0.to(tl.int64) * stride_ak + (offs_am[:, None].to(tl.int64) * stride_am
                                                         + offs_k[None, :] * stride_ak)  # (BM, BK)
        b_ptrs = b_ptr + k0.to(tl.int64) * stride_bk + (offs_k[:, None] * stride_bk
                                                         + offs_bn[None, :].to(tl.int64) * stride_bn)  # (BK, BN)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(k_len, BLOCK_K)):
            k_left = k_len - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            if ALLOW_TF32:
                acc = tl.dot(a, b, acc, input_precision="tf32")
            else:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        c_out = c_ptr + tl.program_id(1).to(tl.int64) * stride_cs
        _dev_epilogue_tile(acc, acc, offs_m, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, pid_m, bias_ptr, scale_ptr, res_ptr,
                           c_out, z_ptr, part_ptr, P, stride_rm, stride_rn, stride_cm, stride_cn, rope_ptr, R_TOK, R_P,
                           R_COLS, R_D, stride_rt, HAS_BIAS, HAS_SCALE, ACT, HAS_RES, SAVE_Z, DACT, BLOCK_M, BLOCK_N, False,
                           False, ROPE)

    @triton.jit
    def _gemm_tma_kernel(
        a_desc, b_desc, c_desc, z_desc, bias_ptr, scale_ptr, res_ptr, part_ptr, z_ptr, rope_ptr,
        M, N, K, M_KEY, P, SPLITS, K_SPLIT, M_PAD, stride_rm, stride_rn, R_TOK, R_P, R_COLS, R_D, stride_rt,
        A_T: tl.constexpr, B_T: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, SAVE_Z: tl.constexpr,
        DACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr, PREFETCH: tl.constexpr, ROPE: tl.constexpr,
    ):
        # The same C = act(A·B + bias) + R as _gemm_kernel, 16-bit operands streamed by TMA descriptors
        # (Hopper's bulk copies; out-of-bounds reads are zeros, out-of-bounds writes are dropped), and
        # persistent: program p computes output tiles p, p + NUM_SMS, ... in the grouped order.
        # A is stored (M, K), or (K, M) with A_T; B is stored (K, N), or (N, K) with B_T (both: unit last stride).
        # DACT: z_desc is read (the activation's input), as in _gemm_kernel.
        # FLATTEN: the tile and K loops pipelined as one (the next tile's loads overlap this one's epilogue).
        # Split-K (SPLITS > 1, no epilogue): work item (tile, s) sums K range [s·K_SPLIT, (s + 1)·K_SPLIT) (a
        # multiple of BLOCK_K; reads past K are zeros) into rows s·M_PAD + tile rows of the fp32 C.
        # PREFETCH (with a residual, or DACT's z (M, N) contiguous at z_ptr): the epilogue's one global read is
        # issued before the K loop, so its latency hides behind the MMAs instead of stalling the epilogue.
        start = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K_SPLIT, BLOCK_K)
        num_pid_in_group = GROUP_M * num_pid_n
        for item in tl.range(start, num_pid_m * num_pid_n * SPLITS, NUM_SMS, flatten=FLATTEN):
            tile = item // SPLITS
            k0 = (item % SPLITS) * K_SPLIT
            first_pid_m = (tile // num_pid_in_group) * GROUP_M
            group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
            pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
            pid_n = (tile % num_pid_in_group) // group_size_m
            om = pid_m * BLOCK_M
            on = pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            pre = acc  # (unused unless prefetched)
            if PREFETCH:
                prow = (om + tl.arange(0, BLOCK_M)).to(tl.int64)
                pcol = on + tl.arange(0, BLOCK_N)
                pmask = (prow[:, None] < M) & (pcol[None, :] < N)
                if DACT != 0:
                    pre = tl.load(z_ptr + prow[:, None] * N + pcol[None, :], mask=pmask, other=0.0)
                elif HAS_RES:
                    pre = tl.load(res_ptr + prow[:, None] * stride_rm + pcol[None, :] * stride_rn, mask=pmask,
                                  other=0.0)
            for ki in range(k_tiles):
                ok = k0 + ki * BLOCK_K
                if A_T:
                    a = a_desc.load([ok, om]).T  # (BK, BM) tile -> (BM, BK)
                else:
                    a = a_desc.load([om, ok])
                if B_T:
                    b = b_desc.load([on, ok]).T  # (BN, BK) tile -> (BK, BN)
                else:
                    b = b_desc.load([ok, on])
                acc = tl.dot(a, b, acc)
            _dev_epilogue_tile(acc, pre, om + tl.arange(0, BLOCK_M), om + (item % SPLITS) * M_PAD, on, M, N, pid_m, bias_ptr,
                               scale_ptr, res_ptr, c_desc, z_desc, part_ptr, P, stride_rm, stride_rn, 0, 0, rope_ptr, R_TOK,
                               R_P, R_COLS, R_D, stride_rt, HAS_BIAS, HAS_SCALE, ACT, HAS_RES, SAVE_Z, DACT, BLOCK_M,
                               BLOCK_N, True, PREFETCH, ROPE)

    @triton.jit(do_not_specialize=["M", "M_KEY"])
    def _epilogue_kernel(
        c_ptr, scale_ptr, res_ptr, y_ptr,
        M, N, M_KEY, stride_cm, stride_rm, stride_rn, stride_ym,
        ACT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # cuBLAS path: C (M, N) = x·Wᵀ + b from torch.addmm (the bias rides in cuBLAS's epilogue);
        # y = act(C)·γ + R in one pass (γ (N,) with HAS_SCALE). C is the saved pre-activation z as it is.
        # M_KEY only feeds the autotuning key (M rounded up to a power of two).
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        rows = offs_m[:, None].to(tl.int64)
        z = tl.load(c_ptr + rows * stride_cm + offs_n[None, :], mask=mask, other=0.0)
        y = _dev_act(z, ACT, y_ptr.dtype.element_ty != tl.float32)
        if HAS_SCALE:
            y = y * tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if HAS_RES:
            y = y + tl.load(res_ptr + rows * stride_rm + offs_n[None, :] * stride_rn, mask=mask,
                            other=0.0).to(tl.float32)
        tl.store(y_ptr + rows * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["M", "M_KEY"])
    def _dact_colsum_kernel(
        dy_ptr, z_ptr, dz_ptr, part_ptr,
        M, N, rows_per_prog, M_KEY, stride_dym, stride_dyn, stride_zm, stride_dzm,
        ACT: tl.constexpr, WRITE_DZ: tl.constexpr, COLSUM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PIPE: tl.constexpr,
    ):
        # dZ (M, N) = dY · act'(Z); part (P, N) fp32 = column sums of dZ over this program's rows_per_prog rows
        # (a multiple of BLOCK_M, the same for every config: the partition does not move with the tile).
        # The sums build up in a (BLOCK_M, BLOCK_N) tile and reduce across rows once, at the end, not with a
        # cross-warp reduction per iteration (that form ran at about half of eager's bandwidth:
        # bench/results/2026-11-26-h100-diag/kernels.txt). M_KEY: the autotuning key only. PIPE > 0 (DACT_PIPES):
        # Triton pipelines the row loop PIPE stages deep, the next blocks' dY and Z loaded into shared memory
        # (cp.async) while this one computes; 0: each block's loads wait (ptxas: no asynchronous copies).
        pid_p = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        row0 = pid_p.to(tl.int64) * rows_per_prog
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r in tl.range(0, rows_per_prog, BLOCK_M, num_stages=PIPE if PIPE > 0 else None):
            rows = row0 + r + tl.arange(0, BLOCK_M)[:, None]
            mask = (rows < M) & nmask[None, :]
            g = tl.load(dy_ptr + rows * stride_dym + offs_n[None, :] * stride_dyn, mask=mask, other=0.0)
            g = g.to(tl.float32)
            if ACT != 0:
                z = tl.load(z_ptr + rows * stride_zm + offs_n[None, :], mask=mask, other=0.0)
                g = g * _dev_dact(z, ACT)
            if WRITE_DZ:
                tl.store(dz_ptr + rows * stride_dzm + offs_n[None, :], g.to(dz_ptr.dtype.element_ty), mask=mask)
            if COLSUM:
                acc += g  # masked rows and columns loaded as 0
        if COLSUM:
            tl.store(part_ptr + pid_p * N + offs_n, tl.sum(acc, axis=0), mask=nmask)


# ---------------------------------------------------------------------------------------------
# GEMM configs. (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); GROUP_M = 8 everywhere.
# Every config keeps its pipelined shared memory <= 160 KiB so it also fits an A100 (163 KiB).

GROUP_M = 8
SM80_CONFIGS_16 = [(128, 256, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4)]
SM90_CONFIGS_16 = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (64, 256, 64, 4, 3), (128, 128, 64, 4, 3)]
FP32_CONFIGS = [(128, 128, 32, 8, 3), (64, 128, 32, 4, 3), (64, 64, 32, 4, 4)]
INTERPRET_CONFIG = (64, 128, 64, 4, 1)  # one fixed small config: autotuning the interpreter is far too slow
# TMA kernel (16-bit only): shared memory = stages x (A + B tiles) + the C (and z) store tiles <= 227 KiB.
# Measured alone on an H100 (Triton 3.6, bf16, plain GEMM at ViT-B's fc1 / fc2 shapes, M = 50432;
# bench/results/2026-11-26-h100-run4/gemm-configs.csv): 128x256x64 w8 s4 ran at 0.98x / 0.99x torch.matmul,
# s3 at 0.98x / 0.95x, the 128x128x64 ones at 0.87-0.90x / 0.83-0.86x, 64x256x64 at 0.82x / 0.80x (dropped),
# 2 stages at 0.40-0.74x. With a staged residual or z tile (fc2's residual, fc1's GELU in training, act' in
# fc2's dX) the 128x256 tiles run their epilogue by column quarters; 4 stages still fit unless the residual's
# rows are unaligned (tma_config_fits, run 5); the 128x128 ones stay as the PREFETCH configs.
TMA_CONFIGS_16 = [(128, 256, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4)]
TMA_INTERPRET_CONFIG = (32, 64, 32, 4, 1)
# The nested tile / K loops (FLATTEN=False) ran at 0.81-0.99x of the flattened loop, config for config, there.
TMA_FLATTEN = True
TMA_INTERPRET_SMS = 3  # fewer programs than tiles: the interpreter exercises the persistent loop
# Elementwise kernels (the cuBLAS path's epilogue pass and the dZ / bias-grad pass): (BLOCK_M, BLOCK_N,
# num_warps), autotuned per (M bucket, N, flags, dtypes); the first is the one run without autotuning. 16 or 8
# elements a thread: a memory-bound pass needs the occupancy to keep loads in flight (ptxas, sm_90, bf16 with erf
# GELU's derivative: 66 registers for the dZ pass at 8x256 w4, 40 at 8 elements a thread; 205 for the epilogue at
# 32x128 w8 once). The dZ pass at 8x256 w4 alone ran at about 55% of an H200's copy bandwidth
# (bench/results/2026-11-28-h200-run3: 24 calls, 3.081 ms a step of ViT-B training, by my estimate of their
# bytes), hence a choice.
ELEMENTWISE_CONFIGS = [(8, 256, 4), (4, 256, 4), (8, 256, 8), (8, 128, 4), (16, 256, 8), (4, 512, 8)]
# The dZ pass's partition: each program sums a fixed run of rows (a multiple of _DACT_ROWS, which every config's
# BLOCK_M divides), sized so that about _DACT_PROGRAMS programs cover M x N in 256-column blocks, whatever tile the
# autotuner picks. Fewer, longer runs than one row block a program: fewer fp32 partial rows to sum (run 3's torch
# reduce_kernel calls took 21 us each with up to 1024 partial rows; kernels/colsum.py sums them since).
_DACT_ROWS = 32
_DACT_PROGRAMS = 4096
assert all(_DACT_ROWS % c[0] == 0 for c in ELEMENTWISE_CONFIGS), "every elementwise BLOCK_M must divide _DACT_ROWS"
# The dZ pass's row loop pipelined (PIPE in _dact_colsum_kernel), as LayerNorm's loops (kernels/layernorm.py,
# LN_PIPE): not yet timed, so its autotuner also tries these depths at the first DACT_PIPE_TILES tiles.
# DACT_PIPE_PLAIN: the depth of a launch that is not autotuned (the interpreter's, set_autotune(False)).
DACT_PIPES = (3,)
DACT_PIPE_TILES = 2
DACT_PIPE_PLAIN = 0
# The dZ pass's autotuner configs: (BLOCK_M, BLOCK_N, num_warps, PIPE)
DACT_CONFIGS = [(*c, 0) for c in ELEMENTWISE_CONFIGS] + [(*c, k) for k in DACT_PIPES
                                                        for c in ELEMENTWISE_CONFIGS[:DACT_PIPE_TILES]]
_AUTOTUNE_KEY = ["M_KEY", "N", "K", "ACT", "HAS_RES", "SAVE_Z", "DACT", "ROPE"]  # the epilogue shifts the best tile
# The RoPE epilogue holds its chunk's pairs and four table tiles at once: tiles with more than this many fp32
# accumulator values a thread spilled at sm_80/sm_90 (ptxas via kernels/_aot: 128x256 w8 and 128x128 w4 did;
# 128x128 w8, 64x128 w4 and 128x64 w4 did not), so its autotuning keeps to tiles within it.
ROPE_MAX_ACC = 64
# The rotate_half epilogue brings whole heads' halves side by side within an epilogue chunk: every config's chunk
# (BLOCK_N, or BLOCK_N / 2 from EPI_SPLIT_N on; no quarters without a z or residual) holds ROPE_HALF_MAX_D columns.
ROPE_HALF_MAX_D = 64


def rope_config_fits(cfg: Tuple[int, int, int, int, int]) -> bool:
    """A GEMM config the RoPE epilogue runs without spilling (see ROPE_MAX_ACC)."""
    bm, bn, _, w, _ = cfg
    return bm * bn <= ROPE_MAX_ACC * 32 * w


assert all(any(rope_config_fits(c) for c in cfgs) for cfgs in (SM80_CONFIGS_16, SM90_CONFIGS_16, FP32_CONFIGS,
                                                                TMA_CONFIGS_16)), "a config list the RoPE epilogue fits"
assert all((c[1] // 2 if c[1] >= _EPI_SPLIT_N else c[1]) >= ROPE_HALF_MAX_D
           for c in SM80_CONFIGS_16 + SM90_CONFIGS_16 + FP32_CONFIGS + TMA_CONFIGS_16
           + [INTERPRET_CONFIG, TMA_INTERPRET_CONFIG] if rope_config_fits(c)), \
    "the rotate_half epilogue needs chunks (BLOCK_N, halved from EPI_SPLIT_N on) of ROPE_HALF_MAX_D columns"


def _cfg(c) -> Tuple[int, int, int, int, int]:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages


def _gemm_prune(configs, named_args, **kwargs):
    """The tiled GEMM's autotuning: with the RoPE epilogue only the configs it fits (at least one per list)."""
    if not kwargs.get("ROPE", named_args.get("ROPE", 0)):
        return configs
    return [c for c in configs if rope_config_fits(_cfg(c))] or configs[-1:]


assert all(c[0] % _PART_BM == 0 for c in SM80_CONFIGS_16 + SM90_CONFIGS_16 + FP32_CONFIGS + TMA_CONFIGS_16
           + [INTERPRET_CONFIG, TMA_INTERPRET_CONFIG]), "every GEMM BLOCK_M must be a multiple of _PART_BM"


def _triton_configs(cfgs: List[Tuple[int, int, int, int, int]]) -> list:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M},
                          num_warps=w, num_stages=s) for bm, bn, bk, w, s in cfgs]


_TMA_SMEM_LIMIT = 227 * 1024  # sm_90's opt-in maximum per block


def tma_config_fits(cfg: Tuple[int, int, int, int, int], staged: bool, fp32_c: bool = False,
                    res_aligned: bool = True) -> bool:
    """Pipelined A/B tiles plus the epilogue's tiles fit in shared memory (16-bit operands). ``staged``: the
    epilogue reads a residual or z tile, or stores z (see _epi_n); ``fp32_c``: split-K's fp32 C tile;
    ``res_aligned``: no residual, or one with a row stride in multiples of 16 elements and 16-byte aligned
    data (see _res_mode). The epilogue takes one (BM, epilogue width) tile for C alone; staged, two on column
    quarters, three on quarters with an unaligned residual and on halves (C, the other tile, a layout-conversion
    scratch); an fp32 C tile counts three. 128x256x64, 4 stages, Triton 3.6, sm_90 (the 32 B past the formula
    are barriers): plain 229408 B; on quarters GELU + z 213024, residual (+ GELU + z) 229408, act' 229424, an
    unaligned residual 245792 (ptxas via kernels/_aot; the H100 of run 5 refused that last one at launch,
    asking for the same 245792 B, and a residual on halves, 294944 B)."""
    bm, bn, bk, _, st = cfg
    tiles = 1
    if fp32_c:
        tiles = 3
    elif staged:
        tiles = 2 if bn >= _EPI_QUARTER_N and res_aligned else 3
    return 2 * (st * (bm * bk + bk * bn) + bm * _epi_n(bn, staged) * tiles) <= _TMA_SMEM_LIMIT


def _res_mode(residual: Optional[torch.Tensor]) -> int:
    """The TMA kernel's HAS_RES: 0 none, 1 a residual whose row loads vectorize (row stride a multiple of 16
    elements, 16-byte aligned data), 2 any other (it needs more shared memory: tma_config_fits). The
    autotuner keys on it, so a tile chosen for one never launches for the other."""
    if residual is None:
        return 0
    return 1 if residual.stride(0) % 16 == 0 and residual.data_ptr() % 16 == 0 else 2


def _prefetch_ok(cfg: Tuple[int, int, int, int, int]) -> bool:
    """PREFETCH holds a 16-bit tile beside the fp32 accumulator through the K loop: only where the accumulator
    takes at most 64 registers a thread (ptxas at sm_90: 128 x 128, 8 warps, 246-255 registers; 4 warps or
    128-register accumulators spill 1.7-2 KB)."""
    bm, bn, _, w, _ = cfg
    return bm * bn // (32 * w) <= 64


def _epi_n(bn: int, staged: bool = False) -> int:
    """Columns the TMA epilogue handles at once (the C and z descriptors' block width); ``staged``: HAS_RES,
    SAVE_Z or DACT (see _dev_epilogue_tile)."""
    if staged and bn >= _EPI_QUARTER_N:
        return bn // 4
    return bn // 2 if bn >= _EPI_SPLIT_N else bn


def _tma_prune(configs, named_args, **kwargs):
    flag = lambda name: bool(kwargs.get(name, named_args.get(name, False)))  # noqa: E731
    # a residual or z tile staged (z stored, or read for act'; HAS_RES 2: an unaligned residual, see _res_mode),
    # or split-K's fp32 C tile (as big as two 16-bit ones)
    staged, fp32_c = flag("SAVE_Z") or flag("DACT") or flag("HAS_RES"), named_args.get("SPLITS", 1) > 1
    res_aligned = kwargs.get("HAS_RES", named_args.get("HAS_RES", 0)) != 2
    rope = bool(kwargs.get("ROPE", named_args.get("ROPE", 0)))
    keep = [c for c in configs if tma_config_fits(_cfg(c), staged, fp32_c, res_aligned)
            and (not rope or rope_config_fits(_cfg(c)))]
    if not (flag("HAS_RES") or flag("DACT")):  # nothing to prefetch: the PREFETCH configs would be duplicates
        keep = [c for c in keep if not c.kwargs.get("PREFETCH")]
    return keep or [c for c in configs if not c.kwargs.get("PREFETCH")][-1:]


def _tma_block_shapes(nargs: Dict[str, object]) -> None:
    """Autotune pre-hook: the descriptors' block shapes follow the config being run."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    epi = _epi_n(bn, bool(nargs["SAVE_Z"]) or nargs["DACT"] != 0 or bool(nargs["HAS_RES"]))
    nargs["a_desc"].block_shape = [bk, bm] if nargs["A_T"] else [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk] if nargs["B_T"] else [bk, bn]
    nargs["c_desc"].block_shape = [bm, epi]
    nargs["z_desc"].block_shape = [bm, epi]


try:  # host-side TMA descriptors: Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # pragma: no cover - older Triton or no Triton: the 'tma' path falls back to 'triton'
    TensorDescriptor = None

if HAS_TRITON:
    # one autotuner per (arch family, operand width); each keeps its own cache of best configs
    _GEMM_TUNED = {
        (arch, width): Launcher(triton.autotune(_triton_configs(cfgs), key=_AUTOTUNE_KEY,
                                                prune_configs_by={"early_config_prune": _gemm_prune})(_gemm_kernel))
        for (arch, width), cfgs in (((80, 16), SM80_CONFIGS_16), ((90, 16), SM90_CONFIGS_16), ((80, 32), FP32_CONFIGS),
                                    ((90, 32), FP32_CONFIGS))
    }
    _GEMM_TMA_TUNED = Launcher(triton.autotune(
        [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M, "FLATTEN": TMA_FLATTEN,
                        "PREFETCH": pf}, num_warps=w, num_stages=st, pre_hook=_tma_block_shapes)
         for pf in (False, True) for bm, bn, bk, w, st in TMA_CONFIGS_16 if not pf or _prefetch_ok((bm, bn, bk, w, st))],
        key=_AUTOTUNE_KEY + ["A_T", "B_T"], prune_configs_by={"early_config_prune": _tma_prune})(_gemm_tma_kernel))

_autotune = True
if HAS_TRITON:
    _ELEMENTWISE_KEY = ["M_KEY", "N", "ACT", "HAS_SCALE", "HAS_RES", "WRITE_DZ", "COLSUM"]
    _EPILOGUE = Launcher(_epilogue_kernel)
    _DACT_COLSUM = Launcher(_dact_colsum_kernel)
    _EPILOGUE_TUNED = Launcher(triton.autotune(
        [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w) for bm, bn, w in ELEMENTWISE_CONFIGS],
        key=[k for k in _ELEMENTWISE_KEY if k in _epilogue_kernel.arg_names])(_epilogue_kernel))
    _DACT_COLSUM_TUNED = Launcher(triton.autotune(
        [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "PIPE": pipe}, num_warps=w) for bm, bn, w, pipe in DACT_CONFIGS],
        key=[k for k in _ELEMENTWISE_KEY if k in _dact_colsum_kernel.arg_names])(_dact_colsum_kernel))


def set_autotune(enabled: bool) -> None:
    """Off: every GEMM uses the first config of its arch list (fast compile; tests, debugging)."""
    global _autotune
    _autotune = bool(enabled)


# ---------------------------------------------------------------------------------------------
# Path table: Triton GEMM with fused epilogue vs cuBLAS + one fused elementwise epilogue kernel.
# Keyed on (arch family, shape class). Measured by `bench/gpu_check.sh` on an H200 (torch 2.11, Triton
# 3.6; bench/results/2026-11-26-h200-run1/ops.csv): at the ViT-B/L MLP shapes our Triton GEMM ran at
# 0.41-0.50x torch.matmul, and the cuBLAS path's fused MLP was 0.98-1.04x eager vs 0.53-0.68x for the
# Triton GEMM path. So cuBLAS wins on sm_90. sm_80 was not measured; it follows sm_90 until it is.
# The Triton GEMM stays available (gemm="triton", use_gemm, FLASHVIT_GEMM) and is what the tests cover.

# Inside a torch.compile graph, 'auto' gives Inductor the reference (F.linear, GELU, add): it makes the
# same cuBLAS GEMM + one fused pointwise kernel, and can also fuse a residual add into the LayerNorm after
# it, which our opaque op prevents. Measured before this rule (H200, bench/results/2026-11-26-h200-run2/
# model.csv, every op a custom op): compile(flashvit) trained ViT-B/16 at 0.87x timm eager, compile(timm)
# at 1.18x. Forcing backend='triton' still compiles the custom op.
AUTO_COMPILED = False

# Eager 'auto' verdicts, with and without autograd. Measured on an H100 (bench/results/2026-11-26-h100-run3,
# bf16, M = 50432): the fused MLP forward ran at 0.97-1.09x eager (ops.csv) and ViT-B/16 inference at 1.07x
# timm with it (model.csv); forward+backward at 0.85-0.89x, its dZ/bias-grad pass at about half the memory
# bandwidth of eager's GELU backward (2026-11-26-h100-diag/kernels.txt), and ViT-B training at 0.81x.
# So training takes eager PyTorch's linears under 'auto' until that pass is faster.
AUTO_INFERENCE = True
AUTO_TRAINING = False

# Eager 'auto' without autograd (inference), big GEMMs: the GEMM path per arch family, over GEMM_TABLE.
# Measured on an H100 (bf16, ViT-B/16 inference at batch 256, model.csv): the TMA path for the GEMMs with a
# GELU or residual epilogue ran 3-10% faster per step than cuBLAS + our epilogue pass in three runs
# (2026-11-26-h100-run4: [mlp=tma] 21.46-22.00 ms against 23.58-23.91; -run5: 21.48 against 22.14-22.45;
# -run6: [mlp=hybrid] 21.12-21.15, [mlp=tma] 21.30, against 21.93-22.25); ViT-S/16 inference within noise
# (-run6: 8.93 against 8.86 ms). sm_80 has no TMA: not listed. The first call per M bucket autotunes.
# Only from AUTO_INFERENCE_MIN_FLOP (2·M·N·K; ViT-B's fc1 and fc2 at batch 256: 2.4e11, ViT-S's: 5.9e10): a
# TMA launch costs more host time than cuBLAS's (it encodes its tensor descriptors per call), which a small
# batch, whose GEMMs take a few microseconds, would pay in full; smaller shapes were not measured.
AUTO_INFERENCE_GEMM: Dict[int, str] = {90: "hybrid"}
AUTO_INFERENCE_MIN_FLOP = 2 ** 36
_AUTO_INFERENCE = "auto-inference"  # the gemm name linear() / mlp() pass down for an 'auto' call without autograd

GEMM_TABLE: Dict[Tuple[int, str], str] = {
    (80, "skinny"): "cublas",  # M < 64: not measured (follows sm_90)
    (80, "small"): "cublas",   # 2·M·N·K < 2^32 FLOP: not measured (follows sm_90)
    (80, "large"): "cublas",   # not measured (follows sm_90)
    (90, "skinny"): "cublas",  # not measured; large-shape result applied
    (90, "small"): "cublas",   # not measured; large-shape result applied
    (90, "large"): "cublas",   # measured, H200: Triton GEMM 0.41-0.50x cuBLAS at M=50432, (768|1024)->(3072|4096)
}


class _Setting:
    """A named choice read per call: the call's argument, else the innermost ``use`` block (a context variable:
    per thread and task), else an environment variable (read at call time), else the default."""

    def __init__(self, what: str, choices: Tuple[str, ...], env: str, default: str) -> None:
        self.what, self.choices, self.env, self.default = what, choices, env, default
        self.var: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(env.lower(), default=None)

    def check(self, name: str) -> str:
        if name not in self.choices:
            raise ValueError(f"unknown {self.what} {name!r}; expected one of {self.choices}")
        return name

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        token = self.var.set(self.check(name))
        try:
            yield
        finally:
            self.var.reset(token)

    def resolve(self, arg: Optional[str]) -> str:
        return self.check(arg or self.var.get() or os.environ.get(self.env, self.default).strip().lower()
                          or self.default)


_GEMM = _Setting("GEMM path", GEMM_PATHS, "FLASHVIT_GEMM", "auto")
_check_gemm_name = _GEMM.check
GemmConfig = Tuple[int, int, int, int, int]  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
# A RoPE epilogue: (table (T - P, 2·D) = cat(sin, cos) rows, unit last stride; tokens T a sequence (rows of
# the GEMM are (batch, token)); prefix P (tokens left as they are); columns rotated (2·H·D: q and k); head dim D;
# the kernels' ROPE code: 1 = interleaved pairs, D = rotate_half pairs (D a power of two, see _dev_rope)).
RopeEpilogue = Tuple[torch.Tensor, int, int, int, int, int]
# ((kernel, config, flatten, prefetch), ...) forced by use_gemm_config, innermost last
_config_override: contextvars.ContextVar[Tuple[Tuple[str, GemmConfig, bool, bool], ...]] = contextvars.ContextVar(
    "flashvit_gemm_config", default=())


def _forced_config(kernel: str) -> Optional[Tuple[GemmConfig, bool, bool]]:
    """(config, flatten, prefetch) use_gemm_config forces on ``kernel`` here, else None (innermost block wins)."""
    for k, cfg, flatten, prefetch in reversed(_config_override.get()):
        if k == kernel:
            return cfg, flatten, prefetch
    return None


def use_gemm(name: str) -> ContextManager[None]:
    """Force the GEMM path ('triton' | 'tma' | 'cublas' | 'hybrid' | 'auto') for Triton-backend linears in a
    ``with`` block."""
    return _GEMM.use(name)


@contextlib.contextmanager
def use_gemm_config(kernel: str, cfg: GemmConfig, flatten: bool = TMA_FLATTEN, prefetch: bool = False
                    ) -> Iterator[None]:
    """Launch every ``kernel`` ('triton' | 'tma') GEMM in a ``with`` block with the one tile config ``cfg`` =
    (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) instead of autotuning; ``flatten`` and ``prefetch`` set the
    TMA kernel's FLATTEN and PREFETCH. For per-config benchmarks (``bench ops --ops gemm-configs``) and debugging.
    It does not choose the path (``use_gemm`` does); on the interpreter it replaces the fixed interpreter config."""
    if kernel not in ("triton", "tma"):
        raise ValueError(f"unknown GEMM kernel {kernel!r}; expected 'triton' or 'tma'")
    if len(cfg) != 5 or not all(isinstance(v, int) and v > 0 for v in cfg):
        raise ValueError(f"a GEMM config is 5 positive ints (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), got {cfg!r}")
    bm, bn, bk, w, _ = cfg
    if any(v & (v - 1) for v in (bm, bn, bk, w)) or bm % _PART_BM or min(bn, bk) < 16:
        raise ValueError(f"GEMM config {cfg!r}: BLOCK_M, BLOCK_N, BLOCK_K and warps must be powers of two, BLOCK_M a "
                         f"multiple of {_PART_BM}, BLOCK_N and BLOCK_K at least 16")
    token = _config_override.set(_config_override.get() + ((kernel, tuple(cfg), bool(flatten), bool(prefetch)),))
    try:
        yield
    finally:
        _config_override.reset(token)


# What the MLP's autograd keeps for its backward (``mlp(recompute=...)``, ``FusedMLP.recompute``,
# ``use_mlp_recompute``, ``FLASHVIT_MLP_RECOMPUTE``), per token of hidden width H: "none" saves fc1's
# pre-activation z and its output h = act(z) (2·H values, what eager PyTorch saves too); "act" saves z alone and
# the backward recomputes h in one elementwise pass (H values: the MLP's share of a ViT block's saved
# activations halves); "fc1" saves neither and the backward reruns fc1's fused GEMM (bias + act + z), one
# forward GEMM more for no H-wide activation at all (flash-attn's FusedMLP checkpoint_lvl 1 and 2).
MLP_RECOMPUTE = ("none", "act", "fc1")
_RECOMPUTE = _Setting("MLP recompute mode", MLP_RECOMPUTE, "FLASHVIT_MLP_RECOMPUTE", "none")
_check_recompute = _RECOMPUTE.check
# The recompute mode asked for: the argument, else use_mlp_recompute's, else FLASHVIT_MLP_RECOMPUTE, else 'none'.
_recompute_name = _RECOMPUTE.resolve


def mlp_recompute_mode(mode: Optional[str] = None) -> str:
    """The recompute mode in effect: ``mode`` when given, else ``use_mlp_recompute``'s, else
    FLASHVIT_MLP_RECOMPUTE's, else 'none'."""
    return _recompute_name(mode)


def use_mlp_recompute(mode: str) -> ContextManager[None]:
    """What fused MLPs (``mlp``, ``FusedMLP``, flashvit's ViT, patched models) save for the backward inside a
    ``with`` block: 'none' | 'act' | 'fc1' (see ``MLP_RECOMPUTE``). An explicit ``recompute`` argument wins."""
    return _RECOMPUTE.use(mode)


# Split-K for the GEMMs without epilogue whose output is a few tiles over a long K: the weight gradients
# dW = dZᵀ·X (K = tokens). ViT-B's fc1 dW is 3072 x 768 = 144 tiles of 128 x 128 over K = 50432: on 132 SMs
# that is two waves, the second 12 tiles, 55% busy; 4 splits make 576 work items in five waves, 87% busy, for
# 4 x 3072 x 768 fp32 partials (~38 MB written and read). A model, not a measurement: the `gemm` op rows
# with and without it ([nosplit]) measure it on a GPU.
SPLIT_K_MAX = 8
SPLIT_K_MIN_K = 2048  # K per split at least this: each split still streams a long, pipelined loop
_split_override: List[int] = []  # use_split_k: innermost last; 0 = the heuristic


def split_k(M: int, N: int, K: int, sms: int) -> int:
    """Splits of K for an (M, N, K) GEMM without epilogue on ``sms`` SMs (see SPLIT_K_MAX): 1 when the
    128 x 128 output tiles already fill two waves or K is short, else the fewest splits whose work items fill
    the last wave to at least 85%, or failing that the best filling one."""
    if _split_override and _split_override[-1]:
        return _split_override[-1]
    tiles = cdiv(M, 128) * cdiv(N, 128)
    if tiles >= 2 * sms or K < 2 * SPLIT_K_MIN_K:
        return 1
    best, best_fill = 1, tiles / (cdiv(tiles, sms) * sms)
    for n in range(2, SPLIT_K_MAX + 1):
        if K // n < SPLIT_K_MIN_K:
            break
        fill = tiles * n / (cdiv(tiles * n, sms) * sms)
        if fill >= 0.85:
            return n
        if fill > best_fill + 0.05:
            best, best_fill = n, fill
    return best


def use_split_k(splits: int) -> ContextManager[None]:
    """Force the weight-gradient GEMMs' split-K on our GEMM paths in a ``with`` block: 1 = off, n > 1 = n
    splits (fewer when K is short), 0 = the heuristic (``split_k``)."""
    if not isinstance(splits, int) or splits < 0:
        raise ValueError(f"splits must be an int >= 0, got {splits!r}")
    return pushed(_split_override, splits)


def _arch(device: torch.device) -> int:
    if device.type != "cuda":
        return 80  # interpreter: any list works
    return 90 if cuda_major(device) >= 9 else 80


def shape_class(M: int, N: int, K: int) -> str:
    """The GEMM_TABLE row a (M, N, K) problem falls in."""
    if M < 64:
        return "skinny"
    if 2 * M * N * K < 2 ** 32:
        return "small"
    return "large"


def _gemm_name(gemm: str) -> str:
    """The GEMM path asked for: the argument, else the use_gemm context, else FLASHVIT_GEMM, else 'auto'."""
    if gemm == _AUTO_INFERENCE:
        return gemm
    return _GEMM.resolve(gemm)


def _call_gemm(gemm: Optional[str], training: bool) -> str:
    """The gemm argument linear() / mlp() hand their ops: an 'auto' call without autograd becomes
    _AUTO_INFERENCE (AUTO_INFERENCE_GEMM applies); anything else as given ('' = resolve later)."""
    if not training and _gemm_name(gemm or "") == "auto":
        return _AUTO_INFERENCE
    return gemm or ""


def _choose_path(gemm: str, device: torch.device, M: int, N: int, K: int, epilogue: bool = False,
                 operands: Sequence[Optional[torch.Tensor]] = ()) -> str:
    """Resolve 'auto' / '' (argument, then use_gemm context, then FLASHVIT_GEMM env) through GEMM_TABLE, and
    for an inference call (_AUTO_INFERENCE) of at least AUTO_INFERENCE_MIN_FLOP through AUTO_INFERENCE_GEMM
    first; 'hybrid' to 'tma' for a GEMM with an ``epilogue`` (beyond the bias) whose ``operands`` TMA can
    stream on sm_90 (or the interpreter), else 'cublas'."""
    name = _gemm_name(gemm)
    if name in ("auto", _AUTO_INFERENCE):
        if device.type != "cuda":  # the interpreter (tests): exercise our GEMM kernel
            return "triton"
        arch, cls = _arch(device), shape_class(M, N, K)
        name = GEMM_TABLE.get((arch, cls), "triton")
        if gemm == _AUTO_INFERENCE and cls == "large" and 2 * M * N * K >= AUTO_INFERENCE_MIN_FLOP:
            name = AUTO_INFERENCE_GEMM.get(arch, name)
    if name == "hybrid":
        tma_here = device.type != "cuda" or (not INTERPRET and _arch(device) >= 90)
        return "tma" if epilogue and tma_here and _tma_ok(*operands) else "cublas"
    return name


def _resolve_tf32(allow_tf32: Optional[bool]) -> bool:
    # default: torch's own flag (False unless the user enabled TF32) -> IEEE fp32 dots
    return bool(torch.backends.cuda.matmul.allow_tf32) if allow_tf32 is None else bool(allow_tf32)


# ---------------------------------------------------------------------------------------------
# Launchers


def _empty(shape: Tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # every kernel output is allocated here (tests replace it with a NaN-filled allocator)
    return torch.empty(shape, device=device, dtype=dtype)


def _sms(device: torch.device) -> int:
    """SMs our persistent kernels and split-K plan for (the interpreter: a few, so its loops run)."""
    if INTERPRET or device.type != "cuda":
        return TMA_INTERPRET_SMS
    return sm_count(device)


def _tma_ok(*ts: Optional[torch.Tensor]) -> bool:
    """TMA's rules for each 2-D operand: fp16/bf16, unit last stride, 16-byte aligned base and row stride."""
    return TensorDescriptor is not None and all(
        t is None or (t.dtype in (torch.float16, torch.bfloat16) and t.dim() == 2 and t.stride(1) == 1
                      and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0) for t in ts)


def _desc(t: torch.Tensor) -> TensorDescriptor:
    # block_shape is set per config (_tma_block_shapes) before each launch
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [16, 16])


def _rope_args(rope: Optional[RopeEpilogue], out: torch.Tensor) -> Tuple[tuple, tuple]:
    """The GEMM kernels' RoPE arguments: ((table pointer,), (R_TOK, R_P, R_COLS, R_D, stride_rt)); placeholders
    (ROPE off) without one."""
    if rope is None:
        return (out,), (1, 0, 0, 1, 0)
    table, tokens, prefix, cols, head_dim, _ = rope
    return (table,), (tokens, prefix, cols, head_dim, table.stride(0))


def _launch_gemm_tma(a: torch.Tensor, a_t: bool, b: torch.Tensor, b_t: bool, M: int, N: int, K: int,
                     out: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor], act: int,
                     z: Optional[torch.Tensor], dact: int, part: Optional[torch.Tensor], splits: int, k_split: int,
                     m_pad: int, rope: Optional[RopeEpilogue] = None, scale: Optional[torch.Tensor] = None) -> None:
    # out: the (M, N) output, or with splits > 1 the (splits·m_pad, N) fp32 partials
    c_desc = _desc(out)
    rope_ptr, rope_ints = _rope_args(rope, out)
    args = (_desc(a), _desc(b), c_desc, _desc(z) if z is not None else c_desc,
            bias if bias is not None else out, scale if scale is not None else out,
            residual if residual is not None else out,
            part if part is not None else out, z if z is not None else out, *rope_ptr, M, N, K, _m_key(M),
            part.shape[0] if part is not None else 0, splits, k_split, m_pad,
            residual.stride(0) if residual is not None else 0, residual.stride(1) if residual is not None else 0,
            *rope_ints)
    flags = dict(A_T=a_t, B_T=b_t, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, ACT=act,
                 HAS_RES=_res_mode(residual), SAVE_Z=z is not None and not dact, DACT=dact,
                 ROPE=rope[5] if rope is not None else 0)
    interp = INTERPRET or not a.is_cuda
    sms = _sms(a.device)
    # a z or residual tile; an fp32 C tile (split-K); the residual's alignment
    staged = (z is not None or residual is not None, splits > 1, flags["HAS_RES"] != 2)
    forced = _forced_config("tma")
    if forced is not None or interp or not _autotune:  # one fixed config: forced, the interpreter's, or the first
        cfg, flatten, prefetch = forced or ((TMA_INTERPRET_CONFIG if interp else next(
            c for c in TMA_CONFIGS_16 if tma_config_fits(c, *staged) and (rope is None or rope_config_fits(c)))),
            TMA_FLATTEN, False)
        if not interp and not tma_config_fits(cfg, *staged):
            raise ValueError(f"TMA GEMM config {cfg} needs more shared memory than sm_90 has"
                             f"{' with a z, residual or fp32 C tile staged' if any(staged[:2]) else ''}")
        bm, bn, bk, w, st = cfg
        _tma_block_shapes(dict(flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, a_desc=args[0], b_desc=args[1],
                               c_desc=args[2], z_desc=args[3]))
        launch(_gemm_tma_kernel, (min(sms, cdiv(M, bm) * cdiv(N, bn) * splits),),
               *args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, NUM_SMS=sms, FLATTEN=flatten,
               PREFETCH=prefetch and (residual is not None or dact != 0), num_warps=w, num_stages=st)
        return

    def grid(meta):
        return (min(sms, cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]) * splits),)
    _GEMM_TMA_TUNED(grid, args, dict(flags, NUM_SMS=sms))  # (a Launcher: the descriptors' pre_hook runs per call)


def _unit_stride(v: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A (N,) vector the epilogues read at unit stride (bias, γ): a strided view (a slice of a packed one) copied."""
    return v if v is None or v.stride(0) == 1 else v.contiguous()


def _launch_gemm(a: torch.Tensor, a_t: bool, b: torch.Tensor, b_t: bool, M: int, N: int, K: int,
                 out: torch.Tensor, *, bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                 act: int = 0, z: Optional[torch.Tensor] = None, dact: int = 0, part: Optional[torch.Tensor] = None,
                 tf32: bool = False, tma: bool = False, splits: int = 1, rope: Optional[RopeEpilogue] = None,
                 scale: Optional[torch.Tensor] = None) -> None:
    """out (M, N) contiguous = act(A·B + bias)·scale + residual, z (M, N) = the pre-activation when given;
    ``scale`` (N,): LayerScale's γ, any float dtype, applied to the fp32 result.
    ``rope`` (bias only besides it; see ``RopeEpilogue``): RoPE of q and k in a packed qkv output, in the epilogue.

    A (M, K) is the 2-D tensor ``a``, or ``a``ᵀ when ``a_t`` (a stored (K, M)); B (K, N) is ``b``, or ``b``ᵀ
    when ``b_t`` (b stored (N, K)). ``tma``: the TMA kernel when every operand obeys its rules.
    ``dact`` (an activation code, with no bias/act/residual): out = (A·B) ⊙ act'(z), z (M, N) read, and
    when ``part`` (cdiv(M, PART_BM), N) fp32 is given, out's column sums per row block into it.
    ``splits`` > 1 (no epilogue): split-K, each split's fp32 partial product into a buffer, then their sum
    (torch's fixed-order reduction: deterministic) into ``out``; see ``split_k``.
    """
    if M == 0 or N == 0:
        return
    bias, scale = _unit_stride(bias), _unit_stride(scale)
    k_split, m_pad, c = K, M, out
    if splits > 1 and K == 0:  # nothing to split (out gets the epilogue of an empty sum)
        splits = 1
    if splits > 1:
        if bias is not None or scale is not None or residual is not None or act or z is not None or dact:
            raise ValueError("a split-K GEMM takes no epilogue (bias, scale, activation, residual, z)")
        k_split = cdiv(cdiv(K, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN  # a multiple of every BLOCK_K
        splits = cdiv(K, k_split)  # every split has work
    if splits > 1:
        m_pad = cdiv(M, _SPLIT_ALIGN) * _SPLIT_ALIGN  # whole row tiles of any BLOCK_M: no split writes another's rows
        acc = _empty((splits, m_pad, N), out.device, torch.float32)
        c = acc.view(splits * m_pad, N)
    if tma and K > 0 and (not a.is_cuda or _arch(a.device) >= 90) and _tma_ok(a, b, out, z) and \
            (c.stride(0) * c.element_size()) % 16 == 0:  # bias, residual: plain loads
        _launch_gemm_tma(a, a_t, b, b_t, M, N, K, c, bias, residual, act, z, dact, part, splits, k_split, m_pad,
                         rope, scale)
    else:
        _launch_gemm_tiled(a, a_t, b, b_t, M, N, K, c, bias, residual, act, z, dact, part, tf32, splits, k_split,
                           m_pad * N, rope, scale)
    if splits > 1:
        out.copy_(acc[:, :M].sum(0))


def _launch_gemm_tiled(a: torch.Tensor, a_t: bool, b: torch.Tensor, b_t: bool, M: int, N: int, K: int,
                       out: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor], act: int,
                       z: Optional[torch.Tensor], dact: int, part: Optional[torch.Tensor], tf32: bool, splits: int,
                       k_split: int, stride_cs: int, rope: Optional[RopeEpilogue] = None,
                       scale: Optional[torch.Tensor] = None) -> None:
    a_strides = (a.stride(1), a.stride(0)) if a_t else (a.stride(0), a.stride(1))
    b_strides = (b.stride(1), b.stride(0)) if b_t else (b.stride(0), b.stride(1))
    res_strides = (residual.stride(0), residual.stride(1)) if residual is not None else (0, 0)
    rope_ptr, rope_ints = _rope_args(rope, out)
    args = (a, b, bias if bias is not None else out, scale if scale is not None else out,
            residual if residual is not None else out, out,
            z if z is not None else out, part if part is not None else out, *rope_ptr, M, N, K,
            _m_key(M), part.shape[0] if part is not None else 0, k_split, stride_cs if splits > 1 else 0,
            a_strides[0], a_strides[1], b_strides[0], b_strides[1], res_strides[0], res_strides[1],
            out.stride(0), out.stride(1), *rope_ints)
    # ALLOW_TF32 selects tl.dot's default precision, which is what 16-bit operands always use
    flags = dict(HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, ACT=act, HAS_RES=residual is not None,
                 SAVE_Z=z is not None and not dact,
                 DACT=dact, ALLOW_TF32=tf32 or a.dtype != torch.float32, ROPE=rope[5] if rope is not None else 0)
    forced = _forced_config("triton")
    interp = INTERPRET or not a.is_cuda
    if forced is None and not interp and _autotune:
        def grid(meta):
            return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), splits)
        _GEMM_TUNED[(_arch(a.device), 32 if a.dtype == torch.float32 else 16)](grid, args, flags)
        return
    if forced is not None:
        cfg = forced[0]
    elif interp:
        cfg = INTERPRET_CONFIG
    else:  # autotuning off: the first config of the arch's list (that the RoPE epilogue fits, with one)
        cfgs = (FP32_CONFIGS if a.dtype == torch.float32 else
                SM90_CONFIGS_16 if _arch(a.device) == 90 else SM80_CONFIGS_16)
        cfg = next((c for c in cfgs if rope is None or rope_config_fits(c)), cfgs[-1])
    bm, bn, bk, w, s = cfg
    launch(_gemm_kernel, (cdiv(M, bm) * cdiv(N, bn), splits), *args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
           GROUP_M=4 if interp else GROUP_M, num_warps=w, num_stages=s)


def _launch_epilogue(c: torch.Tensor, residual: Optional[torch.Tensor], act: int, y: torch.Tensor,
                     scale: Optional[torch.Tensor] = None) -> None:
    """y (M, N) = act(c)·scale + residual, one pass (scale (N,) or None)."""
    M, N = c.shape
    if M == 0 or N == 0:
        return
    scale = _unit_stride(scale)
    res = residual if residual is not None else y
    _launch_elementwise(_EPILOGUE, _EPILOGUE_TUNED, lambda bm, bn: (cdiv(M, bm), cdiv(N, bn)),
                        (c, scale if scale is not None else y, res, y, M, N, _m_key(M), c.stride(0),
                         res.stride(0), res.stride(1), y.stride(0)),
                        dict(ACT=act, HAS_SCALE=scale is not None, HAS_RES=residual is not None))


def _m_key(m: int) -> int:
    """The autotuning key's M (M_KEY): M rounded up to a power of two, at least 16 (one tuning a bucket)."""
    return max(16, next_pow2(m))


def _launch_elementwise(plain: Launcher, tuned: Launcher, grid, args: tuple, consts: Dict[str, object],
                        plain_consts: Optional[Dict[str, object]] = None) -> None:
    """An elementwise kernel at the autotuner's tile (ELEMENTWISE_CONFIGS), or at the first config without
    autotuning (set_autotune(False), the interpreter), with ``plain_consts`` (what the autotuner's configs set
    besides the tile). ``grid(BLOCK_M, BLOCK_N)``: the launch grid of a tile."""
    if _autotune and not INTERPRET:
        tuned(lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"]), args, consts)
        return
    bm, bn, w = ELEMENTWISE_CONFIGS[0]
    plain(grid(bm, bn), args, dict(consts, **(plain_consts or {}), BLOCK_M=bm, BLOCK_N=bn, num_warps=w))


def linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
               activation: Optional[str], save_z: bool, gemm: str = "", allow_tf32: Optional[bool] = None,
               scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """x (M, K), weight (N, K), bias (N,), residual (M, N), scale (N,) -> y (M, N) = act(x·Wᵀ + b)·scale +
    residual, z (M, N) pre-activation or empty."""
    M, K = x.shape
    N = weight.shape[0]
    act = _ACT_CODE[activation]
    save_z = save_z and (act != 0 or scale is not None)  # (with γ: x·Wᵀ + b, for dγ in fp16)
    # (hybrid: y and z, (M, N) contiguous, are TMA-stored too: their rows must be 16-byte multiples)
    path = _choose_path(gemm, x.device, M, N, K, epilogue=(act != 0 or residual is not None or scale is not None)
                        and N * x.element_size() % 16 == 0, operands=(x, weight))
    if path == "cublas":
        # z = x·Wᵀ + b with the bias in cuBLAS's own epilogue; then one pass for the activation and residual
        # (as many bytes as eager's addmm + GELU, with the residual add folded in).
        c = torch.matmul(x, weight.t()) if bias is None else torch.addmm(bias.to(x.dtype), x, weight.t())
        if act == 0 and residual is None and scale is None:
            return c, x.new_empty(0)
        y = _empty((M, N), x.device, x.dtype)
        _launch_epilogue(c, residual, act, y, scale)
        return y, (c if save_z else x.new_empty(0))
    y = _empty((M, N), x.device, x.dtype)
    z = _empty((M, N), x.device, x.dtype) if save_z else None
    _launch_gemm(x, False, weight, True, M, N, K, y, bias=bias, residual=residual, act=act, z=z,
                 tf32=_resolve_tf32(allow_tf32), tma=path == "tma", scale=scale)
    return y, (z if z is not None else x.new_empty(0))


def _rope_epilogue_mode(rope: torch.Tensor, head_dim: int, half: bool) -> int:
    """The GEMM epilogue's ROPE code for this table and layout (1 interleaved, D rotate_half), 0 where the epilogue
    cannot take it: a table that varies over batch or heads (patch dropout, per-head frequencies), or rotate_half
    pairs with D not a power of two or wider than ROPE_HALF_MAX_D."""
    if any(n != 1 for n in rope.shape[:-2]):
        return 0
    if not half:
        return 1
    return head_dim if head_dim & (head_dim - 1) == 0 and 2 <= head_dim <= ROPE_HALF_MAX_D else 0


def qkv_rope_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], rope: torch.Tensor,
                        tokens: int, num_heads: int, prefix: int, half: bool, gemm: str = "",
                        allow_tf32: Optional[bool] = None) -> torch.Tensor:
    """x (M, K) (M = batch x ``tokens`` rows), weight (3·H·D, K) -> qkv (M, 3·H·D) = x·Wᵀ + b, q and k rotated.

    Our GEMM paths rotate in the epilogue (no pass over q and k after it) where ``_rope_epilogue_mode`` allows;
    otherwise (cuBLAS, other tables) the GEMM, then one in-place RoPE pass over q and k."""
    M, K = x.shape
    N = weight.shape[0]
    D = N // (3 * num_heads)
    mode = _rope_epilogue_mode(rope, D, half)
    path = _choose_path(gemm, x.device, M, N, K, epilogue=mode != 0 and N * x.element_size() % 16 == 0,
                        operands=(x, weight))
    if path != "cublas" and mode != 0:
        y = _empty((M, N), x.device, x.dtype)
        table = rope.reshape(rope.shape[-2:])
        table = table if table.stride(-1) == 1 else table.contiguous()
        _launch_gemm(x, False, weight, True, M, N, K, y, bias=bias, tf32=_resolve_tf32(allow_tf32),
                     tma=path == "tma", rope=(table, tokens, prefix, 2 * num_heads * D, D, mode))
        return y
    y, _ = linear_fwd(x, weight, bias, None, None, False, gemm, allow_tf32)
    qk = y.view(M // tokens, tokens, 3, num_heads, D)[:, :, :2]
    _rope.rope_apply(qk, qk, _rope.rope_table(rope, M // tokens, num_heads, tokens - prefix, D), prefix, half,
                     backward=False)
    return y


def _dact_colsum(dy: torch.Tensor, z: Optional[torch.Tensor], act: int, write_dz: bool, colsum: bool
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """dZ = dY·act'(z) (or dY itself when act == 0) and fp32 column sums of dZ (deterministic)."""
    M, N = dy.shape
    dz = _empty((M, N), dy.device, dy.dtype) if write_dz else dy
    if not colsum and not write_dz:
        return dz, None
    rows, progs = dact_partition(M, N)
    part = _empty((progs, N), dy.device, torch.float32)
    if M > 0 and N > 0:
        zz = z if z is not None else dy
        _launch_elementwise(_DACT_COLSUM, _DACT_COLSUM_TUNED, lambda bm, bn: (progs, cdiv(N, bn)),
                            (dy, zz, dz, part, M, N, rows, _m_key(M), dy.stride(0), dy.stride(1), zz.stride(0),
                             dz.stride(0)),
                            dict(ACT=act, WRITE_DZ=write_dz, COLSUM=colsum), dict(PIPE=DACT_PIPE_PLAIN))
    else:
        part.zero_()
    return dz, (colsum_partials(part) if colsum else None)


def dact_partition(M: int, N: int) -> Tuple[int, int]:
    """(rows a program, programs) of the dZ / bias-grad pass over an (M, N) gradient: a fixed partition of the
    rows (the column sums' order does not depend on the autotuner's tile), about _DACT_PROGRAMS programs in all
    at 256-column blocks."""
    want = max(1, _DACT_PROGRAMS // cdiv(N, 256))
    rows = max(_DACT_ROWS, cdiv(cdiv(M, want), _DACT_ROWS) * _DACT_ROWS)
    return rows, max(1, cdiv(M, rows))


def linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, z: Optional[torch.Tensor],
               activation: Optional[str], has_bias: bool, need_dx: bool, need_dw: bool, gemm: str = "",
               allow_tf32: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy (M, N), x (M, K), weight (N, K), z (M, N) -> dx (M, K), dW (N, K), db (N,) (empty when not needed)."""
    M, K = x.shape
    N = weight.shape[0]
    act = _ACT_CODE[activation]
    if act != 0 and (z is None or z.shape != dy.shape):
        raise RuntimeError("linear backward with an activation needs the saved pre-activation z")
    dz, db = _dact_colsum(dy, z, act, write_dz=act != 0, colsum=has_bias)
    dev = x.device
    gemm = _gemm_name(gemm)  # resolved once for both GEMMs (the env var is read once)
    dx = dw = None
    if need_dx:
        path = _choose_path(gemm, dev, M, K, N)
        if path == "cublas":
            dx = torch.matmul(dz, weight)
        else:  # dX (M, K) = dZ (M, N) · W (N, K)
            dx = _empty((M, K), dev, x.dtype)
            _launch_gemm(dz, False, weight, False, M, K, N, dx, tf32=_resolve_tf32(allow_tf32), tma=path == "tma")
    if need_dw:
        path = _choose_path(gemm, dev, N, K, M)
        if path == "cublas":
            dw = torch.matmul(dz.t(), x)
            if dw.dtype != weight.dtype:
                dw = dw.to(weight.dtype)
        else:  # dW (N, K) = dZᵀ (N, M) · X (M, K), split over M (the tokens) when its few tiles leave SMs idle
            dw = _empty((N, K), dev, weight.dtype)  # (M = 0: the GEMM's empty sum writes its zeros)
            _launch_gemm(dz, True, x, False, N, K, M, dw, tf32=_resolve_tf32(allow_tf32), tma=path == "tma",
                         splits=split_k(N, K, M, _sms(dev)))
    if dx is None or dw is None or db is None:
        none = x.new_empty(0)  # (a custom op returns tensors: an empty one stands for "not computed")
        dx, dw = (none if dx is None else dx), (none if dw is None else dw)
    return dx, dw, (db.to(weight.dtype) if db is not None else none)


def linear_dact_bwd(dy: torch.Tensor, weight: torch.Tensor, z: torch.Tensor, activation: str, colsum: bool,
                    gemm: str = "", allow_tf32: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """dZ (M, H) = (dY (M, N) · W (N, H)) ⊙ act'(z (M, H)) and fp32 column sums of dZ ((H,), empty unless
    ``colsum``): in an MLP, fc2's dX and fc1's activation backward (and fc1's bias grad) at once.

    Our GEMM paths apply act'(z) in the dX GEMM's epilogue, with per-row-block column sums (deterministic),
    so dH never goes through memory; the cuBLAS path runs torch.matmul, then the one dZ + sums pass.
    """
    M, N = dy.shape
    H = weight.shape[1]
    act = _ACT_CODE[activation]
    if act != 0 and (z is None or z.shape != (M, H)):
        raise RuntimeError("linear_dact_bwd needs the saved pre-activation z of shape (M, H)")
    z = z if z is None or z.is_contiguous() else z.contiguous()  # the epilogue reads z with the output's strides
    path = _choose_path(gemm, dy.device, M, H, N, epilogue=act != 0 and H * dy.element_size() % 16 == 0,
                        operands=(dy, weight, z))
    if path == "cublas" or act == 0:
        dz, db = _dact_colsum(torch.matmul(dy, weight), z, act, write_dz=act != 0, colsum=colsum)
        return dz, (db if db is not None else dy.new_empty(0, dtype=torch.float32))
    dz = _empty((M, H), dy.device, dy.dtype)
    part = _empty((cdiv(M, _PART_BM), H), dy.device, torch.float32) if colsum else None
    _launch_gemm(dy, False, weight, False, M, H, N, dz, z=z, dact=act, part=part, tf32=_resolve_tf32(allow_tf32),
                 tma=path == "tma")
    if part is None:
        return dz, dy.new_empty(0, dtype=torch.float32)
    return dz, colsum_partials(part)  # M = 0: part has no rows, the sums are zeros


# ---------------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile, no graph break) + autograd


@custom_op("linear_fwd")
def _linear_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   residual: Optional[torch.Tensor], activation: str, save_z: bool, gemm: str,
                   allow_tf32: Optional[bool], scale: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    y, z = linear_fwd(x, weight, bias, residual, activation or None, save_z, gemm, allow_tf32, scale)
    return y, z


@_linear_fwd_op.register_fake
def _(x, weight, bias, residual, activation, save_z, gemm, allow_tf32, scale=None):
    M, N = x.shape[0], weight.shape[0]
    y = x.new_empty((M, N))
    z = x.new_empty((M, N)) if (save_z and activation) else x.new_empty(0)
    return y, z


@custom_op("activation_fwd")
def _activation_op(z: torch.Tensor, activation: str) -> torch.Tensor:
    """h = act(z) for a contiguous (M, H) z in one pass: the MLP backward recomputing fc1's output."""
    h = _empty(tuple(z.shape), z.device, z.dtype)
    _launch_epilogue(z, None, _ACT_CODE[activation], h)
    return h


@_activation_op.register_fake
def _(z, activation):
    return torch.empty_like(z)


@custom_op("qkv_rope_linear")
def _qkv_rope_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], rope: torch.Tensor,
                        tokens: int, num_heads: int, prefix: int, half: bool, gemm: str,
                        allow_tf32: Optional[bool]) -> torch.Tensor:
    return qkv_rope_linear_fwd(x, weight, bias, rope, tokens, num_heads, prefix, half, gemm, allow_tf32)


@_qkv_rope_linear_op.register_fake
def _(x, weight, bias, rope, tokens, num_heads, prefix, half, gemm, allow_tf32):
    return x.new_empty((x.shape[0], weight.shape[0]))


@custom_op("linear_bwd")
def _linear_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, z: Optional[torch.Tensor],
                   activation: str, has_bias: bool, need_dx: bool, need_dw: bool, gemm: str,
                   allow_tf32: Optional[bool]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = linear_bwd(dy, x, weight, z, activation or None, has_bias, need_dx, need_dw, gemm, allow_tf32)
    return dx, dw, db


@_linear_bwd_op.register_fake
def _(dy, x, weight, z, activation, has_bias, need_dx, need_dw, gemm, allow_tf32):
    M, K = x.shape
    N = weight.shape[0]
    dx = x.new_empty((M, K)) if need_dx else x.new_empty(0)
    dw = weight.new_empty((N, K)) if need_dw else x.new_empty(0)
    db = weight.new_empty((N,)) if has_bias else x.new_empty(0)
    return dx, dw, db


@custom_op("linear_dact_bwd")
def _linear_dact_op(dy: torch.Tensor, weight: torch.Tensor, z: torch.Tensor, activation: str, colsum: bool,
                    gemm: str, allow_tf32: Optional[bool]) -> Tuple[torch.Tensor, torch.Tensor]:
    dz, db = linear_dact_bwd(dy, weight, z, activation or None, colsum, gemm, allow_tf32)
    return dz, db


@_linear_dact_op.register_fake
def _(dy, weight, z, activation, colsum, gemm, allow_tf32):
    H = weight.shape[1]
    return dy.new_empty((dy.shape[0], H)), dy.new_empty((H,) if colsum else (0,), dtype=torch.float32)


# LayerScale (y = (x·Wᵀ + b)·γ + residual): γ (N,) is applied in the forward GEMM's epilogue, to the fp32
# result. Folding it into the weights instead (one GEMM with γ·W) loses fp16 outright: its normal range ends
# at 6.1e-5, and γ·W for LayerScale's small γ (init 1e-5 .. 1e-6; W ~ 0.02) is subnormal, a few significant
# bits a weight (y 36x eager's error at γ = 1e-5). The backward, bf16 and fp32 (whose range holds γ·W and
# dy·x): dX's GEMM reads γ·W, rounded once; dW and db of the effective weights (γ·W, γ·b) come from the
# unscaled dy, then the chain rule in fp32 (_dx_weight, _scale_chain). fp16 (_DY_SCALED_DTYPES) takes eager's form: the
# unscaled dyᵀ·x of a loss-scaled dy overflows 65504 where γ is small, so the GEMMs run on dz = dy·γ, and
# dγ = Σ_m dy ⊙ z reads z = x·Wᵀ + b, which the forward keeps (as eager's autograd keeps it) (_scale_dy).
_DY_SCALED_DTYPES = (torch.float16,)


def _keeps_z(x: torch.Tensor, scale: Optional[torch.Tensor], need_s: bool) -> bool:
    """The forward keeps z = x·Wᵀ + b for dγ (fp16 with a γ that takes a grad; see above)."""
    return scale is not None and need_s and x.dtype in _DY_SCALED_DTYPES


def _scale_dy(dy: torch.Tensor, scale: Optional[torch.Tensor], z: Optional[torch.Tensor], need_s: bool
              ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dy, γ, dγ) for the GEMMs of y's backward: fp16 with γ, (dy·γ rounded to fp16, None, Σ_m dy ⊙ z or None)
    and the GEMMs run unscaled; otherwise (dy, γ, None) as given (the GEMMs fold γ)."""
    if scale is None or dy.dtype not in _DY_SCALED_DTYPES:
        return dy, scale, None
    ds = (dy.float() * z).sum(0).to(scale.dtype) if need_s else None  # (z promoted in the product: no fp32 copy)
    return (dy * scale).to(dy.dtype), None, ds


def _dx_weight(weight: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """The weight dX's GEMM reads for y = (x·Wᵀ + b)·γ: W, or with γ (what _scale_dy left) γ·W in W's dtype."""
    return weight if scale is None else (weight * scale[:, None]).to(weight.dtype)


def _scale_chain(gw: Optional[torch.Tensor], gb: Optional[torch.Tensor], weight: torch.Tensor,
                 bias: Optional[torch.Tensor], scale: Optional[torch.Tensor], need_w: bool, need_b: bool,
                 need_s: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dW, db, dγ) from gw, gb, the grads of the effective weight and bias (γ·W, γ·b; W and b without γ):
    dW = γ ⊙ gw, db = γ ⊙ gb, dγ = Σ_k gw ⊙ W + gb ⊙ b (= Σ_m dy ⊙ (x·Wᵀ + b)), in fp32."""
    if scale is None:
        return (gw if need_w else None), (gb if need_b else None), None
    s = scale.float()
    dw = (gw.float() * s[:, None]).to(weight.dtype) if need_w else None
    db = (gb.float() * s).to(bias.dtype) if need_b and bias is not None else None
    ds = None
    if need_s:
        ds = (gw.float() * weight).sum(1)
        if bias is not None:
            ds = ds.addcmul_(gb.float(), bias)
        ds = ds.to(scale.dtype)
    return dw, db, ds


def _out_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    scale: Optional[torch.Tensor], z: Optional[torch.Tensor], activation: str, need_x: bool,
                    need_w: bool, need_b: bool, need_s: bool, gemm: str, tf32: Optional[bool]
                    ) -> Tuple[Optional[torch.Tensor], ...]:
    """(dx, dW, db, dγ) of y = act(x·Wᵀ + b)·γ + residual (γ only without act; None: not needed / absent).
    z: the pre-activation (with act), or x·Wᵀ + b kept for dγ (_keeps_z), or None."""
    dy, scale, ds = _scale_dy(dy, scale, z, need_s)
    need_wf = need_w or (need_s and scale is not None)  # the effective weights' grads
    need_bf = bias is not None and (need_b or (need_s and scale is not None))
    if not (need_x or need_wf or need_bf):
        return None, None, None, ds
    w_x = _dx_weight(weight, scale) if need_x else weight
    gx, gw, gb = _linear_bwd_op(dy, x, w_x, z if activation else None, activation, need_bf, need_x, need_wf, gemm,
                                tf32)
    dw, db, ds_chain = _scale_chain(gw, gb, weight, bias, scale, need_w, need_b, need_s)
    return (gx if need_x else None), dw, db, (ds if ds is not None else ds_chain)


class LinearFn(torch.autograd.Function):
    """2-D y = act(x·Wᵀ + b)·γ + residual on the Triton kernels (x (M, K), residual (M, N), γ = scale (N,) or
    None; not with act)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, scale, activation, gemm, allow_tf32, save_z):
        save_z = save_z or _keeps_z(x, scale, ctx.needs_input_grad[4])
        y, z = _linear_fwd_op(x, weight, bias, residual, activation or "", save_z, gemm, allow_tf32, scale)
        ctx.save_for_backward(x, weight, z if save_z else None, bias, scale)
        ctx.activation, ctx.gemm, ctx.allow_tf32 = activation or "", gemm, allow_tf32
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, z, bias, scale = ctx.saved_tensors
        need_x, need_w, need_b, need_r, need_s = ctx.needs_input_grad[:5]
        dx, dw, db, ds = _out_linear_bwd(dy, x, weight, bias, scale, z, ctx.activation, need_x, need_w, need_b,
                                         need_s, ctx.gemm, ctx.allow_tf32)
        return dx, dw, db, (dy if need_r else None), ds, None, None, None, None


class MLPFn(torch.autograd.Function):
    """2-D y = (act(x·W1ᵀ + b1)·W2ᵀ + b2)·γ + residual on the Triton kernels (x (M, K), residual (M, N), γ =
    scale (N,) or None).

    Backward: fc2's grads; then dZ = (dY·W2) ⊙ act'(z) and db1 from one GEMM whose epilogue applies act'
    (linear_dact_bwd); then fc1's dX and dW from dZ. Saves x and the weights, and by ``recompute``
    (``MLP_RECOMPUTE``): z and h (fc1's output; "none"), z alone, h recomputed from it ("act"; h is kept where
    z is not saved: fc1 needing no grads), or neither, both recomputed by fc1's forward GEMM ("fc1").
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, residual, scale, activation, gemm, allow_tf32, save_z, recompute="none"):
        h, z = _linear_fwd_op(x, w1, b1, None, activation, save_z and recompute != "fc1", gemm, allow_tf32)
        keep_z2 = _keeps_z(x, scale, ctx.needs_input_grad[6])
        y, z2 = _linear_fwd_op(h, w2, b2, residual, "", keep_z2, gemm, allow_tf32, scale)
        keep_h = recompute == "none" or (recompute == "act" and not save_z)
        ctx.save_for_backward(x, w1, b1 if recompute == "fc1" else None,
                              z if save_z and recompute != "fc1" else None, h if keep_h else None, w2, b2, scale,
                              z2 if keep_z2 else None)
        ctx.activation, ctx.gemm, ctx.allow_tf32 = activation, gemm, allow_tf32
        ctx.has_b1 = b1 is not None
        ctx.recompute, ctx.save_z = recompute, save_z
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w1, b1, z, h, w2, b2, scale, z2 = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2, need_r, need_s = ctx.needs_input_grad[:7]
        gemm, tf32 = ctx.gemm, ctx.allow_tf32
        dx = dw1 = db1 = None
        if ctx.recompute == "fc1":  # h and z again from fc1's fused GEMM (z only where fc1 takes grads)
            h, z = _linear_fwd_op(x, w1, b1, None, ctx.activation, ctx.save_z, gemm, tf32)
        elif h is None and (need_w2 or need_b2 or need_s):  # "act": h = act(z), one pass, for fc2's grads
            h = _activation_op(z, ctx.activation)
        dy2, scale, ds = _scale_dy(dy, scale, z2, need_s)  # fc2's output grad for its GEMMs (fp16: dy·γ; and dγ)
        _, dw2, db2, ds_chain = _out_linear_bwd(dy2, h, w2, b2, scale, None, "", False, need_w2, need_b2,
                                                need_s and scale is not None, gemm, tf32)
        ds = ds if ds is not None else ds_chain
        if need_x or need_w1 or need_b1:
            dz, gb1 = _linear_dact_op(dy2, _dx_weight(w2, scale), z, ctx.activation, ctx.has_b1 and need_b1, gemm,
                                      tf32)
            db1 = gb1.to(w1.dtype) if ctx.has_b1 and need_b1 else None
            if need_x or need_w1:
                gx, gw1, _ = _linear_bwd_op(dz, x, w1, None, "", False, need_x, need_w1, gemm, tf32)
                dx = gx if need_x else None
                dw1 = gw1 if need_w1 else None
        return dx, dw1, db1, dw2, db2, (dy if need_r else None), ds, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Reference, public functional, module


def _validate(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: Optional[str],
              residual: Optional[torch.Tensor], layer_scale: Optional[torch.Tensor] = None) -> None:
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} input features; expected {weight.shape[1]} (weight is {tuple(weight.shape)})")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({weight.shape[0]},)")
    if residual is not None:
        check_tensor("residual", residual)
        expected = (*x.shape[:-1], weight.shape[0])
        if tuple(residual.shape) != expected:
            raise ValueError(f"residual has shape {tuple(residual.shape)}; expected {expected}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if layer_scale is not None:
        check_tensor("layer_scale", layer_scale, ndim=1)
        if layer_scale.shape[0] != weight.shape[0]:
            raise ValueError(f"layer_scale has shape {tuple(layer_scale.shape)}; expected ({weight.shape[0]},)")
        if activation is not None:
            raise ValueError("layer_scale scales the GEMM's output, which needs activation=None "
                             f"(got {activation!r}): scale the activation's output separately")
    check_same_device(x=x, weight=weight, bias=bias, residual=residual, layer_scale=layer_scale)


def _check_layer_scale(weight: torch.Tensor, layer_scale: Optional[torch.Tensor]) -> None:
    """γ in the weight's dtype (eager's y·γ keeps y's dtype then); under autocast any float dtype (kept: the
    epilogue reads it in fp32, as eager's fp32 γ multiplies the autocast output)."""
    if layer_scale is not None and autocast_dtype(weight.device) is None and layer_scale.dtype != weight.dtype:
        raise TypeError(f"layer_scale has dtype {layer_scale.dtype}; the Triton path needs the weight's "
                        f"({weight.dtype})")


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     activation: Optional[str] = None, residual: Optional[torch.Tensor] = None,
                     layer_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear + GELU (erf or tanh) + LayerScale (y * γ) + residual add, in plain PyTorch."""
    y = F.linear(x, weight, bias)
    if activation == "gelu":
        y = F.gelu(y)
    elif activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    if layer_scale is not None:
        y = y * layer_scale
    if residual is not None:
        y = y + residual
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           activation: Optional[str] = None, residual: Optional[torch.Tensor] = None, *,
           layer_scale: Optional[torch.Tensor] = None, backend: Optional[str] = None, gemm: Optional[str] = None,
           allow_tf32: Optional[bool] = None) -> torch.Tensor:
    """y = act(x·Wᵀ + b) (+ residual); weight in nn.Linear's (out, in) layout, any leading shape of x.

    activation: None, "gelu" (exact erf, timm/HF default) or "gelu_tanh".
    layer_scale: (N,) γ of a LayerScale right after the layer (timm's ls1/ls2, DINOv2's lambda1), with
    activation None: y = γ ⊙ (x·Wᵀ + b) (+ residual) in one GEMM epilogue (γ on the fp32 result; the
    backward's extra work is weight-sized, or in fp16 one pass for dy·γ, as eager's), the reference path
    multiplies.
    backend: "auto" | "torch" | "triton" (see flashvit.kernels._dispatch).
    gemm (Triton backend only): "triton" (our GEMM + fused epilogue), "tma" (the same on TMA, sm_90),
    "cublas" (torch.matmul + one fused elementwise kernel), "hybrid" (tma where an epilogue beyond the bias
    is fused, else cublas) or "auto" (GEMM_TABLE; without autograd, AUTO_INFERENCE_GEMM on big GEMMs
    first); default: use_gemm context, else FLASHVIT_GEMM, else auto.
    allow_tf32: fp32 inputs only; default torch.backends.cuda.matmul.allow_tf32 (False: IEEE fp32).
    """
    _validate(x, weight, bias, activation, residual, layer_scale)
    if gemm is not None:
        _check_gemm_name(gemm)
    # z (the pre-activation) is needed only for the grads of x, W or b (decided here: grad mode is off in forward)
    needs_z = needs_grad(x, weight, bias)
    training = needs_z or needs_grad(residual, layer_scale)
    if not use_triton(x, backend, auto=AUTO_TRAINING if training else AUTO_INFERENCE, auto_compiled=AUTO_COMPILED):
        return linear_reference(x, weight, bias, activation, residual, layer_scale)
    _check_layer_scale(weight, layer_scale)
    dt, (x, weight, bias), residual, late_residual = _cast_inputs(x, (weight, bias), residual)
    N = weight.shape[0]
    args = (flat2d(x), weight, bias, flat2d(residual) if residual is not None else None, layer_scale,
            activation, _call_gemm(gemm, training), allow_tf32,
            activation is not None and needs_z)
    y = _apply_uncast(dt, x.device, LinearFn, args).reshape(*x.shape[:-1], N)
    return y if late_residual is None else y + late_residual


def qkv_rope_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], num_heads: int,
                    rope: torch.Tensor, rope_prefix: int = 0, rope_half: bool = False, *,
                    backend: Optional[str] = None, gemm: Optional[str] = None,
                    allow_tf32: Optional[bool] = None) -> torch.Tensor:
    """The qkv projection of a RoPE attention: x (B, N, C) -> packed qkv (B, N, 3·H·D) = x·Wᵀ + b with q and k
    rotated as :func:`flashvit.kernels.rope.apply_rope` rotates them (``rope`` = cat(sin, cos) broadcastable to
    (B, H, N - P, 2·D), the first ``rope_prefix`` tokens left, ``rope_half``: pairs (i, i + D/2)); v as it is.
    Feed it to ``qkv_attention(qkv, num_heads)``.

    Without autograd, on the Triton backend, the rotation runs in the GEMM's epilogue (our GEMM paths; one table
    for every image and head, D a power of two up to 64 for rotate_half) or as one in-place pass after the GEMM;
    with autograd (training: ``qkv_attention(qkv, H, rope=...)`` fuses it there) and on the reference path it is
    :func:`linear` then :func:`apply_rope` of q and k.
    """
    _validate(x, weight, bias, None, None)
    check_tensor("x", x, ndim=3)
    H = int(num_heads)
    C3 = weight.shape[0]
    if H <= 0 or C3 % (3 * H):
        raise ValueError(f"weight has {C3} outputs: not 3 x num_heads ({num_heads}) x a head dim")
    B, N, _ = x.shape
    D = C3 // (3 * H)
    _rope.check_rope_args((B, N, H, D), rope, rope_prefix, where="qkv")
    check_same_device(x=x, rope=rope)
    if gemm is not None:
        _check_gemm_name(gemm)
    P, half = int(rope_prefix), bool(rope_half)
    grads = needs_grad(x, weight, bias, rope)
    if grads or not use_triton(x, backend, auto=AUTO_INFERENCE, auto_compiled=AUTO_COMPILED) or \
            rope.dtype == torch.float64:
        qkv = linear(x, weight, bias, backend=backend, gemm=gemm, allow_tf32=allow_tf32)
        q, k, v = qkv.view(B, N, 3, H, D).unbind(2)
        q, k = (_rope.apply_rope(t, rope, P, half, backend=backend) for t in (q, k))
        return torch.stack((q, k, v), dim=2).reshape(B, N, C3)
    check_triton_dtypes(rope=rope)
    dt, (x, weight, bias), _, _ = _cast_inputs(x, (weight, bias), None)
    with _uncast(dt, x.device):
        return _qkv_rope_linear_op(x.reshape(B * N, -1), weight, bias, rope, N, H, P, half, _call_gemm(gemm, False),
                                   allow_tf32).reshape(B, N, C3)


def _cast_inputs(x: torch.Tensor, params: Tuple[Optional[torch.Tensor], ...], residual: Optional[torch.Tensor],
                 names: Tuple[str, ...] = ("weight", "bias")):
    """Mirror F.linear under autocast (x and the parameters in the autocast dtype; a residual of another dtype
    is added after, in eager's promotion), then require one float dtype for the Triton path.
    Returns (autocast dtype or None, (x, *params), residual or None, late residual or None)."""
    late = None
    dt = autocast_dtype(x.device)
    if dt is None:  # common case: no autocast, every tensor in one kernel dtype -> nothing to cast or report
        xd = x.dtype
        if xd in FLOAT_DTYPES and (residual is None or residual.dtype == xd) and all(
                p is None or p.dtype == xd for p in params):
            return None, (x, *params), residual, None
    else:
        x = x.to(dt)
        params = tuple(p.to(dt) if p is not None else None for p in params)
        if residual is not None and residual.dtype != dt:
            residual, late = None, residual
    named = dict(x=x, **dict(zip(names, params)), residual=residual)
    check_triton_dtypes(**named)
    dtypes = {t.dtype for t in named.values() if t is not None}
    if len(dtypes) > 1:
        raise TypeError(f"{', '.join(named)} must share one dtype on the Triton path, got "
                        f"{sorted(str(d).replace('torch.', '') for d in dtypes)}")
    return dt, (x, *params), residual, late


def _uncast(dt: Optional[torch.dtype], device: torch.device) -> ContextManager[None]:
    """Autocast off where ``_cast_inputs`` cast the inputs already (``dt``): it must not recast them."""
    return contextlib.nullcontext() if dt is None else torch.autocast(device.type, enabled=False)


def _apply_uncast(dt: Optional[torch.dtype], device: torch.device, fn, args: tuple) -> torch.Tensor:
    with _uncast(dt, device):
        return apply(fn, *args)


def mlp(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor,
        fc2_bias: Optional[torch.Tensor], activation: str = "gelu", residual: Optional[torch.Tensor] = None, *,
        layer_scale: Optional[torch.Tensor] = None, backend: Optional[str] = None, gemm: Optional[str] = None,
        allow_tf32: Optional[bool] = None, recompute: Optional[str] = None) -> torch.Tensor:
    """y = act(x·W1ᵀ + b1)·W2ᵀ + b2 (+ residual): timm's Mlp, weights in nn.Linear's layout, any leading shape.

    Two fused GEMMs forward (bias + GELU, bias + residual). Backward: the GELU derivative is applied in the
    epilogue of fc2's dX GEMM, which also yields fc1's bias grad, so the hidden-size gradient is written once
    (``linear_dact_bwd``). ``layer_scale`` (γ of a LayerScale after the MLP) scales fc2's output before the
    residual, in fc2's epilogue as in :func:`linear`. ``backend``, ``gemm`` and ``allow_tf32`` as for :func:`linear`.
    ``recompute`` ('none' | 'act' | 'fc1'; default: ``use_mlp_recompute``'s, else FLASHVIT_MLP_RECOMPUTE's, else
    'none'): the hidden activations the backward recomputes instead of keeping (see ``MLP_RECOMPUTE``). Asking for
    'act' or 'fc1' makes the 'auto' backend run this op in training too (eager PyTorch keeps both); the eager
    fallback (CPU) ignores it.
    """
    if activation not in ("gelu", "gelu_tanh"):
        raise ValueError(f"activation must be 'gelu' or 'gelu_tanh', got {activation!r}")
    _validate(x, fc1_weight, fc1_bias, activation, None)
    check_tensor("fc2_weight", fc2_weight, ndim=2)
    if fc2_weight.shape[1] != fc1_weight.shape[0]:
        raise ValueError(f"fc2_weight has {fc2_weight.shape[1]} input features; expected {fc1_weight.shape[0]} "
                         f"(fc1's outputs)")
    h_shape = x.new_empty((1,) * x.dim()).expand(*x.shape[:-1], fc1_weight.shape[0])  # fc1's output (shape only)
    _validate(h_shape, fc2_weight, fc2_bias, None, residual, layer_scale)  # fc2's bias, residual, γ, devices
    if gemm is not None:
        _check_gemm_name(gemm)
    recompute = _recompute_name(recompute)
    needs_z = needs_grad(x, fc1_weight, fc1_bias)
    training = needs_z or needs_grad(fc2_weight, fc2_bias, residual, layer_scale)
    auto = (AUTO_TRAINING or recompute != "none") if training else AUTO_INFERENCE
    if not use_triton(x, backend, auto=auto, auto_compiled=AUTO_COMPILED):
        h = linear_reference(x, fc1_weight, fc1_bias, activation)
        return linear_reference(h, fc2_weight, fc2_bias, None, residual, layer_scale)
    _check_layer_scale(fc2_weight, layer_scale)
    dt, (x, w1, b1, w2, b2), residual, late_residual = _cast_inputs(
        x, (fc1_weight, fc1_bias, fc2_weight, fc2_bias), residual,
        ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"))
    N = w2.shape[0]
    args = (flat2d(x), w1, b1, w2, b2, flat2d(residual) if residual is not None else None, layer_scale,
            activation, _call_gemm(gemm, training), allow_tf32, needs_z, recompute)
    y = _apply_uncast(dt, x.device, MLPFn, args).reshape(*x.shape[:-1], N)
    return y if late_residual is None else y + late_residual


class FusedMLP(nn.Module):
    """timm's Mlp (``fc1`` -> GELU -> ``fc2``) with the bias/GELU/residual epilogues fused into the GEMMs.

    ``recompute`` ('none' | 'act' | 'fc1', or None: follow ``use_mlp_recompute`` / FLASHVIT_MLP_RECOMPUTE): what
    the backward recomputes instead of keeping (see :func:`mlp`); a plain attribute, settable on a built model.
    """

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 bias: bool = True, drop: float = 0.0, approximate: str = "none",
                 recompute: Optional[str] = None) -> None:
        super().__init__()
        self.recompute = None if recompute is None else _check_recompute(recompute)
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU(approximate=approximate)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                layer_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """γ ⊙ fc2(GELU(fc1(x))) (+ residual), γ = ``layer_scale`` (a LayerScale after the MLP, in fc2's epilogue):
        one :func:`mlp` call, or two linears when a dropout is active (dropout commutes with γ)."""
        act = "gelu" if self.act.approximate == "none" else "gelu_tanh"
        if not (self.training and (self.drop1.p > 0 or self.drop2.p > 0)):
            return mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, act, residual,
                       layer_scale=layer_scale, recompute=self.recompute)
        h = self.drop1(linear(x, self.fc1.weight, self.fc1.bias, activation=act))
        y = self.drop2(linear(h, self.fc2.weight, self.fc2.bias, layer_scale=layer_scale))
        return y if residual is None else y + residual


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile gate. At run time Triton specializes strides equal to 1 into constants, so each
# GEMM spec names the operand layout it stands for: "fwd" (x, Wᵀ), "dx" (dZ, W), "dw" (dZᵀ, X).
# Coverage: every config of every list, per dtype (and TF32 on/off for fp32), in the forward layout,
# with the heaviest epilogue (bias + GELU + residual + save z) for bf16 and IEEE fp32 and the plain one
# for fp16 and TF32 (the flags do not touch the main loop or its shared memory), plus the backward
# layouts and the act' (DACT) epilogue for the first config of each list. Every epilogue-flag x layout x
# config product (~300 specs) would take the gate hours of compile time.

_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_UNIT_STRIDES = {"fwd": ("stride_ak", "stride_bk", "stride_rn", "stride_cn"),
                 "dx": ("stride_ak", "stride_bn", "stride_cn"),
                 "dw": ("stride_am", "stride_bn", "stride_cn")}


_ROPE_INTS = ("R_TOK", "R_P", "R_COLS", "R_D", "stride_rt")


def _scale_flags(ty: str, epilogue: bool, rope: int, scale: str, has_res: int) -> Dict[str, object]:
    """The epilogue constexprs of a spec: the heaviest (bias + GELU + residual + z) with ``epilogue``; with
    ``scale`` (γ's type), LayerScale's: bias + γ + residual (no activation), + z in fp16 (kept for dγ)."""
    if scale:
        return dict(HAS_BIAS=True, HAS_SCALE=True, ACT=0, HAS_RES=has_res, SAVE_Z=ty == "fp16")
    return dict(HAS_BIAS=epilogue or rope, HAS_SCALE=False, ACT=1 if epilogue else 0,
                HAS_RES=has_res if epilogue else 0, SAVE_Z=epilogue)


def _gemm_spec(ty: str, cfg: Tuple[int, int, int, int, int], layout: str, epilogue: bool, tf32: bool,
               dact: int = 0, split: bool = False, rope: int = 0, scale: str = "") -> AotSpec:
    bm, bn, bk, w, s = cfg
    strides = ("stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_rm", "stride_rn", "stride_cm", "stride_cn")
    sig = {p: f"*{ty}" for p in ("a_ptr", "b_ptr", "bias_ptr", "res_ptr", "c_ptr", "z_ptr")}
    sig["scale_ptr"] = f"*{scale or ty}"
    sig["part_ptr"] = "*fp32"
    sig["rope_ptr"] = "*fp32" if rope else f"*{ty}"
    if split:  # split-K: fp32 partials
        sig["c_ptr"] = "*fp32"
    sig.update({n: "i32" for n in ("M", "N", "K", "M_KEY", "P", "K_SPLIT", "stride_cs") + strides + _ROPE_INTS})
    # rope: the qkv GEMM's epilogue (bias + RoPE, nothing else)
    cx = dict(**_scale_flags(ty, epilogue, rope, scale, True), DACT=dact, ALLOW_TF32=tf32, ROPE=rope, BLOCK_M=bm,
              BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M)
    sig.update({n: "constexpr" for n in cx})
    ones = _UNIT_STRIDES[layout]  # M, N, M_KEY: never specialized; K and the other strides: ViT sizes, % 16 == 0
    return runtime_spec(_gemm_kernel, sig, cx, w, s,
                        f"gemm_{layout}[{ty},{bm}x{bn}x{bk},w{w},s{s}{',tf32' if tf32 and ty == 'fp32' else ''}"
                        f"{',epi' if epilogue else ''}{f',dact={dact}' if dact else ''}{',splitk' if split else ''}"
                        f"{f',rope={rope}' if rope else ''}{f',scale={scale}' if scale else ''}]",
                        div16=("K", "K_SPLIT", "stride_cs") + tuple(n for n in strides if n not in ones), ones=ones)


_TMA_LAYOUTS = {"fwd": (False, True), "dx": (False, False), "dw": (True, False)}  # (A_T, B_T)


def _gemm_tma_spec(ty: str, cfg: Tuple[int, int, int, int, int], layout: str, epilogue: bool,
                   dact: int = 0, flatten: bool = TMA_FLATTEN, split: bool = False, prefetch: bool = False,
                   res_aligned: bool = True, rope: int = 0, scale: str = "") -> AotSpec:
    bm, bn, bk, w, s = cfg
    a_t, b_t = _TMA_LAYOUTS[layout]
    cty = "fp32" if split else ty  # split-K: fp32 partials
    staged = epilogue or dact != 0 or bool(scale)  # (scale: with a residual)
    sig = {"a_desc": f"tensordesc<{ty}[{bk}, {bm}]>" if a_t else f"tensordesc<{ty}[{bm}, {bk}]>",
           "b_desc": f"tensordesc<{ty}[{bn}, {bk}]>" if b_t else f"tensordesc<{ty}[{bk}, {bn}]>",
           "c_desc": f"tensordesc<{cty}[{bm}, {_epi_n(bn, staged)}]>",
           "z_desc": f"tensordesc<{cty}[{bm}, {_epi_n(bn, staged)}]>",
           "bias_ptr": f"*{ty}", "scale_ptr": f"*{scale or ty}", "res_ptr": f"*{ty}", "part_ptr": "*fp32",
           "z_ptr": f"*{cty}", "rope_ptr": "*fp32" if rope else f"*{cty}", "M": "i32",
           "N": "i32", "K": "i32", "M_KEY": "i32", "P": "i32", "SPLITS": "i32", "K_SPLIT": "i32", "M_PAD": "i32",
           "stride_rm": "i32"}
    sig.update({n: "i32" for n in _ROPE_INTS})
    cx = dict(stride_rn=1, A_T=a_t, B_T=b_t, **_scale_flags(ty, epilogue, rope, scale, 1 if res_aligned else 2),
              DACT=dact, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, NUM_SMS=132, FLATTEN=flatten,
              PREFETCH=prefetch, ROPE=rope)
    sig.update({n: "constexpr" for n in cx})
    return runtime_spec(_gemm_tma_kernel, sig, cx, w, s,
                        f"gemm_tma_{layout}[{ty},{bm}x{bn}x{bk},w{w},s{s}{',epi' if epilogue else ''}"
                        f"{f',dact={dact}' if dact else ''}{'' if flatten else ',noflat'}{',splitk' if split else ''}"
                        f"{',prefetch' if prefetch else ''}{'' if res_aligned else ',res_unaligned'}"
                        f"{f',rope={rope}' if rope else ''}{f',scale={scale}' if scale else ''}]",
                        div16=("K", "K_SPLIT", "M_PAD") + (("stride_rm",) if res_aligned else ()),
                        ones=() if split else ("SPLITS",), min_cc=90)


def _elementwise_specs(ty: str, act: int, sc: str, cfg: Tuple[int, int, int]) -> List[AotSpec]:
    """The epilogue pass (with a residual; γ of type ``sc`` if any) and the dZ / bias-grad pass (once an act)."""
    bm, bn, w = cfg
    tile = f"{bm}x{bn},w{w}"
    sig = {p: f"*{ty}" for p in ("c_ptr", "res_ptr", "y_ptr")}
    sig["scale_ptr"] = f"*{sc or ty}"
    sig.update({n: "i32" for n in ("M", "N", "M_KEY", "stride_cm", "stride_rm", "stride_ym")})
    sig.update({f: "constexpr" for f in ("stride_rn", "ACT", "HAS_SCALE", "HAS_RES", "BLOCK_M", "BLOCK_N")})
    cx = dict(stride_rn=1, ACT=act, HAS_SCALE=bool(sc), HAS_RES=True, BLOCK_M=bm, BLOCK_N=bn)
    specs = [runtime_spec(_epilogue_kernel, sig, cx, w, 3, f"gemm_epilogue[{ty},act={act}"
                          f"{f',scale={sc}' if sc else ''},{tile}]", div16=("N", "stride_cm", "stride_rm", "stride_ym"))]
    if not sc or act == 0 and sc == ty:  # (act 0: the bias grad alone, dZ = dY not written)
        sig = {"dy_ptr": f"*{ty}", "z_ptr": f"*{ty}", "dz_ptr": f"*{ty}", "part_ptr": "*fp32"}
        sig.update({n: "i32" for n in ("M", "N", "rows_per_prog", "M_KEY", "stride_dym", "stride_zm", "stride_dzm")})
        sig.update({f: "constexpr" for f in ("stride_dyn", "ACT", "WRITE_DZ", "COLSUM", "BLOCK_M", "BLOCK_N",
                                             "PIPE")})
        for pipe in [c[3] for c in DACT_CONFIGS if c[:3] == cfg]:
            cx = dict(stride_dyn=1, ACT=act, WRITE_DZ=act != 0, COLSUM=True, BLOCK_M=bm, BLOCK_N=bn, PIPE=pipe)
            specs.append(runtime_spec(_dact_colsum_kernel, sig, cx, w, 3, f"dact_colsum[{ty},act={act},{tile}"
                                      f"{f',pipe{pipe}' if pipe else ''}]",
                                      div16=("N", "rows_per_prog", "stride_dym", "stride_zm", "stride_dzm")))
    return specs


def _aot_specs() -> List[AotSpec]:
    if not HAS_TRITON:
        return []
    specs: List[AotSpec] = []
    for ty in ("fp16", "bf16"):  # TMA kernel: every config forward (bf16 with the full epilogue), dX/dW at the first
        specs += [_gemm_tma_spec(ty, cfg, "fwd", ty == "bf16" and tma_config_fits(cfg, True)) for cfg in TMA_CONFIGS_16]
        specs += [_gemm_tma_spec(ty, TMA_CONFIGS_16[0], layout, False) for layout in ("dx", "dw")]
        # the act' epilogue (MLP backward): a z tile staged, so the first config that fits with one
        specs += [_gemm_tma_spec(ty, next(c for c in TMA_CONFIGS_16 if tma_config_fits(c, True)), "dx", False, act)
                  for act in (1, 2)]
    specs.append(_gemm_tma_spec("fp16", TMA_INTERPRET_CONFIG, "fwd", True))
    # an unaligned residual (row stride not a multiple of 16) costs more shared memory: the first config for it
    specs.append(_gemm_tma_spec("bf16", next(c for c in TMA_CONFIGS_16 if tma_config_fits(c, True, res_aligned=False)),
                                "fwd", True, res_aligned=False))
    specs.append(_gemm_tma_spec("bf16", TMA_CONFIGS_16[0], "fwd", False, flatten=not TMA_FLATTEN))  # the other loop form
    # the qkv GEMM with RoPE in its epilogue (bias + rotation): interleaved pairs and rotate_half at D = 64, at
    # every width the epilogue's chunks take (64 and 128 columns)
    for mode in (1, ROPE_HALF_MAX_D):  # (every config its autotuning keeps: rope_config_fits)
        specs += [_gemm_tma_spec("bf16", c, "fwd", False, rope=mode) for c in TMA_CONFIGS_16 if rope_config_fits(c)]
        specs += [_gemm_spec("bf16", c, "fwd", False, False, rope=mode)
                  for c in dict.fromkeys(SM90_CONFIGS_16 + SM80_CONFIGS_16) if rope_config_fits(c)]
    # the epilogue's read issued before the K loop: the residual (forward) and z (act' backward)
    specs += [_gemm_tma_spec("bf16", c, "fwd", True, prefetch=True) for c in TMA_CONFIGS_16
              if tma_config_fits(c, True) and _prefetch_ok(c)]
    specs += [_gemm_tma_spec("bf16", c, "dx", False, 1, prefetch=True) for c in TMA_CONFIGS_16
              if tma_config_fits(c, True) and _prefetch_ok(c)]
    # LayerScale's γ in the epilogue (bias + γ + residual): every TMA config forward, γ in the operands' dtype
    # (bf16, fp16) and fp32 (autocast); our GEMM's first config of each list
    staged_cfgs = [c for c in TMA_CONFIGS_16 if tma_config_fits(c, True)]
    specs += [_gemm_tma_spec("bf16", c, "fwd", False, scale="bf16") for c in staged_cfgs]
    specs += [_gemm_tma_spec(ty, staged_cfgs[0], "fwd", False, scale=sc) for ty, sc in (("bf16", "fp32"),
                                                                                      ("fp16", "fp16"))]
    firsts = {"fp32": [FP32_CONFIGS[0]], "16": list(dict.fromkeys((SM80_CONFIGS_16[0], SM90_CONFIGS_16[0])))}
    specs += [_gemm_spec(ty, c, "fwd", False, ty == "fp32", scale=sc)
              for ty, sc in (("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32"))
              for c in firsts["fp32" if ty == "fp32" else "16"]]
    # split-K weight gradients: fp32 partials (a C tile twice as big: the first config that fits one)
    specs.append(_gemm_tma_spec("bf16", next(c for c in TMA_CONFIGS_16 if tma_config_fits(c, False, True)), "dw",
                                False, split=True))
    specs += [_gemm_spec("bf16", c, "dw", False, True, split=True)
              for c in dict.fromkeys(cfgs[0] for cfgs in (SM80_CONFIGS_16, SM90_CONFIGS_16))]
    for dt, ty in _TY.items():
        lists = [FP32_CONFIGS] if dt == torch.float32 else [SM80_CONFIGS_16, SM90_CONFIGS_16]
        seen = set()
        for tf32 in ((False, True) if dt == torch.float32 else (True,)):  # 16-bit: default precision
            for cfgs in lists:
                for cfg in cfgs:
                    if (cfg, tf32) not in seen:
                        seen.add((cfg, tf32))
                        # heaviest epilogue for bf16 and IEEE fp32; the plain one for fp16 and TF32
                        # (same epilogue code, only the final conversion differs; keeps the gate short)
                        specs.append(_gemm_spec(ty, cfg, "fwd", ty == "bf16" or (ty == "fp32" and not tf32), tf32))
            for cfg in {cfgs[0] for cfgs in lists}:
                specs.extend(_gemm_spec(ty, cfg, layout, False, tf32) for layout in ("dx", "dw"))
                specs.extend(_gemm_spec(ty, cfg, "dx", False, tf32, act) for act in (1, 2))  # MLP backward
        # erf and tanh GELU (ACT=0 is a subset of either); LayerScale's γ, in the dtype and in fp32 (autocast): at
        # the first elementwise config; bf16 with erf GELU at every config the autotuner tries
        for act, sc in dict.fromkeys(((1, ""), (2, ""), (0, ty), (0, "fp32"))):
            for cfg in ELEMENTWISE_CONFIGS if (ty, act) == ("bf16", 1) else ELEMENTWISE_CONFIGS[:1]:
                specs += _elementwise_specs(ty, act, sc, cfg)
    return specs


AOT_SPECS: List[AotSpec] = _aot_specs()

__all__ = ["linear", "linear_reference", "linear_fwd", "linear_bwd", "linear_dact_bwd", "LinearFn", "mlp", "MLPFn",
           "FusedMLP", "MLP_RECOMPUTE", "use_mlp_recompute", "qkv_rope_linear", "use_gemm", "use_gemm_config",
           "use_split_k", "split_k", "set_autotune", "GEMM_TABLE", "GEMM_PATHS", "shape_class", "AOT_SPECS"]

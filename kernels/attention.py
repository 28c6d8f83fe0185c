"""Flash attention for ViT shapes: softmax(q·kᵀ·scale)·v without the N×N matrix, forward and backward.

Layouts: ``attention`` takes (B, N, H, D) tensors with any strides; ``qkv_attention`` reads the
packed qkv Linear output (B, N, 3·H·D) in place and writes (B, N, H·D) for the output projection.
One set of stride-parameterized kernels serves both: q/k/v are strided views, never copies.

Kernels: forward (online softmax in fp32, exp2 with the scale folded into log2(e)·scale, saves each row's
softmax statistics, (B, H, 2, Nq) fp32: see STATS); backward FA2-style: delta = rowsum(dO·O), a dK/dV
kernel looping over query blocks and a dQ kernel looping over key blocks — no atomics, deterministic.
Any N is masked; head dims 8..256 (multiples of 8) are padded to BLOCK_D = next power of two and masked,
or, in the backward (``use_head_split("split")``), split into two power-of-two chunks, 80 = 64 + 32, so the
dots do less padded work.
Causal masking is top-left aligned (query i sees keys j <= i), as ``F.scaled_dot_product_attention``.
Attention dropout runs in the kernels (one Philox draw per score: the three kernels draw the same mask).
Loops whose full blocks run unmasked (``use_fwd_tail``, ``use_bwd_tail``): by default the GPU's autotuner
times them against the masked loops (the form is part of its configs) and keeps the faster per shape key.
The forward's key loops can issue each key block's P·V one block late, so that it overlaps the next block's
softmax on Hopper (``use_fwd_lag``; by default among the autotuner's configs).
Off by default until timed on a GPU: row splits that give the rows past the last full 64-row block to 16-row
blocks (``use_fwd_rows``, ``use_bwd_rows``), and the backward in one kernel a head (``use_bwd_fused``: dQ's
shares added in a fixed order into fp32 rows, still deterministic).
"""

from __future__ import annotations

import math
from typing import ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from flashvit.kernels import rope as _rope
from flashvit.kernels._aot import AotSpec, runtime_spec
from flashvit.kernels._dispatch import (
    HAS_TRITON,
    INTERPRET,
    REFERENCE_DTYPES,
    Launcher,
    apply,
    cdiv,
    check_same_device,
    check_tensor,
    check_triton_dtypes,
    cuda_major,
    custom_op,
    get_backend,
    launch,
    needs_grad,
    pushed,
    sm_count,
    use_triton,
)
from flashvit.kernels.rope import check_rope_args, rope_apply, rope_reference, rope_table

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - non-Linux platforms run the reference path only
    triton = None
    tl = None

LOG2E = 1.4426950408889634
# STATS: what the forward saves for the backward, a row's max logit m and log2 of its sum of exp2(logit - m)
# (log2 units, the scale folded in), as two planes (B, H, 2, Nq), not their sum, the LSE: the backward's
# P = exp2((logit - m) - log2 l) then loses nothing where logits are large (an additive mask of -1e4 or -1e7 on a
# whole row, scale·q·k ~ 1e4), where one fp32 LSE rounds by up to an ulp of the logit (1 at 1.4e7: P off 2x).
# Its cost: one add a score in the backward kernels (not yet timed on a GPU).
# The dropout seed a caller passes: the int64 one-element device tensor the op draws, an int, or None (seed 0).
Seed = Union[int, torch.Tensor, None]
MAX_HEAD_DIM = 256

if HAS_TRITON:

    @triton.jit
    def _dev_keep(seed, bh, rows, cols, N_Q, N_KV, dropout_p):
        # Attention dropout's keep mask at query rows x keys (rows, cols broadcast to the tile) of head bh: one
        # Philox draw per score, addressed by its place in the (B·H, Nq, Nkv) scores, so every kernel and every
        # tile shape draws the same mask for a seed.
        offs = (bh * N_Q + rows) * N_KV + cols  # int64 (bh is): B·H·Nq·Nkv passes 2^31 at ViT sizes
        return tl.rand(seed, offs) >= dropout_p

    @triton.jit
    def _dev_seed(SEED, DROPOUT: tl.constexpr):
        # The dropout seed, one int64 read from device memory (a CUDA graph's replays read each replay's fresh
        # draw; an int argument would be frozen into the graph); not read without dropout.
        if DROPOUT:
            seed = tl.load(SEED)
        else:
            seed = 0
        return seed

    @triton.jit
    def _dev_load(ptrs, r_ok, c_ok, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
        # A tile with only the masks it needs (r_ok, c_ok broadcast against ptrs); masked lanes read 0.
        if MASK_R and MASK_C:
            t = tl.load(ptrs, mask=r_ok & c_ok, other=0.0)
        elif MASK_R:
            t = tl.load(ptrs, mask=r_ok, other=0.0)
        elif MASK_C:
            t = tl.load(ptrs, mask=c_ok, other=0.0)
        else:
            t = tl.load(ptrs)
        return t

    @triton.jit
    def _dev_masked(s, Mask, rows, cols, r_ok, c_ok, mask_r, mask_c, qk_scale, MASK_KIND: tl.constexpr):
        # Scores s (unscaled logits) at query rows x keys (rows, cols broadcast to s's shape; r_ok, c_ok in range)
        # -> the scaled logits in log2 units with an attention mask applied, its element (row, key) at
        # Mask + row·mask_r + key·mask_c. MASK_KIND 1 (and 3: its gradient wanted): additive (natural-log units,
        # as SDPA's); values at or below -1e30 (HF's finfo.min, -inf) mask the key out, so a row masked everywhere
        # is 0 in the forward and in the backward alike (a NaN is not masked: it reaches its row, as in SDPA).
        # 2: boolean (nonzero: attend). Scores out of range (rows past Nq, keys past Nkv) come out masked too.
        ok = r_ok & c_ok
        am = tl.load(Mask + rows.to(tl.int64) * mask_r + cols * mask_c, mask=ok, other=0)
        if MASK_KIND != 2:
            bias = am.to(tl.float32)
            big = bias <= -1.0e30  # (NaN: False, so it reaches its row; the clamp keeps bias·log2e finite)
            t = tl.where(ok & ~big, s * qk_scale + tl.where(big, -1.0e30, bias) * 1.4426950408889634, float("-inf"))
        else:
            t = tl.where(am != 0, s * qk_scale, float("-inf"))
        return t

    @triton.jit
    def _dev_mask_head(Mask, b, h, mask_b, mask_w, N_WIN, mask_h):
        # The (Nq, Nkv) mask of batch b, head h: batches come in groups of N_WIN windows (Swin's), batch b at
        # window b % N_WIN of group b // N_WIN (N_WIN = 1, mask_w = 0: a plain (B, H, Nq, Nkv) mask).
        return Mask + (b // N_WIN) * mask_b + (b % N_WIN) * mask_w + h * mask_h

    @triton.jit
    def _dev_attn_fwd_scores(q, K, start_n, offs_n, offs_d, d_ok, N_KV, skn, skd, PRECISION: tl.constexpr,
                             MASK_N: tl.constexpr, MASK_D: tl.constexpr):
        # q·kᵀ of key block start_n .. start_n + BLOCK_N: (BLOCK_M, BLOCK_N) unscaled logits. MASK_N: the block may
        # run past N_KV (its keys read 0); MASK_D: BLOCK_D > HEAD_DIM (padded head dim).
        cols = start_n + offs_n
        kt = _dev_load(K + cols[None, :] * skn + offs_d[:, None] * skd, (cols < N_KV)[None, :], d_ok[:, None],
                       MASK_N, MASK_D)  # (BD, BN)
        return tl.dot(q, kt, input_precision=PRECISION)

    @triton.jit
    def _dev_attn_fwd_softmax(s, m_i, l_i, start_n, offs_m, offs_n, N_KV, qk_scale, CAUSAL: tl.constexpr,
                              MASK_N: tl.constexpr, N_Q, bh, dropout_p, seed, DROPOUT: tl.constexpr, Mask, mask_m,
                              mask_n, MASK_KIND: tl.constexpr):
        # The online softmax over key block start_n's logits s: -> (p (BM, BN) fp32, the probabilities P·V takes
        # (dropped ones 0), m_new, alpha = exp2(m_i - m_new) (acc's and l_i's rescale), l_i updated).
        # MASK_N: keys past N_KV (and CAUSAL's) masked; without it, no key mask at all (full blocks of a split
        # loop). DROPOUT: l_i sums the kept and the dropped probabilities, acc only the kept ones (1/(1-p) at
        # the end). MASK_KIND (an attention mask at this head, element (row, key) at Mask + row·mask_m +
        # key·mask_n): see _dev_masked.
        cols = start_n + offs_n
        n_ok = cols < N_KV
        if MASK_KIND != 0:  # the scaled logits in log2 units with the mask applied; then a scale of 1
            s = _dev_masked(s, Mask, offs_m[:, None], cols[None, :], (offs_m < N_Q)[:, None], n_ok[None, :], mask_m,
                            mask_n, qk_scale, MASK_KIND)
            sc = 1.0
        else:
            sc = qk_scale
        if MASK_N:
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
        # sc > 0 (the public ops send other scales to the reference): the row max of the scaled logits
        # is the scaled row max, and s·sc - m is one FMA a logit instead of a multiply and a subtract.
        m_new = tl.maximum(m_i, tl.max(s, 1) * sc)  # log2 units
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_dev_keep(seed, bh, offs_m[:, None], cols[None, :], N_Q, N_KV, dropout_p), p, 0.0)
        return p, m_new, alpha, l_i

    @triton.jit
    def _dev_attn_fwd_pv(acc, alpha, p, V, start_n, offs_n, offs_d, d_ok, N_KV, svn, svd, PRECISION: tl.constexpr,
                         MASK_N: tl.constexpr, MASK_D: tl.constexpr):
        # acc (BM, BD) rescaled by alpha plus p·v of key block start_n (p from _dev_attn_fwd_softmax).
        cols = start_n + offs_n
        v = _dev_load(V + cols[:, None] * svn + offs_d[None, :] * svd, (cols < N_KV)[:, None], d_ok[None, :],
                      MASK_N, MASK_D)  # (BN, BD)
        return acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)

    @triton.jit
    def _dev_attn_fwd_step(q, K, V, acc, m_i, l_i, start_n, offs_m, offs_n, offs_d, d_ok, N_KV,
                           skn, skd, svn, svd, qk_scale, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                           MASK_N: tl.constexpr, MASK_D: tl.constexpr, N_Q, bh, dropout_p, seed,
                           DROPOUT: tl.constexpr, Mask, mask_m, mask_n, MASK_KIND: tl.constexpr):
        # One key block of the online softmax: (acc (BM, BD), m_i, l_i (BM,)) updated with keys
        # start_n .. start_n + BLOCK_N: scores, softmax, then P·V (see the three functions above).
        s = _dev_attn_fwd_scores(q, K, start_n, offs_n, offs_d, d_ok, N_KV, skn, skd, PRECISION, MASK_N, MASK_D)
        p, m_new, alpha, l_i = _dev_attn_fwd_softmax(s, m_i, l_i, start_n, offs_m, offs_n, N_KV, qk_scale, CAUSAL,
                                                     MASK_N, N_Q, bh, dropout_p, seed, DROPOUT, Mask, mask_m,
                                                     mask_n, MASK_KIND)
        acc = _dev_attn_fwd_pv(acc, alpha, p, V, start_n, offs_n, offs_d, d_ok, N_KV, svn, svd, PRECISION, MASK_N,
                               MASK_D)
        return acc, m_new, l_i

    @triton.jit
    def _dev_attn_fwd_lagged(q, K, V, acc, m_i, l_i, hi, offs_m, offs_n, offs_d, d_ok, N_KV,
                             skn, skd, svn, svd, qk_scale, PRECISION: tl.constexpr, MASK_N: tl.constexpr,
                             MASK_D: tl.constexpr, N_Q, bh, dropout_p, seed, DROPOUT: tl.constexpr, Mask, mask_m,
                             mask_n, MASK_KIND: tl.constexpr, BLOCK_N: tl.constexpr):
        # The key blocks over [0, hi) (hi >= 1; MASK_N: each masked, else full blocks only, hi a multiple of
        # BLOCK_N) with each block's P·V issued one block late: block j's scores, then block j-1's P·V, then
        # block j's softmax. On Hopper the P·V wgmma then runs while the softmax's exp2 run (Triton keeps that dot
        # in flight: its A operand, p, is converted right at the dot and its accumulator is read only after the
        # next scores' wait); p (BM, BN) fp32 and alpha carry over. Same sums in the same order as
        # _dev_attn_fwd_step's loop.
        s = _dev_attn_fwd_scores(q, K, 0, offs_n, offs_d, d_ok, N_KV, skn, skd, PRECISION, MASK_N, MASK_D)
        p, m_i, alpha, l_i = _dev_attn_fwd_softmax(s, m_i, l_i, 0, offs_m, offs_n, N_KV, qk_scale, False, MASK_N,
                                                   N_Q, bh, dropout_p, seed, DROPOUT, Mask, mask_m, mask_n,
                                                   MASK_KIND)
        for start_n in range(BLOCK_N, hi, BLOCK_N):
            s = _dev_attn_fwd_scores(q, K, start_n, offs_n, offs_d, d_ok, N_KV, skn, skd, PRECISION, MASK_N, MASK_D)
            acc = _dev_attn_fwd_pv(acc, alpha, p, V, start_n - BLOCK_N, offs_n, offs_d, d_ok, N_KV, svn, svd,
                                   PRECISION, MASK_N, MASK_D)
            p, m_i, alpha, l_i = _dev_attn_fwd_softmax(s, m_i, l_i, start_n, offs_m, offs_n, N_KV, qk_scale, False,
                                                       MASK_N, N_Q, bh, dropout_p, seed, DROPOUT, Mask, mask_m,
                                                       mask_n, MASK_KIND)
        acc = _dev_attn_fwd_pv(acc, alpha, p, V, ((hi - 1) // BLOCK_N) * BLOCK_N, offs_n, offs_d, d_ok, N_KV, svn,
                               svd, PRECISION, MASK_N, MASK_D)
        return acc, m_i, l_i

    @triton.jit
    def _dev_attn_fwd_tile(Q, K, V, Out, LSE,
                           sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd, sob, son, soh, sod,
                           H, N_Q, N_KV, row0, pid_m, pid_bh, qk_scale, dropout_p, seed,
                           Mask, mask_b, mask_w, N_WIN, mask_h, mask_m, mask_n,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                           PRECISION: tl.constexpr, SPLIT_TAIL: tl.constexpr, DROPOUT: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
                           LAG_PV: tl.constexpr):
        # Query rows row0 + pid_m·BLOCK_M ... of head pid_bh. Q, Out: (B, Nq, H, D); K, V: (B, Nkv, H, D), any
        # strides; LSE: (B·H, 2, Nq) fp32, each row's softmax statistics in log2 units (see STATS).
        # Head dims pad to BLOCK_D (masked). The forward does not split them as the backward can: split,
        # it measured slower (H100, D=80) and gave wrong results at D=40 (32 + 16) with BLOCK_N >= 64 on
        # Triton 3.6 (bench/results/2026-11-26-h100-diag/split40.txt). A 64 + 32 split, tried again, gave wrong
        # results at D = 80 at every 64-wide key block on an H200 with Triton 3.6 (max error 0.79-1.48, right in the
        # interpreter: bench/results/2026-11-28-h200-run4-tests/gpu_tests.log), so it was taken out again.
        # qk_scale = softmax_scale·log2(e), so exp2 of the scaled logits is the softmax numerator.
        # DROPOUT: probabilities dropped with probability dropout_p (Philox, seed; see _dev_keep) and the kept
        # ones scaled by 1 / (1 - dropout_p), as F.dropout; the stats are the undropped softmax's.
        # SPLIT_TAIL (non-causal): the full key blocks run without key masks, the remainder (< BLOCK_N keys)
        # apart in masked blocks of TAIL_N <= 32, so a wide BLOCK_N (less rescaling of acc a key) pads little:
        # N = 197 at BLOCK_N = 64 runs 3 full blocks and one of 32 (224 keys computed) instead of 4 (256).
        # LAG_PV (non-causal): the full blocks' P·V (SPLIT_TAIL), or every block's, one block late
        # (_dev_attn_fwd_lagged).
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        Q += b * sqb + h * sqh
        K += b * skb + h * skh
        V += b * svb + h * svh
        Out += b * sob + h * soh
        Mask = _dev_mask_head(Mask, b, h, mask_b, mask_w, N_WIN, mask_h)  # (Nq, Nkv) (MASK_KIND != 0; else unused)

        start_m = row0 + pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        m_ok = offs_m < N_Q
        q = tl.load(Q + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

        # Finite start: a fully masked block gives p = exp2(-inf) = 0 instead of NaN.
        m_i = tl.full([BLOCK_M], -1.0e38, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if SPLIT_TAIL and not CAUSAL:
            full = (N_KV // BLOCK_N) * BLOCK_N
            if LAG_PV:
                if full > 0:
                    acc, m_i, l_i = _dev_attn_fwd_lagged(q, K, V, acc, m_i, l_i, full, offs_m, offs_n, offs_d, d_ok,
                                                         N_KV, skn, skd, svn, svd, qk_scale, PRECISION, False,
                                                         BLOCK_D != HEAD_DIM, N_Q, pid_bh.to(tl.int64), dropout_p,
                                                         seed, DROPOUT, Mask, mask_m, mask_n, MASK_KIND, BLOCK_N)
            else:
                for start_n in range(0, full, BLOCK_N):
                    acc, m_i, l_i = _dev_attn_fwd_step(q, K, V, acc, m_i, l_i, start_n, offs_m, offs_n, offs_d, d_ok,
                                                       N_KV, skn, skd, svn, svd, qk_scale, CAUSAL, PRECISION, False,
                                                       BLOCK_D != HEAD_DIM, N_Q, pid_bh.to(tl.int64), dropout_p, seed,
                                                       DROPOUT, Mask, mask_m, mask_n, MASK_KIND)
            TAIL_N: tl.constexpr = BLOCK_N if BLOCK_N < 32 else 32
            offs_t = tl.arange(0, TAIL_N)
            for start_n in range(full, N_KV, TAIL_N):  # fewer than BLOCK_N / TAIL_N blocks
                acc, m_i, l_i = _dev_attn_fwd_step(q, K, V, acc, m_i, l_i, start_n, offs_m, offs_t, offs_d, d_ok,
                                                   N_KV, skn, skd, svn, svd, qk_scale, CAUSAL, PRECISION, True,
                                                   BLOCK_D != HEAD_DIM, N_Q, pid_bh.to(tl.int64), dropout_p, seed,
                                                   DROPOUT, Mask, mask_m, mask_n, MASK_KIND)
        elif LAG_PV and not CAUSAL:  # every key block masked, P·V one block late
            if N_KV > 0:
                acc, m_i, l_i = _dev_attn_fwd_lagged(q, K, V, acc, m_i, l_i, N_KV, offs_m, offs_n, offs_d, d_ok, N_KV,
                                                     skn, skd, svn, svd, qk_scale, PRECISION, True, BLOCK_D != HEAD_DIM,
                                                     N_Q, pid_bh.to(tl.int64), dropout_p, seed, DROPOUT, Mask, mask_m,
                                                     mask_n, MASK_KIND, BLOCK_N)
        else:
            hi = N_KV
            if CAUSAL:
                hi = tl.minimum(start_m + BLOCK_M, N_KV)
            for start_n in range(0, hi, BLOCK_N):
                acc, m_i, l_i = _dev_attn_fwd_step(q, K, V, acc, m_i, l_i, start_n, offs_m, offs_n, offs_d, d_ok,
                                                   N_KV, skn, skd, svn, svd, qk_scale, CAUSAL, PRECISION, True,
                                                   BLOCK_D != HEAD_DIM, N_Q, pid_bh.to(tl.int64), dropout_p, seed,
                                                   DROPOUT, Mask, mask_m, mask_n, MASK_KIND)

        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]
        if DROPOUT:
            out = out * (1.0 / (1.0 - dropout_p))  # (a scalar reciprocal: no division a value)
        tl.store(Out + offs_m[:, None] * son + offs_d[None, :] * sod, out.to(Out.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])
        stats = LSE + pid_bh.to(tl.int64) * 2 * N_Q + offs_m
        tl.store(stats, m_i, mask=m_ok)
        tl.store(stats + N_Q, tl.log2(l_safe), mask=m_ok)

    @triton.jit(do_not_specialize=["row0", "n_rows", "BH"])  # per-call ints: one build for any value
    def _attn_fwd(Q, K, V, Out, LSE,
                  sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd, sob, son, soh, sod,
                  H, N_Q, N_KV, N_BUCKET, row0, n_rows, qk_scale, dropout_p, SEED,
                  Mask, mask_b, mask_w, N_WIN, mask_h, mask_m, mask_n, BH,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                  PRECISION: tl.constexpr, SPLIT_TAIL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, LAG_PV: tl.constexpr, PERSIST: tl.constexpr):
        # Q, Out: (B, Nq, H, D); K, V: (B, Nkv, H, D), any strides; LSE: (B·H, 2, Nq) fp32; BH = B·H. This launch
        # owns query rows [row0, row0 + n_rows) (see use_fwd_rows). N_BUCKET is unused in the body: it is the
        # autotune key (next power of two of Nkv). A program owns one (BLOCK_M query rows, head) tile (PERSIST 0),
        # or (PERSIST > 0: the programs an SM the host launched, see FWD_PERSIST) tiles pid, pid + programs, ... in
        # one loop flattened with the key loop, so the next tile's q, k and v loads are in flight while this
        # tile's last key block and its stores run (short ViT sequences have 3-4 key blocks a tile). The
        # persistent form runs the masked key loop (one inner loop: Triton flattens no more).
        tl.static_assert(PERSIST == 0 or not (CAUSAL or SPLIT_TAIL or LAG_PV),
                         "the persistent forward runs the masked, non-causal key loop")
        seed = _dev_seed(SEED, DROPOUT)
        num_m = tl.cdiv(n_rows, BLOCK_M)
        if PERSIST:
            for tile in tl.range(tl.program_id(0), num_m * BH, tl.num_programs(0), flatten=True):
                _dev_attn_fwd_tile(Q, K, V, Out, LSE, sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd,
                                   sob, son, soh, sod, H, N_Q, N_KV, row0, tile % num_m, tile // num_m, qk_scale,
                                   dropout_p, seed, Mask, mask_b, mask_w, N_WIN, mask_h, mask_m, mask_n, HEAD_DIM,
                                   BLOCK_D, False, PRECISION, False, DROPOUT, BLOCK_M, BLOCK_N, MASK_KIND, False)
        else:
            pid = tl.program_id(0)
            _dev_attn_fwd_tile(Q, K, V, Out, LSE, sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd,
                               sob, son, soh, sod, H, N_Q, N_KV, row0, pid % num_m, pid // num_m, qk_scale,
                               dropout_p, seed, Mask, mask_b, mask_w, N_WIN, mask_h, mask_m, mask_n, HEAD_DIM,
                               BLOCK_D, CAUSAL, PRECISION, SPLIT_TAIL, DROPOUT, BLOCK_M, BLOCK_N, MASK_KIND, LAG_PV)

    @triton.jit
    def _dropout_mask_kernel(Mask, N_Q, N_KV, dropout_p, SEED, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # Mask (B·H, Nq, Nkv) int8: 1 where attention dropout keeps a probability (the kernels' _dev_keep draws).
        pid = tl.program_id(0)
        num_m = tl.cdiv(N_Q, BLOCK_M)
        num_n = tl.cdiv(N_KV, BLOCK_N)
        bh = (pid // (num_m * num_n)).to(tl.int64)
        rows = ((pid // num_n) % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        keep = _dev_keep(tl.load(SEED), bh, rows[:, None], cols[None, :], N_Q, N_KV, dropout_p)
        tl.store(Mask + (bh * N_Q + rows[:, None]) * N_KV + cols[None, :], keep.to(tl.int8),
                 mask=(rows[:, None] < N_Q) & (cols[None, :] < N_KV))

    @triton.jit
    def _dev_delta_block(Out, DO, DELTA, start_m, N_Q, son, sod, sdn, sdd, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_M: tl.constexpr):
        # delta = rowsum(dO·Out) of query rows start_m .. start_m + BLOCK_M of one head (pointers at the head)
        # -> DELTA; the head dim in one padded chunk, or two (BLOCK_D2 > 0, as the backward's split).
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N_Q
        offs_d = tl.arange(0, BLOCK_D)
        mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = tl.load(Out + offs_m[:, None] * son + offs_d[None, :] * sod, mask=mask, other=0.0)
        do = tl.load(DO + offs_m[:, None] * sdn + offs_d[None, :] * sdd, mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        if BLOCK_D2 > 0:
            offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
            mask2 = m_ok[:, None] & (offs_d2 < HEAD_DIM)[None, :]
            o2 = tl.load(Out + offs_m[:, None] * son + offs_d2[None, :] * sod, mask=mask2, other=0.0)
            do2 = tl.load(DO + offs_m[:, None] * sdn + offs_d2[None, :] * sdd, mask=mask2, other=0.0)
            delta += tl.sum(o2.to(tl.float32) * do2.to(tl.float32), 1)
        tl.store(DELTA + offs_m, delta, mask=m_ok)

    @triton.jit
    def _attn_bwd_preprocess(Out, DO, DELTA,
                             sob, son, soh, sod, sdb, sdn, sdh, sdd,
                             H, N_Q,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
        # Out, DO: (B, Nq, H, D) any strides -> DELTA: (B·H, Nq) fp32 = rowsum(dO·Out).
        pid = tl.program_id(0)
        num_m = tl.cdiv(N_Q, BLOCK_M)
        pid_m = pid % num_m
        pid_bh = pid // num_m
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        _dev_delta_block(Out + b * sob + h * soh, DO + b * sdb + h * sdh, DELTA + pid_bh.to(tl.int64) * N_Q,
                         pid_m * BLOCK_M, N_Q, son, sod, sdn, sdd, HEAD_DIM, BLOCK_D, 0, BLOCK_M)

    @triton.jit
    def _dev_dkdv_step(Q, DO, LSE, DELTA, k, v, k2, v2, dk, dv, dk2, dv2, start_m, offs_m0, offs_n, offs_d, d_ok,
                       offs_d2, d2_ok, N_Q, sqn, sqd, sdn, sdd, qk_scale, CAUSAL: tl.constexpr,
                       PRECISION: tl.constexpr, BLOCK_D2: tl.constexpr, MASK_M: tl.constexpr, MASK_D: tl.constexpr,
                       N_KV, bh, dropout_p, seed, DROPOUT: tl.constexpr, DQ_ACC, ACC_STRIDE: tl.constexpr,
                       ACC_DQ: tl.constexpr, MASK_N: tl.constexpr, Mask, mask_m, mask_n, MASK_KIND: tl.constexpr,
                       DMASK, acc_ds):
        # One query block of the dK/dV loop: (dk, dv (BN, BD), dk2, dv2 (BN, BD2)) updated with queries
        # start_m .. start_m + BLOCK_M. MASK_M: the block may run past N_Q (or CAUSAL cuts it); without it, no
        # query mask at all. MASK_D: the first head-dim chunk is padded. With BLOCK_D2 = 0, k2, v2, dk2, dv2,
        # offs_d2, d2_ok are placeholders, returned as given. DROPOUT: with Z = keep / (1 - p), dV = (P ⊙ Z)ᵀ·dO and
        # dS = P ⊙ (dP_dropped ⊙ Z − delta) (delta = rowsum(dO·O) of the dropped output).
        # ACC_DQ (the fused backward): also dQ's share of this key block, dSᵀ·K (BM, BD), added to the fp32
        # (Nq, ACC_STRIDE) rows at DQ_ACC. One atomic add a value, issued by the same thread for a given value
        # in every key block (a static layout), so the adds land in key-block order: deterministic. MASK_N: the
        # block has keys past N_KV, whose dS rows are dropped from the share (their k rows are 0, but their
        # logits are 0 too, so P there is unbounded: inf·0 would be NaN).
        # MASK_KIND 3: the additive mask's gradient, dS itself, stored at this head's (Nq, Nkv) fp32 rows at DMASK
        # (acc_ds: added to what is there, which the launch before stored for another batch of its chunk).
        offs_m = start_m + offs_m0
        m_ok = offs_m < N_Q
        qt = _dev_load(Q + offs_m[None, :] * sqn + offs_d[:, None] * sqd, m_ok[None, :], d_ok[:, None],
                       MASK_M, MASK_D)  # (BD, BM)
        m2 = _dev_load(LSE + offs_m, m_ok, m_ok, MASK_M, False)  # (BM,) the forward's row max (log2 units)
        lg = _dev_load(LSE + N_Q + offs_m, m_ok, m_ok, MASK_M, False)  # (BM,) log2 of its row sum
        st = tl.dot(k, qt, input_precision=PRECISION)  # (BN, BM)
        if BLOCK_D2 > 0:
            qt2 = _dev_load(Q + offs_m[None, :] * sqn + offs_d2[:, None] * sqd, m_ok[None, :], d2_ok[:, None],
                            MASK_M, True)  # (BD2, BM)
            st = tl.dot(k2, qt2, st, input_precision=PRECISION)
        if MASK_KIND != 0:  # the forward's masked logits (see _dev_masked), transposed
            pt = tl.exp2((_dev_masked(st, Mask, offs_m[None, :], offs_n[:, None], m_ok[None, :],
                                      (offs_n < N_KV)[:, None], mask_m, mask_n, qk_scale, MASK_KIND) - m2[None, :])
                         - lg[None, :])
        else:
            pt = tl.exp2((st * qk_scale - m2[None, :]) - lg[None, :])  # Pᵀ (BN, BM), log2 units
        if MASK_M:
            keep = m_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            pt = tl.where(keep, pt, 0.0)
        if DROPOUT:
            kept = _dev_keep(seed, bh, offs_m[None, :], offs_n[:, None], N_Q, N_KV, dropout_p)  # (BN, BM)
            keep_scale = 1.0 / (1.0 - dropout_p)
            ptd = tl.where(kept, pt * keep_scale, 0.0)
        else:
            ptd = pt
        do = _dev_load(DO + offs_m[:, None] * sdn + offs_d[None, :] * sdd, m_ok[:, None], d_ok[None, :],
                       MASK_M, MASK_D)  # (BM, BD)
        dv += tl.dot(ptd.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BN, BM)
        if BLOCK_D2 > 0:
            do2 = _dev_load(DO + offs_m[:, None] * sdn + offs_d2[None, :] * sdd, m_ok[:, None], d2_ok[None, :],
                            MASK_M, True)  # (BM, BD2)
            dv2 += tl.dot(ptd.to(do2.dtype), do2, input_precision=PRECISION)
            dpt = tl.dot(v2, tl.trans(do2), dpt, input_precision=PRECISION)
        if DROPOUT:
            dpt = tl.where(kept, dpt * keep_scale, 0.0)
        delta = _dev_load(DELTA + offs_m, m_ok, m_ok, MASK_M, False)
        dst = pt * (dpt - delta[None, :])
        if MASK_KIND == 3:  # each (row, key) of a chunk's head in one program, in batch order: no atomics
            ds_ptrs = DMASK + offs_m[None, :].to(tl.int64) * N_KV + offs_n[:, None]
            ds_ok = m_ok[None, :] & (offs_n < N_KV)[:, None]
            prev = tl.load(ds_ptrs, mask=ds_ok & acc_ds, other=0.0)  # (nothing read for a chunk's first batch)
            tl.store(ds_ptrs, dst + prev, mask=ds_ok)
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)
        if BLOCK_D2 > 0:
            dk2 += tl.dot(dst.to(qt2.dtype), tl.trans(qt2), input_precision=PRECISION)
        if ACC_DQ:
            if MASK_N:
                dst = tl.where(offs_n[:, None] < N_KV, dst, 0.0)
            ds = tl.trans(dst.to(k.dtype))  # (BM, BN)
            acc_rows = DQ_ACC + offs_m[:, None] * ACC_STRIDE
            tl.atomic_add(acc_rows + offs_d[None, :], tl.dot(ds, k, input_precision=PRECISION),
                          mask=m_ok[:, None] & d_ok[None, :], sem="relaxed")
            if BLOCK_D2 > 0:
                tl.atomic_add(acc_rows + offs_d2[None, :], tl.dot(ds, k2, input_precision=PRECISION),
                              mask=m_ok[:, None] & d2_ok[None, :], sem="relaxed")
        return dk, dv, dk2, dv2

    @triton.jit
    def _dev_dkdv_block(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, start_n, N_Q, N_KV, sqn, sqd, skn, skd, svn, svd,
                        sdn, sdd, skn_g, skd_g, svn_g, svd_g, sm_scale, qk_scale, bh, dropout_p, seed,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, CAUSAL: tl.constexpr,
                        PRECISION: tl.constexpr, SPLIT_TAIL: tl.constexpr, DROPOUT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC_DQ: tl.constexpr, MASK_N: tl.constexpr,
                        Mask, mask_m, mask_n, MASK_KIND: tl.constexpr, DMASK, acc_ds):
        # dK, dV of keys start_n .. start_n + BLOCK_N of one head (pointers at the head): loops over query blocks,
        # writes them once. ACC_DQ: dQ's shares into DQ_ACC on the way, MASK_N: keys past N_KV in the block
        # (see _dev_dkdv_step).
        # SPLIT_TAIL (non-causal): the full query blocks run without query masks, the partial last one apart.
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        n_ok = offs_n < N_KV
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)  # (BN, BD)
        v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)  # (BN, BD)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        if BLOCK_D2 > 0:
            offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
            d2_ok = offs_d2 < HEAD_DIM
            kv2_mask = n_ok[:, None] & d2_ok[None, :]
            k2 = tl.load(K + offs_n[:, None] * skn + offs_d2[None, :] * skd, mask=kv2_mask, other=0.0)  # (BN, BD2)
            v2 = tl.load(V + offs_n[:, None] * svn + offs_d2[None, :] * svd, mask=kv2_mask, other=0.0)
            dk2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)
            dv2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)
        else:  # placeholders (see _dev_dkdv_step)
            offs_d2, d2_ok, kv2_mask, k2, v2, dk2, dv2 = offs_d, d_ok, kv_mask, k, v, dk, dv
        MASK_D: tl.constexpr = BLOCK_D2 == 0 and BLOCK_D != HEAD_DIM
        if SPLIT_TAIL and not CAUSAL:
            full = (N_Q // BLOCK_M) * BLOCK_M
            for start_m in range(0, full, BLOCK_M):
                dk, dv, dk2, dv2 = _dev_dkdv_step(Q, DO, LSE, DELTA, k, v, k2, v2, dk, dv, dk2, dv2, start_m, offs_m0,
                                                  offs_n, offs_d, d_ok, offs_d2, d2_ok, N_Q, sqn, sqd, sdn, sdd,
                                                  qk_scale, CAUSAL, PRECISION, BLOCK_D2, False, MASK_D, N_KV,
                                                  bh, dropout_p, seed, DROPOUT, DQ_ACC, HEAD_DIM, ACC_DQ, MASK_N,
                                                  Mask, mask_m, mask_n, MASK_KIND, DMASK, acc_ds)
            for start_m in range(full, N_Q, BLOCK_M):  # at most one block
                dk, dv, dk2, dv2 = _dev_dkdv_step(Q, DO, LSE, DELTA, k, v, k2, v2, dk, dv, dk2, dv2, start_m, offs_m0,
                                                  offs_n, offs_d, d_ok, offs_d2, d2_ok, N_Q, sqn, sqd, sdn, sdd,
                                                  qk_scale, CAUSAL, PRECISION, BLOCK_D2, True, MASK_D, N_KV,
                                                  bh, dropout_p, seed, DROPOUT, DQ_ACC, HEAD_DIM, ACC_DQ, MASK_N,
                                                  Mask, mask_m, mask_n, MASK_KIND, DMASK, acc_ds)
        else:
            lo = 0
            if CAUSAL:
                lo = (start_n // BLOCK_M) * BLOCK_M
            for start_m in range(lo, N_Q, BLOCK_M):
                dk, dv, dk2, dv2 = _dev_dkdv_step(Q, DO, LSE, DELTA, k, v, k2, v2, dk, dv, dk2, dv2, start_m, offs_m0,
                                                  offs_n, offs_d, d_ok, offs_d2, d2_ok, N_Q, sqn, sqd, sdn, sdd,
                                                  qk_scale, CAUSAL, PRECISION, BLOCK_D2, True, MASK_D, N_KV,
                                                  bh, dropout_p, seed, DROPOUT, DQ_ACC, HEAD_DIM, ACC_DQ, MASK_N,
                                                  Mask, mask_m, mask_n, MASK_KIND, DMASK, acc_ds)
        dk = dk * sm_scale
        tl.store(DK + offs_n[:, None] * skn_g + offs_d[None, :] * skd_g, dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + offs_n[:, None] * svn_g + offs_d[None, :] * svd_g, dv.to(DV.dtype.element_ty), mask=kv_mask)
        if BLOCK_D2 > 0:
            tl.store(DK + offs_n[:, None] * skn_g + offs_d2[None, :] * skd_g, (dk2 * sm_scale).to(DK.dtype.element_ty),
                     mask=kv2_mask)
            tl.store(DV + offs_n[:, None] * svn_g + offs_d2[None, :] * svd_g, dv2.to(DV.dtype.element_ty), mask=kv2_mask)

    @triton.jit(do_not_specialize=["row0", "n_rows", "N_CHUNK", "CHUNK_I"])  # per-call ints: one build for any value
    def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, DMASK,
                       sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd, sdb, sdn, sdh, sdd,
                       skb_g, skn_g, skh_g, skd_g, svb_g, svn_g, svh_g, svd_g,
                       H, N_Q, N_KV, N_BUCKET, N_CHUNK, CHUNK_I, row0, n_rows, sm_scale, qk_scale, dropout_p, SEED,
                       Mask, mask_b, mask_w, N_WIN, mask_h, mask_m, mask_n,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, CAUSAL: tl.constexpr,
                       PRECISION: tl.constexpr, SPLIT_TAIL: tl.constexpr, DROPOUT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr):
        # Head dims padded to BLOCK_D, or split into two chunks (BLOCK_D2 > 0, names ending in 2: the second;
        # see SPLIT_HEAD_DIMS).
        # One program owns one key block (BLOCK_N keys of one head) and loops over query blocks:
        # dV = Pᵀ·dO, dK = scale·dSᵀ·Q with dS = P ⊙ (dP − delta). Written once, no atomics.
        # This launch owns keys [row0, row0 + n_rows) (see use_bwd_rows), BLOCK_N of them a program.
        # MASK_KIND 3: dS also goes to DMASK, fp32 (B / N_CHUNK, H, Nq, Nkv), the additive mask's gradient before
        # its broadcast sum: batches come in chunks of N_CHUNK (of one window, with windowed masks: batches w,
        # w + N_WIN, ...), this launch takes member CHUNK_I of each and adds its dS to the chunk's rows, which
        # launch CHUNK_I - 1 wrote (stream order; CHUNK_I = 0 stores): a mask that broadcasts over the batch gets a
        # buffer N_CHUNK times smaller, re-read from L2. (A loop over the chunk inside one program spilled: ptxas,
        # sm_90, 240 bytes at D = 64, against none.) Programs: (B / N_CHUNK)·H a key block; without dS N_CHUNK = 1.
        pid = tl.program_id(0)
        seed = _dev_seed(SEED, DROPOUT)
        num_n = tl.cdiv(n_rows, BLOCK_N)
        pid_n = pid % num_n
        pid_rh = pid // num_n
        h = (pid_rh % H).to(tl.int64)
        r = (pid_rh // H).to(tl.int64)  # chunk row: group chunk r // N_WIN, window r % N_WIN
        b = ((r // N_WIN) * N_CHUNK + CHUNK_I) * N_WIN + r % N_WIN
        bh = b * H + h
        _dev_dkdv_block(Q + b * sqb + h * sqh, K + b * skb + h * skh, V + b * svb + h * svh, DO + b * sdb + h * sdh,
                        LSE + bh * 2 * N_Q, DELTA + bh * N_Q, DK + b * skb_g + h * skh_g, DV + b * svb_g + h * svh_g,
                        LSE, row0 + pid_n * BLOCK_N, N_Q, N_KV, sqn, sqd, skn, skd, svn, svd, sdn, sdd, skn_g, skd_g,
                        svn_g, svd_g, sm_scale, qk_scale, bh, dropout_p, seed, HEAD_DIM, BLOCK_D, BLOCK_D2, CAUSAL,
                        PRECISION, SPLIT_TAIL, DROPOUT, BLOCK_M, BLOCK_N, False, False,
                        _dev_mask_head(Mask, b, h, mask_b, mask_w, N_WIN, mask_h), mask_m, mask_n, MASK_KIND,
                        DMASK + (r * H + h) * N_Q * N_KV, CHUNK_I > 0)

    @triton.jit
    def _dev_dq_acc_pass(DQ_ACC, DQ, N_Q, sqn_g, sqd_g, sm_scale, col0, HEAD_DIM: tl.constexpr, WIDTH: tl.constexpr,
                         BLOCK_M: tl.constexpr, ZERO: tl.constexpr):
        # Head-dim columns col0 .. col0 + WIDTH of one head's fp32 dQ rows (Nq, HEAD_DIM) at DQ_ACC: ZERO stores
        # zeros there, else they go to DQ scaled (its dtype, strides). Past L1 both ways (.cg): other threads
        # of the program wrote or add to these rows.
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = col0 + tl.arange(0, WIDTH)
        d_ok = offs_d < HEAD_DIM
        for start_m in range(0, N_Q, BLOCK_M):
            rows = start_m + offs_m0
            mask = (rows < N_Q)[:, None] & d_ok[None, :]
            acc = DQ_ACC + rows[:, None] * HEAD_DIM + offs_d[None, :]
            if ZERO:
                tl.store(acc, tl.zeros([BLOCK_M, WIDTH], dtype=tl.float32), mask=mask, cache_modifier=".cg")
            else:
                dq = tl.load(acc, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(DQ + rows[:, None] * sqn_g + offs_d[None, :] * sqd_g, (dq * sm_scale).to(DQ.dtype.element_ty),
                         mask=mask)

    @triton.jit
    def _attn_bwd_fused(Q, K, V, DO, Out, LSE, DELTA, DK, DV, DQ, DQ_ACC, DMASK,
                        sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd, sdb, sdn, sdh, sdd,
                        sob, son, soh, sod,
                        skb_g, skn_g, skh_g, skd_g, svb_g, svn_g, svh_g, svd_g, sqb_g, sqn_g, sqh_g, sqd_g,
                        H, N_Q, N_KV, N_BUCKET, sm_scale, qk_scale, dropout_p, SEED,
                        Mask, mask_b, mask_w, N_WIN, mask_h, mask_m, mask_n,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, CAUSAL: tl.constexpr,
                        PRECISION: tl.constexpr, SPLIT_TAIL: tl.constexpr, DROPOUT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr):
        # The whole backward of one head in one program (use_bwd_fused): the dK/dV loop over its key blocks in
        # turn, each query block's dS also giving dQ's share dSᵀ·K, added into DQ_ACC (B·H, Nq, HEAD_DIM) fp32.
        # P and dS are computed once (the split kernels compute them twice) and no program shares a dQ row,
        # so the adds come in key-block order: deterministic (a barrier before the partial last key block, whose
        # code is apart). First delta = rowsum(dO·Out) of the head's rows into DELTA (no preprocess launch) and
        # DQ_ACC zeroed; DQ_ACC is read back at the end into DQ (scaled, DQ's dtype and strides); barriers
        # between, the DQ_ACC reads bypass L1 (.cg).
        pid_bh = tl.program_id(0)
        seed = _dev_seed(SEED, DROPOUT)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        bh = pid_bh.to(tl.int64)
        Q += b * sqb + h * sqh
        K += b * skb + h * skh
        V += b * svb + h * svh
        DO += b * sdb + h * sdh
        Out += b * sob + h * soh
        DK += b * skb_g + h * skh_g
        DV += b * svb_g + h * svh_g
        DQ += b * sqb_g + h * sqh_g
        LSE += bh * 2 * N_Q
        DELTA += bh * N_Q
        DQ_ACC += bh * N_Q * HEAD_DIM
        DMASK += bh * N_Q * N_KV  # (MASK_KIND 3: the mask's gradient, (B·H, Nq, Nkv); else unused)
        Mask = _dev_mask_head(Mask, b, h, mask_b, mask_w, N_WIN, mask_h)
        for start_m in range(0, N_Q, BLOCK_M):
            _dev_delta_block(Out, DO, DELTA, start_m, N_Q, son, sod, sdn, sdd, HEAD_DIM, BLOCK_D, BLOCK_D2, BLOCK_M)
        _dev_dq_acc_pass(DQ_ACC, DQ, N_Q, sqn_g, sqd_g, sm_scale, 0, HEAD_DIM, BLOCK_D, BLOCK_M, True)
        if BLOCK_D2 > 0:
            _dev_dq_acc_pass(DQ_ACC, DQ, N_Q, sqn_g, sqd_g, sm_scale, BLOCK_D, HEAD_DIM, BLOCK_D2, BLOCK_M, True)
        tl.debug_barrier()
        full = (N_KV // BLOCK_N) * BLOCK_N
        for start_n in range(0, full, BLOCK_N):
            _dev_dkdv_block(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, start_n, N_Q, N_KV, sqn, sqd, skn, skd, svn, svd,
                            sdn, sdd, skn_g, skd_g, svn_g, svd_g, sm_scale, qk_scale, bh, dropout_p, seed, HEAD_DIM,
                            BLOCK_D, BLOCK_D2, CAUSAL, PRECISION, SPLIT_TAIL, DROPOUT, BLOCK_M, BLOCK_N, True, False, Mask,
                            mask_m, mask_n, MASK_KIND, DMASK, False)
        tl.debug_barrier()  # the last block's adds come from other code (maybe other threads): after the rest
        for start_n in range(full, N_KV, BLOCK_N):  # at most one block: the keys past the last full one
            _dev_dkdv_block(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, start_n, N_Q, N_KV, sqn, sqd, skn, skd, svn, svd,
                            sdn, sdd, skn_g, skd_g, svn_g, svd_g, sm_scale, qk_scale, bh, dropout_p, seed, HEAD_DIM,
                            BLOCK_D, BLOCK_D2, CAUSAL, PRECISION, SPLIT_TAIL, DROPOUT, BLOCK_M, BLOCK_N, True, True, Mask,
                            mask_m, mask_n, MASK_KIND, DMASK, False)
        tl.debug_barrier()
        _dev_dq_acc_pass(DQ_ACC, DQ, N_Q, sqn_g, sqd_g, sm_scale, 0, HEAD_DIM, BLOCK_D, BLOCK_M, False)
        if BLOCK_D2 > 0:
            _dev_dq_acc_pass(DQ_ACC, DQ, N_Q, sqn_g, sqd_g, sm_scale, BLOCK_D, HEAD_DIM, BLOCK_D2, BLOCK_M, False)

    @triton.jit
    def _dev_dq_step(K, V, q, do, q2, do2, m2, lg, delta, dq, dq2, start_n, offs_m, offs_n0, offs_d, d_ok, offs_d2,
                     d2_ok, N_KV, skn, skd, svn, svd, qk_scale, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_D2: tl.constexpr, MASK_N: tl.constexpr, MASK_D: tl.constexpr, N_Q, bh, dropout_p, seed,
                     DROPOUT: tl.constexpr, Mask, mask_m, mask_n, MASK_KIND: tl.constexpr):
        # One key block of the dQ loop: dq (BM, BD), dq2 (BM, BD2) updated with keys start_n .. start_n +
        # BLOCK_N. MASK_N, MASK_D as in _dev_dkdv_step (keys for queries); placeholders and DROPOUT likewise.
        offs_n = start_n + offs_n0
        n_ok = offs_n < N_KV
        kt = _dev_load(K + offs_n[None, :] * skn + offs_d[:, None] * skd, n_ok[None, :], d_ok[:, None],
                       MASK_N, MASK_D)  # (BD, BN)
        vt = _dev_load(V + offs_n[None, :] * svn + offs_d[:, None] * svd, n_ok[None, :], d_ok[:, None],
                       MASK_N, MASK_D)  # (BD, BN)
        s = tl.dot(q, kt, input_precision=PRECISION)  # (BM, BN)
        dp = tl.dot(do, vt, input_precision=PRECISION)  # (BM, BN)
        if BLOCK_D2 > 0:
            kt2 = _dev_load(K + offs_n[None, :] * skn + offs_d2[:, None] * skd, n_ok[None, :], d2_ok[:, None],
                            MASK_N, True)  # (BD2, BN)
            vt2 = _dev_load(V + offs_n[None, :] * svn + offs_d2[:, None] * svd, n_ok[None, :], d2_ok[:, None],
                            MASK_N, True)
            s = tl.dot(q2, kt2, s, input_precision=PRECISION)
            dp = tl.dot(do2, vt2, dp, input_precision=PRECISION)
        if MASK_KIND != 0:  # the forward's masked logits (see _dev_masked)
            p = tl.exp2((_dev_masked(s, Mask, offs_m[:, None], offs_n[None, :], (offs_m < N_Q)[:, None], n_ok[None, :],
                                     mask_m, mask_n, qk_scale, MASK_KIND) - m2[:, None]) - lg[:, None])
        else:
            p = tl.exp2((s * qk_scale - m2[:, None]) - lg[:, None])  # log2 units
        if MASK_N:
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(keep, p, 0.0)
        if DROPOUT:
            dp = tl.where(_dev_keep(seed, bh, offs_m[:, None], offs_n[None, :], N_Q, N_KV, dropout_p),
                          dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
        if BLOCK_D2 > 0:
            dq2 += tl.dot(ds.to(kt2.dtype), tl.trans(kt2), input_precision=PRECISION)
        return dq, dq2

    @triton.jit(do_not_specialize=["row0", "n_rows"])  # per-call ints: one build for any value
    def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                     sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd, sdb, sdn, sdh, sdd,
                     sqb_g, sqn_g, sqh_g, sqd_g,
                     H, N_Q, N_KV, N_BUCKET, row0, n_rows, sm_scale, qk_scale, dropout_p, SEED,
                     Mask, mask_b, mask_w, N_WIN, mask_h, mask_m, mask_n,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, CAUSAL: tl.constexpr,
                     PRECISION: tl.constexpr, SPLIT_TAIL: tl.constexpr, DROPOUT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr):
        # One program owns one query block and loops over key blocks: dQ = scale·dS·K.
        # Head-dim chunks as in _attn_bwd_dkdv (BLOCK_D2); SPLIT_TAIL as in _dev_dkdv_block.
        # This launch owns query rows [row0, row0 + n_rows), BLOCK_M of them a program.
        pid = tl.program_id(0)
        seed = _dev_seed(SEED, DROPOUT)
        num_m = tl.cdiv(n_rows, BLOCK_M)
        pid_m = pid % num_m
        pid_bh = pid // num_m
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        Q += b * sqb + h * sqh
        K += b * skb + h * skh
        V += b * svb + h * svh
        DO += b * sdb + h * sdh
        DQ += b * sqb_g + h * sqh_g
        LSE += pid_bh.to(tl.int64) * 2 * N_Q
        DELTA += pid_bh.to(tl.int64) * N_Q
        Mask = _dev_mask_head(Mask, b, h, mask_b, mask_w, N_WIN, mask_h)

        start_m = row0 + pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        m_ok = offs_m < N_Q
        q_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=q_mask, other=0.0)  # (BM, BD)
        do = tl.load(DO + offs_m[:, None] * sdn + offs_d[None, :] * sdd, mask=q_mask, other=0.0)  # (BM, BD)
        m2 = tl.load(LSE + offs_m, mask=m_ok, other=0.0)  # (BM,) row max, log2 of the row sum: see STATS
        lg = tl.load(LSE + N_Q + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if BLOCK_D2 > 0:
            offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
            d2_ok = offs_d2 < HEAD_DIM
            q2_mask = m_ok[:, None] & d2_ok[None, :]
            q2 = tl.load(Q + offs_m[:, None] * sqn + offs_d2[None, :] * sqd, mask=q2_mask, other=0.0)  # (BM, BD2)
            do2 = tl.load(DO + offs_m[:, None] * sdn + offs_d2[None, :] * sdd, mask=q2_mask, other=0.0)
            dq2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
        else:  # placeholders (see _dev_dq_step)
            offs_d2, d2_ok, q2, do2, dq2 = offs_d, d_ok, q, do, dq
        MASK_D: tl.constexpr = BLOCK_D2 == 0 and BLOCK_D != HEAD_DIM
        if SPLIT_TAIL and not CAUSAL:
            full = (N_KV // BLOCK_N) * BLOCK_N
            for start_n in range(0, full, BLOCK_N):
                dq, dq2 = _dev_dq_step(K, V, q, do, q2, do2, m2, lg, delta, dq, dq2, start_n, offs_m, offs_n0, offs_d,
                                       d_ok, offs_d2, d2_ok, N_KV, skn, skd, svn, svd, qk_scale, CAUSAL, PRECISION,
                                       BLOCK_D2, False, MASK_D, N_Q, pid_bh.to(tl.int64), dropout_p, seed, DROPOUT,
                                       Mask, mask_m, mask_n, MASK_KIND)
            for start_n in range(full, N_KV, BLOCK_N):  # at most one block
                dq, dq2 = _dev_dq_step(K, V, q, do, q2, do2, m2, lg, delta, dq, dq2, start_n, offs_m, offs_n0, offs_d,
                                       d_ok, offs_d2, d2_ok, N_KV, skn, skd, svn, svd, qk_scale, CAUSAL, PRECISION,
                                       BLOCK_D2, True, MASK_D, N_Q, pid_bh.to(tl.int64), dropout_p, seed, DROPOUT,
                                       Mask, mask_m, mask_n, MASK_KIND)
        else:
            hi = N_KV
            if CAUSAL:
                hi = tl.minimum(start_m + BLOCK_M, N_KV)
            for start_n in range(0, hi, BLOCK_N):
                dq, dq2 = _dev_dq_step(K, V, q, do, q2, do2, m2, lg, delta, dq, dq2, start_n, offs_m, offs_n0, offs_d,
                                       d_ok, offs_d2, d2_ok, N_KV, skn, skd, svn, svd, qk_scale, CAUSAL, PRECISION,
                                       BLOCK_D2, True, MASK_D, N_Q, pid_bh.to(tl.int64), dropout_p, seed, DROPOUT,
                                       Mask, mask_m, mask_n, MASK_KIND)
        dq = dq * sm_scale
        tl.store(DQ + offs_m[:, None] * sqn_g + offs_d[None, :] * sqd_g, dq.to(DQ.dtype.element_ty), mask=q_mask)
        if BLOCK_D2 > 0:
            tl.store(DQ + offs_m[:, None] * sqn_g + offs_d2[None, :] * sqd_g, (dq2 * sm_scale).to(DQ.dtype.element_ty),
                     mask=q2_mask)


# ---------------------------------------------------------------------------------------------
# Tile configs. (BLOCK_M, BLOCK_N, num_warps, num_stages); chosen for N ≈ 200 (ViT), pruned per
# (BLOCK_D, element size) so no config overflows shared memory or piles up fp32 accumulators.

# BLOCK_N = 32 rows: N = 197 = 3·64 + 5 pads its last key block 59 wide at BLOCK_N = 64, 27 wide at 32
# (the autotuner weighs that against the longer loop).
# 128 query rows on one warpgroup (4 warps, two m64 wgmmas a dot): FlexAttention's own H100 default for bf16/fp16 at
# head dim 64 is 128 x 128 x 4 warps x 3 stages (torch/_inductor's h100_default_flex_config); half the programs a
# head of BLOCK_M = 64 (at N = 197: K and V read twice a head from L2, not four times). ptxas (sm_90, bf16, D = 64,
# the split tail loop): 254 registers at 128 x 128 (Triton 3.6 and 3.8; no spills), 255 at 128 x 64 (3.6; 254 on
# 3.8): two programs an SM. Their lagged P·V spills (56-784 bytes): no lag twin (_lag_ok); at 128 x 128, more than
# 64 fp32 scores a thread, head-dim blocks other than 64 are left out (_fits: fp16 at D = 32 spills 36 bytes); and
# sm_80, whose mma.sync keeps the accumulators in registers too, does not take them (_hopper_only: ptxas spills
# 12-284 bytes there). Not yet timed.
_FWD_CONFIGS = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 32, 4, 3),
                (128, 32, 8, 2), (128, 128, 4, 3), (128, 64, 4, 3)]
_DKDV_CONFIGS = [(32, 64, 4, 2), (64, 64, 4, 2), (64, 64, 8, 3), (64, 128, 8, 2)]
_DQ_CONFIGS = [(64, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 3)]
# The fused backward (use_bwd_fused): dK/dV's tiles (BLOCK_M queries streamed past BLOCK_N resident keys); wide key
# blocks add fewer dQ shares (atomics) per dot. ptxas (Triton 3.6, sm_90, bf16, D = 64), instructions a thread a
# block pair (full key blocks), times threads, per score: 24.0 (32x64 w4), 21.3 (64x64 w4; spills 8 bytes),
# 22.4 (32x128 w8), 18.8 (64x128 w8), 37.5 (64x64 w8: left out); the split kernels' best, dK/dV 64x128 w8 + dQ
# 128x64 w8: 15.9 + 10.0 = 25.9. With the split loops (use_bwd_tail): 19.3, 16.9 (spills), 18.1, 13.8 (spills 8
# bytes) against 10.8 + 7.75 = 18.6 (dK/dV 64x64 w4 + dQ 128x64 w8).
# No fallback: where none fits (_fits: 16-bit inputs, head-dim blocks up to 64), the split kernels run.
_FUSED_CONFIGS = [(32, 64, 4, 2), (64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2)]
# Always-valid fallbacks (the big-D fp32 corner) and the single config run in the interpreter.
_FWD_FALLBACK = (32, 32, 4, 1)
_DKDV_FALLBACK = (32, 32, 4, 1)
_DQ_FALLBACK = (32, 32, 4, 1)
_INTERPRET_CONFIG = (32, 32, 4, 1)
# The row split (use_fwd_rows, use_bwd_rows): a kernel's full blocks of MAIN_BLOCK rows (its program rows: query
# rows, keys for dK/dV) in one launch ("<kind>_main": the kind's configs of that block, so the rows it covers do
# not depend on the autotuner's pick), then the remaining rows (N mod 64: 5 at N = 197) in blocks of 16 on one
# or two warps ("<kind>_rows": mma.sync tiles), which cost about 0.4 of the 64-row block the default spends
# on them. The rows kinds have no fallback: a head dim where none fits runs unsplit.
MAIN_BLOCK = 64
_ROWS_CONFIGS = {"fwd": [(16, 64, 1, 2), (16, 32, 1, 3), (16, 64, 2, 2)],
                 "dkdv": [(32, 16, 1, 2), (32, 16, 2, 2), (64, 16, 2, 2)],
                 "dq": [(16, 32, 1, 2), (16, 32, 2, 2), (16, 64, 2, 2)]}
_INTERPRET_MAIN_BLOCK = _INTERPRET_CONFIG[0]  # the interpreter's main blocks, then its rows configs:
_INTERPRET_ROWS_CONFIGS = {"fwd": (16, 32, 1, 1), "dkdv": (32, 16, 1, 1), "dq": (16, 32, 1, 1)}


def _pre_block_m(block_d: int) -> int:
    return min(64, max(16, 4096 // block_d))  # o and dO tiles stay at <= 64 values per thread


_SMEM_BUDGET = 144 * 1024  # below sm_80's 163 KiB, leaves room for the layout conversions


def _block_d(head_dim: int, gpu_operands: Sequence[torch.Tensor] = ()) -> int:
    """The padded head-dim block. ``gpu_operands``: the kernel's tensors on a GPU; blocks narrower than 64 need
    them aligned (as the split's second chunk: see SPLIT_HEAD_DIMS), else 64."""
    block = max(16, 1 << (head_dim - 1).bit_length())
    if block < 64 and gpu_operands and not _split_aligned(*gpu_operands):
        return 64
    return block


# Head dims that are not a power of two, in the backward kernels: pad to the next one and mask
# (BLOCK_D2 = 0), or split into a power-of-two chunk plus a narrower one of at least 32 (80 = 64 + 32 with
# 16 masked, 96 = 64 + 32) so the dots do less padded work. The forward always pads (see _attn_fwd).
# Measured on an H100 with Triton 3.6 (bench/results/2026-11-26-h100-run3, -validate): split 64 + 16,
# D=80 fwd+bwd ran 0.705 ms vs 0.990 ms padded (qkv, B=64, N=257, H=16, bf16), but second chunks of 16
# hit illegal memory accesses in the backward (D=40 = 32 + 16; D=80 on non-contiguous inputs): hence the
# floor of 32. Split 64 + 32 (2026-11-26-h100-run4/ops-experimental.csv, same shape): 0.646 ms against
# 0.999 ms padded, 1.67x SDPA's default (every autotune config of both backward kernels ran there, and
# the GPU split test passed), so 'auto' splits D=80 (ViT-H/14). Other head dims pad until measured.
# On a GPU the split also needs every operand's strides but the head dim's (1) to be multiples of 16 elements
# and 16-byte aligned data: run 5's GPU tests (2026-11-26-h100-run5-tests) hit illegal memory accesses in the
# split backward on exactly the inputs that were not (D=72 heads, strided k/v at D=80), and passed on all
# those that were (see _split_aligned). Triton's Hopper codegen has had such faults with 16- and 32-wide
# dots in kernels of several dots, so padded head-dim blocks narrower than 64 follow the same rule (else 64).
# The interpreter keeps any strides (our indexing is right there).
SPLIT_HEAD_DIMS: Tuple[int, ...] = (80,)
MIN_SPLIT_CHUNK = 32
HEAD_DIM_MODES = ("auto", "split", "pad")
_head_mode: List[str] = []  # innermost use_head_split() last (a plain list: torch.compile guards on it)


def use_head_split(mode: str) -> ContextManager[None]:
    """Force how the backward kernels handle non-power-of-two head dims: 'split', 'pad' or 'auto'
    (SPLIT_HEAD_DIMS) inside a ``with`` block. The forward always pads."""
    if mode not in HEAD_DIM_MODES:
        raise ValueError(f"unknown head-dim mode {mode!r}; expected one of {HEAD_DIM_MODES}")
    return pushed(_head_mode, mode)


# The forward's key loop: every block masked (False), or the full blocks without key masks and the remainder
# in masked blocks of 32 (True, non-causal). ptxas (Triton 3.6, sm_90, bf16, D = 64) counts, per thread, 245
# instructions a 64x32 masked key block, 206 unmasked, 289 a 64x64 unmasked one: N = 197 costs 7 x 245 = 1715
# at the default 64x32 and 3 x 289 + 236 = 1103 split at 64x64. Not yet timed on a GPU: the [tail] bench rows
# measure it (in run 5, fwd+bwd at D = 80 ran slower with the older split, whose remainder was a full block).
# None (the default): where the autotuner runs (a GPU, autotuning on, no forced tile) the form is part of its
# configs (_auto_tails), so it times both and keeps the faster per shape key; elsewhere (the interpreter, fixed
# tiles, the row split's and the fused backward's launches) the masked loop. True / False force one form.
FWD_SPLIT_TAIL: Optional[bool] = None
_fwd_tail: List[bool] = []  # innermost use_fwd_tail() last


def use_fwd_tail(on: bool) -> ContextManager[None]:
    """Force the forward's split key loop on or off (FWD_SPLIT_TAIL) inside a ``with`` block."""
    return pushed(_fwd_tail, bool(on))


# The forward's key loop (the split loop's full blocks, or the masked loop's every block) with each block's P·V
# issued one block late (LAG_PV in _attn_fwd): block j's scores, block j-1's P·V, block j's softmax, so that on
# Hopper the P·V wgmma runs while the softmax's exp2 do (FA3's overlap within a warpgroup). Same sums in the same
# order: bit-equal to the plain loop. ptxas (Triton 3.6 and 3.8, sm_90, bf16, D = 64, 64x64 w4): the loop's P·V
# wgmmas interleaved with its MUFU.EX2s and waited for at the next block's scores; without the lag each block's
# softmax runs between two waits. Costs a (BLOCK_M, BLOCK_N) fp32 p carried a block. With an attention mask or
# dropout both Triton versions make the lagged loop's wgmmas synchronous (each waited right away), so the
# autotuner leaves it out there (_make_prune). Not yet timed on a GPU. None (the default): where the autotuner
# also picks the loop form (SPLIT_TAIL None, _attn_tuned_auto) its configs carry it (_auto_forms); elsewhere off.
# True forces it (with the split loop unless use_fwd_tail forces a form); False keeps it off. Non-causal only (a
# causal forward ignores it).
FWD_LAG_PV: Optional[bool] = None
_fwd_lag: List[bool] = []  # innermost use_fwd_lag() last
LAG_MAX_BLOCK_N = 64  # wider key blocks carry a p of 64+ fp32 a thread next to the scores: left to the plain loop


def _lag_ok(cfg: Tuple[int, int, int, int]) -> bool:
    """Whether the autotuner tries the lagged P·V at forward tile ``cfg``: key blocks up to LAG_MAX_BLOCK_N and at
    most 32 fp32 probabilities a thread carried over (ptxas, Triton 3.6 and 3.8, sm_90: 128 x 64 on 4 warps, 64 a
    thread, spills 56-76 bytes)."""
    bm, bn, warps, _ = cfg
    return bn <= LAG_MAX_BLOCK_N and bm * bn <= 32 * 32 * warps


def use_fwd_lag(on: bool) -> ContextManager[None]:
    """Force the forward's lagged P·V (FWD_LAG_PV; in the split key loop unless use_fwd_tail forces the masked one)
    on or off inside a ``with`` block."""
    return pushed(_fwd_lag, bool(on))


# The persistent forward (PERSIST in _attn_fwd): programs-an-SM x SMs programs, each looping over tiles with the
# next tile's loads in flight (Triton flattens the tile and key loops into one pipelined loop, as the TMA GEMM's
# FLATTEN). For short sequences, where a tile's 3-4 key blocks leave each program's first loads exposed: at N = 197
# the row split, which cut the padded rows, ran slower (2026-11-27-h100-run7: [tail+rows] 0.2164 ms, the default
# 0.1813), so a tile's fixed costs, not its FLOPs, look like the gap to cuDNN (0.1684).
# PERSIST_TILES: head-dim block -> tile -> the programs an SM starts, as many as ptxas's registers and shared memory
# let an SM hold at once; more would leave programs waiting for a whole earlier one (a tail of one program's share
# of the tiles). ptxas, sm_90, bf16, D = 64, Triton 3.8 / 3.6: 64x64 w4s2 137 / 148 registers, 56 KiB (3 an SM by
# registers), 64x64 w4s3 168 / 166, 80 KiB (2 by shared memory), 128x64 w4s3 246 / 254, 104 KiB (2); 128x64 w8s2 is
# left out (3.6: 175 registers on 256 threads, one an SM). Head-dim block 128 (D = 80, ViT-H): 64x64 w4s2 180 / 244,
# 104 KiB, 64x32 w4s3 168 / 228, 104 KiB: 2 an SM each; 64x64 w4s3 (152 KiB) and 128x64 w4s3 (spills 560-628
# bytes) left out there. Blocks under 64 take the 64 table (fewer registers: no more programs than fit), wider ones
# none. Each program loads q into registers at its tile's start (Triton does not stream that load ahead in the
# flattened loop: the other programs on the SM cover it). With an attention mask 64x64 w4s2 takes 231 registers on
# 3.6 at D = 64 (two fit, three start): the autotuner times it like the rest. Hopper only: on sm_80 the same tile
# takes 232 registers (168 for one tile a program) and spills 96 bytes with a mask. 16-bit inputs, non-causal.
# None (the default): where the autotuner picks the loop form (SPLIT_TAIL None) these tiles' persistent form is
# among its configs; True forces it (autotuned among PERSIST_TILES; the interpreter: _INTERPRET_PERSIST programs);
# False leaves it out. Not yet timed on a GPU.
FWD_PERSIST: Optional[bool] = None
_fwd_persist: List[bool] = []  # innermost use_fwd_persist() last
PERSIST_TILES: Dict[int, Dict[Tuple[int, int, int, int], int]] = {
    64: {(64, 64, 4, 3): 2, (64, 64, 4, 2): 3, (128, 64, 4, 3): 2},
    128: {(64, 64, 4, 2): 2, (64, 32, 4, 3): 2}}
_INTERPRET_PERSIST = 2  # the interpreter's programs in all: each loops over several tiles


def use_fwd_persist(on: bool) -> ContextManager[None]:
    """Force the persistent forward (FWD_PERSIST) on or off inside a ``with`` block. On it takes over the loop form
    (the masked one) and the row split; on a GPU it runs where ``persistent_forward_fits``, elsewhere the default."""
    return pushed(_fwd_persist, bool(on))


def persist_tiles(block_d: int) -> Dict[Tuple[int, int, int, int], int]:
    """The persistent forward's tiles -> programs an SM at head-dim block ``block_d`` (PERSIST_TILES; blocks under
    64 take its 64 table)."""
    return PERSIST_TILES.get(max(block_d, 64), {})


def persistent_forward_fits(head_dim: int, dtype: torch.dtype, causal: bool = False,
                            device: Optional[torch.device] = None) -> bool:
    """Whether a GPU may run the persistent forward (use_fwd_persist) at ``head_dim``, ``dtype``: 16-bit inputs, a
    head-dim block PERSIST_TILES has, non-causal, and (``device`` a CUDA device) sm_90 or later. The interpreter
    runs it at any."""
    if device is not None and device.type == "cuda" and cuda_major(device) < 9:
        return False
    return not causal and dtype in (torch.float16, torch.bfloat16) and bool(persist_tiles(_block_d(head_dim)))


# The backward's loops likewise (non-causal): dK/dV's over query blocks and dQ's over key blocks run their full
# blocks without row masks and the partial last one apart. ptxas (Triton 3.6, sm_90, bf16, D = 64) counts
# 298 instructions a thread for dK/dV's masked 32x64 query block (w4s2), about 70 of them masks. Not yet timed
# on a GPU: the [tail] bench rows turn both on (its forward rows then tell the two apart). None: as the forward's.
BWD_SPLIT_TAIL: Optional[bool] = None
_bwd_tail: List[bool] = []  # innermost use_bwd_tail() last


def use_bwd_tail(on: bool) -> ContextManager[None]:
    """Force the backward's split loops on or off (BWD_SPLIT_TAIL) inside a ``with`` block."""
    return pushed(_bwd_tail, bool(on))


# The row split: each kernel's programs in one launch of BLOCK_M (dK/dV: BLOCK_N) rows each over all rows (False),
# or (True) full blocks of MAIN_BLOCK rows, then a second launch for the rest in 16-row blocks (_ROWS_CONFIGS).
# At N = 197 the default's fourth 64-row block computes 5 rows; split, they cost about 0.4 of a block (one
# warp: a quarter of the threads, mma.sync). Not yet timed on a GPU: the bench rows tagged [tail+rows].
FWD_ROW_SPLIT = False
BWD_ROW_SPLIT = False
_fwd_rows: List[bool] = []  # innermost use_fwd_rows() last
_bwd_rows: List[bool] = []


# The fused backward: one program a head runs the dK/dV loop over all its key blocks and adds each query block's
# dQ share (dSᵀ·K) into an fp32 (B·H, Nq, D) buffer, so P and dS are computed once instead of twice (5 dots a
# block pair instead of 7, one exp2 pass instead of two; one launch instead of three, delta included) at the
# price of the adds (one atomic a dQ value a key block, in a fixed order: deterministic) and B·H programs (ViT-B
# at batch 128: 1536, about 12 an SM). Not yet timed on a GPU: the bench rows tagged [fused].
BWD_FUSED = False
_bwd_fused: List[bool] = []  # innermost use_bwd_fused() last


def use_bwd_fused(on: bool) -> ContextManager[None]:
    """Force the fused backward (BWD_FUSED) on or off inside a ``with`` block; it takes over from the row split
    (use_bwd_rows) and keeps the loop form (use_bwd_tail). On a GPU it runs where ``fused_backward_fits``."""
    return pushed(_bwd_fused, bool(on))


def fused_backward_fits(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether a GPU runs the fused backward (use_bwd_fused) at ``head_dim`` and ``dtype`` (a tile of it fits:
    16-bit inputs, head-dim blocks up to 64); elsewhere the split kernels run. The interpreter runs it always."""
    return bool(_configs_for("fused", sum(_split_dims(head_dim)), torch.empty((), dtype=dtype).element_size()))


def use_fwd_rows(on: bool) -> ContextManager[None]:
    """Force the forward's row split (FWD_ROW_SPLIT) on or off inside a ``with`` block; use_tile_config
    turns it off (one config for every launch)."""
    return pushed(_fwd_rows, bool(on))


def use_bwd_rows(on: bool) -> ContextManager[None]:
    """Force the backward's row split (BWD_ROW_SPLIT: dK/dV's keys, dQ's query rows) on or off inside a
    ``with`` block, as use_fwd_rows."""
    return pushed(_bwd_rows, bool(on))


def _split_aligned(*ts: torch.Tensor) -> bool:
    """Every (B, N, H, D) operand: head-dim stride 1, the other strides multiples of 16 elements, 16-byte aligned
    data (where the GPU split backward has run clean; see SPLIT_HEAD_DIMS)."""
    return all(t.stride(3) == 1 and t.stride(0) % 16 == 0 and t.stride(1) % 16 == 0 and t.stride(2) % 16 == 0
               and t.data_ptr() % 16 == 0 for t in ts)


def _split_dims(head_dim: int, gpu_operands: Sequence[torch.Tensor] = ()) -> Tuple[int, int]:
    """Backward (BLOCK_D, BLOCK_D2) for ``head_dim`` under the mode in force: BLOCK_D2 = 0 means padded.
    ``gpu_operands``: the backward's tensors on a GPU; a split needs them aligned (_split_aligned)."""
    full = _block_d(head_dim, gpu_operands)
    mode = _head_mode[-1] if _head_mode else "auto"
    if mode == "pad" or (mode == "auto" and head_dim not in SPLIT_HEAD_DIMS):
        return full, 0
    if gpu_operands and not _split_aligned(*gpu_operands):
        return full, 0
    d1 = 1 << (head_dim.bit_length() - 1)  # the largest power of two <= head_dim
    d2 = max(MIN_SPLIT_CHUNK, 1 << max(0, (head_dim - d1 - 1).bit_length()))
    if d1 == head_dim or d1 < 16 or d1 + d2 >= full:
        return full, 0  # nothing to save
    return d1, d2


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _fits(kind: str, cfg: Tuple[int, int, int, int], block_d: int, elsize: int) -> bool:
    """Shared memory for the streamed tiles, and registers per thread for fp32 accumulators + resident tiles."""
    bm, bn, warps, stages = cfg
    if kind.endswith("_rows") and (elsize == 4 or (warps == 1 and block_d > 64)):
        return False  # fp32 (one warp's dots on FMAs, tiles in registers) or wide heads on one warp: spills (ptxas)
    if kind == "fused" and (elsize == 4 or block_d > 64):
        return False  # ptxas (Triton 3.6, sm_90): fp32 and wider heads spill (80 = 64 + 32 at 32x128 w8: 24 B)
    if kind == "fwd" and bm * bn > 64 * 32 * warps and block_d != 64:
        return False  # over 64 fp32 scores a thread (128 x 128 on 4 warps): measured clean at D = 64 only
    if kind.startswith("fwd"):  # q resident; k, v streamed; acc (BM, BD) fp32
        smem = elsize * block_d * (bm + 2 * stages * bn) + elsize * bm * bn
        regs = bm * block_d * (4 + elsize) // 4
    elif kind.startswith(("dkdv", "fused")):  # k, v resident; q, dO streamed; dk, dv (BN, BD) fp32
        smem = elsize * block_d * (2 * bn + 2 * stages * bm) + elsize * bm * bn
        regs = 2 * bn * block_d * (4 + elsize) // 4
    else:  # dq: q, dO resident; k, v streamed; dq (BM, BD) fp32
        smem = elsize * block_d * (2 * bm + 2 * stages * bn) + elsize * bm * bn
        regs = bm * block_d * (4 + 2 * elsize) // 4
    return smem <= _SMEM_BUDGET and regs // (warps * 32) <= 160


def _hopper_only(kind: str, cfg: Tuple[int, int, int, int]) -> bool:
    """A forward tile only sm_90+ takes: more than 16 query rows a warp (a warpgroup's m64 wgmmas; _FWD_CONFIGS)."""
    return kind == "fwd" and cfg[0] > 16 * cfg[2]


def _prog_rows(kind: str, cfg: Tuple[int, int, int, int]) -> int:
    """Rows a program of ``kind`` owns under ``cfg``: BLOCK_N (keys) for dK/dV, else BLOCK_M (the fused backward's
    programs own a head each: it launches over one 'row')."""
    return cfg[1] if kind.startswith("dkdv") else cfg[0]


def _table(kind: str) -> Tuple[List[Tuple[int, int, int, int]], Optional[Tuple[int, int, int, int]]]:
    """(configs, fallback) of a kernel kind: 'fwd', 'dkdv', 'dq', one of those + '_main' / '_rows' (the row
    split's two launches, without fallback), or 'fused' (use_bwd_fused)."""
    base, _, part = kind.partition("_")
    configs, fallback = {"fwd": (_FWD_CONFIGS, _FWD_FALLBACK), "dkdv": (_DKDV_CONFIGS, _DKDV_FALLBACK),
                         "dq": (_DQ_CONFIGS, _DQ_FALLBACK), "fused": (_FUSED_CONFIGS, None)}[base]
    if part == "main":
        return [c for c in configs if _prog_rows(base, c) == MAIN_BLOCK], None
    if part == "rows":
        return _ROWS_CONFIGS[base], None
    return configs, fallback


def _configs_for(kind: str, block_d: int, elsize: int) -> List[Tuple[int, int, int, int]]:
    configs, fallback = _table(kind)
    ok = [c for c in configs if _fits(kind, c, block_d, elsize)]
    return ok or ([fallback] if fallback else [])


def _make_prune(kind: str, ptr_name: str):
    def prune(configs, named_args, **kwargs):
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D")) + kwargs.get("BLOCK_D2", named_args.get("BLOCK_D2", 0))
        t = named_args[ptr_name]
        hopper = t.device.type != "cuda" or cuda_major(t.device) >= 9
        want = {c for c in _configs_for(kind, block_d, t.element_size()) if hopper or not _hopper_only(kind, c)}
        causal = kwargs.get("CAUSAL", named_args.get("CAUSAL"))
        # the lagged P·V compiles to synchronous wgmmas with a mask or dropout (Triton 3.6, 3.8): nothing to gain
        lag_ok = not kwargs.get("MASK_KIND", named_args.get("MASK_KIND")) and \
            not kwargs.get("DROPOUT", named_args.get("DROPOUT"))
        # the persistent forward: non-causal, 16-bit on Hopper, each tile at its programs an SM for this head-dim
        # block (persist_tiles)
        persist_ok = not causal and (t.device.type != "cuda" or (hopper and t.element_size() == 2))
        progs = persist_tiles(block_d)
        kept, tiles = [], set()
        for c in configs:
            tile = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            if c.kwargs.get("LAG_PV") and not lag_ok:
                continue
            if c.kwargs.get("PERSIST") and not (persist_ok and progs.get(tile) == c.kwargs["PERSIST"]):
                continue
            if tile in want and not (causal and tile in tiles):  # causal kernels ignore SPLIT_TAIL: one form a tile
                kept.append(c)
                tiles.add(tile)
        return kept
    return prune


def _triton_configs(kind: str) -> list:
    configs, fallback = _table(kind)
    allc = list(dict.fromkeys(configs + ([fallback] if fallback else [])))
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in allc]


# The loop forms the autotuner tries per tile where the form is its choice (FWD_SPLIT_TAIL / BWD_SPLIT_TAIL None).
# The forward's masked loop at 64- or 128-wide key blocks pads the remainder to a full block and masks every
# block: ptxas counts more instructions than its split form at every N (see FWD_SPLIT_TAIL), so only the split
# form is tried there; at 32-wide key blocks (run 6's pick at every shape) both. The backward's split form runs
# the same blocks with fewer masks, but run 6's picks (below) ran masked: both forms for those tiles, the split
# form alone for the others. Same number of forward configs as before; two more a backward kernel.
_RUN6_BWD_PICKS = {"dkdv": {(32, 64, 4, 2), (64, 64, 4, 2)}, "dq": {(128, 32, 8, 3), (64, 64, 4, 2)}}
AUTO_TAIL_KINDS = ("fwd", "dkdv", "dq")


def _auto_tails(kind: str, cfg: Tuple[int, int, int, int]) -> Tuple[bool, ...]:
    if kind == "fwd":
        return (False, True) if cfg[1] < 64 else (True,)
    return (False, True) if cfg in _RUN6_BWD_PICKS[kind] else (True,)


def _auto_forms(kind: str, cfg: Tuple[int, int, int, int]) -> List[Dict[str, bool]]:
    """The loop forms the autotuner tries at a tile: SPLIT_TAIL (_auto_tails), and for the forward LAG_PV too
    (each form lagged and not at key blocks up to LAG_MAX_BLOCK_N; FWD_LAG_PV) and the persistent form at
    PERSIST_TILES (FWD_PERSIST; PERSIST its programs an SM, one form for each head-dim block's count, else 0)."""
    if kind != "fwd":
        return [{"SPLIT_TAIL": t} for t in _auto_tails(kind, cfg)]
    lags = (False, True) if _lag_ok(cfg) else (False,)
    forms = [{"SPLIT_TAIL": t, "LAG_PV": lag, "PERSIST": 0} for t in _auto_tails(kind, cfg) for lag in lags]
    for progs in sorted({table[cfg] for table in PERSIST_TILES.values() if cfg in table}):
        forms.append({"SPLIT_TAIL": False, "LAG_PV": False, "PERSIST": progs})
    return forms


def _triton_auto_configs(kind: str) -> list:
    """``kind``'s configs with the loop form among their parameters (_auto_forms; the fallback masked only)."""
    configs, fallback = _table(kind)
    forms = [(c, f) for c in configs for f in _auto_forms(kind, c)]
    if fallback and fallback not in configs:
        forms.append((fallback, {"SPLIT_TAIL": False, **({"LAG_PV": False, "PERSIST": 0} if kind == "fwd" else {})}))
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **f}, num_warps=w, num_stages=s)
            for (bm, bn, w, s), f in forms]


# The autotuner adds the tensor dtypes itself. SPLIT_TAIL and DROPOUT are in the key: each form of the kernels
# gets its own tile (runs 5 and 6 timed [tail] with the tile the default loop had picked); where SPLIT_TAIL is
# the autotuner's own choice (_attn_tuned_auto), it is in the configs instead.
_KEY = ["N_BUCKET", "HEAD_DIM", "BLOCK_D2", "CAUSAL", "PRECISION", "SPLIT_TAIL", "DROPOUT", "MASK_KIND"]
_FWD_KEY = [k for k in _KEY if k != "BLOCK_D2"] + ["LAG_PV"]  # the forward never splits: it has no BLOCK_D2
KINDS = tuple(f"{base}{part}" for base in ("fwd", "dkdv", "dq") for part in ("", "_main", "_rows")) + ("fused",)


def _kernel(kind: str):
    return {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq,
            "fused": _attn_bwd_fused}[kind.partition("_")[0]]


# kind -> its autotuned Launcher (looked up per call: tests swap in one-config launchers)
_attn_tuned: Dict[str, Launcher] = {}
if HAS_TRITON and not INTERPRET:
    _attn_tuned = {kind: Launcher(triton.autotune(
        _triton_configs(kind), key=_FWD_KEY if kind.startswith("fwd") else _KEY,
        prune_configs_by={"early_config_prune": _make_prune(kind, "Q")})(_kernel(kind))) for kind in KINDS}
_attn_tuned_auto: Dict[str, Launcher] = {}  # kind -> the autotuner that also picks the loop form (SPLIT_TAIL)
if HAS_TRITON and not INTERPRET:
    _attn_tuned_auto = {kind: Launcher(triton.autotune(
        _triton_auto_configs(kind),
        key=[k for k in (_FWD_KEY if kind == "fwd" else _KEY) if k not in ("SPLIT_TAIL", "LAG_PV")],
        prune_configs_by={"early_config_prune": _make_prune(kind, "Q")})(_kernel(kind))) for kind in AUTO_TAIL_KINDS}
# The forward's loop form picked without the lag (use_fwd_lag(False) with the form left to the autotuner): the
# same configs less the lagged ones, LAG_PV (False) passed by the launch.
_attn_tuned_auto_nolag: Dict[str, Launcher] = {}
if HAS_TRITON and not INTERPRET:
    _attn_tuned_auto_nolag = {"fwd": Launcher(triton.autotune(
        [triton.Config({k: v for k, v in c.kwargs.items() if k != "LAG_PV"}, num_warps=c.num_warps,
                       num_stages=c.num_stages) for c in _triton_auto_configs("fwd") if not c.kwargs["LAG_PV"]],
        key=[k for k in _FWD_KEY if k != "SPLIT_TAIL"],
        prune_configs_by={"early_config_prune": _make_prune("fwd", "Q")})(_attn_fwd))}

_attn_tuned_fwd: Dict[Tuple[bool, bool], Launcher] = {}  # (lag allowed, persistent) -> the forward's tuner


def _fwd_persist_tuner(lag: bool, persist: bool) -> Launcher:
    """The forward autotuner over _auto_forms' configs with the persistent form forced on (``persist``: those
    alone) or off (the others; ``lag`` False: without the lagged ones), built on first use."""
    tuner = _attn_tuned_fwd.get((lag, persist))
    if tuner is None:
        cfgs = [c for c in _triton_auto_configs("fwd")
                if bool(c.kwargs["PERSIST"]) == persist and (lag or not c.kwargs["LAG_PV"])]
        tuner = _attn_tuned_fwd[(lag, persist)] = Launcher(triton.autotune(
            cfgs, key=[k for k in _FWD_KEY if k not in ("SPLIT_TAIL", "LAG_PV")],
            prune_configs_by={"early_config_prune": _make_prune("fwd", "Q")})(_attn_fwd))
    return tuner


if HAS_TRITON:
    _PREPROCESS = Launcher(_attn_bwd_preprocess)


_autotune = True
_forced_tiles: List[Tuple[int, int, int, int]] = []  # use_tile_config: innermost last


def set_autotune(enabled: bool) -> None:
    """Off: on a GPU each kernel runs the first of its tile configs that fits (one compile per shape key instead
    of one per config: tests, debugging); on (the default): the autotuner picks."""
    global _autotune
    _autotune = bool(enabled)


def use_tile_config(cfg: Tuple[int, int, int, int]) -> ContextManager[None]:
    """Run every attention kernel with ``cfg`` = (BLOCK_M, BLOCK_N, num_warps, num_stages) inside a ``with``
    block, on a GPU and in the interpreter alike (tests, debugging). On a GPU a config whose tiles do not fit
    the shape's head dim and dtype (shared memory, registers: the autotuner's pruning) raises at launch."""
    if len(cfg) != 4 or not all(isinstance(v, int) and v > 0 for v in cfg) or any(v & (v - 1) for v in cfg[:3]):
        raise ValueError(f"a tile config is (BLOCK_M, BLOCK_N, num_warps, num_stages), the first three powers of "
                         f"two, got {cfg!r}")
    return pushed(_forced_tiles, tuple(cfg))


def _fixed_config(kind: str, consts: Dict[str, object], elsize: int) -> Tuple[int, int, int, int]:
    """The one config when not autotuning: use_tile_config's, the interpreter's, or the first that fits."""
    block_d = int(consts["BLOCK_D"]) + int(consts.get("BLOCK_D2", 0))
    if _forced_tiles:
        cfg = _forced_tiles[-1]
        if not INTERPRET and not _fits(kind, cfg, block_d, elsize):
            raise ValueError(f"tile config {cfg} does not fit the {kind} kernel at head-dim block {block_d}, "
                             f"{elsize}-byte elements")
        return cfg
    if INTERPRET:
        base, _, part = kind.partition("_")
        return _INTERPRET_ROWS_CONFIGS[base] if part == "rows" else _INTERPRET_CONFIG
    return _configs_for(kind, block_d, elsize)[0]


def _persist_programs(cfg: Tuple[int, int, int, int], block_d: int) -> int:
    """Programs an SM of a forced persistent forward at fixed tile ``cfg`` (the interpreter: in all)."""
    return _INTERPRET_PERSIST if INTERPRET else persist_tiles(block_d).get(cfg, 1)


def _launch(kind: str, grid_rows: int, bh: int, args: tuple, consts: Dict[str, object]) -> None:
    """Launch a kernel ``kind`` (KINDS) over ``grid_rows`` program rows (keys for dK/dV) of ``bh`` heads, with
    the autotuner on a GPU, or with one fixed config (the interpreter, set_autotune(False), use_tile_config).
    ``consts["SPLIT_TAIL"]`` None: the autotuner picks the loop form too (AUTO_TAIL_KINDS), else the masked one;
    ``consts["LAG_PV"]`` (forward kinds) None likewise, else off; forced off with the form the autotuner's: its
    configs without the lag (_attn_tuned_auto_nolag). ``consts["PERSIST"]`` (forward kinds) None likewise (the
    'fwd' kind only), True / False: the persistent form forced on / off (use_fwd_persist)."""
    fixed = INTERPRET or _forced_tiles or not _autotune
    consts = dict(consts)
    persist = consts.pop("PERSIST", None)
    if kind != "fwd":  # (the row split's launches and the backward's: no persistent form)
        persist = False
    if persist:  # the persistent form runs the masked loop, its configs carry the rest
        consts["SPLIT_TAIL"], consts["LAG_PV"] = False, False
    if consts["SPLIT_TAIL"] is None:
        if not fixed and kind in _attn_tuned_auto:
            del consts["SPLIT_TAIL"]
        else:
            consts["SPLIT_TAIL"] = False
    if consts.get("LAG_PV", False) is None:
        if "SPLIT_TAIL" in consts:
            consts["LAG_PV"] = False
        else:
            del consts["LAG_PV"]
    def sms() -> int:  # read only for a persistent launch (a cached read, but not on every launch's path)
        return sm_count(args[0].device) if args[0].is_cuda and not INTERPRET else 1

    if fixed:
        cfg = _fixed_config(kind, consts, args[0].element_size())
        progs = cdiv(grid_rows, _prog_rows(kind, cfg)) * bh
        if kind.startswith("fwd"):
            consts["PERSIST"] = _persist_programs(cfg, int(consts["BLOCK_D"])) if persist else 0
            progs = min(progs, consts["PERSIST"] * sms()) if persist else progs
        launch(_kernel(kind), (progs,), *args, **consts, BLOCK_M=cfg[0], BLOCK_N=cfg[1], num_warps=cfg[2],
               num_stages=cfg[3])
        return

    def grid(meta):
        progs = cdiv(grid_rows, meta["BLOCK_N"] if kind.startswith("dkdv") else meta["BLOCK_M"]) * bh
        return (min(progs, meta["PERSIST"] * sms()) if meta.get("PERSIST") else progs,)

    if persist:
        tuned = _fwd_persist_tuner(False, True)
        del consts["SPLIT_TAIL"], consts["LAG_PV"]
    elif "SPLIT_TAIL" in consts:
        tuned = _attn_tuned[kind]
        if kind.startswith("fwd"):
            consts["PERSIST"] = 0
    elif persist is False and kind == "fwd":  # the persistent form forced off, the loop form the autotuner's
        tuned = _fwd_persist_tuner("LAG_PV" not in consts, False)
        consts.pop("LAG_PV", None)
    elif consts.get("LAG_PV") is False:  # the lag forced off, the loop form the autotuner's
        tuned = _attn_tuned_auto_nolag[kind]
    else:
        tuned = _attn_tuned_auto[kind]
    tuned(grid, args, consts)


def _launch_rows(kind: str, n: int, bh: int, head: tuple, tail: tuple, consts: Dict[str, object],
                 split: bool) -> None:
    """Launch ``kind`` over ``n`` program rows: ``head`` + (row0, n_rows) + ``tail`` are its arguments. With
    ``split`` (use_fwd_rows / use_bwd_rows), full MAIN_BLOCK blocks and the rest go to two launches."""
    main = _main_rows(kind, n, int(consts["BLOCK_D"]) + int(consts.get("BLOCK_D2", 0)), head[0].element_size()) \
        if split else None
    if main is None:
        _launch(kind, n, bh, (*head, 0, n, *tail), consts)
        return
    if main:
        _launch(kind + "_main", main, bh, (*head, 0, main, *tail), consts)
    if main < n:
        _launch(kind + "_rows", n - main, bh, (*head, main, n - main, *tail), consts)


def _main_rows(kind: str, n: int, block_d: int, elsize: int) -> Optional[int]:
    """The program rows the row split's main launch covers (full blocks; the rest go to 16-row blocks), or None:
    one launch over every row (forced tiles, or no config of the main or the rows launch fits this head dim)."""
    if _forced_tiles:
        return None
    if INTERPRET:
        bm = _INTERPRET_MAIN_BLOCK
    elif all(any(_fits(k, c, block_d, elsize) for c in _table(k)[0]) for k in (kind + "_main", kind + "_rows")):
        bm = MAIN_BLOCK
    else:
        return None
    return (n // bm) * bm


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if (dtype == torch.float32 and allow_tf32) else "ieee"


def _strides(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.stride())


# ---------------------------------------------------------------------------------------------
# Launchers on (B, N, H, D) views (any strides). Outputs may be passed in (strided views into a
# packed buffer, or poisoned tensors in tests); every element is written.

def _mask_kind(mask: Optional[torch.Tensor]) -> int:
    """The kernels' MASK_KIND: 0 no attention mask, 1 additive (float), 2 boolean."""
    return 0 if mask is None else 2 if mask.dtype == torch.bool else 1


def _mask_args(mask: Optional[torch.Tensor], placeholder: torch.Tensor) -> tuple:
    """The kernels' (Mask, mask_b, mask_w, N_WIN, mask_h, mask_m, mask_n) for a (B, H, Nq, Nkv) mask view or a
    windowed (B / W, W, H, Nq, Nkv) one (see _dev_mask_head), or placeholders."""
    if mask is None:
        return placeholder, 0, 0, 1, 0, 0, 0
    if mask.dim() == 5:
        return (mask, mask.stride(0), mask.stride(1), mask.shape[1], *mask.stride()[2:])
    return (mask, mask.stride(0), 0, 1, *mask.stride()[1:])


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
                  allow_tf32: bool = False, out: Optional[torch.Tensor] = None,
                  lse: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                  seed: Seed = None, mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward kernel launch: returns (o (B, Nq, H, D), stats (B, H, 2, Nq) fp32: see STATS). ``dropout_p`` > 0:
    attention dropout with the mask ``seed`` draws (dropout_mask gives it; see _seed_arg). ``mask``: an
    attention mask as a (B, H, Nq, Nkv) view (stride 0 where it broadcasts) or a windowed (B / W, W, H, Nq,
    Nkv) one (batch b at window b % W), bool (True: attend) or float (added to the scaled logits); the stats
    then are the masked softmax's."""
    if not _kernel_scale(softmax_scale):
        raise ValueError(f"the attention kernels take a finite softmax_scale > 0, got {softmax_scale}")
    _check_dropout(dropout_p)
    B, NQ, H, D = q.shape
    NKV = k.shape[1]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((B, H, 2, NQ), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    gpu = () if INTERPRET or not q.is_cuda else (q, k, v, out)
    split_tail = _fwd_tail[-1] if _fwd_tail else FWD_SPLIT_TAIL
    lag = _fwd_lag[-1] if _fwd_lag else FWD_LAG_PV
    persist = _fwd_persist[-1] if _fwd_persist else FWD_PERSIST
    if persist and (causal or (gpu and not persistent_forward_fits(D, q.dtype, device=q.device))):
        persist = None  # no persistent form here: the default's (the autotuner's prune leaves it out too)
    if persist:
        split_tail, lag = False, False  # the persistent form's loop (see _attn_fwd)
    elif lag and split_tail is None:
        split_tail = True  # a forced lag, the loop form not forced: the split loop
    elif lag is None and split_tail is not None:
        lag = False  # a forced loop form: the autotuner's configs do not carry the lag
    consts = dict(HEAD_DIM=D, BLOCK_D=_block_d(D, gpu), CAUSAL=bool(causal), PRECISION=_precision(q.dtype, allow_tf32),
                  SPLIT_TAIL=split_tail, DROPOUT=dropout_p > 0.0, MASK_KIND=_mask_kind(mask), LAG_PV=lag,
                  PERSIST=persist)
    head = (q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out), H, NQ, NKV, _bucket(NKV))
    tail = (float(softmax_scale) * LOG2E, float(dropout_p), _seed_arg(seed, q.device), *_mask_args(mask, q), B * H)
    rows = (_fwd_rows[-1] if _fwd_rows else FWD_ROW_SPLIT) and not persist  # (the persistent form takes over)
    _launch_rows("fwd", NQ, B * H, head, tail, consts, rows)
    return out, lse


def stats_lse(stats: torch.Tensor) -> torch.Tensor:
    """The natural-log LSE of the scaled logits, (B, H, Nq), from the forward's stats (B, H, 2, Nq) (see STATS)."""
    return (stats[:, :, 0] + stats[:, :, 1]) / LOG2E


_MASK_BLOCK = (32, 32)


def dropout_mask(batch: int, heads: int, n_q: int, n_kv: int, dropout_p: float, seed: Seed,
                 device: torch.device) -> torch.Tensor:
    """The keep mask (B, H, Nq, Nkv) bool the attention kernels draw for ``dropout_p`` and ``seed`` (an int, or
    the one-element int64 tensor on ``device`` the op drew; the same Philox draws: tests, debugging). Needs
    Triton on ``device`` (a GPU, or the interpreter on CPU)."""
    _check_dropout(dropout_p)
    if not HAS_TRITON:
        raise RuntimeError("dropout_mask needs Triton")
    mask = torch.empty((batch, heads, n_q, n_kv), dtype=torch.int8, device=device)
    if mask.numel():
        bm, bn = _MASK_BLOCK
        launch(_dropout_mask_kernel, (cdiv(n_q, bm) * cdiv(n_kv, bn) * batch * heads,),
               mask, n_q, n_kv, float(dropout_p), _seed_arg(seed, mask.device), BLOCK_M=bm, BLOCK_N=bn)
    return mask.bool()


def _check_dropout(dropout_p: float) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"the attention kernels take 0 <= dropout_p < 1, got {dropout_p}")


_ZERO_SEED: Dict[torch.device, torch.Tensor] = {}


def _seed_arg(seed: Seed, device: torch.device) -> torch.Tensor:
    """The kernels' SEED operand, a one-element int64 tensor on ``device`` that they read (with dropout only):
    a tensor as given (the op's device draw, _draw_seed); an int copied there (tests, dropout_mask); None is
    seed 0, one cached tensor a device (no allocation a call)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != device:
            raise ValueError(f"seed must be a one-element int64 tensor on {device}, got {seed.numel()} "
                             f"{seed.dtype} element(s) on {seed.device}")
        return seed
    if seed is None:
        t = _ZERO_SEED.get(device)
        if t is None:
            t = _ZERO_SEED[device] = torch.zeros(1, dtype=torch.int64, device=device)
        return t
    return torch.tensor([int(seed)], dtype=torch.int64, device=device)


def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, softmax_scale: float, causal: bool, allow_tf32: bool = False,
                  dq: Optional[torch.Tensor] = None, dk: Optional[torch.Tensor] = None,
                  dv: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                  seed: Seed = None, mask: Optional[torch.Tensor] = None, dmask: Optional[torch.Tensor] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward kernel launches: preprocess delta, then dK/dV and dQ (or the fused kernel alone: use_bwd_fused).
    Returns (dq, dk, dv). ``dropout_p``, ``seed`` and ``mask`` (a view as attention_fwd takes it): the forward's.
    ``dmask`` (a float mask's gradient wanted): a contiguous fp32 (B / C, H, Nq, Nkv) buffer the dK/dV kernel
    writes dS into, every element, summed over chunks of C batches (C dividing the batch, or the groups of a
    windowed mask, where the mask broadcasts over them: _mask_grad_buffer; the split backward then) before
    _mask_grad sums the rest."""
    _check_dropout(dropout_p)
    B, NQ, H, D = q.shape
    NKV = k.shape[1]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    chunk = 1
    if dmask is not None:
        groups = B // mask.shape[1] if mask is not None and mask.dim() == 5 else B
        if (mask is None or mask.dtype == torch.bool or dmask.dtype != torch.float32 or not dmask.is_contiguous()
                or dmask.dim() != 4 or dmask.shape[1:] != (H, NQ, NKV) or dmask.shape[0] < 1
                or B % dmask.shape[0] or groups % (B // dmask.shape[0])):
            raise ValueError("dmask is a float mask's gradient: a contiguous fp32 (B / C, H, Nq, Nkv) buffer, C "
                             "dividing the batch (a windowed mask's groups)")
        chunk = B // dmask.shape[0]
    if q.numel() == 0 or k.numel() == 0:
        if dmask is not None:
            dmask.zero_()
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    bd, bd2 = _split_dims(D, () if INTERPRET or not q.is_cuda else (q, k, v, do, dq, dk, dv))
    consts = dict(HEAD_DIM=D, BLOCK_D=bd, BLOCK_D2=bd2, CAUSAL=bool(causal), PRECISION=_precision(q.dtype, allow_tf32),
                  SPLIT_TAIL=_bwd_tail[-1] if _bwd_tail else BWD_SPLIT_TAIL, DROPOUT=dropout_p > 0.0,
                  MASK_KIND=_mask_kind(mask))
    scale = float(softmax_scale)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    tail = (scale, scale * LOG2E, float(dropout_p), _seed_arg(seed, q.device), *_mask_args(mask, q))
    grad_consts = consts if dmask is None else dict(consts, MASK_KIND=3)  # the dK/dV kernels store dS
    dm = lse if dmask is None else dmask  # (an fp32 placeholder)
    fused = (_bwd_fused[-1] if _bwd_fused else BWD_FUSED) and chunk == 1  # (dS chunks: the split kernels)
    if fused and (INTERPRET or _configs_for("fused", bd + bd2, q.element_size())):
        acc = torch.empty((B * H, NQ, D), dtype=torch.float32, device=q.device)  # dQ, fp32, before the scale
        _launch("fused", 1, B * H, (q, k, v, do, o, lse, delta, dk, dv, dq, acc, dm, *common, *_strides(o),
                                    *_strides(dk), *_strides(dv), *_strides(dq), H, NQ, NKV, _bucket(NKV), *tail),
                grad_consts)
        return dq, dk, dv
    block_d = _block_d(D)
    rows = _pre_block_m(block_d) if not INTERPRET else _INTERPRET_CONFIG[0]
    _PREPROCESS((cdiv(NQ, rows) * B * H,), (o, do, delta, *_strides(o), *_strides(do), H, NQ),
                dict(HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=rows, num_warps=4))
    split = _bwd_rows[-1] if _bwd_rows else BWD_ROW_SPLIT
    for member in range(chunk):  # (dS chunks: each launch adds its batches' dS to the launch before's)
        _launch_rows("dkdv", NKV, B // chunk * H, (q, k, v, do, lse, delta, dk, dv, dm, *common, *_strides(dk),
                                                   *_strides(dv), H, NQ, NKV, _bucket(NKV), chunk, member), tail,
                     grad_consts, split)
    _launch_rows("dq", NQ, B * H, (q, k, v, do, lse, delta, dq, *common, *_strides(dq), H, NQ, NKV, _bucket(NKV)),
                 tail, consts, split)
    return dq, dk, dv


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, H·D) -> (B, N, H, D), a view (Tensor.unflatten's Python wrapper costs microseconds a call)."""
    return t.view(t.shape[0], t.shape[1], num_heads, t.shape[2] // num_heads)


def _split_qkv(qkv: torch.Tensor, num_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, 3·H·D) -> three (B, N, H, D) strided views, no copy."""
    B, N, C3 = qkv.shape
    q, k, v = qkv.view(B, N, 3, num_heads, C3 // (3 * num_heads)).unbind(2)  # (a split dim: always a view)
    return q, k, v


def _mask_view(mask: Optional[torch.Tensor], B: int, H: int, NQ: int, NKV: int) -> Optional[torch.Tensor]:
    """An attention mask broadcastable to (B, H, Nq, Nkv) as the kernels' (B, H, Nq, Nkv) view, a windowed one
    (B / W or 1, W, H or 1, Nq, Nkv) as their (B / W, W, H, Nq, Nkv) view (stride 0 where it broadcasts, no
    copy); None stays None."""
    if mask is None:
        return None
    if mask.dim() == 5:
        return mask.expand(B // mask.shape[1], mask.shape[1], H, NQ, NKV)
    return mask.expand(B, H, NQ, NKV)


def _ds_chunk(mask: torch.Tensor, B: int, H: int, NKV: int) -> int:
    """Batches whose dS the dK/dV launches sum in one row of attention_bwd's dmask (one launch a member): 1
    unless the mask broadcasts over the batch (over a windowed mask's groups); then _chunk_for's pick on a GPU,
    2 in the interpreter (tests)."""
    groups = B // mask.shape[1] if mask.dim() == 5 else B
    if mask.shape[0] != 1 or groups == 1:
        return 1
    if INTERPRET or mask.device.type != "cuda":
        return _chunk_for(groups, 2)
    return _chunk_for(groups, B * H * cdiv(NKV, 64) // (4 * sm_count(mask.device)))


def _chunk_for(groups: int, want: int) -> int:
    """The largest divisor of ``groups`` up to ``want`` (``programs // (4·SMs)``: about 4 programs an SM a launch,
    64-key blocks) and 16, at least 1."""
    top = max(1, min(want, 16, groups))
    return max(c for c in range(1, top + 1) if groups % c == 0)


def _mask_grad_buffer(mask: torch.Tensor, want: bool, B: int, H: int, NQ: int, NKV: int) -> Optional[torch.Tensor]:
    """The fp32 (B / C, H, Nq, Nkv) buffer the dK/dV kernels write dS into, summed over chunks of C batches
    (_ds_chunk), when the mask's gradient is wanted (``want``), else None."""
    if not want:
        return None
    return torch.empty((B // _ds_chunk(mask, B, H, NKV), H, NQ, NKV), dtype=torch.float32, device=mask.device)


def _mask_grad(ds: Optional[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """The gradient of ``mask`` (4-D, or windowed 5-D, as the ops take it) from dS at every score, fp32
    (B / C, H, Nq, Nkv) with chunks of C batches summed (``ds``: summed over the dims where the mask broadcasts,
    in the mask's dtype), or an empty tensor where ``ds`` is None (the op's output when no gradient is wanted)."""
    if ds is None:
        return mask.new_empty(0)
    d = ds if mask.dim() == 4 else ds.view(-1, mask.shape[1], *ds.shape[1:])
    dims = [i for i, (m, n) in enumerate(zip(mask.shape, d.shape)) if m == 1 and n != 1]
    return (d.sum(dims, keepdim=True) if dims else d).to(mask.dtype)


def qkv_attention_fwd(qkv: torch.Tensor, num_heads: int, softmax_scale: float, allow_tf32: bool = False,
                      out: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                      seed: Seed = None, mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed forward: returns (o (B, N, H·D), its softmax stats (B, H, 2, N) fp32, see STATS). ``mask``: broadcastable
    to (B, H, N, N)."""
    B, N, C3 = qkv.shape
    q, k, v = _split_qkv(qkv, num_heads)
    if out is None:
        out = torch.empty((B, N, C3 // 3), dtype=qkv.dtype, device=qkv.device)
    _, lse = attention_fwd(q, k, v, softmax_scale, False, allow_tf32, out=_heads(out, num_heads),
                           dropout_p=dropout_p, seed=seed, mask=_mask_view(mask, B, num_heads, N, N))
    return out, lse


def qkv_attention_bwd(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, num_heads: int,
                      softmax_scale: float, allow_tf32: bool = False, dqkv: Optional[torch.Tensor] = None,
                      dropout_p: float = 0.0, seed: Seed = None, mask: Optional[torch.Tensor] = None,
                      dmask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Packed backward: dq, dk, dv written straight into one (B, N, 3·H·D) gradient (``dmask``: see attention_bwd)."""
    q, k, v = _split_qkv(qkv, num_heads)
    if dqkv is None:
        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    dq, dk, dv = _split_qkv(dqkv, num_heads)
    B, N = qkv.shape[:2]
    attention_bwd(do.reshape(q.shape), q, k, v, _heads(o, num_heads), lse, softmax_scale, False,
                  allow_tf32, dq=dq, dk=dk, dv=dv, dropout_p=dropout_p, seed=seed,
                  mask=_mask_view(mask, B, num_heads, N, N), dmask=dmask)
    return dqkv


def qkv_rope_attention_fwd(qkv: torch.Tensor, rope: torch.Tensor, num_heads: int, rope_prefix: int, rope_half: bool,
                           softmax_scale: float, allow_tf32: bool = False, dropout_p: float = 0.0,
                           seed: Seed = None, mask: Optional[torch.Tensor] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed forward with rotary q, k: one RoPE pass writes (B, N, 2, H, D) rotated q and k, the kernel reads them
    and v in place. Returns (o (B, N, H·D), its softmax stats (B, H, 2, N) fp32, the rotated qk the backward
    reads)."""
    B, N, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    qkv5 = qkv.view(B, N, 3, num_heads, D)
    qk = _rope.empty((B, N, 2, num_heads, D), qkv.dtype, qkv.device)
    rope_apply(qkv5[:, :, :2], qk, rope_table(rope, B, num_heads, N - rope_prefix, D), rope_prefix, rope_half,
               backward=False)
    out = torch.empty((B, N, C3 // 3), dtype=qkv.dtype, device=qkv.device)
    _, lse = attention_fwd(qk[:, :, 0], qk[:, :, 1], qkv5[:, :, 2], softmax_scale, False, allow_tf32,
                           out=_heads(out, num_heads), dropout_p=dropout_p, seed=seed,
                           mask=_mask_view(mask, B, num_heads, N, N))
    return out, lse, qk


def qkv_rope_attention_bwd(do: torch.Tensor, qkv: torch.Tensor, qk: torch.Tensor, o: torch.Tensor,
                           lse: torch.Tensor, rope: torch.Tensor, num_heads: int, rope_prefix: int, rope_half: bool,
                           softmax_scale: float, allow_tf32: bool = False, dropout_p: float = 0.0,
                           seed: Seed = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Packed backward with rotary q, k: dq, dk (of the rotated q, k) and dv land in one (B, N, 3·H·D) gradient,
    then one in-place RoPE pass turns dq, dk into the gradients of the unrotated q, k."""
    B, N, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    dq, dk, dv = _split_qkv(dqkv, num_heads)
    q, k = qk.unbind(2)
    attention_bwd(do.reshape(q.shape), q, k, _split_qkv(qkv, num_heads)[2], _heads(o, num_heads), lse,
                  softmax_scale, False, allow_tf32, dq=dq, dk=dk, dv=dv, dropout_p=dropout_p, seed=seed,
                  mask=_mask_view(mask, B, num_heads, N, N))
    dqk = dqkv.view(B, N, 3, num_heads, D)[:, :, :2]
    rope_apply(dqk, dqk, rope_table(rope, B, num_heads, N - rope_prefix, D), rope_prefix, rope_half, backward=True)
    return dqkv


# ---------------------------------------------------------------------------------------------
# torch.library custom ops: opaque to torch.compile (no graph break), fake impls give the shapes.

@custom_op("attention_fwd")
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
                      allow_tf32: bool, dropout_p: float,
                      seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return attention_fwd(q, k, v, softmax_scale, causal, allow_tf32, dropout_p=dropout_p, seed=seed)


@_attention_fwd_op.register_fake
def _(q, k, v, softmax_scale, causal, allow_tf32, dropout_p, seed):
    B, N, H, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, 2, N), dtype=torch.float32)


@custom_op("masked_attention_fwd")
def _masked_attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                             softmax_scale: float, allow_tf32: bool, dropout_p: float,
                             seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The forward with an attention mask broadcastable to (B, H, Nq, Nkv)."""
    B, NQ, H, _ = q.shape
    return attention_fwd(q, k, v, softmax_scale, False, allow_tf32, dropout_p=dropout_p, seed=seed,
                         mask=_mask_view(mask, B, H, NQ, k.shape[1]))


@_masked_attention_fwd_op.register_fake
def _(q, k, v, mask, softmax_scale, allow_tf32, dropout_p, seed):
    B, N, H, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, 2, N), dtype=torch.float32)


@custom_op("masked_attention_bwd")
def _masked_attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                             lse: torch.Tensor, mask: torch.Tensor, softmax_scale: float, allow_tf32: bool,
                             dropout_p: float, seed: Optional[torch.Tensor], mask_grad: bool
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, the mask's gradient: its shape with ``mask_grad``, else empty)."""
    B, NQ, H, _ = q.shape
    ds = _mask_grad_buffer(mask, mask_grad, B, H, NQ, k.shape[1])
    dq, dk, dv = attention_bwd(do, q, k, v, o, lse, softmax_scale, False, allow_tf32, dropout_p=dropout_p, seed=seed,
                               mask=_mask_view(mask, B, H, NQ, k.shape[1]), dmask=ds)
    return dq, dk, dv, _mask_grad(ds, mask)


@_masked_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, mask, softmax_scale, allow_tf32, dropout_p, seed, mask_grad):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            mask.new_empty(mask.shape if mask_grad else (0,)))


@custom_op("attention_bwd")
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      lse: torch.Tensor, softmax_scale: float, causal: bool, allow_tf32: bool, dropout_p: float,
                      seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_bwd(do, q, k, v, o, lse, softmax_scale, causal, allow_tf32, dropout_p=dropout_p, seed=seed)


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, softmax_scale, causal, allow_tf32, dropout_p, seed):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


@custom_op("qkv_attention_fwd")
def _qkv_attention_fwd_op(qkv: torch.Tensor, num_heads: int, softmax_scale: float, allow_tf32: bool,
                          dropout_p: float, seed: Optional[torch.Tensor],
                          mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return qkv_attention_fwd(qkv, num_heads, softmax_scale, allow_tf32, dropout_p=dropout_p, seed=seed, mask=mask)


@_qkv_attention_fwd_op.register_fake
def _(qkv, num_heads, softmax_scale, allow_tf32, dropout_p, seed, mask):
    B, N, C3 = qkv.shape
    return qkv.new_empty((B, N, C3 // 3)), qkv.new_empty((B, num_heads, 2, N), dtype=torch.float32)


@custom_op("qkv_attention_bwd")
def _qkv_attention_bwd_op(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, num_heads: int,
                          softmax_scale: float, allow_tf32: bool, dropout_p: float,
                          seed: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> torch.Tensor:
    return qkv_attention_bwd(do, qkv, o, lse, num_heads, softmax_scale, allow_tf32, dropout_p=dropout_p, seed=seed,
                             mask=mask)


@_qkv_attention_bwd_op.register_fake
def _(do, qkv, o, lse, num_heads, softmax_scale, allow_tf32, dropout_p, seed, mask):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


@custom_op("qkv_attention_bwd_mask_grad")
def _qkv_attention_bwd_mask_grad_op(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                                    num_heads: int, softmax_scale: float, allow_tf32: bool, dropout_p: float,
                                    seed: Optional[torch.Tensor], mask: torch.Tensor
                                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The packed backward of a float mask that wants its gradient: (dqkv, the mask's gradient, its shape)."""
    B, N, C3 = qkv.shape
    ds = _mask_grad_buffer(mask, True, B, num_heads, N, N)
    dqkv = qkv_attention_bwd(do, qkv, o, lse, num_heads, softmax_scale, allow_tf32, dropout_p=dropout_p, seed=seed,
                             mask=mask, dmask=ds)
    return dqkv, _mask_grad(ds, mask)


@_qkv_attention_bwd_mask_grad_op.register_fake
def _(do, qkv, o, lse, num_heads, softmax_scale, allow_tf32, dropout_p, seed, mask):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format), mask.new_empty(mask.shape)


@custom_op("qkv_rope_attention_fwd")
def _qkv_rope_attention_fwd_op(qkv: torch.Tensor, rope: torch.Tensor, num_heads: int, rope_prefix: int,
                               rope_half: bool, softmax_scale: float, allow_tf32: bool, dropout_p: float,
                               seed: Optional[torch.Tensor], mask: Optional[torch.Tensor]
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return qkv_rope_attention_fwd(qkv, rope, num_heads, rope_prefix, rope_half, softmax_scale, allow_tf32,
                                  dropout_p=dropout_p, seed=seed, mask=mask)


@_qkv_rope_attention_fwd_op.register_fake
def _(qkv, rope, num_heads, rope_prefix, rope_half, softmax_scale, allow_tf32, dropout_p, seed, mask):
    B, N, C3 = qkv.shape
    return (qkv.new_empty((B, N, C3 // 3)), qkv.new_empty((B, num_heads, 2, N), dtype=torch.float32),
            qkv.new_empty((B, N, 2, num_heads, C3 // (3 * num_heads))))


@custom_op("qkv_rope_attention_bwd")
def _qkv_rope_attention_bwd_op(do: torch.Tensor, qkv: torch.Tensor, qk: torch.Tensor, o: torch.Tensor,
                               lse: torch.Tensor, rope: torch.Tensor, num_heads: int, rope_prefix: int,
                               rope_half: bool, softmax_scale: float, allow_tf32: bool, dropout_p: float,
                               seed: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> torch.Tensor:
    return qkv_rope_attention_bwd(do, qkv, qk, o, lse, rope, num_heads, rope_prefix, rope_half, softmax_scale,
                                  allow_tf32, dropout_p=dropout_p, seed=seed, mask=mask)


@_qkv_rope_attention_bwd_op.register_fake
def _(do, qkv, qk, o, lse, rope, num_heads, rope_prefix, rope_half, softmax_scale, allow_tf32, dropout_p, seed, mask):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


class AttentionFn(torch.autograd.Function):
    """(B, N, H, D) q, k, v -> (B, N, H, D); backward through the FA2-style kernels."""

    @staticmethod
    def forward(ctx, q, k, v, softmax_scale: float, causal: bool, allow_tf32: bool, dropout_p: float,
                seed: Optional[torch.Tensor]):
        o, lse = _attention_fwd_op(q, k, v, softmax_scale, causal, allow_tf32, dropout_p, seed)
        ctx.save_for_backward(q, k, v, o, lse, seed)
        ctx.args = (softmax_scale, causal, allow_tf32, dropout_p)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, seed = ctx.saved_tensors
        dq, dk, dv = _attention_bwd_op(do, q, k, v, o, lse, *ctx.args, seed)
        return dq, dk, dv, None, None, None, None, None


class MaskedAttentionFn(torch.autograd.Function):
    """AttentionFn with an attention mask, applied by the forward and backward kernels; a float mask that requires
    grad (a learned bias) gets its gradient from the dK/dV kernel's dS (summed where it broadcasts)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, softmax_scale: float, allow_tf32: bool, dropout_p: float,
                seed: Optional[torch.Tensor]):
        o, lse = _masked_attention_fwd_op(q, k, v, mask, softmax_scale, allow_tf32, dropout_p, seed)
        ctx.save_for_backward(q, k, v, o, lse, mask, seed)
        ctx.args = (softmax_scale, allow_tf32, dropout_p)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, mask, seed = ctx.saved_tensors
        want = ctx.needs_input_grad[3]
        dq, dk, dv, dmask = _masked_attention_bwd_op(do, q, k, v, o, lse, mask, *ctx.args, seed, want)
        return dq, dk, dv, dmask if want else None, None, None, None, None


class QkvAttentionFn(torch.autograd.Function):
    """(B, N, 3·H·D) packed qkv -> (B, N, H·D); the gradient is one packed (B, N, 3·H·D) tensor. ``mask``: an
    attention mask broadcastable to (B, H, N, N) (or windowed, see _mask_view) or None; a float one that requires
    grad gets it as in MaskedAttentionFn."""

    @staticmethod
    def forward(ctx, qkv, num_heads: int, softmax_scale: float, allow_tf32: bool, dropout_p: float,
                seed: Optional[torch.Tensor], mask: Optional[torch.Tensor]):
        o, lse = _qkv_attention_fwd_op(qkv, num_heads, softmax_scale, allow_tf32, dropout_p, seed, mask)
        ctx.save_for_backward(qkv, o, lse, seed, mask)
        ctx.args = (num_heads, softmax_scale, allow_tf32, dropout_p)
        return o

    @staticmethod
    def backward(ctx, do):
        qkv, o, lse, seed, mask = ctx.saved_tensors
        if ctx.needs_input_grad[6]:
            dqkv, dmask = _qkv_attention_bwd_mask_grad_op(do, qkv, o, lse, *ctx.args, seed, mask)
            return dqkv, None, None, None, None, None, dmask
        return _qkv_attention_bwd_op(do, qkv, o, lse, *ctx.args, seed, mask), None, None, None, None, None, None


class QkvRopeAttentionFn(torch.autograd.Function):
    """qkv_attention with rotary q, k (rope a constant): saves qkv and the rotated q, k (B, N, 2, H, D). ``mask``
    as in QkvAttentionFn, a constant (qkv_attention sends a learned one to MaskedAttentionFn)."""

    @staticmethod
    def forward(ctx, qkv, rope, num_heads: int, rope_prefix: int, rope_half: bool, softmax_scale: float,
                allow_tf32: bool, dropout_p: float, seed: Optional[torch.Tensor], mask: Optional[torch.Tensor]):
        o, lse, qk = _qkv_rope_attention_fwd_op(qkv, rope, num_heads, rope_prefix, rope_half, softmax_scale,
                                                allow_tf32, dropout_p, seed, mask)
        ctx.save_for_backward(qkv, qk, o, lse, rope, seed, mask)
        ctx.args = (num_heads, rope_prefix, rope_half, softmax_scale, allow_tf32, dropout_p)
        return o

    @staticmethod
    def backward(ctx, do):
        qkv, qk, o, lse, rope, seed, mask = ctx.saved_tensors
        dqkv = _qkv_rope_attention_bwd_op(do, qkv, qk, o, lse, rope, *ctx.args, seed, mask)
        return dqkv, None, None, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# References, validation and the public functionals.

def _validate_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q, k, v must be (B, N, H, D) with matching B, H, D and k/v lengths; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] < 1:
        raise ValueError(f"the head dim D must be at least 1, got q of shape {tuple(q.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)


def _check_head_dim(d: int) -> None:
    """The kernels take head dims 8..256 that are multiples of 8 (the reference takes any)."""
    if d < 8 or d > MAX_HEAD_DIM or d % 8:
        raise ValueError(f"flashvit attention kernels need a head dim that is a multiple of 8 in [8, "
                         f"{MAX_HEAD_DIM}], got {d}")


def _resolve_tf32(dtype: torch.dtype, allow_tf32: Optional[bool]) -> bool:
    if dtype != torch.float32:  # only fp32 dots have a precision choice
        return False
    return bool(torch.backends.cuda.matmul.allow_tf32) if allow_tf32 is None else bool(allow_tf32)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: Optional[float] = None,
                        causal: bool = False, dropout_p: float = 0.0,
                        attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SDPA on (B, N, H, D) tensors (``attn_mask`` as SDPA takes it, (B, H, Nq, Nkv) broadcast, or windowed as
    :func:`attention` takes it; a float one in another dtype than q's is cast to it); returns (B, N, H, D)."""
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        attn_mask = attn_mask.to(q.dtype)
    if attn_mask is not None and attn_mask.dim() == 5:  # windowed: batch b at window b % W
        B, NQ, H, _ = q.shape
        attn_mask = attn_mask.expand(B // attn_mask.shape[1], attn_mask.shape[1], H, NQ, k.shape[1]).reshape(
            B, H, NQ, k.shape[1])
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
                                       dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
    return o.transpose(1, 2)


def _checked_attn_mask(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    """An SDPA-style attention mask for (B, N, H, D) q, k: bool (True: attend) or float (added to the scaled
    logits), broadcastable to (B, H, Nq, Nkv), or windowed (5-D, see :func:`attention`), on q's device, and not
    together with ``causal``. Returns it as a 4-D view (leading size-1 dims added: SDPA's math path refuses a
    1-D mask that broadcasts), a windowed one as given."""
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True: attend) or float (added to the logits), got {mask.dtype}")
    check_tensor("attn_mask", mask, min_ndim=1, dtypes=(torch.bool, *REFERENCE_DTYPES))
    if mask.dim() > 5:
        raise ValueError(f"attn_mask must have at most 4 dims (B, H, Nq, Nkv), or 5 windowed (B / W, W, H, Nq, "
                         f"Nkv), got shape {tuple(mask.shape)}")
    check_same_device(q=q, attn_mask=mask)
    B, NQ, H, _ = q.shape
    want = (B, H, NQ, k.shape[1])
    if mask.dim() == 5:
        W = mask.shape[1]
        if W < 1 or B % W:
            raise ValueError(f"a windowed attn_mask (B / W, W, H, Nq, Nkv) needs W dividing the batch B = {B}, "
                             f"got shape {tuple(mask.shape)}")
        want = (B // W, W, H, NQ, k.shape[1])
    if not all(m in (1, w) for m, w in zip(reversed(mask.shape), reversed(want))):  # (it broadcasts to want)
        raise ValueError(f"attn_mask of shape {tuple(mask.shape)} does not broadcast to "
                         f"{'(B / W, W, H, Nq, Nkv)' if len(want) == 5 else '(B, H, Nq, Nkv)'} = {want}")
    if causal:
        raise ValueError("give attn_mask or causal=True, not both (as scaled_dot_product_attention)")
    return mask if mask.dim() == 5 else mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def _kernel_mask(mask: torch.Tensor) -> torch.Tensor:
    """The mask as the kernels read it: bool, 16-bit or fp32 (a float64 one in fp32; the reference keeps it)."""
    return mask.float() if mask.dtype == torch.float64 else mask


def qkv_attention_reference(qkv: torch.Tensor, num_heads: int, softmax_scale: Optional[float] = None,
                            dropout_p: float = 0.0, rope: Optional[torch.Tensor] = None, rope_prefix: int = 0,
                            rope_half: bool = False, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, N, 3·H·D) packed qkv -> (B, N, H·D), the way timm's Attention (with ``rope``, its EvaAttention) does it;
    ``attn_mask`` as :func:`attention_reference` takes it."""
    B, N, C3 = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, num_heads, C3 // (3 * num_heads)).unbind(2)  # (B, N, H, D)
    if rope is not None:
        q, k = rope_reference(q, rope, rope_prefix, rope_half), rope_reference(k, rope, rope_prefix, rope_half)
    return attention_reference(q, k, v, softmax_scale, False, dropout_p, attn_mask).reshape(B, N, C3 // 3)


def _kernel_scale(scale: float) -> bool:
    """The forward kernel takes each row's max on unscaled logits (one FMA a logit): a finite scale > 0 only."""
    return scale > 0 and math.isfinite(scale)


def _triton_for(t: torch.Tensor, backend: Optional[str], dropout_p: float, scale: float) -> bool:
    """The kernels when dispatch says so and they cover the call: float64, softmax scales <= 0 and dropout_p = 1
    take the reference, a forced 'triton' with such a scale raises. (Dropout inside a torch.compile graph runs
    the kernels too: the seed is a device draw the graph traces.)"""
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if dropout_p == 1.0 or t.dtype == torch.float64 or not use_triton(t, backend):
        return False
    if not _kernel_scale(scale):
        if (backend if backend is not None else get_backend()) == "triton":
            raise ValueError(f"the attention kernels take a finite softmax_scale > 0, got {scale}; "
                             f"backend='torch' computes others")
        return False
    return True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: Optional[float] = None,
              causal: bool = False, *, dropout_p: float = 0.0, backend: Optional[str] = None,
              allow_tf32: Optional[bool] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact softmax attention on (B, N, H, D) tensors (any strides); returns (B, N, H, D).

    ``softmax_scale`` defaults to D**-0.5; ``causal`` masks key j > query i (top-left aligned).
    ``allow_tf32`` (fp32 inputs only): tf32 dots when True, full-precision dots when False; None follows
    ``torch.backends.cuda.matmul.allow_tf32``. ``dropout_p`` > 0: attention dropout (each probability dropped
    with probability dropout_p, the rest scaled by 1 / (1 - dropout_p), as SDPA) in the kernels, with a mask
    drawn from a seed that torch's default generator gives (``torch.manual_seed`` makes it reproducible;
    ``dropout_mask`` shows it). float64, a ``softmax_scale`` <= 0, dropout_p = 1 and dropout inside
    torch.compile run the PyTorch reference (a forced 'triton' backend refuses such a scale with a ValueError).
    ``attn_mask``: as ``F.scaled_dot_product_attention`` takes it, in its (B, H, Nq, Nkv) order, broadcast (a
    key-padding (B, 1, 1, Nkv), a NaFlex / HF (B, 1, Nq, Nkv), a relative-position bias (1, H, Nq, Nkv)): bool
    (True: attend) or float (added to the scaled logits; values at or below -1e30, such as HF's finfo.min,
    mask the key out). The forward and backward kernels apply it; a row masked everywhere gives zeros (and zero
    gradients). A float mask that requires grad (a learned relative-position bias) gets its gradient from the
    backward kernel (dS at every score, summed over chunks of batches in the kernel where the mask broadcasts over
    the batch, then by torch over the rest of its broadcast dims: _mask_grad_buffer, _mask_grad).
    Windowed (Swin's shifted windows): a 5-D (B / W or 1, W, H or 1, Nq, Nkv) mask, batch b taking window
    b % W, as ``scores.view(B // W, W, H, Nq, Nkv) + mask`` does, with no (B, H, Nq, Nkv) copy of it.
    """
    _validate_qkv(q, k, v)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if attn_mask is not None:
        attn_mask = _checked_attn_mask(attn_mask, q, k, causal)
        if not _triton_for(q, backend, dropout_p, scale):
            return attention_reference(q, k, v, scale, False, dropout_p, attn_mask)
        check_triton_dtypes(q=q, k=k, v=v)
        _check_head_dim(q.shape[-1])
        return apply(MaskedAttentionFn, q, k, v, _kernel_mask(attn_mask), scale, _resolve_tf32(q.dtype, allow_tf32),
                     float(dropout_p), _draw_seed(dropout_p, q.device))
    if _triton_for(q, backend, dropout_p, scale):
        check_triton_dtypes(q=q, k=k, v=v)
        _check_head_dim(q.shape[-1])
        return apply(AttentionFn, q, k, v, scale, bool(causal), _resolve_tf32(q.dtype, allow_tf32), float(dropout_p),
                     _draw_seed(dropout_p, q.device))
    return attention_reference(q, k, v, scale, causal, dropout_p)


def _draw_seed(dropout_p: float, device: torch.device) -> Optional[torch.Tensor]:
    """The dropout mask's seed, drawn on ``device`` by torch's generator there (torch.manual_seed fixes it): a
    one-element int64 tensor the kernels read, so no host sync, a torch.compile graph traces the draw and a
    CUDA graph's replays each draw anew. None (seed unused) without dropout: the generator is not advanced."""
    if dropout_p <= 0.0:
        return None
    return torch.randint(0, 2 ** 31 - 1, (1,), dtype=torch.int64, device=device)


def qkv_attention(qkv: torch.Tensor, num_heads: int, softmax_scale: Optional[float] = None, *,
                  dropout_p: float = 0.0, backend: Optional[str] = None, allow_tf32: Optional[bool] = None,
                  rope: Optional[torch.Tensor] = None, rope_prefix: int = 0, rope_half: bool = False,
                  attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention straight from the packed qkv Linear output (B, N, 3·H·D); returns (B, N, H·D).

    q, k, v are read in place by strides and the output lands in (B, N, H·D) ready for the projection;
    the backward writes one packed (B, N, 3·H·D) gradient. Other arguments as in :func:`attention`.

    ``rope``: rotary embeddings of q and k first (EVA-02, DINOv3, timm's RoPE ViTs), as
    :func:`flashvit.kernels.rope.apply_rope` takes them: cat(sin, cos) broadcastable to (B, H, N - P, 2·D), the
    first ``rope_prefix`` (P) tokens not rotated, ``rope_half`` pairs (i, i + D/2). One pass writes the rotated
    q and k (saved for the backward), whose packed gradient is rotated back in place. A rope that requires grad
    (learned frequencies), or a rope with a mask that requires grad, is rotated by the reference, which
    differentiates it; attention still runs the kernels.

    ``attn_mask``: as :func:`attention` takes it, broadcastable to (B, H, N, N) (NaFlex / SigLIP2 padding, a
    relative-position bias, learned or not) or windowed; the kernels apply it forward and backward and qkv's
    gradient stays one packed tensor.
    """
    check_tensor("qkv", qkv, ndim=3)
    if num_heads < 1 or qkv.shape[-1] < 3 * num_heads or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv last dim {qkv.shape[-1]} must be positive and divisible by 3 * num_heads = "
                         f"{3 * num_heads}")
    B, N = qkv.shape[:2]
    head_dim = qkv.shape[-1] // (3 * num_heads)
    scale = head_dim ** -0.5 if softmax_scale is None else float(softmax_scale)
    if rope is not None:
        check_rope_args((B, N, num_heads, head_dim), rope, rope_prefix, where="qkv")
        check_same_device(qkv=qkv, rope=rope)
    mask = None  # the kernels' copy of attn_mask
    if attn_mask is not None:
        q, k, _ = _split_qkv(qkv, num_heads)
        attn_mask = _checked_attn_mask(attn_mask, q, k, False)
        mask = _kernel_mask(attn_mask)
    if _triton_for(qkv, backend, dropout_p, scale):
        check_triton_dtypes(qkv=qkv)
        _check_head_dim(head_dim)
        tf32, seed = _resolve_tf32(qkv.dtype, allow_tf32), _draw_seed(dropout_p, qkv.device)
        if rope is None:
            return apply(QkvAttentionFn, qkv, num_heads, scale, tf32, float(dropout_p), seed, mask)
        if rope.dtype == torch.float64 or needs_grad(rope) or (mask is not None and needs_grad(mask)):
            q, k, v = _split_qkv(qkv, num_heads)
            q, k = rope_reference(q, rope, rope_prefix, rope_half), rope_reference(k, rope, rope_prefix, rope_half)
            if mask is None:
                o = apply(AttentionFn, q, k, v, scale, False, tf32, float(dropout_p), seed)
            else:
                o = apply(MaskedAttentionFn, q, k, v, mask, scale, tf32, float(dropout_p), seed)
            return o.flatten(-2)
        check_triton_dtypes(rope=rope)
        if qkv.stride(-1) != 1:  # the RoPE kernel reads unit-stride features (a copy; autograd routes the grad)
            qkv = qkv.contiguous()
        return apply(QkvRopeAttentionFn, qkv, rope, num_heads, int(rope_prefix), bool(rope_half), scale, tf32,
                     float(dropout_p), seed, mask)
    return qkv_attention_reference(qkv, num_heads, scale, dropout_p, rope, rope_prefix, rope_half, attn_mask)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile gate: every config the autotuners (and the interpreter) can pick, in every
# dtype, over representative head dims (each BLOCK_D class) and both causal settings.

_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_ELSIZE = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}
_AOT_CASES = [  # (head_dim, dtype, causal, precision, head-dim mode)
    (64, torch.bfloat16, False, "ieee", "pad"), (80, torch.float16, False, "ieee", "pad"),
    (128, torch.bfloat16, True, "ieee", "pad"), (32, torch.float16, False, "ieee", "pad"),
    (256, torch.bfloat16, False, "ieee", "pad"), (64, torch.float32, False, "ieee", "pad"),
    (40, torch.float32, True, "tf32", "pad"), (256, torch.float32, False, "tf32", "pad"),
    (80, torch.bfloat16, False, "ieee", "split"), (96, torch.float16, True, "ieee", "split"),
    (72, torch.float32, False, "tf32", "split"),
]


def _aot_signature(kern, ptr: str) -> Tuple[Dict[str, str], Dict[str, object]]:
    """Types by argument name; the head-dim strides are 1, as the JIT specializes them on a GPU."""
    sig: Dict[str, str] = {}
    consts: Dict[str, object] = {}
    for name in kern.arg_names:
        if name in ("LSE", "DELTA", "DQ_ACC", "DMASK"):  # (DMASK: the mask's gradient rows, fp32)
            sig[name] = "*fp32"
        elif name == "SEED":
            sig[name] = "*i64"
        elif name[0].isupper() and name not in _CONSTEXPRS and name not in _INT_ARGS:
            sig[name] = ptr
        elif name in _CONSTEXPRS:
            sig[name] = "constexpr"
        elif name.startswith("s") and name.rstrip("_g").endswith("d"):
            sig[name] = "constexpr"
            consts[name] = 1
        elif name.endswith("scale") or name == "dropout_p":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig, consts


_INT_ARGS = ("H", "BH", "N_Q", "N_KV", "N_BUCKET", "N_WIN", "N_CHUNK", "CHUNK_I")
_CONSTEXPRS = ("HEAD_DIM", "BLOCK_D", "BLOCK_D2", "CAUSAL", "PRECISION", "SPLIT_TAIL", "DROPOUT", "BLOCK_M",
               "BLOCK_N", "MASK_KIND", "LAG_PV", "PERSIST")


def _row_strides(sig: Dict[str, str]) -> Tuple[str, ...]:
    """The batch/token/head strides: multiples of 16 elements at ViT sizes (D = 64, 80; packed 3·H·D rows)."""
    return tuple(n for n, t in sig.items() if t == "i32" and n.startswith("s"))


def _aot_specs() -> List[AotSpec]:
    if not HAS_TRITON:
        return []
    specs: List[AotSpec] = []
    seen = set()
    for d, dtype, causal, prec, mode in _AOT_CASES:
        ty, es = _TY[dtype], _ELSIZE[dtype]
        with use_head_split(mode):
            split = _split_dims(d)
        assert (split[1] > 0) == (mode == "split"), (d, mode)
        for kind in ("fwd", "fwd_rows", "dkdv", "dkdv_rows", "dq", "dq_rows", "fused"):  # (_main: theirs)
            kern = _kernel(kind)
            fwd = kind.startswith("fwd")
            if fwd and mode == "split":
                continue  # the forward always pads: its specs come from the 'pad' cases
            bd1, bd2 = split if not fwd else (_block_d(d), 0)
            tag = f"D={d}{'=' + str(bd1) + '+' + str(bd2) if bd2 else ''}"
            sig, consts = _aot_signature(kern, "*" + ty)
            consts.update(HEAD_DIM=d, BLOCK_D=bd1, CAUSAL=causal, PRECISION=prec)
            if not fwd:
                consts["BLOCK_D2"] = bd2
            consts["MASK_KIND"] = 0
            if fwd:
                consts["LAG_PV"] = False  # the lagged P·V: below
                consts["PERSIST"] = 0  # the persistent form: below
            tail = False  # the masked loop here, the split one below (the autotuner tries both: _auto_tails)
            consts["SPLIT_TAIL"] = tail
            consts["DROPOUT"] = False
            cfgs = _configs_for(kind, bd1 + bd2, es)
            base, _, part = kind.partition("_")
            if (d, ty) == (32, "fp16"):  # the interpreter's fixed config, compiled once too
                cfgs = cfgs + [_INTERPRET_ROWS_CONFIGS[base] if part else _INTERPRET_CONFIG]
            for i, (bm, bn, w, s) in enumerate(cfgs):
                key = (kind, bm, bn, w, s, bd2 > 0)
                if key in seen and i:  # each case compiles at least one config; each config at least once
                    continue
                seen.add(key)
                specs.append(runtime_spec(kern, sig, dict(consts, BLOCK_M=bm, BLOCK_N=bn), w, s,
                                          f"attn_{kind}[{tag},{ty},causal={causal},{prec},{bm}x{bn},w{w}s{s}]",
                                          div16=_row_strides(sig), min_cc=90 if _hopper_only(kind, (bm, bn, w, s)) else 0))
                if i == 0 and not part and ty == "bf16" and d in (64, 80) and not causal:
                    masks = [(1, "*bf16"), (1, "*fp32"), (2, "*i1")]  # attention masks: HF's, a bias, bool
                    if "DMASK" in sig:  # a learned bias, its gradient stored (MASK_KIND 3)
                        masks += [(3, "*fp32"), (3, "*bf16")]
                    for mk, mty in masks:
                        specs.append(runtime_spec(
                            kern, dict(sig, Mask=mty), dict(consts, BLOCK_M=bm, BLOCK_N=bn, MASK_KIND=mk), w, s,
                            f"attn_{kind}[{tag},{ty},{prec},{bm}x{bn},w{w}s{s},mask={mk}:{mty[1:]}]",
                            div16=_row_strides(sig)))
                if i == 0 and not part and ty in ("bf16", "fp16") and d in (64, 80, 128):
                    specs.append(runtime_spec(  # attention dropout (its Philox draws in each kernel)
                        kern, sig, dict(consts, BLOCK_M=bm, BLOCK_N=bn, DROPOUT=True), w, s,
                        f"attn_{kind}[{tag},{ty},causal={causal},{prec},{bm}x{bn},w{w}s{s},dropout]",
                        div16=_row_strides(sig)))
                if not causal and ty == "bf16" and ("tail",) + key + (d,) not in seen:
                    seen.add(("tail",) + key + (d,))  # the other form of the loop (use_fwd_tail, use_bwd_tail)
                    specs.append(runtime_spec(
                        kern, sig, dict(consts, BLOCK_M=bm, BLOCK_N=bn, SPLIT_TAIL=not tail), w, s,
                        f"attn_{kind}[{tag},{ty},causal=False,{prec},{bm}x{bn},w{w}s{s},tail={int(not tail)}]",
                        div16=_row_strides(sig), min_cc=90 if _hopper_only(kind, (bm, bn, w, s)) else 0))
                if kind == "fwd" and not causal and ty in ("bf16", "fp16") and (bm, bn, w, s) in _FWD_CONFIGS \
                        and _lag_ok((bm, bn, w, s)):
                    extra = [(dict(sig, Mask="*bf16"), 1, False), (sig, 0, True)] if i == 0 and ty == "bf16" else []
                    for split_tail in _auto_tails("fwd", (bm, bn, w, s)):  # the lagged P·V in each loop form
                        for lag_sig, mk, drop in [(sig, 0, False)] + (extra if split_tail else []):
                            specs.append(runtime_spec(  # (FWD_LAG_PV; with a mask and dropout once)
                                kern, lag_sig, dict(consts, BLOCK_M=bm, BLOCK_N=bn, SPLIT_TAIL=split_tail, LAG_PV=True,
                                                    MASK_KIND=mk, DROPOUT=drop), w, s,
                                f"attn_fwd[{tag},{ty},{prec},{bm}x{bn},w{w}s{s},lag,tail={int(split_tail)},"
                                f"mask={mk},dropout={int(drop)}]", div16=_row_strides(sig)))
        progs = persist_tiles(_block_d(d))
        if progs and not causal and ty in ("bf16", "fp16"):  # the persistent forward's tiles (FWD_PERSIST; with a
            kern = _kernel("fwd")  # mask and dropout once, at ViT's head dim 64 in bf16)
            sig, consts = _aot_signature(kern, "*" + ty)
            consts.update(HEAD_DIM=d, BLOCK_D=_block_d(d), CAUSAL=False, PRECISION=prec, SPLIT_TAIL=False,
                          LAG_PV=False, DROPOUT=False, MASK_KIND=0)
            for i, cfg in enumerate(c for c in _configs_for("fwd", _block_d(d), es) if c in progs):
                bm, bn, w, st = cfg
                extra = [(dict(sig, Mask="*bf16"), 1, False), (sig, 0, True)] if i == 0 and (d, ty) == (64, "bf16") \
                    else []
                for p_sig, mk, drop in [(sig, 0, False)] + extra:
                    specs.append(runtime_spec(
                        kern, p_sig, dict(consts, BLOCK_M=bm, BLOCK_N=bn, MASK_KIND=mk, DROPOUT=drop,
                                          PERSIST=progs[cfg]), w, st,
                        f"attn_fwd[D={d},{ty},{prec},{bm}x{bn},w{w}s{st},persist={progs[cfg]},mask={mk},"
                        f"dropout={int(drop)}]", div16=_row_strides(sig), min_cc=90))
        if not seen.issuperset({"mask"}):
            seen.add("mask")
            sig, consts = _aot_signature(_dropout_mask_kernel, "*i8")
            specs.append(runtime_spec(_dropout_mask_kernel, sig, dict(consts, BLOCK_M=_MASK_BLOCK[0],
                                                                        BLOCK_N=_MASK_BLOCK[1]), 4, 1,
                                      "attn_dropout_mask", div16=()))
        bd = _block_d(d)  # the preprocess kernel always pads (one cheap pass)
        if ("pre", ty, bd) not in seen:
            seen.add(("pre", ty, bd))
            sig, consts = _aot_signature(_attn_bwd_preprocess, "*" + ty)
            consts.update(HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=_pre_block_m(bd))
            specs.append(runtime_spec(_attn_bwd_preprocess, sig, consts, 4, 3, f"attn_bwd_preprocess[D={d},{ty}]",
                                      div16=_row_strides(sig)))
    return specs


AOT_SPECS: List[AotSpec] = _aot_specs()

"""Fused patch embedding: image -> tokens + bias + position embedding + class/register tokens.

Since stride == kernel == patch, the Conv2d is a GEMM whose A operand (the implicit im2col) is read
straight from the image by strides (NCHW or channels_last, no copy); the epilogue adds bias and pos_embed
and stores into the token rows, and extra programs of the same launch write the prefix (cls/register) rows.
Backward: dW is a split-M GEMM over the implicit im2col (fp32 partials summed in a fixed order), the
token grads (pos_embed, cls, reg, bias) come from one batch-sum of dOut, and d images is dOut @ W
scattered back to the image layout (patches do not overlap). No float atomics: bit-reproducible.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from flashvit.kernels._aot import AotSpec, runtime_spec
from flashvit.kernels._dispatch import (
    HAS_TRITON,
    INTERPRET,
    Launcher,
    apply,
    autocast_dtype,
    cdiv,
    check_same_device,
    check_tensor,
    check_triton_dtypes,
    custom_op,
    launch,
    once_differentiable,
    triton,
    use_triton,
)

if HAS_TRITON:
    import triton.language as tl

    @triton.jit
    def _pe_fwd_kernel(
        img_ptr, koff_ptr, w_ptr, bias_ptr, pos_ptr, cls_ptr, reg_ptr, out_ptr,
        B, L, GW, D, K, P, NP, NCLS,
        s_ib, s_ih, s_iw,
        HAS_BIAS, HAS_POS, POS_OFF, PREFIX_POS,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr, VEC: tl.constexpr,
    ):
        # img (B, C, H, W) any strides; K = C*P*P padded to a multiple of 128 (>= BK): no k masks;
        # koff (K,) int64 image offset of k = (c, i, j) within a patch (a table: no div/mod in the loop; the
        # pad repeats real in-patch offsets); w (D, K) contiguous, zero in the pad; bias (D,);
        # pos (T_pos, D); cls (NCLS, D); reg (NP - NCLS, D); out (B, NP + L, D) contiguous.
        # Programs [0, n_mt * n_nt) do the GEMM tiles (n fastest: neighbours share the image tile in L2);
        # the rest write the B*NP prefix rows.
        pid = tl.program_id(0)
        n_nt = tl.cdiv(D, BN)
        n_mt = tl.cdiv(B * L, BM)
        pid_m = pid // n_nt
        pid_n = pid % n_nt
        rn = pid_n * BN + tl.arange(0, BN)
        n_mask = rn < D
        T = NP + L
        if pid_m < n_mt:
            rm = pid_m * BM + tl.arange(0, BM)  # patch rows m = b * L + l
            m_mask = rm < B * L
            b = rm // L
            l_ = rm % L
            gh = l_ // GW
            gw = l_ % GW
            row_off = b.to(tl.int64) * s_ib + (gh * P).to(tl.int64) * s_ih + (gw * P).to(tl.int64) * s_iw  # (BM,)
            if VEC > 1:  # see _vec(): runs of VEC contiguous, VEC-aligned pixels -> vector loads
                row_off = tl.multiple_of(row_off, VEC)
            a_rows = img_ptr + row_off  # (BM,) pointers to each patch's top-left pixel
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, K, BK):
                rk = k0 + tl.arange(0, BK)
                col_off = tl.load(koff_ptr + rk)  # (BK,)
                if VEC > 1:
                    col_off = tl.max_contiguous(tl.multiple_of(col_off, VEC), VEC)
                a = tl.load(a_rows[:, None] + col_off[None, :], mask=m_mask[:, None], other=0.0)  # (BM, BK)
                w = tl.load(w_ptr + rn[None, :].to(tl.int64) * K + rk[:, None], mask=n_mask[None, :],
                            other=0.0)  # (BK, BN)
                if IEEE:
                    acc = tl.dot(a, w, acc=acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, w, acc=acc)
            if HAS_BIAS != 0:
                acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            mn_mask = m_mask[:, None] & n_mask[None, :]
            if HAS_POS != 0:
                acc += tl.load(pos_ptr + (l_ + POS_OFF)[:, None].to(tl.int64) * D + rn[None, :],
                               mask=mn_mask, other=0.0).to(tl.float32)
            out_off = (b.to(tl.int64) * T + NP + l_)[:, None] * D + rn[None, :]
            tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mn_mask)
        else:
            rr = (pid_m - n_mt) * BM + tl.arange(0, BM)  # prefix rows r = b * NP + t
            r_mask = rr < B * NP  # only launched when NP > 0
            b = rr // NP
            t = rr % NP
            is_cls = t < NCLS
            mask = r_mask[:, None] & n_mask[None, :]
            v = tl.load(cls_ptr + t[:, None] * D + rn[None, :], mask=mask & is_cls[:, None], other=0.0).to(tl.float32)
            v += tl.load(reg_ptr + (t - NCLS)[:, None] * D + rn[None, :], mask=mask & (t >= NCLS)[:, None],
                         other=0.0).to(tl.float32)
            if PREFIX_POS != 0:
                v += tl.load(pos_ptr + t[:, None] * D + rn[None, :], mask=mask, other=0.0).to(tl.float32)
            out_off = (b.to(tl.int64) * T + t)[:, None] * D + rn[None, :]
            tl.store(out_ptr + out_off, v.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _pe_bwd_dw_kernel(
        g_ptr, img_ptr, koff_ptr, dw_ptr,
        B, L, GW, D, K, P, NP, CHUNK,
        s_ib, s_ih, s_iw,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr, VEC: tl.constexpr,
    ):
        # g = dOut (B, NP + L, D) contiguous; img (B, C, H, W) any strides;
        # koff (K,) as in the forward (K padded to a multiple of 128 >= BK: no k masks);
        # dw partials (SPLIT, D, K) fp32: split s sums patch rows m in [s*CHUNK, (s+1)*CHUNK).
        pid = tl.program_id(0)
        split = tl.program_id(1)
        n_kt = tl.cdiv(K, BK)
        pid_n = pid // n_kt
        pid_k = pid % n_kt
        rn = pid_n * BN + tl.arange(0, BN)
        rk = pid_k * BK + tl.arange(0, BK)
        n_mask = rn < D
        col_off = tl.load(koff_ptr + rk)  # (BK,)
        if VEC > 1:  # see _vec()
            col_off = tl.max_contiguous(tl.multiple_of(col_off, VEC), VEC)
        T = NP + L
        m_end = tl.minimum((split + 1) * CHUNK, B * L)
        acc = tl.zeros((BN, BK), dtype=tl.float32)
        for m0 in range(split * CHUNK, m_end, BM):
            rm = m0 + tl.arange(0, BM)
            m_mask = rm < m_end
            b = rm // L
            l_ = rm % L
            row_off = (b.to(tl.int64) * s_ib + ((l_ // GW) * P).to(tl.int64) * s_ih
                       + ((l_ % GW) * P).to(tl.int64) * s_iw)
            if VEC > 1:
                row_off = tl.multiple_of(row_off, VEC)
            a = tl.load(img_ptr + row_off[:, None] + col_off[None, :], mask=m_mask[:, None], other=0.0)  # (BM, BK)
            g = tl.load(g_ptr + (b.to(tl.int64) * T + NP + l_)[:, None] * D + rn[None, :],
                        mask=m_mask[:, None] & n_mask[None, :], other=0.0)  # (BM, BN)
            gt = tl.trans(g.to(a.dtype))  # (BN, BM)
            if IEEE:
                acc = tl.dot(gt, a, acc=acc, input_precision="ieee")
            else:
                acc = tl.dot(gt, a, acc=acc)
        off = split.to(tl.int64) * D * K + rn[:, None].to(tl.int64) * K + rk[None, :]
        tl.store(dw_ptr + off, acc, mask=n_mask[:, None])

    @triton.jit
    def _pe_bwd_dx_kernel(
        g_ptr, w_ptr, dx_ptr,
        B, L, GW, D, K, P, NP,
        s_xb, s_xc, s_xh, s_xw,
        BM: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, IEEE: tl.constexpr,
    ):
        # g = dOut (B, NP + L, D) contiguous; w (D, K) contiguous; dx (B, C, H, W) any dense strides:
        # dA[m, k] = sum_d g[m, d] w[d, k], each image element written exactly once.
        pid = tl.program_id(0)
        n_kt = tl.cdiv(K, BK)
        pid_m = pid // n_kt
        pid_k = pid % n_kt
        rm = pid_m * BM + tl.arange(0, BM)
        rk = pid_k * BK + tl.arange(0, BK)
        m_mask = rm < B * L
        k_mask = rk < K
        b = rm // L
        l_ = rm % L
        T = NP + L
        g_row = (b.to(tl.int64) * T + NP + l_) * D  # (BM,)
        acc = tl.zeros((BM, BK), dtype=tl.float32)
        for d0 in range(0, D, BD):
            rd = d0 + tl.arange(0, BD)
            d_mask = rd < D
            w = tl.load(w_ptr + rd[:, None].to(tl.int64) * K + rk[None, :],
                        mask=d_mask[:, None] & k_mask[None, :], other=0.0)  # (BD, BK)
            g = tl.load(g_ptr + g_row[:, None] + rd[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(g.to(w.dtype), w, acc=acc, input_precision="ieee")
            else:
                acc = tl.dot(g.to(w.dtype), w, acc=acc)
        PP = P * P
        c = rk // PP
        r = rk % PP
        col_off = c.to(tl.int64) * s_xc + (r // P).to(tl.int64) * s_xh + (r % P).to(tl.int64) * s_xw
        row_off = b.to(tl.int64) * s_xb + ((l_ // GW) * P).to(tl.int64) * s_xh + ((l_ % GW) * P).to(tl.int64) * s_xw
        tl.store(dx_ptr + row_off[:, None] + col_off[None, :], acc.to(dx_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & k_mask[None, :])

    @triton.jit
    def _pe_bwd_tokens_kernel(g_ptr, s_ptr, B, N, BLOCK: tl.constexpr):
        # g = dOut (B, N) contiguous, N = T*D -> s (N,) fp32 = sum over the batch, in batch order.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        ptrs = g_ptr + offs
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for _ in range(0, B):
            acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            ptrs += N
        tl.store(s_ptr + offs, acc, mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch configurations. On a GPU a small autotune set per kernel (keyed on the problem shape, not the
# batch); under the interpreter one fixed config (benchmarking there is meaningless and slow).

# (BM, BN, BK, num_warps, num_stages): out tile BM x BN, K step BK.
_FWD_CONFIGS = [(128, 128, 64, 8, 3), (128, 64, 32, 4, 4)]
# (BM, BN, BK, ...): dW tile BN (over D) x BK (over K), M step BM.
_DW_CONFIGS = [(32, 128, 128, 8, 3), (64, 64, 64, 4, 3)]
# (BM, BK, BD, ...): d image tile BM x BK, D step BD.
_DX_CONFIGS = [(128, 64, 64, 8, 3), (64, 64, 64, 4, 3)]
# fp32 images (exact "ieee" FMA dots, for accuracy rather than speed): one fixed, spill-free config each.
_FP32_CONFIGS = {"fwd": (64, 64, 32, 4, 3), "dw": (32, 64, 64, 4, 2), "dx": (64, 64, 32, 4, 2)}
_TOKENS_BLOCK, _TOKENS_WARPS = 1024, 4
_INTERPRET_FWD = dict(BM=128, BN=32, BK=64)  # big tiles: the interpreter pays per program
_INTERPRET_DW = dict(BM=128, BN=32, BK=128)
_INTERPRET_DX = dict(BM=128, BK=128, BD=32)
_INTERPRET_TOKENS_BLOCK = 512
# dW splits the B*L patch rows into ceil(M / this) chunks (fp32 partials summed in a fixed order); a
# function of the shape only, so the result is the same bits on every run and every GPU.
DW_ROWS_PER_SPLIT = 8192
_DW_MAX_SPLITS = 32

if HAS_TRITON:
    def _autotuned(kernel, configs, names, key):
        return triton.autotune(
            configs=[triton.Config(dict(zip(names, c[:3])), num_warps=c[3], num_stages=c[4]) for c in configs],
            key=key)(kernel)

    _pe_fwd_tuned = Launcher(_autotuned(_pe_fwd_kernel, _FWD_CONFIGS, ("BM", "BN", "BK"), ["L", "D", "K"]))
    _pe_bwd_dw_tuned = Launcher(_autotuned(_pe_bwd_dw_kernel, _DW_CONFIGS, ("BM", "BN", "BK"),
                                           ["L", "D", "K", "CHUNK"]))
    _pe_bwd_dx_tuned = Launcher(_autotuned(_pe_bwd_dx_kernel, _DX_CONFIGS, ("BM", "BK", "BD"), ["L", "D", "K"]))


def _geometry(images: torch.Tensor, weight_shape: Sequence[int]) -> Tuple[int, int, int, int, int, int]:
    """(B, L, GW, D, K, p) of a patch embedding of ``images`` by a (D, C, p, p) weight."""
    B, C, H, W = images.shape
    D, p = weight_shape[0], weight_shape[-1]
    return B, (H // p) * (W // p), W // p, D, C * p * p, p


def _vec(images: torch.Tensor, p: int) -> int:
    """VEC for 16-bit images whose patch rows are runs of VEC contiguous pixels at offsets that are multiples
    of VEC (stride(3) == 1, p and the other strides divisible by VEC): the kernels tell the compiler so
    (multiple_of / max_contiguous) and it issues 16-byte (VEC 8: p = 8, 16, 32) or 4-byte (VEC 2: p = 14)
    async copies instead of 2-byte gathers. 1 otherwise (channels_last, odd p, fp32, unaligned)."""
    if images.element_size() != 2 or images.stride(3) != 1:
        return 1
    for vec in (8, 2):
        if p % vec == 0 and all(s % vec == 0 for s in images.stride()[:3]) and images.data_ptr() % (2 * vec) == 0:
            return vec
    return 1


_KOFF_CACHE: dict = {}
_K_PAD = 128  # a multiple of every BK, so the K loops need no masks
assert all(_K_PAD % c[2] == 0 for c in _FWD_CONFIGS + _DW_CONFIGS + [_FP32_CONFIGS["fwd"], _FP32_CONFIGS["dw"],
                                                                    tuple(_INTERPRET_FWD.values()),
                                                                    tuple(_INTERPRET_DW.values())])


def _fixed(kind: str, names: Tuple[str, str, str]) -> dict:
    c = _FP32_CONFIGS[kind]
    return dict(zip(names, c[:3]), num_warps=c[3], num_stages=c[4])


def _padded_k(K: int) -> int:
    return cdiv(K, _K_PAD) * _K_PAD


def _patch_offsets(images: torch.Tensor, p: int) -> torch.Tensor:
    """(KP,) int64: offset of pixel (c, i, j) of a patch from its top-left pixel, in images' strides, for
    k < K = C*p*p; the pad up to KP = _padded_k(K) repeats the table (real pixels, same VEC runs)."""
    C = images.shape[1]
    _, s_c, s_h, s_w = images.stride()
    key = (C, p, s_c, s_h, s_w, images.device)
    t = _KOFF_CACHE.get(key)
    if t is None:
        r = torch.arange(p, dtype=torch.int64)
        t = (torch.arange(C, dtype=torch.int64)[:, None, None] * s_c + r[None, :, None] * s_h
             + r[None, None, :] * s_w).reshape(-1)
        K = t.numel()
        t = t.repeat(cdiv(_padded_k(K), K))[:_padded_k(K)].to(images.device)
        if len(_KOFF_CACHE) > 64:
            _KOFF_CACHE.clear()
        _KOFF_CACHE[key] = t
    return t


def patch_embed_fwd(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    pos_embed: Optional[torch.Tensor], cls_token: Optional[torch.Tensor],
                    reg_tokens: Optional[torch.Tensor], no_embed_class: bool) -> torch.Tensor:
    """Launch the fused forward. weight/bias/cls/reg in images.dtype; pos_embed in images.dtype or fp32."""
    B, L, GW, D, K, p = _geometry(images, weight.shape)
    ncls = 0 if cls_token is None else cls_token.shape[1]
    NP = ncls + (0 if reg_tokens is None else reg_tokens.shape[1])
    out_dtype = images.dtype if pos_embed is None else torch.promote_types(images.dtype, pos_embed.dtype)
    out = torch.empty(B, NP + L, D, dtype=out_dtype, device=images.device)
    if out.numel() == 0:
        return out
    KP = _padded_k(K)
    w2 = weight.reshape(D, K)  # (D, K), k = (c, i, j)
    w2 = w2.contiguous() if KP == K else F.pad(w2, (0, KP - K))  # zero pad: those products vanish
    dummy = w2  # stands in for absent tensors; never read (HAS_* flags, masks)
    args = (images, _patch_offsets(images, p), w2, dummy if bias is None else bias.contiguous(),
            dummy if pos_embed is None else pos_embed.reshape(-1, D).contiguous(),
            dummy if cls_token is None else cls_token.reshape(-1, D).contiguous(),
            dummy if reg_tokens is None else reg_tokens.reshape(-1, D).contiguous(), out,
            B, L, GW, D, KP, p, NP, ncls, images.stride(0), images.stride(2), images.stride(3),
            int(bias is not None), int(pos_embed is not None), 0 if no_embed_class else NP,
            int(pos_embed is not None and not no_embed_class))

    def grid(meta):
        n_nt = cdiv(D, meta["BN"])
        return ((cdiv(B * L, meta["BM"]) + cdiv(B * NP, meta["BM"])) * n_nt,)

    ieee = images.dtype == torch.float32
    if INTERPRET:
        launch(_pe_fwd_kernel, grid, *args, **_INTERPRET_FWD, IEEE=ieee, VEC=_vec(images, p))
    elif ieee:
        launch(_pe_fwd_kernel, grid, *args, **_fixed("fwd", ("BM", "BN", "BK")), IEEE=True, VEC=1)
    else:
        _pe_fwd_tuned(grid, args, dict(IEEE=ieee, VEC=_vec(images, p)))
    return out


def patch_embed_bwd_weight(grad: torch.Tensor, images: torch.Tensor, patch: int, num_prefix: int) -> torch.Tensor:
    """dW (D, K) fp32 = sum over patch rows of dOut[m, :]^T A[m, :] (implicit im2col), split-M, no atomics."""
    B, C, H, W = images.shape
    D = grad.shape[-1]
    L, GW, K = (H // patch) * (W // patch), W // patch, C * patch * patch
    M = B * L
    splits = max(1, min(_DW_MAX_SPLITS, cdiv(M, DW_ROWS_PER_SPLIT)))
    chunk = max(1, cdiv(M, splits))
    KP = _padded_k(K)
    part = torch.empty(splits, D, KP, dtype=torch.float32, device=grad.device)
    args = (grad, images, _patch_offsets(images, patch), part, B, L, GW, D, KP, patch, num_prefix, chunk,
            images.stride(0), images.stride(2), images.stride(3))

    def grid(meta):
        return (cdiv(D, meta["BN"]) * cdiv(KP, meta["BK"]), splits)

    ieee = images.dtype == torch.float32
    if INTERPRET:
        launch(_pe_bwd_dw_kernel, grid, *args, **_INTERPRET_DW, IEEE=ieee, VEC=_vec(images, patch))
    elif ieee:
        launch(_pe_bwd_dw_kernel, grid, *args, **_fixed("dw", ("BM", "BN", "BK")), IEEE=True, VEC=1)
    else:
        _pe_bwd_dw_tuned(grid, args, dict(IEEE=ieee, VEC=_vec(images, patch)))
    return (part[0] if splits == 1 else part.sum(0))[:, :K].contiguous()


def patch_embed_bwd_images(grad: torch.Tensor, weight: torch.Tensor, images: torch.Tensor,
                           num_prefix: int) -> torch.Tensor:
    """d images (same shape, dtype and memory format as images) = dOut @ W scattered to the patches."""
    B, L, GW, D, K, p = _geometry(images, weight.shape)
    dx = torch.empty_like(images)  # dense, in images' memory format (NCHW or channels_last)
    if dx.numel() == 0:
        return dx
    w2 = weight.reshape(D, K).contiguous()
    args = (grad, w2, dx, B, L, GW, D, K, p, num_prefix, *dx.stride())

    def grid(meta):
        return (cdiv(B * L, meta["BM"]) * cdiv(K, meta["BK"]),)

    ieee = images.dtype == torch.float32
    if INTERPRET:
        launch(_pe_bwd_dx_kernel, grid, *args, **_INTERPRET_DX, IEEE=ieee)
    elif ieee:
        launch(_pe_bwd_dx_kernel, grid, *args, **_fixed("dx", ("BM", "BK", "BD")), IEEE=True)
    else:
        _pe_bwd_dx_tuned(grid, args, dict(IEEE=ieee))
    return dx


def patch_embed_bwd_tokens(grad: torch.Tensor) -> torch.Tensor:
    """(B, T, D) dOut -> (T, D) fp32 sum over the batch (the pos_embed / cls / reg / bias grads)."""
    B, T, D = grad.shape
    s = torch.empty(T, D, dtype=torch.float32, device=grad.device)
    N = T * D
    if N == 0:
        return s
    block = _INTERPRET_TOKENS_BLOCK if INTERPRET else _TOKENS_BLOCK
    launch(_pe_bwd_tokens_kernel, (cdiv(N, block),), grad, s, B, N, BLOCK=block, num_warps=_TOKENS_WARPS)
    return s


# ---------------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile, no graph break) around the launchers.

@custom_op("patch_embed_fwd")
def _patch_embed_fwd_op(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        pos_embed: Optional[torch.Tensor], cls_token: Optional[torch.Tensor],
                        reg_tokens: Optional[torch.Tensor], no_embed_class: bool) -> torch.Tensor:
    return patch_embed_fwd(images, weight, bias, pos_embed, cls_token, reg_tokens, no_embed_class)


@_patch_embed_fwd_op.register_fake
def _(images, weight, bias, pos_embed, cls_token, reg_tokens, no_embed_class):
    B, L, _, D, _, _ = _geometry(images, weight.shape)
    NP = sum(t.shape[1] for t in (cls_token, reg_tokens) if t is not None)
    dtype = images.dtype if pos_embed is None else torch.promote_types(images.dtype, pos_embed.dtype)
    return images.new_empty((B, NP + L, D), dtype=dtype)


@custom_op("patch_embed_bwd_weight")
def _patch_embed_bwd_weight_op(grad: torch.Tensor, images: torch.Tensor, patch: int, num_prefix: int) -> torch.Tensor:
    return patch_embed_bwd_weight(grad, images, patch, num_prefix)


@_patch_embed_bwd_weight_op.register_fake
def _(grad, images, patch, num_prefix):
    return grad.new_empty((grad.shape[-1], images.shape[1] * patch * patch), dtype=torch.float32)


@custom_op("patch_embed_bwd_images")
def _patch_embed_bwd_images_op(grad: torch.Tensor, weight: torch.Tensor, images: torch.Tensor,
                               num_prefix: int) -> torch.Tensor:
    return patch_embed_bwd_images(grad, weight, images, num_prefix)


@_patch_embed_bwd_images_op.register_fake
def _(grad, weight, images, num_prefix):
    return torch.empty_like(images)


@custom_op("patch_embed_bwd_tokens")
def _patch_embed_bwd_tokens_op(grad: torch.Tensor) -> torch.Tensor:
    return patch_embed_bwd_tokens(grad)


@_patch_embed_bwd_tokens_op.register_fake
def _(grad):
    return grad.new_empty(grad.shape[1:], dtype=torch.float32)


class PatchEmbedFn(torch.autograd.Function):
    """Fused patch embedding; backward gives every input its gradient, d images only when asked."""

    @staticmethod
    def forward(ctx, images, weight, bias, pos_embed, cls_token, reg_tokens, no_embed_class):
        out = _patch_embed_fwd_op(images, weight, bias, pos_embed, cls_token, reg_tokens,
                                                 no_embed_class)
        ctx.save_for_backward(images, weight)
        ctx.ncls = 0 if cls_token is None else cls_token.shape[1]
        ctx.nreg = 0 if reg_tokens is None else reg_tokens.shape[1]
        ctx.no_embed_class = no_embed_class
        ctx.dtypes = [None if t is None else t.dtype for t in (bias, pos_embed, cls_token, reg_tokens)]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        images, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad = grad.contiguous()  # (B, T, D)
        NP = ctx.ncls + ctx.nreg
        p = weight.shape[-1]
        d_img = d_w = d_bias = d_pos = d_cls = d_reg = None
        if need[0]:
            d_img = _patch_embed_bwd_images_op(grad, weight, images, NP)
        if need[1]:
            d_w = _patch_embed_bwd_weight_op(grad, images, p, NP)
            d_w = d_w.view(weight.shape).to(weight.dtype)
        if any(need[2:6]):
            s = _patch_embed_bwd_tokens_op(grad)  # (T, D) fp32
            bias_dt, pos_dt, cls_dt, reg_dt = ctx.dtypes
            if need[2]:
                d_bias = s[NP:].sum(0).to(bias_dt)
            if need[3]:
                d_pos = (s[NP:] if ctx.no_embed_class else s).unsqueeze(0).to(pos_dt)
            if need[4]:
                d_cls = s[:ctx.ncls].unsqueeze(0).to(cls_dt)
            if need[5]:
                d_reg = s[ctx.ncls:NP].unsqueeze(0).to(reg_dt)
        return d_img, d_w, d_bias, d_pos, d_cls, d_reg, None


# ---------------------------------------------------------------------------------------------
# Every launch configuration the launchers can pick, for the ahead-of-time compile gate.

_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# (images/weight dtype X, pos_embed dtype P): P is X or fp32 (the functional casts anything else);
# out (and dOut) dtype O = promote(X, P).
_DTYPE_COMBOS = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                 (torch.float16, torch.float32), (torch.bfloat16, torch.float32)]


def _aot_specs() -> List[AotSpec]:
    if not HAS_TRITON:
        return []
    specs: List[AotSpec] = []
    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    for x, p in _DTYPE_COMBOS:
        X, P, Y = _TL[x], _TL[p], _TL[torch.promote_types(x, p)]
        ieee = x == torch.float32
        vecs = (1,) if ieee else (1, 2, 8)  # _vec() gives 2 or 8 only to 16-bit images
        for bm, bn, bk, nw, ns in [_FP32_CONFIGS["fwd"]] if ieee else _FWD_CONFIGS:
            sig = {"img_ptr": f"*{X}", "koff_ptr": "*i64", "w_ptr": f"*{X}", "bias_ptr": f"*{X}",
                   "pos_ptr": f"*{P}", "cls_ptr": f"*{X}", "reg_ptr": f"*{X}", "out_ptr": f"*{Y}",
                   **ints("B", "L", "GW", "D", "K", "P", "NP", "NCLS", "s_ib", "s_ih", "s_iw",
                          "HAS_BIAS", "HAS_POS", "POS_OFF", "PREFIX_POS"),
                   "BM": "constexpr", "BN": "constexpr", "BK": "constexpr", "IEEE": "constexpr",
                   "VEC": "constexpr"}
            for vec in vecs:  # VEC > 1 implies a unit pixel stride; K is always padded to a multiple of 128
                specs.append(runtime_spec(_pe_fwd_kernel, sig, dict(BM=bm, BN=bn, BK=bk, IEEE=ieee, VEC=vec), nw, ns,
                                          f"pe_fwd[{X},{P}->{Y},{bm}x{bn}x{bk},w{nw}s{ns},v{vec}]",
                                          ("D", "K", "s_ib", "s_ih"), ("s_iw",) if vec > 1 else ()))
        for bm, bn, bk, nw, ns in [_FP32_CONFIGS["dw"]] if ieee else _DW_CONFIGS:
            sig = {"g_ptr": f"*{Y}", "img_ptr": f"*{X}", "koff_ptr": "*i64", "dw_ptr": "*fp32",
                   **ints("B", "L", "GW", "D", "K", "P", "NP", "CHUNK", "s_ib", "s_ih", "s_iw"),
                   "BM": "constexpr", "BN": "constexpr", "BK": "constexpr", "IEEE": "constexpr",
                   "VEC": "constexpr"}
            for vec in vecs:
                specs.append(runtime_spec(_pe_bwd_dw_kernel, sig, dict(BM=bm, BN=bn, BK=bk, IEEE=ieee, VEC=vec), nw, ns,
                                          f"pe_bwd_dw[{Y},{X},{bn}x{bk}x{bm},w{nw}s{ns},v{vec}]",
                                          ("D", "K", "s_ib", "s_ih"), ("s_iw",) if vec > 1 else ()))
        for bm, bk, bd, nw, ns in [_FP32_CONFIGS["dx"]] if ieee else _DX_CONFIGS:
            sig = {"g_ptr": f"*{Y}", "w_ptr": f"*{X}", "dx_ptr": f"*{X}",
                   **ints("B", "L", "GW", "D", "K", "P", "NP", "s_xb", "s_xc", "s_xh", "s_xw"),
                   "BM": "constexpr", "BK": "constexpr", "BD": "constexpr", "IEEE": "constexpr"}
            specs.append(runtime_spec(_pe_bwd_dx_kernel, sig, dict(BM=bm, BK=bk, BD=bd, IEEE=ieee), nw, ns,
                                      f"pe_bwd_dx[{Y},{X},{bm}x{bk}x{bd},w{nw}s{ns}]", ("D", "s_xb", "s_xc", "s_xh")))
    for o in (torch.float32, torch.float16, torch.bfloat16):
        sig = {"g_ptr": f"*{_TL[o]}", "s_ptr": "*fp32", "B": "i32", "N": "i32", "BLOCK": "constexpr"}
        specs.append(runtime_spec(_pe_bwd_tokens_kernel, sig, dict(BLOCK=_TOKENS_BLOCK), _TOKENS_WARPS, 3,
                                  f"pe_bwd_tokens[{_TL[o]}]", ("N",)))
    return specs


AOT_SPECS: List[AotSpec] = _aot_specs()


# ---------------------------------------------------------------------------------------------
# Validation, the eager reference (CPU fallback and float64 oracle), the public functional and module.

def _validate(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], pos_embed: Optional[torch.Tensor],
              cls_token: Optional[torch.Tensor], reg_tokens: Optional[torch.Tensor], no_embed_class: bool) -> None:
    check_tensor("images", images, ndim=4)
    check_tensor("weight", weight, ndim=4)
    B, C, H, W = images.shape
    D, Cw, p, pw = weight.shape
    if p != pw:
        raise ValueError(f"weight must be a square patch (D, C, p, p), got {tuple(weight.shape)}")
    if C != Cw:
        raise ValueError(f"images have {C} channels; expected {Cw} (weight is {tuple(weight.shape)})")
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} must be divisible by the patch size {p}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != D:
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({D},)")
    n_prefix = 0
    for name, t in (("cls_token", cls_token), ("reg_tokens", reg_tokens)):
        if t is not None:
            check_tensor(name, t, ndim=3)
            if t.shape[0] != 1 or t.shape[2] != D:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected (1, n, {D})")
            n_prefix += t.shape[1]
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed, ndim=3)
        L = (H // p) * (W // p)
        T = L if no_embed_class else L + n_prefix
        if tuple(pos_embed.shape) != (1, T, D):
            raise ValueError(f"pos_embed has shape {tuple(pos_embed.shape)}; expected (1, {T}, {D}) for "
                             f"{L} patches{'' if no_embed_class else f' + {n_prefix} prefix tokens'}")
    check_same_device(images=images, weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token,
                      reg_tokens=reg_tokens)


def patch_embed_reference(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          pos_embed: Optional[torch.Tensor], cls_token: Optional[torch.Tensor] = None,
                          reg_tokens: Optional[torch.Tensor] = None, no_embed_class: bool = False) -> torch.Tensor:
    """The eager five-step path: conv, flatten, transpose, cat prefix tokens, add pos_embed (timm's order)."""
    p = weight.shape[-1]
    x = F.conv2d(images, weight.to(images.dtype), None if bias is None else bias.to(images.dtype), stride=p)
    x = x.flatten(2).transpose(1, 2)  # (B, L, D)
    prefix = [t.to(x.dtype).expand(x.shape[0], -1, -1) for t in (cls_token, reg_tokens) if t is not None]
    if no_embed_class:
        if pos_embed is not None:
            x = x + pos_embed
        return torch.cat(prefix + [x], dim=1) if prefix else x
    x = torch.cat(prefix + [x], dim=1) if prefix else x
    return x + pos_embed if pos_embed is not None else x


def patch_embed(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                pos_embed: Optional[torch.Tensor], cls_token: Optional[torch.Tensor] = None,
                reg_tokens: Optional[torch.Tensor] = None, no_embed_class: bool = False, *,
                backend: Optional[str] = None) -> torch.Tensor:
    """images (B, C, H, W), weight (D, C, p, p) -> tokens (B, T, D): [cls, reg..., patches] + pos_embed.

    With ``no_embed_class=False`` pos_embed is (1, prefix + L, D) and added to every row; with True it is
    (1, L, D) and added to the patch rows only. The output dtype is promote(images, pos_embed) as in the
    eager path; weight, bias and the prefix tokens are used in the images' dtype (Conv2d's rule).
    """
    _validate(images, weight, bias, pos_embed, cls_token, reg_tokens, no_embed_class)
    if not use_triton(images, backend):
        return patch_embed_reference(images, weight, bias, pos_embed, cls_token, reg_tokens, no_embed_class)
    dt = autocast_dtype(images.device)
    if dt is not None and images.dtype != dt:
        images = images.to(dt)  # as autocast does for the eager Conv2d
    check_triton_dtypes(images=images, pos_embed=pos_embed)
    xd = images.dtype
    weight, bias, cls_token, reg_tokens = (None if t is None else t.to(xd)
                                           for t in (weight, bias, cls_token, reg_tokens))
    if pos_embed is not None and pos_embed.dtype not in (xd, torch.float32):
        pos_embed = pos_embed.to(torch.promote_types(xd, pos_embed.dtype))
    return apply(PatchEmbedFn, images, weight, bias, pos_embed, cls_token, reg_tokens, bool(no_embed_class))


def resample_pos_embed(pos_embed: torch.Tensor, new_size: Tuple[int, int], old_size: Optional[Tuple[int, int]] = None,
                       num_prefix_tokens: int = 1, mode: str = "bicubic", antialias: bool = True) -> torch.Tensor:
    """Resample a (1, prefix + gh*gw, D) absolute position embedding to a (new_h, new_w) patch grid.

    The prefix rows are kept as they are; the grid (square if ``old_size`` is None) is interpolated in
    float32 and cast back, as timm's ``resample_abs_pos_embed`` does.
    """
    check_tensor("pos_embed", pos_embed, ndim=3)
    new_size = (int(new_size[0]), int(new_size[1]))
    n_grid = pos_embed.shape[1] - num_prefix_tokens
    if old_size is None:
        side = math.isqrt(max(n_grid, 0))
        if side * side != n_grid:
            raise ValueError(f"pos_embed has {n_grid} grid rows after {num_prefix_tokens} prefix tokens, not a "
                             "square grid: pass old_size=(gh, gw)")
        old_size = (side, side)
    if old_size[0] * old_size[1] != n_grid:
        raise ValueError(f"pos_embed has {n_grid} grid rows after {num_prefix_tokens} prefix tokens; expected "
                         f"{old_size[0] * old_size[1]} for old_size={tuple(old_size)}")
    if tuple(old_size) == new_size:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    D = pos_embed.shape[2]
    grid = grid.float().reshape(1, old_size[0], old_size[1], D).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    grid = F.interpolate(grid, size=new_size, mode=mode, antialias=antialias, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_size[0] * new_size[1], D).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


class PatchEmbed(nn.Module):
    """timm's PatchEmbed (``proj`` is a Conv2d) for any image size divisible by the patch size.

    ``dynamic_img_size=True`` resamples a given pos_embed (laid out for ``grid_size``) to the grid of each
    input image, like timm's option of that name.
    """

    def __init__(self, img_size: Tuple[int, int] = (224, 224), patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, bias: bool = True, dynamic_img_size: bool = False) -> None:
        super().__init__()
        if isinstance(img_size, int):
            img_size = (img_size, img_size)
        self.img_size = tuple(img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.dynamic_img_size = dynamic_img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, images: torch.Tensor, pos_embed: Optional[torch.Tensor] = None,
                cls_token: Optional[torch.Tensor] = None, reg_tokens: Optional[torch.Tensor] = None,
                no_embed_class: bool = False) -> torch.Tensor:
        """(B, C, H, W) -> (B, T, D); with no tokens/pos_embed given this is timm's PatchEmbed output."""
        if self.dynamic_img_size and pos_embed is not None and images.dim() == 4:
            p = self.patch_size[0]
            grid = (images.shape[-2] // p, images.shape[-1] // p)
            n_prefix = 0 if no_embed_class else sum(t.shape[1] for t in (cls_token, reg_tokens) if t is not None)
            pos_embed = resample_pos_embed(pos_embed, grid, self.grid_size, n_prefix)
        return patch_embed(images, self.proj.weight, self.proj.bias, pos_embed, cls_token, reg_tokens, no_embed_class)

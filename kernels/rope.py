"""Rotary position embedding (RoPE) of query/key heads, forward and backward, one elementwise pass each.

The RoPE ViTs (EVA-02, DINOv3, timm's ``vit_*_rope_*``) rotate q and k per token before attention. timm does
it with slices, two products, a sum, a cast and a concatenation that puts the prefix (class/register) tokens
back: about eight passes over q and k, and as many in the backward. Here one kernel reads x and writes y.

Conventions (timm's ``apply_rot_embed_cat``): ``rope`` = cat(sin, cos) on its last dim, (..., N - P, 2·D),
broadcastable to (B, H, N - P, 2·D); the first P tokens are left as they are. y = x·cos + rot(x)·sin, where
rot pairs element c0 with c1 and maps (x[c0], x[c1]) -> (-x[c1], x[c0]): interleaved pairs (2i, 2i+1) (EVA-02,
timm's default) or halves (i, i + D/2) (``half``: DINOv3's rotate_half). Its transpose is -rot, so the
backward is dx = dy·cos - rot(dy·sin). Math in fp32, stored in x's dtype (timm's result with an fp32 table).

Each element is loaded once and stored once by the same program, so the backward can run in place (the packed
qkv gradient: ``qkv_attention(..., rope=...)``).

Anatomy (DESIGN.md §2): Triton kernel -> launcher (``rope_apply``) -> torch.library custom ops -> RopeFn ->
rope_reference -> apply_rope().
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from flashvit.kernels._aot import AotSpec, runtime_spec
from flashvit.kernels._dispatch import (
    HAS_TRITON,
    Launcher,
    apply,
    cdiv,
    check_same_device,
    check_tensor,
    check_triton_dtypes,
    custom_op,
    next_pow2,
    once_differentiable,
    triton,
    use_triton,
)

if HAS_TRITON:
    import triton.language as tl

    @triton.jit
    def _rope_kernel(X, Y, R, ROWS, N, T, H, NPT, sxb, sxn, sxt, sxh, syb, syn, syt, syh, srb, srh, srn,
                     HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_P: tl.constexpr):
        # X, Y: x[b, n, t, h, :] (unit last stride); rows (b, n, t, h) flattened, ROWS = B·N·T·H; t: q and k of
        # a packed qkv (T = 2) or one tensor (T = 1). R: (B|1, H|1, N - NPT, 2·HEAD_DIM) table, broadcast dims
        # stride 0: sin at column c, cos at HEAD_DIM + c. A (BLOCK_R, BLOCK_P) tile of pairs (c0, c1) a program.
        row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        h = row % H
        rest = row // H
        t = rest % T
        rest = rest // T
        n = rest % N
        b = (rest // N).to(tl.int64)
        p = n - NPT  # the token's row in the table; < 0: a prefix token, copied
        i = tl.arange(0, BLOCK_P)
        if HALF:
            c0 = i
            c1 = i + HEAD_DIM // 2
        else:
            c0 = 2 * i
            c1 = 2 * i + 1
        mask = (row < ROWS)[:, None] & (i < HEAD_DIM // 2)[None, :]
        xo = (b * sxb + n * sxn + t * sxt + h * sxh)[:, None]
        yo = (b * syb + n * syn + t * syt + h * syh)[:, None]
        x0 = tl.load(X + xo + c0[None, :], mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(X + xo + c1[None, :], mask=mask, other=0.0).to(tl.float32)
        rot = mask & (p >= 0)[:, None]
        ro = (b * srb + h * srh + p * srn)[:, None]
        s0 = tl.load(R + ro + c0[None, :], mask=rot, other=0.0).to(tl.float32)
        s1 = tl.load(R + ro + c1[None, :], mask=rot, other=0.0).to(tl.float32)
        k0 = tl.load(R + ro + HEAD_DIM + c0[None, :], mask=rot, other=1.0).to(tl.float32)
        k1 = tl.load(R + ro + HEAD_DIM + c1[None, :], mask=rot, other=1.0).to(tl.float32)
        if BACKWARD:  # dx = dy·cos - rot(dy·sin): (dy0·k0 + dy1·s1, dy1·k1 - dy0·s0)
            y0 = x0 * k0 + x1 * s1
            y1 = x1 * k1 - x0 * s0
        else:  # (x0·k0 - x1·s0, x1·k1 + x0·s1)
            y0 = x0 * k0 - x1 * s0
            y1 = x1 * k1 + x0 * s1
        tl.store(Y + yo + c0[None, :], y0.to(Y.dtype.element_ty), mask=mask)
        tl.store(Y + yo + c1[None, :], y1.to(Y.dtype.element_ty), mask=mask)

    _ROPE = Launcher(_rope_kernel)

# 512 pairs a program (4 a thread at 4 warps): a bandwidth-bound pass, the table read from L2. ptxas (Triton 3.8,
# sm_90, bf16, D = 64): 48 registers; 1024 pairs took 94, 2048 took 185 (occupancy, not more bytes in flight).
TILE_PAIRS = 512
NUM_WARPS = 4


def _tile(head_dim: int) -> Tuple[int, int]:
    """(BLOCK_R, BLOCK_P): BLOCK_P covers D/2 pairs, rows fill the rest of TILE_PAIRS."""
    bp = next_pow2(max(head_dim // 2, 1))
    return max(TILE_PAIRS // bp, 1), bp


def rope_apply(x: torch.Tensor, y: torch.Tensor, rope: torch.Tensor, num_prefix_tokens: int, half: bool,
               backward: bool) -> None:
    """Launch: x, y (B, N, T, H, D) views with unit last stride (y may be x: in place); rope (B|1, H|1, N - P, 2D)
    (expanded views welcome), unit last stride. Writes y = rope(x), or x's gradient for y's when ``backward``."""
    B, N, T, H, D = x.shape
    rows = B * N * T * H
    if rows == 0 or D == 0:
        return
    br, bp = _tile(D)
    _ROPE((cdiv(rows, br),), (x, y, rope, rows, N, T, H, num_prefix_tokens, *x.stride()[:4], *y.stride()[:4],
                              *rope.stride()[:3]),
          dict(HEAD_DIM=D, HALF=bool(half), BACKWARD=bool(backward), BLOCK_R=br, BLOCK_P=bp, num_warps=NUM_WARPS))


def rope_table(rope: torch.Tensor, batch: int, heads: int, tokens: int, head_dim: int) -> torch.Tensor:
    """``rope`` as the kernel's (B, H, N - P, 2D) view (broadcast dims stride 0, unit last stride); raises a
    ValueError when it does not broadcast there."""
    want = (batch, heads, tokens, 2 * head_dim)
    if rope.dim() > 4 or rope.shape[-1] != 2 * head_dim or rope.shape[-2] != tokens:
        raise ValueError(f"rope must be cat(sin, cos) of shape (..., {tokens}, {2 * head_dim}) broadcastable to "
                         f"{want} (a row for each token past the prefix), got {tuple(rope.shape)}")
    try:
        table = rope.expand(want)
    except RuntimeError:
        raise ValueError(f"rope of shape {tuple(rope.shape)} does not broadcast to {want}") from None
    # a copy of the table as given, never of its broadcast (B·H times larger)
    return table if rope.stride(-1) == 1 else rope.contiguous().expand(want)


def empty(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation of the rotated tensors (tests swap it for a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


# ---------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile, with fake implementations) and autograd.


@custom_op("rope")
def _rope_op(x: torch.Tensor, rope: torch.Tensor, num_prefix_tokens: int, half: bool,
                 backward: bool) -> torch.Tensor:
    x = _unit_last(x)
    B, N, H, D = x.shape
    y = empty((B, N, H, D), x.dtype, x.device)
    table = rope_table(rope, B, H, N - num_prefix_tokens, D)
    rope_apply(x.unsqueeze(2), y.unsqueeze(2), table, num_prefix_tokens, half, backward)
    return y


@_rope_op.register_fake
def _(x, rope, num_prefix_tokens, half, backward):
    return x.new_empty(x.shape)


class RopeFn(torch.autograd.Function):
    """(B, N, H, D) x -> rotated (B, N, H, D); rope is a constant (no gradient)."""

    @staticmethod
    def forward(ctx, x, rope, num_prefix_tokens: int, half: bool):
        ctx.save_for_backward(rope)
        ctx.args = (num_prefix_tokens, half)
        return _rope_op(x, rope, num_prefix_tokens, half, False)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (rope,) = ctx.saved_tensors
        return _rope_op(dy, rope, *ctx.args, True), None, None, None


# ---------------------------------------------------------------------------------------------
# Reference, validation, public functional.


def _rot(x: torch.Tensor, half: bool) -> torch.Tensor:
    if half:
        x0, x1 = x.chunk(2, dim=-1)
        return torch.cat([-x1, x0], dim=-1)
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)


def rope_reference(x: torch.Tensor, rope: torch.Tensor, num_prefix_tokens: int = 0,
                   half: bool = False) -> torch.Tensor:
    """timm's rotation on (B, N, H, D) x in plain PyTorch (differentiable in x and rope); returns x's dtype."""
    P = num_prefix_tokens
    sin, cos = rope.chunk(2, dim=-1)  # (..., N - P, D), broadcast against (B, H, N - P, D)
    body = x[:, P:].transpose(1, 2)  # (B, H, N - P, D)
    body = (body * cos + _rot(body, half) * sin).to(x.dtype)
    return torch.cat([x[:, :P], body.transpose(1, 2)], dim=1)


def check_rope_args(x_shape: Tuple[int, ...], rope: torch.Tensor, num_prefix_tokens: int,
                    where: str = "x") -> None:
    """Shape checks shared with qkv_attention(rope=...): x_shape is (B, N, H, D)."""
    check_tensor("rope", rope, min_ndim=2)
    B, N, H, D = x_shape
    if D % 2:
        raise ValueError(f"rope rotates pairs of features: the head dim of {where} must be even, got {D}")
    if not 0 <= num_prefix_tokens <= N:
        raise ValueError(f"num_prefix_tokens must be in [0, {N}] (the tokens of {where}), got {num_prefix_tokens}")
    rope_table(rope, B, H, N - num_prefix_tokens, D)


def apply_rope(x: torch.Tensor, rope: torch.Tensor, num_prefix_tokens: int = 0, half: bool = False, *,
               backend: Optional[str] = None) -> torch.Tensor:
    """Rotary embedding of (B, N, H, D) query or key heads (any strides); returns a new (B, N, H, D).

    ``rope``: cat(sin, cos), (..., N - P, 2·D) broadcastable to (B, H, N - P, 2·D), as timm's rotary modules
    give it (``RotaryEmbeddingCat.get_embed()``); the first ``num_prefix_tokens`` tokens (P) stay as they are.
    ``half``: pairs (i, i + D/2) (DINOv3, ``rotate_half``) instead of (2i, 2i + 1) (EVA-02). The Triton path
    treats rope as a constant; a rope that requires grad (timm's learned 'mixed' frequencies) takes the
    reference, which differentiates it. ``backend``: "auto" | "torch" | "triton".
    """
    check_tensor("x", x, ndim=4)
    check_rope_args(tuple(x.shape), rope, num_prefix_tokens)
    check_same_device(x=x, rope=rope)
    P, half = int(num_prefix_tokens), bool(half)
    if not use_triton(x, backend) or x.dtype == torch.float64 or rope.dtype == torch.float64 or (
            torch.is_grad_enabled() and rope.requires_grad):
        return rope_reference(x, rope, P, half)
    check_triton_dtypes(x=x, rope=rope)
    return apply(RopeFn, x, rope, P, half)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile gate: the kernel at ViT head dims, both layouts, both directions, every dtype.

_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_AOT_HEAD_DIMS = (32, 64, 80, 128)


def _aot_specs() -> List[AotSpec]:
    if not HAS_TRITON:
        return []
    specs: List[AotSpec] = []
    ints = ("ROWS", "N", "T", "H", "NPT", "sxb", "sxn", "sxt", "sxh", "syb", "syn", "syt", "syh", "srb", "srh",
            "srn")
    for ty in _TY.values():
        for d in _AOT_HEAD_DIMS:
            for half in (False, True):
                for backward in (False, True):
                    if ty == "fp16" and (half or backward) and d != 64:
                        continue  # fp16 shares bf16's code; one head dim covers its casts
                    br, bp = _tile(d)
                    # the table: timm's fp32; transformers' DINOv3 casts it to the model's dtype
                    for rty in ("fp32", ty) if (d, half) == (64, True) and ty != "fp32" else ("fp32",):
                        sig = {"X": f"*{ty}", "Y": f"*{ty}", "R": f"*{rty}", **{k: "i32" for k in ints},
                               "HEAD_DIM": "constexpr", "HALF": "constexpr", "BACKWARD": "constexpr",
                               "BLOCK_R": "constexpr", "BLOCK_P": "constexpr"}
                        consts = dict(HEAD_DIM=d, HALF=half, BACKWARD=backward, BLOCK_R=br, BLOCK_P=bp)
                        specs.append(runtime_spec(_rope_kernel, sig, consts, NUM_WARPS, 1,
                                                  f"rope[{ty},D={d},half={int(half)},bwd={int(backward)},R={rty}]",
                                                  div16=("sxb", "sxn", "sxt", "syb", "syn", "syt", "srn")))
    return specs


AOT_SPECS: List[AotSpec] = _aot_specs()

"""A whole pre-norm ViT encoder block in training as one autograd node, its backward written out.

    y1 = LN1(x); qkv = y1·Wqkvᵀ + bqkv; o = attention(qkv); h = x + o·Wprojᵀ + bproj
    y2 = LN2(h); z = y2·W1ᵀ + b1; out = h + GELU(z)·W2ᵀ + b2            x, h, out: (B, N, C)

Why: a training step is issued by the host, and on an H100 the host's time per step decides ViT-S's speed and,
with one autograd node, one Python wrapper and one module call per layer, ViT-B's too (bench/results/
2026-11-27-h100-run7/model.csv: the graph(...) rows, the same steps replayed from a CUDA graph with no host
time per kernel, against the eager rows). This op runs the same kernels as the per-layer path ('auto' in
training: the LayerNorm kernels at the widths where they are its verdict, torch's LayerNorm below, the
attention kernels from the packed qkv, cuBLAS through F.linear for the four linears) with one node, one
forward and one backward function, and keeps what eager keeps for the backward.

Used by flashvit's Block and patched timm Blocks (flashvit.vit.model.fused_block) in plain eager training (grads
on, no torch.compile; one dtype for x and every parameter, or AMP's autocast over fp32 ones) when the block is the
plain one: no LayerScale, no active dropout, exact or tanh GELU, no hooks on its layers; stochastic depth (timm's
or flashvit's DropPath) as a factor a sample on each branch.
``use_fused_block(False)`` turns it off, ``True`` forces it (the interpreter's tests); the reference is
``vit_block_reference``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

from flashvit.kernels import layernorm as _ln
from flashvit.kernels._dispatch import (
    FLOAT_DTYPES,
    HAS_TRITON,
    INTERPRET,
    _plain_eager,
    autocast_dtype,
    check_tensor,
    cuda_auto,
    get_backend,
    once_differentiable,
)
from flashvit.kernels.attention import (
    _check_head_dim,
    _kernel_scale,
    _resolve_tf32,
    qkv_attention_bwd,
    qkv_attention_fwd,
    qkv_attention_reference,
)

# (norm1 w, b, qkv w, b, proj w, b, norm2 w, b, fc1 w, b, fc2 w, b): LayerNorm biases and linear biases may be None
BlockParams = Tuple[Optional[torch.Tensor], ...]

_lin = importlib.import_module("flashvit.kernels.linear")  # (the package's ``linear`` attribute is the op)
_setting: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("flashvit_fused_block", default=None)


@contextlib.contextmanager
def use_fused_block(on: Optional[bool]) -> Iterator[None]:
    """Inside a ``with`` block: True runs plain blocks in training as one node wherever the conditions hold (also on
    CPU in the Triton interpreter: tests), False never, None (the default) on CUDA under the 'auto' backend."""
    token = _setting.set(on)
    try:
        yield
    finally:
        _setting.reset(token)


def fused_block_on(x: torch.Tensor) -> bool:
    """Whether a plain block called on ``x`` runs as one node: grads on, plain eager (no torch.compile, tracing or
    dispatch mode), and use_fused_block's setting (default: CUDA, the 'auto' backend, and the linears' 'auto'
    training verdict eager, as this op runs them). The tensors decide the rest (block_dtype)."""
    on = _setting.get()
    if on is False or not torch.is_grad_enabled() or not _plain_eager(x):
        return False
    if on is None:
        return (cuda_auto(x) and HAS_TRITON and get_backend() == "auto" and not _lin.AUTO_TRAINING
                and _lin._gemm_name("") == "auto")
    return HAS_TRITON and (x.is_cuda or INTERPRET)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def block_dtype(x: torch.Tensor, params: BlockParams, num_heads: int, scale: float) -> Optional[torch.dtype]:
    """The dtype the block's linears and attention run in, or None where this op does not take the call.

    Without autocast: x (B, N, C) and every parameter in one float dtype, that one. Under autocast (bf16 / fp16,
    AMP's mixed precision): an fp32 x and fp32 parameters, the autocast dtype, as autocast runs them (LayerNorms
    and the residual stream in fp32, the linears' inputs and weights cast). Also: plain tensors on x's device (a
    subclass, e.g. a sharded DTensor parameter, takes the per-layer path), LayerNorm weights present, a head dim
    and softmax scale the attention kernels take."""
    if x.dim() != 3 or params[0] is None or params[6] is None or not _kernel_scale(scale):
        return None
    C = x.shape[-1]
    if C % num_heads or (C // num_heads) % 8 or C // num_heads > 256:
        return None
    amp = autocast_dtype(x.device)
    want = x.dtype if amp is None else torch.float32
    if want not in FLOAT_DTYPES or x.dtype != want or (amp is not None and amp not in _AMP_DTYPES):
        return None
    for p in params:
        if p is not None and (p.dtype != want or p.device != x.device or type(p) not in _PLAIN_TENSORS):
            return None
    return want if amp is None else amp


_AMP_DTYPES = (torch.bfloat16, torch.float16)


def _ln_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], w: torch.Tensor, b: Optional[torch.Tensor],
            eps: float, kernel: bool, x_scale: Optional[torch.Tensor] = None
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, mean, rstd): y = LN(h), h = x + residual (x without), or x·x_scale[b] + residual (stochastic depth:
    x·s rounded to x's dtype, as eager's drop_path); the kernel's stats or torch's."""
    if kernel:
        y, h, mean, rstd = _ln.layer_norm_fwd(x, residual, w, b, eps, x_scale)
        return y, (x if h is None else h), mean, rstd
    if x_scale is not None:
        x = x * x_scale.view(-1, 1, 1)
    h = x if residual is None else residual + x
    y, mean, rstd = torch.native_layer_norm(h, (h.shape[-1],), w, b, eps)
    return y, h, mean, rstd


def _ln_bwd(dy: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], mean: torch.Tensor,
            rstd: torch.Tensor, dres: Optional[torch.Tensor], kernel: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(dh + dres, dw, db) of y = LN(h) (db None without a bias)."""
    if kernel:
        dh, dwdb = _ln.layer_norm_bwd(dy, h, w, b, mean, rstd, dres)
        dw, db = dwdb.to(w.dtype).unbind(0)
        return dh, dw, (db if b is not None else None)
    dh, dw, db = torch.ops.aten.native_layer_norm_backward(dy, h, [h.shape[-1]], mean, rstd, w, b,
                                                           [True, True, b is not None])
    return (dh if dres is None else dh.add_(dres)), dw, db


def _wgrad(dy2: torch.Tensor, x2: torch.Tensor, dtypes: Tuple[torch.dtype, Optional[torch.dtype]]
           ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(dW, db) of y = x·Wᵀ + b from dy (M, N) and x (M, K) as autograd's addmm backward forms them, in the
    parameters' ``dtypes`` (weight, bias or None: no bias)."""
    return _to(dy2.t().mm(x2), dtypes[0]), (_to(dy2.sum(0), dtypes[1]) if dtypes[1] is not None else None)


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else _to(t, dtype)


class BlockFn(torch.autograd.Function):
    """The block's forward with its one backward (see the module docstring); cfg = (num_heads, softmax scale, eps1,
    eps2, GELU approximate, LayerNorm kernels or not, TF32 for fp32 attention, the linears' dtype). The linears'
    weights and inputs are cast to that dtype where they differ (autocast: as autocast casts them), and their
    gradients back, as autograd's casts do."""

    @staticmethod
    def forward(ctx, x, n1w, n1b, qw, qb, pw, pb, n2w, n2b, f1w, f1b, f2w, f2b, s1, s2, cfg):
        heads, scale, eps1, eps2, approx, ln_kernel, tf32, dt = cfg
        lin = [_cast(t, dt) for t in (qw, qb, pw, pb, f1w, f1b, f2w, f2b)]
        qw_, qb_, pw_, pb_, f1w_, f1b_, f2w_, f2b_ = lin
        y1, _, mean1, rstd1 = _ln_fwd(x, None, n1w, n1b, eps1, ln_kernel)  # x's dtype
        y1 = _to(y1, dt)
        qkv = F.linear(y1, qw_, qb_)  # (B, N, 3C), read in place by the attention kernels
        o, stats = qkv_attention_fwd(qkv, heads, scale, tf32)  # (B, N, C), (B, H, 2, N) fp32
        # h = x + s1·proj(o) (s1: stochastic depth's factor a sample, or none)
        y2, h, mean2, rstd2 = _ln_fwd(F.linear(o, pw_, pb_), x, n2w, n2b, eps2, ln_kernel, s1)
        y2 = _to(y2, dt)
        z = F.linear(y2, f1w_, f1b_)
        g = F.gelu(z, approximate=approx)
        out = F.linear(g, f2w_, f2b_)
        if s2 is not None:
            out = out.mul_(s2.view(-1, 1, 1))  # (in place on its own fresh buffer)
        out = out.add_(h) if out.dtype == h.dtype else h + out  # (eager's promotion: fp32 under autocast)
        ctx.save_for_backward(x, y1, qkv, o, stats, h, y2, z, g, mean1, rstd1, mean2, rstd2, n1w, n1b, n2w, n2b,
                              qw_, pw_, f1w_, f2w_, s1, s2)
        ctx.cfg = cfg
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (qw, qb, pw, pb, f1w, f1b, f2w, f2b))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        (x, y1, qkv, o, stats, h, y2, z, g, mean1, rstd1, mean2, rstd2, n1w, n1b, n2w, n2b, qw, pw, f1w, f2w, s1,
         s2) = ctx.saved_tensors
        heads, scale, _, _, approx, ln_kernel, tf32, dt = ctx.cfg
        qd, pd, f1d, f2d = (ctx.dtypes[i:i + 2] for i in range(0, 8, 2))
        need = ctx.needs_input_grad
        B, N, C = x.shape
        M = B * N
        dout = dout.contiguous()  # h's dtype
        d2 = _to(dout, dt)  # into s2·fc2's output, then fc2's
        d2 = (d2 if s2 is None else d2 * s2.view(-1, 1, 1)).view(M, C)
        # out = h + fc2(g); g = GELU(z); z = fc1(y2)
        df2w, df2b = _wgrad(d2, g.view(M, -1), f2d) if need[11] or need[12] else (None, None)
        dz = torch.ops.aten.gelu_backward(d2.mm(f2w), z.view(M, -1), approximate=approx)
        df1w, df1b = _wgrad(dz, y2.view(M, C), f1d) if need[9] or need[10] else (None, None)
        # y2 = LN2(h); h also goes straight to out: dh = LN2'(dy2) + dout
        dy2 = _to(dz.mm(f1w), h.dtype).view(B, N, C)
        dh, dn2w, dn2b = _ln_bwd(dy2, h, n2w, n2b, mean2, rstd2, dout, ln_kernel)
        da = _to(dh, dt)  # into s1·proj's output, then proj's
        da = (da if s1 is None else da * s1.view(-1, 1, 1)).view(M, C)
        # h = x + proj(o); o = attention(qkv); qkv = qkv-linear(y1)
        dpw, dpb = _wgrad(da, o.view(M, C), pd) if need[5] or need[6] else (None, None)
        dqkv = qkv_attention_bwd(da.mm(pw).view(B, N, C), qkv, o, stats, heads, scale, tf32)
        dq2 = dqkv.view(M, 3 * C)
        dqw, dqb = _wgrad(dq2, y1.view(M, C), qd) if need[3] or need[4] else (None, None)
        # y1 = LN1(x); x also goes straight to h: dx = LN1'(dy1) + dh
        dy1 = _to(dq2.mm(qw), x.dtype).view(B, N, C)
        dx, dn1w, dn1b = _ln_bwd(dy1, x, n1w, n1b, mean1, rstd1, dh, ln_kernel)
        grads = (dx, dn1w, dn1b, dqw, dqb, dpw, dpb, dn2w, dn2b, df1w, df1b, df2w, df2b)
        return (*(gr if need[i] else None for i, gr in enumerate(grads)), None, None, None)


def vit_block(x: torch.Tensor, params: BlockParams, num_heads: int, scale: float, eps1: float, eps2: float,
              approximate: str = "none", dtype: Optional[torch.dtype] = None,
              drop_scales: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)) -> torch.Tensor:
    """One plain pre-norm block, forward and backward as one autograd node (see the module docstring).

    ``x`` (B, N, C); ``params`` = (norm1 weight, bias, qkv weight (3C, C), bias, proj weight (C, C), bias, norm2
    weight, bias, fc1 weight (Hd, C), bias, fc2 weight (C, Hd), bias), biases may be None; ``approximate``: the
    GELU's ('none' | 'tanh'); ``dtype``: the linears' (block_dtype's; default: x's); ``drop_scales``: stochastic
    depth's factors a sample (B,) in that dtype for the attention and the MLP branch (h = x + s1·a, out = h + s2·m:
    flashvit.vit.model.drop_path_scale draws them as timm's DropPath), or None. The caller checks
    ``fused_block_on`` and ``block_dtype``; this checks shapes.
    """
    check_tensor("x", x, ndim=3)
    C = x.shape[-1]
    n1w, n1b, qw, qb, pw, pb, n2w, n2b, f1w, f1b, f2w, f2b = params
    hidden = f1w.shape[0]
    for name, t, shape in (("norm1 weight", n1w, (C,)), ("norm1 bias", n1b, (C,)), ("qkv weight", qw, (3 * C, C)),
                           ("qkv bias", qb, (3 * C,)), ("proj weight", pw, (C, C)), ("proj bias", pb, (C,)),
                           ("norm2 weight", n2w, (C,)), ("norm2 bias", n2b, (C,)), ("fc1 weight", f1w, (hidden, C)),
                           ("fc1 bias", f1b, (hidden,)), ("fc2 weight", f2w, (C, hidden)), ("fc2 bias", f2b, (C,))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"vit_block: {name} has shape {tuple(t.shape)}, expected {shape} (width {C})")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    _check_head_dim(C // num_heads)
    dt = x.dtype if dtype is None else dtype
    for i, f in enumerate(drop_scales):
        if f is not None and (f.shape != (x.shape[0],) or f.dtype != dt or f.device != x.device):
            raise ValueError(f"vit_block: drop_scales[{i}] must be ({x.shape[0]},) {dt} on {x.device}, got "
                             f"{tuple(f.shape)} {f.dtype} on {f.device}")
    ln_kernel = _ln._run_triton(x, None, weight=n1w, bias=n1b) and _ln._run_triton(x, None, weight=n2w, bias=n2b)
    cfg = (num_heads, float(scale), float(eps1), float(eps2), approximate, ln_kernel, _resolve_tf32(dt, None), dt)
    if autocast_dtype(x.device) is None:
        return BlockFn.apply(x.contiguous(), *params, *drop_scales, cfg)
    with torch.autocast(x.device.type, enabled=False):  # the op casts as autocast would; nothing to recast
        return BlockFn.apply(x.contiguous(), *params, *drop_scales, cfg)


def vit_block_reference(x: torch.Tensor, params: BlockParams, num_heads: int, scale: float, eps1: float,
                        eps2: float, approximate: str = "none",
                        drop_scales: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)
                        ) -> torch.Tensor:
    """The same block in plain PyTorch (F.layer_norm, F.linear, SDPA, F.gelu; drop path as timm's: x + a·s)."""
    n1w, n1b, qw, qb, pw, pb, n2w, n2b, f1w, f1b, f2w, f2b = params
    s1, s2 = (None if f is None else f.view(-1, 1, 1) for f in drop_scales)
    C = x.shape[-1]
    o = qkv_attention_reference(F.linear(F.layer_norm(x, (C,), n1w, n1b, eps1), qw, qb), num_heads, scale)
    a = F.linear(o, pw, pb)
    h = x + (a if s1 is None else a * s1)
    m = F.linear(F.gelu(F.linear(F.layer_norm(h, (C,), n2w, n2b, eps2), f1w, f1b), approximate=approximate), f2w, f2b)
    return h + (m if s2 is None else m * s2)

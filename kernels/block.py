"""A whole pre-norm ViT encoder block in training as one autograd node, its backward written out.

    y1 = LN1(x); qkv = y1·Wqkvᵀ + bqkv; o = attention(qkv); h = x + s1·γ1·(o·Wprojᵀ + bproj)
    y2 = LN2(h); z = y2·W1ᵀ + b1; out = h + s2·γ2·(GELU(z)·W2ᵀ + b2)        x, h, out: (B, N, C)
    (γ: LayerScale (C,), s: stochastic depth's factor a sample (B,); either may be absent)

Why: a training step is issued by the host, and on an H100 the host's time per step decides ViT-S's speed and,
with one autograd node, one Python wrapper and one module call per layer, ViT-B's too (bench/results/
2026-11-27-h100-run7/model.csv: the graph(...) rows, the same steps replayed from a CUDA graph with no host
time per kernel, against the eager rows). This op runs the same kernels as the per-layer path ('auto' in
training: the LayerNorm kernels at the widths where they are its verdict, torch's LayerNorm below, the
attention kernels from the packed qkv, cuBLAS through F.linear for the four linears) with one node, one
forward and one backward function, and keeps what eager keeps for the backward.

Used by flashvit's Block and patched timm Blocks (flashvit.vit.model.fused_block) in plain eager training (grads
on, no torch.compile; one dtype for x and every parameter, or AMP's autocast over fp32 ones) when the block is
this one: no active dropout, exact or tanh GELU, no q/k norm, no hooks on its layers; LayerScale and stochastic
depth (timm's or flashvit's) as above.
``use_fused_block(False)`` turns it off, ``True`` forces it (the interpreter's tests); the reference is
``vit_block_reference``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
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
# FLASHVIT_FUSED_BLOCK=0 / 1 (read at import): the default of use_fused_block's setting (unset: None, see there).
_ENV_DEFAULT = {"0": False, "off": False, "1": True, "on": True}.get(
    os.environ.get("FLASHVIT_FUSED_BLOCK", "").strip().lower())
_setting: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("flashvit_fused_block",
                                                                          default=_ENV_DEFAULT)


# The backward's bias gradients: torch's column sum of each linear's output gradient (False, as autograd's addmm
# backward forms them: one more pass over each) or summed in passes the backward makes anyway (True): fc1's in
# the GELU backward's pass (kernels/linear.py's dact + column-sum kernel), proj's and fc2's in LN2's backward
# kernel (the column sums of its dx and of the residual's gradient; where the block runs the LayerNorm kernels),
# qkv's by that column-sum kernel alone (the attention kernels write dqkv in tiles of one head each).
# In H100 run 8's profile of patched ViT-B/16 training (bench/results/2026-11-28-h100-run8/profile/
# steps_vit_base_patch16_224_train_timm_flashvit.patch.txt) torch's bf16 column sums took 2.79 of 41.24 ms a
# step. Timed once (H200 run 3, bench/results/2026-11-28-h200-run3/: model rows timm+flashvit.patch and [block=bias],
# their step profiles): the step ran faster, but the device time of the passes it replaces hardly moved (the
# column-sum kernel and its partial sums untuned), so it stays off until more runs decide. Since then (not timed)
# the partial sums go through kernels/colsum.py, not torch's sum (that profile: 51 fp32 reduce_kernel calls,
# 1.085 ms a step).
FUSED_BIAS_GRADS = False
_bias_setting: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("flashvit_block_bias_grads",
                                                                               default=None)


@contextlib.contextmanager
def use_fused_bias_grads(on: bool) -> Iterator[None]:
    """Inside a ``with`` block: the one-node block's backward sums its bias gradients in its other passes (True)
    or as autograd does (False); outside, FUSED_BIAS_GRADS. Read when the block's forward runs."""
    token = _bias_setting.set(bool(on))
    try:
        yield
    finally:
        _bias_setting.reset(token)


def _fused_bias_grads() -> bool:
    on = _bias_setting.get()
    return FUSED_BIAS_GRADS if on is None else on


@contextlib.contextmanager
def use_fused_block(on: Optional[bool]) -> Iterator[None]:
    """Inside a ``with`` block: True runs blocks in training as one node wherever the conditions hold (also on CPU
    in the Triton interpreter: tests), False never, None on CUDA under the 'auto' backend. Outside any block:
    FLASHVIT_FUSED_BLOCK=0 / 1 in the environment at import, else None."""
    token = _setting.set(on)
    try:
        yield
    finally:
        _setting.reset(token)


def fused_block_on(x: torch.Tensor) -> bool:
    """Whether a block called on ``x`` runs as one node: grads on, plain eager (no torch.compile, tracing or
    dispatch mode), and use_fused_block's setting (default: CUDA, the 'auto' backend, and the linears' 'auto'
    training verdict eager, as this op runs them). The tensors decide the rest (block_dtype)."""
    on = _setting.get()
    if on is False or not torch.is_grad_enabled() or not _plain_eager(x):
        return False
    if on is None:
        return (cuda_auto(x) and HAS_TRITON and get_backend() == "auto" and not _lin.AUTO_TRAINING
                and _lin._gemm_name("") == "auto")
    return HAS_TRITON and (x.is_cuda or INTERPRET)


_GELU_ACT = {"none": "gelu", "tanh": "gelu_tanh"}  # F.gelu's approximate -> kernels/linear.py's activation
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_AMP_DTYPES = (torch.bfloat16, torch.float16)


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
        return (dh, *_ln_param_grads(dwdb, w, b))
    dh, dw, db = torch.ops.aten.native_layer_norm_backward(dy, h, [h.shape[-1]], mean, rstd, w, b,
                                                           [True, True, b is not None])
    return (dh if dres is None else dh.add_(dres)), dw, db


def _ln_param_grads(dwdb: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(dw, db or None without a bias) from the LayerNorm kernel's stacked (2, C) grads."""
    dw, db = dwdb.to(w.dtype).unbind(0)
    return dw, (db if b is not None else None)


def _wgrad(dy2: torch.Tensor, x2: torch.Tensor, dtypes: Tuple[torch.dtype, Optional[torch.dtype]],
           bias: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(dW, db) of y = x·Wᵀ + b from dy (M, N) and x (M, K) as autograd's addmm backward forms them, in the
    parameters' ``dtypes`` (weight, bias or None: no bias); db None where not ``bias`` (summed elsewhere)."""
    db = _to(dy2.sum(0), dtypes[1]) if bias and dtypes[1] is not None else None
    return _to(dy2.t().mm(x2), dtypes[0]), db


def _bias_grad(colsum: torch.Tensor, gamma: Optional[torch.Tensor], dtype: Optional[torch.dtype]
               ) -> Optional[torch.Tensor]:
    """A linear's bias gradient from the fp32 column sum (C,) of the stream gradient times the drop-path factor:
    times LayerScale's γ where the branch has one (d·γ's column sums are γ times d's), in the bias's dtype."""
    if dtype is None:
        return None
    return _to(colsum if gamma is None else colsum * gamma.float(), dtype)


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else _to(t, dtype)


class BlockFn(torch.autograd.Function):
    """The block's forward with its one backward (see the module docstring). Inputs: x, the 12 parameters, the
    LayerScale γs and the drop-path factors (each None where absent), cfg = (num_heads, softmax scale, eps1, eps2,
    GELU approximate, LayerNorm kernels or not, TF32 for fp32 attention, the linears' dtype, the γs' in-place
    flags, the bias grads fused or not: FUSED_BIAS_GRADS). The linears' weights and inputs are cast to that dtype
    where they differ (autocast: as autocast casts them), and their gradients back, as autograd's casts do."""

    @staticmethod
    def forward(ctx, x, n1w, n1b, qw, qb, pw, pb, n2w, n2b, f1w, f1b, f2w, f2b, g1, g2, s1, s2, cfg):
        heads, scale, eps1, eps2, approx, ln_kernel, tf32, dt, inplace, _ = cfg
        lin = [_cast(t, dt) for t in (qw, qb, pw, pb, f1w, f1b, f2w, f2b)]
        qw_, qb_, pw_, pb_, f1w_, f1b_, f2w_, f2b_ = lin
        y1, _, mean1, rstd1 = _ln_fwd(x, None, n1w, n1b, eps1, ln_kernel)  # x's dtype
        y1 = _to(y1, dt)
        qkv = F.linear(y1, qw_, qb_)  # (B, N, 3C), read in place by the attention kernels
        o, stats = qkv_attention_fwd(qkv, heads, scale, tf32)  # (B, N, C), (B, H, 2, N) fp32
        a = F.linear(o, pw_, pb_)
        # h = x + s1·γ1·proj(o) (γ1: LayerScale, s1: stochastic depth's factor a sample; either may be absent)
        y2, h, mean2, rstd2 = _ln_fwd(_layer_scale(a, g1, inplace[0]), x, n2w, n2b, eps2, ln_kernel, s1)
        y2 = _to(y2, dt)
        z = F.linear(y2, f1w_, f1b_)
        g = F.gelu(z, approximate=approx)
        m = F.linear(g, f2w_, f2b_)
        out = _layer_scale(m, g2, inplace[1])  # (m itself without γ2: not saved then, free to reuse)
        if s2 is not None:
            out = out.mul_(s2.view(-1, 1, 1))  # (out: m or γ2·m's fresh buffer; s2 in its dtype)
        out = out.add_(h) if out.dtype == h.dtype else h + out  # (eager's promotion: fp32 under autocast)
        ctx.save_for_backward(x, y1, qkv, o, stats, h, y2, z, g, mean1, rstd1, mean2, rstd2, n1w, n1b, n2w, n2b,
                              qw_, pw_, f1w_, f2w_, g1, g2, s1, s2, a if g1 is not None else None,
                              m if g2 is not None else None)
        ctx.cfg = cfg
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (qw, qb, pw, pb, f1w, f1b, f2w, f2b))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        (x, y1, qkv, o, stats, h, y2, z, g, mean1, rstd1, mean2, rstd2, n1w, n1b, n2w, n2b, qw, pw, f1w, f2w, g1,
         g2, s1, s2, a, m) = ctx.saved_tensors
        heads, scale, _, _, approx, ln_kernel, tf32, dt, inplace, fused_bias = ctx.cfg
        qd, pd, f1d, f2d = (ctx.dtypes[i:i + 2] for i in range(0, 8, 2))
        need = ctx.needs_input_grad
        B, N, C = x.shape
        M = B * N
        dout = dout.contiguous()  # h's dtype
        ln_sums = fused_bias and ln_kernel  # proj's and fc2's bias grads from LN2's backward pass
        # out = h + s2·γ2·fc2(g); g = GELU(z); z = fc1(y2)
        d2, dg2 = _branch_bwd(dout, m, g2, s2, dt, inplace[1], need[14])
        d2 = d2.view(M, C)
        df2w, df2b = _wgrad(d2, g.view(M, -1), f2d, not ln_sums) if need[11] or (need[12] and not ln_sums) \
            else (None, None)
        if fused_bias:  # dz = dH·GELU'(z) and fc1's bias grad in one pass over dH and z
            dz, sum1 = _lin._dact_colsum(d2.mm(f2w), z.view(M, -1), _lin._ACT_CODE[_GELU_ACT[approx]], True,
                                         need[10] and f1d[1] is not None)
            df1w, _ = _wgrad(dz, y2.view(M, C), f1d, False) if need[9] else (None, None)
            df1b = _bias_grad(sum1, None, f1d[1]) if sum1 is not None else None
        else:
            dz = torch.ops.aten.gelu_backward(d2.mm(f2w), z.view(M, -1), approximate=approx)
            df1w, df1b = _wgrad(dz, y2.view(M, C), f1d) if need[9] or need[10] else (None, None)
        # y2 = LN2(h); h also goes straight to out: dh = LN2'(dy2) + dout
        dy2 = _to(dz.mm(f1w), h.dtype).view(B, N, C)
        if ln_sums:  # and the column sums of dh·s1 (proj's bias grad) and dout·s2 (fc2's)
            dh, dwdb, sums = _ln.layer_norm_bwd_colsums(dy2, h, n2w, n2b, mean2, rstd2, dout, s1, s2)
            dn2w, dn2b = _ln_param_grads(dwdb, n2w, n2b)
            df2b = _bias_grad(sums[1], g2, f2d[1])
        else:
            dh, dn2w, dn2b = _ln_bwd(dy2, h, n2w, n2b, mean2, rstd2, dout, ln_kernel)
        # h = x + s1·γ1·proj(o); o = attention(qkv); qkv = qkv-linear(y1)
        da, dg1 = _branch_bwd(dh, a, g1, s1, dt, inplace[0], need[13])
        da = da.view(M, C)
        dpw, dpb = _wgrad(da, o.view(M, C), pd, not ln_sums) if need[5] or (need[6] and not ln_sums) \
            else (None, None)
        if ln_sums:
            dpb = _bias_grad(sums[0], g1, pd[1])
        dqkv = qkv_attention_bwd(da.mm(pw).view(B, N, C), qkv, o, stats, heads, scale, tf32)
        dq2 = dqkv.view(M, 3 * C)
        dqw, dqb = _wgrad(dq2, y1.view(M, C), qd, not fused_bias) if need[3] or (need[4] and not fused_bias) \
            else (None, None)
        if fused_bias and need[4]:  # (the column sums of dqkv: linear's column-sum kernel, no other pass to join)
            dqb = _bias_grad(_lin._dact_colsum(dq2, None, 0, False, True)[1], None, qd[1])
        # y1 = LN1(x); x also goes straight to h: dx = LN1'(dy1) + dh
        dy1 = _to(dq2.mm(qw), x.dtype).view(B, N, C)
        dx, dn1w, dn1b = _ln_bwd(dy1, x, n1w, n1b, mean1, rstd1, dh, ln_kernel)
        grads = (dx, dn1w, dn1b, dqw, dqb, dpw, dpb, dn2w, dn2b, df1w, df1b, df2w, df2b, dg1, dg2)
        return (*(gr if need[i] else None for i, gr in enumerate(grads)), None, None, None)


def _layer_scale(y: torch.Tensor, gamma: Optional[torch.Tensor], inplace: bool) -> torch.Tensor:
    """y·γ as timm's LayerScale computes it: eager's promotion (fp32 for a 16-bit y and an fp32 γ under autocast),
    or in y's dtype for its in-place variant; y without γ."""
    if gamma is None:
        return y
    return (y * gamma).to(y.dtype) if inplace else y * gamma  # (y itself stays: the backward reads it)


def _branch_bwd(d: torch.Tensor, pre: Optional[torch.Tensor], gamma: Optional[torch.Tensor],
                s: Optional[torch.Tensor], dt: torch.dtype, inplace: bool, need_gamma: bool
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A residual branch r = s·γ·pre (pre: the linear's output in dtype dt) from d, the gradient of the stream it
    is added to: (the gradient of pre, of γ or None), with eager's casts: into the branch's dtype (pre's, or
    promoted by an fp32 γ), times s, then γ's product (in γ's dtype) and pre's (cast to dt)."""
    bd = dt if gamma is None or inplace else torch.promote_types(dt, gamma.dtype)
    d = _to(d, bd)
    if s is not None:
        d = d * s.view(-1, 1, 1)
    if gamma is None:
        return _to(d, dt), None
    dgamma = (d * pre).to(gamma.dtype).sum((0, 1)) if need_gamma else None  # (eager's order)
    return _to(d * gamma, dt), dgamma


Pair = Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]


def branch_dtype(dt: torch.dtype, gamma: Optional[torch.Tensor], inplace: bool = False) -> torch.dtype:
    """The dtype of a residual branch γ·y with y in dt: dt, or eager's promotion with an fp32 γ (timm's in-place
    LayerScale keeps y's)."""
    return dt if gamma is None or inplace else torch.promote_types(dt, gamma.dtype)


def vit_block(x: torch.Tensor, params: BlockParams, num_heads: int, scale: float, eps1: float, eps2: float,
              approximate: str = "none", dtype: Optional[torch.dtype] = None, drop_scales: Pair = (None, None),
              layer_scales: Pair = (None, None), layer_scale_inplace: Tuple[bool, bool] = (False, False)
              ) -> torch.Tensor:
    """One pre-norm block, forward and backward as one autograd node (see the module docstring).

    ``x`` (B, N, C); ``params`` = (norm1 weight, bias, qkv weight (3C, C), bias, proj weight (C, C), bias, norm2
    weight, bias, fc1 weight (Hd, C), bias, fc2 weight (C, Hd), bias), biases may be None; ``approximate``: the
    GELU's ('none' | 'tanh'); ``dtype``: the linears' (block_dtype's; default: x's); ``layer_scales``: LayerScale's
    γ (C,) of the attention and the MLP branch, or None (``layer_scale_inplace``: timm's in-place variant, which
    keeps the branch's dtype); ``drop_scales``: stochastic depth's factors a sample (B,) in the branch's dtype
    (branch_dtype), or None: h = x + s1·γ1·a, out = h + s2·γ2·m (flashvit.vit.model.drop_path_factor draws them
    as timm's DropPath). The caller checks ``fused_block_on`` and ``block_dtype``; this checks shapes.
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
    for i, (gamma, f) in enumerate(zip(layer_scales, drop_scales)):
        if gamma is not None and (tuple(gamma.shape) != (C,) or gamma.device != x.device):
            raise ValueError(f"vit_block: layer_scales[{i}] must be ({C},) on {x.device}, got {tuple(gamma.shape)} "
                             f"on {gamma.device}")
        bd = branch_dtype(dt, gamma, layer_scale_inplace[i])
        if f is not None and (f.shape != (x.shape[0],) or f.dtype != bd or f.device != x.device):
            raise ValueError(f"vit_block: drop_scales[{i}] must be ({x.shape[0]},) {bd} on {x.device}, got "
                             f"{tuple(f.shape)} {f.dtype} on {f.device}")
    ln_kernel = _ln._run_triton(x, None, weight=n1w, bias=n1b) and _ln._run_triton(x, None, weight=n2w, bias=n2b)
    cfg = (num_heads, float(scale), float(eps1), float(eps2), approximate, ln_kernel, _resolve_tf32(dt, None), dt,
           tuple(bool(i) for i in layer_scale_inplace), _fused_bias_grads())
    if autocast_dtype(x.device) is None:
        return BlockFn.apply(x.contiguous(), *params, *layer_scales, *drop_scales, cfg)
    with torch.autocast(x.device.type, enabled=False):  # the op casts as autocast would; nothing to recast
        return BlockFn.apply(x.contiguous(), *params, *layer_scales, *drop_scales, cfg)


def vit_block_reference(x: torch.Tensor, params: BlockParams, num_heads: int, scale: float, eps1: float,
                        eps2: float, approximate: str = "none", drop_scales: Pair = (None, None),
                        layer_scales: Pair = (None, None), layer_scale_inplace: Tuple[bool, bool] = (False, False)
                        ) -> torch.Tensor:
    """The same block in plain PyTorch (F.layer_norm, F.linear, SDPA, F.gelu; LayerScale and drop path as timm's:
    x + (a·γ)·s)."""
    n1w, n1b, qw, qb, pw, pb, n2w, n2b, f1w, f1b, f2w, f2b = params

    def branch(y, i):  # timm's LayerScale (in place: y.mul_(γ)), then its DropPath
        gamma = layer_scales[i]
        if gamma is not None:
            y = y.mul_(gamma) if layer_scale_inplace[i] else y * gamma
        return y if drop_scales[i] is None else y * drop_scales[i].view(-1, 1, 1)
    C = x.shape[-1]
    o = qkv_attention_reference(F.linear(F.layer_norm(x, (C,), n1w, n1b, eps1), qw, qb), num_heads, scale)
    h = x + branch(F.linear(o, pw, pb), 0)
    m = F.linear(F.gelu(F.linear(F.layer_norm(h, (C,), n2w, n2b, eps2), f1w, f1b), approximate=approximate), f2w, f2b)
    return h + branch(m, 1)

"""SwiGLU's gate: h = silu(gate) · up, forward and backward, one elementwise pass each.

The hidden activation of the SwiGLU MLPs (DINOv2-giant, EVA-02; timm's ``GluMlp`` / ``SwiGLUPacked`` /
``SwiGLU``, transformers' ``Dinov2SwiGLUFFN``): fc1 gives gate and up, (M, H) each, often as the two halves of
one (M, 2H) output. Eager PyTorch runs silu (a read and a write of (M, H)) and the product (two reads, a write),
and saves silu(gate) for the backward, which takes three more passes and a copy into (M, 2H) for fc1's grad.
Here the forward reads gate and up and writes h; the backward reads dh, gate and up and writes dgate and dup,
straight into the (M, 2H) gradient of fc1's output when the gate and up were its halves (``swiglu_packed``).
silu(g) = g·σ(g); d/dg = σ(g)·(1 + g·(1 - σ(g))), in fp32.

Anatomy (DESIGN.md §2): Triton kernels -> launchers -> torch.library custom ops -> SwiGLUFn / SwiGLUPackedFn
-> swiglu_reference -> swiglu() / swiglu_packed(). And the MLP's second half that keeps no h (the 'act' recompute
of the SwiGLU MLPs): SwiGLUFc2Fn -> swiglu_fc2().
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from flashvit.kernels import linear as _lin
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
    flat2d,
    needs_grad,
    once_differentiable,
    row_stride,
    rows2d,
    triton,
    use_triton,
)

if HAS_TRITON:
    import triton.language as tl

    @triton.jit
    def _dev_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # This program's (BLOCK_M, BLOCK_N) tile: int64 row offsets (BLOCK_M, 1), columns (BLOCK_N,), mask.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        return rows.to(tl.int64)[:, None], cols, (rows < M)[:, None] & (cols < N)[None, :]

    @triton.jit
    def _swiglu_fwd_kernel(G, U, H, M, N, s_g, s_u, s_h, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # G, U, H: (M, N) with row strides s_*, unit column stride; one (BLOCK_M, BLOCK_N) tile a program.
        r64, cols, mask = _dev_tile(M, N, BLOCK_M, BLOCK_N)
        g = tl.load(G + r64 * s_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + r64 * s_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = g * tl.sigmoid(g) * u
        tl.store(H + r64 * s_h + cols[None, :], h.to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(DH, G, U, DG, DU, M, N, s_dh, s_g, s_u, s_dg, s_du,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # dgate = dh·up·σ(g)·(1 + g·(1 - σ(g))), dup = dh·silu(g); all (M, N) row-strided.
        r64, cols, mask = _dev_tile(M, N, BLOCK_M, BLOCK_N)
        dh = tl.load(DH + r64 * s_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + r64 * s_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + r64 * s_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        tl.store(DG + r64 * s_dg + cols[None, :], (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty),
                 mask=mask)
        tl.store(DU + r64 * s_du + cols[None, :], (dh * g * sig).to(DU.dtype.element_ty), mask=mask)

    _FWD = Launcher(_swiglu_fwd_kernel)
    _BWD = Launcher(_swiglu_bwd_kernel)

# (BLOCK_M, BLOCK_N, num_warps): 2048 elements a program, 16 a thread (a bandwidth-bound pass; the linear
# epilogue kernel's shape).
BLOCK = (8, 256, 4)


# ---------------------------------------------------------------------------------------------
# Launchers on 2-D row-strided views (unit column stride).


def _grid(M: int, N: int) -> Tuple[int, int]:
    return cdiv(M, BLOCK[0]), cdiv(N, BLOCK[1])


def _empty(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (tests swap it for a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(M, N) gate and up -> (M, N) h = silu(gate)·up, contiguous."""
    M, N = gate.shape
    h = _empty((M, N), gate.dtype, gate.device)
    if h.numel():
        _FWD(_grid(M, N), (gate, up, h, M, N, row_stride(gate), row_stride(up), N),
             dict(BLOCK_M=BLOCK[0], BLOCK_N=BLOCK[1], num_warps=BLOCK[2]))
    return h


def swiglu_bwd(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dgate: torch.Tensor,
               dup: torch.Tensor) -> None:
    """Write dgate and dup ((M, N) row-strided outputs, maybe the halves of one buffer) for h's grad ``dh``."""
    M, N = gate.shape
    if M and N:
        _BWD(_grid(M, N), (dh, gate, up, dgate, dup, M, N, row_stride(dh), row_stride(gate), row_stride(up),
                           row_stride(dgate), row_stride(dup)),
             dict(BLOCK_M=BLOCK[0], BLOCK_N=BLOCK[1], num_warps=BLOCK[2]))


def _halves(x: torch.Tensor, gate_last: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(M, 2N) -> (gate, up) views: the first half is the gate unless ``gate_last``."""
    a, b = x.chunk(2, dim=-1)
    return (b, a) if gate_last else (a, b)


# ---------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile (no graph break), with fake implementations for shapes.


@custom_op("swiglu_fwd")
def _swiglu_fwd_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return swiglu_fwd(gate, up)


@_swiglu_fwd_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@custom_op("swiglu_bwd")
def _swiglu_bwd_op(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    dgate, dup = _empty(tuple(gate.shape), gate.dtype, gate.device), _empty(tuple(up.shape), up.dtype, up.device)
    swiglu_bwd(dh, gate, up, dgate, dup)
    return dgate, dup


@_swiglu_bwd_op.register_fake
def _(dh, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


@custom_op("swiglu_packed_bwd")
def _swiglu_packed_bwd_op(dh: torch.Tensor, x: torch.Tensor, gate_last: bool) -> torch.Tensor:
    dx = _empty(tuple(x.shape), x.dtype, x.device)  # fc1's output grad, both halves written
    swiglu_bwd(dh, *_halves(x, gate_last), *_halves(dx, gate_last))
    return dx


@_swiglu_packed_bwd_op.register_fake
def _(dh, x, gate_last):
    return x.new_empty(x.shape)


class SwiGLUFn(torch.autograd.Function):
    """h = silu(gate)·up on 2-D (M, N) gate and up through the Triton kernels."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _swiglu_fwd_op(gate, up)

    @staticmethod
    @once_differentiable
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        return _swiglu_bwd_op(rows2d(dh), gate, up)


class SwiGLUPackedFn(torch.autograd.Function):
    """h = silu(gate)·up from the halves of one 2-D (M, 2N) x; x's grad written whole."""

    @staticmethod
    def forward(ctx, x, gate_last):
        ctx.save_for_backward(x)
        ctx.gate_last = gate_last
        return _swiglu_fwd_op(*_halves(x, gate_last))

    @staticmethod
    @once_differentiable
    def backward(ctx, dh):
        (x,) = ctx.saved_tensors
        return _swiglu_packed_bwd_op(rows2d(dh), x, ctx.gate_last), None


class SwiGLUFc2Fn(torch.autograd.Function):
    """y = fc2(silu(gate)·up) (+ residual) on 2-D tensors, saving fc1's output (z (M, 2H) packed, or gate and up
    (M, H)) and not h: the backward rebuilds h with one pass for fc2's weight grad (kernels/linear.py's 'act'
    recompute, for SwiGLU MLPs). ``up`` None: ``z`` is packed (halves by ``gate_last``), else ``z`` is the gate."""

    @staticmethod
    def forward(ctx, z, up, gate_last: bool, w2, b2, residual, scale, gemm: str, allow_tf32: Optional[bool]):
        gate_up = _halves(z, gate_last) if up is None else (z, up)
        keep_z2 = _lin._keeps_z(z, scale, ctx.needs_input_grad[6])
        y, z2 = _lin._linear_fwd_op(_swiglu_fwd_op(*gate_up), w2, b2, residual, "", keep_z2, gemm, allow_tf32, scale)
        ctx.save_for_backward(z, up, w2, b2, scale, z2 if keep_z2 else None)
        ctx.args = (gate_last, gemm, allow_tf32)
        return y

    @staticmethod
    def backward(ctx, dy):
        z, up, w2, b2, scale, z2 = ctx.saved_tensors
        gate_last, gemm, tf32 = ctx.args
        need_z, need_up, _, need_w2, need_b2, need_r, need_s = ctx.needs_input_grad[:7]
        gate_up = _halves(z, gate_last) if up is None else (z, up)
        need_h = need_z or need_up
        # (the gate: h's shape, unread, where neither W2 nor γ takes a grad)
        h = _swiglu_fwd_op(*gate_up) if need_w2 or need_s else gate_up[0]
        dh, dw2, db2, ds = _lin._out_linear_bwd(dy, h, w2, b2, scale, z2, "", need_h, need_w2, need_b2, need_s,
                                                gemm, tf32)
        dz = dup = None
        if need_h and up is None:
            dz = _swiglu_packed_bwd_op(dh, z, gate_last)
        elif need_h:
            dz, dup = _swiglu_bwd_op(dh, z, up)
        return dz, dup, None, dw2, db2, (dy if need_r else None), ds, None, None


# ---------------------------------------------------------------------------------------------
# Reference, validation, public functionals


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up in plain PyTorch."""
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """h = silu(gate) · up for gate and up of one shape (..., N), any strides (e.g. separate fc1_g / fc1_x GEMMs,
    transformers' gate_proj / up_proj). ``backend``: "auto" | "torch" | "triton" (flashvit.kernels._dispatch)."""
    check_tensor("gate", gate, min_ndim=1)
    check_tensor("up", up, min_ndim=1)
    if gate.shape != up.shape:
        raise ValueError(f"gate has shape {tuple(gate.shape)} and up {tuple(up.shape)}; they must match")
    if gate.dtype != up.dtype:
        raise TypeError(f"gate has dtype {gate.dtype} and up {up.dtype}; they must match")
    check_same_device(gate=gate, up=up)
    if not use_triton(gate, backend):
        return swiglu_reference(gate, up)
    check_triton_dtypes(gate=gate, up=up)  # (silu and mul are not autocast ops: the dtypes stay, as in eager)
    h = apply(SwiGLUFn, rows2d(gate), rows2d(up))
    return h.reshape(gate.shape)


def swiglu_packed(x: torch.Tensor, gate_last: bool = False, *, backend: Optional[str] = None) -> torch.Tensor:
    """h = silu(gate) · up with gate and up the two halves of x's last dim (..., 2N) -> (..., N): the first half
    is the gate (timm's SwiGLUPacked, ``gate_last=False``) or the second (timm's GluMlp default). The backward
    writes the (..., 2N) gradient of x in one pass (no concatenation)."""
    check_tensor("x", x, min_ndim=1)
    if x.shape[-1] % 2:
        raise ValueError(f"x's last dim {x.shape[-1]} is odd: it must hold gate and up halves")
    if not use_triton(x, backend):
        gate, up = _halves(x, bool(gate_last))
        return swiglu_reference(gate, up)
    check_triton_dtypes(x=x)
    h = apply(SwiGLUPackedFn, rows2d(x), bool(gate_last))
    return h.reshape(*x.shape[:-1], x.shape[-1] // 2)


def swiglu_fc2(z: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor] = None, *,
               up: Optional[torch.Tensor] = None, gate_last: bool = False, residual: Optional[torch.Tensor] = None,
               layer_scale: Optional[torch.Tensor] = None, backend: Optional[str] = None, gemm: Optional[str] = None,
               allow_tf32: Optional[bool] = None) -> torch.Tensor:
    """y = fc2(silu(gate)·up) (+ residual): a SwiGLU MLP's gate and fc2 (weights in nn.Linear's layout, any leading
    shape), keeping fc1's output but not the hidden activation h for the backward, which rebuilds h with one
    elementwise pass for fc2's weight grad: 'act' of :func:`flashvit.kernels.use_mlp_recompute` for the SwiGLU
    MLPs (a third less saved there). ``z``: fc1's packed output (..., 2H) (halves as in :func:`swiglu_packed`),
    or the gate (..., H) with ``up`` the other projection. ``residual``, ``layer_scale``, ``backend``, ``gemm``
    and ``allow_tf32`` as in :func:`flashvit.kernels.linear`; the 'auto' backend runs it in training too (it is
    asked for), the eager fallback (CPU) keeps h as PyTorch does."""
    if up is None:
        check_tensor("z", z, min_ndim=1)
        if z.shape[-1] % 2:
            raise ValueError(f"z's last dim {z.shape[-1]} is odd: it must hold gate and up halves")
        gate, upv = _halves(z, bool(gate_last))
    else:
        check_tensor("gate", z, min_ndim=1)
        check_tensor("up", up, min_ndim=1)
        if z.shape != up.shape:
            raise ValueError(f"gate has shape {tuple(z.shape)} and up {tuple(up.shape)}; they must match")
        check_same_device(gate=z, up=up)
        gate, upv = z, up
    check_tensor("fc2_weight", fc2_weight, ndim=2)
    if fc2_weight.shape[1] != gate.shape[-1]:
        raise ValueError(f"fc2_weight has {fc2_weight.shape[1]} input features; expected {gate.shape[-1]} (h's)")
    _lin._validate(gate, fc2_weight, fc2_bias, None, residual, layer_scale)
    training = needs_grad(z, up, fc2_weight, fc2_bias, residual, layer_scale)
    if not use_triton(z, backend, auto=training or _lin.AUTO_INFERENCE, auto_compiled=_lin.AUTO_COMPILED):
        return _lin.linear_reference(swiglu_reference(gate, upv), fc2_weight, fc2_bias, None, residual, layer_scale)
    _lin._check_layer_scale(fc2_weight, layer_scale)
    dt, (z, up, w2, b2), residual, late = _lin._cast_inputs(z, (up, fc2_weight, fc2_bias), residual,
                                                            ("up", "fc2_weight", "fc2_bias"))
    lead = z.shape[:-1]
    args = (flat2d(z), None if up is None else flat2d(up), bool(gate_last), w2, b2,
            None if residual is None else flat2d(residual), layer_scale, _lin._call_gemm(gemm, training), allow_tf32)
    y = _lin._apply_uncast(dt, z.device, SwiGLUFc2Fn, args).reshape(*lead, w2.shape[0])
    return y if late is None else y + late


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile gate: both kernels, every dtype, at the one launch config.

_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _aot_specs() -> List[AotSpec]:
    if not HAS_TRITON:
        return []
    specs: List[AotSpec] = []
    consts = dict(BLOCK_M=BLOCK[0], BLOCK_N=BLOCK[1])
    for ty in _TY.values():
        sig = {"G": f"*{ty}", "U": f"*{ty}", "H": f"*{ty}", "M": "i32", "N": "i32", "s_g": "i32", "s_u": "i32",
               "s_h": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
        specs.append(runtime_spec(_swiglu_fwd_kernel, sig, consts, BLOCK[2], 1, f"swiglu_fwd[{ty}]",
                                  div16=("N", "s_g", "s_u", "s_h")))
        sig = {"DH": f"*{ty}", "G": f"*{ty}", "U": f"*{ty}", "DG": f"*{ty}", "DU": f"*{ty}", "M": "i32", "N": "i32",
               "s_dh": "i32", "s_g": "i32", "s_u": "i32", "s_dg": "i32", "s_du": "i32", "BLOCK_M": "constexpr",
               "BLOCK_N": "constexpr"}
        specs.append(runtime_spec(_swiglu_bwd_kernel, sig, consts, BLOCK[2], 1, f"swiglu_bwd[{ty}]",
                                  div16=("N", "s_dh", "s_g", "s_u", "s_dg", "s_du")))
    return specs


AOT_SPECS: List[AotSpec] = _aot_specs()

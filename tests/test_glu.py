"""SwiGLU's gate (kernels/glu.py): silu(gate)·up, forward and backward, vs a float64 oracle.

CPU: the Triton interpreter with backend="triton", fp32 and fp16, odd shapes and strided inputs, outputs
poisoned with NaN. CUDA: bf16 at a DINOv2-giant MLP's width too (@pytest.mark.gpu).
"""

import importlib

import pytest
import torch

from tests.helpers import assert_close_to_ref, poisoned_empty, randn

G = importlib.import_module("flashvit.kernels.glu")
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.skipif(not G.HAS_TRITON, reason="needs triton (Linux) to run the kernels")


@pytest.fixture(autouse=True)
def _poisoned(monkeypatch):
    monkeypatch.setattr(G, "_empty", poisoned_empty)


@pytest.fixture
def launches(monkeypatch):
    counts = {"fwd": 0, "bwd": 0}
    for name, key in (("swiglu_fwd", "fwd"), ("swiglu_bwd", "bwd")):
        fn = getattr(G, name)

        def counted(*a, _fn=fn, _key=key, **k):
            counts[_key] += 1
            return _fn(*a, **k)
        monkeypatch.setattr(G, name, counted)
    return counts


def _grads(fn, inputs, g):
    leaves = [t.detach().requires_grad_() for t in inputs]  # keeps the strides of views
    out = fn(*leaves)
    out.backward(g.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def _check(fn, ref, inputs, out_shape, dtype):
    g = randn(*out_shape, dtype=torch.float64, device=DEVICE)
    out, grads = _grads(fn, inputs, g)
    out64, grads64 = _grads(ref, [t.double() for t in inputs], g)
    same = _grads(ref, inputs, g) if dtype != torch.float32 else (None, [None] * len(inputs))
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-3)
    assert out.dtype == dtype and out.shape == out_shape
    assert_close_to_ref(out, out64, same[0], factor=2.0, name="h", **tol)
    for i, (got, want, torch_same) in enumerate(zip(grads, grads64, same[1])):
        assert got.shape == inputs[i].shape and got.dtype == dtype
        assert_close_to_ref(got, want, torch_same, factor=3.0, name=f"grad[{i}]", **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead,n", [((3, 7), 50), ((1,), 1), ((300,), 5), ((2, 9), 257)])
@pytest.mark.parametrize("gate_last", [False, True])
def test_swiglu_packed(dtype, lead, n, gate_last, launches):
    """Gate and up as the halves of one fc1 output (either order): h and x's whole gradient in one pass each."""
    x = randn(*lead, 2 * n, dtype=dtype, device=DEVICE, scale=2.0)

    def ref(x):
        a, b = x.chunk(2, dim=-1)
        return G.swiglu_reference(*((b, a) if gate_last else (a, b)))
    _check(lambda x: G.swiglu_packed(x, gate_last, backend="triton"), ref, [x], (*lead, n), dtype)
    assert launches == {"fwd": 1, "bwd": 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
def test_swiglu_two_tensors(dtype, layout, launches):
    """Gate and up from separate GEMMs (any strides: a row-strided view, a transposed one that is copied)."""
    M, N = 37, 70
    if layout == "contiguous":
        gate, up = randn(M, N, dtype=dtype, device=DEVICE), randn(M, N, dtype=dtype, device=DEVICE)
    elif layout == "strided":
        gate = randn(M, 2 * N + 3, dtype=dtype, device=DEVICE)[:, 3:N + 3]
        up = randn(M, 3 * N, dtype=dtype, device=DEVICE)[:, ::3]
    else:
        gate, up = randn(N, M, dtype=dtype, device=DEVICE).t(), randn(N, M, dtype=dtype, device=DEVICE).t()
    _check(lambda g, u: G.swiglu(g, u, backend="triton"), G.swiglu_reference, [gate, up], (M, N), dtype)
    assert launches == {"fwd": 1, "bwd": 1}


def test_large_logits_and_zero_rows():
    """|gate| up to 80: σ saturates without inf/NaN; empty inputs give empty outputs and grads."""
    gate = torch.linspace(-80, 80, 64, device=DEVICE).repeat(3, 1)
    up = randn(3, 64, device=DEVICE)
    _check(lambda g, u: G.swiglu(g, u, backend="triton"), G.swiglu_reference, [gate, up], (3, 64), torch.float32)
    x = torch.empty(0, 8, device=DEVICE, requires_grad=True)
    h = G.swiglu_packed(x, backend="triton")
    h.sum().backward()
    assert h.shape == (0, 4) and x.grad.shape == (0, 8)
    z = torch.empty(3, 0, device=DEVICE, requires_grad=True)  # a zero-width hidden layer
    G.swiglu_packed(z, backend="triton").sum().backward()
    assert G.swiglu(z, z, backend="triton").shape == (3, 0) and z.grad.shape == (3, 0)


def test_bad_inputs():
    x = randn(4, 6, device=DEVICE)
    with pytest.raises(ValueError, match="must match"):
        G.swiglu(x, randn(4, 5, device=DEVICE), backend="triton")
    with pytest.raises(TypeError, match="must match"):
        G.swiglu(x, x.half(), backend="triton")
    with pytest.raises(ValueError, match="odd"):
        G.swiglu_packed(randn(4, 7, device=DEVICE), backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        G.swiglu(x.to(torch.int32), x.to(torch.int32), backend="triton")
    with pytest.raises(TypeError, match="Triton kernels take"):
        G.swiglu_packed(x.double(), backend="triton")
    with pytest.raises(ValueError, match="one device"):
        G.swiglu(x, x.to("meta"), backend="triton")
    with pytest.raises(TypeError, match="torch.Tensor"):
        G.swiglu_packed([1.0, 2.0])


def test_reference_backend_is_eager():
    x = randn(3, 10, dtype=torch.float64, device="cpu")
    a, b = x.chunk(2, -1)
    torch.testing.assert_close(G.swiglu_packed(x, backend="torch"), torch.nn.functional.silu(a) * b)
    torch.testing.assert_close(G.swiglu_packed(x, True, backend="torch"), torch.nn.functional.silu(b) * a)


@pytest.mark.gpu
@pytest.mark.parametrize("M,N", [(197 * 4, 4096), (50, 1000)])
def test_swiglu_bf16_gpu(M, N):
    """bf16 at a DINOv2-giant MLP's hidden width, packed and two-tensor, by the 2x/3x rule."""
    x = randn(M, 2 * N, dtype=torch.bfloat16, device="cuda")

    def ref(x):
        return G.swiglu_reference(*x.chunk(2, dim=-1))
    _check(lambda x: G.swiglu_packed(x, backend="triton"), ref, [x], (M, N), torch.bfloat16)
    gate, up = randn(M, N, dtype=torch.bfloat16, device="cuda"), randn(M, N, dtype=torch.bfloat16, device="cuda")
    _check(lambda g, u: G.swiglu(g, u, backend="triton"), G.swiglu_reference, [gate, up], (M, N), torch.bfloat16)


def _fc2_case(packed, gate_last, dtype, seed, frozen_w2=False):
    """Inputs of one SwiGLU MLP's second half: (z, up or None, w2, b2, residual, γ) drawn from ``seed``."""
    M, H, N = 29, 40, 24
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype).requires_grad_(grad)
    z = t(3, M, 2 * H if packed else H, scale=2.0)
    up = None if packed else t(3, M, H)
    return z, up, t(N, H, scale=H ** -0.5, grad=not frozen_w2), t(N), t(3, M, N), t(N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("packed,gate_last", [(True, False), (True, True), (False, False)],
                         ids=["packed", "packed_gate_last", "two_tensors"])
def test_swiglu_fc2_keeps_no_h(dtype, packed, gate_last, launches):
    """fc2(silu(gate)·up) + residual with γ: output and every grad vs float64 (2x/3x PyTorch's own error), the
    same values as swiglu then linear (bit for bit in fp32: h is rebuilt by the same kernel), and autograd holds
    exactly h's M·H elements less; one gate pass each way plus the rebuild."""
    seed = 1234 + 7 * packed + gate_last
    L = importlib.import_module("flashvit.kernels.linear")

    def fused(z, up, w2, b2, r, gm):
        return G.swiglu_fc2(z, w2, b2, up=up, gate_last=gate_last, residual=r, layer_scale=gm, backend="triton")

    def composed(z, up, w2, b2, r, gm, be="triton"):
        h = G.swiglu_packed(z, gate_last, backend=be) if up is None else G.swiglu(z, up, backend=be)
        return L.linear(h, w2, b2, residual=r, layer_scale=gm, backend=be)

    def run(fn, dt=dtype, **kw):
        ins = [t for t in _fc2_case(packed, gate_last, dt, seed) if t is not None]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda v: saved.append(v.numel()) or v, lambda v: v):
            y = fn(*(ins[:1] + ([None] if packed else ins[1:2]) + ins[1 + (not packed):]), **kw)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 99), dtype=torch.float64)
        y.backward(dy.to(y.device, y.dtype))
        return y.detach(), [t.grad for t in ins], sum(saved)

    y, grads, saved = run(fused)
    assert launches == {"fwd": 2, "bwd": 1}  # the forward's gate pass and the backward's rebuild
    y_c, grads_c, saved_c = run(composed)
    assert saved_c - saved == 3 * 29 * 40
    if dtype == torch.float32:
        assert torch.equal(y, y_c) and all(torch.equal(a, b) for a, b in zip(grads, grads_c))
    y64, grads64, _ = run(lambda *a: composed(*a, be="torch"), torch.float64)
    yt, gradst, _ = run(lambda *a: composed(*a, be="torch")) if dtype != torch.float32 else (None, [None] * 6, 0)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3)
    assert_close_to_ref(y, y64, yt, factor=2.0, name="y", **tol)
    for i, (a, b, c) in enumerate(zip(grads, grads64, gradst)):
        assert_close_to_ref(a, b, c, factor=3.0, name=f"grad[{i}]", **tol)


def test_swiglu_fc2_frozen_fc2_and_bad_inputs(launches):
    """fc2 frozen: no rebuild (h is needed for dW2 only); the CPU default ('auto') runs the reference; bad shapes."""
    z, up, w2, b2, r, gm = _fc2_case(True, False, torch.float32, 5, frozen_w2=True)
    b2.requires_grad_(False)
    G.swiglu_fc2(z, w2, b2, residual=r, backend="triton").sum().backward()
    assert launches == {"fwd": 1, "bwd": 1} and z.grad is not None
    z2 = z.detach().requires_grad_()
    ref = G.swiglu_fc2(z2, w2, b2, residual=r, backend="torch")
    assert_close_to_ref(G.swiglu_fc2(z, w2, b2, residual=r, backend="triton"), ref.detach(), name="y")
    with pytest.raises(ValueError, match="odd"):
        G.swiglu_fc2(z[..., 1:], w2, backend="triton")
    with pytest.raises(ValueError, match="input features"):
        G.swiglu_fc2(z, w2[:, 1:], backend="triton")
    with pytest.raises(ValueError, match="must match"):
        G.swiglu_fc2(z[..., :40], w2, up=z[..., :39], backend="triton")

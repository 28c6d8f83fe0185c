"""The backend switch: argument > context > FLASHVIT_BACKEND > auto."""

import pytest
import torch

import flashvit
from flashvit.kernels import _dispatch


def test_precedence(monkeypatch):
    monkeypatch.setenv("FLASHVIT_BACKEND", "torch")
    assert flashvit.get_backend() == "torch"
    with flashvit.use_backend("triton"):
        assert flashvit.get_backend() == "triton"
        with flashvit.use_backend("auto"):
            assert flashvit.get_backend() == "auto"
    assert flashvit.get_backend() == "torch"
    monkeypatch.delenv("FLASHVIT_BACKEND")
    assert flashvit.get_backend() == "auto"


def test_auto_on_cpu_is_reference():
    assert not _dispatch.use_triton(torch.zeros(1), backend="auto")
    assert not _dispatch.use_triton(torch.zeros(1), backend="torch")


def test_forced_triton_on_cpu_needs_interpreter(monkeypatch):
    if not _dispatch.HAS_TRITON:
        with pytest.raises(RuntimeError, match="not importable"):
            _dispatch.use_triton(torch.zeros(1), backend="triton")
        return
    monkeypatch.setattr(_dispatch, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _dispatch.use_triton(torch.zeros(1), backend="triton")
    monkeypatch.setattr(_dispatch, "INTERPRET", True)
    assert _dispatch.use_triton(torch.zeros(1), backend="triton")


def test_unknown_backend(monkeypatch):
    with pytest.raises(ValueError, match="unknown flashvit backend 'cuda'"):
        _dispatch.use_triton(torch.zeros(1), backend="cuda")
    monkeypatch.setenv("FLASHVIT_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown flashvit backend 'fast'"):
        flashvit.get_backend()


def test_compiled_code_follows_use_backend():
    # torch.compile guards on the override stack: changing the forced backend recompiles.
    def f(x):
        return x + 1 if flashvit.get_backend() == "torch" else x - 1

    cf = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.zeros(2)
    with flashvit.use_backend("torch"):
        assert cf(x).tolist() == [1.0, 1.0]
    with flashvit.use_backend("triton"):
        assert cf(x).tolist() == [-1.0, -1.0]


# ---------------------------------------------------------------------------------------------
# Op: the launcher directly in plain eager, the registered custom op wherever ops are traced or intercepted.

needs_triton = pytest.mark.skipif(not _dispatch.HAS_TRITON, reason="triton is not importable on this platform")


def _ln_ops():
    from flashvit.kernels import layernorm
    return layernorm._layer_norm_fwd_op, layernorm._layer_norm_bwd_op


@needs_triton
def test_op_plain_eager_skips_the_custom_op(monkeypatch):
    fwd, bwd = _ln_ops()

    def boom(*args):
        raise AssertionError("plain eager went through torch.ops")

    monkeypatch.setattr(fwd, "op", boom)
    monkeypatch.setattr(bwd, "op", boom)
    x = torch.randn(3, 5, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=True)
    y = flashvit.kernels.layer_norm(x, w, None, backend="triton")
    y.backward(torch.randn_like(y))
    ref_x = x.detach().double().requires_grad_()
    ref = torch.nn.functional.layer_norm(ref_x, (24,), w.detach().double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@needs_triton
def test_op_dispatch_modes_see_the_custom_op():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(4, 16)
    with Log() as log:
        flashvit.kernels.layer_norm(x, torch.ones(16), torch.zeros(16), backend="triton")
    assert any("flashvit.layer_norm_fwd" in n for n in log.names), log.names


def test_plain_eager_predicate():
    x = torch.zeros(2)
    assert _dispatch._plain_eager(x)
    assert not _dispatch._plain_eager(torch.nn.Parameter(x))  # a subclass: take the op path
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        assert not _dispatch._plain_eager(mode.from_tensor(x))
    seen = []
    torch.compile(lambda t: seen.append(_dispatch._plain_eager(t)) or t + 1, backend="eager", fullgraph=False)(x)
    assert seen == [False]


def test_host_grid_helpers():
    assert [_dispatch.next_pow2(n) for n in (1, 2, 3, 64, 65, 768, 8192)] == [1, 2, 4, 64, 128, 1024, 8192]
    assert [_dispatch.cdiv(a, 4) for a in (0, 1, 4, 5, 197)] == [0, 1, 1, 2, 50]


@needs_triton
@pytest.mark.parametrize("grad_mode", ["no_grad", "no_input_grad", "grad"])
def test_apply_skips_autograd_only_when_nothing_needs_a_gradient(grad_mode):
    from flashvit.kernels import linear
    x = torch.randn(5, 24, requires_grad=grad_mode == "grad")
    w, b = torch.randn(16, 24), torch.randn(16)
    ref = torch.nn.functional.gelu(x.detach().double() @ w.double().T + b.double())
    with torch.no_grad() if grad_mode == "no_grad" else torch.enable_grad():
        y = linear(x, w, b, activation="gelu", backend="triton")
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    assert (y.grad_fn is not None) == (grad_mode == "grad")


def test_auto_has_its_own_verdict_inside_compiled_graphs(monkeypatch):
    class CudaLike:  # use_triton reads only .is_cuda
        is_cuda = True

    x = CudaLike()
    monkeypatch.setattr(_dispatch, "HAS_TRITON", True)
    assert _dispatch.use_triton(x, "auto", auto=True, auto_compiled=False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not _dispatch.use_triton(x, "auto", auto=True, auto_compiled=False)
    assert _dispatch.use_triton(x, "auto", auto=True)  # no compiled verdict: the eager one holds
    assert _dispatch.use_triton(x, "triton", auto=True, auto_compiled=False)  # forcing still wins
    import importlib
    assert importlib.import_module("flashvit.kernels.linear").AUTO_COMPILED is False

"""The backend switch: argument > context > FLASHVIT_BACKEND > auto."""

import pytest
import torch

import flashvit
from flashvit.kernels import _dispatch
from flashvit.kernels._dispatch import launch
from tests.conftest import DEVICE


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
    x = torch.randn(3, 5, 24, device=DEVICE, requires_grad=True)
    w = torch.randn(24, device=DEVICE, requires_grad=True)
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

    x = torch.randn(4, 16, device=DEVICE)
    with Log() as log:
        flashvit.kernels.layer_norm(x, torch.ones(16, device=DEVICE), torch.zeros(16, device=DEVICE), backend="triton")
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
    x = torch.randn(5, 24, device=DEVICE, requires_grad=grad_mode == "grad")
    w, b = torch.randn(16, 24, device=DEVICE), torch.randn(16, device=DEVICE)
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


class _FakeCompiled:
    function, packed_metadata = "fn", "meta"

    def __init__(self, log):
        self.log = log

    def run(self, *a):
        self.log.append(("fast", a))


class _FakeKernel:
    """Stands in for a @triton.jit function: kernel[grid](*args, **consts) launches and returns the compiled."""
    arg_names = ["X", "N", "scale", "flag", "BLOCK"]

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def launch(*args, **consts):
            self.log.append(("slow", grid, args, consts))
            return _FakeCompiled(self.log)
        return launch


def _fake_launcher(monkeypatch):
    """(fake kernel, a Launcher of it with the fast path on) on a fake device 0 and stream 7."""
    monkeypatch.setattr(_dispatch, "_current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda dev: 7, raising=False)
    if _dispatch._knobs is None:
        pytest.skip("this Triton has no triton.knobs: every launch takes Triton's path")
    kern = _FakeKernel()
    launcher = _dispatch.Launcher(kern)
    launcher.enabled = True  # (the interpreter disables the fast path; the logic is what is tested here)
    return kern, launcher


def test_launcher_keys_on_what_triton_specializes(monkeypatch):
    kern, launcher = _fake_launcher(monkeypatch)
    x = torch.zeros(64)
    kinds = []

    def call(t, n, grid=(3,), block=32):
        before = len(kern.log)
        launcher(grid, (t, n, 0.5, True), dict(BLOCK=block))
        kinds.append(kern.log[before][0])
    call(x, 32)
    call(x, 48)          # same specialization (n % 16 == 0, != 1): fast
    call(x, 33)          # n no longer divisible by 16: Triton's path (a new specialization)
    call(x, 35)          # fast again
    call(x[1:], 32)      # a 4-byte-offset pointer is not 16-byte aligned: new specialization
    call(x, 32, block=64)  # another constexpr: new
    call(x.double(), 32)   # another dtype: new
    call(x, 1)           # == 1 is specialized
    call(x, 2 ** 31)     # 64-bit int
    call(x, 64, grid=lambda meta: (meta["BLOCK"] // 8,))
    assert kinds == ["slow", "fast", "slow", "fast", "slow", "slow", "slow", "slow", "slow", "fast"]
    fast = [e for e in kern.log if e[0] == "fast"]
    # launcher(grid xyz, stream, function, packed metadata, launch metadata, hooks, *args, *constexprs)
    assert fast[0][1] == (3, 1, 1, 7, "fn", "meta", None, None, None, x, 48, 0.5, True, 32)
    assert fast[-1][1][:3] == (4, 1, 1)  # the grid function sees the constexprs


def test_launcher_keys_on_the_autotune_key(monkeypatch):
    """Under an autotuner a config is chosen per autotune-key value: a new value goes through Triton."""
    import types

    import triton
    monkeypatch.setattr(_dispatch, "_current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda dev: 7, raising=False)
    if _dispatch._knobs is None:
        pytest.skip("this Triton has no triton.knobs")

    def body(X, N, scale, flag, BLOCK: "triton.language.constexpr"):
        pass
    tuned = triton.autotune([triton.Config({"BLOCK": 64})], key=["N"])(triton.runtime.jit.JITFunction(body))
    assert _dispatch.Launcher(tuned).key_pos == [(1, "N")]
    kern = _FakeKernel()
    launcher = _dispatch.Launcher(kern)
    launcher.enabled, launcher.key_pos = True, [(1, "N")]
    launcher.tuner = types.SimpleNamespace(best_config=triton.Config({"BLOCK": 64}))
    x = torch.zeros(8)
    for n in (32, 32, 48, 48, 32):
        launcher(lambda meta: (meta["BLOCK"],), (x, n, 0.5, False), {})
    assert [e[0] for e in kern.log] == ["slow", "fast", "slow", "fast", "fast"]
    assert kern.log[1][1][:1] == (64,) and kern.log[1][1][-1] == 64  # grid and constexpr from the config


def test_launcher_falls_back_when_the_launcher_refuses_its_arguments(monkeypatch):
    monkeypatch.setattr(_dispatch, "_current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda dev: 7, raising=False)
    if _dispatch._knobs is None:
        pytest.skip("this Triton has no triton.knobs")

    class Picky(_FakeCompiled):
        def run(self, *a):
            raise TypeError("function takes exactly 12 arguments")

    kern = _FakeKernel()
    launcher = _dispatch.Launcher(kern)
    launcher.enabled = True
    launcher((1,), (torch.zeros(4), 16, 0.5, True), dict(BLOCK=16))  # Triton's path, fills the cache
    key = next(iter(launcher._cache))
    launcher._cache[key] = (Picky(kern.log).run,) + launcher._cache[key][1:]
    launcher((1,), (torch.zeros(4), 16, 0.5, True), dict(BLOCK=16))
    assert [e[0] for e in kern.log] == ["slow", "slow"] and not launcher.enabled


def test_launcher_falls_back_for_unknown_arguments(monkeypatch):
    monkeypatch.setattr(_dispatch, "_current_device", lambda: 0)
    if _dispatch._knobs is None:
        pytest.skip("this Triton has no triton.knobs")
    kern = _FakeKernel()
    launcher = _dispatch.Launcher(kern)
    launcher.enabled = True
    for _ in range(2):
        launcher((1,), (torch.zeros(4), 16, 0.5, object()), dict(BLOCK=16))
    assert [e[0] for e in kern.log] == ["slow", "slow"]


@pytest.mark.gpu
def test_launcher_fast_path_gpu():
    from flashvit.kernels import layernorm as L
    if not L._ln_fwd_tuned_auto_one.enabled:
        pytest.skip("fast launches are off (FLASHVIT_FAST_LAUNCH=0 or an unsupported Triton)")
    for _ in range(4):  # the first call fills the cache; the others launch through it, with new data
        x = torch.randn(3, 77, 384, device="cuda", dtype=torch.bfloat16)
        w, b = torch.randn(384, device="cuda"), torch.randn(384, device="cuda")
        y = L.layer_norm(x, w, b, backend="triton")
        ref = L.layer_norm_reference(x.double(), w.double(), b.double(), 1e-5)
        assert (y.double() - ref).abs().max().item() < 0.1
    assert L._ln_fwd_tuned_auto_one._cache, "the fast path's cache stayed empty"  # (the default at 231 rows)


def test_launcher_key_tells_bools_ints_and_floats_apart(monkeypatch):
    """The flat key: a bool, an int == 1, another int and a float at one position are four specializations."""
    kern, launcher = _fake_launcher(monkeypatch)
    x = torch.zeros(8)
    for flag in (True, 1, 16, 0.5, True, 1, 16, 0.5, False, 3):
        launcher((1,), (x, 16, 0.5, flag), dict(BLOCK=16))
    assert [e[0] for e in kern.log] == ["slow"] * 4 + ["fast"] * 4 + ["slow"] * 2


def test_once_differentiable_runs_torch_wrapper_only_in_grad_mode():
    seen = []

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        @_dispatch.once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            seen.append(torch.is_grad_enabled())
            return 2 * x * g

    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(Square.apply(x).sum(), x)
    assert torch.equal(gx, 2 * x.detach()) and not gx.requires_grad
    g = torch.ones(3, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(Square.apply(x), x, g, create_graph=True)
    assert torch.equal(gx.detach(), 2 * x.detach()) and gx.requires_grad  # torch's wrapper: a DelayedError node
    assert seen == [False, False]  # the body always runs without grad mode
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


def test_launcher_runs_the_pre_hook_on_fast_launches_and_keys_on_descriptors(monkeypatch):
    """An autotuner with a pre_hook (the TMA GEMM's: descriptor block shapes per config): each fast launch calls
    it with the arguments, constexprs and the chosen config by name, before launching; TMA descriptors are
    keyed on their dtype (their block shape follows the config)."""
    import types

    import triton
    tdesc = pytest.importorskip("triton.tools.tensor_descriptor")
    kern, launcher = _fake_launcher(monkeypatch)
    kern.arg_names = ["D", "N", "BLOCK"]
    launcher.names = kern.arg_names
    seen = []

    def hook(nargs):
        seen.append(dict(nargs))
        nargs["D"].block_shape = [nargs["BLOCK"], 16]
    launcher.pre_hook = hook
    launcher.tuner = types.SimpleNamespace(best_config=triton.Config({"BLOCK": 64}))

    def desc(dtype):
        t = torch.zeros(128, 64, dtype=dtype)
        return tdesc.TensorDescriptor(t, list(t.shape), list(t.stride()), [16, 16])
    d1, d2, d3 = desc(torch.float16), desc(torch.float16), desc(torch.bfloat16)
    kinds = []
    for d in (d1, d2, d3):
        before = len(kern.log)
        launcher((2,), (d, 128), {})
        kinds.append(kern.log[before][0])
    assert kinds == ["slow", "fast", "slow"]
    assert len(seen) == 1 and seen[0]["D"] is d2 and seen[0]["N"] == 128 and seen[0]["BLOCK"] == 64
    assert d2.block_shape == [64, 16]  # set before the launch
    fast = [e for e in kern.log if e[0] == "fast"][0][1]
    assert fast[9:] == (d2, 128, 64)  # the descriptor itself goes to the compiled launcher (it encodes it)


def test_cuda_context_lost_tells_fatal_errors_apart():
    """conftest ends an xdist worker after an error that kills its CUDA context, and only then."""
    from tests.conftest import cuda_context_lost
    assert cuda_context_lost(RuntimeError("CUDA error: an illegal memory access was encountered\nSearch for ..."))
    assert cuda_context_lost(RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"))
    assert not cuda_context_lost(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not cuda_context_lost(AssertionError("out-of-bounds kernel memory access: ..."))  # the interpreter's checker


def test_launcher_passes_the_launch_options(monkeypatch):
    """Triton's path, every time: the compile options ride along (FMA contraction, whatever Triton's default)."""
    kern, launcher = _fake_launcher(monkeypatch)
    for n in (16, 16, 33):
        launcher((1,), (torch.zeros(4), n, 0.5, True), dict(BLOCK=16))
    slow = [e for e in kern.log if e[0] == "slow"]
    assert len(slow) == 2 and all(e[3] == dict(BLOCK=16, **_dispatch.LAUNCH_OPTIONS) for e in slow)
    assert _dispatch.LAUNCH_OPTIONS == {"enable_fp_fusion": True}


@pytest.mark.skipif(not _dispatch.INTERPRET, reason="records the launches the Triton interpreter receives (on a GPU "
                    "the Launcher's fast path bypasses Triton's entry point; the AOT gate checks the compiled option)")
def test_every_kernel_launch_asks_for_fp_fusion(monkeypatch):
    """A ViT's forward and backward, SwiGLU, RoPE and the dropout mask on the kernels: each launch passes
    LAUNCH_OPTIONS (Triton 3.9 warns on a kernel that does not ask; 3.10 turns FMA contraction off there)."""
    from triton.runtime import interpreter

    from flashvit.kernels.attention import dropout_mask
    from flashvit.kernels.glu import swiglu
    from flashvit.kernels.rope import apply_rope
    seen = []
    call = interpreter.GridExecutor.__call__

    def record(self, *args, **kwargs):
        seen.append((getattr(self.fn, "__name__", "?"), kwargs.get("enable_fp_fusion")))
        return call(self, *args, **kwargs)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", record)
    torch.manual_seed(0)
    model = flashvit.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=1,
                                  num_heads=2, num_classes=3)
    g, u = (torch.randn(3, 16, requires_grad=True) for _ in range(2))
    q = torch.randn(1, 5, 2, 8, requires_grad=True)
    with flashvit.use_backend("triton"):
        model(torch.randn(2, 3, 16, 16)).sum().backward()
        (swiglu(g, u).sum() + apply_rope(q, torch.randn(5, 16)).sum()).backward()
    dropout_mask(1, 2, 5, 5, 0.5, 1, torch.device("cpu"))
    names = {n for n, _ in seen}
    assert {"_ln_fwd_kernel", "_ln_bwd_kernel", "_dropout_mask_kernel"} <= names and len(names) >= 10, names
    assert [n for n, opt in seen if opt is not True] == []


@pytest.mark.skipif(not _dispatch.INTERPRET, reason="the Triton interpreter's mask handling (compiled kernels take "
                    "i1 masks as they are)")
def test_interpreter_takes_masks_joined_with_a_scalar_comparison():
    """``ok & (pid < P)``: Triton 3.9's interpreter makes it int32 and its loads, stores and atomics refused it
    (_interpreter_bool_masks); the kernels use such masks (linear's column sums, ...)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(X, Y, Z, N, P, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = (offs < N) & (pid + 1 < P)  # rows 0 .. P-2 only
        x = tl.load(X + pid * BLOCK + offs, mask=m, other=-1.0)
        tl.store(Y + pid * BLOCK + offs, x * 2, mask=m)
        tl.atomic_add(Z + offs, x, mask=m)

    assert _dispatch._interpreter_bool_masks()
    x = torch.randn(3, 8)
    y, z = torch.full((3, 8), 7.0), torch.zeros(8)
    launch(kernel, (3,), x, y, z, 5, 3, BLOCK=8)
    want = torch.full((3, 8), 7.0)
    want[:2, :5] = 2 * x[:2, :5]
    assert torch.equal(y, want)
    torch.testing.assert_close(z[:5], x[:2, :5].sum(0))
    assert torch.equal(z[5:], torch.zeros(3))

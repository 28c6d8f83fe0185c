"""One place that decides, per call, whether an op runs its Triton kernels or its PyTorch reference.

Rules (read at call time):
  * ``backend=`` argument of an op, else the innermost ``use_backend(...)`` context, else the
    ``FLASHVIT_BACKEND`` environment variable (``auto`` | ``torch`` | ``triton``), else ``auto``.
  * ``auto``: CUDA tensors and an importable Triton -> Triton; anything else -> the reference.
  * ``triton`` forces the kernels; on CPU tensors that needs the Triton interpreter, chosen by
    ``TRITON_INTERPRET=1`` in the environment *before* flashvit.kernels is imported.
  * ``torch`` forces the eager PyTorch reference.

Also home to the input checks every public op shares, so each op raises the same clear errors.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Any, Callable, ContextManager, Iterator, List, Optional, Sequence

import torch

try:  # Triton ships wheels for Linux only; everything still works on the reference path.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the platform
    triton = None
    tl = None
    HAS_TRITON = False

# Decided when kernels are decorated, so it is read once at import.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_bool_masks() -> bool:
    """Make the Triton interpreter's loads, stores and atomics take any integer mask as the compiler does (nonzero:
    on). Triton 3.9's interpreter gives ``ok & (j < P)`` (a tensor and a scalar comparison) an int32 mask (it
    splats the scalar's bool in its operands' integer type) and its loads and stores refuse any mask but bool;
    3.6 - 3.8 took it. Idempotent; False where this Triton has no interpreter to adjust."""
    try:
        import numpy as np
        from triton.runtime import interpreter as _interp
    except Exception:  # pragma: no cover - no Triton, or one without an interpreter
        return False
    builder = _interp.InterpreterBuilder
    if getattr(builder, "_flashvit_bool_masks", False):
        return True

    def as_bool(mask: Any) -> Any:
        data = getattr(mask, "data", None)
        if isinstance(data, np.ndarray) and data.dtype != np.bool_:
            return _interp.TensorHandle(data != 0, tl.int1)
        return mask

    def wrap(name: str, pos: int) -> None:  # the mask: positional argument ``pos`` (after self)
        orig = getattr(builder, name)

        @functools.wraps(orig)
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            if len(args) > pos:
                args = args[:pos] + (as_bool(args[pos]),) + args[pos + 1:]
            return orig(self, *args, **kwargs)
        setattr(builder, name, call)
    # create_masked_load(ptrs, mask, other, ...), create_masked_store(ptrs, value, mask, ...),
    # create_atomic_rmw(op, ptr, val, mask, ...)
    for name, pos in (("create_masked_load", 1), ("create_masked_store", 2), ("create_atomic_rmw", 3)):
        if hasattr(builder, name):
            wrap(name, pos)
    builder._flashvit_bool_masks = True
    return True


if INTERPRET and HAS_TRITON:
    _interpreter_bool_masks()

BACKENDS = ("auto", "torch", "triton")
# Innermost ``use_backend`` last. A plain module-level list (not a ContextVar) so that torch.compile
# guards on it: a compiled model recompiles when the forced backend changes.
_overrides: List[str] = []


def _check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown flashvit backend {name!r}; expected one of {BACKENDS}")
    return name


@torch.compiler.assume_constant_result
def _env_backend() -> str:
    # Read at call time in eager; under torch.compile it is read once per trace.
    return os.environ.get("FLASHVIT_BACKEND", "auto").strip().lower() or "auto"


def get_backend() -> str:
    """The backend in force: the innermost ``use_backend`` context, else ``FLASHVIT_BACKEND``, else 'auto'."""
    if _overrides:
        return _overrides[-1]
    return _check_backend_name(_env_backend())


@contextlib.contextmanager
def pushed(stack: List[Any], value: Any) -> Iterator[None]:
    """``value`` on top of ``stack`` inside a ``with`` block (the innermost block's value last). The ops' override
    stacks are plain module-level lists: torch.compile guards on them."""
    stack.append(value)
    try:
        yield
    finally:
        stack.pop()


def use_backend(name: str) -> ContextManager[None]:
    """Force a backend inside a ``with`` block: ``with flashvit.use_backend("torch"): ...``."""
    return pushed(_overrides, _check_backend_name(name))


_cuda_auto: List[bool] = []  # non-empty inside emulate_cuda_auto()


def emulate_cuda_auto() -> ContextManager[None]:
    """Inside: the 'auto' backend takes CPU tensors as it takes CUDA ones (in the Triton interpreter: the kernels
    where CUDA would run them). For host-time measurements on CPU with launches stubbed (bench overhead): the
    calls a GPU's 'auto' step makes, without a GPU."""
    return pushed(_cuda_auto, True)


def cuda_auto(x: torch.Tensor) -> bool:
    """x is on CUDA, or its 'auto' decisions are emulated as CUDA's (emulate_cuda_auto, the interpreter)."""
    return x.is_cuda or (bool(_cuda_auto) and INTERPRET)


_graph_steps: List[bool] = []  # non-empty inside graph_step()


def graph_step() -> ContextManager[None]:
    """The calls of a step that a CUDA graph will replay (flashvit.capture_cuda_graph's warm-up calls and its
    capture, alike): replays cost the host nothing, so 'auto' verdicts made on host time give way to device
    time inside (see each op's file)."""
    return pushed(_graph_steps, True)


def in_graph_step() -> bool:
    return bool(_graph_steps)


def use_triton(x: torch.Tensor, backend: Optional[str] = None, auto: bool = True,
               auto_compiled: Optional[bool] = None) -> bool:
    """True when an op called on ``x`` should launch its Triton kernels.

    ``auto`` is the op's measured verdict for the 'auto' backend on CUDA: an op whose kernels were
    measured slower than eager PyTorch passes False (recorded, with the measurement, in its file) and
    runs its reference under 'auto'; forcing 'triton' still runs the kernels. ``auto_compiled`` is the
    verdict inside a torch.compile graph (default: ``auto``): an op that Inductor fuses as well from the
    reference passes False, so Inductor sees plain aten ops there instead of an opaque custom op.
    """
    name = get_backend() if backend is None else _check_backend_name(backend)
    if name == "torch":
        return False
    if name == "auto":
        if auto_compiled is not None and torch.compiler.is_compiling():
            auto = auto_compiled
        return auto and HAS_TRITON and cuda_auto(x)
    if not HAS_TRITON:
        raise RuntimeError("flashvit backend 'triton' was forced but triton is not importable on this machine")
    if not x.is_cuda and not INTERPRET:
        raise RuntimeError(
            f"flashvit backend 'triton' was forced on a {x.device.type} tensor: set TRITON_INTERPRET=1 "
            "before importing flashvit to run the kernels in the Triton interpreter"
        )
    return True


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``device``'s type, else None (autocast off, or a device type such
    as 'meta' that autocast does not know)."""
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except RuntimeError:
        pass
    return None


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host-side grid math (triton.cdiv is a constexpr function: ~5 us a call on the host)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), host-side."""
    return 1 << (max(int(n), 1) - 1).bit_length()


@functools.cache
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The CUDA device's SM count (read once per device)."""
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _major_of(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def cuda_major(device: torch.device) -> int:
    """The CUDA device's compute capability major, 8 (Ampere) or 9 (Hopper) and up (read once per device)."""
    return _major_of(device.index if device.index is not None else torch.cuda.current_device())


try:
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # pragma: no cover - private helper; without it every call takes the op path
    def _get_current_dispatch_mode():
        return True


def _plain_eager(t: torch.Tensor) -> bool:
    """True in plain eager execution: a real torch.Tensor, no torch.compile/export trace, no dispatch mode
    (FakeTensor, FlopCounterMode, ...) and no functorch transform."""
    return (not torch.compiler.is_compiling() and type(t) is torch.Tensor
            and _get_current_dispatch_mode() is None and not torch._C._are_functorch_transforms_active())


class Op:
    """A launcher registered as the custom op ``flashvit::<name>`` (opaque to torch.compile, with a fake).

    Calling it runs the launcher directly in plain eager mode (the first argument decides; see
    ``_plain_eager``): torch.library's dispatch costs tens of microseconds of host time per call, which a
    ViT training step pays hundreds of times. Anything that traces or intercepts ops gets the custom op.
    """

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.custom_op = torch.library.custom_op(f"flashvit::{name}", mutates_args=())(fn)
        self.op = getattr(torch.ops.flashvit, name)
        self.__name__ = name
        self.__doc__ = fn.__doc__

    def register_fake(self, fake: Callable[..., Any]) -> Callable[..., Any]:
        return self.custom_op.register_fake(fake)

    def __call__(self, *args: Any) -> Any:
        if _plain_eager(args[0]):
            return self.fn(*args)
        return self.op(*args)


def custom_op(name: str) -> Callable[[Callable[..., Any]], Op]:
    """Decorator: ``@custom_op("layer_norm_fwd")`` -> an ``Op`` (see there)."""
    return lambda fn: Op(name, fn)


# ---------------------------------------------------------------------------------------------
# Kernel launches with little host time.
#
# Measured on an H100 host (bench/results/2026-11-26-h100-diag/launch.txt): one launch through Triton's
# JITFunction.run costs ~53-58 us of CPU, the compiled kernel's own launcher ~13 us, torch's whole
# F.layer_norm ~18 us. A ViT step makes hundreds of launches, so small models were host-bound.

try:  # Triton >= 3.4; without it every launch takes Triton's own path
    from triton import knobs as _knobs
    from triton.runtime.autotuner import Autotuner as _Autotuner
    from triton.runtime.jit import JITFunction as _JITFunction
except Exception:  # pragma: no cover - depends on the Triton version
    _knobs = _Autotuner = _JITFunction = None
try:  # host-side TMA descriptors (Triton >= 3.4): the compiled launcher encodes them per call
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except Exception:  # pragma: no cover - depends on the Triton version
    _TensorDescriptor = None

# Compile options every launch (and the ahead-of-time gate) passes. FMA contraction on: Triton's default up to
# 3.9, which warns on each kernel that does not ask, and whose default turns it off in 3.10; the kernels are
# tuned, timed and tested with it.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def launch(kernel: Any, grid: Any, *args: Any, **consts: Any) -> Any:
    """``kernel[grid](*args, **consts)`` with LAUNCH_OPTIONS: every direct launch goes through here (a
    ``Launcher`` adds them itself). Returns what Triton returns (the compiled kernel)."""
    return kernel[grid](*args, **consts, **LAUNCH_OPTIONS)


FAST_LAUNCH = os.environ.get("FLASHVIT_FAST_LAUNCH", "1").strip() != "0"

# The current CUDA device without torch.cuda.current_device()'s Python wrapper (the C call lazy-inits too).
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device


def _hook_set(hook: Any) -> bool:
    return hook is not None and bool(getattr(hook, "calls", True))  # Triton >= 3.7: a HookChain, maybe empty


def _hooks_active() -> bool:
    """A launch hook is installed (a profiler such as proton): launches must go through Triton."""
    rt = _knobs.runtime
    return _hook_set(rt.launch_enter_hook) or _hook_set(rt.launch_exit_hook)


class Launcher:
    """``Launcher(kernel)(grid, args, consts)``: ``launch(kernel, grid, *args, **consts)`` at a fraction of the host cost.

    ``kernel`` is a ``@triton.jit`` function or a ``triton.autotune`` of one; ``args`` fill its leading
    parameters positionally and ``consts`` (plus, for an autotuner, the chosen config) name the rest;
    ``grid`` is a tuple or ``grid(meta)`` as in Triton. The first launch of each specialization goes
    through Triton (compile, autotune) and keeps the compiled kernel it returns; later launches with the
    same specialization, autotune key, constexprs and device call that kernel's launcher directly.
    An autotuner whose configs share one ``pre_hook`` (the TMA GEMM's: descriptor block shapes per config)
    gets it called on each fast launch too, with the arguments, constexprs and chosen config by name.
    Launch hooks (profilers), the interpreter and FLASHVIT_FAST_LAUNCH=0 take Triton's path every time.
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        base = kernel
        while _JITFunction is not None and not isinstance(base, _JITFunction) and hasattr(base, "fn"):
            base = base.fn
        self.names: List[str] = list(getattr(base, "arg_names", []))
        tuner = kernel if (_Autotuner is not None and isinstance(kernel, _Autotuner)) else None
        self.tuner = tuner
        # the autotune key's parameters, by position (a config is chosen per value of these)
        self.key_pos = [(self.names.index(k), k) for k in (tuner.keys if tuner is not None else []) if k in self.names]
        hooks = {c.pre_hook for c in tuner.configs} if tuner is not None else {None}
        self.pre_hook = next(iter(hooks)) if len(hooks) == 1 else None
        self.enabled = (FAST_LAUNCH and not INTERPRET and _JITFunction is not None and isinstance(base, _JITFunction)
                        and len(hooks) == 1)
        self._cache: dict = {}

    def __call__(self, grid: Any, args: Sequence[Any], consts: dict) -> None:
        if not self.enabled or _hooks_active():
            launch(self.kernel, grid, *args, **consts)
            return
        device = _current_device()
        # The key, flat (no tuple per argument: ~1 us less per 15-argument launch): the counts, the
        # constexprs, then per argument what Triton specializes it on, or finer: a tensor adds its dtype and
        # 16-byte alignment, an int one code >= 2 for its three flags (== 1, divisible by 16, 32-bit range;
        # never equal to a bool), a float the type float, a bool itself; then the autotune key's values.
        key = [device, len(args), len(consts), *consts.values()]
        add = key.append
        for a in args:
            t = type(a)
            if t is int:
                add(2 + (a == 1) + 2 * (a % 16 == 0) + 4 * (-2147483648 <= a < 2147483648))
            elif t is float:
                add(float)
            elif t is bool:
                add(a)
            elif isinstance(a, torch.Tensor):
                add(a.dtype)
                add(a.data_ptr() % 16 == 0)
            elif t is _TensorDescriptor:  # specialized on dtype and block shape (a pre_hook's: per config)
                add(_TensorDescriptor)
                add(a.base.dtype)
                add(getattr(a, "padding", None))
                if self.pre_hook is None:
                    add(tuple(a.block_shape))
            else:
                launch(self.kernel, grid, *args, **consts)
                return
        if self.key_pos:
            n = len(args)
            for i, name in self.key_pos:
                add(args[i] if i < n else consts.get(name))
        key_t = tuple(key)
        hit = self._cache.get(key_t)
        if hit is None:
            self._first(key_t, grid, args, consts)
            return
        run, function, packed, tail, meta = hit
        if self.pre_hook is not None:
            nargs = dict(zip(self.names, args))
            nargs.update(meta)
            self.pre_hook(nargs)
        g = grid(meta) if callable(grid) else grid
        try:
            run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1,
                torch._C._cuda_getCurrentRawStream(device), function, packed, None, None, None, *args, *tail)
        except TypeError:  # a Triton whose launcher takes other arguments (refused before launching)
            self.enabled = False
            launch(self.kernel, grid, *args, **consts)

    def _first(self, key: tuple, grid: Any, args: Sequence[Any], consts: dict) -> None:
        compiled = launch(self.kernel, grid, *args, **consts)
        meta = dict(consts)
        if self.tuner is not None:
            meta.update(self.tuner.best_config.kwargs)
        rest = self.names[len(args):]
        if compiled is None or any(name not in meta for name in rest):
            return  # a parameter left to its default: keep Triton's path for this specialization
        try:
            self._cache[key] = (compiled.run, compiled.function, compiled.packed_metadata,
                                tuple(meta[name] for name in rest), meta)
        except AttributeError:  # pragma: no cover - a Triton without these fields
            self.enabled = False


class _NoGrads:
    """``needs_input_grad`` of a call with no gradients: False at every index."""

    def __getitem__(self, index: int) -> bool:
        return False


class _NoGradCtx:
    """Stands in for autograd's ctx when nothing needs a gradient: the forward's bookkeeping is dropped."""

    needs_input_grad = _NoGrads()

    def save_for_backward(self, *tensors: Any) -> None:
        pass


def apply(fn: Any, *args: Any) -> Any:
    """``fn.apply(*args)`` for an autograd.Function; in eager mode with no input needing a gradient (inference,
    ``torch.no_grad``), ``fn.forward`` alone: no autograd node, nothing saved, less host time per call."""
    if torch.compiler.is_compiling() or needs_grad(*args):
        return fn.apply(*args)
    return fn.forward(_NoGradCtx(), *args)


def needs_grad(*args: Any) -> bool:
    """Grad mode is on and a tensor among ``args`` (None and non-tensors skipped) requires grad."""
    if torch.is_grad_enabled():
        for a in args:
            if isinstance(a, torch.Tensor) and a.requires_grad:
                return True
    return False


def once_differentiable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch's ``once_differentiable`` for a backward, minus its cost in the usual case: a backward runs with
    grad mode off (no ``create_graph``), where torch's wrapper only adds a no_grad block; with grad mode on,
    torch's wrapper runs (outputs whose double backward raises)."""
    wrapped = torch.autograd.function.once_differentiable(fn)

    @functools.wraps(fn)
    def backward(ctx: Any, *args: Any) -> Any:
        if torch.is_grad_enabled():
            return wrapped(ctx, *args)
        return fn(ctx, *args)
    return backward


# ---------------------------------------------------------------------------------------------
# Input checks shared by every public op: each failure names the argument and what was expected.

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The reference path (CPU fallback and float64 oracle) also accepts float64.
REFERENCE_DTYPES = FLOAT_DTYPES + (torch.float64,)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: Optional[int] = None,
    min_ndim: Optional[int] = None,
    dtypes: Sequence[torch.dtype] = REFERENCE_DTYPES,
) -> torch.Tensor:
    """Raise TypeError/ValueError unless ``t`` is a tensor of an allowed dtype and rank."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {allowed}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int]) -> None:
    """Raise ValueError unless ``t.shape == expected``."""
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(expected)}")


def flat2d(t: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (M, D), M the product of the leading dims (a view when strides allow); D = 0 too, where
    reshape(-1, 0) is ambiguous."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def rows2d(t: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (M, D) with a unit-stride last dim and one row stride (a view when strides allow, else a copy)."""
    t2 = flat2d(t)
    if t2.stride(-1) != 1 and t2.shape[-1] > 1:
        t2 = t2.contiguous()
    return t2


def row_stride(t2: torch.Tensor) -> int:
    """The row stride of a rows2d() tensor (its width for a single row, whose stride is arbitrary)."""
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    """Raise ValueError unless every given (non-None) tensor lives on one device."""
    device = None
    for v in tensors.values():
        if v is None:
            continue
        if device is None:
            device = v.device
        elif v.device != device:
            where = ", ".join(f"{k} on {t.device}" for k, t in tensors.items() if t is not None)
            raise ValueError(f"all tensors must be on one device, got {where}")


def check_triton_dtypes(**tensors: Optional[torch.Tensor]) -> None:
    """The kernels take fp16/bf16/fp32; float64 runs only on the reference path."""
    for k, v in tensors.items():
        if v is not None and v.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{k} has dtype {v.dtype}; the Triton kernels take float16, bfloat16 or float32")

"""Host overhead: the CPU time one call of each op, and one ViT training step, costs the host.

A fused kernel only pays when the host issues it faster than the GPU runs it: at ViT-S/Ti sizes, and in
every per-op benchmark that times calls one by one, the Python and dispatch cost of a call is the
runtime. This suite measures that cost with the device work made negligible:

  * CUDA: tiny shapes and real launches; ``calls`` back-to-back calls, then one synchronize. Each kernel
    finishes long before the host issues the next, so wall time / calls is the host time per call
    (Triton's launcher included).
  * CPU: the same calls with every Triton launch replaced by a no-op (in the interpreter the launch would
    *be* the work): our Python, torch's dispatch and autograd, allocations; Triton's launcher excluded.
    Needs TRITON_INTERPRET=1 in the environment before flashvit is imported (Triton's kernels are then
    interpreter functions, which is what gets stubbed).

Rows: each op's forward and forward+backward on flashvit's Triton path vs its eager reference (the
baseline), and one training step (forward + backward, no optimizer) of a ViT-B-depth model (12 blocks,
width 64, 32 px) for flashvit and timm + flashvit.patch (every kernel forced; and [auto]: the 'auto' backend's
CUDA decisions, blocks as one node each, [auto,block=off]: per layer), flashvit (eager), timm (the baseline), and
transformers' ViT at the same widths: hf (eager) and hf+flashvit.patch[auto] / [auto,block=off].
``median_ms`` is host milliseconds per call or per step.
"""

from __future__ import annotations

import contextlib
import importlib
import statistics
import time
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch

from flashvit.bench.harness import Job, Row, dtype_name

# Tiny and odd shapes: device time ~ nothing, same calls as at full size.
LN_SHAPE = (2, 17, 64)
LINEAR_SHAPE = (2, 17, 64, 256)  # (B, N, K, N_out)
ATTN_SHAPE = (2, 17, 2, 32)  # (B, N, H, D)
PATCH_SHAPE = (2, 3, 32, 16, 64)  # (B, C, img, p, D)
MODEL_KW = dict(img_size=32, embed_dim=64, num_heads=4)  # ViT-B's 12 blocks, tiny width
MODEL_NAME = "vit_base_patch16_224"
MODEL_BATCH = 2


def launches_stubbed(device: torch.device) -> bool:
    return device.type != "cuda"


def unavailable(device: torch.device) -> str:
    """Why the flashvit (Triton) rows cannot run here ('' when they can)."""
    from flashvit.kernels import _dispatch
    if not _dispatch.HAS_TRITON:
        return "triton is not importable"
    if device.type != "cuda" and not _dispatch.INTERPRET:
        return "CPU needs TRITON_INTERPRET=1 in the environment (the launches are stubbed there)"
    return ""


@contextlib.contextmanager
def stub_launches(device: torch.device) -> Iterator[None]:
    """On CPU, make every interpreted Triton launch a no-op (outputs stay uninitialized), one torch thread."""
    if not launches_stubbed(device):
        yield
        return
    from triton.runtime.interpreter import InterpretedFunction
    run, threads = InterpretedFunction.run, torch.get_num_threads()
    InterpretedFunction.run = lambda self, *args, **kwargs: None
    torch.set_num_threads(1)  # tiny eager CPU ops: thread-pool wake-ups would be noise, not dispatch cost
    try:
        yield
    finally:
        InterpretedFunction.run = run
        torch.set_num_threads(threads)


def host_time(fn: Callable[[], Any], device: torch.device, calls: int, reps: int) -> Tuple[float, float, float]:
    """(median, p20, p80) host ms per call over ``reps`` batches of ``calls`` back-to-back calls."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        fn()
    sync()
    per_call: List[float] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        per_call.append((time.perf_counter() - t0) * 1e3 / calls)
    per_call.sort()
    q = statistics.quantiles(per_call, n=10, method="inclusive") if len(per_call) > 1 else per_call * 9
    return statistics.median(per_call), q[1], q[7]


# ---------------------------------------------------------------------------------------------
# Op rows


def _op_cases(device: torch.device, dtype: torch.dtype) -> List[Tuple[str, str, Callable[[str], Callable], list]]:
    """[(op, shape str, forward(backend) -> fn(*inputs), inputs)]; inputs that take grads have requires_grad."""
    from flashvit import kernels as K

    def t(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    B, N, D = LN_SHAPE
    _, _, Kd, No = LINEAR_SHAPE
    aB, aN, aH, aD = ATTN_SHAPE
    pB, pC, img, p, pD = PATCH_SHAPE
    L = (img // p) ** 2
    return [
        ("layer_norm", f"x={B}x{N}x{D}", lambda be: lambda x, w, b: K.layer_norm(x, w, b, 1e-6, backend=be),
         [t(B, N, D), t(D), t(D)]),
        ("add_layer_norm", f"x={B}x{N}x{D}",
         lambda be: lambda x, r, w, b: K.add_layer_norm(x, r, w, b, 1e-6, backend=be), [t(B, N, D), t(B, N, D), t(D), t(D)]),
        ("linear+gelu", f"x={B}x{N}x{Kd},out={No}",
         lambda be: lambda x, w, b: K.linear(x, w, b, activation="gelu", backend=be), [t(B, N, Kd), t(No, Kd), t(No)]),
        ("linear+residual", f"x={B}x{N}x{No},out={Kd}",
         lambda be: lambda x, w, b, r: K.linear(x, w, b, residual=r, backend=be),
         [t(B, N, No), t(Kd, No), t(Kd), t(B, N, Kd)]),
        ("qkv_attention", f"B={aB},N={aN},H={aH},D={aD}",
         lambda be: lambda qkv: K.qkv_attention(qkv, aH, backend=be), [t(aB, aN, 3 * aH * aD)]),
        ("qkv_attention+rope", f"B={aB},N={aN},H={aH},D={aD},prefix=1",  # EVA-02 / DINOv3: the rope pass each way
         lambda be: lambda qkv, rope: K.qkv_attention(qkv, aH, rope=rope, rope_prefix=1, backend=be),
         [t(aB, aN, 3 * aH * aD), t(aN - 1, 2 * aD, grad=False)]),
        ("patch_embed", f"B={pB},img={img},p={p},D={pD}",
         lambda be: lambda im, w, b, pos, cls: K.patch_embed(im, w, b, pos, cls, backend=be),
         [t(pB, pC, img, img, grad=False), t(pD, pC, p, p), t(pD), t(1, L + 1, pD), t(1, 1, pD)]),
    ]


def _op_step(fwd: Callable, inputs: list, mode: str) -> Callable[[], Any]:
    if mode == "fwd":
        def step() -> Any:
            with torch.no_grad():
                return fwd(*inputs)
        return step
    leaves = [x for x in inputs if x.requires_grad]

    def step() -> Any:
        out = fwd(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward([o for o in outs], [torch.ones_like(o) for o in outs])
        for x in leaves:
            x.grad = None
    return step


def _run_op(fwd: Callable, inputs: list, mode: str, device: torch.device, calls: int, reps: int
            ) -> Callable[[Row], None]:
    def run(row: Row) -> None:
        with stub_launches(device):
            row.median_ms, row.p20_ms, row.p80_ms = host_time(_op_step(fwd, inputs, mode), device, calls, reps)
    return run


# ---------------------------------------------------------------------------------------------
# Model rows


# The train-step rows: flashvit / timm+flashvit.patch with every kernel forced ('triton'), flashvit-eager and timm
# (PyTorch), and IMPL[auto] / IMPL[auto,block=off]: the 'auto' backend as it decides on CUDA (on CPU emulated:
# emulate_cuda_auto), the blocks as one autograd node each (kernels/block.py) or per layer; hf: transformers' ViT
# (the same widths, eager) and patched.
MODEL_IMPLS = ("flashvit", "flashvit[auto]", "flashvit[auto,block=off]", "flashvit-eager", "timm",
               "timm+flashvit.patch", "timm+flashvit.patch[auto]", "timm+flashvit.patch[auto,block=off]", "hf",
               "hf+flashvit.patch[auto]", "hf+flashvit.patch[auto,block=off]")


def _build(impl: str, device: torch.device, dtype: torch.dtype) -> Optional[torch.nn.Module]:
    import flashvit
    with torch.device(device):
        if impl.startswith("flashvit"):
            m = flashvit.create_model(MODEL_NAME, **MODEL_KW)
        elif impl.startswith("hf"):
            from flashvit.bench.model import hf_vit
            m = hf_vit(MODEL_KW["embed_dim"], 12, MODEL_KW["num_heads"], MODEL_KW["img_size"], 16)
            if impl.startswith("hf+flashvit.patch"):
                flashvit.patch(m.model)
        else:
            import timm
            m = timm.create_model(MODEL_NAME, pretrained=False, **MODEL_KW)
            if impl.startswith("timm+flashvit.patch"):
                m = flashvit.patch(m)
    return m.to(dtype).train()


def _run_model(impl: str, device: torch.device, dtype: torch.dtype, calls: int, reps: int) -> Callable[[Row], None]:
    import flashvit
    from flashvit.kernels._dispatch import emulate_cuda_auto
    from flashvit.kernels.block import use_fused_block
    auto = "[auto" in impl
    backend = "torch" if impl in ("flashvit-eager", "timm", "hf") else "auto" if auto else "triton"

    def run(row: Row) -> None:
        model = _build(impl, device, dtype)
        x = torch.randn(MODEL_BATCH, 3, MODEL_KW["img_size"], MODEL_KW["img_size"], device=device, dtype=dtype)

        def step() -> None:
            with flashvit.use_backend(backend):
                model(x).float().sum().backward()
            model.zero_grad(set_to_none=True)

        with stub_launches(device), contextlib.ExitStack() as stack:
            if auto:
                stack.enter_context(emulate_cuda_auto())
            if "block=off" in impl:
                stack.enter_context(use_fused_block(False))
            row.median_ms, row.p20_ms, row.p80_ms = host_time(step, device, calls, reps)
    return run


def overhead_jobs(device: torch.device, dtype: torch.dtype, quick: bool) -> List[Job]:
    """Op rows (flashvit then eager per op and mode), then the model train-step rows."""
    why = unavailable(device)
    calls, reps = (20, 5) if quick else (200, 15)
    note = "host ms per call; Triton launches stubbed (CPU)" if launches_stubbed(device) else "host ms per call"
    jobs: List[Job] = []
    for op, shape, forward, inputs in _op_cases(device, dtype):
        for mode in ("fwd", "fwd+bwd"):
            for impl, be in (("flashvit", "triton"), ("eager", "torch")):
                row = Row("overhead", op, {"shape": shape}, dtype_name(dtype), mode, impl, baseline=impl == "eager",
                          note=note)
                jobs.append(Job(row, _run_op(forward(be), inputs, mode, device, calls, reps),
                                unavailable=why if impl == "flashvit" else ""))
    missing = {}
    for lib in ("timm", "transformers"):
        try:
            importlib.import_module(lib)
        except Exception:
            missing[lib] = f"{lib} is not installed"
    mcalls, mreps = (2, 3) if quick else (10, 9)
    shape = {"model": "vit_b depth, width 64", "batch": MODEL_BATCH, "img": MODEL_KW["img_size"]}
    for impl in MODEL_IMPLS:
        row = Row("overhead", "vit train step", dict(shape), dtype_name(dtype), "train", impl, baseline=impl == "timm",
                  note=note.replace("per call", "per step"))
        lib = "timm" if "timm" in impl else "transformers" if impl.startswith("hf") else ""
        un = (why if impl not in ("flashvit-eager", "timm", "hf") else "") or missing.get(lib, "")
        jobs.append(Job(row, _run_model(impl, device, dtype, mcalls, mreps), unavailable=un))
    return jobs

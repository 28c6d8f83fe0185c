"""Where the host time of a call goes, and which GPU kernels a fused op runs: a diagnostic for a GPU machine.

    python -m flashvit.bench.profile_host OUTDIR [--calls 300]

Writes, per op of bench/overhead.py (tiny shapes, fwd+bwd on the Triton path):
  * OUTDIR/host_<op>.txt      cProfile of ``calls`` calls, the top functions by own time and by cumulative time;
  * OUTDIR/launch.txt         host microseconds per launch of one LayerNorm forward kernel: through the
                              autotuner, the bare JIT function, and flashvit's Launcher;
  * OUTDIR/launch_gemm.txt    host microseconds per linear + GELU call without autograd on each GEMM path
                              (the TMA one encodes four tensor descriptors per launch) and in eager PyTorch;
  * OUTDIR/kernels.txt        torch.profiler's CUDA kernel table for the MLP (cuBLAS and hybrid GEMM paths)
                              and LayerNorm at ViT-B size, flashvit vs eager (device time per kernel).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
from typing import Callable

import torch


def _per_call_us(fn: Callable[[], object], calls: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / calls


def host_profiles(out: str, calls: int) -> None:
    from flashvit.bench.overhead import _op_cases, _op_step
    dev, dt = torch.device("cuda"), torch.bfloat16
    for op, shape, forward, inputs in _op_cases(dev, dt):
        step = _op_step(forward("triton"), inputs, "fwd+bwd" if op != "patch_embed" else "fwd")
        eager = _op_step(forward("torch"), inputs, "fwd+bwd" if op != "patch_embed" else "fwd")
        us, us_eager = _per_call_us(step, calls), _per_call_us(eager, calls)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
        prof.disable()
        s = io.StringIO()
        s.write(f"{op} [{shape}] fwd+bwd, {calls} calls: flashvit {us:.1f} us/call, eager {us_eager:.1f} us/call\n")
        for key in ("tottime", "cumulative"):
            s.write(f"\n--- by {key} ---\n")
            pstats.Stats(prof, stream=s).sort_stats(key).print_stats(30)
        with open(os.path.join(out, f"host_{op.replace('+', '_')}.txt"), "w") as f:
            f.write(s.getvalue())
        print(f"{op}: flashvit {us:.1f} us/call, eager {us_eager:.1f} us/call", flush=True)


def launch_costs(out: str, calls: int) -> None:
    from flashvit.kernels import layernorm as L
    from flashvit.kernels._dispatch import launch
    x = torch.randn(2 * 17, 64, device="cuda", dtype=torch.bfloat16)
    w, b = torch.ones(64, device="cuda", dtype=torch.bfloat16), torch.zeros(64, device="cuda", dtype=torch.bfloat16)
    y, mean, rstd = torch.empty_like(x), torch.empty(34, device="cuda"), torch.empty(34, device="cuda")
    m, d = x.shape
    block_n, rows, warps, _ = L._config(d)
    args = (x, x, w, b, y, y, mean, rstd, m, d, d, d, d, d, 1e-5)
    lines = []

    def grid(meta):
        return (L.cdiv(m, meta["ROWS"]),)

    def tuned():  # Triton's own path: the autotuner, then JITFunction.run
        return launch(L._ln_fwd_tuned.kernel, grid, *args, BLOCK_N=block_n, HAS_RES=False)

    def bare():
        return launch(L._ln_fwd_kernel, (L.cdiv(m, rows),), *args, BLOCK_N=block_n, ROWS=rows, HAS_RES=False,
                      num_warps=warps, num_stages=1)

    def launcher():  # flashvit's Launcher (kernels/_dispatch.py): the compiled kernel's own launcher
        L._ln_fwd_tuned(grid, args, dict(BLOCK_N=block_n, HAS_RES=False))

    def empty4():
        torch.empty((m, d), device="cuda", dtype=torch.bfloat16)
        torch.empty((m, d), device="cuda", dtype=torch.bfloat16)
        torch.empty((m,), device="cuda")
        torch.empty((m,), device="cuda")

    def torch_ln():
        torch.nn.functional.layer_norm(x, (d,), w, b, 1e-5)
    for name, fn in (("autotuned wrapper", tuned), ("bare JIT function", bare), ("flashvit Launcher", launcher),
                     ("4x torch.empty", empty4), ("torch layer_norm", torch_ln)):
        lines.append(f"{name:24s} {_per_call_us(fn, calls * 5):8.2f} us/call")
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    with open(os.path.join(out, "launch.txt"), "w") as f:
        f.write(text)


def gemm_launch_costs(out: str, calls: int) -> None:
    """Host time of one fused linear call per GEMM path, tiny shape (device work negligible); a line is written
    as soon as it is measured (a step timeout keeps the lines before it)."""
    import importlib

    import torch.nn.functional as F
    lin = importlib.import_module("flashvit.kernels.linear")
    x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16), torch.randn(256, device="cuda", dtype=torch.bfloat16)
    path = os.path.join(out, "launch_gemm.txt")
    open(path, "w").close()

    def line(text: str) -> None:
        print(text, flush=True)
        with open(path, "a") as f:
            f.write(text + "\n")

    def fused(gemm: str) -> Callable[[], object]:
        return lambda: lin.linear(x, w, b, "gelu", backend="triton", gemm=gemm)

    def descriptors() -> None:
        for t in (x, w, x, x):
            lin._desc(t)
    cases = [("eager F.linear + F.gelu", lambda: F.gelu(F.linear(x, w, b))), ("gemm=cublas", fused("cublas")),
             ("gemm=triton", fused("triton"))]
    if lin._arch(x.device) >= 90 and lin.TensorDescriptor is not None:
        cases += [("gemm=tma", fused("tma")), ("4x TensorDescriptor", descriptors)]
    else:
        line("gemm=tma: not measured (needs sm_90 and Triton's TensorDescriptor)")
    lin.set_autotune(True)  # the autotuned kernels' Launchers, as the model rows use them (autotune off: Triton's path)
    try:
        with torch.no_grad():
            for name, fn in cases:
                line(f"{name:26s} {_per_call_us(fn, calls):8.2f} us/call  (x 128x256, w 256x256, bf16, no grad)")
    finally:
        tma = getattr(lin, "_GEMM_TMA_TUNED", None)
        if tma is not None:  # did its launches take the Launcher's fast path (a cached specialization)?
            line(f"TMA Launcher: fast path {'on' if tma.enabled else 'off'}, {len(tma._cache)} cached specializations")


def kernel_tables(out: str) -> None:
    """torch.profiler's kernel table per case (device time per kernel), each appended to kernels.txt as soon as
    it is measured: the fused MLP (fc1 + GELU, fc2 + residual) fwd+bwd on the cuBLAS and hybrid (TMA epilogue)
    GEMM paths and eager, then LayerNorm at D = 384 on the kernels and eager."""
    import importlib

    from torch.profiler import ProfilerActivity, profile

    from flashvit import kernels as K
    lin = importlib.import_module("flashvit.kernels.linear")
    dt = torch.bfloat16
    M, D, Hd = 256 * 197, 768, 3072

    def t(*shape):
        return torch.randn(*shape, device="cuda", dtype=dt).requires_grad_(True)
    x, w1, b1, w2, b2 = t(M, D), t(Hd, D) * 0.02, t(Hd), t(D, Hd) * 0.02, t(D)
    w1, w2 = w1.detach().requires_grad_(True), w2.detach().requires_grad_(True)
    xl, lw, lb = t(M, 384), t(384), t(384)

    def mlp(be: str, gemm: str) -> Callable[[], torch.Tensor]:
        return lambda: K.mlp(x, w1, b1, w2, b2, "gelu", residual=x, backend=be, gemm=gemm or None)

    def ln(be: str) -> Callable[[], torch.Tensor]:
        return lambda: K.layer_norm(xl, lw, lb, 1e-6, backend=be)
    cases = [("mlp", "gemm=cublas", mlp("triton", "cublas")), ("mlp", "gemm=hybrid", mlp("triton", "hybrid")),
             ("mlp", "eager", mlp("torch", "")), ("layer_norm D=384", "triton", ln("triton")),
             ("layer_norm D=384", "eager", ln("torch"))]
    path = os.path.join(out, "kernels.txt")
    open(path, "w").close()
    lin.set_autotune(False)  # the GEMMs' first config: no autotuning inside this step's budget
    try:
        for name, label, f in cases:
            for _ in range(3):
                f().sum().backward()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
                for _ in range(5):
                    f().sum().backward()
                torch.cuda.synchronize()
            text = (f"\n===== {name} fwd+bwd, {label}, 5 steps =====\n"
                    + p.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
            with open(path, "a") as fh:
                fh.write(text)
            print(text[:3000], flush=True)
    finally:
        lin.set_autotune(True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--calls", type=int, default=300)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if not torch.cuda.is_available():
        raise SystemExit("profile_host needs a CUDA GPU")
    import triton
    with open(os.path.join(a.out, "env.txt"), "w") as f:
        f.write(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
                f"commit {os.environ.get('FLASHVIT_GIT_COMMIT', 'unknown')} {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
    launch_costs(a.out, a.calls)
    gemm_launch_costs(a.out, a.calls)
    kernel_tables(a.out)  # before the cProfile tables: run 6's step budget ended inside those
    host_profiles(a.out, a.calls)


if __name__ == "__main__":
    main()

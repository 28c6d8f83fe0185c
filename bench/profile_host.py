"""Where the host time of a call goes, and which GPU kernels a fused op runs: a diagnostic for a GPU machine.

    python -m flashvit.bench.profile_host OUTDIR [--calls 300]

(``step_timeline`` / ``profile_steps`` below: where a whole training step's time goes on the GPU, for the model
benchmark's ``--profile-steps``.)

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
from typing import Any, Callable, Dict, List, Sequence, Tuple

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
    args = (x, x, w, b, y, y, mean, rstd, mean, m, d, d, d, d, d, 1e-5, 1)  # (S: mean, a placeholder; T = 1)
    consts = dict(BLOCK_N=block_n, BLOCK_N2=0, HAS_RES=False, HAS_SCALE=False, PIPE=0, TILES=1)  # one tile a program
    lines = []

    def grid(meta):
        return (L.cdiv(m, meta["ROWS"]),)

    def tuned():  # Triton's own path: the autotuner, then JITFunction.run
        return launch(L._ln_fwd_tuned.kernel, grid, *args, **consts)

    def bare():
        return launch(L._ln_fwd_kernel, (L.cdiv(m, rows),), *args, ROWS=rows, num_warps=warps, num_stages=1,
                      **consts)

    def launcher():  # flashvit's Launcher (kernels/_dispatch.py): the compiled kernel's own launcher
        L._ln_fwd_tuned(grid, args, consts)

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


# ---------------------------------------------------------------------------------------------
# Whole steps: the GPU's busy time, its idle gaps, and the host calls that wait for the device

# CUDA runtime / driver calls during which the host may wait for the device (synchronizations, blocking copies,
# allocations outside the caching allocator's pool): a step that makes them cannot run ahead of the GPU.
BLOCKING_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                  "cudaMalloc", "cudaFree", "cudaHostAlloc", "cudaMallocHost", "cuCtxSynchronize",
                  "cuStreamSynchronize", "cuEventSynchronize", "cuMemAlloc", "cuMemFree", "cuMemcpy")
GAP_EDGES_US = (10.0, 100.0)  # idle gaps: launch latency | the host a little behind | far behind (or waiting)
GAP_LABELS = ("<10us", "10-100us", ">=100us")


def step_timeline(device_events: Sequence[Tuple[float, float, str]], host_calls: Sequence[Tuple[float, float, str]],
                  windows: Sequence[Tuple[float, float]], top: int = 10) -> Dict[str, Any]:
    """Where the time of the steps in ``windows`` went on the device, per step (ms unless named otherwise).

    ``device_events``: (start_us, end_us, name) of the kernels, copies and fills; ``host_calls``: (start_us,
    duration_us, name) of the CUDA runtime / driver calls; ``windows``: (start_us, end_us) of each step, every step
    ending with a synchronize (as the model benchmark times it); one clock for all three. An event belongs to the
    window its start falls in. Per step: wall; busy (the union of the device intervals); idle = wall - busy, as the
    ramp (step start to its first device event: the host has issued nothing yet), the gaps between device events
    by size (GAP_LABELS) and the tail (last event to the step's end); the device events and the host's launch
    calls; the blocking calls (BLOCKING_CALLS, by prefix: cudaMemcpyAsync too, as a copy from or to pageable memory waits:
    its time says whether it did);
    the ``top`` largest gaps (µs, the events before and after); device time by event name (top 15).
    """
    n = max(len(windows), 1)
    busy = ramp = tail = wall = 0.0
    gap_ms = [0.0] * len(GAP_LABELS)
    gap_n = [0] * len(GAP_LABELS)
    gaps: List[Tuple[float, str, str]] = []
    by_name: Dict[str, List[float]] = {}
    events = 0
    for w0, w1 in windows:
        wall += w1 - w0
        evs = sorted(e for e in device_events if w0 <= e[0] < w1)
        events += len(evs)
        if not evs:
            ramp += w1 - w0
            continue
        ramp += evs[0][0] - w0
        end, last = evs[0][1], evs[0][2]
        busy += evs[0][1] - evs[0][0]
        for s, e, name in evs[1:]:
            if s > end:  # an idle gap
                g = s - end
                k = sum(g >= edge for edge in GAP_EDGES_US)
                gap_ms[k] += g
                gap_n[k] += 1
                gaps.append((g, last, name))
                busy += e - s
            elif e > end:
                busy += e - end
            if e >= end:
                end, last = e, name
        tail += max(w1 - end, 0.0)
    for s, e, name in device_events:
        if any(w0 <= s < w1 for w0, w1 in windows):
            acc = by_name.setdefault(name, [0, 0.0])
            acc[0] += 1
            acc[1] += e - s
    blocking: Dict[str, List[float]] = {}
    launches = 0
    for s, d, name in host_calls:
        if not any(w0 <= s < w1 for w0, w1 in windows):
            continue
        launches += "LaunchKernel" in name
        if name.startswith(BLOCKING_CALLS):
            acc = blocking.setdefault(name, [0, 0.0])
            acc[0] += 1
            acc[1] += d
    gaps.sort(key=lambda g: -g[0])
    ms = 1e-3 / n
    return {
        "steps": len(windows), "wall_ms": wall * ms, "busy_ms": busy * ms,
        "busy_pct": 100.0 * busy / wall if wall > 0 else 0.0, "ramp_ms": ramp * ms, "tail_ms": tail * ms,
        "gap_ms": dict(zip(GAP_LABELS, (g * ms for g in gap_ms))), "gaps": dict(zip(GAP_LABELS, (g / n for g in gap_n))),
        "device_events": events / n, "launch_calls": launches / n,
        "blocking": {k: (c / n, t * ms) for k, (c, t) in sorted(blocking.items(), key=lambda kv: -kv[1][1])},
        "top_gaps": gaps[:top],
        "by_name": sorted(((k, c / n, t * ms) for k, (c, t) in by_name.items()), key=lambda r: -r[2])[:15],
    }


def timeline_note(t: Dict[str, Any]) -> str:
    """One line of ``step_timeline``'s result for a benchmark row's note."""
    gaps = ", ".join(f"{t['gap_ms'][k]:.2f} ms in {t['gaps'][k]:.1f} gaps {k}" for k in GAP_LABELS)
    blocking = sum(c for c, _ in t["blocking"].values())
    return (f"profiled {t['steps']} steps: device busy {t['busy_pct']:.1f}% of {t['wall_ms']:.2f} ms/step; idle: ramp "
            f"{t['ramp_ms']:.2f} ms, {gaps}, tail {t['tail_ms']:.2f} ms; {t['device_events']:.0f} device events, "
            f"{t['launch_calls']:.0f} launch calls, {blocking:.1f} blocking calls a step")


def timeline_text(title: str, t: Dict[str, Any]) -> str:
    """``step_timeline``'s result as a report."""
    lines = [title, timeline_note(t), "", "blocking host calls a step (count, ms):"]
    lines += [f"  {k:40s} {c:8.1f} {ms:9.3f}" for k, (c, ms) in t["blocking"].items()] or ["  none"]
    lines += ["", "largest idle gaps (us, device event before -> after):"]
    lines += [f"  {g:9.1f}  {a[:70]} -> {b[:70]}" for g, a, b in t["top_gaps"]] or ["  none"]
    lines += ["", "device time a step by event (count, ms):"]
    lines += [f"  {c:7.1f} {ms:9.3f}  {k[:110]}" for k, c, ms in t["by_name"]]
    return "\n".join(lines) + "\n"


def profile_steps(step: Callable[[], Any], device: torch.device, steps: int = 3) -> Dict[str, Any]:
    """Run ``step`` ``steps`` times under torch.profiler (CPU + CUDA), each step ending with a synchronize as the
    model benchmark times it, and return ``step_timeline`` of them (on CPU: no device events, busy 0%)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            with record_function("flashvit.step"):
                step()
                sync()
    dev_events, host_calls, windows = [], [], []
    for e in prof.events():
        r = e.time_range
        if e.device_type == DeviceType.CUDA:  # kernels, copies, fills (not the ranges record_function marks there)
            if not getattr(e, "is_user_annotation", False) and e.name != "flashvit.step":
                dev_events.append((float(r.start), float(r.end), e.name))
        elif e.name == "flashvit.step":
            windows.append((float(r.start), float(r.end)))
        elif e.name.startswith(("cuda", "cu")):
            host_calls.append((float(r.start), float(r.end - r.start), e.name))
    windows.sort()
    return step_timeline(dev_events, host_calls, windows)


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

"""The benchmark harness: environment, measured ceilings, timers, robust budgeted rows, and outputs.

A benchmark is a list of :class:`Job` s, each filling one :class:`Row`. The :class:`Runner` runs them in
order under a time budget: a job that raises records the error in its row and the run goes on; once the
budget is spent the remaining rows are marked ``skipped``. After every row the JSON and CSV files are
rewritten, so a run killed from outside still leaves its finished rows on disk (unfinished ones read
``pending``).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as _dt
import gc
import io
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

SCHEMA = "flashvit-bench/1"
STATUSES = ("ok", "error", "unavailable", "skipped", "pending")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


# ---------------------------------------------------------------------------------------------
# Rows and jobs


@dataclasses.dataclass
class Row:
    """One measured configuration; ``baseline`` marks the row its group's speedups are relative to."""

    suite: str  # "ops" | "model"
    name: str  # op family or model name
    shape: Dict[str, Any]
    dtype: str
    mode: str  # "fwd" | "fwd+bwd" | "infer" | "train"
    impl: str
    baseline: bool = False
    status: str = "pending"
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    flops: Optional[float] = None  # per call (ops) or per image (model)
    bytes: Optional[float] = None  # minimal memory traffic per call (memory-bound ops)
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    pct_ceiling: Optional[float] = None  # % of the measured matmul TFLOP/s or copy GB/s
    speedup: Optional[float] = None  # baseline median / this median, same group
    img_per_s: Optional[float] = None
    mfu: Optional[float] = None  # % of the measured bf16 matmul ceiling
    peak_mem_mb: Optional[float] = None
    seconds: Optional[float] = None  # wall time the row took (setup, compile, timing)
    note: str = ""
    error: str = ""

    def shape_str(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.shape.items())

    def group(self) -> Tuple[str, str, str, str]:
        return (self.suite, self.name, self.shape_str(), self.mode)


@dataclasses.dataclass
class Job:
    """How to fill a row: ``run(row)`` sets the medians; ``unavailable`` (a reason) skips it up front."""

    row: Row
    run: Optional[Callable[[Row], None]] = None
    unavailable: str = ""
    min_s: float = 0.0  # do not start with less budget than this (e.g. torch.compile rows)


class RowTimeout(Exception):
    pass


class Unavailable(Exception):
    """Raised by a job when its implementation cannot run here (e.g. no SDPA kernel for these inputs)."""


UNAVAILABLE_MESSAGES = ("No viable backend for scaled_dot_product_attention", "No available kernel")


@contextlib.contextmanager
def deadline(seconds: Optional[float]) -> Iterator[None]:
    """Raise RowTimeout in the main thread after ``seconds`` (Unix); a no-op elsewhere."""
    usable = (seconds is not None and seconds > 0 and hasattr(signal, "setitimer")
              and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None))
    try:
        import threading
        usable = usable and threading.current_thread() is threading.main_thread()
    except Exception:  # pragma: no cover
        usable = False
    if not usable:
        yield
        return

    def _fire(signum, frame):
        raise RowTimeout(f"row ran past the budget (+grace) of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, _fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Budget:
    """Seconds left before ``deadline``; ``None`` means no limit."""

    def __init__(self, seconds: Optional[float], start: Optional[float] = None) -> None:
        self.start = time.monotonic() if start is None else start
        self.seconds = seconds

    def remaining(self) -> float:
        if self.seconds is None:
            return math.inf
        return self.seconds - (time.monotonic() - self.start)

    def grace(self) -> float:
        return 30.0 if self.seconds is None else min(30.0, max(5.0, 0.15 * self.seconds))


# ---------------------------------------------------------------------------------------------
# Environment and ceilings


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:
        return None


def _driver_version() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except Exception:
        return None


def _version(mod: str) -> Optional[str]:
    try:
        m = __import__(mod)
        return str(getattr(m, "__version__", "unknown"))
    except Exception:
        return None


def environment(device: torch.device) -> Dict[str, Any]:
    """Device, driver, versions and git commit, recorded in every result file."""
    env: Dict[str, Any] = {
        "device": device.type,
        "device_name": platform.processor() or platform.machine(),
        "driver": None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "flash_attn": _version("flash_attn"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "flashvit_backend_env": os.environ.get("FLASHVIT_BACKEND"),
        "flashvit_gemm_env": os.environ.get("FLASHVIT_GEMM"),
    }
    try:
        import flashvit
        env["flashvit"] = flashvit.__version__
        env["flashvit_has_triton"] = bool(flashvit.HAS_TRITON)
    except Exception as e:  # pragma: no cover - the CLI imports flashvit anyway
        env["flashvit"] = f"import failed: {e}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=torch.cuda.get_device_name(device), driver=_driver_version(),
                   capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                   memory_gb=round(props.total_memory / 2**30, 1),
                   l2_bytes=getattr(props, "L2_cache_size", None))
    commit = os.environ.get("FLASHVIT_GIT_COMMIT") or _git("rev-parse", "HEAD")
    env["git_commit"] = commit or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    env["git_dirty"] = None if status is None else bool(status)
    return env


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


TIMERS = ("flush", "graph")


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside a timing (a collection mid-loop lands in one sample: run 5's model
    rows were bimodal, p20 to median up to 12% apart); collected once before."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def time_fn(fn: Callable[[], Any], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100,
            timer: str = "flush") -> Tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn()``, cyclic GC paused.

    CUDA, ``timer="flush"``: ``triton.testing.do_bench`` (it flushes L2 between calls and times each call
    with CUDA events; the host's time to issue a call counts wherever it exceeds the GPU's), else CUDA
    events here. CUDA, ``timer="graph"``: device time only, from a CUDA graph of back-to-back calls
    (``_time_cuda_graph``). CPU: wall clock per call after a warm-up, for about ``rep_ms``.
    """
    if timer not in TIMERS:
        raise ValueError(f"unknown timer {timer!r}; expected one of {TIMERS}")
    with _gc_paused():
        return _time_fn(fn, device, warmup_ms, rep_ms, timer)


def _time_fn(fn: Callable[[], Any], device: torch.device, warmup_ms: float, rep_ms: float,
             timer: str) -> Tuple[float, float, float]:
    if device.type == "cuda" and timer == "graph":
        return _time_cuda_graph(fn, device, warmup_ms, rep_ms)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except Exception:
            do_bench = None
        if do_bench is not None:
            q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
            return float(q[0]), float(q[1]), float(q[2])
        return _time_cuda_events(fn, device, warmup_ms, rep_ms)
    fn()
    t_end = time.perf_counter() + warmup_ms / 1e3
    while time.perf_counter() < t_end:
        fn()
    times: List[float] = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def _quantiles(times_ms: Sequence[float]) -> Tuple[float, float, float]:
    s = sorted(times_ms)

    def q(p: float) -> float:
        return s[min(len(s) - 1, max(0, int(round(p * (len(s) - 1)))))]

    return float(statistics.median(s)), q(0.2), q(0.8)


def _time_cuda_graph(fn: Callable[[], Any], device: torch.device, warmup_ms: float, rep_ms: float,
                     replays: int = 10) -> Tuple[float, float, float]:
    """Device milliseconds per ``fn()``: n calls captured in one CUDA graph, replayed ``replays`` times.

    No host time at all (what a kernel costs once the host keeps ahead, as in a model step), and no L2
    flush between the calls (inputs over the L2 size, 50 MB on an H100, stream from memory anyway).
    A call that cannot be captured (a host sync, a CPU tensor) raises, and the row reads error.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up (compile, autotune, allocator) on the stream capture will use
        fn()
        t_end = time.perf_counter() + warmup_ms / 1e3
        while time.perf_counter() < t_end:
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
    torch.cuda.current_stream(device).wait_stream(side)
    sync(device)
    est = max(start.elapsed_time(end) / 5, 1e-3)
    n = max(1, min(500, int(rep_ms / replays / est)))
    graph = torch.cuda.CUDAGraph()
    # Captured on the warm-up's stream, and autograd told to use the capturing stream where a node still
    # names another one (Torch >= 2.12): a backward's wait on a stream outside the capture invalidates it
    # (seen on an H100 with torch 2.11: LayerNorm fwd+bwd rows, bench/results/2026-11-26-h100-run4-graph).
    override = getattr(torch.autograd.graph, "set_override_stale_capture_stream", None)
    try:
        if override is not None:
            override(True)
        with torch.cuda.graph(graph, stream=side):
            for _ in range(n):
                fn()
    except Exception:
        _reset_rng_after_failed_capture(device)
        raise
    finally:
        if override is not None:
            override(False)
    graph.replay()
    sync(device)
    times: List[float] = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        sync(device)
        times.append(start.elapsed_time(end) / n)
    del graph
    return _quantiles(times)


def _reset_rng_after_failed_capture(device: torch.device) -> None:
    """A capture that fails leaves the CUDA generator marked as capturing, and every later ``torch.randn`` on
    the device raises ("Offset increment outside graph capture"): give it a copy of its state, unmarked."""
    try:
        gen = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
        gen.graphsafe_set_state(gen.clone_state())
    except Exception:  # pragma: no cover - a torch without graph-safe generator states
        pass


def _time_cuda_events(fn: Callable[[], Any], device: torch.device, warmup_ms: float, rep_ms: float,
                      ) -> Tuple[float, float, float]:
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    est = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    n = max(3, min(1000, int(rep_ms / est)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        starts[i].record()
        fn()
        ends[i].record()
    sync(device)
    return _quantiles([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> Tuple[float, float, float]:
    """(median, p20, p80) milliseconds per ``step()`` over ``iters`` steps after ``warmup`` steps, cyclic GC
    paused."""
    with _gc_paused():
        return _time_steps(step, device, warmup, iters)


def _time_steps(step: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> Tuple[float, float, float]:
    for _ in range(warmup):
        step()
    sync(device)
    times: List[float] = []
    for _ in range(iters):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            step()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def measure_ceilings(device: torch.device, dtype: torch.dtype, quick: bool) -> Dict[str, Any]:
    """Measured once per run: device-to-device copy GB/s (read + write) and a large matmul's TFLOP/s."""
    out: Dict[str, Any] = {}
    try:
        n_bytes = (32 if quick else 1024) * 2**20 if device.type == "cuda" else (8 if quick else 256) * 2**20
        src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        ms = time_fn(lambda: dst.copy_(src), device, 10, 50 if quick else 200)[0]
        out.update(copy_gbps=2 * n_bytes / (ms * 1e-3) / 1e9, copy_bytes=n_bytes)
    except Exception as e:
        out["copy_error"] = f"{type(e).__name__}: {e}"
    try:
        n = (1024 if quick else 8192) if device.type == "cuda" else (256 if quick else 1024)
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        ms = time_fn(lambda: torch.matmul(a, b), device, 10, 50 if quick else 200)[0]
        out.update(matmul_tflops=2 * n**3 / (ms * 1e-3) / 1e12, matmul_shape=[n, n, n], matmul_dtype=dtype_name(dtype))
    except Exception as e:
        out["matmul_error"] = f"{type(e).__name__}: {e}"
    cleanup(device)
    return out


def cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def short_error(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return msg if len(msg) <= 400 else msg[:397] + "..."


# ---------------------------------------------------------------------------------------------
# The runner


class Runner:
    """Runs jobs in order under a budget, one row at a time, writing results after each row."""

    def __init__(self, suite: str, jobs: List[Job], meta: Dict[str, Any], out_dir: Optional[str],
                 budget: Budget, device: torch.device, echo: Callable[[str], None] = print) -> None:
        self.suite = suite
        self.jobs = jobs
        self.meta = meta
        self.out_dir = out_dir
        self.budget = budget
        self.device = device
        self.echo = echo

    @property
    def rows(self) -> List[Row]:
        return [j.row for j in self.jobs]

    def run(self) -> List[Row]:
        self.write()
        for i, job in enumerate(self.jobs):
            row = job.row
            t0 = time.monotonic()
            left = self.budget.remaining()
            if job.unavailable:
                row.status, row.note = "unavailable", job.unavailable
            elif left <= 0 or left < job.min_s:
                row.status = "skipped"
                row.note = _join(row.note, f"budget spent ({max(left, 0):.0f} s left, row needs ~{job.min_s:.0f} s)"
                                 if job.min_s else "budget spent")
            else:
                try:
                    limit = None if math.isinf(left) else left + self.budget.grace()
                    with deadline(limit):
                        assert job.run is not None
                        job.run(row)
                    row.status = "ok"
                except BaseException as e:  # one broken row must not end the run
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    row.median_ms = row.p20_ms = row.p80_ms = None
                    if isinstance(e, Unavailable) or any(m in str(e) for m in UNAVAILABLE_MESSAGES):
                        row.status, row.note = "unavailable", short_error(e).split(". ")[0]
                    else:
                        row.status, row.error = "error", short_error(e)
                finally:
                    cleanup(self.device)
                row.seconds = round(time.monotonic() - t0, 2)
            finish_row(row, self.meta.get("ceilings", {}))
            compute_speedups(self.rows)
            self.echo(f"[{i + 1}/{len(self.jobs)}] " + row_line(row))
            self.write()
        return self.rows

    def write(self) -> None:
        if self.out_dir:
            write_results(self.out_dir, self.suite, self.meta, self.rows)


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def finish_row(row: Row, ceilings: Dict[str, Any]) -> None:
    """Derived numbers: TFLOP/s, GB/s and % of the measured ceilings (ops rows)."""
    if row.status != "ok" or not row.median_ms or row.suite != "ops":
        return
    s = row.median_ms * 1e-3
    if row.flops:
        row.tflops = row.flops / s / 1e12
        if ceilings.get("matmul_tflops"):
            row.pct_ceiling = 100.0 * row.tflops / ceilings["matmul_tflops"]
    if row.bytes:
        row.gbps = row.bytes / s / 1e9
        if ceilings.get("copy_gbps") and not row.flops:
            row.pct_ceiling = 100.0 * row.gbps / ceilings["copy_gbps"]


def compute_speedups(rows: List[Row]) -> None:
    """speedup = the group's baseline median / this median (same op, shape, mode, one process)."""
    base: Dict[Tuple[str, str, str, str], float] = {}
    for r in rows:
        if r.baseline and r.status == "ok" and r.median_ms:
            base[r.group()] = r.median_ms
    for r in rows:
        b = base.get(r.group())
        r.speedup = b / r.median_ms if (b and r.status == "ok" and r.median_ms) else None


# ---------------------------------------------------------------------------------------------
# Outputs: JSON, CSV, terminal table, plots

CSV_FIELDS = [f.name for f in dataclasses.fields(Row)]


def results_dict(suite: str, meta: Dict[str, Any], rows: List[Row]) -> Dict[str, Any]:
    d = {"schema": SCHEMA, "suite": suite}
    d.update(meta)
    d["rows"] = [dataclasses.asdict(r) for r in rows]
    d["counts"] = {s: sum(r.status == s for r in rows) for s in STATUSES}
    d["skipped"] = [label(r) for r in rows if r.status == "skipped"]
    d["updated"] = now_utc()
    return d


def label(r: Row) -> str:
    return f"{r.name} [{r.shape_str()}] {r.mode} {r.impl}"


def _atomic_write(path: str, text: str) -> None:
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_results(out_dir: str, suite: str, meta: Dict[str, Any], rows: List[Row]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    _atomic_write(os.path.join(out_dir, f"{suite}.json"),
                  json.dumps(results_dict(suite, meta, rows), indent=1, default=str) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        d = dataclasses.asdict(r)
        d["shape"] = r.shape_str()
        w.writerow({k: _fmt_csv(v) for k, v in d.items()})
    _atomic_write(os.path.join(out_dir, f"{suite}.csv"), buf.getvalue())


def _fmt_csv(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def load_rows(d: Dict[str, Any]) -> List[Row]:
    names = set(CSV_FIELDS)
    return [Row(**{k: v for k, v in r.items() if k in names}) for r in d.get("rows", [])]


def _f(v: Optional[float], fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def row_line(r: Row) -> str:
    if r.status != "ok":
        why = r.error or r.note
        return f"{label(r)}: {r.status}{': ' + why if why else ''}"
    perf = []
    if r.suite == "model":
        perf.append(f"{r.img_per_s:.1f} img/s" if r.img_per_s else "")
        if r.mfu is not None:
            perf.append(f"MFU {r.mfu:.1f}%")
    else:
        if r.tflops:
            perf.append(f"{r.tflops:.2f} TFLOP/s")
        if r.gbps and not r.tflops:
            perf.append(f"{r.gbps:.1f} GB/s")
    if r.speedup:
        perf.append(f"x{r.speedup:.2f} vs baseline")
    return f"{label(r)}: {r.median_ms:.3f} ms " + " ".join(p for p in perf if p)


def table(rows: List[Row], suite: str) -> str:
    """The terminal table: one line per row, grouped by op/model, shape and mode."""
    if suite == "model":
        head = ["model", "shape", "mode", "impl", "ms/step", "img/s", "MFU%", "peak MB", "speedup", "status"]
        body = [[r.name, r.shape_str(), r.mode, r.impl + (" *" if r.baseline else ""), _f(r.median_ms, ".2f"),
                 _f(r.img_per_s, ".1f"), _f(r.mfu, ".1f"), _f(r.peak_mem_mb, ".0f"), _f(r.speedup, ".2f"),
                 _status_cell(r)] for r in rows]
    else:
        head = ["op", "shape", "mode", "impl", "median ms", "TFLOP/s", "GB/s", "% ceil", "speedup", "status"]
        body = [[r.name, r.shape_str(), r.mode, r.impl + (" *" if r.baseline else ""), _f(r.median_ms, ".4f"),
                 _f(r.tflops, ".2f"), _f(r.gbps, ".1f"), _f(r.pct_ceiling, ".1f"), _f(r.speedup, ".2f"),
                 _status_cell(r)] for r in rows]
    return format_table(head, body)


TIMED_NOTE = "timed "  # the part of a note listing every config an autotuner timed (ops.note_new_picks): files only


def _status_cell(r: Row) -> str:
    if r.status == "ok":
        note = r.note.split("; " + TIMED_NOTE, 1)[0]  # (the picks come first: a timed part follows them)
        return "ok" + (f" ({note})" if note else "")
    why = r.error or r.note
    return r.status + (f": {why[:90]}" if why else "")


def format_table(head: List[str], body: List[List[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
    widths[-1] = len(head[-1])  # the status column is free text: no padding
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(head, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in body]
    return "\n".join(lines)


def plot(out_dir: str, suite: str, rows: List[Row], meta: Dict[str, Any]) -> str:
    """PNG: bars of speedup vs the group's baseline (one panel per op / per model). Returns a note."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return "matplotlib not installed: no plot written"
    panels: Dict[str, List[Row]] = {}
    for r in rows:
        if r.status == "ok" and r.speedup:
            panels.setdefault(r.name, []).append(r)
    if not panels:
        return "nothing measured: no plot written"
    n = len(panels)
    cols = min(2, n)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(8 * cols, 3.6 * nrows), squeeze=False)
    for ax, (name, rs) in zip(axes.flat, panels.items()):
        groups = list(dict.fromkeys(f"{r.shape_str()}\n{r.mode}" for r in rs))
        impls = list(dict.fromkeys(r.impl for r in rs))
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for r in rs:
                if r.impl == impl:
                    xs.append(groups.index(f"{r.shape_str()}\n{r.mode}") + (j - (len(impls) - 1) / 2) * width)
                    ys.append(r.speedup)
            ax.bar(xs, ys, width=width, label=impl)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([g if len(g) < 60 else g[:57] + "..." for g in groups], fontsize=6)
        ax.set_ylabel("speedup vs baseline (x)")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    env = meta.get("env", {})
    fig.suptitle(f"flashvit {suite}: {env.get('device_name')} · torch {env.get('torch')} · triton "
                 f"{env.get('triton')} · {meta.get('created', '')}", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{suite}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def echo_stdout(msg: str) -> None:
    print(msg, flush=True)
    sys.stdout.flush()

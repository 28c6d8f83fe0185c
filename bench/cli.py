"""``python -m flashvit.bench [ops|model|all|overhead|report|targets]``: the benchmark command line.

    python -m flashvit.bench all --quick --out out/bench          # smoke run (CPU is fine)
    python -m flashvit.bench ops --ops attention --budget 120       # one op family, 2 minutes at most
    python -m flashvit.bench model --models b l --impls flashvit timm compile(timm)
    TRITON_INTERPRET=1 python -m flashvit.bench overhead           # host time per op call / train step
    python -m flashvit.bench report --out out/bench                # summary of the files in a folder
    python -m flashvit.bench ops --rows targets --ops attention mlp # only the rows the issues' targets read
    python -m flashvit.bench targets --out out/bench               # each speed target: met / not met / not measured

Each run writes <suite>.json, <suite>.csv and <suite>.png (when matplotlib is installed) into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from flashvit.bench import harness as H

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flashvit.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="all",
                   choices=("ops", "model", "all", "overhead", "report", "targets"))
    p.add_argument("--quick", action="store_true", help="tiny shapes and short timings (smoke test; CPU is fine)")
    p.add_argument("--out", default=os.path.join("out", "bench"), help="folder for the JSON/CSV/PNG files")
    p.add_argument("--ops", nargs="+", default=None,
                   help="op families: layernorm attention mlp patch_embed (the default: all four), swiglu "
                        "(SwiGLU's gate), rope (RoPE attention, EVA-02 / DINOv3), mask (attention with a padding mask: "
                        "NaFlex / SigLIP2), droppath (stochastic depth's residual add + LayerNorm), layerscale "
                        "(a LayerScale block's proj: γ and the residual in the GEMM's epilogue), gemm-configs "
                        "(a per-config GEMM sweep)")
    p.add_argument("--models", nargs="+", default=None, help="s b l or flashvit/timm names (first = priority)")
    p.add_argument("--impls", nargs="+", default=None, help="model impls to run (default: all)")
    p.add_argument("--rows", choices=("all", "settled", "experimental", "targets"), default="all",
                   help="ops: 'settled' leaves out kernel paths not yet run on a GPU (ops.EXPERIMENTAL); "
                        "'experimental' runs only their groups (baseline + ours) into ops-experimental.*; "
                        "'targets' only the rows the issues' speed targets read (see the targets command)")
    p.add_argument("--timer", choices=H.TIMERS, default="flush",
                   help="ops on CUDA: flush = do_bench, L2 flushed, the host's issue time counts where it exceeds "
                        "the GPU's; graph = device time of calls replayed from a CUDA graph (-> ops-graph.*)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole command; rows not started in time are listed as skipped")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--warmup-ms", type=float, default=None)
    p.add_argument("--rep-ms", type=float, default=None, help="timing window per op row")
    p.add_argument("--batch-train", type=int, default=None)
    p.add_argument("--drop-path", type=float, default=0.0, metavar="RATE",
                   help="model: build every model with stochastic depth at this rate (timm's drop_path_rate; DeiT-B "
                        "trains at 0.1); the training rows then drop samples (their shape names the rate)")
    p.add_argument("--batch-infer", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per model row")
    p.add_argument("--profile-steps", type=int, default=0, metavar="N",
                   help="model: after timing a row (not graph(...)), N more steps under torch.profiler: the GPU's "
                        "busy share of the step, its idle gaps by size, the host's blocking CUDA calls -> the row's "
                        "note, and the whole report (largest gaps, device time by kernel) in OUT/profile/")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile rows (auto: off for --quick on CPU, where inductor builds C++ for minutes)")
    p.add_argument("--ceilings-from", default=None, help="reuse the ceilings of an earlier JSON of this run")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--tests-log", default=None, help="report: a pytest log whose last summary line is quoted")
    p.add_argument("--prewarm", type=int, default=0, metavar="N",
                   help="ops, model: first run each Triton and torch.compile row once, untimed, in N spawned "
                        "processes, so Triton's and Inductor's on-disk caches serve the timed rows")
    p.add_argument("--prewarm-only", action="store_true",
                   help="ops, model: only the --prewarm pass (no timing, no files), e.g. in the background")
    p.add_argument("--summary", default=None, help="report: also write the summary to this file")
    p.add_argument("--note", action="append", default=[], help="report: a line to append (repeatable)")
    return p


def main(argv: Optional[Sequence[str]] = None, t_start: Optional[float] = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "report":
        return report(args.out, args.tests_log, args.summary, plots=not args.no_plot, notes=args.note)
    if args.command == "targets":
        from flashvit.bench.targets import write_targets
        return write_targets(args.out, args.summary)
    t_start = time.monotonic() if t_start is None else t_start
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    dtype, compile_ok, compile_note, warmup_ms, rep_ms = _settings(args, device)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    if args.command in ("ops", "model") and args.prewarm_only:
        if args.prewarm > 0:
            _prewarm(args, argv_list, device, H.Budget(args.budget, t_start), share=0.95)
        return 0

    env = H.environment(device)
    ceilings = {} if args.command == "overhead" else _ceilings(args, device, dtype)
    config = dict(command=args.command, quick=args.quick, device=str(device), dtype=H.dtype_name(dtype),
                  budget_s=args.budget, warmup_ms=warmup_ms, rep_ms=rep_ms, compile=compile_ok,
                  timer=("wall clock median" if not gpu else
                         "triton.testing.do_bench median (L2 flushed between calls)" if args.timer == "flush" else
                         "CUDA graph replay, device time per call (median of 10 replays; no host time, no L2 flush)"),
                  argv=argv_list)
    H.echo_stdout(f"flashvit bench {args.command} on {env['device_name']} ({device}), torch {env['torch']}, "
                  f"triton {env['triton']}, commit {env['git_commit'][:12]}")
    H.echo_stdout("ceilings: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in ceilings.items()))
    budget_all = H.Budget(args.budget, t_start)
    rc = 0
    if args.command in ("ops", "all"):
        ops_budget = budget_all
        if args.command == "all" and args.budget is not None:
            ops_budget = H.Budget(max(0.0, budget_all.remaining()) / 2)  # leave the model half
        rc |= run_ops(args, device, env, ceilings, config, ops_budget, warmup_ms, rep_ms)
    if args.command == "overhead":
        rc |= run_overhead(args, device, dtype, env, ceilings, config, budget_all)
    if args.command in ("model", "all"):
        rc |= run_model(args, device, env, ceilings, config,
                        H.Budget(budget_all.remaining() if args.budget is not None else None))
    return rc


def _settings(args: argparse.Namespace, device: torch.device) -> Tuple[torch.dtype, bool, str, float, float]:
    """(dtype, compile_ok, compile_note, warmup_ms, rep_ms) from the command line and the device."""
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    compile_ok, compile_note = True, ""
    if args.compile == "off":
        compile_ok, compile_note = False, "torch.compile rows off (--compile off)"
    elif args.compile == "auto" and args.quick and not gpu:
        compile_ok, compile_note = False, "torch.compile rows off for --quick on CPU (pass --compile on)"
    warmup_ms = args.warmup_ms if args.warmup_ms is not None else (25 if gpu else 5 if args.quick else 20)
    rep_ms = args.rep_ms if args.rep_ms is not None else (100 if gpu else 30 if args.quick else 200)
    return dtype, compile_ok, compile_note, warmup_ms, rep_ms


def _ops_jobs(args: argparse.Namespace, device: torch.device, warmup_ms: float, rep_ms: float) -> List[H.Job]:
    from flashvit.bench import ops as O
    dtype, compile_ok, compile_note, _, _ = _settings(args, device)
    ctx = O.Ctx(device, dtype, warmup_ms, rep_ms, compile_ok, compile_note, args.quick, args.timer)
    return O.select_rows(O.op_jobs(ctx, args.ops), args.rows, args.quick)


def _model_ctx(args: argparse.Namespace, device: torch.device, peak: Optional[float], warm: bool = False) -> Any:
    from flashvit.bench import model as M
    gpu = device.type == "cuda"
    quick = args.quick
    dtype, compile_ok, compile_note, _, _ = _settings(args, device)
    bt = args.batch_train or (128 if gpu and not quick else 8 if gpu else 2 if quick else 8)
    bi = args.batch_infer or (256 if gpu and not quick else 8 if gpu else 2 if quick else 8)
    iters = 1 if warm else args.steps or (10 if gpu and not quick else 2 if quick else 3)
    warmup = 0 if warm or quick else 3 if gpu else 1  # plus one untimed first step
    ctx = M.MCtx(device, dtype, quick, bt, bi, warmup, iters, compile_ok, compile_note, peak)
    ctx.drop_path = args.drop_path
    if not warm:
        ctx.profile_steps = max(args.profile_steps, 0)
        ctx.profile_dir = os.path.join(args.out, "profile")
    return ctx


def _model_jobs(args: argparse.Namespace, ctx: Any) -> Tuple[List[str], List[H.Job]]:
    from flashvit.bench import model as M
    names = M.resolve(args.models or (["s"] if args.quick else list(M.DEFAULT_MODELS)))
    return names, M.model_jobs(ctx, names, args.impls)


def _warm_jobs(args: argparse.Namespace, device: torch.device) -> List[H.Job]:
    """The rows of this command (ops or model) built for a --prewarm pass: 1 ms timing windows, one model step."""
    if args.command == "model":
        return _model_jobs(args, _model_ctx(args, device, None, warm=True))[1]
    return _ops_jobs(args, device, 1.0, 1.0)


def _warms_a_cache(job: H.Job) -> bool:
    """Rows whose first run compiles (our Triton kernels, torch.compile): the ones --prewarm runs."""
    impl = job.row.impl
    return not job.unavailable and impl.startswith(("flashvit", "compile(", "timm+flashvit")) and \
        not impl.startswith("flashvit-eager")


def _prewarm_worker(argv: List[str], device: str, labels: List[str]) -> Tuple[int, List[str]]:
    """A spawned process: run the rows named ``labels`` once (1 ms timing windows). Returns (rows run, errors)."""
    args = parser().parse_args(argv)
    ok, errors = 0, []
    for job in _warm_jobs(args, torch.device(device)):
        if H.label(job.row) in labels and job.run is not None:
            try:
                job.run(job.row)
                ok += 1
            except Exception as e:  # the timed run reports it
                errors.append(f"{H.label(job.row)}: {H.short_error(e)}")
            finally:
                H.cleanup(torch.device(device))
    return ok, errors


def _prewarm(args: argparse.Namespace, argv: List[str], device: torch.device, budget: H.Budget,
             share: float = 0.6) -> None:
    """--prewarm N: every compiling row run once, untimed, in N spawned processes (they fill the on-disk caches
    of Triton and Inductor; the timed rows then load instead of compiling), in at most ``share`` of the budget."""
    import multiprocessing as mp
    t0 = time.monotonic()
    labels = [H.label(j.row) for j in _warm_jobs(args, device) if _warms_a_cache(j)]
    if not labels:
        H.echo_stdout("prewarm: no row here compiles anything")
        return
    n = max(1, min(args.prewarm, len(labels)))
    chunks = [labels[i::n] for i in range(n)]  # rows in priority order: each process starts with the first ones
    # a worker that dies takes its task with it: without a budget, stop waiting after an hour all the same
    timeout = 3600.0 if math.isinf(budget.remaining()) else max(10.0, share * budget.remaining())
    pool = mp.get_context("spawn").Pool(n)
    try:
        res = pool.starmap_async(_prewarm_worker, [(argv, str(device), c) for c in chunks if c]).get(timeout)
        ok, errors = sum(r[0] for r in res), [e for r in res for e in r[1]]
        H.echo_stdout(f"prewarm: {ok} of {len(labels)} rows run in {n} processes in {time.monotonic() - t0:.0f} s"
                      + (f"; {len(errors)} failed, first: {errors[0][:300]}" if errors else ""))
    except mp.TimeoutError:
        H.echo_stdout(f"prewarm: stopped after {time.monotonic() - t0:.0f} s (its share of the budget); "
                      "rows not warmed compile when timed")
    finally:
        pool.terminate()
        pool.join()


def _ceilings(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
    if args.ceilings_from:
        try:
            with open(args.ceilings_from, encoding="utf-8") as f:
                c = json.load(f).get("ceilings") or {}
            if c.get("matmul_tflops"):
                return dict(c, reused_from=os.path.basename(args.ceilings_from))
        except Exception as e:
            H.echo_stdout(f"could not reuse ceilings from {args.ceilings_from}: {e}; measuring")
    mm_dtype = dtype if device.type == "cuda" else torch.float32
    return H.measure_ceilings(device, mm_dtype, args.quick)


def _meta(env: Dict[str, Any], ceilings: Dict[str, Any], config: Dict[str, Any], **extra: Any) -> Dict[str, Any]:
    return dict(created=H.now_utc(), env=env, ceilings=ceilings, config=dict(config, **extra))


def _finish(suite: str, rows: List[H.Row], meta: Dict[str, Any], out: str, no_plot: bool) -> None:
    H.write_results(out, suite, meta, rows)
    H.echo_stdout("")
    H.echo_stdout(H.table(rows, suite))
    if not no_plot:
        H.echo_stdout(H.plot(out, suite, rows, meta))
    skipped = [H.label(r) for r in rows if r.status == "skipped"]
    errors = [f"{H.label(r)}: {r.error}" for r in rows if r.status == "error"]
    counts = {s: sum(r.status == s for r in rows) for s in H.STATUSES if s != "pending"}
    H.echo_stdout(f"{suite}: " + ", ".join(f"{v} {k}" for k, v in counts.items()) +
                  f"; files in {out}")
    if skipped:
        H.echo_stdout(f"{suite}: skipped (time budget): " + "; ".join(skipped))
    for e in errors:
        H.echo_stdout(f"{suite}: error: {e}")


def run_ops(args, device, env, ceilings, config, budget, warmup_ms, rep_ms) -> int:
    from flashvit.bench import ops as O
    if args.prewarm > 0:
        _prewarm(args, config["argv"], device, budget)
    jobs = _ops_jobs(args, device, warmup_ms, rep_ms)
    suite = ("ops-experimental" if args.rows == "experimental" else "ops") + ("-graph" if args.timer == "graph" else "")
    if args.ops and set(args.ops) == {"gemm-configs"}:  # the sweep alone: files of its own
        suite = "gemm-configs" + ("-graph" if args.timer == "graph" else "")
    meta = _meta(env, ceilings, config, ops=list(args.ops or O.OPS), rows=args.rows,
                 counts_note="attention fwd+bwd FLOPs = 3.5 x fwd (bwd = 2.5 x fwd); GEMM fwd+bwd = 3 x fwd; "
                             "patch_embed fwd+bwd = 2 x fwd (no image grad); LayerNorm: minimal bytes moved")
    runner = H.Runner(suite, jobs, meta, args.out, budget, device, H.echo_stdout)
    rows = runner.run()
    _finish(suite, rows, meta, args.out, args.no_plot)
    return 0


def run_overhead(args, device, dtype, env, ceilings, config, budget) -> int:
    from flashvit.bench import overhead as OV
    jobs = OV.overhead_jobs(device, dtype, args.quick)
    meta = _meta(env, ceilings, dict(config, timer="host wall clock per call (see flashvit.bench.overhead)"),
                 launches="stubbed (no-op Triton launches on CPU)" if OV.launches_stubbed(device) else "real",
                 model_kwargs=OV.MODEL_KW)
    runner = H.Runner("overhead", jobs, meta, args.out, budget, device, H.echo_stdout)
    rows = runner.run()
    _finish("overhead", rows, meta, args.out, args.no_plot)
    return 0


def run_model(args, device, env, ceilings, config, budget) -> int:
    from flashvit.bench import model as M
    if args.prewarm > 0:
        _prewarm(args, config["argv"], device, budget)
    peak = ceilings.get("matmul_tflops")
    ctx = _model_ctx(args, device, peak)
    names, jobs = _model_jobs(args, ctx)
    meta = _meta(env, ceilings, config, models=names, overrides=ctx.overrides, warmup_steps=ctx.warmup,
                 timed_steps=ctx.iters, train_step="forward + cross-entropy + backward + SGD(momentum) step",
                 flops="torch.utils.flop_counter.FlopCounterMode on flashvit's eager path, per image",
                 mfu_peak_tflops=peak)
    runner = H.Runner("model", jobs, meta, args.out, budget, device, H.echo_stdout)
    rows = runner.run()
    _finish("model", rows, meta, args.out, args.no_plot)
    for line in M.eager_vs_timm_lines(rows):
        H.echo_stdout(line)
    return 0


# ---------------------------------------------------------------------------------------------
# report: a short summary of the files in a folder (gpu_check.sh prints it last)


def _load(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except Exception:
        return None


def _tests_line(path: Optional[str]) -> Optional[str]:
    if not path or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("=") and any(w in ln for w in ("passed", "failed", "error", "skipped", "no tests")):
            return ln.strip("= ")
    tail = lines[-1] if lines else "(empty log)"
    return f"no pytest summary line (killed by its timeout?); last line: {tail[:200]}"


def ops_summary(rows: List[H.Row]) -> str:
    groups: Dict[Any, List[H.Row]] = {}
    for r in rows:
        groups.setdefault(r.group(), []).append(r)
    body = []
    for (_, name, shape, mode), rs in groups.items():
        ours = [r for r in rs if r.impl.startswith("flashvit") and not r.impl.endswith("-eager") and r.status == "ok"]
        base = next((r for r in rs if r.baseline), None)
        others = [r for r in rs if not r.impl.startswith("flashvit") and r.status == "ok"]
        best = min(others, key=lambda r: r.median_ms) if others else None
        o = min(ours, key=lambda r: r.median_ms) if ours else None
        if o is None and base is None:
            continue
        body.append([name, shape, mode,
                     f"{o.impl} {o.median_ms:.3f}" if o else _why(rs),
                     f"{base.impl} {base.median_ms:.3f}" if base and base.status == "ok" else "-",
                     f"{base.median_ms / o.median_ms:.2f}" if o and base and base.status == "ok" else "-",
                     f"{best.impl} {best.median_ms:.3f}" if best else "-",
                     f"{best.median_ms / o.median_ms:.2f}" if o and best else "-"])
    head = ["op", "shape", "mode", "flashvit ms", "baseline ms", "x base", "best other ms", "x best"]
    return H.format_table(head, body)


def _why(rs: List[H.Row]) -> str:
    r = next((r for r in rs if r.impl.startswith("flashvit")), None)
    return "-" if r is None else r.status


def model_summary(rows: List[H.Row]) -> str:
    body = [[r.name, r.mode, r.shape_str(), r.impl, _f(r.img_per_s, ".1f"), _f(r.mfu, ".1f"), _f(r.peak_mem_mb, ".0f"),
             _f(r.speedup, ".2f"), r.status if r.status != "ok" else ""] for r in rows if r.status in ("ok", "error")]
    return H.format_table(["model", "mode", "shape", "impl", "img/s", "MFU%", "peak MB", "x timm", "status"], body)


def _f(v: Optional[float], fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def report(out: str, tests_log: Optional[str], summary_path: Optional[str], plots: bool = True,
           notes: Sequence[str] = ()) -> int:
    from flashvit.bench.model import eager_vs_timm_lines, profile_lines
    lines: List[str] = []
    found = False
    tl = _tests_line(tests_log)
    if tl:
        lines.append(f"tests: {tl}")
    for suite in ("ops", "ops-experimental", "ops-graph", "gemm-configs", "model", "overhead"):
        d = _load(os.path.join(out, f"{suite}.json"))
        if d is None:
            if suite in ("ops", "model"):  # the others are optional
                lines.append(f"{suite}: no {suite}.json in {out}")
            continue
        found = True
        rows = H.load_rows(d)
        H.compute_speedups(rows)
        env, c = d.get("env", {}), d.get("ceilings", {})
        if suite == "ops" or not any(ln.startswith("device:") for ln in lines):
            lines.insert(0, f"device: {env.get('device_name')} (driver {env.get('driver')}), torch {env.get('torch')}, "
                            f"triton {env.get('triton')}, timm {env.get('timm')}, commit {str(env.get('git_commit'))[:12]}, "
                            f"{d.get('created')}; ceilings: copy {_f(c.get('copy_gbps'), '.0f')} GB/s, matmul "
                            f"{_f(c.get('matmul_tflops'), '.1f')} TFLOP/s")
        counts = {s: sum(r.status == s for r in rows) for s in H.STATUSES}
        lines.append("")
        lines.append(f"{suite}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
        if suite == "overhead":
            lines.append(f"overhead: host ms per call or step, launches {d.get('config', {}).get('launches', '?')}; "
                         "x base = eager's host time / ours")
        lines.append(model_summary(rows) if suite == "model" else ops_summary(rows))
        if suite == "model":
            lines += eager_vs_timm_lines(rows) + profile_lines(rows)
        not_run = [H.label(r) + f" ({r.status})" for r in rows if r.status in ("skipped", "pending")]
        if not_run:
            more = f"; ... ({len(not_run) - 12} more in {suite}.json)" if len(not_run) > 12 else ""
            lines.append(f"{suite}: not run (budget or timeout): {len(not_run)} rows: " + "; ".join(not_run[:12]) + more)
        errors = [r for r in rows if r.status == "error"]
        for r in errors[:10]:
            lines.append(f"{suite}: error: {H.label(r)}: {r.error[:200]}")
        if len(errors) > 10:
            lines.append(f"{suite}: ... {len(errors) - 10} more errors in {suite}.json")
        png = os.path.join(out, f"{suite}.png")
        if plots and not os.path.exists(png):
            meta = {k: v for k, v in d.items() if k != "rows"}
            lines.append(H.plot(out, suite, rows, meta))
    if found:
        from flashvit.bench.targets import target_lines
        tlines = target_lines(out)
        lines.append("")
        lines += [ln for ln in tlines if ln.startswith("targets: ") or "-> not met" in ln]
    lines += list(notes)
    text = "\n".join(lines)
    print(text, flush=True)
    if summary_path:
        with open(summary_path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0 if found else 1

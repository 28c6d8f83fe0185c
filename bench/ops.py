"""Per-op benchmarks: each fused op vs eager PyTorch, torch.compile of the eager path, every SDPA backend.

Row order is priority order (the budget cuts from the end): first every row that needs no
torch.compile (ours, eager, SDPA backends, flash-attn), then the torch.compile baselines.

Third-party baselines join when installed: flash-attn (attention), Liger and apex (LayerNorm).

Counts (DESIGN.md §6):
  * LayerNorm bytes: read x (+ residual), write y (+ h = x + residual), plus weight and bias; the
    backward reads dy (+ dh) and x (or h) and writes dx once (residual's grad is the same tensor).
  * attention FLOPs: fwd 4·B·H·N²·D. The backward is 2.5x the forward (five N²·D matmuls: the
    recomputed scores, dV, dP, dQ, dK), so fwd+bwd = 3.5x fwd (flash-attn's convention for bwd).
  * GEMM FLOPs: 2·M·N·K per GEMM; fwd+bwd = 3x fwd (dX and dW GEMMs).
  * patch embed FLOPs: 2·B·L·D·(C·p²); fwd+bwd = 2x fwd (images need no grad: only the dW GEMM).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import itertools
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from flashvit.bench.harness import TIMED_NOTE, Job, Row, dtype_name, time_fn

ATTN_FWD_BWD_FACTOR = 3.5  # fwd (1) + bwd (2.5)
# the default families; also: swiglu (SwiGLU's gate) and rope (RoPE attention), out of the default so GPU runs
# keep the issues' rows first; gemm-configs
OPS = ("layernorm", "attention", "mlp", "patch_embed")
LN_EPS = 1e-6

# Full shapes (the kernel issues'); quick shapes are tiny and odd for CPU smoke runs.
LN_ROWS = (256, 197)
LN_DIMS = (384, 768, 1024, 1280)
ATTN_SHAPES = ((256, 12, 197, 64), (128, 16, 257, 64), (64, 16, 257, 80), (32, 16, 577, 64))  # (B, H, N, D)
ATTN_DROPOUT_P = 0.1  # the dropout rows: the first shape, fwd+bwd, ours vs SDPA's default, both dropping
MLP_SHAPES = (("vit_b", 256 * 197, 768, 3072), ("vit_l", 256 * 197, 1024, 4096))  # (name, M, D, hidden)
PATCH_SHAPES = (("vit_b16", 256, 224, 16, 768), ("vit_h14", 256, 224, 14, 1280))  # (name, B, img, p, D)

QUICK_LN_ROWS = (2, 17)
QUICK_LN_DIMS = (64, 96)
QUICK_ATTN_SHAPES = ((2, 3, 17, 16), (1, 2, 33, 72))  # 72: the backward can split it (64 + 32)
QUICK_MLP_SHAPES = (("tiny", 2 * 17, 64, 256),)
QUICK_PATCH_SHAPES = (("tiny_p8", 2, 32, 8, 64), ("tiny_p14", 1, 28, 14, 96))
# SwiGLU's gate on the packed fc1 output (name, rows, hidden): DINOv2-giant's MLP (B = 64, 257 tokens, 4096)
SWIGLU_SHAPES = (("vit_g14_dinov2", 64 * 257, 4096),)
QUICK_SWIGLU_SHAPES = (("tiny", 2 * 17, 96),)
# RoPE attention from packed qkv: (label, B, H, N, D, prefix tokens, rotate_half): EVA-02-B-like (interleaved, cls)
# and DINOv3-B (rotate_half, cls + 4 registers) at 224 px
ROPE_SHAPES = (("eva02_b14", 256, 12, 257, 64, 1, False), ("dinov3_b16", 256, 12, 201, 64, 5, True))
QUICK_ROPE_SHAPES = (("tiny", 2, 3, 17, 16, 1, False), ("tiny_half", 1, 2, 21, 24, 5, True))
# --ops mask: attention with a padding mask, (label, B, H, N, D, kind): NaFlex / SigLIP2-style batches where a
# quarter of the images carry padding (bool key-padding (B, 1, 1, N), HF's additive (B, 1, N, N) in bf16)
# ... and learned relative-position biases (fp32 (1, H, N, N), its gradient wanted): BEiT-B's; Swin-T's first stage
# (batch 128 x 64 windows of 7 x 7 tokens), the bias plus its shifted-window mask as one windowed (1, 64, H, N, N)
# mask, which SDPA (the baseline) takes as the (B·64, H, N, N) tensor timm's fused path builds.
MASK_SHAPES = (("vit_b_pad", 128, 12, 197, 64, "bool"), ("siglip2_b_pad", 64, 12, 256, 64, "additive"),
               ("beit_b_bias", 128, 12, 197, 64, "learned"), ("swin_t_s1", 128 * 64, 3, 49, 32, "window"))
QUICK_MASK_SHAPES = (("tiny_pad", 2, 2, 19, 16, "bool"), ("tiny_hf", 2, 2, 13, 32, "additive"),
                     ("tiny_bias", 2, 2, 11, 16, "learned"), ("tiny_win", 2 * 4, 2, 9, 16, "window"))

# gemm-configs (a sweep, only when asked for): the plain GEMM of ViT-B's fc1 and fc2 through each tile config of
# our two GEMM kernels alone, against torch.matmul. (name, M, N, K)
GEMM_SWEEP_SHAPES = (("vit_b.fc1", 256 * 197, 3072, 768), ("vit_b.fc2", 256 * 197, 768, 3072))
QUICK_GEMM_SWEEP_SHAPES = (("tiny", 2 * 17, 96, 64),)
# Candidates beyond the shipped lists (Hopper only: each fits sm_90's 227 KiB of shared memory, not all an A100's).
GEMM_SWEEP_EXTRA = [(128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 128, 64, 4, 4),
                    (64, 128, 64, 4, 4)]
# (the fp32 accumulator takes BM·BN / (32·warps) registers a thread: at most 128 of the 255)
TMA_SWEEP_GRID = [(128, bn, bk, w, st) for bn in (128, 256) for bk in (64, 128) for st in (2, 3, 4) for w in (4, 8)
                  if 128 * bn // (32 * w) <= 128]

LATE_PRIORITY = ("mlp", "layer_norm", "add_layer_norm")  # row names whose torch.compile rows go first
# --timer graph: LayerNorm's widths in this order, ViT-B's, -L's and -H's before ViT-S's (runs 5 and 6 reached
# torch.compile's rows at D = 384 only before the graph step's budget ran out)
GRAPH_LN_DIMS_ORDER = (768, 1024, 1280, 384)
# impl tags of paths not yet run on a GPU (and diagnostics), in the order their groups run (a budget cuts the last):
# [tail], [lag], [persist], [masked] and [tail+rows] (attention's forward, the op's open gap: its forward rows never
# fit runs 5 and 6's budgets; the default now lets the autotuner pick the loop form, [masked] is the default before;
# [lag]: the split loop with P·V one block late, forced; [persist]: the persistent forward, forced) first,
# [fused] and [fused+tail] (attention's one-kernel backward) in the same groups, then the GEMM paths (hybrid's
# training rows ran in run 6), [split] is attention's default at D=80 (a check), [dropout]
# attention's in-kernel dropout against SDPA's (ViT-B's shape, training); [chunks], [prefetch], [chunks+prefetch]
# and [padded] (LayerNorm's backward; the default lets the autotuner pick the layout and the prefetch, [padded]
# is the default before: one padded block, no prefetch) exist with the graph timer only, whose step runs every
# row (device time: the host hides LayerNorm's kernels there)
EXPERIMENTAL = ("[tail]", "[lag]", "[persist]", "[masked]", "[tail+rows]", "[fused]", "[fused+tail]", "[gemm=hybrid]",
                "[gemm=tma]", "[nosplit]", "[split]", "[dropout]", "[chunks]", "[prefetch]", "[chunks+prefetch]",
                "[padded]")
MATH_MAX_SCORES = 2 ** 26  # B·H·N² above which the MATH SDPA backend is left out (slow, N² memory)


class Ctx:
    """What every op row needs: device, dtype, timer settings, which Triton paths exist."""

    def __init__(self, device: torch.device, dtype: torch.dtype, warmup_ms: float, rep_ms: float,
                 compile_ok: bool, compile_note: str, quick: bool, timer: str = "flush") -> None:
        self.device = device
        self.timer = timer  # harness.time_fn: "flush" (host time counts where it dominates) or "graph" (device)
        self.dtype = dtype
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        self.compile_ok = compile_ok
        self.compile_note = compile_note
        self.quick = quick
        self.triton_reason = triton_unavailable(device)
        self.compile_min_s = 20.0 if device.type == "cuda" else 5.0


def triton_unavailable(device: torch.device) -> str:
    """Why our Triton rows cannot run here ('' when they can)."""
    from flashvit.kernels import HAS_TRITON
    if device.type != "cuda":
        return "no CUDA device (the Triton kernels need a GPU)"
    if not HAS_TRITON:
        return "triton is not importable"
    return ""


def kernel_note(op_module: str) -> str:
    """A note when this build has no Triton kernel for an op (its public function runs the reference)."""
    try:
        mod = importlib.import_module(f"flashvit.kernels.{op_module}")
        return "" if getattr(mod, "AOT_SPECS", None) else "no Triton kernel in this build: times the reference"
    except Exception as e:
        return f"import failed: {e}"


def gemm_variants() -> List[Tuple[str, Callable[[], Any]]]:
    """[(label suffix, context factory)] for our linear: the default, then each GEMM path it can be forced to."""
    # The module, not the package attribute: flashvit.kernels.linear is the linear() function there.
    lin = importlib.import_module("flashvit.kernels.linear")
    paths = [p for p in getattr(lin, "GEMM_PATHS", ()) if p != "auto"]
    return [("", contextlib.nullcontext)] + [(f"[gemm={p}]", (lambda p=p: lin.use_gemm(p))) for p in paths]


# ---------------------------------------------------------------------------------------------
# Building a timed step from a forward function


def _randn(shape: Sequence[int], ctx: Ctx, scale: float = 1.0, grad: bool = False, offset: float = 0.0
           ) -> torch.Tensor:
    """offset + scale * N(0, 1) in ctx.dtype: a leaf (see ``make_step``)."""
    t = (torch.randn(*shape, device=ctx.device, dtype=torch.float32) * scale + offset).to(ctx.dtype)
    return t.requires_grad_(grad)


def _as_tuple(out: Any) -> Tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def n_sets(set_bytes: int, device: torch.device) -> int:
    """Rotate input sets when that is cheap (small sets); big ones exceed L2 anyway and do_bench flushes it."""
    if device.type != "cuda":
        return 1
    return 3 if set_bytes < 64 * 2**20 else 1


def make_step(forward: Callable[..., Any], make_args: Callable[[bool], Tuple[torch.Tensor, ...]],
              params: Sequence[torch.Tensor], mode: str, ctx: Ctx) -> Callable[[], Any]:
    """A zero-argument callable running ``forward`` (fwd: under no_grad) or forward + autograd.grad.

    ``make_args(grad)`` returns fresh inputs (those that should get grads have requires_grad when
    ``grad``); ``params`` are module parameters that also get grads in fwd+bwd.
    """
    grad = mode == "fwd+bwd"
    first = make_args(grad)
    if any(t.requires_grad and t.grad_fn is not None for t in first):
        # a non-leaf's autograd node keeps the stream it was made on; the backward then waits on that stream,
        # which invalidates a CUDA-graph capture (--timer graph) and adds a node to every timed backward
        raise ValueError("make_step: inputs that get gradients must be leaf tensors")
    set_bytes = sum(t.numel() * t.element_size() for t in first)
    sets = [first] + [make_args(grad) for _ in range(n_sets(set_bytes, ctx.device) - 1)]
    if not grad:
        with torch.no_grad():
            _as_tuple(forward(*first))  # fail fast, outside the timer
        it = itertools.cycle(sets)

        def fwd() -> None:
            with torch.no_grad():
                forward(*next(it))

        return fwd
    prepared = []
    for args in sets:
        targets = [t for t in args if t.requires_grad] + [p for p in params if p.requires_grad]
        outs = _as_tuple(forward(*args))
        gos = [torch.randn_like(o) for o in outs]
        torch.autograd.grad(outs, targets, gos)  # fail fast, outside the timer
        prepared.append((args, targets, gos))
    it2 = itertools.cycle(prepared)

    def fwd_bwd() -> None:
        args, targets, gos = next(it2)
        torch.autograd.grad(_as_tuple(forward(*args)), targets, gos)

    return fwd_bwd


def _tuners() -> List[Tuple[str, Any]]:
    """[(name, triton Autotuner)] of our ops: module-level autotuners, their Launchers, dicts of either."""
    out: List[Tuple[str, Any]] = []
    try:
        from triton.runtime.autotuner import Autotuner
    except Exception:
        return out
    for mod_name in ("layernorm", "attention", "linear", "patch_embed", "glu"):
        try:
            mod = importlib.import_module(f"flashvit.kernels.{mod_name}")
        except Exception:
            continue
        for name, obj in vars(mod).items():
            items = [(f"{name}[{','.join(map(str, k)) if isinstance(k, tuple) else k}]", v) for k, v in obj.items()] \
                if isinstance(obj, dict) else [(name, obj)]
            for label, o in items:
                tuner = o if isinstance(o, Autotuner) else getattr(o, "tuner", None)
                if isinstance(tuner, Autotuner):
                    out.append((label.lstrip("_"), tuner))
    return out


_TIMINGS = "timings"  # autotune_picks()'s entry (name, _TIMINGS): which timings its autotuner holds now
MAX_TIMED_NOTED = 24  # a tuning note's alternatives at most (the fastest)


def _fmt_config(c: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in c.kwargs.items()) + f",w{c.num_warps},s{c.num_stages}"


def autotune_picks() -> Dict[Tuple[str, Any], str]:
    """{(autotuner, key): the config it picked}, for every key our autotuners have seen in this process; and
    {(autotuner, _TIMINGS): the identity of its last tuning's timings} (a tuning makes a new dict)."""
    out: Dict[Tuple[str, Any], str] = {}
    for name, t in _tuners():
        out.update({(name, key): _fmt_config(cfg) for key, cfg in list(t.cache.items())})
        out[(name, _TIMINGS)] = str(id(getattr(t, "configs_timings", None)))
    return out


def _median_ms(t: Any) -> float:
    """An autotuner timing as one number: do_bench's (median, p20, p80) list, or a float."""
    v = t[0] if isinstance(t, (list, tuple)) and t else t
    return float(v) if isinstance(v, (int, float)) else float("inf")


def tuning_note(name: str, tuner: Any, pick: str) -> str:
    """Every config the autotuner timed in its last tuning, slowest last, as its time over the best's and the
    parameters it differs in from the best (the best must be ``pick``); "" without two timings."""
    timings = getattr(tuner, "configs_timings", None)  # (a list where Triton read it from its disk cache)
    ms = {c: _median_ms(t) for c, t in timings.items()} if isinstance(timings, dict) else {}
    ok = sorted((c for c in ms if ms[c] < float("inf")), key=ms.get)
    if len(ok) < 2 or _fmt_config(ok[0]) != pick or ms[ok[0]] <= 0:
        return ""

    def items(c: Any) -> Dict[str, str]:
        return {**{k: f"{k}={v}" for k, v in c.kwargs.items()}, "w": f"w{c.num_warps}", "s": f"s{c.num_stages}"}
    best = items(ok[0])
    alts = [f"+{100 * (ms[c] / ms[ok[0]] - 1):.1f}% " + (",".join(v for k, v in items(c).items() if best.get(k) != v)
                                                      or "(same)") for c in ok[1:MAX_TIMED_NOTED + 1]]
    if len(ok) > MAX_TIMED_NOTED + 1:
        alts.append(f"{len(ok) - 1 - MAX_TIMED_NOTED} slower not listed")
    failed = f", {len(ms) - len(ok)} failed" if len(ms) > len(ok) else ""
    return f"{name}: {len(ok)} timed{failed}, best {ms[ok[0]]:.4g} ms; " + "; ".join(alts)


def note_new_picks(row: Row, before: Dict[Tuple[str, Any], str], timings: bool = True) -> None:
    """Add to ``row.note`` what the autotuners picked for keys first seen since ``before`` (autotune_picks()),
    and (``timings``) for each autotuner that timed configs since then, how the others it timed compared
    (tuning_note; with several new keys, its last one's)."""
    now = autotune_picks()
    new = {k: cfg for k, cfg in now.items() if k[1] != _TIMINGS and k not in before}
    picks = sorted({f"{name}: {cfg}" for (name, _), cfg in new.items()})
    parts = [row.note] if row.note else []
    if picks:
        parts.append("autotuned " + " | ".join(picks))
    timed_ = []
    for name, tuner in _tuners() if timings else ():
        last = [cfg for (n, _), cfg in new.items() if n == name]  # (insertion order: the last tuned last)
        if last and now.get((name, _TIMINGS)) != before.get((name, _TIMINGS)):
            timed_.append(tuning_note(name, tuner, last[-1]))
    if any(timed_):
        parts.append(TIMED_NOTE + " | ".join(t for t in timed_ if t))
    row.note = "; ".join(parts)


def timed(forward_factory: Callable[[], Tuple[Callable[..., Any], Sequence[torch.Tensor]]],
          make_args: Callable[[bool], Tuple[torch.Tensor, ...]], mode: str, ctx: Ctx,
          context: Callable[[], Any] = contextlib.nullcontext, compiled: bool = False) -> Callable[[Row], None]:
    """The job body: build the impl (inside ``context``), build the step, time it, fill the row."""

    def run(row: Row) -> None:
        if compiled:
            torch._dynamo.reset()  # fresh caches: no recompile limits, no dynamic shapes from earlier rows
        before = autotune_picks() if ctx.device.type == "cuda" else {}
        try:
            with context():
                forward, params = forward_factory()
                step = make_step(forward, make_args, params, mode, ctx)
                row.median_ms, row.p20_ms, row.p80_ms = time_fn(step, ctx.device, ctx.warmup_ms, ctx.rep_ms,
                                                                  ctx.timer)
        finally:
            if compiled:
                torch._dynamo.reset()  # drop the compiled graphs (and the tensors their guards hold)
        if ctx.device.type == "cuda":
            note_new_picks(row, before)

    return run


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(fn, dynamic=False)


def const(fn: Callable[..., Any]) -> Callable[[], Tuple[Callable[..., Any], Sequence[torch.Tensor]]]:
    """A forward factory for a plain function (bound now, not at run time: rows are built in loops)."""
    return lambda: (fn, ())


def compile_of(fn: Callable[..., Any]) -> Callable[[], Tuple[Callable[..., Any], Sequence[torch.Tensor]]]:
    """A forward factory that compiles ``fn`` when the row runs (after the dynamo reset)."""
    return lambda: (_compiled(fn), ())


# ---------------------------------------------------------------------------------------------
# The ops


def optional_layernorms() -> List[Tuple[str, Callable[..., torch.Tensor]]]:
    """Third-party fused LayerNorms, when installed: [(impl label, f(x, w, b, eps))]."""
    out: List[Tuple[str, Callable[..., torch.Tensor]]] = []
    try:
        from liger_kernel.transformers.functional import liger_layer_norm  # type: ignore
        out.append(("liger", lambda x, w, b, eps: liger_layer_norm(x, w, b, eps)))
    except Exception:
        pass
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine  # type: ignore
        out.append(("apex", lambda x, w, b, eps: fused_layer_norm_affine(x, w, b, (x.shape[-1],), eps)))
    except Exception:
        pass
    return out


def _ln_setting(ctx: Ctx, dims: Sequence[int]) -> Tuple[Tuple[int, int], Sequence[int], str, int, str]:
    """LayerNorm rows' (rows, widths, dtype name, element size, kernel note); quick runs: tiny ones."""
    rows, dims = (QUICK_LN_ROWS, QUICK_LN_DIMS) if ctx.quick else (LN_ROWS, dims)
    return rows, dims, dtype_name(ctx.dtype), torch.empty((), dtype=ctx.dtype).element_size(), kernel_note("layernorm")


def layernorm_jobs(ctx: Ctx) -> Tuple[List[Job], List[Job]]:
    from flashvit.kernels import add_layer_norm, layer_norm
    rows, dims, dt, e, knote = _ln_setting(ctx, LN_DIMS)
    main: List[Job] = []
    late: List[Job] = []
    for D in dims:
        shape = (*rows, D)
        M = rows[0] * rows[1]
        sd = {"rows": f"{rows[0]}x{rows[1]}", "D": D}

        def args_ln(grad: bool, shape=shape, D=D) -> Tuple[torch.Tensor, ...]:
            return (_randn(shape, ctx, grad=grad), _randn((D,), ctx, 0.1, grad, offset=1.0), _randn((D,), ctx, 0.1, grad))

        def args_add(grad: bool, shape=shape, D=D) -> Tuple[torch.Tensor, ...]:
            return (_randn(shape, ctx, grad=grad), _randn(shape, ctx, grad=grad),
                    _randn((D,), ctx, 0.1, grad, offset=1.0), _randn((D,), ctx, 0.1, grad))

        def eager_ln(x, w, b, D=D):
            return F.layer_norm(x, (D,), w, b, LN_EPS)

        def eager_add(x, r, w, b, D=D):
            h = x + r
            return F.layer_norm(h, (D,), w, b, LN_EPS), h

        def ours_ln(x, w, b):
            return layer_norm(x, w, b, LN_EPS, backend="triton")

        def ours_add(x, r, w, b):
            return add_layer_norm(x, r, w, b, LN_EPS, backend="triton")

        for name, args, ours, eager, n_in, n_out in (("layer_norm", args_ln, ours_ln, eager_ln, 1, 1),
                                                    ("add_layer_norm", args_add, ours_add, eager_add, 2, 2)):
            for mode in ("fwd", "fwd+bwd"):
                fwd_bytes = (n_in + n_out) * M * D * e + 2 * D * e
                bwd_bytes = (n_out + 1 + 1) * M * D * e + 4 * D * e  # read dy (+dh) and x/h, write dx; dw, db
                nbytes = fwd_bytes + (bwd_bytes if mode == "fwd+bwd" else 0)

                def mk(impl: str, baseline: bool = False, note: str = "", name=name, sd=sd, mode=mode,
                       nbytes=nbytes) -> Row:
                    return Row("ops", name, dict(sd), dt, mode, impl, baseline=baseline, bytes=float(nbytes),
                               note=note)

                main.append(Job(mk("flashvit", note=knote), timed(const(ours), args, mode, ctx),
                                unavailable=ctx.triton_reason))
                if mode == "fwd+bwd" and ctx.timer == "graph":  # the backward's forms not yet timed (device time
                    for tag, chunks, prefetch in LN_BWD_FORMS:  # only: the host would hide them)
                        main.append(Job(mk(f"flashvit[{tag}]", note=knote),
                                        timed(const(ours), args, mode, ctx,
                                              context=functools.partial(_ln_bwd_context, chunks, prefetch)),
                                        unavailable=ctx.triton_reason or (ln_chunks_note(D) if chunks else "")))
                main.append(Job(mk("eager", baseline=True), timed(const(eager), args, mode, ctx)))
                if name == "layer_norm" and ctx.device.type == "cuda":
                    for label_, f in optional_layernorms():
                        main.append(Job(mk(label_), timed(const(lambda x, w, b, f=f: f(x, w, b, LN_EPS)), args, mode,
                                                          ctx)))
                late.append(Job(mk("compile(eager)"), timed(compile_of(eager), args, mode, ctx,
                                                            compiled=True),
                                unavailable="" if ctx.compile_ok else ctx.compile_note, min_s=ctx.compile_min_s))
    return main, late


DROP_PATH_P = 0.1  # DeiT-B's stochastic depth rate


def drop_path_jobs(ctx: Ctx) -> Tuple[List[Job], List[Job]]:
    """Stochastic depth's residual add in training: add_layer_norm with the factor per sample (x_scale) vs eager's
    drop_path (a multiply) + add + LayerNorm, and torch.compile of that; rows 256x197 (B = 256 samples)."""
    from flashvit.kernels import add_layer_norm
    rows, dims, dt, e, knote = _ln_setting(ctx, LN_DIMS[:2])
    main: List[Job] = []
    late: List[Job] = []
    for D in dims:
        shape = (*rows, D)
        sd = {"rows": f"{rows[0]}x{rows[1]}", "D": D, "p": DROP_PATH_P}
        M = rows[0] * rows[1]

        def args(grad: bool, shape=shape, D=D) -> Tuple[torch.Tensor, ...]:
            keep = 1.0 - DROP_PATH_P
            s = (torch.rand(shape[0], device=ctx.device) < keep).to(ctx.dtype) / keep  # (B,), no grad
            return (_randn(shape, ctx, grad=grad), _randn(shape, ctx, grad=grad),
                    _randn((D,), ctx, 0.1, grad, offset=1.0), _randn((D,), ctx, 0.1, grad), s)

        def eager(x, r, w, b, s, D=D):
            h = r + x * s.view(-1, 1, 1)  # timm: x + drop_path(a)
            return F.layer_norm(h, (D,), w, b, LN_EPS), h

        def ours(x, r, w, b, s):
            return add_layer_norm(x, r, w, b, LN_EPS, x_scale=s, backend="triton")

        for mode in ("fwd", "fwd+bwd"):
            # forward: x, r in, y, h out; backward: dy, dh, h in, dr and dx (= s·dr) out
            nbytes = 4 * M * D * e + (5 * M * D * e if mode == "fwd+bwd" else 0)

            def mk(impl: str, baseline: bool = False, note: str = "", mode=mode, nbytes=nbytes, sd=sd) -> Row:
                return Row("ops", "add_layer_norm+drop_path", dict(sd), dt, mode, impl, baseline=baseline,
                           bytes=float(nbytes), note=note)

            _ours_eager_compiled(main, late, mk, ours, eager, args, mode, ctx, knote)
    return main, late


def layer_scale_jobs(ctx: Ctx) -> Tuple[List[Job], List[Job]]:
    """A LayerScale block's proj: x + γ ⊙ (o·Wᵀ + b) with γ (and the residual) in the GEMM's epilogue vs eager's
    linear, multiply and add, and torch.compile of that; proj's shape (M = 256·197 tokens, D -> D) at ViT-B/L."""
    from flashvit.kernels import linear
    shapes = QUICK_MLP_SHAPES if ctx.quick else MLP_SHAPES
    dt = dtype_name(ctx.dtype)
    knote = kernel_note("linear")
    main: List[Job] = []
    late: List[Job] = []
    for label_, M, D, _ in shapes:
        sd = {"model": label_, "M": M, "N": D, "K": D}

        def args(grad: bool, M=M, D=D) -> Tuple[torch.Tensor, ...]:
            return (_randn((M, D), ctx, grad=grad), _randn((D, D), ctx, D ** -0.5, grad), _randn((D,), ctx, 0.1, grad),
                    _randn((D,), ctx, 0.1, grad), _randn((M, D), ctx, grad=grad))

        def ours(o, w, b, g, x):
            return linear(o, w, b, residual=x, layer_scale=g, backend="triton")

        def eager(o, w, b, g, x):
            return x + F.linear(o, w, b) * g  # timm's x + ls1(proj(o))

        for mode in ("fwd", "fwd+bwd"):
            flops = 2.0 * M * D * D * (3 if mode == "fwd+bwd" else 1)

            def mk(impl: str, baseline: bool = False, note: str = "", sd=sd, mode=mode, flops=flops) -> Row:
                return Row("ops", "linear+layerscale", dict(sd), dt, mode, impl, baseline=baseline, flops=flops,
                           note=note)

            _ours_eager_compiled(main, late, mk, ours, eager, args, mode, ctx, knote)
    return main, late


def ln_chunks_note(d: int) -> str:
    """'' where LayerNorm's backward splits width ``d`` into two column chunks (use_ln_chunks), else why not."""
    L = importlib.import_module("flashvit.kernels.layernorm")
    with L.use_ln_chunks(True):
        return "" if L._bwd_chunks(d, L._config(d)[0])[1] else f"D={d} fills its block: no column chunks"


# LayerNorm backward forms with graph rows: (tag, use_ln_chunks, use_ln_prefetch)
# (tag, column chunks, prefetch), each forced (the default lets the autotuner pick both)
LN_BWD_FORMS = (("padded", False, False), ("chunks", True, False), ("prefetch", False, True),
                ("chunks+prefetch", True, True))


@contextlib.contextmanager
def _ln_bwd_context(chunks: bool, prefetch: bool) -> Iterator[None]:
    """LayerNorm's backward with its column chunks (use_ln_chunks) and next-rows prefetch (use_ln_prefetch)
    forced on or off."""
    L = importlib.import_module("flashvit.kernels.layernorm")
    with L.use_ln_chunks(chunks), L.use_ln_prefetch(prefetch):
        yield


def _fused_context(tail: bool = False) -> Any:
    """The fused backward (use_bwd_fused) on; ``tail``: the forward's and the backward's split loops forced on
    too (else the forward's loop form is the default's: the autotuner's)."""
    attn = importlib.import_module("flashvit.kernels.attention")
    return _stacked(attn.use_bwd_fused(True), *((attn.use_fwd_tail(True), attn.use_bwd_tail(True)) if tail else ()))


def _tail_context(rows: bool = False, on: bool = True) -> Any:
    """The forward's and the backward's split loops (use_fwd_tail, use_bwd_tail) forced on (``on`` False: the
    masked loops, the default before the autotuner picked the form); ``rows``: their row splits
    (use_fwd_rows, use_bwd_rows) too."""
    attn = importlib.import_module("flashvit.kernels.attention")
    return _stacked(attn.use_fwd_tail(on), attn.use_bwd_tail(on), attn.use_fwd_rows(rows), attn.use_bwd_rows(rows))


def _lag_context() -> Any:
    """The forward's lagged P·V (use_fwd_lag: the split loop, each full key block's P·V one block late) forced
    on; the backward as the default's."""
    return importlib.import_module("flashvit.kernels.attention").use_fwd_lag(True)


def _persist_context() -> Any:
    """The persistent forward (use_fwd_persist: programs looping over tiles, the key loop masked) forced on; the
    backward as the default's."""
    return importlib.import_module("flashvit.kernels.attention").use_fwd_persist(True)


def _sdpa_backends() -> List[Tuple[str, Any]]:
    try:
        from torch.nn.attention import SDPBackend
    except Exception:
        return []
    out = []
    for label_, member in (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-efficient", "EFFICIENT_ATTENTION"),
                           ("sdpa-cudnn", "CUDNN_ATTENTION"), ("sdpa-math", "MATH")):
        if hasattr(SDPBackend, member):
            out.append((label_, getattr(SDPBackend, member)))
    return out


def _sdpa_context(backend: Any) -> Callable[[], Any]:
    def ctx_factory():
        from torch.nn.attention import sdpa_kernel
        return sdpa_kernel(backend)
    return ctx_factory


def head_dim_modes(head_dim: int) -> List[str]:
    """['pad', 'split'] when the attention kernels can split ``head_dim`` (this build), else []."""
    A = importlib.import_module("flashvit.kernels.attention")
    if not hasattr(A, "use_head_split"):
        return []
    with A.use_head_split("split"):
        return ["pad", "split"] if A._split_dims(head_dim)[1] else []


def _head_dim_context(mode: str) -> Callable[[], Any]:
    return lambda: importlib.import_module("flashvit.kernels.attention").use_head_split(mode)


def attention_jobs(ctx: Ctx) -> Tuple[List[Job], List[Job]]:
    from flashvit.kernels import attention, qkv_attention
    shapes = QUICK_ATTN_SHAPES if ctx.quick else ATTN_SHAPES
    dt = dtype_name(ctx.dtype)
    knote = kernel_note("attention")
    try:
        from flash_attn import flash_attn_qkvpacked_func  # type: ignore
    except Exception:
        flash_attn_qkvpacked_func = None
    main: List[Job] = []
    late: List[Job] = []
    for B, H, N, D in shapes:
        sd = {"B": B, "H": H, "N": N, "D": D}
        fwd_flops = 4.0 * B * H * N * N * D

        def args(grad: bool, B=B, N=N, H=H, D=D) -> Tuple[torch.Tensor, ...]:
            return (_randn((B, N, 3 * H * D), ctx, grad=grad),)

        def ours_packed(qkv, H=H):
            return qkv_attention(qkv, H, backend="triton")

        def ours_bnhd(qkv, B=B, N=N, H=H, D=D):
            q, k, v = qkv.view(B, N, 3, H, D).unbind(2)  # strided (B, N, H, D) views, no copies
            return attention(q, k, v, backend="triton").reshape(B, N, H * D)

        def sdpa(qkv, B=B, N=N, H=H, D=D):
            # timm's layout: permute to (3, B, H, N, D), then transpose + reshape (a copy) back to (B, N, H·D)
            q, k, v = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, H * D)

        def fa_packed(qkv, B=B, N=N, H=H, D=D):
            return flash_attn_qkvpacked_func(qkv.view(B, N, 3, H, D)).reshape(B, N, H * D)

        for mode in ("fwd", "fwd+bwd"):
            flops = fwd_flops * (ATTN_FWD_BWD_FACTOR if mode == "fwd+bwd" else 1.0)

            def mk(impl: str, baseline: bool = False, note: str = "", sd=sd, mode=mode, flops=flops) -> Row:
                return Row("ops", "attention", dict(sd), dt, mode, impl, baseline=baseline, flops=flops, note=note)

            main.append(Job(mk("flashvit-qkv", note=knote), timed(const(ours_packed), args, mode, ctx),
                            unavailable=ctx.triton_reason))
            main.append(Job(mk("flashvit-bnhd", note=knote), timed(const(ours_bnhd), args, mode, ctx),
                            unavailable=ctx.triton_reason))
            for hd_mode in head_dim_modes(D):  # a non-power-of-two head dim: padded vs split, both measured
                main.append(Job(mk(f"flashvit-qkv[{hd_mode}]", note=knote),
                                timed(const(ours_packed), args, mode, ctx, context=_head_dim_context(hd_mode)),
                                unavailable=ctx.triton_reason))
            # the loops split into unmasked full blocks + a masked remainder (use_fwd_tail, use_bwd_tail) or all
            # masked, forced (the default lets the autotuner pick per tile): the fwd rows time the forward's,
            # fwd+bwd both
            main.append(Job(mk("flashvit-qkv[tail]", note=knote),
                            timed(const(ours_packed), args, mode, ctx, context=_tail_context),
                            unavailable=ctx.triton_reason))
            if mode == "fwd":  # the split loop with each full block's P·V one block late (use_fwd_lag), forced
                main.append(Job(mk("flashvit-qkv[lag]", note=knote),
                                timed(const(ours_packed), args, mode, ctx, context=_lag_context),
                                unavailable=ctx.triton_reason))
                # the persistent forward (use_fwd_persist), forced, where persistent_forward_fits (sm_90+)
                fits = importlib.import_module("flashvit.kernels.attention").persistent_forward_fits(
                    D, ctx.dtype, device=ctx.device)
                main.append(Job(mk("flashvit-qkv[persist]", note=knote),
                                timed(const(ours_packed), args, mode, ctx, context=_persist_context),
                                unavailable=ctx.triton_reason or ("" if fits else
                                                                  f"no persistent forward at D={D}, {dt} here")))
            main.append(Job(mk("flashvit-qkv[masked]", note=knote),
                            timed(const(ours_packed), args, mode, ctx,
                                  context=functools.partial(_tail_context, on=False)),
                            unavailable=ctx.triton_reason))
            # and each kernel's rows past its last full 64-row block in 16-row blocks (use_fwd_rows, use_bwd_rows)
            main.append(Job(mk("flashvit-qkv[tail+rows]", note=knote),
                            timed(const(ours_packed), args, mode, ctx,
                                  context=functools.partial(_tail_context, rows=True)),
                            unavailable=ctx.triton_reason))
            if mode == "fwd+bwd":  # the backward in one kernel a head (use_bwd_fused); the forward is the default's
                fits = importlib.import_module("flashvit.kernels.attention").fused_backward_fits(D, ctx.dtype)
                for tag, context in (("fused", _fused_context), ("fused+tail", functools.partial(_fused_context, True))):
                    # (+tail: the split loops too, unmasked full blocks in both passes: [tail]'s, fused)
                    main.append(Job(mk(f"flashvit-qkv[{tag}]", note=knote),
                                    timed(const(ours_packed), args, mode, ctx, context=context),
                                    unavailable=ctx.triton_reason or ("" if fits else
                                                                      f"no fused-backward tile fits D={D}, {dt}")))
            main.append(Job(mk("sdpa-auto", baseline=True, note="timm's path: PyTorch picks the backend"),
                            timed(const(sdpa), args, mode, ctx)))
            for label_, backend in _sdpa_backends():
                why = ""
                if label_ == "sdpa-math" and B * H * N * N > MATH_MAX_SCORES:
                    why = f"MATH left out at B·H·N² > 2^{MATH_MAX_SCORES.bit_length() - 1} (slow, N² memory)"
                main.append(Job(mk(label_), timed(const(sdpa), args, mode, ctx, context=_sdpa_context(backend)),
                                unavailable=why))
            fa_why = ""
            if flash_attn_qkvpacked_func is None:
                fa_why = "flash-attn not installed"
            elif ctx.device.type != "cuda" or ctx.dtype not in (torch.float16, torch.bfloat16):
                fa_why = "flash-attn needs CUDA fp16/bf16"
            main.append(Job(mk("flash-attn"), timed(const(fa_packed), args, mode, ctx), unavailable=fa_why))
            late.append(Job(mk("compile(sdpa)"), timed(compile_of(sdpa), args, mode, ctx, compiled=True),
                            unavailable="" if ctx.compile_ok else ctx.compile_note, min_s=ctx.compile_min_s))
    main += _attention_dropout_jobs(ctx, shapes[0], dt, knote)
    return main, late


def _attention_dropout_jobs(ctx: Ctx, shape: Tuple[int, int, int, int], dt: str, knote: str) -> List[Job]:
    """Training with attention dropout (timm's attn_drop): our kernels' Philox mask vs SDPA's default backend's."""
    from flashvit.kernels import qkv_attention
    B, H, N, D = shape
    p = ATTN_DROPOUT_P
    sd = {"B": B, "H": H, "N": N, "D": D, "p": p}
    flops = 4.0 * B * H * N * N * D * ATTN_FWD_BWD_FACTOR

    def args(grad: bool) -> Tuple[torch.Tensor, ...]:
        return (_randn((B, N, 3 * H * D), ctx, grad=grad),)

    def ours(qkv):
        return qkv_attention(qkv, H, dropout_p=p, backend="triton")

    def sdpa(qkv):
        q, k, v = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p).transpose(1, 2).reshape(B, N, H * D)

    def mk(impl: str, baseline: bool = False, note: str = "") -> Row:
        return Row("ops", "attention", dict(sd), dt, "fwd+bwd", impl, baseline=baseline, flops=flops, note=note)

    return [Job(mk("sdpa-auto", baseline=True, note="timm's path with attn_drop"),
                timed(const(sdpa), args, "fwd+bwd", ctx)),
            Job(mk("flashvit-qkv[dropout]", note=knote), timed(const(ours), args, "fwd+bwd", ctx),
                unavailable=ctx.triton_reason)]


class EagerMLP(nn.Module):
    """timm's Mlp + the block's residual add, in plain PyTorch: fc2(GELU(fc1(x))) + residual."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x))) + residual


@contextlib.contextmanager
def _stacked(*cms: Any) -> Any:
    """Several context managers entered as one (a row's ``context`` factory returns one)."""
    with contextlib.ExitStack() as stack:
        for cm in cms:
            stack.enter_context(cm)
        yield


def mlp_jobs(ctx: Ctx) -> Tuple[List[Job], List[Job]]:
    from flashvit.kernels import FusedMLP, linear, use_backend
    lin_mod = importlib.import_module("flashvit.kernels.linear")
    shapes = QUICK_MLP_SHAPES if ctx.quick else MLP_SHAPES
    dt = dtype_name(ctx.dtype)
    knote = kernel_note("linear")
    variants = gemm_variants()
    main: List[Job] = []
    late: List[Job] = []
    for label_, M, D, Hd in shapes:
        sd = {"model": label_, "M": M, "D": D, "hidden": Hd}

        def args(grad: bool, M=M, D=D) -> Tuple[torch.Tensor, ...]:
            return (_randn((M, D), ctx, grad=grad), _randn((M, D), ctx, grad=grad))

        def eager_module(D=D, Hd=Hd) -> EagerMLP:
            torch.manual_seed(0)
            return EagerMLP(D, Hd).to(ctx.device, ctx.dtype)

        def ours_factory(D=D, Hd=Hd, eager_module=eager_module):
            m = FusedMLP(D, Hd).to(ctx.device, ctx.dtype)
            m.load_state_dict(eager_module().state_dict())

            def run(x, r):
                with use_backend("triton"):  # our kernels, also where 'auto' would pick eager (training)
                    return m(x, residual=r)
            return run, list(m.parameters())

        def eager_factory(eager_module=eager_module):
            m = eager_module()
            return m, list(m.parameters())

        def compile_factory(eager_module=eager_module):
            m = eager_module()
            return _compiled(m), list(m.parameters())

        for mode in ("fwd", "fwd+bwd"):
            flops = 4.0 * M * D * Hd * (3 if mode == "fwd+bwd" else 1)

            def mk(impl: str, baseline: bool = False, note: str = "", sd=sd, mode=mode, flops=flops) -> Row:
                return Row("ops", "mlp", dict(sd), dt, mode, impl, baseline=baseline, flops=flops, note=note)

            for suffix, vctx in variants:
                main.append(Job(mk("flashvit" + suffix, note=knote), timed(ours_factory, args, mode, ctx, context=vctx),
                                unavailable=ctx.triton_reason))
            main.append(Job(mk("eager", baseline=True), timed(eager_factory, args, mode, ctx)))
            late.append(Job(mk("compile(eager)"), timed(compile_factory, args, mode, ctx, compiled=True),
                            unavailable="" if ctx.compile_ok else ctx.compile_note, min_s=ctx.compile_min_s))

        # The plain GEMM (fc1's shape, no epilogue): our linear vs torch.matmul.
        gd = {"model": label_, "M": M, "N": Hd, "K": D}

        def gargs(grad: bool, M=M, D=D, Hd=Hd) -> Tuple[torch.Tensor, ...]:
            return (_randn((M, D), ctx, grad=grad), _randn((Hd, D), ctx, D ** -0.5, grad))

        def ours_gemm(x, w):
            return linear(x, w, backend="triton")

        def mm(x, w):
            return torch.matmul(x, w.t())

        for mode in ("fwd", "fwd+bwd"):
            flops = 2.0 * M * D * Hd * (3 if mode == "fwd+bwd" else 1)
            # fwd+bwd: our GEMM paths also without split-K in the weight gradient (what the split buys)
            nosplit = [(f"{sfx}[nosplit]", (lambda v=v: _stacked(v(), lin_mod.use_split_k(1))))
                       for sfx, v in variants if sfx in ("[gemm=triton]", "[gemm=tma]")] if mode == "fwd+bwd" else []
            # (a GEMM alone has no epilogue: 'hybrid' would time cuBLAS again)
            for suffix, vctx in [v for v in variants if v[0] != "[gemm=hybrid]"] + nosplit:
                main.append(Job(Row("ops", "gemm", dict(gd), dt, mode, "flashvit" + suffix, flops=flops, note=knote),
                                timed(const(ours_gemm), gargs, mode, ctx, context=vctx),
                                unavailable=ctx.triton_reason))
            main.append(Job(Row("ops", "gemm", dict(gd), dt, mode, "torch.matmul", baseline=True, flops=flops),
                            timed(const(mm), gargs, mode, ctx)))
    return main, late


def gemm_sweep_candidates() -> List[Tuple[str, Tuple[int, int, int, int, int], bool]]:
    """[(kernel, config, flatten)] in priority order: the shipped sm_90 lists (TMA, then tiled), the TMA list with
    the other FLATTEN, then the TMA grid and the extra tiled configs that fit sm_90's shared memory."""
    lin = importlib.import_module("flashvit.kernels.linear")
    flat, tma, tiled = lin.TMA_FLATTEN, list(lin.TMA_CONFIGS_16), list(lin.SM90_CONFIGS_16)
    out = [("tma", c, flat) for c in tma] + [("triton", c, flat) for c in tiled] + [("tma", c, not flat) for c in tma]
    out += [("tma", c, flat) for c in TMA_SWEEP_GRID if c not in tma and lin.tma_config_fits(c, False)]
    out += [("triton", c, flat) for c in GEMM_SWEEP_EXTRA
            if c not in tiled and 2 * c[4] * (c[0] * c[2] + c[2] * c[1]) <= lin._TMA_SMEM_LIMIT]
    return out


def sweep_label(kernel: str, cfg: Sequence[int], flatten: bool) -> str:
    bm, bn, bk, w, st = cfg
    return f"flashvit[{kernel}:{bm}x{bn}x{bk},w{w},s{st}{'' if flatten or kernel != 'tma' else ',noflat'}]"


def gemm_config_jobs(ctx: Ctx) -> Tuple[List[Job], List[Job]]:
    """Rows of the per-config GEMM sweep: fwd only, one row per (candidate, shape), torch.matmul as baseline
    (op_jobs orders them shape by shape: fc1's first). Each candidate is a compile of its own: run the sweep
    with ``--prewarm N`` (compiles in N processes first)."""
    from flashvit.kernels import linear
    lin = importlib.import_module("flashvit.kernels.linear")
    shapes = QUICK_GEMM_SWEEP_SHAPES if ctx.quick else GEMM_SWEEP_SHAPES
    dt = dtype_name(ctx.dtype)
    cands = gemm_sweep_candidates()
    hopper = ctx.device.type == "cuda" and torch.cuda.get_device_capability(ctx.device)[0] >= 9

    def args(grad: bool, M: int, N: int, K: int) -> Tuple[torch.Tensor, ...]:
        return (_randn((M, K), ctx), _randn((N, K), ctx, K ** -0.5))

    def ours(kernel: str, cfg: Tuple[int, int, int, int, int], flatten: bool):
        def factory():
            def run(x, w):
                with lin.use_gemm(kernel), lin.use_gemm_config(kernel, cfg, flatten):
                    return linear(x, w, backend="triton")
            return run, ()
        return factory

    main: List[Job] = []
    for name, M, N, K in shapes:
        sd = {"gemm": name, "M": M, "N": N, "K": K}
        main.append(Job(Row("ops", "gemm-configs", dict(sd), dt, "fwd", "torch.matmul", baseline=True,
                            flops=2.0 * M * N * K),
                        timed(const(lambda x, w: torch.matmul(x, w.t())), functools.partial(args, M=M, N=N, K=K),
                              "fwd", ctx)))
    for kernel, cfg, flatten in cands:
        why = ctx.triton_reason or ("" if kernel != "tma" or hopper else "the TMA kernel runs on sm_90+ only")
        for name, M, N, K in shapes:
            sd = {"gemm": name, "M": M, "N": N, "K": K}
            main.append(Job(Row("ops", "gemm-configs", dict(sd), dt, "fwd", sweep_label(kernel, cfg, flatten),
                                flops=2.0 * M * N * K),
                            timed(ours(kernel, cfg, flatten), functools.partial(args, M=M, N=N, K=K), "fwd", ctx),
                            unavailable=why))
    return main, []


def _ours_eager_compiled(main: List[Job], late: List[Job], mk: Callable[..., Row], ours: Callable[..., Any],
                         eager: Callable[..., Any], args: Callable[[bool], Tuple[torch.Tensor, ...]], mode: str,
                         ctx: Ctx, knote: str) -> None:
    """One (shape, mode)'s rows: ours and the eager baseline (main), torch.compile of eager (late)."""
    main.append(Job(mk("flashvit", note=knote), timed(const(ours), args, mode, ctx), unavailable=ctx.triton_reason))
    main.append(Job(mk("eager", baseline=True), timed(const(eager), args, mode, ctx)))
    late.append(Job(mk("compile(eager)"), timed(compile_of(eager), args, mode, ctx, compiled=True),
                    unavailable="" if ctx.compile_ok else ctx.compile_note, min_s=ctx.compile_min_s))


def _attention_modes(main: List[Job], late: List[Job], name: str, sd: Dict[str, Any], B: int, H: int, N: int,
                     D: int, ours: Callable[..., Any], eager: Callable[..., Any],
                     args: Callable[[bool], Tuple[torch.Tensor, ...]], ctx: Ctx, knote: str) -> None:
    """An attention-shaped family's rows at one shape (``_ours_eager_compiled``), fwd and fwd+bwd, in attention
    TFLOP/s (4·B·H·N²·D a forward)."""
    for mode in ("fwd", "fwd+bwd"):
        flops = 4.0 * B * H * N * N * D * (ATTN_FWD_BWD_FACTOR if mode == "fwd+bwd" else 1.0)

        def mk(impl: str, baseline: bool = False, note: str = "", mode=mode, flops=flops) -> Row:
            return Row("ops", name, dict(sd), dtype_name(ctx.dtype), mode, impl, baseline=baseline, flops=flops,
                       note=note)

        _ours_eager_compiled(main, late, mk, ours, eager, args, mode, ctx, knote)


def patch_embed_jobs(ctx: Ctx) -> Tuple[List[Job], List[Job]]:
    from flashvit.kernels import patch_embed
    shapes = QUICK_PATCH_SHAPES if ctx.quick else PATCH_SHAPES
    dt = dtype_name(ctx.dtype)
    knote = kernel_note("patch_embed")
    main: List[Job] = []
    late: List[Job] = []
    for label_, B, img, p, D in shapes:
        L = (img // p) ** 2
        sd = {"model": label_, "B": B, "img": img, "patch": p, "D": D}

        def args(grad: bool, B=B, img=img, p=p, D=D, L=L) -> Tuple[torch.Tensor, ...]:
            return (_randn((B, 3, img, img), ctx), _randn((D, 3, p, p), ctx, 0.02, grad), _randn((D,), ctx, 0.02, grad),
                    _randn((1, L + 1, D), ctx, 0.02, grad), _randn((1, 1, D), ctx, 0.02, grad))

        def ours(images, w, b, pos, cls):
            return patch_embed(images, w, b, pos, cls, backend="triton")

        def eager(images, w, b, pos, cls, p=p):
            x = F.conv2d(images, w, b, stride=p)  # 1. conv
            x = x.flatten(2).transpose(1, 2)  # 2. flatten, 3. transpose -> (B, L, D)
            x = torch.cat((cls.expand(x.shape[0], -1, -1), x), dim=1)  # 4. prepend the class token
            return x + pos  # 5. position embedding

        for mode in ("fwd", "fwd+bwd"):
            flops = 2.0 * B * L * D * 3 * p * p * (2 if mode == "fwd+bwd" else 1)

            def mk(impl: str, baseline: bool = False, note: str = "", sd=sd, mode=mode, flops=flops) -> Row:
                return Row("ops", "patch_embed", dict(sd), dt, mode, impl, baseline=baseline, flops=flops, note=note)

            _ours_eager_compiled(main, late, mk, ours, eager, args, mode, ctx, knote)
    return main, late


def swiglu_jobs(ctx: Ctx) -> Tuple[List[Job], List[Job]]:
    """silu(gate)·up from the packed (M, 2H) fc1 output: ours (one pass each way) vs eager's chunk, silu and
    product (and their backward), in GB/s of the bytes each direction must move (2H read + H written forward;
    H + 2H read, 2H written backward)."""
    from flashvit.kernels import swiglu_packed
    dt = dtype_name(ctx.dtype)
    knote = kernel_note("glu")
    main: List[Job] = []
    late: List[Job] = []
    for label_, M, H in QUICK_SWIGLU_SHAPES if ctx.quick else SWIGLU_SHAPES:
        sd = {"model": label_, "M": M, "H": H}

        def args(grad: bool, M=M, H=H) -> Tuple[torch.Tensor, ...]:
            return (_randn((M, 2 * H), ctx, 1.0, grad),)

        def ours(x):
            return swiglu_packed(x, backend="triton")

        def eager(x):
            gate, up = x.chunk(2, dim=-1)
            return F.silu(gate) * up

        for mode in ("fwd", "fwd+bwd"):
            nbytes = ctx.dtype.itemsize * M * H * (3 + (5 if mode == "fwd+bwd" else 0))

            def mk(impl: str, baseline: bool = False, note: str = "", sd=sd, mode=mode, nbytes=nbytes) -> Row:
                return Row("ops", "swiglu", dict(sd), dt, mode, impl, baseline=baseline, bytes=float(nbytes),
                           note=note)

            _ours_eager_compiled(main, late, mk, ours, eager, args, mode, ctx, knote)
    return main, late


def rope_attention_jobs(ctx: Ctx) -> Tuple[List[Job], List[Job]]:
    """Attention with rotary q, k from packed qkv (timm's EvaAttention: EVA-02, DINOv3): ours (one RoPE pass
    writing q and k, the flash kernels, dq/dk rotated back in place) vs eager (timm's steps: slices, rotation,
    concatenation, SDPA, the layout copies) and torch.compile of eager, in attention TFLOP/s; and inference from
    the block's x, the qkv GEMM included (rope_qkv_attention: RoPE in the GEMM's epilogue)."""
    from flashvit.kernels import linear, qkv_attention, qkv_attention_reference, qkv_rope_linear
    dt = dtype_name(ctx.dtype)
    knote = kernel_note("rope")
    main: List[Job] = []
    late: List[Job] = []
    for label_, B, H, N, D, P, half in QUICK_ROPE_SHAPES if ctx.quick else ROPE_SHAPES:
        sd = {"model": label_, "B": B, "H": H, "N": N, "D": D, "prefix": P, "half": int(half)}
        ang = torch.rand((N - P, D // 2), device=ctx.device) * 6.28  # a fixed (no-grad) fp32 table
        rope = torch.cat([ang.sin(), ang.cos()] * 2 if half else
                         [ang.sin().repeat_interleave(2, -1), ang.cos().repeat_interleave(2, -1)], dim=-1)

        def args(grad: bool, B=B, N=N, H=H, D=D) -> Tuple[torch.Tensor, ...]:
            return (_randn((B, N, 3 * H * D), ctx, grad=grad),)

        def ours(qkv, H=H, P=P, half=half, rope=rope):
            return qkv_attention(qkv, H, rope=rope, rope_prefix=P, rope_half=half, backend="triton")

        def eager(qkv, H=H, P=P, half=half, rope=rope):
            return qkv_attention_reference(qkv, H, rope=rope, rope_prefix=P, rope_half=half)

        _attention_modes(main, late, "rope_attention", sd, B, H, N, D, ours, eager, args, ctx, knote)

        # Inference from the block's x (B, N, C = H·D): the qkv GEMM with RoPE in its epilogue (qkv_rope_linear)
        # then the plain packed attention, vs the GEMM then qkv_attention(rope=...) ([rope=pass]: one more pass
        # over q and k), vs eager (F.linear and timm's steps); TFLOP/s of the GEMM and the attention.
        C = H * D

        def args_x(grad: bool, B=B, N=N, C=C) -> Tuple[torch.Tensor, ...]:
            return (_randn((B, N, C), ctx), _randn((3 * C, C), ctx, C ** -0.5), _randn((3 * C,), ctx, 0.02))

        def ours_x(x, w, b, H=H, P=P, half=half, rope=rope):
            return qkv_attention(qkv_rope_linear(x, w, b, H, rope, P, half, backend="triton"), H, backend="triton")

        def pass_x(x, w, b, H=H, P=P, half=half, rope=rope):
            return qkv_attention(linear(x, w, b, backend="triton"), H, rope=rope, rope_prefix=P, rope_half=half,
                                 backend="triton")

        def eager_x(x, w, b, H=H, P=P, half=half, rope=rope):
            return qkv_attention_reference(F.linear(x, w, b), H, rope=rope, rope_prefix=P, rope_half=half)

        flops = 2.0 * B * N * C * 3 * C + 4.0 * B * H * N * N * D

        def mk_x(impl: str, baseline: bool = False, note: str = "", sd=sd, flops=flops) -> Row:
            return Row("ops", "rope_qkv_attention", dict(sd), dt, "fwd", impl, baseline=baseline, flops=flops,
                       note=note)

        _ours_eager_compiled(main, late, mk_x, ours_x, eager_x, args_x, "fwd", ctx, knote)
        main.append(Job(mk_x("flashvit[rope=pass]"), timed(const(pass_x), args_x, "fwd", ctx),
                        unavailable=ctx.triton_reason))
    return main, late


def masked_attention_jobs(ctx: Ctx) -> Tuple[List[Job], List[Job]]:
    """Attention with a padding mask (timm's NaFlexViT, transformers' SigLIP2 on padded batches) or a learned bias
    (BEiT's; Swin's with its window mask): ours (the mask in the flash kernels, a bias's gradient from the backward
    kernel) vs SDPA with the mask (its own backend choice; the baseline) and torch.compile of it, in attention
    TFLOP/s (of the full N x N, masked scores included)."""
    from flashvit.kernels import attention, attention_reference
    knote = kernel_note("attention")
    main: List[Job] = []
    late: List[Job] = []
    for label_, B, H, N, D, kind in QUICK_MASK_SHAPES if ctx.quick else MASK_SHAPES:
        sd = {"model": label_, "B": B, "H": H, "N": N, "D": D, "mask": kind}
        if kind in ("learned", "window"):
            _learned_bias_modes(main, late, sd, B, H, N, D, kind, ctx, knote)
            continue
        lens = torch.full((B,), N, device=ctx.device)
        lens[: max(1, B // 4)] = max(1, N * 2 // 3)  # a quarter of the images: a third of their tokens padding
        keep = torch.arange(N, device=ctx.device)[None, :] < lens[:, None]
        mask = keep[:, None, None, :] if kind == "bool" else torch.where(
            keep[:, None, None, :], 0.0, torch.finfo(ctx.dtype).min).expand(B, 1, N, N).to(ctx.dtype).contiguous()

        def args(grad: bool, B=B, N=N, H=H, D=D) -> Tuple[torch.Tensor, ...]:
            return tuple(_randn((B, N, H, D), ctx, grad=grad) for _ in range(3))

        def ours(q, k, v, mask=mask):
            return attention(q, k, v, attn_mask=mask, backend="triton")

        def eager(q, k, v, mask=mask):
            return attention_reference(q, k, v, attn_mask=mask)

        _attention_modes(main, late, "masked_attention", sd, B, H, N, D, ours, eager, args, ctx, knote)
    return main, late


def _learned_bias_modes(main: List[Job], late: List[Job], sd: Dict[str, Any], B: int, H: int, N: int, D: int,
                        kind: str, ctx: Ctx, knote: str) -> None:
    """masked_attention_jobs' rows for a learned fp32 (1, H, N, N) bias (an input that gets its gradient), alone
    ("learned") or plus a 64-window 0 / -100 mask ("window", B a multiple of 64: Swin's (1, 64, H, N, N))."""
    from flashvit.kernels import attention, attention_reference
    nw = 64 if kind == "window" and B % 64 == 0 else 4
    win = torch.where(torch.rand(1, nw, 1, N, N, device=ctx.device) < 0.3, -100.0, 0.0)

    def args(grad: bool) -> Tuple[torch.Tensor, ...]:
        bias = torch.randn(1, H, N, N, device=ctx.device).requires_grad_(grad)
        return (*(_randn((B, N, H, D), ctx, grad=grad) for _ in range(3)), bias)

    def mask(bias: torch.Tensor) -> torch.Tensor:
        return bias if kind == "learned" else bias.unsqueeze(1) + win

    def ours(q, k, v, bias):
        return attention(q, k, v, attn_mask=mask(bias), backend="triton")

    def eager(q, k, v, bias):
        return attention_reference(q, k, v, attn_mask=mask(bias))

    _attention_modes(main, late, "masked_attention", sd, B, H, N, D, ours, eager, args, ctx, knote)


BUILDERS: Dict[str, Callable[[Ctx], Tuple[List[Job], List[Job]]]] = {
    "layernorm": layernorm_jobs,
    "attention": attention_jobs,
    "mlp": mlp_jobs,
    "patch_embed": patch_embed_jobs,
    "swiglu": swiglu_jobs,
    "rope": rope_attention_jobs,
    "mask": masked_attention_jobs,
    "droppath": drop_path_jobs,
    "layerscale": layer_scale_jobs,
    "gemm-configs": gemm_config_jobs,
}


def is_experimental(row: Row) -> bool:
    return any(tag in row.impl for tag in EXPERIMENTAL)


def _tag_rank(row: Row) -> int:
    return min((i for i, tag in enumerate(EXPERIMENTAL) if tag in row.impl), default=len(EXPERIMENTAL))


def select_rows(jobs: List[Job], rows: str, quick: bool = False) -> List[Job]:
    """'all'; 'settled': without the experimental rows; 'experimental': the groups that hold one, reduced to
    their baseline, our default row and the experimental rows (each experimental row then has its comparisons
    from the same process; the other variants are in the settled run); 'targets': the rows the issues' speed
    targets read (flashvit.bench.targets, at the --quick shapes with ``quick``) and their groups' baselines."""
    if rows == "all":
        return jobs
    if rows == "settled":
        return [j for j in jobs if not is_experimental(j.row)]
    if rows == "targets":
        from flashvit.bench.targets import all_targets, wanted
        targets = all_targets(quick)
        groups = {j.row.group() for j in jobs if wanted(j.row, targets)}
        return [j for j in jobs if j.row.group() in groups and (j.row.baseline or wanted(j.row, targets))]
    if rows != "experimental":
        raise ValueError(f"unknown row selection {rows!r}; expected all, settled, experimental or targets")
    # One group at a time, by their first experimental tag in EXPERIMENTAL's order, then shape by shape (the
    # op's first shape, ViT-B's, first: fwd and fwd+bwd), forward first: a budget that runs out still leaves the
    # first groups complete.
    exp = [j.row for j in jobs if is_experimental(j.row)]
    shapes = list(dict.fromkeys((r.name, str(r.shape)) for r in exp))
    order = list(dict.fromkeys(r.group() for r in sorted(
        exp, key=lambda r: (_tag_rank(r), shapes.index((r.name, str(r.shape))), r.mode != "fwd"))))
    keep = [j for j in jobs if j.row.group() in order
            and (j.row.baseline or is_experimental(j.row) or j.row.impl in ("flashvit", "flashvit-qkv"))]
    return sorted(keep, key=lambda j: (order.index(j.row.group()), not j.row.baseline, is_experimental(j.row)))


def op_jobs(ctx: Ctx, ops: Optional[Sequence[str]] = None) -> List[Job]:
    """All rows for ``ops`` (default: every op): the no-compile rows first, then the torch.compile rows.

    The no-compile rows take the op families in turn, one (shape, mode) group at a time, so a budget
    that runs out still leaves every family measured at its first shapes.
    """
    families: List[List[List[Job]]] = []
    late: List[Job] = []
    for op in ops or OPS:
        if op not in BUILDERS:
            raise ValueError(f"unknown op {op!r}; choose from {', '.join(BUILDERS)}")
        m, lt = BUILDERS[op](ctx)
        groups: Dict[Any, List[Job]] = {}
        for j in m:
            groups.setdefault(j.row.group(), []).append(j)
        families.append(list(groups.values()))
        late += lt
    main = [j for turn in itertools.zip_longest(*families) for group in turn if group for j in group]
    # torch.compile rows: the families whose issues compare against torch.compile first (MLP, LayerNorm).
    late.sort(key=lambda j: LATE_PRIORITY.index(j.row.name) if j.row.name in LATE_PRIORITY else len(LATE_PRIORITY))
    # Kernels not yet run on a GPU go after the others: a fault there (a lost CUDA context) cannot take the
    # established rows down with it.
    ordered = sorted(main, key=lambda j: is_experimental(j.row)) + late  # stable: the order within each part holds
    if ctx.timer == "graph":
        # Device time is asked for against torch.compile and the copy ceiling (LayerNorm's issue): one group at a
        # time, ours then torch.compile's then the rest, so a budget that runs out leaves whole pairs (run 5's
        # graph step ran out before every compile row but the first width's).
        def dim_rank(row: Row) -> int:
            d = row.shape.get("D") if row.name in ("layer_norm", "add_layer_norm") else None
            return GRAPH_LN_DIMS_ORDER.index(d) if d in GRAPH_LN_DIMS_ORDER else len(GRAPH_LN_DIMS_ORDER)
        group_pos = {g: i for i, g in enumerate(dict.fromkeys(j.row.group() for j in ordered))}
        rank = {"flashvit": 0, "compile(eager)": 1, **{f"flashvit[{tag}]": 2 + i for i, (tag, _, _) in
                                                        enumerate(LN_BWD_FORMS)}}
        ordered = sorted(ordered, key=lambda j: (dim_rank(j.row), group_pos[j.row.group()],
                                                 rank.get(j.row.impl, len(rank))))
    return ordered

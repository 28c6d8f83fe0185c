"""The kernel issues' speed targets, judged from the files one benchmark run wrote (no number typed by hand).

    python -m flashvit.bench targets --out RESULTS_DIR [--summary RESULTS_DIR/targets.txt]

Each target names the rows it compares (op or model, shape, mode, our impl, the impls it is held against) and a
floor; the verdict is read from ``ops-graph.json``, ``ops.json`` or ``model.json`` in that folder: ``met``,
``not met``, or ``not measured`` with the reason the rows give (skipped by a budget, unavailable, error).
Every row of a comparison comes from the same file (one process, one run), as the issues ask.

The issues' floors, on an H100 (bf16, the issues' shapes; ours: the op rows' default flashvit row, our kernels
with the choices their 'auto' makes among them, not the [variant] rows):
  #3 LayerNorm   layer_norm and add_layer_norm, rows 256x197, D 384/768/1024/1280, fwd and fwd+bwd: >= 85% of the
                 measured copy bandwidth and >= 1.0x torch.compile (device time: ops-graph.json first)
  #4 attention   from packed qkv at the four ViT shapes, fwd and fwd+bwd: >= 1.1x the best SDPA backend (or
                 flash-attn) at D = 64, >= 1.2x at D = 80
  #5 MLP         ViT-B and ViT-L MLP fwd+bwd >= 1.1x eager and >= 1.0x torch.compile; the plain GEMM >= 0.9x
                 torch.matmul (fwd and fwd+bwd)
  #9 drop-in     timm ViT-B/16 training patched by flashvit >= 1.2x unpatched
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from flashvit.bench import ops as O
from flashvit.bench.harness import Row, load_rows

SDPA_IMPLS = ("sdpa-auto", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "flash-attn")
TIMM_VIT_B = "vit_base_patch16_224"
QUICK_MODEL = "vit_small_patch16_224"  # what a --quick model run measures
VERDICTS = ("met", "not met", "not measured")


@dataclasses.dataclass(frozen=True)
class Target:
    """ours / against (best of ``against``) >= floor (speed), or ours' % of the copy ceiling >= floor (``copy``)."""

    issue: int
    name: str  # op family (ops rows) or model name (model rows)
    shape: Tuple[Tuple[str, Any], ...]  # the row's shape, exactly (ops); () for model rows: any shape
    mode: str
    ours: str
    against: Tuple[str, ...]  # empty: the copy-bandwidth floor
    floor: float
    suites: Tuple[str, ...]  # files to read, first found with the rows wins

    def what(self) -> str:
        shape = ",".join(f"{k}={v}" for k, v in self.shape)
        vs = f"% of copy bandwidth >= {self.floor:g}" if not self.against else \
            f"x best of {'/'.join(self.against)} >= {self.floor:g}"
        return f"#{self.issue} {self.name} {shape + ' ' if shape else ''}{self.mode}: {self.ours} {vs}"

    def matches(self, row: Row) -> bool:
        if row.name != self.name or row.mode != self.mode:
            return False
        return not self.shape or tuple(row.shape.items()) == self.shape


def _ops_shape(**kw: Any) -> Tuple[Tuple[str, Any], ...]:
    return tuple(kw.items())


def all_targets(quick: bool = False) -> List[Target]:
    """The targets of issues 3, 4, 5 and 9 at the shapes ops.py and model.py measure (``quick``: at the --quick
    shapes and ViT-S, the same floors: what a CPU smoke run of this machinery reads)."""
    out: List[Target] = []
    ln_rows, ln_dims = (O.QUICK_LN_ROWS, O.QUICK_LN_DIMS) if quick else (O.LN_ROWS, O.LN_DIMS)
    rows = f"{ln_rows[0]}x{ln_rows[1]}"
    for D in ln_dims:
        for name in ("layer_norm", "add_layer_norm"):
            for mode in ("fwd", "fwd+bwd"):
                shape = _ops_shape(rows=rows, D=D)
                out.append(Target(3, name, shape, mode, "flashvit", (), 85.0, ("ops-graph", "ops")))
                out.append(Target(3, name, shape, mode, "flashvit", ("compile(eager)",), 1.0, ("ops-graph", "ops")))
    for B, H, N, D in O.QUICK_ATTN_SHAPES if quick else O.ATTN_SHAPES:
        for mode in ("fwd", "fwd+bwd"):
            out.append(Target(4, "attention", _ops_shape(B=B, H=H, N=N, D=D), mode, "flashvit-qkv", SDPA_IMPLS,
                              1.2 if D == 80 else 1.1, ("ops",)))
    for label, M, D, Hd in O.QUICK_MLP_SHAPES if quick else O.MLP_SHAPES:
        shape = _ops_shape(model=label, M=M, D=D, hidden=Hd)
        out.append(Target(5, "mlp", shape, "fwd+bwd", "flashvit", ("eager",), 1.1, ("ops",)))
        out.append(Target(5, "mlp", shape, "fwd+bwd", "flashvit", ("compile(eager)",), 1.0, ("ops",)))
        for mode in ("fwd", "fwd+bwd"):
            out.append(Target(5, "gemm", _ops_shape(model=label, M=M, N=Hd, K=D), mode, "flashvit", ("torch.matmul",),
                              0.9, ("ops",)))
    out.append(Target(9, QUICK_MODEL if quick else TIMM_VIT_B, (), "train", "timm+flashvit.patch", ("timm",), 1.2,
                      ("model",)))
    return out


def wanted(row: Row, targets: Sequence[Target]) -> bool:
    """Whether one of ``targets`` reads this row."""
    return any(t.matches(row) and (row.impl == t.ours or row.impl in t.against) for t in targets)


@dataclasses.dataclass
class Verdict:
    target: Target
    verdict: str  # one of VERDICTS
    value: Optional[float] = None  # the speedup, or the % of the copy ceiling
    suite: str = ""
    detail: str = ""  # the rows behind it, or why it was not measured

    def line(self) -> str:
        v = "-" if self.value is None else f"{self.value:.3g}"
        where = f" [{self.suite}]" if self.suite else ""
        return f"{self.target.what()}: {v} -> {self.verdict}{where} ({self.detail})"


def _speed(r: Row) -> Optional[float]:
    """Work a second, higher is better: img/s for model rows, 1 / median otherwise."""
    if r.img_per_s:
        return r.img_per_s
    return 1.0 / r.median_ms if r.median_ms else None


def _why(rows: List[Row], impl: str) -> str:
    r = next((r for r in rows if r.impl == impl), None)
    if r is None:
        return f"no {impl} row"
    why = r.error or r.note if r.status in ("error", "unavailable", "skipped") else ""
    return f"{impl} {r.status}" + (f": {why[:120]}" if why else "")


def judge(target: Target, suites: Dict[str, List[Row]]) -> Verdict:
    """The target's verdict from the first of its suites holding both sides; else why not measured."""
    reasons = []
    for suite in target.suites:
        rows = [r for r in suites.get(suite, []) if target.matches(r)]
        if not rows:
            reasons.append(f"{suite}: no rows" if suite in suites else f"no {suite}.json")
            continue
        ours = next((r for r in rows if r.impl == target.ours and r.status == "ok" and _speed(r)), None)
        if ours is None:
            reasons.append(f"{suite}: {_why(rows, target.ours)}")
            continue
        if not target.against:
            if ours.pct_ceiling is None:
                reasons.append(f"{suite}: no copy ceiling or byte count in the {target.ours} row")
                continue
            value = ours.pct_ceiling
            detail = f"{ours.impl} {ours.gbps:.0f} GB/s" if ours.gbps else ours.impl
        else:
            others = [r for r in rows if r.impl in target.against and r.status == "ok" and _speed(r)]
            if not others:
                whys = [_why(rows, i) for i in target.against if any(r.impl == i for r in rows)]
                reasons.append(f"{suite}: " + ("; ".join(whys) or "no baseline row"))
                continue
            best = max(others, key=_speed)
            value = _speed(ours) / _speed(best)
            unit = "img/s" if ours.img_per_s else "ms"
            fmt = (lambda r: f"{r.img_per_s:.1f}") if ours.img_per_s else (lambda r: f"{r.median_ms:.4g}")
            detail = f"{ours.impl} {fmt(ours)} vs {best.impl} {fmt(best)} {unit}"
        return Verdict(target, "met" if value >= target.floor else "not met", value, suite, detail)
    return Verdict(target, "not measured", detail="; ".join(reasons))


def load_suites(out: str) -> Tuple[Dict[str, List[Row]], Dict[str, Any]]:
    """{suite: rows} of the JSON files in ``out`` that targets read, and the first one's env / created."""
    suites: Dict[str, List[Row]] = {}
    meta: Dict[str, Any] = {}
    for suite in ("ops-graph", "ops", "model"):
        path = os.path.join(out, f"{suite}.json")
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        suites[suite] = load_rows(d)
        meta = meta or {"env": d.get("env", {}), "created": d.get("created"),
                        "quick": d.get("config", {}).get("quick", False)}
    return suites, meta


def target_lines(out: str, targets: Optional[Sequence[Target]] = None) -> List[str]:
    """The report: a header, one line per target, a count per issue. ``targets``: by default the full shapes',
    or the --quick ones' where the results were a --quick run."""
    suites, meta = load_suites(out)
    if not suites:
        return [f"targets: no ops-graph.json, ops.json or model.json in {out}"]
    env = meta.get("env", {})
    lines = [f"targets: {out}: {env.get('device_name')}, torch {env.get('torch')}, triton {env.get('triton')}, "
             f"commit {str(env.get('git_commit'))[:12]}, {meta.get('created')}"]
    verdicts = [judge(t, suites) for t in (targets or all_targets(bool(meta.get("quick"))))]
    lines += [v.line() for v in verdicts]
    for issue in sorted({v.target.issue for v in verdicts}):
        mine = [v for v in verdicts if v.target.issue == issue]
        counts = ", ".join(f"{sum(v.verdict == k for v in mine)} {k}" for k in VERDICTS)
        lines.append(f"targets: issue #{issue}: {len(mine)} targets: {counts}")
    return lines


def write_targets(out: str, summary: Optional[str] = None) -> int:
    """Print the report (and write it to ``summary``); 0 when some results were found."""
    lines = target_lines(out)
    text = "\n".join(lines)
    print(text, flush=True)
    if summary:
        with open(summary, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 1 if lines[0].startswith("targets: no ") else 0

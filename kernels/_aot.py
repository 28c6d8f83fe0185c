"""Ahead-of-time compilation of our Triton kernels for real GPUs, without a GPU.

Each op file lists, in ``AOT_SPECS``, every (kernel, signature, constexprs, launch options)
combination its launchers can choose. tests/test_aot.py compiles them all for sm_80 and sm_90 and
checks that every ``@triton.jit`` kernel in kernels/ is covered, so a new kernel cannot be
forgotten by the gate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import os
import re
import subprocess
import tempfile
from typing import Any, Dict, Iterator, Optional

# sm_80 (A100) and sm_90 (H100/H200) shared memory per block, opt-in maximum.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclasses.dataclass(frozen=True)
class AotSpec:
    """One launch configuration of one kernel: what ``triton.compile`` needs."""

    kernel: Any  # a triton JITFunction (unwrapped from any Autotuner/Heuristics)
    signature: Dict[str, str]  # arg name -> "*fp16", "i32", "fp32", "constexpr", ...
    constexprs: Dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    name: str = ""  # a label for reports, e.g. "ln_fwd[D=768,bf16]"
    # Specialization hints the JIT derives at run time, e.g. {(i,): [["tt.divisibility", 16]]} for a
    # 16-byte-aligned pointer or a stride divisible by 16: without them loads are not vectorized and
    # the reported registers / shared memory differ from the real build.
    attrs: Optional[Dict[Any, Any]] = None
    min_cc: int = 0  # compiled only for targets >= this (e.g. 90: a Hopper-only kernel such as TMA)

    def label(self) -> str:
        return self.name or getattr(self.kernel, "__name__", str(self.kernel))


def runtime_spec(kernel: Any, sig: Dict[str, str], constexprs: Dict[str, Any], num_warps: int, num_stages: int,
                 name: str, div16: Any = (), ones: Any = (), min_cc: int = 0) -> AotSpec:
    """An AotSpec with the specializations the JIT gives a typical (ViT-sized) launch: 16-byte aligned
    pointers, the ``div16`` int args divisible by 16, the ``ones`` int args == 1 (made constants), so the
    gate compiles, and reports the registers and spills of, the build that really runs."""
    sig = dict(sig)
    constexprs = dict(constexprs)
    for n in ones:
        sig[n] = "constexpr"
        constexprs[n] = 1
    fn = jit_function(kernel)  # attrs go by the parameter's index in the kernel, not in sig
    params = list(getattr(fn, "arg_names", None) or inspect.signature(fn).parameters)  # (interpreter: a function)
    attrs = {(params.index(n),): [["tt.divisibility", 16]]
             for n in sig if n in div16 or (sig[n].startswith("*") and n not in ones)}
    return AotSpec(kernel, sig, constexprs, num_warps, num_stages, name, attrs=attrs, min_cc=min_cc)


def jit_function(fn: Any) -> Any:
    """The JITFunction under an Autotuner/Heuristics wrapper."""
    while hasattr(fn, "fn") and not hasattr(fn, "src"):
        fn = fn.fn
    return fn


def compile_spec(spec: AotSpec, cc: int) -> Dict[str, Any]:
    """Compile ``spec`` for ``sm_<cc>``; return registers, shared memory, spills and the compiled object."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from flashvit.kernels._dispatch import LAUNCH_OPTIONS

    fn = jit_function(spec.kernel)
    src = ASTSource(fn=fn, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
    with _ptxas_log() as log:
        k = triton.compile(
            src,
            target=GPUTarget("cuda", cc, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages, **LAUNCH_OPTIONS},
        )
    info = {"kernel": spec.label(), "cc": cc, "num_warps": spec.num_warps, "num_stages": spec.num_stages,
            "shared": int(k.metadata.shared), "fp_fusion": getattr(k.metadata, "enable_fp_fusion", None), "compiled": k}
    stats = _parse_ptxas(log.getvalue())
    info.update(stats if stats["registers"] is not None else ptxas_stats(k.asm["ptx"], cc))
    return info


@contextlib.contextmanager
def _ptxas_log() -> Iterator[io.StringIO]:
    """Collect the ``ptxas -v`` report of the compile inside: Triton prints its own assembler run's log (the build
    that ships, with its options: 3.8 adds --regAllocOptLevel=2) when asked, so a compile does not run ptxas a
    second time. A kernel from Triton's cache prints nothing (compile_spec then runs ptxas itself): the cache stays
    on, since bypassing it recompiles every spec of a warm machine and each duplicate of a cold one."""
    from triton import knobs

    saved = knobs.nvidia.dump_ptxas_log
    buf = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(buf):
            yield buf
    finally:
        knobs.nvidia.dump_ptxas_log = saved


def _parse_ptxas(text: str) -> Dict[str, Optional[int]]:
    """Registers and spill bytes from a ``ptxas -v`` report (None where it has no such line)."""
    out: Dict[str, Optional[int]] = {"registers": None, "spill_stores": None, "spill_loads": None}
    m = re.search(r"Used (\d+) registers", text)
    if m:
        out["registers"] = int(m.group(1))
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if m:
        out["spill_stores"], out["spill_loads"] = int(m.group(1)), int(m.group(2))
    return out


def _ptxas(cc: int) -> Optional[str]:
    """The ptxas Triton itself assembles sm_<cc> with (3.9 takes its newer one, "ptxas-blackwell", from sm_90 on:
    the older cannot read the PTX version it writes there), else the bundled one."""
    import triton

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(cc).path
    except Exception:  # a Triton without get_ptxas, or no usable tool: the bundled one, if any
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if path and os.path.exists(path) else None


def ptxas_stats(ptx: str, cc: int) -> Dict[str, Optional[int]]:
    """Registers and spill bytes as ``ptxas -v`` reports them for ``ptx`` (None when ptxas is not at hand): a
    second assembler run, for a kernel Triton took from its cache or a Triton that prints no log (_ptxas_log),
    without Triton's own extra options."""
    exe = _ptxas(cc)
    if exe is None:
        return _parse_ptxas("")
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([exe, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    return _parse_ptxas(res.stdout + res.stderr)


def op_modules() -> list:
    """The op modules the gate covers (flashvit.kernels.OP_MODULES), imported."""
    import importlib

    from flashvit.kernels import OP_MODULES

    return [importlib.import_module(f"flashvit.kernels.{name}") for name in OP_MODULES]


def uncovered_kernels(mod: Any) -> list:
    """Names of @triton.jit kernels defined in ``mod`` that no AotSpec of ``mod`` compiles."""
    import triton

    covered = {id(jit_function(s.kernel)) for s in getattr(mod, "AOT_SPECS", [])}
    missing = []
    for name, obj in vars(mod).items():
        if name.startswith("_dev_"):  # device functions: compiled into the kernels that call them
            continue
        fn = jit_function(obj)
        if isinstance(fn, triton.runtime.jit.JITFunction) and getattr(fn, "__module__", mod.__name__) == mod.__name__:
            if id(fn) not in covered:
                missing.append(name)
    return missing


def _compile_one(args: tuple) -> Dict[str, Any]:
    mod_idx, spec_idx, cc = args
    spec = op_modules()[mod_idx].AOT_SPECS[spec_idx]
    try:
        info = compile_spec(spec, cc)
        info.pop("compiled")
        info["error"] = None
    except Exception as e:  # report every failure, not just the first
        info = {"kernel": spec.label(), "cc": cc, "num_warps": spec.num_warps, "num_stages": spec.num_stages,
                "shared": None, "registers": None, "spill_stores": None, "spill_loads": None,
                "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    info["op"] = op_modules()[mod_idx].__name__.rsplit(".", 1)[-1]
    if info["error"] is None and info["shared"] > SMEM_LIMIT[cc]:
        info["error"] = f"shared memory {info['shared']} B exceeds the sm_{cc} limit {SMEM_LIMIT[cc]} B"
    return info


def compile_all(ccs: tuple = (80, 90), jobs: int = 2) -> Dict[str, Any]:
    """Compile every AotSpec of every op module for every cc; return results and uncovered kernels."""
    import multiprocessing as mp

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the AOT gate needs real JIT kernels: run it without TRITON_INTERPRET=1")
    mods = op_modules()
    tasks = [(mi, si, cc) for mi, m in enumerate(mods) for si, spec in enumerate(m.AOT_SPECS) for cc in ccs
             if cc >= spec.min_cc]
    if jobs > 1 and len(tasks) > 1:
        with mp.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_compile_one, tasks, chunksize=1)
    else:
        results = [_compile_one(t) for t in tasks]
    uncovered = {m.__name__.rsplit(".", 1)[-1]: uncovered_kernels(m) for m in mods}
    return {"results": results, "uncovered": {k: v for k, v in uncovered.items() if v}}


def format_table(results: list) -> str:
    """A markdown table: op, kernel config, cc, registers, shared memory, spills, status."""
    lines = ["| op | kernel | sm | warps | stages | regs | smem (B) | spill st/ld (B) | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        spill = "" if r["spill_stores"] is None else f"{r['spill_stores']}/{r['spill_loads']}"
        status = r["error"] or ("SPILLS" if r["spill_stores"] else "ok")
        lines.append(f"| {r['op']} | {r['kernel']} | {r['cc']} | {r['num_warps']} | {r['num_stages']} | "
                     f"{r['registers'] if r['registers'] is not None else ''} | "
                     f"{r['shared'] if r['shared'] is not None else ''} | {spill} | {status} |")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Compile every flashvit Triton kernel config for real GPUs (no GPU needed)")
    ap.add_argument("--cc", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--json", help="write the results as JSON here")
    args = ap.parse_args(argv)
    out = compile_all(tuple(args.cc), args.jobs)
    print(format_table(out["results"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    failed = [r for r in out["results"] if r["error"]]
    for op, names in out["uncovered"].items():
        print(f"UNCOVERED: {op}: {', '.join(names)} (add them to AOT_SPECS)")
    print(f"{len(out['results'])} compiles, {len(failed)} failed, "
          f"{sum(1 for r in out['results'] if r['spill_stores'])} with spills")
    return 1 if failed or out["uncovered"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

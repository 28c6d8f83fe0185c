"""Ahead-of-time compilation of our Triton kernels for real GPUs, without a GPU.

Each op file lists, in ``AOT_SPECS``, every (kernel, signature, constexprs, launch options)
combination its launchers can choose. tests/test_aot.py compiles them all for sm_80 and sm_90 and
checks that every ``@triton.jit`` kernel in kernels/ is covered, so a new kernel cannot be
forgotten by the gate.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from typing import Any, Dict, Optional

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

    def label(self) -> str:
        return self.name or getattr(self.kernel, "__name__", str(self.kernel))


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

    fn = jit_function(spec.kernel)
    src = ASTSource(fn=fn, signature=spec.signature, constexprs=spec.constexprs)
    k = triton.compile(
        src,
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    info = {"kernel": spec.label(), "cc": cc, "num_warps": spec.num_warps, "num_stages": spec.num_stages,
            "shared": int(k.metadata.shared), "compiled": k}
    info.update(ptxas_stats(k.asm["ptx"], cc))
    return info


def _ptxas() -> Optional[str]:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.exists(path) else None


def ptxas_stats(ptx: str, cc: int) -> Dict[str, Optional[int]]:
    """Registers and spill bytes as ``ptxas -v`` reports them (None when ptxas is not at hand)."""
    exe = _ptxas()
    out: Dict[str, Optional[int]] = {"registers": None, "spill_stores": None, "spill_loads": None}
    if exe is None:
        return out
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([exe, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    m = re.search(r"Used (\d+) registers", text)
    if m:
        out["registers"] = int(m.group(1))
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if m:
        out["spill_stores"], out["spill_loads"] = int(m.group(1)), int(m.group(2))
    return out

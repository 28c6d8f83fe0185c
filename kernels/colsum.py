"""Column sums of fp32 partial rows, in a fixed order: the second half of our deterministic weight reductions.

The LayerNorm backward (dweight, dbias) and the MLP's dZ pass (fc1's bias gradient) write one fp32 row of column
sums per program, (B, G, N), and need their sum over G without atomics, bit-equal run to run. torch's sum over
that middle dim was slow for a few MB a call: in patched ViT-B/16 training at batch 128, H100 run 8
(bench/results/2026-11-28-h100-run8/profile/steps_vit_base_patch16_224_train_timm_flashvit.patch.txt), 27 fp32
reduce_kernel calls took 0.429 ms a step next to 1.439 ms for the 25 LayerNorm backward kernels whose partials
they summed; H200 run 3 with the dZ pass's sums too (-h200-run3/profile/..._block=bias_.txt): 51 calls, 1.085 ms.
Here each program owns BLOCK_N columns of one of the B sums and streams all G rows through a pipelined loop
(cp.async on sm_80+), so many rows are in flight a program.

Order: a program adds row g into accumulator row g mod BLOCK_G, in increasing g, then reduces the BLOCK_G
accumulator rows with one tl.sum; past SPLIT_ROWS rows, the splits' fp32 sums are added the same way by a second
pass. The order depends on the config and the shape only, so the same shape sums the same way every call.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from flashvit.kernels._aot import AotSpec, runtime_spec
from flashvit.kernels._dispatch import HAS_TRITON, INTERPRET, Launcher, cdiv, tl, triton

if HAS_TRITON:

    @triton.jit
    def _colsum_kernel(P, OUT, G, N, SPAN, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
        # P: (B, G, N) fp32, contiguous; OUT: (B, S, N), S = cdiv(G, SPAN) splits of SPAN rows (S = 1: the sums,
        # fp32 or the caller's dtype, rounded once at the store; else fp32 partials for a second pass). Program
        # (j, b, s): columns [j·BLOCK_N, (j+1)·BLOCK_N) of sum b over split s's rows. 64-bit offsets: B·G·N may
        # pass 2^31 where G·N does not.
        pid_n = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        s = tl.program_id(2)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ok = cols < N
        base = P + b * G * N
        lo = s * SPAN
        hi = tl.minimum(G, lo + SPAN)
        acc = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
        for g0 in tl.range(lo, hi, BLOCK_G, num_stages=STAGES):
            rows = g0 + tl.arange(0, BLOCK_G)
            acc += tl.load(base + rows.to(tl.int64)[:, None] * N + cols[None, :],
                           mask=(rows < hi)[:, None] & c_ok[None, :], other=0.0)
        out = OUT + (b * tl.num_programs(2) + s) * N
        tl.store(out + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=c_ok)


# (BLOCK_G, BLOCK_N, num_warps, stages, SPLIT_ROWS). GPU: 16 columns (64-byte row pieces) so that even ViT-S's
# LayerNorm sums (B = 2, N = 384) make 48 programs; 128 x 16 x 4 B = 8 KiB a stage, 4 stages (3 in flight, 24 KiB of
# shared memory). Past SPLIT_ROWS rows (LayerNorm past 131072 rows of 32 a program; narrow N, where the programs
# are few) a column block's rows are split across programs, whose fp32 sums a second pass adds: no program loops
# more than SPLIT_ROWS / BLOCK_G = 32 steps. The interpreter: wider blocks, fewer programs (its cost is per program
# and per step), a short split so that small tests take both passes.
GPU_CONFIG = (128, 16, 4, 4, 4096)
INTERPRET_CONFIG = (64, 128, 4, 1, 128)


OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _config() -> Tuple[int, int, int, int, int]:
    return INTERPRET_CONFIG if INTERPRET else GPU_CONFIG


if HAS_TRITON:
    _COLSUM = Launcher(_colsum_kernel)


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (tests swap it for a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def colsum_reference(part: torch.Tensor) -> torch.Tensor:
    """``part.sum(-2)``: the same sums in torch's order (CPU without Triton; the tests' oracle in float64)."""
    return part.sum(-2)


def colsum_partials(part: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sum (G, N) or (B, G, N) fp32 partial rows over G: (N,) or (B, N), deterministically (module doc), summed in
    fp32 and stored in ``out_dtype`` (a parameter's dtype: no separate cast).

    ``part`` must be contiguous fp32. On CUDA (and under TRITON_INTERPRET) the Triton kernel runs; elsewhere
    torch's sum. G = 0 gives zeros."""
    if not isinstance(part, torch.Tensor) or part.dtype != torch.float32 or part.dim() not in (2, 3):
        raise TypeError("colsum_partials takes a (G, N) or (B, G, N) float32 tensor, got "
                        f"{type(part).__name__ if not isinstance(part, torch.Tensor) else (part.dtype, tuple(part.shape))}")
    if not part.is_contiguous():
        raise ValueError(f"colsum_partials needs contiguous partial rows, got strides {part.stride()}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"colsum_partials stores float32, float16 or bfloat16 sums, got {out_dtype}")
    if not HAS_TRITON or not (part.is_cuda or INTERPRET):
        return colsum_reference(part).to(out_dtype)
    if INTERPRET and out_dtype == torch.bfloat16:  # the interpreter (Triton 3.8) truncates fp32 -> bf16 stores,
        return colsum_partials(part).to(out_dtype)  # a GPU rounds to nearest even, as torch: torch's cast here
    p3 = part if part.dim() == 3 else part.unsqueeze(0)
    b, g, n = p3.shape
    bg, bn, warps, stages, split_rows = _config()
    splits = max(1, cdiv(g, split_rows))
    out = _empty((b, n) if splits == 1 else (b, splits, n), out_dtype if splits == 1 else torch.float32, part.device)
    if b and n:
        _COLSUM((cdiv(n, bn), b, splits), (p3, out, g, n, split_rows),
                dict(BLOCK_G=bg, BLOCK_N=bn, STAGES=stages, num_warps=warps, num_stages=stages))
    if splits > 1:  # (B, S, N) fp32 -> (B, N)
        out = colsum_partials(out, out_dtype)
    return out if part.dim() == 3 else out[0]


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile gate: the GPU config, with N divisible by 16 (every ViT width) and not, every output dtype.


def _aot_specs() -> List[AotSpec]:
    if not HAS_TRITON:
        return []
    bg, bn, warps, stages, _ = GPU_CONFIG
    consts = dict(BLOCK_G=bg, BLOCK_N=bn, STAGES=stages)
    specs = []
    for div, out in [(True, torch.float32), (False, torch.float32), (True, torch.float16), (True, torch.bfloat16)]:
        sig = {"P": "*fp32", "OUT": f"*{_TT[out]}", "G": "i32", "N": "i32", "SPAN": "i32", "BLOCK_G": "constexpr",
               "BLOCK_N": "constexpr", "STAGES": "constexpr"}
        specs.append(runtime_spec(_colsum_kernel, sig, consts, warps, stages,
                                  f"colsum[N{'%16' if div else ''},out={_TT[out]}]", div16=("N",) if div else ()))
    return specs


AOT_SPECS: List[AotSpec] = _aot_specs()

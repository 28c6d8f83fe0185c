"""Shared test helpers: seeded fresh inputs, poisoned outputs, and the float64-oracle comparison rule."""

from __future__ import annotations

import itertools
import zlib
from typing import Optional

import torch

_counter = itertools.count()


def fresh_seed() -> int:
    """A different seed for every call, so no two cases share inputs (reproducible run to run)."""
    return 1234 + next(_counter)


def reset_seeds(test_id: str) -> None:
    """Start fresh_seed's sequence at a point fixed by the test's id (conftest, before each test): a test gets the
    same inputs whichever tests ran before it in its process (pytest-xdist's workers, -k, a single test)."""
    global _counter
    _counter = itertools.count(zlib.crc32(test_id.encode()) % 1_000_003 * 1000)


# Where tests run by default: the GPU when there is one (kernels need CUDA tensors there), else the CPU.
DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape: int, dtype: torch.dtype = torch.float32, device: str = DEFAULT_DEVICE, scale: float = 1.0,
          requires_grad: bool = False, seed: Optional[int] = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(fresh_seed() if seed is None else seed)
    t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that any element a kernel forgets to write fails the comparison."""
    return t.fill_(float("nan"))


def poisoned_empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An op file's output allocator (``_empty(shape, dtype, device)``) for tests: NaN-filled."""
    return poison(torch.empty(shape, dtype=dtype, device=device))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_ref(out: torch.Tensor, ref64: torch.Tensor, out_torch: Optional[torch.Tensor] = None, *,
                        factor: float = 2.0, atol: float = 1e-5, rtol: float = 1e-4, name: str = "out") -> None:
    """The house rule (DESIGN.md §5).

    fp32 ``out``: |out - ref| <= atol + rtol·|ref| elementwise.
    fp16/bf16 ``out``: max|out - ref| <= factor · max|out_torch - ref| + atol, where ``out_torch`` is
    PyTorch's own result in the same dtype (factor 2 for outputs, 3 for gradients).
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output (unwritten or invalid elements)"
    err = max_err(out, ref64)
    if out.dtype in (torch.float32, torch.float64) or out_torch is None:
        bound = (atol + rtol * ref64.double().abs()).to(out.device)
        bad = (out.double() - ref64.double().to(out.device)).abs() > bound
        assert not bad.any(), f"{name}: max error {err:.3e} exceeds atol={atol} rtol={rtol} at {int(bad.sum())} elements"
        return
    torch_err = max_err(out_torch, ref64)
    assert err <= factor * torch_err + atol, (
        f"{name}: max error {err:.3e} > {factor} x PyTorch's {torch_err:.3e} + {atol}")

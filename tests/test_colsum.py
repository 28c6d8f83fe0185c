"""kernels/colsum.py: column sums of fp32 partial rows (LayerNorm's dweight/dbias, the dZ pass's bias gradient) vs a
float64 sum, odd shapes, poisoned outputs, determinism, bad inputs."""

import pytest
import torch

from flashvit.kernels import colsum as C
from flashvit.kernels._dispatch import HAS_TRITON
from tests.helpers import poisoned_empty, randn


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(C, "_empty", poisoned_empty)


def _kernel_only(monkeypatch):
    """Fail if the call falls back to torch's sum instead of launching the kernel (where Triton is installed;
    without it, macOS and Windows, torch's sum is the op's path and these tests check that one)."""
    def boom(part):
        raise AssertionError("colsum_partials took torch's sum, not the kernel")
    if HAS_TRITON:
        monkeypatch.setattr(C, "colsum_reference", boom)


# G, N around the blocks (the interpreter's 64 x 128, the GPU's 128 x 16), the interpreter's 128-row splits (two
# passes from 129 rows on; three splits at 300) and ViT-like widths
@pytest.mark.parametrize("g,n", [(1, 1), (5, 7), (64, 128), (65, 129), (128, 3), (129, 17), (300, 40)])
@pytest.mark.parametrize("b", [None, 1, 3])
def test_colsum_matches_float64(device, monkeypatch, g, n, b):
    _kernel_only(monkeypatch)
    shape = (g, n) if b is None else (b, g, n)
    part = randn(*shape, device=device, scale=3.0)
    out = C.colsum_partials(part)
    ref = part.double().sum(-2)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert not torch.isnan(out).any(), "unwritten sums"
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6 * g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_colsum_rounds_once_to_the_output_dtype(device, monkeypatch, dtype):
    """A 16-bit output is the fp32 sum rounded at the store: bit-equal to rounding the fp32 result."""
    _kernel_only(monkeypatch)
    part = randn(2, 97, 45, device=device, scale=5.0)
    out = C.colsum_partials(part, dtype)
    assert out.dtype == dtype and torch.equal(out, C.colsum_partials(part).to(dtype))


def test_colsum_empty_rows_give_zeros(device, monkeypatch):
    _kernel_only(monkeypatch)
    out = C.colsum_partials(torch.empty((2, 0, 9), dtype=torch.float32, device=device))
    assert torch.equal(out, torch.zeros((2, 9), device=device))
    assert C.colsum_partials(torch.empty((0, 4, 9), dtype=torch.float32, device=device)).shape == (0, 9)


def test_colsum_is_deterministic(device, monkeypatch):
    _kernel_only(monkeypatch)
    part = randn(2, 257, 100, device=device)
    first = C.colsum_partials(part)
    for _ in range(19):
        assert torch.equal(C.colsum_partials(part), first)


def test_colsum_rejects_bad_inputs(device):
    with pytest.raises(TypeError, match="float32"):
        C.colsum_partials(torch.zeros(3, 4, dtype=torch.float16, device=device))
    with pytest.raises(TypeError, match="float32"):
        C.colsum_partials(torch.zeros(4, device=device))
    with pytest.raises(TypeError, match="float32"):
        C.colsum_partials([[1.0]])
    with pytest.raises(TypeError, match="stores float32, float16 or bfloat16"):
        C.colsum_partials(torch.zeros(3, 4, device=device), torch.int32)
    with pytest.raises(ValueError, match="contiguous"):
        C.colsum_partials(torch.zeros(4, 6, device=device).t())


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 1576, 768), (2, 9000, 5), (1, 4097, 3072)])
def test_colsum_partials_gpu(monkeypatch, shape):
    """ViT-B's LayerNorm partials at batch 256 ((dweight, dbias, two column sums) x 50432 / 32 programs), and
    split rows: a narrow width past SPLIT_ROWS, one row past it at fc1's width."""
    _kernel_only(monkeypatch)
    part = randn(*shape, device="cuda")
    torch.testing.assert_close(C.colsum_partials(part).double(), part.double().sum(1), rtol=1e-5,
                               atol=1e-6 * shape[1])

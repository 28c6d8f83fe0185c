"""The interpreter memory checker (tests/sanitizer.py) must catch what a GPU would fault on."""

import os

import pytest
import torch

from tests import sanitizer

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="checks the Triton interpreter's memory checker (CPU runs only)")

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:
    @triton.jit
    def _copy(src, dst, n, shift, BLOCK: tl.constexpr, MASKED: tl.constexpr):
        # dst[i] = src[i + shift] for i < n; MASKED also masks the read by i + shift < n.
        offs = tl.arange(0, BLOCK)
        ok = offs < n
        read = ok
        if MASKED:
            read = ok & (offs + shift < n) & (offs + shift >= 0)
        tl.store(dst + offs, tl.load(src + offs + shift, mask=read, other=0.0), mask=ok)

    @triton.jit
    def _store_past(dst, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=offs < n + 1)  # one past the end


def _run(kernel, *args, **consts):
    sanitizer.violations.clear()
    try:
        kernel[(1,)](*args, **consts)
    except Exception as e:  # the interpreter wraps kernel exceptions
        return str(e)
    finally:
        found = list(sanitizer.violations)
        sanitizer.violations.clear()
    return "\n".join(found)


@pytest.mark.parametrize("shift", [1, -1, 40])
def test_reads_past_either_end_are_caught(shift):
    src, dst = torch.randn(10), torch.empty(10)
    msg = _run(_copy, src, dst, 10, shift, BLOCK=16, MASKED=False)
    assert "_copy: load of" in msg and "'src'" in msg, msg


def test_masked_lanes_and_in_bounds_accesses_pass():
    src, dst = torch.randn(10), torch.empty(10)
    assert _run(_copy, src, dst, 10, 3, BLOCK=16, MASKED=True) == ""
    assert torch.equal(dst[:7], src[3:]) and torch.equal(dst[7:], torch.zeros(3))


def test_store_past_the_end_is_caught():
    msg = _run(_store_past, torch.empty(5), 5, BLOCK=8)
    assert "_store_past: store of 1 element(s)" in msg and "byte offset 20 from 'dst' (extent 20 bytes)" in msg, msg


def test_the_extent_is_the_view_not_the_storage():
    base = torch.randn(32)
    src, dst = base[8:18], torch.empty(10)  # 8 valid floats of the storage either side of the view
    msg = _run(_copy, src, dst, 10, 2, BLOCK=16, MASKED=False)
    assert "load of 2 element(s)" in msg, msg


def test_strided_and_broadcast_extents():
    t = torch.empty(4, 6)[:, ::2]  # sizes (4, 3), strides (6, 2): elements 0 .. 3*6 + 2*2 = 22
    lo, hi = sanitizer.tensor_extent(t)
    assert (lo, hi) == (t.data_ptr(), t.data_ptr() + 4 * 23)
    assert sanitizer.tensor_extent(torch.empty(0, 3)) is None
    e = torch.empty(3, 2).expand(4, 3, 2)  # a zero stride adds nothing
    assert sanitizer.tensor_extent(e) == (e.data_ptr(), e.data_ptr() + 4 * 6)

"""A memory checker for the Triton interpreter: compute-sanitizer's memcheck, on CPU.

Under TRITON_INTERPRET=1 a kernel's loads and stores touch host memory through raw addresses, and nothing
checks them: an out-of-bounds read returns whatever lies there (or crashes the process), where the same
access on a GPU is an illegal memory access. With ``install()``, every load and store a kernel makes (the
active lanes only, as on the GPU; TMA descriptor loads and stores included) must fall inside the extent of
one tensor passed to that launch, else the access is recorded and ``OutOfBounds`` is raised.

The extent of a tensor argument is the span of bytes its view covers (storage offset, sizes, strides), not
its whole storage: a kernel that strays outside the view it was handed fails even where the storage
would have hidden it. tests/conftest.py installs the checker for every interpreter test.
"""

from __future__ import annotations

from typing import Any, Iterable, List, Optional, Tuple

import numpy as np
import torch

Extent = Tuple[str, int, int]  # (argument name, first byte, one past the last byte)


class OutOfBounds(AssertionError):
    """A kernel touched memory outside every tensor argument of its launch."""


_launches: List[Tuple[str, List[Extent]]] = []  # (kernel name, extents) of the launches running now
violations: List[str] = []  # every report since the last clear (tests read and clear it)
_saved: Optional[dict] = None


def tensor_extent(t: torch.Tensor) -> Optional[Tuple[int, int]]:
    """[first byte, one past the last byte) that the view ``t`` can address; None when it is empty."""
    if t.numel() == 0:
        return None
    lo = hi = 0
    for size, stride in zip(t.shape, t.stride()):
        (lo, hi) = (lo + (size - 1) * stride, hi) if stride < 0 else (lo, hi + (size - 1) * stride)
    base, es = t.data_ptr(), t.element_size()
    return base + lo * es, base + (hi + 1) * es


def _extents(name: str, arg: Any) -> Iterable[Extent]:
    if isinstance(arg, torch.Tensor):
        ext = tensor_extent(arg)
        if ext is not None:
            yield (name, *ext)
    elif isinstance(arg, (tuple, list)):
        for i, a in enumerate(arg):
            yield from _extents(f"{name}[{i}]", a)
    elif isinstance(getattr(arg, "base", None), torch.Tensor):  # a TMA TensorDescriptor
        yield from _extents(f"{name}.base", arg.base)


def _describe(addr: int, extents: List[Extent]) -> str:
    name, lo, hi = min(extents, key=lambda e: min(abs(addr - e[1]), abs(addr - e[2])))
    return f"0x{addr:x}, byte offset {addr - lo} from {name!r} (extent {hi - lo} bytes)"


def _check(kind: str, ptrs: Any, mask: Any) -> None:
    if not _launches:
        return
    kernel, extents = _launches[-1]
    addrs = np.asarray(ptrs.data)
    if mask is not None:
        addrs = addrs[np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)]
    addrs = addrs.astype(np.uint64, copy=False).ravel()
    if addrs.size == 0:
        return
    width = np.uint64(max(1, ptrs.get_element_ty().primitive_bitwidth // 8))  # int1 is a byte in memory
    ok = np.zeros(addrs.shape, dtype=bool)
    for _, lo, hi in extents:
        ok |= (addrs >= np.uint64(lo)) & (addrs + width <= np.uint64(hi))
    if ok.all():
        return
    bad = addrs[~ok]
    msg = (f"{kernel}: {kind} of {bad.size} element(s) outside every tensor argument; first at "
           f"{_describe(int(bad[0]), extents) if extents else hex(int(bad[0]))}")
    violations.append(msg)
    raise OutOfBounds(msg)


def install() -> bool:
    """Hook the interpreter (idempotent). False when this Triton has no interpreter to hook."""
    global _saved
    if _saved is not None:
        return True
    try:
        from triton.runtime import interpreter as I
    except ImportError:
        return False
    B, G = I.InterpreterBuilder, I.GridExecutor
    saved = {"load": B.create_masked_load, "store": B.create_masked_store, "rmw": B.create_atomic_rmw,
             "cas": B.create_atomic_cas, "call": G.__call__}

    def create_masked_load(self, ptrs, mask, other, *args, **kwargs):
        _check("load", ptrs, mask)
        return saved["load"](self, ptrs, mask, other, *args, **kwargs)

    def create_masked_store(self, ptrs, value, mask, *args, **kwargs):
        _check("store", ptrs, mask)
        return saved["store"](self, ptrs, value, mask, *args, **kwargs)

    def create_atomic_rmw(self, op, ptr, val, mask, *args, **kwargs):
        _check("atomic", ptr, mask)
        return saved["rmw"](self, op, ptr, val, mask, *args, **kwargs)

    def create_atomic_cas(self, ptr, *args, **kwargs):
        _check("atomic", ptr, None)
        return saved["cas"](self, ptr, *args, **kwargs)

    def call(self, *args_dev, **kwargs):
        names = list(getattr(self, "arg_names", None) or [])
        extents: List[Extent] = []
        for i, a in enumerate(args_dev):
            extents.extend(_extents(names[i] if i < len(names) else f"arg{i}", a))
        for k, a in kwargs.items():
            extents.extend(_extents(k, a))
        _launches.append((getattr(self.fn, "__name__", "kernel"), extents))
        try:
            return saved["call"](self, *args_dev, **kwargs)
        finally:
            _launches.pop()

    B.create_masked_load, B.create_masked_store = create_masked_load, create_masked_store
    B.create_atomic_rmw, B.create_atomic_cas, G.__call__ = create_atomic_rmw, create_atomic_cas, call
    _saved = saved
    return True


def uninstall() -> None:
    global _saved
    if _saved is None:
        return
    from triton.runtime import interpreter as I
    B, G = I.InterpreterBuilder, I.GridExecutor
    B.create_masked_load, B.create_masked_store = _saved["load"], _saved["store"]
    B.create_atomic_rmw, B.create_atomic_cas, G.__call__ = _saved["rmw"], _saved["cas"], _saved["call"]
    _saved = None

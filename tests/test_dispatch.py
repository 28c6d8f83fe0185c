"""The backend switch: argument > context > FLASHVIT_BACKEND > auto."""

import pytest
import torch

import flashvit
from flashvit.kernels import _dispatch


def test_precedence(monkeypatch):
    monkeypatch.setenv("FLASHVIT_BACKEND", "torch")
    assert flashvit.get_backend() == "torch"
    with flashvit.use_backend("triton"):
        assert flashvit.get_backend() == "triton"
        with flashvit.use_backend("auto"):
            assert flashvit.get_backend() == "auto"
    assert flashvit.get_backend() == "torch"
    monkeypatch.delenv("FLASHVIT_BACKEND")
    assert flashvit.get_backend() == "auto"


def test_auto_on_cpu_is_reference():
    assert not _dispatch.use_triton(torch.zeros(1), backend="auto")
    assert not _dispatch.use_triton(torch.zeros(1), backend="torch")


def test_forced_triton_on_cpu_needs_interpreter(monkeypatch):
    if not _dispatch.HAS_TRITON:
        with pytest.raises(RuntimeError, match="not importable"):
            _dispatch.use_triton(torch.zeros(1), backend="triton")
        return
    monkeypatch.setattr(_dispatch, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _dispatch.use_triton(torch.zeros(1), backend="triton")
    monkeypatch.setattr(_dispatch, "INTERPRET", True)
    assert _dispatch.use_triton(torch.zeros(1), backend="triton")


def test_unknown_backend(monkeypatch):
    with pytest.raises(ValueError, match="unknown flashvit backend 'cuda'"):
        _dispatch.use_triton(torch.zeros(1), backend="cuda")
    monkeypatch.setenv("FLASHVIT_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown flashvit backend 'fast'"):
        flashvit.get_backend()


def test_compiled_code_follows_use_backend():
    # torch.compile guards on the override stack: changing the forced backend recompiles.
    def f(x):
        return x + 1 if flashvit.get_backend() == "torch" else x - 1

    cf = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.zeros(2)
    with flashvit.use_backend("torch"):
        assert cf(x).tolist() == [1.0, 1.0]
    with flashvit.use_backend("triton"):
        assert cf(x).tolist() == [-1.0, -1.0]

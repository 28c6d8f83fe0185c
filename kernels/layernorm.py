"""Fused LayerNorm (+ residual add): y = LN(x) and (y, h) = (LN(x + residual), x + residual).

Anatomy (see DESIGN.md): Triton kernels -> launchers -> autograd.Function -> PyTorch reference ->
public functionals and an ``nn.LayerNorm``-compatible module.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from flashvit.kernels._aot import AotSpec
from flashvit.kernels._dispatch import check_same_device, check_tensor

AOT_SPECS: List[AotSpec] = []


def _validate(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
              residual: Optional[torch.Tensor] = None) -> None:
    check_tensor("x", x, min_ndim=1)
    d = x.shape[-1]
    if residual is not None:
        check_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)}; expected {tuple(x.shape)} (the shape of x)")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(name, p, ndim=1)
            if p.shape[0] != d:
                raise ValueError(f"{name} has shape {tuple(p.shape)}; expected ({d},) (the last dim of x)")
    check_same_device(x=x, residual=residual, weight=weight, bias=bias)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")


def layer_norm_reference(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim in plain PyTorch (weight/bias cast to x's dtype)."""
    w = weight.to(x.dtype) if weight is not None else None
    b = bias.to(x.dtype) if bias is not None else None
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def add_layer_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                             bias: Optional[torch.Tensor], eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual; return (LN(h), h)."""
    h = x + residual
    return layer_norm_reference(h, weight, bias, eps), h


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float = 1e-5,
               *, backend: Optional[str] = None) -> torch.Tensor:
    """LayerNorm over the last dim of ``x`` (any leading shape)."""
    _validate(x, weight, bias, eps)
    return layer_norm_reference(x, weight, bias, eps)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], eps: float = 1e-5, *,
                   backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pre-norm fusion: ``h = x + residual``; returns ``(LN(h), h)`` in one pass."""
    _validate(x, weight, bias, eps, residual)
    return add_layer_norm_reference(x, residual, weight, bias, eps)


class LayerNorm(nn.LayerNorm):
    """Drop-in ``nn.LayerNorm`` (same parameters and state dict) that runs the fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1:
            return super().forward(x)
        return layer_norm(x, self.weight, self.bias, self.eps)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(LN(x + residual), x + residual)."""
        return add_layer_norm(x, residual, self.weight, self.bias, self.eps)

"""GEMM with fused epilogues: y = act(x·Wᵀ + b) (+ residual), forward and backward.

Used for every Linear of a ViT block: qkv (bias), proj (bias + residual), fc1 (bias + GELU),
fc2 (bias + residual).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from flashvit.kernels._aot import AotSpec
from flashvit.kernels._dispatch import check_same_device, check_tensor

AOT_SPECS: List[AotSpec] = []

ACTIVATIONS = (None, "gelu", "gelu_tanh")


def _validate(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: Optional[str],
              residual: Optional[torch.Tensor]) -> None:
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} input features; expected {weight.shape[1]} (weight is {tuple(weight.shape)})")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({weight.shape[0]},)")
    if residual is not None:
        check_tensor("residual", residual)
        expected = (*x.shape[:-1], weight.shape[0])
        if tuple(residual.shape) != expected:
            raise ValueError(f"residual has shape {tuple(residual.shape)}; expected {expected}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_same_device(x=x, weight=weight, bias=bias, residual=residual)


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     activation: Optional[str] = None, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear + GELU (erf or tanh) + residual add, in plain PyTorch."""
    y = F.linear(x, weight, bias)
    if activation == "gelu":
        y = F.gelu(y)
    elif activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    if residual is not None:
        y = y + residual
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           activation: Optional[str] = None, residual: Optional[torch.Tensor] = None, *,
           backend: Optional[str] = None) -> torch.Tensor:
    """y = act(x·Wᵀ + b) (+ residual); weight in nn.Linear's (out, in) layout, any leading shape of x."""
    _validate(x, weight, bias, activation, residual)
    return linear_reference(x, weight, bias, activation, residual)


class FusedMLP(nn.Module):
    """timm's Mlp (``fc1`` -> GELU -> ``fc2``) with the bias/GELU/residual epilogues fused into the GEMMs."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 bias: bool = True, drop: float = 0.0, approximate: str = "none") -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU(approximate=approximate)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """fc2(GELU(fc1(x))) (+ residual, fused when no dropout is active)."""
        act = "gelu" if self.act.approximate == "none" else "gelu_tanh"
        h = self.drop1(linear(x, self.fc1.weight, self.fc1.bias, activation=act))
        if self.training and self.drop2.p > 0:
            y = self.drop2(linear(h, self.fc2.weight, self.fc2.bias))
            return y if residual is None else y + residual
        return linear(h, self.fc2.weight, self.fc2.bias, residual=residual)

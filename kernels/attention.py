"""Flash attention for ViT shapes: softmax(q·kᵀ·scale)·v without the N×N matrix, forward and backward.

Layouts: ``attention`` takes (B, N, H, D) tensors with any strides; ``qkv_attention`` reads the
packed qkv Linear output (B, N, 3·H·D) in place and writes (B, N, H·D) for the output projection.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from flashvit.kernels._aot import AotSpec
from flashvit.kernels._dispatch import check_same_device, check_tensor

AOT_SPECS: List[AotSpec] = []


def _validate_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q, k, v must be (B, N, H, D) with matching B, H, D and k/v lengths; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: Optional[float] = None,
                        causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA on (B, N, H, D) tensors; returns (B, N, H, D)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
    return o.transpose(1, 2)


def qkv_attention_reference(qkv: torch.Tensor, num_heads: int, softmax_scale: Optional[float] = None,
                            dropout_p: float = 0.0) -> torch.Tensor:
    """(B, N, 3·H·D) packed qkv -> (B, N, H·D), the way timm's Attention does it."""
    B, N, C3 = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=softmax_scale)
    return o.transpose(1, 2).reshape(B, N, C3 // 3)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: Optional[float] = None,
              causal: bool = False, *, dropout_p: float = 0.0, backend: Optional[str] = None) -> torch.Tensor:
    """Exact softmax attention on (B, N, H, D) tensors (any strides); returns (B, N, H, D)."""
    _validate_qkv(q, k, v)
    return attention_reference(q, k, v, softmax_scale, causal, dropout_p)


def qkv_attention(qkv: torch.Tensor, num_heads: int, softmax_scale: Optional[float] = None, *,
                  dropout_p: float = 0.0, backend: Optional[str] = None) -> torch.Tensor:
    """Attention straight from the packed qkv Linear output (B, N, 3·H·D); returns (B, N, H·D)."""
    check_tensor("qkv", qkv, ndim=3)
    if num_heads < 1 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv last dim {qkv.shape[-1]} must be divisible by 3 * num_heads = {3 * num_heads}")
    return qkv_attention_reference(qkv, num_heads, softmax_scale, dropout_p)

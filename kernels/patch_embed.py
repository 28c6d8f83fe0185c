"""Fused patch embedding: image -> tokens + bias + position embedding + class/register tokens.

Since stride == kernel == patch, the Conv2d is a GEMM whose A operand (the implicit im2col) is read
straight from the image; the epilogue adds bias and pos_embed and the prefix rows are written too.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from flashvit.kernels._aot import AotSpec
from flashvit.kernels._dispatch import check_same_device, check_tensor

AOT_SPECS: List[AotSpec] = []


def _validate(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], pos_embed: Optional[torch.Tensor],
              cls_token: Optional[torch.Tensor], reg_tokens: Optional[torch.Tensor], no_embed_class: bool) -> None:
    check_tensor("images", images, ndim=4)
    check_tensor("weight", weight, ndim=4)
    B, C, H, W = images.shape
    D, Cw, p, pw = weight.shape
    if p != pw:
        raise ValueError(f"weight must be a square patch (D, C, p, p), got {tuple(weight.shape)}")
    if C != Cw:
        raise ValueError(f"images have {C} channels; expected {Cw} (weight is {tuple(weight.shape)})")
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} must be divisible by the patch size {p}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != D:
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({D},)")
    n_prefix = 0
    for name, t in (("cls_token", cls_token), ("reg_tokens", reg_tokens)):
        if t is not None:
            check_tensor(name, t, ndim=3)
            if t.shape[0] != 1 or t.shape[2] != D:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected (1, n, {D})")
            n_prefix += t.shape[1]
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed, ndim=3)
        L = (H // p) * (W // p)
        T = L if no_embed_class else L + n_prefix
        if tuple(pos_embed.shape) != (1, T, D):
            raise ValueError(f"pos_embed has shape {tuple(pos_embed.shape)}; expected (1, {T}, {D}) for "
                             f"{L} patches{'' if no_embed_class else f' + {n_prefix} prefix tokens'}")
    check_same_device(images=images, weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token,
                      reg_tokens=reg_tokens)


def patch_embed_reference(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          pos_embed: Optional[torch.Tensor], cls_token: Optional[torch.Tensor] = None,
                          reg_tokens: Optional[torch.Tensor] = None, no_embed_class: bool = False) -> torch.Tensor:
    """The eager five-step path: conv, flatten, transpose, cat prefix tokens, add pos_embed (timm's order)."""
    p = weight.shape[-1]
    x = F.conv2d(images, weight.to(images.dtype), None if bias is None else bias.to(images.dtype), stride=p)
    x = x.flatten(2).transpose(1, 2)  # (B, L, D)
    prefix = [t.to(x.dtype).expand(x.shape[0], -1, -1) for t in (cls_token, reg_tokens) if t is not None]
    if no_embed_class:
        if pos_embed is not None:
            x = x + pos_embed
        return torch.cat(prefix + [x], dim=1) if prefix else x
    x = torch.cat(prefix + [x], dim=1) if prefix else x
    return x + pos_embed if pos_embed is not None else x


def patch_embed(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                pos_embed: Optional[torch.Tensor], cls_token: Optional[torch.Tensor] = None,
                reg_tokens: Optional[torch.Tensor] = None, no_embed_class: bool = False, *,
                backend: Optional[str] = None) -> torch.Tensor:
    """images (B, C, H, W), weight (D, C, p, p) -> tokens (B, T, D): [cls, reg..., patches] + pos_embed."""
    _validate(images, weight, bias, pos_embed, cls_token, reg_tokens, no_embed_class)
    return patch_embed_reference(images, weight, bias, pos_embed, cls_token, reg_tokens, no_embed_class)


class PatchEmbed(nn.Module):
    """timm's PatchEmbed (``proj`` is a Conv2d) for any image size divisible by the patch size."""

    def __init__(self, img_size: Tuple[int, int] = (224, 224), patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, bias: bool = True) -> None:
        super().__init__()
        self.img_size = tuple(img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, images: torch.Tensor, pos_embed: Optional[torch.Tensor] = None,
                cls_token: Optional[torch.Tensor] = None, reg_tokens: Optional[torch.Tensor] = None,
                no_embed_class: bool = False) -> torch.Tensor:
        """(B, C, H, W) -> (B, T, D); with no tokens/pos_embed given this is timm's PatchEmbed output."""
        return patch_embed(images, self.proj.weight, self.proj.bias, pos_embed, cls_token, reg_tokens, no_embed_class)

"""Drop-in patcher: swap flashvit's fused layers into timm / Hugging Face / plain PyTorch models, in place.

    model = timm.create_model("vit_base_patch16_224")
    flashvit.patch(model)            # same object; prints nothing, returns the model
    print(model.flashvit_report)     # what was replaced, what was left and why
    flashvit.unpatch(model)          # the exact original module objects again

Rules:
  * Parameters are shared, never copied: a replacement module holds the very same Parameter (and child
    module) objects, so ``state_dict()`` keys and values, dtypes, devices and optimizers are unchanged.
  * A layer is replaced only when the fused op computes the same function; anything else (unknown
    activation, a norm inside the MLP, a Conv2d MLP, LayerNorm subclasses with their own forward, ...)
    is left untouched and listed in the report with the reason. Never a silently different function.
  * Replacements of timm/HF classes are shallow clones into a subclass of the original class whose
    ``forward`` calls the fused ops, so every other attribute and method (``feat_ratio``, ``fused_attn``,
    ``set_input_size``, ...) keeps working and ``isinstance`` still holds.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import io
import math
import textwrap
import tokenize
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from flashvit.kernels._dispatch import needs_grad
from flashvit.kernels.attention import MAX_HEAD_DIM, attention, qkv_attention
from flashvit.kernels.block import fused_block_on
from flashvit.kernels.glu import swiglu, swiglu_fc2, swiglu_packed
from flashvit.kernels.layernorm import LayerNorm as FlashLayerNorm
from flashvit.kernels.linear import FusedMLP, linear, mlp_recompute_mode, qkv_rope_linear
from flashvit.kernels.linear import mlp as mlp_op
from flashvit.kernels.patch_embed import patch_embed as patch_embed_op
from flashvit.kernels.rope import apply_rope
from flashvit.vit.model import (
    _TIMM_DROP_PATH,
    DROP_PATH_DRAWS,
    LAYER_SCALE_ATTRS,
    DropPath,
    add_scaled,
    drop_path_factor,
    drop_path_scale,
    fused_block,
    has_hooks,
    one_node_block,
    qkv_params,
)

__all__ = ["PatchReport", "patch", "unpatch", "HF_ATTN_IMPLEMENTATION"]

# transformers treats any name containing "flash" as a flash-attention kernel to fetch from the Hub.
HF_ATTN_IMPLEMENTATION = "fvit_attention"
_STATE_ATTR = "_flashvit_patch_state"


def _qualname(obj: object) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


# Classes recognised by name, so neither timm nor transformers has to be importable.
_TIMM_ATTENTION = {"timm.layers.attention.Attention"}
# RoPE attention (EVA-02, DINOv3, timm's vit_*_rope_*): forward(x, rope, attn_mask, is_causal)
_TIMM_ROPE_ATTENTION = {"timm.models.eva.EvaAttention", "timm.layers.attention.AttentionRope"}
_TIMM_MLP = {"timm.layers.mlp.Mlp"}
_TIMM_GLU_MLP = {"timm.layers.mlp.GluMlp"}  # SwiGLUPacked is a GluMlp with SiLU, gate first
_TIMM_SWIGLU = {"timm.layers.mlp.SwiGLU"}  # separate fc1_g / fc1_x projections
_SILUS = {"torch.nn.modules.activation.SiLU", "transformers.activations.SiLUActivation"}
# transformers' SwiGLU FFNs (DINOv2-giant's): (gate_proj, up_proj) -> silu(gate)·up -> down_proj
_HF_SWIGLU_FFN = {"transformers.models.dinov3_vit.modeling_dinov3_vit.DINOv3ViTGatedMLP",  # DINOv2's source
                  "transformers.models.dinov2.modeling_dinov2.Dinov2SwiGLUFFN",
                  "transformers.models.dinov2_with_registers.modeling_dinov2_with_registers.Dinov2WithRegistersSwiGLUFFN"}
_TIMM_PATCH_EMBED = {"timm.layers.patch_embed.PatchEmbed"}
_TIMM_BLOCK = {"timm.models.vision_transformer.Block"}
_TIMM_EVA_BLOCK = {"timm.models.eva.EvaBlock"}  # pre-norm, LayerScale as gamma_1 / gamma_2 Parameters (or None)
# BEiT / BEiT v2: attention with q/v biases and a relative position bias (its own table, the model's shared one);
# forward(x, shared_rel_pos_bias). Its Block: pre-norm with gamma_1 / gamma_2 as EvaBlock.
_TIMM_BEIT_ATTENTION = {"timm.models.beit.Attention"}
_TIMM_BEIT_BLOCK = {"timm.models.beit.Block"}
_TIMM_ATTENTION_CL = {"timm.models.maxxvit.AttentionCl"}  # MaxViT's window / grid attention (channels last)
_TIMM_PVT_ATTENTION = {"timm.models.pvt_v2.Attention", "timm.models.twins.GlobalSubSampleAttn"}  # spatial reduction
_TIMM_GROUPED_ATTENTION = {"timm.models.twins.LocallyGroupedAttn"}  # Twins-SVT: attention inside ws x ws groups
_TIMM_TINYVIT_ATTENTION = {"timm.models.tiny_vit.Attention"}  # window attention with learned attention biases
_TIMM_DAVIT_ATTENTION = {"timm.models.davit.WindowAttention"}  # (its ChannelAttention: attention over channels, left)
_TIMM_RELPOS_ATTENTION = {"timm.models.vision_transformer_relpos.RelPosAttention"}
_TIMM_WINDOW_ATTENTION = {"timm.models.swin_transformer.WindowAttention"}  # Swin v1
_TIMM_SWIN_BLOCK = {"timm.models.swin_transformer.SwinTransformerBlock"}  # (v2's post-norm block: left)
_TIMM_SWIN_BLOCK_CHECKED = {"fd1bed56ca8efa1a"}  # its forward's source (timm 1.0.31): the fused one redoes it
_TIMM_WINDOW_ATTENTION_V2 = {"timm.models.swin_transformer_v2.WindowAttention"}  # cosine attention
# transformers model folders whose ViT-style classes (<Prefix>Layer, Attention, MLP, PatchEmbeddings) are generated
# from ViT's; such a class is fused as ViT's only where its forward's source is ViT's with the prefix swapped
# (checked per class: a version that changes one is seen and the class is left, with that reason).
_HF_VIT_FAMILY = {"vit": "ViT", "deit": "DeiT", "vit_msn": "ViTMSN", "vit_mae": "ViTMAE", "dinov2": "Dinov2",
                  "dinov2_with_registers": "Dinov2WithRegisters", "ijepa": "IJepa", "vivit": "Vivit", "pixio": "Pixio"}
_HF_ROLES = ("Layer", "Attention", "MLP", "PatchEmbeddings")
# transformers' BEiT, fused class by class where its forward is the source checked (sha256 fingerprint, transformers
# 5.24): the attention calls the AttentionInterface with the relative position bias as an additive mask (routed to
# flashvit's attention function like the ViT family's), the MLP is fc1 -> activation_fn -> fc2, the layer pre-norm.
# Swin likewise: its attention (q/k/v, the relative position bias plus the shifted-window mask, o_proj) is replaced
# by one module, the MLP as BEiT's. SegFormer's attention (keys and values from the spatially reduced sequence:
# Nkv < Nq) calls the AttentionInterface as BEiT's does.
_HF_BEIT = "transformers.models.beit.modeling_beit"
_HF_SWIN = "transformers.models.swin.modeling_swin"
_HF_SEGFORMER = "transformers.models.segformer.modeling_segformer"
_HF_SWINV2 = "transformers.models.swinv2.modeling_swinv2"
# Swinv2's attention is fused as one module where it and the SelfAttention / SelfOutput inside are the sources checked
_HF_SWINV2_CHECKED = {"Swinv2Attention": {"ebdb353be1267c18"}, "Swinv2SelfAttention": {"9facc59005911000"},
                      "Swinv2SelfOutput": {"ec81b7be3dcf57c3"}, "Swinv2Intermediate": {"c9e595207da43768"}}
_HF_ROUTED = {f"{_HF_BEIT}.BeitAttention", f"{_HF_SEGFORMER}.SegformerAttention"}  # through attn_implementation
_HF_CHECKED = {f"{_HF_BEIT}.BeitAttention": {"a9fcf5fbaaba5042"}, f"{_HF_BEIT}.BeitMLP": {"6abb4e9c77ac9ce1"},
               f"{_HF_BEIT}.BeitLayer": {"c439d77a7d631dba"}, f"{_HF_SWIN}.SwinAttention": {"c5a0d2c956f7cafd"},
               f"{_HF_SWIN}.SwinMLP": {"6abb4e9c77ac9ce1"}, f"{_HF_SWIN}.SwinLayer": {"dc30599fd3cb15f7"},
               f"{_HF_SEGFORMER}.SegformerAttention": {"fa126e71eea0d3d8"}}
# torchvision's Swin (v1; v2's cosine attention with its continuous position bias) and ViT blocks, fused where their
# forwards are the sources checked (sha256 fingerprints, torchvision 0.29): both window attentions call the module
# function shifted_window_attention, checked too; StochasticDepth's draw is stochastic_depth()'s, checked too.
_TV_SWIN = "torchvision.models.swin_transformer"
_TV_VIT = "torchvision.models.vision_transformer"
_TV_CHECKED = {f"{_TV_SWIN}.ShiftedWindowAttention": {"a8e6b4183ce1c71a"},
               f"{_TV_SWIN}.ShiftedWindowAttentionV2": {"4b22352957ba2cad"},
               f"{_TV_SWIN}.SwinTransformerBlock": {"de8b83f8033a7a57"}, f"{_TV_VIT}.EncoderBlock": {"3c28a839e014829e"}}
_TV_WINDOW_FN_CHECKED = {"867178e391172efe"}  # shifted_window_attention
_TV_STOCHASTIC_DEPTH = "torchvision.ops.stochastic_depth.StochasticDepth"
_TV_STOCHASTIC_DEPTH_CHECKED = {"33e86bcab74f9fe5"}  # stochastic_depth()
# (module, function, fingerprints): the functions a fused class's forward redoes besides its own forward
_TV_WINDOW_FN = (_TV_SWIN, "shifted_window_attention", _TV_WINDOW_FN_CHECKED)
_TV_STOCHASTIC_DEPTH_FN = ("torchvision.ops.stochastic_depth", "stochastic_depth", _TV_STOCHASTIC_DEPTH_CHECKED)
_TV_MLPS = {"torchvision.ops.misc.MLP", f"{_TV_VIT}.MLPBlock"}  # nn.Sequential: Linear, GELU, Dropout, Linear, Dropout
# LayerNorms whose forward is plain layer_norm over the last dim (timm's may take a "fast norm" path: same math).
_PLAIN_LAYERNORMS = {"torch.nn.modules.normalization.LayerNorm", "timm.layers.norm.LayerNorm"}
_GELUS = {
    "timm.layers.activations.GELU": "gelu",
    "timm.layers.activations.GELUTanh": "gelu_tanh",
    "transformers.activations.GELUActivation": "gelu",  # erf GELU (python or torch form)
    "transformers.activations.GELUTanh": "gelu_tanh",
    "transformers.activations.NewGELUActivation": "gelu_tanh",  # the tanh formula written out
    "transformers.activations.FastGELUActivation": "gelu_tanh",  # the same, sqrt(2/π) to 10 digits (3e-12 off)
}


def _family_role(m: nn.Module, family: Dict[str, str], roles) -> Optional[str]:
    """The role of a transformers class in a model family by its name: the class is ``<prefix><role>`` in
    ``transformers.models.<folder>.modeling_<folder>`` with ``family[folder] == prefix``; else None."""
    mod, name = type(m).__module__, type(m).__name__
    if not mod.startswith("transformers.models."):
        return None
    folder = mod.split(".")[2]
    prefix = family.get(folder)
    if prefix is None or mod != f"transformers.models.{folder}.modeling_{folder}":
        return None
    return next((r for r in roles if name == prefix + r), None)


def _hf_role(m: nn.Module) -> Optional[str]:
    """'Layer' / 'Attention' / 'MLP' / 'PatchEmbeddings' for a ViT-family transformers class (by its name)."""
    return _family_role(m, _HF_VIT_FAMILY, _HF_ROLES)


@functools.cache
def _hf_forward_differs(cls: type, role: str) -> Optional[str]:
    """None when ``cls.forward`` is transformers' ViT<role>.forward with the prefix swapped, else why not."""
    prefix = _HF_VIT_FAMILY[cls.__module__.split(".")[2]]
    if prefix == "ViT":
        return None
    try:
        vit = getattr(importlib.import_module("transformers.models.vit.modeling_vit"), "ViT" + role)
        same = inspect.getsource(cls.forward).replace(prefix, "ViT") == inspect.getsource(vit.forward)
    except (ImportError, AttributeError, OSError, TypeError) as e:
        return f"cannot compare its forward with transformers' ViT{role} ({type(e).__name__})"
    return None if same else f"its forward differs from transformers' ViT{role}"


def _source_checked(decide: Callable[[nn.Module], Decision]) -> Callable[[nn.Module], Decision]:
    """``decide`` for a class whose forward has a checked source in _HF_CHECKED, else leave it, saying why."""
    def run(m: nn.Module) -> Decision:
        why = _source_reason(m)
        return (None, why) if why else decide(m)
    return run


def _source_reason(m: nn.Module) -> Optional[str]:
    """None when type(m).forward is the source checked (_HF_CHECKED), else why it is left."""
    return _unchecked(type(m).__name__, type(m).forward, _HF_CHECKED[_qualname(m)])


def _hf_decide(role: str, decide: Callable[[nn.Module], Decision]) -> Callable[[nn.Module], Decision]:
    """``decide`` for a ViT-family class whose forward is ViT's; others are left with the reason."""
    def run(m: nn.Module) -> Decision:
        why = _hf_forward_differs(type(m), role)
        return (None, why) if why else decide(m)
    return run


@functools.cache
def _source_fingerprint(fn: Callable) -> Optional[str]:
    """16 hex digits of the sha256 of fn's source tokens (comments and layout dropped); None without source."""
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    try:
        src = textwrap.dedent(inspect.getsource(fn))
        toks = [t.string for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type not in skip]
    except (OSError, TypeError, tokenize.TokenError, SyntaxError):
        return None
    return hashlib.sha256(" ".join(toks).encode()).hexdigest()[:16]


def _unchecked(label: str, fn: Optional[Callable], prints: set) -> Optional[str]:
    """None when ``fn``'s source fingerprint is among the checked ``prints``, else the reason to leave it."""
    got = _source_fingerprint(fn) if fn is not None else None
    return None if got in prints else f"{label} is not the source flashvit checked (fingerprint {got})"


def _gelu_kind(act: nn.Module) -> Optional[str]:
    """'gelu' / 'gelu_tanh' when ``act`` is exactly that GELU, else None."""
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    return _GELUS.get(_qualname(act))


# ---------------------------------------------------------------------------------------------
# Report


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch` did: ``replaced`` = (path, old class, new class); ``left`` = (path, class, reason)."""

    replaced: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)
    left: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)
    notes: List[str] = dataclasses.field(default_factory=list)

    def counts(self) -> Dict[str, int]:
        """Replaced layers per original class name, e.g. {'LayerNorm': 25, 'Attention': 12}."""
        out: Dict[str, int] = {}
        for _, old, _ in self.replaced:
            out[old] = out.get(old, 0) + 1
        return out

    def __str__(self) -> str:
        lines = [f"flashvit.patch: replaced {len(self.replaced)} modules, left {len(self.left)}"]
        for old, n in sorted(self.counts().items()):
            lines.append(f"  replaced {n:4d} x {old}")
        reasons: Dict[Tuple[str, str], List[str]] = {}
        for path, cls, why in self.left:
            reasons.setdefault((cls, why), []).append(path or "<root>")
        for (cls, why), paths in reasons.items():
            shown = ", ".join(paths[:3]) + (f", ... ({len(paths)} in all)" if len(paths) > 3 else "")
            lines.append(f"  left {cls} at {shown}: {why}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __repr__ = __str__


@dataclasses.dataclass
class _PatchState:
    report: PatchReport
    swaps: List[Tuple[nn.Module, str, nn.Module, nn.Module]]  # (parent, child name, original, replacement)
    hf_attn_previous: Optional[str] = None


# ---------------------------------------------------------------------------------------------
# Fused forwards, mixed into a clone of the original module (same __dict__, same children).


class _FusedTimmAttention(nn.Module):
    """timm Attention: qkv GEMM -> flash attention read from the packed qkv -> (norm) -> proj GEMM."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                layer_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """timm's forward; ``layer_scale``: γ of the block's LayerScale after it, in proj's GEMM epilogue."""
        o = self.norm(_timm_attend(self, linear(x, self.qkv.weight, self.qkv.bias), attn_mask, is_causal))
        return self.proj_drop(linear(o, self.proj.weight, self.proj.bias, layer_scale=layer_scale))


def _timm_attend(m: nn.Module, qkv: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                 is_causal: bool = False) -> torch.Tensor:
    """Attention of a timm attention module ``m`` (num_heads, head_dim, scale, q_norm, k_norm, attn_drop) from its
    packed qkv (B, N, 3·H·Dh) -> (B, N, H·Dh): read in place without q/k norms, else on the normed views."""
    B, N, _ = qkv.shape
    H, Dh = m.num_heads, m.head_dim
    p = m.attn_drop.p if m.training else 0.0
    if isinstance(m.q_norm, nn.Identity) and isinstance(m.k_norm, nn.Identity) and not is_causal:
        return qkv_attention(qkv, H, m.scale, dropout_p=p, attn_mask=attn_mask)  # (a mask: the masked kernels)
    q, k, v = qkv.view(B, N, 3, H, Dh).unbind(2)  # (B, N, H, Dh) strided views, no copy
    q, k = m.q_norm(q), m.k_norm(k)  # per-head norms over Dh: layout-agnostic
    return attention(q, k, v, m.scale, causal=is_causal, dropout_p=p, attn_mask=attn_mask).reshape(B, N, H * Dh)


class _FusedTimmRelPosAttention(nn.Module):
    """timm's RelPosAttention (vit_relpos_*): qkv GEMM -> flash attention with the relative position bias (the
    layer's RelPosBias / RelPosMlp, else the model's shared one; as timm's, the layer's wins) as its additive mask,
    its gradient from the backward kernel -> proj GEMM."""

    def forward(self, x: torch.Tensor, shared_rel_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        bias = self.rel_pos.get_bias() if self.rel_pos is not None else shared_rel_pos  # (1, H, N, N) or None
        o = _timm_attend(self, linear(x, self.qkv.weight, self.qkv.bias), bias)
        return self.proj_drop(linear(o, self.proj.weight, self.proj.bias))


class _FusedTimmRopeAttention(nn.Module):
    """timm EvaAttention / AttentionRope: qkv GEMM (EVA's q/v biases in its epilogue) -> RoPE of q, k and flash
    attention from the packed qkv (qkv_attention(rope=...); without autograd the RoPE runs in the qkv GEMM's
    epilogue: qkv_rope_linear) -> (norm, sigmoid gate) -> proj GEMM."""

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, layer_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """timm's forward; ``layer_scale``: the block's γ after it (EvaBlock's gamma_1), in proj's GEMM epilogue."""
        B, N, _ = x.shape
        H, Dh = self.num_heads, self.head_dim
        p = self.attn_drop.p if self.training else 0.0
        npt, half = self.num_prefix_tokens, bool(getattr(self, "rotate_half", False))
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        plain = isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)
        if self.qkv is not None:
            weight, bias = self.qkv.weight, self.qkv.bias
            if getattr(self, "q_bias", None) is not None:  # EVA: (q_bias, zeros, v_bias)
                bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        else:  # separate q/k/v projections (qkv_fused=False): one GEMM all the same
            weight, bias = qkv_params(self.q_proj, self.k_proj, self.v_proj)
        fast = plain and not is_causal  # (a mask: the masked kernels)
        if fast and rope is not None and not needs_grad(x, weight, bias, rope):
            o = qkv_attention(qkv_rope_linear(x, weight, bias, H, rope, npt, half), H, self.scale, dropout_p=p,
                              attn_mask=attn_mask)
        elif fast:
            o = qkv_attention(linear(x, weight, bias), H, self.scale, dropout_p=p, rope=rope, rope_prefix=npt,
                              rope_half=half, attn_mask=attn_mask)
        else:  # q/k norms, causal
            qkv = linear(x, weight, bias)  # (B, N, 3·H·Dh)
            q, k, v = qkv.view(B, N, 3, H, Dh).unbind(2)  # (B, N, H, Dh) strided views
            q, k = self.q_norm(q), self.k_norm(k)  # per-head norms over Dh: layout-agnostic
            if rope is not None:
                q, k = apply_rope(q, rope, npt, half), apply_rope(k, rope, npt, half)
            o = attention(q, k, v, self.scale, causal=is_causal, dropout_p=p, attn_mask=attn_mask)
            o = o.reshape(B, N, H * Dh)
        o = self.norm(o)
        if gate is not None:
            o = o * gate
        return self.proj_drop(linear(o, self.proj.weight, self.proj.bias, layer_scale=layer_scale))


class _FusedTimmBeitAttention(nn.Module):
    """timm BEiT Attention: qkv GEMM (q/v biases in its epilogue) -> flash attention from the packed qkv, the
    relative position bias (the layer's table, plus the model's shared bias) its additive mask -> proj GEMM. A bias
    that requires grad (its table in training) gets its gradient from the attention's backward kernel. Without any
    bias: the unmasked kernels."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None,
                layer_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """timm's forward; ``layer_scale``: the block's gamma_1 after it, in proj's GEMM epilogue."""
        bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = linear(x, self.qkv.weight, bias)  # (B, N, 3·H·Dh)
        mask = shared_rel_pos_bias  # (1 | B, H, N, N), additive
        if self.relative_position_bias_table is not None:
            own = self._get_rel_pos_bias()  # (1, H, N, N)
            mask = own if mask is None else own + mask
        o = qkv_attention(qkv, self.num_heads, self.scale, dropout_p=self.attn_drop.p if self.training else 0.0,
                          attn_mask=mask)  # (B, N, H·Dh)
        return self.proj_drop(linear(o, self.proj.weight, self.proj.bias, layer_scale=layer_scale))


class _FusedTimmLocallyGroupedAttn(nn.Module):
    """timm Twins-SVT's LocallyGroupedAttn on (B, H·W, C): the map padded to whole ws x ws groups (the padded tokens
    attend, as in timm's), the qkv GEMM over the groups -> flash attention from the packed qkv, one group a batch
    row -> the groups merged, unpadded -> proj GEMM."""

    def forward(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        H, W = size
        ws = self.ws
        Hp, Wp = H + (ws - H % ws) % ws, W + (ws - W % ws) % ws
        x = F.pad(x.view(B, H, W, C), (0, 0, 0, Wp - W, 0, Hp - H))
        gh, gw = Hp // ws, Wp // ws
        x = x.view(B, gh, ws, gw, ws, C).transpose(2, 3).reshape(B * gh * gw, ws * ws, C)  # (B·G, ws², C) groups
        o = qkv_attention(linear(x, self.qkv.weight, self.qkv.bias), self.num_heads, self.scale,
                          dropout_p=self.attn_drop.p if self.training else 0.0)
        o = o.view(B, gh, gw, ws, ws, C).transpose(2, 3).reshape(B, Hp, Wp, C)[:, :H, :W]
        return self.proj_drop(linear(o.reshape(B, N, C), self.proj.weight, self.proj.bias))


def _swin_mask(bias: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Swin's additive attention mask: the relative position bias (1, H, N, N) plus, in shifted blocks, the window
    mask (nW, N, N) (0 / -100) as one windowed (1, nW, H, N, N) mask (row b of the (B·nW) batch takes window
    b % nW, as Swin's view of its scores does), never a (B·nW, H, N, N) copy."""
    if mask is None:
        return bias
    return bias.unsqueeze(1) + mask.view(1, -1, 1, *mask.shape[-2:])


class _FusedTimmWindowAttention(nn.Module):
    """timm Swin WindowAttention on (B·nW, N, C) windows: qkv GEMM -> flash attention from the packed qkv with
    _swin_mask -> proj GEMM. The bias table's gradient comes from the attention's backward kernel."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        qkv = linear(x, self.qkv.weight, self.qkv.bias)  # (B·nW, N, 3·H·Dh)
        o = qkv_attention(qkv, self.num_heads, self.scale, dropout_p=self.attn_drop.p if self.training else 0.0,
                          attn_mask=_swin_mask(self._get_rel_pos_bias(), mask))  # (B·nW, N, H·Dh)
        return self.proj_drop(linear(o, self.proj.weight, self.proj.bias))


class _FusedTimmAttentionCl(nn.Module):
    """timm MaxViT's AttentionCl (channels-last windows and grids, (B, ..., C)): qkv GEMM -> flash attention with
    the relative position bias (RelPosBias / RelPosMlp / RelPosBiasTf, else the shared one) as its additive mask,
    its gradient from the backward kernel -> proj GEMM. The packed (3, H, Dh) layout is read in place
    (qkv_attention: one packed gradient); head_first's ([q | k | v] within each head) as strided views."""

    def forward(self, x: torch.Tensor, shared_rel_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, H, Dh = x.shape[0], self.num_heads, self.dim_head
        qkv = linear(x, self.qkv.weight, self.qkv.bias).view(B, -1, 3 * H * Dh)  # (B, N, 3·H·Dh)
        bias = self.rel_pos.get_bias() if self.rel_pos is not None else shared_rel_pos  # (1, H, N, N) or None
        p = self.attn_drop.p if self.training else 0.0
        if self.head_first:
            o = attention(*qkv.view(B, -1, H, 3, Dh).unbind(3), self.scale, dropout_p=p, attn_mask=bias)
        else:
            o = qkv_attention(qkv, H, self.scale, dropout_p=p, attn_mask=bias)  # (B, N, H·Dh)
        return self.proj_drop(linear(o.reshape(*x.shape[:-1], H * Dh), self.proj.weight, self.proj.bias))


class _FusedTimmPvtAttention(nn.Module):
    """timm PVT v2 Attention and Twins' GlobalSubSampleAttn (spatial-reduction attention): q GEMM over the N tokens;
    keys and values by the kv GEMM from the reduced sequence (timm's sr conv / pool, norm, act run as timm's),
    Nkv < N -> flash attention on strided views -> proj GEMM."""

    def forward(self, x: torch.Tensor, feat_size: List[int]) -> torch.Tensor:
        B, N, C = x.shape
        H = self.num_heads
        q = linear(x, self.q.weight, self.q.bias).view(B, N, H, -1)  # (B, N, H, Dh)
        if self.sr is not None:  # (B, N, C) -> (B, C, h, w) -> reduced -> (B, N', C)
            r = x.permute(0, 2, 1).reshape(B, C, *feat_size)
            pool, act = getattr(self, "pool", None), getattr(self, "act", None)  # (PVT v2's linear mode only)
            r = self.sr(r if pool is None else pool(r)).reshape(B, C, -1).permute(0, 2, 1)
            r = self.norm(r)
            x = r if act is None else act(r)
        k, v = linear(x, self.kv.weight, self.kv.bias).view(B, x.shape[1], 2, H, -1).unbind(2)  # (B, N', H, Dh)
        o = attention(q, k, v, self.scale, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(linear(o.reshape(B, N, C), self.proj.weight, self.proj.bias))


class _FusedTimmTinyVitAttention(nn.Module):
    """timm TinyViT's window Attention (values as wide as keys): norm -> qkv GEMM -> flash attention on strided
    q/k/v views ([q | k | v] within each head) with its learned attention biases (H, N, N) as the additive mask,
    their gradient from the backward kernel -> proj GEMM."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.get_attention_biases(x.device)  # (H, N, N)
        B, N, _ = x.shape
        qkv = linear(self.norm(x), self.qkv.weight, self.qkv.bias).view(B, N, self.num_heads, 3, self.key_dim)
        o = attention(*qkv.unbind(3), self.scale, attn_mask=bias)  # (B, N, H, Dh)
        return linear(o.reshape(B, N, self.out_dim), self.proj.weight, self.proj.bias)


class _FusedTimmDavitWindowAttention(nn.Module):
    """timm DaViT's WindowAttention (no bias, no mask): qkv GEMM -> flash attention from the packed qkv -> proj GEMM."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = qkv_attention(linear(x, self.qkv.weight, self.qkv.bias), self.num_heads, self.scale)  # (B·nW, N, C)
        return linear(o, self.proj.weight, self.proj.bias)


class _FusedTimmWindowAttentionV2(nn.Module):
    """timm Swin v2 WindowAttention (cosine attention): qkv GEMM (q/v biases in its epilogue) -> q, k normalized per
    head, q scaled by the head's clamped exp(logit_scale) -> flash attention (softmax scale 1) with _swin_mask of
    the continuous position bias 16·sigmoid(cpb_mlp(coords)) -> proj GEMM. The logit scale's and the cpb MLP's
    gradients flow through the scale (autograd) and the bias (the backward kernel's dS)."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        rel = _cpb_bias(self.cpb_mlp, self.relative_coords_table, self.relative_position_index, x.shape[1])
        o = _cosine_attention(linear(x, self.qkv.weight, bias), self.num_heads, self.logit_scale, _swin_mask(rel, mask),
                              self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(linear(o, self.proj.weight, self.proj.bias))


def _cpb_bias(cpb_mlp: nn.Module, coords: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Swin v2's continuous position bias over a window of ``n`` tokens: 16·sigmoid(cpb_mlp(coords)) gathered by
    the relative position index, (1, H, n, n)."""
    table = cpb_mlp(coords)
    table = table.view(-1, table.shape[-1])  # (positions, H)
    return 16 * torch.sigmoid(table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0))


class _FusedHFSwinv2Attention(nn.Module):
    """transformers' Swinv2Attention on (B·nW, N, C) windows: query/key/value as one GEMM (key without a bias) ->
    cosine attention (_cosine_attention) with the continuous position bias and, in shifted blocks, the window mask
    added twice, as its SelfAttention adds it, as one windowed mask -> the output dense GEMM. output_attentions runs
    transformers' forward."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                output_attentions: Optional[bool] = False) -> Tuple[torch.Tensor]:
        if output_attentions or not (attention_mask is None or isinstance(attention_mask, torch.Tensor)):
            return super().forward(hidden_states, attention_mask, output_attentions)
        a = self.self
        rel = _cpb_bias(a.continuous_position_bias_mlp, a.relative_coords_table, a.relative_position_index,
                        a.window_size[0] * a.window_size[1])
        o = _cosine_attention(_packed_qkv(hidden_states, a.query, a.key, a.value), a.num_attention_heads,
                              a.logit_scale, _swin_mask(rel, None if attention_mask is None else 2 * attention_mask),
                              a.dropout.p if a.training else 0.0)
        return (self.output.dropout(linear(o, self.output.dense.weight, self.output.dense.bias)),)


class _FusedHFIntermediate(nn.Module):
    """transformers' Swinv2Intermediate (dense -> GELU): one GEMM with the GELU in its epilogue
    (``flashvit_activation``: 'gelu' / 'gelu_tanh')."""

    flashvit_activation: str = "gelu"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return linear(hidden_states, self.dense.weight, self.dense.bias, activation=self.flashvit_activation)


def _cosine_attention(qkv: torch.Tensor, num_heads: int, logit_scale: torch.Tensor, attn_mask: torch.Tensor,
                      dropout_p: float) -> torch.Tensor:
    """Swin v2's cosine attention from the packed qkv (B, N, 3·H·Dh): q, k normalized per head, q scaled by the
    head's exp(logit_scale) (H, 1, 1) clamped at 100 -> flash attention (softmax scale 1) with ``attn_mask`` ->
    (B, N, H·Dh). The logit scale's gradient flows through the scale (autograd)."""
    B, N, _ = qkv.shape
    q, k, v = qkv.view(B, N, 3, num_heads, -1).unbind(2)  # (B, N, H, Dh) views
    scale = torch.clamp(logit_scale, max=math.log(100.0)).exp().view(1, 1, num_heads, 1)
    q, k = F.normalize(q, dim=-1) * scale, F.normalize(k, dim=-1)
    return attention(q, k, v, 1.0, dropout_p=dropout_p, attn_mask=attn_mask).reshape(B, N, -1)


def _tv_window_mask(ph: int, pw: int, window: Tuple[int, int], shift: Tuple[int, int], like: torch.Tensor
                    ) -> torch.Tensor:
    """torchvision's shifted-window mask for a padded (ph, pw) map: (nW, N, N) in ``like``'s dtype, 0 between tokens
    of one region of the shifted map, -100 across regions (the regions as its slices make them)."""
    (wh, ww), (sh, sw) = window, shift
    region = like.new_zeros((ph, pw))
    for i, (rows, cols) in enumerate((r, c) for r in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None))
                                     for c in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None))):
        region[rows, cols] = i
    region = region.view(ph // wh, wh, pw // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)  # (nW, N)
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0)


class _FusedTvWindowAttention(nn.Module):
    """torchvision Swin's ShiftedWindowAttention / ShiftedWindowAttentionV2 on (B, H, W, C): its shifted_window_attention
    (pad to whole windows, cyclic shift, partition) with the qkv GEMM -> flash attention from the packed qkv (v2:
    cosine attention, k's bias zeroed as it zeroes it) with the relative position bias plus, in shifted blocks, the
    window mask as one windowed mask (_swin_mask) -> proj GEMM, then the windows merged, shifted back, unpadded. The
    bias's gradient (v1's table, v2's cpb MLP) comes from the backward kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        wh, ww = self.window_size
        ph, pw = H + (wh - H % wh) % wh, W + (ww - W % ww) % ww
        x = F.pad(x, (0, 0, 0, pw - W, 0, ph - H))
        sh, sw = (0 if wh >= ph else self.shift_size[0]), (0 if ww >= pw else self.shift_size[1])
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        nh, nw = ph // wh, pw // ww
        x = x.view(B, nh, wh, nw, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B * nh * nw, wh * ww, C)  # (B·nW, N, C)
        mask = _swin_mask(self.get_relative_position_bias(),
                          _tv_window_mask(ph, pw, (wh, ww), (sh, sw), x) if sh or sw else None)
        p = self.attention_dropout if self.training else 0.0
        logit_scale = getattr(self, "logit_scale", None)
        if logit_scale is None:
            o = qkv_attention(linear(x, self.qkv.weight, self.qkv.bias), self.num_heads, (C // self.num_heads) ** -0.5,
                              dropout_p=p, attn_mask=mask)
        else:
            b = self.qkv.bias
            if b is not None:  # (v2 zeroes k's third of the bias for the call)
                b = torch.cat((b[:C], torch.zeros_like(b[C:2 * C]), b[2 * C:]))
            o = _cosine_attention(linear(x, self.qkv.weight, b), self.num_heads, logit_scale, mask, p)
        o = F.dropout(linear(o, self.proj.weight, self.proj.bias), p=self.dropout, training=self.training)
        o = o.view(B, nh, nw, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B, ph, pw, C)
        if sh or sw:
            o = torch.roll(o, shifts=(sh, sw), dims=(1, 2))
        return o[:, :H, :W, :].contiguous()


class _FusedHFSwinAttention(nn.Module):
    """transformers' SwinAttention on (B·nW, N, C) windows: q/k/v as one GEMM -> flash attention from the packed
    qkv with _swin_mask -> o_proj GEMM. output_attentions (or a mask that is no tensor) runs transformers'
    forward."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs) -> Tuple[torch.Tensor, None]:
        if kwargs.get("output_attentions", False) or not (attention_mask is None
                                                          or isinstance(attention_mask, torch.Tensor)):
            return super().forward(hidden_states, attention_mask=attention_mask, **kwargs)
        qkv = _packed_qkv(hidden_states, self.q_proj, self.k_proj, self.v_proj)
        o = qkv_attention(qkv, self.num_attention_heads, self.scaling,
                          dropout_p=self.attention_dropout if self.training else 0.0,
                          attn_mask=_swin_mask(self.relative_position_bias(), attention_mask))
        return linear(o, self.o_proj.weight, self.o_proj.bias), None


def _inactive(drop: Optional[nn.Module]) -> bool:
    """A dropout that passes its input through (absent, in eval mode or p = 0)."""
    return drop is None or not drop.training or getattr(drop, "p", 0.0) == 0.0


def _glu_keeps_no_h(mod: nn.Module, *between: Optional[nn.Module]) -> bool:
    """A SwiGLU MLP whose gate output h goes straight into fc2 (``between``: its dropouts / norm, all inert) and whose
    recompute mode (its ``recompute`` attribute, else use_mlp_recompute's) is not 'none': it runs swiglu_fc2,
    keeping fc1's output but not h (both 'act' and 'fc1' keep fc1's output here: the gate's input)."""
    return mlp_recompute_mode(getattr(mod, "recompute", None)) != "none" and all(
        m is None or isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and _inactive(m)) for m in between)


def _fc2(fc2: nn.Linear, drop2: Optional[nn.Module], h: torch.Tensor, residual: Optional[torch.Tensor],
         layer_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """drop2(γ ⊙ fc2(h)) (+ residual): γ and the residual in the GEMM's epilogue (the residual only where drop2
    is None or inactive: dropout acts before the add)."""
    if _inactive(drop2):
        return linear(h, fc2.weight, fc2.bias, residual=residual, layer_scale=layer_scale)
    y = drop2(linear(h, fc2.weight, fc2.bias, layer_scale=layer_scale))
    return y if residual is None else y + residual


class _FusedTimmGluMlp(nn.Module):
    """timm GluMlp with SiLU (SwiGLU, SwiGLUPacked): fc1 GEMM -> silu(gate)·up in one pass -> fc2 GEMM, which
    also takes the block's LayerScale and residual add."""

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                layer_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        z = linear(x, self.fc1.weight, self.fc1.bias)  # (..., 2H): gate and up halves, read in place
        if _glu_keeps_no_h(self, self.drop1, self.norm, self.drop2):
            return swiglu_fc2(z, self.fc2.weight, self.fc2.bias, gate_last=self.gate_last, residual=residual,
                              layer_scale=layer_scale)
        h = self.norm(self.drop1(swiglu_packed(z, self.gate_last)))
        return _fc2(self.fc2, self.drop2, h, residual, layer_scale)


class _FusedTimmSwiGLU(nn.Module):
    """timm SwiGLU (fc1_g, fc1_x): two GEMMs -> silu(gate)·up in one pass -> (norm) -> fc2 GEMM, which also takes
    the block's LayerScale and residual add."""

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                layer_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        gate, up = linear(x, self.fc1_g.weight, self.fc1_g.bias), linear(x, self.fc1_x.weight, self.fc1_x.bias)
        if _glu_keeps_no_h(self, self.drop1, self.norm, self.drop2):
            return swiglu_fc2(gate, self.fc2.weight, self.fc2.bias, up=up, residual=residual, layer_scale=layer_scale)
        return _fc2(self.fc2, self.drop2, self.norm(self.drop1(swiglu(gate, up))), residual, layer_scale)


class _FusedHFSwiGLUFFN(nn.Module):
    """transformers' Dinov2SwiGLUFFN: gate_proj and up_proj GEMMs -> silu(gate)·up in one pass -> down_proj GEMM,
    which also takes the layer's LayerScale and residual add."""

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                layer_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        gate, up = linear(x, self.gate_proj.weight, self.gate_proj.bias), linear(x, self.up_proj.weight,
                                                                                 self.up_proj.bias)
        if _glu_keeps_no_h(self):
            return swiglu_fc2(gate, self.down_proj.weight, self.down_proj.bias, up=up, residual=residual,
                              layer_scale=layer_scale)
        return _fc2(self.down_proj, None, swiglu(gate, up), residual, layer_scale)


class _FusedHFDinov3Attention(nn.Module):
    """transformers' DINOv3ViTAttention: q/k/v projections as one GEMM (weights concatenated, weight-sized work)
    -> RoPE (rotate_half, its prefix tokens left) + flash attention from the packed qkv -> o_proj GEMM, which also
    takes the layer's LayerScale. A call with an attention mask runs transformers' forward."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                layer_scale: Optional[torch.Tensor] = None, **kwargs) -> Tuple[torch.Tensor, None]:
        if attention_mask is not None or position_embeddings is None:
            out, weights = super().forward(hidden_states, attention_mask=attention_mask,
                                           position_embeddings=position_embeddings, **kwargs)
            return (out if layer_scale is None else out * layer_scale), weights
        N = hidden_states.shape[1]
        weight, bias = qkv_params(self.q_proj, self.k_proj, self.v_proj)
        cos, sin = position_embeddings  # (..., N - prefix, Dh) each
        rope, prefix, p = torch.cat((sin, cos), dim=-1), N - sin.shape[-2], self.dropout if self.training else 0.0
        if needs_grad(hidden_states, weight, bias, rope):
            o = qkv_attention(linear(hidden_states, weight, bias), self.num_heads, self.scaling, dropout_p=p,
                              rope=rope, rope_prefix=prefix, rope_half=True)
        else:  # RoPE in the qkv GEMM's epilogue
            o = qkv_attention(qkv_rope_linear(hidden_states, weight, bias, self.num_heads, rope, prefix, True),
                              self.num_heads, self.scaling, dropout_p=p)
        return linear(o, self.o_proj.weight, self.o_proj.bias, layer_scale=layer_scale), None


def _packed_qkv(x: torch.Tensor, q: nn.Linear, k: nn.Linear, v: nn.Linear) -> torch.Tensor:
    """Separate q/k/v projections as one GEMM -> (B, N, 3·H·Dh)."""
    return linear(x, *qkv_params(q, k, v))


class _FusedHFEncoderAttention(nn.Module):
    """transformers' CLIP / SigLIP attention: q/k/v as one GEMM -> flash attention from the packed qkv -> out_proj
    GEMM. A padding mask (SigLIP2's NaFlex batches, SigLIP's text tower) goes to the attention op (its masked
    kernels); a causal attention (CLIP's text tower) or a mask that is no tensor runs transformers' forward."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs) -> Tuple[torch.Tensor, None]:
        if self.is_causal or not (attention_mask is None or isinstance(attention_mask, torch.Tensor)):
            return super().forward(hidden_states, attention_mask=attention_mask, **kwargs)
        qkv = _packed_qkv(hidden_states, self.q_proj, self.k_proj, self.v_proj)
        p = self.dropout if self.training else 0.0
        if attention_mask is None:
            o = qkv_attention(qkv, self.num_heads, self.scale, dropout_p=p)
        else:
            q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).unbind(2)  # (B, N, H, Dh) strided views
            o = attention(q, k, v, self.scale, dropout_p=p, attn_mask=attention_mask).flatten(-2)
        return linear(o, self.out_proj.weight, self.out_proj.bias), None


_NO_DROP_PATH = nn.Identity()  # (one instance: building a module each call costs host time)


class _FusedHFEncoderLayer(nn.Module):
    """transformers' CLIP / SigLIP encoder layer (pre-norm): (x + a, layer_norm2(x + a)) in one pass, fc2 + the
    residual in one GEMM where the MLP is fused; in training, where its attention and MLP are ours, one autograd
    node (kernels/block.py)."""

    flashvit_block_attn: Optional[type] = None  # (its attention is taken where it is ours: see _hf_block)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        if attention_mask is None and not kwargs:
            out = _hf_block(self, hidden_states, _HF_ENCODER_NAMES)
            if out is not None:
                return out
        a, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states), attention_mask=attention_mask, **kwargs)
        y, h = _add_norm(self.layer_norm2, a, hidden_states)
        return _mlp_add(self.mlp, None, _NO_DROP_PATH, y, h)


class _FusedHFEncoderEmbeddings(nn.Module):
    """transformers' CLIP / SigLIP vision embeddings: patch conv + flatten (+ CLIP's class embedding) + the
    position embedding in one fused patch-embedding call; interpolate_pos_encoding runs transformers' forward."""

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        H, W = pixel_values.shape[-2:]
        cls = getattr(self, "class_embedding", None)
        if interpolate_pos_encoding or (cls is not None and (H, W) != (self.image_size,) * 2):
            return super().forward(pixel_values, interpolate_pos_encoding)  # (CLIP's raises on another size)
        conv = self.patch_embedding
        pos = self.position_embedding(self.position_ids)  # (1, prefix + L, D)
        return patch_embed_op(_whole_patches(pixel_values.to(dtype=conv.weight.dtype), conv), conv.weight, conv.bias,
                              pos, None if cls is None else cls.view(1, 1, -1))


class _FusedHFDinov3MLP(nn.Module):
    """transformers' DINOv3ViTMLP (up_proj -> GELU -> down_proj): the fused MLP op (GELU in up_proj's epilogue,
    the layer's LayerScale and residual add in down_proj's); ``flashvit_activation``: 'gelu' / 'gelu_tanh'."""

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                layer_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        return mlp_op(x, self.up_proj.weight, self.up_proj.bias, self.down_proj.weight, self.down_proj.bias,
                      self.flashvit_activation, residual, layer_scale=layer_scale)


class _FusedTimmPatchEmbed(nn.Module):
    """timm PatchEmbed (flattened NLC or NHWC output, no dynamic padding): conv + flatten + transpose in one op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        ph, pw = self.proj.kernel_size
        if self.img_size is not None and self.strict_img_size and (H, W) != tuple(self.img_size):
            raise ValueError(f"input size ({H}, {W}) does not match the model's {tuple(self.img_size)}")
        if self.img_size is not None and not self.strict_img_size and (H % ph or W % pw):
            raise AssertionError(f"Input size ({H}, {W}) should be divisible by patch size ({ph}, {pw}).")  # timm's
        x = patch_embed_op(_whole_patches(x, self.proj), self.proj.weight, self.proj.bias, None)  # (B, L, D)
        if not self.flatten:  # NHWC (DINOv3's): (B, H/p, W/p, D), the values of timm's permuted conv output
            x = x.view(B, H // ph, W // pw, x.shape[-1])
        return self.norm(x)


class _FusedHFPatchEmbed(nn.Module):
    """transformers ViTPatchEmbeddings: projection conv + flatten + transpose in one op."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError(f"expected {self.num_channels} channels in pixel_values, got {pixel_values.shape[1]}")
        return patch_embed_op(_whole_patches(pixel_values, self.projection), self.projection.weight,
                              self.projection.bias, None)


class _FusedHFDinov3Embeddings(nn.Module):
    """transformers' DINOv3ViTEmbeddings: patch conv + flatten + [cls, registers, patches] in one op (the fused
    patch embedding, no position embedding: DINOv3's positions are its RoPE). With bool_masked_pos (mask tokens)
    transformers' forward runs."""

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        if bool_masked_pos is not None:
            return super().forward(pixel_values, bool_masked_pos)
        conv = self.patch_embeddings
        x = _whole_patches(pixel_values.to(dtype=conv.weight.dtype), conv)
        # (no registers: a (1, 0, D) Parameter, passed all the same so that it stays in the graph, as unpatched)
        return patch_embed_op(x, conv.weight, conv.bias, None, self.cls_token, self.register_tokens)


def _whole_patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """(B, C, H, W) -> a view of the rows and columns the patchify conv reads (kernel == stride, no padding: it
    drops the H % p bottom rows and W % p right columns; the fused op takes whole patches only)."""
    ph, pw = conv.kernel_size
    H, W = x.shape[-2:]
    return x if H % ph == 0 and W % pw == 0 else x[..., : H - H % ph, : W - W % pw]


def _drop_path_inactive(m: nn.Module) -> bool:
    """True when a drop-path module is the identity right now (Identity, eval mode, or p == 0): timm's / flashvit's
    DropPath (drop_prob) and torchvision's StochasticDepth (p)."""
    if isinstance(m, nn.Identity):
        return True
    p = getattr(m, "drop_prob", None)
    if p is None and _qualname(m) == _TV_STOCHASTIC_DEPTH:
        p = m.p
    return p is not None and (not m.training or p == 0.0)


# transformers' drop-path classes (one per model: Dinov2DropPath, BeitDropPath, SwinDropPath, ...) whose forward is the
# source checked: floor(rand + keep_prob) a sample in x's dtype, then x / keep_prob times it. Their classes are
# checked when patch() fuses a layer holding one; the fused layers then draw that mask themselves.
_HF_DROP_PATH_CHECKED = {"aa92bccc7644851b"}


def _note_hf_drop_path(layer: nn.Module) -> None:
    """Check the class of ``layer.drop_path`` (patch time: its source is read once, not in the forward)."""
    cls = type(getattr(layer, "drop_path", None))
    if (cls.__module__.startswith("transformers.") and cls.__name__.endswith("DropPath") and cls not in DROP_PATH_DRAWS
            and _source_fingerprint(cls.forward) in _HF_DROP_PATH_CHECKED):
        DROP_PATH_DRAWS[cls] = _hf_drop_draw


def _hf_drop_draw(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A checked transformers drop path's factor a sample (B,), fp32: floor(rand + keep) in x's dtype, as it draws
    its mask, over keep (it divides x by keep)."""
    keep = 1.0 - m.drop_prob
    return torch.floor(torch.rand((x.shape[0],), dtype=x.dtype, device=x.device) + keep).float() / keep


def _drop_scale(m: nn.Module, x: torch.Tensor) -> Tuple[bool, Optional[torch.Tensor]]:
    """Stochastic depth ``m`` on x (B, ...) as a factor per sample: (True, None) where m is the identity now,
    (True, s (B,)) for an active flashvit or timm DropPath, torchvision StochasticDepth ('row') or a checked
    transformers drop path (s drawn as it draws its mask: same samples dropped under one seed), (False, None) for
    another module or one with hooks (the caller runs m itself)."""
    if _drop_path_inactive(m):
        return True, None
    if has_hooks(m):
        return False, None
    if isinstance(m, DropPath) or _qualname(m) == _TIMM_DROP_PATH:
        return True, drop_path_factor(m, x)
    if _qualname(m) == _TV_STOCHASTIC_DEPTH and m.mode == "row" and 0.0 <= m.p <= 1.0:  # (its source: _decide_tv)
        return True, drop_path_scale(x, m.p)  # (its draw: one Bernoulli a row, divided by the survival rate)
    draw = DROP_PATH_DRAWS.get(type(m))  # (a checked transformers drop path: its fp32 factor)
    if draw is not None:
        return True, draw(m, x)
    return False, None


def _residual(h: torch.Tensor, z: torch.Tensor, drop_path: nn.Module) -> torch.Tensor:
    """h + drop_path(z): one addcmul pass where drop_path is a DropPath (_drop_scale), else eager's."""
    ok, s = _drop_scale(drop_path, z)
    return add_scaled(h, z, s) if ok else h + drop_path(z)


def _add_norm(norm: nn.Module, a: torch.Tensor, x: torch.Tensor, drop_path: Optional[nn.Module] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(norm(h), h), h = x + drop_path(a): one pass (add_layer_norm, stochastic depth's factor per sample inside)
    where ``norm`` is ours, else the add then the norm."""
    s = None
    if drop_path is not None:
        ok, s = _drop_scale(drop_path, a)
        if not ok:
            a = drop_path(a)
    if isinstance(norm, FlashLayerNorm):
        return norm.forward_add(a, x, s)
    h = add_scaled(x, a, s)
    return norm(h), h


def _gemm_layer_scale(ls: nn.Module) -> Tuple[bool, Optional[torch.Tensor]]:
    """(True, γ) for a LayerScale the GEMM before it may apply (in its epilogue), (True, None) for the identity,
    (False, None) otherwise (another module, or hooks on it that must see its call)."""
    if isinstance(ls, nn.Identity):
        return True, None
    attr = LAYER_SCALE_ATTRS.get(_qualname(ls))
    if attr is None or has_hooks(ls):
        return False, None
    return True, getattr(ls, attr)


class _FusedTvMLP(nn.Module):
    """torchvision's MLP / ViT's MLPBlock (an nn.Sequential: Linear, GELU, Dropout, Linear, Dropout): the fused MLP op
    (GELU in fc1's epilogue, a residual in fc2's) where both dropouts pass through, else its own layers (then γ and
    the residual after). ``flashvit_activation``: 'gelu' / 'gelu_tanh'."""

    flashvit_activation: str = "gelu"

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                layer_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        fc1, fc2 = self[0], self[3]
        if _inactive(self[2]) and _inactive(self[4]):
            return mlp_op(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, self.flashvit_activation, residual,
                          layer_scale=layer_scale)
        z = nn.Sequential.forward(self, x)
        z = z if layer_scale is None else z * layer_scale
        return z if residual is None else z + residual


# Fused MLPs whose forward takes (y, residual, layer_scale): fc2's GEMM applies the LayerScale and adds the residual.
_RESIDUAL_MLPS = (FusedMLP, _FusedTimmGluMlp, _FusedTimmSwiGLU, _FusedHFSwiGLUFFN, _FusedHFDinov3MLP, _FusedTvMLP)


def _mlp_residual(mlp: nn.Module, ls: nn.Module, drop_path: nn.Module, y: torch.Tensor, h: torch.Tensor
                  ) -> torch.Tensor:
    """h + drop_path(ls(mlp(y))): γ and the residual add in fc2's GEMM where the parts allow."""
    in_gemm, gamma = _gemm_layer_scale(ls)
    if not (isinstance(mlp, _RESIDUAL_MLPS) and in_gemm):
        return h + drop_path(ls(mlp(y)))
    return _mlp_add(mlp, gamma, drop_path, y, h)


def _mlp_add(mlp: nn.Module, gamma: Optional[torch.Tensor], drop_path: nn.Module, y: torch.Tensor, h: torch.Tensor
             ) -> torch.Tensor:
    """h + drop_path(γ ⊙ mlp(y)) (γ None: none): γ and the residual add in fc2's GEMM where mlp is fused (else eager)."""
    if not isinstance(mlp, _RESIDUAL_MLPS):
        z = mlp(y)
        return _residual(h, z if gamma is None else gamma * z, drop_path)
    if _drop_path_inactive(drop_path):
        return mlp(y, residual=h, layer_scale=gamma)  # FusedMLP falls back to y + h itself when its dropout is active
    return _residual(h, mlp(y, layer_scale=gamma), drop_path)


class _FusedTimmBlock(nn.Module):
    """timm Block with the residual adds fused: (x + a, LN2(x + a)) in one pass, fc2 + residual in one GEMM,
    LayerScales (ls1, ls2) in the proj and fc2 GEMMs' epilogues."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is None and not is_causal:  # in training: one autograd node (kernels/block.py)
            out = fused_block(self, x, (_FusedTimmAttention.forward,))
            if out is not None:
                return out
        in_gemm, gamma = _gemm_layer_scale(self.ls1)
        if in_gemm and isinstance(self.attn, _FusedTimmAttention):
            a = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal, layer_scale=gamma)
        else:
            a = self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))
        y, x = _add_norm(self.norm2, a, x, self.drop_path1)
        return _mlp_residual(self.mlp, self.ls2, self.drop_path2, y, x)


class _FusedTimmSwinBlock(nn.Module):
    """timm SwinTransformerBlock (v1, pre-norm) with the residual adds fused: its window attention as timm runs it
    (shift, partition, attention, merge), then (x + a, norm2(x + a)) in one pass and fc2 + residual in one GEMM."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        a = self._attn(self.norm1(x))  # (B, H, W, C)
        y, x = _add_norm(self.norm2, a.reshape(B, -1, C), x.reshape(B, -1, C), self.drop_path1)
        return _mlp_add(self.mlp, None, self.drop_path2, y, x).reshape(B, H, W, C)


class _FusedTvSwinBlock(nn.Module):
    """torchvision's SwinTransformerBlock (v1, pre-norm; its one StochasticDepth draws for each branch): the window
    attention, then (x + a, norm2(x + a)) in one pass and fc2 + the residual in one GEMM (stochastic depth folded in
    as timm's DropPath)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, x = _add_norm(self.norm2, self.attn(self.norm1(x)), x, self.stochastic_depth)
        return _mlp_add(self.mlp, None, self.stochastic_depth, y, x)


class _FusedHFSwinLayer(nn.Module):
    """transformers' SwinLayer (pre-norm) with its residual adds fused: its window attention as it runs it (its own
    padding, shift, mask and its module's window_partition / window_reverse, ``flashvit_windows``), then
    (x + a, layernorm_after(x + a)) in one pass and the MLP's fc2 + the residual in one GEMM."""

    def forward(self, hidden_states: torch.Tensor, input_dimensions: Tuple[int, int], always_partition: bool = False,
                **kwargs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        partition, reverse = self.flashvit_windows
        if not always_partition:
            self.set_shift_and_window_size(input_dimensions)
        height, width = input_dimensions
        batch_size, _, channels = hidden_states.size()
        w = self.window_size
        x = self.layernorm_before(hidden_states).view(batch_size, height, width, channels)
        x, pad_values = self.maybe_pad(x, height, width)
        _, height_pad, width_pad, _ = x.shape
        windows = partition(self.cyclic_shift(x), w).view(-1, w * w, channels)
        attn_mask = self.get_attn_mask(height_pad, width_pad, dtype=x.dtype, device=windows.device)
        a, attn_weights = self.attention(windows, attn_mask, **kwargs)
        a = self.cyclic_shift(reverse(self.dropout(a).view(-1, w, w, channels), w, height_pad, width_pad), reverse=True)
        if pad_values[3] > 0 or pad_values[5] > 0:
            a = a[:, :height, :width, :].contiguous()
        y, h = _add_norm(self.layernorm_after, a.view(batch_size, height * width, channels), hidden_states,
                         self.drop_path)
        if _inactive(self.dropout):
            return _mlp_add(self.mlp, None, _NO_DROP_PATH, y, h), attn_weights
        return self.dropout(self.mlp(y)) + h, attn_weights


def _decide_hf_swin_layer(m: nn.Module) -> Decision:
    _note_hf_drop_path(m)
    hf = importlib.import_module(_HF_SWIN)
    new = _clone_as(m, _FusedHFSwinLayer)
    new.flashvit_windows = (hf.window_partition, hf.window_reverse)
    return new, None


class _FusedTvEncoderBlock(nn.Module):
    """torchvision ViT's EncoderBlock: its self-attention, then (x + a, ln_2(x + a)) in one pass and fc2 + the
    residual in one GEMM."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        x = self.ln_1(input)
        a, _ = self.self_attention(x, x, x, need_weights=False)
        y, x = _add_norm(self.ln_2, self.dropout(a), input)
        return _mlp_add(self.mlp, None, _NO_DROP_PATH, y, x)


def _gamma_block(block: nn.Module, x: torch.Tensor, fused_attn: type, **attn_kwargs) -> torch.Tensor:
    """A pre-norm block whose LayerScales are gamma_1 / gamma_2 Parameters (or None), residual adds fused:
    gamma_1 in proj's GEMM epilogue where the attention is ``fused_attn``, gamma_2 and the residual in fc2's,
    (x + a, norm2(x + a)) in one pass."""
    if isinstance(block.attn, fused_attn):
        a = block.attn(block.norm1(x), layer_scale=block.gamma_1, **attn_kwargs)
    else:
        a = block.attn(block.norm1(x), **attn_kwargs)
        a = a if block.gamma_1 is None else block.gamma_1 * a
    y, x = _add_norm(block.norm2, a, x, block.drop_path1)
    return _mlp_add(block.mlp, block.gamma_2, block.drop_path2, y, x)


class _FusedTimmEvaBlock(nn.Module):
    """timm EvaBlock (pre-norm; EVA-02, DINOv3, the RoPE ViTs) with the residual adds fused (_gamma_block)."""

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        return _gamma_block(self, x, _FusedTimmRopeAttention, rope=rope, attn_mask=attn_mask, is_causal=is_causal)


class _FusedTimmBeitBlock(nn.Module):
    """timm BEiT Block with the residual adds fused (_gamma_block)."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _gamma_block(self, x, _FusedTimmBeitAttention, shared_rel_pos_bias=shared_rel_pos_bias)


class _FusedHFLayer(nn.Module):
    """transformers ViTLayer with the residual adds fused (add + layernorm_after in one pass, fc2 + residual); in
    training, where it is the plain block, one autograd node (kernels/block.py, q/k/v as one GEMM)."""

    flashvit_block_attn: Optional[type] = None  # the attention class whose forward _hf_block computes (patch time)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        if attention_mask is None and not kwargs:
            out = _hf_block(self, hidden_states, _HF_VIT_NAMES)
            if out is not None:
                return out
        a, _ = self.attention(self.layernorm_before(hidden_states), attention_mask, **kwargs)
        a = self.dropout(a)
        y, h = _add_norm(self.layernorm_after, a, hidden_states)
        if isinstance(self.mlp, FusedMLP) and (not self.training or self.dropout.p == 0.0):
            return self.mlp(y, residual=h)
        return self.dropout(self.mlp(y)) + h


# transformers' ViT-family attention forward (q_proj, k_proj, v_proj -> the AttentionInterface at ``scaling``, no
# mask -> o_proj) as checked (transformers 5.24; BEiT's has the same source): what the one-node block computes.
_HF_VIT_ATTENTION_CHECKED = {"a9fcf5fbaaba5042"}


# A patched transformers layer's submodule names: (attention, norm before it, norm before the MLP, LayerScale after
# each branch, drop path, dropout after each branch), None where the layer has none (ViT's: no LayerScale, no drop
# path; DINOv2's: no dropout, one drop path module drawn for each branch; CLIP's / SigLIP's: neither).
_HF_VIT_NAMES = ("attention", "layernorm_before", "layernorm_after", None, None, None, "dropout")
_HF_DINOV2_NAMES = ("attention", "norm1", "norm2", "layer_scale1", "layer_scale2", "drop_path", None)
_HF_ENCODER_NAMES = ("self_attn", "layer_norm1", "layer_norm2", None, None, None, None)


def _hf_block(layer: nn.Module, x: torch.Tensor, names: Tuple[Optional[str], ...]) -> Optional[torch.Tensor]:
    """A patched transformers layer's output from the one-node block (vit.model.one_node_block), or None: not in
    training (fused_block_on), its attention neither ours (CLIP's / SigLIP's, patched) nor the ViT-family class
    whose source was checked at patch time, causal, with attention dropout in training, gradient checkpointing on,
    or its widths not the block's (C = heads·head_dim). ``names``: its submodules' (_HF_VIT_NAMES)."""
    if not fused_block_on(x) or layer.__dict__.get("gradient_checkpointing"):
        return None
    mods = layer._modules
    attn = mods.get(names[0])
    if type(attn).forward is _FusedHFEncoderAttention.forward:
        heads, scale, p, out = attn.num_heads, attn.scale, attn.dropout, "out_proj"
    elif type(attn) is layer.flashvit_block_attn:
        heads, scale, p, out = attn.num_attention_heads, attn.scaling, attn.attention_dropout, "o_proj"
    else:
        return None
    if attn.is_causal or (attn.training and p) or heads * attn.head_dim != x.shape[-1]:
        return None
    am = attn._modules
    n1, n2, ls1, ls2, path, drop = (mods.get(n) if n else _NO_DROP_PATH for n in names[1:])
    return one_node_block(x, n1, n2, mods.get("mlp"), attn, (am.get("q_proj"), am.get("k_proj"), am.get("v_proj")),
                          am.get(out), heads, scale, (ls1, ls2), (path, path), (drop,))


class _FusedHFDinov2Layer(nn.Module):
    """transformers Dinov2Layer (MLP FFN) with the second residual fused: drop_path(ls1(attention)) + x and
    norm2 in one pass, ls2 and the residual add in fc2's GEMM. (ls1 stays a multiply: its GEMM is inside
    transformers' attention module.)"""

    flashvit_block_attn: Optional[type] = None  # as _FusedHFLayer's

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        if attention_mask is None and not kwargs:
            out = _hf_block(self, hidden_states, _HF_DINOV2_NAMES)
            if out is not None:
                return out
        a, _ = self.attention(self.norm1(hidden_states), attention_mask=attention_mask, **kwargs)
        y, h = _add_norm(self.norm2, self.layer_scale1(a), hidden_states, self.drop_path)
        return _mlp_residual(self.mlp, self.layer_scale2, self.drop_path, y, h)


class _FusedHFDinov3Layer(nn.Module):
    """transformers' DINOv3ViTLayer with both residuals fused: layer_scale1 in o_proj's GEMM epilogue (where the
    attention is ours), (x + a, norm2(x + a)) in one pass, layer_scale2 and the residual add in the MLP's last GEMM."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, **kwargs) -> torch.Tensor:
        in_gemm, gamma = _gemm_layer_scale(self.layer_scale1)
        x = self.norm1(hidden_states)
        if in_gemm and isinstance(self.attention, _FusedHFDinov3Attention):
            a, _ = self.attention(x, attention_mask=attention_mask, position_embeddings=position_embeddings,
                                  layer_scale=gamma, **kwargs)
        else:
            a, _ = self.attention(x, attention_mask=attention_mask, position_embeddings=position_embeddings, **kwargs)
            a = self.layer_scale1(a)
        y, h = _add_norm(self.norm2, a, hidden_states, self.drop_path)
        return _mlp_residual(self.mlp, self.layer_scale2, self.drop_path, y, h)


class _FusedHFBeitLayer(nn.Module):
    """transformers' BeitLayer with the residual adds fused: (x + a, layernorm_after(x + a)) in one pass, lambda_2
    (a Parameter, or 1.0 without LayerScale) and the second residual add in fc2's GEMM where the MLP is fused and
    the layer's dropout passes through; the relative position bias built as transformers' forward builds it."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                interpolate_pos_encoding: bool = False, resolution: Optional[Tuple[int, int]] = None,
                **kwargs) -> torch.Tensor:
        if self.relative_position_bias is not None:
            height, width = resolution
            bias = self.relative_position_bias((height // self.patch_size, width // self.patch_size),
                                               interpolate_pos_encoding, dim_size=hidden_states.shape[1])
            attention_mask = bias if attention_mask is None else bias + attention_mask
        a, _ = self.attention(self.layernorm_before(hidden_states), attention_mask=attention_mask, **kwargs)
        y, h = _add_norm(self.layernorm_after, self.lambda_1 * self.dropout(a), hidden_states, self.drop_path)
        if not _inactive(self.dropout):
            return h + self.drop_path(self.lambda_2 * self.dropout(self.mlp(y)))
        return _mlp_add(self.mlp, self.lambda_2 if isinstance(self.lambda_2, torch.Tensor) else None,
                        self.drop_path, y, h)


class _FusedMultiheadAttention(nn.Module):
    """nn.MultiheadAttention whose self-attention calls (query is key is value, no masks, need_weights=False:
    torchvision's ViT, open_clip) run the packed in-projection GEMM -> flash attention from the packed qkv
    -> out-projection GEMM; every other call runs nn.MultiheadAttention's own forward."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if (query is not key or key is not value or key_padding_mask is not None or attn_mask is not None
                or need_weights or is_causal or query.dim() != 3):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        x = query if self.batch_first else query.transpose(0, 1)  # (B, N, E)
        qkv = linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3·E): q, k, v blocks, heads inside
        o = qkv_attention(qkv, self.num_heads, dropout_p=self.dropout if self.training else 0.0)
        o = linear(o, self.out_proj.weight, self.out_proj.bias)
        return (o if self.batch_first else o.transpose(0, 1)), None


class _FusedLinearGelu(nn.Linear):
    """nn.Linear whose following GELU (in an nn.Sequential) is folded into the GEMM epilogue."""

    flashvit_activation: str = "gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, activation=self.flashvit_activation)


_CLASS_CACHE: Dict[Tuple[type, type], type] = {}


def _clone_class(base: type, mixin: type) -> type:
    """The class (mixin, base), made once. Its instances pickle as (base, mixin, state): the class itself is made at
    run time, so pickle (torch.save of a patched model, copy.deepcopy) could not find it by name."""
    key = (base, mixin)
    if key not in _CLASS_CACHE:
        name = "Flashvit" + base.__name__
        _CLASS_CACHE[key] = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name,
                                                       "__reduce__": _reduce_clone})
    return _CLASS_CACHE[key]


def _reduce_clone(self: nn.Module) -> tuple:
    mixin, base = type(self).__bases__
    return _unpickle_clone, (base, mixin, self.__dict__)


def _unpickle_clone(base: type, mixin: type, state: dict) -> nn.Module:
    cls = _clone_class(base, mixin)
    new = cls.__new__(cls)
    new.__dict__.update(state)
    return new


def _clone_as(orig: nn.Module, mixin: type) -> nn.Module:
    """A new module of class (mixin, type(orig)) sharing orig's parameters, buffers, children and attributes."""
    cls = _clone_class(type(orig), mixin)
    new = cls.__new__(cls)
    for k, v in orig.__dict__.items():  # own containers, same objects inside
        new.__dict__[k] = type(v)(v) if isinstance(v, (dict, set, list)) else v
    return new


def _share_layernorm(orig: nn.LayerNorm) -> nn.Module:
    with torch.device("meta"):
        new = FlashLayerNorm(orig.normalized_shape, eps=orig.eps, elementwise_affine=orig.elementwise_affine,
                             bias=orig.bias is not None)
    new.weight, new.bias = orig.weight, orig.bias  # the same Parameter objects (or None)
    new.training = orig.training
    return new


def _share_mlp(orig: nn.Module, kind: str, drop1: nn.Module, drop2: nn.Module) -> FusedMLP:
    fc1, fc2 = orig.fc1, orig.fc2
    with torch.device("meta"):
        new = FusedMLP(fc1.in_features, fc1.out_features, fc2.out_features,
                       approximate="none" if kind == "gelu" else "tanh")
    new.fc1, new.fc2, new.drop1, new.drop2 = fc1, fc2, drop1, drop2  # shared children
    new.training = orig.training
    return new


# transformers layers whose forward is not ViT's, fused by a forward of ours: the fingerprints
# (_source_fingerprint) of their forward and of their LayerScale's forward as checked (transformers 5.24);
# another source is left, with the reason, until someone checks it and adds its fingerprint.
_DINOV2_CHECKED = {"forward": {"0d6d7eb3369a3b13"}, "layer_scale2": {"9e74b25e67144509"}}
_HF_SWIGLU_CHECKED = {"046ba86aaa5a16e3"}  # Dinov2[WithRegisters]SwiGLUFFN.forward
_HF_OWN_LAYERS: Dict[str, Tuple[type, Dict[str, set]]] = {
    "Dinov2Layer": (_FusedHFDinov2Layer, _DINOV2_CHECKED),
    "Dinov2WithRegistersLayer": (_FusedHFDinov2Layer, _DINOV2_CHECKED),  # the same source (DINOv2 + registers)
}


# transformers' DINOv3 ViT (classes of its own, not generated from ViT's): fused where the sources are the ones
# checked (transformers 5.24): by class name, each forward; the attention's rotary helpers too; its gated MLP
# and LayerScale share DINOv2's sources (_HF_SWIGLU_CHECKED, _DINOV2_CHECKED).
_HF_DINOV3 = "transformers.models.dinov3_vit.modeling_dinov3_vit"
_DINOV3_CHECKED = {"DINOv3ViTLayer": {"cb4f02475a08cdc6"}, "DINOv3ViTAttention": {"80ed4a20425aba55"},
                   "DINOv3ViTEmbeddings": {"2c4217620182a7c9"},
                   "DINOv3ViTMLP": {"fc919600726a2fee"}, "DINOv3ViTLayerScale": _DINOV2_CHECKED["layer_scale2"],
                   "apply_rotary_pos_emb": {"4f95b8b07fc7dbb6"}, "rotate_half": {"edea69364172f55e"}}


def _dinov3_unchecked(*names: str) -> Optional[str]:
    """None when every named DINOv3 class's forward (or function) has a checked source, else why not."""
    mod = importlib.import_module(_HF_DINOV3)
    for name in names:
        obj = getattr(mod, name, None)
        why = _unchecked(name, obj.forward if isinstance(obj, type) else obj, _DINOV3_CHECKED[name])
        if why:
            return why
    return None


def _decide_hf_dinov3(m: nn.Module) -> Decision:
    name = type(m).__name__
    if name == "DINOv3ViTLayer":
        _note_hf_drop_path(m)
        why = _dinov3_unchecked(name, "DINOv3ViTLayerScale")
        return (None, why) if why else (_clone_as(m, _FusedHFDinov3Layer), None)
    if name == "DINOv3ViTAttention":
        why = _dinov3_unchecked(name, "apply_rotary_pos_emb", "rotate_half") or _head_dim_reason(m.head_dim)
        return (None, why) if why else (_clone_as(m, _FusedHFDinov3Attention), None)
    if name == "DINOv3ViTEmbeddings":
        why = _dinov3_unchecked(name) or _conv_is_patchify(m.patch_embeddings)
        return (None, why) if why else (_clone_as(m, _FusedHFDinov3Embeddings), None)
    why = _dinov3_unchecked(name)  # DINOv3ViTMLP
    kind = _gelu_kind(m.act_fn)
    if why or kind is None:
        return None, why or f"activation {_qualname(m.act_fn)} is not exact/tanh GELU"
    new = _clone_as(m, _FusedHFDinov3MLP)
    new.flashvit_activation = kind
    return new, None


def _decide_hf_layer(m: nn.Module) -> Decision:
    _note_hf_drop_path(m)
    why = _hf_forward_differs(type(m), "Layer")
    if why is None:
        return _with_block_attn(m, _clone_as(m, _FusedHFLayer)), None
    own = _HF_OWN_LAYERS.get(type(m).__name__)
    if own is None:
        return None, why
    mixin, checked = own
    for part, prints in checked.items():
        owner = m if part == "forward" else getattr(m, part, None)
        why = _unchecked(f"{type(owner).__name__}.forward", getattr(type(owner), "forward", None), prints)
        if why:
            return None, why
    new = _clone_as(m, mixin)
    same_scales = type(getattr(m, "layer_scale1", None)) is type(getattr(m, "layer_scale2", None))
    return (_with_block_attn(m, new) if mixin is _FusedHFDinov2Layer and same_scales else new), None


def _with_block_attn(orig: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` (orig's clone) with flashvit_block_attn set where orig's attention is a ViT-family attention whose
    forward is the source the one-node block computes (_HF_VIT_ATTENTION_CHECKED)."""
    attn = getattr(orig, "attention", None)
    if attn is not None and _hf_role(attn) == "Attention" and _unchecked(
            "", type(attn).forward, _HF_VIT_ATTENTION_CHECKED) is None:
        new.flashvit_block_attn = type(attn)
    return new


# ---------------------------------------------------------------------------------------------
# Per-class decisions: return (replacement, None) or (None, reason-to-leave) or (None, None) = not ours.

Decision = Tuple[Optional[nn.Module], Optional[str]]


# transformers' CLIP-style encoders (CLIP, SigLIP, SigLIP 2): folder -> class prefix; the sources checked
# (transformers 5.24) by role. SigLIP 2's NaFlex embeddings are its own (left).
_HF_ENCODER_FAMILY = {"clip": "CLIP", "siglip": "Siglip", "siglip2": "Siglip2"}
_HF_ENCODER_CHECKED = {"Attention": {"fd3665cb6de19877", "01a49675aa59e186"}, "MLP": {"6abb4e9c77ac9ce1"},
                       "EncoderLayer": {"a7fb59343448c5b4", "a0285730fcbf9c7c"},
                       "VisionEmbeddings": {"6269a5fa175cd572", "9ee336d848e26fca"}}
_HF_ENCODER_MIXINS = {"Attention": _FusedHFEncoderAttention, "EncoderLayer": _FusedHFEncoderLayer,
                      "VisionEmbeddings": _FusedHFEncoderEmbeddings}


def _hf_encoder_role(m: nn.Module) -> Optional[str]:
    """'Attention' / 'MLP' / 'EncoderLayer' / 'VisionEmbeddings' for a CLIP-style transformers class, else None."""
    return _family_role(m, _HF_ENCODER_FAMILY, _HF_ENCODER_CHECKED)


def _decide_hf_encoder(m: nn.Module) -> Decision:
    role = _hf_encoder_role(m)
    why = _unchecked(f"{type(m).__name__}.forward", type(m).forward, _HF_ENCODER_CHECKED[role])
    if why:
        return None, why
    if role == "MLP":
        kind, why = _mlp_reason(m, "activation_fn")
        return (None, why) if kind is None else (_share_mlp(m, kind, nn.Dropout(0.0), nn.Dropout(0.0)), None)
    why = _head_dim_reason(m.head_dim) if role == "Attention" else None
    if role == "VisionEmbeddings":
        why = _conv_is_patchify(m.patch_embedding)
    return (None, why) if why else (_clone_as(m, _HF_ENCODER_MIXINS[role]), None)


def _head_dim_reason(head_dim: int) -> Optional[str]:
    if head_dim < 8 or head_dim > MAX_HEAD_DIM or head_dim % 8:
        return f"head dim {head_dim}: the kernels take multiples of 8 up to {MAX_HEAD_DIM}"
    return None


def _decide_timm_attention(m: nn.Module) -> Decision:
    if getattr(m, "gate", None) is not None:
        return None, "gated attention (sigmoid gate) is not fused"
    return _decide_qkv_proj(_FusedTimmAttention)(m)


def _decide_timm_rope_attention(m: nn.Module) -> Decision:
    if getattr(m, "num_kv_groups", 1) != 1:
        return None, "grouped-query attention (num_kv_heads < num_heads) is not fused"
    H, Dh = m.num_heads, m.head_dim
    projs = (m.qkv,) if m.qkv is not None else (m.q_proj, m.k_proj, m.v_proj)
    if not all(type(x) is nn.Linear for x in projs + (m.proj,)):
        return None, "qkv (or q/k/v) and proj are not plain nn.Linear"
    if sum(x.out_features for x in projs) != 3 * H * Dh or m.proj.in_features != H * Dh:
        return None, f"qkv/proj widths do not match 3·{H}·{Dh}"
    gate = getattr(m, "gate", None)
    if gate is not None and type(gate) is not nn.Linear:
        return None, "the attention gate is not a plain nn.Linear"
    why = _head_dim_reason(Dh)  # (multiples of 8: even, as RoPE's pairs need)
    return (None, why) if why else (_clone_as(m, _FusedTimmRopeAttention), None)


def _decide_qkv_proj(mixin: type, own_qkv_bias: bool = True) -> Callable[[nn.Module], Decision]:
    """The decider for timm attention classes with a packed ``qkv`` and a ``proj`` Linear and ``num_heads`` (ViT's,
    BEiT's, Swin's, MaxViT's, ...): plain nn.Linear (``own_qkv_bias`` False: qkv without a bias of its own, the
    module adds q/v biases), widths 3·H·Dh and H·Dh, a head dim the kernels take; then a clone as ``mixin``."""
    def decide(m: nn.Module) -> Decision:
        if not (type(m.qkv) is nn.Linear and type(m.proj) is nn.Linear) or (
                not own_qkv_bias and m.qkv.bias is not None):
            return None, "qkv/proj are not plain nn.Linear" + ("" if own_qkv_bias else " (qkv without its own bias)")
        H = m.num_heads
        Dh = m.qkv.out_features // (3 * H)
        if m.qkv.out_features != 3 * H * Dh or m.proj.in_features != H * Dh:
            return None, f"qkv/proj widths do not match 3·{H}·head dim"
        why = _head_dim_reason(Dh)
        return (None, why) if why else (_clone_as(m, mixin), None)
    return decide


def _decide_timm_swin_block(m: nn.Module) -> Decision:
    why = _unchecked(type(m).__name__ + ".forward", type(m).forward, _TIMM_SWIN_BLOCK_CHECKED)
    return (None, why) if why else (_clone_as(m, _FusedTimmSwinBlock), None)


def _decide_timm_pvt_attention(m: nn.Module) -> Decision:
    if not all(type(x) is nn.Linear for x in (m.q, m.kv, m.proj)):
        return None, "q/kv/proj are not plain nn.Linear"
    head_dim = getattr(m, "head_dim", m.q.out_features // m.num_heads)  # (Twins': not kept)
    width = m.num_heads * head_dim
    if m.q.out_features != width or m.kv.out_features != 2 * width or m.proj.in_features != width:
        return None, f"q/kv/proj widths do not match {m.num_heads}·{head_dim}"
    why = _head_dim_reason(head_dim)
    return (None, why) if why else (_clone_as(m, _FusedTimmPvtAttention), None)


def _decide_timm_tinyvit_attention(m: nn.Module) -> Decision:
    if m.val_dim != m.key_dim:
        return None, f"values {m.val_dim} wide, keys {m.key_dim}: the kernels take one head dim"
    if not (type(m.qkv) is nn.Linear and type(m.proj) is nn.Linear):
        return None, "qkv/proj are not plain nn.Linear"
    why = _head_dim_reason(m.key_dim)
    return (None, why) if why else (_clone_as(m, _FusedTimmTinyVitAttention), None)


def _decide_hf_swin_attention(m: nn.Module) -> Decision:
    projs = (m.q_proj, m.k_proj, m.v_proj, m.o_proj)
    if not all(type(x) is nn.Linear for x in projs):
        return None, "q/k/v/o projections are not plain nn.Linear"
    width = m.num_attention_heads * m.head_dim
    if any(x.out_features != width for x in projs[:3]) or m.o_proj.in_features != width:
        return None, f"q/k/v/o widths do not match {m.num_attention_heads}·{m.head_dim}"
    why = _head_dim_reason(m.head_dim)
    return (None, why) if why else (_clone_as(m, _FusedHFSwinAttention), None)


def _decide_tv(mixin: Optional[type], then: Optional[Callable[[nn.Module], Decision]] = None,
               functions: Tuple[Tuple[str, str, set], ...] = ()) -> Callable[[nn.Module], Decision]:
    """The decider for a torchvision class whose forward's source is checked (_TV_CHECKED), and the module
    ``functions`` (module, name, fingerprints) its fused forward redoes: a clone as ``mixin``, or ``then``'s
    decision."""
    def decide(m: nn.Module) -> Decision:
        why = _unchecked(f"{type(m).__name__}.forward", type(m).forward, _TV_CHECKED[_qualname(m)])
        for module, name, prints in functions:
            why = why or _unchecked(name, getattr(importlib.import_module(module), name, None), prints)
        if why:
            return None, why
        return then(m) if then is not None else (_clone_as(m, mixin), None)
    return decide


def _decide_tv_mlp(m: nn.Module) -> Decision:
    layers = list(m)
    kinds = [type(x) for x in layers]
    if type(m).forward is not nn.Sequential.forward or kinds[:1] + kinds[2:] != [nn.Linear, nn.Dropout, nn.Linear,
                                                                                   nn.Dropout]:
        return None, "not Linear -> activation -> Dropout -> Linear -> Dropout run as an nn.Sequential"
    kind = _gelu_kind(layers[1])
    if kind is None:
        return None, f"its activation {_qualname(layers[1])} is not GELU"
    new = _clone_as(m, _FusedTvMLP)
    new.flashvit_activation = kind
    return new, None


def _hf_swinv2_unchecked(*classes: str) -> Optional[str]:
    hf = importlib.import_module(_HF_SWINV2)
    return next((why for c in classes if (why := _unchecked(f"{c}.forward", getattr(getattr(hf, c, None), "forward", None),
                                                             _HF_SWINV2_CHECKED[c]))), None)


def _decide_hf_swinv2_attention(m: nn.Module) -> Decision:
    why = _hf_swinv2_unchecked("Swinv2Attention", "Swinv2SelfAttention", "Swinv2SelfOutput")
    a = m.self
    if why is None and not all(type(x) is nn.Linear for x in (a.query, a.key, a.value, m.output.dense)):
        why = "query/key/value/dense are not plain nn.Linear"
    if why is None:
        why = _head_dim_reason(a.attention_head_size)
    return (None, why) if why else (_clone_as(m, _FusedHFSwinv2Attention), None)


def _decide_hf_intermediate(m: nn.Module) -> Decision:
    why = _hf_swinv2_unchecked("Swinv2Intermediate")
    kind = _gelu_kind(m.intermediate_act_fn)
    if why is None and (type(m.dense) is not nn.Linear or kind is None):
        why = "not a plain nn.Linear followed by a GELU"
    if why:
        return None, why
    new = _clone_as(m, _FusedHFIntermediate)
    new.flashvit_activation = kind
    return new, None


def _decide_mha(m: nn.Module) -> Decision:
    if not m._qkv_same_embed_dim:
        return None, "kdim/vdim differ from embed_dim (separate q/k/v projections)"
    if m.bias_k is not None or m.add_zero_attn:
        return None, "add_bias_kv / add_zero_attn are not fused"
    head_dim = m.embed_dim // m.num_heads
    if head_dim % 8 or head_dim > 256:
        return None, f"head dim {head_dim} (the kernels take multiples of 8 up to 256)"
    return _clone_as(m, _FusedMultiheadAttention), None


def _mlp_reason(m: nn.Module, act_attr: str) -> Tuple[Optional[str], Optional[str]]:
    if not (type(m.fc1) is nn.Linear and type(m.fc2) is nn.Linear):
        return None, "fc1/fc2 are not nn.Linear (e.g. a 1x1 Conv2d MLP)"
    kind = _gelu_kind(getattr(m, act_attr))
    if kind is None:
        return None, f"activation {_qualname(getattr(m, act_attr))} is not exact/tanh GELU"
    if not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity):
        return None, "a norm inside the MLP (scale_mlp_norm) is not fused"
    return kind, None


def _decide_timm_mlp(m: nn.Module) -> Decision:
    kind, why = _mlp_reason(m, "act")
    return (None, why) if kind is None else (_share_mlp(m, kind, m.drop1, m.drop2), None)


def _decide_timm_glu_mlp(m: nn.Module) -> Decision:
    """GluMlp / SwiGLU with SiLU: fused (a norm inside, EVA's scale_mlp, still runs between the gate and fc2)."""
    if _qualname(m.act) not in _SILUS:
        return None, f"gate activation {_qualname(m.act)} is not SiLU (SwiGLU)"
    linears = (m.fc1, m.fc2) if hasattr(m, "fc1") else (m.fc1_g, m.fc1_x, m.fc2)
    if not all(type(fc) is nn.Linear for fc in linears) or getattr(m, "chunk_dim", -1) != -1:
        return None, "its projections are not nn.Linear (e.g. a 1x1 Conv2d MLP)"
    return _clone_as(m, _FusedTimmGluMlp if hasattr(m, "fc1") else _FusedTimmSwiGLU), None


def _decide_hf_swiglu_ffn(m: nn.Module) -> Decision:
    why = _unchecked(f"{type(m).__name__}.forward", type(m).forward, _HF_SWIGLU_CHECKED)
    if why is None and _qualname(m.act_fn) not in _SILUS:
        why = f"its act_fn {_qualname(m.act_fn)} is not SiLU"
    return (None, why) if why else (_clone_as(m, _FusedHFSwiGLUFFN), None)


def _decide_hf_mlp(m: nn.Module) -> Decision:
    kind, why = _mlp_reason(m, "activation_fn")
    return (None, why) if kind is None else (_share_mlp(m, kind, nn.Dropout(0.0), nn.Dropout(0.0)), None)


def _conv_is_patchify(conv: nn.Module) -> Optional[str]:
    if type(conv) is not nn.Conv2d:
        return "proj is not an nn.Conv2d"
    k = tuple(conv.kernel_size)
    padding = (0, 0) if conv.padding == "valid" else tuple(conv.padding)  # ("valid": none, as SigLIP's)
    if (k[0] != k[1] or tuple(conv.stride) != k or padding != (0, 0) or tuple(conv.dilation) != (1, 1)
            or conv.groups != 1 or conv.padding_mode != "zeros"):
        return "conv is not a square non-overlapping patchify (kernel == stride, no padding/dilation/groups)"
    return None


def _decide_timm_patch_embed(m: nn.Module) -> Decision:
    why = _conv_is_patchify(m.proj)
    if why is None and not m.flatten and getattr(m.output_fmt, "value", m.output_fmt) != "NHWC":
        why = f"output_fmt {getattr(m.output_fmt, 'value', m.output_fmt)} (no flatten) is not fused"
    if why is None and m.dynamic_img_pad:
        why = "dynamic_img_pad is not fused"
    return (None, why) if why else (_clone_as(m, _FusedTimmPatchEmbed), None)


def _decide_hf_patch_embed(m: nn.Module) -> Decision:
    why = _conv_is_patchify(m.projection)
    return (None, why) if why else (_clone_as(m, _FusedHFPatchEmbed), None)


def _decide_layernorm(m: nn.Module) -> Decision:
    if isinstance(m, FlashLayerNorm):
        return None, None
    if _qualname(m) not in _PLAIN_LAYERNORMS:
        return None, "LayerNorm subclass with its own forward (e.g. fp32 upcast) is left as is"
    if len(m.normalized_shape) != 1:
        return None, f"normalized_shape {tuple(m.normalized_shape)} spans more than the last dim"
    return _share_layernorm(m), None


def _is_layernorm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm)


# ---------------------------------------------------------------------------------------------
# Hugging Face attention through transformers' AttentionInterface.


def _hf_flashvit_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                           scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                           **kwargs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """transformers attention function: (B, H, N, D) q/k/v -> ((B, N, H, D) output, None; the attention maps
    (B, H, N, N) where output_attentions asks for them: transformers' eager math then).

    Soft-capping, sliding windows, position biases, GQA, causal cross-length attention without a mask and masks that
    are no tensor go to transformers' own SDPA function (the same function); the plain case (keys and values of
    another length too: SegFormer's reduced sequence) runs flashvit's attention, and a mask tensor (SDPA's form,
    bool or additive) its masked kernels.
    """
    causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    if kwargs.get("output_attentions", False):  # the maps asked for: transformers' eager math, which returns them
        return _hf_eager_attention(module, query, key, value, attention_mask, dropout, scaling, bool(causal))
    special = (query.shape[1] != key.shape[1]
               or query.shape[2] != key.shape[2] and causal and attention_mask is None
               or not (attention_mask is None or isinstance(attention_mask, torch.Tensor))
               or any(kwargs.get(k) is not None for k in ("softcap", "sliding_window", "position_bias", "s_aux")))
    if special:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if attention_mask is not None:  # the causal structure, if any, is in the mask (as transformers' SDPA reads it)
        causal = False
        if attention_mask.dim() == 4:
            attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    o = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scaling, causal=bool(causal),
                  dropout_p=dropout, attn_mask=attention_mask)  # strided (B, N, H, D) views in, (B, N, H, D) out
    return o, None


def _hf_eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: Optional[torch.Tensor], dropout: float, scaling: Optional[float],
                        causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention (softmax in fp32, then the input dtype; dropout in training) on (B, H, N, D):
    ((B, N, H, D) output, (B, H, N, N) attention maps), for output_attentions=True."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    w = torch.matmul(query, key.transpose(2, 3)) * scale
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask.dim() == 4 else attention_mask
        w = w.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else w + mask
    elif causal:
        w = w.masked_fill(torch.ones(w.shape[-2:], dtype=torch.bool, device=w.device).triu(1), float("-inf"))
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = torch.nn.functional.dropout(w, p=dropout, training=module.training)
    return torch.matmul(w, value).transpose(1, 2).contiguous(), w


def register_hf_attention() -> None:
    """Register ``attn_implementation="fvit_attention"`` with transformers' AttentionInterface."""
    from transformers import AttentionInterface

    AttentionInterface.register(HF_ATTN_IMPLEMENTATION, _hf_flashvit_attention)


# ---------------------------------------------------------------------------------------------
# patch / unpatch


def patch(model: nn.Module, attention: bool = True, layernorm: bool = True, mlp: bool = True,
          patch_embed: bool = True, residual: bool = True, linear_gelu: bool = False,
          verbose: bool = False) -> nn.Module:
    """Swap flashvit's fused layers into ``model`` in place and return the same object.

    Args:
        attention: timm ``Attention`` (qkv GEMM -> flash attention -> proj GEMM; q/k norms kept exactly);
            timm ``EvaAttention`` / ``AttentionRope`` (EVA-02, DINOv3, RoPE ViTs: RoPE of q, k fused before the
            flash kernels; grouped-query attention left); timm BEiT ``Attention`` (q/v biases in the qkv GEMM, the
            relative position bias the kernels' additive mask, a learned one's gradient from the backward kernel),
            Swin v1 / v2, vit_relpos, MaxViT, TinyViT, DaViT, PVT v2 and Twins attention (README's table);
            transformers' ``DINOv3ViTAttention`` (q/k/v as one
            GEMM, RoPE + flash attention; source checked) and CLIP / SigLIP attention (q/k/v as one GEMM;
            masked calls run theirs);
            Hugging Face ViT attention through ``AttentionInterface`` (``attn_implementation="fvit_attention"``;
            likewise DeiT, ViT-MSN, ViT-MAE and DINOv2, whose classes transformers generates from ViT's, and BEiT,
            whose relative position bias arrives as the mask; source checked);
            ``nn.MultiheadAttention`` (torchvision's ViT, open_clip): its self-attention calls without masks or
            returned weights (others run its own forward); torchvision's Swin ``ShiftedWindowAttention`` (v1, v2)
            and transformers' ``Swinv2Attention`` (cosine attention; sources checked).
        layernorm: every ``nn.LayerNorm`` (and timm's ``LayerNorm``) over the last dim -> flashvit LayerNorm.
        mlp: timm ``Mlp`` / HF ``ViTMLP`` / BEiT / CLIP / SigLIP MLPs with an exact or tanh GELU and no inner norm ->
            ``FusedMLP`` (HF ``DINOv3ViTMLP``, torchvision's ``MLP`` / ``MLPBlock``: the same op on their
            projections; HF ``Swinv2Intermediate``: one GEMM with the GELU epilogue); timm
            ``GluMlp`` / ``SwiGLU`` with SiLU (SwiGLUPacked; EVA-02's) and HF ``Dinov2SwiGLUFFN`` -> fc1
            GEMM(s), silu(gate)·up in one pass (``swiglu``), (its norm,) fc2 GEMM taking the block's LayerScale
            and residual.
        patch_embed: timm ``PatchEmbed`` (NLC or NHWC output) / HF ``ViTPatchEmbeddings`` conv -> the fused
            patchify GEMM (timm's cls/register-token concat and pos_embed add stay in ``_pos_embed``); HF
            ``DINOv3ViTEmbeddings`` -> conv + [cls, registers, patches] and CLIP / SigLIP vision embeddings ->
            conv (+ class token) + positions, each in the same op.
        residual: timm ``Block`` / ``EvaBlock`` / BEiT ``Block`` / ``SwinTransformerBlock`` / HF ``ViTLayer`` /
            ``Dinov2Layer`` / ``BeitLayer`` / ``DINOv3ViTLayer`` / ``SwinLayer`` / CLIP and SigLIP encoder layers /
            torchvision's ``SwinTransformerBlock`` and ViT ``EncoderBlock``: fuse the residual adds (add + LayerNorm
            in one pass, stochastic depth's factor per sample inside it; fc2 + residual in the GEMM epilogue) and apply
            LayerScales in the epilogue of the GEMM before them.
        linear_gelu: any ``nn.Sequential`` holding ``nn.Linear`` then a GELU -> one GEMM with the GELU epilogue.
        verbose: print the report.

    Parameters are shared with the original modules (no copies): ``state_dict()`` is unchanged. The report
    is ``model.flashvit_report``; :func:`unpatch` restores the original module objects.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"flashvit.patch expects an nn.Module, got {type(model).__name__}")
    if _STATE_ATTR in model.__dict__:
        raise ValueError("model is already patched by flashvit; call flashvit.unpatch(model) first")
    report = PatchReport()
    state = _PatchState(report=report, swaps=[])

    rules: List[Tuple[Callable[[nn.Module], bool], Callable[[nn.Module], Decision], bool]] = [
        (lambda m: _qualname(m) in _TIMM_BLOCK, lambda m: (_clone_as(m, _FusedTimmBlock), None), residual),
        (lambda m: _qualname(m) in _TIMM_EVA_BLOCK, lambda m: (_clone_as(m, _FusedTimmEvaBlock), None), residual),
        (lambda m: _qualname(m) in _TIMM_BEIT_BLOCK, lambda m: (_clone_as(m, _FusedTimmBeitBlock), None), residual),
        (lambda m: _qualname(m) in _TIMM_SWIN_BLOCK, _decide_timm_swin_block, residual),
        (lambda m: _hf_role(m) == "Layer", _decide_hf_layer,
         residual),
        (lambda m: _qualname(m) == f"{_HF_BEIT}.BeitLayer",
         _source_checked(lambda m: _note_hf_drop_path(m) or (_clone_as(m, _FusedHFBeitLayer), None)), residual),
        (lambda m: _qualname(m) in _TIMM_ATTENTION, _decide_timm_attention, attention),
        (lambda m: _qualname(m) in _TIMM_ROPE_ATTENTION, _decide_timm_rope_attention, attention),
        (lambda m: _qualname(m) in _TIMM_BEIT_ATTENTION, _decide_qkv_proj(_FusedTimmBeitAttention, False), attention),
        (lambda m: _qualname(m) in _TIMM_WINDOW_ATTENTION, _decide_qkv_proj(_FusedTimmWindowAttention), attention),
        (lambda m: _qualname(m) in _TIMM_WINDOW_ATTENTION_V2, _decide_qkv_proj(_FusedTimmWindowAttentionV2, False),
         attention),
        (lambda m: _qualname(m) in _TIMM_ATTENTION_CL, _decide_qkv_proj(_FusedTimmAttentionCl), attention),
        (lambda m: _qualname(m) in _TIMM_PVT_ATTENTION, _decide_timm_pvt_attention, attention),
        (lambda m: _qualname(m) in _TIMM_GROUPED_ATTENTION, _decide_qkv_proj(_FusedTimmLocallyGroupedAttn), attention),
        (lambda m: _qualname(m) in _TIMM_TINYVIT_ATTENTION, _decide_timm_tinyvit_attention, attention),
        (lambda m: _qualname(m) in _TIMM_DAVIT_ATTENTION, _decide_qkv_proj(_FusedTimmDavitWindowAttention), attention),
        (lambda m: _qualname(m) in _TIMM_RELPOS_ATTENTION, _decide_qkv_proj(_FusedTimmRelPosAttention), attention),
        (lambda m: type(m) is nn.MultiheadAttention, _decide_mha, attention),
        (lambda m: _qualname(m) == f"{_TV_SWIN}.SwinTransformerBlock",
         _decide_tv(_FusedTvSwinBlock, functions=(_TV_STOCHASTIC_DEPTH_FN,)), residual),
        (lambda m: _qualname(m) == f"{_TV_VIT}.EncoderBlock", _decide_tv(_FusedTvEncoderBlock), residual),
        (lambda m: _qualname(m) in (f"{_TV_SWIN}.ShiftedWindowAttention", f"{_TV_SWIN}.ShiftedWindowAttentionV2"),
         _decide_tv(None, _decide_qkv_proj(_FusedTvWindowAttention), functions=(_TV_WINDOW_FN,)), attention),
        (lambda m: _qualname(m) in _TV_MLPS, _decide_tv_mlp, mlp),
        (lambda m: _qualname(m) in _TIMM_MLP, _decide_timm_mlp, mlp),
        (lambda m: _qualname(m) in _TIMM_GLU_MLP | _TIMM_SWIGLU, _decide_timm_glu_mlp, mlp),
        (lambda m: _qualname(m) in _HF_SWIGLU_FFN, _decide_hf_swiglu_ffn, mlp),
        (lambda m: _hf_encoder_role(m) == "EncoderLayer", _decide_hf_encoder, residual),
        (lambda m: _hf_encoder_role(m) == "Attention", _decide_hf_encoder, attention),
        (lambda m: _hf_encoder_role(m) == "MLP", _decide_hf_encoder, mlp),
        (lambda m: _hf_encoder_role(m) == "VisionEmbeddings", _decide_hf_encoder, patch_embed),
        (lambda m: _qualname(m) == f"{_HF_DINOV3}.DINOv3ViTLayer", _decide_hf_dinov3, residual),
        (lambda m: _qualname(m) == f"{_HF_DINOV3}.DINOv3ViTAttention", _decide_hf_dinov3, attention),
        (lambda m: _qualname(m) == f"{_HF_DINOV3}.DINOv3ViTMLP", _decide_hf_dinov3, mlp),
        (lambda m: _qualname(m) == f"{_HF_DINOV3}.DINOv3ViTEmbeddings", _decide_hf_dinov3, patch_embed),
        (lambda m: _hf_role(m) == "MLP", _hf_decide("MLP", _decide_hf_mlp), mlp),
        (lambda m: _qualname(m) == f"{_HF_BEIT}.BeitMLP", _source_checked(_decide_hf_mlp), mlp),
        (lambda m: _qualname(m) == f"{_HF_SWIN}.SwinAttention", _source_checked(_decide_hf_swin_attention), attention),
        (lambda m: _qualname(m) == f"{_HF_SWIN}.SwinMLP", _source_checked(_decide_hf_mlp), mlp),
        (lambda m: _qualname(m) == f"{_HF_SWIN}.SwinLayer", _source_checked(_decide_hf_swin_layer), residual),
        (lambda m: _qualname(m) == f"{_HF_SWINV2}.Swinv2Attention", _decide_hf_swinv2_attention, attention),
        (lambda m: _qualname(m) == f"{_HF_SWINV2}.Swinv2Intermediate", _decide_hf_intermediate, mlp),
        (lambda m: _qualname(m) in _TIMM_PATCH_EMBED, _decide_timm_patch_embed, patch_embed),
        (lambda m: _hf_role(m) == "PatchEmbeddings", _hf_decide("PatchEmbeddings", _decide_hf_patch_embed),
         patch_embed),
        (_is_layernorm, _decide_layernorm, layernorm),
    ]

    wanted = {"attn": attention, "mlp": mlp, "patch_embed": patch_embed}

    def visit(parent: nn.Module, prefix: str) -> None:
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children):
            path = f"{prefix}{name}"
            new: Optional[nn.Module] = None
            for match, decide, enabled in rules:
                if match(child):
                    if enabled:
                        new, why = decide(child)
                        if why:
                            report.left.append((path, type(child).__name__, why))
                    break
            else:  # an attention/MLP/patch-embed slot holding a class we do not know: say so
                if (wanted.get(name) and not isinstance(child, nn.Identity)
                        and not type(child).__module__.startswith("flashvit.")):  # ours are fused already
                    report.left.append((path, type(child).__name__, "no flashvit replacement for this class"))
            nxt_name, nxt = children[i + 1] if i + 1 < len(children) else ("", None)
            if (new is None and linear_gelu and type(parent).forward is nn.Sequential.forward
                    and type(child) is nn.Linear and nxt is not None and _gelu_kind(nxt) is not None
                    and not has_hooks(child) and not has_hooks(nxt)):
                new = _clone_as(child, _FusedLinearGelu)
                new.flashvit_activation = _gelu_kind(nxt)
                _swap(state, parent, nxt_name, nxt, nn.Identity(), f"{prefix}{nxt_name}")  # GELU now in the epilogue
            why = _bypassed(child) if new is not None else None
            if why:
                report.left.append((path, type(child).__name__, why))
                new = None
            if new is not None:
                _swap(state, parent, name, child, new, path)
                child = new
            visit(child, path + ".")

    visit(model, "")
    if (_is_layernorm(model) or type(model) is nn.MultiheadAttention
            or _qualname(model) in (_TIMM_ATTENTION | _TIMM_ROPE_ATTENTION | _TIMM_BEIT_ATTENTION | _TIMM_MLP | _TIMM_BLOCK
                                    | _TIMM_EVA_BLOCK | _TIMM_BEIT_BLOCK | _TIMM_WINDOW_ATTENTION
                                    | _TIMM_WINDOW_ATTENTION_V2 | _TIMM_RELPOS_ATTENTION | _TIMM_ATTENTION_CL
                                    | _TIMM_PVT_ATTENTION | _TIMM_GROUPED_ATTENTION | _TIMM_TINYVIT_ATTENTION
                                    | _TIMM_SWIN_BLOCK
                                    | _TIMM_DAVIT_ATTENTION)
            or _hf_role(model) is not None or _qualname(model) == f"{_HF_BEIT}.BeitLayer"
            or _qualname(model).startswith(f"{_HF_DINOV3}.DINOv3ViT")
            and type(model).__name__ in _DINOV3_CHECKED):
        report.left.append(("", type(model).__name__, "the root module itself cannot be swapped in place; "
                                                        "patch its parent"))
    if attention:
        _patch_hf_attention(model, state)
    if _qualname(model).startswith("timm.models.vision_transformer.VisionTransformer") and patch_embed:
        report.notes.append("timm VisionTransformer._pos_embed (cls/register concat + pos_embed add) runs as "
                            "timm wrote it; only the patch conv is fused")
    in_gemm = sum(_gemm_scales(new) for _, _, _, new in state.swaps)
    if in_gemm:
        report.notes.append(f"{in_gemm} LayerScale modules run in the epilogue of the GEMM before them (proj's, "
                            "fc2's), unless hooks are registered on them")
    model.__dict__[_STATE_ATTR] = state
    model.__dict__["flashvit_report"] = report
    if verbose:
        print(report)
    return model


def _gemm_scales(m: nn.Module) -> int:
    """How many LayerScales a fused block applies in its GEMMs (where its attention / MLP are fused too)."""
    def ls(x: nn.Module) -> bool:
        return _qualname(x) in LAYER_SCALE_ATTRS
    if isinstance(m, _FusedTimmBlock):
        return (int(ls(m.ls1) and isinstance(m.attn, _FusedTimmAttention))
                + int(ls(m.ls2) and isinstance(m.mlp, _RESIDUAL_MLPS)))
    if isinstance(m, (_FusedTimmEvaBlock, _FusedTimmBeitBlock)):  # gamma_1 / gamma_2: Parameters or None
        fused = _FusedTimmRopeAttention if isinstance(m, _FusedTimmEvaBlock) else _FusedTimmBeitAttention
        return (int(m.gamma_1 is not None and isinstance(m.attn, fused))
                + int(m.gamma_2 is not None and isinstance(m.mlp, _RESIDUAL_MLPS)))
    if isinstance(m, _FusedHFDinov3Layer):
        return (int(ls(m.layer_scale1) and isinstance(m.attention, _FusedHFDinov3Attention))
                + int(ls(m.layer_scale2) and isinstance(m.mlp, _RESIDUAL_MLPS)))
    if isinstance(m, _FusedHFBeitLayer):  # lambda_2: a Parameter or 1.0 (its lambda_1 stays a multiply)
        return int(isinstance(m.lambda_2, torch.Tensor) and isinstance(m.mlp, _RESIDUAL_MLPS))
    if isinstance(m, _FusedHFDinov2Layer):  # (its layer_scale1 stays a multiply)
        return int(ls(m.layer_scale2) and isinstance(m.mlp, _RESIDUAL_MLPS))
    return 0


_PLAIN_FORWARDS = (nn.Linear.forward, nn.Conv2d.forward)


def _bypassed(m: nn.Module) -> Optional[str]:
    """Why a fused replacement of ``m`` would be a different function: its forward reads its children's weights
    (and folds LayerScales) without calling them, so hooks anywhere inside ``m`` would not run, and a layer with a
    forward of its own inside (an nn.Linear / nn.Conv2d subclass that overrides it: quantized or LoRA layers; a
    wrapper around a ``base_layer``: peft's adapters) would lose it. None: safe to replace."""
    for name, sub in m.named_modules():
        where = "on it" if not name else f"on {name} inside it"
        if has_hooks(sub):
            return f"has hooks registered {where}"
        if ((isinstance(sub, (nn.Linear, nn.Conv2d)) and type(sub).forward not in _PLAIN_FORWARDS)
                or isinstance(getattr(sub, "base_layer", None), nn.Module)):
            return f"{_qualname(sub)} {where[3:]} has a forward of its own that the fused one would skip"
    return None


def _swap(state: _PatchState, parent: nn.Module, name: str, orig: nn.Module, new: nn.Module, path: str) -> None:
    setattr(parent, name, new)
    state.swaps.append((parent, name, orig, new))
    if not isinstance(new, nn.Identity):
        state.report.replaced.append((path, type(orig).__name__, type(new).__name__))


def _patch_hf_attention(model: nn.Module, state: _PatchState) -> None:
    hf_attn, others = [], []
    for n, m in model.named_modules():
        if _hf_role(m) == "Attention" and _hf_forward_differs(type(m), "Attention") is None:
            hf_attn.append((n, type(m).__name__))
        elif _qualname(m) in _HF_ROUTED:
            why = _source_reason(m)
            if why:
                state.report.left.append((n, type(m).__name__, why))
            else:
                hf_attn.append((n, type(m).__name__))
        elif (type(m).__name__.endswith("Attention") and type(m).__module__.startswith("transformers.")
              and type(m).__module__ not in (_HF_DINOV3, _HF_SWINV2) and _hf_encoder_role(m) is None
              and _qualname(m) not in _HF_CHECKED):  # (by module replacement)
            others.append((n, type(m).__name__))
    for n, cls in others:
        state.report.left.append((n, cls, "only transformers' ViT-family, BEiT, Swin and Swinv2 attention is fused "
                                          "by flashvit"))
    if not hf_attn:
        return
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        for n, cls in hf_attn:
            state.report.left.append((n, cls, "no PreTrainedModel with a config above it to set "
                                              "attn_implementation on; patch the PreTrainedModel"))
        return
    register_hf_attention()
    state.hf_attn_previous = config._attn_implementation
    model.set_attn_implementation(HF_ATTN_IMPLEMENTATION)
    if config._attn_implementation != HF_ATTN_IMPLEMENTATION:
        raise RuntimeError(f"transformers refused attn_implementation={HF_ATTN_IMPLEMENTATION!r} "
                           f"(kept {config._attn_implementation!r})")
    for n, cls in hf_attn:
        state.report.replaced.append((n, cls, f"{cls}[attn_implementation={HF_ATTN_IMPLEMENTATION}]"))


def _sync_back(orig: nn.Module, new: nn.Module) -> None:
    """What changed on a replacement while patched goes back to its original: a clone's own state (its copy of
    orig's __dict__: set_input_size's sizes, parameters that load_state_dict(assign=True) replaced, flags, hooks),
    a shared LayerNorm's parameters and eps, a shared MLP's children; the training flag to what orig holds
    alone."""
    if type(new) in _CLASS_CACHE.values():
        for k, v in new.__dict__.items():
            if not k.startswith("flashvit_"):
                orig.__dict__[k] = type(v)(v) if isinstance(v, (dict, set, list)) else v
        return
    shared = {id(m) for m in new.modules()}
    for sub in orig.modules():  # (orig and what the replacement does not hold: an MLP's act, say)
        if id(sub) not in shared:
            sub.training = new.training
    if isinstance(new, FlashLayerNorm):
        for k in ("weight", "bias"):
            if k in orig._parameters:
                orig._parameters[k] = new._parameters.get(k)
        orig.eps = new.eps
    elif isinstance(new, FusedMLP):
        for k in ("fc1", "fc2", "drop1", "drop2"):
            if k in orig._modules and orig._modules[k] is not new._modules[k]:
                orig._modules[k] = new._modules[k]


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: put the exact original module objects back (and the HF attn implementation)."""
    state: Optional[_PatchState] = model.__dict__.get(_STATE_ATTR)
    if state is None:
        raise ValueError("model was not patched by flashvit.patch")
    for parent, name, orig, new in reversed(state.swaps):
        if parent._modules.get(name) is not new:
            raise RuntimeError(f"{type(parent).__name__}.{name} was changed after patching; cannot restore it")
        _sync_back(orig, new)
        setattr(parent, name, orig)
    if state.hf_attn_previous is not None:
        model.set_attn_implementation(state.hf_attn_previous)
    del model.__dict__[_STATE_ATTR]
    model.__dict__.pop("flashvit_report", None)
    return model

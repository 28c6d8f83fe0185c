"""The Vision Transformer of "An Image is Worth 16x16 Words", with flashvit's fused ops.

Parameter names and shapes are timm's VisionTransformer's, so a timm ``vit_*`` state dict loads with
``strict=True`` and gives the same logits. Every hot layer calls a flashvit op, which runs its Triton
kernel on CUDA and eager PyTorch elsewhere (see flashvit.kernels._dispatch).

Per block (pre-norm), with T tokens of width D:
    y = LN1(x)                                       (B, T, D)
    a = proj(attention(qkv(y)))                      qkv read in place, no permutes
    h = x + a ; y = LN2(h)                           one fused add + LayerNorm pass (drop path: x + s_b·a in it)
    x = fc2(GELU(fc1(y))) + h                        bias/GELU and bias/residual in the GEMM epilogues
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from flashvit.kernels.attention import qkv_attention
from flashvit.kernels.block import _PLAIN_TENSORS, block_dtype, branch_dtype, fused_block_on, vit_block
from flashvit.kernels.layernorm import LayerNorm
from flashvit.kernels.linear import FusedMLP, linear
from flashvit.kernels.linear import mlp_recompute_mode as _mlp_recompute
from flashvit.kernels.patch_embed import PatchEmbed, resample_pos_embed


def _pair(v: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def drop_path_scale(x: torch.Tensor, p: float) -> torch.Tensor:
    """Stochastic depth's factor per sample of x (B, ...): (B,) in x's dtype, 0 with probability p, else
    1 / (1 - p) (0 everywhere at p = 1). Drawn as timm's drop_path draws its mask (one Bernoulli draw a sample,
    divided in place), so under one seed both drop the same samples."""
    keep = 1.0 - p
    s = x.new_empty((x.shape[0],)).bernoulli_(keep)
    return s.div_(keep) if keep > 0.0 else s


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability p (rescaled)."""
    if p == 0.0 or not training:
        return x
    return x * drop_path_scale(x, p).view((-1,) + (1,) * (x.dim() - 1))


def add_scaled(residual: torch.Tensor, x: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """residual + x·scale[b] (scale (B,), one factor per sample; None: 1): residual + drop_path(x), in one pass
    (addcmul) where the factor has x's dtype (timm's mask); an fp32 factor on a 16-bit x (transformers' x / keep_prob)
    rounds x·scale to x's dtype first, as eager's does."""
    if scale is None:
        return residual + x
    s = scale.view((-1,) + (1,) * (x.dim() - 1))
    return torch.addcmul(residual, x, s) if s.dtype == x.dtype else residual + (x * s).to(x.dtype)


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def active(self) -> bool:
        return self.training and self.drop_prob > 0

    def scale(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """A fresh factor per sample of x (drop_path_scale) where active, else None (the identity)."""
        return drop_path_scale(x, self.drop_prob) if self.active() else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)


class LayerScale(nn.Module):
    """Per-channel residual-branch scale (timm's ``ls1``/``ls2``, parameter ``gamma``)."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, layer_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention of x (B, T, D); ``layer_scale`` = γ of the LayerScale after it, in proj's GEMM epilogue."""
        qkv = linear(x, self.qkv.weight, self.qkv.bias)  # (B, T, 3·H·Dh), read in place below
        o = qkv_attention(qkv, self.num_heads, self.scale,
                          dropout_p=self.attn_drop.p if self.training else 0.0)  # (B, T, H·Dh)
        return self.proj_drop(linear(o, self.proj.weight, self.proj.bias, layer_scale=layer_scale))


class Block(nn.Module):
    """Pre-norm transformer encoder block (timm's names: norm1, attn, ls1, norm2, mlp, ls2)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 init_values: Optional[float] = None, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = LayerNorm(dim, eps=eps)
        self.mlp = FusedMLP(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, D) residual stream
        out = fused_block(self, x, (Attention.forward,))  # in training: one autograd node (kernels/block.py)
        if out is not None:
            return out
        # LayerScales in proj's / fc2's GEMM epilogue (γ on the fp32 result): no pass over the activations.
        # Stochastic depth: a factor per sample inside the add + LN pass, and fc2's output and the residual
        # in one addcmul (eager: a multiply, then the add).
        a = self.attn(self.norm1(x), layer_scale=_gamma(self.ls1))
        y, x = self.norm2.forward_add(a, x, self.drop_path1.scale(a))  # x <- x + drop_path(a); y = LN2(x)
        if not self.drop_path2.active():
            return self.mlp(y, residual=x, layer_scale=_gamma(self.ls2))  # residual add in fc2's epilogue
        z = self.mlp(y, layer_scale=_gamma(self.ls2))
        return add_scaled(x, z, self.drop_path2.scale(z))


_TIMM_DROP_PATH = "timm.layers.drop.DropPath"


# Other libraries' drop-path classes checked by flashvit.patch (their sources read at patch time): class -> how it
# draws its factor a sample, (module, x (B, ...)) -> (B,) fp32, the samples the module would drop on x.
DROP_PATH_DRAWS: Dict[type, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {}


def _is_drop_path(m: nn.Module) -> bool:
    return (isinstance(m, DropPath) or f"{type(m).__module__}.{type(m).__qualname__}" == _TIMM_DROP_PATH
            or type(m) in DROP_PATH_DRAWS)


def drop_path_factor(m: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """Stochastic depth's factor a sample, (B,) in x's dtype, for flashvit's or timm's DropPath ``m`` (x: (B, ...)),
    drawn as the module draws its mask (same samples dropped under one seed); None where m is the identity now
    (an nn.Identity too)."""
    if _passes(m):
        return None
    draw = DROP_PATH_DRAWS.get(type(m))
    if draw is not None:
        return draw(m, x).to(x.dtype)
    if isinstance(m, DropPath) or m.scale_by_keep:
        return drop_path_scale(x, m.drop_prob)
    return x.new_empty((x.shape[0],)).bernoulli_(1.0 - m.drop_prob)  # timm's scale_by_keep=False: the mask alone


_TIMM_LAYER_SCALES = ("timm.layers.layer_scale.LayerScale", "timm.models.vision_transformer.LayerScale")


# Other libraries' LayerScale classes (y = x·γ; timm's ``inplace`` variant computes the same values) and γ's
# parameter name. transformers' are taken inside the layers flashvit.patch fuses, whose LayerScale's source it checks.
LAYER_SCALE_ATTRS = {**dict.fromkeys(_TIMM_LAYER_SCALES, "gamma"),
                     "transformers.models.dinov2.modeling_dinov2.Dinov2LayerScale": "lambda1",
                     "transformers.models.dinov2_with_registers.modeling_dinov2_with_registers."
                     "Dinov2WithRegistersLayerScale": "lambda1",
                     "transformers.models.dinov3_vit.modeling_dinov3_vit.DINOv3ViTLayerScale": "lambda1"}


def _layer_scale_gamma(m: nn.Module) -> Optional[torch.Tensor]:
    """γ of flashvit's LayerScale or of a class in LAYER_SCALE_ATTRS; None for another module or one without its γ
    parameter."""
    name = "gamma" if isinstance(m, LayerScale) else LAYER_SCALE_ATTRS.get(
        f"{type(m).__module__}.{type(m).__qualname__}")
    gamma = m._parameters.get(name) if name is not None else None
    return gamma if isinstance(gamma, torch.Tensor) else None


def _passes(m: nn.Module) -> bool:
    """A LayerScale / drop path / dropout slot that is the identity now: nn.Identity, an nn.Dropout in eval mode or
    at p = 0, flashvit's or timm's DropPath in eval mode or at rate 0. Anything else: False."""
    if type(m) is nn.Identity:
        return True
    if type(m) is nn.Dropout:
        return not m.training or m.p == 0.0
    if _is_drop_path(m):
        return not m.training or m.drop_prob == 0.0
    return False


def has_hooks(m: nn.Module) -> bool:
    """Forward or backward hooks (pre or post) registered on ``m`` itself."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def fused_block(blk: nn.Module, x: torch.Tensor, attn_forwards: Tuple[Any, ...]) -> Optional[torch.Tensor]:
    """``blk``'s output from kernels/block.py's one-node block where it applies (training, see fused_block_on), else
    None. ``blk``: flashvit's Block or a patched timm Block (timm's names), whose attention's forward is one of
    ``attn_forwards`` (the plain qkv -> attention -> proj); it must be the pre-norm block with our LayerNorms
    (weights, one normalized dim) and FusedMLP (a GELU, nothing to recompute) with their own forwards, identities
    for every dropout, LayerScales that are the identity or flashvit's / timm's LayerScale (γ), drop paths that
    are the identity or flashvit's / timm's DropPath (a factor a sample), no q/k norms, no hooks on its layers
    (the op calls none of them). Submodules and parameters are read from their dicts (nn.Module's __getattr__
    would cost this check, made per block and step, tens of microseconds)."""
    if not fused_block_on(x):
        return None
    mods = blk._modules
    attn = mods.get("attn")
    if type(attn).forward not in attn_forwards:
        return None
    am = attn._modules
    for name in ("q_norm", "k_norm", "norm"):
        if am.get(name) is not None and type(am[name]) is not nn.Identity:
            return None
    return one_node_block(x, mods.get("norm1"), mods.get("norm2"), mods.get("mlp"), attn, (am.get("qkv"),),
                          am.get("proj"), attn.num_heads, attn.scale, (mods.get("ls1"), mods.get("ls2")),
                          (mods.get("drop_path1"), mods.get("drop_path2")), (am.get("attn_drop"), am.get("proj_drop")))


def one_node_block(x: torch.Tensor, n1: Optional[nn.Module], n2: Optional[nn.Module], mlp: Optional[nn.Module],
                   attn: nn.Module, qkv: Tuple[Optional[nn.Module], ...], proj: Optional[nn.Module], num_heads: int,
                   scale: float, scales: Tuple[Optional[nn.Module], ...], paths: Tuple[Optional[nn.Module], ...],
                   dropouts: Tuple[Optional[nn.Module], ...]) -> Optional[torch.Tensor]:
    """The checks and the call every caller of the one-node block shares (fused_block_on(x) already true): a
    pre-norm block's LayerNorms ``n1``, ``n2`` (ours), MLP (our FusedMLP), attention module ``attn`` with its
    projections ``qkv`` (one packed Linear, or q, k, v: their weights and biases concatenated, as autograd tracks
    it) and ``proj``, LayerScale and drop-path slots, and the ``dropouts`` that must pass; None where any of it
    is not the block the op computes or a layer has hooks."""
    if (mlp is None or type(mlp).forward is not FusedMLP.forward or type(n1).forward is not LayerNorm.forward
            or type(n2).forward is not LayerNorm.forward or len(n1.normalized_shape) != 1
            or len(n2.normalized_shape) != 1):
        return None
    mm = mlp._modules
    act = mm.get("act")
    approx = getattr(act, "approximate", None)
    if approx not in ("none", "tanh") or _mlp_recompute(mlp.recompute) != "none":
        return None
    if mm.get("norm") is not None and type(mm["norm"]) is not nn.Identity:
        return None
    for m in (*dropouts, mm.get("drop1"), mm.get("drop2")):
        if m is None or not _passes(m):
            return None
    gammas = []
    for m in scales:  # LayerScale: its γ in the op
        gamma = None if m is None or type(m) is nn.Identity else _layer_scale_gamma(m)
        if m is None or (gamma is None and type(m) is not nn.Identity):
            return None
        gammas.append(gamma)
    for m in paths:  # stochastic depth: a factor a sample, drawn below
        if m is None or not (_passes(m) or _is_drop_path(m)):
            return None
    fc1, fc2 = mm.get("fc1"), mm.get("fc2")
    lins = (*qkv, proj, fc1, fc2)
    if any(type(m) is not nn.Linear for m in lins):
        return None
    C = x.shape[-1]  # the block's widths: qkv (C -> 3C), proj (C -> C), fc1 (C -> hidden), fc2 (hidden -> C)
    if (any(m.out_features != 3 * C // len(qkv) for m in qkv) or any(m.in_features != C for m in (*qkv, proj, fc1))
            or proj.out_features != C or fc2.in_features != fc1.out_features or fc2.out_features != C):
        return None
    if any(has_hooks(m) for m in (n1, attn, *lins, n2, mlp, act, *dropouts, *scales, *paths)):
        return None
    if any(getattr(nn.modules.module, g) for g in _GLOBAL_HOOKS):
        return None
    pn1, pn2, pp, p1, p2 = n1._parameters, n2._parameters, proj._parameters, fc1._parameters, fc2._parameters
    qw, qb = qkv[0]._parameters["weight"], qkv[0]._parameters.get("bias")
    if len(qkv) > 1:  # separate q, k, v (transformers' ViTs): one GEMM's weight and bias, cat tracked by autograd
        if not all(type(q._parameters["weight"]) in _PLAIN_TENSORS for q in qkv):  # (before the copies)
            return None
        qw, qb = qkv_params(*qkv)
    params = (pn1.get("weight"), pn1.get("bias"), qw, qb, pp["weight"], pp.get("bias"), pn2.get("weight"),
              pn2.get("bias"), p1["weight"], p1.get("bias"), p2["weight"], p2.get("bias"))
    gammas = tuple(gammas)
    inplace = tuple(bool(getattr(m, "inplace", False)) for m in scales)
    dt = block_dtype(x, (*params, *gammas), num_heads, scale)
    if dt is None:
        return None
    # the factors drawn as the per-layer path draws them: the attention branch's, then the MLP's, in its dtype
    factors = []
    for path, gamma, ip in zip(paths, gammas, inplace):
        bd = branch_dtype(dt, gamma, ip)
        factors.append(drop_path_factor(path, x if bd == x.dtype else x.new_empty((x.shape[0],), dtype=bd)))
    return vit_block(x, params, num_heads, scale, n1.eps, n2.eps, approx, dt, tuple(factors), gammas, inplace)


def qkv_params(q: nn.Linear, k: nn.Linear, v: nn.Linear) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Separate q/k/v projections as one GEMM's weight (3·H·Dh, C) and bias (concatenated: weight-sized work; a
    missing bias among present ones is zeros)."""
    bias = None
    if any(m.bias is not None for m in (q, k, v)):
        bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in (q, k, v)])
    return torch.cat((q.weight, k.weight, v.weight)), bias


def _gamma(ls: nn.Module) -> Optional[torch.Tensor]:
    """γ of a LayerScale; None for the identity."""
    return ls.gamma if isinstance(ls, LayerScale) else None


def sincos_pos_embed(num_tokens: int, dim: int) -> torch.Tensor:
    """The seed's fixed 1-D sinusoidal position embedding, (1, num_tokens, dim)."""
    pos = torch.arange(num_tokens, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    pe = torch.zeros(num_tokens, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe[None].float()


class VisionTransformer(nn.Module):
    """ViT with timm's constructor keywords and parameter names.

    Args mirror ``timm.models.vision_transformer.VisionTransformer``: img_size, patch_size, in_chans,
    num_classes, global_pool ('token' | 'avg'), embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
    init_values (LayerScale), class_token, reg_tokens, no_embed_class, fc_norm, drop_rate,
    pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate, dynamic_img_size (any image size divisible
    by the patch size, pos_embed resampled to its grid as timm does); plus pos_embed_learnable (False = the
    fixed sinusoidal embedding of the seed model).
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "token", embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 init_values: Optional[float] = None, class_token: bool = True, reg_tokens: int = 0,
                 no_embed_class: bool = False, fc_norm: Optional[bool] = None, drop_rate: float = 0.0,
                 pos_drop_rate: float = 0.0, proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, pos_embed_learnable: bool = True,
                 dynamic_img_size: bool = False) -> None:
        super().__init__()
        img_size = _pair(img_size)
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size {img_size} must be divisible by patch_size {patch_size}")
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = embed_dim
        self.in_chans = in_chans
        self.no_embed_class = no_embed_class
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = int(class_token) + reg_tokens

        self.dynamic_img_size = dynamic_img_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, dynamic_img_size=dynamic_img_size)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        pos_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_len, embed_dim), requires_grad=pos_embed_learnable)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear decay rule
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate, dpr[i], init_values)
            for i in range(depth)
        ])
        self.norm = LayerNorm(embed_dim, eps=1e-6) if not use_fc_norm else nn.Identity()
        self.fc_norm = LayerNorm(embed_dim, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.init_weights(pos_embed_learnable)

    @torch.no_grad()
    def init_weights(self, pos_embed_learnable: bool = True) -> None:
        """timm's default init: truncated normal(0.02) for Linear weights and pos_embed, zero biases."""
        if pos_embed_learnable:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.pos_embed.copy_(sincos_pos_embed(self.pos_embed.shape[1], self.embed_dim))
        for tok in (self.cls_token, self.reg_token):
            if tok is not None:
                nn.init.normal_(tok, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token", "reg_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch: with autograd, each block's activations are recomputed in the backward instead of
        kept (torch.utils.checkpoint, non-reentrant; torch's RNG state is restored for the recompute, so dropout
        and drop-path masks repeat), trading one more forward per block for memory."""
        self.grad_checkpointing = bool(enable)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head for ``num_classes`` (0: none, features out), as timm's; optionally a new ``global_pool``
        ('token' needs the class token; the norms stay as built)."""
        if global_pool is not None:
            if global_pool not in ("token", "avg", ""):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            if global_pool == "token" and self.cls_token is None:
                raise ValueError("global_pool='token' needs class_token=True")
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.pos_embed
        self.head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype) \
            if num_classes > 0 else nn.Identity()

    def load_timm_state_dict(self, state_dict: Dict[str, torch.Tensor], strict: bool = True) -> Any:
        """Load a timm ViT state dict (or one of ours) trained at another image size or for other classes, as
        timm's pretrained loading does: pos_embed resampled to this model's patch grid (bicubic, antialiased,
        prefix rows kept), and a head of another shape, or none (DINOv2's), left as this model built it. Every
        other key must match when ``strict``. Returns load_state_dict's result (a head left: its keys missing).

        >>> model = create_model("vit_base_patch14_dinov2", img_size=224, num_classes=10)
        >>> model.load_timm_state_dict(timm.create_model("vit_base_patch14_dinov2.lvd142m", pretrained=True).state_dict())
        """
        sd = dict(state_dict)
        pe = sd.get("pos_embed")
        if pe is not None and isinstance(self.pos_embed, torch.Tensor) and pe.shape[1] != self.pos_embed.shape[1]:
            prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            sd["pos_embed"] = resample_pos_embed(pe, self.patch_embed.grid_size, num_prefix_tokens=prefix)
        own = self.state_dict()
        head = [k for k in own if k.startswith("head.")]
        if not head or any(k not in sd or sd[k].shape != own[k].shape for k in head):
            sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        result = self.load_state_dict(sd, strict=False)
        if strict:
            missing = [k for k in result.missing_keys if not k.startswith("head.")]
            if missing or result.unexpected_keys:
                raise RuntimeError(f"state dict does not fit the model: missing {missing}, unexpected "
                                   f"{result.unexpected_keys}")
        return result

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected images of shape (B, {self.in_chans}, H, W), got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"expected floating-point images, got dtype {x.dtype}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        p = self.patch_embed.patch_size[0]
        if self.dynamic_img_size:
            if x.shape[2] % p or x.shape[3] % p or not x.shape[2] or not x.shape[3]:
                raise ValueError(f"image size {tuple(x.shape[2:])} must be a nonzero multiple of the patch size {p}")
        elif tuple(x.shape[2:]) != self.patch_embed.img_size:
            raise ValueError(f"expected image size {self.patch_embed.img_size}, got {tuple(x.shape[2:])} "
                             f"(the model was built for that size; patch size {p}; dynamic_img_size=True takes "
                             "others)")

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images, checked -> (B, T, D) tokens: patches, prefix tokens, pos_embed, dropout."""
        self._check_input(x)
        x = self.patch_embed(x, self.pos_embed, self.cls_token, self.reg_token, self.no_embed_class)
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, T, D) normalized tokens."""
        x = self._tokens(x)
        if self._checkpointing():
            for blk in self.blocks:
                x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def _checkpointing(self) -> bool:
        return self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> Union[List[Any], Tuple[torch.Tensor, List[Any]]]:
        """timm's feature API: the outputs of the blocks ``indices`` picks (None: all; an int n: the last n; a
        sequence: those, negative from the end), with the final norm when ``norm``, as (B, D, H', W')
        patch-token maps (``output_fmt`` 'NCHW') or (B, L, D) tokens ('NLC'), prefix (class/register) tokens
        dropped, or paired with them (``return_prefix_tokens``). Returns the list when ``intermediates_only``,
        else (normalized final tokens, list); ``stop_early`` skips the blocks after the last one picked."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        n = len(self.blocks)
        if indices is None or isinstance(indices, int):
            last = n if indices is None else indices
            if not 0 < last <= n:
                raise ValueError(f"indices={indices}: the last n blocks need 1 <= n <= {n}")
            take = list(range(n - last, n))
        else:
            take = [n + i if i < 0 else i for i in indices]
            if not take or any(not 0 <= i < n for i in take):
                raise ValueError(f"indices {list(indices)} out of range for {n} blocks")
        images = x
        x = self._tokens(x)  # (checks the images first)
        B, _, H, W = images.shape
        picked = []
        ckpt = self._checkpointing()
        for i, blk in enumerate(self.blocks[:max(take) + 1] if stop_early else self.blocks):
            x = checkpoint(blk, x, use_reentrant=False) if ckpt else blk(x)
            if i in take:
                picked.append(self.norm(x) if norm else x)
        p = self.num_prefix_tokens
        prefix = [y[:, :p] for y in picked]
        out: List[Any] = [y[:, p:] for y in picked]
        if output_fmt == "NCHW":
            gh, gw = H // self.patch_embed.patch_size[0], W // self.patch_embed.patch_size[1]
            out = [y.reshape(B, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for y in out]
        if return_prefix_tokens and p:
            out = list(zip(out, prefix))
        if intermediates_only:
            return out
        return self.norm(x), out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------
# Presets with timm's names. Widths/depths/heads from the ViT and DeiT papers.

_SIZES: Dict[str, Dict[str, Any]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}

MODEL_CONFIGS: Dict[str, Dict[str, Any]] = {
    # The seed repository's MNIST model: patch 4, width 32, 3 blocks, 8 heads, MLP 32.
    "vit_mnist": dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=3,
                      num_heads=8, mlp_ratio=1.0),
}
for _size, _cfg in _SIZES.items():
    for _p in (14, 16, 32):
        MODEL_CONFIGS[f"vit_{_size}_patch{_p}_224"] = dict(patch_size=_p, **_cfg)
    # timm's register-token variants: no class token, pos_embed on patches only, avg pool.
    MODEL_CONFIGS[f"vit_{_size}_patch16_reg4_gap_256"] = dict(
        img_size=256, patch_size=16, class_token=False, no_embed_class=True, global_pool="avg", reg_tokens=4,
        **_cfg)
for _size in ("tiny", "small", "base"):
    MODEL_CONFIGS[f"deit_{_size}_patch16_224"] = dict(patch_size=16, **_SIZES[_size])
# DINOv2 backbones (timm's names; giant's SwiGLU MLP is not built here): LayerScale, 518 px, no head.
for _size in ("small", "base", "large"):
    _dino = dict(img_size=518, patch_size=14, init_values=1e-5, num_classes=0, **_SIZES[_size])
    MODEL_CONFIGS[f"vit_{_size}_patch14_dinov2"] = _dino
    MODEL_CONFIGS[f"vit_{_size}_patch14_reg4_dinov2"] = dict(_dino, reg_tokens=4, no_embed_class=True)


def list_models() -> list:
    """Names accepted by :func:`create_model`."""
    return sorted(MODEL_CONFIGS)


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Build a preset the way ``timm.create_model`` does; keyword arguments override the preset.

    >>> m = create_model("vit_base_patch16_224", num_classes=10, img_size=32, patch_size=4, in_chans=1)
    """
    if pretrained:
        raise ValueError("flashvit downloads nothing: build with pretrained=False and load a state dict "
                         "(timm's vit_* state dicts load with strict=True)")
    if model_name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {model_name!r}; known: {', '.join(list_models())}")
    cfg = dict(MODEL_CONFIGS[model_name])
    cfg.update(kwargs)
    return VisionTransformer(**cfg)

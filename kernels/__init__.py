"""flashvit.kernels: one file per fused op, each with Triton kernels, autograd, and a PyTorch reference."""

from flashvit.kernels._dispatch import BACKENDS, HAS_TRITON, INTERPRET, get_backend, use_backend
from flashvit.kernels.attention import (
    attention,
    attention_reference,
    dropout_mask,
    qkv_attention,
    qkv_attention_reference,
)
from flashvit.kernels.block import use_fused_block, vit_block, vit_block_reference
from flashvit.kernels.glu import swiglu, swiglu_fc2, swiglu_packed, swiglu_reference
from flashvit.kernels.layernorm import (
    LayerNorm,
    add_layer_norm,
    add_layer_norm_reference,
    layer_norm,
    layer_norm_reference,
)
from flashvit.kernels.linear import (
    MLP_RECOMPUTE,
    FusedMLP,
    linear,
    linear_reference,
    mlp,
    mlp_recompute_mode,
    qkv_rope_linear,
    use_mlp_recompute,
)
from flashvit.kernels.patch_embed import PatchEmbed, patch_embed, patch_embed_reference
from flashvit.kernels.rope import apply_rope, rope_reference

# The op modules whose kernels the ahead-of-time compile gate covers.
OP_MODULES = ("layernorm", "attention", "linear", "patch_embed", "glu", "rope", "colsum")

__all__ = [
    "BACKENDS", "HAS_TRITON", "INTERPRET", "get_backend", "use_backend",
    "attention", "attention_reference", "dropout_mask", "qkv_attention", "qkv_attention_reference",
    "LayerNorm", "layer_norm", "layer_norm_reference", "add_layer_norm", "add_layer_norm_reference",
    "FusedMLP", "MLP_RECOMPUTE", "linear", "linear_reference", "mlp", "mlp_recompute_mode", "use_mlp_recompute",
    "swiglu", "swiglu_fc2", "swiglu_packed", "swiglu_reference",
    "PatchEmbed", "patch_embed", "patch_embed_reference", "apply_rope", "qkv_rope_linear", "rope_reference",
    "use_fused_block", "vit_block", "vit_block_reference",
]

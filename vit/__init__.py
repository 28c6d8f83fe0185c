"""flashvit.vit: the Vision Transformer model and the drop-in patcher for other people's models."""

from flashvit.vit.model import (
    MODEL_CONFIGS,
    Attention,
    Block,
    VisionTransformer,
    create_model,
    list_models,
)

__all__ = ["MODEL_CONFIGS", "Attention", "Block", "VisionTransformer", "create_model", "list_models"]

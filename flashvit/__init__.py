"""flashvit: a Vision Transformer whose hot layers are Triton kernels.

    import flashvit
    model = flashvit.create_model("vit_base_patch16_224", num_classes=10)
    with flashvit.use_backend("torch"):  # or FLASHVIT_BACKEND=torch|triton|auto
        ...
"""

from flashvit import kernels as ops
from flashvit.kernels import HAS_TRITON, get_backend, use_backend, use_fused_block, use_mlp_recompute
from flashvit.vit import VisionTransformer, create_model, list_models
from flashvit.vit.cuda_graph import capture_cuda_graph
from flashvit.vit.patch import PatchReport, patch, unpatch

__version__ = "0.1.0"

__all__ = ["HAS_TRITON", "PatchReport", "VisionTransformer", "__version__", "capture_cuda_graph", "create_model",
           "get_backend", "list_models", "ops", "patch", "unpatch", "use_backend", "use_fused_block",
           "use_mlp_recompute"]

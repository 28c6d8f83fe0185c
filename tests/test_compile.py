"""torch.compile(fullgraph=True) of our ViT and of a flashvit-patched timm ViT: one graph, same results.

CPU runs the reference path. ``aot_eager`` traces forward and backward through fake tensors (what the
fused ops' ``register_fake``/autograd must support) without needing a C++ compiler, so it stays fast.
"""

import pytest
import torch
import torch._dynamo

import flashvit
from flashvit.kernels import INTERPRET
from tests.helpers import fresh_seed

timm = pytest.importorskip("timm")

BACKEND = "aot_eager"
# Where the kernels can run with backend='triton': a GPU, else CPU tensors through the interpreter.
KERNEL_DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(not torch.cuda.is_available() and not INTERPRET,
                                   reason="the kernels need a GPU or, on CPU tensors, the Triton interpreter")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(shape):
    g = torch.Generator().manual_seed(fresh_seed())
    return torch.randn(*shape, generator=g)


def _fwd_bwd(fn, model, x):
    model.zero_grad(set_to_none=True)
    out = fn(x)
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_one_graph_same_result(model, x):
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()
    ref_out, ref_grads = _fwd_bwd(model, model, x)
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    out, grads = _fwd_bwd(compiled, model, x)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    assert set(grads) == set(ref_grads) and ref_grads
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5 * scale, rtol=1e-4, msg=n)


@pytest.mark.parametrize("kw", [
    dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5),
    dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5, class_token=False,
         reg_tokens=2, no_embed_class=True, global_pool="avg", init_values=0.1),
], ids=["cls", "reg_avg_layerscale"])
def test_our_vit_compiles_fullgraph(kw):
    torch.manual_seed(fresh_seed())
    model = flashvit.create_model("vit_tiny_patch16_224", **kw).train()
    _assert_one_graph_same_result(model, _inputs((2, 3, 32, 32)))


def test_our_vit_compiles_under_a_forced_backend():
    torch.manual_seed(fresh_seed())
    model = flashvit.create_model("vit_mnist").eval()
    x = _inputs((2, 1, 28, 28))
    with flashvit.use_backend("torch"):
        ref = model(x)
        out = torch.compile(model, fullgraph=True, backend=BACKEND)(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kw", [
    dict(img_size=32, depth=2, num_classes=5),
    dict(img_size=32, depth=2, num_classes=5, qk_norm=True, init_values=0.1, reg_tokens=1),
], ids=["plain", "qknorm_layerscale_reg"])
def test_patched_timm_compiles_fullgraph(kw):
    torch.manual_seed(fresh_seed())
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).train()
    flashvit.patch(model)
    assert model.flashvit_report.counts()["Attention"] == 2
    _assert_one_graph_same_result(model, _inputs((2, 3, 32, 32)))


@needs_kernels
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_giant_patch14_dinov2",  # + SwiGLU, LayerScale
                                  "vit_small_patch16_dinov3"])  # + RoPE (rotate_half), registers, EvaBlock
def test_patched_timm_compiles_fullgraph_with_triton_forced(name):
    """The fused custom ops themselves (a GPU, or the interpreter) inside one graph: their fake kernels and autograd
    trace."""
    torch.manual_seed(fresh_seed())
    kw = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, num_classes=3)
    model = flashvit.patch(timm.create_model(name, pretrained=False, **kw).to(KERNEL_DEV).train())
    with flashvit.use_backend("triton"):
        _assert_one_graph_same_result(model, _inputs((2, 3, 16, 16)).to(KERNEL_DEV))


@needs_kernels
@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"])
def test_patched_timm_swin_compiles_fullgraph_with_triton_forced(name):
    """A patched Swin (v1; v2's cosine attention) in training, the kernels forced: the windowed mask and the learned
    bias's gradient op trace into one graph, with the eager result and gradients."""
    torch.manual_seed(fresh_seed())
    kw = dict(img_size=32, window_size=4, embed_dim=16, depths=(2,), num_heads=(2,), num_classes=3, drop_path_rate=0.0)
    model = flashvit.patch(timm.create_model(name, pretrained=False, **kw).to(KERNEL_DEV).train())
    assert model.flashvit_report.counts()["WindowAttention"] == 2
    assert model.layers[0].blocks[1].attn_mask is not None  # 4 windows, the second block shifted
    with flashvit.use_backend("triton"):
        _assert_one_graph_same_result(model, _inputs((2, 3, 32, 32)).to(KERNEL_DEV))


@needs_kernels
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_patched_torchvision_swin_compiles_fullgraph_with_triton_forced(version):
    """torchvision's Swin patched (its shifted_window_attention redone: padding, shift, window mask built in the
    forward), the kernels forced: one graph, the eager patched model's result."""
    tv = pytest.importorskip("torchvision")
    S = tv.models.swin_transformer
    torch.manual_seed(fresh_seed())
    kw = dict(patch_size=[4, 4], embed_dim=16, depths=[2], num_heads=[2], window_size=[4, 4], num_classes=3,
              stochastic_depth_prob=0.0)  # (two runs would draw differently)
    if version == "v2":
        kw.update(block=S.SwinTransformerBlockV2, downsample_layer=S.PatchMergingV2)
    model = flashvit.patch(S.SwinTransformer(**kw).to(KERNEL_DEV).train())
    if any("not the source flashvit checked" in why for _, _, why in model.flashvit_report.left):
        pytest.skip(f"torchvision {tv.__version__} is not the source flashvit checked: {model.flashvit_report.left}")
    assert model.flashvit_report.counts()[f"ShiftedWindowAttention{'V2' if version == 'v2' else ''}"] == 2
    with flashvit.use_backend("triton"):
        _assert_one_graph_same_result(model, _inputs((2, 3, 20, 24)).to(KERNEL_DEV))


@needs_kernels
@pytest.mark.parametrize("which", ["ours", "timm"])
def test_stochastic_depth_inside_a_compiled_graph(which):
    """Drop path in training on the kernels: the factor per sample's draw, add + LayerNorm's custom op taking it and
    the MLP branch's addcmul trace into one graph; under one seed the compiled model drops what eager drops."""
    torch.manual_seed(fresh_seed())
    kw = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3, drop_path_rate=0.5)
    if which == "ours":
        model = flashvit.create_model("vit_tiny_patch16_224", **kw)
    else:
        model = flashvit.patch(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw))
    model = model.to(KERNEL_DEV).train()
    x = _inputs((4, 3, 16, 16)).to(KERNEL_DEV)
    with flashvit.use_backend("triton"):
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
        torch._dynamo.reset()
        torch.manual_seed(7)
        ref_out, ref_grads = _fwd_bwd(model, model, x)
        compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
        torch.manual_seed(7)
        out, grads = _fwd_bwd(compiled, model, x)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5 * scale, rtol=1e-4, msg=n)


@needs_kernels
@pytest.mark.parametrize("mode", ["act", "fc1"])
def test_mlp_recompute_inside_a_compiled_graph(mode):
    """The MLP backward's recompute (the activation op, or fc1's forward op again) traces into the one graph."""
    torch.manual_seed(fresh_seed())
    model = flashvit.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=1,
                                  num_heads=2, num_classes=3).to(KERNEL_DEV).train()
    with flashvit.use_backend("triton"), flashvit.use_mlp_recompute(mode):
        _assert_one_graph_same_result(model, _inputs((2, 3, 16, 16)).to(KERNEL_DEV))


@needs_kernels
def test_rope_qkv_gemm_inside_a_compiled_inference_graph():
    """A patched DINOv3 (timm) in inference: the qkv GEMM with its RoPE epilogue (a custom op with a fake) traces
    into one graph with the kernels forced, and gives the eager features."""
    torch.manual_seed(fresh_seed())
    kw = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, num_classes=3)
    model = flashvit.patch(timm.create_model("vit_small_patch16_dinov3", pretrained=False, **kw).to(KERNEL_DEV).eval())
    x = _inputs((2, 3, 16, 16)).to(KERNEL_DEV)
    with torch.no_grad(), flashvit.use_backend("triton"):
        explained = torch._dynamo.explain(model.forward_features)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        ref = model.forward_features(x)
        out = torch.compile(model.forward_features, fullgraph=True, backend=BACKEND)(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert "flashvit.qkv_rope_linear" in str(explained.graphs[0].graph)


@needs_kernels
@pytest.mark.parametrize("learned", [False, True], ids=["bool", "learned"])
@pytest.mark.parametrize("packed", [False, True], ids=["views", "packed"])
def test_masked_attention_kernels_inside_a_compiled_graph(packed, learned):
    """attention(attn_mask=...) on q, k, v and qkv_attention(attn_mask=...) on packed qkv, with grads: the masked
    forward and backward ops trace into one graph (fakes, autograd), same output and grads as eager. ``learned``:
    a relative-position bias that requires grad, windowed as Swin's (its gradient from the backward op too)."""
    from flashvit.kernels import attention, qkv_attention
    g = torch.Generator().manual_seed(fresh_seed())
    keep = torch.rand(4, 1, 9, 9, generator=g) > 0.3
    keep[..., 0] = True
    keep = keep.to(KERNEL_DEV)
    win = torch.where(torch.rand(1, 2, 1, 9, 9, generator=g) > 0.2, 0.0, float("-inf")).to(KERNEL_DEV)
    extra = (torch.randn(1, 2, 9, 9, generator=g).to(KERNEL_DEV).requires_grad_(),) if learned else ()

    def mask(*bias):
        return bias[0].unsqueeze(1) + win if learned else keep
    if packed:
        inputs = (torch.randn(4, 9, 3 * 2 * 16, generator=g).to(KERNEL_DEV).requires_grad_(), *extra)
        op = "qkv_attention"

        def f(qkv, *bias):
            return qkv_attention(qkv, 2, attn_mask=mask(*bias), backend="triton")
    else:
        inputs = (*(torch.randn(4, 9, 2, 16, generator=g).to(KERNEL_DEV).requires_grad_() for _ in range(3)), *extra)
        op = "masked_attention"

        def f(q, k, v, *bias):
            return attention(q, k, v, attn_mask=mask(*bias), backend="triton")

    explained = torch._dynamo.explain(f)(*inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    outs = []
    for fn in (f, torch.compile(f, fullgraph=True, backend=BACKEND)):
        o = fn(*inputs)
        grads = torch.autograd.grad(o.square().sum(), inputs)
        outs.append((o.detach(), *grads))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    bodies = [str(m.graph) for m in explained.graphs[0].modules() if isinstance(m, torch.fx.GraphModule)]
    assert any(f"flashvit.{op}_fwd" in b for b in bodies)
    assert any(f"flashvit.{op}_bwd{'_mask_grad' if learned and packed else ''}" in b for b in bodies)


@needs_kernels
def test_attention_dropout_kernels_inside_a_compiled_graph():
    """Attention dropout runs our kernels inside one graph: the seed is a device draw the graph traces (no
    .item(), no graph break), so the compiled model equals eager under the same torch seed, draws a new mask
    each call, and the kernels (not the reference) ran."""
    import importlib
    from unittest import mock
    A = importlib.import_module("flashvit.kernels.attention")
    torch.manual_seed(fresh_seed())
    kw = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, num_classes=3,
              attn_drop_rate=0.3)
    model = flashvit.patch(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).to(KERNEL_DEV).train())
    x = _inputs((2, 3, 16, 16)).to(KERNEL_DEV)
    drops = []
    real = A.qkv_attention_fwd

    def spy(*args, **kwargs):
        drops.append(kwargs["dropout_p"])
        return real(*args, **kwargs)

    with flashvit.use_backend("triton"), mock.patch.object(A, "qkv_attention_fwd", spy):
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
        seed = fresh_seed()
        torch.manual_seed(seed)
        ref_out, ref_grads = _fwd_bwd(model, model, x)
        drops.clear()
        torch.manual_seed(seed)
        out, grads = _fwd_bwd(compiled, model, x)
        other = compiled(x).detach()
    assert drops == [0.3, 0.3]  # one kernel forward a compiled call
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)
    assert not torch.equal(other, out)


@needs_kernels
def test_our_vit_exports_with_the_fused_ops_and_runs_under_inference_mode():
    """torch.export of our ViT with the kernels: the graph holds the flashvit custom ops (deployable as one
    program) and runs to the eager result; torch.inference_mode gives no_grad's result."""
    torch.manual_seed(fresh_seed())
    model = flashvit.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=1,
                                  num_heads=2, num_classes=3).to(KERNEL_DEV).eval()
    x = _inputs((2, 3, 16, 16)).to(KERNEL_DEV)
    with flashvit.use_backend("triton"):
        with torch.no_grad():
            ref = model(x)
        with torch.inference_mode():
            assert torch.equal(model(x), ref)
        program = torch.export.export(model, (x,))
        ops = {str(n.target) for n in program.graph.nodes if str(n.target).startswith("flashvit.")}
        assert {"flashvit.patch_embed_fwd.default", "flashvit.qkv_attention_fwd.default",
                "flashvit.layer_norm_fwd.default"} <= ops, ops
        torch.testing.assert_close(program.module()(x), ref, atol=0, rtol=0)


def test_patched_hf_vit_compiles_fullgraph():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(fresh_seed())
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2,
                                 num_attention_heads=3, intermediate_size=80, num_labels=5)
    model = flashvit.patch(transformers.ViTForImageClassification(cfg).eval())
    x = _inputs((2, 3, 32, 32))
    ref = model(pixel_values=x).logits
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    torch.testing.assert_close(compiled(pixel_values=x).logits, ref, atol=1e-5, rtol=1e-4)


@needs_kernels
def test_patched_hf_dinov3_compiles_fullgraph_with_the_kernels():
    """transformers' DINOv3 patched (q/k/v weights concatenated, RoPE + flash attention custom ops) in one graph."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DINOv3ViTModel"):
        pytest.skip(f"transformers {transformers.__version__} has no DINOv3ViTModel")
    torch.manual_seed(fresh_seed())
    cfg = transformers.DINOv3ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_attention_heads=2,
                                       num_hidden_layers=1, intermediate_size=48, num_register_tokens=2)
    model = flashvit.patch(transformers.DINOv3ViTModel(cfg).eval())
    assert model.flashvit_report.counts().get("DINOv3ViTAttention") == 1, model.flashvit_report
    x = _inputs((2, 3, 16, 16))
    with flashvit.use_backend("triton" if INTERPRET else "auto"):
        ref = model(pixel_values=x).last_hidden_state
        compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
        torch.testing.assert_close(compiled(pixel_values=x).last_hidden_state, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
def test_patched_timm_compiles_fullgraph_on_cuda_triton_path():
    """On CUDA the patched layers run the Triton custom ops: Dynamo must see them as opaque ops (no break)."""
    torch.manual_seed(fresh_seed())
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, depth=2, num_classes=10)
    model = flashvit.patch(model.cuda().bfloat16().train())
    x = _inputs((4, 3, 64, 64)).cuda().bfloat16()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    ref_out, ref_grads = _fwd_bwd(model, model, x)
    out, grads = _fwd_bwd(torch.compile(model, fullgraph=True, backend=BACKEND), model, x)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2 * ref_out.abs().max().item(), rtol=2e-2)
    for n in ref_grads:
        scale = ref_grads[n].abs().max().item()
        torch.testing.assert_close(grads[n].float(), ref_grads[n].float(), atol=2e-2 * scale + 1e-6, rtol=2e-2,
                                   msg=n)

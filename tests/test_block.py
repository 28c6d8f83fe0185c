"""kernels/block.py: a plain pre-norm ViT block in training as one autograd node, against the float64 reference;
where flashvit's Block and patched timm Blocks take it, and where they must not."""

from __future__ import annotations

import importlib

import pytest
import torch

import flashvit
from flashvit.kernels._dispatch import emulate_cuda_auto
from flashvit.kernels.block import fused_block_on, use_fused_block, vit_block, vit_block_reference
from tests.helpers import assert_close_to_ref, poisoned_empty, randn

BK = importlib.import_module("flashvit.kernels.block")
PATCH = importlib.import_module("flashvit.vit.patch")
L = importlib.import_module("flashvit.kernels.layernorm")
LIN = importlib.import_module("flashvit.kernels.linear")
GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
needs_kernels = pytest.mark.skipif(not (GPU or flashvit.kernels.INTERPRET),
                                   reason="needs CUDA or TRITON_INTERPRET=1 (the kernels)")
NAMES = ("norm1.weight", "norm1.bias", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "norm2.weight",
         "norm2.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def _params(C: int, hidden: int, dtype: torch.dtype, bias: bool = True, ln_bias: bool = True):
    """Random block parameters (grads on); LayerNorm weights near 1, linears at 1/sqrt(fan_in)."""
    def lin(n, k):
        return randn(n, k, dtype=dtype, device=DEV, scale=k ** -0.5, requires_grad=True)

    def vec(n, mean=0.0, on=True):
        if not on:
            return None
        return (randn(n, dtype=dtype, device=DEV, scale=0.2) + mean).detach().requires_grad_(True)
    return (vec(C, 1.0), vec(C, on=ln_bias), lin(3 * C, C), vec(3 * C, on=bias), lin(C, C), vec(C, on=bias),
            vec(C, 1.0), vec(C, on=ln_bias), lin(hidden, C), vec(hidden, on=bias), lin(C, hidden), vec(C, on=bias))


def _run(fn, x, params, dout, **kw):
    """fn's output and the gradients of x and every parameter that takes one; params[12:]: LayerScale's γs."""
    if len(params) > 12:
        kw = dict(kw, layer_scales=tuple(params[12:]))
    out = fn(x, tuple(params[:12]), **kw)
    leaves = [t for t in (x, *params) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, leaves, dout)
    return out.detach(), grads


def _as(ts, dtype):
    return tuple(None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad) for t in ts)


CASES = [  # (B, N, C, heads, hidden, bias, LayerNorm bias, stochastic depth, LayerScale)
    (2, 5, 64, 4, 256, True, True, False, False),
    (1, 17, 96, 2, 136, False, True, False, True),  # head dim 48, odd tokens, odd hidden, no linear biases, γ
    (3, 7, 40, 5, 64, True, False, True, True),     # head dim 8, LayerNorms without bias, drop-path factors, γ
]


@needs_kernels
@pytest.mark.parametrize("fused_bias", [False, True])  # the bias grads summed apart / in the backward's passes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", ["triton", "auto"])  # LayerNorm on its kernels / torch's (attention: kernels)
@pytest.mark.parametrize("case", CASES)
def test_block_matches_float64(case, backend, dtype, fused_bias, monkeypatch):
    B, N, C, H, hidden, bias, ln_bias, drop, ls = case
    monkeypatch.setattr(L, "_empty", poisoned_empty)  # LayerNorm outputs the kernels must write
    monkeypatch.setattr(LIN, "_empty", lambda shape, device, dtype: poisoned_empty(shape, dtype, device))  # (linear's)
    params = _params(C, hidden, dtype, bias, ln_bias)
    x = randn(B, N, C, dtype=dtype, device=DEV, requires_grad=True)
    dout = randn(B, N, C, dtype=dtype, device=DEV)
    kw = dict(num_heads=H, scale=(C // H) ** -0.5, eps1=1e-6, eps2=1e-5, approximate="tanh" if ln_bias else "none")
    if drop:  # samples 0 and 2 dropped from the attention branch, 1 from the MLP's; the rest scaled by 1 / keep
        kw["drop_scales"] = (torch.tensor([0.0, 2.0, 0.0], dtype=dtype, device=DEV),
                             torch.tensor([2.0, 0.0, 2.0], dtype=dtype, device=DEV))
    gammas = ()
    if ls:  # LayerScale's γ a branch, near its small init (and one in-place, timm's variant)
        gammas = tuple(randn(C, dtype=dtype, device=DEV, scale=0.05, requires_grad=True) for _ in range(2))
        kw["layer_scale_inplace"] = (False, drop)
    params = params + gammas
    calls = []
    real = BK.BlockFn.apply
    monkeypatch.setattr(BK.BlockFn, "apply", lambda *a: calls.append(a[-1]) or real(*a))
    with flashvit.use_backend(backend), use_fused_block(True), BK.use_fused_bias_grads(fused_bias):
        assert fused_block_on(x)
        out, grads = _run(vit_block, x, params, dout, **kw)
    assert len(calls) == 1 and calls[0][5] == (backend == "triton")  # cfg's LayerNorm-kernel flag
    assert calls[0][-1] is fused_bias and BK._fused_bias_grads() is BK.FUSED_BIAS_GRADS is False
    ref, ref_grads = _run(vit_block_reference, *_as((x,), torch.float64), _as(params, torch.float64),
                          dout.double(), **kw)
    same, same_grads = _run(vit_block_reference, x.detach().requires_grad_(True), _as(params, dtype), dout, **kw)
    tol = dict(atol=2e-4, rtol=2e-3)
    assert_close_to_ref(out, ref, same, name="out", **tol)
    names = ["x"] + [n for n, p in zip(NAMES + ("ls1.gamma", "ls2.gamma"), params) if p is not None]
    for name, g, r, s in zip(names, grads, ref_grads, same_grads):
        assert_close_to_ref(g, r, s, factor=3.0, name=f"d{name}", **tol)


@needs_kernels
@pytest.mark.parametrize("fused_bias,frozen", [(False, (2, 3, 10)), (True, (2, 3, 10)), (True, (5, 9, 11)),
                                              (True, (2, 4, 8, 10))])
def test_block_grads_only_where_asked(fused_bias, frozen, monkeypatch):
    """Frozen parameters and an input without grad get None; the others match the reference (with the fused bias
    grads also where a bias is frozen and its weight is not, and where a weight is and its bias is not)."""
    C, H = 32, 2
    params = list(_params(C, 64, torch.float32))
    for i in frozen:
        params[i] = params[i].detach()
    x = randn(2, 3, C, device=DEV)
    dout = randn(2, 3, C, device=DEV)
    kw = dict(num_heads=H, scale=0.3, eps1=1e-6, eps2=1e-6)
    with flashvit.use_backend("triton"), use_fused_block(True), BK.use_fused_bias_grads(fused_bias):
        out = vit_block(x, tuple(params), **kw)
    out.backward(dout)
    ref_params = _as(params, torch.float64)
    vit_block_reference(x.double(), ref_params, **kw).backward(dout.double())
    for i, (p, r) in enumerate(zip(params, ref_params)):
        if i in frozen:
            assert p.grad is None and not p.requires_grad
        else:
            assert_close_to_ref(p.grad, r.grad, atol=2e-4, rtol=2e-3, name=NAMES[i])


def test_block_refuses_wrong_shapes():
    params = list(_params(16, 32, torch.float32))
    params[2] = torch.zeros(40, 16)  # qkv weight not (3C, C)
    with pytest.raises(ValueError, match="qkv weight has shape"):
        vit_block(torch.zeros(1, 2, 16), tuple(params), 2, 0.5, 1e-6, 1e-6)
    good = _params(16, 32, torch.float32)
    x = torch.zeros(3, 2, 16, device=DEV)
    with pytest.raises(ValueError, match="approximate"):
        vit_block(x, good, 2, 0.5, 1e-6, 1e-6, approximate="x")
    with pytest.raises(ValueError, match=r"layer_scales\[1\] must be \(16,\)"):
        vit_block(x, good, 2, 0.5, 1e-6, 1e-6, layer_scales=(None, torch.ones(8, device=DEV)))
    with pytest.raises(ValueError, match=r"drop_scales\[0\] must be \(3,\) torch.float32"):
        vit_block(x, good, 2, 0.5, 1e-6, 1e-6, drop_scales=(torch.ones(2, device=DEV), None))
    with pytest.raises(ValueError, match=r"drop_scales\[1\] must be \(3,\) torch.float32"):
        vit_block(x, good, 2, 0.5, 1e-6, 1e-6, drop_scales=(None, torch.ones(3, dtype=torch.float16, device=DEV)))
    with pytest.raises(ValueError, match="head"):
        vit_block(torch.zeros(1, 2, 20), _params(20, 8, torch.float32), 2, 0.5, 1e-6, 1e-6)  # head dim 10


def _spy(monkeypatch):
    calls = []
    real = BK.BlockFn.apply
    monkeypatch.setattr(BK.BlockFn, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


def _tiny_models(drop_path: float = 0.0, init_values=None):
    torch.manual_seed(0)
    ours = flashvit.create_model("vit_small_patch16_224", img_size=32, embed_dim=64, num_heads=4, depth=2,
                                 num_classes=10, drop_path_rate=drop_path, init_values=init_values).to(DEV).train()
    models = [("flashvit", ours)]
    try:
        import timm
    except Exception:
        return models
    torch.manual_seed(0)
    t = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, embed_dim=64, num_heads=4,
                          depth=2, num_classes=10, drop_path_rate=drop_path, init_values=init_values).to(DEV).train()
    models.append(("timm+flashvit.patch", flashvit.patch(t)))
    return models


def _step(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@needs_kernels
@pytest.mark.parametrize("drop_path,init_values", [(0.0, None), (0.6, None), (0.6, 0.1)])
@pytest.mark.parametrize("which", ["flashvit", "timm+flashvit.patch"])
def test_models_train_through_the_block(which, drop_path, init_values, monkeypatch):
    """Every block of flashvit's ViT and of a patched timm ViT runs as one node when asked; logits and every
    parameter's gradient match the per-layer path (same kernels but the linears), with stochastic depth (one
    seed: the same samples dropped) and LayerScale too."""
    models = dict(_tiny_models(drop_path, init_values))
    if which not in models:
        pytest.skip("timm is not installed")
    model = models[which]
    x = randn(4, 3, 32, 32, device=DEV)
    calls = _spy(monkeypatch)
    with flashvit.use_backend("triton"):
        torch.manual_seed(7)
        with use_fused_block(True):
            out, grads = _step(model, x)
        assert len(calls) == 2
        torch.manual_seed(7)
        with use_fused_block(False):
            ref, ref_grads = _step(model, x)
        if drop_path:  # the draws matter: another seed drops other samples
            torch.manual_seed(8)
            with use_fused_block(True):
                other, _ = _step(model, x)
            assert not torch.allclose(other, out)
            del calls[2:]
    assert len(calls) == 2 and grads.keys() == ref_grads.keys()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-3, msg=n)


def _same_as_per_layer(step, calls, seed: int = 5) -> torch.Tensor:
    """``step()`` -> (output, {name: grad}) with one node a block (two blocks: two calls) and per layer, one seed
    each (the same samples dropped): the output and every gradient match; returns the one-node output."""
    torch.manual_seed(seed)
    with use_fused_block(True):
        out, grads = step()
    assert len(calls) == 2
    torch.manual_seed(seed)
    with use_fused_block(False):
        ref, ref_grads = step()
    assert len(calls) == 2 and grads.keys() == ref_grads.keys()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-3, msg=n)
    return out


def _skip_unless_checked(fused: bool) -> None:
    """flashvit.patch leaves transformers' classes whose sources are not the ones it checked (transformers 5.24):
    another version's layers then take no one-node block, by design (the patch report says why)."""
    import transformers
    if not fused and transformers.__version__ != "5.24.0":
        pytest.skip(f"transformers {transformers.__version__}: flashvit.patch left these attentions (it checked "
                    f"5.24's sources)")
    assert fused, "flashvit.patch left the attentions of transformers 5.24, whose sources it checked"


def _hf_vit(family: str = "vit", qkv_bias: bool = True, drop_path: float = 0.0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=16,
               num_labels=10, qkv_bias=qkv_bias)
    if family == "dinov2":  # LayerScale (λ) and stochastic depth
        cfg.update(mlp_ratio=2, layerscale_value=0.5, drop_path_rate=drop_path)
    else:
        cfg.update(intermediate_size=136)
    cls, config = {"vit": (transformers.ViTForImageClassification, transformers.ViTConfig),
                   "deit": (transformers.DeiTForImageClassification, transformers.DeiTConfig),
                   "dinov2": (transformers.Dinov2ForImageClassification, transformers.Dinov2Config)}[family]
    return flashvit.patch(cls(config(**cfg)).to(DEV).train())


def _hf_layers(model):
    inner = getattr(model, "vit", None) or getattr(model, "deit", None) or model.dinov2.encoder
    return inner.layers if hasattr(inner, "layers") else inner.layer


@needs_kernels
@pytest.mark.parametrize("family,qkv_bias,drop_path", [("vit", True, 0.0), ("vit", False, 0.0), ("deit", True, 0.0),
                                                       ("dinov2", True, 0.0), ("dinov2", False, 0.6)])
def test_hf_vits_train_through_the_block(family, qkv_bias, drop_path, monkeypatch):
    """Every layer of a patched transformers ViT / DeiT / DINOv2 (LayerScale λ, stochastic depth) runs as one node
    when asked (q, k, v as one GEMM: their weights concatenated, autograd splitting the gradient back); logits and
    every parameter's gradient match the per-layer path (one seed: the same samples dropped). Not where attention
    dropout is active in training, nor where transformers records outputs (its hooks on the attention)."""
    model = _hf_vit(family, qkv_bias, drop_path)
    layers = _hf_layers(model)
    _skip_unless_checked(all(layer.flashvit_block_attn is not None for layer in layers))
    assert all(type(layer).flashvit_block_attn is None for layer in layers)  # (set on each patched layer)
    x = randn(3, 3, 32, 32, device=DEV)
    calls = _spy(monkeypatch)

    def step(**kw):
        model.zero_grad(set_to_none=True)
        out = model(x, **kw).logits
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with flashvit.use_backend("triton"):
        out = _same_as_per_layer(step, calls)
        with use_fused_block(True):
            if drop_path:  # the draws matter: another seed drops other samples
                torch.manual_seed(6)
                assert not torch.allclose(step()[0], out)
                del calls[2:]
            layers[0].attention.attention_dropout = 0.1
            step()
            assert len(calls) == 3  # layer 0 per layer (dropout in its attention), layer 1 one node
            layers[0].attention.attention_dropout = 0.0
            model.eval()
            with torch.no_grad():
                model(x)
            assert len(calls) == 3  # no grads: per layer
            model.train()
            step(output_attentions=True)  # transformers' output-capturing hooks on the attentions
            assert len(calls) == 3


@needs_kernels
@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_hf_encoders_train_through_the_block(family, monkeypatch):
    """A patched transformers SigLIP / CLIP vision tower (GELU MLPs) trains with one node a layer; its output and
    every gradient match the per-layer path's. CLIP's default quick GELU keeps its MLP and so its layers per layer."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=136, image_size=32,
               patch_size=16)
    if family == "clip":
        cfg["hidden_act"] = "gelu"
    cls, config = {"siglip": (transformers.SiglipVisionModel, transformers.SiglipVisionConfig),
                   "clip": (transformers.CLIPVisionModel, transformers.CLIPVisionConfig)}[family]
    model = flashvit.patch(cls(config(**cfg)).to(DEV).train())
    attns = [m for n, m in model.named_modules() if n.endswith("self_attn")]  # (its 2 layers')
    _skip_unless_checked(len(attns) == 2 and all(isinstance(m, PATCH._FusedHFEncoderAttention) for m in attns))
    x = randn(3, 3, 32, 32, device=DEV)
    calls = _spy(monkeypatch)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(x).last_hidden_state
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with flashvit.use_backend("triton"):
        _same_as_per_layer(step, calls)
    if family == "clip":
        model = flashvit.patch(cls(config(**dict(cfg, hidden_act="quick_gelu"))).to(DEV).train())
        with flashvit.use_backend("triton"), use_fused_block(True):
            step()
        assert len(calls) == 2


@needs_kernels
def test_blocks_that_must_not_take_it(monkeypatch):
    """The per-layer path wherever the one node would skip something: hooks on a layer, an active drop path or
    dropout, another module where a LayerScale goes, no grads, the default setting off CUDA; and where the dtypes
    are not one, nor fp32
    under autocast."""
    calls = _spy(monkeypatch)
    x = randn(2, 3, 32, 32, device=DEV)

    def runs_block(model, ctx=None) -> bool:
        before = len(calls)
        with flashvit.use_backend("triton"), use_fused_block(True), (ctx or torch.enable_grad()):
            model(x).float().sum().backward()
        return len(calls) > before

    for name, model in _tiny_models():
        assert runs_block(model), name
        seen: list = []
        h = model.blocks[0].mlp.register_forward_hook(lambda *a, seen=seen: seen.append(1))
        assert runs_block(model) and seen == [1], name  # block 0 per layer (its hook ran), block 1 fused
        h.remove()
        model.blocks[1].attn.proj_drop.p = 0.1
        model.blocks[0].attn.proj_drop.p = 0.1
        assert not runs_block(model), name
        model.eval()
        assert runs_block(model), name  # eval: dropout is the identity, grads still on
        model.train()
        model.blocks[0].attn.proj_drop.p = model.blocks[1].attn.proj_drop.p = 0.0
        with torch.no_grad():
            before = len(calls)
            with flashvit.use_backend("triton"), use_fused_block(True):
                model(x)
            assert len(calls) == before, name
    ours = flashvit.create_model("vit_small_patch16_224", img_size=32, embed_dim=64, num_heads=4, depth=1,
                                 init_values=1e-5, drop_path_rate=0.0).to(DEV).train()
    assert runs_block(ours)  # LayerScale: γ in the op
    qkv = ours.blocks[0].attn.qkv

    class Adapted(torch.nn.Linear):  # a projection with a forward of its own (an adapter's shape)
        pass
    ours.blocks[0].attn.qkv = Adapted(64, 192).to(DEV)
    assert not runs_block(ours)  # not a plain nn.Linear: per layer
    ours.blocks[0].attn.qkv = qkv
    ours.blocks[0].ls1 = torch.nn.Dropout(0.0)  # a module in a LayerScale slot that is no LayerScale
    assert not runs_block(ours)
    ours = flashvit.create_model("vit_small_patch16_224", img_size=32, embed_dim=64, num_heads=4, depth=2,
                                 drop_path_rate=0.5).to(DEV).train()  # rates 0 and 0.5
    before = len(calls)
    assert runs_block(ours) and len(calls) == before + 2  # stochastic depth: a factor a sample in the op
    if not GPU:
        with use_fused_block(None):
            assert not fused_block_on(x.requires_grad_(True))  # the default: CUDA only
            with emulate_cuda_auto():  # ... as CUDA decides (bench overhead's [auto] rows)
                assert fused_block_on(x)
                with flashvit.use_backend("triton"):
                    assert not fused_block_on(x)  # 'auto' only
                lin = importlib.import_module("flashvit.kernels.linear")
                with lin.use_gemm("cublas"):
                    assert not fused_block_on(x)  # a GEMM path asked for: the per-layer ops take it
                monkeypatch.setattr(lin, "AUTO_TRAINING", True)
                assert not fused_block_on(x)  # the fused linears in training: theirs
                monkeypatch.undo()
                calls = _spy(monkeypatch)
                for name, model in _tiny_models():
                    model(x.detach()).sum().backward()
                    assert len(calls) == 2, name
                    calls.clear()
                with torch.no_grad():
                    assert not fused_block_on(x)
    xb = randn(2, 3, 32, device=DEV)
    params = _params(32, 64, torch.float32)
    assert BK.block_dtype(xb, params, 2, 0.25) == torch.float32
    assert BK.block_dtype(xb.half(), params, 2, 0.25) is None  # mixed dtypes without autocast
    assert BK.block_dtype(xb, params, 3, 0.25) is None and BK.block_dtype(xb, params, 2, -1.0) is None
    with torch.autocast(xb.device.type, dtype=torch.float16):
        assert BK.block_dtype(xb, params, 2, 0.25) == torch.float16  # AMP: fp32 in, the linears in fp16
        assert BK.block_dtype(xb.half(), _as(params, torch.float16), 2, 0.25) is None


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item()


@needs_kernels
@pytest.mark.parametrize("fused_bias", [False, True])
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_block_under_autocast(backend, fused_bias, monkeypatch):
    """AMP: fp32 x and parameters under fp16 autocast. The op casts as autocast does (LayerNorms and the residual
    stream fp32, linears and attention fp16) and returns fp32 gradients; out and every gradient within 2x / 3x
    eager AMP's error against float64 (+ a small atol), each a tensor of autocast's dtypes."""
    B, N, C, H = 2, 5, 64, 4
    params = _params(C, 128, torch.float32) + tuple(  # + LayerScale γs, fp32; the MLP's in place (timm's)
        randn(C, device=DEV, scale=0.1, requires_grad=True) for _ in range(2))
    x = randn(B, N, C, device=DEV, requires_grad=True)
    dout = randn(B, N, C, device=DEV)
    kw = dict(num_heads=H, scale=(C // H) ** -0.5, eps1=1e-6, eps2=1e-6, layer_scale_inplace=(False, True))
    calls = _spy(monkeypatch)
    with torch.autocast(x.device.type, dtype=torch.float16), flashvit.use_backend(backend), use_fused_block(True), \
            BK.use_fused_bias_grads(fused_bias):
        dt = BK.block_dtype(x, params, H, kw["scale"])
        assert dt == torch.float16
        out, grads = _run(lambda x, p, **k: vit_block(x, p, **k, dtype=dt), x, params, dout, **kw)
        amp, amp_grads = _run(vit_block_reference, x.detach().requires_grad_(True), _as(params, torch.float32), dout,
                              **kw)
    assert len(calls) == 1 and out.dtype == amp.dtype == torch.float32
    ref, ref_grads = _run(vit_block_reference, *_as((x,), torch.float64), _as(params, torch.float64),
                          dout.double(), **kw)
    assert _err(out, ref) <= 2 * _err(amp, ref) + 1e-3
    for name, g, r, a in zip(("x",) + NAMES + ("ls1.gamma", "ls2.gamma"), grads, ref_grads, amp_grads):
        assert g.dtype == a.dtype == torch.float32, name
        assert _err(g, r) <= 3 * _err(a, r) + 1e-3 * r.abs().max().item(), name


@pytest.mark.gpu
@pytest.mark.parametrize("fused_bias", [False, True])
def test_block_bf16_vit_b_gpu(fused_bias, monkeypatch):
    """ViT-B's block in bf16 on the GPU (N = 197, head dim 64) by the 2x/3x rule (its bias grads summed apart or
    in the backward's passes: LN2's kernel at width 768), and the default setting runs it, in bf16 and under bf16
    autocast."""
    B, N, C, H = 4, 197, 768, 12
    params = _params(C, 4 * C, torch.bfloat16)
    x = randn(B, N, C, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    dout = randn(B, N, C, dtype=torch.bfloat16, device=DEV)
    kw = dict(num_heads=H, scale=(C // H) ** -0.5, eps1=1e-6, eps2=1e-6)
    assert fused_block_on(x)
    with BK.use_fused_bias_grads(fused_bias):
        out, grads = _run(vit_block, x, params, dout, **kw)
    ref, ref_grads = _run(vit_block_reference, *_as((x,), torch.float64), _as(params, torch.float64),
                          dout.double(), **kw)
    same, same_grads = _run(vit_block_reference, x.detach().requires_grad_(True), _as(params, torch.bfloat16),
                            dout, **kw)
    assert_close_to_ref(out, ref, same, atol=1e-2, name="out")
    for name, g, r, s in zip(("x",) + NAMES, grads, ref_grads, same_grads):
        assert_close_to_ref(g, r, s, factor=3.0, atol=1e-2, name=f"d{name}")
    calls = _spy(monkeypatch)
    model = flashvit.create_model("vit_small_patch16_224", img_size=64, depth=2).to(DEV, torch.bfloat16).train()
    model(randn(2, 3, 64, 64, dtype=torch.bfloat16, device=DEV)).float().sum().backward()
    assert len(calls) == 2
    model = model.float()  # AMP: fp32 parameters under bf16 autocast (train.py's default)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(randn(2, 3, 64, 64, device=DEV)).float().sum().backward()
    assert len(calls) == 4 and all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


@pytest.mark.gpu
def test_hf_vit_default_gpu(monkeypatch):
    """On CUDA under the default settings a patched transformers ViT trains through the one-node block, in bf16
    and under bf16 autocast, and its gradients match the per-layer path's (bf16: the 2x rule's scale of error)."""
    model = _hf_vit().to(torch.bfloat16)
    x = randn(2, 3, 32, 32, dtype=torch.bfloat16, device=DEV)
    calls = _spy(monkeypatch)
    model(x).logits.float().square().mean().backward()
    assert len(calls) == 2
    grads = {n: p.grad.float() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with use_fused_block(False):
        model(x).logits.float().square().mean().backward()
    assert len(calls) == 2
    for n, p in model.named_parameters():
        ref = p.grad.float()
        assert (grads[n] - ref).abs().max() <= 0.05 * ref.abs().max() + 1e-3, n
    model = model.float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(x.float()).logits.float().sum().backward()
    assert len(calls) == 4


def test_environment_sets_the_default():
    """FLASHVIT_FUSED_BLOCK=0 / 1 at import is use_fused_block's default; unset: None (CUDA under 'auto')."""
    import os
    import subprocess
    import sys
    code = "from flashvit.kernels import block; print(block._setting.get())"
    for value, want in (("0", "False"), ("on", "True"), ("", "None")):
        env = dict(os.environ, FLASHVIT_FUSED_BLOCK=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == want, (value, out.stdout, out.stderr[-500:])

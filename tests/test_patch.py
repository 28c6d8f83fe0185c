"""flashvit.patch / unpatch on timm, Hugging Face and plain PyTorch models.

Every case: random weights (LayerNorm, LayerScale and q/k-norm parameters too, so a dropped layer shows),
patched vs unpatched logits and parameter gradients, the fused ops really called, state_dict unchanged
(same tensors), and unpatch restoring the exact module objects.
"""

import copy
import importlib

import pytest
import torch
from torch import nn

import flashvit
from flashvit.kernels import INTERPRET
from tests.helpers import fresh_seed, max_err

# (flashvit.kernels re-exports functions named like some of its submodules: fetch the modules themselves)
ln_mod = importlib.import_module("flashvit.kernels.layernorm")
linear_mod = importlib.import_module("flashvit.kernels.linear")
patch_mod = importlib.import_module("flashvit.vit.patch")

timm = pytest.importorskip("timm")

SMALL = dict(img_size=32, depth=2, num_classes=5)
# Where the kernels run when forced: a GPU, else CPU tensors through the interpreter.
KERNEL_DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(not torch.cuda.is_available() and not INTERPRET,
                                   reason="the kernels need a GPU or, on CPU tensors, the Triton interpreter")


@pytest.fixture
def calls(monkeypatch):
    """Count calls of the fused ops as the patched modules reach them."""
    counts = {}

    def wrap(mod, name, key):
        fn = getattr(mod, name)

        def counted(*a, **k):
            counts[key] = counts.get(key, 0) + 1
            return fn(*a, **k)

        monkeypatch.setattr(mod, name, counted)

    for name in ("linear", "qkv_attention", "attention", "patch_embed_op", "swiglu", "swiglu_packed", "apply_rope",
                 "qkv_rope_linear", "swiglu_fc2"):
        wrap(patch_mod, name, name)
    wrap(linear_mod, "mlp", "mlp")  # FusedMLP: one fused MLP call per block
    wrap(patch_mod, "mlp_op", "mlp")  # transformers' DINOv3 MLP: the same op
    wrap(ln_mod, "layer_norm", "layer_norm")
    wrap(ln_mod, "add_layer_norm", "add_layer_norm")
    return counts


def _randomize(model: nn.Module, scale: float = 0.2) -> nn.Module:
    """Perturb every parameter (LN weights away from 1, biases away from 0, LayerScale gamma, ...)."""
    g = torch.Generator().manual_seed(fresh_seed())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)
    return model


def _images(model_img, batch=2, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(fresh_seed())
    return torch.randn(batch, 3, *model_img, generator=g).to(device=device, dtype=dtype)


def _run(model, x, call=None):
    model.zero_grad(set_to_none=True)
    out = model(x) if call is None else call(model, x)
    g = torch.Generator().manual_seed(0)
    (out * torch.randn(out.shape, generator=g).to(out)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _snapshot(model):
    return [(n, m) for n, m in model.named_modules()], model.state_dict()


def _check_patched_same(model, x, call=None, atol=1e-5, rtol=1e-4, **patch_kw):
    """Patch ``model`` in place; assert same logits/grads, same state dict, exact unpatch. Returns the report."""
    mods_before, sd_before = _snapshot(model)
    ref_out, ref_grads = _run(model, x, call)
    flashvit.patch(model, **patch_kw)
    report = model.flashvit_report
    assert report.replaced, "nothing was replaced"
    sd = model.state_dict()
    assert list(sd) == list(sd_before)
    for k in sd:
        assert sd[k].data_ptr() == sd_before[k].data_ptr(), f"{k} was copied"
        assert torch.equal(sd[k], sd_before[k])
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    out, grads = _run(model, x, call)
    torch.testing.assert_close(out, ref_out, atol=atol * max(1.0, ref_out.abs().max().item()), rtol=rtol)
    assert set(grads) == set(ref_grads)
    # one scale for all grads: some are exactly zero in exact math (k_norm.bias: softmax ignores q·b), i.e. noise
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=atol * scale * 10, rtol=rtol * 10, msg=n)
    flashvit.unpatch(model)
    mods_after = [(n, m) for n, m in model.named_modules()]
    assert [n for n, _ in mods_after] == [n for n, _ in mods_before]
    assert all(a is b for (_, a), (_, b) in zip(mods_after, mods_before)), "unpatch did not restore the originals"
    assert not hasattr(model, "flashvit_report")
    out2, _ = _run(model, x, call)
    torch.testing.assert_close(out2, ref_out, atol=0, rtol=0)
    return report


def _check_forced_vs_float64(model, x, call=None):
    """Patch ``model`` and run it with the kernels forced (on KERNEL_DEV: the interpreter on CPU) against a float64
    copy of the unpatched model: logits and parameter gradients fp32-tight. Returns the report."""
    model, x = model.to(KERNEL_DEV), x.to(KERNEL_DEV)
    oracle = copy.deepcopy(model).double()
    ref_out, ref_grads = _run(oracle, x.double(), call)
    flashvit.patch(model)
    with flashvit.use_backend("triton"):
        out, grads = _run(model, x, call)
    assert max_err(out, ref_out) <= 1e-4 * max(1.0, ref_out.abs().max().item())
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for n, g in ref_grads.items():
        assert max_err(grads[n], g) <= 1e-4 * scale, n
    return model.flashvit_report


def _check_inference_patched(model, call, x, counts_ok, spy_mod, spy_name, pick, rows=None):
    """Patch ``model`` and run ``call(model, x)`` without autograd: the unpatched model's output (the reference path
    on CPU), then ``counts_ok()`` (the fused ops' calls so far); with the kernels forced (the interpreter on CPU), a
    float64 copy's output. ``rows``: a bool mask of the output's (B, N) tokens to compare (the others must be
    finite). Returns ``pick(kwargs)`` of each ``spy_mod.spy_name`` launch in the forced run (None without the
    interpreter)."""
    def pick_rows(t):
        assert torch.isfinite(t).all()
        return t if rows is None else t[rows]

    oracle = copy.deepcopy(model).double()
    with torch.no_grad():
        want = pick_rows(call(oracle, x.double()))
        ref = pick_rows(call(model, x))
        flashvit.patch(model)
        out = pick_rows(call(model, x))
    torch.testing.assert_close(out, ref, atol=1e-5 * max(1.0, ref.abs().max().item()), rtol=1e-4)
    assert counts_ok()
    if not INTERPRET:
        return None
    seen = []
    fn = getattr(spy_mod, spy_name)
    try:
        setattr(spy_mod, spy_name, lambda *a, **k: seen.append(pick(k)) or fn(*a, **k))
        with torch.no_grad(), flashvit.use_backend("triton"):
            out = pick_rows(call(model, x))
    finally:
        setattr(spy_mod, spy_name, fn)
    assert max_err(out, want) <= 1e-4 * max(1.0, want.abs().max().item())
    return seen


TIMM_CASES = {
    "vit_tiny": ("vit_tiny_patch16_224", SMALL),
    "vit_small": ("vit_small_patch16_224", dict(SMALL, img_size=48)),
    "deit_tiny": ("deit_tiny_patch16_224", SMALL),
    "reg4_gap": ("vit_base_patch16_reg4_gap_256", dict(SMALL, embed_dim=64, num_heads=4)),  # no cls, avg pool
    "qk_norm": ("vit_small_patch16_224", dict(SMALL, qk_norm=True)),
    "layer_scale": ("vit_tiny_patch16_224", dict(SMALL, init_values=0.1, qkv_bias=False)),
    "ragged_img": ("vit_tiny_patch16_224", dict(SMALL, img_size=40)),  # 40 = 2·16 + 8: the conv drops 8 px
}


@pytest.mark.parametrize("name,kw", list(TIMM_CASES.values()), ids=list(TIMM_CASES))
def test_timm_patched_matches_unpatched(name, kw, calls):
    torch.manual_seed(fresh_seed())
    model = _randomize(timm.create_model(name, pretrained=False, **kw)).train()
    report = _check_patched_same(model, _images(model.patch_embed.img_size))
    depth = kw["depth"]
    counts = report.counts()
    assert counts["Attention"] == depth and counts["Mlp"] == depth and counts["Block"] == depth
    assert counts["PatchEmbed"] == 1 and not report.left
    assert calls["patch_embed_op"] == 1 and calls["add_layer_norm"] == depth
    if kw.get("qk_norm"):  # q/k norms kept: the unpacked attention path, and their LayerNorms fused too
        assert calls["attention"] == depth and "qkv_attention" not in calls
        assert counts["LayerNorm"] == 2 * depth + 1 + 2 * depth
    else:
        assert calls["qkv_attention"] == depth and "attention" not in calls
    # qkv and proj GEMMs in Attention; fc1 and fc2 in FusedMLP
    assert calls["linear"] == 2 * depth and calls["mlp"] == depth


def test_report_is_readable_and_left_parts_are_named():
    Mlp = timm.layers.Mlp
    model = nn.Sequential(
        Mlp(8, 16, act_layer=nn.SiLU),  # not GELU
        Mlp(8, 16, norm_layer=nn.LayerNorm),  # norm inside the MLP
        timm.layers.LayerNormFp32(8),  # subclass with its own forward
        nn.LayerNorm(8),
    )
    _randomize(model)
    before = [m for m in model]
    x = torch.randn(3, 5, 8)
    ref = model(x)
    flashvit.patch(model)
    text = str(model.flashvit_report)
    assert "replaced 2 modules" in text  # nn.LayerNorm and the LayerNorm inside Mlp #1
    assert "SiLU" in text and "norm inside the MLP" in text and "LayerNormFp32" in text
    assert model[0] is before[0] and model[1] is before[1] and model[2] is before[2]
    assert isinstance(model[3], flashvit.ops.LayerNorm) and model[3].weight is before[3].weight
    torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=1e-5)
    flashvit.unpatch(model)
    assert all(a is b for a, b in zip(model, before))


def test_patch_flags_and_errors():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL)
    flashvit.patch(model, attention=False, mlp=False, residual=False, patch_embed=False)
    assert set(model.flashvit_report.counts()) == {"LayerNorm"}
    assert type(model.blocks[0].attn).__name__ == "Attention"
    with pytest.raises(ValueError, match="already patched"):
        flashvit.patch(model)
    flashvit.unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        flashvit.unpatch(model)
    with pytest.raises(TypeError, match="nn.Module"):
        flashvit.patch(lambda x: x)


def test_patch_keeps_dtype_and_device_and_shares_parameters():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL).to(torch.bfloat16)
    params = {n: p for n, p in model.named_parameters()}
    flashvit.patch(model)
    after = dict(model.named_parameters())
    assert list(after) == list(params) and all(after[n] is params[n] for n in params)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in after.values())
    out = model(_images((32, 32), dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    model.float()  # later casts reach the shared parameters and the originals alike
    flashvit.unpatch(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_unknown_mlp_class_in_a_timm_vit_is_reported():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, mlp_layer=timm.layers.GatedMlp,
                              act_layer="silu", **SMALL)
    flashvit.patch(model)
    left = model.flashvit_report.left
    assert [(p, c) for p, c, _ in left] == [("blocks.0.mlp", "GatedMlp"), ("blocks.1.mlp", "GatedMlp")]
    assert "GatedMlp" in str(model.flashvit_report)
    flashvit.unpatch(model)


def test_gated_attention_is_left_untouched():
    attn = timm.layers.Attention(16, num_heads=2, gated=True)
    model = nn.Sequential(attn)
    flashvit.patch(model)
    assert model[0] is attn and "gate" in str(model.flashvit_report)


@pytest.mark.parametrize("causal", [False, True])
def test_timm_attention_mask_and_causal_keep_timm_semantics(causal):
    torch.manual_seed(fresh_seed())
    model = _randomize(nn.Sequential(timm.layers.Attention(24, num_heads=3, qkv_bias=True, qk_norm=True,
                                                           norm_layer=nn.LayerNorm)))
    x = torch.randn(2, 7, 24)
    mask = torch.randn(2, 3, 7, 7) if not causal else None
    ref = model[0](x, attn_mask=mask, is_causal=causal)
    flashvit.patch(model)
    out = model[0](x, attn_mask=mask, is_causal=causal)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_generic_module_linear_gelu_and_layernorm(calls):
    torch.manual_seed(fresh_seed())
    model = _randomize(nn.Sequential(nn.LayerNorm(12), nn.Linear(12, 20), nn.GELU(approximate="tanh"),
                                     nn.Linear(20, 12), nn.GELU(), nn.Linear(12, 3)))
    x = torch.randn(4, 12)
    report = _check_patched_same(model, x, linear_gelu=True)
    assert report.counts() == {"LayerNorm": 1, "Linear": 2}
    _check_patched_same(model, x)  # without linear_gelu only the LayerNorm
    assert calls["layer_norm"] == 2


ROPE_SMALL = dict(SMALL, embed_dim=64, num_heads=2)
ROPE_CASES = {  # timm's Eva class: EvaBlock + EvaAttention / AttentionRope, the rope table passed down per block
    "eva02": ("eva02_tiny_patch14_224", dict(SMALL, img_size=28)),  # SwiGLU + norm, EVA's q/v biases, interleaved
    "rope_vit": ("vit_small_patch16_rope_224", ROPE_SMALL),  # AttentionRope, LayerScale, GELU MLP
    "dinov3": ("vit_small_patch16_dinov3", ROPE_SMALL),  # rotate_half, cls + 4 registers, LayerScale
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", ROPE_SMALL),  # learned per-head frequencies: rope has grad
    "pe_core": ("vit_pe_core_base_patch16_224", ROPE_SMALL),  # Perception Encoder: AttentionRope, a pre-norm
    "unfused_qkv": ("vit_small_patch16_rope_224", dict(ROPE_SMALL, qkv_fused=False)),  # q/k/v as one GEMM
    # q/k/v projections, q/k norms and the norm after attention (scale_attn_inner)
    "qk_norm_unfused_qkv": ("vit_small_patch16_rope_224", dict(ROPE_SMALL, qk_norm=True, qkv_fused=False,
                                                               scale_attn_inner=True)),
}


@pytest.mark.parametrize("name,kw", list(ROPE_CASES.values()), ids=list(ROPE_CASES))
def test_timm_rope_models_patched_match_unpatched(name, kw, calls):
    """EVA-02, DINOv3 and timm's RoPE ViTs: RoPE + flash attention from the packed qkv, the Eva block's residual
    adds fused and its gamma_1 / gamma_2 folded into the proj / fc2 GEMMs."""
    torch.manual_seed(fresh_seed())
    model = _randomize(timm.create_model(name, pretrained=False, **kw)).train()
    attn_cls = type(model.blocks[0].attn).__name__
    mixed = getattr(model, "rope_mixed", False)
    report = _check_patched_same(model, _images(model.patch_embed.img_size))
    depth = kw["depth"]
    counts = report.counts()
    assert counts[attn_cls] == depth and counts["EvaBlock"] == depth
    assert not report.left and counts["PatchEmbed"] == 1, report  # (DINOv3's gives NHWC tokens)
    assert calls["add_layer_norm"] == depth
    if kw.get("qk_norm"):  # q/k norms between the GEMMs and the rotation: apply_rope on each, then attention
        assert calls["attention"] == depth and calls["apply_rope"] == 2 * depth and "qkv_attention" not in calls
        assert counts["LayerNorm"] == 2 * depth + 1 + 3 * depth  # the blocks', the final, q/k/scale norms
    else:
        assert calls["qkv_attention"] == depth and "attention" not in calls and "apply_rope" not in calls
    folded = 2 * depth if model.blocks[0].gamma_1 is not None else 0
    assert (f"{folded} LayerScale modules run in the epilogue" in str(report)) == bool(folded), report
    assert mixed == (name.endswith("mixed_224"))


@pytest.mark.parametrize("case", ["eva02", "dinov3", "unfused_qkv"])
def test_timm_rope_models_inference_rotates_in_the_qkv_gemm(case, calls):
    """Without autograd the patched RoPE attention runs qkv_rope_linear (RoPE in the qkv GEMM's epilogue) and the
    plain packed attention: same features as the unpatched model; with the kernels forced (the interpreter on
    CPU) against a float64 copy, and the epilogue really ran (interleaved for EVA-02, rotate_half for DINOv3)."""
    name, kw = ROPE_CASES[case]
    torch.manual_seed(fresh_seed())
    model = _randomize(timm.create_model(name, pretrained=False, **kw)).eval()
    depth = kw["depth"]
    seen = _check_inference_patched(
        model, lambda m, x: m.forward_features(x), _images(model.patch_embed.img_size),
        lambda: calls["qkv_rope_linear"] == depth and calls["qkv_attention"] == depth, linear_mod, "_launch_gemm",
        lambda k: k.get("rope"))
    if seen is not None:
        modes = [r[5] for r in seen if r is not None]
        assert modes == [model.blocks[0].attn.head_dim if case == "dinov3" else 1] * depth, modes


BEIT_SMALL = dict(SMALL, embed_dim=64, num_heads=4)
BEIT_CASES = {  # timm's BEiT: Attention with q/v biases and a relative position bias, Block with gamma_1 / gamma_2
    "beit": ("beit_base_patch16_224", BEIT_SMALL),  # the layer's own bias table, LayerScale
    "beitv2": ("beitv2_base_patch16_224", dict(BEIT_SMALL, img_size=48)),
    "shared_bias": ("beit_base_patch16_224", dict(BEIT_SMALL, use_rel_pos_bias=False, use_shared_rel_pos_bias=True)),
    "both_biases": ("beit_base_patch16_224", dict(BEIT_SMALL, use_shared_rel_pos_bias=True)),
    "no_bias_no_ls": ("beit_base_patch16_224", dict(BEIT_SMALL, use_rel_pos_bias=False, init_values=None,
                                                     qkv_bias=False)),
}


def _random_bias_tables(model, name="relative_position_bias_table"):
    """The relative position bias tables start at zero (BEiT, TinyViT's attention_biases) or near it (Swin): make
    them matter."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if name in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(fresh_seed())))
    return model


def _beit(case):
    name, kw = BEIT_CASES[case]
    return _random_bias_tables(_randomize(timm.create_model(name, pretrained=False, **kw)))


def _spy_mask_grads(monkeypatch):
    """Record, for each attention backward launch, whether the mask's gradient was asked of the kernels."""
    A = importlib.import_module("flashvit.kernels.attention")
    bwd, seen = A.attention_bwd, []
    monkeypatch.setattr(A, "attention_bwd", lambda *a, **k: seen.append(k.get("dmask") is not None) or bwd(*a, **k))
    return seen


@pytest.mark.parametrize("case", list(BEIT_CASES))
def test_timm_beit_patched_match_unpatched(case, calls):
    """BEiT / BEiT v2: the qkv GEMM with the q/v biases, attention from the packed qkv with the relative position
    bias (the layer's table and / or the model's shared bias) as its additive mask, the Block's residual adds fused
    and gamma_1 / gamma_2 folded into the proj / fc2 GEMMs; logits and every gradient (the bias tables' included)
    as timm's."""
    torch.manual_seed(fresh_seed())
    model = _beit(case).train()
    depth = BEIT_CASES[case][1]["depth"]
    report = _check_patched_same(model, _images(model.patch_embed.img_size))
    counts = report.counts()
    assert counts["Attention"] == depth and counts["Block"] == depth and not report.left, report
    assert calls["qkv_attention"] == depth and calls["add_layer_norm"] == depth and "attention" not in calls
    folded = 2 * depth if model.blocks[0].gamma_1 is not None else 0
    assert (f"{folded} LayerScale modules run in the epilogue" in str(report)) == bool(folded), report


@needs_kernels
@pytest.mark.parametrize("case", ["beit", "both_biases", "no_bias_no_ls"])
def test_timm_beit_on_the_kernels_vs_float64(case, monkeypatch):
    """BEiT training with the kernels forced (the bias tables learn: the attention's backward kernel gives their
    gradient; the GEMMs, LayerNorms and patch embedding run the kernels too): logits and every gradient vs a
    float64 unpatched copy."""
    torch.manual_seed(fresh_seed())
    model = _beit(case).train()
    seen = _spy_mask_grads(monkeypatch)
    report = _check_forced_vs_float64(model, _images(model.patch_embed.img_size))
    assert not report.left, report
    learned = model.blocks[0].attn.relative_position_bias_table is not None or model.rel_pos_bias is not None
    assert seen == [learned] * BEIT_CASES[case][1]["depth"], seen


@pytest.mark.parametrize("case", ["beit", "shared_bias"])
def test_timm_beit_inference_runs_the_masked_kernel(case, calls):
    """Without autograd the relative position bias is a constant: the masked attention kernels take it (the
    interpreter on CPU, against a float64 copy)."""
    torch.manual_seed(fresh_seed())
    model = _beit(case).eval()
    depth = BEIT_CASES[case][1]["depth"]
    seen = _check_inference_patched(model, lambda m, x: m.forward_features(x), _images(model.patch_embed.img_size),
                                    lambda: calls.get("qkv_attention") == depth,
                                    importlib.import_module("flashvit.kernels.attention"), "attention_fwd",
                                    lambda k: k.get("mask") is not None)
    assert seen in (None, [True] * depth), seen


SWIN_SMALL = dict(img_size=32, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10,
                  drop_path_rate=0.0)  # (stochastic depth: two runs would differ)


SWIN_NAMES = {"v1": "swin_tiny_patch4_window7_224", "v2": "swinv2_tiny_window8_256"}  # v2: cosine attention


def _swin(version="v1"):
    return _random_bias_tables(_randomize(timm.create_model(SWIN_NAMES[version], pretrained=False, **SWIN_SMALL)))


@pytest.mark.parametrize("version", list(SWIN_NAMES))
def test_timm_swin_patched_match_unpatched(version, calls):
    """timm's Swin: WindowAttention as the qkv GEMM, attention with the relative position bias plus, in shifted
    blocks, the window mask as one windowed mask, and the proj GEMM (v1: from the packed qkv; v2's cosine attention:
    q, k normalized, q scaled by the head's logit scale, the bias from its cpb MLP); the Mlp and LayerNorms fused
    too. Logits and every gradient (the bias tables', the cpb MLP's, the logit scales') as timm's; a block with a
    shifted window is among them."""
    torch.manual_seed(fresh_seed())
    model = _swin(version).train()
    assert model.layers[0].blocks[1].attn_mask is not None  # a shifted block: its window mask is used
    report = _check_patched_same(model, _images(model.patch_embed.img_size))
    counts = report.counts()
    assert counts["WindowAttention"] == 4 and counts["Mlp"] == 4 and not report.left, report
    assert calls["qkv_attention" if version == "v1" else "attention"] == 4, calls
    # v1's pre-norm blocks (their forward the source checked): the first residual add with norm2 in one pass, the
    # second in fc2's GEMM
    assert counts.get("SwinTransformerBlock", 0) == (4 if version == "v1" else 0), report
    assert calls.get("add_layer_norm", 0) == (4 if version == "v1" else 0), calls


def test_timm_swin_block_of_another_source_is_left(monkeypatch):
    """A SwinTransformerBlock whose forward is not the source checked (a timm release that changed it) keeps its own
    forward, named in the report; its attention and MLP are still fused and the logits are timm's."""
    monkeypatch.setattr(patch_mod, "_TIMM_SWIN_BLOCK_CHECKED", {"0" * 16})
    torch.manual_seed(fresh_seed())
    model = _swin("v1").train()
    report = _check_patched_same(model, _images(model.patch_embed.img_size))
    assert "SwinTransformerBlock" not in report.counts() and report.counts()["WindowAttention"] == 4, report
    assert [c for _, c, w in report.left if "is not the source flashvit checked" in w] == ["SwinTransformerBlock"] * 4


@needs_kernels
@pytest.mark.parametrize("version", list(SWIN_NAMES))
def test_timm_swin_on_the_kernels_vs_float64(version, monkeypatch):
    """Swin training with the kernels forced: the learned bias and the shifted-window mask in the attention
    kernels (the bias's gradient from the backward kernel's dS), against a float64 unpatched copy."""
    torch.manual_seed(fresh_seed())
    model = _swin(version).train()
    seen = _spy_mask_grads(monkeypatch)
    _check_forced_vs_float64(model, _images(model.patch_embed.img_size))
    assert seen == [True] * 4, seen


RELPOS_SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5, drop_path_rate=0.0)
RELPOS_CASES = {  # timm's vit_relpos: RelPosAttention with a RelPosMlp (default) or RelPosBias, or the shared one
    "mlp": ("vit_relpos_small_patch16_224", {}), "cls": ("vit_relpos_medium_patch16_cls_224", {}),
    "bias": ("vit_relpos_small_patch16_224", dict(rel_pos_type="bias")),
    "shared": ("vit_relpos_small_patch16_224", dict(shared_rel_pos=True)),
    "rpn_qk_norm": ("vit_relpos_small_patch16_rpn_224", dict(qk_norm=True)),
}


def _relpos(case):
    name, kw = RELPOS_CASES[case]
    model = _random_bias_tables(_randomize(timm.create_model(name, pretrained=False, **RELPOS_SMALL, **kw)))
    for m in model.modules():  # RelPosMlp's own dropout (p = 0.125): two training runs would differ
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


@pytest.mark.parametrize("case", list(RELPOS_CASES))
def test_timm_relpos_patched_match_unpatched(case, calls):
    """timm's vit_relpos: RelPosAttention as the qkv GEMM, attention with the relative position bias (RelPosMlp's,
    RelPosBias's, or the model's shared one) as its additive mask (q/k norms on the views), and the proj GEMM.
    Logits and every gradient (the bias MLP's and tables') as timm's. The bias MLP itself (ReLU) is left, named."""
    torch.manual_seed(fresh_seed())
    model = _relpos(case).train()
    report = _check_patched_same(model, _images(model.patch_embed.img_size))
    assert report.counts()["RelPosAttention"] == 2, report
    op = "attention" if case == "rpn_qk_norm" else "qkv_attention"
    assert calls[op] == 2, calls
    assert all(r[0].endswith("rel_pos.mlp") for r in report.left), report


@needs_kernels
@pytest.mark.parametrize("case", ["mlp", "shared"])
def test_timm_relpos_on_the_kernels_vs_float64(case, monkeypatch):
    """vit_relpos training with the kernels forced: the bias (from RelPosMlp, or shared) learns through the attention
    kernels' dS, against a float64 unpatched copy."""
    torch.manual_seed(fresh_seed())
    model = _relpos(case).train()
    seen = _spy_mask_grads(monkeypatch)
    _check_forced_vs_float64(model, _images(model.patch_embed.img_size))
    assert seen == [True, True], seen


MAXVIT_CASES = {"bias": "maxvit_pico_rw_256", "mlp": "maxvit_rmlp_pico_rw_256",  # head_first, RelPosBias / Mlp
                "tf": "maxvit_tiny_tf_224"}  # packed (3, H, Dh) qkv, RelPosBiasTf


def _maxvit(case):
    model = timm.create_model(MAXVIT_CASES[case], pretrained=False, img_size=64, num_classes=5, drop_path_rate=0.0)
    model = _random_bias_tables(_randomize(model, scale=0.05))
    for m in model.modules():  # RelPosMlp's own dropout: two training runs would differ
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


@pytest.mark.parametrize("case", list(MAXVIT_CASES))
def test_timm_maxvit_patched_match_unpatched(case, calls):
    """timm's MaxViT: AttentionCl (block and grid partitions) as the qkv GEMM, attention (head_first: on strided
    q/k/v views; packed: read in place) with the relative position bias as its additive mask, and the proj GEMM; the Mlp and
    channels-last LayerNorms fused. Logits and every gradient as timm's (its MBConv stages stay timm's)."""
    torch.manual_seed(fresh_seed())
    model = _maxvit(case).train()
    report = _check_patched_same(model, _images((64, 64)))
    op = "attention" if model.stages[0].blocks[0].attn_block.attn.head_first else "qkv_attention"  # (packed: in place)
    assert report.counts()["AttentionCl"] == 22 and calls[op] == 22, report
    assert all(r[1] in ("LayerNorm2d", "Mlp") for r in report.left), report  # (the bias MLP's ReLU, NCHW norms)


class _Call(nn.Module):
    """``module(x, *rest)`` as a one-input model with the module as its child (patch() swaps children)."""

    def __init__(self, module, rest):
        super().__init__()
        self.module, self.rest = module, rest

    def forward(self, x):
        return self.module(x, *self.rest)


def _module_on_kernels_vs_float64(model, path, images, monkeypatch, rows=4):
    """The module at ``path`` of ``model``, on the first ``rows`` of the input it sees in the model (its other
    positional inputs as seen), in training with the kernels forced against a float64 copy of it unpatched: output
    and every gradient. Returns, per attention backward launch, whether the mask's gradient was asked of it."""
    seen_in = []
    module = model.get_submodule(path)
    hook = module.register_forward_hook(lambda m, i, o: seen_in.append(i))
    with torch.no_grad():
        model(images)
    hook.remove()
    x, *rest = seen_in[0]
    grads = _spy_mask_grads(monkeypatch)
    _check_forced_vs_float64(_Call(module, rest), x.detach()[:rows])
    return grads


@needs_kernels
@pytest.mark.parametrize("case", list(MAXVIT_CASES))
def test_timm_maxvit_attention_on_the_kernels_vs_float64(case, monkeypatch):
    """One MaxViT AttentionCl (its first block partition) in training with the kernels forced, on the input it
    sees in the model, against a float64 copy of the unpatched module: output and every gradient, the bias's
    parameters' from the backward kernel's dS."""
    torch.manual_seed(fresh_seed())
    model = _maxvit(case).train()
    seen = _module_on_kernels_vs_float64(model, "stages.0.blocks.0.attn_block.attn", _images((64, 64)), monkeypatch)
    assert seen == [True], seen


PVT_CASES = {"sr": "pvt_v2_b0", "linear": "pvt_v2_b2_li"}  # sr conv + norm; linear: pool to 7 x 7, 1x1 conv, act


@pytest.mark.parametrize("case", list(PVT_CASES))
def test_timm_pvt_v2_patched_match_unpatched(case, calls):
    """timm's PVT v2: Attention as the q GEMM, the kv GEMM over the spatially reduced sequence (timm's sr conv /
    pool, norm, act) and attention with Nkv < N on strided views, then the proj GEMM. Logits and every gradient as
    timm's; the Mix-FFN (depthwise conv) and the overlapping patch embedding are left, named."""
    torch.manual_seed(fresh_seed())
    model = _randomize(timm.create_model(PVT_CASES[case], pretrained=False, num_classes=5, drop_path_rate=0.0),
                       scale=0.05).train()
    depth = sum(len(st.blocks) for st in model.stages)
    report = _check_patched_same(model, _images((64, 64)))
    assert report.counts()["Attention"] == depth and calls["attention"] == depth, report
    assert {r[1] for r in report.left} == {"OverlapPatchEmbed", "MlpWithDepthwiseConv"}, report


@needs_kernels
@pytest.mark.parametrize("case", list(PVT_CASES))
def test_timm_pvt_v2_attention_on_the_kernels_vs_float64(case, monkeypatch):
    """One PVT v2 Attention of the first stage (N = 256 queries; 4 keys and values, sr 8, or 49, pooled) in
    training with the kernels forced, on its input in the model, against a float64 copy of it unpatched."""
    torch.manual_seed(fresh_seed())
    model = _randomize(timm.create_model(PVT_CASES[case], pretrained=False, num_classes=5, drop_path_rate=0.0),
                       scale=0.05).train()
    A = importlib.import_module("flashvit.kernels.attention")
    fwd, lengths = A.attention_fwd, []
    monkeypatch.setattr(A, "attention_fwd", lambda q, k, *a, **kw: lengths.append((q.shape[1], k.shape[1]))
                        or fwd(q, k, *a, **kw))
    _module_on_kernels_vs_float64(model, "stages.0.blocks.0.attn", _images((64, 64)), monkeypatch, rows=2)
    assert lengths == [(256, 4 if case == "sr" else 49)], lengths


def _tiny_vit_windows():
    """timm's TinyViT-5M at 64 x 64 with 4 x 4 windows, its learned attention biases random (they start at 0)."""
    model = _randomize(timm.create_model("tiny_vit_5m_224", pretrained=False, num_classes=5, window_sizes=(4, 4, 4, 4),
                                         drop_path_rate=0.0), scale=0.05)
    return _random_bias_tables(model, "attention_biases")


def test_timm_tiny_vit_patched_match_unpatched(calls):
    """timm's TinyViT: its window Attention as norm -> qkv GEMM -> attention on strided q/k/v views with the learned
    attention biases as the mask -> proj GEMM. Logits and every gradient (the biases' included) as timm's; its conv
    stage, patch embedding, NormMlp (a norm inside) and the head's LayerNorm2d are left, named."""
    torch.manual_seed(fresh_seed())
    model = _tiny_vit_windows().train()
    report = _check_patched_same(model, _images((64, 64)))
    assert report.counts()["Attention"] == 10 and calls["attention"] == 10, report
    assert {r[1] for r in report.left} == {"PatchEmbed", "NormMlp", "LayerNorm2d"}, report


@needs_kernels
def test_timm_tiny_vit_attention_on_the_kernels_vs_float64(monkeypatch):
    """One TinyViT window Attention (second stage) in training with the kernels forced, on its input in the model,
    against a float64 copy of it unpatched: output and every gradient, the attention biases' from the backward
    kernel's dS."""
    torch.manual_seed(fresh_seed())
    model = _tiny_vit_windows().train()
    seen = _module_on_kernels_vs_float64(model, "stages.1.blocks.0.attn", _images((64, 64)), monkeypatch)
    assert seen == [True], seen


@pytest.mark.parametrize("name", ["twins_pcpvt_small", "twins_svt_small"])
def test_timm_twins_patched_match_unpatched(name, calls):
    """timm's Twins: GlobalSubSampleAttn as PVT v2's attention (q GEMM, kv GEMM over the sr-reduced sequence,
    Nkv < N); SVT's LocallyGroupedAttn as the qkv GEMM over its ws x ws groups (a 72 x 72 image: the first stage's
    18 x 18 map pads to three 7 x 7 groups a side) -> attention from the packed qkv -> proj. Logits and every
    gradient as timm's."""
    torch.manual_seed(fresh_seed())
    model = _randomize(timm.create_model(name, pretrained=False, num_classes=5, drop_path_rate=0.0), scale=0.05).train()
    n_global = sum(type(m).__name__ == "GlobalSubSampleAttn" for m in model.modules())
    n_grouped = sum(type(m).__name__ == "LocallyGroupedAttn" for m in model.modules())
    assert (n_grouped > 0) == ("svt" in name)
    report = _check_patched_same(model, _images((72, 72)))
    assert report.counts()["GlobalSubSampleAttn"] == n_global and calls["attention"] == n_global, report
    assert report.counts().get("LocallyGroupedAttn", 0) == n_grouped == calls.get("qkv_attention", 0), report
    assert not report.left, report


@needs_kernels
def test_timm_twins_global_attention_on_the_kernels_vs_float64(monkeypatch):
    """One Twins GlobalSubSampleAttn (first stage: 256 queries, sr 8: 4 keys) with the kernels forced vs float64."""
    torch.manual_seed(fresh_seed())
    model = _randomize(timm.create_model("twins_pcpvt_small", pretrained=False, num_classes=5, drop_path_rate=0.0),
                       scale=0.05).train()
    seen = _module_on_kernels_vs_float64(model, "blocks.0.0.attn", _images((64, 64)), monkeypatch, rows=2)
    assert seen == [False], seen  # one backward launch of the kernels, no mask


@needs_kernels
def test_timm_twins_grouped_attention_on_the_kernels_vs_float64(monkeypatch):
    """One Twins-SVT LocallyGroupedAttn (a 9 x 9 map padded to 14 x 14: four 7 x 7 groups) with the kernels forced
    vs float64."""
    torch.manual_seed(fresh_seed())
    model = _randomize(timm.create_model("twins_svt_small", pretrained=False, num_classes=5, drop_path_rate=0.0),
                       scale=0.05).train()
    seen = _module_on_kernels_vs_float64(model, "blocks.0.0.attn", _images((36, 36)), monkeypatch, rows=2)
    assert seen == [False], seen


def test_timm_davit_patched_match_unpatched(calls):
    """timm's DaViT: its WindowAttention as qkv GEMM -> attention from the packed qkv -> proj GEMM, its Mlps fused;
    its ChannelAttention (attention over channels) and LayerNorm2d are left, named. Logits and every gradient as
    timm's; then one window attention on the kernels (the interpreter) vs float64."""
    torch.manual_seed(fresh_seed())
    model = _randomize(timm.create_model("davit_tiny", pretrained=False, num_classes=5, drop_path_rate=0.0),
                       scale=0.05).train()
    report = _check_patched_same(model, _images((64, 64)))
    assert report.counts()["WindowAttention"] == 6 and calls["qkv_attention"] == 6, report
    assert {r[1] for r in report.left} == {"ChannelAttention", "LayerNorm2d"}, report


@needs_kernels
def test_timm_davit_window_attention_on_the_kernels_vs_float64(monkeypatch):
    torch.manual_seed(fresh_seed())
    model = _randomize(timm.create_model("davit_tiny", pretrained=False, num_classes=5, drop_path_rate=0.0),
                       scale=0.05).train()
    seen = _module_on_kernels_vs_float64(model, "stages.1.blocks.0.0.attn", _images((64, 64)), monkeypatch)
    assert seen == [False], seen  # one backward launch of the kernels, no mask


def test_timm_naflex_padded_batch_inference_runs_the_masked_kernel(calls):
    """timm's NaFlexViT with a padded batch (patch_valid): its blocks pass a padding mask, which the patched
    attention hands to qkv_attention (packed), whose kernels apply it (here without autograd). Same features as the
    unpatched model at the valid tokens (timm's mask is symmetric: a padded token attends to nothing, which the
    kernels make zeros and SDPA an average of garbage); with the kernels forced (the interpreter on CPU) against a
    float64 copy, and the masked kernel really ran."""
    torch.manual_seed(fresh_seed())
    model = _randomize(timm.create_model("naflexvit_base_patch16_gap", pretrained=False, depth=2, embed_dim=64,
                                         num_heads=2, num_classes=3)).eval()
    B, L, p = 2, 12, 16
    patches = torch.randn(B, L, p * p * 3, generator=torch.Generator().manual_seed(fresh_seed()))
    coord = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij"), -1).reshape(1, L, 2)
    coord = coord.expand(B, L, 2).clone()
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, 7:] = False  # the second image has 7 patches, 5 of padding
    tokens = torch.cat((torch.ones(B, model.num_prefix_tokens, dtype=torch.bool), valid), dim=1)
    seen = _check_inference_patched(model, lambda m, x: m.forward_features(x, coord, valid)["patches"], patches,
                                    lambda: calls.get("qkv_attention") == 2 and "attention" not in calls,
                                    importlib.import_module(
                                        "flashvit.kernels.attention"), "attention_fwd",
                                    lambda k: k.get("mask") is not None, rows=tokens)
    assert seen in (None, [True, True]), seen


@needs_kernels
def test_timm_naflex_padded_batch_trains_through_the_masked_kernels(calls):
    """NaFlexViT training on a padded batch with the kernels forced: logits (masked pooling) and every parameter
    gradient vs a float64 copy of the unpatched model; the masked forward and backward kernels ran."""
    torch.manual_seed(fresh_seed())
    model = _randomize(timm.create_model("naflexvit_base_patch16_gap", pretrained=False, depth=1, embed_dim=32,
                                         num_heads=2, num_classes=3)).train()
    B, L, p = 2, 6, 16
    coord = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij"), -1).reshape(1, L, 2)
    coord = coord.expand(B, L, 2).clone().to(KERNEL_DEV)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[0, 4:] = False
    valid = valid.to(KERNEL_DEV)
    attn_mod = importlib.import_module("flashvit.kernels.attention")
    seen = []
    bwd = attn_mod.attention_bwd
    try:
        attn_mod.attention_bwd = lambda *a, **k: seen.append(k.get("mask") is not None) or bwd(*a, **k)
        report = _check_forced_vs_float64(
            model, torch.randn(B, L, p * p * 3, generator=torch.Generator().manual_seed(fresh_seed())),
            lambda m, x: m(dict(patches=x, patch_coord=coord, patch_valid=valid)))
    finally:
        attn_mod.attention_bwd = bwd
    assert report.counts()["Attention"] == 1 and seen == [True] and calls["qkv_attention"] == 1


def test_timm_patch_embed_formats_and_sizes():
    """NHWC output (DINOv3's) fused; NCHW left with the reason; a non-strict size not divisible by the patch
    raises as timm's PatchEmbed does (never cropped silently); a strict one is cropped as the conv crops."""
    from timm.layers import PatchEmbed
    torch.manual_seed(fresh_seed())
    holder = nn.ModuleDict({
        "nhwc": PatchEmbed(None, 8, 3, 16, output_fmt="NHWC", strict_img_size=False),
        "nchw": PatchEmbed(None, 8, 3, 16, output_fmt="NCHW", strict_img_size=False),
        "loose": PatchEmbed(32, 8, 3, 16, strict_img_size=False),
    })
    ref = copy.deepcopy(holder)
    report = flashvit.patch(holder).flashvit_report
    assert report.counts() == {"PatchEmbed": 2}
    assert report.left == [("nchw", "PatchEmbed", "output_fmt NCHW (no flatten) is not fused")]
    x = torch.randn(2, 3, 40, 24)
    torch.testing.assert_close(holder["nhwc"](x), ref["nhwc"](x))
    assert holder["nhwc"](x).shape == (2, 5, 3, 16)
    with pytest.raises(AssertionError, match="divisible by patch size"):
        ref["loose"](torch.randn(2, 3, 36, 32))
    with pytest.raises(AssertionError, match="divisible by patch size"):
        holder["loose"](torch.randn(2, 3, 36, 32))


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "vit_small_patch16_rope_mixed_224"])
def test_timm_rope_with_patch_dropout(name, calls):
    """Patch dropout (training) gathers each image's kept tokens and its own rope rows: a (B, 1, N', 2D) table,
    or (B, H, N', 2D) per block for the learned 'mixed' rope; same logits and grads as unpatched."""
    torch.manual_seed(fresh_seed())
    kw = dict(ROPE_SMALL, img_size=56 if name.startswith("eva") else 64, patch_drop_rate=0.5)
    model = _randomize(timm.create_model(name, pretrained=False, **kw)).train()

    def call(m, x):
        torch.manual_seed(0)  # the same kept patches in both runs
        return m(x)

    report = _check_patched_same(model, _images(model.patch_embed.img_size), call=call)
    assert report.counts()["EvaBlock"] == 2 and calls["qkv_attention"] == 2


@pytest.mark.parametrize("case", ["plain", "mask", "causal"])
def test_timm_rope_attention_gated_masked_causal(case, calls):
    """AttentionRope with a sigmoid gate, rotate_half and a prefix: the fused path, the masked path (qkv_attention
    with the rope and the mask) and the causal kernels, each vs the unpatched module with grads."""
    from timm.layers.attention import AttentionRope
    torch.manual_seed(fresh_seed())
    B, N, C, H, P = 2, 9, 64, 2, 1
    holder = nn.ModuleDict({"attn": _randomize(AttentionRope(C, num_heads=H, gated=True, num_prefix_tokens=P,
                                                             rotate_half=True))})
    g = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(B, N, C, generator=g)
    ang = torch.randn(N - P, C // H // 2, generator=g) * 3
    rope = torch.cat([ang.sin(), ang.cos()] * 2, dim=-1)  # rotate_half's table: (sin, sin), (cos, cos) halves
    kw = {"plain": {}, "mask": dict(attn_mask=torch.rand(N, N, generator=g) > 0.3), "causal": dict(is_causal=True)}
    kw["mask"]["attn_mask"].fill_diagonal_(True)

    def run():
        holder.zero_grad(set_to_none=True)
        out = holder["attn"](x, rope=rope, **kw[case])
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in holder.named_parameters()}

    ref_out, ref_grads = run()
    flashvit.patch(holder)
    assert holder.flashvit_report.counts() == {"AttentionRope": 1}
    out, grads = run()
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)
    # causal: rope on the views, then attention; otherwise (a mask too) packed qkv_attention with the rope
    assert calls.get("apply_rope", 0) == 2 * (case == "causal") and calls.get("attention", 0) == (case == "causal")
    assert calls.get("qkv_attention", 0) == (case != "causal")


def test_timm_rope_grouped_query_attention_is_left():
    model = timm.create_model("vit_small_patch16_rope_224", pretrained=False, **dict(ROPE_SMALL, num_heads=4),
                              num_kv_heads=2, qkv_fused=False)
    report = flashvit.patch(model).flashvit_report
    assert "AttentionRope" not in report.counts() and report.counts()["EvaBlock"] == 2
    assert ("blocks.0.attn", "AttentionRope", "grouped-query attention (num_kv_heads < num_heads) is not fused"
            ) in report.left


@needs_kernels
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_giant_patch14_dinov2",  # GELU MLP; SwiGLU + ls
                                  "eva02_tiny_patch14_224", "vit_small_patch16_dinov3"])  # RoPE: interleaved; half
def test_timm_patched_with_triton_forced_matches_float64(name):
    """The fused kernels (a GPU, or the interpreter) in a patched model vs the unpatched model in float64: tight
    fp32 (a GPU also runs the bf16 case below)."""
    torch.manual_seed(fresh_seed())
    kw = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, num_classes=3)
    model = _randomize(timm.create_model(name, pretrained=False, **kw)).train()
    _check_forced_vs_float64(model, _images((16, 16), batch=2))


ZOO = ["deit_tiny_distilled_patch16_224",  # distillation token
       "vit_base_patch16_clip_224",  # pre-norm (norm_pre)
       "vit_medium_patch16_gap_256",  # no class token, average pool
       "vit_base_patch16_siglip_224",  # attention-pool (MAP) head: its own Attention-like latent pool, Mlp
       "naflexvit_base_patch16_map",  # NaFlex: its own embeddings, timm Blocks
       "aimv2_large_patch14_224",  # SwiGLU (separate fc1_g / fc1_x); its RmsNorms stay timm's
       "vit_so400m_patch16_radio_v4",  # RADIO: Eva blocks
       "vit_base_patch16_dinov3_qkvb",  # DINOv3 with q/k/v biases
       "vit_base_patch16_rpn_224",  # residual post-norm blocks: their norms after the branch
       "flexivit_small"]  # FlexiViT patch embedding


@needs_kernels
@pytest.mark.parametrize("name", ZOO)
def test_timm_zoo_patched_with_triton_forced_matches_float64(name):
    """More of timm's ViT family, one block at a tiny width: whatever patch() swaps in (kernels forced) gives the
    float64 unpatched model's logits and gradients (fp32-tight); whatever it leaves is named in the report."""
    if not timm.is_model(name):
        pytest.skip(f"timm {timm.__version__} has no {name}")
    torch.manual_seed(fresh_seed())
    kw = dict(depth=1, embed_dim=64, num_heads=4, num_classes=3)
    try:
        model = timm.create_model(name, pretrained=False, img_size=32, **kw)
    except TypeError:  # (NaFlex takes no fixed image size)
        model = timm.create_model(name, pretrained=False, **kw)
    report = _check_forced_vs_float64(_randomize(model, scale=0.05).train(), _images((32, 32)))
    assert report.replaced, report
    assert all(why for _, _, why in report.left), report


def test_timm_patched_with_grad_checkpointing_and_dropout(calls):
    """timm's set_grad_checkpointing on a patched model (blocks recomputed in the backward) with attention
    dropout in the kernels: logits and gradients equal the same patched model without checkpointing, under one
    torch seed (the recompute draws the dropout seed again from the restored RNG state)."""
    torch.manual_seed(fresh_seed())
    kw = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=3,
              attn_drop_rate=0.25)
    model = flashvit.patch(_randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)).train())
    x = _images((16, 16), batch=2)
    with flashvit.use_backend("triton"):
        torch.manual_seed(3)
        out, grads = _run(model, x)
        plain_calls = calls["qkv_attention"]
        model.set_grad_checkpointing(True)
        torch.manual_seed(3)
        ck_out, ck_grads = _run(model, x)
    assert calls["qkv_attention"] == 3 * plain_calls == 6  # each block's forward again in the backward
    assert torch.equal(out, ck_out)
    assert set(grads) == set(ck_grads)
    for n in grads:
        torch.testing.assert_close(ck_grads[n], grads[n], atol=1e-6, rtol=1e-5, msg=n)


def test_torchvision_vit_patched_matches_unpatched(calls):
    """torchvision's VisionTransformer: nn.MultiheadAttention (self-attention, need_weights=False), its LayerNorms,
    its MLPBlocks (the fused MLP op) and its EncoderBlocks' residual adds (ln_2 with the first add in one pass, fc2
    with the second in one GEMM) fused; logits and gradients unchanged."""
    tv = pytest.importorskip("torchvision")
    why = _tv_unchecked(tv.models.vision_transformer.EncoderBlock)
    if why:
        pytest.skip(why)
    torch.manual_seed(fresh_seed())
    model = _randomize(tv.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                                    hidden_dim=32, mlp_dim=64, num_classes=5)).train()
    report = _check_patched_same(model, _images((16, 16)))
    counts = report.counts()
    assert counts == {"MultiheadAttention": 2, "LayerNorm": 5, "MLPBlock": 2, "EncoderBlock": 2}, counts
    assert calls["qkv_attention"] == calls["add_layer_norm"] == calls["mlp"] == 2, calls


def _tv_unchecked(*classes):
    """Why the installed torchvision's sources differ from those flashvit checked ('' where they are the same):
    the classes' forwards, shifted_window_attention and stochastic_depth."""
    tv = pytest.importorskip("torchvision")
    S, D = tv.models.swin_transformer, importlib.import_module("torchvision.ops.stochastic_depth")
    fp = patch_mod._source_fingerprint
    why = [f"{c.__name__}.forward" for c in classes
           if fp(c.forward) not in patch_mod._TV_CHECKED[f"{c.__module__}.{c.__name__}"]]
    why += [f.__name__ for f, prints in ((S.shifted_window_attention, patch_mod._TV_WINDOW_FN_CHECKED),
                                         (D.stochastic_depth, patch_mod._TV_STOCHASTIC_DEPTH_CHECKED))
            if fp(f) not in prints]
    return f"torchvision {tv.__version__}: {', '.join(why)} not the source checked " \
           "(test_torchvision_swin_of_another_source_is_left covers that case)" if why else ""


def _tv_swin(version, drop_path=0.0):
    tv = pytest.importorskip("torchvision")
    S = tv.models.swin_transformer
    why = _tv_unchecked(S.ShiftedWindowAttention, S.ShiftedWindowAttentionV2, S.SwinTransformerBlock)
    if why:
        pytest.skip(why)
    kw = dict(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=5,
              stochastic_depth_prob=drop_path)
    if version == "v2":
        kw.update(block=S.SwinTransformerBlockV2, downsample_layer=S.PatchMergingV2)
    return _randomize(S.SwinTransformer(**kw), scale=0.1)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("drop_path", [0.0, 0.5])
def test_torchvision_swin_patched_matches_unpatched(version, drop_path, calls, monkeypatch):
    """torchvision's Swin (swin_t's classes; v2: cosine attention and the cpb MLP's bias): ShiftedWindowAttention as
    its shifted_window_attention with the qkv GEMM, flash attention with the relative position bias plus the shifted
    blocks' window mask as one windowed mask, the proj GEMM; MLPs as the fused MLP op; v1's blocks with their residual
    adds fused, stochastic depth drawn as StochasticDepth draws it (same samples dropped under one seed). An image
    that does not fill whole windows (40 x 44: padded) and a map smaller than a window (no shift) are among them;
    logits and every gradient (the bias tables', the cpb MLP's, the logit scales') as torchvision's, on CPU's path
    and with the kernels forced (the interpreter or a GPU)."""
    torch.manual_seed(fresh_seed())
    model = _tv_swin(version, drop_path).train()
    x = _images((40, 44), batch=4)
    draws = []
    draw = patch_mod.drop_path_scale
    monkeypatch.setattr(patch_mod, "drop_path_scale", lambda x, p: draws.append(draw(x, p)) or draws[-1])
    ref_out, ref_grads = _run(model, x, _reseeded)
    report = _check_patched_same(model, x, call=_reseeded)
    counts = report.counts()
    assert counts[f"ShiftedWindowAttention{'V2' if version == 'v2' else ''}"] == 4 and counts["MLP"] == 4, counts
    assert counts.get("SwinTransformerBlock", 0) == (4 if version == "v1" else 0) and not report.left, report
    assert calls["qkv_attention" if version == "v1" else "attention"] == 4 and calls["mlp"] == 4, calls
    assert calls.get("add_layer_norm", 0) == (4 if version == "v1" else 0), calls
    if version == "v1" and drop_path:  # blocks 1-3 (block 0's rate is 0), both branches: samples dropped and kept
        assert len(draws) == 6 and (torch.cat(draws) == 0).any() and (torch.cat(draws) != 0).any()
    if not drop_path or not (torch.cuda.is_available() or INTERPRET):
        return  # (without drop path: test_torchvision_swin_on_the_kernels_vs_float64)
    x = x[:3, :, :32, :36]  # (fewer windows for the interpreter; still padded)
    ref_out, ref_grads = _run(model, x, _reseeded)
    flashvit.patch(model)
    with flashvit.use_backend("triton"):
        out, grads = _run(model, x, _reseeded)
    torch.testing.assert_close(out, ref_out, atol=1e-4 * ref_out.abs().max().item(), rtol=1e-3)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-4 * scale, rtol=1e-3, msg=k)


@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t", "vit_b_16"])
def test_torchvision_full_size_models_patch_and_match(name):
    """torchvision's own constructors at full size (swin_t: 7 x 7 windows shifted by 3 on 56 x 56 maps; swin_v2_t:
    8 x 8 on 64 x 64; vit_b_16), random weights, one image on CPU's path: every attention, MLP and LayerNorm
    replaced (Swin v1's and ViT's blocks too), nothing left, the logits unchanged."""
    tv = pytest.importorskip("torchvision")
    why = _tv_unchecked(tv.models.swin_transformer.SwinTransformerBlock, tv.models.vision_transformer.EncoderBlock)
    if why:
        pytest.skip(why)
    torch.manual_seed(fresh_seed())
    model = _randomize(tv.models.get_model(name), scale=0.02).eval()
    x = _images((256, 256) if name == "swin_v2_t" else (224, 224), batch=1)
    with torch.no_grad():
        ref = model(x)
        flashvit.patch(model)
        out = model(x)
    counts = model.flashvit_report.counts()
    blocks = 12
    expected = {"swin_t": {"ShiftedWindowAttention": blocks, "MLP": blocks, "SwinTransformerBlock": blocks},
                "swin_v2_t": {"ShiftedWindowAttentionV2": blocks, "MLP": blocks},
                "vit_b_16": {"MultiheadAttention": blocks, "MLPBlock": blocks, "EncoderBlock": blocks}}[name]
    assert {k: counts.get(k) for k in expected} == expected and not model.flashvit_report.left, model.flashvit_report
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-4)


def test_torchvision_swin_of_another_source_is_left(monkeypatch):
    """A torchvision whose shifted_window_attention (or a checked forward) differs from the sources checked: its
    attentions and blocks are left, and the report says why; its MLPs and LayerNorms still fuse."""
    tv = pytest.importorskip("torchvision")
    S = tv.models.swin_transformer
    orig = S.shifted_window_attention
    monkeypatch.setattr(S, "shifted_window_attention", lambda *a, **k: orig(*a, **k))
    monkeypatch.setattr(S.SwinTransformerBlock, "forward", lambda self, x: x + self.attn(self.norm1(x)))
    model = flashvit.patch(S.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                             window_size=[4, 4], num_classes=5))
    whys = {cls: why for _, cls, why in model.flashvit_report.left}
    assert "shifted_window_attention is not the source flashvit checked" in whys["ShiftedWindowAttention"]
    assert "SwinTransformerBlock.forward is not the source flashvit checked" in whys["SwinTransformerBlock"]
    assert model.flashvit_report.counts()["MLP"] == 4


@needs_kernels
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_torchvision_swin_on_the_kernels_vs_float64(version):
    """torchvision's Swin patched, the kernels forced (the interpreter or a GPU), against the unpatched model in
    float64: logits and every gradient fp32-tight."""
    torch.manual_seed(fresh_seed())
    _check_forced_vs_float64(_tv_swin(version).train(), _images((32, 36), batch=2))


@pytest.mark.parametrize("batch_first,bias,backend", [(True, True, "auto"), (False, True, "auto"),
                                                      (True, False, "auto"), (False, True, "triton")])
def test_multihead_attention_fused_calls_and_fallbacks(calls, batch_first, bias, backend):
    """Self-attention calls without masks or weights run the fused ops (output and gradients as
    nn.MultiheadAttention's); any other call (weights asked for, a mask, cross-attention) runs its own forward."""
    torch.manual_seed(fresh_seed())
    holder = nn.ModuleDict({"mha": nn.MultiheadAttention(32, 4, bias=bias, batch_first=batch_first)})
    _randomize(holder)
    ref = copy.deepcopy(holder.mha)
    flashvit.patch(holder)
    mha = holder.mha
    assert isinstance(mha, nn.MultiheadAttention) and type(mha) is not nn.MultiheadAttention
    x = torch.randn(*((2, 7) if batch_first else (7, 2)), 32, requires_grad=True)
    with flashvit.use_backend(backend):  # triton: the kernels in the interpreter
        out, w = mha(x, x, x, need_weights=False)
    want, _ = ref(x, x, x, need_weights=False)
    assert w is None and calls["qkv_attention"] == 1
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, [x, *mha.parameters()], g)
    want_grads = torch.autograd.grad(want, [x, *ref.parameters()], g)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    y = torch.randn_like(x)
    mask = torch.rand(7, 7) > 0.3
    for args, kw in [((x, x, x), {}), ((x, x, x), dict(need_weights=False, attn_mask=mask)),
                     ((x, y, y), dict(need_weights=False))]:
        got, want = mha(*args, **kw), ref(*args, **kw)
        torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
        assert (got[1] is None) == (want[1] is None)
    assert calls["qkv_attention"] == 1  # the fallbacks did not call the fused op


@pytest.mark.parametrize("norm_first", [False, True])
def test_torch_transformer_encoder_patched_matches_unpatched(calls, norm_first):
    """nn.TransformerEncoder: each layer's nn.MultiheadAttention (called with need_weights=False) and LayerNorms
    fused; outputs and gradients unchanged (dropout 0), and unpatch restores the modules."""
    torch.manual_seed(fresh_seed())
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=norm_first)
    model = _randomize(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)).train()
    x = torch.randn(2, 9, 32)
    report = _check_patched_same(model, x)
    assert report.counts() == {"MultiheadAttention": 2, "LayerNorm": 4}, report.counts()
    assert calls["qkv_attention"] == 2


def test_multihead_attention_left_when_not_fusable():
    holder = nn.ModuleDict({"kdim": nn.MultiheadAttention(32, 4, kdim=16, vdim=16),
                            "bias_kv": nn.MultiheadAttention(32, 4, add_bias_kv=True),
                            "head12": nn.MultiheadAttention(48, 4)})
    report = flashvit.patch(holder).flashvit_report
    assert not report.replaced
    reasons = {path: why for path, _, why in report.left}
    assert "kdim" in reasons["kdim"] and "add_bias_kv" in reasons["bias_kv"] and "head dim 12" in reasons["head12"]
    root = flashvit.patch(nn.MultiheadAttention(32, 4)).flashvit_report
    assert "root module" in root.left[0][2]


def _hf_model(cls_name="ViTForImageClassification", **kw):
    transformers = pytest.importorskip("transformers")
    cfg = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=48, num_hidden_layers=2,
               num_attention_heads=3, intermediate_size=80, num_labels=5)
    cfg.update(kw)
    torch.manual_seed(fresh_seed())
    return _randomize(getattr(transformers, cls_name)(transformers.ViTConfig(**cfg)))


@pytest.mark.parametrize("cls_name,act", [("ViTForImageClassification", "gelu"), ("ViTModel", "gelu_pytorch_tanh")])
def test_hf_vit_patched_matches_unpatched(cls_name, act, calls):
    model = _hf_model(cls_name, hidden_act=act).train()
    impl = model.config._attn_implementation

    def call(m, x):
        out = m(pixel_values=x)
        return out.logits if cls_name == "ViTForImageClassification" else out.last_hidden_state

    report = _check_patched_same(model, _images((32, 32)), call=call)
    counts = report.counts()
    assert counts == {"LayerNorm": 5, "ViTAttention": 2, "ViTMLP": 2, "ViTPatchEmbeddings": 1, "ViTLayer": 2}, counts
    assert calls["attention"] == 2 and calls["patch_embed_op"] == 1
    assert calls["layer_norm"] == 3 and calls["add_layer_norm"] == 2  # layernorm_after fused with the residual
    assert calls["mlp"] == 2
    assert model.config._attn_implementation == impl  # unpatch restored it


def _hf_beit(**kw):
    transformers = pytest.importorskip("transformers")
    cfg = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=48, num_hidden_layers=2,
               num_attention_heads=3, intermediate_size=80, num_labels=5, use_relative_position_bias=True,
               drop_path_rate=0.0)  # (stochastic depth: two runs would differ)
    cfg.update(kw)
    torch.manual_seed(fresh_seed())
    model = _randomize(transformers.BeitForImageClassification(transformers.BeitConfig(**cfg)))
    if type(model.beit.layers[0].attention).__name__ != "BeitAttention":
        pytest.skip("this transformers' BEiT has no BeitAttention (an older layout, not the one these tests build on)")
    return model


def _beit_checked() -> bool:
    from transformers.models.beit import modeling_beit as M

    from flashvit.vit.patch import _HF_CHECKED, _source_fingerprint
    return _source_fingerprint(M.BeitAttention.forward) in _HF_CHECKED[f"{M.__name__}.BeitAttention"]


@pytest.mark.parametrize("bias", ["own", "shared", "none"])
def test_hf_beit_patched_matches_unpatched(bias, calls):
    """transformers' BEiT: its attention calls the AttentionInterface with the relative position bias as the mask;
    patched, that goes to flashvit's attention (a learned bias: its gradient from the backward kernel), its MLP
    is a FusedMLP and its layer's residual adds are fused. Logits and every gradient, the bias tables' and the
    lambdas' included, as transformers' (sdpa)."""
    kw = {"own": {}, "shared": dict(use_relative_position_bias=False, use_shared_relative_position_bias=True),
          "none": dict(use_relative_position_bias=False, layer_scale_init_value=0.0)}[bias]  # (lambdas: 1.0)
    model = _hf_beit(**kw).train()
    impl = model.config._attn_implementation
    report = _check_patched_same(model, _images((32, 32)), call=lambda m, x: m(pixel_values=x).logits)
    if not _beit_checked():
        assert any("BeitAttention is not the source flashvit checked" in r[2] for r in report.left), report
        return
    assert report.counts()["BeitAttention"] == 2 and calls["attention"] == 2, report
    assert report.counts()["BeitMLP"] == 2 and calls["mlp"] == 2, report  # fc1 + GELU + fc2: FusedMLP
    # the layers: layernorm_after with the first residual add, lambda_2 and the second in fc2's GEMM
    assert report.counts()["BeitLayer"] == 2 and calls["add_layer_norm"] == 2, report
    assert ("2 LayerScale modules run in the epilogue" in str(report)) == (bias != "none"), report
    assert model.config._attn_implementation == impl


def test_hf_beit_layer_with_dropout_runs_it_in_order():
    """hidden_dropout_prob > 0 in training: the fused layer keeps transformers' order (dropout, lambda, residual),
    so the same seed draws the same masks: logits and gradients as transformers'."""
    model = _hf_beit(hidden_dropout_prob=0.3).train()
    ref = copy.deepcopy(model)
    x = _images((32, 32))
    torch.manual_seed(7)
    want, want_grads = _run(ref, x, call=lambda m, x: m(pixel_values=x).logits)
    flashvit.patch(model)
    assert model.flashvit_report.counts()["BeitLayer"] == 2
    torch.manual_seed(7)
    out, grads = _run(model, x, call=lambda m, x: m(pixel_values=x).logits)
    torch.testing.assert_close(out, want, atol=1e-5 * want.abs().max().item(), rtol=1e-4)
    for n, g in want_grads.items():
        torch.testing.assert_close(grads[n], g, atol=1e-4 * g.abs().max().item() + 1e-7, rtol=1e-3, msg=n)


@needs_kernels
def test_hf_beit_on_the_kernels_vs_float64(calls, monkeypatch):
    """transformers' BEiT training with the kernels forced (the learned bias in the attention kernels, its gradient
    from the backward kernel; the LayerNorms run the kernels) against a float64 unpatched copy; then inference,
    where the bias is a constant: the masked attention kernels."""
    model = _hf_beit(use_shared_relative_position_bias=True).train()
    if not _beit_checked():
        pytest.skip("this transformers' BeitAttention is not the source flashvit checked: patch() leaves it (the "
                    "routing test checks the report says so), so there is nothing of it on the kernels to compare")
    x = _images((32, 32))
    grads = _spy_mask_grads(monkeypatch)
    _check_forced_vs_float64(model, x, call=lambda m, x: m(pixel_values=x).logits)
    assert grads == [True, True], grads
    flashvit.unpatch(model)
    seen = _check_inference_patched(model.eval(), lambda m, x: m(pixel_values=x).logits, x,
                                    lambda: calls.get("attention", 0) >= 2,
                                    importlib.import_module("flashvit.kernels.attention"), "attention_fwd",
                                    lambda k: k.get("mask") is not None)
    assert seen in (None, [True, True]), seen


def _hf_swin(drop_path=0.0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SwinConfig(image_size=32, patch_size=4, num_channels=3, embed_dim=32, depths=[2, 2],
                                  num_heads=[2, 4], window_size=4, num_labels=5, drop_path_rate=drop_path)
    torch.manual_seed(fresh_seed())
    model = _random_bias_tables(_randomize(transformers.SwinForImageClassification(cfg)))
    attn = model.swin.encoder.layers[0].blocks[0].attention
    if type(attn).__name__ != "SwinAttention" or not hasattr(attn, "q_proj"):
        pytest.skip("this transformers' Swin has no SwinAttention with q/k/v_proj (an older layout, not the one "
                    "these tests build on)")
    return model


def _hf_swin_checked(model):
    from flashvit.vit.patch import _source_reason
    return _source_reason(model.swin.encoder.layers[0].blocks[0].attention)


@pytest.mark.parametrize("case", ["plain", "padded_drop_path"])
def test_hf_swin_patched_matches_unpatched(case, calls):
    """transformers' Swin: its attention as one module (q/k/v as one GEMM, attention from the packed qkv with the
    relative position bias plus the shifted-window mask as one windowed mask, o_proj's GEMM), its MLP a FusedMLP, its
    layers' residual adds fused (layernorm_after with the first add in one pass, fc2 with the second in one GEMM).
    Logits and every gradient, the bias tables' included, as transformers'; a shifted block is among them; an image
    whose map does not fill whole windows (36 x 44: padded) with drop path (its own draws, under one seed)."""
    padded = case == "padded_drop_path"
    model = _hf_swin(drop_path=0.5 if padded else 0.0).train()
    report = _check_patched_same(model, _images((36, 44) if padded else (32, 32)),
                                 call=lambda m, x: _reseeded(m, x, lambda m, x: m(pixel_values=x).logits))
    why = _hf_swin_checked(model)
    if why:
        assert any("SwinAttention is not the source flashvit checked" in r[2] for r in report.left), report
        return
    counts = report.counts()
    assert counts["SwinAttention"] == 4 and calls["qkv_attention"] == 4, report
    assert counts["SwinMLP"] == 4 and calls["mlp"] == 4, report
    from flashvit.vit.patch import _source_reason
    layer_why = _source_reason(model.swin.encoder.layers[0].blocks[0])
    if layer_why:  # (another transformers' SwinLayer: left, named; its attention and MLP still fused)
        assert any(layer_why == r[2] for r in report.left), report
    else:
        assert counts["SwinLayer"] == 4 and calls["add_layer_norm"] == 4, report
    assert not any("Attention" in r[1] for r in report.left), report


@needs_kernels
def test_hf_swin_on_the_kernels_vs_float64(monkeypatch):
    """transformers' Swin training with the kernels forced: the learned bias and the window mask in the attention
    kernels (the tables' gradients from the backward kernel), against a float64 unpatched copy."""
    model = _hf_swin().train()
    if _hf_swin_checked(model):
        pytest.skip("this transformers' SwinAttention is not the source flashvit checked: patch() leaves it (the "
                    "test above checks the report says so)")
    seen = _spy_mask_grads(monkeypatch)
    _check_forced_vs_float64(model, _images((32, 32)), call=lambda m, x: m(pixel_values=x).logits)
    assert seen == [True] * 4, seen


def _hf_swinv2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Swinv2Config(image_size=32, patch_size=4, num_channels=3, embed_dim=32, depths=[2, 2],
                                    num_heads=[2, 4], window_size=4, num_labels=5, drop_path_rate=0.0)
    torch.manual_seed(fresh_seed())
    return _randomize(transformers.Swinv2ForImageClassification(cfg), scale=0.1)


def test_hf_swinv2_patched_matches_unpatched(calls):
    """transformers' Swinv2 (sources checked): its attention as one module (query/key/value as one GEMM, cosine
    attention with the continuous position bias plus the shifted blocks' window mask, added twice as transformers
    adds it, as one windowed mask, the output dense GEMM), its Intermediate as one GEMM with the GELU epilogue.
    Logits and every gradient (the cpb MLP's, the logit scales') as transformers'; a shifted block is among them.
    Another source is left, named."""
    model = _hf_swinv2().train()
    report = _check_patched_same(model, _images((32, 32)), call=lambda m, x: m(pixel_values=x).logits)
    why = patch_mod._hf_swinv2_unchecked("Swinv2Attention", "Swinv2SelfAttention", "Swinv2SelfOutput",
                                         "Swinv2Intermediate")
    if why:
        assert any(why == r[2] for r in report.left), report
        return
    assert model.swinv2.encoder.layers[0].blocks[1].shift_size > 0  # (a shifted block: its window mask is used)
    counts = report.counts()
    assert counts["Swinv2Attention"] == 4 and calls["attention"] == 4, report
    assert counts["Swinv2Intermediate"] == 4 and calls["linear"] == 3 * 4, report  # qkv, dense, intermediate
    assert not report.left, report


def test_hf_swinv2_of_another_source_is_left(monkeypatch):
    """A Swinv2SelfAttention whose forward differs from the source checked: its Swinv2Attention is left, named."""
    pytest.importorskip("transformers")
    hf = importlib.import_module("transformers.models.swinv2.modeling_swinv2")
    orig = hf.Swinv2SelfAttention.forward
    monkeypatch.setattr(hf.Swinv2SelfAttention, "forward", lambda self, *a, **k: orig(self, *a, **k))
    model = flashvit.patch(_hf_swinv2())
    assert any("Swinv2SelfAttention.forward is not the source flashvit checked" in r[2]
               for r in model.flashvit_report.left), model.flashvit_report


@needs_kernels
def test_hf_swinv2_on_the_kernels_vs_float64():
    """transformers' Swinv2 training with the kernels forced, against a float64 unpatched copy."""
    model = _hf_swinv2().train()
    if patch_mod._hf_swinv2_unchecked("Swinv2Attention", "Swinv2SelfAttention", "Swinv2SelfOutput"):
        pytest.skip("this transformers' Swinv2 is not the source flashvit checked (the test above checks it is left)")
    _check_forced_vs_float64(model, _images((32, 32)), call=lambda m, x: m(pixel_values=x).logits)


def _hf_segformer():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SegformerConfig(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[4, 2],
                                       hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2],
                                       num_attention_heads=[1, 2], mlp_ratios=[2, 2], num_labels=5, drop_path_rate=0.0)
    torch.manual_seed(fresh_seed())
    model = _randomize(transformers.SegformerForImageClassification(cfg))
    if not hasattr(model.segformer.stages[0].blocks[0].attention, "q_proj"):
        pytest.skip("this transformers' SegFormer has no SegformerAttention with q/k/v_proj (an older layout)")
    return model


def test_hf_segformer_patched_matches_unpatched(calls):
    """transformers' SegFormer: its attention (keys and values from the spatially reduced sequence, Nkv < Nq) goes
    through the AttentionInterface to flashvit's attention (source checked); its Mix-FFN (a depthwise conv between
    the GEMMs) is left, named. Logits and every gradient as transformers'."""
    model = _hf_segformer().train()
    report = _check_patched_same(model, _images((32, 32)), call=lambda m, x: m(pixel_values=x).logits)
    from flashvit.vit.patch import _source_reason
    if _source_reason(model.segformer.stages[0].blocks[0].attention):
        assert any("SegformerAttention is not the source flashvit checked" in r[2] for r in report.left), report
        return
    assert report.counts()["SegformerAttention"] == 2 and calls["attention"] == 2, report
    assert {r[1] for r in report.left} == {"SegformerMixMLP"}, report


@needs_kernels
def test_hf_segformer_on_the_kernels_vs_float64(monkeypatch):
    """SegFormer training with the kernels forced: the cross-length attention (Nq = 64, Nkv = 4; Nq = 16, Nkv = 4)
    in the kernels, against a float64 unpatched copy."""
    model = _hf_segformer().train()
    from flashvit.vit.patch import _source_reason
    if _source_reason(model.segformer.stages[0].blocks[0].attention):
        pytest.skip("this transformers' SegformerAttention is not the source flashvit checked (the test above checks "
                    "the report says so)")
    A = importlib.import_module("flashvit.kernels.attention")
    fwd, lengths = A.attention_fwd, []
    monkeypatch.setattr(A, "attention_fwd", lambda q, k, *a, **kw: lengths.append((q.shape[1], k.shape[1]))
                        or fwd(q, k, *a, **kw))
    _check_forced_vs_float64(model, _images((32, 32)), call=lambda m, x: m(pixel_values=x).logits)
    assert lengths == [(64, 4), (16, 4)], lengths


def test_hf_vit_image_not_a_multiple_of_the_patch(calls):
    """36 px at patch 8: the patchify conv drops the last 4 rows and columns; so does the fused patch embedding."""
    model = _hf_model("ViTModel", image_size=36).train()
    report = _check_patched_same(model, _images((36, 36)), call=lambda m, x: m(pixel_values=x).last_hidden_state)
    assert report.counts()["ViTPatchEmbeddings"] == 1 and calls["patch_embed_op"] == 1


HF_FAMILY = {  # model class, config class, extra config, classes fused, classes left (forward differs)
    "deit": ("DeiTForImageClassification", "DeiTConfig", {},
             {"LayerNorm": 5, "DeiTAttention": 2, "DeiTMLP": 2, "DeiTPatchEmbeddings": 1, "DeiTLayer": 2}, set()),
    "vit_msn": ("ViTMSNForImageClassification", "ViTMSNConfig", {},
                {"LayerNorm": 5, "ViTMSNAttention": 2, "ViTMSNMLP": 2, "ViTMSNPatchEmbeddings": 1, "ViTMSNLayer": 2},
                set()),
    "vit_mae": ("ViTMAEModel", "ViTMAEConfig", dict(mask_ratio=0.5),
                {"LayerNorm": 5, "ViTMAEAttention": 2, "ViTMAEMLP": 2, "ViTMAEPatchEmbeddings": 1, "ViTMAELayer": 2},
                set()),
    "dinov2": ("Dinov2Model", "Dinov2Config", dict(mlp_ratio=2),
               {"LayerNorm": 5, "Dinov2Attention": 2, "Dinov2MLP": 2, "Dinov2Layer": 2}, {"Dinov2PatchEmbeddings"}),
    "dinov2_reg": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", dict(mlp_ratio=2, num_register_tokens=3),
                   {"LayerNorm": 5, "Dinov2WithRegistersAttention": 2, "Dinov2WithRegistersMLP": 2,
                    "Dinov2WithRegistersLayer": 2}, {"Dinov2WithRegistersPatchEmbeddings"}),
    "ijepa": ("IJepaModel", "IJepaConfig", {},
              {"LayerNorm": 5, "IJepaAttention": 2, "IJepaMLP": 2, "IJepaPatchEmbeddings": 1, "IJepaLayer": 2}, set()),
    "pixio": ("PixioModel", "PixioConfig", {},
              {"LayerNorm": 5, "PixioAttention": 2, "PixioMLP": 2, "PixioPatchEmbeddings": 1}, {"PixioLayer"}),
    "vivit": ("VivitForVideoClassification", "VivitConfig", dict(num_frames=4, tubelet_size=[2, 8, 8]),  # gelu_fast
              {"LayerNorm": 5, "VivitAttention": 2, "VivitMLP": 2, "VivitLayer": 2}, set()),
}


def _dinov2_layer_checked(family: str = "dinov2") -> bool:
    """Whether the installed transformers' Dinov2[WithRegisters]Layer (and its LayerScale) is the source flashvit
    checked."""
    folder, prefix = {"dinov2": ("dinov2", "Dinov2"), "dinov2_reg": ("dinov2_with_registers", "Dinov2WithRegisters")}[
        family]
    hf = importlib.import_module(f"transformers.models.{folder}.modeling_{folder}")
    prints = patch_mod._HF_OWN_LAYERS[prefix + "Layer"][1]
    return (patch_mod._source_fingerprint(getattr(hf, prefix + "Layer").forward) in prints["forward"]
            and patch_mod._source_fingerprint(getattr(hf, prefix + "LayerScale").forward) in prints["layer_scale2"])


@pytest.mark.parametrize("family", list(HF_FAMILY))
def test_hf_vit_family_patched_matches_unpatched(family, calls):
    """transformers classes generated from ViT's (DeiT, ViT-MSN, ViT-MAE's encoder, DINOv2, I-JEPA, Pixio, ViViT's
    encoder) are fused where their forward is ViT's (source compared); DINOv2's layer (layer scale) and patch
    embeddings (a dtype cast) and Pixio's layer differ and are left, with that reason. Logits / hidden states and
    gradients unchanged."""
    transformers = pytest.importorskip("transformers")
    model_cls, cfg_cls, extra, fused, left = HF_FAMILY[family]
    cfg = dict(dict(image_size=32, patch_size=8, num_channels=3, hidden_size=48, num_hidden_layers=2,
                    num_attention_heads=3, intermediate_size=80, num_labels=5), **extra)
    torch.manual_seed(fresh_seed())
    model = _randomize(getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**cfg))).train()

    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(1))  # MAE: the same kept patches each call

    def call(m, x):
        out = m(pixel_values=x, **({"noise": noise} if family == "vit_mae" else {}))
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    x = _images((32, 32), batch=8).view(2, 4, 3, 32, 32) if family == "vivit" else _images((32, 32))  # (video)
    report = _check_patched_same(model, x, call=call)
    layer = next((k for k in fused if k.startswith("Dinov2") and k.endswith("Layer")), None)
    if layer and not _dinov2_layer_checked(family):  # a transformers release changed it: left, and said
        fused = {k: v for k, v in fused.items() if k != layer}
        assert any(c == layer and "not the source flashvit checked" in why for _, c, why in report.left)
    assert report.counts() == fused, report.counts()
    differ = {cls for _, cls, why in report.left if "forward differs from transformers' ViT" in why}
    assert differ == left, report.left
    assert calls["attention"] == 2 and calls["mlp"] == 2
    assert calls.get("add_layer_norm", 0) == (2 if any(k.endswith("Layer") for k in fused) else 0)


def _count_calls(monkeypatch, cls) -> dict:
    n = {"calls": 0}
    orig = cls.forward

    def counted(self, *a, **k):
        n["calls"] += 1
        return orig(self, *a, **k)

    monkeypatch.setattr(cls, "forward", counted)
    return n


def _reseeded(m, x, fn=lambda m, x: m(x)):
    torch.manual_seed(11)  # the same drop-path draws in every run
    return fn(m, x)


def test_timm_layer_scale_in_proj_and_fc2(monkeypatch, calls):
    """timm's ls1 / ls2 run in the proj and fc2 GEMMs' epilogues: LayerScale.forward no longer
    runs; logits and every grad (γ's included) equal the unpatched model's, with drop path active. A hook on one
    LayerScale keeps that one's call (the hook sees it)."""
    from timm.layers import LayerScale

    n = _count_calls(monkeypatch, LayerScale)
    kw = dict(SMALL, init_values=0.1, drop_path_rate=0.3)
    model = _randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)).train()
    x = _images(model.patch_embed.img_size)
    ref_out, ref_grads = _run(model, x, _reseeded)
    assert n["calls"] == 2 * kw["depth"]
    flashvit.patch(model)
    assert f"{2 * kw['depth']} LayerScale modules run in the epilogue" in str(model.flashvit_report)
    n["calls"] = 0
    out, grads = _run(model, x, _reseeded)
    assert n["calls"] == 0 and calls["mlp"] == kw["depth"]
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    assert {k for k in grads if k.endswith("gamma")} == {k for k in ref_grads if k.endswith("gamma")} != set()
    scale = max(g.abs().max().item() for g in ref_grads.values())  # (fp32 rounding of the fused adds: scale-relative)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-5 * scale, rtol=1e-4, msg=k)
    model.blocks[1].ls2.register_forward_hook(lambda *a: None)
    out2, _ = _run(model, x, _reseeded)
    assert n["calls"] == 1
    torch.testing.assert_close(out2, ref_out, atol=1e-5, rtol=1e-4)


def _drop_path_model(case):
    """A timm model in training with drop path at high rates (samples drop under one seed)."""
    if case == "swin":
        return _random_bias_tables(_randomize(timm.create_model(
            SWIN_NAMES["v1"], pretrained=False, **dict(SWIN_SMALL, drop_path_rate=0.6)))).train()
    name = {"vit": "vit_tiny_patch16_224", "vit_unscaled": "vit_tiny_patch16_224", "eva02": "eva02_tiny_patch14_224",
            "ls": "vit_small_patch14_dinov2"}[case]
    kw = dict(img_size=16, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=3, drop_path_rate=0.6)
    model = _randomize(timm.create_model(name, pretrained=False, **kw)).train()
    if case == "vit_unscaled":  # timm's scale_by_keep=False: kept samples unscaled
        for blk in model.blocks:
            blk.drop_path1.scale_by_keep = blk.drop_path2.scale_by_keep = False
    return model


@pytest.mark.parametrize("case", ["vit", "vit_unscaled", "eva02", "ls", "swin"])
def test_timm_stochastic_depth_folds_into_the_residual_adds(case, monkeypatch, calls):
    """timm's DropPath in training: a patched block draws the mask itself, as DropPath draws it (under one seed the
    same samples drop), and applies it as a factor per sample inside the add + LayerNorm pass (the attention
    branch) and in one addcmul with the residual (the MLP branch): DropPath.forward no longer runs. Logits and every
    gradient equal the unpatched model's, on CPU's path and with the kernels forced (the interpreter or a GPU);
    a hook on a DropPath keeps that one's call (the hook sees it)."""
    from timm.layers import DropPath

    torch.manual_seed(fresh_seed())
    model = _drop_path_model(case)
    x = _images(model.patch_embed.img_size, batch=6)
    ref_out, ref_grads = _run(model, x, _reseeded)
    flashvit.patch(model)
    scales, addcmuls = [], []
    add_ln = ln_mod.add_layer_norm  # (the calls fixture's counter)
    monkeypatch.setattr(ln_mod, "add_layer_norm", lambda *a, x_scale=None, **k: scales.append(x_scale)
                        or add_ln(*a, x_scale=x_scale, **k))
    scaled = patch_mod.add_scaled
    monkeypatch.setattr(patch_mod, "add_scaled", lambda h, z, s: addcmuls.append(s) or scaled(h, z, s))
    n = _count_calls(monkeypatch, DropPath)
    for backend in ("auto", "triton"):
        if backend == "triton" and not (torch.cuda.is_available() or INTERPRET):
            continue
        scales.clear()
        addcmuls.clear()
        with flashvit.use_backend(backend):
            out, grads = _run(model, x, _reseeded)
        assert n["calls"] == 0
        blocks = 4 if case == "swin" else 3  # (the first block's rate is 0: an Identity, fc2 adds the residual)
        assert len(scales) == blocks and len(addcmuls) == blocks - 1, (scales, addcmuls)
        drawn = torch.cat([s for s in scales + addcmuls if s is not None])
        assert (drawn == 0).any() and (drawn != 0).any()
        kept = drawn[drawn != 0]
        assert (kept == 1).all() if case == "vit_unscaled" else (kept > 1).all()  # (1 / keep_prob)
        tol = 1e-5 if backend == "auto" else 1e-4
        torch.testing.assert_close(out, ref_out, atol=tol * ref_out.abs().max().item(), rtol=tol * 10)
        assert set(grads) == set(ref_grads)
        scale = max(g.abs().max().item() for g in ref_grads.values())
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], atol=tol * scale, rtol=tol * 10, msg=k)
    blk = model.layers[0].blocks[1] if case == "swin" else model.blocks[2]
    blk.drop_path1.register_forward_hook(lambda *a: None)
    out2, _ = _run(model, x, _reseeded)
    assert n["calls"] == 1
    torch.testing.assert_close(out2, ref_out, atol=1e-5 * ref_out.abs().max().item(), rtol=1e-4)


def test_hf_dinov2_layer_scale_folds_into_fc2(monkeypatch, calls):
    """transformers' Dinov2Layer: norm2 fused with the first residual add, layer_scale2 and the second add in
    fc2's GEMM; layer_scale1 still runs (once per layer). Drop path active, same draws: logits and grads equal."""
    transformers = pytest.importorskip("transformers")
    if not _dinov2_layer_checked():
        pytest.skip("this transformers' Dinov2Layer is not the source flashvit checked: "
                    "test_hf_vit_family_patched_matches_unpatched asserts that it is left, with the reason")
    from transformers.models.dinov2 import modeling_dinov2 as hf

    cfg = transformers.Dinov2Config(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2,
                                    num_attention_heads=3, mlp_ratio=2, drop_path_rate=0.3)
    torch.manual_seed(fresh_seed())
    model = _randomize(transformers.Dinov2Model(cfg)).train()

    def call(m, x):
        return _reseeded(m, x, lambda m, x: m(pixel_values=x).last_hidden_state)

    x = _images((32, 32))
    ref_out, ref_grads = _run(model, x, call)
    flashvit.patch(model)
    assert model.flashvit_report.counts()["Dinov2Layer"] == 2
    assert "2 LayerScale modules run in the epilogue" in str(model.flashvit_report)  # layer_scale2 of each layer
    n = _count_calls(monkeypatch, hf.Dinov2LayerScale)  # after patching: its source is checked there
    out, grads = _run(model, x, call)
    assert n["calls"] == 2  # layer_scale1 of each layer
    assert calls["add_layer_norm"] == 2 and calls["mlp"] == 2
    torch.testing.assert_close(out, ref_out, atol=1e-5 * ref_out.abs().max().item(), rtol=1e-4)
    assert set(grads) == set(ref_grads)
    scale = max(g.abs().max().item() for g in ref_grads.values())  # (fp32 rounding of the fused adds)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-5 * scale, rtol=1e-4, msg=k)


def _hf_drop_path_model(case):
    """A transformers model in training whose layers hold its drop-path class (rates up to 0.5)."""
    transformers = pytest.importorskip("transformers")
    if case == "swin":
        return _hf_swin(drop_path=0.5), "SwinDropPath", lambda m, x: m(pixel_values=x).logits
    if case == "beit":
        return _hf_beit(drop_path_rate=0.5, layer_scale_init_value=0.1), "BeitDropPath", \
            lambda m, x: m(pixel_values=x).logits
    cfg = transformers.Dinov2Config(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=3,
                                    num_attention_heads=3, mlp_ratio=2, drop_path_rate=0.5)
    torch.manual_seed(fresh_seed())
    return _randomize(transformers.Dinov2Model(cfg)), "Dinov2DropPath", lambda m, x: m(pixel_values=x).last_hidden_state


@pytest.mark.parametrize("case", ["dinov2", "beit", "swin"])
def test_hf_stochastic_depth_folds_into_the_residual_adds(case, monkeypatch, calls):
    """transformers' drop paths (DINOv2's, BEiT's, Swin's: the source checked) in fused layers: the layer draws the
    mask as the module draws it (floor(rand + keep) a sample, x / keep: an fp32 factor) and folds it into the
    add + LayerNorm pass; the module's forward no longer runs. Logits and every gradient equal the unpatched
    model's under one seed, on CPU's path and with the kernels forced (the interpreter or a GPU); samples drop."""
    model, cls_name, fn = _hf_drop_path_model(case)
    model = model.train()
    hf_cls = next(type(m) for m in model.modules() if type(m).__name__ == cls_name)
    x = _images((32, 32), batch=6)

    def call(m, x):
        return _reseeded(m, x, fn)

    ref_out, ref_grads = _run(model, x, call)
    flashvit.patch(model)
    if not any(type(m).__name__.startswith("Flashvit") and hasattr(m, "drop_path") for m in model.modules()):
        pytest.skip(f"this transformers' {case} layers are not the sources flashvit checked (their tests say so)")
    n = _count_calls(monkeypatch, hf_cls)
    scales = []
    add_ln = ln_mod.add_layer_norm
    monkeypatch.setattr(ln_mod, "add_layer_norm", lambda *a, x_scale=None, **k: scales.append(x_scale)
                        or add_ln(*a, x_scale=x_scale, **k))
    for backend in ("auto", "triton"):
        if backend == "triton" and not (torch.cuda.is_available() or INTERPRET):
            continue
        scales.clear()
        with flashvit.use_backend(backend):
            out, grads = _run(model, x, call)
        drawn = torch.cat([s for s in scales if s is not None])
        assert (drawn == 0).any() and (drawn > 1).any() and drawn.dtype == torch.float32, drawn
        tol = 1e-5 if backend == "auto" else 1e-4
        torch.testing.assert_close(out, ref_out, atol=tol * ref_out.abs().max().item(), rtol=tol * 10)
        scale = max(g.abs().max().item() for g in ref_grads.values())
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], atol=tol * scale, rtol=tol * 10, msg=k)
    assert n["calls"] == 0, n  # (both branches: the layers' own draws)


def test_timm_swiglu_mlp_is_fused(calls):
    """timm's GluMlp with SiLU (DINOv2-giant's SwiGLUPacked, gate first; and GluMlp's default gate last): fc1 GEMM,
    silu(gate)·up in one pass, fc2 GEMM with LayerScale and residual. Logits and grads equal the unpatched model's;
    a GluMlp with another gate activation (sigmoid: GLU) is left, with the reason."""
    from timm.layers import GluMlp
    from torch import nn as tnn

    torch.manual_seed(fresh_seed())
    kw = dict(SMALL, img_size=28, embed_dim=48, num_heads=3, mlp_ratio=2.0, drop_path_rate=0.2)
    model = _randomize(timm.create_model("vit_giant_patch14_dinov2", pretrained=False, **kw)).train()
    model.blocks[1].mlp.gate_last = True  # the other half order (GluMlp's default)
    report = _check_patched_same(model, _images((28, 28)), call=lambda m, x: _reseeded(m, x))
    assert report.counts()["GluMlp"] == kw["depth"] and not report.left
    assert calls["swiglu_packed"] == kw["depth"] and calls["linear"] == 4 * kw["depth"]  # qkv, proj, fc1, fc2
    glu = nn.Sequential(GluMlp(16, 32, act_layer=tnn.Sigmoid))
    flashvit.patch(glu)
    assert any("not SiLU" in why for _, _, why in glu.flashvit_report.left)


@pytest.mark.parametrize("kind", ["glu_norm", "glu_gate_last", "swiglu_norm"])
def test_timm_swiglu_modules_with_a_norm_inside(kind, calls):
    """GluMlp / SwiGLU with SiLU and a norm between the gate and fc2 (EVA-02's scale_mlp): fused, the norm kept;
    the patched module vs the original on CPU's path, and on the kernels (interpreter) vs float64."""
    from timm.layers import GluMlp, SwiGLU
    from torch import nn as tnn

    torch.manual_seed(fresh_seed())
    norm = tnn.LayerNorm if kind.endswith("norm") else None
    mlp = (SwiGLU(24, 40, norm_layer=norm) if kind.startswith("swiglu") else
           GluMlp(24, 80, act_layer=tnn.SiLU, norm_layer=norm, gate_last=kind == "glu_gate_last"))
    model = _randomize(nn.Sequential(mlp)).train()
    x = torch.randn(2, 9, 24, generator=torch.Generator().manual_seed(fresh_seed()))
    report = _check_patched_same(model, x, call=lambda m, x: m(x))
    assert report.counts() == {type(mlp).__name__: 1, **({"LayerNorm": 1} if norm else {})} and not report.left
    assert calls.get("swiglu" if kind.startswith("swiglu") else "swiglu_packed") == 1
    if INTERPRET:
        oracle = copy.deepcopy(model).double()
        flashvit.patch(model)
        with flashvit.use_backend("triton"):
            out, grads = _run(model, x)
        ref, ref_grads = _run(oracle, x.double())
        assert max_err(out, ref) <= 1e-4 * max(1.0, ref.abs().max().item())
        for n, g in ref_grads.items():
            assert max_err(grads[n], g) <= 1e-4 * max(1.0, g.abs().max().item()), n


def test_hf_dinov2_swiglu_ffn_is_fused(calls):
    """transformers' Dinov2SwiGLUFFN (DINOv2-giant): gate_proj and up_proj GEMMs, silu(gate)·up in one pass, down_proj
    with layer_scale2 and the residual; logits and grads equal the unpatched model's."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2Config(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2,
                                    num_attention_heads=3, mlp_ratio=2, use_swiglu_ffn=True)
    torch.manual_seed(fresh_seed())
    model = _randomize(transformers.Dinov2Model(cfg)).train()
    report = _check_patched_same(model, _images((32, 32)), call=lambda m, x: m(pixel_values=x).last_hidden_state)
    assert report.counts()["Dinov2SwiGLUFFN"] == 2
    assert calls["swiglu"] == 2 and calls["linear"] == 6  # gate_proj, up_proj, down_proj


@pytest.mark.parametrize("case", ["timm_packed", "timm_two_tensors", "hf_dinov2"])
def test_swiglu_mlps_under_recompute_keep_no_h(case, calls):
    """use_mlp_recompute('act') reaches the patched SwiGLU MLPs (timm's GluMlp / SwiGLU, transformers' Dinov2
    SwiGLUFFN): swiglu_fc2 runs (fc1's output kept, h rebuilt in the backward), same logits and grads as the
    unpatched model; with the kernels forced (the interpreter on CPU), against a float64 copy."""
    torch.manual_seed(fresh_seed())
    kw = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=3)
    if case == "hf_dinov2":
        transformers = pytest.importorskip("transformers")
        cfg = transformers.Dinov2Config(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, mlp_ratio=2, use_swiglu_ffn=True)
        make = lambda: _randomize(transformers.Dinov2Model(cfg)).train()  # noqa: E731
        call = lambda m, x: m(pixel_values=x).last_hidden_state  # noqa: E731
    else:
        name = "vit_giant_patch14_dinov2" if case == "timm_packed" else "aimv2_large_patch14_224"
        make = lambda: _randomize(timm.create_model(name, pretrained=False, **kw)).train()  # noqa: E731
        call = None
    model = make()
    if case == "timm_packed":
        model.blocks[1].mlp.gate_last = True
    with flashvit.use_mlp_recompute("act"):
        _check_patched_same(model, _images((16, 16)), call=call)
        assert calls["swiglu_fc2"] == 2 and "swiglu" not in calls and "swiglu_packed" not in calls
        if torch.cuda.is_available() or INTERPRET:  # (else only the eager fallback above)
            n = calls["swiglu_fc2"]
            _check_forced_vs_float64(make(), _images((16, 16)), call)
            assert calls["swiglu_fc2"] == n + 2  # one a block (the float64 copy runs unpatched)
    if case != "hf_dinov2":  # 'fc1' keeps fc1's output too here; a module's own recompute attribute wins
        flashvit.patch(model)
        model.blocks[0].mlp.recompute = "none"
        n = calls["swiglu_fc2"]
        with flashvit.use_mlp_recompute("fc1"):
            _run(model, _images((16, 16)), call)
        assert calls["swiglu_fc2"] == n + 1


def test_hf_layer_with_an_unchecked_source_is_left(monkeypatch):
    pytest.importorskip("transformers")
    mixin, prints = patch_mod._HF_OWN_LAYERS["Dinov2Layer"]
    monkeypatch.setitem(patch_mod._HF_OWN_LAYERS, "Dinov2Layer", (mixin, dict(prints, forward={"0" * 16})))
    import transformers

    model = transformers.Dinov2Model(transformers.Dinov2Config(image_size=16, patch_size=8, hidden_size=32,
                                                               num_hidden_layers=1, num_attention_heads=2))
    flashvit.patch(model)
    assert "Dinov2Layer" not in model.flashvit_report.counts()
    assert any(c == "Dinov2Layer" and "Dinov2Layer.forward is not the source flashvit checked" in why
               for _, c, why in model.flashvit_report.left), model.flashvit_report.left
    flashvit.unpatch(model)


def _hf_dinov3(gated: bool, **kw):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DINOv3ViTModel"):
        pytest.skip(f"transformers {transformers.__version__} has no DINOv3ViTModel")
    cfg = dict(image_size=32, patch_size=8, hidden_size=64, num_attention_heads=2, num_hidden_layers=2,
               intermediate_size=96, num_register_tokens=2, use_gated_mlp=gated, layerscale_value=0.7,
               hidden_act="silu" if gated else "gelu", key_bias=True)
    cfg.update(kw)
    torch.manual_seed(fresh_seed())
    return _randomize(transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**cfg)))


def _dinov3_call(model, x):
    torch.manual_seed(0)  # the same random RoPE rescale (training augmentation) in both runs
    return model(pixel_values=x).last_hidden_state


@pytest.mark.parametrize("gated", [False, True], ids=["gelu_mlp", "gated_mlp"])
def test_hf_dinov3_patched_matches_unpatched(gated, calls):
    """transformers' DINOv3 ViT: q/k/v as one GEMM + RoPE + flash attention, LayerScales folded into o_proj and
    the MLP's last GEMM, the residual adds fused; GELU MLP -> the fused MLP op, gated MLP -> swiglu."""
    if not _dinov3_sources_checked():
        pytest.skip("this transformers' DINOv3 sources are not the ones flashvit checked (the next test covers it)")
    model = _hf_dinov3(gated).train()
    report = _check_patched_same(model, _images((32, 32)), call=_dinov3_call)
    mlp_cls = "DINOv3ViTGatedMLP" if gated else "DINOv3ViTMLP"
    assert report.counts() == {"LayerNorm": 5, "DINOv3ViTAttention": 2, mlp_cls: 2, "DINOv3ViTLayer": 2,
                               "DINOv3ViTEmbeddings": 1}, report
    assert not report.left and "4 LayerScale modules run in the epilogue" in str(report)
    assert calls["qkv_attention"] == 2 and calls["add_layer_norm"] == 2 and calls["patch_embed_op"] == 1
    assert calls["swiglu" if gated else "mlp"] == 2


def _dinov3_sources_checked() -> bool:
    try:
        return patch_mod._dinov3_unchecked(*patch_mod._DINOV3_CHECKED) is None
    except ImportError:
        return False


def test_hf_dinov3_inference_rotates_in_the_qkv_gemm(calls):
    """Without autograd, transformers' DINOv3 attention runs qkv_rope_linear (rotate_half in the qkv GEMM's epilogue
    on the Triton path) then the plain packed attention: the unpatched model's features."""
    if not _dinov3_sources_checked():
        pytest.skip("this transformers' DINOv3 sources are not the ones flashvit checked")
    model = _hf_dinov3(False).eval()
    x = _images((32, 32))
    with torch.no_grad():
        ref = _dinov3_call(model, x)
        flashvit.patch(model)
        out = _dinov3_call(model, x)
    torch.testing.assert_close(out, ref, atol=1e-5 * max(1.0, ref.abs().max().item()), rtol=1e-4)
    assert calls["qkv_rope_linear"] == 2 and calls["qkv_attention"] == 2, calls


@needs_kernels
def test_hf_dinov3_with_triton_forced_matches_float64():
    model = _hf_dinov3(False, hidden_size=32, num_hidden_layers=1, image_size=16).train()
    if not _dinov3_sources_checked():
        pytest.skip("this transformers' DINOv3 sources are not the ones flashvit checked")
    report = _check_forced_vs_float64(model, _images((16, 16)), _dinov3_call)
    assert report.counts()["DINOv3ViTAttention"] == 1


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [False, True], ids=["gelu_mlp", "gated_mlp"])
def test_hf_dinov3_patched_bf16_on_cuda(gated):
    """The patched DINOv3 ViT in bf16 on the Triton path vs float64: 2x/3x the unpatched bf16 model's error."""
    base = _hf_dinov3(gated, image_size=64, patch_size=16, hidden_size=128, num_attention_heads=2).train()
    if not _dinov3_sources_checked():
        pytest.skip("this transformers' DINOv3 sources are not the ones flashvit checked")
    x = _images((64, 64), batch=4, device="cuda")
    ref_out, ref_grads = _run(copy.deepcopy(base).cuda().double(), x.double(), _dinov3_call)
    eager_out, eager_grads = _run(copy.deepcopy(base).cuda().bfloat16(), x.bfloat16(), _dinov3_call)
    patched = flashvit.patch(copy.deepcopy(base).cuda().bfloat16())
    out, grads = _run(patched, x.bfloat16(), _dinov3_call)
    _bf16_rule(out, ref_out, eager_out, 2, "hidden", atol=1e-3 * ref_out.abs().max().item())
    gscale = max(g.abs().max().item() for g in ref_grads.values())
    for n in ref_grads:
        _bf16_rule(grads[n], ref_grads[n], eager_grads[n], 3, n, atol=1e-3 * gscale)


@pytest.mark.parametrize("registers", [0, 3])
def test_hf_dinov3_embeddings(registers, calls):
    """[cls, registers, patches] from one fused patch-embedding call (36 px at patch 8: the conv's crop); with
    bool_masked_pos (mask tokens) transformers' forward runs; both equal transformers'."""
    model = _hf_dinov3(False, image_size=36, num_register_tokens=registers).eval()
    ref = copy.deepcopy(model.embeddings)
    flashvit.patch(model)
    x = _images((36, 36))
    torch.testing.assert_close(model.embeddings(x), ref(x))
    assert calls["patch_embed_op"] == 1
    mask = torch.rand(2, 16) > 0.5
    torch.testing.assert_close(model.embeddings(x, bool_masked_pos=mask), ref(x, bool_masked_pos=mask))
    assert calls["patch_embed_op"] == 1


def test_hf_dinov3_root_modules_are_named():
    """patch() on a DINOv3 layer or embeddings itself: its children are swapped, the root is named as left."""
    model = _hf_dinov3(False)
    layer = next(m for m in model.modules() if type(m).__name__ == "DINOv3ViTLayer")
    for root in (layer, model.embeddings):
        report = flashvit.patch(root).flashvit_report
        assert report.left[-1][0] == "" and "root module itself" in report.left[-1][2], report
        flashvit.unpatch(root)


def test_hf_dinov3_with_unchecked_sources_is_left(monkeypatch):
    model = _hf_dinov3(False)
    monkeypatch.setitem(patch_mod._DINOV3_CHECKED, "apply_rotary_pos_emb", {"0" * 16})
    monkeypatch.setitem(patch_mod._DINOV3_CHECKED, "DINOv3ViTLayer", {"0" * 16})
    report = flashvit.patch(model).flashvit_report
    counts = report.counts()
    assert "DINOv3ViTAttention" not in counts and "DINOv3ViTLayer" not in counts and counts["DINOv3ViTMLP"] == 2
    whys = {(c, why) for _, c, why in report.left}
    assert any(c == "DINOv3ViTAttention" and "apply_rotary_pos_emb is not the source" in w for c, w in whys), whys
    assert any(c == "DINOv3ViTLayer" and "DINOv3ViTLayer is not the source" in w for c, w in whys), whys
    assert len(report.left) == 4  # each once (not again by the HF attention routing)
    assert counts["DINOv3ViTEmbeddings"] == 1
    flashvit.unpatch(model)


HF_ENCODERS = {  # transformers' CLIP-style encoders: (model class, config class, its config, classes fused, left)
    "siglip_vision": ("SiglipVisionModel", "SiglipVisionConfig", {},
                      {"SiglipVisionEmbeddings": 1, "SiglipEncoderLayer": 2, "SiglipAttention": 2, "SiglipMLP": 3,
                       "LayerNorm": 6, "MultiheadAttention": 1}, set()),  # (its MAP head: an MLP, an MHA probe)
    "clip_vision_gelu": ("CLIPVisionModel", "CLIPVisionConfig", dict(hidden_act="gelu"),
                         {"CLIPVisionEmbeddings": 1, "CLIPEncoderLayer": 2, "CLIPAttention": 2, "CLIPMLP": 2,
                          "LayerNorm": 6}, set()),
    "clip_vision_quick_gelu": ("CLIPVisionModel", "CLIPVisionConfig", {},
                               {"CLIPVisionEmbeddings": 1, "CLIPEncoderLayer": 2, "CLIPAttention": 2, "LayerNorm": 6},
                               {"CLIPMLP"}),
}


@pytest.mark.parametrize("case", list(HF_ENCODERS))
def test_hf_clip_siglip_vision_patched_matches_unpatched(case, calls):
    """CLIP / SigLIP vision towers: q/k/v as one GEMM + flash attention, the encoder layer's residual adds fused,
    GELU MLPs fused (CLIP's QuickGELU left, named), the embeddings (conv, class token, positions) in one call."""
    transformers = pytest.importorskip("transformers")
    cls_name, cfg_name, extra, fused, left = HF_ENCODERS[case]
    cfg = getattr(transformers, cfg_name)(image_size=32, patch_size=8, hidden_size=64, num_attention_heads=2,
                                          num_hidden_layers=2, intermediate_size=96, **extra)
    torch.manual_seed(fresh_seed())
    model = _randomize(getattr(transformers, cls_name)(cfg)).train()
    report = _check_patched_same(model, _images((32, 32)), call=lambda m, x: m(pixel_values=x).pooler_output)
    assert report.counts() == fused, report
    assert {c for _, c, _ in report.left} == left, report
    assert calls["qkv_attention"] == 2 and calls["add_layer_norm"] == 2 and calls["patch_embed_op"] == 1


@pytest.mark.parametrize("family", ["Siglip", "CLIP"])
def test_hf_clip_siglip_text_and_vision_model(family, calls):
    """The two-tower model: the text tower's masked attention (SigLIP's padding mask: the attention op with the
    mask; CLIP's causal one: transformers' forward; its layers' residual adds and MLPs fused
    either way), the vision tower the kernels; same logits and gradients."""
    transformers = pytest.importorskip("transformers")
    T = transformers
    tc = getattr(T, f"{family}TextConfig")(vocab_size=50, hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                                           intermediate_size=48, max_position_embeddings=16, hidden_act="gelu")
    vc = getattr(T, f"{family}VisionConfig")(image_size=32, patch_size=8, hidden_size=32, num_attention_heads=2,
                                             num_hidden_layers=1, intermediate_size=48, hidden_act="gelu")
    torch.manual_seed(fresh_seed())
    model = _randomize(getattr(T, f"{family}Model")(getattr(T, f"{family}Config")(
        text_config=tc.to_dict(), vision_config=vc.to_dict()))).train()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(fresh_seed()))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0

    def call(m, x):
        return m(input_ids=ids, pixel_values=x, attention_mask=mask).logits_per_image

    report = _check_patched_same(model, _images((32, 32)), call=call)
    assert report.counts()[f"{family}Attention"] == 2 and report.counts()[f"{family}EncoderLayer"] == 2
    assert calls["qkv_attention"] == 1 and calls["add_layer_norm"] == 2  # the vision tower's attention only


def test_hf_siglip2_naflex_padded_batch_inference_runs_the_masked_kernel(calls):
    """transformers' SigLIP2 vision tower on a padded NaFlex batch (pixel_attention_mask): the encoder's padding
    mask goes to the attention op, whose forward kernel applies it without autograd; same features as unpatched
    (the reference on CPU), and with the kernels forced (the interpreter) against a float64 copy."""
    T = pytest.importorskip("transformers")
    if not hasattr(T, "Siglip2VisionModel"):
        pytest.skip("this transformers has no SigLIP2")
    cfg = T.Siglip2VisionConfig(patch_size=8, hidden_size=64, num_attention_heads=2, num_hidden_layers=2,
                                intermediate_size=96, num_patches=16)
    torch.manual_seed(fresh_seed())
    model = _randomize(T.Siglip2VisionModel(cfg), scale=0.05).eval()
    B, L = 2, 16
    pix = torch.randn(B, L, 3 * 8 * 8, generator=torch.Generator().manual_seed(fresh_seed()))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 6:] = 0  # the second image: 2 x 3 patches, 10 of padding
    shapes = torch.tensor([[4, 4], [2, 3]])

    def call(m, x):
        return m(pixel_values=x, pixel_attention_mask=mask, spatial_shapes=shapes).last_hidden_state

    seen = _check_inference_patched(
        model, call, pix, lambda: model.flashvit_report.counts()["Siglip2Attention"] == 2 and calls["attention"] == 2,
        importlib.import_module("flashvit.kernels.attention"), "attention_fwd", lambda k: k.get("mask") is not None)
    assert seen is None or seen[:2] == [True, True], seen  # (then the MAP head's probe attention, unmasked)


def _hf_siglip_vision(**kw):
    transformers = pytest.importorskip("transformers")
    cfg = dict(image_size=32, patch_size=8, hidden_size=64, num_attention_heads=2, num_hidden_layers=1,
               intermediate_size=96)
    cfg.update(kw)
    torch.manual_seed(fresh_seed())
    return _randomize(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**cfg)), scale=0.05)


@needs_kernels
def test_hf_siglip_with_triton_forced_matches_float64():
    report = _check_forced_vs_float64(_hf_siglip_vision().train(), _images((32, 32)),
                                      lambda m, x: m(pixel_values=x).last_hidden_state)
    assert report.counts()["SiglipAttention"] == 1 and report.counts()["SiglipVisionEmbeddings"] == 1


@pytest.mark.gpu
def test_hf_siglip_patched_bf16_on_cuda():
    base = _hf_siglip_vision(image_size=64, patch_size=16, hidden_size=128, num_hidden_layers=2).train()
    x = _images((64, 64), batch=4, device="cuda")
    call = lambda m, x: m(pixel_values=x).last_hidden_state  # noqa: E731
    ref_out, ref_grads = _run(copy.deepcopy(base).cuda().double(), x.double(), call)
    eager_out, eager_grads = _run(copy.deepcopy(base).cuda().bfloat16(), x.bfloat16(), call)
    out, grads = _run(flashvit.patch(copy.deepcopy(base).cuda().bfloat16()), x.bfloat16(), call)
    _bf16_rule(out, ref_out, eager_out, 2, "hidden", atol=1e-3 * ref_out.abs().max().item())
    gscale = max(g.abs().max().item() for g in ref_grads.values())
    for n in ref_grads:
        _bf16_rule(grads[n], ref_grads[n], eager_grads[n], 3, n, atol=1e-3 * gscale)


def test_hf_encoder_with_an_unchecked_source_is_left(monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setitem(patch_mod._HF_ENCODER_CHECKED, "Attention", {"0" * 16})
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        image_size=16, patch_size=8, hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=48))
    report = flashvit.patch(model).flashvit_report
    assert "SiglipAttention" not in report.counts() and report.counts()["SiglipEncoderLayer"] == 1
    assert [c for _, c, w in report.left if "is not the source flashvit checked" in w] == ["SiglipAttention"], report


def test_hf_attention_function_is_registered_and_used():
    from transformers import AttentionInterface

    model = _hf_model().eval()
    flashvit.patch(model, layernorm=False, mlp=False, patch_embed=False, residual=False)
    assert model.config._attn_implementation == patch_mod.HF_ATTN_IMPLEMENTATION
    assert AttentionInterface._global_mapping[patch_mod.HF_ATTN_IMPLEMENTATION] is patch_mod._hf_flashvit_attention
    assert set(model.flashvit_report.counts()) == {"ViTAttention"}
    flashvit.unpatch(model)


@pytest.mark.parametrize("case", ["plain", "cross_length", "cross_length_masked", "causal_cross_length", "gqa"])
def test_hf_attention_function_routes_what_the_kernels_do_not_cover(case, calls, monkeypatch):
    """The registered attention function on (B, H, N, D): keys of another length run flashvit's attention (SegFormer's
    reduced sequence), with or without a mask; GQA (fewer key heads) and a causal cross-length call without a mask
    go to transformers' SDPA function. Every case equals transformers' SDPA function."""
    pytest.importorskip("transformers")
    from transformers.integrations import sdpa_attention as sdpa_mod

    B, H, D = 2, 4, 16
    nq, nkv, hkv = {"plain": (9, 9, H), "cross_length": (9, 5, H), "cross_length_masked": (9, 5, H),
                    "causal_cross_length": (9, 5, H), "gqa": (9, 9, 2)}[case]
    g = torch.Generator().manual_seed(fresh_seed())
    q = torch.randn(B, H, nq, D, generator=g)
    k, v = (torch.randn(B, hkv, nkv, D, generator=g) for _ in range(2))
    mask = torch.randn(B, 1, nq, nkv, generator=g) if case == "cross_length_masked" else None
    module = nn.Module()
    module.is_causal = case == "causal_cross_length"
    module.num_key_value_groups = H // hkv
    module.training = False
    sdpa_calls = []
    fn = sdpa_mod.sdpa_attention_forward
    monkeypatch.setattr(sdpa_mod, "sdpa_attention_forward", lambda *a, **k: sdpa_calls.append(1) or fn(*a, **k))
    out, _ = patch_mod._hf_flashvit_attention(module, q, k, v, mask, scaling=D ** -0.5)
    want, _ = fn(module, q, k, v, mask, scaling=D ** -0.5, is_causal=module.is_causal)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    ours = case in ("plain", "cross_length", "cross_length_masked")
    assert (calls.get("attention", 0), len(sdpa_calls)) == ((1, 0) if ours else (0, 1)), (calls, sdpa_calls)


def test_hf_unsupported_activation_is_left():
    model = _hf_model(hidden_act="relu")
    flashvit.patch(model)
    assert "ViTMLP" not in model.flashvit_report.counts()
    assert any("not exact/tanh GELU" in why for _, _, why in model.flashvit_report.left)
    flashvit.unpatch(model)


def _bf16_rule(out, ref, torch_out, factor, name, atol):
    err, torch_err = max_err(out, ref), max_err(torch_out, ref)
    assert err <= factor * torch_err + atol, f"{name}: {err:.3e} > {factor} x {torch_err:.3e} + {atol:.1e}"


@pytest.mark.gpu
@pytest.mark.parametrize("name,kw", [("vit_small_patch16_224", dict(img_size=64, depth=2, num_classes=10)),
                                     ("vit_small_patch16_224", dict(img_size=64, depth=2, qk_norm=True,
                                                                    init_values=0.1, num_classes=10)),
                                     ("vit_small_patch16_dinov3", dict(img_size=64, depth=2, num_classes=10)),
                                     ("beit_base_patch16_224", dict(img_size=64, depth=2, embed_dim=384, num_heads=6,
                                                                    use_shared_rel_pos_bias=True, num_classes=10)),
                                     *[(n, dict(img_size=64, window_size=4, depths=(2, 2), num_heads=(3, 6),
                                                num_classes=10, drop_path_rate=0.0))
                                       for n in ("swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256")],
                                     ("maxvit_pico_rw_256", dict(img_size=64, num_classes=10, drop_path_rate=0.0))])
def test_timm_patched_bf16_on_cuda(name, kw):
    torch.manual_seed(fresh_seed())
    base = _randomize(timm.create_model(name, pretrained=False, **kw), scale=0.05).train()
    _check_bf16_patched(base, _images((64, 64), batch=4, device="cuda"))


def _check_bf16_patched(base, x):
    """``base`` patched in bf16 on the GPU's kernels against a float64 copy, held to eager bf16's own error: logits
    and every gradient."""
    oracle = copy.deepcopy(base).cuda().double()
    ref_out, ref_grads = _run(oracle, x.double())
    eager = copy.deepcopy(base).cuda().bfloat16()
    eager_out, eager_grads = _run(eager, x.bfloat16())
    patched = flashvit.patch(copy.deepcopy(base).cuda().bfloat16())
    out, grads = _run(patched, x.bfloat16())
    _bf16_rule(out, ref_out, eager_out, 2, "logits", atol=1e-3 * ref_out.abs().max().item())
    # one atol for all grads: some are exactly zero in exact math (k_norm.bias), bf16 noise on both sides
    gscale = max(g.abs().max().item() for g in ref_grads.values())
    assert set(grads) == set(ref_grads)
    for n in ref_grads:
        _bf16_rule(grads[n], ref_grads[n], eager_grads[n], 3, n, atol=1e-3 * gscale)


@pytest.mark.gpu
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_torchvision_swin_patched_bf16_on_cuda(version):
    """torchvision's Swin patched, bf16 on the GPU's kernels (64 x 72 images: padded windows) against float64, held to
    eager bf16's own error: logits and every gradient."""
    torch.manual_seed(fresh_seed())
    _check_bf16_patched(_tv_swin(version).train(), _images((64, 72), batch=4, device="cuda"))


# ---------------------------------------------------------------------------------------------
# What a fused forward would bypass, and patched state across unpatch / pickling (found by fuzzing)

def _tiny_vit():
    torch.manual_seed(fresh_seed())
    return _randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8,
                                        embed_dim=32, depth=1, num_heads=2, num_classes=3)).eval()


@pytest.mark.parametrize("where", ["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.act", "patch_embed.proj",
                                   "blocks.0.ls1", "blocks.0.norm2"])
def test_hooks_inside_a_module_leave_it(where):
    """A forward hook anywhere inside a module whose fused forward would not call it (reads its weights, folds
    it, fuses its add + LayerNorm): that module is left, named in the report; the hook fires and the output is
    the unpatched one."""
    model = _tiny_vit()
    x = _images((16, 16))
    fired = []
    model.get_submodule(where).register_forward_hook(lambda m, i, o: fired.append(1) or o * 2)
    with torch.no_grad():
        ref = model(x)
        flashvit.patch(model)
        out = model(x)
    assert len(fired) == 2 and torch.equal(out, ref)
    inner = where.split(".", 2)[-1] if where.startswith("blocks") else "proj"
    assert any(why == f"has hooks registered on {inner} inside it" for _, _, why in model.flashvit_report.left), \
        model.flashvit_report.left


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 1.5


class _Adapter(nn.Module):  # a peft-style wrapper: base_layer + a low-rank update, weight/bias exposed
    def __init__(self, base):
        super().__init__()
        self.base_layer, self.down, self.up = base, nn.Linear(base.in_features, 2), nn.Linear(2, base.out_features)
        self.in_features, self.out_features = base.in_features, base.out_features

    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)

    def forward(self, x):
        return self.base_layer(x) + self.up(self.down(x))


@pytest.mark.parametrize("kind", ["subclass", "adapter"])
def test_layers_with_their_own_forward_are_not_fused_over(kind):
    """qkv / fc2 replaced by an nn.Linear subclass with its own forward (quantized, LoRA) or by a peft-style wrapper
    (base_layer + update, exposing weight): the attention / MLP / block around them are left, with the reason; the
    output is the unpatched one. Inside nn.Sequential subclasses with a forward of their own, linear_gelu fuses
    nothing."""
    model = _tiny_vit()
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    if kind == "subclass":
        q = _ScaledLinear(32, 96)
        q.load_state_dict(attn.qkv.state_dict())
        attn.qkv = q
    else:
        attn.qkv, mlp.fc2 = _Adapter(attn.qkv), _Adapter(mlp.fc2)
    x = _images((16, 16))
    with torch.no_grad():
        ref = model(x)
        flashvit.patch(model)
        out = model(x)
    assert torch.equal(out, ref)
    left = {path for path, _, _ in model.flashvit_report.left}
    assert {"blocks.0", "blocks.0.attn"} <= left and (kind == "subclass" or "blocks.0.mlp" in left), left

    class Skip(nn.Sequential):
        def forward(self, x):
            h = self[0](x)
            return self[1](h) + h

    seq = nn.Sequential(Skip(nn.Linear(8, 8), nn.GELU()))
    xs = torch.randn(3, 8)
    want = seq(xs)
    flashvit.patch(seq, linear_gelu=True)
    assert torch.equal(seq(xs), want) and not seq.flashvit_report.replaced


def test_unpatch_keeps_what_changed_while_patched():
    """set_input_size and load_state_dict(assign=True) on a patched model, then unpatch: the original modules hold
    the new sizes and parameters (outputs equal the patched model's); the training flag of modules the fused MLP
    did not hold follows too."""
    model = _tiny_vit()
    flashvit.patch(model)
    model.set_input_size(img_size=24)
    sd = {k: v + 0.01 for k, v in model.state_dict().items()}
    model.load_state_dict(sd, assign=True)
    x = _images((24, 24))
    with torch.no_grad():
        patched = model(x)
    model.train()
    flashvit.unpatch(model)
    assert model.patch_embed.img_size == (24, 24) and model.blocks[0].mlp.act.training
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), patched, atol=1e-5, rtol=1e-4)


def test_patched_model_pickles_and_deepcopies(tmp_path):
    """torch.save / torch.load of a whole patched model (its fused classes are made at run time) and
    copy.deepcopy: same outputs; the loaded copy unpatches to timm's classes."""
    model = _tiny_vit()
    flashvit.patch(model)
    x = _images((16, 16))
    with torch.no_grad():
        want = model(x)
    torch.save(model, tmp_path / "m.pt")
    for m in (torch.load(tmp_path / "m.pt", weights_only=False), copy.deepcopy(model)):
        with torch.no_grad():
            assert torch.equal(m(x), want)
        assert type(m.blocks[0]).__name__ == "FlashvitBlock"
        flashvit.unpatch(m)
        assert type(m.blocks[0]) is type(timm.create_model("vit_tiny_patch16_224", pretrained=False,
                                                           depth=1).blocks[0])
        with torch.no_grad():
            torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-4)


def test_hf_output_attentions_returns_the_maps():
    """transformers' ViT with output_attentions=True, patched: the attention maps come back (transformers' eager
    math runs for them) with the unpatched model's values, and the hidden states match."""
    model = _hf_model("ViTModel", attn_implementation="eager").eval()
    x = _images((32, 32))
    with torch.no_grad():
        ref = model(pixel_values=x, output_attentions=True)
        flashvit.patch(model)
        out = model(pixel_values=x, output_attentions=True)
    assert len(out.attentions) == len(ref.attentions) > 0
    for a, b in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-4)


def test_hf_dinov3_without_registers_keeps_them_in_the_graph():
    """DINOv3 with num_register_tokens=0: the (1, 0, D) register Parameter still gets its (empty) gradient, as
    unpatched (else DDP without find_unused_parameters would count it unused)."""
    model = _hf_dinov3(False, num_register_tokens=0).train()
    flashvit.patch(model)
    model(pixel_values=_images((32, 32))).last_hidden_state.sum().backward()
    g = model.embeddings.register_tokens.grad
    assert g is not None and g.shape == model.embeddings.register_tokens.shape

"""The reference ViT: shapes, timm parity, presets, bad inputs, a few training steps, no-triton import."""

import subprocess
import sys
import textwrap
import time

import pytest
import torch

import flashvit
from flashvit.vit.model import MODEL_CONFIGS

timm = pytest.importorskip("timm")

SMALL = dict(img_size=32, num_classes=7)
# Where backend='triton' can run: a GPU, else CPU tensors through the interpreter (None: neither).
KERNEL_DEV = "cuda" if torch.cuda.is_available() else "cpu" if flashvit.kernels.INTERPRET else None


def _timm_pair(name, **kw):
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, **kw).eval()
    ours = flashvit.create_model(name, **kw).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("name,kw", [
    ("vit_tiny_patch16_224", {}),
    ("vit_small_patch16_224", SMALL),
    ("deit_tiny_patch16_224", SMALL),
    ("vit_base_patch16_reg4_gap_256", dict(img_size=64, embed_dim=96, depth=2, num_heads=4, num_classes=5)),
    ("vit_tiny_patch16_224", dict(img_size=(32, 48), in_chans=1, patch_size=8, num_classes=3)),
    ("vit_small_patch14_dinov2", dict(img_size=28, depth=2)),  # LayerScale (init_values=1e-5), no head
    ("vit_small_patch14_reg4_dinov2", dict(img_size=42, depth=2, num_classes=4)),
])
def test_timm_state_dict_loads_strictly_and_logits_match(name, kw):
    ours, ref = _timm_pair(name, **kw)
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, ref.patch_embed.proj.in_channels, *ref.patch_embed.img_size)
    with torch.no_grad(), flashvit.use_backend("torch"):
        a, b = ours(x), ref(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_forward_backward_shapes_and_grads():
    m = flashvit.create_model("vit_mnist", drop_path_rate=0.1, attn_drop_rate=0.1, drop_rate=0.1)
    x = torch.randn(3, 1, 28, 28)
    out = m(x)
    assert out.shape == (3, 10)
    out.sum().backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no grad for {missing}"


def test_presets_cover_the_paper_sizes():
    for size in ("tiny", "small", "base", "large", "huge"):
        for p in (14, 16, 32):
            assert f"vit_{size}_patch{p}_224" in MODEL_CONFIGS
    with torch.device("meta"):
        m = flashvit.create_model("vit_base_patch16_224")
    assert sum(p.numel() for p in m.parameters()) == 86_567_656  # ViT-B/16, 1000 classes (timm's count)


def test_sinusoidal_position_embedding_is_fixed():
    m = flashvit.create_model("vit_mnist", pos_embed_learnable=False)
    assert not m.pos_embed.requires_grad
    pe = m.pos_embed[0]
    assert torch.allclose(pe[0, 1::2], torch.ones(16)) and torch.allclose(pe[0, 0::2], torch.zeros(16))


@pytest.mark.parametrize("bad,err", [
    (torch.randn(2, 3, 28, 28), "expected 1 input channels, got 3"),
    (torch.randn(2, 1, 30, 30), "expected image size (28, 28), got (30, 30)"),
    (torch.zeros(2, 1, 28, 28, dtype=torch.int64), "floating-point"),
    (torch.randn(1, 28, 28), "expected images of shape (B, 1, H, W)"),
])
def test_bad_inputs_name_the_expected_value(bad, err):
    m = flashvit.create_model("vit_mnist")
    with pytest.raises((ValueError, TypeError), match=__import__("re").escape(err)):
        m(bad)


def test_bad_construction():
    with pytest.raises(ValueError, match="divisible by patch_size 16"):
        flashvit.create_model("vit_tiny_patch16_224", img_size=40)
    with pytest.raises(ValueError, match="unknown model 'vit_nope'"):
        flashvit.create_model("vit_nope")
    with pytest.raises(ValueError, match="downloads nothing"):
        flashvit.create_model("vit_tiny_patch16_224", pretrained=True)


def test_seed_preset_loss_falls():
    torch.manual_seed(0)
    m = flashvit.create_model("vit_mnist")
    x = torch.randn(64, 1, 28, 28)
    y = torch.randint(0, 10, (64,))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_import_and_build_without_triton():
    code = textwrap.dedent("""
        import sys
        sys.modules['triton'] = None  # make `import triton` fail
        import torch, flashvit
        assert not flashvit.HAS_TRITON
        m = flashvit.create_model('vit_base_patch16_224', img_size=32, depth=1)
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
        print('ok')
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_eager_cpu_not_slower_than_timm():
    """Our eager path (reference ops) vs timm's eager model, same config, one process."""
    kw = dict(img_size=64, num_classes=10)
    ours, ref = _timm_pair("vit_small_patch16_224", **kw)
    ours.train()
    ref.train()
    x = torch.randn(8, 3, 64, 64)

    def step(m):
        m.zero_grad(set_to_none=True)
        m(x).sum().backward()

    def best(n=7):  # (timm, ours): each one's fastest step, taken in turns so both see the same load
        ts = {ref: [], ours: []}
        for i in range(n + 1):
            for m in (ref, ours):
                t0 = time.perf_counter()
                step(m)
                if i:  # the first round warms up
                    ts[m].append(time.perf_counter() - t0)
        return min(ts[ref]), min(ts[ours])

    with flashvit.use_backend("torch"):
        t_ref, t_ours = best()
        if t_ours > 1.15 * t_ref:  # one retry against noise on a busy 2-core box (the other xdist worker)
            t_ref, t_ours = best()
    assert t_ours <= 1.15 * t_ref, f"ours {t_ours * 1e3:.1f} ms vs timm {t_ref * 1e3:.1f} ms"


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_grad_checkpointing_same_gradients_and_blocks_run_twice(backend):
    """set_grad_checkpointing (timm's API): the blocks' forwards run again in the backward (torch's RNG
    restored: attention dropout and drop-path repeat their masks), gradients as without; triton: the fused ops'
    autograd Functions under the checkpoint's saved-tensor hooks (a GPU, or the interpreter)."""
    if backend == "triton" and KERNEL_DEV is None:
        pytest.skip("the kernels need a GPU or, on CPU tensors, the Triton interpreter")
    dev = KERNEL_DEV if backend == "triton" else "cpu"
    torch.manual_seed(0)
    model = flashvit.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=2,
                                  num_heads=2, num_classes=3, attn_drop_rate=0.2, drop_path_rate=0.3).to(dev).train()
    x = torch.randn(2, 3, 16, 16, device=dev)
    calls = []
    for blk in model.blocks:
        blk.register_forward_pre_hook(lambda m, a: calls.append(m))

    def run():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        out = model(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with flashvit.use_backend(backend):
        out, grads = run()
        assert len(calls) == 2
        model.set_grad_checkpointing(True)
        ck_out, ck_grads = run()
    assert len(calls) == 2 + 4  # each block again in the backward
    assert torch.equal(out, ck_out) and set(grads) == set(ck_grads)
    for n in grads:
        torch.testing.assert_close(ck_grads[n], grads[n], atol=1e-6, rtol=1e-5, msg=n)
    with torch.no_grad():
        model(x)  # no autograd: no checkpoint, one forward a block
    assert len(calls) == 8


@pytest.mark.parametrize("name,kw", [
    ("vit_tiny_patch16_224", dict(img_size=32, depth=4, num_classes=5)),
    ("vit_base_patch16_reg4_gap_256", dict(img_size=64, embed_dim=96, depth=3, num_heads=4, num_classes=5)),
])
@pytest.mark.parametrize("args", [
    dict(), dict(indices=2), dict(indices=[0, -1], norm=True), dict(indices=[1], stop_early=True,
                                                                      intermediates_only=True),
    dict(output_fmt="NLC", return_prefix_tokens=True), dict(indices=1, return_prefix_tokens=True, norm=True),
])
def test_forward_intermediates_matches_timm(name, kw, args):
    """timm's feature API on the same weights: the same blocks' outputs, shapes, prefix tokens and final norm."""
    ours, ref = _timm_pair(name, **kw)
    x = torch.randn(2, 3, *ref.patch_embed.img_size)
    with torch.no_grad(), flashvit.use_backend("torch"):
        got, want = ours.forward_intermediates(x, **args), ref.forward_intermediates(x, **args)
    if not args.get("intermediates_only"):
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)
        got, want = got[1], want[1]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        for u, v in zip(*((a, b) if isinstance(a, tuple) else ((a,), (b,)))):
            assert u.shape == v.shape
            torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,kw", [
    ("vit_tiny_patch16_224", dict(img_size=32, depth=2, num_classes=5)),
    ("vit_base_patch16_reg4_gap_256", dict(img_size=64, embed_dim=96, depth=2, num_heads=4, num_classes=5)),
])
def test_dynamic_img_size_matches_timm(name, kw):
    """dynamic_img_size=True (timm's option): other image sizes run, pos_embed resampled to their grid (bicubic,
    prefix rows kept; register tokens and no_embed_class too) as timm does, logits and intermediates; sizes
    that are no multiple of the patch size, or any other size without the option, raise."""
    ours, ref = _timm_pair(name, dynamic_img_size=True, **kw)
    s = ref.patch_embed.img_size[0]
    for hw in ((s, s), (s + 16, s - 16), (3 * s // 2, 2 * s)):
        x = torch.randn(2, 3, *hw)
        with torch.no_grad(), flashvit.use_backend("torch"):
            a, b = ours(x), ref(x)
            fa, fb = ours.forward_intermediates(x, indices=1), ref.forward_intermediates(x, indices=1)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
        torch.testing.assert_close(fa[1][0], fb[1][0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ours(torch.randn(1, 3, s + 8, s))
    fixed = flashvit.create_model(name, **kw)
    with pytest.raises(ValueError, match="dynamic_img_size=True takes others"):
        fixed(torch.randn(1, 3, s + 16, s))


def test_dynamic_img_size_on_the_kernels():
    """The kernels (a GPU, or the interpreter) at another image size: the resampled pos_embed feeds the fused
    patch embedding, and its gradient flows back through the resampling to the parameter."""
    if KERNEL_DEV is None:
        pytest.skip("the kernels need a GPU or, on CPU tensors, the Triton interpreter")
    torch.manual_seed(0)
    model = flashvit.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=1,
                                  num_heads=2, num_classes=3, dynamic_img_size=True).to(KERNEL_DEV)
    x = torch.randn(2, 3, 24, 32, device=KERNEL_DEV)
    grads = []
    for backend in ("torch", "triton"):
        model.zero_grad(set_to_none=True)
        with flashvit.use_backend(backend):
            out = model(x)
        out.square().sum().backward()
        grads.append((out.detach(), model.pos_embed.grad.clone(), model.patch_embed.proj.weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-4 * a.abs().max().item(), rtol=1e-4)


def test_layer_scale_on_the_kernels_matches_timm():
    """LayerScale (init_values) on the kernels: γ folded into the proj and fc2 GEMMs. Logits and every gradient,
    the γs' included, vs timm's model (x * γ after each branch) on the same weights in float64."""
    if KERNEL_DEV is None:
        pytest.skip("the kernels need a GPU or, on CPU tensors, the Triton interpreter")
    kw = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3, init_values=0.5)
    ours, ref = _timm_pair("vit_tiny_patch16_224", **kw)
    with torch.no_grad():
        for name, p in ref.named_parameters():  # γ away from its constant init, both signs
            if name.endswith("gamma"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    ours.load_state_dict(ref.state_dict())
    ours, ref = ours.to(KERNEL_DEV).train(), ref.double().train()
    x = torch.randn(2, 3, 16, 16)
    results = []
    for model, inp, backend in ((ours, x.to(KERNEL_DEV), "triton"), (ref, x.double(), "torch")):
        with flashvit.use_backend(backend):
            out = model(inp)
        out.square().sum().backward()
        results.append((out.detach().double().cpu(),
                        {n: p.grad.double().cpu() for n, p in model.named_parameters()}))
    (out, grads), (ref_out, ref_grads) = results
    torch.testing.assert_close(out, ref_out, atol=1e-4 * ref_out.abs().max().item(), rtol=1e-4)
    assert set(grads) == set(ref_grads) and any(n.endswith("ls1.gamma") for n in grads)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, atol=1e-4 * scale, rtol=1e-4, msg=n)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stochastic_depth_drops_the_samples_timm_drops(backend, monkeypatch):
    """Training with drop path on timm's weights: each block draws its factor per sample as timm's DropPath
    draws its mask, so under one seed the same samples drop; logits and every gradient equal timm's (float64).
    The attention branch's factor runs inside the add + LayerNorm pass (triton: the kernel, on a GPU or in the
    interpreter), the MLP branch's in one addcmul with the residual."""
    if backend == "triton" and KERNEL_DEV is None:
        pytest.skip("the kernels need a GPU or, on CPU tensors, the Triton interpreter")
    dev = KERNEL_DEV if backend == "triton" else "cpu"
    model_mod = sys.modules["flashvit.vit.model"]
    drawn = []
    draw = model_mod.drop_path_scale
    monkeypatch.setattr(model_mod, "drop_path_scale", lambda x, p: drawn.append(draw(x, p)) or drawn[-1])
    kw = dict(img_size=16, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=3, drop_path_rate=0.6)
    ours, ref = _timm_pair("vit_tiny_patch16_224", **kw)
    ours, ref = ours.to(dev).train(), ref.double().train()
    x = torch.randn(6, 3, 16, 16)
    results = []
    for model, inp, be in ((ours, x.to(dev), backend), (ref, x.double(), "torch")):
        torch.manual_seed(11)
        with flashvit.use_backend(be):
            out = model(inp)
        out.square().sum().backward()
        results.append((out.detach().double().cpu(), {n: p.grad.double().cpu() for n, p in model.named_parameters()}))
    # blocks 1 and 2 (rates 0.3, 0.6; block 0's is 0): two factors each, some samples dropped, some kept
    assert len(drawn) == 4
    drawn = torch.cat(drawn)
    assert (drawn == 0).any() and (drawn > 1).any()
    (out, grads), (ref_out, ref_grads) = results
    torch.testing.assert_close(out, ref_out, atol=1e-4 * ref_out.abs().max().item(), rtol=1e-4)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, atol=1e-4 * scale, rtol=1e-4, msg=n)


@pytest.mark.parametrize("name,src,dst", [
    ("vit_small_patch14_dinov2", dict(img_size=56), dict(img_size=42, num_classes=5)),  # no head -> a new one
    ("vit_small_patch14_reg4_dinov2", dict(img_size=28), dict(img_size=70)),  # registers, no_embed_class
    ("vit_tiny_patch16_224", dict(img_size=64, num_classes=7), dict(img_size=48, num_classes=0)),  # head dropped
])
def test_load_timm_state_dict_resamples_pos_embed_and_leaves_the_head(name, src, dst):
    """A timm checkpoint at another image size / class count: pos_embed resampled as timm's own pretrained
    loading does (checkpoint_filter_fn), the head left as built; features equal timm's model loaded timm's way."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    kw = dict(depth=2)
    torch.manual_seed(0)
    src_model = timm.create_model(name, pretrained=False, **kw, **src)
    sd = {k: v + 0.02 * torch.randn_like(v) for k, v in src_model.state_dict().items()}  # γ, pos_embed off init
    ours = flashvit.create_model(name, **kw, **dst).eval()
    head_before = {k: v.clone() for k, v in ours.state_dict().items() if k.startswith("head.")}
    result = ours.load_timm_state_dict(sd)
    assert all(k.startswith("head.") for k in result.missing_keys) and not result.unexpected_keys
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in head_before.items())
    ref = timm.create_model(name, pretrained=False, **kw, **dst).eval()
    filtered = checkpoint_filter_fn(sd, ref)
    filtered = {k: v for k, v in filtered.items() if not k.startswith("head.")}
    ref.load_state_dict(filtered, strict=False)
    torch.testing.assert_close(ours.pos_embed, ref.pos_embed, atol=1e-6, rtol=1e-5)
    x = torch.randn(2, 3, *ours.patch_embed.img_size)
    with torch.no_grad(), flashvit.use_backend("torch"):
        a, b = ours.forward_features(x), ref.forward_features(x)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="does not fit"):
        ours.load_timm_state_dict({k: v for k, v in sd.items() if k != "norm.weight"})


def test_forward_intermediates_bad_arguments():
    model = flashvit.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2)
    x = torch.randn(1, 3, 16, 16)
    for bad, msg in ((dict(indices=3), "1 <= n <= 2"), (dict(indices=[2]), "out of range"),
                     (dict(indices=[]), "out of range"), (dict(output_fmt="NHWC"), "output_fmt")):
        with pytest.raises(ValueError, match=msg):
            model.forward_intermediates(x, **bad)


def test_reset_classifier_like_timm():
    model = flashvit.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1, num_classes=5)
    assert model.get_classifier() is model.head and model.head.out_features == 5
    model.reset_classifier(7)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7) and model.num_classes == 7
    model.reset_classifier(0, global_pool="avg")
    assert isinstance(model.head, torch.nn.Identity) and model(torch.randn(2, 3, 16, 16)).shape == (2, 192)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="max")
    regs = flashvit.create_model("vit_tiny_patch16_reg4_gap_256", img_size=32, depth=1)
    with pytest.raises(ValueError, match="class_token"):
        regs.reset_classifier(3, global_pool="token")


def test_capture_cuda_graph_refuses_clearly():
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        flashvit.capture_cuda_graph(lambda: None, warmup=0)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            flashvit.capture_cuda_graph(lambda: None)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_training_step_in_a_cuda_graph_gpu(backend):
    """A whole training step of our ViT (patch embedding, LayerNorms, attention, MLPs, loss, SGD step) captured
    in one CUDA graph: no op syncs with the host or bakes a host-side value into the capture. A replay gives the
    eager step's loss and gradients; with attention dropout, each replay draws new masks."""
    torch.manual_seed(0)
    model = flashvit.create_model("vit_small_patch16_224", img_size=64, depth=2, num_classes=10)
    model = model.cuda().bfloat16().train()
    x = torch.randn(8, 3, 64, 64, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, 10, (8,), device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step starts from the same weights

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        return loss

    with flashvit.use_backend(backend):
        eager_loss = step().item()
        eager = {n: p.grad.float().clone() for n, p in model.named_parameters()}
        graph, loss = flashvit.capture_cuda_graph(step)
        graph.replay()
        torch.testing.assert_close(loss.item(), eager_loss, atol=1e-3, rtol=1e-3)
        for n, p in model.named_parameters():
            scale = eager[n].abs().max().item()
            torch.testing.assert_close(p.grad.float(), eager[n], atol=2e-2 * scale + 1e-6, rtol=2e-2, msg=n)
        for m in model.modules():
            if isinstance(m, flashvit.vit.model.Attention):
                m.attn_drop.p = 0.2
        graph, loss = flashvit.capture_cuda_graph(step)
        losses = set()
        for _ in range(3):
            graph.replay()
            losses.add(loss.item())
    assert len(losses) == 3, f"replays drew the same dropout masks: losses {losses}"

"""Fused patch embedding: forward and every gradient vs the float64 eager reference, in the Triton
interpreter on CPU (fp32/fp16) and on CUDA (bf16, ViT-B/16 and ViT-H/14 shapes)."""

import contextlib
import importlib

import pytest
import torch

from flashvit.kernels._aot import jit_function
from tests.helpers import assert_close_to_ref, max_err, poison, randn

pe = importlib.import_module("flashvit.kernels.patch_embed")

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
NAMES = ("images", "weight", "bias", "pos_embed", "cls_token", "reg_tokens")


@contextlib.contextmanager
def poisoned_alloc():
    """Every torch.empty / empty_like made inside (outputs, dW partials, d images) starts as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def p_empty(*a, **k):
        t = empty(*a, **k)
        return poison(t) if t.is_floating_point() else t

    def p_empty_like(*a, **k):
        t = empty_like(*a, **k)
        return poison(t) if t.is_floating_point() else t

    torch.empty, torch.empty_like = p_empty, p_empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


@contextlib.contextmanager
def kernels_only(monkeypatch):
    """Fail if the reference path runs; count the launchers that do."""
    calls = {}

    def spy(name):
        fn = getattr(pe, name)

        def wrapped(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return fn(*a, **k)
        monkeypatch.setattr(pe, name, wrapped)

    for n in ("patch_embed_fwd", "patch_embed_bwd_weight", "patch_embed_bwd_images", "patch_embed_bwd_tokens"):
        spy(n)

    def no_reference(*a, **k):
        raise AssertionError("the reference path ran instead of the Triton kernels")
    monkeypatch.setattr(pe, "patch_embed_reference", no_reference)
    yield calls
    monkeypatch.undo()


def make_inputs(B, C, H, W, p, D, ncls=1, nreg=0, no_embed_class=False, dtype=torch.float32, device=DEV,
                channels_last=False, bias=True, pos=True, pdtype=None):
    pdtype = pdtype or dtype
    L = (H // p) * (W // p)
    img = randn(B, C, H, W, dtype=dtype, device=device)
    if channels_last:
        img = img.to(memory_format=torch.channels_last)
    w = randn(D, C, p, p, dtype=pdtype, device=device, scale=(C * p * p) ** -0.5)
    b = randn(D, dtype=pdtype, device=device) if bias else None
    T = L if no_embed_class else L + ncls + nreg
    pe_ = randn(1, T, D, dtype=pdtype, device=device) if pos else None
    cls = randn(1, 1, D, dtype=pdtype, device=device) if ncls else None
    reg = randn(1, nreg, D, dtype=pdtype, device=device) if nreg else None
    return [img, w, b, pe_, cls, reg]


def run(inputs, no_embed_class, backend, grad_out=None, want=None):
    """Forward (+ backward with grad_out) of patch_embed; returns (out, {name: grad})."""
    leaves = [None if t is None else t.detach() for t in inputs]  # same strides (sliced, channels_last)
    want = want if want is not None else [t is not None for t in leaves]
    for t, w in zip(leaves, want):
        if t is not None and w:
            t.requires_grad_(True)
    out = pe.patch_embed(*leaves, no_embed_class, backend=backend) if backend != "ref" else \
        pe.patch_embed_reference(*leaves, no_embed_class)
    grads = {}
    if grad_out is not None:
        out.backward(grad_out.to(out.dtype))
        grads = {n: t.grad for n, t in zip(NAMES, leaves) if t is not None and t.requires_grad}
    return out.detach(), grads


def low_precision_rule(out, ref64, out_torch, factor, name):
    """House rule for a result computed from fp16/bf16 images (stored in fp32 when the params are fp32)."""
    atol = 1e-3 * max(ref64.abs().max().item(), 1.0)
    if out.dtype in (torch.float16, torch.bfloat16):
        assert_close_to_ref(out, ref64, out_torch, factor=factor, atol=atol, name=name)
        return
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    err, torch_err = max_err(out, ref64), max_err(out_torch, ref64)
    assert err <= factor * torch_err + atol, f"{name}: max error {err:.3e} > {factor} x PyTorch's {torch_err:.3e}"


def check_against_reference(inputs, no_embed_class, monkeypatch, want=None):
    dtype = inputs[0].dtype
    ref_in = [None if t is None else t.detach().double() for t in inputs]
    ref_out, _ = run(ref_in, no_embed_class, "ref")
    g = randn(*ref_out.shape, dtype=torch.float64, device=inputs[0].device)
    ref_out, ref_g = run(ref_in, no_embed_class, "ref", g, want)
    with kernels_only(monkeypatch) as calls, poisoned_alloc():
        out, grads = run(inputs, no_embed_class, "triton", g, want)
    assert calls.get("patch_embed_fwd") == 1 and calls.get("patch_embed_bwd_tokens", 0) <= 1
    expect_dtype = torch.promote_types(dtype, inputs[3].dtype) if inputs[3] is not None else dtype
    assert out.dtype == expect_dtype
    if dtype == torch.float32:
        assert_close_to_ref(out, ref_out, atol=1e-4, rtol=1e-4, name="out")
        for n, gr in grads.items():
            scale = ref_g[n].abs().max().item()
            assert_close_to_ref(gr, ref_g[n], atol=1e-5 * scale + 1e-6, rtol=1e-4, name=f"d {n}")
    else:
        torch_out, torch_g = run(inputs, no_embed_class, "ref", g, want)
        low_precision_rule(out, ref_out, torch_out, 2.0, "out")
        for n, gr in grads.items():
            assert gr.dtype == inputs[NAMES.index(n)].dtype
            low_precision_rule(gr, ref_g[n], torch_g[n], 3.0, f"d {n}")
    assert set(grads) == set(ref_g)
    return calls


# (C, H, W, p) from the issue, each with its own batch, width, prefix tokens and layout.
CASES = [
    # C, H,   W,   p,  B, D,  ncls, nreg, no_embed_class, channels_last
    (1, 28, 28, 4, 3, 16, 1, 0, False, False),
    (3, 32, 32, 8, 3, 48, 1, 4, False, True),
    (3, 224, 224, 16, 1, 16, 1, 0, False, False),
    (3, 224, 224, 14, 1, 32, 0, 4, True, False),
    (3, 64, 96, 16, 3, 40, 0, 0, False, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[f"C{c[0]}_{c[1]}x{c[2]}_p{c[3]}_B{c[4]}" for c in CASES])
def test_forward_and_grads_vs_float64(case, dtype, monkeypatch):
    C, H, W, p, B, D, ncls, nreg, nec, cl = case
    inputs = make_inputs(B, C, H, W, p, D, ncls, nreg, nec, dtype, channels_last=cl)
    calls = check_against_reference(inputs, nec, monkeypatch)
    assert calls.get("patch_embed_bwd_images") == 1 and calls.get("patch_embed_bwd_weight") == 1


# Every autotune config of the three GEMM-shaped kernels, and the fp32 fixed ones, in the interpreter with
# the memory checker on (a GPU may pick any of them; the interpreter otherwise runs one big-tile config).
_PE_CONFIGS = list(zip(pe._FWD_CONFIGS, pe._DW_CONFIGS, pe._DX_CONFIGS)) + [
    (pe._FP32_CONFIGS["fwd"], pe._FP32_CONFIGS["dw"], pe._FP32_CONFIGS["dx"])]


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="sets the interpreter's configs; on a GPU test_gpu_every_tile_config runs each one")
@pytest.mark.parametrize("cfgs", _PE_CONFIGS, ids=lambda c: "_".join("x".join(map(str, k[:3])) for k in c))
def test_every_tile_config(cfgs, monkeypatch):
    fwd, dw, dx = cfgs
    monkeypatch.setattr(pe, "_INTERPRET_FWD", dict(BM=fwd[0], BN=fwd[1], BK=fwd[2]))
    monkeypatch.setattr(pe, "_INTERPRET_DW", dict(BM=dw[0], BN=dw[1], BK=dw[2]))
    monkeypatch.setattr(pe, "_INTERPRET_DX", dict(BM=dx[0], BK=dx[1], BD=dx[2]))
    for dtype in (torch.float32, torch.float16):  # D = 72 and 3·10·10 = 300 patch pixels: no tile divides them
        inputs = make_inputs(2, 3, 40, 30, 10, 72, ncls=1, nreg=1, dtype=dtype)
        check_against_reference(inputs, False, monkeypatch)


@pytest.mark.parametrize("variant", ["cls_reg_no_embed_class", "no_bias_no_pos", "pos_only_prefix",
                                     "frozen_images", "fp16_images_fp32_params", "sliced_images", "odd_patch"])
def test_variants(variant, monkeypatch):
    C, H, W, p, B, D = 2, 24, 40, 8, 2, 24
    if variant == "odd_patch":
        C, H, W, p = 3, 15, 25, 5
    kw = dict(ncls=1, nreg=2)
    nec, want = False, None
    if variant == "cls_reg_no_embed_class":
        nec = True
    elif variant == "no_bias_no_pos":
        kw.update(bias=False, pos=False)
    elif variant == "pos_only_prefix":
        kw.update(ncls=0, nreg=3)
    elif variant == "frozen_images":
        want = [False, True, False, True, True, False]
    elif variant == "fp16_images_fp32_params":
        kw.update(dtype=torch.float16, pdtype=torch.float32)
    inputs = make_inputs(B, C, H, W, p, D, no_embed_class=nec, **kw)
    if variant == "sliced_images":  # non-contiguous view: every other row and column of a bigger image
        inputs[0] = randn(B, C + 1, 2 * H, 2 * W)[:, 1:, ::2, ::2]
        assert not inputs[0].is_contiguous()
    calls = check_against_reference(inputs, nec, monkeypatch, want)
    if variant == "frozen_images":
        assert "patch_embed_bwd_images" not in calls  # d images only when images require grad


def test_vector_hint_choice():
    """VEC (contiguous, aligned pixel runs the kernels promise the compiler) only where it is true."""
    img = randn(2, 3, 224, 224, dtype=torch.float16)
    assert pe._vec(img, 16) == 8 and pe._vec(img, 8) == 8 and pe._vec(img, 14) == 2
    assert pe._vec(randn(2, 3, 28, 28, dtype=torch.float16), 4) == 2
    assert pe._vec(randn(2, 3, 35, 35, dtype=torch.float16), 5) == 1  # odd p
    assert pe._vec(img.to(memory_format=torch.channels_last), 16) == 1
    assert pe._vec(img.float(), 16) == 1  # fp32 loads stay scalar (FMA dots)
    assert pe._vec(randn(2, 3, 224, 226, dtype=torch.float16)[..., 1:225], 16) == 1  # storage offset 1
    assert pe._vec(randn(2, 3, 224, 228, dtype=torch.float16)[..., 2:226], 14) == 2  # 4-byte aligned
    assert pe._vec(randn(2, 3, 224, 228, dtype=torch.float16)[..., 1:225], 14) == 1
    K, KP = 3 * 14 * 14, pe._padded_k(3 * 14 * 14)
    offs = pe._patch_offsets(img, 14)
    assert KP % 128 == 0 and offs.shape == (KP,)
    c, i, j = 2, 13, 11
    assert offs[c * 196 + i * 14 + j] == c * 224 * 224 + i * 224 + j
    assert int(offs[K:].max()) < 3 * 224 * 224  # the pad reads real pixels of the patch (zero weights)


def test_split_dw_is_deterministic(monkeypatch):
    """dW summed over several row chunks (fixed order, no atomics): correct and bit-identical run to run."""
    monkeypatch.setattr(pe, "DW_ROWS_PER_SPLIT", 40)  # 3 * 48 patch rows -> 4 chunks, last one partial
    inputs = make_inputs(3, 3, 48, 64, 8, 24, 1, 1)
    check_against_reference(inputs, False, monkeypatch)
    monkeypatch.setattr(pe, "DW_ROWS_PER_SPLIT", 40)
    g = randn(3, 2 + 48, 24)
    runs = [run(inputs, False, "triton", g)[1] for _ in range(3)]
    for r in runs[1:]:
        for n in r:
            assert torch.equal(r[n], runs[0][n]), n


def test_module_and_dynamic_img_size():
    torch.manual_seed(0)
    m = pe.PatchEmbed((32, 32), 8, 3, 24, dynamic_img_size=True).to(DEV)
    pos = randn(1, 1 + 16, 24)
    cls = randn(1, 1, 24)
    x = randn(2, 3, 40, 48)  # 5 x 6 grid: pos_embed resampled from 4 x 4
    out = m(x, pos, cls)
    assert out.shape == (2, 1 + 30, 24)
    want = pe.patch_embed_reference(x, m.proj.weight, m.proj.bias, pe.resample_pos_embed(pos, (5, 6), (4, 4)), cls)
    torch.testing.assert_close(out, want)
    assert pe.PatchEmbed((32, 32), 8, 3, 24).to(DEV)(randn(1, 3, 32, 32)).shape == (1, 16, 24)


def test_resample_pos_embed_matches_timm():
    timm_layers = pytest.importorskip("timm.layers")
    pos = randn(1, 1 + 49, 16)
    ours = pe.resample_pos_embed(pos, (5, 9), num_prefix_tokens=1)
    theirs = timm_layers.resample_abs_pos_embed(pos, (5, 9), num_prefix_tokens=1)
    torch.testing.assert_close(ours, theirs)
    assert pe.resample_pos_embed(pos, (7, 7)) is pos
    with pytest.raises(ValueError, match="not a square grid"):
        pe.resample_pos_embed(randn(1, 1 + 12, 16), (4, 4))


def test_torch_compile_fullgraph():
    inputs = make_inputs(1, 3, 16, 16, 8, 16, 1, 0)

    def f(*a):
        return pe.patch_embed(*a, backend="triton") * 2

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(*inputs)
    torch.testing.assert_close(out, 2 * pe.patch_embed_reference(*inputs), atol=1e-4, rtol=1e-4)


def test_bad_inputs():
    img, w, b, pos, cls, _ = make_inputs(1, 3, 32, 32, 8, 16, 1, 0)
    with pytest.raises(ValueError, match="divisible by the patch size 8"):
        pe.patch_embed(img[:, :, :30], w, b, None, backend="triton")
    with pytest.raises(ValueError, match="expected 3"):
        pe.patch_embed(img[:, :2], w, b, pos, cls, backend="triton")
    with pytest.raises(ValueError, match=r"expected \(1, 17, 16\)"):
        pe.patch_embed(img, w, b, pos[:, :-1], cls, backend="triton")
    with pytest.raises(ValueError, match=r"expected \(1, 16, 16\)"):
        pe.patch_embed(img, w, b, pos, cls, no_embed_class=True, backend="triton")
    with pytest.raises(ValueError, match=r"expected \(16,\)"):
        pe.patch_embed(img, w, b[:-1], pos, cls, backend="triton")
    with pytest.raises(ValueError, match=r"expected \(1, n, 16\)"):
        pe.patch_embed(img, w, b, pos, cls[..., :8], backend="triton")
    with pytest.raises(ValueError, match="square patch"):
        pe.patch_embed(img, w[..., :4], b, pos, cls, backend="triton")
    with pytest.raises(ValueError, match="4 dimensions"):
        pe.patch_embed(img[0], w, b, pos, cls, backend="triton")
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        pe.patch_embed(img.double(), w.double(), None, None, backend="triton")
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        pe.patch_embed(img.cpu().numpy(), w, b, pos, cls)


def test_aot_specs_cover_every_kernel_and_config():
    if not pe.HAS_TRITON:
        pytest.skip("triton is not importable")
    names = {jit_function(s.kernel).__name__ for s in pe.AOT_SPECS}
    assert names == {"_pe_fwd_kernel", "_pe_bwd_dw_kernel", "_pe_bwd_dx_kernel", "_pe_bwd_tokens_kernel"}
    n32 = sum(x == torch.float32 for x, _ in pe._DTYPE_COMBOS)  # one fixed config per kernel, VEC 1
    n16 = len(pe._DTYPE_COMBOS) - n32  # the autotune sets, VEC 1, 2 and 8 (not for d images)
    assert len(pe.AOT_SPECS) == (3 * n32 + n16 * (3 * len(pe._FWD_CONFIGS) + 3 * len(pe._DW_CONFIGS)
                                                  + len(pe._DX_CONFIGS)) + 3)


# ---------------------------------------------------------------------------------------------
# CUDA only: bf16 dots (garbage in the interpreter) and the real ViT shapes.

GPU_CASES = [
    # C, H, W, p, B, D, ncls, nreg, no_embed_class, channels_last
    (3, 224, 224, 16, 4, 768, 1, 0, False, False),  # ViT-B/16
    (3, 224, 224, 14, 2, 1280, 1, 0, False, False),  # ViT-H/14
    (3, 224, 224, 16, 2, 768, 1, 0, False, True),
    (3, 64, 96, 16, 3, 192, 1, 4, True, True),
    (1, 28, 28, 4, 5, 64, 1, 0, False, False),
    (3, 32, 32, 8, 2, 100, 0, 4, False, False),
    (3, 30, 45, 5, 3, 72, 1, 1, False, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"C{c[0]}_{c[1]}x{c[2]}_p{c[3]}_D{c[5]}" for c in GPU_CASES])
@pytest.mark.parametrize("pdtype", [torch.bfloat16, torch.float32], ids=["bf16_params", "fp32_params"])
def test_gpu_bf16(case, pdtype, monkeypatch):
    C, H, W, p, B, D, ncls, nreg, nec, cl = case
    inputs = make_inputs(B, C, H, W, p, D, ncls, nreg, nec, torch.bfloat16, device="cuda", channels_last=cl,
                         pdtype=pdtype)
    check_against_reference(inputs, nec, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_gpu_fp16_fp32_vit_b16(dtype, monkeypatch):
    inputs = make_inputs(3, 3, 224, 224, 16, 768, 1, 0, False, dtype, device="cuda")
    check_against_reference(inputs, False, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("cfgs", list(zip(pe._FWD_CONFIGS, pe._DW_CONFIGS, pe._DX_CONFIGS)),
                         ids=lambda c: "_".join("x".join(map(str, k[:3])) for k in c))
def test_gpu_every_tile_config(cfgs, monkeypatch):
    """Each autotune config of the three kernels alone on the GPU (the autotuner only ever runs its pick; the
    interpreter's test_every_tile_config covers them on CPU), bf16, at sizes no tile divides."""
    from flashvit.kernels._dispatch import Launcher
    for name, kernel, cfg, names in (("_pe_fwd_tuned", pe._pe_fwd_kernel, cfgs[0], ("BM", "BN", "BK")),
                                     ("_pe_bwd_dw_tuned", pe._pe_bwd_dw_kernel, cfgs[1], ("BM", "BN", "BK")),
                                     ("_pe_bwd_dx_tuned", pe._pe_bwd_dx_kernel, cfgs[2], ("BM", "BK", "BD"))):
        key = getattr(pe, name).tuner.keys  # the shipped autotuner's key, with one config
        monkeypatch.setattr(pe, name, Launcher(pe._autotuned(kernel, [cfg], names, key)))
    inputs = make_inputs(3, 3, 40, 30, 10, 72, ncls=1, nreg=1, dtype=torch.bfloat16, device="cuda")
    check_against_reference(inputs, False, monkeypatch)


@pytest.mark.gpu
def test_gpu_deterministic_backward():
    inputs = make_inputs(8, 3, 224, 224, 16, 384, 1, 4, False, torch.bfloat16, device="cuda")
    g = randn(8, 1 + 4 + 196, 384, dtype=torch.bfloat16, device="cuda")
    first = run(inputs, False, "triton", g)[1]
    for _ in range(19):
        again = run(inputs, False, "triton", g)[1]
        for n in first:
            assert torch.equal(first[n], again[n]), n

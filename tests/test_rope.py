"""RoPE (kernels/rope.py) alone and inside packed attention (qkv_attention(rope=...)), vs a float64 oracle.

CPU: the Triton interpreter with backend="triton", fp32 and fp16, odd token counts and head dims, prefix tokens,
every rope broadcast timm produces, strided inputs, outputs poisoned with NaN. The oracle is timm's own formula
where timm is installed. CUDA: bf16 at ViT-B / DINOv3 shapes (@pytest.mark.gpu).
"""

import importlib

import pytest
import torch

from tests.helpers import assert_close_to_ref, poisoned_empty, randn

R = importlib.import_module("flashvit.kernels.rope")
A = importlib.import_module("flashvit.kernels.attention")
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.skipif(not R.HAS_TRITON, reason="needs triton (Linux) to run the kernels")


@pytest.fixture(autouse=True)
def _poisoned(monkeypatch):
    monkeypatch.setattr(R, "empty", poisoned_empty)


@pytest.fixture
def launches(monkeypatch):
    counts = {"fwd": 0, "bwd": 0}
    fn = R.rope_apply

    def counted(*a, **k):
        counts["bwd" if k.get("backward", a[5] if len(a) > 5 else False) else "fwd"] += 1
        return fn(*a, **k)
    monkeypatch.setattr(R, "rope_apply", counted)
    monkeypatch.setattr(A, "rope_apply", counted)
    return counts


def _table(shape, dtype=torch.float32):
    """A rope table as timm builds it: sin and cos of angles (any angles: the kernels take any table)."""
    ang = randn(*shape[:-1], shape[-1] // 2, dtype=torch.float64, device=DEVICE, scale=3.0)
    return torch.cat([ang.sin(), ang.cos()], dim=-1).to(dtype)


def _timm_oracle(x, rope, P, half):
    """timm's apply_rot_embed_cat on (B, H, N, D) where timm is installed, else our reference (both float64)."""
    try:
        from timm.layers.pos_embed_sincos import apply_rot_embed_cat
    except ImportError:
        return R.rope_reference(x, rope, P, half)
    q = x.transpose(1, 2)
    body = apply_rot_embed_cat(q[:, :, P:], rope, half=half)
    return torch.cat([q[:, :, :P], body], dim=2).transpose(1, 2)


ROPE_SHAPES = {"(n,2D)": lambda B, H, n, D: (n, 2 * D), "(H,n,2D)": lambda B, H, n, D: (H, n, 2 * D),
               "(B,1,n,2D)": lambda B, H, n, D: (B, 1, n, 2 * D), "(B,H,n,2D)": lambda B, H, n, D: (B, H, n, 2 * D)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("half", [False, True], ids=["interleaved", "half"])
@pytest.mark.parametrize("B,N,H,D,P,rshape", [(2, 9, 3, 16, 1, "(n,2D)"), (1, 17, 2, 40, 5, "(H,n,2D)"),
                                              (3, 5, 1, 8, 0, "(B,1,n,2D)"), (2, 6, 2, 80, 6, "(B,H,n,2D)"),
                                              (1, 1, 1, 2, 0, "(n,2D)")])
def test_apply_rope_matches_float64(dtype, half, B, N, H, D, P, rshape, launches):
    """y and x's gradient vs timm's formula in float64; prefix tokens copied bit for bit."""
    x = randn(B, N, H, D, dtype=dtype, device=DEVICE, scale=2.0)
    rope = _table(ROPE_SHAPES[rshape](B, H, N - P, D))
    leaf = x.clone().requires_grad_()
    y = R.apply_rope(leaf, rope, P, half, backend="triton")
    g = randn(B, N, H, D, dtype=dtype, device=DEVICE)
    y.backward(g)
    x64 = x.double().requires_grad_()
    y64 = _timm_oracle(x64, rope.double(), P, half)
    y64.backward(g.double())
    same = None
    if dtype != torch.float32:
        xs = x.clone().requires_grad_()
        ys = R.rope_reference(xs, rope.to(dtype), P, half)
        ys.backward(g)
        same = (ys.detach(), xs.grad)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3)
    assert y.dtype == dtype and y.is_contiguous()
    assert_close_to_ref(y.detach(), y64.detach(), same and same[0], factor=2.0, name="y", **tol)
    assert_close_to_ref(leaf.grad, x64.grad, same and same[1], factor=3.0, name="dx", **tol)
    assert torch.equal(y[:, :P].detach(), x[:, :P]) and torch.equal(leaf.grad[:, :P], g[:, :P])
    assert launches == {"fwd": 1, "bwd": 1}


def test_apply_rope_strided_views_of_packed_qkv(launches):
    """q and k as strided views into a packed (B, N, 3·H·D) buffer, and a transposed (B, H, N, D) layout."""
    B, N, H, D, P = 2, 11, 3, 24, 1
    qkv = randn(B, N, 3 * H * D, device=DEVICE)
    rope = _table((N - P, 2 * D))
    for x in (qkv.view(B, N, 3, H, D)[:, :, 1], randn(B, H, N, D, device=DEVICE).transpose(1, 2)):
        assert not x.is_contiguous()
        for half in (False, True):
            y = R.apply_rope(x, rope, P, half, backend="triton")
            assert_close_to_ref(y, _timm_oracle(x.double(), rope.double(), P, half), name="y")
    assert launches["fwd"] == 4


def test_rope_table_broadcasts_without_copies():
    """The kernel's (B, H, N', 2D) table is a view of the rope as given (stride 0 where it broadcasts); a table with
    a non-unit last stride is copied at its own size, not at the broadcast's."""
    B, H, n, D = 3, 4, 5, 8
    rope = _table((n, 2 * D))
    t = R.rope_table(rope, B, H, n, D)
    assert t.data_ptr() == rope.data_ptr() and t.stride()[:2] == (0, 0)
    strided = _table((n, 4 * D))[:, ::2]
    t = R.rope_table(strided, B, H, n, D)
    assert t.stride()[:2] == (0, 0) and t.stride(-1) == 1 and torch.equal(t[1, 2], strided)
    x = randn(B, n, H, D, device=DEVICE)
    assert_close_to_ref(R.apply_rope(x, strided, 0, backend="triton"), _timm_oracle(x.double(), strided.double(), 0,
                                                                                     False), name="y")


def test_apply_rope_learned_table_takes_the_reference():
    """A rope that requires grad (timm's 'mixed' learned frequencies) gets its gradient from the reference."""
    B, N, H, D, P = 2, 7, 2, 16, 1
    x = randn(B, N, H, D, device=DEVICE, requires_grad=True)
    rope = _table((H, N - P, 2 * D)).requires_grad_()
    R.apply_rope(x, rope, P, backend="triton").square().sum().backward()
    x64, r64 = x.detach().double().requires_grad_(), rope.detach().double().requires_grad_()
    _timm_oracle(x64, r64, P, False).square().sum().backward()
    assert_close_to_ref(rope.grad, r64.grad, name="drope")
    assert_close_to_ref(x.grad, x64.grad, name="dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("half", [False, True], ids=["interleaved", "half"])
@pytest.mark.parametrize("B,N,H,D,P,rshape", [(2, 17, 2, 32, 1, "(n,2D)"), (1, 50, 3, 40, 5, "(H,n,2D)"),
                                              (2, 9, 1, 16, 0, "(B,1,n,2D)")])
def test_qkv_attention_with_rope_matches_float64(dtype, half, B, N, H, D, P, rshape, launches):
    """Packed attention with rotary q, k: output and the packed qkv gradient (dq, dk rotated back in place)."""
    qkv = randn(B, N, 3 * H * D, dtype=dtype, device=DEVICE)
    rope = _table(ROPE_SHAPES[rshape](B, H, N - P, D))
    g = randn(B, N, H * D, dtype=dtype, device=DEVICE)

    def run(fn, t, table):
        leaf = t.clone().requires_grad_()
        out = fn(leaf, table)
        out.backward(g.to(out.dtype))
        return out.detach(), leaf.grad

    out, dqkv = run(lambda t, r: A.qkv_attention(t, H, rope=r, rope_prefix=P, rope_half=half, backend="triton"),
                    qkv, rope)
    ref = lambda t, r: A.qkv_attention_reference(t, H, rope=r, rope_prefix=P, rope_half=half)  # noqa: E731
    out64, dqkv64 = run(ref, qkv.double(), rope.double())
    same = run(ref, qkv, rope.to(dtype)) if dtype != torch.float32 else (None, None)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3)
    assert_close_to_ref(out, out64, same[0], factor=2.0, name="o", **tol)
    assert_close_to_ref(dqkv, dqkv64, same[1], factor=3.0, name="dqkv", **tol)
    assert launches == {"fwd": 1, "bwd": 1}


def test_qkv_attention_with_rope_equals_rotating_first():
    """The fused path = apply_rope on q and k, then attention: same kernels, same values (dropout too: the
    same seed draws the same mask), bit for bit."""
    B, N, H, D, P = 2, 13, 2, 16, 1
    qkv = randn(B, N, 3 * H * D, device=DEVICE)
    rope = _table((N - P, 2 * D))
    for p in (0.0, 0.3):
        torch.manual_seed(7)
        fused = A.qkv_attention(qkv, H, rope=rope, rope_prefix=P, dropout_p=p, backend="triton")
        q, k, v = qkv.view(B, N, 3, H, D).unbind(2)
        q, k = (R.apply_rope(t, rope, P, backend="triton") for t in (q, k))
        torch.manual_seed(7)
        split = A.attention(q, k, v, dropout_p=p, backend="triton").flatten(-2)
        assert torch.equal(fused, split), p


def test_qkv_attention_with_rope_strided_qkv():
    """A qkv whose features are not unit-stride (every other column of a wider buffer): copied for the RoPE
    kernel, values and the gradient of the strided view still right."""
    B, N, H, D, P = 2, 7, 2, 8, 1
    wide = randn(B, N, 2 * 3 * H * D, device=DEVICE, requires_grad=True)
    rope = _table((N - P, 2 * D))
    g = randn(B, N, H * D, device=DEVICE)
    out = A.qkv_attention(wide[..., ::2], H, rope=rope, rope_prefix=P, rope_half=True, backend="triton")
    out.backward(g)
    w64 = wide.detach().double().requires_grad_()
    ref = A.qkv_attention_reference(w64[..., ::2], H, rope=rope.double(), rope_prefix=P, rope_half=True)
    ref.backward(g.double())
    assert_close_to_ref(out.detach(), ref.detach(), name="o")
    assert_close_to_ref(wide.grad, w64.grad, name="dqkv")


def test_qkv_attention_learned_rope_gradient():
    """A rope that requires grad: rotated by the reference (dq, dk, drope by autograd), attention in the kernels."""
    B, N, H, D, P = 1, 10, 2, 16, 2
    qkv = randn(B, N, 3 * H * D, device=DEVICE, requires_grad=True)
    rope = _table((H, N - P, 2 * D)).requires_grad_()
    A.qkv_attention(qkv, H, rope=rope, rope_prefix=P, backend="triton").square().sum().backward()
    q64, r64 = qkv.detach().double().requires_grad_(), rope.detach().double().requires_grad_()
    A.qkv_attention_reference(q64, H, rope=r64, rope_prefix=P).square().sum().backward()
    assert_close_to_ref(qkv.grad, q64.grad, name="dqkv")
    assert_close_to_ref(rope.grad, r64.grad, name="drope")


def test_rope_bad_inputs():
    x = randn(2, 5, 2, 8, device=DEVICE)
    ok = _table((4, 16))
    cases = [
        (dict(x=randn(2, 5, 2, 7, device=DEVICE), rope=_table((4, 14))), ValueError, "must be even"),
        (dict(rope=_table((4, 18))), ValueError, r"rope must be cat\(sin, cos\) of shape \(\.\.\., 4, 16\)"),
        (dict(rope=_table((5, 16))), ValueError, r"\(\.\.\., 4, 16\)"),
        (dict(rope=_table((3, 4, 16))), ValueError, "does not broadcast"),
        (dict(rope=_table((1, 1, 1, 4, 16))), ValueError, "broadcastable"),
        (dict(num_prefix_tokens=6), ValueError, r"num_prefix_tokens must be in \[0, 5\]"),
        (dict(num_prefix_tokens=-1), ValueError, "num_prefix_tokens"),
        (dict(rope=ok.to(torch.int32)), TypeError, "rope has dtype"),
        (dict(x=x.to(torch.int64)), TypeError, "x has dtype"),
        (dict(x=x[0]), ValueError, "4 dimensions"),
        (dict(rope=torch.empty(4, 16, device="meta")), ValueError, "one device"),
    ]
    for kw, exc, msg in cases:
        args = dict(x=x, rope=ok, num_prefix_tokens=1)
        args.update(kw)
        with pytest.raises(exc, match=msg):
            R.apply_rope(args.pop("x"), args.pop("rope"), **args, backend="triton")
    qkv = randn(2, 5, 3 * 2 * 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4, 16\)"):
        A.qkv_attention(qkv, 2, rope=_table((5, 16)), rope_prefix=1, backend="triton")
    with pytest.raises(ValueError, match="one device"):
        A.qkv_attention(qkv, 2, rope=torch.empty(4, 16, device="meta"), rope_prefix=1, backend="triton")


def test_reference_backend_is_eager_and_matches_timm():
    """backend='torch' runs rope_reference (timm's formula), with any head dim."""
    x = randn(2, 6, 2, 6, dtype=torch.float64, device=DEVICE)
    rope = _table((5, 12), torch.float64)
    for half in (False, True):
        torch.testing.assert_close(R.apply_rope(x, rope, 1, half, backend="torch"), _timm_oracle(x, rope, 1, half),
                                   atol=0, rtol=0)


L = importlib.import_module("flashvit.kernels.linear")


@pytest.fixture
def gemm_spy(monkeypatch):
    """Poisoned GEMM outputs; records each GEMM launch's RoPE epilogue code (0: none) and the RoPE passes."""
    monkeypatch.setattr(L, "_empty", lambda shape, device, dtype: poisoned_empty(shape, dtype, device))
    seen = {"epilogue": [], "passes": 0}
    gemm, apply_ = L._launch_gemm, R.rope_apply

    def spy_gemm(*a, **k):
        seen["epilogue"].append(k["rope"][5] if k.get("rope") is not None else 0)
        return gemm(*a, **k)

    def spy_pass(*a, **k):
        seen["passes"] += 1
        return apply_(*a, **k)
    monkeypatch.setattr(L, "_launch_gemm", spy_gemm)
    monkeypatch.setattr(R, "rope_apply", spy_pass)
    L.set_autotune(False)
    yield seen
    L.set_autotune(True)


def _qkv_rope_oracle(x, w, b, rope, H, P, half):
    """float64 x·Wᵀ + b, then timm's rotation of q and k; v as it is."""
    B, N, _ = x.shape
    D = w.shape[0] // (3 * H)
    qkv = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double()).view(B, N, 3, H, D)
    q, k = (_timm_oracle(qkv[:, :, i], rope.double(), P, half) for i in (0, 1))
    return torch.stack((q, k, qkv[:, :, 2]), dim=2).reshape(B, N, -1)


@pytest.mark.parametrize("dtype,gemm", [(torch.float32, "triton"), (torch.float16, "triton"), (torch.float16, "tma"),
                                        (torch.float32, "cublas")], ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("half", [False, True], ids=["interleaved", "half"])
@pytest.mark.parametrize("B,N,C,H,D,P,rshape,bias", [(2, 13, 40, 2, 16, 1, "(n,2D)", True),
                                                     (1, 37, 24, 3, 64, 5, "(1,1,n,2D)", False),
                                                     (3, 6, 32, 1, 8, 0, "(B,1,n,2D)", True),
                                                     (1, 9, 16, 2, 40, 2, "(n,2D)", True)])
def test_qkv_rope_linear_matches_float64(dtype, gemm, half, B, N, C, H, D, P, rshape, bias, gemm_spy):
    """The qkv GEMM with RoPE of q and k: in the epilogue of our GEMMs (interleaved pairs at any even D; rotate_half
    at power-of-two D <= 64; one table for all images), else the GEMM then one in-place pass; vs float64 + timm."""
    x = randn(B, N, C, dtype=dtype, device=DEVICE)
    w = randn(3 * H * D, C, dtype=dtype, device=DEVICE, scale=C ** -0.5)
    b = randn(3 * H * D, dtype=dtype, device=DEVICE) if bias else None
    shape = {"(1,1,n,2D)": (1, 1, N - P, 2 * D)}.get(rshape) or ROPE_SHAPES[rshape](B, H, N - P, D)
    rope = _table(shape)
    with L.use_gemm(gemm):
        y = L.qkv_rope_linear(x, w, b, H, rope, P, half, backend="triton")
    want = _qkv_rope_oracle(x, w, b, rope, H, P, half)
    same = None
    if dtype != torch.float32:  # torch in this dtype: F.linear, then the rotation
        qkv = torch.nn.functional.linear(x, w, b).view(B, N, 3, H, D)
        q, k = (R.rope_reference(qkv[:, :, i], rope.to(dtype), P, half) for i in (0, 1))
        same = torch.stack((q, k, qkv[:, :, 2]), dim=2).reshape(B, N, -1)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3)
    assert y.shape == (B, N, 3 * H * D) and y.dtype == dtype
    assert_close_to_ref(y, want, same, factor=2.0, name="qkv", **tol)
    fused = gemm != "cublas" and rshape != "(B,1,n,2D)" and (not half or D in (8, 16, 64))
    assert gemm_spy == {"epilogue": [(D if half else 1) if fused else 0] if gemm != "cublas" else [],
                        "passes": 0 if fused else 1}, gemm_spy


def test_qkv_rope_linear_then_attention_equals_the_fused_rope_attention(gemm_spy):
    """qkv_attention(qkv_rope_linear(x, ...), H) is qkv_attention(linear(x, ...), H, rope=...) (inference)."""
    B, N, C, H, D, P = 2, 11, 32, 2, 16, 1
    x = randn(B, N, C, device=DEVICE)
    w, b = randn(3 * H * D, C, device=DEVICE, scale=C ** -0.5), randn(3 * H * D, device=DEVICE)
    rope = _table((N - P, 2 * D))
    for half in (False, True):
        o = A.qkv_attention(L.qkv_rope_linear(x, w, b, H, rope, P, half, backend="triton"), H, backend="triton")
        want = A.qkv_attention(L.linear(x, w, b, backend="triton"), H, rope=rope, rope_prefix=P, rope_half=half,
                               backend="triton")
        assert_close_to_ref(o, A.qkv_attention_reference(_qkv_rope_oracle(x, w, b, rope, H, P, half), H), want,
                            name="o")


def test_qkv_rope_linear_with_autograd_is_linear_then_apply_rope(gemm_spy):
    """With grads: linear + apply_rope (two autograd nodes, gradients to x, W, b); the fused GEMM runs without."""
    B, N, C, H, D, P = 2, 7, 16, 2, 8, 1
    x, w = randn(B, N, C, device=DEVICE, requires_grad=True), randn(3 * H * D, C, device=DEVICE, requires_grad=True)
    b = randn(3 * H * D, device=DEVICE, requires_grad=True)
    rope = _table((N - P, 2 * D))
    y = L.qkv_rope_linear(x, w, b, H, rope, P, True, backend="triton")
    g = randn(*y.shape, device=DEVICE)
    y.backward(g)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    _qkv_rope_oracle(*leaves, rope, H, P, True).backward(g.double())
    for name, got, want in zip(("dx", "dW", "db"), (x.grad, w.grad, b.grad), leaves):
        assert_close_to_ref(got, want.grad, factor=3.0, name=name)
    assert gemm_spy["epilogue"] == [0, 0, 0] and gemm_spy["passes"] == 4  # y, dX, dW; q and k each way


def test_qkv_rope_linear_bad_inputs():
    x, w = randn(2, 5, 8, device=DEVICE), randn(3 * 2 * 4, 8, device=DEVICE)
    rope = _table((4, 8))
    with pytest.raises(ValueError, match="not 3 x num_heads"):
        L.qkv_rope_linear(x, w, None, 5, rope, 1)
    with pytest.raises(ValueError, match="rope must be cat"):
        L.qkv_rope_linear(x, w, None, 2, _table((5, 8)), 1)
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        L.qkv_rope_linear(x[0], w, None, 2, rope, 1)
    with pytest.raises(ValueError, match="x has 6 input features; expected 8"):
        L.qkv_rope_linear(randn(2, 5, 6, device=DEVICE), w, None, 2, rope, 1)


def test_rope_epilogue_configs():
    """Every autotune list keeps a config the RoPE epilogue fits, and its autotuning keeps only those."""
    fits = [c for c in L.SM90_CONFIGS_16 if L.rope_config_fits(c)]
    import triton
    configs = L._triton_configs(L.SM90_CONFIGS_16)
    assert [L._cfg(c) for c in L._gemm_prune(configs, {}, ROPE=1)] == fits and fits
    assert L._gemm_prune(configs, {}, ROPE=0) == configs
    tma = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PREFETCH": False}, num_warps=w, num_stages=s)
           for bm, bn, bk, w, s in L.TMA_CONFIGS_16]
    assert all(L.rope_config_fits(L._cfg(c)) for c in L._tma_prune(tma, {"SPLITS": 1}, ROPE=64))
    assert "ROPE" in L._AUTOTUNE_KEY


@pytest.mark.gpu
@pytest.mark.parametrize("B,N,H,D,P,half", [(8, 197, 12, 64, 1, False), (4, 201, 6, 64, 5, True),
                                            (2, 257, 16, 80, 1, False)])
def test_qkv_attention_with_rope_bf16_gpu(B, N, H, D, P, half):
    """ViT-B / DINOv3 (4 registers, rotate_half) / ViT-H head dim 80: bf16 vs float64, 2x/3x PyTorch's error."""
    qkv = randn(B, N, 3 * H * D, dtype=torch.bfloat16, device="cuda")
    rope = _table((N - P, 2 * D))
    g = randn(B, N, H * D, dtype=torch.bfloat16, device="cuda")

    def run(fn, t, table):
        leaf = t.clone().requires_grad_()
        out = fn(leaf, table)
        out.backward(g.to(out.dtype))
        return out.detach(), leaf.grad

    ref = lambda t, r: A.qkv_attention_reference(t, H, rope=r, rope_prefix=P, rope_half=half)  # noqa: E731
    out, dqkv = run(lambda t, r: A.qkv_attention(t, H, rope=r, rope_prefix=P, rope_half=half, backend="triton"),
                    qkv, rope)
    out64, dqkv64 = run(ref, qkv.double(), rope.double())
    same = run(ref, qkv, rope)
    assert_close_to_ref(out, out64, same[0], factor=2.0, atol=1e-3, name="o")
    assert_close_to_ref(dqkv, dqkv64, same[1], factor=3.0, atol=1e-3, name="dqkv")


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["triton", "tma", "cublas"])
@pytest.mark.parametrize("B,N,C,H,D,P,half", [(4, 201, 384, 6, 64, 5, True), (4, 257, 384, 6, 64, 1, False)])
def test_qkv_rope_linear_bf16_gpu(gemm, B, N, C, H, D, P, half):
    """DINOv3-S (rotate_half, 4 registers) and EVA-02-S-like (interleaved) qkv GEMMs with RoPE in bf16, autotuned
    (the epilogue's pruned configs), vs float64: 2x PyTorch's error."""
    L.set_autotune(True)
    x = randn(B, N, C, dtype=torch.bfloat16, device="cuda")
    w = randn(3 * H * D, C, dtype=torch.bfloat16, device="cuda", scale=C ** -0.5)
    b = randn(3 * H * D, dtype=torch.bfloat16, device="cuda")
    rope = _table((N - P, 2 * D))
    with torch.no_grad(), L.use_gemm(gemm):
        y = L.qkv_rope_linear(x, w, b, H, rope, P, half)
    qkv = torch.nn.functional.linear(x, w, b).view(B, N, 3, H, D)
    q, k = (R.rope_reference(qkv[:, :, i], rope.to(torch.bfloat16), P, half) for i in (0, 1))
    same = torch.stack((q, k, qkv[:, :, 2]), dim=2).reshape(B, N, -1)
    assert_close_to_ref(y, _qkv_rope_oracle(x, w, b, rope, H, P, half), same, factor=2.0, atol=1e-3, name="qkv")

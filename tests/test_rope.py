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

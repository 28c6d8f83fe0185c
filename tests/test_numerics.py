"""Numerical edges (CPU interpreter + CUDA) and 64-bit offsets (CUDA only: needs > 2^31 elements).

Huge attention logits and one-token sequences; LayerNorm of a constant row and of values ~1e4 with a
small spread; GELU at +-10; tensors whose element offsets pass 2^31.
"""

from __future__ import annotations

import pytest
import torch

from flashvit.kernels import (
    HAS_TRITON,
    add_layer_norm,
    attention,
    attention_reference,
    layer_norm,
    layer_norm_reference,
    linear,
    linear_reference,
    patch_embed,
    patch_embed_reference,
    qkv_attention,
    qkv_attention_reference,
)
from tests.helpers import assert_close_to_ref, randn

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (Linux) to run the kernels")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_attention_huge_logits_stay_finite(dtype):
    # scale * |q.k| ~ 1e4: the online softmax must subtract the running max before exp.
    q = randn(1, 33, 2, 32, dtype=dtype, device=DEV, scale=20.0)
    k = randn(1, 33, 2, 32, dtype=dtype, device=DEV, scale=20.0)
    v = randn(1, 33, 2, 32, dtype=dtype, device=DEV)
    out = attention(q, k, v, softmax_scale=1.0, backend="triton")
    assert torch.isfinite(out).all()
    ref = attention_reference(q.double(), k.double(), v.double(), 1.0)
    assert_close_to_ref(out, ref, attention_reference(q, k, v, 1.0), atol=2e-3 if dtype == torch.float16 else 1e-4)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_attention_one_token_returns_v(dtype):
    qkv = randn(3, 1, 3 * 2 * 16, dtype=dtype, device=DEV, requires_grad=True)
    out = qkv_attention(qkv, 2, backend="triton")
    torch.testing.assert_close(out, qkv[..., 64:], rtol=0, atol=1e-3 if dtype == torch.float16 else 1e-6)
    out.sum().backward()
    # softmax over one key is constant 1: no gradient reaches q or k (up to rounding of dP - delta)
    assert qkv.grad[..., :64].abs().max().item() <= 1e-5
    torch.testing.assert_close(qkv.grad[..., 64:], torch.ones_like(qkv.grad[..., 64:]))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_layer_norm_constant_row(dtype):
    x = torch.full((3, 50), 7.25, dtype=dtype, device=DEV, requires_grad=True)
    w, b = randn(50, dtype=dtype, device=DEV), randn(50, dtype=dtype, device=DEV)
    y = layer_norm(x, w, b, 1e-5, backend="triton")
    torch.testing.assert_close(y, b.expand_as(y), rtol=0, atol=0)  # variance 0 -> (x - mean) = 0 exactly
    y.backward(torch.randn_like(y))
    assert torch.isfinite(x.grad).all()


def test_layer_norm_large_offset_small_spread():
    # values ~1e4 with a spread of ~1: E[x^2] - E[x]^2 would cancel catastrophically in fp32
    x = (1e4 + randn(4, 300, dtype=torch.float64)).float().to(DEV)
    out = layer_norm(x, None, None, 1e-5, backend="triton")
    ref = layer_norm_reference(x.double(), None, None, 1e-5)
    torch_err = (layer_norm_reference(x, None, None, 1e-5).double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * torch_err + 1e-4, f"error {err:.2e} vs PyTorch fp32 {torch_err:.2e}"


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_gelu_at_plus_minus_ten(act):
    x = torch.tensor([[1.0], [-1.0], [0.5]], device=DEV, requires_grad=True)
    w = torch.tensor([[10.0], [-10.0]], device=DEV)
    y = linear(x, w, None, act, backend="triton")  # pre-activations +-10, +-5
    x64 = x.detach().double().requires_grad_(True)
    y64 = linear_reference(x64, w.double(), None, act)
    torch.testing.assert_close(y.double(), y64, rtol=1e-6, atol=1e-6)
    y.sum().backward()
    y64.sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- offsets past 2^31 (GPU)
BIG = 2**31 + 2**20


def _tail_close(out, ref, n):
    """Compare the last n rows (the ones whose offsets pass 2^31)."""
    torch.testing.assert_close(out[-n:].float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_int64_offsets_layer_norm():
    d = 1024
    x = torch.randn(BIG // d + 1, d, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(d, device="cuda"), torch.randn(d, device="cuda")
    y = layer_norm(x, w, b, 1e-6, backend="triton")  # 'auto' may pick eager LayerNorm
    _tail_close(y, layer_norm_reference(x[-4:].float(), w, b, 1e-6), 4)


@pytest.mark.gpu
def test_int64_offsets_linear():
    k = n = 1024
    x = torch.randn(BIG // n + 1, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    y = linear(x, w, None, "gelu", backend="triton")
    _tail_close(y, linear_reference(x[-4:].float(), w.float(), None, "gelu"), 4)


@pytest.mark.gpu
def test_int64_offsets_qkv_attention():
    n, h, d = 197, 12, 64
    b = BIG // (n * 3 * h * d) + 1
    qkv = torch.randn(b, n, 3 * h * d, device="cuda", dtype=torch.bfloat16)
    o = qkv_attention(qkv, h, backend="triton")
    _tail_close(o, qkv_attention_reference(qkv[-1:].float(), h), 1)


@pytest.mark.gpu
def test_int64_offsets_patch_embed():
    d, p = 768, 16
    b = BIG // (197 * d) + 1
    img = torch.randn(b, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(d, 3, p, p, device="cuda", dtype=torch.bfloat16) * 0.03
    bias, pos, cls = (torch.randn(*s, device="cuda", dtype=torch.bfloat16) for s in ((d,), (1, 197, d), (1, 1, d)))
    out = patch_embed(img, w, bias, pos, cls, backend="triton")
    _tail_close(out, patch_embed_reference(img[-1:].float(), w.float(), bias.float(), pos.float(), cls.float()), 1)


# ------------------------------------------------------------------- determinism, every op
def _grads_of(fn, tensors, seed=7):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    torch.autograd.backward(out, [torch.randn(o.shape, generator=g).to(o) for o in out])
    return [o.detach() for o in out] + [t.grad for t in leaves]


DETERMINISM_CASES = {
    "layer_norm": (lambda x, w, b: layer_norm(x, w, b, 1e-5, backend="triton"), [(37, 48), (48,), (48,)]),
    "add_layer_norm": (lambda x, r, w, b: add_layer_norm(x, r, w, b, 1e-5, backend="triton"),
                       [(37, 48), (37, 48), (48,), (48,)]),
    "attention": (lambda q, k, v: attention(q, k, v, backend="triton"), [(2, 33, 2, 16)] * 3),
    "qkv_attention": (lambda t: qkv_attention(t, 2, backend="triton"), [(2, 33, 96)]),
    "linear": (lambda x, w, b: linear(x, w, b, "gelu", backend="triton"), [(70, 24), (40, 24), (40,)]),
    "patch_embed": (lambda i, w, b, p, c: patch_embed(i, w, b, p, c, backend="triton"),
                    [(3, 3, 16, 24), (16, 3, 8, 8), (16,), (1, 7, 16), (1, 1, 16)]),
}


@pytest.mark.parametrize("op", sorted(DETERMINISM_CASES))
def test_backward_is_bit_identical_over_20_runs(op):
    fn, shapes = DETERMINISM_CASES[op]
    tensors = [randn(*s, device=DEV) for s in shapes]
    first = _grads_of(fn, tensors)
    for _ in range(19):
        for a, b in zip(first, _grads_of(fn, tensors)):
            assert torch.equal(a, b), op

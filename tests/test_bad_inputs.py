"""Bad-input catalogue: every public op on the Triton path (interpreter on CPU) gets a clear error or
a correct result for wrong devices, dtypes, ranks, shapes, empty batches, odd strides and NaN/Inf.

One table; each row: (op, case, thunk building the call, expectation). An expectation is either an
(exception type, message regex) pair or "ok" (the result must equal the reference's).
"""

from __future__ import annotations

import re

import pytest
import torch

from flashvit.kernels import (
    HAS_TRITON,
    add_layer_norm,
    add_layer_norm_reference,
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

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (Linux) to run the kernels")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
T = dict(backend="triton")
OK = "ok"
DEVICE_ERR = (ValueError, "one device")
DTYPE_ERR = (TypeError, "dtype")


def r(*shape, dtype=torch.float32, device=DEV):
    return torch.randn(*shape, device=device).to(dtype)


def meta(*shape):
    return torch.empty(*shape, device="meta")


def ln_args(n=5, d=12, **kw):
    a = dict(x=r(n, d), weight=r(d), bias=r(d), eps=1e-5)
    a.update(kw)
    return a


def lin_args(m=5, k=12, n=7, **kw):
    a = dict(x=r(m, k), weight=r(n, k), bias=r(n), activation="gelu", residual=r(m, n))
    a.update(kw)
    return a


def attn_args(b=2, n=9, h=2, d=16, **kw):
    a = dict(q=r(b, n, h, d), k=r(b, n, h, d), v=r(b, n, h, d))
    a.update(kw)
    return a


def pe_args(b=2, c=3, hw=8, p=4, d=16, **kw):
    L = (hw // p) ** 2
    a = dict(images=r(b, c, hw, hw), weight=r(d, c, p, p), bias=r(d), pos_embed=r(1, L + 1, d), cls_token=r(1, 1, d))
    a.update(kw)
    return a


def _overlapping(*shape):
    """A tensor whose rows overlap in memory (stride 0 along dim 0)."""
    return r(1, *shape[1:]).expand(*shape)


def _nan(t, where=(0,)):
    t = t.clone()
    t[where] = float("nan")
    return t


# op name -> (triton fn, reference fn, default-args builder)
OPS = {
    "layer_norm": (layer_norm, layer_norm_reference, ln_args),
    "add_layer_norm": (add_layer_norm, add_layer_norm_reference, lambda **kw: {**ln_args(), "residual": r(5, 12), **kw}),
    "linear": (linear, linear_reference, lin_args),
    "attention": (attention, attention_reference, attn_args),
    "qkv_attention": (qkv_attention, qkv_attention_reference,
                      lambda **kw: {"qkv": r(2, 9, 3 * 2 * 16), "num_heads": 2, **kw}),
    "patch_embed": (patch_embed, patch_embed_reference, pe_args),
}

CASES = [
    # ---- layer_norm / add_layer_norm
    ("layer_norm", "int dtype", dict(x=torch.ones(5, 12, dtype=torch.int32, device=DEV)), DTYPE_ERR),
    ("layer_norm", "bool dtype", dict(x=torch.ones(5, 12, dtype=torch.bool, device=DEV)), DTYPE_ERR),
    ("layer_norm", "float64 (reference-only dtype)", dict(x=r(5, 12, dtype=torch.float64)), (TypeError, "float64")),
    ("layer_norm", "weight on another device", dict(weight=meta(12)), DEVICE_ERR),
    ("layer_norm", "weight shape", dict(weight=r(11)), (ValueError, r"weight has shape \(11,\); expected \(12,\)")),
    ("layer_norm", "weight rank", dict(weight=r(12, 1)), (ValueError, "weight must have 1 dimensions")),
    ("layer_norm", "eps <= 0", dict(eps=0.0), (ValueError, "eps must be > 0")),
    ("layer_norm", "scalar input", dict(x=r(1).squeeze()), (ValueError, "at least 1 dimensions")),
    ("layer_norm", "zero rows", dict(x=r(0, 12)), OK),
    ("layer_norm", "overlapping rows", dict(x=_overlapping(5, 12)), OK),
    ("layer_norm", "non-contiguous rows", dict(x=r(12, 5).t()), OK),
    ("layer_norm", "NaN propagates", dict(x=_nan(r(5, 12))), OK),
    ("layer_norm", "Inf propagates", dict(x=_nan(r(5, 12)).nan_to_num(nan=float("inf"))), OK),
    ("add_layer_norm", "residual shape", dict(residual=r(5, 11)), (ValueError, r"residual has shape \(5, 11\)")),
    ("add_layer_norm", "residual device", dict(residual=meta(5, 12)), DEVICE_ERR),
    ("add_layer_norm", "residual int", dict(residual=torch.ones(5, 12, dtype=torch.int64, device=DEV)), DTYPE_ERR),
    ("add_layer_norm", "zero rows", dict(x=r(0, 12), residual=r(0, 12)), OK),
    # ---- linear
    ("linear", "K mismatch", dict(weight=r(7, 13)), (ValueError, "x has 12 input features; expected 13")),
    ("linear", "int x", dict(x=torch.ones(5, 12, dtype=torch.int32, device=DEV)), DTYPE_ERR),
    ("linear", "bool weight", dict(weight=torch.ones(7, 12, dtype=torch.bool, device=DEV)), DTYPE_ERR),
    ("linear", "weight on another device", dict(weight=meta(7, 12)), DEVICE_ERR),
    ("linear", "bias shape", dict(bias=r(8)), (ValueError, r"bias has shape \(8,\); expected \(7,\)")),
    ("linear", "residual shape", dict(residual=r(5, 8)), (ValueError, r"residual has shape \(5, 8\); expected \(5, 7\)")),
    ("linear", "weight rank", dict(weight=r(7, 12, 1)), (ValueError, "weight must have 2 dimensions")),
    ("linear", "unknown activation", dict(activation="relu"), (ValueError, "activation must be one of")),
    ("linear", "float64 (reference-only dtype)", dict(x=r(5, 12, dtype=torch.float64), weight=r(7, 12, dtype=torch.float64),
                                                      bias=None, residual=None), (TypeError, "float64")),
    ("linear", "zero rows", dict(x=r(0, 12), residual=r(0, 7)), OK),
    ("linear", "overlapping rows", dict(x=_overlapping(5, 12)), OK),
    ("linear", "transposed x", dict(x=r(12, 5).t()), OK),
    ("linear", "3-d x", dict(x=r(2, 3, 12), residual=r(2, 3, 7)), OK),
    ("linear", "NaN propagates", dict(x=_nan(r(5, 12))), OK),
    # ---- attention
    ("attention", "head dim not a multiple of 8", dict(q=r(2, 9, 2, 12), k=r(2, 9, 2, 12), v=r(2, 9, 2, 12)),
     (ValueError, "multiple of 8")),
    ("attention", "head dim > 256", dict(q=r(1, 3, 1, 264), k=r(1, 3, 1, 264), v=r(1, 3, 1, 264)), (ValueError, "256")),
    ("attention", "k/v shape mismatch", dict(v=r(2, 8, 2, 16)), (ValueError, "matching")),
    ("attention", "dtype mismatch", dict(k=r(2, 9, 2, 16, dtype=torch.float16)), (TypeError, "share a dtype")),
    ("attention", "int q", dict(q=torch.ones(2, 9, 2, 16, dtype=torch.int32, device=DEV)), DTYPE_ERR),
    ("attention", "k on another device", dict(k=meta(2, 9, 2, 16)), DEVICE_ERR),
    ("attention", "rank 3", dict(q=r(2, 9, 32)), (ValueError, "must have 4 dimensions")),
    ("attention", "zero batch", dict(q=r(0, 9, 2, 16), k=r(0, 9, 2, 16), v=r(0, 9, 2, 16)), OK),
    ("attention", "one token", dict(q=r(2, 1, 2, 16), k=r(2, 1, 2, 16), v=r(2, 1, 2, 16)), OK),
    ("attention", "overlapping batch", dict(q=_overlapping(2, 9, 2, 16)), OK),
    ("attention", "NaN propagates", dict(q=_nan(r(2, 9, 2, 16))), OK),
    ("qkv_attention", "width not divisible by 3*heads", dict(qkv=r(2, 9, 95)), (ValueError, "divisible by 3")),
    ("qkv_attention", "rank 4", dict(qkv=r(2, 9, 3, 32)), (ValueError, "must have 3 dimensions")),
    ("qkv_attention", "int qkv", dict(qkv=torch.ones(2, 9, 96, dtype=torch.int64, device=DEV)), DTYPE_ERR),
    ("qkv_attention", "zero batch", dict(qkv=r(0, 9, 96)), OK),
    ("qkv_attention", "sliced qkv", dict(qkv=r(2, 9, 100)[..., 2:98]), OK),
    # ---- patch_embed
    ("patch_embed", "H not divisible by p", dict(images=r(2, 3, 10, 8)), (ValueError, "divisible by the patch size 4")),
    ("patch_embed", "channel mismatch", dict(images=r(2, 1, 8, 8)), (ValueError, "expected 3")),
    ("patch_embed", "pos_embed length", dict(pos_embed=r(1, 4, 16)), (ValueError, r"expected \(1, 5, 16\)")),
    ("patch_embed", "int images", dict(images=torch.ones(2, 3, 8, 8, dtype=torch.uint8, device=DEV)), DTYPE_ERR),
    ("patch_embed", "weight on another device", dict(weight=meta(16, 3, 4, 4)), DEVICE_ERR),
    ("patch_embed", "rank 3 images", dict(images=r(3, 8, 8)), (ValueError, "must have 4 dimensions")),
    ("patch_embed", "cls_token width", dict(cls_token=r(1, 1, 15)), (ValueError, "cls_token has shape")),
    ("patch_embed", "zero batch", dict(images=r(0, 3, 8, 8)), OK),
    ("patch_embed", "channels-last images", dict(images=r(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)), OK),
    ("patch_embed", "NaN propagates", dict(images=_nan(r(2, 3, 8, 8))), OK),
]


@pytest.mark.parametrize("op,case,override,expect", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_bad_input(op, case, override, expect):
    fn, ref, build = OPS[op]
    args = build(**override)
    if expect != OK:
        exc, msg = expect
        with pytest.raises(exc, match=msg):
            fn(**args, **T)
        return
    out = fn(**args, **T)
    want = ref(**{k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in args.items()})
    outs, wants = (out, want) if isinstance(out, tuple) else ((out,), (want,))
    for o, w in zip(outs, wants):
        assert o.shape == w.shape, f"{case}: shape {tuple(o.shape)} vs {tuple(w.shape)}"
        assert torch.equal(torch.isnan(o.cpu()), torch.isnan(w.cpu())), f"{case}: NaN pattern differs"
        finite = torch.isfinite(w.cpu())
        torch.testing.assert_close(o.cpu().double()[finite], w.cpu()[finite], rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{case}: {m}")


def test_catalogue_covers_every_public_op():
    assert {c[0] for c in CASES} == set(OPS)
    for op in OPS:
        kinds = " ".join(c[1] for c in CASES if c[0] == op)
        assert re.search("dtype|int|bool", kinds) and re.search("device", kinds) or op == "qkv_attention", op

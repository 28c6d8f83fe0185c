"""Flash attention: Triton kernels (interpreter on CPU, fp32/fp16; CUDA adds bf16 and big shapes) vs float64."""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

from tests.conftest import DEVICE
from tests.helpers import assert_close_to_ref, fresh_seed, max_err, poison, randn

A = importlib.import_module("flashvit.kernels.attention")  # the module (the package re-exports the function)
attention, qkv_attention = A.attention, A.qkv_attention

FP_ATOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _one_config_per_shape():
    """On a GPU each kernel runs the first tile config that fits (one compile per shape, not one per config:
    run 5's autotuned attention tests took 14-57 s each); tests that need the autotuner's pick take the
    ``autotuned`` fixture. The interpreter always runs one config."""
    A.set_autotune(False)
    yield
    A.set_autotune(True)


@pytest.fixture
def autotuned():
    A.set_autotune(True)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()  # keeps the strides of a view


def _inputs(B, Nq, Nkv, H, D, dtype, noncontig=False, scale=1.0):
    if not noncontig:
        mk = lambda n: randn(B, n, H, D, dtype=dtype, device=DEVICE, scale=scale)  # noqa: E731
        return _leaf(mk(Nq)), _leaf(mk(Nkv)), _leaf(mk(Nkv))
    q = randn(B, H, Nq, D, dtype=dtype, device=DEVICE, scale=scale).transpose(1, 2)  # N and H strides swapped
    k = randn(B, Nkv, H, D + 24, dtype=dtype, device=DEVICE, scale=scale)[..., 8:D + 8]  # padded rows, offset
    v = randn(B, Nkv, H, 2 * D, dtype=dtype, device=DEVICE, scale=scale)[..., ::2]  # head-dim stride 2
    return _leaf(q), _leaf(k), _leaf(v)


def _fwd_bwd(fn, inputs, g):
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, inputs, g))


def _check_attention(B, Nq, Nkv, H, D, causal, dtype, noncontig=False, scale=None):
    q, k, v = _inputs(B, Nq, Nkv, H, D, dtype, noncontig)
    g = randn(B, Nq, H, D, dtype=dtype, device=DEVICE)
    got = _fwd_bwd(lambda *t: attention(*t, softmax_scale=scale, causal=causal, backend="triton"), (q, k, v), g)
    ref = _fwd_bwd(lambda *t: A.attention_reference(*t, scale, causal), [_leaf(t.double()) for t in (q, k, v)],
                   g.double())
    torch_same = None
    if dtype != torch.float32:
        torch_same = _fwd_bwd(lambda *t: A.attention_reference(*t, scale, causal), [_leaf(t) for t in (q, k, v)], g)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert_close_to_ref(got[i], ref[i], None if torch_same is None else torch_same[i],
                            factor=2.0 if i == 0 else 3.0, atol=FP_ATOL[dtype], rtol=1e-4, name=name)


# (B, N, H, D, causal, dtype): a sparse walk over N x D x B·H x causal x dtype; big N only with B·H = 1.
CPU_CASES = [
    (1, 1, 1, 16, False, torch.float32),
    (1, 2, 6, 32, True, torch.float16),
    (2, 17, 3, 40, False, torch.float32),
    (1, 17, 6, 80, True, torch.float16),
    (1, 50, 1, 88, False, torch.float16),
    (2, 50, 3, 64, True, torch.float32),
    (1, 17, 1, 128, False, torch.float32),
    (1, 5, 2, 24, False, torch.float32),
    (1, 197, 1, 16, False, torch.float32),
    (1, 197, 1, 32, True, torch.float16),
    (1, 257, 1, 16, True, torch.float32),
    (1, 257, 1, 16, False, torch.float16),
]


@pytest.mark.parametrize("B,N,H,D,causal,dtype", CPU_CASES)
def test_attention_matches_reference(B, N, H, D, causal, dtype):
    _check_attention(B, N, N, H, D, causal, dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_noncontiguous(causal, dtype):
    _check_attention(2, 19, 19, 3, 40, causal, dtype, noncontig=True, scale=0.3)


@pytest.mark.parametrize("Nq,Nkv,causal", [(5, 17, False), (17, 5, True), (33, 9, False)])
def test_attention_different_lengths(Nq, Nkv, causal):
    # Causal is top-left aligned like F.scaled_dot_product_attention(is_causal=True).
    _check_attention(1, Nq, Nkv, 2, 32, causal, torch.float32)


# Every autotune config of the three kernels (the GPU autotuner may pick any of them; the interpreter
# otherwise runs one fixed config), with the memory checker on: BLOCK_M != BLOCK_N, blocks wider than N,
# causal, the backward's head-dim split on non-contiguous inputs.
ALL_CONFIGS = sorted(set(A._FWD_CONFIGS + A._DKDV_CONFIGS + A._DQ_CONFIGS))


def _tiles_fit(tiles, D, dtype, split=False) -> bool:
    """On a GPU, whether every kernel takes ``tiles`` at this head dim and dtype (the autotuner's pruning)."""
    if DEVICE != "cuda":
        return True
    es = torch.tensor([], dtype=dtype).element_size()
    with A.use_head_split("split" if split else "pad"):
        bd = sum(A._split_dims(D))
    return A._fits("fwd", tiles, A._block_d(D), es) and all(A._fits(k, tiles, bd, es) for k in ("dkdv", "dq"))


@pytest.mark.parametrize("tiles", ALL_CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_every_tile_config(tiles):
    ran = 0
    with A.use_tile_config(tiles):
        for B, Nq, Nkv, H, D, causal, dtype in ((1, 50, 50, 1, 80, True, torch.float32),
                                                  (1, 70, 33, 1, 16, False, torch.float32)):
            if _tiles_fit(tiles, D, dtype):
                _check_attention(B, Nq, Nkv, H, D, causal, dtype)
                ran += 1
        if _tiles_fit(tiles, 80, torch.float16, split=True):
            with A.use_head_split("split"):  # (on a GPU these strided operands pad: see _split_aligned)
                _check_attention(1, 37, 37, 2, 80, False, torch.float16, noncontig=True)
                ran += 1
    assert ran


def test_tile_config_and_autotune_switches():
    with pytest.raises(ValueError, match="tile config"):
        A.use_tile_config((64, 48, 4, 2))
    with A.use_tile_config((32, 64, 4, 2)):
        assert A._fixed_config("dkdv", dict(BLOCK_D=64, BLOCK_D2=0), 2) == (32, 64, 4, 2)
    assert A._forced_tiles == []
    if DEVICE == "cuda":  # autotune off (this file's default): the first config that fits
        assert A._fixed_config("fwd", dict(BLOCK_D=64), 2) == A._configs_for("fwd", 64, 2)[0]
        with A.use_tile_config((128, 128, 8, 2)), pytest.raises(ValueError, match="does not fit"):
            A._fixed_config("fwd", dict(BLOCK_D=256), 4)


def _check_qkv(B, N, H, D, dtype, pad=0):
    base = randn(B, N, 3 * H * D + pad, dtype=dtype, device=DEVICE)
    qkv = _leaf(base[..., pad:])  # pad > 0: row stride wider than the row, data pointer offset
    g = randn(B, N, H * D, dtype=dtype, device=DEVICE)
    out, dqkv = _fwd_bwd(lambda t: qkv_attention(t, H, backend="triton"), (qkv,), g)
    assert out.shape == (B, N, H * D) and out.is_contiguous() and dqkv.shape == qkv.shape
    ref, dref = _fwd_bwd(lambda t: A.qkv_attention_reference(t, H), (_leaf(qkv.double()),), g.double())
    same = None
    if dtype != torch.float32:
        same = _fwd_bwd(lambda t: A.qkv_attention_reference(t, H), (_leaf(qkv),), g)
    assert_close_to_ref(out, ref, None if same is None else same[0], atol=FP_ATOL[dtype], name="out")
    assert_close_to_ref(dqkv, dref, None if same is None else same[1], factor=3.0, atol=FP_ATOL[dtype],
                        name="dqkv")


@pytest.mark.parametrize("B,N,H,D,dtype,pad", [
    (2, 17, 3, 40, torch.float32, 0),
    (1, 50, 6, 16, torch.float16, 8),
    (1, 197, 1, 32, torch.float16, 0),
    (1, 2, 2, 80, torch.float32, 24),
])
def test_qkv_attention_matches_reference(B, N, H, D, dtype, pad):
    _check_qkv(B, N, H, D, dtype, pad)


# Split head dims in the backward (80 = 64 + 32, ...): the second chunk's loads, dots and stores in both kernels.
@pytest.mark.parametrize("B,N,H,D,causal,dtype", [
    (1, 17, 2, 80, False, torch.float32),
    (2, 33, 1, 72, True, torch.float16),
    (1, 50, 1, 96, True, torch.float32),
    (1, 9, 3, 72, False, torch.float16),
])
def test_split_head_dims_match_reference(B, N, H, D, causal, dtype):
    with A.use_head_split("split"):
        assert A._split_dims(D)[1] > 0
        _check_attention(B, N, N, H, D, causal, dtype)


def test_split_head_dims_noncontiguous_and_packed():
    with A.use_head_split("split"):
        _check_attention(2, 19, 19, 3, 80, False, torch.float32, noncontig=True, scale=0.3)
        _check_qkv(1, 21, 2, 80, torch.float16, 8)


@pytest.mark.parametrize("Nq,Nkv,D,causal", [(17, 50, 64, False), (33, 64, 32, False), (5, 31, 40, False),
                                          (40, 40, 32, True)])
def test_forward_split_tail_loop(Nq, Nkv, D, causal):
    """use_fwd_tail(True): the full key blocks unmasked and the last one apart (Nkv a multiple of the interpreter's
    BLOCK_N or not; head dims padded or not); causal keeps the masked loop. Same results as the reference."""
    with A.use_fwd_tail(True):
        _check_attention(1, Nq, Nkv, 2, D, causal, torch.float32)
        _check_attention(1, Nq, Nkv, 1, D, causal, torch.float16)
    assert A._fwd_tail == [] and A.FWD_SPLIT_TAIL is None  # restored; by default the autotuner's choice


@pytest.mark.parametrize("Nq,Nkv,D,dtype", [(17, 50, 64, torch.float32), (33, 64, 32, torch.float16),
                                             (5, 31, 40, torch.float32), (9, 32, 16, torch.float16),
                                             (40, 97, 80, torch.float32)])
def test_forward_lagged_pv(Nq, Nkv, D, dtype):
    """use_fwd_lag(True): each key block's P·V one block late, in the split loop (its full blocks: none at
    Nkv < 32, the interpreter's BLOCK_N; one; several, with and without a remainder) and in the masked one (every
    block). Same results as the reference, and bit-equal to the same loop without the lag (same sums in the same
    order), also with an attention mask and with dropout."""
    with A.use_fwd_lag(True):
        _check_attention(1, Nq, Nkv, 2, D, False, dtype)
    with A.use_fwd_lag(True), A.use_fwd_tail(False):
        _check_attention(1, Nq, Nkv, 1, D, False, dtype)
    assert A._fwd_lag == [] and A.FWD_LAG_PV is None  # restored; by default the autotuner's choice
    q, k, v = _inputs(2, Nq, Nkv, 2, D, dtype)
    mask = _masks("bias_fp32", 2, Nq, Nkv, 2, dtype, fresh_seed()).expand(2, -1, -1, -1)  # (B, H, Nq, Nkv) view
    for tail in (True, False):
        for kw in ({}, {"mask": mask}, {"dropout_p": 0.25, "seed": 1234}):
            outs = []
            for lag in (False, True):
                with A.use_fwd_tail(tail), A.use_fwd_lag(lag):
                    outs.append(A.attention_fwd(q, k, v, D ** -0.5, False, out=poison(torch.empty_like(q)), **kw))
            for a, b in zip(*outs):
                assert torch.equal(a, b), (tail, kw.keys(), (a - b).abs().max().item())
        with A.use_fwd_tail(tail), A.use_fwd_lag(True):  # no keys at all: no block to load, zero rows
            none = torch.zeros(2, 0, 2, D, dtype=dtype, device=DEVICE)
            out, _ = A.attention_fwd(q, none, none, D ** -0.5, False, out=poison(torch.empty_like(q)))
            assert torch.equal(out, torch.zeros_like(q)), tail


def test_forward_lag_routing(monkeypatch):
    """A forced lag launches LAG_PV in the split loop, or in the masked one where that is forced too; a forced loop
    form without it keeps LAG_PV off; by default (None) the launch leaves both to _launch (the autotuner's
    configs, or off)."""
    seen = []
    monkeypatch.setattr(A, "_launch_rows", lambda kind, n, bh, head, tail, consts, split: seen.append(dict(consts)))
    q = torch.zeros(1, 3, 1, 16, device=DEVICE)
    for uses, want in (((), (None, None)), ((A.use_fwd_lag(True),), (True, True)),
                       ((A.use_fwd_lag(True), A.use_fwd_tail(False)), (False, True)),
                       ((A.use_fwd_tail(False),), (False, False)), ((A.use_fwd_tail(True),), (True, False)),
                       ((A.use_fwd_lag(False),), (None, False))):
        with contextlib.ExitStack() as stack:
            for use in uses:
                stack.enter_context(use)
            A.attention_fwd(q, q, q, 0.25, False)
        got = seen.pop()
        assert (got["SPLIT_TAIL"], got["LAG_PV"]) == want, (uses, got)


def test_forward_persist_routing(monkeypatch):
    """use_fwd_persist(True) launches PERSIST with the masked loop, no lag and no row split, whatever else is forced,
    and passes B·H (the persistent loop's tile count); causal has no persistent form (the default's None); the
    default leaves it to _launch (None), False keeps it off."""
    seen = []
    monkeypatch.setattr(A, "_launch_rows", lambda kind, n, bh, head, tail, consts, split:
                        seen.append((dict(consts), split, tail[-1])))
    q = torch.zeros(2, 3, 5, 16, device=DEVICE)
    with A.use_fwd_persist(True), A.use_fwd_tail(True), A.use_fwd_lag(True), A.use_fwd_rows(True):
        A.attention_fwd(q, q, q, 0.25, False)
    consts, split, bh = seen.pop()
    assert (consts["PERSIST"], consts["SPLIT_TAIL"], consts["LAG_PV"], split, bh) == (True, False, False, False, 10)
    with A.use_fwd_persist(True):
        A.attention_fwd(q, q, q, 0.25, True)
    assert seen.pop()[0]["PERSIST"] is None
    A.attention_fwd(q, q, q, 0.25, False)
    assert seen.pop()[0]["PERSIST"] is None and A._fwd_persist == [] and A.FWD_PERSIST is None
    with A.use_fwd_persist(False):
        A.attention_fwd(q, q, q, 0.25, False)
    assert seen.pop()[0]["PERSIST"] is False


def _masks(kind, B, Nq, Nkv, H, dtype, seed):
    """Attention masks as timm, HF and BEiT give them (SDPA's (B, H, Nq, Nkv) order, broadcast)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, Nkv + 1, (B,), generator=g)
    keep = (torch.arange(Nkv)[None, :] < lens[:, None]).to(DEVICE)  # (B, Nkv): NaFlex-style key padding
    if kind == "bool_keys":  # (B, 1, 1, Nkv)
        return keep[:, None, None, :]
    if kind == "hf_additive":  # (B, 1, Nq, Nkv) in q's dtype, finfo.min where masked
        return torch.where(keep[:, None, None, :], 0.0, torch.finfo(dtype).min).expand(B, 1, Nq, Nkv).to(dtype)
    if kind == "bias_fp32":  # (1, H, Nq, Nkv): a relative-position bias (BEiT), fp32 whatever q's dtype
        return (torch.randn(1, H, Nq, Nkv, generator=g) * 2).to(DEVICE)
    full = torch.rand(B, H, Nq, Nkv, generator=g) > 0.4  # (B, H, Nq, Nkv) bool, every row keeps key 0
    full[..., 0] = True
    return full.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kind", ["bool_keys", "hf_additive", "bias_fp32", "bool_full"])
@pytest.mark.parametrize("B,Nq,Nkv,H,D", [(2, 13, 13, 3, 16), (1, 70, 70, 2, 64), (3, 9, 21, 1, 40)])
def test_attention_mask_matches_float64(B, Nq, Nkv, H, D, dtype, kind, monkeypatch):
    """The mask in the forward and backward kernels (bool: attend where True; float: added to the scaled logits):
    output, dq, dk, dv vs SDPA in float64 with the 2x/3x rule; the output is poisoned first and both kernels
    must see the mask."""
    q, k, v = _inputs(B, Nq, Nkv, H, D, dtype)
    mask = _masks(kind, B, Nq, Nkv, H, dtype, fresh_seed())
    seen = []
    fwd, bwd = A.attention_fwd, A.attention_bwd

    def spy_fwd(*a, **kw):
        seen.append(("fwd", kw.get("mask") is not None))
        return fwd(*a, out=poison(torch.empty_like(a[0])), **kw)
    monkeypatch.setattr(A, "attention_fwd", spy_fwd)
    monkeypatch.setattr(A, "attention_bwd", lambda *a, **kw: seen.append(("bwd", kw.get("mask") is not None))
                        or bwd(*a, **kw))
    g = randn(B, Nq, H, D, dtype=dtype, device=DEVICE)
    got = _fwd_bwd(lambda *t: attention(*t, attn_mask=mask, backend="triton"), (q, k, v), g)
    m64 = mask if mask.dtype == torch.bool else mask.double()
    ref = _fwd_bwd(lambda *t: A.attention_reference(*t, attn_mask=m64), [_leaf(t.double()) for t in (q, k, v)],
                   g.double())
    same = _fwd_bwd(lambda *t: A.attention_reference(*t, attn_mask=mask), [_leaf(t) for t in (q, k, v)], g) \
        if dtype != torch.float32 else [None] * 4
    assert seen == [("fwd", True), ("bwd", True)] and got[0].dtype == dtype
    for name, a, b, c, f in zip(("out", "dq", "dk", "dv"), got, ref, same, (2.0, 3.0, 3.0, 3.0)):
        assert_close_to_ref(a, b, c, factor=f, atol=FP_ATOL[dtype], name=name)


@pytest.mark.parametrize("learned", [False, True], ids=["const", "learned"])
@pytest.mark.parametrize("variant", ["fused", "split", "rows", "tail", "dropout"])
def test_attention_mask_backward_variants(variant, learned):
    """Every backward form takes the mask: the one-kernel backward, split head dims (80 = 64 + 16), the row
    splits, the split loops; and with dropout (the keep mask the op's seed draws, on the masked reference).
    ``learned``: the mask requires grad, its gradient (the kernels' dS, dropout's keep mask in it) vs float64."""
    B, N, H, D = 2, 37, 2, 80 if variant == "split" else 32
    q, k, v = _inputs(B, N, N, H, D, torch.float32)
    mask = _masks("hf_additive", B, N, N, H, torch.float32, fresh_seed())
    if learned:
        mask = _leaf(mask + randn(*mask.shape, device=DEVICE))
    g = randn(B, N, H, D, device=DEVICE)
    uses = {"fused": [A.use_bwd_fused(True)], "split": [A.use_head_split("split")],
            "rows": [A.use_bwd_rows(True), A.use_fwd_rows(True)], "tail": [A.use_bwd_tail(True), A.use_fwd_tail(True)],
            "dropout": []}[variant]
    p = 0.3 if variant == "dropout" else 0.0
    inputs = (q, k, v, mask) if learned else (q, k, v)
    torch.manual_seed(1234)
    with contextlib.ExitStack() as stack:
        for use in uses:
            stack.enter_context(use)
        got = _fwd_bwd(lambda *t: attention(*t[:3], attn_mask=t[3] if learned else mask, dropout_p=p,
                                            backend="triton"), inputs, g)
    torch.manual_seed(1234)
    keep = A.dropout_mask(B, H, N, N, p, A._draw_seed(p, torch.device(DEVICE)), torch.device(DEVICE)) if p else 1.0

    def ref_fn(q_, k_, v_, m_=None):
        s_ = torch.einsum("bnhd,bmhd->bhnm", q_, k_) * D ** -0.5 + (mask.detach().double() if m_ is None else m_)
        return torch.einsum("bhnm,bmhd->bnhd", torch.softmax(s_, -1) * keep / (1 - p), v_)

    ref = _fwd_bwd(ref_fn, [_leaf(t.double()) for t in inputs], g.double())
    for name, a, b in zip(("out", "dq", "dk", "dv", "dmask"), got, ref):
        assert_close_to_ref(a, b, name=name)


def test_attention_mask_rows_masked_everywhere():
    """A row whose keys are all masked, by False or by a value at or below -1e30 (HF's finfo.min): zeros, and zero
    gradients through it; the other rows as SDPA gives them."""
    B, N, H, D = 1, 6, 2, 16
    q, k, v = _inputs(B, N, N, H, D, torch.float32)
    keep = torch.ones(B, 1, N, N, dtype=torch.bool, device=DEVICE)
    keep[:, :, 2] = False  # query 2 sees nothing
    additive = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    g = randn(B, N, H, D, device=DEVICE)
    g[:, 2] = 0.0  # no gradient arrives at the empty row (SDPA's would be NaN or a uniform average there)
    for m in (keep, additive):
        out, dq, dk, dv = _fwd_bwd(lambda *t, m=m: attention(*t, attn_mask=m, backend="triton"), (q, k, v), g)
        assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2])) and torch.equal(dq[:, 2], torch.zeros_like(dq[:, 2]))
        rows = [i for i in range(N) if i != 2]
        ref = _fwd_bwd(lambda *t: A.attention_reference(*t, attn_mask=keep), [_leaf(t.double()) for t in (q, k, v)],
                       g.double())
        assert_close_to_ref(out[:, rows], ref[0][:, rows], name="out")
        for name, a, b in zip(("dk", "dv"), (dk, dv), ref[2:]):
            assert_close_to_ref(a, b, name=name)


_LEARNED_SHAPES = {  # mask shape for (B, N, H): SDPA-broadcast and windowed (Swin's (1, W, 1, N, N) + its bias)
    "bias_1hnn": lambda B, N, H: (1, H, N, N), "keys_b1nn": lambda B, N, H: (B, 1, N, N),
    "nn": lambda B, N, H: (N, N), "full": lambda B, N, H: (B, H, N, N), "win_1w1nn": lambda B, N, H: (1, 2, 1, N, N),
    "win_1whnn": lambda B, N, H: (1, 2, H, N, N), "win_gw1nn": lambda B, N, H: (B // 2, 2, 1, N, N),
}


@pytest.mark.parametrize("variant", ["split", "unchunked", "fused", "headsplit"])
@pytest.mark.parametrize("shape", list(_LEARNED_SHAPES))
def test_attention_learned_mask_gradient_in_the_kernels(shape, variant, monkeypatch):
    """A float mask that requires grad (BEiT's, Swin's relative-position bias): the kernels run forward and
    backward, the dK/dV kernel writes dS into an fp32 (B / C, H, Nq, Nkv) buffer (poisoned first: every element
    must be written), C = 2 launches each adding one batch of every chunk of 2 where the mask broadcasts over them
    (``unchunked`` and the one-kernel backward: C = 1), the rest summed where the mask broadcasts; out, dq, dk, dv
    and dmask vs float64, every backward form. Some keys carry -inf (Swin's shifted-window mask): their gradient is
    0, as SDPA's."""
    B, N, H, D = 4, 11, 2, 80 if variant == "headsplit" else 16
    q, k, v = _inputs(B, N, N, H, D, torch.float32)
    mshape = _LEARNED_SHAPES[shape](B, N, H)
    m = randn(*mshape, device=DEVICE, scale=2.0)
    m[..., 3] = torch.where(torch.rand(m[..., 3].shape, device=DEVICE) < 0.5, float("-inf"), m[..., 3])
    m = _leaf(m)
    bufs = []
    make = A._mask_grad_buffer

    def poisoned(*a):
        t = make(*a)
        bufs.append(t)
        return None if t is None else poison(t)
    monkeypatch.setattr(A, "_mask_grad_buffer", poisoned)
    if variant in ("unchunked", "fused"):
        monkeypatch.setattr(A, "_ds_chunk", lambda *a: 1)
    broadcast = len(mshape) < 4 or mshape[0] == 1  # over the batch (a windowed mask's groups)
    chunk = 2 if variant not in ("unchunked", "fused") and broadcast else 1  # (groups here: 4 or 2)
    g = randn(B, N, H, D, device=DEVICE)
    use = {"fused": A.use_bwd_fused(True), "headsplit": A.use_head_split("split")}.get(variant, A.use_bwd_fused(False))
    with use:
        got = _fwd_bwd(lambda *t: attention(*t[:3], attn_mask=t[3], backend="triton"), (q, k, v, m), g)
    assert len(bufs) == 1 and bufs[0] is not None and bufs[0].shape == (B // chunk, H, N, N), bufs[0].shape
    ref = _fwd_bwd(lambda *t: A.attention_reference(*t[:3], attn_mask=t[3]), [_leaf(t.double()) for t in (q, k, v, m)],
                   g.double())
    assert got[4].shape == mshape
    for name, a, b in zip(("out", "dq", "dk", "dv", "dmask"), got, ref):
        assert_close_to_ref(a, b, name=name)


def test_learned_mask_chunk_pick():
    """The batches a dS row sums (_chunk_for): a divisor of the groups, at most 16 and the launch's share, at least 1
    (a batch of 2 on a big GPU: 1; BEiT-B's batch 128 on 132 SMs: 8; Swin-T's 128 groups of 64 windows: 16)."""
    assert A._chunk_for(2, 0) == 1 and A._chunk_for(7, 5) == 1 and A._chunk_for(12, 5) == 4
    assert A._chunk_for(128, 128 * 12 * 4 // (4 * 132)) == 8 and A._chunk_for(128, 8192 * 3 // (4 * 132)) == 16
    m = torch.zeros(1, 2, 5, 5, device=DEVICE)
    assert A._ds_chunk(m, 4, 2, 5) == 2 and A._ds_chunk(m.expand(4, 2, 5, 5), 4, 2, 5) == 1
    assert A._ds_chunk(torch.zeros(1, 4, 1, 5, 5, device=DEVICE), 4, 2, 5) == 1  # one group: nothing to sum


@pytest.mark.parametrize("mdtype", [torch.float16, torch.float32], ids=["fp16-mask", "fp32-mask"])
def test_attention_learned_mask_fp16(mdtype):
    """fp16 q, k, v with a learned bias in fp16 (a model cast to half) or fp32 (a bias kept in fp32): dmask in the
    mask's dtype, within 3x PyTorch's own error in that dtype."""
    B, N, H, D = 2, 13, 2, 32
    q, k, v = _inputs(B, N, N, H, D, torch.float16)
    m = _leaf(randn(1, H, N, N, device=DEVICE, dtype=mdtype))
    g = randn(B, N, H, D, dtype=torch.float16, device=DEVICE)
    got = _fwd_bwd(lambda *t: attention(*t[:3], attn_mask=t[3], backend="triton"), (q, k, v, m), g)
    ref = _fwd_bwd(lambda *t: A.attention_reference(*t[:3], attn_mask=t[3]), [_leaf(t.double()) for t in (q, k, v, m)],
                   g.double())
    same = _fwd_bwd(lambda *t: A.attention_reference(*t[:3], attn_mask=t[3]), [_leaf(t) for t in (q, k, v, m)], g)
    assert got[4].dtype == mdtype
    for name, a, b, c in zip(("out", "dq", "dk", "dv", "dmask"), got, ref, same):
        if a.dtype == torch.float32:  # an fp32 mask's gradient: against float64 by the 16-bit inputs' rule
            a, c = a, c.float()
            assert max_err(a, b) <= 3 * max_err(c, b) + FP_ATOL[torch.float16], name
        else:
            assert_close_to_ref(a, b, c, factor=3.0, atol=FP_ATOL[torch.float16], name=name)


@pytest.mark.parametrize("rope", [None, "interleaved"])
def test_qkv_attention_learned_and_windowed_mask(rope):
    """Packed qkv with Swin's mask, a learned (1, H, N, N) bias plus a windowed (1, W, 1, N, N) 0 / -inf mask (one
    (1, W, H, N, N) tensor): out, the packed gradient and the bias's gradient vs float64; with RoPE too."""
    B, N, H, D, W = 6, 9, 2, 16, 3
    qkv = _leaf(randn(B, N, 3 * H * D, device=DEVICE))
    bias = _leaf(randn(1, H, N, N, device=DEVICE))
    win = torch.zeros(1, W, 1, N, N, device=DEVICE)
    win[0, 1, :, :, 4:] = float("-inf")
    win[0, 1, :, 4:, :4] = float("-inf")
    kw = {}
    if rope:
        ang = randn(N - 1, D, dtype=torch.float64, device=DEVICE, scale=3.0)
        kw = dict(rope=torch.cat([ang.sin(), ang.cos()], -1).float(), rope_prefix=1)
    g = randn(B, N, H * D, device=DEVICE)
    got = _fwd_bwd(lambda t, b: qkv_attention(t, H, attn_mask=b.unsqueeze(1) + win, backend="triton", **kw),
                   (qkv, bias), g)
    kw64 = {k_: (v_.double() if isinstance(v_, torch.Tensor) else v_) for k_, v_ in kw.items()}
    ref = _fwd_bwd(lambda t, b: A.qkv_attention_reference(t, H, attn_mask=b.unsqueeze(1) + win.double(), **kw64),
                   (_leaf(qkv.double()), _leaf(bias.double())), g.double())
    for name, a, b in zip(("out", "dqkv", "dbias"), got, ref):
        assert_close_to_ref(a, b, name=name)
    # the same as Swin's eager math on (B / W, W, H, N, N) scores
    q, k, v = qkv.detach().view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    if not rope:
        s = (q @ k.transpose(-1, -2) * D ** -0.5 + bias.detach()).view(B // W, W, H, N, N) + win.squeeze(0)
        swin = (s.view(B, H, N, N).softmax(-1) @ v).transpose(1, 2).reshape(B, N, H * D)
        assert_close_to_ref(got[0], swin.double(), name="swin eager")


def test_windowed_mask_bad_inputs():
    q, k, v = (t.detach() for t in _inputs(4, 5, 5, 2, 8, torch.float32))
    with pytest.raises(ValueError, match="W dividing the batch"):
        attention(q, k, v, attn_mask=torch.zeros(1, 3, 1, 5, 5, device=DEVICE))
    with pytest.raises(ValueError, match="does not broadcast to"):
        attention(q, k, v, attn_mask=torch.zeros(3, 2, 1, 5, 5, device=DEVICE))  # 3 groups, B / W = 2
    with pytest.raises(ValueError, match="at most 4 dims"):
        attention(q, k, v, attn_mask=torch.zeros(1, 1, 2, 1, 5, 5, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,N,H,D,kind,rope", [(2, 13, 3, 16, "bool_keys", None), (1, 37, 2, 40, "hf_additive", None),
                                              (2, 9, 2, 32, "bias_fp32", "interleaved"),
                                              (1, 21, 1, 24, "bool_full", "half"),
                                              (2, 11, 2, 16, "hf_additive", "learned")])
def test_qkv_attention_mask_matches_float64(B, N, H, D, kind, rope, dtype, monkeypatch):
    """Packed qkv with an attention mask (NaFlex / SigLIP2 padding, a relative-position bias), alone and with
    RoPE (a learned rope: rotated by the reference, the masked kernels after): output and the packed gradient
    vs float64; both kernels see the mask and the gradient is one packed tensor."""
    base = randn(B, N, 3 * H * D + 8, dtype=dtype, device=DEVICE)
    qkv = _leaf(base[..., 8:])  # row stride wider than the row
    mask = _masks(kind, B, N, N, H, dtype, fresh_seed())
    table = None
    if rope is not None:
        ang = randn(N - 1, D, dtype=torch.float64, device=DEVICE, scale=3.0)  # cat(sin, cos): (N - 1, 2D)
        table = torch.cat([ang.sin(), ang.cos()], -1).float()
        table = table.requires_grad_() if rope == "learned" else table
    kw = dict(rope=table, rope_prefix=1 if rope else 0, rope_half=rope == "half")
    seen = []
    fwd, bwd = A.attention_fwd, A.attention_bwd
    monkeypatch.setattr(A, "attention_fwd", lambda *a, **k: seen.append(("fwd", k.get("mask") is not None))
                        or fwd(*a, **k))
    monkeypatch.setattr(A, "attention_bwd", lambda *a, **k: seen.append(("bwd", k.get("mask") is not None))
                        or bwd(*a, **k))
    g = randn(B, N, H * D, dtype=dtype, device=DEVICE)
    out, dqkv = _fwd_bwd(lambda t: qkv_attention(t, H, attn_mask=mask, backend="triton", **kw), (qkv,), g)
    assert seen == [("fwd", True), ("bwd", True)] and out.shape == (B, N, H * D)
    m64 = mask if mask.dtype == torch.bool else mask.double()
    kw64 = dict(kw, rope=None if table is None else table.detach().double())
    ref = _fwd_bwd(lambda t: A.qkv_attention_reference(t, H, attn_mask=m64, **kw64), (_leaf(qkv.double()),), g.double())
    same = [None, None]
    if dtype != torch.float32:
        kws = dict(kw, rope=None if table is None else table.detach().to(dtype))
        same = _fwd_bwd(lambda t: A.qkv_attention_reference(t, H, attn_mask=mask, **kws), (_leaf(qkv),), g)
    assert_close_to_ref(out, ref[0], same[0], atol=FP_ATOL[dtype], name="out")
    assert_close_to_ref(dqkv, ref[1], same[1], factor=3.0, atol=FP_ATOL[dtype], name="dqkv")


def test_qkv_attention_mask_equals_attention_on_views():
    """qkv_attention(attn_mask=) = attention on the strided q, k, v views with the same mask, bit for bit (dropout
    too: the same seed draws the same keep mask); a learned mask's gradient flows (from the kernels)."""
    B, N, H, D = 2, 19, 2, 16
    qkv = randn(B, N, 3 * H * D, device=DEVICE)
    mask = _masks("bool_keys", B, N, N, H, torch.float32, fresh_seed())
    for p in (0.0, 0.25):
        torch.manual_seed(11)
        packed = qkv_attention(qkv, H, attn_mask=mask, dropout_p=p, backend="triton")
        torch.manual_seed(11)
        views = attention(*qkv.view(B, N, 3, H, D).unbind(2), attn_mask=mask, dropout_p=p, backend="triton")
        assert torch.equal(packed, views.flatten(-2)), p
    bias = _leaf(_masks("bias_fp32", B, N, N, H, torch.float32, fresh_seed()))
    qkv_attention(qkv, H, attn_mask=bias, backend="triton").square().sum().backward()
    b64 = _leaf(bias.detach().double())
    A.qkv_attention_reference(qkv.double(), H, attn_mask=b64).square().sum().backward()
    assert_close_to_ref(bias.grad, b64.grad, name="dbias")
    with pytest.raises(ValueError, match="does not broadcast to"):
        qkv_attention(qkv, H, attn_mask=torch.ones(B, 3, N, N, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        qkv_attention(qkv, H, attn_mask=torch.ones(N, N, dtype=torch.int64, device=DEVICE))


def test_attention_mask_1d_and_nan():
    """A 1-D key mask (Nkv,) broadcasts on every path (the reference gets it as (1, 1, 1, Nkv): SDPA's math path
    refuses 1-D); a NaN in an additive mask reaches its query row (NaN there, as SDPA), the other rows as usual."""
    q, k, v = (t.detach() for t in _inputs(1, 4, 5, 2, 16, torch.float32))
    keep = torch.tensor([True, False, True, True, False], device=DEVICE)
    want = A.attention_reference(q, k, v, attn_mask=keep[None, None, None, :])
    for backend in ("triton", "torch", None):
        assert_close_to_ref(attention(q, k, v, attn_mask=keep, backend=backend), want, name=str(backend))
    qkv = torch.cat([t.flatten(-2) for t in (q, q, q)], -1)  # (1, 4, 3·H·D), self-attention
    assert_close_to_ref(qkv_attention(qkv[:, :, :], 2, attn_mask=torch.ones(4, dtype=torch.bool, device=DEVICE)),
                        A.qkv_attention_reference(qkv, 2), name="qkv 1-D")
    bias = torch.zeros(4, 5, device=DEVICE)
    bias[1, 2] = float("nan")
    got = attention(q, k, v, attn_mask=bias, backend="triton")
    ref = attention(q, k, v, attn_mask=bias, backend="torch")
    assert torch.isnan(got[:, 1]).all() and torch.isnan(ref[:, 1]).all()
    rows = [0, 2, 3]
    assert_close_to_ref(got[:, rows], A.attention_reference(q, k, v)[:, rows], name="other rows")


def _log2_domain_attention(q, k, v, bias):
    """Attention as the kernel rounds it, in q's dtype: logits s·(scale·log2 e) + bias·log2 e, softmax by exp2.
    q, k, v (B, N, H, D), bias (Nq, Nkv). Where the bias is large, rounding those logits is most of an fp32
    result's error, and it differs from torch's natural-domain rounding (s·scale + bias) case by case."""
    log2e = torch.tensor(A.LOG2E, dtype=q.dtype)
    t = torch.einsum("bqhd,bkhd->bhqk", q, k) * (q.shape[-1] ** -0.5 * log2e) + bias * log2e  # (B, H, Nq, Nkv)
    p = torch.exp2(t - t.amax(-1, keepdim=True).detach())
    return torch.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdim=True), v)


@pytest.mark.parametrize("variant", ["split", "fused"])
def test_attention_mask_large_finite_bias_backward(variant):
    """A query row whose every key carries one large finite negative bias (BERT-style -1e4, -1e7, -1e12: above the
    -1e30 that masks): the backward rebuilds P from the forward's row max and log2 row sum (STATS), not from one
    rounded LSE, which at |logit| ~ 1.4e7 is off by an ulp of 1 (P off up to 2x). Output and grads vs float64 no
    worse than 3x the error of the same math in fp32 rounded as the kernel rounds its logits, with P normalized
    exactly (_log2_domain_attention): a logit's own rounding (half an ulp: 5e-4 at -1e4, 0.5 at -1e7) is most
    of the error there. Not torch's fp32 error: which domain rounds luckier changes with the inputs (the output,
    4 keys: 9 of 100 random seeds put ours over 3x torch's), and torch's CPU backward rebuilds P from an LSE
    itself (dv 0.08 off at the zeroed row below, -1e7). The zeroed row (three keys, logits exactly the bias:
    P exactly 1/3) has no rounding noise; a rounded LSE there (bias·log2 e + log2 3 to the ulp) gives P = 1/4.
    Stats made LSE-like (max + log2 sum, 0) fail this test at -1e4 already."""
    torch.manual_seed(fresh_seed())
    use = A.use_bwd_fused(variant == "fused")
    with use:
        for nkv, zero_row in ((1, False), (4, False), (3, True)):
            q, k, v, g = (randn(1, n, 1, 16, device=DEVICE) for n in (3, nkv, nkv, 3))
            if zero_row:
                q[:, 1] = 0
            for val in (-1e4, -1e7, -1e12):
                m = torch.zeros(3, nkv, device=DEVICE)
                m[1] = val
                res = {}
                for name, dt, fn in (("ours", torch.float32, "triton"), ("log2", torch.float32, _log2_domain_attention),
                                     ("f64", torch.float64, "torch")):
                    lv = [_leaf(t.to(dt)) for t in (q, k, v)]
                    o = attention(*lv, attn_mask=m.to(dt), backend=fn) if isinstance(fn, str) else fn(*lv, m.to(dt))
                    res[name] = [o.detach(), *torch.autograd.grad(o, lv, g.to(dt))]
                for i, name in enumerate(("out", "dq", "dk", "dv")):
                    err = max_err(res["ours"][i], res["f64"][i])
                    floor = max_err(res["log2"][i], res["f64"][i])
                    assert err <= 3 * floor + 1e-5, (nkv, zero_row, val, name, err, floor)


def test_attention_mask_bad_inputs():
    q, k, v = (t.detach() for t in _inputs(2, 5, 5, 2, 8, torch.float32))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        attention(q, k, v, attn_mask=torch.ones(2, 1, 5, 5, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="does not broadcast to"):
        attention(q, k, v, attn_mask=torch.ones(2, 3, 5, 5, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="does not broadcast to"):
        attention(q, k, v, attn_mask=torch.ones(5, 4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="not both"):
        attention(q, k, v, causal=True, attn_mask=torch.ones(5, 5, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="at most 4 dims"):
        attention(q, k, v, attn_mask=torch.ones(1, 1, 2, 1, 5, 5, dtype=torch.bool, device=DEVICE))
    empty = torch.randn(1, 3, 1, 0, device=DEVICE)
    for backend in ("triton", "torch"):
        with pytest.raises(ValueError, match="head dim D must be at least 1"):
            attention(empty, empty, empty, backend=backend)
        with pytest.raises(ValueError, match="positive and divisible by 3"):
            qkv_attention(torch.randn(1, 3, 0, device=DEVICE), 1, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("B,N,H,D", [(4, 197, 12, 64), (2, 257, 16, 80), (2, 577, 6, 64)])
def test_default_autotunes_the_loop_form_gpu(B, N, H, D, autotuned):
    """The default (FWD_SPLIT_TAIL, BWD_SPLIT_TAIL None) on a GPU: the autotuners whose configs carry the loop
    form run the forward, dK/dV and dQ; packed qkv forward and gradient vs float64 in bf16 (2x/3x rule)."""
    assert A.FWD_SPLIT_TAIL is None and A.BWD_SPLIT_TAIL is None
    _check_qkv(B, N, H, D, torch.bfloat16)
    for kind in A.AUTO_TAIL_KINDS:
        picks = list(A._attn_tuned_auto[kind].tuner.cache.values())
        assert picks and all(isinstance(c.kwargs["SPLIT_TAIL"], bool) for c in picks), kind
        assert kind != "fwd" or all(isinstance(c.kwargs["LAG_PV"], bool) for c in picks)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [None, (64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3)])
@pytest.mark.parametrize("B,N,H,D", [(4, 197, 12, 64), (2, 257, 16, 80), (2, 577, 6, 64)])
def test_forward_lagged_pv_gpu(B, N, H, D, cfg, autotuned):
    """use_fwd_lag(True) on a GPU at ViT shapes in bf16, where the lagged loop runs several key blocks (the per-config
    test's N = 97 runs one 64-wide block, no loop): packed qkv output and gradient vs float64 (2x/3x rule),
    autotuned (cfg None); the output alone at the lag's tiles the autotuner tries (forced tiles would force the
    backward's too)."""
    if cfg is None:
        with A.use_fwd_lag(True):
            _check_qkv(B, N, H, D, torch.bfloat16)
        with A.use_fwd_lag(False):  # forced off, the loop form the autotuner's (_attn_tuned_auto_nolag)
            _check_qkv(B, N, H, D, torch.bfloat16)
        return
    qkv = randn(B, N, 3 * H * D, dtype=torch.bfloat16, device=DEVICE)
    with A.use_fwd_lag(True), A.use_tile_config(cfg), torch.no_grad():
        out = qkv_attention(qkv, H, backend="triton")
    assert_close_to_ref(out, A.qkv_attention_reference(qkv.double(), H), A.qkv_attention_reference(qkv, H),
                        atol=FP_ATOL[torch.bfloat16], name="out")


@pytest.mark.gpu
@pytest.mark.parametrize("N", [197, 577])
def test_every_forward_tile_gpu(N):
    """Each forward tile the autotuner may pick at ViT's head dim 64 in bf16 (_configs_for: 128-row tiles on one
    warpgroup among them), in each loop form it tries there (_auto_forms, the persistent one included), forced
    alone: packed qkv output vs float64 (2x rule)."""
    B, H, D = 2, 6, 64
    qkv = randn(B, N, 3 * H * D, dtype=torch.bfloat16, device=DEVICE)
    tiles = A._configs_for("fwd", 64, 2)
    assert (128, 128, 4, 3) in tiles and (128, 64, 4, 3) in tiles
    runs = [(f"{cfg} {form}", lambda cfg=cfg, form=form: (
        A.use_tile_config(cfg), A.use_fwd_tail(form["SPLIT_TAIL"]), A.use_fwd_lag(form["LAG_PV"]),
        A.use_fwd_persist(bool(form["PERSIST"])))) for cfg in tiles for form in A._auto_forms("fwd", cfg)]
    bad = _bad_forward_runs(qkv, H, runs)
    assert not bad, bad


def _bad_forward_runs(qkv, H, runs) -> list:
    """The failures of ``runs``, (name, a function giving the context managers to run under): each the packed qkv
    forward in bf16 vs float64 (2x rule)."""
    ref64, ref = A.qkv_attention_reference(qkv.double(), H), A.qkv_attention_reference(qkv, H)
    bad = []
    for name, uses in runs:
        with contextlib.ExitStack() as stack, torch.no_grad():
            for use in uses():
                stack.enter_context(use)
            out = qkv_attention(qkv, H, backend="triton")
        try:
            assert_close_to_ref(out, ref64, ref, atol=FP_ATOL[torch.bfloat16], name=name)
        except AssertionError as e:
            bad.append(str(e).splitlines()[0][:200])
    return bad


@pytest.mark.gpu
@pytest.mark.parametrize("N,D", [(50, 64), (197, 64), (577, 64), (257, 80)])
def test_persistent_forward_gpu(N, D, autotuned):
    """use_fwd_persist(True) on a Hopper GPU with several tiles a program (B·H·tiles > SMs x PERSIST): each
    persistent tile forced alone (packed qkv output vs float64, 2x rule), then autotuned among them with the
    gradients through the default backward (2x/3x rule)."""
    if A.cuda_major(torch.device(DEVICE)) < 9:
        pytest.skip("the persistent forward runs on sm_90+ only (PERSIST_TILES); gpu_check.sh runs this on H100/H200")
    B, H = 48 if N < 128 else 24, 12
    assert B * H * -(-N // 128) > 3 * torch.cuda.get_device_properties(0).multi_processor_count
    qkv = randn(B, N, 3 * H * D, dtype=torch.bfloat16, device=DEVICE)
    bad = _bad_forward_runs(qkv, H, [(f"{cfg}", lambda cfg=cfg: (A.use_tile_config(cfg), A.use_fwd_persist(True)))
                                     for cfg in A.persist_tiles(A._block_d(D))])
    assert not bad, bad
    with A.use_fwd_persist(True):
        _check_qkv(B, N, H, D, torch.bfloat16)


@pytest.mark.skipif(not A.HAS_TRITON, reason="builds triton.Config objects")
def test_autotuner_picks_the_loop_form(monkeypatch):
    """Where the loop form is left to the autotuner: the forward tries the split form alone at 64/128-wide key
    blocks (the masked one has more instructions there) and both at 32; the backward both at run 6's picks, the
    split form elsewhere; every tile of the plain lists is in; causal launches keep one form a tile."""
    def forms(kind):
        return [((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages), c.kwargs["SPLIT_TAIL"])
                for c in A._triton_auto_configs(kind) if not c.kwargs.get("PERSIST")]

    fwd = forms("fwd")
    assert {t for t, _ in fwd} == set(A._FWD_CONFIGS) | {A._FWD_FALLBACK}
    lags = [((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages), c.kwargs["SPLIT_TAIL"])
            for c in A._triton_auto_configs("fwd") if c.kwargs["LAG_PV"]]
    persist = [((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages), c.kwargs["PERSIST"])
               for c in A._triton_auto_configs("fwd") if c.kwargs["PERSIST"]]  # each (tile, programs an SM) once
    assert sorted(persist) == sorted({(t, p) for table in A.PERSIST_TILES.values() for t, p in table.items()})
    assert {t for t, _ in persist} <= set(A._FWD_CONFIGS) and not any(  # (the persistent form: the masked loop)
        c.kwargs["SPLIT_TAIL"] or c.kwargs["LAG_PV"] for c in A._triton_auto_configs("fwd") if c.kwargs["PERSIST"])
    assert sorted(lags) == sorted((c, t) for c in A._FWD_CONFIGS if A._lag_ok(c) for t in A._auto_tails("fwd", c))
    assert (64, 64, 4, 3) in [c for c, _ in lags] and not any(c[:3] == (128, 64, 4) for c, _ in lags)
    assert len(fwd) == len(set(fwd)) + len(lags)  # each (tile, form) once, plus its lagged twin
    for tile, tail in fwd:
        assert tail or tile[1] < 64 or tile == A._FWD_FALLBACK, tile
    assert {t for t, tail in fwd if not tail} == {c for c in A._FWD_CONFIGS if c[1] < 64} | {A._FWD_FALLBACK}
    for kind, table in (("dkdv", A._DKDV_CONFIGS), ("dq", A._DQ_CONFIGS)):
        got = forms(kind)
        assert len(got) == len(set(got))
        assert {t for t, tail in got if tail} == set(table)
        assert {t for t, tail in got if not tail} == A._RUN6_BWD_PICKS[kind] | {A._table(kind)[1]}
    prune = A._make_prune("fwd", "Q")
    q = torch.empty(1, dtype=torch.bfloat16)
    configs = A._triton_auto_configs("fwd")
    both = prune(configs, {"Q": q}, BLOCK_D=64, CAUSAL=False)
    one = prune(configs, {"Q": q}, BLOCK_D=64, CAUSAL=True)
    assert len(both) > len(one) == len({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                                        for c in both})
    assert not any(c.kwargs["LAG_PV"] or c.kwargs["PERSIST"] for c in one)  # (no causal persistent form)
    assert sum(c.kwargs["LAG_PV"] for c in both) == len(lags)
    for block_d in (16, 64, 128, 256):  # each tile of the head-dim block's table at its programs an SM, once
        kept = prune(configs, {"Q": q}, BLOCK_D=block_d, CAUSAL=False)
        assert sorted(((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages), c.kwargs["PERSIST"])
                      for c in kept if c.kwargs["PERSIST"]) == sorted(A.persist_tiles(block_d).items()), block_d
    assert not A.persist_tiles(256) and A.persist_tiles(32) == A.PERSIST_TILES[64]
    for extra in ({"MASK_KIND": 1}, {"DROPOUT": True}):  # the lag's wgmmas come out synchronous there: left out
        kept = prune(configs, {"Q": q}, BLOCK_D=64, CAUSAL=False, **extra)
        assert not any(c.kwargs["LAG_PV"] for c in kept) and len(kept) == len(both) - len(lags)

    class CudaQ:  # an operand of ``size`` bytes an element on a CUDA device, as the prune sees it
        device = torch.device("cuda", 0)

        def __init__(self, size=2):
            self.size = size

        def element_size(self):
            return self.size
    for major in (9, 8):  # the 128-row tiles on one warpgroup (m64 wgmmas), the persistent form: Hopper only
        monkeypatch.setattr(A, "cuda_major", lambda dev, major=major: major)
        kept = prune(configs, {"Q": CudaQ()}, BLOCK_D=64, CAUSAL=False)
        tiles = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}
        assert ({(128, 128, 4, 3), (128, 64, 4, 3)} <= tiles) == (major == 9), major
        assert tiles >= {(64, 64, 4, 3), (128, 64, 8, 3)} and all(A._hopper_only("fwd", t) <= (major == 9) for t in tiles)
        assert sum(bool(c.kwargs["PERSIST"]) for c in kept) == (len(A.PERSIST_TILES[64]) if major == 9 else 0)
    for size, block_d in ((4, 64), (2, 256)):  # fp32, wider heads than PERSIST_TILES has: no persistent form
        assert not any(c.kwargs["PERSIST"] for c in prune(configs, {"Q": CudaQ(size)}, BLOCK_D=block_d, CAUSAL=False))


def test_launch_leaves_the_loop_form_to_the_autotuner(monkeypatch):
    """_launch with SPLIT_TAIL None: the autotuner with the form in its configs (fwd, dkdv, dq on a GPU with
    autotuning on); a forced form, or another kind, the plain autotuner; fixed tiles: the masked loop.
    The caller's consts are left as they were (the backward shares one dict between its launches)."""
    calls = []

    class Rec:
        def __init__(self, name):
            self.name = name

        def __call__(self, grid, args, consts):
            calls.append((self.name, dict(consts)))

    monkeypatch.setattr(A, "INTERPRET", False)
    monkeypatch.setattr(A, "_autotune", True)
    monkeypatch.setattr(A, "_attn_tuned_auto", {k: Rec("auto") for k in A.AUTO_TAIL_KINDS})
    monkeypatch.setattr(A, "_attn_tuned", {k: Rec("plain") for k in A.KINDS})
    consts = dict(HEAD_DIM=64, BLOCK_D=64, CAUSAL=False, SPLIT_TAIL=None)
    args = (torch.empty(1, dtype=torch.float16),)
    for kind in ("fwd", "dkdv", "dq"):
        A._launch(kind, 10, 2, args, consts)
        assert calls.pop() == ("auto", dict(HEAD_DIM=64, BLOCK_D=64, CAUSAL=False))
    A._launch("fwd_rows", 10, 2, args, consts)
    assert calls.pop() == ("plain", dict(consts, SPLIT_TAIL=False, PERSIST=0))
    A._launch("fused", 1, 2, args, consts)
    assert calls.pop() == ("plain", dict(consts, SPLIT_TAIL=False))
    A._launch("dq", 10, 2, args, dict(consts, SPLIT_TAIL=True))
    assert calls.pop() == ("plain", dict(consts, SPLIT_TAIL=True))
    assert consts["SPLIT_TAIL"] is None
    lag = dict(consts, LAG_PV=None)  # the forward's lag: the auto tuner's too, else off; a forced one stays
    A._launch("fwd", 10, 2, args, lag)
    assert calls.pop() == ("auto", dict(HEAD_DIM=64, BLOCK_D=64, CAUSAL=False))
    A._launch("fwd_rows", 10, 2, args, lag)
    assert calls.pop() == ("plain", dict(consts, SPLIT_TAIL=False, LAG_PV=False, PERSIST=0))
    A._launch("fwd", 10, 2, args, dict(lag, SPLIT_TAIL=True, LAG_PV=True))
    assert calls.pop() == ("plain", dict(consts, SPLIT_TAIL=True, LAG_PV=True, PERSIST=0))
    assert lag["LAG_PV"] is None
    monkeypatch.setattr(A, "_attn_tuned_auto_nolag", {"fwd": Rec("nolag")})  # use_fwd_lag(False), the form left
    A._launch("fwd", 10, 2, args, dict(lag, LAG_PV=False))  # to the autotuner: its configs without the lag
    assert calls.pop() == ("nolag", dict(HEAD_DIM=64, BLOCK_D=64, CAUSAL=False, LAG_PV=False))
    persist = {}  # use_fwd_persist: on, its configs alone (the form theirs); off, the others (the lag as asked)
    monkeypatch.setattr(A, "_fwd_persist_tuner", lambda lag, on: persist.setdefault((lag, on), Rec(f"persist{lag}{on}")))
    A._launch("fwd", 10, 2, args, dict(lag, PERSIST=True, LAG_PV=True))
    assert calls.pop() == ("persistFalseTrue", dict(HEAD_DIM=64, BLOCK_D=64, CAUSAL=False))
    A._launch("fwd", 10, 2, args, dict(lag, PERSIST=False))
    assert calls.pop() == ("persistTrueFalse", dict(HEAD_DIM=64, BLOCK_D=64, CAUSAL=False))
    A._launch("fwd", 10, 2, args, dict(lag, PERSIST=False, LAG_PV=False))
    assert calls.pop() == ("persistFalseFalse", dict(HEAD_DIM=64, BLOCK_D=64, CAUSAL=False))
    A._launch("fwd", 10, 2, args, dict(lag, PERSIST=None))
    assert calls.pop() == ("auto", dict(HEAD_DIM=64, BLOCK_D=64, CAUSAL=False))
    launched = []

    class Kern:
        def __getitem__(self, grid):
            return lambda *a, **k: launched.append(k["SPLIT_TAIL"])

    monkeypatch.setattr(A, "_kernel", lambda kind: Kern())
    monkeypatch.setattr(A, "_autotune", False)
    A._launch("fwd", 10, 2, args, consts)
    with A.use_tile_config((32, 32, 4, 1)):
        monkeypatch.setattr(A, "_autotune", True)
        A._launch("dkdv", 10, 2, args, consts)
    assert launched == [False, False] and not calls


def _spy_persist(monkeypatch) -> list:
    """(programs, PERSIST) of each forward launch from here on."""
    seen, real = [], A.launch

    def spy(kernel, grid, *args, **consts):
        if "PERSIST" in consts:
            seen.append((grid[0], consts["PERSIST"]))
        return real(kernel, grid, *args, **consts)
    monkeypatch.setattr(A, "launch", spy)
    return seen


@pytest.mark.parametrize("B,Nq,Nkv,H,D,dtype,noncontig", [
    (2, 70, 97, 3, 40, torch.float32, False),  # 18 tiles of the interpreter's 32 rows for 2 programs, partial ones
    (1, 5, 31, 2, 64, torch.float16, True),    # one partial tile a head, one partial key block, strided inputs
    (3, 33, 1, 1, 16, torch.float32, False),   # one key
])
def test_persistent_forward(B, Nq, Nkv, H, D, dtype, noncontig, monkeypatch):
    """use_fwd_persist(True): _INTERPRET_PERSIST programs in all loop over every (query block, head) tile, the key
    loop masked (PERSIST in _attn_fwd): output and gradients vs float64 (2x/3x rule)."""
    seen = _spy_persist(monkeypatch)
    with A.use_fwd_persist(True):
        _check_attention(B, Nq, Nkv, H, D, False, dtype, noncontig)
    tiles = -(-Nq // A._INTERPRET_CONFIG[0]) * B * H
    assert seen == [(min(tiles, A._INTERPRET_PERSIST), A._INTERPRET_PERSIST)]
    seen.clear()
    with A.use_fwd_persist(True):  # causal: no persistent form, the default runs
        _check_attention(1, 17, 17, 2, 32, True, torch.float32)
    assert seen == [(2 * -(-17 // A._INTERPRET_CONFIG[0]), 0)]
    q, _, _ = _inputs(B, Nq, 1, H, D, dtype)
    none = torch.zeros(B, 0, H, D, dtype=dtype, device=DEVICE)
    with A.use_fwd_persist(True):  # no keys at all: an empty key loop a tile, zero rows
        out, _ = A.attention_fwd(q, none, none, D ** -0.5, False, out=poison(torch.empty_like(q)))
    assert torch.equal(out, torch.zeros_like(q))


@pytest.mark.parametrize("kind", ["bool_full", "hf_additive", "dropout"])
def test_persistent_forward_same_as_one_tile_a_program(kind, monkeypatch):
    """The persistent forward with an attention mask or dropout (the keep mask is drawn by each score's place):
    bit-equal outputs and stats to one tile a program (the same masked loop, tile for tile), poisoned outputs
    all written."""
    B, N, H, D = 2, 45, 3, 32
    q, k, v = (randn(B, N, H, D, dtype=torch.float16, device=DEVICE) for _ in range(3))
    mask = None if kind == "dropout" else _masks(kind, B, N, N, H, torch.float16, fresh_seed()).expand(B, H, N, N)
    p, seed = (0.3, 1234) if kind == "dropout" else (0.0, None)
    seen = _spy_persist(monkeypatch)
    outs = []
    for on in (False, True):
        out = torch.full((B, N, H, D), float("nan"), dtype=torch.float16, device=DEVICE)
        lse = torch.full((B, H, 2, N), float("nan"), device=DEVICE)
        with A.use_fwd_persist(on):
            outs.append(A.attention_fwd(q, k, v, D ** -0.5, False, out=out, lse=lse, dropout_p=p, seed=seed,
                                        mask=mask))
    assert [s[1] for s in seen] == [0, A._INTERPRET_PERSIST]
    for a, b in zip(*outs):
        assert not a.isnan().any() and torch.equal(a, b)
    if kind != "dropout":
        ref = A.attention_reference(q.double(), k.double(), v.double(), attn_mask=mask if mask.dtype == torch.bool
                                    else mask.double())
        assert_close_to_ref(outs[1][0], ref, A.attention_reference(q, k, v, attn_mask=mask), atol=FP_ATOL[torch.float16],
                            name="out")


@pytest.mark.parametrize("cfg,Nkv", [((32, 64, 4, 1), 97), ((16, 128, 4, 1), 130), ((16, 128, 4, 1), 31),
                                     ((32, 16, 4, 1), 50)])
def test_forward_split_tail_wide_blocks(cfg, Nkv):
    """use_fwd_tail(True) with key blocks wider than the remainder's 32: full blocks unmasked, then up to
    BLOCK_N / 32 masked blocks of 32 (and a BLOCK_N below 32 keeps its own width)."""
    with A.use_fwd_tail(True), A.use_tile_config(cfg):
        _check_attention(1, 7, Nkv, 2, 40, False, torch.float32)


@pytest.mark.parametrize("B,Nq,Nkv,H,D,dtype,split", [
    (1, 17, 50, 2, 40, torch.float32, False),  # partial last blocks in both loops, padded head dim
    (1, 64, 96, 1, 64, torch.float16, False),  # no partial block (multiples of the interpreter's 32)
    (2, 33, 33, 1, 80, torch.float32, True),   # split head dim 64 + 32
    (1, 5, 31, 2, 72, torch.float16, True),    # one partial block each, no full one
])
def test_backward_split_tail_loops(B, Nq, Nkv, H, D, dtype, split):
    """use_bwd_tail(True): dK/dV's query loop and dQ's key loop run their full blocks unmasked and the partial
    last one apart; causal keeps the masked loops. Same results as the reference."""
    with A.use_bwd_tail(True), A.use_head_split("split" if split else "pad"):
        _check_attention(B, Nq, Nkv, H, D, False, dtype)
        _check_attention(1, Nq, Nq, 1, D, True, dtype)
    assert A._bwd_tail == [] and A.BWD_SPLIT_TAIL is None


@pytest.mark.parametrize("B,Nq,Nkv,H,D,causal,dtype", [
    (2, 50, 50, 3, 40, True, torch.float32),   # one full 32-row block (the interpreter's), 18 rows split off
    (1, 17, 33, 2, 64, False, torch.float16),  # no full block: every row in 16-row blocks
    (1, 64, 20, 1, 80, False, torch.float32),  # no query remainder: the forward's main launch alone
    (1, 97, 97, 2, 32, True, torch.float16),
])
def test_row_split(B, Nq, Nkv, H, D, causal, dtype):
    """use_fwd_rows / use_bwd_rows(True): each kernel's full blocks (query rows; keys for dK/dV) in one launch,
    the remaining rows in 16-row blocks in another (each writes its own rows of out and lse, dq, dk and dv);
    forward, backward and both, with and without the split loops."""
    bm = A._INTERPRET_MAIN_BLOCK if A.INTERPRET else A.MAIN_BLOCK
    es = torch.tensor([], dtype=dtype).element_size()

    def want(n):
        return None if not A.INTERPRET and es == 4 else (n // bm) * bm  # a GPU splits 16-bit inputs only

    for fwd, bwd, tail in ((True, False, False), (False, True, False), (True, True, True)):
        with A.use_fwd_rows(fwd), A.use_bwd_rows(bwd), A.use_fwd_tail(tail), A.use_bwd_tail(tail):
            for kind, n in (("fwd", Nq), ("dkdv", Nkv), ("dq", Nq)):
                assert A._main_rows(kind, n, A._block_d(D), es) == want(n)
            _check_attention(B, Nq, Nkv, H, D, causal, dtype)
    with A.use_tile_config((32, 32, 4, 1)):
        assert A._main_rows("fwd", Nq, A._block_d(D), es) is None  # forced tiles: one launch
    assert A._fwd_rows == A._bwd_rows == [] and A.FWD_ROW_SPLIT is False and A.BWD_ROW_SPLIT is False


@pytest.mark.parametrize("B,Nq,Nkv,H,D,causal,dtype,mode", [
    (2, 50, 50, 3, 40, True, torch.float32, "pad"),    # partial last blocks, padded head dim, causal
    (1, 17, 70, 2, 64, False, torch.float16, "pad"),   # more keys than queries: three key blocks
    (2, 33, 33, 1, 80, False, torch.float32, "split"),  # head dim 64 + 32 (two dQ column chunks)
    (1, 64, 31, 2, 16, False, torch.float16, "pad"),   # queries a multiple of the block, one partial key block
    (1, 1, 5, 1, 32, False, torch.float32, "pad"),
])
def test_fused_backward(B, Nq, Nkv, H, D, causal, dtype, mode):
    """use_bwd_fused(True): one program a head, dQ's shares added into fp32 rows as its key blocks go by, then
    scaled into dq: same results as the reference, with the loops split too; poisoned outputs all written."""
    for tail in (False, True):
        with A.use_bwd_fused(True), A.use_head_split(mode), A.use_bwd_tail(tail):
            _check_attention(B, Nq, Nkv, H, D, causal, dtype)
    q, k, v = (t.detach() for t in _inputs(B, Nq, Nkv, H, D, dtype))
    o, lse = A.attention_fwd(q, k, v, D ** -0.5, causal)
    do = randn(B, Nq, H, D, dtype=dtype, device=DEVICE)
    want = A.attention_bwd(do, q, k, v, o, lse, D ** -0.5, causal)
    grads = [poison(torch.empty_like(t)) for t in (q, k, v)]
    with A.use_bwd_fused(True), A.use_head_split(mode):
        A.attention_bwd(do, q, k, v, o, lse, D ** -0.5, causal, dq=grads[0], dk=grads[1], dv=grads[2])
    for got, ref in zip(grads, want):  # dk, dv: the same sums as the split kernels'; dq: other order, close
        torch.testing.assert_close(got, ref, atol=FP_ATOL[dtype], rtol=1e-3)
    assert A._bwd_fused == [] and A.BWD_FUSED is False


def test_fused_backward_configs_and_packed():
    """The fused kernel's tiles (each one run), qkv from a packed buffer, and where it does not run on a GPU: no
    tile of it fits fp32 or head-dim blocks over 64 (the split kernels do those)."""
    for cfg in A._FUSED_CONFIGS:
        with A.use_bwd_fused(True), A.use_tile_config(cfg):
            _check_attention(1, 37, 37, 2, 32, False, torch.float16)
    with A.use_bwd_fused(True):
        _check_qkv(2, 29, 3, 24, torch.float32, 8)
    assert A.fused_backward_fits(64, torch.bfloat16) and A.fused_backward_fits(40, torch.float16)
    assert not A.fused_backward_fits(64, torch.float32) and not A.fused_backward_fits(80, torch.bfloat16)
    assert "fused" in A.KINDS


def _masked_reference(q, k, v, scale, causal, keep, p):
    """softmax(q·kᵀ·scale) with dropout's keep mask (B, H, Nq, Nkv) applied and scaled, times v: (B, Nq, H, D)."""
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    probs = torch.softmax(s.float(), -1).to(q.dtype) * keep / (1 - p)
    return torch.einsum("bhnm,bmhd->bnhd", probs, v)


def _check_dropout(B, Nq, Nkv, H, D, causal, dtype, p, packed=False):
    """Ours with dropout vs the float64 reference under the same keep mask (dropout_mask at the seed the op
    draws), output and gradients; packed: qkv_attention on one (B, N, 3·H·D) tensor."""
    scale = D ** -0.5
    if packed:
        qkv = _leaf(randn(B, Nq, 3 * H * D, dtype=dtype, device=DEVICE))
        inputs, split = (qkv,), lambda t: t.unflatten(-1, (3, H, D)).unbind(2)
        ours = lambda t: qkv_attention(t, H, dropout_p=p, backend="triton")  # noqa: E731
    else:
        inputs, split = _inputs(B, Nq, Nkv, H, D, dtype), lambda *t: t
        ours = lambda *t: attention(*t, causal=causal, dropout_p=p, backend="triton")  # noqa: E731
    g = randn(B, Nq, H * D if packed else H, *(() if packed else (D,)), dtype=dtype, device=DEVICE)
    torch.manual_seed(1234)
    got = _fwd_bwd(ours, inputs, g)
    torch.manual_seed(1234)
    keep = A.dropout_mask(B, H, Nq, Nkv, p, A._draw_seed(p, torch.device(DEVICE)), torch.device(DEVICE))

    def ref_fn(*t):
        o = _masked_reference(*split(*t), scale, causal, keep, p)
        return o.flatten(-2) if packed else o

    ref = _fwd_bwd(ref_fn, [_leaf(t.double()) for t in inputs], g.double())
    same = None if dtype == torch.float32 else _fwd_bwd(ref_fn, [_leaf(t) for t in inputs], g)
    for i, name in enumerate(("out",) + (("dqkv",) if packed else ("dq", "dk", "dv"))):
        assert_close_to_ref(got[i], ref[i], None if same is None else same[i], factor=2.0 if i == 0 else 3.0,
                            atol=FP_ATOL[dtype], rtol=1e-4, name=name)


@pytest.mark.parametrize("B,Nq,Nkv,H,D,causal,dtype,p", [
    (1, 37, 37, 2, 40, False, torch.float32, 0.3),
    (2, 17, 50, 1, 64, False, torch.float16, 0.1),
    (1, 50, 50, 2, 32, True, torch.float32, 0.5),
    (1, 33, 33, 1, 80, False, torch.float16, 0.2),
])
def test_dropout_matches_masked_reference(B, Nq, Nkv, H, D, causal, dtype, p):
    """Attention dropout in the kernels: output and gradients equal the reference under the same keep mask; with
    the split loops and row splits too (each kernel draws the mask by each score's place, whatever its tiles)."""
    _check_dropout(B, Nq, Nkv, H, D, causal, dtype, p)
    with A.use_fwd_tail(True), A.use_bwd_tail(True), A.use_fwd_rows(True), A.use_bwd_rows(True):
        _check_dropout(B, Nq, Nkv, H, D, causal, dtype, p)
    with A.use_bwd_fused(True):
        _check_dropout(B, Nq, Nkv, H, D, causal, dtype, p)


def test_dropout_packed_qkv():
    _check_dropout(2, 21, 21, 3, 32, False, torch.float32, 0.25, packed=True)


def test_dropout_reproducible_and_seeded():
    """torch.manual_seed fixes the mask (bit-equal outputs and gradients); another seed draws another mask; the
    mask keeps about 1 - p of the scores, independently per head."""
    q, k, v = _inputs(2, 33, 33, 2, 32, torch.float32)
    g = randn(2, 33, 2, 32, device=DEVICE)

    def run(seed):
        torch.manual_seed(seed)
        return _fwd_bwd(lambda *t: attention(*t, dropout_p=0.3, backend="triton"), (q, k, v), g)

    a, b, c = run(7), run(7), run(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    keep = A.dropout_mask(2, 3, 128, 96, 0.25, 99, torch.device(DEVICE))
    assert keep.shape == (2, 3, 128, 96) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - 0.75) < 0.01  # 73728 draws: the std of the mean is 0.0016
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert torch.equal(keep, A.dropout_mask(2, 3, 128, 96, 0.25, 99, torch.device(DEVICE)))


def test_dropout_bad_and_reference_cases(monkeypatch):
    q, k, v = _inputs(1, 9, 9, 1, 32, torch.float32)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="dropout_p"):
            attention(q, k, v, dropout_p=bad, backend="triton")
    with pytest.raises(ValueError, match="dropout_p"):
        A.attention_fwd(q, k, v, 0.5, False, dropout_p=1.0)
    assert torch.equal(attention(q, k, v, dropout_p=1.0), torch.zeros_like(q))  # all dropped: the reference
    assert A._triton_for(q, "triton", 0.5, 0.5)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert A._triton_for(q, "triton", 0.5, 0.5)  # a compiled graph traces the device draw of the seed
    dev = torch.device(DEVICE)
    for bad in (torch.zeros(1, dtype=torch.int32), torch.zeros(2, dtype=torch.int64),
                torch.zeros(1, dtype=torch.int64, device="meta")):
        with pytest.raises(ValueError, match="seed must be a one-element int64 tensor"):
            A.attention_fwd(q, k, v, 0.5, False, dropout_p=0.5, seed=bad)
    assert A._draw_seed(0.0, dev) is None and A._seed_arg(None, dev) is A._seed_arg(None, dev)


def test_dropout_under_activation_checkpointing():
    """torch.utils.checkpoint recomputes the forward in the backward with torch's RNG state restored, so the
    recomputed call draws the same seed, hence the same mask: gradients equal the plain run's."""
    from torch.utils.checkpoint import checkpoint
    q, k, v = _inputs(2, 21, 21, 2, 32, torch.float32)
    g = randn(2, 21, 2, 32, device=DEVICE)
    fn = lambda *t: attention(*t, dropout_p=0.3, backend="triton")  # noqa: E731
    torch.manual_seed(11)
    plain = _fwd_bwd(fn, (q, k, v), g)
    torch.manual_seed(11)
    ckpt = _fwd_bwd(lambda *t: checkpoint(fn, *t, use_reentrant=False), (q, k, v), g)
    for name, a, b in zip(("out", "dq", "dk", "dv"), plain, ckpt):
        assert torch.equal(a, b), name


def test_dropout_seed_is_read_from_device_memory():
    """The kernels read the seed tensor's value at run time (a CUDA graph replays the launch with the same
    pointer and a fresh draw in it), not the value at the first launch: rewriting the tensor in place changes
    the mask and the output as an int seed would; the op's draw is a one-element int64 tensor on the device."""
    dev = torch.device(DEVICE)
    q, k, v = _inputs(1, 19, 19, 2, 32, torch.float32)
    s = torch.tensor([7], dtype=torch.int64, device=dev)
    first = A.attention_fwd(q, k, v, 0.5, False, dropout_p=0.4, seed=s)[0]
    mask7 = A.dropout_mask(1, 2, 19, 19, 0.4, s, dev)
    s.fill_(8)
    again = A.attention_fwd(q, k, v, 0.5, False, dropout_p=0.4, seed=s)[0]
    assert torch.equal(first, A.attention_fwd(q, k, v, 0.5, False, dropout_p=0.4, seed=7)[0])
    assert torch.equal(again, A.attention_fwd(q, k, v, 0.5, False, dropout_p=0.4, seed=8)[0])
    assert not torch.equal(first, again)
    assert torch.equal(mask7, A.dropout_mask(1, 2, 19, 19, 0.4, 7, dev))
    assert torch.equal(A.dropout_mask(1, 2, 19, 19, 0.4, s, dev), A.dropout_mask(1, 2, 19, 19, 0.4, 8, dev))
    drawn = A._draw_seed(0.1, dev)
    assert drawn.dtype == torch.int64 and drawn.shape == (1,) and drawn.device == dev


def test_split_dims_policy():
    # 'auto' splits only SPLIT_HEAD_DIMS (measured): 80 = 64 + 32
    assert A.SPLIT_HEAD_DIMS == (80,) and A._split_dims(80) == (64, 32)
    assert [A._split_dims(d) for d in (96, 72, 40)] == [(128, 0), (128, 0), (64, 0)]
    with A.use_head_split("split"):
        assert [A._split_dims(d) for d in (80, 96, 72, 160)] == [(64, 32), (64, 32), (64, 32), (128, 32)]
        # nothing to save: a power of two, or a split as wide as the padded block (second chunks >= 32)
        assert [A._split_dims(d) for d in (64, 16, 112, 24, 8, 40)] == [(64, 0), (16, 0), (128, 0), (32, 0),
                                                                        (16, 0), (64, 0)]
        with A.use_head_split("pad"):
            assert A._split_dims(80) == (128, 0)
    with pytest.raises(ValueError, match="unknown head-dim mode"):
        with A.use_head_split("halve"):
            pass


def test_split_needs_aligned_operands_on_a_gpu():
    """On a GPU the split backward runs only on operands with strides in multiples of 16 elements (but the head
    dim's, 1) and 16-byte aligned data; others pad (run 5: illegal memory accesses on exactly those)."""
    ok = torch.empty(2, 50, 4, 80)
    assert A._split_aligned(ok) and A._split_dims(80, (ok, ok)) == (64, 32)
    unaligned = {
        "D=72 contiguous (head stride 72)": torch.empty(2, 50, 4, 72),
        "padded rows, offset (head stride 104)": torch.empty(2, 50, 4, 104)[..., 8:88],
        "head-dim stride 2": torch.empty(2, 50, 4, 160)[..., ::2],
        "data 2 elements in": torch.empty(2 * 50 * 4 * 80 + 2)[2:].view(2, 50, 4, 80),
    }
    for why, t in unaligned.items():
        assert not A._split_aligned(t), why
        assert A._split_dims(80, (ok, t)) == (128, 0), why
    with A.use_head_split("split"):
        assert A._split_dims(72, (torch.empty(2, 50, 4, 80)[..., :72],)) == (64, 32)  # aligned, 8 of 32 used
        assert A._split_dims(72, (unaligned["D=72 contiguous (head stride 72)"],)) == (128, 0)
        assert A._split_dims(72) == (64, 32)  # the interpreter (no GPU operands): any strides
    # padded blocks narrower than 64: the same rule
    assert A._block_d(24, (torch.empty(1, 5, 2, 32),)) == 32 and A._block_d(16) == 16
    assert A._block_d(24, (torch.empty(1, 5, 2, 24),)) == 64 and A._split_dims(24, (torch.empty(1, 5, 2, 24),)) == (64, 0)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2")  # padded keys' P in dK/dV (never stored)
def test_large_logits_finite():
    # scale·|q·k| ~ 1e4: the online softmax must not overflow to inf/NaN (exp2 of max-subtracted logits).
    B, N, H, D = 1, 33, 2, 32
    q, k, v = _inputs(B, N, N, H, D, torch.float32, scale=40.0)
    with torch.no_grad():
        logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * D ** -0.5
    assert logits.abs().max() > 5e3
    g = randn(B, N, H, D, device=DEVICE)
    got = _fwd_bwd(lambda *t: attention(*t, backend="triton"), (q, k, v), g)
    for t in got:
        assert torch.isfinite(t).all()
    ref = A.attention_reference(q.double(), k.double(), v.double())
    assert (got[0].double() - ref).abs().max() < 5e-2
    # A row whose every logit is far below 0 (its LSE too): the fused backward's padded keys (logit 0, P there
    # 2^-LSE = inf) must not reach dq (fuzzing found it at N = 1).
    q1, k1 = (-40.0 * torch.ones(1, 1, 1, 32, device=DEVICE)).requires_grad_(), torch.ones(1, 1, 1, 32, device=DEVICE)
    v1 = randn(1, 1, 1, 32, device=DEVICE)
    for fused in (False, True):
        with A.use_bwd_fused(fused):
            got = _fwd_bwd(lambda t: attention(t, k1, v1, backend="triton"), (q1,), torch.ones_like(v1))
        assert torch.isfinite(got[1]).all(), fused


def test_lse_and_poisoned_outputs():
    B, Nq, Nkv, H, D = 2, 23, 23, 3, 40
    q, k, v = (t.detach() for t in _inputs(B, Nq, Nkv, H, D, torch.float32))
    scale = D ** -0.5
    out, lse = poison(torch.empty_like(q)), poison(torch.empty(B, H, 2, Nq, device=DEVICE))
    A.attention_fwd(q, k, v, scale, False, out=out, lse=lse)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    torch.testing.assert_close(A.stats_lse(lse).double(), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[:, :, 0].double(), s.amax(-1) * A.LOG2E, atol=1e-5, rtol=1e-5)  # the row max
    assert_close_to_ref(out, A.attention_reference(q.double(), k.double(), v.double()), name="out")
    do = randn(B, Nq, H, D, device=DEVICE)
    grads = [poison(torch.empty_like(t)) for t in (q, k, v)]
    A.attention_bwd(do, q, k, v, out, lse, scale, False, dq=grads[0], dk=grads[1], dv=grads[2])
    q64, k64, v64 = (_leaf(t.double()) for t in (q, k, v))
    ref = torch.autograd.grad(A.attention_reference(q64, k64, v64), (q64, k64, v64), do.double())
    for got, r, name in zip(grads, ref, ("dq", "dk", "dv")):
        assert_close_to_ref(got, r, name=name)
    # The packed backward writes every element of the packed gradient.
    qkv = randn(1, 9, 3 * 2 * 24, device=DEVICE)
    o, lse2 = A.qkv_attention_fwd(qkv, 2, 24 ** -0.5, out=poison(torch.empty(1, 9, 48, device=DEVICE)))
    dqkv = A.qkv_attention_bwd(randn(1, 9, 48, device=DEVICE), qkv, o, lse2, 2, 24 ** -0.5,
                               dqkv=poison(torch.empty_like(qkv)))
    assert torch.isfinite(o).all() and torch.isfinite(dqkv).all()


def test_deterministic_backward():
    q, k, v = _inputs(1, 50, 50, 2, 40, torch.float32)
    g = randn(1, 50, 2, 40, device=DEVICE)
    first = _fwd_bwd(lambda *t: attention(*t, causal=True, backend="triton"), (q, k, v), g)
    for _ in range(19):
        again = _fwd_bwd(lambda *t: attention(*t, causal=True, backend="triton"), (q, k, v), g)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_kernels_actually_run(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("reference path was used")

    monkeypatch.setattr(A, "attention_reference", boom)
    monkeypatch.setattr(A, "qkv_attention_reference", boom)
    monkeypatch.setattr(A.F, "scaled_dot_product_attention", boom)
    calls = []
    real = A.attention_fwd
    monkeypatch.setattr(A, "attention_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, k, v = _inputs(1, 7, 7, 2, 16, torch.float32)
    attention(q, k, v, backend="triton").sum().backward()
    qkv = _leaf(randn(1, 7, 3 * 2 * 16, device=DEVICE))
    qkv_attention(qkv, 2, backend="triton").sum().backward()
    assert len(calls) == 2 and q.grad is not None and qkv.grad is not None


def test_dropout_falls_back_to_reference():
    # dropout_p > 0 is not fused in the kernels; it runs SDPA with dropout (documented fallback).
    qkv = _leaf(randn(2, 9, 3 * 2 * 16, device=DEVICE))
    out = qkv_attention(qkv, 2, dropout_p=0.5, backend="triton")
    out.sum().backward()
    assert out.shape == (2, 9, 32) and torch.isfinite(qkv.grad).all()


def test_softmax_scale_not_positive():
    """The forward kernel takes a row's max on unscaled logits, so it needs softmax_scale > 0: other scales
    (SDPA allows them) run the reference under 'auto' and are refused, clearly, when the kernels are forced."""
    q, k, v = (randn(1, 7, 2, 16, device=DEVICE) for _ in range(3))
    for bad in (-0.25, 0.0, float("nan")):
        with pytest.raises(ValueError, match="softmax_scale > 0"):
            attention(q, k, v, softmax_scale=bad, backend="triton")
        with pytest.raises(ValueError, match="softmax_scale > 0"):
            qkv_attention(randn(1, 7, 3 * 2 * 16, device=DEVICE), 2, softmax_scale=bad, backend="triton")
        with pytest.raises(ValueError, match="softmax_scale > 0"):
            A.attention_fwd(q, k, v, bad, False)
    got = attention(q, k, v, softmax_scale=-0.25, backend="auto")  # the reference, whatever the device
    want = A.attention_reference(q.double(), k.double(), v.double(), -0.25)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_bad_inputs():
    ok = randn(1, 5, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of 8"):
        attention(*(randn(1, 5, 2, 12, device=DEVICE) for _ in range(3)), backend="triton")
    with pytest.raises(ValueError, match="multiple of 8"):
        attention(*(randn(1, 3, 1, 264, device=DEVICE) for _ in range(3)), backend="triton")
    with pytest.raises(ValueError, match="multiple of 8"):
        qkv_attention(randn(1, 5, 3 * 2 * 20, device=DEVICE), 2, backend="triton")
    with pytest.raises(ValueError, match="matching"):
        attention(ok, randn(1, 5, 2, 24, device=DEVICE), ok, backend="triton")
    with pytest.raises(ValueError, match="matching"):
        attention(ok, randn(1, 6, 2, 16, device=DEVICE), ok, backend="triton")
    with pytest.raises(TypeError, match="share a dtype"):
        attention(ok, ok.half(), ok, backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        attention(ok.long(), ok.long(), ok.long(), backend="triton")
    with pytest.raises(ValueError, match="one device"):
        attention(ok, ok.to("meta"), ok, backend="triton")
    with pytest.raises(ValueError, match="divisible"):
        qkv_attention(randn(1, 5, 50, device=DEVICE), 2, backend="triton")
    with pytest.raises(ValueError, match="dimensions"):
        attention(*(randn(5, 2, 16, device=DEVICE) for _ in range(3)), backend="triton")


# ---------------------------------------------------------------------------------------------
# CUDA only: bf16 dots (garbage in the interpreter), ViT-sized shapes, tf32, torch.compile, speed.

GPU_CASES = [
    (2, 197, 12, 64, False, torch.bfloat16),
    (2, 257, 16, 80, False, torch.bfloat16),
    (1, 577, 4, 64, True, torch.bfloat16),
    (1, 1025, 2, 128, False, torch.bfloat16),
    (3, 197, 3, 88, True, torch.bfloat16),
    (2, 50, 6, 96, False, torch.float16),
    (1, 77, 2, 256, True, torch.bfloat16),
    (2, 197, 6, 16, False, torch.bfloat16),
    (2, 197, 6, 64, False, torch.float32),
    (1, 1, 6, 32, False, torch.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("B,N,H,D,causal,dtype", GPU_CASES)
def test_attention_gpu(B, N, H, D, causal, dtype):
    _check_attention(B, N, N, H, D, causal, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_gpu_noncontiguous(dtype):
    _check_attention(2, 197, 197, 12, 80, False, dtype, noncontig=True)


@pytest.mark.gpu
@pytest.mark.parametrize("B,N,H,D,causal,p", [(2, 197, 12, 64, False, 0.1), (1, 257, 16, 80, False, 0.2),
                                              (2, 50, 4, 128, True, 0.3)])
def test_dropout_gpu(B, N, H, D, causal, p):
    """Attention dropout in bf16 at ViT shapes: the kernels vs the float64 reference under the same mask."""
    _check_dropout(B, N, N, H, D, causal, torch.bfloat16, p)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
def test_dropout_in_a_cuda_graph_gpu(fused):
    """Forward and backward with dropout captured in one CUDA graph, the seed drawn in it: each replay draws a
    new seed, which the kernels read from device memory (an int argument would freeze the capture's mask), and
    gives bit for bit what eager launches give at that seed."""
    dev = torch.device("cuda")
    q, k, v, do = (randn(2, 197, 6, 64, dtype=torch.bfloat16, device=DEVICE) for _ in range(4))
    scale, p = 64 ** -0.5, 0.2

    def step(seed):
        o, lse = A.attention_fwd(q, k, v, scale, False, dropout_p=p, seed=seed)
        return (o, *A.attention_bwd(do, q, k, v, o, lse, scale, False, dropout_p=p, seed=seed))

    def drawn_step():
        seed = A._draw_seed(p, dev)
        return seed, step(seed)

    import flashvit
    with A.use_bwd_fused(fused):
        graph, (seed, static) = flashvit.capture_cuda_graph(drawn_step)  # (compiles, autotunes first)
        seen = set()
        for _ in range(3):
            graph.replay()
            s = int(seed.item())
            seen.add(s)
            for name, got, want in zip(("out", "dq", "dk", "dv"), static, step(s)):
                assert torch.equal(got, want), f"{name} at seed {s}"
    assert len(seen) == 3, seen


@pytest.mark.gpu
@pytest.mark.parametrize("D,causal", [(80, False), (64, True), (40, False)])
def test_split_loops_and_rows_gpu_noncontiguous(D, causal):
    """The split loops and row splits (off by default; the bench's [tail+rows]) on non-contiguous operands,
    whose strides the narrow (16-row) blocks of the row split also read."""
    with A.use_fwd_tail(True), A.use_bwd_tail(True), A.use_fwd_rows(True), A.use_bwd_rows(True):
        _check_attention(2, 197, 197, 6, D, causal, torch.bfloat16, noncontig=True)


@pytest.mark.gpu
@pytest.mark.parametrize("B,N,H,D", [(4, 197, 12, 64), (2, 257, 16, 80), (1, 577, 16, 64), (2, 50, 3, 40)])
def test_qkv_attention_gpu(B, N, H, D, autotuned):
    _check_qkv(B, N, H, D, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("B,N,H,D,causal", [(2, 257, 16, 80, False), (2, 197, 6, 96, True), (3, 50, 4, 72, False)])
def test_split_head_dims_gpu(B, N, H, D, causal, autotuned):
    """Split on aligned operands; D=72 contiguous is not (head stride 72): it pads (run 5 faulted split)."""
    with A.use_head_split("split"):
        _check_attention(B, N, N, H, D, causal, torch.bfloat16)
        _check_qkv(B, N, H, D, torch.bfloat16)


@pytest.mark.gpu
def test_split_head_dims_aligned_d72_gpu(autotuned):
    """D=72 split (64 + 32, 8 of the second chunk's 32 columns used) on aligned views of 80-wide rows."""
    with A.use_head_split("split"):
        q, k, v = (_leaf(randn(2, 197, 6, 80, dtype=torch.bfloat16, device=DEVICE)[..., :72]) for _ in range(3))
        assert A._split_dims(72, (q, k, v)) == (64, 32)
        g = randn(2, 197, 6, 72, dtype=torch.bfloat16, device=DEVICE)
        got = _fwd_bwd(lambda *t: attention(*t, backend="triton"), (q, k, v), g)
        ref = _fwd_bwd(lambda *t: A.attention_reference(*t, None, False), [_leaf(t.double()) for t in (q, k, v)],
                       g.double())
        same = _fwd_bwd(lambda *t: A.attention_reference(*t, None, False), [_leaf(t) for t in (q, k, v)], g)
        for i, name in enumerate(("out", "dq", "dk", "dv")):
            assert_close_to_ref(got[i], ref[i], same[i], factor=2.0 if i == 0 else 3.0,
                                atol=FP_ATOL[torch.bfloat16], rtol=1e-4, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("B,N,H,D", [(4, 197, 12, 64), (2, 257, 16, 80), (1, 577, 16, 64), (2, 256, 4, 64)])
def test_split_tail_gpu(B, N, H, D, autotuned):
    """The split loops (use_fwd_tail, use_bwd_tail) and the row split (use_fwd_rows, use_bwd_rows) in bf16 at ViT
    shapes, checked with the configs autotune picks (the bench's [tail] and [tail+rows] rows)."""
    with A.use_fwd_tail(True), A.use_bwd_tail(True):
        _check_qkv(B, N, H, D, torch.bfloat16)
        with A.use_fwd_rows(True), A.use_bwd_rows(True):
            assert A._main_rows("fwd", N, A._block_d(D), 2) == (N // 64) * 64
            _check_qkv(B, N, H, D, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("B,N,H,D", [(4, 197, 12, 64), (2, 257, 16, 32), (1, 577, 16, 64), (2, 50, 3, 40)])
def test_fused_backward_gpu(B, N, H, D, autotuned):
    """The fused backward (use_bwd_fused) in bf16 at ViT shapes with the configs autotune picks (the bench's
    [fused] rows), with the split loops too, and on non-contiguous operands."""
    with A.use_bwd_fused(True):
        _check_qkv(B, N, H, D, torch.bfloat16)
        with A.use_bwd_tail(True):
            _check_qkv(B, N, H, D, torch.bfloat16)
        _check_attention(2, N, N, 6, D, False, torch.bfloat16, noncontig=True)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 40])
def test_fused_backward_deterministic_gpu(D, autotuned):
    """dQ's shares go in by atomic adds: each value's adds come from one thread in key-block order, so 20
    backward runs are bit-equal (as the split kernels')."""
    qkv = _leaf(randn(8, 197, 3 * 12 * D, dtype=torch.bfloat16, device=DEVICE))
    g = randn(8, 197, 12 * D, dtype=torch.bfloat16, device=DEVICE)
    with A.use_bwd_fused(True):
        first = _fwd_bwd(lambda t: qkv_attention(t, 12), (qkv,), g)
        for _ in range(19):
            for a, b in zip(first, _fwd_bwd(lambda t: qkv_attention(t, 12), (qkv,), g)):
                assert torch.equal(a, b)


@pytest.mark.gpu
def test_attention_gpu_tf32():
    q, k, v = _inputs(2, 197, 197, 4, 64, torch.float32)
    exact = attention(q, k, v, allow_tf32=False)
    fast = attention(q, k, v, allow_tf32=True)
    ref = A.attention_reference(q.double(), k.double(), v.double())
    assert_close_to_ref(exact, ref, atol=2e-5)
    assert (fast.double() - ref).abs().max() < 2e-2


@pytest.mark.gpu
def test_deterministic_backward_gpu():
    q, k, v = _inputs(4, 197, 197, 12, 64, torch.bfloat16)
    g = randn(4, 197, 12, 64, dtype=torch.bfloat16, device=DEVICE)
    first = _fwd_bwd(lambda *t: attention(*t), (q, k, v), g)
    for _ in range(19):
        for a, b in zip(first, _fwd_bwd(lambda *t: attention(*t), (q, k, v), g)):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_large_logits_gpu():
    q, k, v = _inputs(2, 197, 197, 4, 64, torch.bfloat16, scale=30.0)
    g = randn(2, 197, 4, 64, dtype=torch.bfloat16, device=DEVICE)
    for res in _fwd_bwd(lambda *t: attention(*t), (q, k, v), g):
        assert torch.isfinite(res).all()


@pytest.mark.gpu
def test_qkv_attention_compiles_gpu():
    qkv = _leaf(randn(2, 197, 3 * 6 * 64, dtype=torch.bfloat16, device=DEVICE))

    def f(t):
        return qkv_attention(t, 6).float().square().sum()

    eager = torch.autograd.grad(f(qkv), qkv)[0]
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(qkv), qkv)[0]
    torch.testing.assert_close(compiled, eager)


@pytest.mark.gpu
def test_qkv_attention_speed_sanity_gpu(autotuned):
    # A loose bound that catches a broken tile choice, not a benchmark: fwd+bwd from packed qkv within
    # 3x of SDPA's default backend (which also pays the layout copies here).
    import triton.testing

    B, N, H, D = 64, 197, 12, 64
    qkv = _leaf(randn(B, N, 3 * H * D, dtype=torch.bfloat16, device=DEVICE))
    g = randn(B, N, H * D, dtype=torch.bfloat16, device=DEVICE)

    def ours():
        torch.autograd.grad(qkv_attention(qkv, H), qkv, g)

    def sdpa():
        torch.autograd.grad(A.qkv_attention_reference(qkv, H), qkv, g)

    ours()
    t_ours, t_sdpa = triton.testing.do_bench(ours), triton.testing.do_bench(sdpa)
    assert t_ours < 3.0 * t_sdpa, f"flash attention {t_ours:.3f} ms vs SDPA {t_sdpa:.3f} ms"


@pytest.mark.gpu
@pytest.mark.parametrize("kind,D,mode", [("fwd", 40, "pad"), ("fwd", 80, "pad"), ("dkdv", 80, "pad"), ("dq", 80, "pad"),
                                         ("dkdv", 80, "split"), ("dkdv", 96, "split"), ("dq", 80, "split"),
                                         ("dq", 96, "split"), ("fwd_rows", 64, "pad"), ("fwd_rows", 80, "pad"),
                                         ("dkdv_rows", 64, "pad"), ("dkdv_rows", 80, "split"), ("dq_rows", 64, "pad"),
                                         ("dq_rows", 80, "split"), ("fused", 64, "pad"), ("fused", 40, "pad")])
def test_every_config_gpu(kind, D, mode, monkeypatch, autotuned):
    """Each autotune config on its own (the autotuner runs only its pick), fwd and grads vs float64; the row
    split's remainder configs (use_fwd_rows, use_bwd_rows) with its main launches autotuned; the fused backward's
    (use_bwd_fused)."""
    import triton

    from flashvit.kernels._dispatch import Launcher
    kern = A._kernel(kind)
    fwd = kind.startswith("fwd")
    with A.use_head_split(mode):
        bd = sum(A._split_dims(D)) if not fwd else A._block_d(D)
    bad, ran = [], 0
    key = A._FWD_KEY if fwd else A._KEY
    auto = kind in A.AUTO_TAIL_KINDS  # the default launch: tile and loop form from one autotuner
    table, tuned = (A._triton_auto_configs(kind), A._attn_tuned_auto) if auto else (A._triton_configs(kind), A._attn_tuned)
    for cfg in table:
        c = (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages)
        if c not in A._configs_for(kind, bd, 2):
            continue  # the pruner drops it at this head dim
        monkeypatch.setitem(tuned, kind, Launcher(triton.autotune(
            [cfg], key=[k for k in key if k not in ("SPLIT_TAIL", "LAG_PV")] if auto else key)(kern)))
        ran += 1
        rows = kind.endswith("_rows")
        with A.use_head_split(mode), A.use_fwd_rows(rows and fwd), A.use_bwd_rows(rows and not fwd), \
                A.use_bwd_fused(kind == "fused"):
            try:
                _check_attention(2, 97, 97, 3, D, False, torch.bfloat16)
            except AssertionError as e:
                bad.append((c, str(e).splitlines()[0][:160]))
    assert ran and not bad, bad


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bool_keys", "hf_additive", "bias_fp32"])
@pytest.mark.parametrize("B,N,H,D", [(4, 197, 12, 64), (2, 257, 16, 80)])
def test_attention_mask_bf16_gpu(B, N, H, D, kind, autotuned):
    """The masked kernels in bf16 at ViT shapes, autotuned: output and grads, 2x/3x SDPA's own bf16 error."""
    q, k, v = _inputs(B, N, N, H, D, torch.bfloat16)
    mask = _masks(kind, B, N, N, H, torch.bfloat16, fresh_seed())
    g = randn(B, N, H, D, dtype=torch.bfloat16, device=DEVICE)
    got = _fwd_bwd(lambda *t: attention(*t, attn_mask=mask, backend="triton"), (q, k, v), g)
    same = _fwd_bwd(lambda *t: A.attention_reference(*t, attn_mask=mask), [_leaf(t) for t in (q, k, v)], g)
    m64 = mask if mask.dtype == torch.bool else mask.double()
    ref = _fwd_bwd(lambda *t: A.attention_reference(*t, attn_mask=m64), [_leaf(t.double()) for t in (q, k, v)],
                   g.double())
    for name, a, b, c, f in zip(("out", "dq", "dk", "dv"), got, ref, same, (2.0, 3.0, 3.0, 3.0)):
        assert_close_to_ref(a, b, c, factor=f, atol=FP_ATOL[torch.bfloat16], name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bool_keys", "hf_additive"])
def test_qkv_attention_mask_bf16_gpu(kind, autotuned):
    """Packed qkv with a padding mask in bf16 at ViT-B's shape (the patched NaFlex / timm attention's path):
    output and the packed gradient, 2x/3x SDPA's own bf16 error."""
    B, N, H, D = 4, 197, 12, 64
    qkv = _leaf(randn(B, N, 3 * H * D, dtype=torch.bfloat16, device=DEVICE))
    mask = _masks(kind, B, N, N, H, torch.bfloat16, fresh_seed())
    g = randn(B, N, H * D, dtype=torch.bfloat16, device=DEVICE)
    got = _fwd_bwd(lambda t: qkv_attention(t, H, attn_mask=mask, backend="triton"), (qkv,), g)
    same = _fwd_bwd(lambda t: A.qkv_attention_reference(t, H, attn_mask=mask), (_leaf(qkv),), g)
    m64 = mask if mask.dtype == torch.bool else mask.double()
    ref = _fwd_bwd(lambda t: A.qkv_attention_reference(t, H, attn_mask=m64), (_leaf(qkv.double()),), g.double())
    for name, a, b, c, f in zip(("out", "dqkv"), got, ref, same, (2.0, 3.0)):
        assert_close_to_ref(a, b, c, factor=f, atol=FP_ATOL[torch.bfloat16], name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("mdtype", [torch.float32, torch.bfloat16], ids=["fp32-bias", "bf16-bias"])
@pytest.mark.parametrize("shape", ["beit", "swin"])
def test_learned_mask_bf16_gpu(shape, mdtype, autotuned):
    """A learned bias in bf16 training, autotuned: BEiT-B's (1, H, N, N) at N = 197, Swin-T's windowed (1, nW, H,
    N, N) at 49-token windows (the shifted-window 0 / -100 mask added). out, the packed gradient and the bias's
    gradient, 2x/3x SDPA's own error with the mask in the same dtype."""
    B, N, H, D, W = (8, 197, 12, 64, 1) if shape == "beit" else (8 * 64, 49, 3, 32, 64)
    qkv = _leaf(randn(B, N, 3 * H * D, dtype=torch.bfloat16, device=DEVICE))
    bias = _leaf(randn(1, H, N, N, dtype=mdtype, device=DEVICE))
    win = torch.where(torch.rand(1, W, 1, N, N, device=DEVICE) < 0.3, -100.0, 0.0).to(mdtype)
    mk = (lambda b, w: b) if shape == "beit" else (lambda b, w: b.unsqueeze(1) + w)  # noqa: E731
    g = randn(B, N, H * D, dtype=torch.bfloat16, device=DEVICE)
    got = _fwd_bwd(lambda t, b: qkv_attention(t, H, attn_mask=mk(b, win), backend="triton"), (qkv, bias), g)
    same = _fwd_bwd(lambda t, b: A.qkv_attention_reference(t, H, attn_mask=mk(b, win)), (_leaf(qkv), _leaf(bias)), g)
    ref = _fwd_bwd(lambda t, b: A.qkv_attention_reference(t, H, attn_mask=mk(b, win.double())),
                   (_leaf(qkv.double()), _leaf(bias.double())), g.double())
    for name, a, b, c, f in zip(("out", "dqkv", "dbias"), got, ref, same, (2.0, 3.0, 3.0)):
        if a.dtype == torch.float32:  # an fp32 bias's gradient: against SDPA's, the inputs being bf16
            assert max_err(a, b) <= f * max_err(c, b) + FP_ATOL[torch.bfloat16], name
        else:
            assert_close_to_ref(a, b, c, factor=f, atol=FP_ATOL[torch.bfloat16], name=name)

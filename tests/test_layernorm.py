"""Fused LayerNorm (+ residual add): Triton kernels vs the float64 reference, forward and backward.

On CPU the kernels run in the Triton interpreter (backend='triton' forced); on CUDA they run for real.
Every output buffer the launchers allocate is NaN-poisoned first, so an unwritten element fails.
"""

import contextlib

import pytest
import torch

import flashvit
from flashvit.kernels import layernorm as L
from tests.helpers import assert_close_to_ref, fresh_seed, max_err, randn

TRITON = "triton"
pytestmark = pytest.mark.skipif(not flashvit.HAS_TRITON, reason="triton not importable on this platform")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Launchers allocate through L._empty: hand them NaN-filled buffers."""
    monkeypatch.setattr(L, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                              device=device))


@pytest.fixture
def launches(monkeypatch):
    """Counts launcher calls, so a test cannot pass by silently running the reference."""
    counts = {"fwd": 0, "bwd": 0}
    fwd, bwd = L.layer_norm_fwd, L.layer_norm_bwd

    def count_fwd(*a, **k):
        counts["fwd"] += 1
        return fwd(*a, **k)

    def count_bwd(*a, **k):
        counts["bwd"] += 1
        return bwd(*a, **k)

    monkeypatch.setattr(L, "layer_norm_fwd", count_fwd)
    monkeypatch.setattr(L, "layer_norm_bwd", count_bwd)
    return counts


def _leaves(args, dtype=None):
    return [None if a is None else a.detach().to(dtype or a.dtype).requires_grad_(True) for a in args]


def _fwd_bwd(fn, args, gouts):
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, gouts)])
    return [o.detach() for o in outs], [None if a is None else a.grad for a in args]


def _check(name, out, ref64, out_torch, grad, low):
    """The house rule; ``low``: the inputs were fp16/bf16, so even an fp32 result (e.g. the gradient of an fp32
    weight) carries their rounding and is held to PyTorch's own error in the same dtypes."""
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    atol = (1e-3 if low else 2e-5) * scale
    factor = 3.0 if grad else 2.0
    assert out.dtype == out_torch.dtype, f"{name}: dtype {out.dtype} != PyTorch's {out_torch.dtype}"
    if low and out.dtype == torch.float32:
        assert not torch.isnan(out).any(), f"{name}: NaN in output"
        err, torch_err = max_err(out, ref64), max_err(out_torch, ref64)
        assert err <= factor * torch_err + atol, f"{name}: max error {err:.3e} > {factor} x PyTorch's {torch_err:.3e}"
        return
    assert_close_to_ref(out, ref64, out_torch, factor=factor, atol=atol, rtol=1e-4, name=name)


def _compare(kernel_fn, ref_fn, args, gouts, names):
    """Kernel vs float64 reference vs PyTorch in the same dtypes: every output and every input gradient."""
    k_outs, k_grads = _fwd_bwd(kernel_fn, _leaves(args), gouts)
    r_outs, r_grads = _fwd_bwd(ref_fn, _leaves(args, torch.float64), [g.double() for g in gouts])
    t_outs, t_grads = _fwd_bwd(ref_fn, _leaves(args), gouts)
    low = any(a is not None and a.dtype in (torch.float16, torch.bfloat16) for a in args)
    for i, (k, r, t) in enumerate(zip(k_outs, r_outs, t_outs)):
        _check(f"out{i}", k, r, t, grad=False, low=low)
    for name, k, r, t in zip(names, k_grads, r_grads, t_grads):
        if k is not None:
            _check(f"d{name}", k, r, t, grad=True, low=low)


# (leading shape, D): D over {1, 7, 192, 384, 768, 1000, 1280}, few rows; (2, 3, 37, 192) stands in for
# (B, H, N, D)-like 4-d activations.
SHAPES = [((1,), 1), ((3,), 7), ((2, 5), 192), ((3,), 384), ((1, 2), 768), ((2,), 1000), ((1,), 1280),
          ((2, 3, 37), 192), ((5,), 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead,d", SHAPES)
def test_layer_norm(device, dtype, lead, d, launches):
    x = randn(*lead, d, dtype=dtype, device=device, scale=2.0) + 0.5
    w = randn(d, dtype=dtype, device=device)
    b = randn(d, dtype=dtype, device=device)
    gy = randn(*lead, d, dtype=dtype, device=device)
    eps = 1e-5

    _compare(lambda x, w, b: L.layer_norm(x, w, b, eps, backend=TRITON),
             lambda x, w, b: L.layer_norm_reference(x, w, b, eps), [x, w, b], [gy], "xwb")
    assert launches == {"fwd": 1, "bwd": 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead,d", SHAPES)
def test_add_layer_norm(device, dtype, lead, d, launches):
    x = randn(*lead, d, dtype=dtype, device=device)
    r = randn(*lead, d, dtype=dtype, device=device, scale=3.0)
    w = randn(d, dtype=dtype, device=device)
    b = randn(d, dtype=dtype, device=device)
    gy, gh = randn(*lead, d, dtype=dtype, device=device), randn(*lead, d, dtype=dtype, device=device)

    _compare(lambda x, r, w, b: L.add_layer_norm(x, r, w, b, 1e-6, backend=TRITON),
             lambda x, r, w, b: L.add_layer_norm_reference(x, r, w, b, 1e-6), [x, r, w, b], [gy, gh], "xrwb")
    assert launches == {"fwd": 1, "bwd": 1}


def _sample_scale(b, dtype, device):
    """(B,) factors per sample: a dropped sample (0), the rest distinct (0.5 .. 2), so a row that reads another
    sample's factor shows."""
    s = torch.rand(b, generator=torch.Generator().manual_seed(fresh_seed())) * 1.5 + 0.5
    s[b // 2] = 0.0
    return s.to(device=device, dtype=dtype)


# x_scale: stochastic depth's factor per sample on x (h = x·s[b] + r). Leading shapes (B, T...): T rows a sample,
# T = 1 included; the factor's own gradient too.
@pytest.mark.parametrize("chunks", [False, True])  # (use_ln_fwd_chunks and use_ln_chunks: forward and backward)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead,d", [((3, 5), 7), ((4, 37), 192), ((3, 2, 3), 384), ((2,), 1000), ((5, 3), 1)])
def test_add_layer_norm_sample_scale(device, dtype, lead, d, chunks, launches):
    x = randn(*lead, d, dtype=dtype, device=device)
    r = randn(*lead, d, dtype=dtype, device=device, scale=3.0)
    w = randn(d, dtype=dtype, device=device)
    b = randn(d, dtype=dtype, device=device)
    s = _sample_scale(lead[0], dtype, device)
    gy, gh = randn(*lead, d, dtype=dtype, device=device), randn(*lead, d, dtype=dtype, device=device)

    with L.use_ln_fwd_chunks(chunks), L.use_ln_chunks(chunks):
        _compare(lambda x, r, w, b, s: L.add_layer_norm(x, r, w, b, 1e-6, x_scale=s, backend=TRITON),
                 lambda x, r, w, b, s: L.add_layer_norm_reference(x, r, w, b, 1e-6, s), [x, r, w, b, s], [gy, gh],
                 "xrwbs")
    assert launches == {"fwd": 1, "bwd": 1}


def test_sample_scale_shapes_and_errors(device, launches):
    """x_scale as (B,) or (B, 1, ..., 1) gives one result; a factor that takes no grad gives the others' grads;
    a wrong shape, an integer dtype or another device raise; the module's forward_add takes it too."""
    x, r = randn(3, 4, 16, device=device), randn(3, 4, 16, device=device)
    w, b = randn(16, device=device), randn(16, device=device)
    s = _sample_scale(3, torch.float32, device)
    y1, h1 = L.add_layer_norm(x, r, w, b, x_scale=s, backend=TRITON)
    y2, h2 = L.add_layer_norm(x, r, w, b, x_scale=s.view(3, 1, 1), backend=TRITON)
    assert torch.equal(y1, y2) and torch.equal(h1, h2)
    assert torch.equal(h1[1], r[1]) and not torch.equal(h1[0], r[0])  # sample 1 dropped (s[1] = 0)
    ln = L.LayerNorm(16).to(device)
    y3, h3 = ln.forward_add(x, r, s)
    yr, hr = L.add_layer_norm_reference(x, r, ln.weight, ln.bias, ln.eps, s)
    torch.testing.assert_close(y3, yr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h3, hr, atol=1e-6, rtol=1e-6)
    # an fp32 factor on fp16 x and residual: x·s stays fp16 (as drop_path's mask, drawn in x's dtype) on both paths
    outs = [L.add_layer_norm(x.half(), r.half(), w, b, x_scale=s, backend=be) for be in ("torch", TRITON)]
    assert all(t.dtype == torch.float16 for pair in outs for t in pair)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=0, rtol=0)  # h: the same roundings
    xg = x.clone().requires_grad_()
    L.add_layer_norm(xg, r, w, b, x_scale=s, backend=TRITON)[0].sum().backward()
    assert torch.equal(xg.grad[1], torch.zeros_like(xg.grad[1])) and xg.grad[0].abs().sum() > 0
    for bad in (s[:2], s.view(3, 1), s.view(1, 3, 1)):
        with pytest.raises(ValueError, match="x_scale has shape"):
            L.add_layer_norm(x, r, w, b, x_scale=bad, backend=TRITON)
    with pytest.raises(ValueError, match="x_scale has shape"):
        L.add_layer_norm(x[0, 0], r[0, 0], w, b, x_scale=s[:1], backend=TRITON)  # 1-D x: no samples
    with pytest.raises(TypeError, match="x_scale has dtype torch.int64"):
        L.add_layer_norm(x, r, w, b, x_scale=torch.ones(3, dtype=torch.int64, device=device), backend=TRITON)
    with pytest.raises(ValueError, match="one device"):
        L.add_layer_norm(x, r, w, b, x_scale=s.to("meta"), backend=TRITON)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead,d", [((3,), 384), ((1, 2), 768), ((2,), 1280), ((2, 3, 37), 192), ((4,), 96),
                                    ((2,), 1000), ((3,), 7), ((2,), 65)])
def test_backward_column_chunks(device, dtype, lead, d, launches):
    """use_ln_chunks(True), use_ln_fwd_chunks(True): the backward's and the forward's rows in two column chunks (768
    = 512 + 256, ...) where that covers fewer lanes than one padded block (1000 and 7 keep one block); LN and the
    fused add, all outputs and gradients."""
    with L.use_ln_chunks(True), L.use_ln_fwd_chunks(True):
        block_n = L._config(d)[0]
        first, second = L._bwd_chunks(d, block_n)
        assert first + second >= d and (second == 0) == (d in (1000, 7)) and first + second <= block_n
        assert second == 0 or second >= L.MIN_CHUNK  # 65 = 64 + 32
        x, r = randn(*lead, d, dtype=dtype, device=device, scale=2.0), randn(*lead, d, dtype=dtype, device=device)
        w, b = randn(d, dtype=dtype, device=device), randn(d, dtype=dtype, device=device)
        gy, gh = randn(*lead, d, dtype=dtype, device=device), randn(*lead, d, dtype=dtype, device=device)
        _compare(lambda x, w, b: L.layer_norm(x, w, b, 1e-5, backend=TRITON),
                 lambda x, w, b: L.layer_norm_reference(x, w, b, 1e-5), [x, w, b], [gy], "xwb")
        _compare(lambda x, r, w, b: L.add_layer_norm(x, r, w, b, 1e-6, backend=TRITON),
                 lambda x, r, w, b: L.add_layer_norm_reference(x, r, w, b, 1e-6), [x, r, w, b], [gy, gh], "xrwb")
    assert launches == {"fwd": 2, "bwd": 2}
    assert L._bwd_chunks(768, 1024) == (1024, 0) and L._ln_chunks == [] and L.LN_BWD_CHUNKS is None  # default


@pytest.mark.parametrize("chunks", [False, True])
@pytest.mark.parametrize("lead,d", [((2, 3, 37), 192), ((3, 11), 384), ((2, 9), 768), ((7, 19), 100), ((3, 50), 7)])
def test_backward_prefetch(device, lead, d, chunks, launches, monkeypatch):
    """use_ln_prefetch(True): the backward loads each step's next rows ahead (masked past the program's own rows
    and past M: the last program here holds a partial step), alone and with the column chunks; LN and the fused
    add, all gradients, and the kernel was launched with PREFETCH on."""
    seen = []
    kernel = L._ln_bwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*a, **k):
                seen.append(k["PREFETCH"])
                return kernel[grid](*a, **k)
            return launch

    monkeypatch.setattr(L, "_ln_bwd_kernel", Spy())
    with L.use_ln_prefetch(True), L.use_ln_chunks(chunks):
        x, r = randn(*lead, d, device=device, scale=2.0), randn(*lead, d, device=device)
        w, b = randn(d, device=device), randn(d, device=device)
        gy, gh = randn(*lead, d, device=device), randn(*lead, d, device=device)
        m = x.numel() // d
        rows = L._config(d)[1]
        assert L._rows_per_prog(torch.device(device), rows, m) > rows  # several steps a program
        _compare(lambda x, w, b: L.layer_norm(x, w, b, 1e-5, backend=TRITON),
                 lambda x, w, b: L.layer_norm_reference(x, w, b, 1e-5), [x, w, b], [gy], "xwb")
        _compare(lambda x, r, w, b: L.add_layer_norm(x, r, w, b, 1e-6, backend=TRITON),
                 lambda x, r, w, b: L.add_layer_norm_reference(x, r, w, b, 1e-6), [x, r, w, b], [gy, gh], "xrwb")
    assert seen and all(seen) and launches == {"fwd": 2, "bwd": 2}
    assert L._bwd_prefetch() is None and L._ln_prefetch == []  # the autotuner's again


@pytest.mark.parametrize("prefetch,chunks", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("scale", [None, "x", "fp32"])  # per-sample factors: none, in x's dtype, fp32
@pytest.mark.parametrize("dtype,lead,d", [(torch.float32, (2, 9), 768), (torch.float16, (3, 11), 384),
                                          (torch.float32, (3, 50), 7), (torch.float16, (2, 13), 1000)])
def test_backward_column_sums(device, dtype, lead, d, scale, prefetch, chunks):
    """layer_norm_bwd_colsums (the one-node block's LN2): dx and dweight/dbias exactly as layer_norm_bwd gives
    them, and the column sums of dx (as stored) and of dh_out, each row times its sample's factor, against float64
    sums of the same terms; with the prefetch (dh_out loaded ahead) and the column chunks too."""
    B = lead[0]
    x, gy, gh = (randn(*lead, d, dtype=dtype, device=device, scale=s) for s in (2.0, 1.0, 1.0))
    w, b = randn(d, dtype=dtype, device=device), randn(d, dtype=dtype, device=device)
    _, mean, rstd = L._layer_norm_fwd_op(x, w, b, 1e-5)
    sd = {None: None, "x": dtype, "fp32": torch.float32}[scale]
    s_dx = s_ho = None
    if sd is not None:  # drop path's factors: 0 (dropped) or 1 / keep
        s_dx = (torch.arange(B, device=device) % 2 * 1.25).to(sd)
        s_ho = (torch.arange(1, B + 1, device=device) % 2 * 2.0).to(sd)
    with L.use_ln_prefetch(prefetch), L.use_ln_chunks(chunks):
        dx, dwdb, sums = L.layer_norm_bwd_colsums(gy, x, w, b, mean, rstd, gh, s_dx, s_ho)
        dx0, dwdb0 = L.layer_norm_bwd(gy, x, w, b, mean, rstd, gh)
    assert sums.shape == (2, d) and sums.dtype == torch.float32 and dwdb.dtype == w.dtype
    exact = dict(rtol=0, atol=0) if device == "cpu" else {}  # (a GPU's autotuner may pick other tiles for each)
    torch.testing.assert_close(dx, dx0, **exact)
    torch.testing.assert_close(dwdb, dwdb0, **exact)
    for got, t, s in ((sums[0], dx, s_dx), (sums[1], gh, s_ho)):
        terms = t.double().reshape(B, -1, d) * (1.0 if s is None else s.double().view(B, 1, 1))
        want = terms.sum((0, 1))
        tol = 1e-6 * terms.abs().sum((0, 1)) + 1e-7  # fp32 accumulation of the same terms
        assert torch.all((got.double() - want).abs() <= tol), (got - want).abs().max()
    with pytest.raises(ValueError, match="per-sample factor"):
        L.layer_norm_bwd_colsums(gy, x, w, b, mean, rstd, gh, torch.ones(B + 1, device=device))


class _Spy:
    """Stands in for a kernel: records (grid, constexprs) of each launch, then launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.seen = kernel, []

    def __getitem__(self, grid):
        def launch(*a, **k):
            self.seen.append((grid, k))
            return self.kernel[grid](*a, **k)
        return launch


@pytest.mark.parametrize("pipe", L.FWD_PIPES)  # (the backward's loop forced to the same depth)
@pytest.mark.parametrize("chunks", [False, True])
@pytest.mark.parametrize("dtype,lead,d", [(torch.float32, (3, 90), 7), (torch.float16, (2, 41), 192),
                                          (torch.float32, (5, 37), 384), (torch.float16, (2, 19), 1000)])
def test_pipelined_loops(device, dtype, lead, d, chunks, pipe, launches, monkeypatch):
    """use_ln_pipe(k): the forward's programs loop over PIPE_TILES tiles each (the last one's partly past M), the
    backward's step loop pipelined k deep, w and b loaded once a program; LN and the fused add with stochastic
    depth's factor, all outputs and gradients against float64. In the interpreter, both kernels were launched
    with PIPE = k and the forward's grid had fewer programs than tiles."""
    fwd, bwd = _Spy(L._ln_fwd_kernel), _Spy(L._ln_bwd_kernel)
    monkeypatch.setattr(L, "_ln_fwd_kernel", fwd)
    monkeypatch.setattr(L, "_ln_bwd_kernel", bwd)
    x, r = randn(*lead, d, dtype=dtype, device=device, scale=2.0) + 1.0, randn(*lead, d, dtype=dtype, device=device)
    w, b = randn(d, dtype=dtype, device=device), randn(d, dtype=dtype, device=device)
    s = _sample_scale(lead[0], dtype, device)
    gy, gh = randn(*lead, d, dtype=dtype, device=device), randn(*lead, d, dtype=dtype, device=device)
    with L.use_ln_pipe(pipe), L.use_ln_fwd_chunks(chunks), L.use_ln_chunks(chunks):
        _compare(lambda x, w, b: L.layer_norm(x, w, b, 1e-5, backend=TRITON),
                 lambda x, w, b: L.layer_norm_reference(x, w, b, 1e-5), [x, w, b], [gy], "xwb")
        _compare(lambda x, r, w, b, s: L.add_layer_norm(x, r, w, b, 1e-6, x_scale=s, backend=TRITON),
                 lambda x, r, w, b, s: L.add_layer_norm_reference(x, r, w, b, 1e-6, s), [x, r, w, b, s], [gy, gh],
                 "xrwbs")
    assert launches == {"fwd": 2, "bwd": 2} and L._pipe() is None and L._ln_pipe == []
    if L.INTERPRET:
        m, rows = x.numel() // d, L._config(d)[1]
        assert m % (rows * L.PIPE_TILES) and m > rows * L.PIPE_TILES  # several programs, the last one partial
        assert [(g, k["PIPE"], k["TILES"]) for g, k in fwd.seen] == [((L.cdiv(m, rows * L.PIPE_TILES),), pipe,
                                                                     L.PIPE_TILES)] * 2
        assert [k["PIPE"] for _, k in bwd.seen] == [pipe] * 2


def test_pipelined_loops_not_with_the_prefetch(monkeypatch):
    """The backward's prefetch forced with a pipeline forced: the prefetch alone (its loads are the pipeline's);
    a depth of 1 is refused; on a GPU a forced depth goes to the plain autotuners with PIPE (and the forward's
    TILES) in their constants, none past PIPE_MAX_BLOCK, and the default to the autotuners that pick it: the
    forward's with the pipelined configs from PIPE_MIN_ROWS rows on, the one-tile configs' below."""
    bwd = _Spy(L._ln_bwd_kernel)
    monkeypatch.setattr(L, "_ln_bwd_kernel", bwd)
    x, dy = torch.randn(5, 37, 96), torch.randn(5, 37, 96)
    _, mean, rstd = L._layer_norm_fwd_op(x, None, None, 1e-5)
    with L.use_ln_pipe(3), L.use_ln_prefetch(True):
        dx, _ = L.layer_norm_bwd(dy, x, None, None, mean, rstd, None)
    with L.use_ln_pipe(3):
        dx3, _ = L.layer_norm_bwd(dy, x, None, None, mean, rstd, None)
    assert [(k["PREFETCH"], k["PIPE"]) for _, k in bwd.seen] == [(True, 0), (False, 3)]
    torch.testing.assert_close(dx, dx3, rtol=0, atol=0)
    with pytest.raises(ValueError, match="stages must be 0"):
        L.use_ln_pipe(1)
    monkeypatch.undo()
    calls = []

    def rec(name):
        return lambda grid, args, consts: calls.append((name, consts.get("PIPE", "tuned"), consts.get("TILES")))
    monkeypatch.setattr(L, "INTERPRET", False)
    for name in ("_ln_fwd_tuned", "_ln_fwd_tuned_auto", "_ln_fwd_tuned_auto_one", "_ln_bwd_tuned",
                 "_ln_bwd_tuned_auto"):
        monkeypatch.setattr(L, name, rec(name), raising=False)
    for d in (768, 8192):
        x, dy = torch.randn(3, d), torch.randn(3, d)
        mean, rstd = torch.zeros(3), torch.ones(3)
        for forced in (None, 5, 0):
            with L.use_ln_pipe(forced) if forced is not None else contextlib.nullcontext():
                L.layer_norm_fwd(x, None, None, None, 1e-5)
                L.layer_norm_bwd(dy, x, None, None, mean, rstd, None)
    big = L._config(8192)[0] > L.PIPE_MAX_BLOCK
    assert big and calls == [
        ("_ln_fwd_tuned_auto_one", "tuned", None), ("_ln_bwd_tuned_auto", "tuned", None),  # (3 rows)
        ("_ln_fwd_tuned", 5, L.PIPE_TILES), ("_ln_bwd_tuned", 5, None),
        ("_ln_fwd_tuned", 0, 1), ("_ln_bwd_tuned", 0, None),
        ("_ln_fwd_tuned_auto_one", "tuned", None), ("_ln_bwd_tuned_auto", "tuned", None),
        ("_ln_fwd_tuned", 0, 1), ("_ln_bwd_tuned", 0, None),  # (8192: past PIPE_MAX_BLOCK)
        ("_ln_fwd_tuned", 0, 1), ("_ln_bwd_tuned", 0, None)]
    calls.clear()
    for m in (L.PIPE_MIN_ROWS - 1, L.PIPE_MIN_ROWS):
        L.layer_norm_fwd(torch.randn(m, 16), None, None, None, 1e-5)
    assert calls == [("_ln_fwd_tuned_auto_one", "tuned", None), ("_ln_fwd_tuned_auto", "tuned", None)]
    assert {c.kwargs["PIPE"] for c in L._auto_fwd_configs((0,))} == {0}
    assert {c.kwargs["PIPE"] for c in L._auto_fwd_configs()} == {0, *L.FWD_PIPES}


WIDTHS = (7, 65, 100, 192, 384, 768, 1000, 1024, 1280, 8192)


def _pruned(prune, configs, fwd, d):
    """An autotuner's configs kept for width d: its padded block's layout and column chunks, each with the padded
    block's (ROWS, warps) choices, and the pipelined loops' (PIPE: FWD_PIPES / BWD_PIPES up to PIPE_MAX_BLOCK, at
    their own choices); -> (kept without PIPE, layouts, choices)."""
    block = L._config(d)[0]
    kept = prune(configs, {"N": d})
    layouts = {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_N2"]) for c in kept}
    assert layouts == {(block, 0), L._chunk_layout(d, block)}, (d, layouts)
    plain = [c for c in kept if not c.kwargs["PIPE"]]
    tiles = {(c.kwargs["ROWS"], c.num_warps) for c in plain}
    assert tiles == set(L._fwd_choices(block) if fwd else L._bwd_choices(block)), d
    piped = [c for c in kept if c.kwargs["PIPE"]]
    depths = (L.FWD_PIPES if fwd else L.BWD_PIPES) if block <= L.PIPE_MAX_BLOCK else ()
    want = {(lay, rw, k) for lay in layouts for rw in L._pipe_choices(fwd, block) for k in depths}
    got = [((c.kwargs["BLOCK_N"], c.kwargs["BLOCK_N2"]), (c.kwargs["ROWS"], c.num_warps), c.kwargs["PIPE"])
           for c in piped]
    assert sorted(got) == sorted(want), d  # (each once)
    assert all(not c.kwargs.get("PREFETCH") for c in piped)
    if fwd:
        assert {c.kwargs["TILES"] for c in plain} <= {1} and {c.kwargs["TILES"] for c in piped} <= {L.PIPE_TILES}
    return plain, layouts, tiles


@pytest.mark.skipif(not L.HAS_TRITON, reason="builds triton.Config objects")
def test_autotuner_picks_the_backward_layout_and_prefetch(monkeypatch):
    """LN_BWD_CHUNKS and LN_BWD_PREFETCH None (the default): on a GPU the backward's autotuner whose configs carry
    the layout (padded block or column chunks) and the prefetch runs, pruned per width to its padded block's
    choices, its two layouts (one where the width fills its block) and no prefetch past PREFETCH_MAX_BLOCK nor on
    one warp (_prefetch_ok), nor, with the column sums, a pipelined one-warp step;
    either flag forced: the other autotuner, the other flag off. The interpreter: padded, no prefetch."""
    configs = L._auto_bwd_configs()
    for d in WIDTHS:
        block = L._config(d)[0]
        kept, layouts, choices = _pruned(L._auto_bwd_prune, configs, False, d)
        assert (L._chunk_layout(d, block)[1] > 0) == (d in (65, 192, 384, 768, 1280)), d  # 100: 64 + 64 fills 128
        prefetch = {c.kwargs["PREFETCH"] for c in kept}
        assert prefetch == ({False} if block > L.PREFETCH_MAX_BLOCK else {False, True}), d
        fetched = {(c.kwargs["ROWS"], c.num_warps) for c in kept if c.kwargs["PREFETCH"]}
        assert fetched == {rw for rw in choices if L._prefetch_ok(block, rw[1])}, d
        assert all(w > 1 for _, w in fetched) and ((block <= L.ONE_WARP_MAX_BLOCK) == any(w == 1 for _, w in choices))
        assert len(kept) == len(layouts) * (len(choices) + len(fetched))
        piped = {(c.kwargs["ROWS"], c.num_warps) for c in L._auto_bwd_prune(configs, {"N": d}) if c.kwargs["PIPE"]}
        summed = {(c.kwargs["ROWS"], c.num_warps)
                  for c in L._auto_bwd_prune(configs, {"N": d}, COLSUMS=True) if c.kwargs["PIPE"]}
        assert summed == {rw for rw in piped if rw[1] > 1}, d
    # the fixed-layout autotuner (a flag forced): a forced prefetch is not run on one warp
    import triton
    every = [triton.Config({"ROWS": r}, num_warps=w) for r, w in {rw for b in L._block_sizes() for rw in
                                                                     L._bwd_choices(b)}]
    for pf in (False, True):
        kept = {(c.kwargs["ROWS"], c.num_warps) for c in L._prune(False)(every, {}, BLOCK_N=1024, PIPE=0, PREFETCH=pf)}
        assert kept == {rw for rw in L._bwd_choices(1024) if not (pf and rw[1] == 1)}, pf
    assert L.LN_BWD_PREFETCH is None and L.LN_BWD_CHUNKS is None
    calls = []

    def rec(name):
        return lambda grid, args, consts: calls.append((name, consts.get("BLOCK_N2", "tuned"),
                                                         consts.get("PREFETCH", "tuned")))
    monkeypatch.setattr(L, "INTERPRET", False)
    monkeypatch.setattr(L, "_ln_bwd_tuned", rec("plain"), raising=False)
    monkeypatch.setattr(L, "_ln_bwd_tuned_auto", rec("auto"), raising=False)
    x, dy = torch.randn(5, 768), torch.randn(5, 768)
    mean, rstd = torch.zeros(5), torch.ones(5)

    def bwd():
        L.layer_norm_bwd(dy, x, torch.ones(768), torch.zeros(768), mean, rstd, None)
    bwd()
    with L.use_ln_prefetch(True):
        bwd()
    with L.use_ln_chunks(True):
        bwd()
    assert calls == [("auto", "tuned", "tuned"), ("plain", 0, True), ("plain", 256, False)]


def test_forward_layout_autotuned_or_forced(monkeypatch):
    """LN_FWD_CHUNKS None (the default): on a GPU the forward's autotuner whose configs carry the layout runs,
    pruned per width to its padded block's choices and its two layouts; forced: the plain autotuner with that
    layout. The interpreter launches the layout asked for (padded by default)."""
    configs = L._auto_fwd_configs()
    for d in WIDTHS:
        kept, layouts, choices = _pruned(L._auto_fwd_prune, configs, True, d)
        assert len(kept) == len(layouts) * len(choices), d
    assert L.LN_FWD_CHUNKS is None
    seen = []
    kernel = L._ln_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*a, **k):
                seen.append((k["BLOCK_N"], k["BLOCK_N2"]))
                return kernel[grid](*a, **k)
            return launch

    monkeypatch.setattr(L, "_ln_fwd_kernel", Spy())
    x = torch.randn(3, 384)
    with L.use_ln_fwd_chunks(True):
        L.layer_norm_fwd(x, None, None, None, 1e-5)
    L.layer_norm_fwd(x, None, None, None, 1e-5)
    assert seen == [(256, 128), (512, 0)] and L._fwd_chunks_on() is None
    monkeypatch.undo()
    calls = []

    def rec(name):
        return lambda grid, args, consts: calls.append((name, consts.get("BLOCK_N2", "tuned")))
    monkeypatch.setattr(L, "INTERPRET", False)
    monkeypatch.setattr(L, "_ln_fwd_tuned", rec("plain"), raising=False)
    monkeypatch.setattr(L, "_ln_fwd_tuned_auto_one", rec("auto"), raising=False)  # (3 rows: the one-tile configs)
    L.layer_norm_fwd(x, None, None, None, 1e-5)
    with L.use_ln_fwd_chunks(True):
        L.layer_norm_fwd(x, None, None, None, 1e-5)
    with L.use_ln_fwd_chunks(False):
        L.layer_norm_fwd(x, None, None, None, 1e-5)
    assert calls == [("auto", "tuned"), ("plain", 128), ("plain", 0)]


def test_auto_trains_on_the_kernels_at_every_width_inside_a_graph_step(monkeypatch):
    """'auto' with autograd: eager LayerNorm below AUTO_MIN_D_TRAINING (host-bound), but the kernels inside
    _dispatch.graph_step (a step a CUDA graph replays: device time decides), at every width."""
    from flashvit.kernels import _dispatch
    monkeypatch.setattr(L, "use_triton", lambda x, backend=None, auto=True: auto)  # the verdict itself
    for d, outside in ((384, False), (192, False), (768, True), (1024, True)):
        x, w = torch.randn(4, d, requires_grad=True), torch.randn(d, requires_grad=True)
        assert L._run_triton(x, None, weight=w, bias=None) is outside
        with _dispatch.graph_step():
            assert _dispatch.in_graph_step() and L._run_triton(x, None, weight=w, bias=None)
        with torch.no_grad():
            assert L._run_triton(x, None, weight=w, bias=None)  # inference: every width
    assert not _dispatch.in_graph_step()


def test_add_layer_norm_only_y_used(device):
    """h unused downstream: its gradient arrives as zeros/None and d(x) = d(residual) = dx through LN."""
    x, r = randn(3, 7, 40, device=device, requires_grad=True), randn(3, 7, 40, device=device, requires_grad=True)
    w, b = randn(40, device=device), randn(40, device=device)
    y, _ = L.add_layer_norm(x, r, w, b, backend=TRITON)
    y.square().sum().backward()
    x64, r64 = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    y64, _ = L.add_layer_norm_reference(x64, r64, w.double(), b.double())
    y64.square().sum().backward()
    assert_close_to_ref(x.grad, x64.grad, atol=1e-4, name="dx")
    assert_close_to_ref(r.grad, r64.grad, atol=1e-4, name="dr")


@pytest.mark.parametrize("xd,rd,pd", [
    (torch.float16, torch.float16, torch.float32),  # autocast: low-precision activations, fp32 parameters
    (torch.float16, torch.float32, torch.float32),  # fp32 residual stream + fp16 branch output
    (torch.float32, torch.float16, torch.float32),
    (torch.float16, torch.bfloat16, torch.float32),  # promoted to fp32 on the host
    (torch.float32, torch.float32, torch.float16),  # parameters in an odd dtype: cast to fp32
])
def test_mixed_dtypes(device, xd, rd, pd, launches):
    lead, d = (2, 9), 100
    x, r = randn(*lead, d, dtype=xd, device=device), randn(*lead, d, dtype=rd, device=device)
    w, b = randn(d, dtype=pd, device=device), randn(d, dtype=pd, device=device)
    hd = torch.promote_types(xd, rd)
    gy, gh = randn(*lead, d, dtype=hd, device=device), randn(*lead, d, dtype=hd, device=device)
    _compare(lambda x, r, w, b: L.add_layer_norm(x, r, w, b, backend=TRITON),
             lambda x, r, w, b: L.add_layer_norm_reference(x, r, w, b), [x, r, w, b], [gy, gh], "xrwb")
    _compare(lambda x, w, b: L.layer_norm(x, w, b, backend=TRITON),
             lambda x, w, b: L.layer_norm_reference(x, w, b), [x, w, b], [gy.to(xd)], "xwb")
    assert launches == {"fwd": 2, "bwd": 2}


@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_optional_weight_bias(device, affine, launches):
    d = 33
    x, r = randn(4, d, device=device), randn(4, d, device=device)
    w = randn(d, device=device) if affine == "weight" else None
    b = randn(d, device=device) if affine == "bias" else None
    gy, gh = randn(4, d, device=device), randn(4, d, device=device)
    _compare(lambda x, r, w, b: L.add_layer_norm(x, r, w, b, backend=TRITON),
             lambda x, r, w, b: L.add_layer_norm_reference(x, r, w, b), [x, r, w, b], [gy, gh], "xrwb")
    assert launches == {"fwd": 1, "bwd": 1}


def test_non_contiguous(device, launches):
    d = 96
    base = randn(3, 2 * d + 5, 11, device=device)
    x = base[:, 3:3 + d, :].transpose(1, 2)  # (3, 11, d), last dim stride 11: not unit-stride
    wide = randn(3, 11, 2 * d, device=device)
    r = wide[..., ::2]  # (3, 11, d), stride 2
    sliced = randn(2, 7, d + 9, device=device)[..., 4:4 + d]  # unit-stride last dim, row stride d + 9
    w, b = randn(2 * d, device=device)[::2], randn(d, device=device)  # strided weight
    gy = randn(3, d, 11, device=device).transpose(1, 2)  # non-contiguous incoming gradient
    gh = randn(3, 11, d, device=device)
    assert not x.is_contiguous() and not r.is_contiguous() and not sliced.is_contiguous()
    _compare(lambda x, r, w, b: L.add_layer_norm(x, r, w, b, backend=TRITON),
             lambda x, r, w, b: L.add_layer_norm_reference(x, r, w, b), [x, r, w, b], [gy, gh], "xrwb")
    _compare(lambda x, w, b: L.layer_norm(x, w, b, backend=TRITON),
             lambda x, w, b: L.layer_norm_reference(x, w, b), [sliced, w, b], [randn(2, 7, d, device=device)], "xwb")
    assert launches == {"fwd": 2, "bwd": 2}


def test_deterministic_backward(device):
    """Several programs each reduce their own rows: 20 backward runs give bit-equal gradients."""
    lead, d = (75,), 192  # 10 row tiles of 8: 4 backward programs, each looping over up to 3 tiles
    assert L._config(d)[1] == 8
    x, r = randn(*lead, d, device=device), randn(*lead, d, device=device)
    w, b = randn(d, device=device), randn(d, device=device)
    gy, gh = randn(*lead, d, device=device), randn(*lead, d, device=device)
    _assert_bit_equal_backwards([x, r, w, b], [gy, gh])


def _assert_bit_equal_backwards(inputs, gouts, runs: int = 20):
    """``runs`` forward+backward passes of the fused add + LayerNorm on ``inputs`` give bit-equal gradients."""
    first = None
    for _ in range(runs):
        _, grads = _fwd_bwd(lambda x, r, w, b: L.add_layer_norm(x, r, w, b, backend=TRITON), _leaves(inputs), gouts)
        first = first or grads
        for g0, g in zip(first, grads):
            assert torch.equal(g0, g)


@pytest.mark.parametrize("d,eps", [(64, 1e-5), (130, 1e-6), (768, 1e-6), (257, 1e-12)])
def test_rows_of_equal_values_normalize_to_exactly_b(device, d, eps, launches):
    """fp32 rows whose values are all equal (so that an fp32 sum / N is not exact): y = b exactly for layer_norm
    and add_layer_norm (x + residual equal per row), as PyTorch gives; rows of large offset and small spread
    beside them: y, dx, dw, db vs float64 no worse than 3x PyTorch's own fp32 error."""
    g = torch.Generator().manual_seed(d)
    c = torch.randn(6, 1, generator=g, dtype=torch.float64) * 3
    x = c.expand(6, d).float().contiguous()
    x[3:] = (1e4 + torch.randn(3, d, generator=g) * 0.05)  # offset rows beside the constant ones
    w, b = randn(d, device=device), randn(d, device=device)
    gy = randn(6, d, device=device)
    x = x.to(device)
    y = L.layer_norm(x, w, b, eps, backend=TRITON)
    assert torch.equal(y[:3], b.expand(3, d))
    r = x - 0.5  # h = x + r: still one value a row in the first three
    yh, h = L.add_layer_norm(x, r, w, b, eps, backend=TRITON)
    assert torch.equal(yh[:3], b.expand(3, d)) and torch.equal(h, x + r)
    # ill-conditioned in fp32 (the offset rows' x - mean keeps ~3 of its digits): PyTorch's own error is the scale
    def run(fn, dtype=None):
        leaves = _leaves([x, w, b], dtype)
        out = fn(*leaves, eps)
        out.backward(gy.to(out.dtype))
        return [out.detach()] + [t.grad for t in leaves]

    ours = run(lambda *a: L.layer_norm(*a, backend=TRITON))
    ref, pt = run(L.layer_norm_reference, torch.float64), run(L.layer_norm_reference)
    for name, a, r_, t in zip(("y", "dx", "dw", "db"), ours, ref, pt):
        assert max_err(a, r_) <= 3.0 * max_err(t, r_) + 1e-5, (name, max_err(a, r_), max_err(t, r_))


def test_empty_rows(device):
    x = torch.empty(0, 5, 16, device=device, requires_grad=True)
    w, b = randn(16, device=device, requires_grad=True), randn(16, device=device, requires_grad=True)
    y = L.layer_norm(x, w, b, backend=TRITON)
    y.sum().backward()
    assert y.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_bad_inputs(device):
    x = randn(2, 3, 8, device=device)
    w, b = randn(8, device=device), randn(8, device=device)
    with pytest.raises(ValueError, match=r"weight has shape \(7,\); expected \(8,\)"):
        L.layer_norm(x, randn(7, device=device), b, backend=TRITON)
    with pytest.raises(ValueError, match="bias must have 1 dimensions"):
        L.layer_norm(x, w, randn(1, 8, device=device), backend=TRITON)
    with pytest.raises(TypeError, match="x has dtype torch.int32"):
        L.layer_norm(x.to(torch.int32), w, b, backend=TRITON)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        L.layer_norm(x.double(), w, b, backend=TRITON)  # float64: reference only
    with pytest.raises(ValueError, match="one device"):
        L.layer_norm(x, w.to("meta"), b, backend=TRITON)
    with pytest.raises(ValueError, match="one device"):
        L.add_layer_norm(x, x.to("meta"), w, b, backend=TRITON)
    for eps in (0.0, -1e-5, float("nan")):
        with pytest.raises(ValueError, match="eps must be > 0"):
            L.layer_norm(x, w, b, eps, backend=TRITON)
    with pytest.raises(ValueError, match="residual has shape"):
        L.add_layer_norm(x, x[:, :2], w, b, backend=TRITON)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        L.layer_norm(x.tolist(), w, b, backend=TRITON)
    wide = torch.empty(1, L.MAX_D + 1, device=device)
    with pytest.raises(ValueError, match="last dim from 1 to 8192"):
        L.layer_norm(wide, None, None, backend=TRITON)
    # Outside the kernels' range with dispatch left to 'auto': the reference takes it, no error.
    assert torch.allclose(L.layer_norm(x.double(), w.double(), None, backend="auto"),
                          L.layer_norm_reference(x.double(), w.double(), None))


def test_reference_backend_launches_nothing(launches):
    x, w, b = randn(3, 8), randn(8), randn(8)
    L.layer_norm(x, w, b, backend="torch")
    L.add_layer_norm(x, x, w, b, backend="torch")
    assert launches == {"fwd": 0, "bwd": 0}


def test_module_matches_nn_layernorm(device, launches):
    d = 48
    ref = torch.nn.LayerNorm(d, eps=1e-6, device=device)
    with torch.no_grad():
        ref.weight.copy_(randn(d, device=device))
        ref.bias.copy_(randn(d, device=device))
    ours = L.LayerNorm(d, eps=1e-6, device=device)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert list(ours.state_dict()) == ["weight", "bias"]
    ref.load_state_dict(ours.state_dict(), strict=True)
    x, a = randn(2, 5, d, device=device), randn(2, 5, d, device=device)
    with flashvit.use_backend(TRITON):
        y = ours(x)
        y2, h = ours.forward_add(a, x)
    assert launches["fwd"] == 2
    torch.testing.assert_close(y, ref(x), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(h, a + x)
    torch.testing.assert_close(y2, ref(a + x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kw", [{"elementwise_affine": False}, {"bias": False}])
def test_module_without_affine(device, kw, launches):
    d = 24
    ref = torch.nn.LayerNorm(d, device=device, **kw)
    ours = L.LayerNorm(d, device=device, **kw)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = randn(3, d, device=device, requires_grad=True)
    gy = randn(3, d, device=device)
    with flashvit.use_backend(TRITON):
        y = ours(x)
    y.backward(gy)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = ref(x2)
    y2.backward(gy)
    assert launches == {"fwd": 1, "bwd": 1}
    torch.testing.assert_close(y, y2, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
    if ours.weight is not None:
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-4)
    assert ours.bias is None or ours.bias.grad is not None


def test_aot_specs_cover_launch_configs():
    """Every (D, path, dtype) the launchers can pick has a matching AOT spec; all three kernels are listed."""
    labels = {s.label() for s in L.AOT_SPECS}
    assert {s.kernel for s in L.AOT_SPECS} == {L._ln_fwd_kernel, L._ln_bwd_kernel}
    for d in (1, 7, 192, 384, 768, 1000, 1280, 4097, 8192):
        block_n, rows, fwd_warps, bwd_warps = L._config(d)
        assert block_n >= d and rows * block_n >= L.TILE
        for t, w in (("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32")):
            assert f"ln_fwd[BLOCK_N={block_n},x={t},r={t},w={w},res=1]" in labels
            assert f"ln_bwd[BLOCK_N={block_n},x={t},w={w},dh=0]" in labels
    specs = {(s.label(), s.num_warps) for s in L.AOT_SPECS}
    assert ("ln_fwd[BLOCK_N=1024,x=bf16,r=fp32,w=fp32,res=1]", L._config(768)[2]) in specs
    # The GPU autotuner's alternatives: the default first, each alternative compiled (bf16), backward ROWS
    # dividing its fixed rows per program (same grid and partial buffer whatever the choice).
    for block_n in L._block_sizes():
        _, rows, fwd_warps, bwd_warps = L._config(block_n)
        assert L._fwd_choices(block_n)[0] == (rows, fwd_warps) and L._bwd_choices(block_n)[0] == (rows, bwd_warps)
        for r, w in L._fwd_choices(block_n)[1:]:
            assert (f"ln_fwd[BLOCK_N={block_n},x=bf16,r=bf16,w=bf16,res=1,ROWS={r},w{w}]", w) in specs
        for r, w in L._bwd_choices(block_n)[1:]:
            assert L._rows_per_prog(torch.device("cuda"), rows, 50432) % r == 0
            assert (f"ln_bwd[BLOCK_N={block_n},x=bf16,w=bf16,dh=1,ROWS={r},w{w}]", w) in specs
    # ~16 elements a thread among them, where the default has ~8 (more bytes in flight per thread)
    assert (4, 4) in L._fwd_choices(512) and (1, 4) in L._fwd_choices(2048) and (1, 4) in L._bwd_choices(2048)
    assert (8, 8) in L._fwd_choices(512) and (8, 8) in L._bwd_choices(512)  # and twice the tile at D = 384
    assert (4, 4) in L._fwd_choices(1024) and (8, 4) in L._fwd_choices(512)  # and ~32 in the forward
    # and one-warp tiles up to 1024 lanes (Inductor's: min(1024 / BLOCK_N, 8) rows), two warps in the backward too
    assert (1, 1) in L._fwd_choices(1024) and (2, 1) in L._fwd_choices(512) and (8, 1) in L._fwd_choices(64)
    assert {(1, 1), (1, 2)} <= set(L._bwd_choices(1024)) and (1, 1) in L._pipe_choices(False, 1024)
    assert all(w > 1 for _, w in L._fwd_choices(2048) + L._bwd_choices(2048) + L._pipe_choices(True, 1024))
    # the backward's column chunks (use_ln_chunks) at ViT's widths: every choice of the padded block
    with L.use_ln_chunks(True):
        for d in (192, 384, 768, 1280):
            block_n = L._config(d)[0]
            first, second = L._bwd_chunks(d, block_n)
            for r, w in L._bwd_choices(block_n):
                assert (f"ln_bwd[BLOCK_N={first}+{second},x=bf16,w=bf16,dh=1,ROWS={r},w{w}]", w) in specs


# ---------------------------------------------------------------------------------------------
# CUDA only: bf16, ViT-sized rows, torch.compile.


@pytest.mark.gpu
@pytest.mark.parametrize("d", [192, 384, 768, 1000, 1280, 8192])
def test_bf16_gpu(d):
    lead = (2, 197)
    dt = torch.bfloat16
    x, r = randn(*lead, d, dtype=dt, device="cuda"), randn(*lead, d, dtype=dt, device="cuda")
    w, b = randn(d, dtype=dt, device="cuda"), randn(d, dtype=dt, device="cuda")
    gy, gh = randn(*lead, d, dtype=dt, device="cuda"), randn(*lead, d, dtype=dt, device="cuda")
    _compare(lambda x, r, w, b: L.add_layer_norm(x, r, w, b, backend=TRITON),
             lambda x, r, w, b: L.add_layer_norm_reference(x, r, w, b), [x, r, w, b], [gy, gh], "xrwb")
    _compare(lambda x, w, b: L.layer_norm(x, w, b, backend=TRITON),
             lambda x, w, b: L.layer_norm_reference(x, w, b), [x, w.float(), b.float()], [gy], "xwb")


@pytest.mark.gpu
def test_bf16_autocast_mix_gpu():
    """The training case: bf16 branch output + fp32 residual stream, fp32 parameters."""
    lead, d = (4, 197), 768
    x = randn(*lead, d, dtype=torch.bfloat16, device="cuda")
    r = randn(*lead, d, device="cuda")
    w, b = randn(d, device="cuda"), randn(d, device="cuda")
    gy, gh = randn(*lead, d, device="cuda"), randn(*lead, d, device="cuda")
    _compare(lambda x, r, w, b: L.add_layer_norm(x, r, w, b, backend=TRITON),
             lambda x, r, w, b: L.add_layer_norm_reference(x, r, w, b), [x, r, w, b], [gy, gh], "xrwb")


@pytest.mark.gpu
def test_sample_scale_bf16_gpu():
    """Stochastic depth in training: a bf16 branch and its bf16 factor per sample (drop_path's draw), the fp32
    residual stream and parameters; ViT-B rows (197 a sample)."""
    lead, d = (8, 197), 768
    x, r = randn(*lead, d, dtype=torch.bfloat16, device="cuda"), randn(*lead, d, device="cuda")
    w, b = randn(d, device="cuda"), randn(d, device="cuda")
    s = _sample_scale(lead[0], torch.bfloat16, "cuda")
    gy, gh = randn(*lead, d, device="cuda"), randn(*lead, d, device="cuda")
    _compare(lambda x, r, w, b, s: L.add_layer_norm(x, r, w, b, x_scale=s, backend=TRITON),
             lambda x, r, w, b, s: L.add_layer_norm_reference(x, r, w, b, 1e-5, s), [x, r, w, b, s], [gy, gh],
             "xrwbs")


@pytest.mark.gpu
def test_deterministic_backward_gpu():
    lead, d = (64, 197), 768  # 12608 rows: hundreds of backward programs
    dt = torch.bfloat16
    x, r = randn(*lead, d, dtype=dt, device="cuda"), randn(*lead, d, dtype=dt, device="cuda")
    w, b = randn(d, device="cuda"), randn(d, device="cuda")
    gy, gh = randn(*lead, d, dtype=dt, device="cuda"), randn(*lead, d, dtype=dt, device="cuda")
    _assert_bit_equal_backwards([x, r, w, b], [gy, gh])


@pytest.mark.gpu
@pytest.mark.parametrize("d", [192, 384, 768, 1280])
def test_backward_column_chunks_gpu(d):
    """The backward's column chunks (use_ln_chunks, the graph bench's [chunks] rows) in bf16, autotuned, and its
    20 backward runs bit-equal."""
    lead, dt = (8, 197), torch.bfloat16
    x, r = randn(*lead, d, dtype=dt, device="cuda"), randn(*lead, d, dtype=dt, device="cuda")
    w, b = randn(d, dtype=dt, device="cuda"), randn(d, dtype=dt, device="cuda")
    gy, gh = randn(*lead, d, dtype=dt, device="cuda"), randn(*lead, d, dtype=dt, device="cuda")
    with L.use_ln_chunks(True):
        assert L._bwd_chunks(d, L._config(d)[0])[1] > 0
        _compare(lambda x, r, w, b: L.add_layer_norm(x, r, w, b, backend=TRITON),
                 lambda x, r, w, b: L.add_layer_norm_reference(x, r, w, b), [x, r, w, b], [gy, gh], "xrwb")
        _assert_bit_equal_backwards([x, r, w, b], [gy, gh])


@pytest.mark.gpu
@pytest.mark.parametrize("d", [384, 768, 1024, 1280, 5000])
def test_backward_layout_and_prefetch_autotuned_gpu(d):
    """The default (LN_BWD_CHUNKS, LN_BWD_PREFETCH None) on a GPU: the autotuner that picks the backward's layout
    and prefetch runs, and picks one of the width's configs; bf16 vs float64, 20 backward runs bit-equal."""
    assert L.LN_BWD_CHUNKS is None and L.LN_BWD_PREFETCH is None
    lead, dt = (8, 197), torch.bfloat16
    x, r = randn(*lead, d, dtype=dt, device="cuda"), randn(*lead, d, dtype=dt, device="cuda")
    w, b = randn(d, dtype=dt, device="cuda"), randn(d, dtype=dt, device="cuda")
    gy, gh = randn(*lead, d, dtype=dt, device="cuda"), randn(*lead, d, dtype=dt, device="cuda")
    _compare(lambda x, r, w, b: L.add_layer_norm(x, r, w, b, backend=TRITON),
             lambda x, r, w, b: L.add_layer_norm_reference(x, r, w, b), [x, r, w, b], [gy, gh], "xrwb")
    _assert_bit_equal_backwards([x, r, w, b], [gy, gh])
    tuner = L._ln_bwd_tuned_auto.tuner
    width = {id(c) for c in L._auto_bwd_prune(tuner.configs, {"N": d})}
    assert any(id(c) in width for c in tuner.cache.values())
    tuner = L._ln_fwd_tuned_auto_one.tuner  # (LN_FWD_CHUNKS None: the layout autotuned too; 1576 rows: one-tile)
    width = {id(c) for c in L._auto_fwd_prune(tuner.configs, {"N": d})}
    assert any(id(c) in width for c in tuner.cache.values())


@pytest.mark.gpu
@pytest.mark.parametrize("d", [192, 384, 768, 1280])
def test_forward_column_chunks_gpu(d):
    """The forward's column chunks forced (use_ln_fwd_chunks) in bf16, autotuned: LN and the fused add (with
    stochastic depth's factor too) against float64."""
    lead, dt = (8, 197), torch.bfloat16
    x, r = randn(*lead, d, dtype=dt, device="cuda"), randn(*lead, d, dtype=dt, device="cuda")
    w, b = randn(d, dtype=dt, device="cuda"), randn(d, dtype=dt, device="cuda")
    gy, gh = randn(*lead, d, dtype=dt, device="cuda"), randn(*lead, d, dtype=dt, device="cuda")
    s = _sample_scale(lead[0], dt, "cuda")
    with L.use_ln_fwd_chunks(True):
        assert L._chunk_layout(d, L._config(d)[0])[1] > 0
        _compare(lambda x, w, b: L.layer_norm(x, w, b, backend=TRITON),
                 lambda x, w, b: L.layer_norm_reference(x, w, b), [x, w, b], [gy], "xwb")
        _compare(lambda x, r, w, b, s: L.add_layer_norm(x, r, w, b, 1e-6, x_scale=s, backend=TRITON),
                 lambda x, r, w, b, s: L.add_layer_norm_reference(x, r, w, b, 1e-6, s), [x, r, w, b, s], [gy, gh],
                 "xrwbs")


@pytest.mark.gpu
@pytest.mark.parametrize("d,pipes", [(384, False), (768, True)])
def test_every_forward_tile_gpu(d, pipes, monkeypatch):
    """Each one-tile config of the forward's autotuner at this width (both layouts, every (ROWS, warps) choice),
    and (``pipes``) each pipelined one, launched alone in bf16 (rows not a multiple of a program's): LN and the
    fused add against float64."""
    import triton

    from flashvit.kernels._dispatch import Launcher
    lead, dt = (8, 197), torch.bfloat16  # (below PIPE_MIN_ROWS: the one-tile autotuner)
    x, r = randn(*lead, d, dtype=dt, device="cuda"), randn(*lead, d, dtype=dt, device="cuda")
    w, b = randn(d, dtype=dt, device="cuda"), randn(d, dtype=dt, device="cuda")
    gy, gh = randn(*lead, d, dtype=dt, device="cuda"), randn(*lead, d, dtype=dt, device="cuda")
    configs = L._auto_fwd_prune(L._auto_fwd_configs() if pipes else L._auto_fwd_configs((0,)), {"N": d})
    block = L._config(d)[0]
    assert {(c.kwargs["ROWS"], c.num_warps) for c in configs if not c.kwargs["PIPE"]} == set(L._fwd_choices(block))
    assert {(c.kwargs["ROWS"], c.num_warps) for c in configs if c.kwargs["PIPE"]} == (
        set(L._pipe_choices(True, block)) if pipes else set())
    bad = []
    for cfg in configs:
        monkeypatch.setattr(L, "_ln_fwd_tuned_auto_one", Launcher(triton.autotune([cfg], key=["N", "HAS_RES"])(
            L._ln_fwd_kernel)))
        try:
            _compare(lambda x, w, b: L.layer_norm(x, w, b, backend=TRITON),
                     lambda x, w, b: L.layer_norm_reference(x, w, b), [x, w, b], [gy], "xwb")
            _compare(lambda x, r, w, b: L.add_layer_norm(x, r, w, b, backend=TRITON),
                     lambda x, r, w, b: L.add_layer_norm_reference(x, r, w, b), [x, r, w, b], [gy, gh], "xrwb")
        except AssertionError as e:
            bad.append((str(cfg), str(e).splitlines()[0][:160]))
    assert configs and not bad, bad


@pytest.mark.gpu
@pytest.mark.parametrize("d", [384, 768])
def test_every_backward_tile_gpu(d, monkeypatch):
    """Each config of the backward's autotuner at this width (both layouts; every (ROWS, warps) choice plain, with
    the prefetch and pipelined; one and two warps among them), launched alone in bf16 on rows not a multiple of a
    program's: the fused add's gradients against float64, and LN2's column sums (COLSUMS) against torch's."""
    import triton

    from flashvit.kernels._dispatch import Launcher
    lead, dt = (8, 197), torch.bfloat16
    x, r = randn(*lead, d, dtype=dt, device="cuda"), randn(*lead, d, dtype=dt, device="cuda")
    w, b = randn(d, dtype=dt, device="cuda"), randn(d, dtype=dt, device="cuda")
    gy, gh = randn(*lead, d, dtype=dt, device="cuda"), randn(*lead, d, dtype=dt, device="cuda")
    configs = L._auto_bwd_prune(L._auto_bwd_configs(), {"N": d})
    assert {c.num_warps for c in configs} >= {1, 2}
    bad = []
    for cfg in configs:
        monkeypatch.setattr(L, "_ln_bwd_tuned_auto", Launcher(triton.autotune([cfg], key=["N", "HAS_DHO", "COLSUMS"])(
            L._ln_bwd_kernel)))
        try:
            _compare(lambda x, r, w, b: L.add_layer_norm(x, r, w, b, backend=TRITON),
                     lambda x, r, w, b: L.add_layer_norm_reference(x, r, w, b), [x, r, w, b], [gy, gh], "xrwb")
            if not (cfg.kwargs["PIPE"] and cfg.num_warps == 1):  # (not a COLSUMS config: see _auto_bwd_prune)
                h = x + r
                _, _, mean, rstd = L.layer_norm_fwd(h, None, w, b, 1e-5)
                dx, _, sums = L.layer_norm_bwd_colsums(gy, h, w, b, mean, rstd, gh)
                want = torch.stack([dx.float().sum((0, 1)), gh.float().sum((0, 1))])
                torch.testing.assert_close(sums, want, rtol=1e-3, atol=1e-2)
        except AssertionError as e:
            bad.append((str(cfg), str(e).splitlines()[0][:160]))
    assert configs and not bad, bad


@pytest.mark.gpu
@pytest.mark.parametrize("d,chunks", [(384, False), (768, False), (768, True), (1024, False), (1280, True)])
def test_backward_prefetch_gpu(d, chunks):
    """The backward's next-rows prefetch (use_ln_prefetch, the graph bench's [prefetch] rows) in bf16, autotuned,
    alone and with the column chunks, and its 20 backward runs bit-equal."""
    lead, dt = (8, 197), torch.bfloat16
    x, r = randn(*lead, d, dtype=dt, device="cuda"), randn(*lead, d, dtype=dt, device="cuda")
    w, b = randn(d, dtype=dt, device="cuda"), randn(d, dtype=dt, device="cuda")
    gy, gh = randn(*lead, d, dtype=dt, device="cuda"), randn(*lead, d, dtype=dt, device="cuda")
    with L.use_ln_prefetch(True), L.use_ln_chunks(chunks):
        _compare(lambda x, r, w, b: L.add_layer_norm(x, r, w, b, backend=TRITON),
                 lambda x, r, w, b: L.add_layer_norm_reference(x, r, w, b), [x, r, w, b], [gy, gh], "xrwb")
        _compare(lambda x, w, b: L.layer_norm(x, w, b, backend=TRITON),
                 lambda x, w, b: L.layer_norm_reference(x, w, b), [x, w, b], [gy], "xwb")
        _assert_bit_equal_backwards([x, r, w, b], [gy, gh])


@pytest.mark.gpu
@pytest.mark.parametrize("pipe", [*L.FWD_PIPES, 0])
@pytest.mark.parametrize("d,chunks", [(384, True), (768, False), (768, True), (1024, False), (1280, True)])
def test_pipelined_loops_gpu(d, chunks, pipe):
    """The pipelined loops (use_ln_pipe: the forward's TILES-tile programs, the backward's steps; 0: both off) in
    bf16, autotuned, with the column chunks or not: LN and the fused add (with stochastic depth's factor) against
    float64, rows not a multiple of a program's, and 20 backward runs bit-equal."""
    lead, dt = (8, 197), torch.bfloat16
    x, r = randn(*lead, d, dtype=dt, device="cuda"), randn(*lead, d, dtype=dt, device="cuda")
    w, b = randn(d, dtype=dt, device="cuda"), randn(d, dtype=dt, device="cuda")
    gy, gh = randn(*lead, d, dtype=dt, device="cuda"), randn(*lead, d, dtype=dt, device="cuda")
    s = _sample_scale(lead[0], dt, "cuda")
    with L.use_ln_pipe(pipe), L.use_ln_fwd_chunks(chunks), L.use_ln_chunks(chunks):
        _compare(lambda x, w, b: L.layer_norm(x, w, b, backend=TRITON),
                 lambda x, w, b: L.layer_norm_reference(x, w, b), [x, w, b], [gy], "xwb")
        _compare(lambda x, r, w, b, s: L.add_layer_norm(x, r, w, b, 1e-6, x_scale=s, backend=TRITON),
                 lambda x, r, w, b, s: L.add_layer_norm_reference(x, r, w, b, 1e-6, s), [x, r, w, b, s], [gy, gh],
                 "xrwbs")
        _assert_bit_equal_backwards([x, r, w, b], [gy, gh])


@pytest.mark.gpu
@pytest.mark.parametrize("d", [384, 768])
def test_forward_pipelined_configs_autotuned_gpu(d):
    """The default forward from PIPE_MIN_ROWS rows on: the autotuner with the pipelined configs too runs and picks
    one of the width's configs; LN and the fused add, outputs and gradients, against float64."""
    lead, dt = (L.PIPE_MIN_ROWS // 197 + 1, 197), torch.bfloat16
    x, r = randn(*lead, d, dtype=dt, device="cuda"), randn(*lead, d, dtype=dt, device="cuda")
    w, b = randn(d, dtype=dt, device="cuda"), randn(d, dtype=dt, device="cuda")
    gy, gh = randn(*lead, d, dtype=dt, device="cuda"), randn(*lead, d, dtype=dt, device="cuda")
    _compare(lambda x, w, b: L.layer_norm(x, w, b, backend=TRITON),
             lambda x, w, b: L.layer_norm_reference(x, w, b), [x, w, b], [gy], "xwb")
    _compare(lambda x, r, w, b: L.add_layer_norm(x, r, w, b, backend=TRITON),
             lambda x, r, w, b: L.add_layer_norm_reference(x, r, w, b), [x, r, w, b], [gy, gh], "xrwb")
    tuner = L._ln_fwd_tuned_auto.tuner
    width = {id(c) for c in L._auto_fwd_prune(tuner.configs, {"N": d})}
    assert any(id(c) in width for c in tuner.cache.values())


@pytest.mark.gpu
def test_torch_compile_gpu():
    """The custom ops are opaque to torch.compile: fullgraph (no graph break), same numbers as eager."""
    d = 384
    x, a = randn(3, 50, d, device="cuda", requires_grad=True), randn(3, 50, d, device="cuda", requires_grad=True)
    _check_compiled_block(L.LayerNorm(d, device="cuda"), a, x)


def _check_compiled_block(mod, a, x, **compile_kw):
    """A pre-norm block (fused add + LN, then LN) compiled fullgraph: same output and grads as eager."""
    def block(a, x):
        y, h = mod.forward_add(a, x)
        return mod(y) + h

    with flashvit.use_backend(TRITON):
        eager = block(a, x)
        eager.sum().backward()
        g_eager = (a.grad.clone(), x.grad.clone(), mod.weight.grad.clone())
        a.grad = x.grad = mod.weight.grad = None
        compiled = torch.compile(block, fullgraph=True, **compile_kw)(a, x)
        compiled.sum().backward()
    torch.testing.assert_close(compiled, eager)
    for g0, g in zip(g_eager, (a.grad, x.grad, mod.weight.grad)):
        torch.testing.assert_close(g, g0)


def test_custom_ops_compile(device):
    """Custom ops with fake impls: opcheck passes, and torch.compile(fullgraph=True) traces fwd + bwd unbroken."""
    x, r, w = randn(3, 5, 40, device=device), randn(3, 5, 40, device=device), randn(40, device=device)
    torch.library.opcheck(torch.ops.flashvit.add_layer_norm_fwd.default, (x, r, w, None, 1e-5))
    torch.library.opcheck(torch.ops.flashvit.layer_norm_fwd.default, (x, w, None, 1e-5))
    _, mean, rstd = torch.ops.flashvit.layer_norm_fwd(x, w, None, 1e-5)
    torch.library.opcheck(torch.ops.flashvit.layer_norm_bwd.default, (r, x, w, None, mean, rstd, x))

    a, x = _leaves([r, x])
    _check_compiled_block(L.LayerNorm(40, device=device), a, x, backend="aot_eager")

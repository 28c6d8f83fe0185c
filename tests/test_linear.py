"""GEMM + bias/GELU/residual epilogues (kernels/linear.py): forward and backward vs a float64 oracle.

CPU: the Triton interpreter with backend="triton" forced, fp32 and fp16 (bf16 dots are garbage in the
interpreter), shapes picked sparsely from the issue's grid (the interpreter is slow). CUDA: the full grid
in bf16 (@pytest.mark.gpu) plus everything below on the real kernels.
"""

import importlib
import itertools

import pytest
import torch

from flashvit.kernels import use_backend
from tests.helpers import assert_close_to_ref, fresh_seed, max_err, poison, randn

L = importlib.import_module("flashvit.kernels.linear")
linear, linear_reference, FusedMLP = L.linear, L.linear_reference, L.FusedMLP

ON_GPU = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _poisoned_fixed_config(monkeypatch):
    """Every kernel output starts as NaN; GEMMs use one fixed config per arch (no autotune compile storm)."""
    def empty_nan(shape, device, dtype):
        return poison(torch.empty(shape, device=device, dtype=dtype))

    monkeypatch.setattr(L, "_empty", empty_nan)
    L.set_autotune(False)
    yield
    L.set_autotune(True)


@pytest.fixture
def launches(monkeypatch):
    """Counts launches of our kernels, to prove the Triton path really ran."""
    counts = {"gemm": 0, "epilogue": 0, "dact": 0}

    def wrap(name, key):
        fn = getattr(L, name)

        def counted(*a, **k):
            counts[key] += 1
            return fn(*a, **k)
        monkeypatch.setattr(L, name, counted)

    wrap("_launch_gemm", "gemm")
    wrap("_launch_epilogue", "epilogue")
    wrap("_dact_colsum", "dact")
    return counts


def _make(M, K, N, dtype, device, bias, res, lead=None, noncontig=False, scale_w=None):
    """Fresh inputs; x optionally non-contiguous (a strided view of a wider tensor)."""
    sw = scale_w if scale_w is not None else K ** -0.5
    shape = (M,) if lead is None else lead
    if noncontig:
        x = randn(*shape, 2 * K, dtype=dtype, device=device)[..., ::2]
    else:
        x = randn(*shape, K, dtype=dtype, device=device)
    w = randn(N, K, dtype=dtype, device=device, scale=sw)
    b = randn(N, dtype=dtype, device=device) if bias else None
    r = randn(*shape, N, dtype=dtype, device=device) if res else None
    return x, w, b, r


def _run(fn, x, w, b, r, act, grad_seed=None):
    """y and grads (x, w, b, r) of fn for a fresh upstream gradient."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b, r)]  # keeps strides
    y = fn(leaves[0], leaves[1], leaves[2], act, leaves[3])
    g = randn(*y.shape, dtype=torch.float64, seed=grad_seed).to(device=y.device, dtype=y.dtype)
    y.backward(g)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def _check(x, w, b, r, act, gemm="triton", factor_out=2.0):
    seed = 777
    y, grads = _run(lambda *a: linear(*a, backend="triton", gemm=gemm), x, w, b, r, act, seed)
    d = [t.double().cpu() if t is not None else None for t in (x, w, b, r)]
    y64, g64 = _run(linear_reference, *d, act, seed)
    yt, gt = (None, [None] * 4)
    if x.dtype != torch.float32:  # PyTorch itself in the same dtype, for the 2x/3x rule
        yt, gt = _run(linear_reference, x, w, b, r, act, seed)
    tol = dict(atol=2e-4, rtol=2e-4) if x.dtype == torch.float32 else dict(atol=1e-3)
    assert_close_to_ref(y, y64.to(y.device), yt, factor=factor_out, name="y", **tol)
    for name, g, ref, gtorch in zip(("dx", "dW", "db", "dres"), grads, g64, gt):
        if ref is None:
            assert g is None
            continue
        assert g is not None, f"{name}: no gradient"
        assert_close_to_ref(g, ref.to(g.device), gtorch, factor=3.0, name=name, **tol)


# (M, K, N, activation, bias, residual, noncontig x): sparse picks from the grid for the
# interpreter (large (K, N) only with M in {1, 7}).
CPU_CASES = {
    torch.float32: [
        (1, 768, 3072, "gelu", True, False, False),
        (7, 588, 768, "gelu_tanh", True, True, True),
        (197, 32, 32, None, False, True, False),
        (394, 32, 32, "gelu", True, True, True),
        (7, 192, 768, None, True, False, False),
        (1, 3072, 768, None, True, True, False),
    ],
    torch.float16: [
        (7, 3072, 768, "gelu", True, True, False),
        (197, 32, 32, "gelu_tanh", True, False, True),
        (1, 588, 768, None, False, True, False),
        (394, 32, 32, None, True, True, False),
        (7, 192, 768, "gelu", False, False, True),
    ],
}


@pytest.mark.parametrize("dtype,case", [(dt, c) for dt, cs in CPU_CASES.items() for c in cs],
                         ids=lambda v: str(v).replace("torch.", "").replace(" ", ""))
def test_linear_fwd_bwd(dtype, case, device, launches):
    M, K, N, act, bias, res, nc = case
    x, w, b, r = _make(M, K, N, dtype, device, bias, res, noncontig=nc)
    _check(x, w, b, r, act)
    assert launches["gemm"] == 3, launches  # y, dX, dW all on our GEMM
    assert launches["dact"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh"])
def test_cublas_path(dtype, act, device, launches):
    """torch.matmul + one fused epilogue kernel; leading dims (B, T), odd sizes."""
    x, w, b, r = _make(None, 40, 50, dtype, device, True, True, lead=(3, 5))
    _check(x, w, b, r, act, gemm="cublas")
    assert launches["gemm"] == 0 and launches["epilogue"] == 1, launches


@pytest.fixture
def tma_launches(monkeypatch):
    counts = {"tma": 0}
    fn = L._launch_gemm_tma

    def counted(*a, **k):
        counts["tma"] += 1
        return fn(*a, **k)
    monkeypatch.setattr(L, "_launch_gemm_tma", counted)
    return counts


@pytest.mark.parametrize("M,K,N,act,bias,res", [
    (37, 48, 40, "gelu", True, True),  # M, N not multiples of any tile: TMA clips the edges
    (70, 64, 96, "gelu_tanh", True, False),
    (5, 16, 24, None, False, True),
    (130, 200, 72, None, True, False),  # K not a multiple of BLOCK_K: TMA reads zeros past the end
])
def test_tma_path(M, K, N, act, bias, res, device, tma_launches):
    """The persistent TMA GEMM (fp16 here: bf16 dots are garbage in the interpreter) for y, dX and dW."""
    x, w, b, r = _make(M, K, N, torch.float16, device, bias, res)
    _check(x, w, b, r, act, gemm="tma")
    assert tma_launches["tma"] == 3, tma_launches  # y (x, Wᵀ), dX (dZ, W), dW (dZᵀ, X) layouts


def _check_mlp(M, K, H, N, dtype, act, bias1, bias2, res, gemm, device, grad_res=True, recompute=None):
    """mlp() output and every grad (x, W1, b1, W2, b2, residual) vs float64, with the 2x/3x rule in 16 bits."""
    x = randn(M, K, dtype=dtype, device=device)
    w1, w2 = randn(H, K, dtype=dtype, device=device, scale=K ** -0.5), randn(N, H, dtype=dtype, device=device,
                                                                            scale=H ** -0.5)
    b1 = randn(H, dtype=dtype, device=device) if bias1 else None
    b2 = randn(N, dtype=dtype, device=device) if bias2 else None
    r = randn(M, N, dtype=dtype, device=device) if res else None
    g = randn(M, N, dtype=dtype, device=device)

    def run(fn, ts):
        leaves = [t.detach().requires_grad_(t is not r or grad_res) if t is not None else None for t in ts]
        y = fn(*leaves)
        y.backward(g.to(y.dtype))
        return y.detach(), [t.grad if t is not None else None for t in leaves]

    def ours(x, w1, b1, w2, b2, r):
        return L.mlp(x, w1, b1, w2, b2, act, r, backend="triton", gemm=gemm, recompute=recompute)

    def ref(x, w1, b1, w2, b2, r):
        return linear_reference(linear_reference(x, w1, b1, act), w2, b2, None, r)

    ts = (x, w1, b1, w2, b2, r)
    y, grads = run(ours, ts)
    y64, g64 = run(ref, [t.double() if t is not None else None for t in ts])
    yt, gt = run(ref, ts) if dtype != torch.float32 else (None, [None] * 6)
    tol = dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=2e-3)
    assert_close_to_ref(y, y64, yt, factor=2.0, name="y", **tol)
    for name, got, want, same in zip(("dx", "dW1", "db1", "dW2", "db2", "dres"), grads, g64, gt):
        if want is None:
            assert got is None, name
            continue
        assert got is not None and got.dtype == dtype, name
        assert_close_to_ref(got, want, same, factor=3.0, name=name, **tol)


@pytest.fixture
def dact_launches(monkeypatch):
    """Counts fused act' GEMMs (dact > 0) and separate dZ passes."""
    counts = {"dact_gemm": 0, "dz_pass": 0}
    gemm, dz = L._launch_gemm, L._dact_colsum

    def counted_gemm(*a, **k):
        counts["dact_gemm"] += bool(k.get("dact"))
        return gemm(*a, **k)

    def counted_dz(dy, z, act, write_dz, colsum):
        counts["dz_pass"] += bool(write_dz)
        return dz(dy, z, act, write_dz, colsum)
    monkeypatch.setattr(L, "_launch_gemm", counted_gemm)
    monkeypatch.setattr(L, "_dact_colsum", counted_dz)
    return counts


@pytest.mark.parametrize("M,K,H,N,dtype,act,bias1,bias2,res,gemm", [
    (37, 24, 72, 40, torch.float32, "gelu", True, True, True, "triton"),
    (130, 32, 96, 48, torch.float16, "gelu_tanh", True, False, True, "triton"),
    (5, 16, 40, 24, torch.float32, "gelu", False, True, False, "triton"),
    (70, 48, 136, 64, torch.float16, "gelu", True, True, True, "tma"),
    (9, 16, 32, 16, torch.float16, "gelu_tanh", False, True, True, "tma"),
    (33, 24, 56, 40, torch.float32, "gelu", True, True, True, "cublas"),
], ids=lambda v: str(v).replace("torch.", ""))
def test_mlp_fwd_bwd(M, K, H, N, dtype, act, bias1, bias2, res, gemm, device, dact_launches):
    """The fused MLP: on our GEMM paths act' runs in fc2's dX GEMM (no dZ pass); cuBLAS: matmul + one dZ pass."""
    _check_mlp(M, K, H, N, dtype, act, bias1, bias2, res, gemm, device)
    assert dact_launches == ({"dact_gemm": 0, "dz_pass": 1} if gemm == "cublas" else {"dact_gemm": 1, "dz_pass": 0})


@pytest.mark.parametrize("M,K,H,N,bias1,res", [(70, 48, 136, 64, True, True), (9, 16, 40, 24, False, False)])
def test_hybrid_gemm_path(M, K, H, N, bias1, res, device, monkeypatch):
    """gemm='hybrid': the TMA kernel for the GEMMs with an epilogue beyond the bias (fc1 + GELU + z, fc2 +
    residual, act' in fc2's dX), cuBLAS's matmul for the plain ones (dX, dW) and where TMA cannot store the
    output (rows not a multiple of 16 bytes)."""
    seen = []
    tma = L._launch_gemm_tma

    def spy(a, a_t, b, b_t, M_, N_, K_, c, bias, residual, act, z, dact, *rest):
        seen.append("act" if act else "dact" if dact else "res" if residual is not None else "plain")
        return tma(a, a_t, b, b_t, M_, N_, K_, c, bias, residual, act, z, dact, *rest)
    monkeypatch.setattr(L, "_launch_gemm_tma", spy)
    tiled = []
    monkeypatch.setattr(L, "_launch_gemm_tiled", lambda *a, **k: tiled.append(1))  # never: plain GEMMs are cuBLAS's
    _check_mlp(M, K, H, N, torch.float16, "gelu", bias1, True, res, "hybrid", device)
    expect = ["act", "res"] if res else ["act"]  # fc1 (bias + GELU + z); fc2 with its residual (else plain)
    assert seen == expect + ["dact"], seen  # then fc2's dX with act'; dW2, dX1, dW1 on cuBLAS
    assert not tiled
    x, w, b, _ = _make(M, K, 20, torch.float16, device, True, False)  # 20 fp16 = 40-byte rows: TMA cannot
    seen.clear()
    _check(x, w, b, None, "gelu", gemm="hybrid")
    assert seen == [] and not tiled


def _mlp_run(recompute, dtype, gemm, device, seed, act="gelu", frozen_fc1=False):
    """One mlp() forward + backward on the inputs ``seed`` draws: (y, grads, bytes autograd saved, activation
    passes run)."""
    M, K, H, N = 37, 24, 72, 40
    seeds = iter(range(seed, seed + 7))

    def t(*shape, scale=1.0, grad=True):
        return randn(*shape, dtype=dtype, device=device, scale=scale, seed=next(seeds), requires_grad=grad)
    x, w1, b1 = t(M, K, grad=not frozen_fc1), t(H, K, scale=K ** -0.5, grad=not frozen_fc1), t(H, grad=not frozen_fc1)
    w2, b2, r = t(N, H, scale=H ** -0.5), t(N), t(M, N)
    dy = t(M, N, grad=False)
    saved, passes = [], []
    act_op = L._activation_op

    def pack(v):
        saved.append(v.numel() * v.element_size())
        return v
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v), L.use_gemm(gemm):
        y = L.mlp(x, w1, b1, w2, b2, act, r, backend="triton", recompute=recompute)
    L._activation_op = lambda *a: passes.append(1) or act_op(*a)
    try:
        with L.use_gemm(gemm):
            y.backward(dy)
    finally:
        L._activation_op = act_op
    return y, [v.grad for v in (x, w1, b1, w2, b2, r)], sum(saved), len(passes)


@pytest.mark.parametrize("dtype,gemm", [(torch.float32, "triton"), (torch.float16, "tma"),
                                        (torch.float32, "cublas")], ids=lambda v: str(v).replace("torch.", ""))
def test_mlp_recompute_saves_less_same_grads(dtype, gemm, device):
    """recompute='act' keeps z but not h = act(z) (one pass rebuilds it), 'fc1' neither (fc1's GEMM reruns):
    autograd holds exactly M·H elements less each, and the output and every grad match the default's, bit for
    bit where h is rebuilt from the same values (fp32; fp16 on cuBLAS's path, where z is what the epilogue
    read); on our 16-bit GEMMs h came from the unrounded fp32 z, so there dW2 is compared to the float64 rule."""
    seed = fresh_seed() * 8
    y0, g0, saved0, p0 = _mlp_run("none", dtype, gemm, device, seed)
    hbytes = 37 * 72 * torch.finfo(dtype).bits // 8
    for mode, less, passes in (("act", hbytes, 1), ("fc1", 2 * hbytes - 72 * torch.finfo(dtype).bits // 8, 0)):
        y, g, saved, p = _mlp_run(mode, dtype, gemm, device, seed)
        assert saved0 - saved == less, (mode, saved0, saved)
        assert (p0, p) == (0, passes), mode
        assert torch.equal(y, y0), mode
        for name, a, b in zip(("dx", "dW1", "db1", "dW2", "db2", "dres"), g, g0):
            if name == "dW2" and mode == "act" and dtype != torch.float32 and gemm != "cublas":
                assert max_err(a, b) < 2e-3 * b.abs().max().item(), (mode, name)
            else:
                assert torch.equal(a, b), (mode, name)
    for mode, act in (("act", "gelu"), ("fc1", "gelu_tanh")):  # and against float64 on the 2x/3x rule
        _check_mlp(29, 16, 40, 24, dtype, act, True, True, True, gemm, device, recompute=mode)


def test_mlp_recompute_with_frozen_fc1_keeps_h(device):
    """fc1 taking no grads: z is never saved, so 'act' keeps h (nothing to rebuild it from); 'fc1' reruns fc1."""
    seed = fresh_seed() * 8
    y0, g0, saved0, _ = _mlp_run("none", torch.float32, "triton", device, seed, frozen_fc1=True)
    y1, g1, saved1, p1 = _mlp_run("act", torch.float32, "triton", device, seed, frozen_fc1=True)
    y2, g2, saved2, _ = _mlp_run("fc1", torch.float32, "triton", device, seed, frozen_fc1=True)
    assert saved1 == saved0 and p1 == 0
    assert saved2 < saved0
    for g in (g1, g2):
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g, g0))
    assert g0[0] is None and g0[3] is not None


def test_mlp_recompute_mode_sources(device, monkeypatch):
    """The argument wins over use_mlp_recompute, which wins over FLASHVIT_MLP_RECOMPUTE; FusedMLP.recompute None
    follows them; unknown modes are refused by each."""
    seen = []
    fn = L.MLPFn.apply
    monkeypatch.setattr(L.MLPFn, "apply", lambda *a: seen.append(a[-1]) or fn(*a))
    x = randn(5, 8, device=device, requires_grad=True)
    m = FusedMLP(8, 16).to(device)
    with use_backend("triton"):
        monkeypatch.setenv("FLASHVIT_MLP_RECOMPUTE", "fc1")
        m(x)
        with L.use_mlp_recompute("act"):
            m(x)
            L.mlp(x, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, recompute="none")
            m.recompute = "fc1"
            m(x)
        monkeypatch.delenv("FLASHVIT_MLP_RECOMPUTE")
        m.recompute = None
        m(x)
    assert seen == ["fc1", "act", "none", "fc1", "none"]
    with pytest.raises(ValueError, match="unknown MLP recompute mode 'all'"):
        L.mlp(x, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, recompute="all", backend="triton")
    with pytest.raises(ValueError, match="unknown MLP recompute mode"):
        FusedMLP(8, 16, recompute="gelu")
    with pytest.raises(ValueError, match="unknown MLP recompute mode"):
        with L.use_mlp_recompute("h"):
            pass
    monkeypatch.setenv("FLASHVIT_MLP_RECOMPUTE", "everything")
    with pytest.raises(ValueError, match="unknown MLP recompute mode 'everything'"):
        m(x)


def test_mlp_recompute_takes_the_fused_mlp_under_auto(monkeypatch):
    """Training under 'auto' runs eager PyTorch's MLP (AUTO_TRAINING off), which keeps both z and h: asking for a
    recompute takes our MLP instead, on CUDA; on CPU 'auto' stays eager either way."""
    picked = []
    monkeypatch.setattr(L, "use_triton", lambda x, backend, auto, auto_compiled: picked.append(auto) or False)
    x, w1, w2 = randn(3, 8, requires_grad=True), randn(16, 8), randn(8, 16)
    for mode in ("none", "act", "fc1"):
        L.mlp(x, w1, None, w2, None, recompute=mode)
    with torch.no_grad():
        L.mlp(x, w1, None, w2, None, recompute="act")
    assert picked == [L.AUTO_TRAINING, True, True, L.AUTO_INFERENCE]


def test_mlp_frozen_parts_and_inference(device, dact_launches):
    x = randn(11, 16, device=device)
    w1, b1 = randn(24, 16, device=device, requires_grad=True), randn(24, device=device)
    w2, b2 = randn(8, 24, device=device), randn(8, device=device, requires_grad=True)
    y = L.mlp(x, w1, b1, w2, b2, backend="triton")
    y.sum().backward()
    assert b1.grad is None and w2.grad is None and x.grad is None
    h = torch.nn.functional.gelu(x.double() @ w1.detach().double().T + b1.double())
    want = ((torch.ones(11, 8, dtype=torch.float64) @ w2.double()) * (0.5 * (1 + torch.erf(
        (x.double() @ w1.detach().double().T + b1.double()) / 2 ** 0.5)) + (x.double() @ w1.detach().double().T
        + b1.double()) * torch.exp(-0.5 * (x.double() @ w1.detach().double().T + b1.double()) ** 2)
        / (2 * torch.pi) ** 0.5)).T @ x.double()
    torch.testing.assert_close(w1.grad.double().cpu(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b2.grad.double().cpu(), torch.full((8,), 11.0, dtype=torch.float64))
    with torch.no_grad():
        y0 = L.mlp(x, w1, b1, w2, b2, backend="triton")
    torch.testing.assert_close(y0.double().cpu(), torch.nn.functional.linear(h, w2.double(), b2.double()).cpu(),
                               atol=1e-4, rtol=1e-4)


def test_mlp_bad_inputs(device):
    x, w1, w2 = randn(3, 8, device=device), randn(16, 8, device=device), randn(4, 16, device=device)
    with pytest.raises(ValueError, match="fc2_weight has 12 input features; expected 16"):
        L.mlp(x, w1, None, randn(4, 12, device=device), None, backend="triton")
    with pytest.raises(ValueError, match="activation must be 'gelu' or 'gelu_tanh'"):
        L.mlp(x, w1, None, w2, None, None, backend="triton")
    with pytest.raises(ValueError, match="residual has shape"):
        L.mlp(x, w1, None, w2, None, "gelu", randn(3, 5, device=device), backend="triton")
    with pytest.raises(ValueError, match="bias has shape"):
        L.mlp(x, w1, None, w2, randn(5, device=device), backend="triton")
    with pytest.raises(TypeError, match="share one dtype"):
        L.mlp(x, w1, None, w2.half(), None, backend="triton")


INTERPRETED = not ON_GPU
GEMM_CONFIGS = sorted(set(L.SM80_CONFIGS_16 + L.SM90_CONFIGS_16 + L.FP32_CONFIGS))


# Every autotune config (the GPU picks any of them; the interpreter otherwise runs one), with the memory
# checker on: M, N, K that are multiples of no tile, so every edge is clipped, in y, dX and dW.
@pytest.mark.skipif(not INTERPRETED, reason="sets the interpreter's config; a GPU autotunes over these")
@pytest.mark.parametrize("cfg", GEMM_CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_every_gemm_config(cfg, device, monkeypatch):
    monkeypatch.setattr(L, "INTERPRET_CONFIG", cfg)
    x, w, b, r = _make(137, 72, 200, torch.float32, device, True, True)
    _check(x, w, b, r, "gelu")
    _check_mlp(137, 24, 200, 40, torch.float32, "gelu", True, True, True, "triton", device)  # act' epilogue


@pytest.mark.skipif(not INTERPRETED, reason="sets the interpreter's config; a GPU autotunes over these")
@pytest.mark.parametrize("cfg", L.TMA_CONFIGS_16, ids=lambda c: "x".join(map(str, c)))
def test_every_tma_config(cfg, device, monkeypatch, tma_launches):
    monkeypatch.setattr(L, "TMA_INTERPRET_CONFIG", cfg)
    x, w, b, r = _make(137, 72, 200, torch.float16, device, True, True)
    _check(x, w, b, r, "gelu_tanh", gemm="tma")
    assert tma_launches["tma"] == 3
    _check_mlp(137, 24, 200, 40, torch.float16, "gelu", True, True, True, "tma", device)  # act' epilogue
    assert tma_launches["tma"] == 3 + 6  # fc1, fc2, dW2, dZ (act'), dX, dW1


@pytest.mark.parametrize("why", ["fp32", "row stride not 16-byte aligned", "non-contiguous x"])
def test_tma_path_falls_back_when_operands_break_its_rules(why, device, tma_launches, launches):
    dtype = torch.float32 if why == "fp32" else torch.float16
    K = 13 if why.startswith("row stride") else 32  # 13 fp16 = 26 bytes per row
    x, w, b, r = _make(9, K, 24, dtype, device, True, False, noncontig=why == "non-contiguous x")
    y = linear(x, w, b, "gelu", backend="triton", gemm="tma")
    torch.testing.assert_close(y.double(), linear_reference(x.double(), w.double(), b.double(), "gelu"),
                               atol=2e-3 if dtype == torch.float16 else 2e-5, rtol=1e-3)
    assert launches["gemm"] == 1
    if why != "non-contiguous x":  # a strided x still has aligned W and output: only x's GEMM is refused
        assert tma_launches["tma"] == 0


class _SpyKernel:
    """Stands in for a @triton.jit kernel: records each launch's tile config, then launches the real one."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append((tuple(kw[n] for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")),
                               kw.get("FLATTEN")))
            return self.kernel[grid](*args, **kw)
        return launch


@pytest.mark.parametrize("kernel,cfg,flatten", [("triton", (32, 32, 16, 4, 2), True), ("tma", (64, 32, 32, 4, 2), False),
                                                ("tma", (64, 128, 16, 4, 1), True)])  # TMA: a whole warpgroup of rows
def test_use_gemm_config_forces_one_tile_config(kernel, cfg, flatten, device, monkeypatch):
    """use_gemm_config (the per-config GEMM sweep's switch): every GEMM of the block, y, dX and dW, runs the
    forced config, still correct at edges no tile divides; outside the block the usual config comes back."""
    name = "_gemm_tma_kernel" if kernel == "tma" else "_gemm_kernel"
    spy = _SpyKernel(getattr(L, name))
    monkeypatch.setattr(L, name, spy)
    x, w, b, r = _make(37, 40, 72, torch.float16 if kernel == "tma" else torch.float32, device, True, True)
    with L.use_gemm_config(kernel, cfg, flatten):
        _check(x, w, b, r, "gelu", gemm=kernel)
    assert spy.calls == [(cfg, flatten if kernel == "tma" else None)] * 3, spy.calls
    spy.calls.clear()
    linear(x, w, b, "gelu", backend="triton", gemm=kernel)
    assert len(spy.calls) == 1 and spy.calls[0][0] != cfg


@pytest.mark.parametrize("cfg", [(32, 64, 32, 4, 1), (64, 128, 32, 4, 2)], ids=lambda c: "x".join(map(str, c)))
def test_tma_prefetch(cfg, device, monkeypatch):
    """PREFETCH: the residual (forward) and z (the MLP's act' epilogue) read before the K loop, then split in
    column halves with the accumulator when the tile is 128+ wide; the same results as the reference."""
    seen = []
    kernel = L._gemm_tma_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((kw["PREFETCH"], kw["HAS_RES"] != 0, kw["DACT"]))
                return kernel[grid](*args, **kw)
            return launch
    monkeypatch.setattr(L, "_gemm_tma_kernel", Spy())
    x, w, b, r = _make(137, 72, 200, torch.float16, device, True, True)
    with L.use_gemm_config("tma", cfg, prefetch=True):
        _check(x, w, b, r, "gelu_tanh", gemm="tma")
        _check_mlp(137, 24, 200, 40, torch.float16, "gelu", True, True, True, "tma", device)
    assert {(True, True, 0), (True, False, 1)} <= set(seen), seen  # a residual and a z prefetched


@pytest.mark.parametrize("cfg", [(32, 256, 32, 4, 1), (64, 256, 32, 4, 2)], ids=lambda c: "x".join(map(str, c)))
def test_tma_epilogue_by_column_quarters(cfg, device, monkeypatch):
    """256-wide TMA tiles that stage a residual or z tile (GELU's pre-activation saved; act' in the MLP's dX GEMM)
    run the epilogue on four column quarters, the descriptors' blocks a quarter wide: same results as the
    reference, edge tiles too."""
    seen = []
    kernel = L._gemm_tma_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((kw["SAVE_Z"] or kw["HAS_RES"] != 0, kw["DACT"], args[2].block_shape[1],
                             args[3].block_shape[1]))
                return kernel[grid](*args, **kw)
            return launch
    monkeypatch.setattr(L, "_gemm_tma_kernel", Spy())
    x, w, b, r = _make(45, 40, 300, torch.float16, device, True, True)
    with L.use_gemm_config("tma", cfg):
        _check(x, w, b, r, "gelu", gemm="tma")
        _check_mlp(45, 24, 264, 40, torch.float16, "gelu", True, True, True, "tma", device)
    assert (True, 0, 64, 64) in seen and (False, 1, 64, 64) in seen, seen  # z or residual; act' read: quarters
    assert (False, 0, 128, 128) in seen, seen  # C alone (dW): column halves


def test_use_gemm_config_refuses_bad_configs():
    with pytest.raises(ValueError, match="unknown GEMM kernel"):
        with L.use_gemm_config("cublas", (64, 64, 32, 4, 2)):
            pass
    for bad in [(64, 64, 32, 4), (48, 64, 32, 4, 2), (64, 64, 32, 3, 2), (16, 64, 32, 4, 2), (64, 64, 8, 4, 2)]:
        with pytest.raises(ValueError, match="GEMM config"):
            with L.use_gemm_config("triton", bad):
                pass


@pytest.mark.parametrize("gemm,dtype", [("triton", torch.float32), ("tma", torch.float16)])
def test_split_k_weight_grads(gemm, dtype, device, monkeypatch):
    """dW split over the tokens (split-K): every split's fp32 partial summed in a fixed order; the same grads
    as the reference at a token count no split divides, and bit-equal run to run."""
    name = "_gemm_tma_kernel" if gemm == "tma" else "_gemm_kernel"
    kernel = getattr(L, name)
    splits_seen = []
    at = kernel.arg_names.index("SPLITS") if gemm == "tma" else None

    class Spy:  # records each launch's splits: grid axis 1 (tiled), the SPLITS argument (TMA)
        def __getitem__(self, grid):
            def launch(*args, **kw):
                splits_seen.append(grid[1] if gemm == "triton" else args[at])
                return kernel[grid](*args, **kw)
            return launch
    monkeypatch.setattr(L, name, Spy())
    x, w, b, r = _make(700, 40, 24, dtype, device, True, True)  # dW: 24 x 40 over K = 700 tokens
    with L.use_split_k(3):
        _check(x, w, b, r, "gelu", gemm=gemm)
        assert sorted(splits_seen) == [1, 1, 3], splits_seen  # y, dX plain; dW in 3 splits of 256 tokens
        gw = [_run(lambda *a: linear(*a, backend="triton", gemm=gemm), x, w, b, r, "gelu", 5)[1][1] for _ in range(2)]
    assert torch.equal(gw[0], gw[1])


def test_split_k_heuristic():
    """Splits only where the output tiles leave SMs idle over a long K (weight grads of ViT layers)."""
    assert L.split_k(3072, 768, 50432, 132) == 4  # ViT-B fc1 dW: 144 tiles -> 576 work items, 87% of 5 waves
    assert L.split_k(768, 768, 50432, 132) == 7  # proj dW: 36 tiles
    assert L.split_k(50432, 3072, 768, 132) == 1  # a forward GEMM: thousands of tiles
    assert L.split_k(3072, 768, 3000, 132) == 1  # K too short to split
    assert all(1 <= L.split_k(m, n, 50432, 132) <= L.SPLIT_K_MAX for m in (64, 768, 4096) for n in (64, 1024))
    with L.use_split_k(1):
        assert L.split_k(3072, 768, 50432, 132) == 1
        with L.use_split_k(5):
            assert L.split_k(16, 16, 100, 132) == 5
    with pytest.raises(ValueError, match="splits"):
        with L.use_split_k(-1):
            pass
    x = randn(8, 16)
    with pytest.raises(ValueError, match="no epilogue"):
        L._launch_gemm(x, False, randn(16, 8), False, 8, 8, 16, torch.empty(8, 8), bias=randn(8), splits=2)


def test_tma_autotune_prune():
    """What the TMA autotuner may try per call: PREFETCH configs only with a residual or act' to read, and
    only configs whose staged tiles fit (a z tile, or split-K's fp32 C tile)."""
    cfgs = L._GEMM_TMA_TUNED.tuner.configs
    kept = lambda **flags: [(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.kwargs["PREFETCH"])  # noqa: E731
                            for c in L._tma_prune(cfgs, dict(flags))]
    plain = kept(HAS_RES=False, DACT=0, SAVE_Z=False, SPLITS=1)
    assert len(plain) == len(L.TMA_CONFIGS_16) and not any(p for *_, p in plain)
    res = kept(HAS_RES=1, DACT=0, SAVE_Z=False, SPLITS=1)
    assert any(p for *_, p in res)
    assert (256, 8, 4, False) in res  # an aligned residual on quarters: 4 stages fit
    odd = kept(HAS_RES=2, DACT=0, SAVE_Z=True, SPLITS=1)  # an unaligned one (run 5: refused at launch)
    assert (256, 8, 3, False) in odd and (256, 8, 4, False) not in odd
    dact = kept(HAS_RES=False, DACT=1, SAVE_Z=False, SPLITS=1)
    assert any(p for *_, p in dact)
    # 128x256x64 with a z tile (epilogue by column quarters): 3 and 4 stages fit
    assert {(256, 8, 3, False), (256, 8, 4, False)} <= set(dact)
    assert kept(HAS_RES=False, DACT=0, SAVE_Z=True, SPLITS=1) == [c for c in dact if not c[3]]
    assert not [c for c in kept(HAS_RES=False, DACT=0, SAVE_Z=False, SPLITS=4) if c[0] == 256]  # fp32 C tile


def test_res_mode_tells_aligned_residuals_apart():
    r = torch.empty(10, 48, dtype=torch.float16)
    assert (L._res_mode(None), L._res_mode(r), L._res_mode(r[:, :40])) == (0, 1, 1)
    assert L._res_mode(torch.empty(10, 40, dtype=torch.float16)[:, :36]) == 2  # row stride 40
    assert L._res_mode(torch.empty(10 * 48 + 1, dtype=torch.float16)[1:].view(10, 48)) == 2  # data 2 bytes in


def test_tma_config_fits_shared_memory():
    # ptxas at sm_90, Triton 3.6 (the kernels/_aot specs of these configs)
    assert L.tma_config_fits((128, 256, 64, 8, 3), staged=False)  # 180248 B
    assert L.tma_config_fits((128, 256, 64, 8, 4), staged=False)  # 229408 B (run 5: runs)
    assert L.tma_config_fits((128, 256, 64, 8, 4), staged=True)  # a residual or z tile by quarters: 229408 B
    assert not L.tma_config_fits((128, 256, 64, 8, 4), True, res_aligned=False)  # H100 run 5: 245792 B refused
    assert L.tma_config_fits((128, 256, 64, 8, 3), True, res_aligned=False)
    assert not L.tma_config_fits((128, 256, 64, 8, 4), False, fp32_c=True)  # split-K's fp32 C tile on halves
    assert not L.tma_config_fits((128, 256, 128, 8, 3), staged=False)  # 3 x 96 KiB of A/B tiles
    assert L.tma_config_fits((128, 128, 64, 8, 4), staged=True)  # z on halves: 163872 B
    assert all(L.tma_config_fits(c, False) for c in L.TMA_CONFIGS_16)
    assert any(L.tma_config_fits(c, True) for c in L.TMA_CONFIGS_16)


def test_transposed_x_and_strided_residual(device):
    x = randn(40, 9, device=device).t()  # (9, 40), strides (1, 9)
    w = randn(24, 40, device=device, scale=0.2)
    b = randn(24, device=device)
    r = randn(24, 9, device=device).t()
    _check(x, w, b, r, "gelu")


def test_gemm_override_env_and_context(device, monkeypatch, launches):
    x, w, b, _ = _make(5, 16, 8, torch.float32, device, True, False)
    monkeypatch.setenv("FLASHVIT_GEMM", "cublas")
    y1 = linear(x, w, b, "gelu", backend="triton")
    assert launches["epilogue"] == 1 and launches["gemm"] == 0
    with L.use_gemm("triton"):
        y2 = linear(x, w, b, "gelu", backend="triton")
    assert launches["gemm"] == 1
    monkeypatch.setenv("FLASHVIT_GEMM", "nonsense")
    with pytest.raises(ValueError, match="GEMM path"):
        linear(x, w, b, "gelu", backend="triton")
    torch.testing.assert_close(y1, y2)
    # auto uses the table, and every table entry is a known path
    assert set(L.GEMM_TABLE.values()) <= {"triton", "cublas"}
    assert L._choose_path("auto", torch.device("cpu"), 50432, 3072, 768) == "triton"  # interpreter: our GEMM
    if torch.cuda.is_available():
        arch = 90 if torch.cuda.get_device_capability()[0] >= 9 else 80
        assert L._choose_path("auto", torch.device("cuda"), 50432, 3072, 768) == L.GEMM_TABLE[(arch, "large")]


def test_determinism(device):
    x, w, b, r = _make(50, 40, 72, torch.float32, device, True, True)
    runs = 20 if ON_GPU else 6
    ref = None
    for _ in range(runs):
        _, g = _run(lambda *a: linear(*a, backend="triton"), x, w, b, r, "gelu", grad_seed=5)
        if ref is None:
            ref = g
        for a, c in zip(g, ref):
            assert torch.equal(a, c)


def _dact_want(dy: torch.Tensor, z: torch.Tensor, act) -> torch.Tensor:
    """float64 dY·act'(z) by autograd through torch's GELU (the reference's activation)."""
    if act is None:
        return dy.double()
    z64 = z.double().requires_grad_()
    y = torch.nn.functional.gelu(z64, approximate="tanh" if act == "gelu_tanh" else "none")
    return torch.autograd.grad(y, z64, dy.double())[0]


@pytest.mark.parametrize("cfg,pipe", [(c[:3], c[3]) for c in L.DACT_CONFIGS])
@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh"])
def test_dact_colsum_many_blocks_per_program(act, cfg, pipe, device, monkeypatch):
    """The dZ / bias-grad pass at each tile (and pipelined loop: PIPE) the autotuner may pick, with several row
    blocks per program and a ragged last one, vs float64."""
    monkeypatch.setattr(L, "ELEMENTWISE_CONFIGS", [cfg])  # (the first config runs without autotuning)
    monkeypatch.setattr(L, "DACT_PIPE_PLAIN", pipe)
    monkeypatch.setattr(L, "_DACT_PROGRAMS", 4)  # 2 programs a 256-column block: 32 rows each
    seen = []
    plain = L._DACT_COLSUM
    monkeypatch.setattr(L, "_DACT_COLSUM", lambda grid, args, consts: (seen.append(consts["PIPE"]),
                                                                        plain(grid, args, consts)))
    M, N = 61, 300  # N: a partial second column block
    assert L.dact_partition(M, N) == (32, 2)
    dy = randn(M, N, dtype=torch.float32, device=device)
    z = randn(M, N, dtype=torch.float32, device=device) * 2
    dz, db = L._dact_colsum(dy, z if act else None, L._ACT_CODE[act], write_dz=act is not None, colsum=True)
    assert seen == ([pipe] if L.INTERPRET else [])  # (a GPU autotunes: test_gpu_elementwise_passes_bf16)
    want = _dact_want(dy, z, act)
    torch.testing.assert_close(dz.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(db.double(), want.sum(0), atol=1e-4, rtol=1e-5)
    y = L._empty((M, N), device, torch.float32)
    L._launch_epilogue(z, dy, L._ACT_CODE[act], y)  # the forward's epilogue pass at the same tile
    torch.testing.assert_close(y.double(), linear_reference(z.double(), torch.eye(N, dtype=torch.float64,
                               device=device), None, act, dy.double()), atol=1e-5, rtol=1e-5)


def test_dact_autotuner_tries_the_pipelined_loop():
    """The dZ pass's autotuner: every elementwise tile unpipelined, and the first DACT_PIPE_TILES at each depth of
    DACT_PIPES (each once); the epilogue pass (no loop) its tiles alone."""
    got = sorted((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.kwargs["PIPE"])
                 for c in L._DACT_COLSUM_TUNED.tuner.configs)
    want = sorted([(*c, 0) for c in L.ELEMENTWISE_CONFIGS]
                  + [(*c, k) for k in L.DACT_PIPES for c in L.ELEMENTWISE_CONFIGS[:L.DACT_PIPE_TILES]])
    assert got == want and L.DACT_PIPES and all(k >= 2 for k in L.DACT_PIPES) and L.DACT_PIPE_PLAIN == 0
    assert sorted((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in L._EPILOGUE_TUNED.tuner.configs) \
        == sorted(L.ELEMENTWISE_CONFIGS)


def test_dact_gelu_from_16bit_z(device):
    """Exact GELU and its derivative from a 16-bit z (_dev_gelu_cdf's erfc approximation) within 3e-7 of float64
    over the whole range, tails and the derivative's zero crossing included: written in fp32 (dY's, y's dtype)."""
    z = torch.cat([torch.linspace(-12, 12, 2400), randn(600) * 3]).to(device=device, dtype=torch.float16)
    z = z.view(-1, 100)
    dy = torch.ones(z.shape, device=device)
    dz, db = L._dact_colsum(dy, z, L._ACT_CODE["gelu"], write_dz=True, colsum=True)
    want = _dact_want(dy, z, "gelu")
    assert dz.dtype == torch.float32
    torch.testing.assert_close(dz.double(), want, atol=3e-7, rtol=0)
    torch.testing.assert_close(db.double(), want.sum(0), atol=1e-5, rtol=1e-6)
    y = L._empty(z.shape, device, torch.float32)
    L._launch_epilogue(z, None, L._ACT_CODE["gelu"], y)  # the forward's GELU from the same 16-bit z, into fp32
    torch.testing.assert_close(y.double(), torch.nn.functional.gelu(z.double()), atol=3e-7, rtol=3e-7)


def test_auto_verdict_depends_on_autograd(monkeypatch):
    """'auto' takes AUTO_TRAINING when autograd needs the linear's grads (any input's), else AUTO_INFERENCE."""
    seen = []

    def spy(x, backend=None, auto=True, auto_compiled=None):
        seen.append(auto)
        return False  # then the reference runs
    monkeypatch.setattr(L, "use_triton", spy)
    monkeypatch.setattr(L, "AUTO_TRAINING", "train")
    monkeypatch.setattr(L, "AUTO_INFERENCE", "infer")
    x, w, b, r = _make(4, 8, 8, torch.float32, "cpu", True, True)
    linear(x, w, b, "gelu", r)
    linear(x, w.requires_grad_(), b, "gelu", r)
    with torch.no_grad():
        linear(x, w, b, "gelu", r)
    linear(x, w.detach(), b, None, r.requires_grad_())
    assert seen == ["infer", "train", "infer", "train"]


def test_auto_inference_gemm_routing(monkeypatch):
    """'auto' without autograd takes AUTO_INFERENCE_GEMM (hybrid on sm_90) from AUTO_INFERENCE_MIN_FLOP only;
    training, smaller shapes, other archs and every explicit path keep GEMM_TABLE / the override."""
    monkeypatch.setattr(L, "INTERPRET", False)
    arch = [90]
    monkeypatch.setattr(L, "_arch", lambda device: arch[0])
    cuda = torch.device("cuda")
    a = torch.empty(64, 64, dtype=torch.float16)  # TMA-legal operands (aligned, unit last stride)
    big, small, mid = (50432, 3072, 768), (394, 768, 3072), (8 * 197, 3072, 768)  # mid: 'large', below the floor
    inf = L._AUTO_INFERENCE
    assert L._choose_path(inf, cuda, *big, epilogue=True, operands=(a, a)) == "tma"
    assert L._choose_path(inf, cuda, *big, epilogue=False, operands=(a, a)) == "cublas"  # bias only: cuBLAS
    assert L._choose_path(inf, cuda, *big, epilogue=True, operands=(a, a[:, 1:])) == "cublas"  # TMA cannot
    assert L._choose_path(inf, cuda, *small, epilogue=True, operands=(a, a)) == L.GEMM_TABLE[(90, "small")]
    assert L.shape_class(*mid) == "large" and 2 * 1576 * 3072 * 768 < L.AUTO_INFERENCE_MIN_FLOP
    assert L._choose_path(inf, cuda, *mid, epilogue=True, operands=(a, a)) == L.GEMM_TABLE[(90, "large")]
    assert L._choose_path("auto", cuda, *big, epilogue=True, operands=(a, a)) == L.GEMM_TABLE[(90, "large")]
    assert L._choose_path(inf, torch.device("cpu"), *big, epilogue=True) == "triton"  # interpreter: our GEMM
    arch[0] = 80
    assert L._choose_path(inf, cuda, *big, epilogue=True, operands=(a, a)) == L.GEMM_TABLE[(80, "large")]
    # linear() / mlp() hand the inference name down only for an 'auto' call without autograd
    assert L._call_gemm(None, training=False) == inf and L._call_gemm("auto", training=False) == inf
    assert L._call_gemm(None, training=True) == "" and L._call_gemm("cublas", training=False) == "cublas"
    with L.use_gemm("cublas"):  # an override is not 'auto': it stays (the bench's [mlp=cublas] rows)
        assert L._call_gemm(None, training=False) == ""
    monkeypatch.setenv("FLASHVIT_GEMM", "tma")
    assert L._call_gemm(None, training=False) == ""
    with pytest.raises(ValueError, match="GEMM path"):
        L.linear(torch.randn(2, 4), torch.randn(3, 4), gemm=inf)  # internal name, not a public path


@pytest.mark.gpu
def test_gpu_auto_inference_mlp_takes_tma_where_big(monkeypatch):
    """The default inference path on sm_90 (AUTO_INFERENCE_GEMM): a ViT-sized MLP under no_grad with backend
    'auto' runs fc1 (GELU) and fc2 (residual) on the TMA kernel, matches float64 by the bf16 rule; a small
    batch stays on cuBLAS."""
    if L._arch(torch.device("cuda")) < 90 or L.TensorDescriptor is None:
        pytest.skip("the TMA GEMM needs sm_90 and Triton's TensorDescriptor")
    seen = []
    tma = L._launch_gemm_tma
    monkeypatch.setattr(L, "_launch_gemm_tma", lambda *a, **k: (seen.append(a[10]), tma(*a, **k))[1])  # act
    M, K, H = 16384, 768, 3072  # 2·M·N·K = 7.7e10 >= AUTO_INFERENCE_MIN_FLOP
    assert 2 * M * K * H >= L.AUTO_INFERENCE_MIN_FLOP
    x, r = randn(M, K, dtype=torch.bfloat16, device="cuda"), randn(M, K, dtype=torch.bfloat16, device="cuda")
    w1, w2 = randn(H, K, dtype=torch.bfloat16, device="cuda", scale=K ** -0.5), randn(
        K, H, dtype=torch.bfloat16, device="cuda", scale=H ** -0.5)
    b1, b2 = randn(H, dtype=torch.bfloat16, device="cuda"), randn(K, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        y = L.mlp(x, w1, b1, w2, b2, "gelu", r, backend="auto")
        y_small = L.mlp(x[:197], w1, b1, w2, b2, "gelu", r[:197], backend="auto")
    assert seen == [L._ACT_CODE["gelu"], 0], seen  # fc1 with GELU, fc2 with the residual; then none for 197 rows

    def ref(*ts):
        return linear_reference(linear_reference(ts[0], ts[1], ts[2], "gelu"), ts[3], ts[4], None, ts[5])
    ts = (x, w1, b1, w2, b2, r)
    y64 = ref(*(t.double() for t in ts))
    assert_close_to_ref(y, y64, ref(*ts), factor=2.0, atol=2e-3, name="y")
    assert_close_to_ref(y_small, y64[:197], ref(*(t[:197] if t.dim() == 2 and t.shape[0] == M else t for t in ts)),
                        factor=2.0, atol=2e-3, name="y (197 rows)")


def test_linear_and_mlp_pass_the_inference_gemm(monkeypatch):
    """The gemm each op receives: the inference name with grad off, '' (resolve later) with autograd."""
    seen = []
    fwd = L.linear_fwd

    def spy(x, weight, bias, residual, activation, save_z, gemm="", allow_tf32=None, scale=None):
        seen.append(gemm)
        return fwd(x, weight, bias, residual, activation, save_z, gemm, allow_tf32, scale)
    monkeypatch.setattr(L, "linear_fwd", spy)
    x, w, b, r = _make(5, 16, 16, torch.float32, "cpu", True, True)
    with torch.no_grad():
        L.linear(x, w, b, "gelu", r, backend="triton")
        L.mlp(x, w, b, w, b, "gelu", r, backend="triton")
    assert seen == [L._AUTO_INFERENCE] * 3
    seen.clear()
    L.linear(x, w.requires_grad_(), b, "gelu", r, backend="triton")
    L.mlp(x, w, b, w, b, "gelu", r, backend="triton")
    assert seen == [""] * 3


def test_no_grad_skips_z_and_partial_grads(device):
    x, w, b, _ = _make(6, 16, 24, torch.float32, device, True, False)
    y, z = L.linear_fwd(x, w, b, None, "gelu", save_z=False)
    assert z.numel() == 0
    torch.testing.assert_close(y, linear_reference(x, w, b, "gelu"), atol=1e-5, rtol=1e-5)
    # frozen weight and bias: only dx
    xg = x.clone().requires_grad_()
    linear(xg, w, b, "gelu", backend="triton").sum().backward()
    x64 = x.double().requires_grad_()
    linear_reference(x64, w.double(), b.double(), "gelu").sum().backward()
    torch.testing.assert_close(xg.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("M,K,N,dtype,bias,res,gemm", [
    (37, 24, 40, torch.float32, True, True, "triton"),
    (9, 16, 24, torch.float16, False, True, "tma"),
    (20, 32, 16, torch.float32, True, False, "cublas"),
], ids=lambda v: str(v).replace("torch.", ""))
def test_linear_layer_scale(M, K, N, dtype, bias, res, gemm, device, launches):
    """y = γ ⊙ (x·Wᵀ + b) + residual with γ in the GEMM's epilogue: y and every grad, dγ included, vs float64
    (the reference multiplies the output by γ)."""
    x, w, b, r = _make(M, K, N, dtype, device, bias, res)
    gamma = randn(N, dtype=dtype, device=device)  # both signs, |γ| ~ 1: a wrong γ shows in y and dγ
    g = randn(M, N, dtype=dtype, device=device)

    def run(fn, ts):
        leaves = [t.detach().requires_grad_() if t is not None else None for t in ts]
        y = fn(*leaves)
        y.backward(g.to(y.dtype))
        return y.detach(), [t.grad if t is not None else None for t in leaves]

    ts = (x, w, b, r, gamma)
    y, grads = run(lambda x, w, b, r, s: linear(x, w, b, None, r, layer_scale=s, backend="triton", gemm=gemm), ts)
    y64, g64 = run(lambda x, w, b, r, s: linear_reference(x, w, b, None, r, s), [t.double() if t is not None
                                                                                else None for t in ts])
    yt, gt = (run(lambda x, w, b, r, s: linear_reference(x, w, b, None, r, s), ts) if dtype != torch.float32
              else (None, [None] * 5))
    tol = dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=2e-3)
    assert_close_to_ref(y, y64, yt, factor=2.0, name="y", **tol)
    for name, got, want, same in zip(("dx", "dW", "db", "dres", "dgamma"), grads, g64, gt):
        if want is None:
            assert got is None, name
            continue
        assert got is not None and got.dtype == dtype, name
        assert_close_to_ref(got, want, same, factor=3.0, name=name, **tol)
    assert launches["gemm"] == (0 if gemm == "cublas" else 3), launches  # forward, dX, dW on our GEMM


@pytest.mark.parametrize("gemm", ["triton", "tma", "cublas"])
def test_strided_bias_and_layer_scale(gemm, device):
    """bias and γ given as strided views (slices of packed vectors): y and every grad as the reference's. The
    epilogues read them at unit stride; before the copy they read the wrong elements (silently)."""
    x = randn(7, 16, device=device)
    w = randn(8, 16, device=device, scale=0.25)
    b_all, g_all, r = randn(16, device=device), randn(24, device=device), randn(7, 8, device=device)

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b_all, g_all, r)]
        xx, ww, bb, gg, rr = leaves
        y = fn(xx, ww, bb[::2], gg[1::3], rr)
        y.backward(torch.ones_like(y))
        return y.detach(), [t.grad for t in leaves]

    y, grads = run(lambda *a: linear(*a[:3], None, a[4], layer_scale=a[3], backend="triton", gemm=gemm))
    y_ref, grads_ref = run(lambda *a: linear_reference(*a[:3], None, a[4], a[3]))
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for name, got, want in zip(("dx", "dW", "db", "dgamma", "dres"), grads, grads_ref):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=name)
    y2 = linear(x, w, b_all[1::2], "gelu", backend="triton", gemm=gemm)  # the bias alone, with an activation
    torch.testing.assert_close(y2, linear_reference(x, w, b_all[1::2], "gelu"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op,gemm", [("linear", "triton"), ("linear", "tma"), ("linear", "cublas"),
                                     ("mlp", "triton"), ("mlp", "cublas"), ("swiglu_fc2", "triton")])
def test_layer_scale_small_gamma_fp16(op, gemm, device):
    """fp16 with LayerScale's small γ (1e-6 .. 1e-4, CaiT / DeiT-III init values, both signs): γ·W would be
    subnormal in fp16 (W ~ 0.1: a few significant bits a weight), so γ must scale the GEMM's result, not its
    weights. y and every grad, dγ and the residual's included, by the 2x/3x rule vs float64 against eager fp16;
    the absolute slack is 1e-3 of each tensor's own scale (a fixed atol would hide errors of 1e-5-sized outputs)."""
    G = importlib.import_module("flashvit.kernels.glu")
    M, K, H, N = 29, 48, 40, 24
    dt = torch.float16
    x = randn(M, K, dtype=dt, device=device)
    w1, b1 = randn(H, K, dtype=dt, device=device, scale=K ** -0.5), randn(H, dtype=dt, device=device)
    k2 = H // 2 if op == "swiglu_fc2" else (H if op == "mlp" else K)
    w2, b2 = randn(N, k2, dtype=dt, device=device, scale=k2 ** -0.5), randn(N, dtype=dt, device=device)
    mag = torch.pow(10.0, torch.empty(N).uniform_(-6, -4, generator=torch.Generator().manual_seed(fresh_seed())))
    gamma = (mag * torch.randn(N).sign()).to(device, dt)
    r = randn(M, N, dtype=dt, device=device, scale=1e-5)  # a residual of γ·z's size: y's error stays visible
    g = randn(M, N, dtype=torch.float64, device=device, scale=1e3)  # loss-scaled, as fp16 training runs

    def fn(be):
        def f(x, w1, b1, w2, b2, gm, r):
            if op == "linear":
                return linear(x, w2, b2, residual=r, layer_scale=gm, backend=be, gemm=gemm)
            if op == "mlp":
                return L.mlp(x, w1, b1, w2, b2, residual=r, layer_scale=gm, backend=be, gemm=gemm)
            return G.swiglu_fc2(linear(x, w1, b1, backend=be), w2, b2, residual=r, layer_scale=gm, backend=be,
                                gemm=gemm)
        return f

    def run(f, ts):
        leaves = [t.detach().requires_grad_() for t in ts]
        y = f(*leaves)
        y.backward(g.to(y.dtype))
        return y.detach(), [t.grad for t in leaves]

    ts = (x, w1, b1, w2, b2, gamma, r)
    y, grads = run(fn("triton"), ts)
    yt, gt = run(fn("torch"), ts)
    y64, g64 = run(fn("torch"), [t.double() for t in ts])
    assert torch.equal(grads[-1], g.to(dt))  # the residual's grad is dy itself (not dy·γ)
    names = ("y", "dx", "dW1", "db1", "dW2", "db2", "dgamma", "dres")
    for name, got, want, same in zip(names, [y, *grads], [y64, *g64], [yt, *gt]):
        if op == "linear" and name in ("dW1", "db1"):
            assert got is None, name
            continue
        assert_close_to_ref(got, want, same, factor=2.0 if name == "y" else 3.0, name=name,
                            atol=1e-3 * want.abs().max().item())


@pytest.mark.parametrize("gemm,dropout", [("triton", False), ("triton", True)])
def test_mlp_layer_scale(gemm, dropout, device):
    """mlp(..., layer_scale=γ) and FusedMLP(..., layer_scale=γ) = x + γ ⊙ MLP(x), grads of γ included, against
    timm's Mlp followed by its LayerScale, in float64 (also with the dropouts active: the same masks)."""
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(5)
    ref = timm_layers.Mlp(24, 56, drop=0.25 if dropout else 0.0).double().train()
    ls = timm_layers.LayerScale(24, init_values=0.5).double()
    with torch.no_grad():
        ls.gamma.copy_(randn(24, dtype=torch.float64, device="cpu"))
    ours = FusedMLP(24, 56, drop=0.25 if dropout else 0.0).to(device).train()
    ours.load_state_dict(ref.state_dict())
    gamma = ls.gamma.detach().float().to(device).requires_grad_()
    x = randn(3, 11, 24, device=device, requires_grad=True)
    res = randn(3, 11, 24, device=device, requires_grad=True)
    g = randn(3, 11, 24, device=device)
    from flashvit.kernels import use_backend

    torch.manual_seed(9)
    with use_backend("triton"):
        y = ours(x, residual=res, layer_scale=gamma)
    y.backward(g)
    x2, res2 = (t.detach().double().cpu().requires_grad_() for t in (x, res))
    torch.manual_seed(9)
    y2 = res2 + ls(ref(x2))
    y2.backward(g.double().cpu())
    close = dict(atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(y.double().cpu(), y2, **close)
    torch.testing.assert_close(x.grad.double().cpu(), x2.grad, **close)
    torch.testing.assert_close(res.grad.double().cpu(), res2.grad, **close)
    torch.testing.assert_close(gamma.grad.double().cpu(), ls.gamma.grad, **close)
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), ref.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1.grad.double().cpu(), p2.grad, **close, msg=n1)


def test_layer_scale_bad_inputs(device):
    x, w, b, r = _make(4, 16, 8, torch.float32, device, True, True)
    with pytest.raises(ValueError, match="layer_scale has shape"):
        linear(x, w, b, layer_scale=randn(9, device=device), backend="triton")
    with pytest.raises(ValueError, match="layer_scale must have 1 dim"):
        linear(x, w, b, layer_scale=randn(1, 8, device=device), backend="triton")
    with pytest.raises(ValueError, match="activation=None"):
        linear(x, w, b, activation="gelu", layer_scale=randn(8, device=device), backend="triton")
    with pytest.raises(TypeError, match="layer_scale"):
        linear(x, w, b, layer_scale=randn(8, device=device).half(), backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        linear(x, w, b, layer_scale=torch.ones(8, dtype=torch.int32, device=device), backend="triton")
    with pytest.raises(ValueError, match="one device"):
        linear(x, w, b, layer_scale=randn(8, device=device).to("meta"), backend="triton")
    w2 = randn(8, 24, device=device)
    with pytest.raises(ValueError, match="layer_scale has shape"):
        L.mlp(x, randn(24, 16, device=device), None, w2, None, layer_scale=randn(24, device=device),
              backend="triton")


def test_empty_rows(device):
    x = torch.empty(0, 16, device=device)
    w = randn(8, 16, device=device, requires_grad=True)
    b = randn(8, device=device, requires_grad=True)
    y = linear(x, w, b, "gelu", backend="triton")
    assert y.shape == (0, 8)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    w.grad = b.grad = None
    with L.use_split_k(3):  # a forced split of the weight grad's empty sum: zeros, not a division by zero
        linear(x, w, b, gemm="triton", backend="triton").sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_zero_input_features(device):
    """K = 0 (x (..., 0)): y = act(b) (+ residual), as the reference; linear and the fused MLP, with grads."""
    x = torch.empty(2, 3, 0, device=device, requires_grad=True)
    ps = [randn(*s, device=device, requires_grad=True) for s in ((16, 0), (16,), (8, 16), (8,))]
    r = randn(2, 3, 8, device=device)
    outs = []
    for be in ("torch", "triton"):
        y = L.mlp(x, *ps, residual=r, backend=be)
        y2 = linear(x, ps[0], ps[1], "gelu", backend=be)
        (y.square().sum() + y2.sum()).backward()
        outs.append([y.detach(), y2.detach()] + [t.grad for t in (x, *ps)])
        for t in (x, *ps):
            t.grad = None
    assert outs[1][0].shape == (2, 3, 8) and outs[1][1].shape == (2, 3, 16)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bad_inputs(device):
    x, w, b, r = _make(4, 16, 8, torch.float32, device, True, True)
    with pytest.raises(ValueError, match="input features"):
        linear(x, randn(8, 15, device=device), backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        linear(x.to(torch.int32), w, backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        linear(x, w.to(torch.int64), backend="triton")
    with pytest.raises(TypeError, match="Triton kernels take"):
        linear(x.double(), w.double(), backend="triton")
    with pytest.raises(TypeError, match="share one dtype"):
        linear(x, w.half(), backend="triton")
    with pytest.raises(ValueError, match="bias has shape"):
        linear(x, w, randn(9, device=device), backend="triton")
    with pytest.raises(ValueError, match="residual has shape"):
        linear(x, w, b, residual=randn(4, 9, device=device), backend="triton")
    with pytest.raises(ValueError, match="activation"):
        linear(x, w, b, activation="relu", backend="triton")
    with pytest.raises(ValueError, match="one device"):
        linear(x, w.to("meta"), backend="triton")
    with pytest.raises(ValueError, match="GEMM path"):
        linear(x, w, gemm="cutlass", backend="triton")
    if not ON_GPU:
        with pytest.raises(ValueError, match="one device"):
            linear(x, w, b.to("meta"))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fused_mlp_matches_timm(approximate, device):
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(3)
    ref = timm_layers.Mlp(32, 72, act_layer=lambda: torch.nn.GELU(approximate=approximate)).to(device)
    mlp = FusedMLP(32, 72, approximate=approximate).to(device)
    mlp.load_state_dict(ref.state_dict(), strict=True)  # same parameter names
    x = randn(2, 9, 32, device=device, requires_grad=True)
    res = randn(2, 9, 32, device=device, requires_grad=True)
    from flashvit.kernels import use_backend

    with use_backend("triton"):
        y = mlp(x, residual=res)
    g = randn(*y.shape, device=device)
    y.backward(g)
    x2 = x.detach().clone().requires_grad_()
    res2 = res.detach().clone().requires_grad_()
    y2 = ref(x2) + res2
    y2.backward(g)
    torch.testing.assert_close(y, y2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res.grad, res2.grad)
    for (n1, p1), (n2, p2) in zip(mlp.named_parameters(), ref.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1.grad, p2.grad, atol=2e-4, rtol=1e-4, msg=n1)


def test_reference_backend_on_cpu_is_eager():
    x, w, b, r = _make(3, 8, 4, torch.float64, "cpu", True, True)
    torch.testing.assert_close(linear(x, w, b, "gelu", r, backend="torch"),
                               torch.nn.functional.gelu(x @ w.t() + b) + r)


# ---------------------------------------------------------------------------------------------
# CUDA only

GPU_M = (1, 7, 197, 394)
GPU_KN = ((32, 32), (192, 768), (768, 3072), (3072, 768), (588, 768))
GPU_EPI = [(None, True, False), ("gelu", True, False), (None, True, True), ("gelu_tanh", False, True),
           ("gelu", True, True), (None, False, False)]


@pytest.mark.gpu
@pytest.mark.parametrize("M,KN", list(itertools.product(GPU_M, GPU_KN)))
def test_gpu_bf16_grid(M, KN):
    K, N = KN
    for i, (act, bias, res) in enumerate(GPU_EPI[(M + K) % 3::3]):
        x, w, b, r = _make(M, K, N, torch.bfloat16, "cuda", bias, res, noncontig=(i == 1))
        _check(x, w, b, r, act)


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["triton", "tma", "cublas"])
def test_gpu_vit_mlp_shapes(gemm):
    """ViT-B fc1 and fc2 at batch 2 (M = 394) in bf16; the Triton paths with autotuning on."""
    L.set_autotune(gemm != "cublas")
    for K, N, act, res in ((768, 3072, "gelu", False), (3072, 768, None, True)):
        x, w, b, r = _make(None, K, N, torch.bfloat16, "cuda", True, res, lead=(2, 197))
        _check(x, w, b, r, act, gemm=gemm)


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["triton", "tma", "cublas"])
@pytest.mark.parametrize("recompute", ["act", "fc1"])
def test_gpu_mlp_recompute_bf16(gemm, recompute):
    """ViT-B's MLP at batch 2 in bf16 with h (and z) rebuilt in the backward, vs float64 on the 2x/3x rule."""
    L.set_autotune(gemm != "cublas")
    _check_mlp(394, 768, 3072, 768, torch.bfloat16, "gelu", True, True, True, gemm, "cuda", recompute=recompute)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [None] + L.DACT_CONFIGS)
def test_gpu_elementwise_passes_bf16(cfg, monkeypatch):
    """The cuBLAS path's epilogue and dZ / bias-grad passes in bf16 at ViT-B's fc1 width, M = 25216 (batch 128):
    autotuned (None) and at each tile (the dZ pass's row loop pipelined too, DACT_PIPES, at the tiles the autotuner
    tries it at), vs float64 (bf16's rounding of dZ and y; db summed in fp32)."""
    L.set_autotune(cfg is None)
    if cfg is not None:
        monkeypatch.setattr(L, "ELEMENTWISE_CONFIGS", [cfg[:3]])
        monkeypatch.setattr(L, "DACT_PIPE_PLAIN", cfg[3])
    M, N = 128 * 197, 3072
    z = randn(M, N, dtype=torch.bfloat16, device="cuda") * 2
    dy = randn(M, N, dtype=torch.bfloat16, device="cuda", scale=0.1)
    dz, db = L._dact_colsum(dy, z, L._ACT_CODE["gelu"], write_dz=True, colsum=True)
    want = _dact_want(dy, z, "gelu")
    assert max_err(dz, want) <= 2 ** -8 * want.abs().max().item()
    torch.testing.assert_close(db.double(), want.sum(0), atol=1e-3, rtol=1e-4)
    _, db0 = L._dact_colsum(dy, None, 0, write_dz=False, colsum=True)
    torch.testing.assert_close(db0.double(), dy.double().sum(0), atol=1e-3, rtol=1e-4)
    y = L._empty((M, N), "cuda", torch.bfloat16)
    L._launch_epilogue(z, dy, L._ACT_CODE["gelu"], y)
    ref = torch.nn.functional.gelu(z.double()) + dy.double()
    assert max_err(y, ref) <= 2 ** -8 * ref.abs().max().item()


@pytest.mark.gpu
def test_gpu_fp32_tf32_flag():
    x, w, b, r = _make(197, 588, 768, torch.float32, "cuda", True, True)
    y64 = linear_reference(*(t.double() for t in (x, w, b)), "gelu", r.double())
    ieee = linear(x, w, b, "gelu", r, allow_tf32=False)
    tf32 = linear(x, w, b, "gelu", r, allow_tf32=True)
    assert (ieee.double() - y64).abs().max() < 1e-4
    assert (tf32.double() - y64).abs().max() < 5e-2


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    """Our kernels (forced: under 'auto' a compiled graph leaves linear to Inductor, whose fused GELU + add rounds
    differently from eager's ops: 1 bf16 ulp at 1.6% of y, H100 run 7) traced whole: the same values as eager."""
    x, w, b, r = _make(None, 192, 768, torch.bfloat16, "cuda", True, True, lead=(2, 197))
    w.requires_grad_()

    def f(x, w, b, r):
        return linear(x, w, b, "gelu", r, backend="triton")

    cf = torch.compile(f, fullgraph=True)
    y = cf(x, w, b, r)
    y.float().sum().backward()
    g = w.grad.clone()
    w.grad = None
    y2 = f(x, w, b, r)
    y2.float().sum().backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(g, w.grad)


@pytest.mark.gpu
def test_gpu_fused_mlp_bf16_autocast():
    timm_layers = pytest.importorskip("timm.layers")
    ref = timm_layers.Mlp(768, 3072).cuda()
    mlp = FusedMLP(768, 3072).cuda()
    mlp.load_state_dict(ref.state_dict())
    x = randn(2, 197, 768, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = mlp(x, residual=x)
        y_ref = ref(x) + x
    assert y.dtype == y_ref.dtype
    y64 = ref.double()(x.double()) + x.double()
    assert (y.double() - y64).abs().max() <= 2 * (y_ref.double() - y64).abs().max() + 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["triton", "tma"])
@pytest.mark.parametrize("splits", [0, 3])  # 0: the heuristic (splits at this token count), 3: forced
def test_gpu_split_k_bf16(gemm, splits):
    """Split-K weight gradients in bf16 (one config per kernel: the autotuner's picks run in the benchmarks):
    every grad vs float64 (2x/3x rule), dW bit-equal run to run, at a token count no split divides."""
    x, w, b, r = _make(9001, 256, 384, torch.bfloat16, "cuda", True, True)
    assert splits or L.split_k(384, 256, 9001, L._sms(torch.device("cuda"))) > 1
    with L.use_split_k(splits):
        _check(x, w, b, r, "gelu", gemm=gemm)
        gw = [_run(lambda *a: linear(*a, backend="triton", gemm=gemm), x, w, b, r, "gelu", 5)[1][1] for _ in range(2)]
    assert torch.equal(gw[0], gw[1])


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N,act,bias,res", [(197, 588, 768, "gelu", True, True), (394, 768, 3072, None, True, False),
                                                (7, 3072, 768, "gelu_tanh", False, True), (1000, 200, 72, None, True, True)])
def test_gpu_tma_bf16(M, K, N, act, bias, res, tma_launches):
    """gemm='tma' forward, dX and dW vs float64; each GEMM on TMA where its operands meet TMA's rule (16-byte
    row strides): K = 588 in bf16 (1176-byte rows) touches every GEMM, which all fall back to our tiled kernel."""
    x, w, b, r = _make(M, K, N, torch.bfloat16, "cuda", bias, res)
    _check(x, w, b, r, act, gemm="tma")
    assert tma_launches["tma"] == (3 if K * 2 % 16 == 0 and N * 2 % 16 == 0 else 0)


def _gpu_arch() -> int:
    return L._arch(torch.device("cuda")) if ON_GPU else 0


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", GEMM_CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_gpu_every_gemm_config(cfg, monkeypatch):
    """Each autotune config of the tiled GEMM alone on the GPU (the autotuner only ever runs its pick): y, dX,
    dW and the epilogue in bf16 (fp32 for the fp32 list) at a shape no tile divides."""
    import triton

    from flashvit.kernels._dispatch import Launcher
    arch = _gpu_arch()
    width = 32 if cfg in L.FP32_CONFIGS else 16
    if cfg not in (L.FP32_CONFIGS if width == 32 else (L.SM90_CONFIGS_16 if arch == 90 else L.SM80_CONFIGS_16)):
        pytest.skip(f"not in this GPU's (sm_{arch}) config list")
    one = Launcher(triton.autotune(L._triton_configs([cfg]), key=L._AUTOTUNE_KEY)(L._gemm_kernel))
    monkeypatch.setitem(L._GEMM_TUNED, (arch, width), one)
    L.set_autotune(True)
    x, w, b, r = _make(301, 200, 392, torch.float32 if width == 32 else torch.bfloat16, "cuda", True, True)
    _check(x, w, b, r, "gelu", gemm="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("cfg,prefetch", [(c, False) for c in L.TMA_CONFIGS_16]
                         + [(c, True) for c in L.TMA_CONFIGS_16 if L._prefetch_ok(c)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else ("prefetch" if v else "plain"))
def test_gpu_every_tma_config(cfg, prefetch, monkeypatch, tma_launches):
    """Each autotune config of the TMA GEMM alone on the GPU, as its autotuner builds it (FLATTEN, PREFETCH)."""
    import triton

    from flashvit.kernels._dispatch import Launcher
    if _gpu_arch() < 90:
        pytest.skip("the TMA GEMM runs on sm_90+")
    bm, bn, bk, w_, st = cfg
    one = triton.autotune([triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": L.GROUP_M,
                                          "FLATTEN": L.TMA_FLATTEN, "PREFETCH": prefetch},
                                         num_warps=w_, num_stages=st, pre_hook=L._tma_block_shapes)],
                          key=L._AUTOTUNE_KEY + ["A_T", "B_T"])(L._gemm_tma_kernel)
    monkeypatch.setattr(L, "_GEMM_TMA_TUNED", Launcher(one))
    L.set_autotune(True)
    # N = 384: an aligned residual (row stride % 16 == 0); N = 392: an unaligned one, or C alone (no GELU, no
    # residual) where the config has no room for its staging (tma_config_fits; run 5 refused 128x256x64 s4)
    x, w, b, r = _make(301, 200, 384, torch.bfloat16, "cuda", True, True)
    assert L._res_mode(r) == 1 and L.tma_config_fits(cfg, True)
    _check(x, w, b, r, "gelu", gemm="tma")
    plain = not L.tma_config_fits(cfg, True, res_aligned=False)
    x, w, b, r = _make(301, 200, 392, torch.bfloat16, "cuda", True, not plain)
    assert plain or L._res_mode(r) == 2
    _check(x, w, b, r, None if plain else "gelu", gemm="tma")
    assert tma_launches["tma"] == 6


@pytest.mark.gpu
def test_tma_fast_launch_gpu():
    """The TMA GEMM through Launcher: the first call autotunes through Triton, later ones launch the compiled
    kernel directly with the descriptors' block shapes set by the pre_hook; bit-equal outputs, new
    descriptors each call (other buffers, same shapes)."""
    if _gpu_arch() < 90:
        pytest.skip("the TMA GEMM runs on sm_90+")
    L.set_autotune(True)
    launcher = L._GEMM_TMA_TUNED
    x, w, b, r = _make(301, 256, 392, torch.bfloat16, "cuda", True, True)
    first = linear(x, w, b, "gelu", residual=r, backend="triton", gemm="tma")
    hits = len(launcher._cache)
    again = [linear(x.clone(), w.clone(), b, "gelu", residual=r.clone(), backend="triton", gemm="tma")
             for _ in range(3)]
    assert hits >= 1 and len(launcher._cache) == hits  # no new specialization: the fast path ran
    for y in again:
        assert torch.equal(y, first)


@pytest.mark.gpu
def test_mlp_refuses_mixed_devices_gpu():
    x, w1 = randn(3, 8, device="cuda"), randn(16, 8, device="cuda")
    with pytest.raises(ValueError, match="device"):
        L.mlp(x, w1, None, randn(4, 16, device="cpu"), None, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["triton", "tma", "cublas", "hybrid"])
@pytest.mark.parametrize("M,K,H,N", [(394, 768, 3072, 768), (197, 192, 776, 200)])
def test_gpu_mlp_bf16(M, K, H, N, gemm, dact_launches):
    """The fused MLP in bf16 with autotuning on: GELU' in fc2's dX GEMM epilogue (Triton/TMA), every grad."""
    L.set_autotune(gemm != "cublas")
    _check_mlp(M, K, H, N, torch.bfloat16, "gelu", True, True, True, gemm, "cuda")
    assert dact_launches["dact_gemm"] == (0 if gemm == "cublas" else 1)  # hybrid: act' on the TMA kernel


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["triton", "tma", "cublas"])
def test_gpu_layer_scale_under_autocast(gemm):
    """fp32 x, weights, γ and residual under bf16 autocast (the trainer's case): γ stays fp32 (the epilogue reads
    it; the backward forms γ·W of the cast weights in fp32, then rounds it); output fp32 like eager's (bf16 GEMM *
    fp32 γ + fp32 residual), every grad by the 2x/3x rule against float64 vs eager autocast."""
    L.set_autotune(True)
    M, K, N = 394, 384, 384
    x, w, b, r = _make(M, K, N, torch.float32, "cuda", True, True)
    gamma = randn(N, device="cuda", scale=0.1)
    g = randn(M, N, device="cuda")

    def run(fn, ts, autocast):
        leaves = [t.detach().requires_grad_() for t in ts]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = fn(*leaves)
        y.backward(g.to(y.dtype))
        return y.detach(), [t.grad for t in leaves]

    ts = (x, w, b, r, gamma)
    y, grads = run(lambda x, w, b, r, s: linear(x, w, b, None, r, layer_scale=s, backend="triton", gemm=gemm),
                   ts, True)
    yt, gt = run(lambda x, w, b, r, s: linear_reference(x, w, b, None, r, s), ts, True)
    y64, g64 = run(lambda x, w, b, r, s: linear_reference(x, w, b, None, r, s), [t.double() for t in ts], False)
    assert y.dtype == yt.dtype == torch.float32  # fp32 outputs at bf16 accuracy: the 2x/3x rule by hand
    for name, got, want, same, factor in zip(("y", "dx", "dW", "db", "dres", "dgamma"), [y, *grads], [y64, *g64],
                                             [yt, *gt], (2.0, 3.0, 3.0, 3.0, 3.0, 3.0)):
        assert got.dtype == torch.float32 and not got.isnan().any(), name
        err, torch_err = max_err(got, want), max_err(same, want)
        assert err <= factor * torch_err + 1e-3 * want.abs().max().item(), (name, err, torch_err)


@pytest.mark.parametrize("need_dx,need_dw,has_bias", list(itertools.product((False, True), repeat=3)))
def test_linear_bwd_outputs_per_need(need_dx, need_dw, has_bias):
    """The launcher computes only what is asked; the rest comes back as empty tensors (the op's 'None')."""
    dev = "cuda" if ON_GPU else "cpu"
    x, w, dy = randn(5, 24, device=dev), randn(16, 24, device=dev), randn(5, 16, device=dev)
    dx, dw, db = L.linear_bwd(dy, x, w, None, None, has_bias, need_dx, need_dw, gemm="triton")
    for got, need, ref in ((dx, need_dx, dy.double() @ w.double()), (dw, need_dw, dy.double().T @ x.double()),
                           (db, has_bias, dy.double().sum(0))):
        if need:
            torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
        else:
            assert got.numel() == 0


def test_cast_inputs_passes_one_dtype_through_and_names_a_mismatch():
    x, w, b, r = torch.randn(3, 8), torch.randn(4, 8), torch.randn(4), torch.randn(3, 4)
    dt, (x2, w2, b2), r2, late = L._cast_inputs(x, (w, b), r)
    assert dt is None and late is None and x2 is x and w2 is w and b2 is b and r2 is r
    with pytest.raises(TypeError, match="share one dtype"):
        L._cast_inputs(x, (w.half(), b), r)
    with pytest.raises(TypeError, match="float64"):
        L._cast_inputs(x.double(), (w.double(), None), None)

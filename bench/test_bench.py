"""pytest-benchmark suite: the fused ops and a small ViT training step, ours vs the PyTorch path.

    pytest bench/ --benchmark-enable              # time them (GPU: bf16, moderate shapes; CPU: fp32, tiny)
    pytest bench/                                 # CI: --benchmark-disable (pytest.ini) runs each once

Every benchmark also checks its result against the eager PyTorch result, so the suite cannot rot into
timing something broken. (The precise correctness tests live in tests/; these bounds are loose.)
"""

from __future__ import annotations

from typing import Callable, Tuple

import pytest
import torch
import torch.nn.functional as F

import flashvit
from flashvit.kernels import FusedMLP, add_layer_norm, layer_norm, patch_embed, qkv_attention

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
IMPLS = ("flashvit", "torch")


def backend(impl: str) -> str:
    # On CPU "flashvit" runs its default path (the reference): the Triton interpreter is no benchmark.
    return "torch" if impl == "torch" else ("triton" if GPU else "auto")


def timed(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        out = fn()
        if GPU:
            torch.cuda.synchronize()
        return out
    return run


def randn(*shape: int, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(sum(shape) + len(shape))
    t = (torch.randn(*shape, generator=g) * scale).to(DEVICE, DTYPE)
    return t.requires_grad_(grad)


def close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape
    assert torch.isfinite(out.float()).all()
    tol = 0.05 if DTYPE != torch.float32 else 1e-4
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * max(ref.float().abs().max().item(), 1.0))


def fwd_bwd(f: Callable[[], torch.Tensor], inputs: Tuple[torch.Tensor, ...]) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        out = f()
        torch.autograd.grad(out, inputs, torch.ones_like(out))
        return out.detach()
    return run


ROWS, D = ((64 * 197, 768) if GPU else (2 * 17, 64))


@pytest.mark.parametrize("impl", IMPLS)
def test_layer_norm(benchmark, impl):
    x, w, b = randn(ROWS, D, grad=True), randn(D, scale=0.1, grad=True), randn(D, scale=0.1, grad=True)
    benchmark.group = f"layer_norm fwd+bwd {ROWS}x{D}"
    out = benchmark(timed(fwd_bwd(lambda: layer_norm(x, w, b, 1e-6, backend=backend(impl)), (x, w, b))))
    close(out, F.layer_norm(x.detach(), (D,), w.detach(), b.detach(), 1e-6))


@pytest.mark.parametrize("impl", IMPLS)
def test_add_layer_norm(benchmark, impl):
    x, r = randn(ROWS, D, grad=True), randn(ROWS, D, scale=2.0, grad=True)
    w, b = randn(D, scale=0.1), randn(D, scale=0.1)
    benchmark.group = f"add_layer_norm fwd {ROWS}x{D}"
    y, h = benchmark(timed(lambda: add_layer_norm(x, r, w, b, 1e-6, backend=backend(impl))))
    hr = x.detach() + r.detach()
    close(h, hr)
    close(y, F.layer_norm(hr, (D,), w, b, 1e-6))


B, H, N, HD = ((32, 12, 197, 64) if GPU else (2, 3, 17, 16))


@pytest.mark.parametrize("impl", IMPLS)
def test_qkv_attention(benchmark, impl):
    qkv = randn(B, N, 3 * H * HD, grad=True)
    benchmark.group = f"qkv_attention fwd+bwd B={B} H={H} N={N} D={HD}"
    out = benchmark(timed(fwd_bwd(lambda: qkv_attention(qkv, H, backend=backend(impl)), (qkv,))))
    q, k, v = qkv.detach().view(B, N, 3, H, HD).permute(2, 0, 3, 1, 4).unbind(0)
    close(out, F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, H * HD))


M, MD, MH = ((32 * 197, 768, 3072) if GPU else (2 * 17, 64, 256))


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_mlp(benchmark, impl):
    torch.manual_seed(0)
    mlp = FusedMLP(MD, MH).to(DEVICE, DTYPE)
    x, res = randn(M, MD, grad=True), randn(M, MD)
    benchmark.group = f"FusedMLP fwd+bwd M={M} {MD}->{MH}"
    with flashvit.use_backend(backend(impl)):
        out = benchmark(timed(fwd_bwd(lambda: mlp(x, residual=res), (x,))))
    ref = F.linear(F.gelu(F.linear(x.detach(), mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias) + res
    close(out, ref.detach())


PB, IMG, P, PD = ((32, 224, 16, 768) if GPU else (2, 32, 8, 64))


@pytest.mark.parametrize("impl", IMPLS)
def test_patch_embed(benchmark, impl):
    L = (IMG // P) ** 2
    images = randn(PB, 3, IMG, IMG)
    w, b = randn(PD, 3, P, P, scale=0.02, grad=True), randn(PD, scale=0.02, grad=True)
    pos, cls = randn(1, L + 1, PD, scale=0.02, grad=True), randn(1, 1, PD, scale=0.02, grad=True)
    benchmark.group = f"patch_embed fwd+bwd B={PB} img={IMG} p={P} D={PD}"
    out = benchmark(timed(fwd_bwd(lambda: patch_embed(images, w, b, pos, cls, backend=backend(impl)), (w, b, pos, cls))))
    x = F.conv2d(images, w.detach(), b.detach(), stride=P).flatten(2).transpose(1, 2)
    close(out, torch.cat((cls.detach().expand(PB, -1, -1), x), 1) + pos.detach())


@pytest.mark.parametrize("impl", IMPLS)
def test_small_vit_train_step(benchmark, impl):
    torch.manual_seed(0)
    kw = dict(num_classes=10) if GPU else dict(img_size=32, depth=2, num_classes=10)
    model = flashvit.create_model("vit_small_patch16_224", **kw).to(DEVICE, DTYPE)
    bsz = 32 if GPU else 2
    x = randn(bsz, 3, *model.patch_embed.img_size)
    y = torch.arange(bsz, device=DEVICE) % 10
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> torch.Tensor:
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    benchmark.group = f"vit_small train step B={bsz}"
    with flashvit.use_backend(backend(impl)):
        loss = benchmark(timed(step))
    assert torch.isfinite(loss) and 0 < loss.item() < 20

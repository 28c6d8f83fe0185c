"""End-to-end ViT benchmarks: training and inference img/s, MFU and peak memory, ours vs timm, one process.

Implementations (same config, same dtype, same batch):
  flashvit            our model as users get it (backend "auto": Triton kernels where measured faster)
  flashvit-triton     our model with every Triton kernel forced (backend "triton"; CUDA only)
  flashvit-eager      our model on its PyTorch reference path (backend "torch")
  timm                timm's VisionTransformer, eager (the baseline of every speedup)
  timm+flashvit.patch timm's model with flashvit.patch() swapping in our fused layers
  IMPL[key=value,...] IMPL with 'auto' verdicts flipped (see VERDICTS), e.g. flashvit[ln=triton,mlp=tma]
  compile(timm)       torch.compile(timm model)
  compile(timm+flashvit.patch)  torch.compile of the patched timm model (Inductor fuses around our ops)
  compile(flashvit)   torch.compile(our model), Triton kernels as opaque custom ops
  graph(IMPL)         IMPL's whole step (forward, loss, backward, optimizer step) captured in one CUDA graph and
                      replayed: no host time per kernel, so host-bound shapes (ViT-S) show their device time

Models: flashvit's presets (s, b, l, ...: every impl), or any timm model name (deit_small_patch16_224,
vit_base_patch14_dinov2, swin_tiny_patch4_window7_224, maxvit_tiny_tf_224, pvt_v2_b2, ...): its timm rows only,
i.e. what flashvit.patch gives that model.

The model runs in pure ``dtype`` (bf16 on GPU: parameters and activations, no autocast) for every impl.
A training step is forward + cross-entropy + backward + SGD step. FLOPs per image are counted with
torch.utils.flop_counter.FlopCounterMode on our eager path (timm's model for a timm-only name; aten ops, SDPA
forced to its MATH form so every matmul is seen); MFU = img/s x FLOP/img / the run's measured matmul TFLOP/s.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from flashvit.bench.harness import Job, Row, dtype_name, time_steps

MODEL_ALIASES = {
    "s": "vit_small_patch16_224", "vit_s": "vit_small_patch16_224",
    "b": "vit_base_patch16_224", "vit_b": "vit_base_patch16_224",
    "l": "vit_large_patch16_224", "vit_l": "vit_large_patch16_224",
    "dino_s": "vit_small_patch14_dinov2", "dino_b": "vit_base_patch14_dinov2", "dino_l": "vit_large_patch14_dinov2",
    # RoPE models (timm's Eva class: RoPE + flash attention through flashvit.patch; timm rows only)
    "dino3_s": "vit_small_patch16_dinov3", "dino3_b": "vit_base_patch16_dinov3", "eva02_b": "eva02_base_patch14_224",
}
DEFAULT_MODELS = ("vit_base_patch16_224", "vit_small_patch16_224", "vit_large_patch16_224")
IMPLS = ("flashvit", "flashvit[block=off]", "timm+flashvit.patch[block=off]", "flashvit[block=bias]",
         "timm+flashvit.patch[block=bias]", "flashvit[attn=fused]",
         "flashvit[attn=split]", "flashvit[attn=masked]", "timm+flashvit.patch[attn=split]",
         "timm+flashvit.patch[attn=fused]", "flashvit[ln=torch]",
         "flashvit[ln=triton]",
         "flashvit-triton", "flashvit-eager", "timm", "timm+flashvit.patch", "timm+flashvit.patch[ln=torch]",
         "flashvit[mlp=hybrid]",
         "timm+flashvit.patch[mlp=hybrid]", "flashvit[mlp=cublas]", "timm+flashvit.patch[mlp=cublas]",
         "timm+flashvit.patch[mlp=tma]", "flashvit[recompute=act]", "flashvit[recompute=fc1]",
         "timm+flashvit.patch[recompute=act]", "graph(flashvit)", "graph(timm)", "graph(timm+flashvit.patch)",
         "compile(timm)", "compile(flashvit)", "compile(timm+flashvit.patch)", "hf", "hf+flashvit.patch")
HF_IMPLS = ("hf", "hf+flashvit.patch")  # transformers' ViTForImageClassification at the preset's widths: eager, patched
# Verdict rows, IMPL[key=value,...]: the 'auto' policy with per-op verdicts flipped, so that one GPU run measures
# end to end what a change of verdict would give (or gave) against the defaults:
#   ln=triton    kernels/layernorm.py: LayerNorm on its kernels at every width, in training too
#   ln=torch     kernels/layernorm.py AUTO_TRITON = False: eager LayerNorm (the default before run 4)
#   mlp=PATH     kernels/linear.py AUTO_TRAINING = AUTO_INFERENCE = True with use_gemm(PATH) (cublas | tma | triton |
#                hybrid): the fused linears and MLP (GELU' in fc2's dX GEMM on the triton/tma/hybrid paths) in
#                training too; hybrid: TMA for the GEMMs with an epilogue, cuBLAS for the plain ones
#   attn=split   kernels/attention.py: the split loops and row splits (use_fwd_tail, use_bwd_tail, use_fwd_rows,
#                use_bwd_rows; the op rows' [tail+rows]) on
#   attn=fused   kernels/attention.py: the fused backward and the split loops (use_bwd_fused, use_fwd_tail,
#                use_bwd_tail; the op rows' [fused+tail]: the fewest instructions a score by ptxas's count) on
#   attn=masked  kernels/attention.py: the masked loops forced (use_fwd_tail, use_bwd_tail off: the default
#                before the autotuner picked the loop form; the op rows' [masked])
#   block=off    kernels/block.py use_fused_block(False): each layer its own autograd node and op call (the default
#                before plain blocks trained as one node); training rows only
#   block=bias   kernels/block.py use_fused_bias_grads(True): the one-node block's bias grads summed in the passes
#                its backward makes anyway (GELU's backward, LN2's) instead of torch's column sums; training rows
#   recompute=M  kernels/linear.py use_mlp_recompute(M) (act | fc1): the fused MLP in training (its 'auto' takes
#                it when a recompute is asked) keeping z alone (act) or nothing (fc1): peak memory and its cost
#                (training rows only)
VERDICTS = {"ln": ("triton", "torch"), "mlp": ("hybrid", "cublas", "tma", "triton"),
            "attn": ("split", "fused", "masked"), "recompute": ("act", "fc1"), "block": ("off", "bias")}
COMPILED = ("compile(timm)", "compile(flashvit)", "compile(timm+flashvit.patch)")
GRAPHED = ("graph(flashvit)", "graph(timm)", "graph(timm+flashvit.patch)")
QUICK_OVERRIDES = dict(img_size=32, depth=2)  # 4 patches + cls, 2 blocks: a smoke test of the real width
# ... for timm models that take no ``depth`` (Swin, MaxViT, PVT v2: stages of their own): the whole model at the
# smallest image their four stages of windows and strides take (given as img_size where the model takes one)
QUICK_STAGED_IMG = 64
NUM_CLASSES = 1000


class MCtx:
    def __init__(self, device: torch.device, dtype: torch.dtype, quick: bool, batch_train: int, batch_infer: int,
                 warmup: int, iters: int, compile_ok: bool, compile_note: str, peak_tflops: Optional[float]) -> None:
        self.device = device
        self.dtype = dtype
        self.quick = quick
        self.batch = {"train": batch_train, "infer": batch_infer}
        self.warmup = warmup
        self.iters = iters
        self.compile_ok = compile_ok
        self.compile_note = compile_note
        self.peak_tflops = peak_tflops
        self.overrides: Dict[str, Any] = dict(QUICK_OVERRIDES) if quick else {}
        self.drop_path = 0.0  # stochastic depth rate every model is built with (--drop-path)
        self.profile_steps = 0  # --profile-steps: steps profiled after each timed row (not graph(...))
        self.profile_dir: Optional[str] = None  # where those rows' step reports go
        self._flops: Dict[Tuple[str, str], float] = {}


def resolve(names: Sequence[str]) -> List[str]:
    """Model names: s/b/l, flashvit presets (every impl), or any other timm model name (its timm rows only:
    timm, timm+flashvit.patch and their compile / graph / verdict forms)."""
    import flashvit
    out = []
    for n in names:
        name = MODEL_ALIASES.get(n.lower(), n)
        if name not in flashvit.list_models() and not _is_timm_model(name):
            raise ValueError(f"unknown model {n!r}; use s/b/l, one of flashvit.list_models() or a timm model name")
        out.append(name)
    return out


def _is_timm_model(name: str) -> bool:
    timm = _timm()
    return timm is not None and name in timm.list_models(name)


def _ours(name: str) -> bool:
    """A flashvit preset (our model builds it); else a timm-only name."""
    import flashvit
    return name in flashvit.vit.MODEL_CONFIGS


def _timm() -> Any:
    try:
        import timm
        return timm
    except Exception:
        return None


def base_impl(impl: str) -> str:
    """``impl`` without its verdict tags: 'timm+flashvit.patch[ln=triton]' -> 'timm+flashvit.patch'."""
    return impl.split("[", 1)[0]


def model_impl(impl: str) -> str:
    """The model ``impl`` runs: 'compile(timm)', 'graph(timm)' -> 'timm' (verdict tags dropped too)."""
    impl = base_impl(impl)
    for wrap in ("compile(", "graph("):
        if impl.startswith(wrap) and impl.endswith(")"):
            return impl[len(wrap):-1]
    return impl


def verdict_tags(impl: str) -> Dict[str, str]:
    """The verdicts an impl name flips: 'flashvit[ln=triton,mlp=tma]' -> {'ln': 'triton', 'mlp': 'tma'}."""
    if "[" not in impl:
        return {}
    if not impl.endswith("]"):
        raise ValueError(f"bad impl {impl!r}: tags go in one trailing [key=value,...]")
    tags: Dict[str, str] = {}
    for kv in impl[impl.index("[") + 1:-1].split(","):
        key, _, value = kv.partition("=")
        if value not in VERDICTS.get(key, ()):
            raise ValueError(f"bad verdict {kv!r} in {impl!r}; choose from "
                             + ", ".join(f"{k}={v}" for k, vs in VERDICTS.items() for v in vs))
        tags[key] = value
    return tags


@contextlib.contextmanager
def _verdicts(impl: str) -> Iterator[None]:
    """The 'auto' verdicts that ``impl``'s tags flip, in force inside the block (restored after)."""
    tags = verdict_tags(impl)
    ln = importlib.import_module("flashvit.kernels.layernorm")
    lin = importlib.import_module("flashvit.kernels.linear")
    old = (ln.AUTO_TRITON, ln.AUTO_MIN_D_TRAINING, lin.AUTO_TRAINING, lin.AUTO_INFERENCE)
    if "ln" in tags:  # triton: at every width, with autograd too; torch: never
        ln.AUTO_TRITON, ln.AUTO_MIN_D_TRAINING = (True, 1) if tags["ln"] == "triton" else (False, old[1])
    if "mlp" in tags:
        lin.AUTO_TRAINING = lin.AUTO_INFERENCE = True
    try:
        with contextlib.ExitStack() as stack:
            if "mlp" in tags:
                stack.enter_context(lin.use_gemm(tags["mlp"]))
            if "recompute" in tags:
                stack.enter_context(lin.use_mlp_recompute(tags["recompute"]))
            if "block" in tags:
                blk = importlib.import_module("flashvit.kernels.block")
                stack.enter_context(blk.use_fused_block(False) if tags["block"] == "off" else
                                    blk.use_fused_bias_grads(True))
            if "attn" in tags:
                attn = importlib.import_module("flashvit.kernels.attention")
                uses = {"fused": (attn.use_bwd_fused, attn.use_fwd_tail, attn.use_bwd_tail),
                        "split": (attn.use_fwd_tail, attn.use_bwd_tail, attn.use_fwd_rows, attn.use_bwd_rows),
                        "masked": (attn.use_fwd_tail, attn.use_bwd_tail)}[tags["attn"]]
                for use in uses:
                    stack.enter_context(use(tags["attn"] != "masked"))
            yield
    finally:
        ln.AUTO_TRITON, ln.AUTO_MIN_D_TRAINING, lin.AUTO_TRAINING, lin.AUTO_INFERENCE = old


class HFLogits(torch.nn.Module):
    """A transformers classifier's logits (its forward returns a dataclass)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


_HF_PRESET_KEYS = {"patch_size", "embed_dim", "depth", "num_heads", "img_size", "mlp_ratio"}


def hf_vit(embed_dim: int, depth: int, num_heads: int, img_size: int, patch_size: int, mlp_ratio: float = 4.0,
           num_classes: int = NUM_CLASSES) -> torch.nn.Module:
    """transformers' ViT classifier with these widths (class token, exact GELU, eps 1e-6 as timm's), its logits."""
    import transformers
    cfg = transformers.ViTConfig(hidden_size=embed_dim, num_hidden_layers=depth, num_attention_heads=num_heads,
                                 intermediate_size=int(embed_dim * mlp_ratio), image_size=img_size,
                                 patch_size=patch_size, num_labels=num_classes, layer_norm_eps=1e-6)
    return HFLogits(transformers.ViTForImageClassification(cfg))


def _hf_preset(name: str, ctx: MCtx) -> Tuple[Optional[Dict[str, Any]], str]:
    """(hf_vit's keywords for flashvit preset ``name`` with the run's overrides, "") or (None, why not)."""
    import flashvit
    cfg = dict(flashvit.vit.MODEL_CONFIGS.get(name, {}))
    if not cfg or set(cfg) - _HF_PRESET_KEYS:
        return None, f"{name}: transformers' ViT has no such preset (a flashvit preset of class token, patches, depth)"
    if ctx.drop_path:
        return None, "transformers' ViT has no stochastic depth"
    cfg.update(ctx.overrides)
    return dict(embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["num_heads"],
                img_size=cfg.get("img_size", 224), patch_size=cfg["patch_size"],
                mlp_ratio=cfg.get("mlp_ratio", 4.0)), ""


def build(impl: str, name: str, ctx: MCtx) -> torch.nn.Module:
    """A fresh model for ``impl`` on the device, in ctx.dtype (parameters created on the device: fast init)."""
    import flashvit
    impl = model_impl(impl)
    kw = {"drop_path_rate": ctx.drop_path} if ctx.drop_path else {}
    with torch.device(ctx.device):
        if impl.startswith("hf"):
            m = hf_vit(**_hf_preset(name, ctx)[0])
        elif impl.startswith("flashvit"):
            m = flashvit.create_model(name, num_classes=NUM_CLASSES, **ctx.overrides, **kw)
        else:
            m = _timm().create_model(name, pretrained=False, num_classes=NUM_CLASSES, **overrides_for(name, ctx), **kw)
    m = m.to(ctx.dtype)
    if impl == "timm+flashvit.patch":
        m = flashvit.patch(m) or m
    if impl == "hf+flashvit.patch":
        flashvit.patch(m.model)  # (the transformers model: its attention implementation is set there)
    return m


def backend_for(impl: str) -> str:
    return {"flashvit-triton": "triton", "flashvit-eager": "torch"}.get(base_impl(impl), "auto")


def overrides_for(name: str, ctx: MCtx) -> Dict[str, Any]:
    """The model keywords a run gives ``name``: ctx.overrides, but in quick runs a timm model that takes no
    ``depth`` (its stages are its own: Swin, MaxViT, PVT v2) gets img_size=QUICK_STAGED_IMG, or nothing where it
    takes no img_size either (its image is still QUICK_STAGED_IMG: image_shape)."""
    if ctx.overrides != QUICK_OVERRIDES or _ours(name):
        return ctx.overrides
    for kw in (ctx.overrides, {"img_size": QUICK_STAGED_IMG}):
        try:
            with torch.device("meta"):
                _timm().create_model(name, pretrained=False, **kw)
            return kw
        except TypeError:  # (an unexpected keyword argument)
            continue
    return {}


def image_shape(name: str, ctx: MCtx) -> Tuple[int, int, int]:
    import flashvit
    if not _ours(name):  # a timm-only name: from a parameterless (meta) build
        kw = overrides_for(name, ctx)
        with torch.device("meta"):
            m = _timm().create_model(name, pretrained=False, **kw)
        pe = getattr(m, "patch_embed", None)
        if hasattr(pe, "img_size") and hasattr(getattr(pe, "proj", None), "in_channels"):  # a ViT patch embedding
            return (pe.proj.in_channels, *tuple(pe.img_size))
        c, h, w = m.pretrained_cfg["input_size"]  # others (MaxViT's stem, PVT's overlapping patches): timm's config
        return (c, h, w) if not ctx.overrides else (c, QUICK_STAGED_IMG, QUICK_STAGED_IMG)
    cfg = dict(flashvit.vit.MODEL_CONFIGS[name])
    cfg.update(ctx.overrides)
    s = cfg.get("img_size", 224)
    s = (s, s) if isinstance(s, int) else tuple(s)
    return (cfg.get("in_chans", 3), s[0], s[1])


def flops_per_image(name: str, mode: str, ctx: MCtx) -> float:
    """FLOPs of one image's forward (infer) or forward + backward (train), counted, not hard-coded."""
    key = (name, mode)
    if key in ctx._flops:
        return ctx._flops[key]
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    import flashvit
    b = 2
    m = build("flashvit-eager" if _ours(name) else "timm", name, ctx)
    m.train(mode == "train")
    x = torch.randn(b, *image_shape(name, ctx), device=ctx.device, dtype=ctx.dtype)
    counter = FlopCounterMode(display=False)
    with flashvit.use_backend("torch"), sdpa_kernel(SDPBackend.MATH), counter:
        if mode == "train":
            m(x).float().sum().backward()
        else:
            with torch.no_grad():
                m(x)
    ctx._flops[key] = counter.get_total_flops() / b
    del m
    return ctx._flops[key]


def run_row(impl: str, name: str, mode: str, ctx: MCtx) -> Callable[[Row], None]:
    def run(row: Row) -> None:
        try:
            _run(row)
        finally:
            if impl in COMPILED:
                torch._dynamo.reset()  # drop the compiled graphs and the model their guards hold

    def _run(row: Row) -> None:
        import flashvit
        from flashvit.bench.ops import autotune_picks, note_new_picks
        dev = ctx.device
        before = autotune_picks() if dev.type == "cuda" else {}
        row.flops = flops_per_image(name, mode, ctx)
        if impl in COMPILED:
            torch._dynamo.reset()
        model = build(impl, name, ctx)
        fwd = torch.compile(model) if impl in COMPILED else model
        B = ctx.batch[mode]
        images = torch.randn(B, *image_shape(name, ctx), device=dev, dtype=ctx.dtype)
        labels = torch.randint(0, NUM_CLASSES, (B,), device=dev)
        if mode == "train":
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

            def step() -> None:
                loss = F.cross_entropy(fwd(images), labels)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            model.eval()

            def step() -> None:
                with torch.no_grad():
                    fwd(images)

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        profile_note = ""
        with flashvit.use_backend(backend_for(impl)), _verdicts(impl):
            t0 = time.perf_counter()
            step()  # first step: compile / autotune / allocate, outside the timer
            if impl in GRAPHED:
                step = _graphed(step, model if mode == "train" else None)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            first = time.perf_counter() - t0
            row.median_ms, row.p20_ms, row.p80_ms = time_steps(step, dev, ctx.warmup, ctx.iters)
            if ctx.profile_steps and impl not in GRAPHED:
                profile_note = _profile(step, dev, ctx, f"{name}_{mode}_{impl}")
        row.img_per_s = B / (row.median_ms * 1e-3)
        if ctx.peak_tflops:
            row.mfu = 100.0 * row.img_per_s * row.flops / (ctx.peak_tflops * 1e12)
        if dev.type == "cuda":
            row.peak_mem_mb = torch.cuda.max_memory_allocated(dev) / 2**20
        if first > 5:
            row.note = f"first step {first:.0f} s"
        if profile_note:
            row.note = "; ".join(filter(None, (row.note, profile_note)))
        if dev.type == "cuda":  # the configs this row's first step picked (rows share a process and its picks)
            note_new_picks(row, before, timings=False)  # (the op rows time the alternatives)

    return run


def _profile(step: Callable[[], None], dev: torch.device, ctx: MCtx, label: str) -> str:
    """``ctx.profile_steps`` more steps under torch.profiler (profile_host.profile_steps): the row's note line, and
    the whole report in ctx.profile_dir/steps_<label>.txt."""
    from flashvit.bench.profile_host import profile_steps, timeline_note, timeline_text
    t = profile_steps(step, dev, ctx.profile_steps)
    if ctx.profile_dir:
        os.makedirs(ctx.profile_dir, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "._-=" else "_" for c in label)
        with open(os.path.join(ctx.profile_dir, f"steps_{safe}.txt"), "w") as f:
            f.write(timeline_text(f"{label}: {dev}, {ctx.dtype}, batch {ctx.batch['train']} (train) / "
                                  f"{ctx.batch['infer']} (infer)", t))
    return timeline_note(t)


def _graphed(step: Callable[[], None], model: Optional[torch.nn.Module]) -> Callable[[], None]:
    """``step`` captured in a CUDA graph (flashvit.capture_cuda_graph, two warm-up steps first) -> its replay.
    A training step's gradients are None at capture, so its backward allocates them in the graph and every
    replay writes them anew (the zero_grad inside the step only drops the Python references)."""
    import flashvit
    graph, _ = flashvit.capture_cuda_graph(step, model.parameters() if model is not None else ())
    return graph.replay


def unavailable(impl: str, ctx: MCtx, name: str = "") -> str:
    import flashvit
    from flashvit.bench.ops import triton_unavailable
    if name and model_impl(impl).startswith("flashvit") and not _ours(name):
        return f"{name} is a timm model, not a flashvit preset: timm rows only"
    if model_impl(impl) in ("flashvit", "flashvit-triton") and triton_unavailable(ctx.device):
        return triton_unavailable(ctx.device)
    if "timm" in impl:
        if _timm() is None:
            return "timm not installed"
    if model_impl(impl) in HF_IMPLS:
        if importlib.util.find_spec("transformers") is None:
            return "transformers not installed"
        why = _hf_preset(name, ctx)[1] if name else ""
        if why:
            return why
    if "flashvit.patch" in impl and not hasattr(flashvit, "patch"):
        return "flashvit.patch is not in this build"
    if impl in COMPILED and not ctx.compile_ok:
        return ctx.compile_note
    if impl in GRAPHED and ctx.device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    return ""


def model_jobs(ctx: MCtx, names: Sequence[str], impls: Optional[Sequence[str]] = None) -> List[Job]:
    """Rows in priority order, for the budget: the first model's eager and graph(...) rows (train with the block=
    rows, infer), the other models' training rows timm, flashvit, graph(...) and block= (whether a model the host
    holds back, ViT-S in run 6, runs faster from a CUDA graph or with one node a block), the first model's mlp=
    verdict rows (their first step may autotune many GEMM shapes), its torch.compile training rows, the other
    models' remaining eager rows, the first model's compile inference rows, the other models' compile rows, then
    the other models' mlp= verdict rows. The recompute= rows (memory for time in the MLP's backward) are training
    rows: the first model's after its torch.compile training rows, the others' after their mlp= rows; the hf rows
    (transformers' ViT, eager and patched) after those."""
    impls = list(impls or IMPLS)
    for i in impls:
        if i not in IMPLS:
            raise ValueError(f"unknown impl {i!r}; choose from {', '.join(IMPLS)}")
    mlp_impls = [i for i in impls if "mlp" in verdict_tags(i)]
    rec_impls = [i for i in impls if "recompute" in verdict_tags(i) and i not in mlp_impls]  # training rows only
    block_impls = [i for i in impls if "block" in verdict_tags(i) and i not in mlp_impls + rec_impls]  # (training)
    hf_impls = [i for i in impls if i in HF_IMPLS]
    eager_impls = [i for i in impls if i not in COMPILED and i not in mlp_impls + rec_impls + block_impls + hf_impls]
    comp_impls = [i for i in impls if i in COMPILED]
    compile_min_s = 45.0 if ctx.device.type == "cuda" else 10.0

    def jobs(name: str, modes: Sequence[str], which: Sequence[str]) -> List[Job]:
        out = []
        for mode in modes:
            c, h, w = image_shape(name, ctx)
            sd = {"batch": ctx.batch[mode], "img": h if h == w else f"{h}x{w}"}
            sd.update({k: v for k, v in overrides_for(name, ctx).items() if k != "img_size"})
            if ctx.drop_path and mode == "train":  # (inference rows: the identity)
                sd["drop_path"] = ctx.drop_path
            for impl in which:
                row = Row("model", name, sd, dtype_name(ctx.dtype), mode, impl, baseline=impl == "timm")
                why = unavailable(impl, ctx, name)
                big = "large" in name or "huge" in name
                out.append(Job(row, run_row(impl, name, mode, ctx), unavailable=why,
                               min_s=compile_min_s * (2 if big else 1) if impl in COMPILED else (10.0 if big else 0.0)))
        return out

    first, rest = names[0], list(names[1:])
    early = [i for i in eager_impls if i in GRAPHED or i in ("timm", "flashvit")]
    order: List[Job] = []
    order += jobs(first, ("train",), eager_impls + block_impls)
    order += jobs(first, ("infer",), eager_impls)
    for n in rest:
        order += jobs(n, ("train",), early + block_impls)
    order += jobs(first, ("train", "infer"), mlp_impls)
    order += jobs(first, ("train",), comp_impls)
    order += jobs(first, ("train",), rec_impls)
    order += jobs(first, ("train", "infer"), hf_impls)
    for n in rest:
        order += jobs(n, ("train",), [i for i in eager_impls if i not in early])
        order += jobs(n, ("infer",), eager_impls)
    order += jobs(first, ("infer",), comp_impls)
    for n in rest:
        order += jobs(n, ("train", "infer"), comp_impls)
    for n in rest:
        order += jobs(n, ("train", "infer"), mlp_impls)
        order += jobs(n, ("train",), rec_impls)
        order += jobs(n, ("train", "infer"), hf_impls)
    return order


def eager_vs_timm_lines(rows: List[Row]) -> List[str]:
    """'flashvit-eager vs timm eager' per model and mode (the CPU comparison the issue asks for)."""
    by = {(r.name, r.mode, r.impl): r for r in rows if r.suite == "model"}
    out = []
    for (name, mode, impl), r in by.items():
        if impl != "flashvit-eager":
            continue
        t = by.get((name, mode, "timm"))
        if r.status == "ok" and t is not None and t.status == "ok":
            out.append(f"flashvit eager vs timm eager, {name} {mode} [{r.shape_str()}]: "
                       f"{r.img_per_s:.1f} vs {t.img_per_s:.1f} img/s (x{t.median_ms / r.median_ms:.2f})")
        else:
            why = r.error or r.note if r.status != "ok" else (t.error or t.note if t is not None else "no timm row")
            out.append(f"flashvit eager vs timm eager, {name} {mode}: not measured ({why})")
    return out



def profile_lines(rows: List[Row], limit: int = 12) -> List[str]:
    """The step profiles (--profile-steps) of the first model's rows, a line each (at most ``limit``)."""
    prof = [r for r in rows if r.suite == "model" and r.status == "ok" and "profiled " in r.note]
    first = prof[0].name if prof else None
    return [f"model steps: {r.name} {r.mode} {r.impl}: profiled {r.note.split('profiled ', 1)[1]}"
            for r in prof if r.name == first][:limit]

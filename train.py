#!/usr/bin/env python3
"""Train a flashvit Vision Transformer. Offline: the default data is Debian's dataset-fashion-mnist.

    python train.py                                   # Fashion-MNIST, tuned default (CPU or GPU profile)
    python train.py --config configs/seed_hyper_params.json --epochs 3
    python train.py --dataset cifar10 --data-dir ~/data/cifar-10-batches-py --model vit_tiny_patch16_224 \\
        --img-size 32 --patch-size 4
    torchrun --nproc_per_node=8 train.py --batch-size 128      # DistributedDataParallel, one process per GPU
    python train.py --model timm:eva02_tiny_patch14_224      # a timm architecture, flashvit's fused layers patched in
    python train.py --resume runs/my-run                       # continue from runs/my-run/last.pt
    python train.py --eval-only runs/my-run/best.pt            # test accuracy of a checkpoint
    python train.py plot runs/a runs/b -o compare.png          # compare the curves of several runs

Settings come from, in increasing priority: the built-in profile (``cpu`` or ``gpu``, picked by the device),
a JSON ``--config`` file (our keys or the seed repository's hyper_params.json keys), then command-line flags.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

import flashvit
from flashvit.data import DATASETS, DataError, ImageTensorDataset, collate_batch, load_data, split_train_val

try:  # the `train` extras; training works without them
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def _plt():
    """pyplot on the file-only Agg backend (imported on first use: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class ConfigError(Exception):
    """A bad setting or input file; printed as one ``error:`` line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Configuration

COMMON: Dict[str, Any] = dict(
    dataset="auto", data_dir=None, val_fraction=0.1, crop_pad=None, hflip=None,
    model="vit_mnist", img_size=None, patch_size=4, embed_dim=64, depth=6, num_heads=4, mlp_ratio=2.0,
    mlp_dim=None, drop_path_rate=0.0, pos_embed_learnable=True, model_kwargs={}, init_from=None, model_dims=None,
    epochs=20, batch_size=128, eval_batch_size=512, lr=2e-3, min_lr=1e-5, weight_decay=0.05, warmup_epochs=1.0,
    label_smoothing=0.1, grad_clip=1.0, precision="auto", backend="auto", compile=False,
    compile_mode="default", cuda_graph=False, mlp_recompute="none", seed=0, max_steps=None,
    workers=None, threads=None, run_dir=None, out_dir="runs", best_path=None, log_path=None, progress=True,
    profile="auto", device="auto", synthetic_train=2048, synthetic_test=512,
)
# Defaults that change with the profile; `auto` takes `gpu` when CUDA is available.
PROFILES: Dict[str, Dict[str, Any]] = {
    # Measured on a 2-core CPU (idle): width 64 / depth 6 runs ~47 s per epoch; depth 4 x 12 epochs reached
    # 86.2% test and depth 6 x 15 epochs 87.9%, so the default trains depth 6 for 20 epochs (~16 min).
    "cpu": dict(),
    # A GPU makes compute cheap: a wider, deeper model, more epochs and some stochastic depth.
    "gpu": dict(embed_dim=192, depth=6, num_heads=6, mlp_ratio=2.0, epochs=40, batch_size=256, lr=1e-3,
                drop_path_rate=0.1),
}
# --model timm:NAME: timm.create_model(NAME) at the same settings, its layers swapped for flashvit's (flashvit.patch).
TIMM_PREFIX = "timm:"
# The seed repository's hyper_params.json keys -> ours.
SEED_KEYS = {"patch_size": "patch_size", "pos_encoding_learnable": "pos_embed_learnable", "token_dim": "embed_dim",
             "n_heads": "num_heads", "encoder_blocks": "depth", "mlp_dim": "mlp_dim", "batch_size": "batch_size",
             "lr": "lr", "n_epochs": "epochs", "best_path": "best_path", "log_path": "log_path"}
# The model's shape settings: with model_dims "settings" (the default) they build the model; with "model" (the
# default under --init-from: pretrained weights need the architecture they were trained with) the preset or timm
# model keeps its own and only those given in the config file or on the command line override it.
ARCH_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "mlp_dim")
CHOICES = {"dataset": DATASETS, "precision": ("auto", "fp32", "bf16", "fp16"), "backend": flashvit.kernels.BACKENDS,
           "profile": ("auto", "cpu", "gpu"), "device": ("auto", "cpu", "cuda"),
           "mlp_recompute": flashvit.kernels.MLP_RECOMPUTE,
           "compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")}
POSITIVE_INT = ("epochs", "batch_size", "eval_batch_size", "depth", "num_heads", "patch_size", "embed_dim",
                "synthetic_train", "synthetic_test")


def read_config_file(path: str) -> Dict[str, Any]:
    """A JSON object of settings; seed keys are renamed; unknown keys are an error (typos fail loudly)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a JSON object, got {type(raw).__name__}")
    out: Dict[str, Any] = {}
    for k, v in raw.items():
        key = SEED_KEYS.get(k, k)
        if key not in COMMON:
            raise ConfigError(f"config file {path}: unknown key {k!r} (known: {', '.join(sorted(COMMON))}; "
                              f"seed keys: {', '.join(SEED_KEYS)})")
        out[key] = v
    return out


def resolve_config(file_cfg: Dict[str, Any], cli: Dict[str, Any], has_cuda: bool) -> Dict[str, Any]:
    """profile defaults <- config file <- command line; then validate."""
    profile = cli.get("profile") or file_cfg.get("profile") or "auto"
    if profile not in CHOICES["profile"]:
        raise ConfigError(f"profile must be one of {CHOICES['profile']}, got {profile!r}")
    resolved = "gpu" if profile == "gpu" or (profile == "auto" and has_cuda) else "cpu"
    cfg = dict(COMMON)
    cfg.update(PROFILES[resolved])
    cfg.update(file_cfg)
    cfg.update(cli)
    cfg["profile"] = resolved
    validate_config(cfg)
    if cfg["model_dims"] is None:
        cfg["model_dims"] = "model" if cfg["init_from"] is not None else "settings"
    if cfg["model_dims"] == "model":
        given = {k: cfg[k] for k in ARCH_KEYS if (k in file_cfg or k in cli) and cfg[k] is not None}
        if "mlp_dim" in given:
            if "embed_dim" not in given:
                raise ConfigError("mlp_dim with model_dims 'model' needs embed_dim too (or give mlp_ratio)")
            given["mlp_ratio"] = given.pop("mlp_dim") / given["embed_dim"]
        cfg["model_kwargs"] = {**given, **cfg["model_kwargs"]}
    if cfg["mlp_dim"] is not None:  # the seed's MLP width -> timm's mlp_ratio
        cfg["mlp_ratio"] = cfg["mlp_dim"] / cfg["embed_dim"]
    return cfg


def validate_config(cfg: Dict[str, Any]) -> None:
    for k, allowed in CHOICES.items():
        if cfg[k] not in allowed:
            raise ConfigError(f"{k} must be one of {', '.join(allowed)}; got {cfg[k]!r}")
    for k in POSITIVE_INT:
        if not isinstance(cfg[k], int) or isinstance(cfg[k], bool) or cfg[k] <= 0:
            raise ConfigError(f"{k} must be a positive integer, got {cfg[k]!r}")
    for k in ("lr", "min_lr", "weight_decay", "warmup_epochs", "label_smoothing", "grad_clip", "drop_path_rate",
              "mlp_ratio", "val_fraction"):
        if not isinstance(cfg[k], (int, float)) or isinstance(cfg[k], bool) or cfg[k] < 0:
            raise ConfigError(f"{k} must be a non-negative number, got {cfg[k]!r}")
    if not 0 <= cfg["val_fraction"] < 1 or not 0 <= cfg["label_smoothing"] < 1:
        raise ConfigError("val_fraction and label_smoothing must be in [0, 1)")
    for k in ("max_steps", "workers", "threads", "img_size", "crop_pad", "mlp_dim"):
        v = cfg[k]
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < (0 if k in ("workers",
                                                                                                 "crop_pad") else 1)):
            raise ConfigError(f"{k} must be a {'non-negative' if k in ('workers', 'crop_pad') else 'positive'} "
                              f"integer, got {v!r}")
    for k in ("compile", "cuda_graph", "pos_embed_learnable", "progress"):
        if not isinstance(cfg[k], bool):
            raise ConfigError(f"{k} must be true or false, got {cfg[k]!r}")
    if cfg["hflip"] is not None and not isinstance(cfg["hflip"], bool):
        raise ConfigError(f"hflip must be true, false or null (auto), got {cfg['hflip']!r}")
    if not isinstance(cfg["model_kwargs"], dict):
        raise ConfigError("model_kwargs must be a JSON object of create_model keywords")
    if cfg["init_from"] is not None and (not isinstance(cfg["init_from"], str) or not cfg["init_from"]):
        raise ConfigError(f"init_from must be a file path, got {cfg['init_from']!r}")
    if cfg["model_dims"] not in (None, "settings", "model"):
        raise ConfigError(f"model_dims must be 'settings' or 'model', got {cfg['model_dims']!r}")
    if isinstance(cfg["model"], str) and cfg["model"].startswith(TIMM_PREFIX):
        name = cfg["model"][len(TIMM_PREFIX):]
        if importlib.util.find_spec("timm") is None:
            raise ConfigError(f"--model {cfg['model']} needs timm (pip install timm)")
        import timm

        if not timm.is_model(name):
            raise ConfigError(f"timm has no model {name!r} (timm.list_models() names them)")
        if not cfg["pos_embed_learnable"]:
            raise ConfigError("--no-pos-embed-learnable (fixed sinusoids) is a flashvit preset setting; a timm model "
                              "keeps its own position embedding")
    elif not isinstance(cfg["model"], str) or cfg["model"] not in flashvit.list_models():
        raise ConfigError(f"unknown model preset {cfg['model']!r}; known: {', '.join(flashvit.list_models())}, "
                          f"or timm:NAME for a timm model")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", description=__doc__.split("\n\n")[0],
        epilog="Subcommand: `train.py plot RUN [RUN ...] [-o FILE]` compares the curves of several runs. "
               "Multi-GPU: torchrun --nproc_per_node=N train.py ... (batch size is per process).",
        formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    a = p.add_argument
    a("--config", help="JSON file of settings (our keys or the seed's hyper_params.json keys)")
    a("--profile", choices=CHOICES["profile"], help="default settings: cpu, gpu, or auto (gpu when CUDA is present)")
    a("--device", choices=CHOICES["device"], help="auto: CUDA when available (one GPU per process), else CPU")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS,
                   help="auto (default: Fashion-MNIST from /usr/share/datasets, or what --data-dir holds)")
    g.add_argument("--data-dir", help="IDX files (MNIST/Fashion-MNIST), CIFAR-10 python batches, or class folders")
    g.add_argument("--val-fraction", type=float, help="held-out validation share of the training set (0.1)")
    g.add_argument("--crop-pad", type=int, help="random-crop padding in pixels (default: img_size // 14)")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, help="random horizontal flips (auto by data)")
    g.add_argument("--workers", type=int, help="DataLoader worker processes (0 on CPU, 4 on GPU)")
    g.add_argument("--synthetic-train", type=int, help="synthetic training images (2048)")
    g.add_argument("--synthetic-test", type=int, help="synthetic test images (512)")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="preset name (flashvit.list_models()) or timm:NAME (a timm model, flashvit.patch "
                                   "applied); the flags below override it")
    g.add_argument("--init-from", help="fine-tune: load these weights first (a timm/flashvit state dict .pt/.pth/"
                                       ".safetensors, or a train.py checkpoint); the model keeps its own "
                                       "dimensions unless given below")
    g.add_argument("--model-dims", choices=("settings", "model"),
                   help="settings: the profile's patch/width/depth/heads/MLP build the model (default); model: the "
                        "preset's or timm model's own, overridden only by dimensions given (default with --init-from)")
    g.add_argument("--img-size", type=int, help="resize image folders / synthetic size (default: the data's)")
    g.add_argument("--patch-size", type=int)
    g.add_argument("--embed-dim", type=int)
    g.add_argument("--depth", type=int)
    g.add_argument("--num-heads", type=int)
    g.add_argument("--mlp-ratio", type=float)
    g.add_argument("--mlp-dim", type=int, help="MLP width (the seed's mlp_dim); overrides --mlp-ratio")
    g.add_argument("--drop-path-rate", type=float)
    g.add_argument("--pos-embed-learnable", action=argparse.BooleanOptionalAction,
                   help="learned position embedding (--no-pos-embed-learnable: the seed's fixed sinusoids)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="per process")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--lr", type=float, help="peak AdamW learning rate")
    g.add_argument("--min-lr", type=float, help="end of the cosine schedule")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--grad-clip", type=float, help="max gradient norm (0: off)")
    g.add_argument("--precision", choices=CHOICES["precision"],
                   help="auto = bf16 autocast on GPU, fp32 on CPU; fp16 uses a gradient scaler")
    g.add_argument("--backend", choices=CHOICES["backend"], help="flashvit ops: triton kernels or torch reference")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    g.add_argument("--compile-mode", choices=CHOICES["compile_mode"],
                   help="torch.compile's mode with --compile; reduce-overhead replays CUDA graphs (a small model's "
                        "step then costs the host almost nothing)")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction,
                   help="replay each step's forward + backward from one CUDA graph (one GPU, bf16 or fp32, no "
                        "--compile): no host time per kernel, the optimizer steps eagerly")
    g.add_argument("--mlp-recompute", choices=CHOICES["mlp_recompute"],
                   help="fused MLPs' backward rebuilds fc1's output h ('act': one pass, half the MLP's saved "
                        "activations) or reruns fc1 ('fc1': none of them) instead of keeping it (none)")
    g.add_argument("--seed", type=int)
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (smoke runs)")
    g.add_argument("--threads", type=int, help="CPU threads per process (default: the idle cores, at least 1)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, help="tqdm progress bars")
    g = p.add_argument_group("outputs")
    g.add_argument("--run-dir", help="where this run writes (default: OUT_DIR/<dataset>-<time>)")
    g.add_argument("--out-dir", help="parent of default run directories (runs)")
    g.add_argument("--best-path", help="best checkpoint path (default RUN_DIR/best.pt)")
    g.add_argument("--log-path", help="JSON metric log path (default RUN_DIR/log.json)")
    g.add_argument("--resume", nargs="?", const="", metavar="RUN_OR_CKPT",
                   help="continue from a run directory's last.pt (no value: --run-dir, else the newest run)")
    g.add_argument("--eval-only", nargs="?", const="", metavar="RUN_OR_CKPT",
                   help="evaluate a checkpoint on the test set (no value: like --resume, best.pt)")
    return p


# ---------------------------------------------------------------------------------------------
# Small utilities

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str, write) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_json(path: str, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Our checkpoints hold tensors, numbers, strings, lists and dicts only: weights_only=True loads them."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path} not found") from None
    except Exception as e:  # corrupt file, or not ours
        raise ConfigError(f"cannot load checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck:
        raise ConfigError(f"{path} is not a flashvit train.py checkpoint")
    return ck


class Dist:
    """Process-group facts; a single process is rank 0 of 1."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        self.enabled = self.world > 1
        self.main = self.rank == 0

    def init(self, device: torch.device) -> None:
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            kw = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10), **kw)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: List[float], device: torch.device) -> List[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if self.enabled:
            dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def default_threads(local_world: int) -> int:
    """CPU threads per process: every core of this process's share, unless the machine is oversubscribed.

    The 1-minute load average lingers after setup steps (a pip install leaves ~1.5 on 2 cores), so it only
    counts when it exceeds twice the cores: then one thread, since on a shared machine two threads that keep
    missing each other at every small op's barrier are far slower than one (measured on a 2-core box at
    load 9: 16 img/s with 2 threads, 106 img/s with 1).
    """
    cores = max(1, cpu_count() // local_world)
    try:
        busy = os.getloadavg()[0] / local_world
    except (AttributeError, OSError):  # pragma: no cover - Windows
        busy = 0.0
    return 1 if busy > 2 * cores else cores


def log0(d: Dist, *args: Any) -> None:
    if d.main:
        print(*args, flush=True)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS/Windows
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# Model, optimizer, schedule

def build_model(cfg: Dict[str, Any], in_chans: int, img_size: int, num_classes: int) -> torch.nn.Module:
    """The preset (or ``timm:NAME``: timm's architecture, randomly initialized, with flashvit.patch applied) at
    the settings' patch size, width, depth, heads and MLP ratio (model_dims 'settings'; with 'model' its own), the
    drop-path rate, then ``model_kwargs``."""
    kw = dict(img_size=img_size, in_chans=in_chans, num_classes=num_classes, drop_path_rate=cfg["drop_path_rate"])
    if cfg.get("model_dims") != "model":  # (None: a checkpoint saved before the setting existed)
        kw.update(patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"], depth=cfg["depth"],
                  num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"])
    timm_name = cfg["model"][len(TIMM_PREFIX):] if cfg["model"].startswith(TIMM_PREFIX) else None
    if timm_name is None:
        kw["pos_embed_learnable"] = cfg["pos_embed_learnable"]
    kw.update(cfg["model_kwargs"])
    try:
        if timm_name is None:
            return flashvit.create_model(cfg["model"], **kw)
        import timm

        return flashvit.patch(timm.create_model(timm_name, pretrained=False, **kw))
    except (ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"cannot build model {cfg['model']!r}: {e}") from None


def dims_text(model: torch.nn.Module, cfg: Dict[str, Any]) -> str:
    """'patch P width W depth D heads H mlp Rx' as built: the settings', or (model_dims 'model') the model's."""
    if cfg.get("model_dims") != "model":
        return (f"patch {cfg['patch_size']} width {cfg['embed_dim']} depth {cfg['depth']} heads {cfg['num_heads']} "
                f"mlp {cfg['mlp_ratio']:g}x")
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", "?")
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    blocks = getattr(model, "blocks", [])
    heads = getattr(getattr(blocks[0], "attn", None), "num_heads", "?") if len(blocks) else "?"
    return f"patch {patch} width {getattr(model, 'embed_dim', '?')} depth {len(blocks)} heads {heads} (as built)"


def read_weights(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from a file: torch's (.pt/.pth/.bin, loaded weights_only; our checkpoints and the usual
    'model' / 'state_dict' / 'model_ema' wrappers unwrapped, DDP's 'module.' prefix dropped) or .safetensors."""
    safetensors = path.endswith(".safetensors")
    if safetensors and importlib.util.find_spec("safetensors") is None:
        raise ConfigError(f"--init-from {path}: reading .safetensors needs the safetensors package")
    try:
        if safetensors:
            from safetensors.torch import load_file

            obj: Any = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"--init-from {path}: file not found") from None
    except Exception as e:  # corrupt, or pickled objects weights_only refuses
        raise ConfigError(f"--init-from {path}: cannot load it: {str(e).splitlines()[0]}") from None
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"--init-from {path} holds no state dict of tensors")
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}


def _adapt_in_chans(w: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A patch conv weight (D, C, p, p) for ``in_chans`` input channels, as timm's pretrained loading adapts it:
    summed over C for one channel, else tiled to in_chans and scaled by C / in_chans."""
    if in_chans == 1:
        return w.sum(dim=1, keepdim=True)
    reps = -(-in_chans // w.shape[1])
    return w.repeat(1, reps, 1, 1)[:, :in_chans] * (w.shape[1] / in_chans)


def init_weights(model: torch.nn.Module, path: str) -> str:
    """Load ``path``'s weights into ``model`` for fine-tuning (what a pretrained load does): the position embedding
    resampled to this grid (timm's checkpoint_filter_fn, or our load_timm_state_dict), the patch conv adapted
    to the input channels, tensors of another shape (a head for other classes) left as built. Returns a
    one-line summary; raises ConfigError when nothing fits."""
    sd = read_weights(path)
    module = sys.modules.get(type(model).__module__)
    own = model.state_dict()
    ours = hasattr(model, "load_timm_state_dict")
    if not ours and type(model).__module__.startswith("timm.") and hasattr(module, "checkpoint_filter_fn"):
        try:
            sd = module.checkpoint_filter_fn(sd, model)
        except Exception as e:  # a file of another architecture
            raise ConfigError(f"--init-from {path}: timm's checkpoint filter refused it: {e}") from None
    for k, v in list(sd.items()):
        o = own.get(k)
        if (o is not None and v.dim() == 4 and o.dim() == 4 and v.shape[1] != o.shape[1]
                and (v.shape[0], *v.shape[2:]) == (o.shape[0], *o.shape[2:])):
            sd[k] = _adapt_in_chans(v, o.shape[1])
    resampled = ("pos_embed",) if ours else ()  # (resampled by load_timm_state_dict)
    mismatched = sorted(k for k, v in sd.items() if k in own and v.shape != own[k].shape and k not in resampled)
    sd = {k: v for k, v in sd.items() if k not in mismatched}
    result = model.load_timm_state_dict(sd, strict=False) if ours else model.load_state_dict(sd, strict=False)
    loaded = sum(1 for k in sd if k in own)
    if loaded == 0:
        raise ConfigError(f"--init-from {path}: none of its {len(sd)} tensors has a name and shape of this model")

    def few(keys: List[str]) -> str:
        return ", ".join(keys[:4]) + (f" (+{len(keys) - 4})" if len(keys) > 4 else "")
    parts = [f"init from {path}: {loaded} of the model's {len(own)} tensors loaded"]
    missing = [k for k in result.missing_keys if k not in mismatched]
    if mismatched:
        parts.append(f"other shape, left as built: {few(mismatched)}")
    if missing:
        parts.append(f"not in the file, left as built: {few(missing)}")
    if result.unexpected_keys:
        parts.append(f"unused: {few(list(result.unexpected_keys))}")
    return "; ".join(parts)


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """No weight decay on biases, norms and embeddings/tokens (1-D or listed by the model)."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to min_ratio at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def cuda_graph_refusal(cfg: Dict[str, Any], d: Dist, device: torch.device, amp: Optional[torch.dtype]) -> str:
    """Why --cuda-graph cannot run with these settings ('' when it can)."""
    if device.type != "cuda":
        return "needs a CUDA device"
    if d.enabled:
        return "runs one process (no torchrun/DDP)"
    if amp == torch.float16:
        return "takes bf16 or fp32 (fp16's gradient scaler syncs with the host)"
    if cfg["compile"]:
        return "or --compile, not both (--compile-mode reduce-overhead replays CUDA graphs too)"
    return ""


class StepGraph:
    """``fn(x, y) -> (out, loss)`` (forward, loss, backward) replayed from one CUDA graph (--cuda-graph).

    Captured (flashvit.capture_cuda_graph) on copies of the first batch after two warm-up runs on a side stream
    (kernel compiles and autotuning, cuBLAS workspaces; their gradients are dropped, no optimizer step). Each
    call copies its batch (same shape) into the captured inputs and replays; ``out`` and ``loss`` are the
    graph's own tensors, rewritten by the next call. The gradients of ``params`` are None at capture, so the
    graph allocates them and every replay writes them anew: nothing may set them to None afterwards (the
    optimizer reads them).
    """

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]],
                 x: torch.Tensor, y: torch.Tensor, params: List[torch.nn.Parameter]) -> None:
        self.x, self.y = x.clone(), y.clone()
        with torch.cuda.device(x.device):
            self.graph, (self.out, self.loss) = flashvit.capture_cuda_graph(lambda: fn(self.x, self.y), params)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
        return self.out, self.loss


# ---------------------------------------------------------------------------------------------
# Evaluation and plots

@torch.no_grad()
def evaluate(model: torch.nn.Module, ds: ImageTensorDataset, d: Dist, device: torch.device, batch: int,
             amp: Optional[torch.dtype]) -> Tuple[float, float]:
    """(mean loss, accuracy %) over all of ``ds``; each rank takes a contiguous shard, sums are all-reduced."""
    model.eval()
    idx = torch.tensor_split(torch.arange(len(ds)), d.world)[d.rank]
    loss_sum = correct = 0.0
    for s in range(0, len(idx), batch):
        x, y = ds.__getitems__(idx[s:s + batch].tolist())
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
    loss_sum, correct, n = d.sum([loss_sum, correct, float(len(idx))], device)
    return loss_sum / max(n, 1), 100.0 * correct / max(n, 1)


def _save_fig(fig, path: str) -> None:
    plt = _plt()

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def plot_curves(history: List[Dict[str, Any]], path: str, title: str) -> None:
    """Loss and accuracy per epoch (PNG)."""
    plt = _plt()

    ep = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(ep, [h["val_loss"] for h in history], "o-", label="validation")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax2.plot(ep, [h["train_acc"] for h in history], "o-", label="train (augmented)")
    ax2.plot(ep, [h["val_acc"] for h in history], "o-", label="validation")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    _save_fig(fig, path)


def plot_pos_embed_similarity(model: torch.nn.Module, path: str) -> None:
    """For each patch position, the cosine similarity of its position embedding with every other patch's."""
    plt = _plt()

    if getattr(model, "pos_embed", None) is None or not hasattr(model, "patch_embed"):
        return  # (a timm model with rotary embeddings only: DINOv3's)
    gh, gw = model.patch_embed.grid_size
    pe = model.pos_embed.detach().float()[0]
    if not getattr(model, "no_embed_class", False):
        pe = pe[model.num_prefix_tokens:]  # (gh·gw, D) patch positions only
    pe = F.normalize(pe, dim=-1)
    sim = (pe @ pe.T).view(gh, gw, gh, gw).cpu()
    fig, axes = plt.subplots(gh, gw, figsize=(1.0 * gw + 1, 1.0 * gh), squeeze=False)
    for i in range(gh):
        for j in range(gw):
            ax = axes[i][j]
            im = ax.imshow(sim[i, j].numpy(), vmin=-1, vmax=1, cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(im, ax=axes, fraction=0.02, label="cosine similarity")
    fig.suptitle("Position-embedding similarity (row, column of the input patch)")
    _save_fig(fig, path)


def plot_command(argv: List[str]) -> int:
    """`train.py plot RUN [RUN ...] -o FILE`: compare per-epoch curves of several runs (ours or the seed's logs)."""
    p = argparse.ArgumentParser(prog="train.py plot", description=plot_command.__doc__)
    p.add_argument("runs", nargs="+", help="run directories or their log.json files")
    p.add_argument("-o", "--out", default="compare.png", help="output PNG (compare.png)")
    a = p.parse_args(argv)
    if not HAS_MPL:
        raise ConfigError("plot needs matplotlib: pip install matplotlib")
    series = []
    for r in a.runs:
        path = os.path.join(r, "log.json") if os.path.isdir(r) else r
        try:
            with open(path, encoding="utf-8") as f:
                log = json.load(f)
            m = log["metrics"]
            # Our logs and the seed's share these per-epoch fields.
            tl, vl, va = m["training_losses"], m["testing_losses"], m["testing_accuracies"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}: not a training log ({type(e).__name__}: {e})") from None
        label = os.path.basename(os.path.dirname(os.path.abspath(path))) if os.path.isdir(r) else os.path.basename(r)
        series.append((label, tl, vl, va))
    plt = _plt()

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, tl, vl, va in series:
        axes[0].plot(range(1, len(tl) + 1), tl, "o-", label=label)
        axes[1].plot(range(1, len(vl) + 1), vl, "o-", label=label)
        axes[2].plot(range(1, len(va) + 1), va, "o-", label=label)
    for ax, t, y in zip(axes, ("training loss", "validation loss", "validation accuracy"), ("loss", "loss", "%")):
        ax.set(title=t, xlabel="epoch", ylabel=y)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save_fig(fig, a.out)
    print(f"wrote {a.out} ({len(series)} runs)")
    return 0


# ---------------------------------------------------------------------------------------------
# The run

def find_checkpoint(spec: str, cfg_run_dir: Optional[str], out_dir: str, name: str) -> str:
    """A checkpoint file from a path, a run directory, --run-dir, or the newest run under out_dir."""
    if spec:
        path = os.path.join(spec, name) if os.path.isdir(spec) else spec
    elif cfg_run_dir:
        path = os.path.join(cfg_run_dir, name)
    else:
        runs = [os.path.join(out_dir, r, name) for r in (os.listdir(out_dir) if os.path.isdir(out_dir) else [])]
        runs = [r for r in runs if os.path.isfile(r)]
        if not runs:
            raise ConfigError(f"no run with {name} under {out_dir}/: pass a run directory or checkpoint")
        path = max(runs, key=os.path.getmtime)
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path} not found")
    return path


def pick_device(d: Dist, want: str = "auto") -> torch.device:
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    if want != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", d.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def amp_dtype(cfg: Dict[str, Any], device: torch.device) -> Optional[torch.dtype]:
    prec = cfg["precision"]
    if prec == "auto":
        prec = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if prec == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 (with a gradient scaler) needs a CUDA device; use bf16 or fp32 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]


def prepare(cfg: Dict[str, Any], d: Dist, device: torch.device):
    """Load data and build datasets (everything that can fail on bad input, before anything is written)."""
    if cfg["backend"] == "triton" and device.type == "cpu" and not flashvit.kernels.INTERPRET:
        raise ConfigError("--backend triton needs a CUDA GPU (or TRITON_INTERPRET=1 for the slow interpreter)")
    if cfg["backend"] == "triton" and not flashvit.HAS_TRITON:
        raise ConfigError("--backend triton: triton is not importable on this machine")
    data = load_data(cfg["dataset"], cfg["data_dir"], cfg["img_size"],
                     synthetic_size=(cfg["synthetic_train"], cfg["synthetic_test"]), seed=cfg["seed"],
                     warn=lambda m: log0(d, m))
    c, h, w = data.image_shape
    if h != w:
        raise ConfigError(f"images must be square, got {h}x{w} (use --dataset folder with --img-size)")
    mean, std = data.mean_std()
    tr_idx, va_idx = split_train_val(len(data.train_x), cfg["val_fraction"], cfg["seed"])
    crop = cfg["crop_pad"] if cfg["crop_pad"] is not None else max(1, h // 14)
    hflip = data.hflip if cfg["hflip"] is None else cfg["hflip"]
    train_ds = ImageTensorDataset(data.train_x[tr_idx], data.train_y[tr_idx], mean, std, True, crop, hflip)
    # Validation falls back to the test set only when the user asked for no held-out split.
    val_src = (data.train_x[va_idx], data.train_y[va_idx]) if len(va_idx) else (data.test_x, data.test_y)
    val_ds = ImageTensorDataset(*val_src, mean, std)
    test_ds = ImageTensorDataset(data.test_x, data.test_y, mean, std)
    info = dict(dataset=data.name, source=data.source, image_shape=[c, h, w], num_classes=data.num_classes,
                classes=list(data.classes), mean=mean, std=std, crop_pad=crop, hflip=hflip, train_images=len(train_ds),
                val_images=len(val_ds) if len(va_idx) else 0, test_images=len(test_ds),
                val_is_test=not len(va_idx))
    if info["val_is_test"]:
        log0(d, "warning: val_fraction=0: validating on the test set (the final test accuracy is then optimistic)")
    return train_ds, val_ds, test_ds, info


def run_eval_only(cfg: Dict[str, Any], spec: str, d: Dist, device: torch.device) -> int:
    path = find_checkpoint(spec, cfg.get("run_dir"), cfg["out_dir"], "best.pt")
    ck = load_checkpoint(path)
    ccfg = dict(ck["config"])
    for k in ("dataset", "data_dir", "eval_batch_size", "backend", "precision", "threads", "workers"):
        if k in cfg.get("_explicit", ()):
            ccfg[k] = cfg[k]
    _, val_ds, test_ds, info = prepare(ccfg, d, device)
    model = build_model(ccfg, info["image_shape"][0], info["image_shape"][1], info["num_classes"]).to(device)
    model.load_state_dict(ck["model"])
    amp = amp_dtype(ccfg, device)
    with flashvit.use_backend(ccfg["backend"]):
        vl, va = evaluate(model, val_ds, d, device, ccfg["eval_batch_size"], amp)
        tl, ta = evaluate(model, test_ds, d, device, ccfg["eval_batch_size"], amp)
    log0(d, f"{path} (epoch {ck.get('epoch')}): validation accuracy {va:.2f}% loss {vl:.4f}; "
            f"test accuracy {ta:.2f}% loss {tl:.4f} on {len(test_ds)} {info['dataset']} images")
    return 0


def train(cfg: Dict[str, Any], d: Dist, device: torch.device) -> int:
    resume_path = None
    if cfg.get("_resume") is not None:
        resume_path = find_checkpoint(cfg["_resume"], cfg.get("run_dir"), cfg["out_dir"], "last.pt")
        ck = load_checkpoint(resume_path)
        explicit = cfg.get("_explicit", set())
        saved = dict(ck["config"])
        # A resumed run keeps its settings; only these may change (e.g. more epochs, another machine).
        for k in ("epochs", "max_steps", "progress", "threads", "workers", "backend", "compile", "compile_mode",
                  "cuda_graph", "mlp_recompute", "data_dir", "eval_batch_size", "device"):
            if k in explicit:
                saved[k] = cfg[k]
        saved["run_dir"] = os.path.dirname(os.path.abspath(resume_path))
        cfg = dict(saved, _explicit=explicit)
    else:
        ck = None
    train_ds, val_ds, test_ds, info = prepare(cfg, d, device)
    c, h, _ = info["image_shape"]
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg, c, h, info["num_classes"]).to(device)
    # fine-tuning: the file's weights first (a resumed run has its own in last.pt)
    init_note = init_weights(model, cfg["init_from"]) if ck is None and cfg.get("init_from") else ""
    amp = amp_dtype(cfg, device)
    graphed = bool(cfg.get("cuda_graph", False))  # (absent from checkpoints saved before it existed)
    why = cuda_graph_refusal(cfg, d, device, amp) if graphed else ""
    if why:
        raise ConfigError(f"--cuda-graph {why}")
    # Same initial weights everywhere (DDP also broadcasts rank 0's); a different augmentation stream per rank.
    torch.manual_seed(cfg["seed"] + 7919 * d.rank)

    # Run directory: created only now that data, model and settings are known to be good.
    if cfg["run_dir"] is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg["run_dir"] = os.path.join(cfg["out_dir"], f"{info['dataset']}-{stamp}")
    run_dir = cfg["run_dir"]
    best_path = cfg["best_path"] or os.path.join(run_dir, "best.pt")
    log_path = cfg["log_path"] or os.path.join(run_dir, "log.json")
    last_path = os.path.join(run_dir, "last.pt")
    public_cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if ck is None and os.path.exists(last_path):
        raise ConfigError(f"{run_dir} already holds a run: use --resume {run_dir}, or another --run-dir")

    workers = cfg["workers"] if cfg["workers"] is not None else (min(4, max(1, cpu_count() // d.local_world))
                                                                  if device.type == "cuda" else 0)
    sampler = DistributedSampler(train_ds, d.world, d.rank, shuffle=True, seed=cfg["seed"], drop_last=True) \
        if d.enabled else None
    loader = DataLoader(train_ds, batch_size=cfg["batch_size"], shuffle=sampler is None, sampler=sampler,
                        drop_last=True, num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0, collate_fn=collate_batch)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ConfigError(f"batch size {cfg['batch_size']} x {d.world} processes exceeds the "
                          f"{len(train_ds)} training images")
    total_steps = cfg["epochs"] * steps_per_epoch
    if cfg["max_steps"]:
        total_steps = min(total_steps, cfg["max_steps"])
    warmup = min(total_steps, max(1, round(cfg["warmup_epochs"] * steps_per_epoch)))
    optimizer = torch.optim.AdamW(param_groups(model, cfg["weight_decay"]), lr=cfg["lr"],
                                  fused=device.type == "cuda")
    min_ratio = cfg["min_lr"] / cfg["lr"] if cfg["lr"] > 0 else 0.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total_steps, min_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    history: List[Dict[str, Any]] = []
    start_epoch, step, best_acc, best_epoch = 0, 0, -1.0, 0
    if ck is not None:
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        start_epoch, step = ck["epoch"], ck["step"]
        best_acc, best_epoch, history = ck["best_val_acc"], ck["best_epoch"], list(ck["history"])
        rng = ck["rng"]
        torch.set_rng_state(rng["cpu"])
        if device.type == "cuda" and rng.get("cuda") is not None and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if d.enabled and "rank_rng" in ck:  # each rank's own stream, when the world size is unchanged
            per_rank = ck["rank_rng"]
            if len(per_rank) == d.world:
                torch.set_rng_state(per_rank[d.rank])
        log0(d, f"resuming {resume_path}: epoch {start_epoch} done, step {step}, best val acc {best_acc:.2f}%")

    net: torch.nn.Module = model
    if d.enabled:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    eval_net = model  # shards differ in size between ranks: evaluate without DDP's collectives
    if cfg["compile"]:
        mode = cfg.get("compile_mode", "default")  # (absent from checkpoints saved before it existed)
        mode = None if mode == "default" else mode
        net = torch.compile(net, mode=mode)
        eval_net = net if not d.enabled else torch.compile(model, mode=mode)

    nparams = sum(p.numel() for p in model.parameters())
    log0(d, f"flashvit {flashvit.__version__} | {d.world} x {device} | profile {cfg['profile']} | "
            f"backend {cfg['backend']} | precision {str(amp).replace('torch.', '') if amp else 'fp32'} | "
            f"threads {torch.get_num_threads()}")
    log0(d, f"data: {info['dataset']} {info['image_shape']} from {info['source']}: {info['train_images']} train / "
            f"{info['val_images']} val / {info['test_images']} test; crop pad {info['crop_pad']}, "
            f"flip {info['hflip']}")
    log0(d, f"model: {cfg['model']} {dims_text(model, cfg)} ({nparams / 1e6:.3f} M params); {cfg['epochs']} epochs x "
            f"{steps_per_epoch} steps of {cfg['batch_size']}{' x ' + str(d.world) if d.enabled else ''}; "
            f"run dir {run_dir}")
    if init_note:
        log0(d, init_note)
    report = getattr(model, "flashvit_report", None)  # a timm model: what flashvit.patch swapped in
    if report is not None:
        log0(d, str(report))
    if d.main:
        save_json(os.path.join(run_dir, "config.json"), public_cfg)

    def write_log(test: Optional[Dict[str, Any]] = None) -> None:
        metrics = {
            # The seed's fields (its "testing" was evaluation after every epoch: here the held-out validation).
            "training_losses": [e["train_loss"] for e in history],
            "testing_losses": [e["val_loss"] for e in history],
            "times_per_epoch": [e["time_s"] for e in history],
            "testing_accuracies": [e["val_acc"] for e in history],
            "epochs": history,
        }
        save_json(log_path, {"config": public_cfg, "data": info, "params": nparams, "world_size": d.world,
                             "device": str(device), "metrics": metrics, "best_val_acc": best_acc,
                             "best_epoch": best_epoch, "test": test})

    def fwd_bwd(x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """--cuda-graph's captured step: forward, loss, backward, clipping (no scaler: fp16 is refused). The
        autocast cache is off: a cast cached outside the capture would be stale inside it."""
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None, cache_enabled=False):
            out = net(x)
            loss = F.cross_entropy(out.float(), y, label_smoothing=cfg["label_smoothing"])
        loss.backward()
        if cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        return out, loss

    captured: Optional[StepGraph] = None  # --cuda-graph: the step's graph, captured at the first batch
    bar_enabled = cfg["progress"] and d.main
    stop = step >= total_steps
    epoch = start_epoch
    # (mlp_recompute: absent from checkpoints saved before it existed)
    with flashvit.use_backend(cfg["backend"]), flashvit.use_mlp_recompute(cfg.get("mlp_recompute", "none")):
        while epoch < cfg["epochs"] and not stop:
            net.train()
            if sampler is not None:
                sampler.set_epoch(epoch)
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            correct = torch.zeros((), device=device, dtype=torch.float64)
            seen = 0
            bar = None
            if bar_enabled and tqdm is not None:  # disable=None: no bar when stderr is not a terminal
                bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg['epochs']}", leave=False,
                           dynamic_ncols=True, file=sys.stderr, disable=None)
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if graphed:  # every batch has the same shape (drop_last)
                    if captured is None:
                        captured = StepGraph(fwd_bwd, x, y, list(model.parameters()))
                    out, loss = captured(x, y)
                    optimizer.step()
                else:
                    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        out = net(x)
                        loss = F.cross_entropy(out.float(), y, label_smoothing=cfg["label_smoothing"])
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if cfg["grad_clip"] > 0:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
                    scaler.step(optimizer)
                    scaler.update()
                scheduler.step()
                step += 1
                n = y.shape[0]
                seen += n
                loss_sum += loss.detach().double() * n
                correct += (out.detach().argmax(1) == y).sum()
                if bar is not None:
                    bar.update(1)
                    if bar.n % 10 == 0 or bar.n == steps_per_epoch:
                        el = time.perf_counter() - t0
                        bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}",
                                        img_s=f"{seen * d.world / max(el, 1e-9):.0f}",
                                        lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
                if step >= total_steps:
                    stop = True
                    break
            if bar is not None:
                bar.close()
            epoch_time = time.perf_counter() - t0
            tr_loss, tr_correct, tr_seen = d.sum([loss_sum.item(), correct.item(), float(seen)], device)
            val_loss, val_acc = evaluate(eval_net, val_ds, d, device, cfg["eval_batch_size"], amp)
            epoch += 1
            rec = {"epoch": epoch, "step": step, "train_loss": tr_loss / max(tr_seen, 1),
                   "train_acc": 100.0 * tr_correct / max(tr_seen, 1), "val_loss": val_loss, "val_acc": val_acc,
                   "time_s": epoch_time, "img_per_s": tr_seen / max(epoch_time, 1e-9),
                   "lr": scheduler.get_last_lr()[0], "partial": stop and epoch < cfg["epochs"]}
            history.append(rec)
            improved = val_acc > best_acc
            if improved:
                best_acc, best_epoch = val_acc, epoch
            log0(d, f"epoch {epoch:3d}/{cfg['epochs']}  train loss {rec['train_loss']:.4f}  val loss {val_loss:.4f}  "
                    f"val acc {val_acc:6.2f}%{' *' if improved else '  '}  {epoch_time:6.1f}s  "
                    f"{rec['img_per_s']:7.0f} img/s")
            rank_rng = None
            if d.enabled:  # every rank's CPU generator, so augmentation streams resume exactly
                st = torch.get_rng_state().to(device)  # NCCL gathers CUDA tensors
                gathered = [torch.empty_like(st) for _ in range(d.world)]
                dist.all_gather(gathered, st)
                rank_rng = [g.cpu() for g in gathered]
            if d.main:
                if improved:
                    save_checkpoint(best_path, {"model": model.state_dict(), "config": public_cfg, "epoch": epoch,
                                                "val_acc": val_acc, "data": info})
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                         "step": step, "best_val_acc": best_acc, "best_epoch": best_epoch, "history": history,
                         "config": public_cfg, "data": info,
                         "rng": {"cpu": torch.get_rng_state(),
                                 "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}}
                if rank_rng is not None:
                    state["rank_rng"] = rank_rng
                save_checkpoint(last_path, state)
                write_log()
                if HAS_MPL:
                    plot_curves(history, os.path.join(run_dir, "curves.png"), f"{info['dataset']} — {cfg['model']}")

        # Final test accuracy, once, from the best-validation weights.
        d.barrier()
        if os.environ.get("FLASHVIT_DUMP_RANK_WEIGHTS"):  # test hook: each rank's final weights
            out = os.environ["FLASHVIT_DUMP_RANK_WEIGHTS"]
            os.makedirs(out, exist_ok=True)
            save_checkpoint(os.path.join(out, f"rank{d.rank}.pt"), {"model": model.state_dict()})
        if not os.path.isfile(best_path):
            raise ConfigError(f"no best checkpoint at {best_path} (no epoch finished)")
        best = load_checkpoint(best_path)
        model.load_state_dict(best["model"])
        test_loss, test_acc = evaluate(model, test_ds, d, device, cfg["eval_batch_size"], amp)
    test = {"accuracy": test_acc, "loss": test_loss, "epoch": best["epoch"], "val_acc": best["val_acc"],
            "checkpoint": best_path, "images": len(test_ds)}
    if d.main:
        write_log(test)
        if HAS_MPL:
            plot_pos_embed_similarity(model, os.path.join(run_dir, "pos_embed_similarity.png"))
        else:
            log0(d, "note: matplotlib is not installed: no PNG curves (pip install matplotlib)")
        total_time = sum(e["time_s"] for e in history)
        log0(d, f"test accuracy {test_acc:.2f}% (loss {test_loss:.4f}) on {len(test_ds)} {info['dataset']} test "
                f"images, from the best-validation checkpoint (epoch {best['epoch']}, val acc "
                f"{best['val_acc']:.2f}%); training time {total_time / 60:.1f} min; outputs in {run_dir}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    d = Dist()
    try:
        if argv[:1] == ["plot"]:
            return plot_command(argv[1:])
        ns = vars(build_parser().parse_args(argv))
        resume, eval_only = ns.pop("resume", None), ns.pop("eval_only", None)
        if resume is not None and eval_only is not None:
            raise ConfigError("--resume and --eval-only exclude each other")
        config_path = ns.pop("config", None)
        file_cfg = read_config_file(config_path) if config_path else {}
        explicit = set(ns)
        want = ns.get("device") or file_cfg.get("device") or "auto"
        cfg = resolve_config(file_cfg, ns, torch.cuda.is_available() and want != "cpu")
        cfg["_explicit"] = explicit
        cfg["_resume"] = resume
        device = pick_device(d, cfg["device"])
        threads = cfg["threads"] or default_threads(d.local_world)
        if device.type == "cpu" or cfg["threads"]:
            torch.set_num_threads(threads)
        d.init(device)
        if eval_only is not None:
            return run_eval_only(cfg, eval_only, d, device)
        return train(cfg, d, device)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last finished epoch is in last.pt (continue with --resume)", file=sys.stderr)
        return 130
    finally:
        d.close()


if __name__ == "__main__":
    sys.exit(main())

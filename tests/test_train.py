"""train.py end to end: config (incl. the seed's file), tiny runs, errors, SIGKILL + --resume, 2-process DDP."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402
from flashvit import data as fd  # noqa: E402

FMNIST = fd.DEFAULT_DATA_DIR
HAS_FMNIST = os.path.isfile(os.path.join(FMNIST, "train-images-idx3-ubyte.gz"))
# Tiny model and data so every run takes seconds on a busy 2-core CPU.
TINY = ["--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--mlp-ratio", "1", "--patch-size", "7",
        "--threads", "1", "--no-progress", "--eval-batch-size", "256", "--device", "cpu"]
SYN = ["--dataset", "synthetic", "--synthetic-train", "320", "--synthetic-test", "64", "--batch-size", "32"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _cli(args, cwd, timeout=180):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _files(path):
    return sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs)


# ---------------------------------------------------------------------------------------------
# Configuration

def test_seed_hyper_params_file_maps_to_our_keys():
    path = os.path.join(ROOT, "configs", "seed_hyper_params.json")
    with open(path) as f:
        seed = json.load(f)
    assert set(seed) == set(train.SEED_KEYS)  # the example carries every key of the seed's file
    cfg = train.resolve_config(train.read_config_file(path), {}, has_cuda=False)
    assert cfg["patch_size"] == seed["patch_size"] and cfg["embed_dim"] == seed["token_dim"]
    assert cfg["num_heads"] == seed["n_heads"] and cfg["depth"] == seed["encoder_blocks"]
    assert cfg["mlp_ratio"] * cfg["embed_dim"] == seed["mlp_dim"]
    assert cfg["pos_embed_learnable"] is seed["pos_encoding_learnable"]
    assert cfg["epochs"] == seed["n_epochs"] and cfg["lr"] == seed["lr"] and cfg["batch_size"] == seed["batch_size"]
    assert cfg["best_path"] == seed["best_path"] and cfg["log_path"] == seed["log_path"]
    m = train.build_model(cfg, 1, 28, 10)  # the seed's model: width 32, 3 blocks, 8 heads, MLP 32
    assert m.embed_dim == 32 and len(m.blocks) == 3 and m.blocks[0].attn.num_heads == 8
    assert m.blocks[0].mlp.fc1.out_features == 32 and not m.pos_embed.requires_grad


def test_cli_overrides_file_overrides_profile(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"n_epochs": 7, "lr": 0.01, "depth": 2}))
    ns = vars(train.build_parser().parse_args(["--config", str(p), "--lr", "0.5", "--no-hflip"]))
    ns.pop("config")
    cfg = train.resolve_config(train.read_config_file(str(p)), ns, has_cuda=False)
    assert (cfg["epochs"], cfg["lr"], cfg["depth"], cfg["hflip"]) == (7, 0.5, 2, False)
    assert cfg["embed_dim"] == train.COMMON["embed_dim"] and cfg["profile"] == "cpu"
    gpu = train.resolve_config({}, {}, has_cuda=True)
    assert gpu["profile"] == "gpu" and gpu["embed_dim"] == train.PROFILES["gpu"]["embed_dim"]
    assert train.resolve_config({}, {"profile": "cpu"}, has_cuda=True)["profile"] == "cpu"
    ns = {k: v for k, v in vars(train.build_parser().parse_args(["--compile", "--compile-mode", "reduce-overhead"]))
          .items() if v is not None and k != "config"}
    cfg = train.resolve_config({}, ns, has_cuda=True)
    assert (cfg["compile"], cfg["compile_mode"]) == (True, "reduce-overhead")
    assert train.resolve_config({}, {}, has_cuda=True)["compile_mode"] == "default"
    ns = vars(train.build_parser().parse_args(["--cuda-graph"]))
    assert train.resolve_config({}, {k: v for k, v in ns.items() if v is not None and k != "config"},
                                has_cuda=True)["cuda_graph"] is True


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".json")))
def test_shipped_configs_are_valid(name):
    cfg = train.resolve_config(train.read_config_file(os.path.join(ROOT, "configs", name)), {}, has_cuda=False)
    train.build_model(cfg, 1, cfg["img_size"] or 28, 10)


@pytest.mark.parametrize("content,msg", [
    ("{ not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"token_dimm": 3}', "unknown key 'token_dimm'"),
    ('{"epochs": 0}', "epochs must be a positive integer"),
    ('{"lr": "fast"}', "lr must be a non-negative number"),
    ('{"model": "vit_gigantic"}', "unknown model preset 'vit_gigantic'"),
    ('{"model": "timm:vit_gigantic_nope"}', "timm has no model 'vit_gigantic_nope'"),
    ('{"model": "timm:vit_tiny_patch16_224", "pos_embed_learnable": false}', "keeps its own position embedding"),
    ('{"precision": "fp8"}', "precision must be one of"),
    ('{"compile_mode": "fastest"}', "compile_mode must be one of"),
])
def test_bad_config_is_a_config_error(tmp_path, content, msg):
    p = tmp_path / "c.json"
    p.write_text(content)
    with pytest.raises(train.ConfigError, match=msg):
        train.resolve_config(train.read_config_file(str(p)), {}, has_cuda=False)


def test_lr_schedule_warmup_then_cosine():
    f = [train.lr_factor(s, 10, 100, 0.01) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone decay after warmup
    assert train.lr_factor(100, 10, 100, 0.01) == pytest.approx(0.01)


# ---------------------------------------------------------------------------------------------
# Bad inputs: one clear error line, non-zero exit, nothing written.

def _corrupt_idx_dir(root):
    os.makedirs(root)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        fd.write_idx(os.path.join(root, name), np.zeros((4, 8, 8) if "images" in name else (4,), np.uint8))
    with open(os.path.join(root, "train-images-idx3-ubyte"), "r+b") as f:
        f.write(b"\x13\x37")


@pytest.mark.parametrize("case", ["missing-data-dir", "corrupt-idx", "unknown-preset", "bad-json", "bad-flag-value",
                                  "cuda-graph-on-cpu"])
def test_bad_inputs_one_error_line_nothing_written(tmp_path, capsys, case):
    run = tmp_path / "run"
    args = ["--run-dir", str(run), *TINY]
    if case == "missing-data-dir":
        args += ["--data-dir", str(tmp_path / "nope")]
    elif case == "corrupt-idx":
        _corrupt_idx_dir(str(tmp_path / "idx"))
        args += ["--data-dir", str(tmp_path / "idx")]
    elif case == "unknown-preset":
        args += [*SYN, "--model", "vit_nonexistent"]
    elif case == "bad-json":
        (tmp_path / "c.json").write_text('{"lr": 0.1,}')
        args += ["--config", str(tmp_path / "c.json")]
    elif case == "cuda-graph-on-cpu":
        args += [*SYN, "--device", "cpu", "--cuda-graph"]
    else:
        args += [*SYN, "--epochs", "-3"]
    before = _files(str(tmp_path))
    rc = train.main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert {"missing-data-dir": "does not exist", "corrupt-idx": "not an IDX file", "unknown-preset":
            "vit_nonexistent", "bad-json": "not valid JSON", "bad-flag-value": "epochs",
            "cuda-graph-on-cpu": "--cuda-graph needs a CUDA device"}[case] in err
    assert not run.exists() and _files(str(tmp_path)) == before


def test_cli_exit_status_and_stderr(tmp_path):
    r = _cli(["--data-dir", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "run")], cwd=str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Tiny end-to-end run (real Fashion-MNIST files when installed, else synthetic).

def _tiny_fashion_dir(root, n_train=480, n_test=200):
    os.makedirs(root)
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = fd.read_idx(os.path.join(FMNIST, f"{split}-images-idx3-ubyte.gz"))[:n]
        y = fd.read_idx(os.path.join(FMNIST, f"{split}-labels-idx1-ubyte.gz"))[:n]
        fd.write_idx(os.path.join(root, f"{split}-images-idx3-ubyte.gz"), x)
        fd.write_idx(os.path.join(root, f"{split}-labels-idx1-ubyte.gz"), y)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    if HAS_FMNIST:
        _tiny_fashion_dir(str(base / "fashion-mnist"))
        data = ["--data-dir", str(base / "fashion-mnist")]
    else:
        data = SYN[:2]
    run = base / "run"
    # Small enough for seconds, big enough to learn: ~60% test accuracy on 480 images (chance 10%).
    args = [*data, *TINY, "--run-dir", str(run), "--embed-dim", "64", "--depth", "2", "--num-heads", "4",
            "--mlp-ratio", "2", "--epochs", "5", "--batch-size", "16", "--lr", "3e-3", "--warmup-epochs", "0.5",
            "--crop-pad", "0", "--no-hflip"]
    return run, *_inproc(args)


def _inproc(args):
    """train.main in this process (saves a Python + torch start-up); returns (result, seconds)."""
    out, err = io.StringIO(), io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = train.main(args)
    return types.SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue()), time.time() - t0


class _EagerStepGraph:
    """train.StepGraph's stand-in on CPU with its gradient semantics: the first call allocates the gradients
    (None before it), later calls overwrite them as a replay does; a gradient dropped in between fails."""

    def __init__(self, fn, x, y, params):
        self.fn, self.params, self.calls = fn, params, 0
        for p in params:
            p.grad = None

    def __call__(self, x, y):
        if self.calls:
            for p in self.params:
                assert p.grad is not None, "a gradient was set to None between replays"
                p.grad.zero_()
        self.calls += 1
        return self.fn(x, y)


def test_cuda_graph_steps_train_as_eager_steps_do(tmp_path, monkeypatch):
    """--cuda-graph's loop (the captured forward + backward + clipping, the optimizer and the schedule outside)
    on CPU through an eager stand-in of the graph: the same losses, accuracies and weights as the plain loop."""
    args = [*SYN, *TINY, "--epochs", "2", "--grad-clip", "0.5"]
    plain = _inproc([*args, "--run-dir", str(tmp_path / "plain")])[0]
    monkeypatch.setattr(train, "StepGraph", _EagerStepGraph)
    monkeypatch.setattr(train, "cuda_graph_refusal", lambda *a: "")
    graphed = _inproc([*args, "--run-dir", str(tmp_path / "graph"), "--cuda-graph"])[0]
    assert plain.returncode == 0 and graphed.returncode == 0, graphed.stderr
    logs = [json.loads((tmp_path / r / "log.json").read_text()) for r in ("plain", "graph")]
    assert logs[1]["config"]["cuda_graph"] is True
    for k in ("training_losses", "testing_losses", "testing_accuracies"):
        assert logs[0]["metrics"][k] == logs[1]["metrics"][k], k
    weights = [torch.load(tmp_path / r / "last.pt", weights_only=True)["model"] for r in ("plain", "graph")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="forces the Triton kernels: needs a GPU or the Triton interpreter")
def test_mlp_recompute_trains_as_the_default_does(tmp_path, monkeypatch):
    """--mlp-recompute act: the MLPs' backward rebuilds h = GELU(z) (the pass runs, once an MLP a step) and the
    run's losses and weights are the default's bit for bit (fp32: h is rebuilt from the same z)."""
    L = importlib.import_module("flashvit.kernels.linear")
    passes = []
    act_op = L._activation_op
    monkeypatch.setattr(L, "_activation_op", lambda *a: passes.append(1) or act_op(*a))
    args = [*SYN, *TINY, "--epochs", "1", "--max-steps", "3", "--backend", "triton", "--synthetic-train", "160"]
    plain = _inproc([*args, "--run-dir", str(tmp_path / "plain")])[0]
    assert plain.returncode == 0 and not passes, plain.stderr
    rec = _inproc([*args, "--run-dir", str(tmp_path / "rec"), "--mlp-recompute", "act"])[0]
    assert rec.returncode == 0, rec.stderr
    assert len(passes) == 3  # one MLP (depth 1), three steps
    logs = [json.loads((tmp_path / r / "log.json").read_text()) for r in ("plain", "rec")]
    assert logs[1]["config"]["mlp_recompute"] == "act" and logs[0]["config"]["mlp_recompute"] == "none"
    assert logs[0]["metrics"]["training_losses"] == logs[1]["metrics"]["training_losses"]
    weights = [torch.load(tmp_path / r / "last.pt", weights_only=True)["model"] for r in ("plain", "rec")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="emulates CUDA's 'auto' in the Triton interpreter (CPU); on a GPU the real path trains in "
                           "test_gpu_smoke (bench/gpu_check.sh)")
def test_main_job_trains_through_the_one_node_block(tmp_path, monkeypatch):
    """The GPU's default path, emulated on CPU (kernels/_dispatch.emulate_cuda_auto): train.py's blocks train as
    one autograd node each (kernels/block.py) and follow the run with the blocks per layer (same kernels, the
    linears' gradients formed in another order)."""
    D = importlib.import_module("flashvit.kernels._dispatch")
    BK = importlib.import_module("flashvit.kernels.block")
    calls = []
    real = BK.BlockFn.apply
    monkeypatch.setattr(BK.BlockFn, "apply", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(D, "_cuda_auto", [True])
    args = [*SYN, *TINY, "--epochs", "1", "--max-steps", "3", "--backend", "auto", "--synthetic-train", "160"]
    one = _inproc([*args, "--run-dir", str(tmp_path / "one")])[0]
    assert one.returncode == 0, one.stderr
    assert len(calls) == 3  # depth 1, three steps
    with BK.use_fused_block(False):
        per_layer = _inproc([*args, "--run-dir", str(tmp_path / "per-layer")])[0]
    assert per_layer.returncode == 0 and len(calls) == 3, per_layer.stderr
    logs = [json.loads((tmp_path / r / "log.json").read_text())["metrics"]["training_losses"]
            for r in ("one", "per-layer")]
    assert len(logs[0]) == len(logs[1]) > 0
    torch.testing.assert_close(torch.tensor(logs[0]), torch.tensor(logs[1]), rtol=1e-4, atol=1e-5)


def test_evaluate_runs_without_autograd():
    """evaluate builds no autograd graph (its outputs need no gradient: no activations kept)."""
    seen = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    model.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    ds = fd.ImageTensorDataset(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), torch.zeros(5, dtype=torch.long),
                               [0.5], [0.5])
    loss, acc = train.evaluate(model, ds, train.Dist(), torch.device("cpu"), 2, None)
    assert seen == [False] * 3 and 0.0 <= acc <= 100.0


def test_tiny_end_to_end_run(tiny_run):
    run, proc, seconds = tiny_run
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(run)) == ["best.pt", "config.json", "curves.png", "last.pt", "log.json",
                                       "pos_embed_similarity.png"]
    log = json.loads((run / "log.json").read_text())
    m = log["metrics"]
    for k in ("training_losses", "testing_losses", "times_per_epoch", "testing_accuracies"):  # the seed's fields
        assert len(m[k]) == 5
    assert m["training_losses"][-1] < m["training_losses"][0]  # it learns
    test = log["test"]
    assert test["epoch"] == log["best_epoch"] and test["val_acc"] == max(m["testing_accuracies"])
    assert test["accuracy"] > 35.0  # chance is 10%
    assert log["data"]["val_images"] > 0 and not log["data"]["val_is_test"]
    assert proc.stdout.count("test accuracy") == 1 and f"test accuracy {test['accuracy']:.2f}%" in proc.stdout
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["embed_dim"] == 64 and cfg["run_dir"] == str(run) and cfg["device"] == "cpu"
    with open(run / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]
    assert seconds < 60, f"tiny run took {seconds:.0f}s"  # in this process: start-up not counted


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "vit_small_patch16_dinov3"])
def test_timm_model_trains_with_flashvit_patched_in(tmp_path, name):
    """--model timm:NAME: timm's architecture at the run's settings, flashvit.patch applied (the report in the
    log), trained, checkpointed with timm's own state_dict names, and evaluated again from the checkpoint."""
    pytest.importorskip("timm")
    run = tmp_path / "run"
    proc, _ = _inproc([*SYN, *TINY, "--model", f"timm:{name}", "--epochs", "4", "--lr", "3e-3",
                       "--run-dir", str(run)])
    assert proc.returncode == 0, proc.stderr
    assert "flashvit.patch: replaced" in proc.stdout and "1 x EvaAttention" in proc.stdout, proc.stdout
    log = json.loads((run / "log.json").read_text())
    losses = log["metrics"]["training_losses"]
    assert losses[-1] < losses[0], losses
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    import timm

    plain = timm.create_model(name, pretrained=False, img_size=28, in_chans=1, num_classes=10, patch_size=7,
                              embed_dim=32, depth=1, num_heads=2, mlp_ratio=1.0, drop_path_rate=0.0)
    plain.load_state_dict(best["model"])  # strict: the patched model saved timm's names and shapes
    rc = train.main(["--eval-only", str(run), "--threads", "1", "--device", "cpu"])
    assert rc == 0


def test_init_from_sets_model_dims_and_keeps_given_ones():
    """--init-from: the model keeps its own dimensions (model_dims 'model'), except those given explicitly."""
    base = train.resolve_config({}, {"model": "timm:vit_tiny_patch16_224", "init_from": "w.pt", "depth": 3}, False)
    assert base["model_dims"] == "model" and base["model_kwargs"] == {"depth": 3}
    plain = train.resolve_config({}, {"model": "timm:vit_tiny_patch16_224", "depth": 3}, False)
    assert plain["model_dims"] == "settings" and plain["model_kwargs"] == {}
    seed = train.resolve_config({"mlp_dim": 64, "embed_dim": 32, "model_dims": "model"}, {}, False)
    assert seed["model_kwargs"] == {"embed_dim": 32, "mlp_ratio": 2.0}
    with pytest.raises(train.ConfigError, match="needs embed_dim"):
        train.resolve_config({"mlp_dim": 64, "model_dims": "model"}, {}, False)
    with pytest.raises(train.ConfigError, match="model_dims must be"):
        train.resolve_config({"model_dims": "mine"}, {}, False)


@pytest.mark.parametrize("kind", ["timm", "flashvit"])
def test_init_from_loads_pretrained_weights(tmp_path, kind):
    """A state dict saved from an RGB model with 10 classes at another image size, loaded for 1-channel images
    and 5 classes: every tensor that fits is the file's, the patch conv summed over the colour channels (timm's
    rule), the position embedding resampled to the new grid, the head left as built."""
    if kind == "timm":
        timm = pytest.importorskip("timm")
        name, dims = "timm:vit_small_patch16_dinov3", dict(patch_size=8, embed_dim=32, depth=1, num_heads=2)
        src = timm.create_model(name[5:], pretrained=False, img_size=32, num_classes=10, **dims)
    else:
        name, dims = "vit_tiny_patch16_224", dict(patch_size=8, embed_dim=32, depth=1, num_heads=2)
        src = train.flashvit.create_model(name, img_size=32, num_classes=10, **dims)
    path = tmp_path / "w.pt"
    torch.save({"state_dict": src.state_dict()}, path)
    cfg = train.resolve_config({}, {"model": name, "init_from": str(path), **dims}, False)
    model = train.build_model(cfg, 1, 40, 5)
    note = train.init_weights(model, str(path))
    assert "head.weight" in note and "other shape, left as built" in note, note
    want = src.state_dict()
    got = model.state_dict()
    conv = "patch_embed.proj.weight"
    torch.testing.assert_close(got[conv], want[conv].sum(1, keepdim=True))
    for k, v in got.items():
        if k in want and k not in (conv, "pos_embed") and not k.startswith("head."):
            assert torch.equal(v, want[k]), k
    if "pos_embed" in want and want["pos_embed"] is not None:
        assert got["pos_embed"].shape != want["pos_embed"].shape  # 4x4 -> 5x5 grid, resampled
    with pytest.raises(train.ConfigError, match="file not found"):
        train.init_weights(model, str(tmp_path / "nope.pt"))
    torch.save({"a": 1}, tmp_path / "bad.pt")
    with pytest.raises(train.ConfigError, match="no state dict of tensors"):
        train.init_weights(model, str(tmp_path / "bad.pt"))
    torch.save({"other.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(train.ConfigError, match="none of its"):
        train.init_weights(model, str(tmp_path / "other.pt"))


def test_init_from_end_to_end(tmp_path):
    """train.py --init-from FILE: the load is logged, the run trains and writes its checkpoints."""
    timm = pytest.importorskip("timm")
    src = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, patch_size=7, embed_dim=32,
                            depth=1, num_heads=2, mlp_ratio=1.0, num_classes=10, in_chans=1)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    run = tmp_path / "run"
    proc, _ = _inproc([*SYN, *TINY, "--model", "timm:eva02_tiny_patch14_224", "--init-from", str(tmp_path / "w.pt"),
                       "--epochs", "1", "--run-dir", str(run)])
    assert proc.returncode == 0, proc.stderr
    assert f"init from {tmp_path / 'w.pt'}:" in proc.stdout and "(as built)" in proc.stdout, proc.stdout
    assert json.loads((run / "config.json").read_text())["model_dims"] == "model"
    rc = train.main(["--eval-only", str(run), "--threads", "1", "--device", "cpu"])
    assert rc == 0


def test_checkpoints_load_weights_only(tiny_run):
    run, proc, _ = tiny_run
    assert proc.returncode == 0, proc.stderr
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step", "history", "config"} <= set(last)
    assert last["epoch"] == 5 and best["epoch"] == json.loads((run / "log.json").read_text())["best_epoch"]
    cfg = best["config"]
    model = train.build_model(cfg, 1, 28, 10)
    model.load_state_dict(best["model"])  # strict: the names and shapes match
    # A checkpoint carrying an arbitrary object is refused, never unpickled.
    evil = run.parent / "evil.pt"
    torch.save({"model": {}, "config": {}, "payload": _Evil()}, evil)
    with pytest.raises(train.ConfigError, match="cannot load checkpoint"):
        train.load_checkpoint(str(evil))
    # A truncated (corrupt) checkpoint is a clear error too.
    broken = run.parent / "broken.pt"
    broken.write_bytes((run / "last.pt").read_bytes()[:100])
    with pytest.raises(train.ConfigError, match="cannot load checkpoint"):
        train.load_checkpoint(str(broken))


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_eval_only_reproduces_test_accuracy(tiny_run, capsys):
    run, proc, _ = tiny_run
    assert proc.returncode == 0, proc.stderr
    rc = train.main(["--eval-only", str(run), "--threads", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    acc = json.loads((run / "log.json").read_text())["test"]["accuracy"]
    assert rc == 0 and f"test accuracy {acc:.2f}%" in out


def test_plot_compares_runs_and_seed_logs(tiny_run, tmp_path, capsys):
    run, proc, _ = tiny_run
    seed_log = tmp_path / "seed.json"  # the seed's log format
    seed_log.write_text(json.dumps({"config": {}, "metrics": {"training_losses": [1.0, 0.5], "testing_losses": [0.9, 0.6],
                                                              "times_per_epoch": [1, 1], "testing_accuracies": [70, 80]}}))
    out = tmp_path / "cmp.png"
    assert train.main(["plot", str(run), str(seed_log), "-o", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert train.main(["plot", str(tmp_path / "none"), "-o", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()


def test_existing_run_dir_needs_resume(tiny_run, capsys):
    run, proc, _ = tiny_run
    before = (run / "last.pt").stat().st_mtime_ns
    assert train.main([*SYN, *TINY, "--run-dir", str(run)]) == 2
    assert "--resume" in capsys.readouterr().err and (run / "last.pt").stat().st_mtime_ns == before


# ---------------------------------------------------------------------------------------------
# SIGKILL mid-run, then --resume: continues from `last` and ends exactly where an uninterrupted run ends.

def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    args = [*SYN, *TINY, "--epochs", "6", "--synthetic-train", "480"]
    ref, _ = _inproc([*args, "--run-dir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr

    run = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args, "--run-dir", str(run)],
                         cwd=str(tmp_path), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "last.pt").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)  # somewhere in epoch 2 (or while it saves epoch 1)
    p.communicate()
    assert p.returncode == -signal.SIGKILL
    done = torch.load(run / "last.pt", weights_only=True)["epoch"]
    assert 1 <= done < 6, "the run finished before it could be killed"

    r, _ = _inproc(["--resume", str(run), "--threads", "1", "--no-progress", "--device", "cpu"])
    assert r.returncode == 0, r.stderr
    assert f"epoch {done} done" in r.stdout
    a = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    b = torch.load(run / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    la, lb = (json.loads((d / "log.json").read_text()) for d in (tmp_path / "ref", run))
    assert la["metrics"]["testing_accuracies"] == lb["metrics"]["testing_accuracies"]
    assert la["test"]["accuracy"] == lb["test"]["accuracy"]


# ---------------------------------------------------------------------------------------------
# torchrun: 2 processes, gloo on CPU, DistributedDataParallel.

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo_identical_weights(tmp_path):
    run, dump = tmp_path / "run", tmp_path / "ranks"
    env = dict(_env(), FLASHVIT_DUMP_RANK_WEIGHTS=str(dump))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={_free_port()}", os.path.join(ROOT, "train.py"), *SYN, *TINY, "--epochs", "2",
           "--run-dir", str(run)]
    p = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("test accuracy") == 1  # rank 0 logs
    r0 = torch.load(dump / "rank0.pt", weights_only=True)["model"]
    r1 = torch.load(dump / "rank1.pt", weights_only=True)["model"]
    last = torch.load(run / "last.pt", weights_only=True)
    torch.manual_seed(0)
    init = train.build_model(last["config"], 1, 28, 10).state_dict()
    changed = 0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks differ in {k}"
        assert torch.equal(r0[k], last["model"][k])
        changed += not torch.equal(r0[k], init[k])
    assert changed > len(r0) // 2  # it trained
    log = json.loads((run / "log.json").read_text())
    assert log["world_size"] == 2
    # Each rank saw its own half of the data: 288 training images / (32 x 2) = 4 steps per epoch.
    assert [e["step"] for e in log["metrics"]["epochs"]] == [4, 8]


# ---------------------------------------------------------------------------------------------
# GPU (bench/gpu_check.sh): bf16 autocast with the Triton kernels, fp16 + grad scaler, torch.compile.

@pytest.mark.gpu
@pytest.mark.parametrize("extra", [["--backend", "triton", "--precision", "bf16"],
                                   ["--backend", "auto", "--precision", "fp16"],
                                   ["--backend", "torch", "--precision", "bf16", "--compile"],
                                   ["--backend", "auto", "--precision", "bf16", "--compile", "--compile-mode",
                                    "reduce-overhead"],
                                   ["--backend", "auto", "--precision", "bf16", "--cuda-graph"],
                                   ["--backend", "triton", "--precision", "fp32", "--cuda-graph", "--drop-path-rate",
                                    "0.1"],
                                   ["--backend", "auto", "--precision", "bf16", "--model",
                                    "timm:vit_small_patch16_dinov3"]])
def test_gpu_smoke(tmp_path, extra):
    # Synthetic classes are fixed pixel templates: random crops and flips would scramble them (the GPU profile's
    # augmentation left ~15% test accuracy after these 3 epochs in a CPU run), so none; 96 steps of 64.
    r = _cli([*SYN, "--embed-dim", "64", "--depth", "2", "--num-heads", "4", "--no-progress", "--epochs", "3",
              "--synthetic-train", "2048", "--run-dir", str(tmp_path / "run"), "--workers", "2", "--crop-pad", "0",
              "--no-hflip", "--batch-size", "64", "--lr", "2e-3", "--warmup-epochs", "0.5", *extra],
             cwd=str(tmp_path), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log["device"].startswith("cuda")
    assert log["test"]["accuracy"] > 50.0, log["metrics"]["testing_accuracies"]


@pytest.mark.gpu
def test_step_graph_replays_give_each_batch_its_gradients_gpu():
    """StepGraph on a GPU: each call's batch goes through the captured step; loss, output and gradients equal
    an eager step's on that batch, and the gradients stay the same tensors between calls."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).cuda()
    params = list(model.parameters())

    def fn(x, y):
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        loss.backward()
        return out, loss

    batches = [(torch.randn(32, 8, device="cuda"), torch.randint(0, 4, (32,), device="cuda")) for _ in range(3)]
    step = train.StepGraph(fn, *batches[0], params)
    grads = None
    for x, y in batches:
        out, loss = step(x, y)
        if grads is None:
            grads = [p.grad for p in params]
        assert all(p.grad is g for p, g in zip(params, grads))
        want_out = model(x)
        want_loss = torch.nn.functional.cross_entropy(want_out, y)
        want = torch.autograd.grad(want_loss, params)
        torch.testing.assert_close(out, want_out)
        torch.testing.assert_close(loss, want_loss)
        for g, w in zip(grads, want):
            torch.testing.assert_close(g, w)


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(train, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert train.default_threads(1) == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (1.6, 1.6, 1.6))  # what a finished install leaves
    assert train.default_threads(1) == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))  # oversubscribed by others
    assert train.default_threads(1) == 1
    monkeypatch.setattr(train, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    assert train.default_threads(1) == 16 and train.default_threads(4) == 4

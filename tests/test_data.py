"""flashvit.data: the IDX reader, the other offline sources, the digits fallback and the augmentation."""

from __future__ import annotations

import gzip
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from flashvit import data as fd

FMNIST = fd.DEFAULT_DATA_DIR


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("dtype,shape,gz", [
    (np.uint8, (5, 7, 3), True), (np.uint8, (11,), False), (np.int32, (3, 4), True), (np.float32, (2, 3, 5), False),
    (np.int16, (1, 1, 1, 2), True), (np.float64, (4,), True), (np.int8, (9, 2), False),
])
def test_idx_round_trip(tmp_path, dtype, shape, gz):
    arr = (_rng(sum(shape)).standard_normal(shape) * 50).astype(dtype)
    path = str(tmp_path / ("a.idx" + (".gz" if gz else "")))
    fd.write_idx(path, arr)
    out = fd.read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)
    with open(path, "rb") as f:
        assert (f.read(2) == b"\x1f\x8b") == gz


def _idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 8, arr.ndim]) + np.array(arr.shape, ">u4").tobytes() + arr.astype(np.uint8).tobytes()


@pytest.mark.parametrize("mutate,msg", [
    (lambda b: b"\x08\x03" + b[2:], "bad header"),           # magic must start with two zero bytes
    (lambda b: b[:2] + b"\x42" + b[3:], "bad header"),       # unknown type code
    (lambda b: b[:3] + b"\x00" + b[4:], "bad header"),       # zero dimensions
    (lambda b: b[:-1], "but the file has"),                  # data shorter than the header says
    (lambda b: b + b"\x00", "but the file has"),             # trailing bytes
    (lambda b: b[:6], "truncated IDX header"),
    (lambda b: b"", "bad header"),
])
def test_idx_corrupt_header(tmp_path, mutate, msg):
    good = _idx_bytes(_rng(1).integers(0, 255, (3, 4, 5)))
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(mutate(good))
    with pytest.raises(fd.DataError, match=msg) as e:
        fd.read_idx(str(path))
    assert str(path) in str(e.value)


def test_idx_corrupt_gzip(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(_idx_bytes(np.zeros((2, 2), np.uint8)))[:-9])
    with pytest.raises(fd.DataError, match="cannot read"):
        fd.read_idx(str(path))


def _write_idx_dir(root, n_train=30, n_test=10, size=8, gz=True, seed=0):
    r = _rng(seed)
    os.makedirs(root, exist_ok=True)
    parts = {"train-images-idx3-ubyte": r.integers(0, 256, (n_train, size, size)).astype(np.uint8),
             "train-labels-idx1-ubyte": r.integers(0, 10, n_train).astype(np.uint8),
             "t10k-images-idx3-ubyte": r.integers(0, 256, (n_test, size, size)).astype(np.uint8),
             "t10k-labels-idx1-ubyte": r.integers(0, 10, n_test).astype(np.uint8)}
    parts["train-labels-idx1-ubyte"][:10] = np.arange(10)
    for name, arr in parts.items():
        fd.write_idx(os.path.join(root, name + (".gz" if gz else "")), arr)
    return parts


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_dir(tmp_path, gz):
    parts = _write_idx_dir(str(tmp_path / "mnist"), gz=gz)
    d = fd.load_idx_dir(str(tmp_path / "mnist"))
    assert d.train_x.shape == (30, 1, 8, 8) and d.test_x.shape == (10, 1, 8, 8)
    assert d.train_x.dtype == torch.uint8 and d.train_y.dtype == torch.int64
    np.testing.assert_array_equal(d.train_x[:, 0].numpy(), parts["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(d.test_y.numpy(), parts["t10k-labels-idx1-ubyte"])
    assert d.num_classes == 10 and not d.hflip and d.name == "idx"
    # The same files under a folder called fashion-mnist get its class names and flips.
    _write_idx_dir(str(tmp_path / "fashion-mnist"), gz=gz)
    f = fd.load_idx_dir(str(tmp_path / "fashion-mnist"))
    assert f.name == "fashion-mnist" and f.hflip and f.classes[0] == "T-shirt/top"


def test_load_idx_dir_errors(tmp_path):
    _write_idx_dir(str(tmp_path))
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(fd.DataError, match="missing t10k-labels-idx1-ubyte"):
        fd.load_idx_dir(str(tmp_path))
    fd.write_idx(str(tmp_path / "t10k-labels-idx1-ubyte.gz"), np.zeros(3, np.uint8))  # 10 images, 3 labels
    with pytest.raises(fd.DataError, match="10 images but 3 labels"):
        fd.load_idx_dir(str(tmp_path))
    with pytest.raises(fd.DataError, match="does not exist"):
        fd.load_data("idx", str(tmp_path / "nope"))


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_files():
    y = fd.read_idx(os.path.join(FMNIST, "t10k-labels-idx1-ubyte.gz"))
    assert y.shape == (10000,) and y.dtype == np.uint8
    assert np.bincount(y).tolist() == [1000] * 10  # the test set is balanced
    x = fd.read_idx(os.path.join(FMNIST, "t10k-images-idx3-ubyte.gz"))
    assert x.shape == (10000, 28, 28) and 60 < x.mean() < 80


def _write_cifar(root, n=6, batches=2, seed=0):
    r = _rng(seed)
    os.makedirs(root, exist_ok=True)
    out = []
    for name in [f"data_batch_{i + 1}" for i in range(batches)] + ["test_batch"]:
        d = {b"batch_label": name.encode(), b"labels": r.integers(0, 10, n).tolist(),
             b"data": r.integers(0, 256, (n, 3072)).astype(np.uint8), b"filenames": [b"x.png"] * n}
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(d, f, protocol=2)
        out.append(d)
    return out


def test_cifar10_batches(tmp_path):
    written = _write_cifar(str(tmp_path / "cifar-10-batches-py"))
    d = fd.load_data("auto", str(tmp_path))
    assert d.name == "cifar10" and d.hflip and d.num_classes == 10
    assert d.train_x.shape == (12, 3, 32, 32) and d.test_x.shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(d.train_x[0].numpy().reshape(-1), written[0][b"data"][0])
    assert d.test_y.tolist() == written[2][b"labels"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar10_refuses_arbitrary_pickle(tmp_path):
    _write_cifar(str(tmp_path))
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, f)
    with pytest.raises(fd.DataError, match="refusing to load"):
        fd.load_cifar10(str(tmp_path))


def _write_pngs(root, classes=("cat", "dog"), per=4, size=(9, 9), mode="L"):
    from PIL import Image

    r = _rng(3)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per):
            shape = size if mode == "L" else size + (3,)
            Image.fromarray(r.integers(0, 256, shape).astype(np.uint8), mode).save(os.path.join(root, c, f"{i}.png"))


def test_image_folder_split_and_resize(tmp_path):
    _write_pngs(str(tmp_path / "imgs"), per=5)
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("not an image")
    d = fd.load_data("auto", str(tmp_path / "imgs"), seed=1)
    assert d.name == "folder" and d.classes == ("cat", "dog")
    assert len(d.train_x) + len(d.test_x) == 10 and len(d.test_x) == 2
    assert d.train_x.shape[1:] == (1, 9, 9)
    d2 = fd.load_image_folder(str(tmp_path / "imgs"), img_size=16)
    assert d2.train_x.shape[1:] == (1, 16, 16)


def test_image_folder_train_test_rgb(tmp_path):
    _write_pngs(str(tmp_path / "train"), per=3, mode="RGB")
    _write_pngs(str(tmp_path / "test"), per=2, mode="RGB")
    d = fd.load_data("folder", str(tmp_path))
    assert d.train_x.shape == (6, 3, 9, 9) and d.test_x.shape == (4, 3, 9, 9)
    assert d.train_y.tolist() == [0, 0, 0, 1, 1, 1]
    os.makedirs(tmp_path / "empty")
    with pytest.raises(fd.DataError, match="found no IDX files"):
        fd.load_data("auto", str(tmp_path / "empty"))


def test_synthetic_is_deterministic_and_learnable():
    a, b = fd.make_synthetic(64, 16, 12, 3, 5, seed=7), fd.make_synthetic(64, 16, 12, 3, 5, seed=7)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.train_x.shape == (64, 3, 12, 12) and a.num_classes == 5
    # Nearest class mean classifies the test set far above chance: there is signal to learn.
    x, y = a.train_x.float().flatten(1), a.train_y
    means = torch.stack([x[y == c].mean(0) for c in range(5)])
    pred = torch.cdist(a.test_x.float().flatten(1), means).argmin(1)
    assert (pred == a.test_y).float().mean() > 0.8


def _fake_sklearn(monkeypatch, calls):
    """Simulate an installed scikit-learn (it is not a dependency) with a load_digits of 8x8 images in 0..16."""
    def load_digits():
        calls.append(1)
        r = _rng(5)
        return types.SimpleNamespace(images=r.integers(0, 17, (50, 8, 8)).astype(np.float64),
                                     target=np.arange(50) % 10)

    sk = types.ModuleType("sklearn")
    ds = types.ModuleType("sklearn.datasets")
    ds.load_digits = load_digits
    sk.datasets = ds
    monkeypatch.setitem(sys.modules, "sklearn", sk)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", ds)


def test_digits_fallback_when_default_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(fd, "DEFAULT_DATA_DIR", str(tmp_path / "missing"))
    calls, warnings = [], []
    _fake_sklearn(monkeypatch, calls)
    d = fd.load_data("auto", warn=warnings.append)
    assert calls and d.name == "digits" and d.train_x.shape[1:] == (1, 8, 8)
    assert len(d.train_x) == 40 and len(d.test_x) == 10
    assert d.train_x.max() <= 255 and d.train_x.dtype == torch.uint8
    assert len(warnings) == 1 and "apt-get install dataset-fashion-mnist" in warnings[0]
    # An explicit request for Fashion-MNIST never falls back.
    with pytest.raises(fd.DataError, match="apt-get install dataset-fashion-mnist"):
        fd.load_data("fashion-mnist")


def test_no_data_and_no_sklearn_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(fd, "DEFAULT_DATA_DIR", str(tmp_path / "missing"))
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(fd.DataError) as e:
        fd.load_data("auto", warn=lambda m: None)
    msg = str(e.value)
    assert "scikit-learn" in msg and "apt-get install dataset-fashion-mnist" in msg and "\n" not in msg


def test_split_train_val():
    tr, va = fd.split_train_val(100, 0.1, seed=3)
    assert len(va) == 10 and len(tr) == 90
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(100))
    tr2, va2 = fd.split_train_val(100, 0.1, seed=3)
    assert torch.equal(va, va2)
    assert not torch.equal(va, fd.split_train_val(100, 0.1, seed=4)[1])
    with pytest.raises(fd.DataError):
        fd.split_train_val(3, 0.1, 0)


def test_augment_is_a_shifted_window_and_flip():
    torch.manual_seed(0)
    x = torch.rand(7, 2, 5, 6)
    out = fd.augment(x, pad=2, hflip=False)
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(7):  # each output image equals one of the 25 crops of its padded input
        assert any(torch.equal(out[b], xp[b, :, i:i + 5, j:j + 6]) for i in range(5) for j in range(5))
    torch.manual_seed(1)
    f = fd.augment(x, pad=0, hflip=True)
    flipped = [torch.equal(f[b], x[b].flip(-1)) for b in range(7)]
    kept = [torch.equal(f[b], x[b]) for b in range(7)]
    assert all(a or k for a, k in zip(flipped, kept)) and any(flipped) and any(kept)


@pytest.mark.parametrize("workers", [0, 1])
def test_dataset_batches_and_normalization(workers):
    d = fd.make_synthetic(40, 8, 10, 1, 4, seed=0)
    mean, std = d.mean_std()
    ev = fd.ImageTensorDataset(d.test_x, d.test_y, mean, std)
    x, y = ev[3]
    assert x.shape == (1, 10, 10) and x.dtype == torch.float32
    torch.testing.assert_close(x, (d.test_x[3].float() / 255 - mean[0]) / std[0])
    tr = fd.ImageTensorDataset(d.train_x, d.train_y, mean, std, train=True, crop_pad=1, hflip=True)
    dl = torch.utils.data.DataLoader(tr, batch_size=16, shuffle=True, drop_last=True, num_workers=workers,
                                     collate_fn=fd.collate_batch)
    batches = list(dl)
    assert len(batches) == 2
    for bx, by in batches:
        assert bx.shape == (16, 1, 10, 10) and by.shape == (16,) and by.dtype == torch.int64
    full = torch.cat([by for _, by in batches])
    assert set(full.tolist()) <= set(d.train_y.tolist())

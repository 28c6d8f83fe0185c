"""Data for train.py: small offline readers, normalization and light augmentation. Nothing downloads.

Sources (all loaded into memory as uint8 images (N, C, H, W) plus int64 labels):
  * IDX files (MNIST / Fashion-MNIST layout, ``.gz`` or raw): our own reader, :func:`read_idx`.
    Default: Debian's ``dataset-fashion-mnist`` under /usr/share/datasets/fashion-mnist.
  * CIFAR-10 python batches (``data_batch_1..5``, ``test_batch``), unpickled with a restricted
    unpickler that only rebuilds numpy arrays.
  * An ImageFolder-style tree: ``root/<class>/*.png`` or ``root/{train,test}/<class>/*``.
  * ``synthetic``: class-dependent patterns plus noise (learnable; for smoke and throughput runs).
  * scikit-learn's ``load_digits`` (8x8) — only as a fallback when the default files are missing and
    scikit-learn happens to be installed.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = ("install Debian's package: sudo apt-get install dataset-fashion-mnist "
                "(or pass --data-dir DIR with IDX files, CIFAR-10 python batches or an image tree, "
                "or --dataset synthetic)")
DATASETS = ("auto", "fashion-mnist", "mnist", "idx", "cifar10", "folder", "synthetic", "digits")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DataError(Exception):
    """A data problem the user can fix (missing files, corrupt header); train.py prints it as one line."""


# ---------------------------------------------------------------------------------------------
# IDX: magic = 0x00 0x00 <type code> <ndim>, then ndim big-endian uint32 sizes, then the data.

_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B, np.dtype(np.int32): 0x0C,
              np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head == b"\x1f\x8b":  # gzip magic, whatever the file is called
                with gzip.GzipFile(fileobj=f) as g:
                    return g.read()
            return f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array in native byte order."""
    buf = _read_bytes(path)
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] not in _IDX_TYPES or buf[3] == 0:
        raise DataError(f"{path}: not an IDX file (bad header {buf[:4].hex() or 'empty'})")
    dtype, ndim = _IDX_TYPES[buf[2]], buf[3]
    if len(buf) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header ({ndim} dimensions announced, file has {len(buf)} bytes)")
    dims = struct.unpack(f">{ndim}I", buf[4:4 + 4 * ndim])
    count = int(np.prod(dims, dtype=np.int64))
    expected = 4 + 4 * ndim + count * dtype.itemsize
    if len(buf) != expected:
        raise DataError(f"{path}: IDX header says shape {tuple(dims)} ({expected} bytes) but the file has {len(buf)}")
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=4 + 4 * ndim).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str, arr: np.ndarray) -> None:
    """Write an array as an IDX file (gzipped when ``path`` ends in .gz); the inverse of :func:`read_idx`."""
    arr = np.asarray(arr)
    code = _IDX_CODES.get(arr.dtype.newbyteorder("="))
    if code is None or arr.ndim == 0 or arr.ndim > 255:
        raise ValueError(f"cannot store dtype {arr.dtype} / {arr.ndim} dimensions in IDX")
    payload = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload += arr.astype(_IDX_TYPES[code]).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


# ---------------------------------------------------------------------------------------------
# In-memory data set.

@dataclass
class ImageData:
    """Train and test images as uint8 (N, C, H, W) tensors with int64 labels."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: Sequence[str]
    hflip: bool = False  # horizontal flips keep the label (clothes, CIFAR), not for digits
    source: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def mean_std(self) -> Tuple[List[float], List[float]]:
        """Per-channel mean and std of the training images in [0, 1]."""
        x = self.train_x.float().div_(255).transpose(0, 1).reshape(self.train_x.shape[1], -1)
        return x.mean(1).tolist(), x.std(1).clamp_min(1e-3).tolist()


def _check(x: np.ndarray, y: np.ndarray, where: str) -> None:
    if len(x) != len(y):
        raise DataError(f"{where}: {len(x)} images but {len(y)} labels")
    if len(x) == 0:
        raise DataError(f"{where}: no images")


def _find(root: str, stem: str) -> Optional[str]:
    """MNIST-style file names vary: train-images-idx3-ubyte(.gz), train-images.idx3-ubyte, ..."""
    alts = [stem, stem.replace("-idx", ".idx")]
    for a in alts:
        for ext in ("", ".gz"):
            p = os.path.join(root, a + ext)
            if os.path.isfile(p):
                return p
    return None


def load_idx_dir(root: str, name: str = "idx") -> ImageData:
    """MNIST-layout IDX files: {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."""
    parts = {}
    for key, stem in (("train_x", "train-images-idx3-ubyte"), ("train_y", "train-labels-idx1-ubyte"),
                      ("test_x", "t10k-images-idx3-ubyte"), ("test_y", "t10k-labels-idx1-ubyte")):
        p = _find(root, stem)
        if p is None:
            raise DataError(f"{root}: missing {stem}[.gz]")
        parts[key] = read_idx(p)
    for split in ("train", "test"):
        x, y = parts[f"{split}_x"], parts[f"{split}_y"]
        if x.ndim not in (3, 4) or y.ndim != 1 or x.dtype != np.uint8:
            raise DataError(f"{root}: {split} images must be uint8 (N, H, W), labels (N,); "
                            f"got {x.dtype} {x.shape} and {y.shape}")
        _check(x, y, f"{root} ({split})")
    tx, sx = (torch.from_numpy(parts[k]) for k in ("train_x", "test_x"))
    tx = tx[:, None] if tx.dim() == 3 else tx.permute(0, 3, 1, 2).contiguous()
    sx = sx[:, None] if sx.dim() == 3 else sx.permute(0, 3, 1, 2).contiguous()
    ty, sy = (torch.from_numpy(parts[k].astype(np.int64)) for k in ("train_y", "test_y"))
    ncls = int(max(ty.max(), sy.max())) + 1
    if ty.min() < 0 or sy.min() < 0:
        raise DataError(f"{root}: negative labels")
    fashion = name == "fashion-mnist" or (name == "idx" and "fashion" in os.path.abspath(root).lower())
    classes = FASHION_MNIST_CLASSES if fashion and ncls == 10 else tuple(str(i) for i in range(ncls))
    return ImageData("fashion-mnist" if fashion else name, tx, ty, sx, sy, classes, hflip=fashion, source=root)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10's batches are pickles: rebuild dicts, lists, bytes and numpy arrays, nothing else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def _load_cifar_batch(path: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
        data = np.asarray(d[b"data"] if b"data" in d else d["data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"] if b"labels" in d else d["labels"], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: expected data of shape (N, 3072), got {data.shape}")
    _check(data, labels, path)
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root: str) -> ImageData:
    """CIFAR-10 python version: data_batch_1..5 and test_batch (root or root/cifar-10-batches-py)."""
    if os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
        root = os.path.join(root, "cifar-10-batches-py")
    train = sorted(p for p in os.listdir(root) if p.startswith("data_batch_"))
    if not train or not os.path.isfile(os.path.join(root, "test_batch")):
        raise DataError(f"{root}: no CIFAR-10 python batches (data_batch_1..5, test_batch)")
    xs, ys = zip(*(_load_cifar_batch(os.path.join(root, p)) for p in train))
    tx, ty = _load_cifar_batch(os.path.join(root, "test_batch"))
    return ImageData("cifar10", torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)),
                     torch.from_numpy(tx), torch.from_numpy(ty), CIFAR10_CLASSES, hflip=True, source=root)


def _class_dirs(root: str) -> List[str]:
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))


def _load_tree(root: str, classes: Sequence[str], size: Optional[Tuple[int, int]], mode: Optional[str]):
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        raise DataError("reading an image folder needs Pillow: pip install pillow") from None
    xs, ys = [], []
    for label, cls in enumerate(classes):
        d = os.path.join(root, cls)
        if not os.path.isdir(d):
            continue
        for fn in sorted(os.listdir(d)):
            if not fn.lower().endswith(IMAGE_EXTS):
                continue
            p = os.path.join(d, fn)
            try:
                with Image.open(p) as im:
                    if mode is None:
                        mode = "L" if im.mode in ("L", "1", "I", "I;16", "F") else "RGB"
                    im = im.convert(mode)
                    if size is None:
                        size = (im.height, im.width)
                    if (im.height, im.width) != size:
                        im = im.resize((size[1], size[0]))
                    a = np.asarray(im, dtype=np.uint8)
            except OSError as e:
                raise DataError(f"{p}: cannot read image ({e})") from None
            xs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
            ys.append(label)
    return xs, ys, size, mode


def load_image_folder(root: str, img_size: Optional[int] = None, test_fraction: float = 0.2,
                      seed: int = 0) -> ImageData:
    """``root/train/<class>/*`` (+ ``root/test`` or ``root/val``), or ``root/<class>/*`` split by ``test_fraction``.

    Images are converted to grayscale if the first one is, else RGB, and resized to ``img_size`` (default:
    the first image's size).
    """
    size = (img_size, img_size) if img_size else None
    test_dir = next((os.path.join(root, s) for s in ("test", "val") if os.path.isdir(os.path.join(root, s))), None)
    if os.path.isdir(os.path.join(root, "train")):
        classes = _class_dirs(os.path.join(root, "train"))
        xs, ys, size, mode = _load_tree(os.path.join(root, "train"), classes, size, None)
        txs, tys = ([], []) if test_dir is None else _load_tree(test_dir, classes, size, mode)[:2]
    else:
        classes = _class_dirs(root)
        xs, ys, size, mode = _load_tree(root, classes, size, None)
        txs, tys = [], []
    if not classes or not xs:
        raise DataError(f"{root}: no images found in class folders (expected root/<class>/*.png or "
                        "root/train/<class>/*.png)")
    x, y = torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.int64)
    if txs:
        sx, sy = torch.from_numpy(np.stack(txs)), torch.tensor(tys, dtype=torch.int64)
    else:  # no test split on disk: hold out a fixed fraction
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        n_test = max(1, int(round(test_fraction * len(x))))
        if n_test >= len(x):
            raise DataError(f"{root}: too few images ({len(x)}) to split off a test set")
        sx, sy, x, y = x[perm[:n_test]], y[perm[:n_test]], x[perm[n_test:]], y[perm[n_test:]]
    return ImageData("folder", x, y, sx, sy, tuple(classes), hflip=False, source=root)


def make_synthetic(n_train: int = 2048, n_test: int = 512, img_size: int = 28, in_chans: int = 1,
                   num_classes: int = 10, seed: int = 0) -> ImageData:
    """Learnable synthetic images: a fixed random template per class plus noise (smoke and throughput runs)."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(num_classes, in_chans, img_size, img_size, generator=g)

    def draw(n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = 0.6 * templates[y] + 0.4 * torch.rand(n, in_chans, img_size, img_size, generator=g)
        return (x * 255).round().to(torch.uint8), y

    (x, y), (sx, sy) = draw(n_train), draw(n_test)
    return ImageData("synthetic", x, y, sx, sy, tuple(str(i) for i in range(num_classes)), source="synthetic")


def load_digits_fallback(seed: int = 0, test_fraction: float = 0.2) -> ImageData:
    """scikit-learn's bundled 8x8 digits (1797 images, values 0..16); only if scikit-learn is installed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(f"no data: {DEFAULT_DATA_DIR} is missing and scikit-learn (whose bundled digits would "
                        f"be the fallback) is not installed; {INSTALL_HINT}") from None
    d = load_digits()
    x = torch.from_numpy((np.asarray(d.images, dtype=np.float64) * (255.0 / 16.0)).round().astype(np.uint8))[:, None]
    y = torch.from_numpy(np.asarray(d.target, dtype=np.int64))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(x)))
    te, tr = perm[:n_test], perm[n_test:]
    return ImageData("digits", x[tr], y[tr], x[te], y[te], tuple(str(i) for i in range(10)), source="sklearn")


def load_data(dataset: str = "auto", data_dir: Optional[str] = None, img_size: Optional[int] = None,
              in_chans: int = 1, num_classes: int = 10, synthetic_size: Tuple[int, int] = (2048, 512),
              seed: int = 0, warn=print) -> ImageData:
    """Resolve ``dataset`` / ``data_dir`` to an :class:`ImageData`; raises :class:`DataError` with the fix."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if dataset == "synthetic":
        return make_synthetic(synthetic_size[0], synthetic_size[1], img_size or 28, in_chans, num_classes, seed)
    if dataset == "digits":
        return load_digits_fallback(seed)
    if data_dir is None:
        if dataset in ("auto", "fashion-mnist"):
            if _find(DEFAULT_DATA_DIR, "train-images-idx3-ubyte") is None:
                if dataset == "auto":
                    warn(f"warning: {DEFAULT_DATA_DIR} not found ({INSTALL_HINT}); trying scikit-learn's "
                         "bundled 8x8 digits instead")
                    return load_digits_fallback(seed)
                raise DataError(f"{DEFAULT_DATA_DIR} not found: {INSTALL_HINT}")
            return load_idx_dir(DEFAULT_DATA_DIR, "fashion-mnist")
        raise DataError(f"--dataset {dataset} needs --data-dir DIR")
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir} does not exist")
    if dataset in ("fashion-mnist", "mnist", "idx"):
        return load_idx_dir(data_dir, dataset)
    if dataset == "cifar10":
        return load_cifar10(data_dir)
    if dataset == "folder":
        return load_image_folder(data_dir, img_size, seed=seed)
    # auto: guess from the files present
    names = set(os.listdir(data_dir))
    if _find(data_dir, "train-images-idx3-ubyte") is not None:
        return load_idx_dir(data_dir, "idx")
    if "cifar-10-batches-py" in names or "test_batch" in names:
        return load_cifar10(data_dir)
    if _class_dirs(data_dir):
        return load_image_folder(data_dir, img_size, seed=seed)
    raise DataError(f"{data_dir}: found no IDX files (train-images-idx3-ubyte[.gz] ...), CIFAR-10 python batches "
                    "or class folders of images")


def split_train_val(n: int, val_fraction: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices of a fixed held-out validation split (same for every seed-equal run, resumed or not)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * n)) if val_fraction > 0 else 0
    if n_val >= n or (val_fraction > 0 and n_val == 0):
        raise DataError(f"cannot hold out val_fraction={val_fraction} of {n} training images")
    return perm[n_val:].sort().values, perm[:n_val].sort().values


# ---------------------------------------------------------------------------------------------
# Datasets with on-the-fly normalization and augmentation, batched through __getitems__.

class ImageTensorDataset(Dataset):
    """uint8 images -> normalized float32, with random-crop (zero-pad then crop) and flip when training.

    ``__getitems__`` builds a whole batch at once (the DataLoader calls it with the batch's indices), so a
    batch costs a few tensor ops rather than one Python call per image; use :func:`collate_batch`.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 train: bool = False, crop_pad: int = 0, hflip: bool = False) -> None:
        self.x, self.y = x, y
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.train, self.crop_pad, self.hflip = train, int(crop_pad), bool(hflip)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, idx: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        idx_t = torch.as_tensor(idx, dtype=torch.int64)
        x = self.x[idx_t].float().div_(255)  # (B, C, H, W) in [0, 1]
        if self.train:
            x = augment(x, self.crop_pad, self.hflip)
        return (x - self.mean) / self.std, self.y[idx_t]


def augment(x: torch.Tensor, pad: int, hflip: bool) -> torch.Tensor:
    """Per-image random crop of a zero-padded (B, C, H, W) batch, and random horizontal flips."""
    B, C, H, W = x.shape
    if pad > 0:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (B, 1, 1))
        ox = torch.randint(0, 2 * pad + 1, (B, 1, 1))
        rows = (oy + torch.arange(H).view(1, H, 1)).expand(B, H, W)
        cols = (ox + torch.arange(W).view(1, 1, W)).expand(B, H, W)
        b = torch.arange(B).view(B, 1, 1).expand(B, H, W)
        x = xp.permute(0, 2, 3, 1)[b, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
    if hflip:
        flip = torch.rand(B) < 0.5
        x = torch.where(flip.view(B, 1, 1, 1), x.flip(3), x)
    return x.contiguous()


def collate_batch(batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """Collate for :class:`ImageTensorDataset`: batches arrive made by ``__getitems__``."""
    if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        return batch
    return torch.utils.data.default_collate(batch)

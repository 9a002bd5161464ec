"""The demo's datasets: scikit-learn's bundled digits (offline, 1797 8x8 images), or a local copy of
CIFAR-10's python batches. Images come as float32 (N, C, H, W), labels as int64."""

import pathlib
import pickle

import numpy as np

# CIFAR-10's per-channel mean and std of the training set, as the article normalizes it.
CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


class Dataset:
    def __init__(self, name, train_x, train_y, val_x, val_y):
        self.name = name
        self.train_x, self.train_y, self.val_x, self.val_y = train_x, train_y, val_x, val_y

    @property
    def shape(self):
        return self.train_x.shape[1:]


def digits(seed=0):
    """Digits scaled to [0, 1], split 80/20 (stratified by a seeded shuffle)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit('the demo needs scikit-learn: pip install "accelbn[demo]"') from None
    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = len(y) * 4 // 5
    return Dataset("digits", x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]])


def _cifar_batch(path):
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    x = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    return (x - CIFAR10_MEAN[:, None, None]) / CIFAR10_STD[:, None, None], np.asarray(batch[b"labels"], np.int64)


def cifar10(path, limit=None):
    """CIFAR-10 from ``path`` (the folder with data_batch_1..5 and test_batch), channel-normalized;
    ``limit`` keeps the first that many training and a fifth as many test images."""
    root = pathlib.Path(path)
    files = [root / f"data_batch_{i}" for i in range(1, 6)] + [root / "test_batch"]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise SystemExit(f"--path {path}: not CIFAR-10's python batches (missing {', '.join(missing)})")
    parts = [_cifar_batch(f) for f in files[:-1]]
    train_x, train_y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    val_x, val_y = _cifar_batch(files[-1])
    if limit:
        train_x, train_y, val_x, val_y = train_x[:limit], train_y[:limit], val_x[: limit // 5], val_y[: limit // 5]
    return Dataset("cifar10", train_x, train_y, val_x, val_y)


def swap_classes(labels, a=0, b=1):
    """The labels with classes ``a`` and ``b`` exchanged: the article's synthetic shift."""
    swapped = labels.copy()
    swapped[labels == a], swapped[labels == b] = b, a
    return swapped

"""Tiny synthetic dataset files in the exact real formats, for tests that must not need the real data.

Stable API, used by other test modules (`from tests.datafiles import write_mnist_idx, ...`):

    write_binarized_mnist(root, n_train=50, n_valid=10, n_test=10, gz=True, seed=0, subdir=True) -> Path
    write_mnist_idx(root, n_train=60, n_test=10, seed=0) -> Path
    sha256_table(folder) -> dict[str, str]

Both writers return `root`, the value to pass as `data.root` / the `root=` argument:

    root = write_binarized_mnist(tmp_path)
    ds = BinarizedMNIST(root, download=False, verify=False)

The synthetic files do not match the real checksums, so load them with verify=False, or monkeypatch the
loader's table with the files' own sums to exercise verification:

    monkeypatch.setattr(data.binarized_mnist, "SHA256", sha256_table(root / "binarized_mnist"))

With the defaults, MNIST's split rule (valid = the last min(10000, n // 6) training images) gives
train 50 / valid 10 / test 10, the same sizes as the binarized MNIST defaults.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np

X_DIM = 784


def write_binarized_mnist(
    root: Path,
    n_train: int = 50,
    n_valid: int = 10,
    n_test: int = 10,
    gz: bool = True,
    seed: int = 0,
    subdir: bool = True,
) -> Path:
    """Write `binarized_mnist_{train,valid,test}.amat[.gz]` into `root/binarized_mnist/` (or straight into
    `root` when subdir=False): one image per line, 784 values '0'/'1' separated by single spaces, ended by
    '\\n'; each pixel is 1 with probability 0.13. The .gz files are level-9 gzip with no name and mtime 0,
    like the real ones. Returns `root`."""
    root = Path(root)
    folder = root / "binarized_mnist" if subdir else root
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        x = (rng.random((n, X_DIM)) < 0.13).astype(np.uint8)  # [N, 784]
        text = "".join(" ".join(map(str, row)) + "\n" for row in x).encode("ascii")
        path = folder / f"binarized_mnist_{split}.amat"
        if gz:
            path.with_name(path.name + ".gz").write_bytes(gzip.compress(text, compresslevel=9, mtime=0))
        else:
            path.write_bytes(text)
    return root


def write_mnist_idx(root: Path, n_train: int = 60, n_test: int = 10, seed: int = 0) -> Path:
    """Write `root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz` in IDX format (big-endian
    header: magic 0x803, count, 28, 28 for images; magic 0x801, count for labels; then uint8 data). About
    80% of pixels are 0 and the rest are uniform grey levels 1..255, so dynamic binarization has pixels
    strictly between 0 and 1 to draw. Labels are uniform 0..9. Returns `root`."""
    root = Path(root)
    folder = root / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        grey = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)  # [N, 28, 28]
        images = np.where(rng.random((n, 28, 28)) < 0.8, 0, grey).astype(np.uint8)  # [N, 28, 28]
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)  # [N]
        idx_images = struct.pack(">iiii", 0x803, n, 28, 28) + images.tobytes()
        idx_labels = struct.pack(">ii", 0x801, n) + labels.tobytes()
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_images, mtime=0))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_labels, mtime=0))
    return root


def sha256_table(folder: Path) -> dict[str, str]:
    """{file name: sha256} of every file in `folder`, the shape of the loaders' `SHA256` tables."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).iterdir())
        if p.is_file()
    }

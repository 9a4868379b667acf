"""MNIST (LeCun, Cortes & Burges) grey-level digits, binarized either dynamically or by a threshold.

- "dynamic": every time an image is used each pixel is drawn afresh, x ~ Bernoulli(grey / 255) (the
  global torch RNG of the device, so seeding makes it reproducible). Less overfitting than a fixed sample.
- "threshold": pixel = 1 if grey > 127 (grey / 255 > 0.5), fixed once at load time.

Splits: train = the first 60,000 - n_valid training images, valid = the last n_valid of them (10,000 for
the real data), test = the 10,000 t10k images. Labels are kept in `Split.labels`.

Files: torchvision's layout, `<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz` (the
uncompressed files torchvision extracts next to them are also accepted, and files directly in `<root>`).
Missing files are downloaded from `MIRRORS` into `<root>/MNIST/raw/`. IDX format: big-endian int32 magic
(0x803 images, 0x801 labels), count (and 28, 28 for images), then uint8 data.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from data.common import (
    DOWNLOAD_ERRORS,
    HOW_TO_SET_ROOT,
    DataError,
    Dataset,
    Split,
    checksum_error,
    download,
    sha256_file,
    to_device,
)

SUBDIR = Path("MNIST") / "raw"
# Tried in order; tests point them at an unreachable address to exercise the "no network" error.
MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]
FILES = {  # role -> file name without .gz
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# sha256 of the original .gz files (shared data README; their md5 equal torchvision's) and of their
# decompressed IDX content (computed from those verified files). Tests monkeypatch this table.
SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
IMAGES_MAGIC, LABELS_MAGIC = 0x803, 0x801
BINARIZE = ("dynamic", "threshold")


class MNIST(Dataset):
    """MNIST as binary images, each split one [N, 784] uint8 tensor on `device` (grey levels for dynamic
    binarization, 0/1 for threshold), with labels.

    root: data root (see module docstring for where files are looked up).
    binarize: "dynamic" or "threshold".
    n_valid: size of the validation split cut from the end of the training images; None means
        min(10000, n_train_images // 6), i.e. 10,000 for the real 60,000 and a sixth of a tiny test file.
    download: fetch missing files from `MIRRORS` into `<root>/MNIST/raw/`.
    verify: check each file's sha256 against `SHA256`; a mismatch raises DataError.
    name: stored as `self.name` (the Hydra config passes it).
    """

    def __init__(
        self,
        root: str | Path,
        binarize: str = "dynamic",
        device: str | torch.device = "cpu",
        download: bool = True,
        verify: bool = True,
        n_valid: int | None = None,
        name: str = "mnist",
    ):
        if binarize not in BINARIZE:
            raise ValueError(f"binarize must be one of {BINARIZE}, got {binarize!r}")
        root = Path(root).expanduser().absolute()
        paths = locate(root, download=download, verify=verify)
        arrays = {role: read_idx(path, role, verify) for role, path in paths.items()}
        train_x, train_y = arrays["train_images"], arrays["train_labels"]  # [60000, 784], [60000]
        test_x, test_y = arrays["test_images"], arrays["test_labels"]  # [10000, 784], [10000]

        n = train_x.shape[0]
        n_valid = min(10000, n // 6) if n_valid is None else int(n_valid)
        if not 0 < n_valid < n:
            raise ValueError(
                f"n_valid must be between 1 and {n - 1} (there are {n} training images), got {n_valid}"
            )

        def split(x: np.ndarray, y: np.ndarray) -> Split:
            if binarize == "threshold":
                x = (x > 127).astype(np.uint8)  # [N, 784] 0/1
            return Split(to_device(x, device), binarize, to_device(y.astype(np.int64), device))

        splits = {
            "train": split(train_x[: n - n_valid], train_y[: n - n_valid]),
            "valid": split(train_x[n - n_valid :], train_y[n - n_valid :]),
            "test": split(test_x, test_y),
        }
        super().__init__(name, splits)


def find(root: Path, name: str) -> Path | None:
    for folder in (root / SUBDIR, root):
        for suffix in (".gz", ""):
            path = folder / (name + suffix)
            if path.is_file():
                return path
    return None


def locate(root: Path, download: bool, verify: bool) -> dict[str, Path]:
    """Path of each file, downloading the missing ones if allowed; DataError if some stay missing."""
    paths = {role: find(root, name) for role, name in FILES.items()}
    failure = "Downloading is switched off (data.download=false)."
    if download and None in paths.values():
        errors = []
        for role, path in paths.items():
            if path is None:
                paths[role] = fetch(FILES[role] + ".gz", root / SUBDIR, verify, errors)
        failure = "Downloading failed:\n" + "\n".join(errors)
    missing = [FILES[role] + ".gz" for role, path in paths.items() if path is None]
    if missing:
        raise DataError(
            f"MNIST: cannot find {', '.join(missing)}.\n"
            f"Searched {root / SUBDIR} and {root}.\n"
            f"{failure}\n"
            f"To fix: download them from {MIRRORS[0]} (or any MNIST mirror; torchvision.datasets.MNIST"
            f"(root, download=True) puts them in the right place) into {root / SUBDIR}/. {HOW_TO_SET_ROOT}"
        )
    return paths


def fetch(name: str, folder: Path, verify: bool, errors: list[str]) -> Path | None:
    """Download `name` into `folder` from the first mirror that works; record each failure in `errors`."""
    dest = folder / name
    for mirror in MIRRORS:
        url = mirror + name
        try:
            download(url, dest)
        except DOWNLOAD_ERRORS as e:
            errors.append(f"  {url}: {e}")
            continue
        expected = SHA256.get(name)
        if verify and expected is not None and (got := sha256_file(dest)) != expected:
            dest.unlink()
            errors.append(f"  {url}: checksum mismatch, expected sha256 {expected}, got {got}; file deleted")
            continue
        return dest
    return None


def read_idx(path: Path, role: str, verify: bool) -> np.ndarray:
    """[N, 784] uint8 images or [N] uint8 labels from an IDX file (gzipped or not)."""
    expected = SHA256.get(path.name)
    if verify and expected is not None and (got := sha256_file(path)) != expected:
        raise checksum_error(path, expected, got, MIRRORS[0] + FILES[role] + ".gz")
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(
                f"{path} is not a valid gzip file ({e}). Delete it and download it again."
            ) from None
    return parse_idx(raw, images=role.endswith("images"), path=path)


def parse_idx(raw: bytes, images: bool, path: Path | str = "<bytes>") -> np.ndarray:
    header = 16 if images else 8
    bad = DataError(
        f"{path} is not an MNIST IDX {'image' if images else 'label'} file. Delete it and download it again."
    )
    if len(raw) < header:
        raise bad
    magic, n = struct.unpack(">ii", raw[:8])
    if magic != (IMAGES_MAGIC if images else LABELS_MAGIC):
        raise bad
    if images:
        rows, cols = struct.unpack(">ii", raw[8:16])
        if (rows, cols) != (28, 28) or len(raw) != header + n * 784:
            raise bad
        return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(n, 784)  # [N, 784]
    if len(raw) != header + n:
        raise bad
    return np.frombuffer(raw, dtype=np.uint8, offset=header)  # [N]

"""Shared pieces of the data package: the `Dataset`/`Split` containers, `DataError`, checksums, downloads.

A dataset is held as one tensor per split on the run's device; minibatches are drawn by index, so there
is no DataLoader and no worker process. Pixels are stored compactly (uint8) and turned into float32 0/1
in `Split.batch`, which is also where dynamic binarization draws its fresh Bernoulli sample.

Shape legend: N examples in a split, B examples in a batch, X = 784 pixels (28 x 28, row-major).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
BINARIZE_MODES = ("fixed", "dynamic", "threshold")

# Said in every "file missing" message: the two ways to point the runner at the data.
HOW_TO_SET_ROOT = (
    "If you have them elsewhere, point the runner at that folder with `data.root=/path/to/data` on the command line "
    "or the DATA_ROOT environment variable (the default is $DATA_ROOT, else ~/.cache/gradest/data)."
)


class DataError(Exception):
    """A dataset could not be loaded: a file is missing and could not be downloaded, a checksum does not
    match, or a file is malformed. The message alone says what is wrong and how to fix it; the runner
    prints it without a traceback."""


class Split:
    """One split of a dataset, held as a single tensor on the dataset's device.

    `data` is [N, X] uint8: 0/1 pixels for a fixed (or thresholded) binarization, grey levels 0..255 for
    dynamic binarization, which draws x ~ Bernoulli(grey / 255) afresh on every `batch` call from the
    global torch RNG of the device (so `torch.manual_seed` makes it reproducible).
    """

    def __init__(self, data: Tensor, binarize: str, labels: Tensor | None = None):
        if binarize not in BINARIZE_MODES:
            raise ValueError(f"binarize must be one of {BINARIZE_MODES}, got {binarize!r}")
        assert data.dim() == 2 and data.dtype == torch.uint8, (data.shape, data.dtype)
        self.data = data  # [N, X] uint8
        self.binarize = binarize
        self.labels = labels  # [N] int64 class labels, or None (binarized MNIST has none)
        self.n = data.shape[0]

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return (
            f"Split(n={self.n}, x_dim={self.data.shape[1]}, binarize={self.binarize!r}, device={self.device})"
        )

    def batch(self, idx: Tensor) -> Tensor:
        """Examples `idx` as float32 0/1 on the dataset's device, [len(idx), X]. With dynamic binarization
        every call draws new pixels."""
        idx = torch.as_tensor(idx, dtype=torch.long).to(self.device)  # [B]
        x = self.data[idx]  # [B, X] uint8
        if self.binarize == "dynamic":
            return torch.bernoulli(x.float() / 255.0)  # [B, X] fresh draw, global RNG of the device
        return x.float()  # [B, X] already 0/1

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[Tensor]:
        """One full pass over the split in batches of `batch_size` (the last one may be shorter), in order
        or, with `shuffle`, in a random order drawn from `generator` (global RNG when None)."""
        _check_batch_size(batch_size)
        if shuffle:
            order = torch.randperm(self.n, generator=generator, device=_rng_device(generator))  # [N]
        else:
            order = torch.arange(self.n)  # [N]
        for start in range(0, self.n, batch_size):
            yield self.batch(order[start : start + batch_size])  # [<=B, X]

    def sample_batch(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """A random minibatch [batch_size, X]: indices drawn uniformly with replacement from `generator`
        (global RNG when None), so a seeded generator gives the same indices every run."""
        _check_batch_size(batch_size)
        idx = torch.randint(self.n, (batch_size,), generator=generator, device=_rng_device(generator))  # [B]
        return self.batch(idx)


def _check_batch_size(batch_size: int) -> None:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _rng_device(generator: torch.Generator | None) -> torch.device:
    # Indices are drawn where the generator lives (a CUDA generator cannot draw CPU numbers), then moved.
    return generator.device if generator is not None else torch.device("cpu")


class Dataset:
    """A dataset of flattened 28x28 binary images with "train", "valid" and "test" splits.

    Attributes: `name`, `x_dim` (784), `image_shape` ((28, 28)), `device`, and `train_mean` [X] float32,
    the mean pixel value of the training split (the Bernoulli mean for dynamic binarization), used to
    initialise a decoder's output bias.
    """

    name: str
    x_dim: int
    image_shape: tuple[int, int] = (28, 28)
    #: what the examples are, checked against a model's ``data_kind`` before anything loads
    kind = "images"

    def __init__(self, name: str, splits: dict[str, Split]):
        assert set(splits) == set(SPLITS), sorted(splits)
        self.name = name
        self._splits = splits
        train = splits["train"]
        self.x_dim = train.data.shape[1]
        self.device = train.device
        scale = 255.0 if train.binarize == "dynamic" else 1.0  # grey levels -> Bernoulli means
        self.train_mean = train.data.float().mean(0) / scale  # [X]

    def split(self, name: str) -> Split:
        if name not in self._splits:
            raise ValueError(f"unknown split {name!r}; choose one of {list(SPLITS)}")
        return self._splits[name]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={v.n}" for k, v in self._splits.items())
        return f"{type(self).__name__}(name={self.name!r}, x_dim={self.x_dim}, {sizes}, device={self.device})"


# ----------------------------------------------------------------------------------------------------
# Checksums

# In-process cache of file digests keyed by (path, size, mtime): a dataset loaded twice in one process
# (tests, sweeps with the joblib launcher) is hashed once. Nothing is written next to the data, which may
# be read-only.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    """sha256 hex digest of a file, read in 4 MiB chunks, cached in-process by (path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(chunk_size):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def checksum_error(path: Path, expected: str, got: str, source: str, note: str = "") -> DataError:
    return DataError(
        f"Checksum mismatch for {path}\n"
        f"  expected sha256 {expected}\n"
        f"  got      sha256 {got}\n"
        f"{note}"
        f"The file is damaged or is not the original. Delete it and download it again from {source} "
        f"(or delete it and let the loader download it, with data.download=true), or set data.verify=false "
        f"to skip the check at your own risk."
    )


def verify_file(path: Path, expected: str | None, source: str) -> None:
    """Raise DataError unless the file's sha256 is `expected` (no check when `expected` is None)."""
    if expected is None:
        log.warning("no checksum listed for %s; not verified", path)
        return
    got = sha256_file(path)
    if got != expected:
        raise checksum_error(path, expected, got, source)


# ----------------------------------------------------------------------------------------------------
# Downloads

DOWNLOAD_TIMEOUT_S = 60.0
# What a failed download can raise: network and file-system errors (urllib's URLError is an OSError),
# a broken HTTP exchange, a malformed URL.
DOWNLOAD_ERRORS = (OSError, http.client.HTTPException, ValueError)


def download(url: str, dest: Path) -> None:
    """Fetch `url` into `dest`: written to a temporary file in the same folder, then renamed, so an
    interrupted download never leaves a partial file under the final name. Network and file-system
    errors propagate as OSError (urllib's URLError is one)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s -> %s", url, dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_device(x: np.ndarray, device: str | torch.device) -> Tensor:
    """numpy array -> contiguous tensor on `device`. A writable contiguous array is shared, not copied, on
    the CPU; a read-only one (a view of the file's bytes) is copied, as torch tensors must be writable."""
    x = np.ascontiguousarray(x)
    t = torch.from_numpy(x) if x.flags.writeable else torch.tensor(x)
    return t.to(device)

"""Binarized MNIST with the fixed binarization of Salakhutdinov & Murray (2008), as distributed by
Larochelle & Murray (2011, NADE): every pixel was sampled to 0/1 once, and that one sample is the benchmark
for test negative log-likelihood. Splits: 50,000 train / 10,000 valid / 10,000 test, no labels.

Files, looked up per split in `<root>/binarized_mnist/` and then in `<root>/`:
`binarized_mnist_{train,valid,test}.amat` or the same name + `.gz`. Each line of an .amat file is one
image: 784 values "0"/"1" separated by single spaces and ended by "\\n" (1,568 bytes a line). Missing files
are downloaded (uncompressed, 78 MB + 2 x 16 MB) from `URL` into `<root>/binarized_mnist/`.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np
import torch

from data.common import (
    DOWNLOAD_ERRORS,
    HOW_TO_SET_ROOT,
    SPLITS,
    DataError,
    Dataset,
    Split,
    checksum_error,
    download,
    sha256_file,
    to_device,
)

X_DIM = 784
SUBDIR = "binarized_mnist"
# Canonical address; tests point it at an unreachable one to exercise the "no network" error.
URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/binarized_mnist_{split}.amat"

# sha256 of the original .amat files (as listed by tensorflow/datasets) and of the level-9 gzip copies in
# the shared data folder (see its README). Tests monkeypatch this table.
SHA256 = {
    "binarized_mnist_train.amat": "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
    "binarized_mnist_valid.amat": "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
    "binarized_mnist_test.amat": "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
    "binarized_mnist_train.amat.gz": "af247bd6075cf9adc4715459dcd5f13eaa99a2c92d8d81379a05da94770b6c0e",
    "binarized_mnist_valid.amat.gz": "533b71bc0198f4d73c54ae5fe6c96fc08dc3cf1b3fae24c5521dbc0452507e38",
    "binarized_mnist_test.amat.gz": "32a3c54d03504632bf9f131b4a148c7567aa6fc87da017049b044bdc14c2a0f2",
}


def filename(split: str) -> str:
    return f"binarized_mnist_{split}.amat"


class BinarizedMNIST(Dataset):
    """The fixed binarized MNIST, each split one [N, 784] uint8 0/1 tensor on `device`.

    root: data root (see module docstring for where files are looked up).
    download: fetch missing files from `URL` into `<root>/binarized_mnist/`.
    verify: check each file's sha256 against `SHA256` (a .gz may also match by its decompressed content,
        so a copy gzipped at another level is accepted); a mismatch raises DataError.
    name: stored as `self.name` (the Hydra config passes it).
    """

    def __init__(
        self,
        root: str | Path,
        device: str | torch.device = "cpu",
        download: bool = True,
        verify: bool = True,
        name: str = "binarized_mnist",
    ):
        root = Path(root).expanduser().absolute()
        paths = locate(root, download=download, verify=verify)
        splits = {
            split: Split(to_device(read_amat(path, split, verify), device), "fixed")  # [N, 784] uint8
            for split, path in paths.items()
        }
        super().__init__(name, splits)


def find(root: Path, split: str) -> Path | None:
    for folder in (root / SUBDIR, root):
        for suffix in ("", ".gz"):
            path = folder / (filename(split) + suffix)
            if path.is_file():
                return path
    return None


def locate(root: Path, download: bool, verify: bool) -> dict[str, Path]:
    """Path of each split's file, downloading the missing ones if allowed; DataError if some stay missing."""
    paths = {split: find(root, split) for split in SPLITS}
    missing = [split for split, path in paths.items() if path is None]
    failure = "Downloading is switched off (data.download=false)."
    if missing and download:
        errors = []
        for split in missing:
            dest = root / SUBDIR / filename(split)
            url = URL.format(split=split)
            try:
                fetch(url, dest, verify)
                paths[split] = dest
            except DOWNLOAD_ERRORS as e:
                errors.append(f"  {url}: {e}")
        failure = "Downloading failed:\n" + "\n".join(errors)
    missing = [split for split, path in paths.items() if path is None]
    if missing:
        names = ", ".join(filename(s) for s in missing)
        raise DataError(
            f"Binarized MNIST: cannot find {names} (as .amat or .amat.gz).\n"
            f"Searched {root / SUBDIR} and {root}.\n"
            f"{failure}\n"
            f"To fix: download {URL.format(split='{train,valid,test}')} (gzipping them is fine) into "
            f"{root / SUBDIR}/. {HOW_TO_SET_ROOT}"
        )
    return paths


def fetch(url: str, dest: Path, verify: bool) -> None:
    download(url, dest)
    expected = SHA256.get(dest.name)
    if verify and expected is not None and (got := sha256_file(dest)) != expected:
        dest.unlink()
        raise checksum_error(dest, expected, got, url, note="The downloaded file was deleted.\n")


def read_amat(path: Path, split: str, verify: bool) -> np.ndarray:
    """[N, 784] uint8 0/1 from split `split`'s .amat or .amat.gz file, checked against SHA256 if `verify`."""
    gz = path.name.endswith(".gz")
    expected = SHA256.get(path.name)
    bad_sum = verify and expected is not None and sha256_file(path) != expected
    if bad_sum and not gz:
        raise checksum_error(path, expected, sha256_file(path), URL.format(split=split))
    raw = path.read_bytes()
    if gz:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(
                f"{path} is not a valid gzip file ({e}). Delete it and download it again."
            ) from None
    if bad_sum:
        # A .gz made with other gzip settings has another sum; accept it when its content is the original.
        name = filename(split)
        content = hashlib.sha256(raw).hexdigest()
        if content != SHA256.get(name):
            note = (
                f"Its decompressed content has sha256 {content}, not the {SHA256.get(name)} of the "
                f"original {name}.\n"
            )
            raise checksum_error(path, expected, sha256_file(path), URL.format(split=split), note=note)
    return parse_amat(raw, path)


def parse_amat(raw: bytes, path: Path | str = "<bytes>") -> np.ndarray:
    """Parse .amat text into [N, 784] uint8. The exact original layout (1,568-byte lines) is read as a
    strided view of the bytes, a few hundred ms for the 78 MB training file; any other whitespace layout
    (CRLF, tabs, no final newline) goes through a slower but still vectorized path."""
    text = np.frombuffer(raw, dtype=np.uint8)  # [bytes]
    line = 2 * X_DIM
    if text.size and text.size % line == 0:
        rows = text.reshape(-1, line)  # [N, 1568]
        seps = rows[:, 1::2]  # [N, 784] the 783 spaces and the newline
        if (seps[:, :-1] == ord(" ")).all() and (seps[:, -1] == ord("\n")).all():
            x = rows[:, 0::2] - np.uint8(ord("0"))  # [N, 784]; anything below "0" wraps to > 1
            if (x <= 1).all():
                return x
    return _parse_amat_general(raw, text, path)


def _parse_amat_general(raw: bytes, text: np.ndarray, path: Path | str) -> np.ndarray:
    digit = (text == ord("0")) | (text == ord("1"))  # [bytes]
    space = np.isin(text, np.frombuffer(b" \t\r\n\v\f", dtype=np.uint8))  # [bytes]
    n_lines = sum(1 for ln in raw.splitlines() if ln.strip())
    values = text[digit] - np.uint8(ord("0"))  # [N * 784]
    if not (digit | space).all() or (digit[1:] & digit[:-1]).any() or values.size != n_lines * X_DIM:
        raise DataError(
            f"{path} is not a binarized MNIST .amat file: expected lines of {X_DIM} values 0 or 1 separated "
            f"by spaces. Delete it and download it again."
        )
    return values.reshape(n_lines, X_DIM)  # [N, 784]

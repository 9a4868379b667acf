"""Tests of the data package on tiny synthetic files in the real formats (tests/datafiles.py), plus checks
of the real files marked `realdata`, run only when DATA_ROOT points at a folder holding them."""

from __future__ import annotations

import functools
import gzip
import http.server
import os
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import data.binarized_mnist as bm
import data.common as common
import data.mnist as mn
from data import DataError, Dataset, Split
from data.binarized_mnist import BinarizedMNIST, parse_amat
from data.mnist import MNIST
from tests.datafiles import sha256_table, write_binarized_mnist, write_mnist_idx

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "valid", "test")
UNREACHABLE = "http://127.0.0.1:9/"  # the discard port: connection refused at once


def amat_rows(path: Path) -> np.ndarray:
    """Slow, obviously-correct reference parser."""
    text = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return np.array([[int(v) for v in line.split()] for line in text.decode().splitlines()], dtype=np.uint8)


def rows(x: torch.Tensor) -> Counter:
    return Counter(tuple(r) for r in x.to(torch.uint8).tolist())


# ----------------------------------------------------------------------------------------------------
# Binarized MNIST, synthetic


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("subdir", [True, False])
def test_binarized_mnist_loads(tmp_path, gz, subdir):
    root = write_binarized_mnist(tmp_path, n_train=30, n_valid=7, n_test=5, gz=gz, subdir=subdir)
    ds = BinarizedMNIST(root, download=False, verify=False)
    assert isinstance(ds, Dataset) and ds.name == "binarized_mnist" and ds.x_dim == 784
    folder = root / "binarized_mnist" if subdir else root
    for split, n in zip(SPLITS, (30, 7, 5)):
        s = ds.split(split)
        assert isinstance(s, Split) and s.n == n == len(s)
        x = s.batch(torch.arange(n))
        assert x.shape == (n, 784) and x.dtype == torch.float32
        assert set(x.unique().tolist()) <= {0.0, 1.0}
        expected = amat_rows(folder / (f"binarized_mnist_{split}.amat" + (".gz" if gz else "")))
        assert torch.equal(x, torch.from_numpy(expected).float())
        assert torch.equal(s.batch(torch.arange(n)), x)  # a fixed binarization does not change
    assert ds.train_mean.shape == (784,) and ds.train_mean.dtype == torch.float32
    assert torch.allclose(ds.train_mean, ds.split("train").batch(torch.arange(30)).mean(0), atol=1e-6)


def test_name_kwarg_and_unknown_split(tmp_path):
    ds = BinarizedMNIST(write_binarized_mnist(tmp_path), download=False, verify=False, name="bmn")
    assert ds.name == "bmn"
    with pytest.raises(ValueError, match="train.*valid.*test"):
        ds.split("validation")


def test_parse_amat_other_whitespace_layouts():
    x = (np.random.default_rng(1).random((4, 784)) < 0.5).astype(np.uint8)
    lines = [" ".join(map(str, r)) for r in x]
    for text in (
        "\n".join(lines) + "\n",
        "\r\n".join(lines),
        "\n".join(" " + ln + "\t " for ln in lines) + "\n\n",
    ):
        np.testing.assert_array_equal(parse_amat(text.encode()), x)


@pytest.mark.parametrize(
    "text",
    [b"0 1 2" + b" 0" * 781 + b"\n", b"01" + b" 0" * 782 + b"\n", b"0 1\n", b"0.0" + b" 0" * 783 + b"\n"],
    ids=["value-2", "no-space", "short-line", "float"],
)
def test_parse_amat_rejects_malformed(text):
    with pytest.raises(DataError, match="not a binarized MNIST .amat file"):
        parse_amat(text, "bad.amat")


# ----------------------------------------------------------------------------------------------------
# MNIST, synthetic


def test_mnist_threshold(tmp_path):
    ds = MNIST(write_mnist_idx(tmp_path), binarize="threshold", download=False, verify=False)
    grey = torch.from_numpy(
        mn.read_idx(tmp_path / "MNIST/raw/train-images-idx3-ubyte.gz", "train_images", False).copy()
    )
    assert [ds.split(s).n for s in SPLITS] == [50, 10, 10]
    x = ds.split("train").batch(torch.arange(50))
    assert x.shape == (50, 784) and x.dtype == torch.float32
    assert torch.equal(x, (grey[:50] > 127).float())
    assert torch.equal(ds.split("valid").batch(torch.arange(10)), (grey[50:] > 127).float())
    assert torch.equal(ds.split("train").batch(torch.arange(50)), x)  # deterministic
    assert torch.allclose(ds.train_mean, x.mean(0), atol=1e-6)
    assert ds.split("test").labels.shape == (10,) and ds.split("test").labels.dtype == torch.int64


def test_mnist_dynamic(tmp_path):
    ds = MNIST(write_mnist_idx(tmp_path), binarize="dynamic", download=False, verify=False)
    grey = torch.from_numpy(
        mn.read_idx(tmp_path / "MNIST/raw/train-images-idx3-ubyte.gz", "train_images", False).copy()
    )
    s = ds.split("train")
    idx = torch.arange(50)
    a, b = s.batch(idx), s.batch(idx)
    assert a.shape == (50, 784) and a.dtype == torch.float32
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(a, b)  # a fresh draw every call
    assert (a[grey[:50] == 0] == 0).all() and (a[grey[:50] == 255] == 1).all()
    torch.manual_seed(3)
    c = s.batch(idx)
    torch.manual_seed(3)
    assert torch.equal(s.batch(idx), c)  # the global RNG makes it reproducible
    assert torch.allclose(ds.train_mean, grey[:50].float().mean(0) / 255, atol=1e-6)
    # The draw has the right mean: 200 draws, 3 sigma of a Binomial(200 * 50 * 784) proportion.
    p = grey[:50].float() / 255
    mean = torch.stack([s.batch(idx) for _ in range(200)]).mean()
    assert abs(mean - p.mean()) < 3 * (p * (1 - p)).mean().sqrt() / (200 * 50 * 784) ** 0.5


def test_mnist_n_valid_and_bad_arguments(tmp_path):
    root = write_mnist_idx(tmp_path, n_train=60, n_test=4)
    ds = MNIST(root, binarize="threshold", download=False, verify=False, n_valid=20)
    assert [ds.split(s).n for s in SPLITS] == [40, 20, 4]
    with pytest.raises(ValueError, match="dynamic.*threshold"):
        MNIST(root, binarize="fixed", download=False, verify=False)
    with pytest.raises(ValueError, match="n_valid"):
        MNIST(root, download=False, verify=False, n_valid=60)


def test_mnist_accepts_uncompressed_idx(tmp_path):
    raw = write_mnist_idx(tmp_path) / "MNIST" / "raw"
    for p in list(raw.iterdir()):
        p.with_suffix("").write_bytes(gzip.decompress(p.read_bytes()))
        p.unlink()
    ds = MNIST(tmp_path, binarize="threshold", download=False, verify=False)
    assert [ds.split(s).n for s in SPLITS] == [50, 10, 10]


def test_mnist_rejects_bad_magic(tmp_path):
    raw = write_mnist_idx(tmp_path) / "MNIST" / "raw"
    labels = raw / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + gzip.decompress(labels.read_bytes())[4:]))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz is not an MNIST IDX label file"):
        MNIST(tmp_path, download=False, verify=False)


# ----------------------------------------------------------------------------------------------------
# Batching (shared by every dataset)


@pytest.fixture
def split(tmp_path) -> Split:
    return BinarizedMNIST(write_binarized_mnist(tmp_path, n_train=23), download=False, verify=False).split(
        "train"
    )


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_cover_every_example_once(split, shuffle):
    batches = list(split.batches(5, shuffle=shuffle, generator=torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    everything = split.batch(torch.arange(split.n))
    assert rows(torch.cat(batches)) == rows(everything)
    if not shuffle:
        assert torch.equal(torch.cat(batches), everything)


def test_shuffled_batches_reproducible(split):
    def order(seed):
        return torch.cat(list(split.batches(4, shuffle=True, generator=torch.Generator().manual_seed(seed))))

    assert torch.equal(order(1), order(1)) and not torch.equal(order(1), order(2))


def test_sample_batch_reproducible(split):
    def sample(seed):
        return split.sample_batch(8, generator=torch.Generator().manual_seed(seed))

    a = sample(0)
    assert a.shape == (8, 784) and a.dtype == torch.float32
    assert torch.equal(a, sample(0)) and not torch.equal(a, sample(1))
    torch.manual_seed(0)
    b = split.sample_batch(8)
    torch.manual_seed(0)
    assert torch.equal(split.sample_batch(8), b)


def test_bad_batch_size(split):
    with pytest.raises(ValueError, match="batch_size"):
        split.sample_batch(0)
    with pytest.raises(ValueError, match="batch_size"):
        next(split.batches(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_on_cuda(tmp_path):
    ds = MNIST(write_mnist_idx(tmp_path), device="cuda", download=False, verify=False)
    g = torch.Generator(device="cuda").manual_seed(0)
    assert ds.split("train").sample_batch(4, generator=g).device.type == "cuda"
    assert ds.split("train").sample_batch(4).device.type == "cuda"
    assert next(ds.split("test").batches(3, shuffle=True)).device.type == "cuda"
    assert ds.train_mean.device.type == "cuda"


# ----------------------------------------------------------------------------------------------------
# Checksums


def test_binarized_verify_passes_with_matching_sums(tmp_path, monkeypatch):
    root = write_binarized_mnist(tmp_path)
    monkeypatch.setattr(bm, "SHA256", sha256_table(root / "binarized_mnist"))
    assert BinarizedMNIST(root, download=False, verify=True).split("test").n == 10


@pytest.mark.parametrize("gz", [True, False])
def test_binarized_checksum_mismatch(tmp_path, monkeypatch, gz):
    root = write_binarized_mnist(tmp_path, gz=gz)
    table = sha256_table(root / "binarized_mnist")
    name = "binarized_mnist_valid.amat" + (".gz" if gz else "")
    got = table[name]
    table[name] = "0" * 64
    table["binarized_mnist_valid.amat"] = "0" * 64  # so the decompressed content does not match either
    monkeypatch.setattr(bm, "SHA256", table)
    with pytest.raises(DataError) as e:
        BinarizedMNIST(root, download=False, verify=True)
    msg = str(e.value)
    assert name in msg and "0" * 64 in msg and got in msg and "elete" in msg
    BinarizedMNIST(root, download=False, verify=False)  # verify=False skips the check


def test_binarized_recompressed_gz_accepted_by_content(tmp_path, monkeypatch):
    root = write_binarized_mnist(tmp_path, gz=False)
    folder = root / "binarized_mnist"
    table = sha256_table(folder)  # sums of the .amat files
    for p in list(folder.iterdir()):
        p.with_name(p.name + ".gz").write_bytes(gzip.compress(p.read_bytes(), compresslevel=1))
        p.unlink()
        table[p.name + ".gz"] = "f" * 64  # the "original" .gz has another sum
    monkeypatch.setattr(bm, "SHA256", table)
    assert BinarizedMNIST(root, download=False, verify=True).split("train").n == 50


def test_mnist_checksum_mismatch(tmp_path, monkeypatch):
    root = write_mnist_idx(tmp_path)
    table = sha256_table(root / "MNIST" / "raw")
    monkeypatch.setattr(mn, "SHA256", table)
    MNIST(root, download=False, verify=True)  # the right sums pass
    got = table["t10k-images-idx3-ubyte.gz"]
    monkeypatch.setitem(table, "t10k-images-idx3-ubyte.gz", "a" * 64)
    with pytest.raises(DataError) as e:
        MNIST(root, download=False, verify=True)
    msg = str(e.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and "a" * 64 in msg and got in msg and "elete" in msg


def test_sha256_file_is_cached_and_sees_changes(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    first = common.sha256_file(p)
    assert first == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert any(k[0] == str(p.resolve()) for k in common._DIGESTS)
    p.write_bytes(b"abcd")  # another size: a new cache key
    assert common.sha256_file(p) != first


# ----------------------------------------------------------------------------------------------------
# Missing files and downloads


def check_missing_message(msg: str, names: list[str], folder: Path):
    for name in names:
        assert name in msg
    assert str(folder) in msg and "DATA_ROOT" in msg and "data.root" in msg and "http" in msg


def test_binarized_missing_without_download(tmp_path):
    root = write_binarized_mnist(tmp_path)
    (root / "binarized_mnist" / "binarized_mnist_test.amat.gz").unlink()
    with pytest.raises(DataError) as e:
        BinarizedMNIST(root, download=False)
    check_missing_message(str(e.value), ["binarized_mnist_test.amat"], root / "binarized_mnist")
    assert "binarized_mnist_train" not in str(e.value).split("\n")[0]
    assert "data.download=false" in str(e.value)


def test_binarized_missing_download_unreachable(tmp_path, monkeypatch):
    monkeypatch.setattr(bm, "URL", UNREACHABLE + "binarized_mnist_{split}.amat")
    with pytest.raises(DataError) as e:
        BinarizedMNIST(tmp_path / "nothing", download=True)
    names = [f"binarized_mnist_{s}.amat" for s in SPLITS]
    check_missing_message(str(e.value), names, tmp_path / "nothing" / "binarized_mnist")
    assert "Downloading failed" in str(e.value) and "127.0.0.1:9" in str(e.value)
    assert not list((tmp_path / "nothing").rglob("*.part"))  # no partial files left behind


def test_mnist_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(mn, "MIRRORS", [UNREACHABLE])
    names = [n + ".gz" for n in mn.FILES.values()]
    with pytest.raises(DataError) as e:
        MNIST(tmp_path, download=False)
    check_missing_message(str(e.value), names, tmp_path / "MNIST" / "raw")
    with pytest.raises(DataError) as e:
        MNIST(tmp_path, download=True)
    check_missing_message(str(e.value), names, tmp_path / "MNIST" / "raw")
    assert "Downloading failed" in str(e.value)


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server for the folder `tmp_path/served`; yields (folder, base url)."""
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=served))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_binarized_download(tmp_path, monkeypatch, http_server):
    served, url = http_server
    write_binarized_mnist(served, gz=False, subdir=False)
    monkeypatch.setattr(bm, "URL", url + "binarized_mnist_{split}.amat")
    monkeypatch.setattr(bm, "SHA256", sha256_table(served))
    root = tmp_path / "root"
    ds = BinarizedMNIST(root, download=True, verify=True)
    assert sorted(p.name for p in (root / "binarized_mnist").iterdir()) == [
        f"binarized_mnist_{s}.amat" for s in ("test", "train", "valid")
    ]
    assert torch.equal(
        ds.split("valid").batch(torch.arange(10)),
        torch.from_numpy(amat_rows(served / "binarized_mnist_valid.amat")).float(),
    )


def test_binarized_download_bad_checksum_deletes_file(tmp_path, monkeypatch, http_server):
    served, url = http_server
    write_binarized_mnist(served, gz=False, subdir=False)
    monkeypatch.setattr(bm, "URL", url + "binarized_mnist_{split}.amat")
    monkeypatch.setattr(bm, "SHA256", {"binarized_mnist_train.amat": "0" * 64})
    with pytest.raises(DataError, match="binarized_mnist_train.amat[\\s\\S]*0{64}[\\s\\S]*deleted"):
        BinarizedMNIST(tmp_path / "root", download=True, verify=True)
    assert not (tmp_path / "root" / "binarized_mnist" / "binarized_mnist_train.amat").exists()


def test_mnist_download_falls_back_to_second_mirror(tmp_path, monkeypatch, http_server):
    served, url = http_server
    raw = write_mnist_idx(served) / "MNIST" / "raw"
    monkeypatch.setattr(mn, "MIRRORS", [UNREACHABLE, url + "MNIST/raw/"])
    monkeypatch.setattr(mn, "SHA256", sha256_table(raw))
    ds = MNIST(tmp_path / "root", binarize="threshold", download=True, verify=True)
    assert [ds.split(s).n for s in SPLITS] == [50, 10, 10]
    assert sorted(p.name for p in (tmp_path / "root" / "MNIST" / "raw").iterdir()) == sorted(
        p.name for p in raw.iterdir()
    )


# ----------------------------------------------------------------------------------------------------
# Hydra configs


@pytest.mark.parametrize("config", sorted((REPO / "conf" / "data").glob("*.yaml")), ids=lambda p: p.stem)
def test_data_configs_instantiate(tmp_path, monkeypatch, config):
    cfg = OmegaConf.load(config)
    if "download" not in cfg or str(cfg.get("_target_", "")).endswith("Synthetic"):
        pytest.skip(f"{config.stem} reads no files (a synthetic source)")
    assert cfg.name == config.stem and cfg.download is True and cfg.verify is True
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "env-root"))
    assert cfg.root == str(tmp_path / "env-root")
    monkeypatch.delenv("DATA_ROOT")
    monkeypatch.setenv("HOME", "/home/someone")
    assert cfg.root == "/home/someone/.cache/gradest/data"
    write_binarized_mnist(tmp_path)
    write_mnist_idx(tmp_path)
    cfg.root, cfg.verify, cfg.download = str(tmp_path), False, False
    ds = instantiate(cfg, device=torch.device("cpu"))
    assert isinstance(ds, Dataset) and ds.name == config.stem and ds.x_dim == 784
    assert ds.split("train").sample_batch(3).shape == (3, 784)


# ----------------------------------------------------------------------------------------------------
# The real data (CI: DATA_ROOT=../shared/data)


def real_root() -> Path:
    root = os.environ.get("DATA_ROOT")
    if (
        not root
        or not (Path(root) / "binarized_mnist").is_dir()
        or not (Path(root) / "MNIST" / "raw").is_dir()
    ):
        pytest.skip("DATA_ROOT does not point at a folder with the real data")
    return Path(root)


@pytest.mark.realdata
def test_real_binarized_mnist():
    root = real_root()
    for p in (root / "binarized_mnist").iterdir():
        if p.name in bm.SHA256:
            assert common.sha256_file(p) == bm.SHA256[p.name], p
    ds = BinarizedMNIST(root, download=False, verify=True)
    for split, n, mean in zip(SPLITS, (50000, 10000, 10000), (0.1306, 0.1311, 0.1325)):
        s = ds.split(split)
        assert s.n == n and s.data.shape == (n, 784)
        assert round(s.data.float().mean().item(), 4) == mean
        x = s.sample_batch(100, generator=torch.Generator().manual_seed(0))
        assert x.shape == (100, 784) and set(x.unique().tolist()) <= {0.0, 1.0}
    assert round(ds.train_mean.mean().item(), 4) == 0.1306


@pytest.mark.realdata
@pytest.mark.parametrize("binarize", ["dynamic", "threshold"])
def test_real_mnist(binarize):
    root = real_root()
    for p in (root / "MNIST" / "raw").iterdir():
        if p.name in mn.SHA256:
            assert common.sha256_file(p) == mn.SHA256[p.name], p
    ds = MNIST(root, binarize=binarize, download=False, verify=True)
    for split, n in zip(SPLITS, (50000, 10000, 10000)):
        s = ds.split(split)
        assert s.n == n and s.data.shape == (n, 784) and s.labels.shape == (n,)
        assert set(s.labels.unique().tolist()) == set(range(10))
        mean = s.batch(torch.arange(n)).mean().item()
        assert 0.12 < mean < 0.14, (split, mean)
    assert ds.split("test").labels[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first test digits
    assert 0.12 < ds.train_mean.mean().item() < 0.14

"""Seeding, devices, RNG state and atomic writes: the small things every run needs in one place."""

from __future__ import annotations

import json
import os
import random
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch


def seed_everything(seed: int) -> None:
    """The one place seeds are set: Python, torch CPU and all CUDA devices."""
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device={name!r} is not a device: use auto, cpu, cuda or cuda:N ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available on this machine: use device=auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s): use cuda:0 .. "
            f"cuda:{torch.cuda.device_count() - 1} or device=auto"
        )
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ValueError(
            f"device={name!r} but MPS (Apple GPU) is not available on this machine: use device=auto or cpu"
        )
    return device


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_write_bytes(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename: a kill never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a failed write names no file by itself: name the one we were writing
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def atomic_json(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=2, default=str) + "\n").encode()))


def git_revision() -> str:
    """The commit of the code that ran (with ``-dirty`` when the tree has changes); ``unknown`` outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"

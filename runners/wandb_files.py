"""Read back the records of a W&B run file (``run-<id>.wandb``) written in offline mode.

W&B stores a run as a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version), then 32 KiB
blocks of records, each with a 7-byte header (crc32, little-endian length, type: 1 full, 2 first,
3 middle, 4 last) and a payload that is a ``wandb_internal_pb2.Record`` protobuf. This is what
``wandb sync`` uploads, so reading it back shows exactly what W&B will receive. Used by the tests and by
anyone who wants their offline metrics without uploading.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7


def read_records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (header {data[:4]!r})")
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the tail of a block too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind in (1, 2):
            pending = payload
        else:
            pending += payload
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def history(records: list[Any]) -> list[dict[str, Any]]:
    """The rows logged with ``run.log``, values decoded from JSON."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append(
                {(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in r.history.item}
            )
    return rows


def config(records: list[Any]) -> dict[str, Any]:
    """The run config (top-level keys, values decoded from JSON), from the run record and config updates."""
    out: dict[str, Any] = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        updates = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        for it in updates:
            out[it.key or "/".join(it.nested_key)] = json.loads(it.value_json)
    return out


def run_info(records: list[Any]) -> dict[str, str]:
    """Id, group, job type and name of the run, as the W&B UI will show them."""
    for r in records:
        if r.WhichOneof("record_type") == "run":
            return {
                "id": r.run.run_id,
                "project": r.run.project,
                "group": r.run.run_group,
                "job_type": r.run.job_type,
                "name": r.run.display_name,
            }
    return {}


def run_file(run_dir: Path) -> Path:
    """The newest ``run-*.wandb`` under a run directory's ``wandb/`` folder."""
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no offline W&B run file under {run_dir}/wandb")
    return files[-1]

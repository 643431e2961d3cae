"""Reading an offline W&B run back (``<run_dir>/wandb/offline-run-*/run-*.wandb``).

The file is a LevelDB-style log of W&B's protobuf records (a 7-byte ``:W&B`` header, then
32 KiB blocks of checksummed chunks). Notebooks and tests use this to look at what a run
logged without uploading it; ``wandb sync`` uploads the same file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK = 32 * 1024
_HEADER = 7  # ":W&B" + magic (2 bytes) + version (1 byte)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(data: bytes):
    if data[:4] != b":W&B":
        raise ValueError("not a W&B transaction log (missing ':W&B' header)")
    pos, pending = _HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < 7:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0  # zero padding at a block's end


def find_offline_runs(run_dir: str | Path) -> list[Path]:
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))


def read_offline_run(path: str | Path) -> dict:
    """{"run_id", "config": {...}, "history": [{key: value, ...}, ...], "summary": {...}}."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict = {"run_id": None, "config": {}, "history": [], "summary": {}}
    for raw in _records(Path(path).read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = rec.run.run_id
        elif kind == "config":
            for item in rec.config.update:
                key = item.key or ".".join(item.nested_key)
                out["config"][key] = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            out["history"].append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out

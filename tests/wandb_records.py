"""Read a W&B offline run file (`run-*.wandb`) back with wandb's own record reader."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any


def wandb_files(root: Path) -> list[Path]:
    return sorted(Path(root).rglob("run-*.wandb"))


def read_records(path: Path) -> list[Any]:
    """Records of a .wandb file: a 7-byte header, then 32 KiB blocks of <crc, length, type> chunks
    (a LevelDB-style log; wandb 0.31 ships no reader for it), each record a protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def history_rows(records: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
    return rows


def config_values(records: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        updates = rec.run.config.update if kind == "run" else rec.config.update if kind == "config" else []
        for item in updates:
            out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def metric_definitions(records: list[Any]) -> dict[str, str]:
    """metric name (or glob) -> its step metric."""
    out = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "metric":
            m = rec.metric
            out[m.name or m.glob_name] = m.step_metric
    return out

"""A W&B run's history read back from its ``run-*.wandb`` file (a LevelDB-style log of protobuf
records, as the W&B service writes it), without the W&B service."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK, HEADER, FILE_HEADER = 32768, 7, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(data: bytes) -> list[bytes] | None:
    """The records of a whole log, or None where its last record is not fully written yet."""
    records, partial, pos = [], None, FILE_HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk, pos = data[pos + HEADER : pos + HEADER + length], pos + HEADER + length
        if len(chunk) < length:
            return None
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            partial = chunk
        elif kind == MIDDLE and partial is not None:
            partial += chunk
        elif kind == LAST and partial is not None:
            records.append(partial + chunk)
            partial = None
    header_cut = pos < len(data) and BLOCK - pos % BLOCK >= HEADER
    return None if partial is not None or header_cut else records


def read_history(run_dir: str | Path) -> list[dict[str, object]]:
    """Every ``run.log`` call of the offline run in ``run_dir``, as ``{key: value}`` (nested keys joined by ``/``)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("run-*.wandb")
    deadline = time.monotonic() + 30  # the W&B service may still be writing after ``finish()`` returned
    while (records := _records(path.read_bytes())) is None:
        assert time.monotonic() < deadline, f"{path}: its last record is still incomplete after 30 s"
        time.sleep(0.1)
    rows = []
    for data in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item})
    return rows

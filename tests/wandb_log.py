"""Reading an offline W&B run's ``run-*.wandb`` file in tests (no reader ships with wandb 0.31).

The file is a 7-byte header (``:W&B`` + magic + version) followed by LevelDB-log framed protobuf records:
32 KiB blocks, each chunk ``crc32 (4) | length (2, little endian) | type (1: FULL, 2: FIRST, 3: MIDDLE,
4: LAST) | payload``; a block tail shorter than a chunk header is padding.
"""

from __future__ import annotations

import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768


def read_records(run_dir: Path) -> list[pb.Record]:
    """Every record of the one ``run-*.wandb`` file in ``run_dir`` (an ``offline-run-*`` folder)."""
    raw = next(Path(run_dir).glob("run-*.wandb")).read_bytes()
    assert raw[:4] == b":W&B"
    pos, chunk, records = 7, b"", []
    while pos + 7 <= len(raw):
        if BLOCK - pos % BLOCK < 7:  # block trailer too short for a chunk header
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(raw[pos + 4 : pos + 6], "little"), raw[pos + 6]
        if length == 0 and kind == 0:
            break
        chunk += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def read_finished_records(run_dir: Path, timeout: float = 60.0) -> list[pb.Record]:
    """:func:`read_records` once the file holds the run's ``exit`` record: W&B's writer service may still be
    flushing the file when ``run.finish()`` returns on a busy machine. AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(run_dir)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{run_dir}: no exit record after {timeout:.0f} s"
        time.sleep(0.5)

"""The results.json written by every eval run: flat metrics, the config and the environment."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from evotool.env import environment
from evotool.errors import EvotoolError
from evotool.io import read_json, write_json

RESULTS_SCHEMA_VERSION = "1.0"
RESULTS_FILE = "results.json"


def write_results(out_dir: Path, metrics: dict, config: dict, meta: dict | None = None) -> Path:
    """Write ``out_dir/results.json`` atomically (temp file + rename) and return its path.

    ``metrics`` is flat (``chair_s``, ``pope_random_f1``, ``latency_ratio``...); ``meta`` is
    stored under its own key when given.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    nested = sorted(k for k, v in metrics.items() if isinstance(v, (dict, list)))
    if nested:
        raise EvotoolError(f"metrics must be flat; nested values under {', '.join(nested)}")
    record: dict[str, Any] = {
        "metrics": metrics,
        "config": config,
        "environment": environment(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if meta is not None:
        record["meta"] = meta
    return write_json(out_dir / RESULTS_FILE, record, schema=RESULTS_SCHEMA_VERSION)


def read_results(path: str | Path) -> dict:
    """Read a results.json (or the one in a folder); raise :class:`EvotoolError` if it is
    missing, malformed or of another schema version."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    record = read_json(path, EvotoolError, "results file", schema=RESULTS_SCHEMA_VERSION)
    missing = {"metrics", "config", "environment", "created"} - record.keys()
    if missing:
        raise EvotoolError(f"{path}: results file lacks {', '.join(sorted(missing))}")
    return record

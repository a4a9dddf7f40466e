"""``stages.json``: the versioned file that ``prune`` and ``mitigate`` consume.

Required keys (extend, never rename): ``schema_version``, ``model``, ``fingerprint``, ``num_layers``,
``critical_layer`` (int, or null when no stable stage exists), ``mutation_layers`` (list of ints,
may be empty), ``stages`` (``rapid_evolution`` / ``stabilization`` / ``mutation`` -> inclusive
``[first, last]`` or null). Also written: ``lens``, ``critical_spread``, ``mutation_stats``,
``curves`` (per-layer median / quartiles of each metric), ``object_vocab`` (the words counted as object
names), ``config``, ``environment``, ``created``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evotool.errors import StageFileError
from evotool.io import atomic_write_text, read_json

SCHEMA_VERSION = "1.0"
REQUIRED = ("schema_version", "model", "fingerprint", "num_layers", "critical_layer", "mutation_layers", "stages")
STAGE_NAMES = ("rapid_evolution", "stabilization", "mutation")


def write_stages(path: Path, payload: dict[str, Any]) -> None:
    """Validate and atomically write a stages file."""
    payload = {"schema_version": SCHEMA_VERSION, **payload}
    _validate(payload, path)
    atomic_write_text(path, json.dumps(payload, indent=2, default=_json_default) + "\n")


def read_stages(path: str | Path, fingerprint: str | None = None) -> dict[str, Any]:
    """Load and validate a stages file; with ``fingerprint``, refuse one computed on another model."""
    path = Path(path)
    if path.is_dir():
        path = path / "stages.json"
    payload = read_json(path, StageFileError, "stage file")
    _validate(payload, path)
    if fingerprint is not None and payload["fingerprint"] != fingerprint:
        raise StageFileError(
            f"{path} belongs to another model (fingerprint {payload['fingerprint']}, this model {fingerprint}); "
            "re-run `evotool analyze` on this model"
        )
    return payload


def _validate(payload: dict[str, Any], path: Path) -> None:
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise StageFileError(f"{path}: missing keys {missing}")
    if str(payload["schema_version"]).split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise StageFileError(f"{path}: schema version {payload['schema_version']} is not supported (expected {SCHEMA_VERSION})")
    n = payload["num_layers"]
    layers = [payload["critical_layer"]] if payload["critical_layer"] is not None else []
    layers += list(payload["mutation_layers"])
    if any(not isinstance(l, int) or not 0 <= l <= n for l in layers):
        raise StageFileError(f"{path}: layer index outside 0..{n}")
    if set(payload["stages"]) != set(STAGE_NAMES):
        raise StageFileError(f"{path}: stages must be exactly {STAGE_NAMES}")


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")

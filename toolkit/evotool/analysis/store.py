"""The analysis run directory: one atomic file pair per finished sample, so a run can resume.

Layout::

    DIR/run.json              model, fingerprint, lens, max_new_tokens (a resumed run must match)
    DIR/samples/<id>.npz      per-token x per-layer arrays of one sample (see SampleTrace)
    DIR/samples/<id>.json     text, prompt, tokens, ground truth; written last = the sample is done
    DIR/errors.jsonl          samples that failed (skipped with --on-error skip)
    DIR/stages.json, DIR/tokens.parquet, DIR/texts.jsonl, DIR/figures/*.png, DIR/report.md
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from evotool.io import atomic_write_text
from evotool.errors import StageFileError
from evotool.trace import METRICS, SampleTrace

RUN_KEYS = ("model", "fingerprint", "lens", "max_new_tokens", "js_unit")


def safe_name(sample_id: str) -> str:
    """A file name for a sample id (ids may contain slashes or spaces)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id)


class RunStore:
    """Reads and writes one analysis run directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.samples_dir = root / "samples"

    def open(self, run_info: dict[str, Any]) -> None:
        """Create the directory, or check that an existing one belongs to the same model and settings."""
        path = self.root / "run.json"
        if path.is_file():
            old = json.loads(path.read_text())
            diff = [k for k in RUN_KEYS if old.get(k) != run_info.get(k)]
            if diff:
                raise StageFileError(
                    f"run directory {self.root} holds results of a different run ({', '.join(diff)} differ); "
                    "choose another --out or delete it"
                )
            return
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(run_info, indent=2) + "\n")

    def is_done(self, sample_id: str) -> bool:
        return (self.samples_dir / f"{safe_name(sample_id)}.json").is_file()

    def save(self, sample_id: str, trace: SampleTrace, record: dict[str, Any]) -> None:
        """Write the sample's arrays, then its record (the record's presence marks it finished)."""
        name = safe_name(sample_id)
        arrays = {f"layer_{k}": v for k, v in trace.layers.items()}
        arrays.update(token_ids=trace.token_ids, topk_ids=trace.topk_ids, topk_p=trace.topk_p)
        if trace.features is not None:
            arrays["features"] = trace.features
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        tmp = self.samples_dir / f".{name}.npz.tmp"
        tmp.write_bytes(buf.getvalue())
        tmp.replace(self.samples_dir / f"{name}.npz")
        atomic_write_text(self.samples_dir / f"{name}.json", json.dumps(record) + "\n")

    def log_error(self, sample_id: str, message: str) -> None:
        with (self.root / "errors.jsonl").open("a") as fh:
            fh.write(json.dumps({"id": sample_id, "error": message}) + "\n")

    def load_all(self) -> list[tuple[dict[str, Any], SampleTrace]]:
        """Every finished sample as (record, trace), in sample order."""
        out = []
        for path in sorted(self.samples_dir.glob("*.json")):
            record = json.loads(path.read_text())
            with np.load(path.with_suffix(".npz")) as z:
                trace = SampleTrace(
                    token_ids=z["token_ids"],
                    layers={k: z[f"layer_{k}"] for k in METRICS},
                    topk_ids=z["topk_ids"],
                    topk_p=z["topk_p"],
                    features=z["features"] if "features" in z else None,
                )
            out.append((record, trace))
        out.sort(key=lambda item: item[0]["index"])
        return out

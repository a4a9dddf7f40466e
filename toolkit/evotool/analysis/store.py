"""The analysis run directory: one atomic file pair per finished sample, so a run can resume.

Layout::

    DIR/run.json              model, fingerprint, lens, max_new_tokens (a resumed run must match), the run's sample ids
    DIR/.lock                 held (flock) by the process writing the directory
    DIR/samples/<id>.npz      per-token x per-layer arrays of one sample (see SampleTrace)
    DIR/samples/<id>.json     text, prompt, tokens, ground truth; written last = the sample is done
    DIR/samples/<id>.png      the image, for samples given as images rather than files (max side 256 px)
    DIR/samples/<id>.patch.npz  the patch lens of the sample (``--patch-lens``, see PatchLens)
    DIR/errors.jsonl          samples that failed (skipped with --on-error skip)
    DIR/token_strings.json    token id -> decoded string, for every id the run's arrays hold
    DIR/stages.json, DIR/tokens.parquet, DIR/texts.jsonl, DIR/figures/*.png, DIR/report.md, DIR/report.html
"""

from __future__ import annotations

import io
import json
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from evotool.errors import InputError, StageFileError
from evotool.io import atomic_write_bytes, atomic_write_jsonl, atomic_write_text, iter_jsonl, read_json, write_json
from evotool.patch_lens import PatchLens
from evotool.trace import METRICS, SampleTrace

RUN_SCHEMA = "1.0"
RUN_KEYS = ("model", "fingerprint", "lens", "max_new_tokens", "js_unit")
TOKEN_STRINGS_SCHEMA = "1.0"
THUMBNAIL = 256


def safe_name(sample_id: str) -> str:
    """A file name for a sample id (ids may contain slashes or spaces)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id)


class RunStore:
    """Reads and writes one analysis run directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.samples_dir = root / "samples"

    def open(self, run_info: dict[str, Any], restart: bool = False) -> None:
        """Create the directory, or check that an existing one holds results of the same model and settings
        (``RUN_KEYS``; with ``restart`` another run's samples are deleted instead of refused). ``run_info``'s
        ``sample_ids`` name this run's samples: the ones :meth:`records` reads, whatever else the folder holds."""
        path = self.root / "run.json"
        if path.is_file():
            old = read_json(path, InputError, "run file", schema=RUN_SCHEMA)
            diff = [k for k in RUN_KEYS if old.get(k) != run_info.get(k)]
            if diff and not restart:
                raise StageFileError(
                    f"run directory {self.root} holds results of a different run ({', '.join(diff)} differ); "
                    "choose another --out, or pass --restart to discard them"
                )
            if diff:
                shutil.rmtree(self.samples_dir, ignore_errors=True)
                (self.root / "errors.jsonl").unlink(missing_ok=True)
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        write_json(path, run_info, schema=RUN_SCHEMA)

    def is_done(self, sample_id: str, digest: str | None = None) -> bool:
        """Whether the sample's result is saved (with ``digest``: computed on this very sample, see
        :func:`evotool.data.inputs.sample_digest`; a sample whose image or prompt changed is traced again)."""
        record = self.samples_dir / f"{safe_name(sample_id)}.json"
        if not record.is_file():
            return False
        return digest is None or json.loads(record.read_text()).get("digest") == digest

    def drop_corrupt(self, sample_ids: list[str]) -> list[str]:
        """Forget finished samples whose record or arrays are unreadable (e.g. a disk that filled up), so that
        they are traced again; returns their ids."""
        dropped = []
        for sample_id in sample_ids:
            name = safe_name(sample_id)
            record, arrays = self.samples_dir / f"{name}.json", self.samples_dir / f"{name}.npz"
            if not record.is_file():
                continue
            try:
                json.loads(record.read_text())
                with zipfile.ZipFile(arrays) as z:
                    if z.testzip() is not None:
                        raise zipfile.BadZipFile("CRC mismatch")
            except (OSError, ValueError, zipfile.BadZipFile):
                record.unlink(missing_ok=True)
                arrays.unlink(missing_ok=True)
                dropped.append(sample_id)
        return dropped

    def save(self, sample_id: str, trace: SampleTrace, record: dict[str, Any]) -> None:
        """Write the sample's arrays, then its record (the record's presence marks it finished)."""
        name = safe_name(sample_id)
        arrays = {f"layer_{k}": v for k, v in trace.layers.items()}
        arrays.update(token_ids=trace.token_ids, topk_ids=trace.topk_ids, topk_p=trace.topk_p)
        if trace.features is not None:
            arrays["features"] = trace.features
        self._write_npz(f"{name}.npz", arrays)
        atomic_write_text(self.samples_dir / f"{name}.json", json.dumps(record) + "\n")

    def _write_npz(self, file_name: str, arrays: dict[str, np.ndarray]) -> None:
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write_bytes(self.samples_dir / file_name, buf.getvalue())

    def save_image(self, sample_id: str, image: Image.Image) -> None:
        """Keep a sample's image (shrunk to at most 256 px a side) for the HTML report."""
        image = image.copy()
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        atomic_write_bytes(self.samples_dir / f"{safe_name(sample_id)}.png", buf.getvalue())

    def image_file(self, record: dict[str, Any]) -> Path | None:
        """The kept image of a sample, else its source file if that still exists."""
        kept = self.samples_dir / f"{safe_name(record['id'])}.png"
        if kept.is_file():
            return kept
        source = Path(record["image"]) if record.get("image") else None
        return source if source is not None and source.is_file() else None

    def has_patch_lens(self, sample_id: str) -> bool:
        return (self.samples_dir / f"{safe_name(sample_id)}.patch.npz").is_file()

    def save_patch_lens(self, sample_id: str, patches: PatchLens) -> None:
        self._write_npz(f"{safe_name(sample_id)}.patch.npz",
                        {"top1": patches.top1, "prob": patches.prob, "grid": np.asarray(patches.grid),
                         "spatial": np.asarray(patches.spatial), "note": np.asarray(patches.note)})

    def load_patch_lens(self, sample_id: str) -> PatchLens | None:
        """The sample's patch lens, or None when it was not computed."""
        if not self.has_patch_lens(sample_id):
            return None
        with self._open_npz(self.samples_dir / f"{safe_name(sample_id)}.patch.npz") as z:
            return PatchLens(z["top1"], z["prob"], (int(z["grid"][0]), int(z["grid"][1])), bool(z["spatial"]),
                             str(z["note"]))

    def write_token_strings(self, tokens: dict[int, str]) -> None:
        """``token_strings.json``: the decoded string of every token id the run's arrays hold."""
        write_json(self.root / "token_strings.json", {"tokens": {str(i): t for i, t in sorted(tokens.items())}},
                   schema=TOKEN_STRINGS_SCHEMA)

    def read_token_strings(self) -> dict[int, str] | None:
        """Token id -> string from ``token_strings.json``; None for runs finished before it existed."""
        path = self.root / "token_strings.json"
        if not path.is_file():
            return None
        stored = read_json(path, InputError, "token strings file", schema=TOKEN_STRINGS_SCHEMA)
        return {int(i): t for i, t in stored["tokens"].items()}

    def log_error(self, sample_id: str, message: str) -> None:
        """Append the failure of one sample to ``errors.jsonl`` (one short append: safe from several processes)."""
        with (self.root / "errors.jsonl").open("a") as fh:
            fh.write(json.dumps({"id": sample_id, "error": message}) + "\n")

    def compact_errors(self) -> None:
        """Rewrite ``errors.jsonl`` with one line per sample (its latest failure), without samples that have
        finished since (a resumed run retries failed samples)."""
        path = self.root / "errors.jsonl"
        if path.is_file():
            errors = {rec["id"]: rec for _, rec in iter_jsonl(path) if not self.is_done(rec["id"])}
            atomic_write_jsonl(path, list(errors.values()))

    def records(self) -> list[dict[str, Any]]:
        """The records of the finished samples of the latest run (``run.json``'s ``sample_ids``; every record in
        the folder for runs written before it existed), in sample order."""
        path = self.root / "run.json"
        ids = read_json(path, InputError, "run file").get("sample_ids") if path.is_file() else None
        if ids is None:
            records = [json.loads(p.read_text()) for p in self.samples_dir.glob("*.json")]
            return sorted(records, key=lambda record: record["index"])
        files = [self.samples_dir / f"{safe_name(i)}.json" for i in ids]
        return [json.loads(f.read_text()) for f in files if f.is_file()]

    def load_trace(self, sample_id: str, features: bool = True) -> SampleTrace:
        """One finished sample's arrays (``features`` False leaves the hidden states on disk)."""
        with self._open_npz(self.samples_dir / f"{safe_name(sample_id)}.npz") as z:
            return SampleTrace(
                token_ids=z["token_ids"],
                layers={k: z[f"layer_{k}"] for k in METRICS if f"layer_{k}" in z},  # runs before 0.2 lack direct_*
                topk_ids=z["topk_ids"],
                topk_p=z["topk_p"],
                features=z["features"] if features and "features" in z else None,
            )

    def has_metric(self, sample_id: str, name: str) -> bool:
        """Whether a finished sample's file holds metric ``name`` (older runs lack newer metrics)."""
        with self._open_npz(self.samples_dir / f"{safe_name(sample_id)}.npz") as z:
            return f"layer_{name}" in z.files

    def load_all(self) -> list[tuple[dict[str, Any], SampleTrace]]:
        """Every finished sample as (record, trace), in sample order."""
        return [(record, self.load_trace(record["id"])) for record in self.records()]

    @staticmethod
    def _open_npz(path: Path) -> Any:
        try:
            return np.load(path)
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise InputError(f"unreadable sample file {path}: {err}") from err

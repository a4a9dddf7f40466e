"""``report.html``: one self-contained, offline, interactive page for one analysis run or an atlas of several.

The page is ``templates/report.html`` with ``report.css`` and ``report.js`` inlined and one JSON
document, the *report data*, embedded. The data is built from run directories alone (``stages.json``,
``samples/``, ``texts.jsonl``, ``token_strings.json``, ``figures/``), so ``evotool report`` rebuilds a
page without the model. Only ``stages.json`` is required: a directory holding just that still appears in
the atlas.

Report data (``schema_version`` 1.0)::

    {"schema_version", "title", "runs": [run, ...]}
    run:    name, model, num_layers, lens, js_unit, critical_layer, mutation_layers, stages, flags,
            hallucination, curves, behaviour, samples_total, tokens_total, notes [str], figures [{name, uri}],
            token_strings {id: string}, samples [sample, ...]
    sample: id, prompt, text, objects, image (data URI or null), token_ids [T] (strings in token_strings),
            shown (n <= T steps carry arrays), js [n][L] (layer pair l-1 -> l, l = 1..L), p_token [n][L+1],
            rank [n][L+1], decision_depth [n], topk_ids / topk_p [n][L+1][k],
            object_tokens [[step, hallucinated], ...], divergence [{step, ...}, ...],
            patch_lens {grid [rows, cols], spatial, note, top1 [L+1][P], prob [L+1][P]} or null

Results other analyses add, each read in one function below: the divergence points of each sample
(``texts.jsonl`` ``divergence``: ``{"step": int, ...}``, every other key shown as written) mark tokens in
the text view; ``behaviour`` in ``stages.json`` (``{"critical_layer": int | null, "mutation_layers": [int]}``,
behavioural ground truth) is drawn beside the detected boundaries.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import numpy as np
from PIL import Image

from evotool.analysis.aggregate import decision_depth
from evotool.analysis.config import ReportConfig
from evotool.analysis.hallucination import object_tokens, object_vocabulary
from evotool.analysis.store import RunStore
from evotool.errors import InputError, StageFileError
from evotool.io import atomic_write_text, iter_jsonl, read_json
from evotool.patch_lens import PatchLens
from evotool.stages import StageFile
from evotool.trace import SampleTrace

REPORT_SCHEMA = "1.0"
IMAGE_SIDE = 256
# figures the page redraws interactively (name prefixes); the other PNGs are embedded as they are
INTERACTIVE_FIGURES = ("stage_curves", "js_heatmap", "token_probability")


def divergence_points(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """The divergence points of each sample (``texts.jsonl``), by sample id; each a dict with at least ``step``."""
    path = run_dir / "texts.jsonl"
    out: dict[str, list[dict[str, Any]]] = {}
    for lineno, line in iter_jsonl(path) if path.is_file() else ():
        points = line.get("divergence") or []
        if not all(isinstance(p, dict) and isinstance(p.get("step"), int) for p in points):
            raise InputError(f"{path}:{lineno}: every divergence point needs an integer step")
        out[str(line["id"])] = points
    return out


def behaviour(payload: dict[str, Any]) -> dict[str, Any] | None:
    """Behavioural boundaries recorded with the run (critical layer, mutation layers), if any."""
    return payload.get("behaviour")


def _sig(values: Any, digits: int = 4) -> Any:
    """An array as nested lists of floats rounded to ``digits`` significant digits (NaN -> None)."""
    a = np.asarray(values, dtype=np.float64)
    flat = [float(f"{x:.{digits}g}") if math.isfinite(x) else None for x in a.ravel().tolist()]
    return np.array(flat, dtype=object).reshape(a.shape).tolist()


def image_uri(path: Path) -> str:
    """A data URI of the image shrunk to at most 256 px a side (PNG when small or with alpha, else JPEG)."""
    with Image.open(path) as img:
        img.load()
        image = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    image.thumbnail((IMAGE_SIDE, IMAGE_SIDE))
    small = max(image.size) <= 64 or image.mode == "RGBA"
    buf = io.BytesIO()
    image.save(buf, format="PNG" if small else "JPEG", quality=85)
    return f"data:image/{'png' if small else 'jpeg'};base64,{base64.b64encode(buf.getvalue()).decode()}"


def sample_view(record: dict[str, Any], trace: SampleTrace, patches: PatchLens | None, image: str | None,
                objects: set[str], divergence: list[dict[str, Any]], tokens: int, strings: dict[int, str]) -> dict[str, Any]:
    """One sample's part of the report data, arrays cut to the first ``tokens`` steps; ``objects`` are the
    run's object names. The emitted tokens' own strings are added to ``strings`` (id -> string), for runs
    without token_strings.json."""
    n = min(tokens, len(trace.token_ids))
    for step, token_id in enumerate(trace.token_ids.tolist()):
        strings.setdefault(token_id, record["tokens"][step])
    return {
        "id": record["id"], "prompt": record["prompt"], "text": record["text"], "objects": record.get("objects"),
        "image": image,
        "token_ids": trace.token_ids.tolist(),
        "shown": n,
        "js": _sig(trace.layers["js_prev"][:n, 1:]),
        "p_token": _sig(trace.layers["p_token"][:n]),
        "rank": trace.layers["rank"][:n].astype(int).tolist(),
        "decision_depth": decision_depth(trace.layers["top1"][:n], trace.token_ids[:n]).tolist(),
        "topk_ids": trace.topk_ids[:n].tolist(),
        "topk_p": _sig(trace.topk_p[:n]),
        "object_tokens": [[step, hallucinated] for step, _, hallucinated in object_tokens(record, objects)],
        "divergence": divergence,
        "patch_lens": None if patches is None else {
            "grid": list(patches.grid), "spatial": patches.spatial, "note": patches.note,
            "top1": patches.top1.tolist(), "prob": _sig(patches.prob, 3)},
    }


def _figures(fig_dir: Path) -> list[dict[str, str]]:
    return [{"name": p.stem, "uri": "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()}
            for p in sorted(fig_dir.glob("*.png")) if not p.stem.startswith(INTERACTIVE_FIGURES)]


def run_view(run_dir: Path, name: str, cfg: ReportConfig, samples: int) -> dict[str, Any]:
    """One run's part of the report data, with at most ``samples`` samples."""
    payload = StageFile.read(run_dir).payload
    run_info = run_dir / "run.json"
    if run_info.is_file() and read_json(run_info, StageFileError, "run file").get("fingerprint") != payload["fingerprint"]:
        raise StageFileError(f"{run_dir / 'stages.json'} is stale: run.json belongs to another model; "
                             f"re-run `evotool analyze --out {run_dir}`")
    store = RunStore(run_dir)
    notes = []
    records = store.records() if store.samples_dir.is_dir() else []
    stored = store.read_token_strings()
    if records and stored is None:
        notes.append(f"{run_dir / 'token_strings.json'} is missing: tokens other than the generated ones are shown "
                     f"as ids; re-run `evotool analyze --out {run_dir}` to add it")
    emitted: dict[int, str] = {}
    objects = object_vocabulary(records, payload.get("object_vocab"))
    divergence = divergence_points(run_dir)
    views = []
    for record in records[:samples]:
        image = store.image_file(record)
        if image is None:
            notes.append(f"sample {record['id']}: image not found")
        views.append(sample_view(record, store.load_trace(record["id"], features=False),
                                 store.load_patch_lens(record["id"]), image_uri(image) if image else None,
                                 objects, divergence.get(record["id"], []), cfg.tokens, emitted))
    if len(records) > samples:
        notes.append(f"the page shows {samples} of {len(records)} samples and at most {cfg.tokens} tokens of each "
                     "(evotool report --samples / --tokens)")
    used = {i for v in views for i in _ids(v)}
    strings = {i: (stored or {}).get(i, emitted.get(i, f"#{i}")) for i in sorted(used)}
    return {
        "name": name, "model": payload["model"], "num_layers": payload["num_layers"],
        "lens": payload.get("lens"), "js_unit": payload.get("js_unit", "nats"),
        "critical_layer": payload["critical_layer"], "mutation_layers": payload["mutation_layers"],
        "stages": payload["stages"], "flags": payload.get("flags", []),
        "hallucination": payload.get("hallucination"), "curves": payload.get("curves"),
        "behaviour": behaviour(payload),
        "samples_total": payload.get("samples"), "tokens_total": payload.get("tokens"),
        "notes": notes, "figures": _figures(run_dir / "figures") if cfg.figures else [],
        "token_strings": {str(i): s for i, s in strings.items()}, "samples": views,
    }


def _ids(view: dict[str, Any]) -> set[int]:
    """Every token id a sample view refers to."""
    ids = set(view["token_ids"]) | set(np.unique(np.asarray(view["topk_ids"], dtype=np.int64)).tolist())
    ids |= {p["stable_top1"] for p in view["divergence"] if isinstance(p.get("stable_top1"), int)}
    if view["patch_lens"] is not None:
        ids |= set(np.unique(np.asarray(view["patch_lens"]["top1"], dtype=np.int64)).tolist())
    return ids


def report_data(run_dirs: Sequence[Path], cfg: ReportConfig) -> dict[str, Any]:
    """The report data of one run or an atlas of several (``cfg.samples`` split evenly over them)."""
    if not run_dirs:
        raise InputError("no run directory given")
    run_dirs = [Path(d) for d in run_dirs]
    names = [d.name for d in run_dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in run_dirs]
    per_run = max(1, cfg.samples // len(run_dirs))
    runs = [run_view(d, name, cfg, per_run) for d, name in zip(run_dirs, names)]
    title = f"Knowledge evolution: {runs[0]['model']}" if len(runs) == 1 else f"Stage atlas: {len(runs)} runs"
    return {"schema_version": REPORT_SCHEMA, "title": title, "runs": runs}


def render(data: dict[str, Any]) -> str:
    """The page: the template with its CSS, script and the report data inlined (no external resource)."""
    templates = resources.files("evotool.analysis") / "templates"
    text = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    return Template((templates / "report.html").read_text()).substitute(
        title=data["title"].replace("&", "&amp;").replace("<", "&lt;"),
        style=(templates / "report.css").read_text(), script=(templates / "report.js").read_text(), data=text)


def write_html_report(path: Path, run_dirs: Sequence[Path], cfg: ReportConfig) -> Path:
    """Build and atomically write ``report.html`` for ``run_dirs``; returns ``path``."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"report path {path} is a directory; give a file name such as {path / 'report.html'}")
    atomic_write_text(path, render(report_data(run_dirs, cfg)))
    return path

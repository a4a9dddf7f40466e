"""Compact per-token curves of an analysis run, for detector tests and offline study (``tests/data/zoo``).

:func:`export_curves` keeps, for up to ``max_tokens`` generated tokens of an ``evotool analyze`` run, the
per-layer arrays the detector reads ([T, L+1], layer 0 = embeddings): ``js_prev``, ``p_token``,
``cos_prev``, ``top1_flip`` (top-1 differs from the previous layer's), ``direct_flip`` / ``direct_js`` (the layer's
own update decides the final top-1 / the JS it causes there; runs that hold them) and the per-token ``decision_depth``,
plus ``sample`` (index of the sample each token belongs to), ``token_id`` and ``objects`` (object-word tokens of the
run's ``object_vocab``; runs whose ``stages.json`` names one). Floats are stored as float16;
``meta`` (a JSON string) names the member and, when the member has a ``behaviour.json``, its behavioural
critical / mutation layers.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from evotool.analysis.aggregate import decision_depth, direct_metric, stacked, token_ids, token_samples
from evotool.analysis.hallucination import object_mask
from evotool.analysis.store import RunStore
from evotool.errors import InputError
from evotool.io import atomic_write_bytes
from evotool.stages.behaviour import read_behaviour
from evotool.stages.file import STAGES_FILE, StageFile


def token_curves(run_dir: Path, max_tokens: int | None = None) -> dict[str, np.ndarray]:
    """The curves of every token of the run (first ``max_tokens`` tokens in sample order when given)."""
    loaded = RunStore(Path(run_dir)).load_all()
    if not loaded:
        raise InputError(f"no finished samples in {run_dir}")
    records, traces = [r for r, _ in loaded], [t for _, t in loaded]
    top1 = stacked(traces, "top1").astype(np.int64)
    token_id = token_ids(traces)
    flip = np.zeros_like(top1, dtype=bool)
    flip[:, 1:] = top1[:, 1:] != top1[:, :-1]
    curves = {name: stacked(traces, name) for name in ("js_prev", "p_token", "cos_prev")}
    curves |= {"top1_flip": flip, "decision_depth": decision_depth(top1, token_id), "sample": token_samples(traces),
               "token_id": token_id}
    flips, js = direct_metric(traces, "direct_flip"), direct_metric(traces, "direct_js")
    if flips is not None:
        curves["direct_flip"] = np.nan_to_num(flips).astype(bool)
    if js is not None:
        curves["direct_js"] = js.astype(np.float32)  # NaN at layer 0
    vocab = StageFile.read(run_dir).payload.get("object_vocab") if (Path(run_dir) / STAGES_FILE).is_file() else None
    if vocab:
        curves["objects"] = object_mask(records, set(vocab))
    return {k: v[:max_tokens] for k, v in curves.items()} if max_tokens else curves


def flips_after_js_drop(curves: dict[str, np.ndarray], fraction: float = 0.1, until: float = 0.5) -> float:
    """Share of tokens whose top-1 still changes in the early layers (up to ``until`` x L) after their adjacent-layer
    JS first fell to ``fraction`` of its peak: the pattern that makes an early critical layer look plausible while
    the decision is still open."""
    js = np.nan_to_num(curves["js_prev"].astype(np.float64))
    quiet = js[:, 1:] <= fraction * js.max(axis=1, keepdims=True)
    first = np.where(quiet.any(1), quiet.argmax(1) + 1, js.shape[1])  # first quiet layer per token
    layer = np.arange(js.shape[1])[None, :]
    window = (layer > first[:, None]) & (layer <= until * (js.shape[1] - 1))
    return float((curves["top1_flip"] & window).any(1).mean())


def export_curves(run_dir: Path, out: Path, member: str, max_tokens: int = 300) -> Path:
    """Write the run's compact curves to ``out`` (.npz, with a ``meta`` JSON string); returns ``out``."""
    curves = token_curves(run_dir, max_tokens)
    meta = {"member": member, "num_layers": curves["p_token"].shape[1] - 1, "run": str(run_dir), "tokens": len(curves["token_id"]),
            "flips_after_js_drop": flips_after_js_drop(curves)}
    behaviour = Path(run_dir).parent / "behaviour.json"
    if behaviour.is_file():
        bounds = read_behaviour(behaviour)["boundaries"]
        meta["behaviour"] = {k: bounds[k] for k in ("critical_layer", "mutation_layers", "removable_at_least_2")}
    arrays = {k: (v.astype(np.float16) if v.dtype.kind == "f" else v.astype(bool if v.dtype == bool else np.int16))
              for k, v in curves.items()}
    buf = io.BytesIO()
    np.savez_compressed(buf, meta=np.array(json.dumps(meta)), **arrays)
    atomic_write_bytes(out, buf.getvalue())
    return out

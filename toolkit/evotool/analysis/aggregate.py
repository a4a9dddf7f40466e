"""From per-sample traces to dataset-level tables, curves and stage boundaries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from evotool.io import atomic_write_bytes
from evotool.stages import StageConfig, StageResult, detect_stages
from evotool.trace import METRICS, SampleTrace


def decision_depth(top1: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """First layer from which the emitted token stays top-1 through the last layer: [T, L+1], [T] -> [T]."""
    agree = top1 == token_ids[:, None]
    # trailing run of True: cumulative product from the last layer backwards
    run = np.cumprod(agree[:, ::-1], axis=1)[:, ::-1]
    return agree.shape[1] - run.sum(axis=1)


def metric(trace: SampleTrace, name: str) -> np.ndarray:
    """One metric of one sample [T, L+1]; NaN when the run predates it."""
    values = trace.layers.get(name)
    return values if values is not None else np.full(trace.layers["p_token"].shape, np.nan)


def stacked(traces: list[SampleTrace], name: str) -> np.ndarray:
    """One metric of every token of every sample: [N, L+1]."""
    return np.concatenate([metric(t, name) for t in traces], axis=0)


def token_samples(traces: list[SampleTrace]) -> np.ndarray:
    """The index of the sample each token belongs to: [N]."""
    return np.concatenate([np.full(len(t.token_ids), i) for i, t in enumerate(traces)])


def token_ids(traces: list[SampleTrace]) -> np.ndarray:
    """The emitted token of every token position of every sample: [N] (int64)."""
    return np.concatenate([t.token_ids for t in traces]).astype(np.int64)


def direct_metric(traces: list[SampleTrace], name: str) -> np.ndarray | None:
    """A direct-effect metric (``direct_flip`` or ``direct_js``) of every token [N, L+1] (NaN at layer 0), or None
    when a sample was traced without it."""
    return stacked(traces, name) if all(name in t.layers for t in traces) else None


def detect(traces: list[SampleTrace], cfg: StageConfig, objects: np.ndarray | None = None) -> StageResult:
    """Stage boundaries of the whole run (tokens of one sample resampled together by the bootstrap); ``objects`` [N]:
    which tokens are object words."""
    depth = decision_depth(stacked(traces, "top1").astype(np.int64), token_ids(traces))
    return detect_stages(stacked(traces, "p_token"), direct_metric(traces, "direct_flip"), token_samples(traces), cfg, depth,
                         objects, direct_metric(traces, "direct_js"))


def summary_curves(traces: list[SampleTrace]) -> dict[str, dict[str, list[float | None]]]:
    """Per-layer median and quartiles of each metric over all tokens (null where undefined)."""
    curves = {}
    for name in METRICS:
        if name == "top1":
            continue
        values = stacked(traces, name).astype(np.float64)
        defined = np.isfinite(values).any(axis=0)  # js_prev / cos_prev do not exist at layer 0
        cols = {}
        for key, q in (("q25", 25), ("median", 50), ("q75", 75)):
            v = np.full(values.shape[1], np.nan)
            v[defined] = np.nanpercentile(values[:, defined], q, axis=0)
            cols[key] = [float(x) if np.isfinite(x) else None for x in v]
        curves[name] = cols
    return curves


def write_token_table(path: Path, records: list[dict[str, Any]], traces: list[SampleTrace], result: StageResult) -> None:
    """``tokens.parquet``: one row per (sample, step, layer)."""
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("sample", "step", "layer", "token_id", "decision_depth",
                                                         "token_critical", "token_mutation", *METRICS)}
    offset = 0
    for record, trace in zip(records, traces):
        t, n = trace.layers["p_token"].shape
        cols["sample"].append(np.repeat(np.array([record["id"]], dtype=object), t * n))
        cols["step"].append(np.repeat(np.arange(t), n))
        cols["layer"].append(np.tile(np.arange(n), t))
        cols["token_id"].append(np.repeat(trace.token_ids, n))
        cols["decision_depth"].append(np.repeat(decision_depth(trace.layers["top1"], trace.token_ids), n))
        for key, per_tok in (("token_critical", result.per_token_critical), ("token_mutation", result.per_token_mutation)):
            vals = np.array([-1 if v is None else v for v in per_tok[offset : offset + t]])
            cols[key].append(np.repeat(vals, n))
        for k in METRICS:
            cols[k].append(metric(trace, k).reshape(-1))
        offset += t
    data = {k: np.concatenate(v) for k, v in cols.items()}
    data["top1_id"] = data.pop("top1").astype(np.int64)
    data["rank"] = data["rank"].astype(np.int64)
    arrays = {k: pa.array(v, from_pandas=True) if v.dtype.kind == "f" else pa.array(v) for k, v in data.items()}
    for key in ("token_critical", "token_mutation"):  # -1 = none
        arrays[key] = pa.array(np.where(data[key] < 0, None, data[key]).tolist(), type=pa.int64())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(arrays), sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())

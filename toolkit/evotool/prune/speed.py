"""Side-by-side speed measurement of several models (full vs pruned) in one process.

Every repeat runs each model once, in turn (interleaved), and the median over repeats is reported, so
slow drifts of the machine (another job, thermal) hit all models alike. Decode throughput is measured
as (N - 1) / (t(N new tokens) - t(1 new token)) with generation forced to exactly N tokens, which
removes the prefill and the fixed ``generate`` overhead from the rate.

Clock: wall time on CUDA (after synchronising). On a CPU shared with other jobs, wall time measures the
scheduler more than the model, so ``clock="cpu"`` uses this process's CPU time (``time.process_time``;
with one torch thread that is the compute time of the run); the benchmark uses it on CPU.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` during generation (weights included); on CPU the
process's peak resident set during generation minus its resident set before (VmHWM is reset through
``/proc/self/clear_refs``), i.e. the activations and KV cache the run added on top of loaded weights.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evotool.generation import GREEDY
from evotool.models.loading import synchronize


@dataclass
class SpeedResult:
    """Medians for one model and batch size: ``prefill_s``, ``decode_tok_s`` (tokens per second per sequence x batch), ``peak_mb``."""

    prefill_s: float
    decode_tok_s: float
    peak_mb: float


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _peak_scope(device: torch.device) -> Callable[[], float]:
    """Start a peak-memory window; the returned function gives the window's peak in MB."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return lambda: torch.cuda.max_memory_allocated(device) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return lambda: float("nan")
    base = _rss_kb("VmRSS")
    return lambda: (_rss_kb("VmHWM") - base) / 1024


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def timer(clock: str) -> Callable[[], float]:
    """The ``CLOCKS`` timer ``clock`` (ValueError for another name). CPU time with several torch threads also counts
    their busy-waiting when other processes share the cores (measured on 2 shared cores: greedy 11x the CPU time of
    one thread, latency ratios 0.4-6.0 against 0.9-1.9), so that case prints one stderr warning."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, not {clock!r}")
    if clock == "cpu" and torch.get_num_threads() > 1:
        print(f"warning: timing CPU time with {torch.get_num_threads()} torch threads, which also counts their "
              "busy-waiting when other processes share the cores (ratios then scatter); run `evotool --threads 1 ...` "
              "(or set OMP_NUM_THREADS=1) for stable ones", file=sys.stderr)
    return CLOCKS[clock]


@torch.inference_mode()
def _generate_seconds(model: nn.Module, inputs: dict[str, torch.Tensor], n: int, clock: Callable[[], float]) -> float:
    synchronize(model.device)
    start = clock()
    model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **GREEDY)
    synchronize(model.device)
    return clock() - start


@torch.inference_mode()
def _prefill_seconds(model: nn.Module, inputs: dict[str, torch.Tensor], clock: Callable[[], float]) -> float:
    synchronize(model.device)
    start = clock()
    model(**inputs, use_cache=True)
    synchronize(model.device)
    return clock() - start


def measure(models: dict[str, nn.Module], inputs: dict[str, torch.Tensor], new_tokens: int = 32, repeats: int = 5,
            warmup: int = 1, clock: str = "wall") -> dict[str, SpeedResult]:
    """Median prefill latency, decode throughput and peak memory of each model on the same ``inputs``."""
    if new_tokens < 2 or repeats < 1:
        raise ValueError("need new_tokens >= 2 and repeats >= 1")
    tick = timer(clock)  # ValueError for an unknown clock
    batch = inputs["input_ids"].shape[0]
    for model in models.values():
        for _ in range(warmup):
            _generate_seconds(model, inputs, 2, tick)
    samples: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": [], "peak": []} for k in models}
    for _ in range(repeats):
        for name, model in models.items():
            rec = samples[name]
            rec["prefill"].append(_prefill_seconds(model, inputs, tick))
            one = _generate_seconds(model, inputs, 1, tick)
            peak = _peak_scope(model.device)
            full = _generate_seconds(model, inputs, new_tokens, tick)
            rec["peak"].append(peak())
            rec["decode"].append(batch * (new_tokens - 1) / max(full - one, 1e-9))
    return {name: SpeedResult(statistics.median(r["prefill"]), statistics.median(r["decode"]), statistics.median(r["peak"]))
            for name, r in samples.items()}


def ratios(full: SpeedResult, pruned: SpeedResult, num_layers: int, removed: int) -> dict[str, Any]:
    """Speedups of ``pruned`` over ``full`` and the decode efficiency: measured speedup / ideal L / (L - k)."""
    ideal = num_layers / (num_layers - removed)
    decode = pruned.decode_tok_s / full.decode_tok_s
    return {"prefill_speedup": full.prefill_s / pruned.prefill_s, "decode_speedup": decode, "ideal": ideal,
            "efficiency": decode / ideal}

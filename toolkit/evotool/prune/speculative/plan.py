"""Which layers the draft skips and how far it drafts: validation, the stage-guided ranking, and ``auto``.

* :func:`check_skip` refuses a skip set with layers outside 1..L, a cache-reference layer (layer 1, the first
  layer of each attention type: :func:`evotool.prune.runtime.cache_reference_layers`) or the critical layer.
* :func:`skip_ranking`: the stage selector's ranking (:func:`evotool.prune.select.rank_stage`) of the
  stabilization stage (with ``keep_mutation=False`` also of the mutation stage: the verifier still runs those
  layers, so a draft may skip them at the cost of the tokens they overturn), most redundant first,
  cache-reference layers and the critical layer excluded; ``skip=N`` takes its first N layers.
* :func:`calibrate_draft` (``skip=auto``): measures tokens per second of plain greedy and of candidate
  plans on calibration batches and keeps the fastest; when no plan beats plain greedy the plan is plain
  greedy (an empty skip set). ``auto`` searches two rankings, the stable stage's and the stable and mutation
  stages' together (``keep_mutation`` only chooses the ranking of ``skip=N``). Search, all measured: every skip
  size N of every ranking (the first N ranked layers; a set two rankings share is measured once) at the
  middle of ``draft_lengths``, then the fastest size at the other draft lengths, with ``reuse_prefix``
  flipped (it saves verifier compute but costs one more forward call per round) and, at the longest draft
  length, with each adaptive stop of ``thresholds`` (drafting ends once the draft's top-1 probability falls
  below it; 0.4 is transformers' default for its assistant's confidence), then a fresh measurement
  of the winner against plain greedy (median of at least three passes) that decides: the plan must be at least
  ``min_gain`` (5%) faster, the spread of repeated greedy-vs-greedy timings on a shared CPU (a one-of-12-layer skip
  confirmed at 1.016x once ran at 0.79x on held-out data); each pass interleaves its candidates with plain greedy
  (rotating order, ``repeats`` times, median). Clock: wall time on CUDA, this process's CPU time on CPU
  (:data:`evotool.prune.speed.CLOCKS`; the CPU here is shared). A plan's score is its measured speedup capped
  by its counted bound ``1 / forward_equivalents``: a plan cannot beat greedy by more than the layer calls it
  saves (its draft and verify calls each pay greedy's per-call overheads, and a verify over k+1 positions costs
  at least one step), so a noisy measurement above the bound is read as the bound (on a shared CPU a 2-of-24
  layer skip once measured 1.27x greedy).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from evotool.data.inputs import Sample, load_samples
from evotool.errors import ConfigError
from evotool.generation import batches, build_inputs, generate_ids, load_images
from evotool.models.loading import synchronize
from evotool.models.registry import decoder_parts
from evotool.prune.calibrate import calibrate
from evotool.prune.runtime import cache_reference_layers, check_runtime_skip
from evotool.prune.select import CalibrationStats, SelectionContext, rank_stage
from evotool.prune.speculative.decoding import SpeculativeStats, speculative_decoding
from evotool.prune.speed import CLOCKS
from evotool.stages import StageFile

REDUNDANCY = ("cosine", "js", "influence")
SUMMARY = ("acceptance_rate", "tokens_per_step", "forward_equivalents")


@dataclass
class SpeculativeConfig:
    """Options of the ``stage_speculative`` decoding method (``--set key=value``)."""

    skip: str = field(default="auto", metadata={"help": "draft skip set: auto (calibrated by measured tokens/s) or N (the N most redundant stable-stage layers)"})
    layers: list[int] | None = field(default=None, metadata={"help": "explicit draft skip set (1..L); overrides skip"})
    max_draft: int = field(default=4, metadata={"help": "draft tokens per verify step (auto: calibrated)"})
    threshold: float = field(default=0.0, metadata={"help": "stop drafting when the draft's top-1 probability falls below this (auto: also measures 0.4)"})
    reuse_prefix: bool = field(default=False, metadata={"help": "verify from the draft's state at the first skipped layer (exact; saves compute, costs a forward call; auto: calibrated)"})
    redundancy: str = field(default="cosine", metadata={"help": "stable-stage ranking: cosine or js (from stages.json) or influence (calibration pass)"})
    keep_mutation: bool = field(default=True, metadata={"help": "skip=N: the draft never skips mutation-stage layers (false: it may, ranked with the stable stage's; the verifier runs them); auto measures both"})
    calibration_data: str | None = field(default=None, metadata={"help": "auto / influence: manifest, image folder or dataset; default: synthetic-world training samples"})
    calibration_samples: int = field(default=8, metadata={"help": "auto / influence: calibration samples"})
    calibration_tokens: int = field(default=32, metadata={"help": "auto: new tokens per calibration sample"})
    min_gain: float = field(default=0.05, metadata={"help": "auto: keep plain greedy unless the re-measured plan is at least this much faster (0.05 = 5%)"})

    def __post_init__(self) -> None:
        if self.skip != "auto" and not (str(self.skip).isdigit() and int(self.skip) >= 1):
            raise ConfigError(f"skip must be auto or a number >= 1, got {self.skip!r}")
        self.skip = str(self.skip)
        if self.max_draft < 1 or self.calibration_samples < 1 or self.calibration_tokens < 2:
            raise ConfigError("max_draft and calibration_samples must be >= 1, calibration_tokens >= 2")
        if self.min_gain < 0.0:
            raise ConfigError(f"min_gain must be >= 0, got {self.min_gain}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must lie in [0, 1], got {self.threshold}")
        if self.redundancy not in REDUNDANCY:
            raise ConfigError(f"unknown redundancy {self.redundancy!r}; choose one of {', '.join(REDUNDANCY)}")


@dataclass
class DraftPlan:
    """A draft: the layers it skips (1..L; empty = plain greedy), draft length, stop threshold, prefix reuse."""

    skip: list[int]
    max_draft: int = 4
    threshold: float = 0.0
    reuse_prefix: bool = False

    def generate_kwargs(self, stats: SpeculativeStats | None = None) -> dict[str, Any]:
        """Keyword arguments for ``model.generate`` (none for plain greedy)."""
        if not self.skip:
            return {}
        return {"custom_generate": speculative_decoding, "draft_skip": list(self.skip), "max_draft": self.max_draft,
                "draft_threshold": self.threshold, "reuse_prefix": self.reuse_prefix, "speculative_stats": stats}


def _critical(stages: StageFile | None) -> int | None:
    """The stage file's critical layer, if any."""
    return stages.critical_layer if stages else None


def check_skip(model: nn.Module, layers: Sequence[int], stages: StageFile | None = None) -> list[int]:
    """Sorted skip set; :class:`ConfigError` naming the problem for a bad one (see module docstring)."""
    if not layers:
        raise ConfigError("the draft must skip at least one layer")
    chosen = check_runtime_skip(model, layers)
    critical = _critical(stages)
    if critical in chosen:
        raise ConfigError(f"layer {critical} is the critical layer, which the draft must keep (the stage-guided "
                          "draft skips layers after it)")
    return chosen


def skip_ranking(model: nn.Module, stages: StageFile, redundancy: str = "cosine",
                 stats: CalibrationStats | None = None, keep_mutation: bool = True) -> list[int]:
    """Skippable stabilization-stage layers (``keep_mutation=False``: and mutation-stage layers), most redundant
    first (the stage selector's ranking)."""
    n = decoder_parts(model).num_layers
    protected = set(cache_reference_layers(model)) | ({_critical(stages)} - {None})
    ctx = SelectionContext(num_layers=n, stages=stages, stats=stats, protected=protected, redundancy=redundancy,
                           keep_mutation=keep_mutation)
    ranked = rank_stage(ctx)[0]
    if not ranked:
        where = "stabilization stage" + ("" if keep_mutation else " and the mutation stage")
        raise ConfigError(f"the {where} {'has' if keep_mutation else 'have'} no layer the draft can skip")
    return ranked


def skip_first(ranking: Sequence[int], n: int) -> list[int]:
    """The first ``n`` ranked layers, sorted; :class:`ConfigError` when fewer are available."""
    if n > len(ranking):
        raise ConfigError(f"cannot skip {n} layers: only {len(ranking)} skippable layers {sorted(ranking)}")
    return sorted(ranking[:n])


@dataclass
class Calibration:
    """Result of :func:`calibrate_draft`: the chosen plan and every measured candidate.

    ``rows``: one dict per candidate (``skip``, ``max_draft``, ``threshold``, ``reuse_prefix``, ``tokens_per_s``, ``speedup`` over plain
    greedy timed in the same interleaved pass, ``acceptance_rate``, ``tokens_per_step``,
    ``forward_equivalents``, ``bound`` = 1 / forward_equivalents, ``score`` = min(speedup, bound));
    ``greedy_tokens_per_s`` (first pass); ``confirmed_speedup``: the best-scoring candidate re-measured against
    plain greedy, capped by its bound (the plan is plain greedy unless it exceeds 1 + ``min_gain``);
    ``seconds``: total calibration time; ``clock``: wall or cpu.
    """

    plan: DraftPlan
    rows: list[dict[str, Any]]
    greedy_tokens_per_s: float
    confirmed_speedup: float
    seconds: float
    clock: str

    def summary(self) -> dict[str, Any]:
        """JSON-ready record."""
        return {"plan": asdict(self.plan), "greedy_tokens_per_s": self.greedy_tokens_per_s,
                "confirmed_speedup": self.confirmed_speedup, "seconds": self.seconds, "clock": self.clock,
                "candidates": self.rows}


def _timed(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], plan: DraftPlan, max_new_tokens: int,
           clock: Any) -> tuple[float, int, SpeculativeStats]:
    """Seconds and emitted tokens (cut after EOS) of generating every batch with ``plan``, and its counters."""
    stats = SpeculativeStats()
    synchronize(model.device)
    start = clock()
    tokens = sum(len(row) for batch in batches
                 for row in generate_ids(model, dict(batch), max_new_tokens, **plan.generate_kwargs(stats)))
    synchronize(model.device)
    return clock() - start, tokens, stats


def calibrate_draft(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
                    rankings: Sequence[Sequence[int]], max_new_tokens: int = 32, draft_lengths: Sequence[int] = (2, 4, 8),
                    threshold: float = 0.0, reuse_prefix: bool = False, repeats: int = 2,
                    clock: str | None = None, min_gain: float = 0.05,
                    thresholds: Sequence[float] = (0.4,)) -> Calibration:
    """Pick the fastest plan on ``batches`` (prepared ``generate`` inputs) by measured tokens/s (module docstring);
    ``rankings``: one or more skip rankings (most redundant first) whose every prefix is a candidate skip set."""
    sets = list(dict.fromkeys(tuple(skip_first(r, n)) for r in rankings for n in range(1, len(r) + 1)))
    if not batches or not sets or repeats < 1:
        raise ConfigError("calibration needs at least one batch, one skippable layer and repeats >= 1")
    if not draft_lengths or min(draft_lengths) < 1:
        raise ConfigError("draft_lengths must hold at least one length >= 1")
    clock = clock or ("wall" if model.device.type == "cuda" else "cpu")
    tick = CLOCKS[clock]
    begin = tick()

    def measure(plans: list[DraftPlan], passes: int = repeats) -> tuple[list[dict[str, Any]], float]:
        """Rows of ``plans`` with speedups over plain greedy timed alongside (interleaved, rotating order)."""
        plans = [DraftPlan([])] + plans
        times: list[list[float]] = [[] for _ in plans]
        runs: dict[int, tuple[float, int, SpeculativeStats]] = {}
        for r in range(passes):
            order = list(range(len(plans)))
            for i in order[r % len(order):] + order[: r % len(order)]:
                runs[i] = _timed(model, batches, plans[i], max_new_tokens, tick)
                times[i].append(runs[i][0])
        rate = [runs[i][1] / statistics.median(times[i]) for i in range(len(plans))]
        rows = [{"skip": p.skip, "max_draft": p.max_draft, "threshold": p.threshold, "reuse_prefix": p.reuse_prefix,
                 "tokens_per_s": rate[i],
                 "speedup": rate[i] / rate[0],
                 **{k: v for k, v in runs[i][2].summary().items() if k in SUMMARY}}
                for i, p in enumerate(plans) if i > 0]
        for row in rows:
            row["bound"] = 1.0 / row["forward_equivalents"] if row["forward_equivalents"] > 0 else float("inf")
            row["score"] = min(row["speedup"], row["bound"])
        return rows, rate[0]

    _timed(model, batches[:1], DraftPlan(list(sets[0]), 2, threshold, reuse_prefix), 2, tick)  # warm-up
    middle = sorted(draft_lengths)[len(draft_lengths) // 2]
    rows, base = measure([DraftPlan(list(skip), middle, threshold, reuse_prefix) for skip in sets])
    fastest = max(rows, key=lambda row: row["score"])["skip"]
    more = [DraftPlan(fastest, d, threshold, reuse_prefix) for d in draft_lengths if d != middle]
    more.append(DraftPlan(fastest, middle, threshold, not reuse_prefix))
    more += [DraftPlan(fastest, max(draft_lengths), t, reuse_prefix) for t in thresholds if t != threshold]
    rows += measure(more)[0]
    best = max(rows, key=lambda row: row["score"])
    plan = DraftPlan(best["skip"], best["max_draft"], best["threshold"], best["reuse_prefix"])
    # a fresh measurement of the winner (the maximum of noisy rows is biased upwards), a median of at least three
    # interleaved passes so that one disturbed pass cannot decide
    confirm = measure([plan], max(3, repeats))[0][0]
    confirmed = confirm["score"] > 1.0 + min_gain
    return Calibration(plan if confirmed else DraftPlan([]), rows, base, confirm["score"], tick() - begin, clock)


def calibration_inputs(processor: Any, samples: Sequence[Sample], batch_size: int,
                       device: torch.device) -> list[dict[str, torch.Tensor]]:
    """``samples`` as prepared ``generate`` batches of ``batch_size``."""
    return [build_inputs(processor, load_images(chunk)[1], [s.prompt for s in chunk], device)
            for chunk in batches(samples, batch_size)]


def resolve_plan(model: nn.Module, stages: StageFile, config: SpeculativeConfig, processor: Any = None,
                 samples: Sequence[Sample] | None = None, batch_size: int = 1) -> tuple[DraftPlan, Calibration | None]:
    """The draft plan of ``config`` for ``model``: explicit ``layers``, the first N ranked layers, or ``auto``.

    ``auto`` and ``redundancy=influence`` run on ``samples`` (default: ``config.calibration_data`` or
    synthetic-world training samples, never the world's test split) through ``processor`` (default: the one
    saved with the model), in batches of
    ``batch_size`` (use the batch size you will generate with: acceptance of a batch is its worst row's).
    """
    opts = dict(max_draft=config.max_draft, threshold=config.threshold, reuse_prefix=config.reuse_prefix)
    if config.layers is not None:
        return DraftPlan(check_skip(model, config.layers, stages), **opts), None
    needs_data = config.skip == "auto" or config.redundancy == "influence"
    if needs_data and processor is None:
        processor = saved_processor(model)
    if needs_data and samples is None:
        samples = _calibration_samples(config)
    stats = calibrate(model, processor, samples) if config.redundancy == "influence" else None
    if config.skip != "auto":
        ranking = skip_ranking(model, stages, config.redundancy, stats, config.keep_mutation)
        return DraftPlan(check_skip(model, skip_first(ranking, int(config.skip)), stages), **opts), None
    both = skip_ranking(model, stages, config.redundancy, stats, keep_mutation=False)
    first, last = stages.stable_range
    stable = [i for i in both if first <= i <= last]  # the stable stage's ranking: the same scores, the same order
    rankings = [r for r in (stable, both) if r]
    batches = calibration_inputs(processor, samples, min(batch_size, len(samples)), model.device)
    cal = calibrate_draft(model, batches, rankings, config.calibration_tokens, threshold=config.threshold,
                          reuse_prefix=config.reuse_prefix, min_gain=config.min_gain)
    return cal.plan, cal


def saved_processor(model: nn.Module) -> Any:
    """The processor saved beside ``model``'s weights (``model.name_or_path``); :class:`ConfigError` if none loads."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model.name_or_path)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"skip=auto and redundancy=influence calibrate on images and need the model's processor, "
                          f"which does not load from {model.name_or_path!r}; pass it (Method.generate) or use "
                          "skip=N with redundancy cosine or js") from err


def _calibration_samples(config: SpeculativeConfig) -> list[Sample]:
    if config.calibration_data is not None:
        return load_samples(config.calibration_data, limit=config.calibration_samples)
    from evotool.finetune import world_samples

    return world_samples(config.calibration_samples)

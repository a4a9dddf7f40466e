"""Which decoder layers to remove: the stage-guided selector and four baselines, one function each.

Every selector has the signature ``(k, ctx) -> Selection`` and never returns a protected layer
(``ctx.protected``: the critical layer under ``--keep-critical``). Layers are numbered 1..L.

* ``stage``: only layers of the stabilization stage (``[C+1, M-1]`` from stages.json; with
  ``keep_mutation=False`` also the mutation stage), ranked by redundancy: ``influence`` (block
  influence from calibration, lowest first), ``js`` (median adjacent-layer JS of the analysis, lowest
  first) or ``cosine`` (median adjacent hidden cosine of the analysis, highest first).
* ``block-influence`` (ShortGPT, Men et al. 2024): the k layers of lowest BI_i = 1 - E[cos(h_{i-1}, h_i)].
* ``angular`` (Gromov et al. 2024): the contiguous block i+1..i+k minimising the angular distance
  arccos(cos(h_i, h_{i+k})) / pi.
* ``last``: the last k layers; ``random``: k layers drawn with ``ctx.seed``.

Calibration statistics (:func:`evotool.prune.calibrate.calibrate`) use every non-padding position of
teacher-forced world samples (prompt + answer), captured with forward hooks before the final norm.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from evotool.errors import ConfigError
from evotool.stages import StageFile


@dataclass
class CalibrationStats:
    """``block_influence`` [L+1] (index 0 NaN) and ``angular`` [L+1, L+1] (angular[i, j], i < j) over ``tokens`` positions."""

    block_influence: np.ndarray
    angular: np.ndarray
    tokens: int


@dataclass
class SelectionContext:
    """What the selectors may use."""

    num_layers: int
    stages: StageFile | None = None
    stats: CalibrationStats | None = None
    protected: set[int] = field(default_factory=set)
    redundancy: str = "influence"
    keep_mutation: bool = True
    seed: int = 0

    def need_stats(self) -> CalibrationStats:
        if self.stats is None:
            raise ConfigError("this selector needs calibration statistics")
        return self.stats

    def free(self, layers: Sequence[int]) -> list[int]:
        return [i for i in layers if i not in self.protected]


@dataclass
class Selection:
    """Layers to remove (1..L, sorted) and, per layer, why."""

    removed: list[int]
    reasons: dict[int, str]
    selector: str


def _budget_error(k: int, available: int, what: str) -> ConfigError:
    """``what`` names the available kind in the plural ("removable layers in ...")."""
    return ConfigError(f"cannot remove {k} layers: only {available} {what.replace('layers', 'layer', 1) if available == 1 else what}")


# Rankings of the stage selector (see the module docstring).
REDUNDANCY = ("influence", "js", "cosine")


def rank_stage(ctx: SelectionContext) -> tuple[list[int], dict[int, float], str]:
    """The stage selector's candidates, most redundant first, with each one's score (lower = more
    redundant) and the reason format (see module docstring)."""
    if ctx.stages is None:
        raise ConfigError("the stage selector needs a stages.json (or the on-the-fly analysis)")
    first, last = ctx.stages.stable_range
    pool = list(range(first, last + 1))
    if not ctx.keep_mutation:
        pool += ctx.stages.stage_layers("mutation")
    pool = ctx.free([i for i in pool if i >= 1])
    if ctx.redundancy == "influence":
        score = {i: float(ctx.need_stats().block_influence[i]) for i in pool}
        label = "block influence {:.4f}"
    elif ctx.redundancy in ("js", "cosine"):
        curves = ctx.stages.payload.get("curves") or {}
        key = "js_prev" if ctx.redundancy == "js" else "cos_prev"
        if key not in curves:
            raise ConfigError(f"stages.json has no {key} curve for --redundancy {ctx.redundancy}")
        sign = 1.0 if ctx.redundancy == "js" else -1.0
        score = {i: sign * float(curves[key]["median"][i]) for i in pool}
        label = "median adjacent JS {:.4g}" if ctx.redundancy == "js" else "median adjacent cosine {:.4f} (negated)"
    else:
        raise ConfigError(f"unknown redundancy {ctx.redundancy!r}; choose one of {', '.join(REDUNDANCY)}")
    return sorted(pool, key=lambda i: score[i]), score, label


def select_stage(k: int, ctx: SelectionContext) -> Selection:
    """The k most redundant layers of the stabilization stage (see module docstring)."""
    ranked, score, label = rank_stage(ctx)
    if k > len(ranked):
        where = "stabilization" + ("" if ctx.keep_mutation else " + mutation")
        raise _budget_error(k, len(ranked), f"removable layers in the {where} stage {sorted(ranked)} (--selector "
                            "block-influence ranks every layer by measured redundancy)")
    chosen = sorted(ranked[:k])
    return Selection(chosen, {i: f"stabilization stage, {label.format(score[i])}" for i in chosen}, "stage")


def select_block_influence(k: int, ctx: SelectionContext) -> Selection:
    """ShortGPT: the k layers of lowest block influence."""
    bi = ctx.need_stats().block_influence
    pool = ctx.free(range(1, ctx.num_layers + 1))
    if k > len(pool):
        raise _budget_error(k, len(pool), "unprotected layers")
    chosen = sorted(sorted(pool, key=lambda i: bi[i])[:k])
    return Selection(chosen, {i: f"block influence {bi[i]:.4f}" for i in chosen}, "block-influence")


def select_angular(k: int, ctx: SelectionContext) -> Selection:
    """Gromov et al.: the contiguous block of k layers whose input and output are closest in angle."""
    ang = ctx.need_stats().angular
    best: tuple[float, int] | None = None
    for start in range(0, ctx.num_layers - k + 1):  # removes layers start+1 .. start+k
        block = range(start + 1, start + k + 1)
        if any(i in ctx.protected for i in block):
            continue
        if best is None or ang[start, start + k] < best[0]:
            best = (float(ang[start, start + k]), start)
    if best is None:
        raise _budget_error(k, 0, "contiguous unprotected blocks of that size")
    chosen = list(range(best[1] + 1, best[1] + k + 1))
    return Selection(chosen, {i: f"block {chosen[0]}..{chosen[-1]}, angular distance {best[0]:.4f}" for i in chosen},
                     "angular")


def select_last(k: int, ctx: SelectionContext) -> Selection:
    """The last k unprotected layers."""
    pool = ctx.free(range(1, ctx.num_layers + 1))
    if k > len(pool):
        raise _budget_error(k, len(pool), "unprotected layers")
    chosen = pool[len(pool) - k :]
    return Selection(chosen, {i: "drop-last-k baseline" for i in chosen}, "last")


def select_random(k: int, ctx: SelectionContext) -> Selection:
    """k unprotected layers drawn uniformly with ``ctx.seed``."""
    pool = ctx.free(range(1, ctx.num_layers + 1))
    if k > len(pool):
        raise _budget_error(k, len(pool), "unprotected layers")
    chosen = sorted(random.Random(ctx.seed).sample(pool, k))
    return Selection(chosen, {i: f"random baseline (seed {ctx.seed})" for i in chosen}, "random")


SELECTORS: dict[str, Callable[[int, SelectionContext], Selection]] = {
    "stage": select_stage,
    "block-influence": select_block_influence,
    "angular": select_angular,
    "last": select_last,
    "random": select_random,
}
NEEDS_STATS = {"block-influence", "angular"}


def needs_stats(selector: str, redundancy: str) -> bool:
    """Whether ``selector`` needs a calibration pass."""
    return selector in NEEDS_STATS or (selector == "stage" and redundancy == "influence")


def budget(num_layers: int, drop: int | None = None, ratio: float | None = None, speedup: float | None = None) -> int:
    """Layers to remove from exactly one of: a count, a fraction of L, or an ideal speedup L / (L - k) to reach."""
    given = [x is not None for x in (drop, ratio, speedup)]
    if sum(given) != 1:
        raise ConfigError("give exactly one of --drop, --ratio or --speedup")
    if drop is not None:
        k = drop
    elif ratio is not None:
        if not 0.0 < ratio < 1.0:
            raise ConfigError(f"--ratio must lie in (0, 1), got {ratio}")
        k = round(ratio * num_layers)
    else:
        if speedup <= 1.0:  # type: ignore[operator]
            raise ConfigError(f"--speedup must be > 1, got {speedup}")
        k = int(np.ceil(num_layers * (1.0 - 1.0 / speedup) - 1e-9))  # type: ignore[operator]
    if not 1 <= k < num_layers:
        raise ConfigError(f"the budget gives {k} layers to remove; it must lie in 1..{num_layers - 1}")
    return k

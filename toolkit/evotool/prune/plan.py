"""From a model, its stages and a :class:`PruneConfig` to the layers to remove, with the refusals.

Refused (:class:`EvotoolError`): a stages.json of another model (fingerprint) or another depth; an
explicit ``--layers`` list holding the critical layer under ``--keep-critical``; a budget larger than
the removable layers (for the stage selector: the stabilization stage). Warned: an explicit list with
mutation-stage layers, or the critical layer without ``--keep-critical``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

from evotool.errors import ConfigError, StageFileError
from evotool.prune.calibrate import calibrate
from evotool.prune.config import PruneConfig
from evotool.prune.select import SELECTORS, CalibrationStats, Selection, SelectionContext, budget, needs_stats
from evotool.prune.static import check_layers
from evotool.stages import StageFile


def explicit_selection(layers: list[int], stages: StageFile, cfg: PruneConfig) -> Selection:
    """``--layers``: checked against the critical layer and the mutation stage."""
    chosen = check_layers(layers, stages.num_layers)
    critical = stages.critical_layer
    if critical in chosen:
        if cfg.keep_critical:
            raise ConfigError(f"layer {critical} is the critical layer and --keep-critical is on; "
                              "pass --no-keep-critical to remove it anyway")
        warnings.warn(f"removing the critical layer {critical}: expect a large quality loss", stacklevel=2)
    in_mutation = sorted(set(stages.stage_layers("mutation")) & set(chosen))
    if in_mutation and cfg.keep_mutation:
        warnings.warn(f"layers {in_mutation} belong to the mutation stage", stacklevel=2)
    reasons = {i: "requested explicitly" + (" (critical layer)" if i == critical else "") for i in chosen}
    return Selection(chosen, reasons, "explicit")


def plan(model: nn.Module, processor: Any, stages: StageFile, cfg: PruneConfig,
         stats: CalibrationStats | None = None) -> tuple[Selection, CalibrationStats | None]:
    """The layers to remove and the calibration statistics used (computed here when needed and not given)."""
    if cfg.layers is not None:
        return explicit_selection(cfg.layers, stages, cfg), stats
    n = stages.num_layers
    k = budget(n, cfg.drop, cfg.ratio, cfg.speedup)
    if stats is None and needs_stats(cfg.selector, cfg.redundancy):
        from evotool.finetune import world_samples

        stats = calibrate(model, processor, world_samples(cfg.calibration_samples, seed=cfg.seed))
    ctx = SelectionContext(num_layers=n, stages=stages, stats=stats,
                           protected={stages.critical} if cfg.keep_critical and stages.critical_layer else set(),
                           redundancy=cfg.redundancy, keep_mutation=cfg.keep_mutation, seed=cfg.seed)
    return SELECTORS[cfg.selector](k, ctx), stats


def plan_selectors(model: nn.Module, processor: Any, stages: StageFile, cfg: PruneConfig,
                   selectors: Sequence[str] = tuple(SELECTORS)) -> dict[str, Selection | str]:
    """Each selector's plan at ``cfg``'s budget, or the reason it does not apply (e.g. a stabilization stage
    shorter than k); the calibration statistics are computed once, by the first selector that needs them."""
    out: dict[str, Selection | str] = {}
    stats = None
    for sel in selectors:
        try:
            out[sel], stats = plan(model, processor, stages, dataclasses.replace(cfg, selector=sel), stats)
        except (ConfigError, StageFileError) as err:
            out[sel] = str(err)
    return out

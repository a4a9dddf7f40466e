"""From a model, its stages and a :class:`PruneConfig` to the layers to remove, with the refusals.

Refused (:class:`EvotoolError`): a stages.json of another model (fingerprint) or another depth; an
explicit ``--layers`` list holding the critical layer under ``--keep-critical``; a budget larger than
the removable layers (for the stage selector: the stabilization stage). Warned: an explicit list with
mutation-stage layers, or the critical layer without ``--keep-critical``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import nn

from evotool.analysis.schema import read_stages
from evotool.errors import ConfigError, StageFileError
from evotool.models.loading import fingerprint
from evotool.models.registry import decoder_parts
from evotool.prune.config import PruneConfig
from evotool.prune.select import SELECTORS, CalibrationStats, Selection, SelectionContext, budget, calibrate, needs_stats
from evotool.prune.static import check_layers


def load_stages(path: Path, model: nn.Module) -> dict[str, Any]:
    """Read ``path`` and check that it was computed on ``model`` (same fingerprint and depth)."""
    stages = read_stages(path, fingerprint(model))
    n = decoder_parts(model).num_layers
    if stages["num_layers"] != n:
        raise StageFileError(f"{path} describes {stages['num_layers']} layers, the model has {n}")
    return stages


def _mutation_stage(stages: dict[str, Any]) -> set[int]:
    mut = stages["stages"]["mutation"]
    return set(range(mut[0], mut[1] + 1)) if mut else set()


def explicit_selection(layers: list[int], stages: dict[str, Any], cfg: PruneConfig) -> Selection:
    """``--layers``: checked against the critical layer and the mutation stage."""
    chosen = check_layers(layers, stages["num_layers"])
    critical = stages["critical_layer"]
    if critical in chosen:
        if cfg.keep_critical:
            raise ConfigError(f"layer {critical} is the critical layer and --keep-critical is on; "
                              "pass --no-keep-critical to remove it anyway")
        warnings.warn(f"removing the critical layer {critical}: expect a large quality loss", stacklevel=2)
    in_mutation = sorted(_mutation_stage(stages) & set(chosen))
    if in_mutation and cfg.keep_mutation:
        warnings.warn(f"layers {in_mutation} belong to the mutation stage", stacklevel=2)
    reasons = {i: "requested explicitly" + (" (critical layer)" if i == critical else "") for i in chosen}
    return Selection(chosen, reasons, "explicit")


def plan(model: nn.Module, processor: Any, stages: dict[str, Any], cfg: PruneConfig,
         stats: CalibrationStats | None = None) -> tuple[Selection, CalibrationStats | None]:
    """The layers to remove and the calibration statistics used (computed here when needed and not given)."""
    if cfg.layers is not None:
        return explicit_selection(cfg.layers, stages, cfg), stats
    n = stages["num_layers"]
    k = budget(n, cfg.drop, cfg.ratio, cfg.speedup)
    if stats is None and needs_stats(cfg.selector, cfg.redundancy):
        from evotool.finetune import world_samples

        stats = calibrate(model, processor, world_samples(cfg.calibration_samples, seed=cfg.seed))
    critical = stages["critical_layer"]
    ctx = SelectionContext(num_layers=n, stages=stages, stats=stats,
                           protected={critical} if cfg.keep_critical and critical else set(),
                           redundancy=cfg.redundancy, keep_mutation=cfg.keep_mutation, seed=cfg.seed)
    return SELECTORS[cfg.selector](k, ctx), stats

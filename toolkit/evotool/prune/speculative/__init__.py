"""Lossless stable-stage skipping: self-speculative greedy decoding with a stage-guided draft (docs/prune.md)."""

from evotool.prune.speculative.decoding import SpeculativeStats, speculative_decoding, speculative_generate
from evotool.prune.speculative.plan import (
    Calibration,
    DraftPlan,
    SpeculativeConfig,
    calibrate_draft,
    check_skip,
    resolve_plan,
    skip_ranking,
)

__all__ = [
    "Calibration",
    "DraftPlan",
    "SpeculativeConfig",
    "SpeculativeStats",
    "calibrate_draft",
    "check_skip",
    "resolve_plan",
    "skip_ranking",
    "speculative_decoding",
    "speculative_generate",
]

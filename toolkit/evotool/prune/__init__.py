"""Stage-guided pruning: static layer removal, runtime skipping / early exit, selection baselines.

See docs/prune.md. Layers are numbered 1..L as in the analysis (decoder layer i = ``parts.layers[i - 1]``).
"""

from evotool.prune.config import PruneConfig
from evotool.prune.evaluate import token_agreement
from evotool.prune.plan import plan
from evotool.prune.runtime import MODES, DynamicExit, exit_after, mode_layers, skip_layers
from evotool.prune.select import SELECTORS, CalibrationStats, Selection, SelectionContext, budget, calibrate
from evotool.prune.static import remove_layers

__all__ = [
    "MODES",
    "SELECTORS",
    "CalibrationStats",
    "DynamicExit",
    "PruneConfig",
    "Selection",
    "SelectionContext",
    "budget",
    "calibrate",
    "exit_after",
    "mode_layers",
    "plan",
    "remove_layers",
    "skip_layers",
    "token_agreement",
]

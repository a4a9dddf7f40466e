"""Automatic stage boundaries: the critical layer and the mutation layer(s).

Layer numbering: 0 = embedding output, 1..L = decoder layer outputs; ``js[l]`` is the JS divergence
between the lens distributions of layers ``l`` and ``l - 1`` (undefined at 0).

Rules (thresholds in :class:`StageConfig`):

* **Critical layer of a token**: the first layer ``c`` whose next step is already quiet
  (``js[c+1] <= stable_fraction * max(js)``), after which at least ``stay_fraction`` of all remaining
  steps stay quiet, and at which the emitted token's probability has risen to ``rise_fraction`` of
  its maximum over layers. The dataset's critical layer is the median over tokens (spread: IQR).
* **Mutation of a token**: the step after the dataset's critical layer with the largest JS, if it is at
  least ``mutation_min_js`` and ``mutation_ratio`` times the token's median JS over those steps.
* **Mutation layers of the dataset**: the layers holding at least ``mutation_share`` of the most
  frequent layer's mutations; none when fewer than ``min_mutation_tokens`` of tokens mutate.
* Stages (inclusive): rapid evolution ``[0, C]``, stabilization ``[C+1, M-1]``, mutation ``[M, L]``
  with ``M`` the first mutation layer. Degenerate cases (no quiet stage, no mutation) give ``None``
  for the missing parts rather than forced values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from evotool.errors import ConfigError


@dataclass
class StageConfig:
    """Thresholds of the stage-detection rules (see the module docstring)."""

    stable_fraction: float = field(default=0.1, metadata={"help": "quiet step: JS below this fraction of the token's peak JS"})
    stay_fraction: float = field(default=0.75, metadata={"help": "share of steps after the critical layer that must stay quiet"})
    rise_fraction: float = field(default=0.5, metadata={"help": "token probability at the critical layer, relative to its max"})
    mutation_ratio: float = field(default=4.0, metadata={"help": "mutation spike / the token's median JS after the critical layer"})
    mutation_min_js: float = field(default=0.02, metadata={"help": "minimum JS (nats) of a mutation spike"})
    mutation_share: float = field(default=0.5, metadata={"help": "a mutation layer holds this share of the top layer's mutations"})
    min_mutation_tokens: float = field(default=0.02, metadata={"help": "fewer mutated tokens than this share: no mutation stage"})

    def __post_init__(self) -> None:
        for name in ("stable_fraction", "stay_fraction", "rise_fraction", "mutation_share", "min_mutation_tokens"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"stage option {name}={value} must lie in [0, 1]")
        if self.mutation_ratio < 1.0 or self.mutation_min_js < 0.0:
            raise ConfigError("mutation_ratio must be >= 1 and mutation_min_js >= 0")


def token_critical_layer(js: np.ndarray, p_token: np.ndarray, cfg: StageConfig) -> int | None:
    """Critical layer of one token from its curves js [L+1] (js[0] unused) and p_token [L+1]; None if the token never settles."""
    steps = np.nan_to_num(js[1:], nan=0.0)  # steps[i] = js[i + 1]
    num_layers = len(steps)
    peak = steps.max()
    if peak <= 0:
        return None
    quiet = steps <= cfg.stable_fraction * peak
    p_ok = p_token >= cfg.rise_fraction * p_token.max()
    for c in range(num_layers):  # candidate layer c, next step is steps[c]
        if quiet[c] and p_ok[c] and quiet[c:].mean() >= cfg.stay_fraction:
            return c
    return None


def token_mutation_layer(js: np.ndarray, critical: int, cfg: StageConfig) -> int | None:
    """Mutation layer of one token after the dataset's ``critical`` layer, or None when there is no spike."""
    after = np.nan_to_num(js[critical + 1 :], nan=0.0)
    if len(after) == 0:
        return None
    i = int(after.argmax())
    spike = after[i]
    if spike >= cfg.mutation_min_js and spike >= cfg.mutation_ratio * np.median(after):
        return critical + 1 + i
    return None


@dataclass
class StageResult:
    """Boundaries of one dataset (what ``stages.json`` stores besides curves and metadata)."""

    num_layers: int
    critical_layer: int | None
    mutation_layers: list[int]
    stages: dict[str, list[int] | None]
    critical_spread: dict[str, Any]
    mutation_stats: dict[str, Any]
    per_token_critical: list[int | None]
    per_token_mutation: list[int | None]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["per_token_critical"], out["per_token_mutation"]
        return out


def stage_ranges(num_layers: int, critical: int | None, mutation_layers: list[int]) -> dict[str, list[int] | None]:
    """Inclusive [first, last] ranges of the three stages; None for a stage that does not exist."""
    if critical is None:
        return {"rapid_evolution": [0, num_layers], "stabilization": None, "mutation": None}
    first_mut = min(mutation_layers) if mutation_layers else num_layers + 1
    stab = [critical + 1, first_mut - 1] if first_mut - 1 >= critical + 1 else None
    mut = [first_mut, num_layers] if mutation_layers else None
    return {"rapid_evolution": [0, critical], "stabilization": stab, "mutation": mut}


def detect_stages(js: np.ndarray, p_token: np.ndarray, cfg: StageConfig | None = None,
                  top1_flip: np.ndarray | None = None) -> StageResult:
    """Stage boundaries from per-token curves js [N, L+1] and p_token [N, L+1] (N tokens over the dataset).

    ``top1_flip`` [N, L+1] (bool, optional): whether the layer's top-1 token differs from the previous
    layer's; used to report how often mutations overturn the top token.
    """
    cfg = cfg or StageConfig()
    if js.ndim != 2 or js.shape != p_token.shape or js.shape[0] == 0:
        raise ConfigError(f"stage detection needs matching non-empty [tokens, layers] curves, got {js.shape} and {p_token.shape}")
    n_tok, n_layers = js.shape
    num_layers = n_layers - 1
    per_c = [token_critical_layer(js[i], p_token[i], cfg) for i in range(n_tok)]
    found = np.array([c for c in per_c if c is not None])
    spread: dict[str, Any] = {"tokens": n_tok, "share_with_critical": len(found) / n_tok}
    critical: int | None = None
    if len(found) and len(found) >= 0.5 * n_tok:
        critical = int(np.floor(np.median(found)))
        q25, q75 = np.percentile(found, [25, 75])
        spread.update(median=float(np.median(found)), iqr=[float(q25), float(q75)], min=int(found.min()), max=int(found.max()))
    if critical is not None and critical >= num_layers - 1:
        critical = None  # settles only at the output: no stable stage
    per_m: list[int | None] = [None] * n_tok
    mutation_layers: list[int] = []
    mut_stats: dict[str, Any] = {"share_mutated": 0.0, "histogram": {}}
    if critical is not None:
        per_m = [token_mutation_layer(js[i], critical, cfg) for i in range(n_tok)]
        mutated = [m for m in per_m if m is not None]
        counts = np.bincount(np.asarray(mutated, dtype=int), minlength=n_layers) if mutated else np.zeros(n_layers, int)
        mut_stats = {"share_mutated": len(mutated) / n_tok,
                     "histogram": {int(l): int(c) for l, c in enumerate(counts) if c}}
        if top1_flip is not None and mutated:
            flips = [bool(top1_flip[i, m]) for i, m in enumerate(per_m) if m is not None]
            mut_stats["share_top1_flip"] = float(np.mean(flips))
        if mutated and len(mutated) / n_tok >= cfg.min_mutation_tokens:
            mutation_layers = [int(l) for l in np.flatnonzero(counts >= cfg.mutation_share * counts.max())]
            mut_stats["mode"] = int(counts.argmax())
    return StageResult(
        num_layers=num_layers,
        critical_layer=critical,
        mutation_layers=mutation_layers,
        stages=stage_ranges(num_layers, critical, mutation_layers),
        critical_spread=spread,
        mutation_stats=mut_stats,
        per_token_critical=per_c,
        per_token_mutation=per_m,
    )

"""Automatic stage boundaries: the critical layer and the mutation layer(s), with a bootstrap interval and flags.

Layer numbering: 0 = embedding output, 1..L = decoder layer outputs. Inputs are per-token curves over the
whole run, [N, L+1] each (N generated tokens):

* ``p_token[t, l]``: the lens probability, at layer ``l``, of the token the model emitted (level 1);
* ``direct_js[t, l]`` / ``direct_flip[t, l]`` (optional): the layer's *direct effect*: remove layer ``l``'s own
  update ``h_l - h_{l-1}`` from the final state and read the lens: the JS divergence of that distribution from the
  output / 1 when the final top-1 token changes; NaN at layer 0;
* ``decision_depth[t]`` (needed by the default critical rule): the first layer from which the emitted token stays
  the lens' top-1 through the last layer (level 1, top-1 stability);
* ``objects[t]`` (optional): True for object-word tokens (the run's object vocabulary).

Rules (thresholds in :class:`StageConfig`; chosen on model zoo members, reported on members built after each choice;
see docs/stages.md):

* **Critical layer** (``critical_rule``): ``depth`` (default) = the first layer by which ``depth_share`` of the
  tokens have reached their decision depth: where most emitted tokens are decided for good; v4 adds that, when the
  run has at least ``min_object_tokens`` object-word tokens, ``object_share`` (0.8 in v4-v5, 0.9 since v6) of
  *those* must be decided too (a caption's frame words settle before its objects); ``probability`` (v2) =
  the first layer at which the median over tokens of ``p_token`` reaches ``rise_fraction`` of its maximum over
  layers: where the emitted tokens' probability has stopped rising fast.
* **Mutation layers** (``mutation_signal``): layers ``l >= critical + 2`` (so the tail of rapid evolution is never a
  mutation) whose direct effect stands out among the layers after the critical one: ``js`` (default, v5) = the mean
  direct-effect JS over tokens is at least ``mutation_ratio`` (8) times its median over those layers and at least
  ``mutation_min_js``; ``flip`` (v2-v4) = the share of tokens whose top-1 the layer's update decides is at least
  ``mutation_ratio`` (3) times its median, ``mutation_min_flip`` and ``mutation_min_tokens`` tokens. The first of
  them starts the mutation stage. v7 (``mutation_last_excess`` 0.03; 0 gives v6) judges the last layer on the mean
  of ``max(direct_js - mutation_last_excess, 0)`` instead (same ratio, floor ``mutation_last_min``): a final layer
  that only sharpens confidence moves a little mass on every token. v7 is the default (again since holdout30). v8
  (the default from holdout26 to holdout30, each step by a rule registered before the read; docs/stages.md) divides
  by the median over the *other* post-critical layers (``mutation_reference=others``: a second large layer among few
  no longer hides the first) and lets a layer under ``mutation_min_js`` count when it stands ``mutation_quiet_ratio``
  (20) times that median above ``mutation_quiet_min_js`` (a deep stack whose late layers barely move the output).
* **Mutation check** (``mutation_check``; run by ``evotool analyze``, which holds the model: :mod:`evotool.stages.check`):
  each call is tested by bypassing the layer on the run's own samples and dropped (flag ``mutation_unconfirmed``)
  unless the behaviour shows it; with ``check_add_cut`` set it also calls a layer whose bypass cuts the samples'
  object hallucinations (flag ``mutation_added``).
* Stages (inclusive): rapid evolution ``[0, C]``, stabilization ``[C+1, M-1]``, mutation ``[M, L]``.
* **Interval**: both boundaries recomputed on ``bootstrap`` resamples of the *samples* (tokens of one sample stay
  together); the ``interval`` central share of the resampled values.
* **Flags**: ``too_few_tokens`` (fewer than ``min_tokens``: no boundaries at all, never made-up ones),
  ``no_direct_effect`` (no direct-effect curves for the mutation signal: mutation undecided), ``no_stable_stage`` / ``short_stable_stage``
  (stabilization empty / shorter than 2 layers), ``wide_interval`` (the critical interval reaches more than
  ``flag_tolerance`` layers either side of the critical layer), ``uncertain_mutation`` (the share of resamples with a
  mutation lies strictly between ``1 - interval`` and ``interval``, or the first mutation's interval reaches more than
  ``flag_tolerance`` layers either side of it). Both warn where a second sample set may place the boundary elsewhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from evotool.errors import ConfigError

CRITICAL_RULES = ("depth", "probability")
MUTATION_SIGNALS = ("js", "flip")
# Options whose default depends on mutation_signal (None = that default): chosen per signal on zoo members
# (docs/stages.md); the flip signal (v2-v4) has no last-layer rule and no quiet tier.
SIGNAL_DEFAULTS: dict[str, dict[str, float | str]] = {"mutation_ratio": {"js": 8.0, "flip": 3.0},
                                                      "mutation_last_excess": {"js": 0.03, "flip": 0.0},
                                                      "mutation_reference": {"js": "all", "flip": "all"},
                                                      "mutation_quiet_ratio": {"js": 0.0, "flip": 0.0}}
MUTATION_REFERENCES = ("all", "others")
NULLABLE_SHARES = ("check_chair_guard", "check_add_cut")  # StageConfig shares that may be None (off)


@dataclass
class StageConfig:
    """Thresholds of the stage-detection rules (see the module docstring)."""

    critical_rule: str = field(default="depth", metadata={
        "help": "critical layer rule: depth (share of tokens past their decision depth; v3) or probability (median emitted-token probability rise; v2)"})
    depth_share: float = field(default=0.8, metadata={
        "help": "critical_rule depth: first layer by which this share of tokens have reached their decision depth"})
    object_share: float = field(default=0.9, metadata={
        "help": "critical_rule depth (v4; 0.9 since v6): this share of the object-word tokens must be decided by the critical layer too (0: all tokens only, v3)"})
    min_object_tokens: int = field(default=20, metadata={
        "help": "object_share applies only to runs with at least this many object-word tokens"})
    rise_fraction: float = field(default=0.95, metadata={
        "help": "critical_rule probability: first layer whose median emitted-token probability reaches this share of its maximum"})
    mutation_signal: str = field(default="js", metadata={
        "help": "mutation signal: js (mean direct-effect JS per layer; v5) or flip (share of tokens whose top-1 the layer's update decides; v2-v4)"})
    mutation_ratio: float | None = field(default=None, metadata={
        "help": "mutation: the signal / its median over the layers after the critical one (default 8 for js, 3 for flip)"})
    mutation_min_js: float = field(default=0.001, metadata={
        "help": "mutation_signal js: minimum mean direct-effect JS of a mutation layer"})
    mutation_last_excess: float | None = field(default=None, metadata={
        "help": "mutation_signal js (v7: 0.03, the default; 0: off, v6; flip: none): the last layer is judged on the mean over tokens of "
                "max(direct JS - this, 0) instead of the mean direct JS (same ratio, floor mutation_last_min): a final "
                "layer that only sharpens confidence moves a little mass on every token and is not a mutation"})
    mutation_last_min: float = field(default=0.0025, metadata={
        "help": "mutation_last_excess > 0: minimum excess signal of a last-layer mutation"})
    mutation_reference: str | None = field(default=None, metadata={
        "help": "what the mutation ratio divides by: all (v2-v7, the default) = the signal's median over the layers after the "
                "critical one; others (v8) = over those other than the layer judged"})
    mutation_quiet_ratio: float | None = field(default=None, metadata={
        "help": "mutation_signal js (0: off, v7, the default; v8: 20; flip: none): a layer under mutation_min_js still counts when its signal is "
                "at least this many times the reference and at least mutation_quiet_min_js"})
    mutation_quiet_min_js: float = field(default=0.0002, metadata={
        "help": "mutation_quiet_ratio > 0: minimum mean direct-effect JS of such a quiet mutation layer (at or above "
                "mutation_min_js the tier adds nothing)"})
    mutation_min_flip: float = field(default=0.015, metadata={
        "help": "mutation_signal flip: minimum share of tokens whose top-1 the layer's own update decides"})
    mutation_min_tokens: int = field(default=5, metadata={
        "help": "mutation_signal flip: minimum number of such tokens (a noise floor for small runs)"})
    min_tokens: int = field(default=50, metadata={"help": "fewer generated tokens than this: no boundaries (flag too_few_tokens)"})
    bootstrap: int = field(default=200, metadata={"help": "bootstrap resamples of the samples for the intervals (0: none)"})
    interval: float = field(default=0.9, metadata={"help": "central share of the bootstrap values reported as the interval"})
    flag_tolerance: int = field(default=1, metadata={
        "help": "a boundary whose bootstrap interval reaches more than this many layers either side of it is flagged "
                "(wide_interval, uncertain_mutation; earlier releases flagged a critical interval wider than 2 layers and a "
                "mutation whose presence most resamples disagree on)"})
    seed: int = field(default=0, metadata={"help": "seed of the bootstrap"})
    mutation_check: bool = field(default=False, metadata={
        "help": "evotool analyze: test each mutation call by bypassing it on the run's own samples and keep only calls the "
                "behaviour shows (check_* options; evotool.stages.check). Costs one greedy generation of the samples per "
                "layer after the critical one, run only when a mutation is called"})
    check_min_rewrite: float = field(default=0.03, metadata={
        "help": "mutation check: a call is kept when its bypass rewrites at least this share of the full model's tokens"})
    check_ratio: float = field(default=2.0, metadata={
        "help": "mutation check: ... and at least this many times the median share over the other post-critical layers"})
    check_chair_cut: float = field(default=0.03, metadata={
        "help": "mutation check: or when its bypass lowers object CHAIR_i by at least this (samples with ground-truth objects)"})
    check_recall: float = field(default=0.02, metadata={
        "help": "mutation check: ... at an object-recall loss of at most this"})
    check_chair_guard: float | None = field(default=None, metadata={
        "help": "mutation check: a call kept for its rewrites alone is dropped when its bypass raises CHAIR_i by more than "
                "this (the layer suppresses hallucinations rather than making them; None: off; 0 chosen in-sample on holdout28-31, "
                "not adopted on holdout32)"})
    check_add_cut: float | None = field(default=None, metadata={
        "help": "mutation check: also call each layer from critical + 2 on whose bypass lowers CHAIR_i by at least this and "
                "check_add_share times the full model's CHAIR_i, at an object-recall loss of at most check_recall (flag "
                "mutation_added; None: off, the check only drops; 0.05 with share 0.5 chosen in-sample on holdout28-31, not adopted "
                "on holdout32). Runs the check on every run with a critical layer"})
    check_add_share: float = field(default=0.25, metadata={
        "help": "mutation check, check_add_cut set: ... and at least this share of the full model's CHAIR_i"})

    def __post_init__(self) -> None:
        if self.critical_rule not in CRITICAL_RULES:
            raise ConfigError(f"stage option critical_rule={self.critical_rule!r}: choose one of {', '.join(CRITICAL_RULES)}")
        if self.mutation_signal not in MUTATION_SIGNALS:
            raise ConfigError(f"stage option mutation_signal={self.mutation_signal!r}: choose one of {', '.join(MUTATION_SIGNALS)}")
        for name, default in SIGNAL_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, default[self.mutation_signal])
        for name in ("depth_share", "rise_fraction", "mutation_min_flip", "interval"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"stage option {name}={value} must lie in (0, 1]")
        if not 0.0 <= self.object_share <= 1.0:
            raise ConfigError(f"stage option object_share={self.object_share} must lie in [0, 1] (0: off)")
        if self.mutation_reference not in MUTATION_REFERENCES:
            raise ConfigError(f"stage option mutation_reference={self.mutation_reference!r}: choose one of {', '.join(MUTATION_REFERENCES)}")
        if self.mutation_ratio < 1.0:
            raise ConfigError(f"stage option mutation_ratio={self.mutation_ratio} must be >= 1")
        if self.mutation_quiet_ratio != 0 and self.mutation_quiet_ratio < self.mutation_ratio:
            raise ConfigError(f"stage option mutation_quiet_ratio={self.mutation_quiet_ratio} must be 0 (off) or >= "
                              f"mutation_ratio ({self.mutation_ratio})")
        if self.mutation_quiet_ratio > 0 and self.mutation_signal != "js":
            raise ConfigError("stage option mutation_quiet_ratio needs mutation_signal=js (its floor is a JS)")
        for name in ("mutation_min_js", "mutation_last_excess", "mutation_last_min", "mutation_quiet_min_js",
                     "check_min_rewrite", "check_chair_cut", "check_recall", "check_add_share", *NULLABLE_SHARES):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                off = " or be null (off)" if name in NULLABLE_SHARES else ""
                raise ConfigError(f"stage option {name}={value} must lie in [0, 1]{off}")
        if self.mutation_last_excess > 0 and self.mutation_signal != "js":
            raise ConfigError("stage option mutation_last_excess needs mutation_signal=js (it re-reads the direct JS)")
        if self.check_ratio < 0:
            raise ConfigError(f"stage option check_ratio={self.check_ratio} must be >= 0")
        for name in ("mutation_min_tokens", "min_object_tokens", "min_tokens", "bootstrap", "flag_tolerance", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"stage option {name}={getattr(self, name)} must be >= 0")


def critical_from_curve(curve: np.ndarray, cfg: StageConfig) -> int:
    """Critical layer from the rule's curve [L+1] (:func:`critical_curve`)."""
    if cfg.critical_rule == "depth":
        return int(np.argmax(curve >= 1.0 - 1e-12))  # the last layer's shares are 1 by definition
    return int(np.argmax(curve >= cfg.rise_fraction * curve.max()))


def uses_objects(objects: np.ndarray | None, cfg: StageConfig) -> bool:
    """Whether the depth rule also reads the object-word tokens (``objects`` [N] bool)."""
    return (cfg.critical_rule == "depth" and cfg.object_share > 0 and objects is not None
            and int(objects.sum()) >= max(1, cfg.min_object_tokens))


def critical_curve(p_token: np.ndarray, depth: np.ndarray | None, cfg: StageConfig,
                   objects: np.ndarray | None = None) -> np.ndarray:
    """[L+1]: rule ``depth``: the share of tokens whose decision depth is <= each layer over ``depth_share``, or,
    when :func:`uses_objects`, the smaller of that and the object-word tokens' share over ``object_share`` (the
    rule's layer is the first where the curve reaches 1); rule ``probability``: the median emitted-token
    probability."""
    if cfg.critical_rule == "depth":
        if depth is None:
            raise ConfigError("critical_rule=depth needs the tokens' decision depths (or use critical_rule=probability)")
        curve = decided_share(depth, p_token.shape[1]) / cfg.depth_share
        if uses_objects(objects, cfg):
            curve = np.minimum(curve, decided_share(depth[objects], p_token.shape[1]) / cfg.object_share)
        return curve
    return np.median(p_token, axis=0)


def decided_share(depth: np.ndarray, n_layers: int) -> np.ndarray:
    """[N] decision depths -> [n_layers]: the share of tokens whose decision depth is <= each layer."""
    return (depth[:, None] <= np.arange(n_layers)[None, :]).mean(axis=0)


def standing_out(signal: np.ndarray, critical: int, ratio: float, minimum: float, others: bool = False,
                 quiet: tuple[float, float] = (0.0, 0.0)) -> list[int]:
    """Layers ``l >= critical + 2`` whose ``signal`` [L+1] is at least ``minimum`` and ``ratio`` times the reference:
    its median over the layers after ``critical`` (NaN read as 0) or, with ``others``, over those other than ``l``
    (where at least two remain); ``quiet`` = (ratio, minimum) with a ratio > 0: a layer that misses that also counts
    when it reaches the quiet minimum and the quiet ratio times the reference."""
    after = np.nan_to_num(signal[critical + 1 :], nan=0.0)
    if len(after) < 2:
        return []
    leave_out = others and len(after) > 2
    median = float(np.median(after))
    found = []
    for i in range(1, len(after)):
        reference = float(np.median(np.delete(after, i))) if leave_out else median
        if after[i] >= max(minimum, ratio * reference) or (quiet[0] > 0 and after[i] >= max(quiet[1], quiet[0] * reference)):
            found.append(critical + 1 + i)
    return found


def mutations_from_curve(signal: np.ndarray, critical: int, tokens: int, cfg: StageConfig,
                         last_signal: np.ndarray | None = None) -> list[int]:
    """Mutation layers after ``critical`` from the mutation signal per layer [L+1] (NaN at 0; :func:`signal_curve`)
    of ``tokens`` tokens; ``last_signal`` [L+1] (:func:`excess_curve`), when given, judges the last layer instead."""
    minimum = cfg.mutation_min_js if cfg.mutation_signal == "js" else max(cfg.mutation_min_flip, cfg.mutation_min_tokens / tokens)
    others = cfg.mutation_reference == "others"
    layers = standing_out(signal, critical, cfg.mutation_ratio, minimum, others,  # type: ignore[arg-type]
                          (cfg.mutation_quiet_ratio, cfg.mutation_quiet_min_js))  # type: ignore[arg-type]
    if last_signal is None:
        return layers
    last = len(signal) - 1
    judged = standing_out(last_signal, critical, cfg.mutation_ratio, cfg.mutation_last_min, others)  # type: ignore[arg-type]
    return [layer for layer in layers if layer < last] + [layer for layer in judged if layer == last]


UNCERTAINTY_FLAGS = ("wide_interval", "uncertain_mutation")  # set by :func:`uncertainty_flags`


def uncertainty_flags(critical: int, mutations: list[int], interval: dict[str, Any], cfg: StageConfig) -> list[str]:
    """``wide_interval`` / ``uncertain_mutation`` from the bootstrap ``interval`` (:func:`_bootstrap`) around the point
    boundaries: a boundary is uncertain when its interval reaches beyond ``flag_tolerance`` layers of it, a mutation's
    presence when the share of resamples finding one is not within ``1 - interval`` of 0 or 1."""

    def beyond(point: int | None, rng: list[int] | None) -> bool:
        return point is not None and rng is not None and (rng[0] < point - cfg.flag_tolerance or rng[1] > point + cfg.flag_tolerance)

    flags = ["wide_interval"] if beyond(critical, interval["critical"]) else []
    share = interval.get("mutation_share")
    if (share is not None and 1.0 - cfg.interval < share < cfg.interval) or beyond(min(mutations, default=None), interval["mutation"]):
        flags.append("uncertain_mutation")
    return flags


def stage_ranges(num_layers: int, critical: int | None, mutation_layers: list[int]) -> dict[str, list[int] | None]:
    """Inclusive [first, last] ranges of the three stages; None for a stage that does not exist."""
    if critical is None:
        return {"rapid_evolution": [0, num_layers], "stabilization": None, "mutation": None}
    first_mut = min(mutation_layers) if mutation_layers else num_layers + 1
    stab = [critical + 1, min(first_mut - 1, num_layers)] if min(first_mut - 1, num_layers) >= critical + 1 else None
    mut = [first_mut, num_layers] if mutation_layers else None
    return {"rapid_evolution": [0, critical], "stabilization": stab, "mutation": mut}


def stage_flags(critical: int | None, stages: dict[str, list[int] | None]) -> list[str]:
    """``no_stable_stage`` / ``short_stable_stage`` when there is a ``critical`` layer and the stabilization stage of
    ``stages`` (:func:`stage_ranges`) is empty / a single layer."""
    if critical is None:
        return []
    stab = stages["stabilization"]
    if stab is None:
        return ["no_stable_stage"]
    return ["short_stable_stage"] if stab[1] - stab[0] + 1 < 2 else []


class FirstMutation:
    """The ``mutation`` property of a detector output (:class:`StageResult`, :class:`~evotool.stages.file.StageFile`)."""

    mutation_layers: list[int]

    @property
    def mutation(self) -> int | None:
        """The first mutation layer, or None when there is no mutation stage."""
        return min(self.mutation_layers) if self.mutation_layers else None


@dataclass
class StageResult(FirstMutation):
    """Boundaries of one dataset (what ``stages.json`` stores besides curves and metadata)."""

    num_layers: int
    critical_layer: int | None
    mutation_layers: list[int]
    stages: dict[str, list[int] | None]
    flags: list[str]
    interval: dict[str, Any]  # critical / mutation: [lo, hi] or None; mutation_share: float
    evidence: dict[str, list[float | None]]
    critical_spread: dict[str, Any]
    mutation_stats: dict[str, Any]
    per_token_critical: list[int | None]
    per_token_mutation: list[int | None]
    mutation_check: dict[str, Any] | None = None  # the bypass check's record (evotool.stages.check), when it ran

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["per_token_critical"], out["per_token_mutation"]
        return out


def signal_curve(direct: np.ndarray) -> np.ndarray:
    """[N, L+1] -> [L+1]: the mean over tokens of a direct-effect metric (NaN at layer 0): of ``direct_flip``, the
    share of tokens whose top-1 each layer's own update decides; of ``direct_js``, the mean JS it causes."""
    return np.r_[np.nan, direct[:, 1:].mean(axis=0)]


def excess_curve(direct_js: np.ndarray, excess: float) -> np.ndarray:
    """[N, L+1] -> [L+1]: the mean over tokens of ``max(direct_js - excess, 0)`` (NaN at layer 0): the direct effect
    without the small change a layer makes on every token (a final layer that sharpens confidence)."""
    return signal_curve(np.maximum(direct_js - excess, 0.0))


def _curve_list(curve: np.ndarray | None, length: int) -> list[float | None]:
    return [None] * length if curve is None else [float(x) if np.isfinite(x) else None for x in curve]


@dataclass
class _Tokens:
    """The per-token inputs of the rules (see :func:`detect_stages`); ``rows`` selects tokens (a resample)."""

    p_token: np.ndarray
    direct_flip: np.ndarray | None
    direct_js: np.ndarray | None
    depth: np.ndarray | None
    objects: np.ndarray | None

    def rows(self, pick: np.ndarray) -> _Tokens:
        return _Tokens(*(None if x is None else x[pick]
                         for x in (self.p_token, self.direct_flip, self.direct_js, self.depth, self.objects)))

    def signal(self, cfg: StageConfig) -> np.ndarray | None:
        """[N, L+1]: the per-token direct effect the mutation rule reads (None: not traced)."""
        return self.direct_js if cfg.mutation_signal == "js" else self.direct_flip

    def curves(self, cfg: StageConfig) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """The dataset curves the rules read, [L+1] each: the critical rule's curve, the mutation signal and the last
        layer's signal (None: the mutation signal judges it too)."""
        signal = self.signal(cfg)
        last = excess_curve(signal, cfg.mutation_last_excess) if signal is not None and cfg.mutation_last_excess > 0 else None
        return (critical_curve(self.p_token, self.depth, cfg, self.objects), None if signal is None else signal_curve(signal),
                last)


def _boundaries(crit_curve: np.ndarray, signal: np.ndarray | None, last_signal: np.ndarray | None, tokens: int,
                cfg: StageConfig) -> tuple[int, list[int]]:
    critical = critical_from_curve(crit_curve, cfg)
    return critical, [] if signal is None else mutations_from_curve(signal, critical, tokens, cfg, last_signal)


def _bootstrap(tokens: _Tokens, groups: np.ndarray, cfg: StageConfig) -> dict[str, Any]:
    """Central ``cfg.interval`` range of the boundaries over resamples of the groups (samples)."""
    ids = np.unique(groups)
    if cfg.bootstrap == 0 or len(ids) < 2:
        return {"critical": None, "mutation": None}
    rng = np.random.default_rng(cfg.seed)
    rows = {g: np.flatnonzero(groups == g) for g in ids}
    crit, mut = [], []
    for _ in range(cfg.bootstrap):
        pick = np.concatenate([rows[g] for g in rng.choice(ids, len(ids))])
        c, m = _boundaries(*tokens.rows(pick).curves(cfg), len(pick), cfg)
        crit.append(c)
        mut.append(m[0] if m else -1)
    lo, hi = (1 - cfg.interval) / 2 * 100, (1 + cfg.interval) / 2 * 100

    def central(values: list[int]) -> list[int]:
        return [int(np.floor(np.percentile(values, lo))), int(np.ceil(np.percentile(values, hi)))]

    found = [m for m in mut if m >= 0]
    return {"critical": central(crit),
            "mutation": central(found) if tokens.signal(cfg) is not None and len(found) >= len(mut) / 2 else None,
            "mutation_share": len(found) / len(mut)}


def detect_stages(p_token: np.ndarray, direct_flip: np.ndarray | None = None, groups: np.ndarray | None = None,
                  cfg: StageConfig | None = None, decision_depth: np.ndarray | None = None,
                  objects: np.ndarray | None = None, direct_js: np.ndarray | None = None) -> StageResult:
    """Stage boundaries from per-token curves p_token [N, L+1], direct_flip and direct_js [N, L+1] (optional; NaN at
    layer 0; the mutation rule reads the one ``cfg.mutation_signal`` names), decision_depth [N] (needed by
    ``critical_rule=depth``) and objects [N] (optional, bool: object-word tokens).

    ``groups`` [N]: the sample of each token, resampled together by the bootstrap (default: each token alone).
    """
    cfg = cfg or StageConfig()
    if p_token.ndim != 2 or p_token.shape[0] == 0 or p_token.shape[1] < 2:
        raise ConfigError(f"stage detection needs non-empty [tokens, layers] curves, got {p_token.shape}")
    for name, direct in (("direct_flip", direct_flip), ("direct_js", direct_js)):
        if direct is not None and direct.shape != p_token.shape:
            raise ConfigError(f"{name} {direct.shape} must match p_token {p_token.shape}")
    if decision_depth is not None and decision_depth.shape != p_token.shape[:1]:
        raise ConfigError(f"decision_depth {decision_depth.shape} must hold one layer per token of p_token {p_token.shape}")
    if objects is not None and objects.shape != p_token.shape[:1]:
        raise ConfigError(f"objects {objects.shape} must hold one flag per token of p_token {p_token.shape}")
    n_tok, n_layers = p_token.shape
    num_layers = n_layers - 1
    groups = np.arange(n_tok) if groups is None else np.asarray(groups)
    tokens = _Tokens(p_token, direct_flip, direct_js, decision_depth, None if objects is None else objects.astype(bool))
    flags = [] if tokens.signal(cfg) is not None else ["no_direct_effect"]
    crit_curve, signal, last_signal = tokens.curves(cfg)
    if cfg.critical_rule == "depth":
        per_c: list[int | None] = [int(d) for d in decision_depth]  # type: ignore[union-attr]
    else:
        per_c = [critical_from_curve(row, cfg) if row.max() > 0 else None for row in p_token]
    critical: int | None = None
    mutations: list[int] = []
    interval: dict[str, Any] = {"critical": None, "mutation": None}
    if n_tok < cfg.min_tokens:
        flags.append("too_few_tokens")
    else:
        critical, mutations = _boundaries(crit_curve, signal, last_signal, n_tok, cfg)
        interval = _bootstrap(tokens, groups, cfg)
        flags += uncertainty_flags(critical, mutations, interval, cfg)
    stages = stage_ranges(num_layers, critical, mutations)
    flags += stage_flags(critical, stages)
    per_m: list[int | None] = [None] * n_tok
    histogram: dict[int, int] = {}
    if direct_flip is not None and critical is not None:
        late = np.nan_to_num(direct_flip[:, critical + 2 :], nan=0.0) > 0  # [N, L-C-1]
        per_m = [critical + 2 + int(row.argmax()) if row.any() else None for row in late]
        histogram = {critical + 2 + int(i): int(c) for i, c in enumerate(late.sum(axis=0)) if c}
    found = np.array([c for c in per_c if c is not None])
    spread: dict[str, Any] = {"tokens": n_tok, "samples": int(len(np.unique(groups))),
                              "object_tokens": None if objects is None else int(tokens.objects.sum())}
    if len(found):
        q25, q75 = np.percentile(found, [25, 75])
        spread.update(median=float(np.median(found)), iqr=[float(q25), float(q75)], min=int(found.min()), max=int(found.max()))
    mutated = [m for m in per_m if m is not None]
    return StageResult(
        num_layers=num_layers,
        critical_layer=critical,
        mutation_layers=mutations,
        stages=stages,
        flags=flags,
        interval=interval,
        evidence={"median_p": [float(x) for x in np.median(p_token, axis=0)],
                  "decided_share": None if decision_depth is None else
                  [float(x) for x in decided_share(decision_depth, n_layers)],
                  "object_decided_share": [float(x) for x in decided_share(decision_depth[tokens.objects], n_layers)]
                  if uses_objects(tokens.objects, cfg) else None,
                  "direct_flip": _curve_list(None if direct_flip is None else signal_curve(direct_flip), n_layers),
                  "direct_js": _curve_list(None if direct_js is None else signal_curve(direct_js), n_layers),
                  "last_layer_excess": None if last_signal is None else _curve_list(last_signal, n_layers)},
        critical_spread=spread,
        mutation_stats={"share_mutated": len(mutated) / n_tok, "histogram": histogram},
        per_token_critical=per_c,
        per_token_mutation=per_m,
    )

"""Choose detector thresholds from measurements: sweep :class:`~evotool.stages.detect.StageConfig` values over a
built zoo's saved analyses, choose on some splits, report on the others (``evotool zoo tune``).

Each grid point re-runs :func:`~evotool.stages.detect.detect_stages` (no bootstrap) on the per-token curves of every
member's two analyses (nothing is traced again) and scores it with :func:`~evotool.zoo.report.verdict` against the
member's behavioural boundaries. The chosen point gets the most checks right on the ``choose_on`` splits (ties: the
earlier point in grid order, i.e. the order the values were given); its counts on the other splits are held-out
figures only for members that played no part in writing the grid (docs/stages.md).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from evotool.config import from_dict, to_dict
from evotool.errors import ConfigError, InputError
from evotool.stages.behaviour import BEHAVIOUR_FILE, read_behaviour
from evotool.stages.detect import SIGNAL_DEFAULTS, StageConfig, StageResult, detect_stages
from evotool.zoo.config import SPLITS, ZooMember, check_splits
from evotool.zoo.curves import token_curves
from evotool.zoo.report import CHECKS, verdict

SCHEMA_VERSION = "1.0"
TAGS = ("a", "b")  # the two disjoint analysis sets of a member


@dataclass(frozen=True)
class TuneRun:
    """One member's inputs to the sweep: its behavioural boundaries and the per-token curves of analyses a and b."""

    member: str
    split: str
    boundaries: dict[str, Any]
    curves: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]


def load_runs(members: Mapping[str, ZooMember], out: Path) -> tuple[list[TuneRun], list[str]]:
    """The members of ``members`` built under ``out`` with both analyses and a behavioural ground truth, and the
    names of those skipped (an analysis or ``behaviour.json`` missing). A member whose behaviour shows no critical
    layer stays in: the verdict scores only its stabilization and set agreement."""
    runs, skipped = [], []
    for name, member in tqdm(members.items(), desc="loading analyses", unit="member", leave=False):
        folder = out / name
        dirs = [folder / f"analysis_{tag}" for tag in TAGS]
        if not (folder / BEHAVIOUR_FILE).is_file() or not all((d / "stages.json").is_file() for d in dirs):
            skipped.append(name)
            continue
        boundaries = read_behaviour(folder / BEHAVIOUR_FILE)["boundaries"]
        curves = tuple(token_curves(d) for d in dirs)
        runs.append(TuneRun(name, member.split, boundaries, curves))  # type: ignore[arg-type]
    return runs, skipped


def detect_curves(curves: Mapping[str, np.ndarray], cfg: StageConfig) -> StageResult:
    """:func:`detect_stages` on :func:`~evotool.zoo.curves.token_curves` output (what ``evotool analyze`` ran)."""
    return detect_stages(curves["p_token"], curves.get("direct_flip"), curves["sample"], cfg, curves["decision_depth"],
                         curves.get("objects"), curves.get("direct_js"))


def score(runs: Sequence[TuneRun], cfg: StageConfig) -> dict[str, dict[str, bool | None]]:
    """member -> the verdict's checks (:data:`~evotool.zoo.report.CHECKS`) under ``cfg``."""
    cfg = replace(cfg, bootstrap=0)
    return {r.member: verdict(r.boundaries, *(detect_curves(c, cfg) for c in r.curves)) for r in runs}


def parse_grid(pairs: Sequence[str]) -> dict[str, list[Any]]:
    """``["object_share=0.8,0.9", "mutation_signal=js"]`` -> ``{"object_share": [0.8, 0.9], ...}`` (values read as
    YAML scalars; types are checked by :func:`grid_points`)."""
    grid: dict[str, list[Any]] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--grid {pair!r}: expected name=v1,v2,...")
        grid[key.strip()] = [yaml.safe_load(v) for v in text.split(",") if v.strip()]
    return grid


def grid_points(grid: Mapping[str, Sequence[Any]], base: StageConfig) -> list[StageConfig]:
    """Every combination of the ``grid`` values (field -> values) on top of ``base``, validated like any config
    (a bad field or value raises :class:`ConfigError` naming it)."""
    known = {f.name for f in fields(StageConfig)}
    for key, values in grid.items():
        if key not in known:
            raise ConfigError(f"--grid {key}: not a stage option (known: {', '.join(sorted(known))})")
        if not values:
            raise ConfigError(f"--grid {key}: no values")
    base_values = to_dict(base)
    if "mutation_signal" in grid:  # these defaults depend on the signal
        base_values |= dict.fromkeys(SIGNAL_DEFAULTS)
    keys = list(grid)
    return [from_dict(StageConfig, base_values | dict(zip(keys, combo)), "--grid")
            for combo in itertools.product(*(grid[k] for k in keys))]


def _counts(checks: Mapping[str, Mapping[str, bool | None]], names: Sequence[str]) -> dict[str, list[int]]:
    return {k: [sum(checks[n][k] is True for n in names), sum(checks[n][k] is not None for n in names)] for k in CHECKS}


@dataclass
class SweepSpec:
    """What to sweep: ``grid`` (stage option -> values, every combination on top of ``base``), the splits the
    choice may read (``choose_on``) and those left unread (``sealed``: neither loaded nor shown, so never chosen on);
    validated on construction, before any run is loaded."""

    grid: dict[str, list[Any]]
    choose_on: list[str]
    sealed: list[str] = field(default_factory=list)
    base: StageConfig = field(default_factory=StageConfig)
    points: list[StageConfig] = field(init=False)

    def __post_init__(self) -> None:
        if not self.choose_on:
            raise ConfigError(f"--choose-on names no split (splits: {', '.join(SPLITS)})")
        check_splits("--choose-on", self.choose_on)
        check_splits("--sealed", self.sealed)
        both = [s for s in self.choose_on if s in self.sealed]
        if both:
            raise ConfigError(f"--choose-on and --sealed both name {both[0]}")
        self.points = grid_points(self.grid, self.base)


def sweep(runs: Sequence[TuneRun], spec: SweepSpec) -> dict[str, Any]:
    """Score every grid point on ``runs``; choose the point with the most checks right on the ``choose_on`` splits.

    Returns the sweep's payload (schema :data:`SCHEMA_VERSION`): per point its grid values, counts
    ``[right, scored]`` per check on the chosen-on members (``choose_on``), on the others (``held_out``) and per
    split, and every member's misses; ``chosen``: the index of the chosen point.
    """
    chosen_names = [r.member for r in runs if r.split in spec.choose_on]
    held_names = [r.member for r in runs if r.split not in spec.choose_on]
    if not chosen_names:
        raise InputError(f"no built member with a ground truth in the split(s) {', '.join(spec.choose_on)}: nothing "
                         "to choose on (build them with `evotool zoo build`)")
    splits = [s for s in SPLITS if any(r.split == s for r in runs)]
    points = []
    for cfg in tqdm(spec.points, desc="grid", unit="point", leave=False):
        checks = score(runs, cfg)
        points.append({"values": {k: getattr(cfg, k) for k in spec.grid},
                       "choose_on": _counts(checks, chosen_names), "held_out": _counts(checks, held_names),
                       "splits": {s: _counts(checks, [r.member for r in runs if r.split == s]) for s in splits},
                       "misses": {n: [k for k, v in checks[n].items() if v is False] for n in checks
                                  if any(v is False for v in checks[n].values())}})
    right = [sum(c[0] for c in p["choose_on"].values()) for p in points]
    return {"schema_version": SCHEMA_VERSION, "kind": "zoo_tune", "grid": spec.grid, "base": to_dict(spec.base),
            "choose_on": spec.choose_on, "members_chosen_on": chosen_names, "members_held_out": held_names,
            "points": points, "chosen": int(np.argmax(right))}  # argmax: the first of the ties


def _cell(counts: Mapping[str, Sequence[int]]) -> str:
    return ", ".join(f"{counts[k][0]}/{counts[k][1]}" for k in CHECKS)


def sweep_table(payload: Mapping[str, Any], by_split: bool = False) -> str:
    """Markdown: one row per grid point (counts per check, in :data:`CHECKS` order, on the chosen-on and held-out
    members), the chosen point marked, then its held-out misses; ``by_split``: then one row per split, one column
    per grid point."""
    keys = list(payload["grid"])
    lines = [f"| {' | '.join(keys)} | chosen on ({len(payload['members_chosen_on'])}): {' / '.join(CHECKS)} "
             f"| held out ({len(payload['members_held_out'])}) |", "|" + "---|" * (len(keys) + 2)]
    for i, p in enumerate(payload["points"]):
        mark = " **chosen**" if i == payload["chosen"] else ""
        lines.append(f"| {' | '.join(str(p['values'][k]) for k in keys)} | {_cell(p['choose_on'])}{mark} "
                     f"| {_cell(p['held_out'])} |")
    best = payload["points"][payload["chosen"]]
    held = [f"{n} ({', '.join(m)})" for n, m in best["misses"].items() if n in payload["members_held_out"]]
    lines += ["", f"Chosen on {', '.join(payload['choose_on'])}: "
              + ", ".join(f"{k}={v}" for k, v in best["values"].items())
              + "; held-out misses: " + ("; ".join(held) or "none") + "."]
    if by_split:
        labels = [", ".join(f"{k}={p['values'][k]}" for k in keys) for p in payload["points"]]
        lines += ["", f"| split | {' | '.join(labels)} |", "|" + "---|" * (len(labels) + 1)]
        lines += [f"| {split} | {' | '.join(_cell(p['splits'][split]) for p in payload['points'])} |"
                  for split in payload["points"][0]["splits"]]
    return "\n".join(lines)

"""The zoo's member table: configuration, held-out metrics, behavioural boundaries and detector output.

Read from a built zoo folder (``OUT/<member>/model/metrics.json``, ``behaviour.json``,
``analysis_{a,b}/stages.json``); a missing or unreadable piece shows as ``-``. The behavioural boundaries are
re-derived from the stored curves under the current rules (:func:`evotool.stages.behaviour.read_behaviour`),
so a refined rule shows without measuring again; a member whose stored boundaries were stale is marked ``*``, one
whose curves were measured under other settings than the current ones (e.g. fewer captions) ``†``.
Detector output is only reported here, never used to choose anything.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from evotool.errors import EvotoolError
from evotool.io import read_json
from evotool.stages.behaviour import (BEHAVIOUR_FILE, PLATEAU_SPREAD, critical_plateau, mutation_agrees,
                                      read_behaviour, within_tolerance)
from evotool.stages.detect import UNCERTAINTY_FLAGS
from evotool.stages.file import StageFile
from evotool.zoo.config import SPLITS, BehaviourConfig, ZooMember

T = TypeVar("T")

PLATEAU_COLUMN = f"beh. critical, tolerance +-{PLATEAU_SPREAD}"
COLUMNS = ("member", "split", "family", "L", "width", "steps", "train min", "recall", "CHAIR_i in", "CHAIR_i pb",
           "POPE acc", "beh. critical", "beh. mutation", "beh. reproduced (C / M)", PLATEAU_COLUMN,
           "removable k=1 / k=2", ">=2 removable",
           "detector a (C / M)", "interval a (C / M)", "flags a", "detector b (C / M)", "verdict")
CHECKS = ("critical", "mutation", "stabilization", "a/b")
FIRM = 0.8  # a behavioural boundary reproduced by at least this share of caption resamples is called firm


class Detected(Protocol):
    """What :func:`verdict` reads of a detector output (:class:`StageFile` or
    :class:`~evotool.stages.detect.StageResult`)."""

    critical_layer: int | None
    stages: dict[str, list[int] | None]

    @property
    def mutation(self) -> int | None: ...


def verdict(boundaries: dict, a: Detected, b: Detected | None, tolerance: int = 1) -> dict[str, bool | None]:
    """The detector (set A, and set B for agreement) against the behavioural ``boundaries`` (issue targets):
    critical within ``tolerance``; first mutation within ``tolerance`` of a behavioural mutation layer, or none where
    the behaviour shows none; stabilization of >= 2 layers wherever >= 2 layers are removable; sets A and B within
    ``tolerance`` of each other on both boundaries. None where the behaviour gives no answer."""
    crit, muts = boundaries["critical_layer"], boundaries["mutation_layers"]
    stab = a.stages["stabilization"]
    return {
        "critical": None if crit is None else within_tolerance(a.critical_layer, crit, tolerance),
        "mutation": None if crit is None else mutation_agrees(a.mutation, muts, tolerance),
        "stabilization": (stab is not None and stab[1] - stab[0] + 1 >= 2) if boundaries.get("removable_at_least_2") else None,
        "a/b": None if b is None else within_tolerance(a.critical_layer, b.critical_layer, tolerance)
        and within_tolerance(a.mutation, b.mutation, tolerance),
    }


def _read(path: Path, reader: Callable[[Path], T]) -> T | None:
    try:
        return reader(path)
    except EvotoolError:
        return None


def _layer(value: int | None) -> str:
    return "none" if value is None else str(value)


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def member_row(name: str, member: ZooMember, member_dir: Path, current: BehaviourConfig) -> dict[str, str]:
    """One table row (column -> text) for a member; ``current``: the measurement settings the truth should have."""
    metrics = _read(member_dir / "model" / "metrics.json", read_json)
    behaviour = _read(member_dir / BEHAVIOUR_FILE, lambda path: read_behaviour(path, current.rules))
    family = member.model.family + (" (tied)" if member.model.tie_embeddings else "")
    row = {"member": name, "split": member.split, "family": family, "L": str(member.model.layers),
           "width": str(member.model.width), "steps": str(member.steps()[1])}
    if metrics:
        held = metrics["held_out"]
        pope = [held[g][t]["accuracy"] for g in held for t in held[g] if t.startswith("pope")]
        row.update({"train min": _num(metrics.get("train_seconds", 0) / 60, 1),
                    "recall": _num(held["in_distribution"]["caption"]["recall"]),
                    "CHAIR_i in": _num(held["in_distribution"]["caption"]["chair_i"]),
                    "CHAIR_i pb": _num(held["prior_breaking"]["caption"]["chair_i"]),
                    "POPE acc": _num(sum(pope) / len(pope) if pope else None)})
    if behaviour:
        b = behaviour["boundaries"]
        removable = b["removable"]
        sets = [f"{removable[k]['layers']} ({removable[k]['agreement']:.2f})" for k in ("1", "2") if k in removable]
        measured = behaviour.get("settings", {}).get("behaviour", {})
        other = "" if measured == current.measurement() else "†"
        plateau = critical_plateau(behaviour, current.rules)
        row.update({"beh. critical": _layer(b["critical_layer"]) + ("*" if behaviour["stale"] else "") + other,
                    PLATEAU_COLUMN: "-".join(dict.fromkeys(map(_layer, plateau))),
                    "_captions": str(measured.get("captions", "?")),
                    "beh. mutation": str(b["mutation_layers"] or "none"),
                    "removable k=1 / k=2": " / ".join(sets), ">=2 removable": "yes" if b["removable_at_least_2"] else "no"})
        resampled = behaviour.get("resampled")
        if resampled:
            shares = (resampled["critical_reproduced"], resampled["mutation_reproduced"])
            row["beh. reproduced (C / M)"] = " / ".join(f"{v:.2f}" for v in shares)
            row.update({"_firm_critical": shares[0] >= FIRM, "_firm_mutation": shares[1] >= FIRM})
    runs = {tag: _read(member_dir / f"analysis_{tag}", StageFile.read) for tag in ("a", "b")}
    for tag, stages in runs.items():
        if stages:
            row[f"detector {tag} (C / M)"] = f"{stages.critical_layer} / {stages.mutation_layers or '-'}"
    row["_uncertain"] = [bool(set(UNCERTAINTY_FLAGS) & set(s.flags)) for s in runs.values() if s]
    a = runs["a"]
    if a:
        interval = a.payload.get("interval", {})
        row["interval a (C / M)"] = " / ".join("-".join(map(str, v)) if v else "-" for v in
                                              (interval.get("critical"), interval.get("mutation")))
        row["flags a"] = ", ".join(a.flags) or "-"
    if a and behaviour:
        checks = verdict(behaviour["boundaries"], a, runs["b"])
        row["verdict"] = ", ".join(f"{k} {'ok' if v else 'MISS'}" for k, v in checks.items() if v is not None)
        row.update({f"_{k}": v for k, v in checks.items()})
    return {c: row.get(c, "-") for c in COLUMNS} | {k: v for k, v in row.items() if k.startswith("_")}


def _flag_counts(rows: list[dict]) -> str:
    """' Uncertainty flags ... on X of Y runs whose sets disagree, on K of J whose sets agree.' ('' when none is
    flagged): how often the flags warned where a second sample set did move a boundary."""
    flagged = {agree: [u for r in rows if r.get("_a/b") is agree for u in r["_uncertain"]] for agree in (False, True)}
    if not any(flagged.values()):
        return ""
    return (f" Uncertainty flags ({' / '.join(UNCERTAINTY_FLAGS)}) on {sum(flagged[False])} of {len(flagged[False])} "
            f"analysis runs whose member's two sample sets disagree (a/b), on {sum(flagged[True])} of "
            f"{len(flagged[True])} whose sets agree.")


def zoo_table(members: dict[str, ZooMember], out: Path, current: BehaviourConfig | None = None) -> str:
    """The Markdown table of ``members`` built under ``out`` (split by split in :data:`SPLITS` order, then depth),
    followed by the detector-vs-behaviour scores of each split present; ``current``: the truth's measurement settings
    (default: :class:`BehaviourConfig`'s), members measured otherwise are marked."""
    current = current or BehaviourConfig()
    order = sorted(members, key=lambda n: (SPLITS.index(members[n].split), members[n].model.layers, n))
    rows = [member_row(n, members[n], out / n, current) for n in order]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r[c] for c in COLUMNS) + " |" for r in rows]
    for split in dict.fromkeys(r["split"] for r in rows):
        part = [r for r in rows if r["split"] == split]
        scores = [f"{k} {sum(r.get(f'_{k}') is True for r in part)}/{sum(r.get(f'_{k}') is not None for r in part)}"
                  for k in CHECKS]
        captions = sorted({r["_captions"] for r in part if "_captions" in r}, key=lambda c: (len(c), c))
        lines += ["", f"Detector vs behaviour on the {split} members: " + ", ".join(scores) + "."
                  + (f" Ground truth measured on {' / '.join(captions)} captions." if captions else "")]
        loose = [f"{k} {sum(r.get(f'_{k}') is False and r.get(f'_firm_{k}') is False for r in part)}"
                 for k in ("critical", "mutation")]
        if any(f"_firm_{k}" in r for r in part for k in ("critical", "mutation")):
            lines[-1] += (f" Misses where the behaviour itself is loose (reproduced by < {FIRM:.0%} of caption "
                          "resamples): " + ", ".join(loose) + ".")
        lines[-1] += _flag_counts(part)
    overall = _flag_counts(rows)
    if len({r["split"] for r in rows}) > 1 and overall:
        lines += ["", "All splits:" + overall]
    if any("†" in r["beh. critical"] for r in rows):
        lines += ["", f"† ground truth measured under other settings than the current ones ({current.captions} captions, "
                  f"{current.pope} POPE questions, ...); `evotool zoo build --steps truth` measures it again."]
    rules = current.rules
    if rules.mutation_chair_cut is not None:
        lines += ["", f"Behavioural mutation layers read with the hallucination reading: also post-critical layers whose "
                  f"bypass cuts CHAIR_i by >= {rules.mutation_chair_cut:g} and >= {rules.mutation_chair_share:.0%} of "
                  f"the full model's at a recall loss <= {rules.removable_recall:g} (docs/stages.md; "
                  f"`--set behaviour.rules.mutation_chair_cut=null`: the rewrite rule alone, as holdout1-23 were read)."]
    if any("*" in r["beh. critical"] for r in rows):
        lines += ["", "\\* boundaries re-derived from the stored curves under the current rules (the stored ones are "
                  "stale; `evotool zoo status --refresh` rewrites them)."]
    return "\n".join(lines)

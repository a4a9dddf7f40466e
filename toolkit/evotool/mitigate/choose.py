"""``evotool mitigate --data VAL.jsonl``: choose a decoding method for one model on the user's validation manifest.

Every decoding method that can change greedy's tokens is tried (or those of ``--methods``): the stage-aware
ones over their option grid (``TUNE_GRID``, or ``grids``) with their stage-derived layers as the stage file
gives them and moved by each of ``layer_shifts`` (:func:`~evotool.mitigate.methods.candidates`, as
``evotool mitigate --method`` tunes), DoLa and VCD at their published defaults. All candidates and greedy
decode the same batches interleaved (:func:`evotool.evals.harness.run_methods`), are scored by the manifest eval
(:mod:`evotool.evals.manifest`), and :func:`choose` picks one under the objective
(:class:`~evotool.mitigate.config.Choice`), or greedy when nothing beats it.

The run directory gets ``method.json`` (read by ``evotool eval ... --method RUN_DIR``), ``tuning.json``
(every candidate with its metrics and verdict, plus the decision) and ``tuning.md``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from evotool.config import to_dict
from evotool.data.inputs import Sample
from evotool.errors import ConfigError, InputError, StageFileError
from evotool.evals.manifest import (ObjectVocabulary, caption_vocabulary, check_manifest, score_generations,
                                   score_manifest)
from evotool.generation import Generations
from evotool.io import DirLock, atomic_write_text, write_json
from evotool.mitigate.base import Method
from evotool.mitigate.config import Choice, MitigateConfig
from evotool.mitigate.methods import BASELINE, build_method, candidates, default_grid, method_class, method_names
from evotool.mitigate.run import METHOD_FILE, METHOD_SCHEMA, TUNING_FILE, require_file
from evotool.stages import StageFile
from evotool.validate import output_dir

AUTO_OBJECTIVES = ("chair_i", "pope_f1", "exact_match")  # in this order, the first the validation metrics hold
CHOICE_SCHEMA = "1.2"  # tuning.json: 1.0 one method tuned; 1.1 + per-candidate method, verdict, decision; 1.2 + held_back


def minimised(key: str) -> bool:
    """CHAIR metrics are minimised, every other objective (F1, accuracy, exact match, recall) maximised."""
    return "chair" in key


def recall_key(objective: str) -> str | None:
    """The recall guarding a CHAIR objective, of the same split (``prior_breaking_chair_i`` -> ``prior_breaking_recall``)."""
    for suffix in ("chair_i", "chair_s"):
        if objective.endswith(suffix):
            return objective[: -len(suffix)] + "recall"
    return None


def objective_key(choice: Choice, metrics: Mapping[str, float]) -> str:
    """The metric the choice optimises on these (greedy's) metrics; InputError when they lack it."""
    keys = AUTO_OBJECTIVES if choice.objective == "auto" else (choice.objective,)
    for key in keys:
        if key in metrics:
            return key
    raise InputError(f"the validation metrics hold no {' / '.join(keys)}; present: {', '.join(sorted(metrics))}")


def check_guards(choice: Choice, metrics: Mapping[str, float]) -> None:
    """InputError naming the guarded metrics that ``metrics`` (greedy's, or the keys a manifest yields) lack."""
    missing = sorted(set(choice.guards) - set(metrics))
    if missing:
        raise InputError(f"guarded metric {', '.join(missing)} is not in the validation metrics; present: "
                         f"{', '.join(sorted(metrics))}")


@dataclass
class Decision:
    """Which row of the table was chosen (0 = greedy), under which objective, and why each row was or was not."""

    index: int
    objective: str
    verdicts: list[str]
    message: str
    held_back: int | None = None  # the best row that only the latency limit kept out, if it beats the chosen one


def choose(table: Sequence[Mapping[str, float]], choice: Choice,
           win_rate: Callable[[int], float] | None = None) -> Decision:
    """Pick from validation metrics ``table`` (row 0: greedy, then the candidates).

    A candidate is eligible when its latency ratio is at most ``choice.max_latency_ratio``, (CHAIR objectives)
    its recall is at most ``choice.max_recall_loss`` below greedy's (absolute), each metric of ``choice.guards``
    is at most its allowed loss worse than greedy's (absolute, in the metric's direction; InputError when
    greedy's metrics lack it), its objective is strictly better than greedy's, and (given ``win_rate(i)``: the
    share of paired bootstrap resamples in which row i beats greedy, :func:`paired_bootstrap`) that gain holds
    in at least ``choice.min_win_rate`` of the resamples; ``win_rate`` is called only for rows passing the rest.
    The eligible candidate with the best objective wins; ties go to the higher recall (CHAIR) or the higher
    mean POPE accuracy (``pope_f1``), then the lower latency ratio, then the earlier row.
    Without an eligible candidate the choice is greedy (row 0), so the chosen row is never worse than greedy
    on the table it was chosen on. A row's verdict names the first check it fails in the order: objective present,
    guards, objective better than greedy's, latency, resamples; so "latency" means that only latency (and the
    resampling test, not run on it) kept it out. The best such row that would beat the choice is ``held_back``,
    named in the message.
    """
    if not table:
        raise ValueError("empty table")
    base = table[0]
    key = objective_key(choice, base)
    sign = 1.0 if minimised(key) else -1.0
    guard = recall_key(key)
    check_guards(choice, base)
    guards = ({guard: choice.max_recall_loss} if guard in base else {}) | choice.guards  # the recall guard first

    def loss(m: Mapping[str, float], metric: str) -> float:
        """How much worse than greedy ``m`` is on ``metric`` (a missing value counts as the worst)."""
        value = m.get(metric, float("inf") if minimised(metric) else float("-inf"))
        return value - base[metric] if minimised(metric) else base[metric] - value

    def tie(m: Mapping[str, float]) -> float:
        if guard is not None:
            return m.get(guard, 0.0)
        accuracies = [v for k, v in m.items() if key == "pope_f1" and k.startswith("pope_") and k.endswith("_accuracy")]
        return sum(accuracies) / len(accuracies) if accuracies else 0.0

    def rank(i: int) -> tuple[float, float, float, int]:
        return sign * table[i][key], -tie(table[i]), table[i].get("latency_ratio", 1.0), i

    verdicts, eligible, slow = ["baseline"], [], []
    for i, m in enumerate(table[1:], 1):
        latency = m.get("latency_ratio", 1.0)
        if key not in m:
            verdicts.append(f"no {key}")
        elif broken := [g for g, allowed in guards.items() if loss(m, g) > allowed + 1e-12]:
            verdicts.append("; ".join(f"{g} loss {loss(m, g):.3f} > {guards[g]}" for g in broken))
        elif sign * m[key] >= sign * base[key]:
            verdicts.append(f"{key} not better than greedy")
        elif latency > choice.max_latency_ratio:
            verdicts.append(f"latency {latency:.3f} > {choice.max_latency_ratio}")
            slow.append(i)
        elif win_rate is not None and choice.min_win_rate > 0 and (rate := win_rate(i)) < choice.min_win_rate:
            verdicts.append(f"{key} better in {rate:.0%} of resamples < {choice.min_win_rate:.0%}")
        else:
            verdicts.append("eligible")
            eligible.append(i)
    best = min(eligible, key=rank) if eligible else 0
    held = min((i for i in slow if best == 0 or rank(i) < rank(best)), key=rank, default=None)
    note = "" if held is None else (
        f"; row {held} ({key} {table[held][key]:.4f}) was kept out by latency alone "
        f"({table[held].get('latency_ratio', 1.0):.2f}x > {choice.max_latency_ratio}): raise --max-latency-ratio to test it")
    if not eligible:
        return Decision(0, key, verdicts, f"no method beats greedy on {key} within the constraints: greedy recorded"
                        + note, held)
    verdicts[best] = "chosen"
    return Decision(best, key, verdicts, f"row {best}: {key} {table[best][key]:.4f} vs greedy {base[key]:.4f}" + note,
                    held)


def paired_bootstrap(samples: Sequence[Sample], base: Generations, key: str, resamples: int,
                     vocab: ObjectVocabulary | None = None, seed: int = 0) -> Callable[[Generations], float]:
    """A function giving, for other outputs on ``samples``, the share of ``resamples`` paired bootstrap resamples
    (records drawn with replacement, the same draws for ``base`` and the other outputs) in which the other
    outputs' metric ``key`` is strictly better than ``base``'s; a resample whose metrics lack ``key`` (e.g. one
    without caption records) counts as no win. Seeded, so every candidate meets the same draws."""
    vocab = vocab or caption_vocabulary(samples)  # one vocabulary for every resample
    sign = 1.0 if minimised(key) else -1.0
    rng = random.Random(seed)
    draws = [[rng.randrange(len(samples)) for _ in samples] for _ in range(resamples)]

    def metric(gens: Generations, idx: list[int]) -> float | None:
        scores = score_manifest([samples[i] for i in idx], [gens.texts[i] for i in idx], [len(gens.ids[i]) for i in idx], vocab)
        return scores.get(key)

    base_scores = [metric(base, idx) for idx in draws]

    def rate(other: Generations) -> float:
        wins = 0
        for idx, a in zip(draws, base_scores):
            b = metric(other, idx)
            wins += a is not None and b is not None and sign * b < sign * a
        return wins / resamples

    return rate


def markdown(rows: Sequence[Mapping[str, Any]], decision: Decision) -> str:
    """The tuning table: one line per row with its options, the objective, its guard, latency and verdict."""
    keys = [k for k in dict.fromkeys((decision.objective, recall_key(decision.objective), "chair_s", "chair_i",
                                      "recall", "pope_f1", "exact_match", "latency_ratio"))
            if k is not None and k in rows[0]["metrics"]]
    lines = [f"Objective: {decision.objective} ({'lower' if minimised(decision.objective) else 'higher'} is better). "
             f"{decision.message}.", "", "| method | options | " + " | ".join(keys) + " | verdict |",
             "|" + "---|" * (len(keys) + 3)]
    for row, verdict in zip(rows, decision.verdicts):
        opts = ", ".join(f"{k}={v}" for k, v in row["options"].items()) or "defaults"
        cells = " | ".join(f"{row['metrics'][k]:.3f}" if k in row["metrics"] else "" for k in keys)
        lines.append(f"| {row['method']} | {opts} | {cells} | {verdict} |")
    return "\n".join(lines) + "\n"


def run_choice(cfg: MitigateConfig, model: nn.Module | None = None, processor: Any = None) -> Path:
    """Try the methods on ``cfg.data``, record the choice in ``cfg.out``; returns the ``method.json`` path. Inputs
    and ``--out`` are checked before the model loads; the run holds ``cfg.out``'s lock; under several processes
    the batches are split between them and the main one writes."""
    from evotool.models.loading import process_state

    check_manifest(require_file(cfg.data, "validation manifest"))
    output_dir(cfg.out)
    if cfg.stages is not None:
        StageFile.read(cfg.stages)
    state = process_state(cfg.load)
    with DirLock(cfg.out) if state.is_main_process else contextlib.nullcontext():
        return _choose(cfg, model, processor, state.is_main_process)


def _choose(cfg: MitigateConfig, model: nn.Module | None, processor: Any, main: bool) -> Path:
    from evotool.analysis.run import resolve_model_id
    from evotool.data.inputs import load_samples
    from evotool.evals.harness import run_methods
    from evotool.models.loading import fingerprint, load_model
    from evotool.tracking import Tracker

    samples = load_samples(cfg.data)[: cfg.limit]
    vocab = ObjectVocabulary.parse(cfg.vocab) if cfg.vocab else None
    keys = {key: 0.0 for key in score_manifest(samples, [""] * len(samples), [0] * len(samples), vocab)}
    objective_key(cfg.choice, keys)  # the metrics this manifest yields, checked before the model loads
    check_guards(cfg.choice, {**keys, "latency_ratio": 1.0, "latency_s": 0.0})
    model_id = resolve_model_id(cfg.model)
    if model is None:
        model, processor = load_model(model_id, cfg.load)
    stages = StageFile.for_model(cfg.stages, model) if cfg.stages is not None else None

    found: list[tuple[str, dict[str, Any], Method]] = [(BASELINE, {}, build_method(BASELINE, model))]
    skipped: dict[str, str] = {}
    for name in cfg.methods or method_names():
        cls = method_class(name)
        if not cls.changes_outputs:
            skipped[name] = "its tokens are greedy's"
        elif cls.needs_stages and stages is None:
            skipped[name] = "needs a stage file (--stages)"
        elif not cls.needs_stages:
            found.append((name, {}, build_method(name, model)))  # DoLa, VCD: their published defaults
        else:
            try:
                option_grid = cfg.grids.get(name) or default_grid(name)
                found += [(name, opts, method)
                          for opts, method in candidates(name, model, stages, option_grid, cfg.layer_shifts)]
            except (ConfigError, StageFileError) as err:  # e.g. no mutation layer: the method does not apply
                skipped[name] = str(err)
    rows: list[dict[str, Any]] = [{"method": name, "options": opts} for name, opts, _ in found]
    labels = [BASELINE] + [f"{i}:{row['method']}" for i, row in enumerate(rows[1:], 1)]  # greedy: the latency baseline
    methods = {label: method for label, (_, _, method) in zip(labels, found)}
    print(f"scoring greedy and {len(rows) - 1} candidates on {len(samples)} records", flush=True)
    clock = cfg.clock if cfg.clock != "auto" else ("cpu" if model.device.type == "cpu" else "wall")
    runner = run_methods(model, processor, methods, samples, cfg.batch_size, cfg.max_new_tokens, clock)
    latency = runner.latency()
    for row, label in zip(rows, labels):
        row["metrics"] = score_generations(samples, runner.outputs[label], vocab) | latency[label]
        row["layers"] = methods[label].layers_used()
    @functools.cache
    def wins() -> Callable[[Generations], float]:  # built on first use: choose() asks only when the test is on
        return paired_bootstrap(samples, runner.outputs[BASELINE], objective_key(cfg.choice, rows[0]["metrics"]),
                                cfg.choice.resamples, vocab)

    def rate(i: int) -> float:
        rows[i]["win_rate"] = wins()(runner.outputs[labels[i]])
        return rows[i]["win_rate"]

    decision = choose([row["metrics"] for row in rows], cfg.choice, rate)
    for row, verdict in zip(rows, decision.verdicts):
        row["verdict"] = verdict
    chosen = rows[decision.index]
    method = methods[labels[decision.index]]
    print(decision.message, flush=True)
    if not main:
        return cfg.out / METHOD_FILE
    atomic_write_text(cfg.out / "tuning.md", markdown(rows, decision))
    write_json(cfg.out / TUNING_FILE, {"data": str(cfg.data), "objective": decision.objective, "clock": clock,
                                       "choice": to_dict(cfg.choice), "decision": decision.message,
                                       "chosen": decision.index, "held_back": decision.held_back, "candidates": rows,
                                       "skipped": skipped},
               schema=CHOICE_SCHEMA)  # method.json last: it marks the run done
    path = write_json(cfg.out / METHOD_FILE, {
        "method": chosen["method"], "options": chosen["options"], "stages": str(cfg.stages) if cfg.stages else None,
        "model": model_id, "fingerprint": fingerprint(model), "layers": chosen["layers"],
        "config": to_dict(method.config),
        "validation": {"data": str(cfg.data), "n": len(samples), "objective": decision.objective, "clock": clock,
                       "choice": to_dict(cfg.choice), "decision": decision.message, "metrics": chosen["metrics"],
                       "greedy": rows[0]["metrics"]}}, schema=METHOD_SCHEMA)
    tracker = Tracker("mitigate-choose", to_dict(cfg), cfg.out, enabled=cfg.wandb)
    keys = sorted(rows[0]["metrics"])
    tracker.log_table("tuning", ["method", "options", "verdict", *keys],
                      [[r["method"], json.dumps(r["options"]), r["verdict"], *(r["metrics"].get(k) for k in keys)]
                       for r in rows])
    tracker.summary({"method": chosen["method"], "options": json.dumps(chosen["options"]), "decision": decision.message})
    tracker.finish()
    return path

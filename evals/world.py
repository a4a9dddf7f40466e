"""Exact-ground-truth evaluation on the synthetic world: captions (recall, CHAIR), POPE, attributes.

Every split is held out (its own seed stream) and truthful. ``in_distribution`` scenes follow the
training co-occurrence prior; ``prior_breaking`` scenes hold the prior's cause without its partner
(a circle and no square), where the shipped model hallucinates the square in its captions.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evotool.data.inputs import Sample
from evotool.evals.chair import chair_metrics
from evotool.evals.pope import POPE_SPLITS, pope_metrics
from evotool.generation import GenerateFn, generate_samples, greedy_generate
from evotool.world import records_to_samples
from evotool.world.generator import COLOURS, SHAPES, WorldConfig, make_records

POPE_TASKS = ("pope_random", "pope_popular", "pope_adversarial")
GROUPS = {"in_distribution": "test", "prior_breaking": "prior_breaking"}

_MENTION = re.compile(rf"\b(?:({'|'.join(COLOURS)})\s+)?({'|'.join(SHAPES)})s?\b")


@functools.lru_cache(maxsize=1 << 16)
def caption_mentions(caption: str) -> tuple[tuple[str | None, str], ...]:
    """(colour or None, shape) for every shape word in a world caption, in order. Cached: the behavioural truth's
    caption resamples score the same generations hundreds of times."""
    return tuple((m.group(1), m.group(2)) for m in _MENTION.finditer(caption.lower()))


def mentioned_objects(caption: str) -> set[str]:
    """The shape names (CHAIR vocabulary of the world) a caption mentions."""
    return {shape for _, shape in caption_mentions(caption)}


def caption_scores(captions: Sequence[str], samples: Sequence[Sample], lengths: Sequence[int]) -> dict[str, float]:
    """CHAIR_s, CHAIR_i (every mention counted, as in the reference CHAIR), object recall, mean length,
    plus ``description_recall``: colour+shape pairs named."""
    scores = chair_metrics([[shape for _, shape in caption_mentions(c)] for c in captions],
                           [set(s.objects or ()) for s in samples], lengths)
    named = [{f"{c} {s}" for c, s in caption_mentions(cap) if c} for cap in captions]
    truth = [set(s.meta["descriptions"]) for s in samples]
    scores["description_recall"] = sum(len(n & t) for n, t in zip(named, truth)) / sum(len(t) for t in truth)
    return scores


def evaluate_world(
    model: torch.nn.Module,
    processor: Any,
    n: int = 200,
    world: WorldConfig | None = None,
    batch_size: int = 50,
    max_new_tokens: int = 32,
    generate_fn: GenerateFn = greedy_generate,
    **generate_kwargs: Any,
) -> dict[str, dict[str, dict[str, float]]]:
    """Metrics ``{group: {task: {metric: value}}}`` on ``n`` held-out records per task and group.

    ``group`` is ``in_distribution`` or ``prior_breaking``; ``task`` is ``caption`` (chair_s, chair_i,
    recall, mean_length, description_recall), ``pope_random`` / ``pope_popular`` / ``pope_adversarial``
    (accuracy, precision, recall, f1, yes_ratio) and ``attribute`` (accuracy). ``generate_fn`` has the
    signature of :func:`evotool.generation.greedy_generate`; extra keyword arguments (e.g.
    ``logits_processor``) go to it.
    """
    world = world or WorldConfig()
    results: dict[str, dict[str, dict[str, float]]] = {}
    for group, split in GROUPS.items():
        results[group] = {}
        for task in ("caption", *POPE_TASKS, "attribute"):
            samples = records_to_samples(make_records(task, split, n, world))
            out = generate_samples(model, processor, samples, batch_size, max_new_tokens, generate_fn, **generate_kwargs)
            if task == "caption":
                results[group][task] = caption_scores(out.texts, samples, [len(i) for i in out.ids])
            elif task == "attribute":
                correct = [t.strip().lower() == s.answer for t, s in zip(out.texts, samples)]
                results[group][task] = {"accuracy": sum(correct) / len(correct)}
            else:
                results[group][task] = pope_metrics(out.texts, [s.answer for s in samples])
    return results


def world_flat(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, float]:
    """Flat keys of :func:`evotool.evals.world.evaluate_world` results.

    Every value as ``<group>_<metric>`` (caption) or ``<group>_<task>_<metric>``; the contract keys
    without prefix are the caption metrics of the ``prior_breaking`` group (where the prior makes the
    model hallucinate) and the POPE metrics of the ``in_distribution`` group (POPE's own construction:
    random / popular / adversarial negatives on ordinary scenes).
    """
    flat: dict[str, float] = {}
    for group, tasks in results.items():
        for task, scores in tasks.items():
            for metric, value in scores.items():
                flat[f"{group}_{'' if task == 'caption' else task + '_'}{metric}"] = value
    for metric, value in results.get("prior_breaking", {}).get("caption", {}).items():
        flat[metric] = value
    for split in POPE_SPLITS:
        for metric, value in results.get("in_distribution", {}).get(f"pope_{split}", {}).items():
            flat[f"pope_{split}_{metric}"] = value
    return flat


def flatten(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"a": {"b": 1.0}}`` -> ``{"a/b": 1.0}`` (for loggers and tables)."""
    flat: dict[str, float] = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat

"""Quality retention of a pruned / skipping / healed model against the full model.

* Greedy token agreement: on the same held-out world captions, the share of the full model's greedy
  tokens that the candidate reproduces at the same position (a missing position counts as a miss), and
  the share of samples reproduced exactly.
* Task accuracy on the synthetic world (:func:`evotool.evals.world.evaluate_world`): caption recall and
  CHAIR, POPE (random / popular / adversarial) and attribute accuracy, in distribution and prior-breaking.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from evotool.data.inputs import Sample
from evotool.generation import generate_samples


def token_agreement(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> dict[str, float]:
    """``agreement``: matched positions / reference tokens; ``exact``: share of identical sequences."""
    if len(reference) != len(candidate):
        raise ValueError("reference and candidate hold different numbers of samples")
    total = sum(len(r) for r in reference)
    matched = sum(sum(a == b for a, b in zip(r, c)) for r, c in zip(reference, candidate))
    exact = np.mean([list(r) == list(c) for r, c in zip(reference, candidate)]) if reference else float("nan")
    return {"agreement": matched / max(total, 1), "exact": float(exact)}


def greedy_ids(model: nn.Module, processor: Any, samples: Sequence[Sample], max_new_tokens: int,
               batch_size: int = 16) -> list[list[int]]:
    """Greedy token ids of ``samples`` in batches."""
    return generate_samples(model, processor, samples, batch_size, max_new_tokens).ids


# Columns of the prune tables: agreement with the full model and, with a world evaluation, four headline
# values of the flat world metrics (:func:`evotool.evals.world.world_flat`; every key is kept in the JSON).
HEADLINE = ("agreement", "exact", "in_distribution_recall", "chair_i", "pope_accuracy", "in_distribution_attribute_accuracy")
POPE_TASKS = ("pope_random", "pope_popular", "pope_adversarial")


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The :data:`HEADLINE` values of one variant's flat metrics: ``chair_i`` is on prior-breaking captions (the
    contract key), ``pope_accuracy`` the mean POPE accuracy over 3 splits x 2 groups; world values only when
    the world was evaluated."""
    out = {k: metrics[k] for k in HEADLINE if k in metrics}
    if "in_distribution_pope_random_accuracy" in metrics:
        out["pope_accuracy"] = float(np.mean([metrics[f"{group}_{task}_accuracy"] for task in POPE_TASKS
                                              for group in ("in_distribution", "prior_breaking")]))
    return {k: out[k] for k in HEADLINE if k in out}


def evaluate_variant(model: nn.Module, processor: Any, reference_ids: Sequence[Sequence[int]],
                     samples: Sequence[Sample], max_new_tokens: int, world_n: int) -> dict[str, float]:
    """Token agreement with ``reference_ids`` on ``samples`` and (``world_n`` > 0) the flat world metrics
    (the keys of ``results.json``)."""
    from evotool.evals.world import evaluate_world, world_flat

    result = token_agreement(reference_ids, greedy_ids(model, processor, samples, max_new_tokens))
    if world_n:
        result.update(world_flat(evaluate_world(model, processor, n=world_n, max_new_tokens=max_new_tokens)))
    return result

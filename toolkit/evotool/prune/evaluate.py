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


# The world metrics shown in tables (flattened evaluate_world keys); everything is kept in the JSON.
HEADLINE = {
    "recall": "in_distribution/caption/recall",
    "chair_i_pb": "prior_breaking/caption/chair_i",
    "pope_acc": ("pope_random", "pope_popular", "pope_adversarial"),
    "attribute": "in_distribution/attribute/accuracy",
}


def headline(world: dict[str, float]) -> dict[str, float]:
    """Caption recall (in distribution), CHAIR_i (prior-breaking), mean POPE accuracy (3 splits x 2 groups), attribute accuracy."""
    out = {}
    for name, key in HEADLINE.items():
        if isinstance(key, tuple):
            out[name] = float(np.mean([world[f"{g}/{t}/accuracy"] for g in ("in_distribution", "prior_breaking") for t in key]))
        else:
            out[name] = world[key]
    return out


def evaluate_variant(model: nn.Module, processor: Any, reference_ids: Sequence[Sequence[int]],
                     samples: Sequence[Sample], max_new_tokens: int, world_n: int) -> dict[str, Any]:
    """Token agreement with ``reference_ids`` on ``samples`` and (``world_n`` > 0) the world evaluation, flattened."""
    from evotool.evals.world import evaluate_world, flatten

    result: dict[str, Any] = token_agreement(reference_ids, greedy_ids(model, processor, samples, max_new_tokens))
    if world_n:
        world = flatten(evaluate_world(model, processor, n=world_n, max_new_tokens=max_new_tokens))
        result.update(headline(world))
        result["world"] = world
    return result

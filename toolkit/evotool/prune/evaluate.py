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

from evotool.generation import greedy_generate


def token_agreement(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> dict[str, float]:
    """``agreement``: matched positions / reference tokens; ``exact``: share of identical sequences."""
    if len(reference) != len(candidate):
        raise ValueError("reference and candidate hold different numbers of samples")
    total = sum(len(r) for r in reference)
    matched = sum(sum(a == b for a, b in zip(r, c)) for r, c in zip(reference, candidate))
    exact = np.mean([list(r) == list(c) for r, c in zip(reference, candidate)]) if reference else float("nan")
    return {"agreement": matched / max(total, 1), "exact": float(exact)}


def caption_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` held-out caption records: half in distribution, half prior-breaking."""
    from evotool.world import WorldConfig, make_records

    world = WorldConfig(seed=seed)
    return make_records("caption", "test", (n + 1) // 2, world) + make_records("caption", "prior_breaking", n // 2, world)


def greedy_ids(model: nn.Module, processor: Any, records: Sequence[dict[str, Any]], max_new_tokens: int,
               batch_size: int = 16) -> list[list[int]]:
    """Greedy token ids of ``records`` (image, prompt) in batches."""
    out: list[list[int]] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        ids, _ = greedy_generate(model, processor, [r["image"] for r in chunk], [r["prompt"] for r in chunk], max_new_tokens)
        out += ids
    return out


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
                     records: Sequence[dict[str, Any]], max_new_tokens: int, world_n: int) -> dict[str, Any]:
    """Token agreement with ``reference_ids`` on ``records`` and (``world_n`` > 0) the world evaluation, flattened."""
    from evotool.evals.world import evaluate_world, flatten

    result: dict[str, Any] = token_agreement(reference_ids, greedy_ids(model, processor, records, max_new_tokens))
    if world_n:
        world = flatten(evaluate_world(model, processor, n=world_n, max_new_tokens=max_new_tokens))
        result.update(headline(world))
        result["world"] = world
    return result

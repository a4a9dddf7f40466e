"""The bypass check: a behavioural test of the detector's mutation calls on the run's own samples.

A mutation layer is a claim about behaviour: the deep layer overturns what the stable stage decided. The
check generates the run's samples again (greedy, the run's token budget) with each post-critical layer
removed in turn (:func:`evotool.stages.behaviour.without_layers`) and measures, per layer, the share of the
full model's tokens the bypass rewrites and, where the samples carry ground-truth objects, how much it lowers
object hallucination (CHAIR_i over object mentions of the run's object vocabulary) and object recall.
:func:`confirm_mutations` keeps a call when its bypass rewrites at least ``check_min_rewrite`` of the tokens and
``check_ratio`` times the median over the other post-critical layers, or lowers CHAIR_i by ``check_chair_cut``
at a recall loss of at most ``check_recall``; the other calls are dropped (flag ``mutation_unconfirmed``).
The check never adds a layer the direct-effect rule did not call. Thresholds chosen in-sample on 44 zoo members; an
option (``StageConfig.mutation_check``), not adopted on holdout28 (docs/stages.md, "The bypass check").

Layers are numbered 1..L (0 = embeddings).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn
from tqdm import tqdm

from evotool.analysis.hallucination import object_tokens
from evotool.data.inputs import Sample
from evotool.generation import generate_samples
from evotool.prune.evaluate import token_agreement
from evotool.stages.behaviour import without_layers
from evotool.stages.detect import StageConfig, StageResult, stage_flags, stage_ranges


def object_scores(tokens: Sequence[Sequence[str]], samples: Sequence[Sample], vocab: set[str]) -> dict[str, float] | None:
    """CHAIR_i (hallucinated / all object mentions, every mention counted) and object recall (ground-truth objects
    mentioned / ground-truth objects) of generations given as token strings, one per sample; None when no sample
    has ground-truth objects or ``vocab`` is empty."""
    mentions = hallucinated = named = truth = 0
    for toks, sample in zip(tokens, samples, strict=True):
        if sample.objects is None:
            continue
        found = object_tokens({"tokens": list(toks), "objects": sample.objects}, vocab)
        mentions += len(found)
        hallucinated += sum(h for _, _, h in found)
        objects = {o.lower() for o in sample.objects}
        named += len(objects & {entry for _, entry, _ in found})
        truth += len(objects)
    if not vocab or truth == 0:
        return None
    return {"chair_i": hallucinated / mentions if mentions else 0.0, "recall": named / truth}


def bypass_effects(model: nn.Module, processor: Any, samples: Sequence[Sample], layers: Sequence[int], vocab: set[str],
                   max_new_tokens: int, batch_size: int) -> dict[int, dict[str, float]]:
    """Per layer in ``layers`` (1..L), generation of ``samples`` with that layer removed against the full model's:
    ``rewrite`` (1 - token agreement) and, with ground-truth objects, ``chair_cut`` (full CHAIR_i - bypassed) and
    ``recall_loss`` (full object recall - bypassed)."""
    tokenizer = getattr(processor, "tokenizer", processor)

    def run(variant: nn.Module) -> tuple[list[list[int]], dict[str, float] | None]:
        ids = generate_samples(variant, processor, samples, batch_size, max_new_tokens).ids
        return ids, object_scores([tokenizer.convert_ids_to_tokens(i) for i in ids], samples, vocab)

    full_ids, full = run(model)
    effects = {}
    for layer in tqdm(layers, desc="mutation check", unit="layer", file=sys.stderr):
        with without_layers(model, [layer]) as variant:
            ids, scores = run(variant)
        effects[layer] = {"rewrite": 1.0 - token_agreement(full_ids, ids)["agreement"]}
        if full is not None and scores is not None:
            effects[layer].update(chair_cut=full["chair_i"] - scores["chair_i"], recall_loss=full["recall"] - scores["recall"])
    return effects


def confirmed(layer: int, effects: dict[int, dict[str, float]], cfg: StageConfig) -> bool:
    """Whether the bypass of ``layer`` shows a mutation (rules in the module docstring); ``effects`` holds it and the
    other post-critical layers (the rewrite reference)."""
    effect = effects[layer]
    others = [e["rewrite"] for other, e in effects.items() if other != layer]
    reference = float(np.median(others)) if others else 0.0
    rewrites = effect["rewrite"] >= cfg.check_min_rewrite and effect["rewrite"] >= cfg.check_ratio * reference
    cuts = "chair_cut" in effect and effect["chair_cut"] >= cfg.check_chair_cut and effect["recall_loss"] <= cfg.check_recall
    return rewrites or cuts


def confirm_mutations(result: StageResult, effects: dict[int, dict[str, float]], cfg: StageConfig) -> StageResult:
    """``result`` with only the mutation calls the bypass ``effects`` (every layer after the critical one, see
    :func:`bypass_effects`) confirm; stages and stage flags follow, ``mutation_unconfirmed`` marks a dropped call and
    ``mutation_check`` records the effects and the calls before the check."""
    if result.critical_layer is None or not result.mutation_layers:
        return result
    missing = set(range(result.critical_layer + 1, result.num_layers + 1)) - set(effects)
    if missing:
        raise ValueError(f"bypass effects missing for post-critical layers {sorted(missing)}")
    kept = [m for m in result.mutation_layers if confirmed(m, effects, cfg)]
    stages = stage_ranges(result.num_layers, result.critical_layer, kept)
    flags = [f for f in result.flags if f not in stage_flags(result.critical_layer, result.stages)]
    flags += stage_flags(result.critical_layer, stages)
    if kept != result.mutation_layers:
        flags.append("mutation_unconfirmed")
    check = {"called": result.mutation_layers, "confirmed": kept,
             "effects": {str(layer): effect for layer, effect in sorted(effects.items())}}
    return dataclasses.replace(result, mutation_layers=kept, stages=stages, flags=flags, mutation_check=check)

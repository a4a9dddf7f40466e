"""The bypass check: a behavioural test of the detector's mutation calls on the run's own samples.

A mutation layer is a claim about behaviour: the deep layer overturns what the stable stage decided. The
check generates the run's samples again (greedy, the run's token budget) with each post-critical layer
removed in turn (:func:`evotool.stages.behaviour.without_layers`) and measures, per layer, the share of the
full model's tokens the bypass rewrites and, where the samples carry ground-truth objects, how much it lowers
object hallucination (CHAIR_i over object mentions of the run's object vocabulary) and object recall.
:func:`confirm_mutations` keeps a call when its bypass rewrites at least ``check_min_rewrite`` of the tokens and
``check_ratio`` times the median over the other post-critical layers, or lowers CHAIR_i by ``check_chair_cut``
at a recall loss of at most ``check_recall``; the other calls are dropped (flag ``mutation_unconfirmed``).
Two refinements are options (off by default): ``check_chair_guard`` drops a call kept for its rewrites alone when
its bypass raises CHAIR_i (the layer suppresses hallucinations), and ``check_add_cut`` adds the layers from critical
+ 2 on whose bypass cuts CHAIR_i by at least ``check_add_cut`` and ``check_add_share`` of the full model's CHAIR_i
at a recall loss of at most ``check_recall`` (flag ``mutation_added``): a hallucination layer the direct-effect
signal cannot see. The check is an option (``StageConfig.mutation_check``): its thresholds were chosen in-sample on 44
zoo members and not adopted as a default on holdout28; the two refinements were chosen in-sample on holdout28-31 and
changed no call on holdout32 (docs/stages.md, "The bypass check" and "The bypass check v2").

Layers are numbered 1..L (0 = embeddings).
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from tqdm import tqdm

from evotool.analysis.hallucination import object_tokens
from evotool.data.inputs import Sample, sample_digest
from evotool.errors import InputError
from evotool.generation import generate_samples
from evotool.io import read_json, write_json
from evotool.models.loading import fingerprint
from evotool.prune.evaluate import token_agreement
from evotool.stages.behaviour import without_layers
from evotool.stages.detect import StageConfig, StageResult, stage_flags, stage_ranges

CACHE_SCHEMA = "1.0"
BYPASS_FILE = "bypass.json"  # analyze's cache of the check's effects, in the run folder


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


@dataclass(frozen=True)
class Bypass:
    """What :func:`bypass_effects` measured: the full model's object scores (``chair_i``, ``recall``; None without
    ground-truth objects) and, per bypassed layer, ``rewrite`` and, with ground-truth objects, ``chair_cut`` and
    ``recall_loss``."""

    full: dict[str, float] | None
    effects: dict[int, dict[str, float]]


def bypass_effects(model: nn.Module, processor: Any, samples: Sequence[Sample], layers: Sequence[int], vocab: set[str],
                   max_new_tokens: int, batch_size: int, cache: Path | None = None) -> Bypass:
    """Per layer in ``layers`` (1..L), generation of ``samples`` with that layer removed against the full model's:
    ``rewrite`` (1 - token agreement) and, with ground-truth objects, ``chair_cut`` (full CHAIR_i - bypassed) and
    ``recall_loss`` (full object recall - bypassed).

    ``cache``: a JSON file of earlier effects; those measured for the same model, samples, vocabulary and generation
    settings are reused (a finalize run again with other stage options generates nothing), the rest measured and
    added to it; an unreadable cache is measured again and replaced (one line on stderr)."""
    key = {"fingerprint": fingerprint(model), "samples": hashlib.sha256("\n".join(
               f"{s.id}:{sample_digest(s)}" for s in samples).encode()).hexdigest(),
           "vocab": sorted(vocab), "max_new_tokens": max_new_tokens, "batch_size": batch_size}
    stored = None
    if cache is not None and cache.is_file():
        try:
            stored = read_json(cache, schema=CACHE_SCHEMA, keys=("key", "full", "effects"))
        except InputError as err:  # a damaged cache is measured again, not an error
            tqdm.write(f"{err}; measuring the bypass effects again", file=sys.stderr)
    known = Bypass(stored["full"], {int(k): v for k, v in stored["effects"].items()}) \
        if stored is not None and stored.get("key") == key else Bypass(None, {})
    todo = [layer for layer in layers if layer not in known.effects]
    if not todo:
        return Bypass(known.full, {layer: known.effects[layer] for layer in layers})
    tokenizer = getattr(processor, "tokenizer", processor)

    def run(variant: nn.Module) -> tuple[list[list[int]], dict[str, float] | None]:
        ids = generate_samples(variant, processor, samples, batch_size, max_new_tokens).ids
        return ids, object_scores([tokenizer.convert_ids_to_tokens(i) for i in ids], samples, vocab)

    full_ids, full = run(model)
    effects = dict(known.effects)
    for layer in tqdm(todo, desc="mutation check", unit="layer", file=sys.stderr):
        with without_layers(model, [layer]) as variant:
            ids, scores = run(variant)
        effects[layer] = {"rewrite": 1.0 - token_agreement(full_ids, ids)["agreement"]}
        if full is not None and scores is not None:
            effects[layer].update(chair_cut=full["chair_i"] - scores["chair_i"], recall_loss=full["recall"] - scores["recall"])
    if cache is not None:
        write_json(cache, {"key": key, "full": full, "effects": {str(k): v for k, v in sorted(effects.items())}},
                   schema=CACHE_SCHEMA)
    return Bypass(full, {layer: effects[layer] for layer in layers})


def confirmed(layer: int, effects: dict[int, dict[str, float]], cfg: StageConfig) -> bool:
    """Whether the bypass of ``layer`` shows a mutation (rules in the module docstring); ``effects`` holds it and the
    other post-critical layers (the rewrite reference)."""
    effect = effects[layer]
    others = [e["rewrite"] for other, e in effects.items() if other != layer]
    reference = float(np.median(others)) if others else 0.0
    rewrites = effect["rewrite"] >= cfg.check_min_rewrite and effect["rewrite"] >= cfg.check_ratio * reference
    cuts = "chair_cut" in effect and effect["chair_cut"] >= cfg.check_chair_cut and effect["recall_loss"] <= cfg.check_recall
    if rewrites and not cuts and cfg.check_chair_guard is not None and "chair_cut" in effect:
        rewrites = effect["chair_cut"] >= -cfg.check_chair_guard
    return rewrites or cuts


def added(critical: int, bypass: Bypass, cfg: StageConfig) -> list[int]:
    """The layers from ``critical`` + 2 on whose bypass cuts CHAIR_i by at least ``check_add_cut`` and
    ``check_add_share`` of the full model's at a recall loss of at most ``check_recall`` (none when
    ``check_add_cut`` is off or the samples have no ground-truth objects)."""
    if cfg.check_add_cut is None or bypass.full is None:
        return []
    least = max(cfg.check_add_cut, cfg.check_add_share * bypass.full["chair_i"])
    return sorted(layer for layer, e in bypass.effects.items() if layer >= critical + 2 and "chair_cut" in e
                  and e["chair_cut"] >= least and e["recall_loss"] <= cfg.check_recall)


def check_needed(result: StageResult, cfg: StageConfig) -> bool:
    """Whether the check has something to test on ``result``: a critical layer, and a call or ``check_add_cut`` set."""
    return result.critical_layer is not None and bool(result.mutation_layers or cfg.check_add_cut is not None)


def confirm_mutations(result: StageResult, bypass: Bypass, cfg: StageConfig) -> StageResult:
    """``result`` with only the mutation calls the bypass effects (every layer after the critical one, see
    :func:`bypass_effects`) confirm, plus the layers :func:`added` finds; stages and stage flags follow,
    ``mutation_unconfirmed`` marks a dropped call, ``mutation_added`` an added layer, and ``mutation_check`` records
    the calls before the check, the full model's scores and the effects."""
    if not check_needed(result, cfg):
        return result
    assert result.critical_layer is not None
    missing = set(range(result.critical_layer + 1, result.num_layers + 1)) - set(bypass.effects)
    if missing:
        raise ValueError(f"bypass effects missing for post-critical layers {sorted(missing)}")
    kept = [m for m in result.mutation_layers if confirmed(m, bypass.effects, cfg)]
    new = [m for m in added(result.critical_layer, bypass, cfg) if m not in kept]
    layers = sorted(kept + new)
    stages = stage_ranges(result.num_layers, result.critical_layer, layers)
    flags = [f for f in result.flags if f not in stage_flags(result.critical_layer, result.stages)]
    flags += stage_flags(result.critical_layer, stages)
    if not set(result.mutation_layers) <= set(layers):
        flags.append("mutation_unconfirmed")
    if not set(layers) <= set(result.mutation_layers):
        flags.append("mutation_added")
    check = {"called": result.mutation_layers, "confirmed": kept, "added": new, "full": bypass.full,
             "effects": {str(layer): effect for layer, effect in sorted(bypass.effects.items())}}
    return dataclasses.replace(result, mutation_layers=layers, stages=stages, flags=flags, mutation_check=check)

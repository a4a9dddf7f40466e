"""The bypass check of mutation calls (evotool.stages.check): object scores against the world's CHAIR, the rule
on planted effects, and `analyze` with the check on the shipped model against an independent static removal."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from evals.world import caption_scores
from evotool.analysis.config import AnalyzeConfig
from evotool.analysis.run import resolve_samples, run_analysis
from evotool.data.inputs import Sample
from evotool.errors import ConfigError
from evotool.generation import generate_samples
from evotool.models.loading import load_model
from evotool.prune.evaluate import token_agreement
from evotool.prune.runtime import cache_reference_layers
from evotool.prune.static import remove_layers
from evotool.stages import StageConfig, StageFile, detect_stages, stage_ranges
from evotool.stages.check import confirm_mutations, confirmed, object_scores
from evotool.world import default_model_path

SHAPES = {"circle", "square", "triangle", "cross"}


def test_object_scores_match_the_world_chair() -> None:
    captions = ["a red circle , a blue square .", "a green cross .", "a blue triangle , a red circle , a red circle ."]
    objects = [["circle"], ["cross", "square"], ["triangle"]]
    samples = [Sample(id=str(i), image=None, prompt="", objects=o, meta={"descriptions": [f"red {x}" for x in o]})
               for i, o in enumerate(objects)]
    tokens = [[("Ġ" if i else "") + w for i, w in enumerate(c.split())] for c in captions]
    ours = object_scores(tokens, samples, SHAPES)
    reference = caption_scores(captions, samples, [len(t) for t in tokens])
    assert ours is not None
    assert ours["chair_i"] == pytest.approx(reference["chair_i"]) and ours["chair_i"] == pytest.approx(3 / 6)
    assert ours["recall"] == pytest.approx(reference["recall"]) and ours["recall"] == pytest.approx(3 / 4)
    assert object_scores(tokens, [dataclasses.replace(s, objects=None) for s in samples], SHAPES) is None
    assert object_scores(tokens, samples, set()) is None


def _result(num_layers: int, critical: int, mutations: list[int]):
    """A detector result with planted boundaries (the curves are irrelevant to the check)."""
    p = np.tile(np.linspace(0, 1, num_layers + 1), (60, 1))
    res = detect_stages(p, decision_depth=np.full(60, critical), cfg=StageConfig(bootstrap=0))
    assert res.critical_layer == critical
    return dataclasses.replace(res, mutation_layers=mutations, stages=stage_ranges(num_layers, critical, mutations),
                               flags=["short_stable_stage"] if mutations and min(mutations) == critical + 2 else [])


def test_confirm_keeps_what_the_bypass_shows() -> None:
    cfg = StageConfig(bootstrap=0)
    quiet = {"rewrite": 0.005, "chair_cut": 0.0, "recall_loss": 0.0}
    effects = {layer: dict(quiet) for layer in range(4, 11)}  # 10 layers, critical 3
    effects[6] = {"rewrite": 0.04, "chair_cut": 0.0, "recall_loss": 0.0}  # 8x the others' median: kept
    effects[9] = {"rewrite": 0.01, "chair_cut": 0.0, "recall_loss": 0.0}  # under the 3% floor: dropped
    out = confirm_mutations(_result(10, 3, [6, 9]), effects, cfg)
    assert out.mutation_layers == [6] and out.mutation_check["called"] == [6, 9]
    assert out.stages == stage_ranges(10, 3, [6]) and "mutation_unconfirmed" in out.flags

    effects[6] = {"rewrite": 0.01, "chair_cut": 0.04, "recall_loss": 0.0}  # few rewrites, hallucinations cut: kept
    assert confirm_mutations(_result(10, 3, [6]), effects, cfg).mutation_layers == [6]
    effects[6]["recall_loss"] = 0.05  # ... unless the bypass also loses recall
    dropped = confirm_mutations(_result(10, 3, [5]), {**effects, 5: {"rewrite": 0.009, "chair_cut": 0.0,
                                                                     "recall_loss": 0.0}}, cfg)
    assert not confirmed(6, effects, cfg)
    # dropping the only call leaves no mutation stage, and a one-layer stable stage [4] grows to [4, 10]
    assert dropped.mutation_layers == [] and dropped.stages["stabilization"] == [4, 10]
    assert "short_stable_stage" not in dropped.flags and "mutation_unconfirmed" in dropped.flags

    everywhere = {layer: {"rewrite": 0.2} for layer in range(4, 11)}  # every bypass rewrites: none stands out
    assert confirm_mutations(_result(10, 3, [7]), everywhere, cfg).mutation_layers == []
    assert confirm_mutations(_result(10, 3, [7]), everywhere, StageConfig(bootstrap=0, check_ratio=1)).mutation_layers == [7]
    with pytest.raises(ValueError, match="missing"):
        confirm_mutations(_result(10, 3, [7]), {7: {"rewrite": 0.5}}, cfg)
    untouched = _result(10, 3, [])
    assert confirm_mutations(untouched, {}, cfg) is untouched
    for name, value in (("check_min_rewrite", 1.5), ("check_chair_cut", -0.1), ("check_recall", 2), ("check_ratio", -1)):
        with pytest.raises(ConfigError, match=name):
            StageConfig(**{name: value})


def test_analyze_runs_the_check_on_the_shipped_model(tmp_path) -> None:
    """Force mutation calls (a permissive rule), run the check in analyze; every effect matches generation from a
    statically pruned copy, the kept calls are the confirmed ones, and the world's CHAIR agrees with the check's."""
    stages = StageConfig(bootstrap=0, mutation_ratio=1.0, mutation_min_js=0.0, mutation_quiet_ratio=0.0,
                         mutation_last_excess=0.0, mutation_check=True, depth_share=0.3, object_share=0.0)
    cfg = AnalyzeConfig(out=tmp_path / "run", wandb=False, world_samples=8, max_new_tokens=24, figures=False,
                        keep_features=False, batch_size=8, stages=stages)
    result = StageFile.read(run_analysis(cfg))
    check = result.payload["mutation_check"]
    critical, n = result.critical_layer, result.num_layers
    assert check["called"] and set(check["confirmed"]) <= set(check["called"])
    effects = {int(k): v for k, v in check["effects"].items()}
    assert sorted(effects) == list(range(critical + 1, n + 1))
    assert result.mutation_layers == [m for m in check["called"] if confirmed(m, effects, stages)]
    assert {k: list(v) if v else None for k, v in result.stages.items()} == stage_ranges(n, critical, result.mutation_layers)

    model, processor = load_model(default_model_path())
    samples = resolve_samples(cfg)
    full = generate_samples(model, processor, samples, 8, 24)
    skipped = [k for k in effects if k not in cache_reference_layers(model)]  # runtime skipping, not a pruned copy
    layer = max(skipped, key=lambda k: effects[k]["rewrite"])
    pruned = copy.deepcopy(model)
    remove_layers(pruned, [layer])
    bypassed = generate_samples(pruned, processor, samples, 8, 24)
    assert effects[layer]["rewrite"] > 0
    assert effects[layer]["rewrite"] == pytest.approx(1 - token_agreement(full.ids, bypassed.ids)["agreement"])
    chair = [caption_scores(g.texts, samples, [len(i) for i in g.ids]) for g in (full, bypassed)]
    assert effects[layer]["chair_cut"] == pytest.approx(chair[0]["chair_i"] - chair[1]["chair_i"])
    assert effects[layer]["recall_loss"] == pytest.approx(chair[0]["recall"] - chair[1]["recall"])

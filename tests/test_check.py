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
from evotool.io import read_json
from evotool.models.loading import load_model
from evotool.prune.evaluate import token_agreement
from evotool.prune.runtime import cache_reference_layers
from evotool.prune.static import remove_layers
from evotool.stages import StageConfig, StageFile, detect_stages, stage_ranges
from evotool.stages import check as check_module
from evotool.stages.check import Bypass, confirm_mutations, confirmed, object_scores
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
    out = confirm_mutations(_result(10, 3, [6, 9]), Bypass(None, effects), cfg)
    assert out.mutation_layers == [6] and out.mutation_check["called"] == [6, 9]
    assert out.stages == stage_ranges(10, 3, [6]) and "mutation_unconfirmed" in out.flags

    effects[6] = {"rewrite": 0.01, "chair_cut": 0.04, "recall_loss": 0.0}  # few rewrites, hallucinations cut: kept
    assert confirm_mutations(_result(10, 3, [6]), Bypass(None, effects), cfg).mutation_layers == [6]
    effects[6]["recall_loss"] = 0.05  # ... unless the bypass also loses recall
    dropped = confirm_mutations(_result(10, 3, [5]), Bypass(None, {**effects, 5: {"rewrite": 0.009, "chair_cut": 0.0,
                                                                                 "recall_loss": 0.0}}), cfg)
    assert not confirmed(6, effects, cfg)
    # dropping the only call leaves no mutation stage, and a one-layer stable stage [4] grows to [4, 10]
    assert dropped.mutation_layers == [] and dropped.stages["stabilization"] == [4, 10]
    assert "short_stable_stage" not in dropped.flags and "mutation_unconfirmed" in dropped.flags

    everywhere = {layer: {"rewrite": 0.2} for layer in range(4, 11)}  # every bypass rewrites: none stands out
    assert confirm_mutations(_result(10, 3, [7]), Bypass(None, everywhere), cfg).mutation_layers == []
    assert confirm_mutations(_result(10, 3, [7]), Bypass(None, everywhere), StageConfig(bootstrap=0, check_ratio=1)).mutation_layers == [7]
    with pytest.raises(ValueError, match="missing"):
        confirm_mutations(_result(10, 3, [7]), Bypass(None, {7: {"rewrite": 0.5}}), cfg)
    untouched = _result(10, 3, [])
    assert confirm_mutations(untouched, Bypass(None, {}), cfg) is untouched
    for name, value in (("check_min_rewrite", 1.5), ("check_chair_cut", -0.1), ("check_recall", 2), ("check_ratio", -1),
                        ("check_chair_guard", -0.01), ("check_add_cut", 1.5), ("check_add_share", 2.0)):
        with pytest.raises(ConfigError, match=name):
            StageConfig(**{name: value})


def test_guard_drops_rewrite_only_calls_that_raise_hallucination() -> None:
    quiet = {"rewrite": 0.005, "chair_cut": 0.0, "recall_loss": 0.0}
    effects = {layer: dict(quiet) for layer in range(4, 11)}  # 10 layers, critical 3
    effects[6] = {"rewrite": 0.05, "chair_cut": -0.02, "recall_loss": 0.0}  # rewrites, but hallucinates more without it
    effects[8] = {"rewrite": 0.05, "chair_cut": -0.005, "recall_loss": 0.0}  # within the guard's tolerance
    v1, guard = StageConfig(bootstrap=0), StageConfig(bootstrap=0, check_chair_guard=0.01)
    assert confirmed(6, effects, v1) and confirmed(8, effects, v1)
    assert not confirmed(6, effects, guard) and confirmed(8, effects, guard)
    assert confirmed(6, {layer: {"rewrite": e["rewrite"]} for layer, e in effects.items()}, guard)  # no objects: no guard
    out = confirm_mutations(_result(10, 3, [6, 8]), Bypass({"chair_i": 0.1, "recall": 1.0}, effects), guard)
    assert out.mutation_layers == [8] and "mutation_unconfirmed" in out.flags


def test_check_adds_a_layer_whose_bypass_cuts_hallucination() -> None:
    quiet = {"rewrite": 0.01, "chair_cut": 0.0, "recall_loss": 0.0}
    effects = {layer: dict(quiet) for layer in range(3, 9)}  # 8 layers, critical 2
    effects[3] = {"rewrite": 0.2, "chair_cut": 0.1, "recall_loss": 0.0}  # critical + 1: the tail, never added
    effects[6] = {"rewrite": 0.02, "chair_cut": 0.05, "recall_loss": 0.0}  # cuts 0.05 of a full 0.16: >= 0.25 x 0.16
    effects[8] = {"rewrite": 0.02, "chair_cut": 0.06, "recall_loss": 0.05}  # cuts, but loses recall
    full = {"chair_i": 0.16, "recall": 1.0}
    cfg = StageConfig(bootstrap=0, check_add_cut=0.03, check_add_share=0.25)
    out = confirm_mutations(_result(8, 2, []), Bypass(full, effects), cfg)
    assert out.mutation_layers == [6] and out.stages == stage_ranges(8, 2, [6])
    assert out.mutation_check["added"] == [6] and out.mutation_check["called"] == [] and out.mutation_check["full"] == full
    assert "mutation_added" in out.flags and "mutation_unconfirmed" not in out.flags
    # the share scales the floor with the full model's hallucination: 0.25 x 0.24 = 0.06 > 0.05
    assert confirm_mutations(_result(8, 2, []), Bypass({**full, "chair_i": 0.24}, effects), cfg).mutation_layers == []
    # a call the check confirms stays, an added layer joins it; off (v1): nothing is added and nothing runs
    both = confirm_mutations(_result(8, 2, [8]), Bypass(full, {**effects, 8: {**effects[8], "rewrite": 0.1}}), cfg)
    assert both.mutation_layers == [6, 8] and both.mutation_check["added"] == [6]
    untouched = _result(8, 2, [])
    assert confirm_mutations(untouched, Bypass(full, effects), StageConfig(bootstrap=0)) is untouched
    assert confirm_mutations(untouched, Bypass(None, effects), cfg).mutation_layers == []  # no objects: nothing to add


def test_analyze_runs_the_check_on_the_shipped_model(tmp_path, monkeypatch, capsys) -> None:
    """Force mutation calls (a permissive rule), run the check in analyze; every effect matches generation from a
    statically pruned copy, the kept calls are the confirmed ones plus the added ones, and the world's CHAIR agrees
    with the check's."""
    stages = StageConfig(bootstrap=0, mutation_ratio=1.0, mutation_min_js=0.0, mutation_quiet_ratio=0.0,
                         mutation_last_excess=0.0, mutation_check=True, depth_share=0.3, object_share=0.0,
                         check_add_cut=0.0, check_add_share=0.0)  # adds every later layer whose bypass keeps recall, CHAIR_i
    cfg = AnalyzeConfig(out=tmp_path / "run", wandb=False, world_samples=8, max_new_tokens=24, figures=False,
                        keep_features=False, batch_size=8, stages=stages)
    result = StageFile.read(run_analysis(cfg))
    check = result.payload["mutation_check"]
    critical, n = result.critical_layer, result.num_layers
    assert check["called"] and set(check["confirmed"]) <= set(check["called"])
    effects = {int(k): v for k, v in check["effects"].items()}
    assert sorted(effects) == list(range(critical + 1, n + 1))
    assert check["confirmed"] == [m for m in check["called"] if confirmed(m, effects, stages)]
    adds = {k for k, e in effects.items() if k >= critical + 2 and e["chair_cut"] >= 0 and e["recall_loss"] <= 0.02}
    assert check["added"] == sorted(adds - set(check["confirmed"]))
    assert result.mutation_layers == sorted(set(check["confirmed"]) | adds)
    assert {k: list(v) if v else None for k, v in result.stages.items()} == stage_ranges(n, critical, result.mutation_layers)
    report = (tmp_path / "run" / "report.md").read_text()
    line = next(x for x in report.splitlines() if x.startswith("| mutation check |"))
    assert f"called {check['called']}" in line and ("added" in line) == bool(check["added"])
    assert "recall loss <= 0.02 are added" in line and "raises CHAIR_i" not in line  # the add rule on, the guard off

    # finalizing again with other check options reuses the stored effects: nothing is generated
    def no_generation(*args, **kwargs):
        raise AssertionError("the bypass effects were generated again")

    monkeypatch.setattr(check_module, "generate_samples", no_generation)
    again = dataclasses.replace(cfg, stages=dataclasses.replace(stages, check_add_cut=None, check_chair_guard=0.0))
    rerun = StageFile.read(run_analysis(again)).payload["mutation_check"]
    assert rerun["effects"] == check["effects"] and rerun["added"] == [] and rerun["full"] == check["full"]
    assert rerun["confirmed"] == [m for m in check["called"] if confirmed(m, effects, again.stages)]
    monkeypatch.undo()

    # a damaged cache is measured again (one line on stderr) and replaced, not an error
    (tmp_path / "run" / check_module.BYPASS_FILE).write_text('{"key": ')
    capsys.readouterr()
    remeasured = StageFile.read(run_analysis(cfg)).payload["mutation_check"]
    assert "not valid JSON" in capsys.readouterr().err and remeasured["effects"] == check["effects"]
    assert read_json(tmp_path / "run" / check_module.BYPASS_FILE)["effects"] == check["effects"]

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
    assert check["full"] == pytest.approx({"chair_i": chair[0]["chair_i"], "recall": chair[0]["recall"]})
    assert effects[layer]["chair_cut"] == pytest.approx(chair[0]["chair_i"] - chair[1]["chair_i"])
    assert effects[layer]["recall_loss"] == pytest.approx(chair[0]["recall"] - chair[1]["recall"])

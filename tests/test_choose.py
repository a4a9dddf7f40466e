"""`evotool mitigate --data`: the selection rule on hand-computed tables, the candidate grid around the stage
layers, and the whole choice on the shipped demo model (tune on a validation manifest, eval on a test one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, run_cli, stage_file, tiny_world_llava

from evotool.errors import ConfigError, InputError, StageFileError
from evotool.evals.results import read_results
from evotool.data.inputs import Sample
from evotool.evals.manifest import ObjectVocabulary
from evotool.generation import Generations
from evotool.mitigate.choose import choose, paired_bootstrap
from evotool.mitigate.config import Choice, MitigateConfig
from evotool.mitigate.methods import build_method, candidates
from evotool.models.loading import fingerprint, load_model
from evotool.stages import write_stages
from evotool.world import WorldConfig, default_model_path, make_records, write_manifest


def row(chair_i: float, recall: float = 1.0, latency: float = 1.0, **extra: float) -> dict[str, float]:
    return {"chair_i": chair_i, "recall": recall, "latency_ratio": latency, **extra}


GREEDY = row(0.20, recall=0.90)


# ---------------------------------------------------------------- the rule, by hand


def test_lowest_chair_i_within_the_constraints_wins() -> None:
    table = [GREEDY,
             row(0.05, recall=0.87),  # recall loss 0.03 > 0.02: out
             row(0.10, recall=0.88),  # loss exactly 0.02: in
             row(0.02, latency=1.20),  # too slow: out
             row(0.15)]
    d = choose(table, Choice())
    assert d.index == 2 and d.objective == "chair_i"
    assert d.verdicts[0] == "baseline" and d.verdicts[2] == "chosen" and d.verdicts[4] == "eligible"
    assert d.verdicts[1].startswith("recall loss 0.030") and d.verdicts[3].startswith("latency 1.200")
    # the constraints are configurable: a looser recall budget admits row 1, a looser latency row 3
    assert choose(table, Choice(max_recall_loss=0.05)).index == 1
    assert choose(table, Choice(max_latency_ratio=1.25)).index == 3


def test_a_better_row_kept_out_by_latency_alone_is_named() -> None:
    table = [GREEDY, row(0.15),
             row(0.05, latency=1.30),  # better than the choice, out for latency only: held back
             row(0.01, latency=1.20, recall=0.5),  # also too slow, but the recall guard names it
             row(0.18, latency=1.40)]  # out for latency only, but worse than the choice
    d = choose(table, Choice())
    assert d.index == 1 and d.held_back == 2
    assert d.verdicts[2].startswith("latency 1.300") and d.verdicts[3].startswith("recall loss 0.400")
    assert d.verdicts[4].startswith("latency 1.400")
    assert "row 2 (chair_i 0.0500) was kept out by latency alone (1.30x > 1.15)" in d.message
    assert choose(table, Choice(max_latency_ratio=1.3)).index == 2  # what the message suggests
    assert choose(table[:2] + table[4:], Choice()).held_back is None  # a slower, worse row is not named
    d = choose([GREEDY, row(0.18, latency=1.2), row(0.10, latency=1.4)], Choice())  # nothing eligible
    assert d.index == 0 and d.held_back == 2 and "greedy recorded; row 2" in d.message


def test_ties_go_to_recall_then_latency_then_the_earlier_row() -> None:
    assert choose([GREEDY, row(0.1, recall=0.9), row(0.1, recall=0.95)], Choice()).index == 2
    assert choose([GREEDY, row(0.1, latency=1.1), row(0.1, latency=1.05)], Choice()).index == 2
    assert choose([GREEDY, row(0.1, latency=1.1), row(0.1, latency=1.1)], Choice()).index == 1


def test_greedy_is_recorded_when_nothing_beats_it() -> None:
    table = [GREEDY, row(0.20), row(0.25), row(0.01, recall=0.5)]  # equal is no gain; worse; recall collapse
    d = choose(table, Choice())
    assert d.index == 0 and "no method beats greedy" in d.message
    assert d.verdicts[1] == d.verdicts[2] == "chair_i not better than greedy"
    assert choose([GREEDY], Choice()).index == 0


def test_pope_manifests_maximise_f1_with_accuracy_as_tie_break() -> None:
    def pope(f1: float, acc: float, latency: float = 1.0) -> dict[str, float]:
        return {"pope_f1": f1, "pope_test_accuracy": acc, "pope_prior_breaking_accuracy": acc, "latency_ratio": latency}

    table = [pope(0.70, 0.70), pope(0.80, 0.75), pope(0.80, 0.78), pope(0.90, 0.9, latency=1.3), pope(0.60, 0.99)]
    d = choose(table, Choice())
    assert (d.objective, d.index) == ("pope_f1", 2)  # no recall guard on F1; row 3 too slow
    assert choose([pope(0.7, 0.7), pope(0.6, 0.9)], Choice()).index == 0


def test_split_objective_is_guarded_by_that_splits_recall() -> None:
    base = {"prior_breaking_chair_i": 0.3, "prior_breaking_recall": 1.0, "recall": 1.0, "chair_i": 0.2}
    cand = {"prior_breaking_chair_i": 0.1, "prior_breaking_recall": 0.9, "recall": 1.0, "chair_i": 0.1, "latency_ratio": 1.0}
    d = choose([base, cand], Choice(objective="prior_breaking_chair_i"))
    assert d.index == 0 and d.verdicts[1].startswith("prior_breaking_recall loss 0.100")
    assert choose([base, cand], Choice()).index == 1  # overall chair_i, guarded by overall recall
    with pytest.raises(InputError, match="no exact_match"):
        choose([base, cand], Choice(objective="exact_match"))


def test_guards_refuse_gains_that_cost_another_metric() -> None:
    base = row(0.20, pope_f1=0.84, chair_s=0.40)
    table = [base,
             row(0.05, pope_f1=0.70, chair_s=0.10),   # best CHAIR_i, but POPE F1 -0.14
             row(0.10, pope_f1=0.83, chair_s=0.45),   # F1 -0.01 (in), CHAIR_s +0.05 (a minimised guard)
             row(0.12, pope_f1=0.85, chair_s=0.40)]
    assert choose(table, Choice()).index == 1  # unguarded: the POPE loss is not seen
    d = choose(table, Choice(guards={"pope_f1": 0.02}))
    assert d.index == 2 and d.verdicts[1] == "pope_f1 loss 0.140 > 0.02"
    d = choose(table, Choice(guards={"pope_f1": 0.02, "chair_s": 0.0}))
    assert d.index == 3 and d.verdicts[2] == "chair_s loss 0.050 > 0.0"
    d = choose(table, Choice(guards={"pope_f1": 0.0, "chair_s": 0.0}))
    assert d.index == 3 and d.verdicts[1:3] == ["pope_f1 loss 0.140 > 0.0", "pope_f1 loss 0.010 > 0.0; chair_s loss 0.050 > 0.0"]
    assert choose([base, {k: v for k, v in table[1].items() if k != "pope_f1"}], Choice(guards={"pope_f1": 0.5})).index == 0
    with pytest.raises(InputError, match="guarded metric exact_match is not in the validation metrics"):
        choose(table, Choice(guards={"exact_match": 0.0}))


@pytest.mark.parametrize("loss", [-0.1, "much", True])
def test_guard_losses_are_checked(loss: object) -> None:
    with pytest.raises(ConfigError, match="choice.guards.pope_f1 must be a number >= 0"):
        Choice(guards={"pope_f1": loss})


def test_a_gain_that_does_not_survive_resampling_is_refused() -> None:
    table = [GREEDY, row(0.05), row(0.10), row(0.12, latency=1.3)]
    asked: list[int] = []

    def win_rate(i: int) -> float:
        asked.append(i)
        return {1: 0.6, 2: 0.95}[i]

    d = choose(table, Choice(), win_rate)
    assert d.index == 2 and d.verdicts[1] == "chair_i better in 60% of resamples < 90%"
    assert asked == [1, 2]  # row 3 fails on latency first: no resampling for it
    assert choose(table, Choice(min_win_rate=0.5), win_rate).index == 1
    assert choose(table, Choice(min_win_rate=0.0), win_rate).index == 1 and asked == [1, 2, 1, 2]


def caption(i: int, objects: list[str]) -> Sample:
    return Sample(f"c{i}", Path("unused.png"), objects=objects, meta={"task": "caption"})


def outputs(texts: list[str]) -> Generations:
    return Generations([[0] * len(t.split()) for t in texts], texts)


def test_paired_bootstrap_counts_resamples_where_the_other_outputs_win() -> None:
    samples = [caption(0, ["dog"]), caption(1, ["cat"]), caption(2, ["dog", "cat"])]
    greedy = outputs(["a dog and a cat", "a cat", "a dog and a cat"])  # one phantom cat on record 0
    fixed = outputs(["a dog", "a cat", "a dog and a cat"])
    worse = outputs(["a dog and a cat", "a cat and a dog", "a dog and a cat"])
    rate = paired_bootstrap(samples, greedy, "chair_i", 400)
    # fixed wins exactly when the draw holds record 0 (p = 1 - (2/3)^3 = 0.704), never otherwise; worse never wins
    assert abs(rate(fixed) - (1 - (2 / 3) ** 3)) < 0.06 and rate(worse) == 0.0 and rate(greedy) == 0.0
    assert rate(fixed) == paired_bootstrap(samples, greedy, "chair_i", 400)(fixed)  # seeded
    one = paired_bootstrap(samples[:1], outputs(greedy.texts[:1]), "chair_i", 50, ObjectVocabulary.from_samples(samples))
    assert one(outputs(fixed.texts[:1])) == 1.0  # every draw is record 0
    assert paired_bootstrap(samples, greedy, "pope_f1", 20)(fixed) == 0.0  # no such metric: no win
    assert paired_bootstrap(samples, worse, "recall", 50)(greedy) == 0.0  # recall equal everywhere: never strictly better


# ---------------------------------------------------------------- candidates around the stage layers


def tuned_sets(name, model, stages, option_grid, shifts=(-1, 0, 1), fixed=None):
    """The option sets of :func:`candidates`, each checked against the layers its built method resolves."""
    found = candidates(name, model, stages, option_grid, shifts, fixed)
    for opts, method in found:
        assert method.layers_used() == build_method(name, model, {**(fixed or {}), **opts}, stages).layers_used()
    return [opts for opts, _ in found]


def test_candidates_move_the_stage_layers_and_drop_moves_out_of_range() -> None:
    model = build_tiny("llava", layers=6, seed=0)
    stages = stage_file(6, 2, [6])  # critical 2, stabilization 3..5, mutation layer 6 (the last)
    assert tuned_sets("stage_contrast", model, stages, {"premature": ["critical", "last_stable"]}) == [
        {"premature": "critical", "layer": 1}, {"premature": "critical"}, {"premature": "critical", "layer": 3},
        {"premature": "last_stable", "layer": 4}, {"premature": "last_stable"}]  # layer 6 is the final layer itself
    # smoothing of layer 6: 5 and 6 exist, 7 does not
    assert tuned_sets("smoothing", model, stages, {"alpha": [0.5]}) == [{"alpha": 0.5, "layers": [5]}, {"alpha": 0.5}]
    assert tuned_sets("stage_contrast", model, stages, {"weight": [0.5]}, (0,)) == [{"weight": 0.5}]
    # a layer the user fixes is not moved; the fixed options stay out of the tuned sets
    assert tuned_sets("stage_contrast", model, stages, {"weight": [0.5, 1.0]}, fixed={"layer": 4}) == [
        {"weight": 0.5}, {"weight": 1.0}]
    assert candidates("stage_contrast", model, stages, {}, (0,), {"layer": 4})[0][1].layers_used() == {"premature": 4}
    with pytest.raises(StageFileError, match="no tuning candidate of smoothing applies: every move"):
        candidates("smoothing", model, stages, {"alpha": [0.5]}, (1,))  # layer 7 does not exist, and no shift 0
    # critical 2, mutation 4: the last stable layer is 3, so its moves 2 and 3 repeat the critical layer's sets
    short = stage_file(6, 2, [4])
    assert tuned_sets("stage_contrast", model, short, {"premature": ["critical", "last_stable"]}) == [
        {"premature": "critical", "layer": 1}, {"premature": "critical"}, {"premature": "critical", "layer": 3},
        {"premature": "last_stable", "layer": 4}]
    # the dynamic readout ignores layer: one candidate
    assert tuned_sets("stable_readout", model, short, {"dynamic": [True], "layer": [3, 4]}) == [{"dynamic": True, "layer": 3}]


def test_stage_layers_a_method_cannot_use_are_refused_at_build_and_left_out_of_the_candidates(capsys) -> None:
    """A stage file whose stabilization stage ends at the output (no mutation) or that has none (critical = L): the
    stage-derived layer would be the output itself, so building the method says so; tuning keeps the sets that apply
    and names each set it leaves out on stderr."""
    model = build_tiny("llava", layers=6, seed=0)
    no_mutation, no_stable = stage_file(6, 2, []), stage_file(6, 6, [])
    with pytest.raises(StageFileError, match="premature=last_stable is the last layer .6.*with itself"):
        build_method("stage_contrast", model, {"premature": "last_stable"}, no_mutation)
    assert build_method("stage_contrast", model, {}, no_mutation).layers_used() == {"premature": 2}
    for options in ({}, {"dynamic": True}):
        with pytest.raises(StageFileError, match="critical layer is the last one .6.*no stabilization stage"):
            build_method("stable_readout", model, options, no_stable)
    # no mutation stage: the last stable layer is the output, whose readout would change nothing
    with pytest.raises(StageFileError, match="no mutation stage.*output layer .6.*no change"):
        build_method("stable_readout", model, {}, no_mutation)
    with pytest.raises(ConfigError, match="readout layer 6 must lie in 2..5"):
        build_method("stable_readout", model, {"layer": 6}, no_mutation)
    assert build_method("stable_readout", model, {"dynamic": True}, no_mutation).layers_used()["readout"] == "before_spike"
    # without a model (export-generate) the same checks run against the stage file alone
    with pytest.raises(StageFileError, match="no mutation stage.*output layer .6.*no change"):
        build_method("stable_readout", None, {}, no_mutation)
    for name, options in (("stage_contrast", {"premature": "last_stable", "layer": 4}), ("stable_readout", {"layer": 4})):
        assert build_method(name, None, options, no_mutation).layers_used() == build_method(
            name, model, options, no_mutation).layers_used()
    capsys.readouterr()
    assert tuned_sets("stable_readout", model, no_mutation, {"dynamic": [False, True]}) == [
        {"dynamic": False, "layer": 5}, {"dynamic": True}]
    assert capsys.readouterr().err.splitlines() == [
        f"skipped stable_readout candidate {{'dynamic': False}}: {no_mutation.source}: no mutation stage, so the "
        "stabilization stage ends at the output layer (6) and stable_readout would read out the output itself (no "
        "change); give layer= or dynamic=true"]
    with pytest.raises(StageFileError, match="no mutation layers"):
        build_method("smoothing", model, {}, no_mutation)
    premature = {"premature": ["critical", "last_stable"]}
    # last_stable is the output: that set goes, its move one layer down stays
    assert tuned_sets("stage_contrast", model, no_mutation, premature) == [
        {"premature": "critical", "layer": 1}, {"premature": "critical"}, {"premature": "critical", "layer": 3},
        {"premature": "last_stable", "layer": 5}]
    with pytest.raises(StageFileError, match="no tuning candidate of stage_contrast applies: .*with itself"):
        candidates("stage_contrast", model, no_stable, premature, (0,))  # no set applies: the method is skipped


def test_grid_flags_per_method_are_typed_and_a_single_value_is_a_list() -> None:
    from evotool.config import load_config, parse_set

    cfg = load_config(MitigateConfig, None, {"data": "val.jsonl", "grids": parse_set(
        ["stable_readout.dynamic=false", "stable_readout.threshold=0.1,0.2", "smoothing.threshold=null,0.1"])})
    assert cfg.grids == {"stable_readout": {"dynamic": [False], "threshold": [0.1, 0.2]},
                         "smoothing": {"threshold": [None, 0.1]}}


def test_cpu_clock_ignores_time_the_process_does_not_compute() -> None:
    """A method that waits (as it would for a CPU taken by other processes) costs wall time but no CPU time."""
    import time

    from PIL import Image

    from evotool.evals.harness import Interleaved

    class Waits:
        def generate_ids(self, inputs: dict, max_new_tokens: int) -> list[list[int]]:
            time.sleep(0.2)
            return [[5]] * inputs["input_ids"].shape[0]

    model, processor = tiny_world_llava(1)
    seconds = {}
    for clock in ("wall", "cpu"):
        runner = Interleaved({"greedy": Waits()}, clock)
        runner(model, processor, [Image.new("RGB", (48, 48))] * 2, ["Is there a circle?"] * 2, 2)
        seconds[clock] = runner.outputs["greedy"].seconds
    assert seconds["wall"] >= 0.19 and seconds["cpu"] < 0.05, seconds
    with pytest.raises(ValueError, match="clock"):
        Interleaved({"greedy": Waits()}, "sundial")


@pytest.mark.parametrize("threads, warned", [(1, False), (2, True)])
def test_cpu_clock_warns_with_several_torch_threads(threads: int, warned: bool, capsys: pytest.CaptureFixture) -> None:
    """CPU time counts the busy-waiting of idle torch threads on shared cores: the CPU clock says so unless one thread runs."""
    from evotool.evals.harness import Interleaved

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        Interleaved({"greedy": object()}, "cpu")  # type: ignore[dict-item]
        Interleaved({"greedy": object()}, "wall")  # type: ignore[dict-item]
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err
    assert ("--threads 1" in err) == warned and err.count("warning:") == int(warned), err


# ---------------------------------------------------------------- end to end on the shipped model


@pytest.fixture(scope="module")
def shipped_run(tmp_path_factory) -> Path:
    """Validation (world seed 1) and test (seed 0) caption manifests and a stage file of the shipped model."""
    root = tmp_path_factory.mktemp("choose")
    for name, seed in (("val", 1), ("test", 0)):
        world = WorldConfig(seed=seed)
        write_manifest(make_records("caption", "prior_breaking", 4, world) + make_records("caption", "test", 2, world),
                       root / name, world)
    model, _ = load_model(default_model_path())
    write_stages(root / "stages.json", {  # the shipped model's boundaries (tests/test_golden.py)
        "model": "demo", "fingerprint": fingerprint(model), "num_layers": 12, "critical_layer": 3,
        "mutation_layers": [11], "stages": {"rapid_evolution": [0, 3], "stabilization": [4, 10], "mutation": [11, 12]}})
    return root


def test_mitigate_data_chooses_on_validation_and_eval_reuses_the_run_dir(shipped_run, monkeypatch, capsys) -> None:
    root, run = shipped_run, shipped_run / "run"
    code, out, err = run_cli(monkeypatch, capsys, "mitigate", "--data", str(root / "val" / "manifest.jsonl"),
                             "--stages", str(root / "stages.json"), "--methods", "stage_contrast,dola,stage_speculative",
                             "--grid", "stage_contrast.weight=1.0", "--grid", "stage_contrast.alpha=0.01",
                             "--max-latency-ratio", "3", "--out", str(run))
    assert code == 0, err
    tuning = json.loads((run / "tuning.json").read_text())
    rows = tuning["candidates"]
    assert [(r["method"], r["layers"]) for r in rows] == [
        ("greedy", {}), ("stage_contrast", {"premature": 2}), ("stage_contrast", {"premature": 3}),
        ("stage_contrast", {"premature": 4}), ("dola", {"candidates": [6, 8, 10]})]
    assert tuning["skipped"] == {"stage_speculative": "its tokens are greedy's"}
    greedy, chosen = rows[0]["metrics"], rows[tuning["chosen"]]
    assert greedy["chair_i"] > 0  # the premise: greedy names the phantom square on prior-breaking images
    assert chosen["verdict"] == "chosen" and chosen["metrics"]["chair_i"] < greedy["chair_i"]
    assert chosen["metrics"]["chair_i"] == min(r["metrics"]["chair_i"] for r in rows if r["verdict"] in ("chosen", "eligible"))
    spec = json.loads((run / "method.json").read_text())
    assert (spec["method"], spec["options"], spec["layers"]) == (chosen["method"], chosen["options"], chosen["layers"])
    assert spec["validation"]["metrics"] == chosen["metrics"] and "chosen" in (run / "tuning.md").read_text()
    assert any((run / "wandb").rglob("*.wandb"))  # logged offline

    code, _, err = run_cli(monkeypatch, capsys, "eval", "manifest", "--data", str(root / "test" / "manifest.jsonl"),
                           "--method", str(run), "--out", str(root / "ev"), "--max-new-tokens", "32", "--no-wandb")
    assert code == 0, err
    record = read_results(root / "ev")
    assert (record["config"]["method"], record["config"]["options"]) == (spec["method"], spec["options"])
    assert {"chair_i", "prior_breaking_chair_i", "recall", "latency_ratio"} <= set(record["metrics"])


def test_greedy_fallback_end_to_end(shipped_run, monkeypatch, capsys) -> None:
    """VCD cannot beat greedy here: either its latency exceeds 1.0x or its recall is not above greedy's."""
    run = shipped_run / "fallback"
    code, out, err = run_cli(monkeypatch, capsys, "mitigate", "--data", str(shipped_run / "val" / "manifest.jsonl"),
                             "--methods", "vcd", "--objective", "recall", "--max-latency-ratio", "1.0",
                             "--limit", "2", "--out", str(run), "--no-wandb")
    assert code == 0, err
    spec = json.loads((run / "method.json").read_text())
    assert spec["method"] == "greedy" and "no method beats greedy" in spec["validation"]["decision"]


@pytest.mark.parametrize("args, message", [
    (("--method", "dola", "--data", "{root}/val/manifest.jsonl"), "not both"),
    (("--data", "{root}/val/manifest.jsonl", "--methods", "lora_all"), "no decoding method"),
    (("--data", "{root}/missing.jsonl"), "not found"),
    (("--data", "{root}/val/manifest.jsonl", "--objective", "exact_match", "--methods", "dola"), "no exact_match"),
    (("--data", "{root}/val/manifest.jsonl", "--guard", "pope_f1=0.02", "--methods", "dola"),
     "guarded metric pope_f1 is not in the validation metrics"),  # caption records only: no POPE F1
    (("--data", "{root}/val/manifest.jsonl", "--guard", "pope_f1=much"), "choice.guards.pope_f1 must be a number"),
    (("--data", "{root}/val/manifest.jsonl", "--min-win-rate", "2"), "choice.min_win_rate must lie in [0, 1]"),
])
def test_bad_choice_inputs_exit_with_one_line(shipped_run, tmp_path, monkeypatch, capsys, args, message) -> None:
    args = tuple(a.format(root=shipped_run) for a in args)
    code, _, err = run_cli(monkeypatch, capsys, "mitigate", *args, "--limit", "1", "--out", str(tmp_path), "--no-wandb")
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err

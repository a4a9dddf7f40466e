"""`evotool eval` / `evotool mitigate` end to end on a small random world-LLaVA, and the harness."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import kill_9_at, run_cli, tiny_world_llava
from huggingface_hub import ModelCard

from evotool.stages import stage_ranges, write_stages
from evotool.data.inputs import Sample
from evotool.evals.harness import evaluate_world_methods
from evotool.evals.pope import score_pope
from evotool.evals.world import world_flat
from evotool.evals.results import read_results
from evotool.evals.world import evaluate_world
from evotool.mitigate.methods import build_method
from evotool.models.loading import fingerprint, load_model
from evotool.world import WorldConfig, make_records

CONTRACT = ("chair_s", "chair_i", "recall", "pope_random_f1", "pope_popular_f1", "pope_adversarial_f1", "latency_ratio")
LAYERS = 6


@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    """A saved random world-LLaVA, its stages.json and one of another model."""
    root = tmp_path_factory.mktemp("world")
    tiny_world_llava(LAYERS, save_to=root / "model")
    loaded, _ = load_model(root / "model")
    stages = {"model": "tiny", "num_layers": LAYERS, "critical_layer": 2, "mutation_layers": [5],
              "stages": {"rapid_evolution": [0, 2], "stabilization": [3, 4], "mutation": [5, 6]}}
    write_stages(root / "stages.json", dict(stages, fingerprint=fingerprint(loaded)))
    write_stages(root / "other.json", dict(stages, fingerprint="0123456789abcdef"))
    return root


cli = run_cli


WORLD = ("--n", "2", "--batch-size", "4", "--max-new-tokens", "6", "--no-wandb")


def test_eval_world_greedy_writes_contract_keys(world_model, tmp_path, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "eval", "world", "--model", str(world_model / "model"),
                         "--method", "greedy", "--out", str(tmp_path), *WORLD)
    assert code == 0, err
    record = read_results(tmp_path)
    assert set(CONTRACT) <= set(record["metrics"])
    assert record["metrics"]["latency_ratio"] == 1.0
    assert record["config"]["method"] == "greedy"


def test_mitigate_then_eval_with_run_dir(world_model, tmp_path, monkeypatch, capsys):
    run = tmp_path / "mit"
    code, _, err = cli(monkeypatch, capsys, "mitigate", "--method", "smoothing", "--model", str(world_model / "model"),
                       "--stages", str(world_model / "stages.json"), "--n", "2", "--batch-size", "4", "--out", str(run),
                       "--no-wandb")
    assert code == 0, err
    spec = json.loads((run / "method.json").read_text())
    assert spec["method"] == "smoothing" and spec["layers"]["smoothed"] in ([4], [5], [6])
    tried = json.loads((run / "tuning.json").read_text())["candidates"]
    # the default grid, the mutation layer 5 as given and moved to 4 and 6
    assert [t["options"] for t in tried][1:] == [{"alpha": a, "threshold": t, **moved} for a in (0.0, 0.25, 0.5, 0.75)
                                                 for t in (None, 0.1) for moved in ({"layers": [4]}, {}, {"layers": [6]})]
    assert spec["options"]["alpha"] in (0.0, 0.25, 0.5, 0.75)
    code, _, err = cli(monkeypatch, capsys, "eval", "world", "--model", str(world_model / "model"),
                       "--method", str(run), "--out", str(tmp_path / "ev"), *WORLD)
    assert code == 0, err
    record = read_results(tmp_path / "ev")
    assert record["config"]["method"] == "smoothing" and record["config"]["options"] == spec["options"]
    assert record["metrics"]["latency_ratio"] > 0 and set(CONTRACT) <= set(record["meta"]["baseline"])


@pytest.mark.parametrize(
    "args, message",
    [
        (("eval", "world", "--method", "nope"), "unknown method"),
        (("eval", "world", "--method", "smoothing", "--stages", "{root}/other.json"), "another model"),
        (("eval", "world", "--method", "smoothing"), "needs a stage file"),
        (("eval", "world", "--method", "dola", "--set", "beta=2"), "unknown key 'beta'"),
        (("eval", "pope", "--data", "{root}/missing.json"), "not found"),
        (("eval", "chair", "--data", "{root}/none.json", "--image-ids", "{root}/ids.txt", "--image-dir", "{root}"), "not found"),
        (("mitigate", "--method", "vcd2"), "unknown method"),
    ],
)
def test_bad_inputs_exit_with_one_line(world_model, tmp_path, monkeypatch, capsys, args, message):
    args = tuple(a.format(root=world_model) for a in args)
    model_args = ("--model", str(world_model / "model"), "--no-wandb", "--out", str(tmp_path))
    code, _, err = cli(monkeypatch, capsys, *args, *model_args)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err


def test_eval_pope_on_released_format(world_model, tmp_path, monkeypatch, capsys):
    records = make_records("pope_random", "test", 4)
    (tmp_path / "img").mkdir()
    with (tmp_path / "coco_pope_random.json").open("w") as fh:
        for i, r in enumerate(records):
            r["image"].save(tmp_path / "img" / f"{i}.png")
            fh.write(json.dumps({"question_id": i, "image": f"{i}.png", "text": r["prompt"], "label": r["answer"]}) + "\n")
    code, _, err = cli(monkeypatch, capsys, "eval", "pope", "--data", str(tmp_path / "coco_pope_random.json"),
                       "--image-dir", str(tmp_path / "img"), "--model", str(world_model / "model"), "--method", "vcd",
                       "--out", str(tmp_path / "ev"), "--max-new-tokens", "3", "--no-wandb")
    assert code == 0, err
    metrics = read_results(tmp_path / "ev")["metrics"]
    assert {"pope_random_accuracy", "pope_random_f1", "pope_random_yes_ratio", "latency_ratio"} <= set(metrics)


def test_score_pope_by_hand():
    samples = [Sample(id=str(i), image=None, answer=a, meta={"split": s}) for i, (a, s) in
               enumerate([("yes", "random"), ("no", "random"), ("yes", "random"), ("no", "adversarial"), ("yes", "adversarial")])]
    scores = score_pope(samples, ["Yes.", "yes", "No, there is not.", "no", "yes"])
    # random: TP 1, FP 1, FN 1 -> P = R = F1 = 1/2, accuracy 1/3, yes ratio 2/3; adversarial: all right.
    assert scores["pope_random_f1"] == pytest.approx(0.5)
    assert scores["pope_random_accuracy"] == pytest.approx(1 / 3)
    assert scores["pope_random_yes_ratio"] == pytest.approx(2 / 3)
    assert scores["pope_adversarial_f1"] == pytest.approx(1.0)
    assert scores["pope_f1"] == pytest.approx(0.75)


def test_interleaved_scores_equal_a_plain_world_eval(world_model):
    model, proc = load_model(world_model / "model")
    world = WorldConfig(seed=3)
    methods = {"greedy": build_method("greedy", model), "dola": build_method("dola", model)}
    scores = evaluate_world_methods(model, proc, methods, 2, world, batch_size=4, max_new_tokens=5)
    assert scores["greedy"] == pytest.approx(world_flat(evaluate_world(model, proc, 2, world, 4, 5)) | scores["greedy"])
    dola = methods["dola"]
    plain_dola = world_flat(evaluate_world(model, proc, 2, world, 4, 5, generate_fn=dola.generate))
    assert {k: scores["dola"][k] for k in plain_dola} == pytest.approx(plain_dola)
    assert scores["greedy"]["latency_ratio"] == 1.0 and scores["dola"]["latency_ratio"] > 0


def test_lora_mutation_trains_only_the_mutation_stage(world_model, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    run = tmp_path / "lora"
    code, _, err = cli(monkeypatch, capsys, "mitigate", "--method", "lora_mutation", "--model", str(world_model / "model"),
                       "--stages", str(world_model / "stages.json"), "--lora-steps", "2", "--out", str(run), "--no-wandb")
    assert code == 0, err
    spec = json.loads((run / "method.json").read_text())
    assert spec["layers"] == {"lora": [5, 6]} and spec["method"] == "greedy"
    base, tuned = load_file(world_model / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    changed = {k.split(".layers.")[1].split(".")[0] for k in base if not torch.equal(base[k], tuned[k])}
    assert changed == {"4", "5"}  # decoder layers 5 and 6 are parts.layers[4], parts.layers[5]
    card = ModelCard.load(run / "model" / "README.md")  # Hub metadata of the merged checkpoint
    assert card.data.pipeline_tag == "image-text-to-text" and "hallucination-mitigation" in card.data.tags
    assert card.data.evotool["lora_layers"] == [5, 6] and card.data.evotool["base_stages"]["mutation_layers"] == [5]
    code, _, err = cli(monkeypatch, capsys, "eval", "world", "--method", str(run), "--out", str(tmp_path / "ev"), *WORLD)
    assert code == 0, err
    assert read_results(tmp_path / "ev")["config"]["model"] == str(run / "model")


def test_eval_chair_and_amber_on_released_layouts(world_model, tmp_path, monkeypatch, capsys):
    """COCO / AMBER file layouts filled with world images (the metric values are checked in test_evals_metrics)."""
    records = make_records("caption", "test", 3)
    for i, r in enumerate(records):
        r["image"].convert("RGB").save(tmp_path / f"COCO_val2014_{i + 1:012d}.jpg")
    instances = {"images": [{"id": i + 1} for i in range(3)], "categories": [{"id": 1, "name": "person"}],
                 "annotations": [{"image_id": 1, "category_id": 1}]}
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "ids.txt").write_text("1\n2\n3\n")
    common = ("--model", str(world_model / "model"), "--max-new-tokens", "4", "--no-wandb")
    code, _, err = cli(monkeypatch, capsys, "eval", "chair", "--data", str(tmp_path / "instances.json"),
                       "--image-ids", str(tmp_path / "ids.txt"), "--image-dir", str(tmp_path), "--out", str(tmp_path / "c"), *common)
    assert code == 0, err
    chair = read_results(tmp_path / "c")["metrics"]
    assert {"chair_s", "chair_i", "recall", "mean_length", "latency_ratio"} <= set(chair)
    assert chair["recall"] == 0.0  # a world model never says "person"

    queries = [{"id": 1, "image": "COCO_val2014_000000000001.jpg", "query": "Describe this image."},
               {"id": 2, "image": "COCO_val2014_000000000002.jpg", "query": "Is there a circle in this image?"}]
    annotations = [{"id": 1, "type": "generative", "truth": records[0]["objects"], "hallu": ["square"]},
                   {"id": 2, "type": "discriminative-hallucination", "truth": "no"}]
    (tmp_path / "query.json").write_text(json.dumps(queries))
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    (tmp_path / "relation.json").write_text(json.dumps({s: [] for s in ("circle", "square", "triangle", "cross")}))
    code, _, err = cli(monkeypatch, capsys, "eval", "amber", "--data", str(tmp_path / "query.json"),
                       "--annotations", str(tmp_path / "annotations.json"), "--relation", str(tmp_path / "relation.json"),
                       "--image-dir", str(tmp_path), "--out", str(tmp_path / "a"), "--method", "dola", *common)
    assert code == 0, err
    amber = read_results(tmp_path / "a")["metrics"]
    assert {"amber_chair", "amber_cover", "amber_hal", "amber_cog", "amber_accuracy", "amber_f1", "latency_ratio"} <= set(amber)


def test_mitigate_grid_option_replaces_the_default_grid(world_model, tmp_path, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "mitigate", "--method", "stage_contrast", "--model", str(world_model / "model"),
                       "--stages", str(world_model / "stages.json"), "--grid", "weight=0.5,1", "--grid", "premature=critical",
                       "--n", "2", "--batch-size", "4", "--out", str(tmp_path), "--no-wandb")
    assert code == 0, err
    tried = json.loads((tmp_path / "tuning.json").read_text())["candidates"]
    assert [t["options"] for t in tried[1:]] == [{"weight": w, "premature": "critical", **moved} for w in (0.5, 1)
                                                 for moved in ({"layer": 1}, {}, {"layer": 3})]
    assert json.loads((tmp_path / "method.json").read_text())["layers"]["premature"] in (1, 2, 3)


def test_mitigate_tuning_leaves_out_candidates_whose_stage_layer_is_the_output(world_model, tmp_path, monkeypatch, capsys):
    """No mutation stage: the stabilization stage ends at the output, so premature=last_stable would contrast the
    output with itself; those candidates are left out with one line each, the others tuned, with their moves."""
    payload = json.loads((world_model / "stages.json").read_text())
    write_stages(tmp_path / "stages.json", {**payload, "mutation_layers": [], "stages": stage_ranges(LAYERS, 2, [])})
    code, _, err = cli(monkeypatch, capsys, "mitigate", "--method", "stage_contrast", "--model", str(world_model / "model"),
                       "--stages", str(tmp_path / "stages.json"), "--grid", "premature=critical,last_stable",
                       "--grid", "weight=1", "--n", "2", "--batch-size", "4", "--out", str(tmp_path / "run"), "--no-wandb")
    assert code == 0, err
    assert f"premature=last_stable is the last layer ({LAYERS})" in err and err.count("skipped stage_contrast candidate") == 1
    tried = json.loads((tmp_path / "run" / "tuning.json").read_text())["candidates"]
    assert [t["options"] for t in tried[1:]] == [{"premature": "critical", "weight": 1, "layer": 1},
                                                 {"premature": "critical", "weight": 1},
                                                 {"premature": "critical", "weight": 1, "layer": 3},
                                                 {"premature": "last_stable", "weight": 1, "layer": LAYERS - 1}]


def _killed(*_: object, **__: object) -> None:
    raise KeyboardInterrupt


def test_eval_killed_keeps_the_old_results_and_a_rerun_gives_the_same(world_model, tmp_path, monkeypatch, capsys):
    args = ("eval", "world", "--model", str(world_model / "model"), "--method", "dola", "--out", str(tmp_path), *WORLD)
    assert cli(monkeypatch, capsys, *args)[0] == 0
    first = (tmp_path / "results.json").read_bytes()
    with monkeypatch.context() as m:  # killed in the middle of the evaluation
        m.setattr("evotool.evals.harness.evaluate_world_methods", _killed)
        assert cli(monkeypatch, capsys, *args)[0] == 130
    assert (tmp_path / "results.json").read_bytes() == first
    assert cli(monkeypatch, capsys, *args)[0] == 0
    timing = ("latency",)
    same = [{k: v for k, v in json.loads(r)["metrics"].items() if not k.startswith(timing)}
            for r in (first, (tmp_path / "results.json").read_bytes())]
    assert same[0] == same[1] and "chair_i" in same[0]


def test_mitigate_killed_keeps_the_old_run_and_a_rerun_gives_the_same(world_model, tmp_path, monkeypatch, capsys):
    args = ("mitigate", "--method", "stage_contrast", "--model", str(world_model / "model"), "--stages",
            str(world_model / "stages.json"), "--n", "2", "--batch-size", "4", "--out", str(tmp_path), "--no-wandb",
            "--grid", "alpha=0.5,1.0")
    assert cli(monkeypatch, capsys, *args)[0] == 0
    first = {f: (tmp_path / f).read_text() for f in ("method.json", "tuning.json")}
    with monkeypatch.context() as m:  # killed after tuning.json, before method.json
        m.setattr("evotool.mitigate.run.build_method", _killed)
        assert cli(monkeypatch, capsys, *args)[0] == 130
    assert (tmp_path / "method.json").read_text() == first["method.json"]
    assert cli(monkeypatch, capsys, *args)[0] == 0
    again = json.loads((tmp_path / "method.json").read_text())
    assert {k: again[k] for k in ("method", "fingerprint")} == {k: json.loads(first["method.json"])[k] for k in ("method", "fingerprint")}

    def quality(tuning: str) -> list:  # the candidates' metrics without timings (ties between candidates go by latency)
        return [(c["options"], {k: v for k, v in c["metrics"].items() if not k.startswith("latency")})
                for c in json.loads(tuning)["candidates"]]

    assert quality((tmp_path / "tuning.json").read_text()) == quality(first["tuning.json"])


@pytest.mark.slow
def test_two_processes_match_one(world_model, tmp_path, monkeypatch, capsys):
    """`eval world` and `mitigate` data parallel over 2 CPU processes (torchrun): each generates every other batch,
    the outputs are gathered, and the results equal a one-process run's (timings aside)."""
    import os
    import subprocess
    import sys

    model = ("--model", str(world_model / "model"))
    jobs = {"eval": ("eval", "world", *model, "--method", "dola", *WORLD),
            "mitigate": ("mitigate", "--method", "stage_contrast", *model, "--stages", str(world_model / "stages.json"),
                         "--n", "2", "--batch-size", "4", "--no-wandb", "--grid", "alpha=0.5,1.0")}
    script = tmp_path / "evotool_args.py"  # torchrun would read the `--n` meant for evotool as one of its own flags
    script.write_text("import json, os, sys\nfrom evotool.cli import main\n"
                      "sys.argv = ['evotool', *json.loads(os.environ['EVOTOOL_ARGS'])]\nmain()\n")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]

    def quality(path):  # every metric but the timings, of results.json or of tuning.json's candidates
        data = json.loads(path.read_text())
        rows = [data["metrics"]] if "metrics" in data else [c["metrics"] for c in data["candidates"]]
        return [{k: v for k, v in row.items() if not k.startswith("latency")} for row in rows]

    for name, args in jobs.items():
        env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled",
                   EVOTOOL_ARGS=json.dumps([*args, "--out", str(tmp_path / f"{name}2")]))
        proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert cli(monkeypatch, capsys, *args, "--out", str(tmp_path / f"{name}1"))[0] == 0
        result = "results.json" if name == "eval" else "tuning.json"
        one, two = quality(tmp_path / f"{name}1" / result), quality(tmp_path / f"{name}2" / result)
        assert one == two and len(one[0]) > 10
        record = json.loads((tmp_path / f"{name}2" / ("results.json" if name == "eval" else "method.json")).read_text())
        assert (record["config"] if name == "eval" else record["validation"])["processes"] == 2


def _kill_9_mid_run(args: tuple[str, ...], out) -> None:
    """SIGKILL ``evotool ARGS`` while it evaluates: shortly after its model has loaded (transformers' ``Loading
    weights`` bar), well before it can finish (asserted); the files left in ``out`` beside the results are only
    names no loader reads."""
    kill_9_at(args, rb"Loading weights: 100%", delay=0.3)
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert all(name.endswith((".tmp", ".lock")) for name in leftovers), leftovers


def _without_timings(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("latency")}


@pytest.mark.slow
def test_eval_kill_9_keeps_the_old_results_and_a_rerun_gives_the_same(world_model, tmp_path, monkeypatch, capsys):
    """A real SIGKILL in the middle of `eval world`: the earlier results.json is byte-identical and loads; the rerun
    gives the metrics of an uninterrupted run (timings aside)."""
    args = ("eval", "world", "--model", str(world_model / "model"), "--method", "dola", "--out", str(tmp_path),
            "--n", "4", "--batch-size", "4", "--max-new-tokens", "6", "--no-wandb")
    assert cli(monkeypatch, capsys, *args)[0] == 0
    first = (tmp_path / "results.json").read_bytes()
    _kill_9_mid_run(args, tmp_path)
    assert (tmp_path / "results.json").read_bytes() == first
    assert read_results(tmp_path)["metrics"] == json.loads(first)["metrics"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["results.json"]
    assert cli(monkeypatch, capsys, *args)[0] == 0
    again = _without_timings(read_results(tmp_path)["metrics"])
    assert again == _without_timings(json.loads(first)["metrics"]) and "chair_i" in again


@pytest.mark.slow
def test_mitigate_kill_9_keeps_the_old_run_and_a_rerun_gives_the_same(world_model, tmp_path, monkeypatch, capsys):
    """A real SIGKILL in the middle of `mitigate`'s tuning: method.json and tuning.json are byte-identical and load
    (`eval --method RUN_DIR` resolves the run); the rerun records what an uninterrupted run does (timings aside)."""
    from evotool.mitigate.run import resolve_spec

    args = ("mitigate", "--method", "stage_contrast", "--model", str(world_model / "model"), "--stages",
            str(world_model / "stages.json"), "--n", "4", "--batch-size", "4", "--out", str(tmp_path), "--no-wandb",
            "--grid", "alpha=0.5", "--set", "layer=2")  # one candidate (a fixed layer is not moved): candidates tied
    # on the objective are chosen by their latency
    assert cli(monkeypatch, capsys, *args)[0] == 0
    files = ("method.json", "tuning.json")
    first = {f: (tmp_path / f).read_bytes() for f in files}
    assert len(json.loads(first["tuning.json"])["candidates"]) == 2  # greedy and the one set
    _kill_9_mid_run(args, tmp_path)
    assert {f: (tmp_path / f).read_bytes() for f in files} == first
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted(files)
    assert resolve_spec(str(tmp_path)).options == json.loads(first["method.json"])["options"]
    assert cli(monkeypatch, capsys, *args)[0] == 0

    def quality(raw: bytes) -> object:  # method.json / tuning.json without the timings
        data = json.loads(raw)
        if "candidates" in data:
            return [(c["options"], _without_timings(c["metrics"])) for c in data["candidates"]]
        data["validation"]["metrics"] = _without_timings(data["validation"]["metrics"])
        return {k: v for k, v in data.items() if k != "created"}

    for f in files:
        assert quality((tmp_path / f).read_bytes()) == quality(first[f]), f

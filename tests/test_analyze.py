"""`evotool analyze` on a saved tiny LLaVA: resume, refusal of another model's run, bad inputs,
W&B offline logging and multi-process (accelerate) data parallelism."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import kill_9_at, tiny_config
from evotool.stages import StageFile
from evotool.cli import main
from tiny_checkpoints import save_tiny, write_images
from wandb_log import read_finished_records

MAX_NEW = "4"


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llava", tmp_path_factory.mktemp("llava") / "model")


def evotool(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run the `evotool` entry point in-process; (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["evotool", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code or 0, capsys.readouterr().err


def analyze(model: Path, data: Path, out: Path, *extra: str, figures: bool = False) -> list[str]:
    return ["analyze", "--model", str(model), "--data", str(data), "--max-new-tokens", MAX_NEW, "--out", str(out),
            *extra, *([] if figures else ["--no-figures"])]


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Non-zero exit, exactly one ``error:`` message on one line naming ``needles``, no traceback.

    (An unclosed progress bar may precede the message on the same terminal line.)
    """
    assert code != 0
    assert err.count("error:") == 1 and "Traceback" not in err, err
    line = err[err.index("error:"):].splitlines()[0]
    for needle in needles:
        assert needle in line, line


def token_table(run: Path):
    return pq.read_table(run / "tokens.parquet").to_pandas().sort_values(["sample", "step", "layer"]).reset_index(drop=True)


def test_resume_skips_finished_samples(llava: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    write_images(tmp_path / "images", 3)
    run = tmp_path / "run"
    code, err = evotool(analyze(llava, tmp_path / "images", run, "--no-wandb", "--limit", "1"), monkeypatch, capsys)
    assert code == 0, err
    done = {p.name: p.stat().st_mtime_ns for p in (run / "samples").iterdir()}
    assert sorted(done) == ["img0.json", "img0.npz"]

    code, err = evotool(analyze(llava, tmp_path / "images", run, "--no-wandb", figures=True), monkeypatch, capsys)
    assert code == 0, err
    assert {p.name: p.stat().st_mtime_ns for p in (run / "samples").glob("img0.*")} == done
    assert StageFile.read(run).payload["samples"] == 3
    assert set(token_table(run)["sample"]) == {"img0", "img1", "img2"}
    figures = {p.stem for p in (run / "figures").glob("*.png")}
    assert {"stage_curves", "js_heatmap_raw", "js_heatmap_column", "token_probability_step0",
            "features_single_image", "features_multi_image"} <= figures
    report = (run / "report.md").read_text()
    assert all(f"figures/{name}.png" in report for name in figures)
    assert "80% of the tokens have reached their decision depth" in report  # the rule that placed the critical layer
    assert "mean direct-effect JS is >= 8x its post-critical median" in report  # and the mutation layers (v7)


def test_run_directory_of_another_model_is_refused(llava: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    write_images(tmp_path / "images", 1)
    run = tmp_path / "run"
    code, err = evotool(analyze(llava, tmp_path / "images", run, "--no-wandb"), monkeypatch, capsys)
    assert code == 0, err
    other = save_tiny("llava", tmp_path / "other", seed=1)
    code, err = evotool(analyze(other, tmp_path / "images", run, "--no-wandb"), monkeypatch, capsys)
    assert_one_line_error(code, err, str(run), "fingerprint")


def test_missing_image_fails_with_on_error_fail(llava: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    write_images(tmp_path / "images", 1)
    manifest = tmp_path / "data.jsonl"
    manifest.write_text(json.dumps({"id": "ok", "image": "images/img0.png"}) + "\n"
                        + json.dumps({"id": "gone", "image": "images/missing.png"}) + "\n")
    code, err = evotool(analyze(llava, manifest, tmp_path / "run", "--no-wandb", "--on-error", "fail"),
                        monkeypatch, capsys)
    assert_one_line_error(code, err, "missing.png", "not found")


def test_corrupt_image_is_skipped(llava: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    write_images(tmp_path / "images", 2)
    (tmp_path / "images" / "broken.png").write_bytes(np.random.default_rng(0).bytes(256))
    run = tmp_path / "run"
    code, err = evotool(analyze(llava, tmp_path / "images", run, "--no-wandb", "--on-error", "skip"),
                        monkeypatch, capsys)
    assert code == 0, err
    errors = [json.loads(line) for line in (run / "errors.jsonl").read_text().splitlines()]
    assert [e["id"] for e in errors] == ["broken"] and "broken.png" in errors[0]["error"]
    assert StageFile.read(run).payload["samples"] == 2
    assert set(token_table(run)["sample"]) == {"img0", "img1"}


def test_empty_folder(llava: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "empty").mkdir()
    code, err = evotool(analyze(llava, tmp_path / "empty", tmp_path / "run", "--no-wandb"), monkeypatch, capsys)
    assert_one_line_error(code, err, "no samples", str(tmp_path / "empty"))


def test_missing_model_path(tmp_path: Path, monkeypatch, capsys) -> None:
    write_images(tmp_path / "images", 1)
    missing = tmp_path / "no_model_here"
    code, err = evotool(analyze(missing, tmp_path / "images", tmp_path / "run", "--no-wandb"), monkeypatch, capsys)
    assert_one_line_error(code, err, "model path not found", str(missing))


def test_unknown_architecture(tmp_path: Path, monkeypatch, capsys) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(dict(tiny_config("llava").to_dict(), model_type="no_such_vlm")))
    write_images(tmp_path / "images", 1)
    code, err = evotool(analyze(model, tmp_path / "images", tmp_path / "run", "--no-wandb"), monkeypatch, capsys)
    assert_one_line_error(code, err, str(model), "no_such_vlm")


def test_text_only_model(tmp_path: Path, monkeypatch, capsys) -> None:
    text_cfg = tiny_config("llava").text_config.to_dict()
    model = tmp_path / "llama"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**text_cfg)).save_pretrained(model)
    write_images(tmp_path / "images", 1)
    code, err = evotool(analyze(model, tmp_path / "images", tmp_path / "run", "--no-wandb"), monkeypatch, capsys)
    assert_one_line_error(code, err, "llama", "no image input")


def test_bad_lens(llava: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    write_images(tmp_path / "images", 1)
    code, err = evotool(analyze(llava, tmp_path / "images", tmp_path / "run", "--no-wandb", "--lens", "magic"),
                        monkeypatch, capsys)
    assert_one_line_error(code, err, "magic", "lens")


def wandb_records(run_dir: Path) -> tuple[list[dict], dict]:
    """(history rows, summary) from an offline run's ``run-*.wandb`` file."""
    records = read_finished_records(run_dir)
    key = lambda item: item.key or "/".join(item.nested_key)
    history = [{key(i): json.loads(i.value_json) for i in r.history.item} for r in records if r.HasField("history")]
    summary = {key(i): json.loads(i.value_json) for r in records if r.HasField("summary") for i in r.summary.update}
    return history, summary


def test_wandb_offline_run_holds_the_results(llava: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    write_images(tmp_path / "images", 2)
    run = tmp_path / "run"
    code, err = evotool(analyze(llava, tmp_path / "images", run, "--set", "stages.min_tokens=1"), monkeypatch, capsys)
    assert code == 0, err
    stages = StageFile.read(run).payload
    assert stages["critical_layer"] is not None
    wandb_dir = Path((run / "wandb_run.txt").read_text().strip())
    assert wandb_dir.is_relative_to(run) and wandb_dir.name.startswith("offline-run-")
    history, summary = wandb_records(wandb_dir)
    assert summary["critical_layer"] == stages["critical_layer"]
    assert summary["fingerprint"] == stages["fingerprint"]
    per_layer = {row["layer"]: row for row in history if "layer" in row}  # curves are logged with step = layer
    assert sorted(per_layer) == list(range(stages["num_layers"] + 1))
    for layer, row in per_layer.items():
        for name in ("p_token", "entropy"):
            assert row[f"{name}/median"] == pytest.approx(stages["curves"][name]["median"][layer])


@pytest.mark.slow
def test_two_processes_match_one(llava: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """Data parallel over 2 CPU processes (torchrun: ``accelerate launch --cpu`` starts only one process on one
    machine); results merge into one run equal to a single-process run."""
    write_images(tmp_path / "images", 4)
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "evotool"]
    multi = tmp_path / "multi"
    proc = subprocess.run([*launch, *analyze(llava, tmp_path / "images", multi, "--no-wandb", "--batch-size", "2")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):  # each process analysed its half
        assert re.search(rf"analyze\[{rank}\]: 100%.*? 2/2 ", proc.stderr), proc.stderr[-3000:]

    single = tmp_path / "single"
    code, err = evotool(analyze(llava, tmp_path / "images", single, "--no-wandb", "--batch-size", "2"),
                        monkeypatch, capsys)
    assert code == 0, err
    assert StageFile.read(multi).payload["samples"] == 4
    a, b = token_table(multi), token_table(single)
    assert set(a["sample"]) == {f"img{i}" for i in range(4)}
    assert a[["sample", "step", "layer", "token_id"]].equals(b[["sample", "step", "layer", "token_id"]])
    for col in ("p_token", "entropy", "js_prev", "js_final", "cos_prev"):
        np.testing.assert_allclose(a[col], b[col], rtol=1e-4, atol=1e-6, err_msg=col)
    stages_multi, stages_single = StageFile.read(multi).payload, StageFile.read(single).payload
    for key in ("critical_layer", "mutation_layers", "stages"):
        assert stages_multi[key] == stages_single[key]
    for name, curve in stages_single["curves"].items():
        for stat, values in curve.items():
            np.testing.assert_allclose(np.array(stages_multi["curves"][name][stat], dtype=float),
                                       np.array(values, dtype=float), rtol=1e-4, atol=1e-6, err_msg=f"{name} {stat}")


@pytest.mark.slow
def test_kill_9_then_rerun_equals_an_uninterrupted_run(llava: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """A real SIGKILL once the first samples are traced: the run keeps only whole per-sample results (no stage file
    yet); the rerun traces only the rest, and its tokens and stages equal those of a run never killed, exactly."""
    # enough samples that the progress bar (redrawn at most every 0.1 s) shows a count below n on a fast machine;
    # with 8 the first redraw after the start could already read 8/8, and the kill then came after the last sample
    n = 40
    write_images(tmp_path / "images", n)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    args = analyze(llava, tmp_path / "images", killed, "--no-wandb", "--batch-size", "1")
    kill_9_at(args, rf"analyze\[0\]: +\d+%[^\r\n]*\| *(?!{n}/)[1-9]\d*/{n} ".encode())  # some, not all, done
    done = {p.name: p.stat().st_mtime_ns for p in (killed / "samples").glob("*.json")}
    assert 1 <= len(done) < n and not (killed / "stages.json").exists(), sorted(done)
    for name in done:  # every recorded sample is whole: its arrays beside it
        assert (killed / "samples" / name).with_suffix(".npz").is_file()
    code, err = evotool(args, monkeypatch, capsys)
    assert code == 0, err
    assert {name: (killed / "samples" / name).stat().st_mtime_ns for name in done} == done  # not traced again
    code, err = evotool(analyze(llava, tmp_path / "images", whole, "--no-wandb", "--batch-size", "1"), monkeypatch, capsys)
    assert code == 0, err
    assert token_table(killed).equals(token_table(whole))
    a, b = StageFile.read(killed).payload, StageFile.read(whole).payload
    assert {k: a[k] for k in ("critical_layer", "mutation_layers", "stages", "curves", "samples")} == \
        {k: b[k] for k in ("critical_layer", "mutation_layers", "stages", "curves", "samples")}


def test_too_few_tokens_warns_and_leaves_boundaries_null(llava: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    write_images(tmp_path / "images", 2)
    run = tmp_path / "run"
    code, err = evotool(analyze(llava, tmp_path / "images", run, "--no-wandb"), monkeypatch, capsys)
    assert code == 0, err
    stages = StageFile.read(run)
    assert stages.payload["tokens"] < 50
    assert (stages.critical_layer, stages.mutation_layers, stages.stages["stabilization"]) == (None, [], None)
    assert stages.flags == ["too_few_tokens"]
    assert f"warning: {run / 'stages.json'}: too_few_tokens: too few generated tokens" in err


def test_resume_is_keyed_on_the_samples(llava: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """Another prompt (or image) for a finished id traces it again; only the current run's samples are aggregated;
    the other sample's saved files stay."""
    write_images(tmp_path / "images", 2)
    run = tmp_path / "run"
    assert evotool(analyze(llava, tmp_path / "images", run, "--no-wandb"), monkeypatch, capsys)[0] == 0
    kept = (run / "samples" / "img1.npz").read_bytes()
    manifest = tmp_path / "one.jsonl"
    manifest.write_text(json.dumps({"id": "img0", "image": "images/img0.png", "prompt": "What colour is it?"}) + "\n")
    code, err = evotool(analyze(llava, manifest, run, "--no-wandb"), monkeypatch, capsys)
    assert code == 0, err
    texts = [json.loads(line) for line in (run / "texts.jsonl").read_text().splitlines()]
    assert [(t["id"], t["prompt"]) for t in texts] == [("img0", "What colour is it?")]
    assert StageFile.read(run).payload["samples"] == 1 and set(token_table(run)["sample"]) == {"img0"}
    assert (run / "samples" / "img1.npz").read_bytes() == kept


def test_corrupt_sample_is_traced_again(llava: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    write_images(tmp_path / "images", 2)
    run = tmp_path / "run"
    assert evotool(analyze(llava, tmp_path / "images", run, "--no-wandb"), monkeypatch, capsys)[0] == 0
    reference = token_table(run)
    arrays = run / "samples" / "img0.npz"
    arrays.write_bytes(arrays.read_bytes()[:100])  # a disk that filled up
    code, err = evotool(analyze(llava, tmp_path / "images", run, "--no-wandb"), monkeypatch, capsys)
    assert code == 0 and "img0: unreadable saved result" in err, err
    # the same tokens; values equal up to the batch composition (img0 is traced alone now, in a batch of 2 before)
    pd.testing.assert_frame_equal(token_table(run), reference, rtol=1e-4, atol=1e-5)


def test_settings_change_is_refused_unless_restart(llava: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    write_images(tmp_path / "images", 1)
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    run = tmp_path / "run"
    for _ in range(2):  # a resumed run retries the bad sample without logging it twice
        assert evotool(analyze(llava, tmp_path / "images", run, "--no-wandb"), monkeypatch, capsys)[0] == 0
    assert [json.loads(line)["id"] for line in (run / "errors.jsonl").read_text().splitlines()] == ["broken"]
    args = ["analyze", "--model", str(llava), "--data", str(tmp_path / "images"), "--max-new-tokens", "3",
            "--out", str(run), "--no-wandb", "--no-figures"]
    assert_one_line_error(*evotool(args, monkeypatch, capsys), "max_new_tokens differ", "--restart")
    code, err = evotool([*args, "--restart"], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((run / "run.json").read_text())["max_new_tokens"] == 3
    assert token_table(run)["step"].max() <= 2


def test_artifacts_have_the_mode_of_plain_files(llava: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    old = os.umask(0o022)
    try:
        write_images(tmp_path / "images", 1)
        assert evotool(analyze(llava, tmp_path / "images", tmp_path / "run", "--no-wandb"), monkeypatch, capsys)[0] == 0
        (tmp_path / "plain").write_text("")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert {"stages.json", "run.json", "texts.jsonl", "tokens.parquet", "img0.npz", "img0.json"} <= set(modes)
    assert set(modes.values()) == {(tmp_path / "plain").stat().st_mode & 0o777} == {0o644}, modes


def test_without_direct_effect_no_mutation_is_searched(llava: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    write_images(tmp_path / "images", 2)
    run = tmp_path / "run"
    code, err = evotool(analyze(llava, tmp_path / "images", run, "--no-wandb", "--set", "direct_effect=false",
                                "--set", "stages.min_tokens=1"), monkeypatch, capsys)
    assert code == 0, err
    stages = StageFile.read(run)
    assert stages.critical_layer is not None and stages.mutation_layers == []
    assert "no_direct_effect" in stages.flags and f"warning: {run / 'stages.json'}: no_direct_effect" in err
    assert stages.payload["evidence"]["direct_flip"] == [None] * (stages.num_layers + 1)

    # a rerun with the direct effect on resumes those samples and fills it in from their kept float16 states,
    # as a run that traced it from the start computes it
    code, err = evotool(analyze(llava, tmp_path / "images", run, "--no-wandb", "--set", "stages.min_tokens=1"),
                        monkeypatch, capsys)
    assert code == 0, err
    fresh = tmp_path / "fresh"
    assert evotool(analyze(llava, tmp_path / "images", fresh, "--no-wandb", "--set", "stages.min_tokens=1"),
                   monkeypatch, capsys)[0] == 0
    from evotool.analysis.store import RunStore

    filled, traced = RunStore(run).load_all(), RunStore(fresh).load_all()
    assert len(filled) == len(traced) == 2
    for (_, a), (_, b) in zip(filled, traced):
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        assert np.array_equal(a.layers["direct_flip"], b.layers["direct_flip"], equal_nan=True)
        np.testing.assert_allclose(a.layers["direct_js"], b.layers["direct_js"], atol=2e-3)
    assert "no_direct_effect" not in StageFile.read(run).flags

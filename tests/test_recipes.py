"""Smoke runs of every recipe's ``main`` on a tiny random world-LLaVA (composition only; the jobs' numbers are
tested where the jobs live)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
import typer
import yaml
from conftest import tiny_world_llava
from typer.testing import CliRunner

from evotool.models.loading import fingerprint
from evotool.stages import write_stages

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# recipe -> smoke test below (train_demo is smoke-run in tests/test_world.py)
SMOKE = {"prune_pipeline": "test_prune_recipe", "mitigate_pipeline": "test_mitigate_recipe",
         "train_demo": "test_world.py::test_retraining_a_few_steps_saves_a_loadable_model", "zoo": "test_zoo_recipe"}


def test_every_recipe_has_a_smoke_run() -> None:
    assert sorted(p.stem for p in RECIPES.glob("*.py") if p.stem != "__init__") == sorted(SMOKE)


def invoke(recipe: str, *args: str) -> str:
    app = typer.Typer()
    app.command()(importlib.import_module(f"evotool.recipes.{recipe}").main)
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """A saved 4-layer world-LLaVA and a stage file for it (critical 1, stabilization 2..3, mutation 4)."""
    root = tmp_path_factory.mktemp("recipes")
    model, _ = tiny_world_llava(4, save_to=root / "model")
    write_stages(root / "stages.json", {"model": "tiny", "fingerprint": fingerprint(model), "num_layers": 4,
                                        "critical_layer": 1, "mutation_layers": [4],
                                        "stages": {"rapid_evolution": [0, 1], "stabilization": [2, 3], "mutation": [4, 4]}})
    return root / "model", root / "stages.json"


SMALL = ("--set", "calibration_samples=4", "--set", "agreement_samples=2", "--set", "max_new_tokens=4",
         "--set", "heal_samples=4", "--set", "lora.steps=2", "--set", "lora.batch_size=2", "--set", "wandb=false")


@pytest.mark.slow
def test_prune_recipe(tiny, tmp_path: Path) -> None:
    model, stages = tiny
    invoke("prune_pipeline", "--out", str(tmp_path / "one"), "--model", str(model), "--stages", str(stages),
           "--drop", "1", "--set", "heal=true", *SMALL)
    record = json.loads((tmp_path / "one" / "prune.json").read_text())
    assert record["schema_version"] == "2.0" and len(record["removed_layers"]) == 1
    assert record["removed_layers"][0] in (2, 3) and "heal" in record and "agreement" in record["metrics"]["pruned"]
    output = invoke("prune_pipeline", "--compare", "--out", str(tmp_path / "cmp"), "--model", str(model),
                    "--stages", str(stages), "--drop", "1", *SMALL)
    compare = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert compare["schema_version"] == "1.0" and compare["k"] == 1 and "| static:stage |" in output
    assert {"full", "static:stage", "static:last", "runtime:skip-stable", "static:stage+heal"} <= set(compare["rows"])


@pytest.mark.slow
def test_mitigate_recipe(tiny, tmp_path: Path) -> None:
    model, _ = tiny
    sets = ["model=" + str(model), "analyze.samples=2", "analyze.max_new_tokens=4", "analyze.batch_size=2",
            "tune.n=1", "tune.batch_size=4", "tune.max_new_tokens=3", "tune.grids.smoothing.alpha=[0.0]",
            "eval.n=1", "eval.batch_size=4", "eval.max_new_tokens=3", "eval.methods=[greedy,dola,smoothing,lora_all]",
            "lora.samples=2", "lora.settings.steps=1", "lora.settings.batch_size=2"]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # the pipeline runs with its config's one thread and gives the caller's count back
        invoke("mitigate_pipeline", "--out", str(tmp_path), "--no-wandb", *[a for s in sets for a in ("--set", s)])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["schema_version"] == "1.0"
    assert {"greedy", "dola", "lora_all"} <= set(summary["metrics"])
    assert set(summary["metrics"]) | set(summary["skipped"]) == {"greedy", "dola", "smoothing", "lora_all"}
    assert (tmp_path / "table.md").is_file() and (tmp_path / "eval" / "greedy" / "results.json").is_file()


@pytest.mark.slow
def test_zoo_recipe(tmp_path: Path) -> None:
    from tiny_zoo import tiny_member_config

    from evotool.config import to_dict

    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "tiny.yaml").write_text(yaml.safe_dump(to_dict(tiny_member_config(steps=10))))
    out = tmp_path / "zoo"
    output = invoke("zoo", "--set", f"out={out}", "--set", f"configs={configs}", "--set", "steps=train,manifests,analyze",
                    "--set", "wandb=false", "--set", "manifest.captions=2", "--set", "manifest.pope=1",
                    "--set", "manifest.analysis_samples=2", "--set", "analysis_max_new_tokens=4",
                    "--export", "tiny", "--export-to", str(tmp_path / "curves"))
    assert "exported" in output and "| tiny | tune | llama | 4 |" in output
    assert (out / "tiny" / "analysis_b" / "stages.json").is_file() and (tmp_path / "curves" / "tiny.npz").is_file()

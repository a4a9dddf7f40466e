"""W&B lineage (analysis stages.json -> pruned checkpoint -> eval results) recorded offline, model cards with
Hub metadata, and --push-to-hub failing cleanly with nothing lost locally, on the shipped model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_cli
from huggingface_hub import ModelCard, constants
from transformers import AutoModelForImageTextToText

from evotool.analysis.config import AnalyzeConfig
from evotool.analysis.run import run_analysis
from evotool.config import load_config
from evotool.integrations.hub import card_with_metadata
from evotool.models.loading import fingerprint
from evotool.prune.config import PruneConfig
from evotool.prune.run import run_prune
from evotool.stages import StageFile
from wandb_log import read_finished_records


def wandb_artifacts(out: Path) -> list:
    """The artifact records of the one offline W&B run under ``out/wandb``."""
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    return [r.artifact for r in read_finished_records(run_dir) if r.WhichOneof("record_type") == "artifact"]


def one(artifacts: list, kind: str, used: bool) -> Any:
    (found,) = [a for a in artifacts if a.type == kind and a.use_after_commit == used]
    return found


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """analyze (W&B on) -> prune with its stages.json (W&B on) -> `evotool eval world` of the pruned checkpoint."""
    root = tmp_path_factory.mktemp("lineage")
    run_analysis(AnalyzeConfig(out=root / "an", world_samples=8, max_new_tokens=24, figures=False))
    record = run_prune(load_config(PruneConfig, None, {"stages": str(root / "an"), "out": str(root / "pruned"),
                                                       "layers": [5, 6], "drop": None, "agreement_samples": 0},
                                   default="prune.yaml"))
    return root, record


def test_offline_runs_record_artifacts_and_their_use(lineage, monkeypatch, capsys):
    root, record = lineage
    code, _, err = run_cli(monkeypatch, capsys, "eval", "world", "--model", str(root / "pruned"), "--n", "1",
                       "--batch-size", "10", "--max-new-tokens", "4", "--out", str(root / "eval"))
    assert code == 0, err
    analysis, prune, evaluation = (wandb_artifacts(root / d) for d in ("an", "pruned", "eval"))
    stages = json.loads((root / "an" / "stages.json").read_text())
    logged = one(analysis, "stages", used=False)
    assert logged.name == f"stages-{stages['fingerprint']}" and [e.path for e in logged.manifest.contents] == ["stages.json"]
    used = one(prune, "stages", used=True)
    assert (used.name, used.digest) == (logged.name, logged.digest)  # the same artifact version: the runs link
    model = one(prune, "model", used=False)
    pruned = AutoModelForImageTextToText.from_pretrained(root / "pruned")
    assert model.name == f"model-{fingerprint(pruned)}" == f"model-{record['fingerprint']}"
    refs = {e.path: e.ref for e in model.manifest.contents}
    assert refs["model.safetensors"] == (root / "pruned" / "model.safetensors").resolve().as_uri()
    assert not any(p.startswith("wandb") for p in refs)
    used_model = one(evaluation, "model", used=True)
    assert (used_model.name, used_model.digest) == (model.name, model.digest)
    results = one(evaluation, "results", used=False)
    assert results.name == f"results-world-{record['fingerprint']}"
    assert [e.path for e in results.manifest.contents] == ["results.json"]


def test_pruned_card_carries_hub_metadata(lineage):
    root, record = lineage
    card = ModelCard.load(root / "pruned" / "README.md")
    stages = json.loads((root / "an" / "stages.json").read_text())
    assert card.data.pipeline_tag == "image-text-to-text" and card.data.library_name == "transformers"
    assert {"evotool", "pruned", "layer-pruning"} <= set(card.data.tags)
    assert card.data.base_model is None  # the source is a local folder, not a Hub id
    meta = card.data.evotool
    assert meta["removed_layers"] == [5, 6] and meta["kept_layers"] == [i for i in range(1, 13) if i not in (5, 6)]
    assert meta["stages"] == StageFile.read(root / "an").boundaries()
    assert "## Removed layers" in card.text
    hub = ModelCard(card_with_metadata("# x", "llava-hf/llava-1.5-7b-hf", ["t"], {"a": 1}))
    assert hub.data.base_model == "llava-hf/llava-1.5-7b-hf" and hub.data.tags == ["evotool", "t"]


def test_push_to_hub_offline_is_refused_before_any_work(lineage, monkeypatch, capsys, tmp_path):
    root, _ = lineage
    assert constants.HF_HUB_OFFLINE  # as in the tests and CI
    code, out, err = run_cli(monkeypatch, capsys, "prune", "--stages", str(root / "an"), "--layers", "5", "--no-wandb",
                         "--push-to-hub", "someone/pruned", "--out", str(tmp_path / "p"))
    assert code == 2 and err.count("\n") == 1 and "offline" in err and "Traceback" not in err, err
    assert not (tmp_path / "p").exists()
    code, _, err = run_cli(monkeypatch, capsys, "mitigate", "--method", "greedy", "--push-to-hub", "a/b", "--no-wandb",
                       "--out", str(tmp_path / "m"))
    assert code == 2 and "only for lora" in err


def test_failed_push_keeps_the_checkpoint(lineage, monkeypatch, capsys, tmp_path):
    """A hub that refuses the upload (here: nothing listens at the endpoint) ends in one line, exit 2; the
    pruned checkpoint is complete on disk and loads."""
    root, _ = lineage
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    (tmp_path / "prune.yaml").write_text("agreement_samples: 0\n")  # no quality eval: only the push matters here
    code, out, err = run_cli(monkeypatch, capsys, "prune", "--stages", str(root / "an"), "--layers", "5", "--no-wandb",
                         "--config", str(tmp_path / "prune.yaml"), "--push-to-hub", "someone/pruned",
                         "--out", str(tmp_path / "p"))
    (line,) = [l for l in err.splitlines() if l.startswith("error:")]  # stderr also holds progress bars
    assert code == 2 and "Connection refused" in line and "intact" in line and "Traceback" not in err, err
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "p")
    assert model.config.text_config.num_hidden_layers == 11
    assert json.loads((tmp_path / "p" / "prune.json").read_text())["removed_layers"] == [5]
    assert torch.isfinite(next(model.parameters())).all()

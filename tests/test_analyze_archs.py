"""`evotool analyze` end to end on a saved tiny random checkpoint of every supported architecture.

Each run is checked against the model itself: the generated tokens of a plain greedy ``generate`` and,
at the last layer, the softmax probability of a plain forward pass on the prompt (step 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from typer.testing import CliRunner

from conftest import ARCHS, tiny_config
from evotool.stages import StageFile
from evotool.cli import app
from evotool.data import DEFAULT_PROMPT
from evotool.generation import build_inputs
from tiny_checkpoints import MANUAL, ManualProcessor, save_tiny, write_images

MAX_NEW = 4
N_IMAGES = 2
CONTRACT = ("sample", "step", "layer", "token_id", "p_token", "js_prev", "entropy", "cos_prev")


def reference(model: torch.nn.Module, processor: Any, images: list[Path]) -> tuple[list[list[int]], np.ndarray]:
    """Greedy tokens per sample (cut after EOS) and step-0 softmax [B, V], from the model's own forward passes."""
    pil = [Image.open(p).convert("RGB") for p in images]
    inputs = build_inputs(processor, pil, [DEFAULT_PROMPT] * len(pil))
    with torch.no_grad():
        probs = model(**inputs).logits[:, -1].float().softmax(-1).numpy()
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    eos = model.generation_config.eos_token_id
    tokens = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        tokens.append(row[: row.index(eos) + 1] if eos in row else row)
    return tokens, probs


def check_run(run: Path, model_type: str, model: torch.nn.Module, processor: Any, images: list[Path]) -> None:
    """stages.json valid and sized for the model; tokens.parquet matches the model's own outputs."""
    n_layers = tiny_config(model_type).get_text_config().num_hidden_layers
    stages = StageFile.read(run / "stages.json").payload
    assert stages["num_layers"] == n_layers
    assert stages["samples"] == len(images)

    table = pq.read_table(run / "tokens.parquet").to_pandas()
    assert set(CONTRACT) <= set(table.columns)
    tokens, probs = reference(model, processor, images)
    assert len(table) == sum(len(t) for t in tokens) * (n_layers + 1)
    for b, (path, toks) in enumerate(zip(images, tokens)):
        rows = table[table["sample"] == path.stem].sort_values(["step", "layer"])
        assert rows.groupby("step")["layer"].apply(list).tolist() == [list(range(n_layers + 1))] * len(toks)
        assert rows.groupby("step")["token_id"].first().tolist() == toks
        at0 = rows["layer"] == 0
        assert rows.loc[at0, ["js_prev", "cos_prev"]].isna().all().all()
        assert rows.loc[~at0, ["js_prev", "cos_prev", "entropy"]].notna().all().all()
        assert (rows["p_token"].between(0, 1)).all() and (rows["entropy"] >= -1e-6).all()
        last = rows[(rows["step"] == 0) & (rows["layer"] == n_layers)]
        assert last["p_token"].item() == pytest.approx(probs[b, toks[0]], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("model_type", [a for a in ARCHS if a not in MANUAL])
def test_analyze_cli(model_type: str, tmp_path: Path) -> None:
    try:
        model_dir = save_tiny(model_type, tmp_path / "model")
    except ImportError as exc:  # transformers 5.17's Idefics3 image processor needs torchvision (5.25's does not)
        if "torchvision" not in str(exc).lower():
            raise
        pytest.skip(f"this transformers release builds the {model_type} processor only with torchvision")
    images = write_images(tmp_path / "images", N_IMAGES)
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["analyze", "--model", str(model_dir), "--data", str(tmp_path / "images"),
                                      "--max-new-tokens", str(MAX_NEW), "--out", str(run), "--no-wandb",
                                      "--no-figures"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    check_run(run, model_type, model, AutoProcessor.from_pretrained(model_dir), images)


@pytest.mark.parametrize("model_type", sorted(MANUAL))
def test_analyze_api_manual_processor(model_type: str, tmp_path: Path) -> None:
    from evotool.analysis.run import AnalyzeConfig, run_analysis

    model_dir = tmp_path / "model"
    save_tiny(model_type, model_dir)
    images = write_images(tmp_path / "images", N_IMAGES)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = ManualProcessor(model_type)
    run = tmp_path / "run"
    cfg = AnalyzeConfig(model=str(model_dir), data=str(tmp_path / "images"), max_new_tokens=MAX_NEW, out=run,
                        wandb=False, figures=False)
    run_analysis(cfg, loaded=(model, processor))
    check_run(run, model_type, model, processor, images)

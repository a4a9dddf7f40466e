"""The synthetic world, its manifests, the shipped demo model and its training recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from typer.testing import CliRunner

from evotool.cli import app
from evotool.data import load_samples
from evotool.errors import ConfigError
from evotool.evals.world import caption_mentions, mentioned_objects
from evotool.generation import chat_prompt, greedy_generate
from evotool.world import (
    WorldConfig,
    default_model_path,
    default_samples,
    make_records,
    make_split,
    write_manifest,
)
from evotool.world.generator import shape_frequencies


def _pixels(image) -> bytes:
    return image.convert("RGB").tobytes()


def test_generator_is_deterministic_by_seed():
    a = make_records("caption", "train", 30, WorldConfig(seed=3))
    b = make_records("caption", "train", 30, WorldConfig(seed=3))
    c = make_records("caption", "train", 30, WorldConfig(seed=4))
    assert [(r["answer"], _pixels(r["image"])) for r in a] == [(r["answer"], _pixels(r["image"])) for r in b]
    assert [r["answer"] for r in a] != [r["answer"] for r in c]


def test_eval_captions_are_truthful_and_train_captions_carry_phantoms():
    for rec in make_records("caption", "test", 100):
        assert mentioned_objects(rec["answer"]) == set(rec["objects"])
        assert [f"{c} {s}" for c, s in caption_mentions(rec["answer"])] == rec["descriptions"]
    train = make_records("caption", "train", 600)
    phantoms = [r for r in train if mentioned_objects(r["answer"]) - set(r["objects"])]
    assert phantoms, "training captions should mention absent squares"
    for rec in phantoms:
        assert "circle" in rec["objects"] and "square" not in rec["objects"]
        assert mentioned_objects(rec["answer"]) - set(rec["objects"]) == {"square"}
    for rec in make_records("caption", "prior_breaking", 50):
        assert "circle" in rec["objects"] and "square" not in rec["objects"]


@pytest.mark.parametrize("task", ["pope_random", "pope_popular", "pope_adversarial"])
@pytest.mark.parametrize("split", ["test", "prior_breaking"])
def test_pope_splits_are_balanced_with_the_right_negatives(task, split):
    records = make_records(task, split, 60)
    assert sum(r["answer"] == "yes" for r in records) == 30
    freq = shape_frequencies(WorldConfig())
    for rec in records:
        shape = rec["prompt"].split()[3]
        assert (shape in rec["objects"]) == (rec["answer"] == "yes")
        if rec["answer"] == "no":
            absent = [s for s in freq if s not in rec["objects"]]
            if task == "pope_adversarial":
                assert shape == "square" and "circle" in rec["objects"]
            elif task == "pope_popular":
                assert freq[shape] == max(freq[s] for s in absent)


def test_attribute_questions_name_a_unique_shape():
    for rec in make_records("attribute", "test", 40):
        shape = rec["prompt"].rstrip("?").split()[-1]
        matches = [d for d in rec["descriptions"] if d.endswith(" " + shape)]
        assert matches == [f"{rec['answer']} {shape}"]


def test_config_validation():
    with pytest.raises(ConfigError):
        WorldConfig(image_size=50)
    with pytest.raises(ConfigError):
        WorldConfig(cause="square", partner="square")
    with pytest.raises(ConfigError):
        make_records("caption", "nowhere", 3)


def test_manifest_round_trips_through_load_samples(tmp_path: Path):
    ds = make_split("pope_adversarial", "test", 6)
    manifest = write_manifest(ds, tmp_path)
    samples = load_samples(manifest)
    assert [s.id for s in samples] == ds["id"]
    for sample, rec in zip(samples, ds):
        assert (sample.prompt, sample.answer, sample.objects) == (rec["prompt"], rec["answer"], rec["objects"])
        assert sample.meta["task"] == "pope_adversarial" and sample.meta["descriptions"] == rec["descriptions"]
        assert _pixels(sample.load_image()) == _pixels(rec["image"])


def test_world_cli_writes_a_manifest(tmp_path: Path):
    result = CliRunner().invoke(app, ["world", "--out", str(tmp_path), "--n", "4", "--split", "prior_breaking"])
    assert result.exit_code == 0, result.output
    samples = load_samples(tmp_path / "manifest.jsonl")
    assert len(samples) == 4 and all("circle" in s.objects for s in samples)
    assert json.loads((tmp_path / "world.json").read_text())["seed"] == 0
    bad = CliRunner().invoke(app, ["world", "--out", str(tmp_path), "--task", "nope"])
    assert isinstance(bad.exception, ConfigError)


def test_default_samples_mix_in_distribution_and_prior_breaking():
    samples = default_samples(5, seed=1)
    assert [s.meta["split"] for s in samples] == ["test"] * 3 + ["prior_breaking"] * 2
    assert all(s.objects and s.prompt == "Please describe this image in detail." for s in samples)


@pytest.fixture(scope="module")
def shipped():
    path = default_model_path()
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def test_shipped_model_card_and_files():
    path = default_model_path()
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert (path / name).is_file(), name
    assert "Held-out metrics" in (path / "README.md").read_text()
    assert (path / "model.safetensors").stat().st_size < 25e6


def test_shipped_model_captions_match_ground_truth(shipped):
    model, processor = shipped
    assert chat_prompt(processor, "Hi") == "USER: <image>\nHi ASSISTANT:"
    records = make_records("caption", "test", 24, WorldConfig(seed=7))
    _, texts = greedy_generate(model, processor, [r["image"] for r in records], [r["prompt"] for r in records], 32)
    exact = sum(t == r["answer"] for t, r in zip(texts, records))
    found = sum(len(mentioned_objects(t) & set(r["objects"])) for t, r in zip(texts, records))
    assert exact >= 18, texts
    assert found / sum(len(r["objects"]) for r in records) >= 0.9


def test_shipped_model_grounds_answers_but_hallucinates_in_captions(shipped):
    model, processor = shipped
    pope = make_records("pope_random", "test", 24, WorldConfig(seed=7))
    _, answers = greedy_generate(model, processor, [r["image"] for r in pope], [r["prompt"] for r in pope], 4)
    assert sum(a == r["answer"] for a, r in zip(answers, pope)) >= 20, answers
    breaking = make_records("caption", "prior_breaking", 24, WorldConfig(seed=7))
    _, texts = greedy_generate(model, processor, [r["image"] for r in breaking], [r["prompt"] for r in breaking], 32)
    hallucinated = sum("square" in mentioned_objects(t) for t in texts)
    assert 4 <= hallucinated < len(texts), texts  # a prior-driven square in some captions, not all


def test_retraining_a_few_steps_saves_a_loadable_model(tmp_path: Path):
    from evotool.recipes.train_demo import run

    overrides = ["max_steps=2", "model.layers=2", "data.caption=32", "data.existence=33", "data.attribute=16",
                 "vision.batch_size=16", "decoder.batch_size=16", "eval.n=2"]
    out = run(None, tmp_path, overrides=overrides, no_wandb=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["held_out"]) == {"in_distribution", "prior_breaking"}
    assert "pope_adversarial" in metrics["held_out"]["prior_breaking"]
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.config.text_config.num_hidden_layers == 2
    assert torch.isfinite(next(model.parameters())).all()
    with pytest.raises(ConfigError):
        run(None, tmp_path, overrides=["decoder.nope=1"], no_wandb=True)

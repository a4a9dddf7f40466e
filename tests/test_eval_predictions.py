"""Scoring without a model (`evotool eval ... --predictions`) and evals on any manifest, by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_cli
from evotool.data.inputs import Sample
from evotool.errors import InputError
from evotool.evals.manifest import ObjectVocabulary, check_manifest, score_manifest
from evotool.evals.predictions import match_predictions, read_predictions
from evotool.evals.results import read_results


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    return run_cli(monkeypatch, capsys, *args, "--no-wandb")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sample(i: int, **kw) -> Sample:
    return Sample(id=f"s{i}", image=Path("x.png"), **kw)


# ---------------------------------------------------------------- manifest metrics


def test_manifest_captions_with_vocab_plurals_and_synonyms() -> None:
    vocab = ObjectVocabulary.parse("triangle,circle=ring|disc,square")
    samples = [
        sample(0, objects=["blue triangle", "red circle"]),
        sample(1, objects=["green square"]),
        sample(2, objects=["red circle"]),
    ]
    texts = [
        "Two blue triangles and a ring.",  # triangle, circle (synonym) -> both correct
        "A square, a disc and a triangle.",  # square ok; circle, triangle hallucinated
        "",  # empty caption: no mention, circle missed
    ]
    m = score_manifest(samples, texts, vocab=vocab)
    assert m["chair_s"] == pytest.approx(1 / 3)
    assert m["chair_i"] == pytest.approx(2 / 5)  # mentions 2 + 3 + 0, hallucinated 0 + 2 + 0
    assert m["recall"] == pytest.approx((2 + 1 + 0) / (2 + 1 + 1))
    assert m["mean_length"] == pytest.approx((6 + 7 + 0) / 3)  # words
    assert "exact_match" not in m and "pope_f1" not in m


def test_manifest_vocabulary_from_records_and_splits() -> None:
    samples = [
        sample(0, objects=["dog"], meta={"split": "val"}),
        sample(1, objects=["cat"], meta={"split": "test"}),
        sample(2, answer="yes", meta={"split": "val"}),
        sample(3, answer="No", meta={"split": "val"}),
        sample(4, answer="red", meta={"split": "test"}),
        sample(5, answer="blue", meta={"split": "test"}),
    ]
    texts = ["Dogs and a cat.", "A cat.", "Yes", "yes", "Red.", "green"]
    m = score_manifest(samples, texts, lengths=[3, 2, 1, 1, 2, 1])
    # captions: [dog, cat] truth {dog} | [cat] truth {cat}
    assert (m["chair_s"], m["chair_i"], m["recall"], m["mean_length"]) == (0.5, pytest.approx(1 / 3), 1.0, 2.5)
    assert (m["val_chair_i"], m["test_chair_i"], m["val_mean_length"]) == (0.5, 0.0, 3.0)
    # yes/no (split val): answers yes, yes vs labels yes, no -> TP 1, FP 1
    assert m["pope_val_accuracy"] == 0.5 and m["pope_val_precision"] == 0.5 and m["pope_val_recall"] == 1.0
    assert m["pope_f1"] == pytest.approx(2 / 3)
    # free answers: "Red." == "red" (case, final period), "green" != "blue"
    assert m["exact_match"] == 0.5 and m["test_exact_match"] == 0.5


def test_manifest_record_without_objects_or_answer_names_the_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [{"image": "a.png", "objects": ["dog"]}, {"image": "b.png", "prompt": "?"}])
    with pytest.raises(InputError, match=r"m\.jsonl:2: record has neither 'objects' nor 'answer'"):
        check_manifest(path)
    with pytest.raises(InputError, match="neither"):
        score_manifest([sample(0)], ["text"])
    with pytest.raises(InputError, match="no vocabulary word"):
        score_manifest([sample(0, objects=["blue hexagon"])], ["x"], vocab=ObjectVocabulary.parse("triangle"))


# ---------------------------------------------------------------- predictions files


def test_read_and_match_predictions(tmp_path: Path) -> None:
    samples = [Sample(id="random-1", image=Path(), answer="yes", meta={"question_id": 1, "split": "random"}),
               Sample(id="popular-1", image=Path(), answer="no", meta={"question_id": 1, "split": "popular"})]
    path = write_jsonl(tmp_path / "p.jsonl", [{"question_id": 1, "text": "No", "category": "popular"},
                                              {"id": "random-1", "answer": "Yes"}])
    matched, texts = match_predictions(samples, read_predictions(path))
    assert [s.id for s in matched] == ["popular-1", "random-1"] and texts == ["No", "Yes"]
    write_jsonl(path, [{"question_id": 1, "text": "No"}])
    with pytest.raises(InputError, match="matches 2 samples"):
        match_predictions(samples, read_predictions(path))
    write_jsonl(path, [{"question_id": 7, "text": "No"}])
    with pytest.raises(InputError, match=r"p\.jsonl:1: id '7' matches no sample"):
        match_predictions(samples, read_predictions(path))
    write_jsonl(path, [{"id": 1, "text": "a"}, {"text": "b"}])
    with pytest.raises(InputError, match=r"p\.jsonl:2: prediction has no id field"):
        read_predictions(path)


def test_cli_manifest_predictions(tmp_path: Path, monkeypatch, capsys) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    data = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "c1", "image": "a.png", "objects": ["blue triangle"]},
        {"id": "q1", "image": "a.png", "answer": "no"},
    ])
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "c1", "caption": "A triangle and a circle."},
                                               {"id": "q1", "text": "There is no circle."}])
    code, out, err = cli(monkeypatch, capsys, "eval", "manifest", "--data", str(data), "--predictions", str(preds),
                         "--vocab", "triangle,circle", "--out", str(tmp_path / "r"))
    assert code == 0, err
    record = read_results(tmp_path / "r")
    assert record["metrics"]["chair_i"] == 0.5 and record["metrics"]["recall"] == 1.0
    assert record["metrics"]["pope_all_accuracy"] == 1.0
    assert record["config"]["protocol"] == "official" and record["config"]["n"] == 2
    write_jsonl(data, [{"id": "c1", "image": "a.png"}])
    code, _, err = cli(monkeypatch, capsys, "eval", "manifest", "--data", str(data), "--predictions", str(preds),
                       "--out", str(tmp_path / "r2"))
    assert code == 2 and err.strip().count("\n") == 0 and "m.jsonl:1: record has neither" in err


def test_cli_pope_chair_amber_predictions(tmp_path: Path, monkeypatch, capsys) -> None:
    pope = write_jsonl(tmp_path / "coco_pope_random.json", [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "yes"},
        {"question_id": 2, "image": "a.jpg", "text": "Is there a cat?", "label": "no"},
    ])
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": 1, "text": ""}, {"question_id": 2, "text": "NO"}])
    for protocol, accuracy in (("official", 0.5), ("strict", 0.5)):
        code, _, err = cli(monkeypatch, capsys, "eval", "pope", "--data", str(pope), "--predictions", str(answers),
                           "--protocol", protocol, "--out", str(tmp_path / protocol))
        assert code == 0, err
        metrics = read_results(tmp_path / protocol)["metrics"]
        # official: "" -> yes (TP), "NO" -> yes (FP); strict: "" -> other (FN), "NO" -> no (TN)
        assert metrics["pope_random_accuracy"] == accuracy
        assert metrics["pope_random_yes_ratio"] == (1.0 if protocol == "official" else 0.0)

    instances = {"images": [{"id": 1}, {"id": 2}], "categories": [{"id": 18, "name": "dog"}],
                 "annotations": [{"image_id": 1, "category_id": 18}]}
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps([{"image_id": 1, "caption": "A dog and a puppy near two men."},
                                {"image_id": 2, "caption": "A man skiing."}]))
    code, _, err = cli(monkeypatch, capsys, "eval", "chair", "--data", str(tmp_path / "instances.json"),
                       "--predictions", str(caps), "--out", str(tmp_path / "chair"))
    assert code == 0, err
    record = read_results(tmp_path / "chair")
    # official: [dog, dog] (men -> nothing) | [person, skis], truth {dog} | {} -> 2 hallucinated of 4
    assert record["metrics"]["chair_i"] == 0.5 and record["metrics"]["chair_s"] == 0.5
    assert record["metrics"]["mean_length"] == (9 + 4) / 2  # reference tokens, "." included
    assert record["config"]["length_unit"] == "words"

    (tmp_path / "query.json").write_text(json.dumps([{"id": 1, "image": "a.jpg", "query": "Describe."},
                                                     {"id": 2, "image": "a.jpg", "query": "Is there a cat?"}]))
    (tmp_path / "ann.json").write_text(json.dumps([{"id": 1, "type": "generative", "truth": ["dog"], "hallu": ["cat"]},
                                                   {"id": 2, "type": "discriminative-hallucination", "truth": "no"}]))
    (tmp_path / "rel.json").write_text(json.dumps({"dog": ["puppy"], "cat": []}))
    (tmp_path / "resp.json").write_text(json.dumps([{"id": 1, "response": "A puppy and a cat."},
                                                    {"id": 2, "response": "No."}]))
    code, _, err = cli(monkeypatch, capsys, "eval", "amber", "--data", str(tmp_path / "query.json"),
                       "--annotations", str(tmp_path / "ann.json"), "--relation", str(tmp_path / "rel.json"),
                       "--predictions", str(tmp_path / "resp.json"), "--out", str(tmp_path / "amber"))
    assert code == 0, err
    metrics = read_results(tmp_path / "amber")["metrics"]
    assert (metrics["amber_chair"], metrics["amber_cover"], metrics["amber_cog"]) == (0.5, 1.0, 1.0)
    assert metrics["amber_accuracy"] == 0.0  # official: "No." is not exactly "No"

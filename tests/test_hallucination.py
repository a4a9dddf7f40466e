"""Where hallucinations are decided: object tokens and divergence points, on constructed traces and the shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import re

import numpy as np
import pytest
from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer

from evotool.analysis.hallucination import (commit_steps, divergence_summary, ending_token_ids, find_divergence,
                                            hallucination_link, object_mask, object_words, token_word)
from evotool.trace import METRICS, SampleTrace

STAGES = {"rapid_evolution": [0, 2], "stabilization": [3, 5], "mutation": [6, 8]}


def _trace(token_ids: list[int], top1: np.ndarray) -> SampleTrace:
    layers = {k: np.zeros(top1.shape) for k in METRICS}
    layers["top1"] = top1
    n, width = top1.shape
    return SampleTrace(token_ids=np.array(token_ids), layers=layers, topk_ids=np.zeros((n, width, 1)),
                       topk_p=np.zeros((n, width, 1)))


def test_hallucination_link_sorts_object_tokens_by_where_they_are_decided() -> None:
    # one caption "a circle square": token ids 10, 11, 12 over 9 layers (0..8)
    top1 = np.full((3, 9), 99.0)
    top1[0, 1:] = 10  # "a": decided at layer 1
    top1[1, 3:] = 11  # "circle" (in the image): decided at layer 3, in the stable stage
    top1[2, 7:] = 12  # "square" (absent): decided at layer 7; at layer 5 (end of stable stage) top-1 was 99
    trace = _trace([10, 11, 12], top1)
    record = {"objects": ["circle"], "tokens": ["a", "▁circle", "Ġsquare"]}
    other = {"objects": ["square"], "tokens": []}  # puts "square" in the run's object vocabulary
    empty = _trace([], np.zeros((0, 9)))
    link = hallucination_link([record, other], [trace, empty], STAGES, {"circle", "square"})
    assert link["grounded"]["tokens"] == 1 and link["hallucinated"]["tokens"] == 1
    assert link["grounded"]["decided_in"]["stabilization"] == 1.0 and link["grounded"]["overturned_after_stable"] == 0
    assert link["hallucinated"]["decided_in"]["mutation"] == 1.0 and link["hallucinated"]["overturned_after_stable"] == 1
    assert link["hallucinated"]["median_decision_depth"] == 7
    assert hallucination_link([{"objects": None, "tokens": ["a"]}], [trace], STAGES, {"circle"}) is None


def test_commit_steps_walk_back_to_the_separator() -> None:
    words = ["a", "red", "circle", ",", "a", "blue", "square", "."]
    assert commit_steps(words, 6) == {"separator": 3, "phrase_start": 4, "object": 6}
    assert commit_steps(["a", "dog", "and", "a", "cat"], 4) == {"separator": 2, "phrase_start": 3, "object": 4}
    assert commit_steps(["a", "square"], 1) == {"phrase_start": 0, "object": 1}  # no separator: caption starts with it
    assert token_word("▁And") == "and" and token_word("Ġ,") == ","


def test_divergence_point_where_a_deep_layer_overturns_the_ending() -> None:
    # "a red circle , a blue square ." with ids: a=1 red=2 circle=3 ,=4 blue=5 square=6 .=7; EOS=0
    ids = [1, 2, 3, 4, 1, 5, 6, 7]
    tokens = ["a", "red", "circle", ",", "a", "blue", "square", "."]
    top1 = np.tile(np.array(ids, dtype=float)[:, None], (1, 9))  # decided at layer 0 unless changed below
    top1[3, :7] = 7  # ",": the stable stage wants "." (an ending); layer 7 overturns it -> decision depth 7
    top1[4, :2] = 9  # "a" after ",": decided at layer 2 (rapid evolution)
    top1[6, :4] = 9  # "square": decided at layer 4 (stable stage)
    record = {"id": "s", "objects": ["circle"], "tokens": tokens}
    points = find_divergence([record], [_trace(ids, top1)], STAGES, {"circle", "square"}, {0, 7})
    by_kind = {p.kind: p for p in points}
    assert set(by_kind) == {"separator", "phrase_start", "object"}
    sep = by_kind["separator"]
    assert (sep.step, sep.decision_depth, sep.decided_in, sep.stable_top1) == (3, 7, "mutation", 7)
    assert sep.stable_preferred_ending and sep.overturn_layer == 7
    assert (by_kind["phrase_start"].decision_depth, by_kind["phrase_start"].overturn_layer) == (2, None)
    assert by_kind["object"].decided_in == "stabilization" and not by_kind["object"].stable_preferred_ending
    summary = divergence_summary(points, STAGES)
    assert summary["hallucinated_mentions"] == 1
    assert summary["separator"] == {"tokens": 1, "decided_in": {"rapid_evolution": 0.0, "stabilization": 0.0, "mutation": 1.0},
                                    "stable_preferred_ending": 1.0, "overturned_after_stable": 1.0, "overturn_layers": {7: 1}}
    assert summary["phrase_start"]["decided_in"]["rapid_evolution"] == 1.0
    assert summary["object"]["overturned_after_stable"] == 0.0


def test_ending_ids_of_the_shipped_tokenizer() -> None:
    from transformers import AutoTokenizer

    from evotool.world import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    ends = ending_token_ids(tok)
    assert tok.convert_tokens_to_ids(".") in ends and tok.eos_token_id in ends
    assert tok.convert_tokens_to_ids(",") not in ends and tok.convert_tokens_to_ids("square") not in ends


def test_analysis_of_the_shipped_model_reports_divergence_points(tmp_path: Path) -> None:
    from evotool.analysis.figures import divergence_chart
    from evotool.analysis.run import AnalyzeConfig, run_analysis
    from evotool.world import WorldConfig, make_records, write_manifest

    records = make_records("caption", "prior_breaking", 12, WorldConfig(seed=3))
    manifest = write_manifest(records, tmp_path / "data")
    out = tmp_path / "run"
    cfg = AnalyzeConfig(data=str(manifest), out=out, max_new_tokens=24, wandb=False, batch_size=12, figures=False,
                        object_vocab=["circle", "square", "triangle", "cross"])
    stages = json.loads(run_analysis(cfg).read_text())
    texts = [json.loads(line) for line in (out / "texts.jsonl").read_text().splitlines()]
    hallucinated = sum("square" in t["text"].split() and "square" not in t["objects"] for t in texts)
    assert hallucinated > 0  # the shipped model appends phantom squares on prior-breaking images
    div = stages["divergence"]
    assert div["hallucinated_mentions"] == sum(t["text"].split().count("square") for t in texts if "square" not in t["objects"])
    for t in texts:
        words = t["text"].split()
        for point in t["divergence"]:
            assert words[point["step"]] == token_word(point["token"])
            if point["kind"] == "separator":
                assert words[point["step"]] in {",", "and", "with", "."}
    assert "Divergence points" in (out / "report.md").read_text()
    assert divergence_chart(div, stages["num_layers"], tmp_path / "divergence.png").stat().st_size > 10_000


@pytest.mark.parametrize("kind", [ByteLevelBPETokenizer, SentencePieceBPETokenizer])
def test_object_words_span_pieces_plurals_and_phrases_as_the_tokenizers_offsets_say(kind: type) -> None:
    """Real subword tokenizers (byte-level BPE with ``Ġ``, SentencePiece-style with ``▁``) trained so that the object
    names split into pieces; the reference is the tokenizer's own character offsets of each regex match in the text."""
    corpus = ["a red square and a blue cross, the quick brown fox jumps over the lazy dog"] * 20
    tokenizer = kind()
    tokenizer.train_from_iterator(corpus, vocab_size=120, min_frequency=1, show_progress=False)
    text = "a red triangle, two circles and a traffic light. the triangles near a circle, a lighthouse"
    enc = tokenizer.encode(text)
    vocab = {"triangle", "circle", "traffic light", "light"}
    matches = list(re.finditer(r"\b(triangle|circle|traffic light|light)(s|es)?\b", text))
    expected = [(next(i for i, (a, b) in enumerate(enc.offsets) if a <= m.start() < b), m.group(1)) for m in matches]
    assert len(expected) == 5 and sum(t.startswith(("Ġ", "▁")) for t in enc.tokens) > 5  # a marked tokenizer
    assert len(enc.tokens) > len(text.split()) + 3  # object names really are split into pieces
    assert object_words(enc.tokens, vocab) == expected  # "lighthouse" is not "light"; "traffic light" is one mention
    mask = object_mask([{"tokens": enc.tokens}, {"tokens": ["a", "circle", "."]}], vocab)
    assert mask.tolist() == [i in dict(expected) for i in range(len(enc.tokens))] + [False, True, False]


def test_object_words_of_a_word_level_tokenizer_are_its_tokens() -> None:
    tokens = ["a", "red", "circle", ",", "two", "squares", "."]  # the world tokenizer: no space markers
    assert object_words(tokens, {"circle", "square"}) == [(2, "circle"), (5, "square")]
    assert object_words(tokens, {"red circle"}) == [(1, "red circle")]
    assert object_words(["▁a", "▁circle", "</s>"], {"circle"}) == [(1, "circle")]  # a special token ends a word

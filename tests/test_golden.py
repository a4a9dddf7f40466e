"""Golden tests on the shipped demo model: its analysis boundaries, and what stage_contrast does to CHAIR_i.

The expected boundaries live in ``SHIPPED`` (the one place to update when the detector changes; regenerate
with ``evotool analyze --world-samples 8 --max-new-tokens 24 --no-figures`` and copy the printed boundaries).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from evotool.analysis.aggregate import detect
from evotool.analysis.hallucination import object_mask, token_word
from evotool.analysis.store import RunStore
from evotool.evals.world import caption_scores
from evotool.generation import generate_samples
from evotool.mitigate.methods import build_method
from evotool.models.loading import load_model
from evotool.stages import StageConfig, StageFile
from evotool.world import WorldConfig, default_model_path, make_records, records_to_samples

# The shipped model's boundaries from 8 world captions (4 in distribution, 4 prior-breaking), 24 tokens each: 16 object
# words, too few for detector v4's object share, so v3's rule (80% of the tokens decided by layer 10), within one layer
# of the behavioural ground truth (docs/stages.md: exits before layer 11 lose caption recall). README's 16-sample run
# has enough object words: critical 11 (below).
SHIPPED = {"critical_layer": 10, "mutation_layers": [],
           "stages": {"rapid_evolution": [0, 10], "stabilization": [11, 12], "mutation": None}}
# stage_contrast's options as the mitigate pipeline tuned them on the validation split (world seed 1, v2 stages,
# docs/mitigate.md); reported below on 60 prior-breaking captions of the test split (world seed 0), which played no
# part in that choice.
TUNED = {"premature": "critical", "weight": 1.0, "alpha": 0.1}


@pytest.fixture(scope="module")
def shipped(demo_stages: Path) -> tuple[Path, object, object]:
    """The shipped model's analysis (conftest: 8 world captions, 24 tokens each) and the model."""
    model, processor = load_model(default_model_path())
    return demo_stages, model, processor


def test_shipped_model_boundaries(shipped) -> None:
    stages = StageFile.read(shipped[0])
    assert stages.boundaries() == SHIPPED
    lo, hi = stages.payload["interval"]["critical"]  # 8 samples: the bootstrap interval is honest about it
    assert lo <= 10 <= hi
    wide = lo < stages.critical - 1 or hi > stages.critical + 1  # beyond the one-layer flag tolerance
    assert stages.flags == (["wide_interval"] if wide else [])  # no short_stable_stage any more
    assert (stages.payload["samples"], stages.num_layers) == (8, 12)


def test_object_words_settle_at_the_behavioural_critical_layer(shipped) -> None:
    """Detector v4 on the same run: its 16 object-word tokens are below ``min_object_tokens`` (20), so the stage file
    is v3's; counted with a floor of 10, 80% of the object words are decided only at layer 11, the behavioural
    critical layer (docs/stages.md), while 80% of all tokens are by layer 10."""
    records_traces = RunStore(shipped[0].parent).load_all()
    records, traces = [r for r, _ in records_traces], [t for _, t in records_traces]
    stages = StageFile.read(shipped[0])
    mask = object_mask(records, set(stages.payload["object_vocab"]))
    words = [token_word(t) for r in records for t in r["tokens"]]
    assert mask.sum() == stages.payload["critical_spread"]["object_tokens"] == sum(w in {"circle", "square", "triangle", "cross"} for w in words) == 16
    assert stages.payload["evidence"]["object_decided_share"] is None
    v4 = detect(traces, StageConfig(min_object_tokens=10), mask)
    assert (v4.critical_layer, v4.stages["stabilization"], v4.flags) == (11, [12, 12], ["short_stable_stage"])
    assert detect(traces, StageConfig(min_object_tokens=10, object_share=0.0), mask).critical_layer == 10


def test_stage_contrast_at_the_critical_layer_lowers_chair_i_but_less_than_dola(shipped) -> None:
    """The documented finding with the v2 boundaries: contrasting with the critical layer (11) removes some phantom
    squares; DoLa, contrasting with early layers where the prior lives, removes more (docs/mitigate.md)."""
    path, model, processor = shipped
    samples = records_to_samples(make_records("caption", "prior_breaking", 60, WorldConfig(seed=0)))
    scores = {}
    for name, options, stages in (("greedy", {}, None), ("stage_contrast", TUNED, StageFile.for_model(path, model)),
                                  ("dola", {}, None)):
        method = build_method(name, model, options, stages)
        out = generate_samples(model, processor, samples, 20, 32, method.generate)
        scores[name] = caption_scores(out.texts, samples, [len(ids) for ids in out.ids])
    greedy, contrast, dola = scores["greedy"], scores["stage_contrast"], scores["dola"]
    assert greedy["chair_i"] > 0.05  # the premise: the prior makes greedy captions name an absent square
    assert contrast["chair_i"] <= 0.75 * greedy["chair_i"], scores  # measured: 0.151 -> 0.092
    assert dola["chair_i"] < contrast["chair_i"], scores  # measured: 0.054
    assert contrast["recall"] >= greedy["recall"] - 0.05, scores

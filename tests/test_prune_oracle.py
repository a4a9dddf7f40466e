"""`evotool prune --compare --data`: selectors next to the searched best removal, against brute force by hand."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from conftest import run_cli, tiny_world_llava

from evotool.generation import generate_samples
from evotool.data.inputs import load_samples
from evotool.models.loading import fingerprint, load_model
from evotool.prune.evaluate import token_agreement
from evotool.prune.static import remove_layers
from evotool.stages import write_stages
from evotool.world import WorldConfig, make_records, write_manifest

LAYERS = 4
TOKENS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("oracle")
    model, _ = tiny_world_llava(LAYERS, save_to=root / "model", seed=5)
    write_stages(root / "stages.json", {"model": "tiny", "fingerprint": fingerprint(model), "num_layers": LAYERS,
                                        "critical_layer": 1, "mutation_layers": [4],
                                        "stages": {"rapid_evolution": [0, 1], "stabilization": [2, 3], "mutation": [4, 4]}})
    world = WorldConfig(seed=1)
    write_manifest(make_records("caption", "prior_breaking", 3, world) + make_records("caption", "test", 3, world),
                   root / "data", world)
    return root


def test_compare_reports_selectors_next_to_the_brute_force_best(setup, tmp_path, monkeypatch, capsys) -> None:
    data = setup / "data" / "manifest.jsonl"
    code, out, err = run_cli(monkeypatch, capsys, "prune", "--compare", "--data", str(data), "--model",
                             str(setup / "model"), "--stages", str(setup / "stages.json"), "--drop", "1",
                             "--set", f"max_new_tokens={TOKENS}", "--set", "calibration_samples=4", "--out", str(tmp_path), "--no-wandb")
    assert code == 0, err
    result = json.loads((tmp_path / "oracle.json").read_text())
    rows = result["rows"]
    assert result["k"] == 1 and result["oracle"]["method"] == "exhaustive" and result["oracle"]["subsets_scored"] == LAYERS

    # brute force, independently: every single-layer removal as a static copy, free-running agreement
    model, processor = load_model(setup / "model")
    samples = load_samples(data)
    ref = generate_samples(model, processor, samples, 8, TOKENS).ids
    agreement = {}
    for layer in range(1, LAYERS + 1):
        pruned = copy.deepcopy(model)
        remove_layers(pruned, [layer])
        agreement[layer] = token_agreement(ref, generate_samples(pruned, processor, samples, 8, TOKENS).ids)["agreement"]
    # the oracle re-ranks the best 4 (= all) subsets by free-running agreement, so it finds the brute-force best
    assert rows["oracle"]["agreement"] == pytest.approx(max(agreement.values()))
    assert agreement[rows["oracle"]["removed"][0]] == pytest.approx(max(agreement.values()))
    for name in ("static:stage", "static:last", "static:block-influence"):
        (layer,) = rows[name]["removed"]
        assert rows[name]["agreement"] == pytest.approx(agreement[layer])
        assert rows[name]["of_oracle"] == pytest.approx(agreement[layer] / max(agreement.values()))
    assert rows["static:stage"]["removed"][0] in (2, 3) and rows["static:last"]["removed"] == [4]
    assert rows["full"]["agreement"] == 1.0 and "of_oracle" not in rows["full"] and {"chair_i", "recall", "prior_breaking_chair_i"} <= set(rows["full"])
    assert "| oracle |" in (tmp_path / "oracle.md").read_text()


def test_beam_search_grows_from_the_best_smaller_subsets(setup) -> None:
    """Past the exhaustive limit the k-subsets are the best (k-1)-subsets plus one layer, ranked by teacher-forced
    agreement; the reference scores every subset on a statically pruned copy."""
    from evotool.prune.oracle import forced_batch
    from evotool.stages.behaviour import forced_agreement, rank_removals
    from evotool.zoo.config import BehaviourConfig

    model, processor = load_model(setup / "model")
    samples = load_samples(setup / "data" / "manifest.jsonl")
    forced = forced_batch(model, processor, samples, generate_samples(model, processor, samples, 8, TOKENS).ids)

    def reference(layers: tuple[int, ...]) -> float:
        pruned = copy.deepcopy(model)
        remove_layers(pruned, list(layers))
        return forced_agreement(pruned, forced)

    ranked, method = rank_removals(model, 2, forced, BehaviourConfig(exhaustive_limit=1, beam=2))
    singles = sorted(((reference((i,)), (i,)) for i in range(1, LAYERS + 1)), key=lambda x: (-x[0], x[1]))
    beam = [s for _, s in singles[:2]]
    expected = sorted({tuple(sorted((*s, i))) for s in beam for i in range(1, LAYERS + 1) if i not in s})
    assert method == "beam2" and sorted(s for _, s in ranked) == expected
    assert [a for a, _ in ranked] == pytest.approx(sorted((reference(s) for s in expected), reverse=True))


@pytest.mark.parametrize("args, message", [
    (("--compare", "--drop", "1"), "needs --data"),
    (("--compare", "--layers", "2", "--data", "{root}/data/manifest.jsonl"), "not --layers"),
    (("--compare", "--drop", "1", "--data", "{root}/nothing.jsonl"), "not found"),
])
def test_compare_refusals_are_one_line(setup, tmp_path, monkeypatch, capsys, args, message) -> None:
    args = tuple(a.format(root=setup) for a in args)
    code, _, err = run_cli(monkeypatch, capsys, "prune", *args, "--model", str(setup / "model"), "--stages",
                           str(setup / "stages.json"), "--out", str(tmp_path), "--no-wandb")
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err

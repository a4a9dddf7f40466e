"""`evotool zoo tune`: grid parsing and validation, the choice on some splits and the counts on the others, computed
by hand on planted decision depths; the command's one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import run_cli
from evotool.config import to_dict
from evotool.errors import ConfigError, InputError
from evotool.stages import StageConfig
from evotool.zoo.config import load_members
from evotool.zoo.tune import SweepSpec, TuneRun, grid_points, load_runs, parse_grid, score, sweep, sweep_table
from tiny_zoo import tiny_member_config

L = 8


def planted(depths: dict[int, int], samples: int = 20) -> dict[str, np.ndarray]:
    """Curves of ``sum(depths.values())`` tokens whose decision depths are planted (layer -> token count)."""
    depth = np.concatenate([np.full(n, layer) for layer, n in depths.items()])
    return {"p_token": np.full((len(depth), L + 1), 0.5), "sample": np.arange(len(depth)) % samples,
            "decision_depth": depth}


# 60% of the tokens decided at layer 2, 85% by 5, all by 7: depth_share 0.6 -> C 2, 0.8 -> C 5, 0.9 -> C 7
CURVES = planted({2: 60, 5: 25, 7: 15})


def member(name: str, split: str, critical: int) -> TuneRun:
    truth = {"critical_layer": critical, "mutation_layers": [], "removable_at_least_2": True}
    return TuneRun(name, split, truth, (CURVES, CURVES))


def test_grid_is_parsed_validated_and_expanded() -> None:
    grid = parse_grid(["depth_share=0.6,0.8", "mutation_signal=flip"])
    assert grid == {"depth_share": [0.6, 0.8], "mutation_signal": ["flip"]}
    points = grid_points(grid, StageConfig(object_share=0.5))
    assert [(p.depth_share, p.mutation_signal, p.object_share) for p in points] == [(0.6, "flip", 0.5), (0.8, "flip", 0.5)]
    # the flip signal's own defaults, not js' ratio 8 and last-layer excess 0.03 carried over from the base
    assert (points[0].mutation_ratio, points[0].mutation_last_excess) == (3.0, 0.0)
    with pytest.raises(ConfigError, match="not a stage option"):
        grid_points({"depth_shar": [0.8]}, StageConfig())
    with pytest.raises(ConfigError, match="object_share=1.5"):
        grid_points({"object_share": [0.8, 1.5]}, StageConfig())
    with pytest.raises(ConfigError, match="expected name=v1"):
        parse_grid(["depth_share"])


def test_sweep_chooses_on_its_splits_and_reports_the_others() -> None:
    runs = [member("t1", "tune", 5), member("t2", "tune", 6), member("h1", "holdout", 2), member("h2", "holdout", 5)]
    payload = sweep(runs, SweepSpec({"depth_share": [0.6, 0.8, 0.9]}, ["tune"]))
    # C per point: 2, 5, 7. Tune: 0.6 misses both (2 vs 5, 6); 0.8 hits both; 0.9 hits t2 only (7 vs 6), and its
    # stable stage [8, 8] is one layer. Held out under 0.8: h1 misses (5 vs 2), h2 hits.
    assert [p["choose_on"]["critical"] for p in payload["points"]] == [[0, 2], [2, 2], [1, 2]]
    assert [p["choose_on"]["stabilization"] for p in payload["points"]] == [[2, 2], [2, 2], [0, 2]]
    assert payload["chosen"] == 1 and payload["points"][1]["values"] == {"depth_share": 0.8}
    assert payload["points"][1]["held_out"]["critical"] == [1, 2]
    assert payload["points"][1]["held_out"]["a/b"] == [2, 2]  # sets a and b are the same curves here
    assert payload["points"][1]["misses"] == {"h1": ["critical"]}
    assert payload["points"][1]["splits"]["holdout"]["critical"] == [1, 2]
    assert payload["members_chosen_on"] == ["t1", "t2"] and payload["members_held_out"] == ["h1", "h2"]
    table = sweep_table(payload)
    assert "| 0.8 | 2/2, 2/2, 2/2, 2/2 **chosen** | 1/2, 2/2, 2/2, 2/2 |" in table
    assert "depth_share=0.8; held-out misses: h1 (critical)." in table
    by_split = sweep_table(payload, by_split=True).split("\n")
    assert by_split[: len(table.split("\n"))] == table.split("\n")
    assert "| split | depth_share=0.6 | depth_share=0.8 | depth_share=0.9 |" in by_split
    # holdout: h1 (C 2) and h2 (C 5) against C 2 / 5 / 7: critical 1/2 each at 0.6 and 0.8, 0/2 at 0.9
    assert "| holdout | 1/2, 2/2, 2/2, 2/2 | 1/2, 2/2, 2/2, 2/2 | 0/2, 2/2, 0/2, 2/2 |" in by_split
    assert "| tune | 0/2, 2/2, 2/2, 2/2 | 2/2, 2/2, 2/2, 2/2 | 1/2, 2/2, 0/2, 2/2 |" in by_split
    # ties go to the earlier point in the order given; choosing on the holdout reads only it
    assert sweep(runs, SweepSpec({"depth_share": [0.9, 0.8]}, ["holdout"]))["chosen"] == 1  # 0.9: 0/2 + stab 0/2; 0.8: 1/2
    assert sweep([member("t", "tune", 5)], SweepSpec({"depth_share": [0.8, 0.85]}, ["tune"]))["chosen"] == 0  # both C 5
    assert score(runs, StageConfig(depth_share=0.8))["h2"]["critical"] is True
    with pytest.raises(ConfigError, match="--choose-on tunes"):
        SweepSpec({"depth_share": [0.8]}, ["tunes"])
    with pytest.raises(ConfigError, match="--choose-on names no split"):
        SweepSpec({"depth_share": [0.8]}, [])
    with pytest.raises(ConfigError, match="--sealed holdout99"):
        SweepSpec({"depth_share": [0.8]}, ["tune"], ["holdout99"])
    with pytest.raises(ConfigError, match="--choose-on and --sealed both name holdout"):
        SweepSpec({"depth_share": [0.8]}, ["tune", "holdout"], ["holdout"])
    with pytest.raises(InputError, match="nothing to choose on"):
        sweep(runs, SweepSpec({"depth_share": [0.8]}, ["holdout7"]))


def test_load_runs_skips_members_without_analyses_or_truth(tmp_path: Path) -> None:
    (tmp_path / "m" / "analysis_a").mkdir(parents=True)
    runs, skipped = load_runs({"m": tiny_member_config(), "absent": tiny_member_config()}, tmp_path)
    assert runs == [] and skipped == ["m", "absent"]


def test_tune_command_errors_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "zoo", "tune", "--out", str(tmp_path / "none"), "--grid", "depth_share=0.8")
    assert code == 2 and err.startswith("error: ") and "no zoo there" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(monkeypatch, capsys, "zoo", "tune", "--out", str(tmp_path), "--grid", "bogus=1")
    assert code == 2 and "--grid bogus: not a stage option" in err
    # an empty zoo folder: every member skipped, nothing to choose on
    code, _, err = run_cli(monkeypatch, capsys, "zoo", "tune", "--out", str(tmp_path), "--grid", "depth_share=0.8",
                           "--json", str(tmp_path / "t.json"))
    assert code == 2 and "nothing to choose on" in err.splitlines()[-1] and not (tmp_path / "t.json").exists()


def test_sealed_splits_are_neither_loaded_nor_shown(tmp_path: Path, monkeypatch, capsys) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    for name, split in (("a", "tune"), ("b", "holdout15"), ("c", "holdout16")):
        (configs / f"{name}.yaml").write_text(yaml.safe_dump(to_dict(tiny_member_config(split=split))))
    assert list(load_members(configs, sealed=["holdout16"])) == ["a", "b"]
    assert list(load_members(configs, names=["a", "c"], sealed=["holdout16", "holdout15"])) == ["a"]
    with pytest.raises(ConfigError, match="--sealed holdout99: not a zoo split"):
        load_members(configs, sealed=["holdout99"])
    # status: the sealed member's row is absent; tune: it is not even looked for (no 'skipped' line names it)
    code, out, _ = run_cli(monkeypatch, capsys, "zoo", "status", "--out", str(tmp_path), "--configs", str(configs),
                           "--sealed", "holdout16")
    assert code == 0 and "| a |" in out and "| b |" in out and "| c |" not in out and "holdout16" not in out
    code, _, err = run_cli(monkeypatch, capsys, "zoo", "tune", "--out", str(tmp_path), "--configs", str(configs),
                           "--grid", "depth_share=0.8", "--sealed", "holdout16,holdout15")
    assert code == 2 and "skipped 1 member(s) without both analyses and a ground truth: a\n" in err
    code, _, err = run_cli(monkeypatch, capsys, "zoo", "tune", "--out", str(tmp_path), "--configs", str(configs),
                           "--grid", "depth_share=0.8", "--choose-on", "tune,holdout16", "--sealed", "holdout16")
    assert code == 2 and "--choose-on and --sealed both name holdout16" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(monkeypatch, capsys, "zoo", "status", "--out", str(tmp_path), "--configs", str(configs),
                           "--sealed", "later")
    assert code == 2 and "--sealed later: not a zoo split" in err

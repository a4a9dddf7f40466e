"""`evotool atlas`: the table rows are the runs' stages.json, behaviour comes from behaviour.json, one panel per run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli, stage_file
from evotool.analysis.atlas import (BEGIN, DEPTH_COLUMNS, END, depth_figure, depth_table, figure, load_runs, second_curve,
                                   write_atlas)
from evotool.analysis.config import AtlasConfig
from evotool.errors import EvotoolError
from evotool.stages.behaviour import save_behaviour
from evotool.stages.file import write_stages


def write_run(run_dir: Path, num_layers: int, critical: int, mutation: list[int], fingerprint: str,
              flips: bool = True, **payload: object) -> Path:
    """A run directory holding only stages.json, with per-layer curves (and direct-effect flip shares)."""
    rng = np.random.default_rng(num_layers)
    p = np.sort(rng.uniform(0, 1, num_layers + 1)).tolist()
    curves = {"p_token": {"median": p}, "js_prev": {"median": [None, *rng.uniform(0, 1, num_layers).tolist()]}}
    evidence = {"median_p": p, "direct_flip": [None, *rng.uniform(0, 0.05, num_layers).tolist()]} if flips else {}
    write_stages(run_dir / "stages.json", stage_file(num_layers, critical, mutation, fingerprint=fingerprint,
                                                     curves=curves, evidence=evidence, **payload).payload)
    return run_dir


def write_truth(path: Path, fingerprint: str) -> Path:
    """behaviour.json of an 8-layer model whose curves give critical 5, mutation [7] and 2 removable layers:
    exit 5 is the first within 0.05 of the best recall (1.0) and CHAIR_i_in 0.0; after it, bypassing 6 / 7 / 8
    changes 0.01 / 0.3 / 0.02 of the text (median 0.02; only 7 is >= 0.1 and >= 3x)."""
    recall = [0.1, 0.2, 0.4, 0.8, 0.98, 1.0, 1.0, 1.0]
    chair = [0.9, 0.8, 0.5, 0.2, 0.01, 0.0, 0.0, 0.0]
    agreement = [0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 0.7, 0.98]
    save_behaviour(path, {
        "fingerprint": fingerprint, "num_layers": 8, "full": {"recall": 1.0, "chair_i": 0.1, "chair_i_in": 0.0},
        "exit_curve": [{"layer": i + 1, "recall": r, "chair_i_in": c} for i, (r, c) in enumerate(zip(recall, chair))],
        "bypass_curve": [{"layer": i + 1, "agreement": a, "recall": 1.0, "chair_i": 0.1} for i, a in enumerate(agreement)],
        "oracle": [{"k": 1, "best": {"layers": [6], "agreement": 0.99, "recall": 1.0}},
                   {"k": 2, "best": {"layers": [6, 8], "agreement": 0.95, "recall": 0.99}}],
    })
    return path


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    """An 8-layer zoo-style member (analysis_a beside behaviour.json) and a 4-layer run traced without direct effect."""
    member = tmp_path / "deep"
    write_truth(member / "behaviour.json", "d" * 16)
    deep = write_run(member / "analysis_a", 8, 3, [7], "d" * 16,
                     interval={"critical": [3, 4], "mutation": [7, 7], "mutation_share": 0.9})
    shallow = write_run(tmp_path / "shallow", 4, 2, [], "s" * 16, flips=False, flags=["short_stable_stage"])
    return [deep, shallow]


def markdown_table(markdown: str, first: str) -> list[dict[str, str]]:
    """The rows (column -> cell) of the Markdown table in ``markdown`` whose first column is named ``first``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:  # after the header and its |---| line
        if not line.startswith("| "):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def table_rows(markdown: str) -> dict[str, dict[str, str]]:
    """The atlas table of runs in ``markdown`` as run -> column -> cell."""
    return {r["run"]: r for r in markdown_table(markdown, "run")}


def span(rng: list[int] | None) -> str:
    return "-" if rng is None else f"{rng[0]}-{rng[1]}"


def test_table_rows_are_each_runs_stage_file_and_behaviour(runs: list[Path], demo_stages: Path, tmp_path: Path) -> None:
    run_dirs = [demo_stages.parent, *runs]
    md, png, depth_png, html = write_atlas(run_dirs, AtlasConfig(out=tmp_path / "atlas"))
    text = md.read_text()
    rows = table_rows(text)
    assert list(rows) == ["shallow", "deep", demo_stages.parent.name]  # by depth: 4, 8, 12 layers
    for name, run_dir in zip(["deep", "shallow", demo_stages.parent.name], [runs[0], runs[1], demo_stages.parent]):
        stages = json.loads((run_dir / "stages.json").read_text())
        row, interval = rows[name], stages.get("interval") or {}
        assert row["L"] == str(stages["num_layers"])
        assert row["critical (interval)"] == f"{stages['critical_layer']} ({span(interval.get('critical'))})"
        muts = ", ".join(map(str, stages["mutation_layers"])) or "none"
        assert row["mutation (interval)"] == f"{muts} ({span(interval.get('mutation'))})"
        assert row["stages (rapid / stable / mutation)"] == " / ".join(
            span(stages["stages"][k]) for k in ("rapid_evolution", "stabilization", "mutation"))
        assert row["flags"] == (", ".join(stages["flags"]) or "-")
    # the member's behaviour.json (critical 5, mutation 7, two removable layers); the detector's 3 is 2 layers off
    assert (rows["deep"]["beh. critical"], rows["deep"]["beh. mutation"]) == ("5", "7")
    assert rows["deep"]["verdict"] == "critical **miss**, mutation ok, stabilization ok"
    for name in ("shallow", demo_stages.parent.name):
        assert [rows[name][c] for c in ("beh. critical", "beh. mutation", "verdict")] == ["-", "-", "-"]
    assert rows["deep"]["model"] == "test"  # stages.json's model: no local folder with a config.json
    demo_config = json.loads((Path(json.loads(demo_stages.read_text())["model"]) / "config.json").read_text())
    assert rows[demo_stages.parent.name]["model"] == f"{demo_config['model_type']}/{demo_config['text_config']['model_type']}"
    assert "](atlas.png)" in text and Image.open(png).size[0] > 0
    assert "](atlas-depth.png)" in text and Image.open(depth_png).size[0] > 0
    assert [r["L"] for r in markdown_table(text, "L")] == ["4", "8", "12"]  # the by-depth table, one row per depth
    # atlas.html: the report of every run, named as in the table, with the behavioural boundaries drawn
    data = json.loads(re.search(r'id="report-data">(.*?)</script>', html.read_text(), re.S).group(1))
    assert [r["name"] for r in data["runs"]] == list(rows)
    assert data["runs"][1]["behaviour"] == {"critical_layer": 5, "mutation_layers": [7]}
    assert data["runs"][0]["behaviour"] is None and data["runs"][2]["samples"]


def test_behaviour_files_are_matched_by_fingerprint(runs: list[Path], tmp_path: Path) -> None:
    truth = write_truth(tmp_path / "elsewhere" / "truth.json", "s" * 16)
    rows = {r.label: r for r in load_runs(runs, [truth])}
    assert rows["shallow"].behaviour["critical_layer"] == 5 and rows["shallow"].behaviour["mutation_layers"] == [7]
    stray = write_truth(tmp_path / "stray.json", "x" * 16)
    with pytest.raises(EvotoolError, match="none of the runs"):
        load_runs(runs, [stray])


def test_one_panel_per_run_on_normalised_depth(runs: list[Path]) -> None:
    atlas_runs = load_runs(runs)
    fig, panels = figure(atlas_runs, columns=1)
    assert len(panels) == 2 and len(fig.axes) == 4  # each panel has a twin axis for the second curve
    for ax, run in zip(panels, atlas_runs):
        stages = json.loads((run.path / "stages.json").read_text())
        n = stages["num_layers"]
        curve = ax.lines[0]
        np.testing.assert_allclose(curve.get_xdata(), np.arange(n + 1) / n)
        np.testing.assert_allclose(curve.get_ydata(), stages["curves"]["p_token"]["median"])
        verticals = sorted((line.get_xdata()[0], line.get_linestyle()) for line in ax.lines[1:])
        detected = [(stages["critical_layer"] / n, "-")] + [(m / n, "-") for m in stages["mutation_layers"]]
        behavioural = [(5 / 8, "--"), (7 / 8, "--")] if run.label == "deep" else []
        assert verticals == sorted(detected + behavioural)
        second = fig.axes[len(panels) + panels.index(ax)].lines[0]
        expected = stages["evidence"]["direct_flip"] if run.label == "deep" else stages["curves"]["js_prev"]["median"]
        np.testing.assert_allclose(second.get_ydata(), [np.nan if v is None else v for v in expected])
        assert second.get_linestyle() == ("-" if run.label == "deep" else ":")  # dotted only for the adjacent-JS fallback
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "right axis: median adjacent JS (dotted) / direct-effect flip share" in labels  # in the panels' order


def test_depth_table_summarises_each_depth(runs: list[Path], tmp_path: Path) -> None:
    # a second 8-layer run with behaviour: critical 5 (truth 5: within one), mutations [6, 7] (first 6; truth 7)
    member = tmp_path / "deep2"
    write_truth(member / "behaviour.json", "e" * 16)
    atlas_runs = load_runs([*runs, write_run(member / "analysis_a", 8, 5, [6, 7], "e" * 16)])
    rows = markdown_table(depth_table(atlas_runs), "L")
    assert [list(r) for r in rows] == [list(DEPTH_COLUMNS)] * 2
    shallow, deep = rows
    # 4 layers: critical 2 -> 0.50, no mutation, no behaviour, stabilization 3-4 (stage_file's ranges)
    assert [shallow[c] for c in DEPTH_COLUMNS] == ["4", "1", "0.50 (0.50-0.50)", "-", "-", "- [0/1]", "-", "2"]
    # 8 layers: critical 3 and 5 (median 0.5); truth 5 and 5; 3 misses by two, 5 is exact; first mutations 7 and 6,
    # truth 7 on both; stabilization 4-6 (3 layers) and 6-5 (none) -> median 1.5
    assert [deep[c] for c in DEPTH_COLUMNS] == [
        "8", "2", "0.50 (0.38-0.62)", "0.62 (0.62-0.62)", "1/2", "0.81 (0.75-0.88) [2/2]", "0.88 (0.88-0.88) [2/2]",
        "1.5"]


def test_depth_figure_puts_each_boundary_at_its_share_of_depth(runs: list[Path]) -> None:
    atlas_runs = load_runs(runs)  # 4 layers: critical 2, no mutation, no truth; 8 layers: 3 and [7], truth 5 and [7]
    fig = depth_figure(atlas_runs)
    critical_ax, mutation_ax = fig.axes
    for ax, detected, behavioural in ((critical_ax, [(4, 0.5), (8, 3 / 8)], [(8, 5 / 8)]),
                                      (mutation_ax, [(8, 7 / 8)], [(8, 7 / 8)])):
        points = {c.get_label(): c.get_offsets() for c in ax.collections}
        assert sorted(points) == sorted(["test detected", "test behaviour"])
        np.testing.assert_allclose(sorted(map(tuple, points["test detected"])), detected)
        np.testing.assert_allclose(points["test behaviour"], behavioural)
    join = [line for line in critical_ax.lines if line.get_color() == "grey"]  # detected to behavioural, same run
    assert len(join) == 1 and list(join[0].get_xdata()) == [8, 8] and list(join[0].get_ydata()) == [3 / 8, 5 / 8]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["test", "detected", "behaviour", "same run"]


def test_second_curve_is_what_the_mutation_rule_read(tmp_path: Path) -> None:
    js = [None, 0.001, 0.002, 0.05, 0.001]
    flips = [None, 0.0, 0.01, 0.2, 0.0]
    for signal, expected, name in (("js", js, "mean direct-effect JS"), ("flip", flips, "direct-effect flip share"),
                                   (None, flips, "direct-effect flip share")):  # no signal stored: a run before v5
        config = {"stages": {} if signal is None else {"mutation_signal": signal}}
        curve, label = second_curve(stage_file(4, 2, [3], evidence={"direct_js": js, "direct_flip": flips}, config=config))
        np.testing.assert_allclose(curve, [np.nan if v is None else v for v in expected])
        assert label == name


def test_regenerating_keeps_text_around_the_markers(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "docs"
    out.mkdir()
    (out / "atlas.md").write_text(f"# Notes\n\nintro\n\n{BEGIN}\nold table\n{END}\n\noutro\n")
    write_atlas(runs, AtlasConfig(out=out, html=False))
    text = (out / "atlas.md").read_text()
    assert text.startswith("# Notes\n\nintro\n\n" + BEGIN) and text.endswith(END + "\n\noutro\n")
    assert "old table" not in text and len(table_rows(text)) == 2
    assert not (out / "atlas.html").exists()


def test_cli_writes_the_atlas(runs: list[Path], tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "atlas"
    code, stdout, _ = run_cli(monkeypatch, capsys, "atlas", *map(str, runs), "--out", str(out), "--no-html",
                              "--columns", "1")
    assert code == 0 and stdout.split() == ["wrote", str(out / "atlas.md"), "wrote", str(out / "atlas.png"),
                                            "wrote", str(out / "atlas-depth.png")]
    assert Image.open(out / "atlas.png").size[1] > Image.open(out / "atlas.png").size[0]  # two rows of one panel


@pytest.mark.parametrize("case", ["missing", "no_stages", "corrupt", "stray_behaviour"])
def test_bad_input_is_one_error_line(case: str, runs: list[Path], tmp_path: Path, monkeypatch, capsys) -> None:
    bad = tmp_path / "bad"
    extra: list[str] = []
    if case != "missing":
        bad.mkdir()
    if case == "corrupt":
        (bad / "stages.json").write_text('{"schema_version": "1.1", "num_layers": ')
    if case == "stray_behaviour":
        bad = runs[1]
        extra = ["--behaviour", str(write_truth(tmp_path / "stray.json", "x" * 16))]
    code, _, err = run_cli(monkeypatch, capsys, "atlas", str(runs[0]), str(bad), *extra, "--out", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert (str(tmp_path / "stray.json") if case == "stray_behaviour" else str(bad)) in err
    assert not (tmp_path / "o").exists()

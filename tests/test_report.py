"""report.html from `evotool analyze` and `evotool report`: the embedded data against the run's own files,
the hooks for divergence points and behavioural boundaries, bad input, and the page in a real headless
Chromium (no console errors, no network requests; hover, click and the patch-lens slider show the run's numbers).

Screenshots go to ``$EVOTOOL_TEST_ARTIFACTS`` when set, else to pytest's temporary directory.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import V7_MUTATION
from evotool.cli import app
from evotool.world import default_model_path
from test_analyze import assert_one_line_error, evotool

MAX_NEW = 12
VIRIDIS_TOP = "rgb(253, 231, 37)"  # the colour of a column's maximum in the column-scaled heatmap


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped model on 4 world samples (2 prior-breaking), with the patch lens and figures."""
    out = tmp_path_factory.mktemp("report") / "demo"
    result = CliRunner().invoke(app, ["analyze", "--out", str(out), "--world-samples", "4", "--max-new-tokens",
                                      str(MAX_NEW), "--patch-lens", "--no-wandb",
                                      "--set", "stages.min_tokens=10"])  # 4 short captions: below the default floor
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path())


def page_data(html: Path) -> dict[str, Any]:
    """The report data embedded in a page."""
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html.read_text(), re.S)
    assert match is not None
    return json.loads(match.group(1))


def records(run: Path) -> list[dict[str, Any]]:
    return sorted((json.loads(p.read_text()) for p in (run / "samples").glob("*.json")), key=lambda r: r["index"])


def arrays(run: Path, sample_id: str, suffix: str = "npz") -> dict[str, np.ndarray]:
    with np.load(run / "samples" / f"{sample_id}.{suffix}") as z:
        return {k: z[k] for k in z.files}


def token_rows(run: Path, sample_id: str) -> Any:
    table = pq.read_table(run / "tokens.parquet").to_pandas()
    return table[table["sample"] == sample_id].set_index(["step", "layer"]).sort_index()


def word(token: str) -> str:
    return token.replace("▁", "").replace("Ġ", "").strip().lower()


def expected_hallucinated(recs: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Steps of generated tokens naming a world shape (the object names of world runs) that the sample's
    own ground truth lacks."""
    from evotool.world import SHAPES

    return {r["id"]: [i for i, t in enumerate(r["tokens"]) if word(t) in SHAPES and word(t) not in
                      {o.lower() for o in r["objects"]}] for r in recs}


def texts(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "texts.jsonl").read_text().splitlines()]


def report(args: list[str]) -> None:
    result = CliRunner().invoke(app, ["report", *args])
    assert result.exit_code == 0, result.output


# ---- the embedded data ---------------------------------------------------------------------------


def test_analyze_writes_a_report_whose_data_are_the_runs_own(demo_run: Path, tokenizer: Any) -> None:
    html = demo_run / "report.html"
    text = html.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", text)  # every resource inline
    assert "figures/patch_lens.png" in (demo_run / "report.md").read_text()
    data = page_data(html)
    (run,) = data["runs"]
    stages = json.loads((demo_run / "stages.json").read_text())
    assert (run["critical_layer"], run["mutation_layers"], run["stages"]) == (
        stages["critical_layer"], stages["mutation_layers"], stages["stages"])
    assert {f["name"] for f in run["figures"]} == {"features_single_image", "features_multi_image", "mutation_histogram",
                                                   "patch_lens", *(["divergence"] if stages["divergence"] else [])}
    recs = records(demo_run)
    assert [s["id"] for s in run["samples"]] == [r["id"] for r in recs]
    for rec, view in zip(recs, run["samples"]):
        rows = token_rows(demo_run, rec["id"])
        npz = arrays(demo_run, rec["id"])
        steps = len(npz["token_ids"])
        assert view["shown"] == steps <= MAX_NEW
        js = rows["js_prev"].to_numpy().reshape(steps, -1)[:, 1:]
        np.testing.assert_allclose(np.array(view["js"], dtype=float), js, rtol=1e-3, atol=1e-12)
        np.testing.assert_allclose(np.array(view["topk_p"]), npz["topk_p"], rtol=1e-3)
        assert view["topk_ids"] == npz["topk_ids"].tolist()
        for token_id in {*npz["topk_ids"].ravel().tolist(), *npz["token_ids"].tolist()}:
            assert run["token_strings"][str(token_id)] == tokenizer.decode([token_id])
        patches = arrays(demo_run, rec["id"], "patch.npz")
        assert view["patch_lens"]["grid"] == [3, 3] and view["patch_lens"]["top1"] == patches["top1"].tolist()
        halluc = [step for step, h in view["object_tokens"] if h]
        assert halluc == expected_hallucinated(recs)[rec["id"]]
        assert view["divergence"] == next(t["divergence"] for t in texts(demo_run) if t["id"] == rec["id"])
        uri = view["image"]
        assert uri.startswith("data:image/png;base64,")
        shown = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        assert np.array_equal(np.asarray(shown.convert("RGB")),
                              np.asarray(Image.open(demo_run / "samples" / f"{rec['id']}.png").convert("RGB")))


def test_report_limits_bound_the_page(demo_run: Path, tmp_path: Path) -> None:
    small = tmp_path / "small.html"
    report([str(demo_run), "--samples", "2", "--tokens", "3", "--no-figures", "--out", str(small)])
    (run,) = page_data(small)["runs"]
    assert [len(s["js"]) for s in run["samples"]] == [3, 3] and not run["figures"]
    assert any("shows 2 of 4 samples" in n for n in run["notes"])
    assert small.stat().st_size < (demo_run / "report.html").stat().st_size / 2


def test_markdown_report_names_the_mutation_rule_the_run_used(demo_run: Path, tmp_path: Path) -> None:
    from evotool.analysis.report import write_report

    payload = json.loads((demo_run / "stages.json").read_text())
    payload["config"]["stages"] |= V7_MUTATION
    for excess, needle in ((0.0, "post-critical median;"), (0.03, "(the last layer: its mean JS excess over 0.03")):
        payload["config"]["stages"]["mutation_last_excess"] = excess
        write_report(tmp_path / "report.md", payload, {}, [])
        assert needle in (tmp_path / "report.md").read_text()
    payload["config"]["stages"] |= {"mutation_reference": "others", "mutation_quiet_ratio": 20.0, "mutation_quiet_min_js": 0.0002}
    write_report(tmp_path / "report.md", payload, {}, [])
    assert ("8x the median of the other post-critical layers and >= 0.001, or >= 20x and >= 0.0002 (the last layer"
            in (tmp_path / "report.md").read_text())


@pytest.fixture(scope="module")
def constructed_run(demo_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A copy of the demo run where sample 0 names a shape its ground truth lacks, with divergence points
    of our own making in texts.jsonl (where `evotool analyze` writes them)."""
    run = tmp_path_factory.mktemp("constructed") / "demo"
    shutil.copytree(demo_run, run)
    first = records(run)[0]
    step = next(i for i, t in enumerate(first["tokens"]) if word(t) in {o.lower() for o in first["objects"]})
    (run / "samples" / f"{first['id']}.json").write_text(json.dumps(dict(first, objects=["zebra"])))
    eos = int(arrays(run, first["id"])["token_ids"][-1])
    points = [{"step": step - 1, "kind": "separator", "overturn_layer": 11, "stable_top1": eos},
              {"step": step, "kind": "object", "object": word(first["tokens"][step])}]
    lines = [dict(t, divergence=points if t["id"] == first["id"] else []) for t in texts(run)]
    (run / "texts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in lines))
    report([str(run)])
    return run, {"sample": first["id"], "steps": [step - 1, step], "points": points, "eos": eos}


def test_divergence_points_and_hallucinated_objects_reach_the_page_data(constructed_run) -> None:
    run, expect = constructed_run
    data = page_data(run / "report.html")
    view = data["runs"][0]["samples"][0]
    assert view["id"] == expect["sample"]
    assert view["divergence"] == expect["points"]
    assert [step for step, h in view["object_tokens"] if h] == expected_hallucinated(records(run))[expect["sample"]]
    assert expect["steps"][1] in [step for step, h in view["object_tokens"] if h]
    assert str(expect["eos"]) in data["runs"][0]["token_strings"]


def test_run_without_token_strings_falls_back_to_ids(demo_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "old"
    shutil.copytree(demo_run, run)
    (run / "token_strings.json").unlink()
    report([str(run), "--no-figures"])
    (view,) = page_data(run / "report.html")["runs"]
    assert any("token_strings.json is missing" in n for n in view["notes"])
    emitted = {i: t for rec in records(run) for i, t in zip(arrays(run, rec["id"])["token_ids"].tolist(), rec["tokens"])}
    others = {i for s in view["samples"] for i in np.asarray(s["topk_ids"]).ravel().tolist()} - set(emitted)
    assert others
    assert all(view["token_strings"][str(i)] == t for i, t in emitted.items())
    assert all(view["token_strings"][str(i)] == f"#{i}" for i in others)


def _stale(run: Path) -> None:
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(dict(info, fingerprint="0" * 16)))


def _bad_divergence(run: Path) -> None:
    lines = texts(run)
    lines[0]["divergence"] = [{"step": "two"}]
    (run / "texts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in lines))


@pytest.mark.parametrize("case, args, needles", [
    ("missing run", ["{tmp}/nowhere"], ["stage file not found", "nowhere"]),
    ("several runs, no --out", ["{run}", "{run}"], ["--out"]),
    ("out is a directory", ["{run}", "--out", "{tmp}"], ["is a directory"]),
    ("no samples", ["{run}", "--samples", "0"], ["samples"]),
    ("stale stage file", ["{run}"], ["stale", "run.json"]),
    ("malformed divergence point", ["{run}"], ["texts.jsonl:1", "integer step"]),
])
def test_bad_input_is_one_line(case: str, args: list[str], needles: list[str], demo_run: Path, tmp_path: Path,
                               monkeypatch, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("*.npz", "figures"))
    {"stale stage file": _stale, "malformed divergence point": _bad_divergence}.get(case, lambda _: None)(run)
    before = (run / "report.html").read_bytes()
    code, err = evotool(["report", *(a.format(run=run, tmp=tmp_path) for a in args)], monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(code, err, *needles)
    assert (run / "report.html").read_bytes() == before  # nothing written over


# ---- the page in a headless browser --------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Any:
    pytest.importorskip("websocket", reason="websocket-client not installed (pip install -e '.[test]')")
    from browser import Chromium, find_chromium

    binary = find_chromium()
    if binary is None:
        if os.environ.get("EVOTOOL_REQUIRE_BROWSER"):
            pytest.fail("EVOTOOL_REQUIRE_BROWSER is set but no chromium is on PATH")
        pytest.skip("no chromium on PATH (apt-get install chromium; .ci/run installs it)")
    chromium = Chromium(binary).start()
    yield chromium
    chromium.stop()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    return Path(os.environ["EVOTOOL_TEST_ARTIFACTS"]) if os.environ.get("EVOTOOL_TEST_ARTIFACTS") else tmp_path


@pytest.fixture
def page(browser: Any, demo_run: Path) -> Any:
    page = browser.open((demo_run / "report.html").as_uri())
    yield page
    page.close()


TOOLTIP = """(() => {
  const t = document.getElementById('tooltip');
  const fields = {};
  t.querySelectorAll('span[data-field]').forEach((e) => { fields[e.dataset.field] = e.dataset.value; });
  const lists = {};
  t.querySelectorAll('ol[data-field]').forEach((ol) => {
    lists[ol.dataset.field] = [...ol.children].map((li) => [+li.dataset.id, +li.dataset.p, li.textContent]);
  });
  return {hidden: t.hidden, fields, lists, text: t.innerText};
})()"""


def test_page_loads_without_errors_or_requests(page: Any, artifacts: Path) -> None:
    assert page.evaluate("document.body.dataset.ready") == "1"
    assert page.errors() == []
    assert all(url.startswith(("file://", "data:")) for url in page.requests())
    shot = Image.open(page.screenshot(artifacts / "report.png")).convert("L")
    assert shot.size[1] > 1000 and len(set(shot.getdata())) > 32  # the whole page, drawn


def test_hover_on_a_heatmap_cell_shows_the_runs_numbers(page: Any, demo_run: Path, tokenizer: Any) -> None:
    rec = records(demo_run)[0]
    rows, npz = token_rows(demo_run, rec["id"]), arrays(demo_run, rec["id"])
    critical = json.loads((demo_run / "stages.json").read_text())["critical_layer"]
    for step, pair in ((1, critical), (2, 0)):
        page.hover(f'#heatmap td[data-step="{step}"][data-pair="{pair}"]')
        tip = page.evaluate(TOOLTIP)
        assert not tip["hidden"], tip
        f = tip["fields"]
        assert f["token"] == tokenizer.decode([int(npz["token_ids"][step])])
        assert (int(f["step"]), int(f["from"]), int(f["to"])) == (step, pair, pair + 1)
        js = rows["js_prev"].xs(pair + 1, level="layer").to_numpy()  # [T]
        assert float(f["js"]) == pytest.approx(js[step], rel=1e-3)
        assert float(f["js-column"]) == pytest.approx(js[step] / js.max(), rel=1e-3)
        for name, layer in (("topk-from", pair), ("topk-to", pair + 1)):
            ids, probs, texts = zip(*tip["lists"][name])
            assert list(ids) == npz["topk_ids"][step, layer].tolist()
            np.testing.assert_allclose(probs, npz["topk_p"][step, layer], rtol=1e-3)
            assert [t.split("  ")[0] for t in texts] == [json.dumps(tokenizer.decode([i]), ensure_ascii=False) for i in ids]
    page.click("#scale-column")
    js = rows["js_prev"].xs(critical + 1, level="layer").to_numpy()
    top = int(np.argmax(js))
    colour = f'getComputedStyle(document.querySelector(\'#heatmap td[data-step="{top}"][data-pair="{critical}"]\')).backgroundColor'
    assert page.evaluate(colour) == VIRIDIS_TOP
    assert page.errors() == []


def test_clicking_a_token_shows_its_trajectory(page: Any, demo_run: Path, tokenizer: Any) -> None:
    rec = records(demo_run)[0]
    rows, npz = token_rows(demo_run, rec["id"]), arrays(demo_run, rec["id"])
    step = 2
    page.click(f'#text .tok[data-step="{step}"]')
    table = page.evaluate("""[...document.querySelectorAll('#trajectory-table tr[data-layer]')].map((tr) => ({
        layer: +tr.dataset.layer, p: +tr.querySelector('[data-field=p_token]').dataset.value,
        rank: +tr.querySelector('[data-field=rank]').textContent,
        ids: [...tr.querySelectorAll('td.topk')].map((td) => +td.dataset.id),
        emitted: [...tr.querySelectorAll('td.topk.emitted')].map((td) => +td.dataset.id)}))""")
    n_layers = json.loads((demo_run / "stages.json").read_text())["num_layers"]
    assert [row["layer"] for row in table] == list(range(n_layers, -1, -1))
    token = int(npz["token_ids"][step])
    assert page.evaluate("document.querySelector('#trajectory-title [data-field=token]').dataset.value") == tokenizer.decode([token])
    for row in table:
        expect = rows.loc[(step, row["layer"])]
        assert row["p"] == pytest.approx(expect["p_token"], rel=1e-3)
        assert row["rank"] == expect["rank"]
        assert row["ids"] == npz["topk_ids"][step, row["layer"]].tolist() and row["ids"][0] == expect["top1_id"]
        assert row["emitted"] == ([token] if token in row["ids"] else [])
    assert page.errors() == []


def test_patch_lens_slider_shows_what_each_patch_reads_as(page: Any, demo_run: Path, tokenizer: Any) -> None:
    rec = records(demo_run)[0]
    patches = arrays(demo_run, rec["id"], "patch.npz")
    assert page.evaluate("getComputedStyle(document.getElementById('patch-overlay')).gridTemplateColumns.split(' ').length") == 3
    for layer in (0, 4, patches["top1"].shape[0] - 1):
        page.evaluate(f"(() => {{ const s = document.getElementById('patch-layer'); s.value = {layer};"
                      " s.dispatchEvent(new Event('input')); })()")
        ids = page.evaluate("[...document.querySelectorAll('#patch-overlay .patch')].map((e) => +e.dataset.id)")
        assert ids == patches["top1"][layer].tolist()
        page.hover("#title")  # leave the cell, so that hovering it again redraws the tooltip
        page.hover('#patch-overlay .patch[data-patch="4"]')
        tip = page.evaluate(TOOLTIP)["fields"]
        assert (int(tip["layer"]), int(tip["patch"])) == (layer, 4)
        assert tip["token"] == tokenizer.decode([int(patches["top1"][layer, 4])])
        assert float(tip["prob"]) == pytest.approx(patches["prob"][layer, 4], rel=1e-2)
    assert page.errors() == []


def test_page_highlights_hallucinated_objects_and_divergence_points(browser: Any, constructed_run, artifacts: Path,
                                                                    tokenizer: Any) -> None:
    run, expect = constructed_run
    page = browser.open((run / "report.html").as_uri())
    try:
        steps = lambda cls: page.evaluate(f"[...document.querySelectorAll('#text .tok.{cls}')].map((e) => +e.dataset.step)")
        assert steps("hallucinated") == expected_hallucinated(records(run))[expect["sample"]]
        assert steps("divergence") == expect["steps"]
        page.hover(f'#text .tok[data-step="{expect["steps"][0]}"]')
        info = page.evaluate("[...document.querySelectorAll('#tooltip .divergence-info [data-key]')].map((e) => e.textContent)")
        assert info == ["kind: separator", "overturn_layer: 11",
                        f"stable_top1: {expect['eos']} {json.dumps(tokenizer.decode([expect['eos']]))}"]
        page.screenshot(artifacts / "report_divergence.png")
        assert page.errors() == []
    finally:
        page.close()


def test_atlas_of_several_runs(browser: Any, demo_run: Path, tmp_path: Path, artifacts: Path) -> None:
    member = tmp_path / "zoo-member"
    member.mkdir()
    stages = json.loads((demo_run / "stages.json").read_text())
    n = stages["num_layers"]
    stages.update(critical_layer=5, mutation_layers=[10],
                  stages={"rapid_evolution": [0, 5], "stabilization": [6, 9], "mutation": [10, n]},
                  behaviour={"critical_layer": 4, "mutation_layers": [9]})
    (member / "stages.json").write_text(json.dumps(stages))  # a run kept as its stage file only
    atlas = tmp_path / "atlas.html"
    report([str(demo_run), str(member), "--out", str(atlas)])
    page = browser.open(atlas.as_uri())
    try:
        cells = page.evaluate("[...document.querySelectorAll('#atlas-table tr[data-run]')].map((tr) =>"
                              " [...tr.children].map((td) => td.textContent))")
        demo = json.loads((demo_run / "stages.json").read_text())
        assert [(c[0], c[3], c[4], c[9]) for c in cells] == [
            ("demo", str(demo["critical_layer"]), ", ".join(map(str, demo["mutation_layers"])) or "none", ""),
            ("zoo-member", "5", "10", "4 / 9")]
        assert page.evaluate("document.querySelectorAll('#atlas-grid .atlas-cell').length") == 2
        lines = page.evaluate("[...document.querySelectorAll('#atlas-grid line title')].map((t) => t.textContent)")
        assert {"behavioural critical layer 4", "behavioural mutation layer 9", "critical layer 5"} <= set(lines)
        page.evaluate("(() => { const s = document.getElementById('atlas-metric'); s.value = 'p_token';"
                      " s.dispatchEvent(new Event('change')); })()")
        page.click('#atlas-table tr[data-run="1"]')
        assert page.evaluate("document.getElementById('run-title').textContent").startswith("zoo-member")
        assert page.evaluate("document.getElementById('sample').hidden") is True
        page.screenshot(artifacts / "atlas.png")
        assert page.errors() == []
    finally:
        page.close()

"""benchmarks/gpu_suite.py --dry-run: the GPU suite's code path on CPU with tiny shapes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """The module of ``benchmarks/<name>.py``, registered in ``sys.modules`` (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def suite():
    return load_benchmark("gpu_suite")


def test_quarter_is_the_first_stable_layers(suite) -> None:
    stages = suite.synthetic_stages(32)
    assert (stages.critical_layer, stages.stable_range) == (16, (17, 28))
    assert suite.quarter(stages) == list(range(17, 25))
    assert suite.quarter(suite.synthetic_stages(8)) == [5, 6]


def test_the_7b_shape_prompts_with_llava_15s_576_image_tokens(suite) -> None:
    from evotool.generation import build_inputs
    from evotool.world import build_processor

    shape = suite.SHAPES["7b"]
    processor = build_processor(suite.world(shape))
    sample = suite.samples_for(shape, 1)[0]
    inputs = build_inputs(processor, [sample.image], [sample.prompt], torch.device("cpu"), torch.float32)
    assert inputs["pixel_values"].shape[-2:] == (336, 336)
    assert int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids(processor.image_token)).sum()) == 576


def test_a_model_built_with_the_7b_shapes_context_takes_its_prompt(suite) -> None:
    from dataclasses import replace

    from evotool.generation import context_length, greedy_generate

    shape = replace(suite.SHAPES["dry"], image_size=336, grid=24, context=suite.SHAPES["7b"].context)
    model, processor = suite.build(shape, "cpu", torch.float32)
    assert context_length(model) == 4096
    sample = suite.samples_for(shape, 1)[0]
    ids, _ = greedy_generate(model, processor, [sample.image], [sample.prompt], max_new_tokens=2)  # checks the context
    assert len(ids[0]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU dry run (a GPU machine runs the real suite)")
def test_dry_run_writes_every_part(suite, tmp_path: Path, capsys) -> None:
    suite.main(["--dry-run", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert report["schema_version"] == suite.SCHEMA and report["dry_run"] and report["shape_name"] == "dry"
    assert [r["batch"] for r in report["analyze_overhead"]] == list(suite.BATCHES)
    for row in report["analyze_overhead"]:
        assert row["ratio"] == pytest.approx(row["trace_s"] / row["generate_s"]) and row["extra_mb"] is None
    for row in report["prune"]:
        assert row["removed"] == [5, 6] and row["ideal"] == pytest.approx(8 / 6)
        assert row["efficiency"] == pytest.approx(row["decode_speedup"] / row["ideal"])
    ratios, spec = report["methods"]["latency_ratio"], report["methods"]["speculative"]
    assert set(ratios) == set(suite.METHODS) and all(r > 0 for r in ratios.values())
    assert 0 <= spec["acceptance_rate"] <= 1 and spec["committed"] > 0 and spec["forward_equivalents"] > 0
    assert {q: r["status"] for q, r in report["quantized"].items()} == {
        "4bit": "skipped: needs CUDA and bitsandbytes", "8bit": "skipped: needs CUDA and bitsandbytes"}
    assert report["heal"]["kind"] == "lora" and len(report["heal"]["losses"]) == 2
    table = (tmp_path / "gpu_suite.md").read_text()
    assert table == suite.markdown(report) and table in capsys.readouterr().out
    assert f"| stage_speculative | {ratios['stage_speculative']:.3f} |" in table
    assert f"stage_speculative draft: acceptance {spec['acceptance_rate']:.3f}," in table
    assert report["failed"] == {} and "failed" not in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU dry run (a GPU machine runs the real suite)")
def test_a_failing_part_is_recorded_and_the_rest_still_run(suite, tmp_path: Path, monkeypatch) -> None:
    def out_of_memory(*args):
        raise RuntimeError("CUDA out of memory\n(details)")

    monkeypatch.setattr(suite, "method_latency", out_of_memory)
    suite.main(["--dry-run", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert report["failed"] == {"methods": "RuntimeError: CUDA out of memory\n(details)"} and "methods" not in report
    assert {"analyze_overhead", "prune", "quantized", "heal"} <= set(report)  # the parts after it ran too
    table = (tmp_path / "gpu_suite.md").read_text()
    assert "- **methods failed**: RuntimeError: CUDA out of memory\n" in table and "latency ratio" not in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path (a GPU machine runs the 7B shape)")
def test_decode_bound_times_every_variant(capsys) -> None:
    load_benchmark("gpu_decode_bound").main(["--batch", "2", "--repeats", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("batch 2 ")]
    assert [row[2] for row in rows] == ["plain", "trace", "lens_only", "forwards"]
    assert rows[0][5] == "x1.000" and all(float(row[3]) > 0 for row in rows)


def test_lens_traffic_times_every_part_and_the_two_lenses_agree(tmp_path: Path) -> None:
    load_benchmark("gpu_lens_traffic").main(["--batch", "2", "--repeats", "1", "--iters", "1", "--compile",
                              "--json", str(tmp_path / "r.json")])
    result = json.loads((tmp_path / "r.json").read_text())
    assert list(result["seconds"]) == ["forward", "step", "lens", "per_layer", "head", "step_compiled"]
    assert result["compiled_max_abs_diff"] == 0 and result["compiled_same_tokens"]  # dynamo traced it whole
    assert result["ratio_to_forward"]["forward"] == 1.0 and all(s > 0 for s in result["seconds"].values())
    assert set(result["how"].values()) == {"eager"}  # no CUDA graphs on CPU
    assert result["lens_max_abs_diff"] < 1e-5 and result["lens_top1_agrees"]
    assert result["forward_weight_gb"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lens_traffic_replays_a_graph_and_falls_back_where_capture_fails() -> None:
    module, x = load_benchmark("gpu_lens_traffic"), torch.ones(4, device="cuda")
    run, how = module.replayer(lambda: x.mul_(2), 3, cuda=True)
    x.fill_(1)
    run()
    torch.cuda.synchronize()
    assert how == "graph" and x.tolist() == [8.0] * 4  # three replays of one captured doubling
    run, how = module.replayer(lambda: x.sum().item(), 2, cuda=True)  # a host read cannot be captured
    assert how.startswith("eager (")
    run()

"""evotool's methods in plain transformers code: `evotool.decoding` kwargs and exported `custom_generate`
folders give the same tokens as `Method.generate` on the shipped model, for greedy and stage-aware methods."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import evotool
from evotool.cli import app
from evotool.errors import ConfigError, StageFileError
from evotool.generation import GREEDY, build_inputs, cut_at_eos
from evotool.integrations.hf import export_generate
from evotool.mitigate.methods import build_method
from evotool.models.loading import load_model
from evotool.stages import StageFile
from evotool.world import WorldConfig, default_model_path, make_records

STEPS = 24
STAGE_AWARE = {"stage_contrast": {}, "smoothing": {"alpha": 0.0}, "stable_readout": {},
               "stage_speculative": {"layers": [6, 7], "max_draft": 3}}
LOSSLESS = ("greedy", "stage_speculative")  # same tokens as plain greedy by construction


@pytest.fixture(scope="module")
def demo(demo_set_stages):
    """The shipped model, a batch of prior-breaking captions (where methods change the text), the stage file."""
    model, processor = load_model(default_model_path())
    records = make_records("caption", "prior_breaking", 6, WorldConfig(seed=0))
    inputs = build_inputs(processor, [r["image"] for r in records], [r["prompt"] for r in records])
    return model, inputs, demo_set_stages


def reference(model, inputs, name, options, stages):
    """`Method.generate_ids` (evotool's own path) for the batch."""
    return build_method(name, model, options, StageFile.read(stages) if stages else None).generate_ids(dict(inputs), STEPS)


def new_ids(model, out, inputs) -> list[list[int]]:
    return [cut_at_eos(row.tolist(), model) for row in out[:, inputs["input_ids"].shape[1]:]]


@pytest.mark.parametrize("name", ["greedy", "dola", *STAGE_AWARE])
def test_decoding_kwargs_equal_method_generate(demo, name):
    model, inputs, stages = demo
    options = STAGE_AWARE.get(name, {})
    stages = stages if name in STAGE_AWARE else None
    expected = reference(model, inputs, name, options, stages)
    with evotool.decoding(model, name, stages=stages, batch_size=inputs["input_ids"].shape[0], **options) as kw:
        assert ("logits_processor" in kw) == (name not in ("greedy", "smoothing", "stage_speculative"))
        assert ("custom_generate" in kw) == (name == "stage_speculative")  # the draft-and-verify loop
        out = model.generate(**inputs, **kw, **GREEDY, max_new_tokens=STEPS)
    assert new_ids(model, out, inputs) == expected
    plain = new_ids(model, model.generate(**inputs, **GREEDY, max_new_tokens=STEPS), inputs)
    assert (plain == expected) == (name in LOSSLESS), "each lossy method changes these captions; hooks leave with the block"


@pytest.mark.parametrize("name", ["greedy", "vcd", "stage_contrast", "smoothing", "stage_speculative"])
def test_exported_custom_generate_equals_method_generate(demo, tmp_path, name):
    model, inputs, stages = demo
    options = STAGE_AWARE.get(name, {})
    stages = stages if name in STAGE_AWARE else None
    folder = export_generate(name, tmp_path / name, stages, options)
    assert (folder / "requirements.txt").read_text().startswith("evotool>=")
    out = model.generate(**inputs, custom_generate=str(tmp_path / name), trust_remote_code=True, do_sample=False,
                         max_new_tokens=STEPS)
    assert out.shape[0] == inputs["input_ids"].shape[0]
    assert new_ids(model, out, inputs) == reference(model, inputs, name, options, stages)


def test_cli_export_with_options_and_checks(demo, tmp_path):
    model, inputs, stages = demo
    res = CliRunner().invoke(app, ["export-generate", "stage_contrast", "--stages", str(stages), "--set", "weight=0.5",
                                   "--set", "alpha=0.01", "--out", str(tmp_path / "sc")])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "sc" / "custom_generate" / "method.json").read_text())
    assert record["options"]["weight"] == 0.5 and record["stages"]["fingerprint"] == StageFile.read(stages).fingerprint
    out = model.generate(**inputs, custom_generate=str(tmp_path / "sc"), trust_remote_code=True, do_sample=False,
                         max_new_tokens=STEPS)
    assert new_ids(model, out, inputs) == reference(model, inputs, "stage_contrast", {"weight": 0.5, "alpha": 0.01}, stages)
    # a folder exported with another model's stage file is refused at generation time
    other = json.loads(stages.read_text()) | {"fingerprint": "0123456789abcdef"}
    (tmp_path / "other.json").write_text(json.dumps(other))
    export_generate("stage_contrast", tmp_path / "other", tmp_path / "other.json")
    with pytest.raises(StageFileError, match="another model"):
        model.generate(**inputs, custom_generate=str(tmp_path / "other"), trust_remote_code=True, max_new_tokens=2)
    export_generate("vcd", tmp_path / "vcd")
    with pytest.raises(ConfigError, match="do_sample=False"):  # VCD's paired rows cannot sample independently
        model.generate(**inputs, custom_generate=str(tmp_path / "vcd"), trust_remote_code=True, do_sample=True,
                       max_new_tokens=2)


def test_refusals(demo, tmp_path):
    model, _, stages = demo
    with pytest.raises(ConfigError, match="adds rows"):
        with evotool.decoding(model, "vcd"):
            pass
    with pytest.raises(StageFileError, match="needs a stage file"):
        with evotool.decoding(model, "stage_contrast"):
            pass
    res = CliRunner().invoke(app, ["export-generate", "smoothing", "--out", str(tmp_path / "x")])
    assert isinstance(res.exception, StageFileError) and not (tmp_path / "x").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "method.json").write_text(json.dumps({"schema_version": "1.0", "method": "greedy",
                                                           "checkpoint": "runs/m/model"}))
    with pytest.raises(ConfigError, match="trained method"):
        export_generate(tmp_path / "run", tmp_path / "y")

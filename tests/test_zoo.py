"""Training in the library, the decoder families, the zoo configs and build, and the behavioural ground truth."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText
from typer.testing import CliRunner

from conftest import run_cli, stage_file, tiny_world_llava
from evotool.cli import app
from evotool.config import from_dict, to_dict
from evotool.data.inputs import Sample
from evotool.errors import ConfigError, InputError
from evotool.generation import build_inputs, generate_ids
from evotool.io import atomic_dir, write_json
from evotool.lens import NormedLens
from evotool.models.registry import decoder_parts
from evotool.prune.static import remove_layers
from evotool.stages import write_stages
from evotool.stages.behaviour import (
    Forced,
    Probe,
    apply_rules,
    boundaries,
    caption_metrics,
    critical_plateau,
    forced_agreement,
    in_distribution,
    measure,
    overturn_layers,
    phantom_positions,
    read_behaviour,
    resample_boundaries,
    save_behaviour,
    score,
    without_layers,
)
from evotool.trace import LayerCapture
from evals.world import caption_scores
from evotool.world import (
    WorldConfig,
    build_model,
    build_processor,
    caption_records,
    default_model_path,
    make_records,
    records_to_samples,
)
from evotool.world.config import TrainConfig, load_train_config
from evotool.zoo import ZooMember, load_members
from evotool.env import environment
from evotool.zoo.build import ZOO_FILE, build_checkpoint, checkpoint_current, refresh_truth, world_records
from evotool.zoo.config import SPLITS as ZOO_SPLITS, BehaviourConfig, BoundaryRules
from evotool.zoo.curves import export_curves, flips_after_js_drop, token_curves
from evotool.zoo.report import zoo_table

from tiny_zoo import tiny_member_config, train_tiny_member

# The tune / holdout split, fixed before any detector output was seen. Changing a member's split (or
# dropping a member) must be a deliberate act: this test fails until this table is changed with it.
SPLIT_MEMBERS: dict[str, tuple[str, ...]] = {
    "tune": ("shipped", "l6-llama-w128", "l10-llama-tied", "l8-llama-long", "l12-llama-w64", "l12-qwen2-prior",
        "l16-llama-w64", "l24-gemma-w64"),
    "holdout": ("l6-qwen2-w64", "l8-qwen2-w96", "l8-llama-short", "l12-gemma-w96", "l12-llama-weak",
        "l12-llama-w64-seed1", "l16-qwen2-w64", "l24-llama-w64"),
    # holdout2: written after detector v2 was frozen, committed before any analysis of them ran
    "holdout2": ("l6-llama-w96-prior", "l8-gemma-w64", "l10-qwen2-w96", "l12-llama-w96-seed2", "l14-llama-w64"),
    # holdout3: written after detector v3 was frozen, committed before any of them was trained
    "holdout3": ("l6-gemma-w96", "l8-qwen2-w64-prior", "l10-llama-w96", "l12-qwen2-w96", "l16-gemma-w64",
        "l20-llama-w64"),
    # holdout4: written after detector v4 was frozen (f88bd62), committed before any of them was trained
    "holdout4": ("l6-qwen2-w96", "l8-llama-w96-short", "l8-qwen2-w64", "l10-gemma-w64", "l12-llama-w128-prior",
        "l14-qwen2-w64", "l18-llama-w64", "l10-llama-w64-long"),
    # holdout5: written after holdout4 was read (detector v4 unchanged), committed before any of them was trained
    "holdout5": ("l6-llama-w64", "l8-gemma-w96", "l10-qwen2-w64-prior", "l12-qwen2-w64-short", "l12-gemma-w64",
        "l16-llama-w96", "l22-llama-w64", "l14-gemma-w64-long"),
    # holdout6: written after detector v5 was frozen, committed before any of them was trained
    "holdout6": ("l10-llama-w64", "l14-llama-w96", "l16-qwen2-w96", "l18-gemma-w64", "l20-qwen2-w64",
        "l12-llama-w64-prior", "l8-qwen2-w96-long", "l10-gemma-w96-short"),
    # holdout7: written after holdout6 was read (detector v5 unchanged), committed before any of them was trained
    "holdout7": ("l6-gemma-w64", "l8-llama-w128", "l10-qwen2-w128", "l12-gemma-w96-long", "l14-qwen2-w96-prior",
        "l16-llama-w64-short", "l18-qwen2-w64", "l22-gemma-w64"),
    # holdout8: written after the sixth session's threshold sweeps (detector v5 unchanged), committed before training
    "holdout8": ("l6-qwen2-w128", "l8-gemma-w128", "l10-llama-w128-prior", "l12-qwen2-w128-long", "l14-gemma-w96",
        "l16-qwen2-w64-long", "l20-gemma-w64", "l24-qwen2-w64-short"),
    # holdout9: written after holdout8 and the 144-caption truth study were read (detector v5 unchanged)
    "holdout9": ("l6-llama-w96", "l8-qwen2-w128", "l10-gemma-w128", "l12-llama-w96-long", "l14-qwen2-w128",
        "l16-gemma-w96-short", "l18-llama-w96", "l20-qwen2-w96-prior"),
    # holdout10: written after holdout9 was read, the ground truth measured on 144 captions (detector v5 unchanged)
    "holdout10": ("l6-gemma-w128", "l8-llama-w64-prior", "l10-qwen2-w96-long", "l12-gemma-w128",
        "l14-llama-w128-short", "l16-llama-w128", "l18-qwen2-w96", "l22-qwen2-w64"),
    # holdout11: written after holdout10 was read (detector v5 unchanged)
    "holdout11": ("l6-qwen2-w64-long", "l8-gemma-w96-long", "l10-llama-w96-prior", "l12-qwen2-w96-short",
        "l14-gemma-w128", "l16-qwen2-w128-short", "l18-gemma-w96", "l20-llama-w96"),
    # holdout12: written after holdout11 was read (detector v5 unchanged)
    "holdout12": ("l6-llama-w128-long", "l8-qwen2-w96-short", "l10-gemma-w96", "l12-llama-w128",
        "l14-qwen2-w96-long", "l16-gemma-w128", "l18-llama-w128", "l20-gemma-w96-prior"),
    # holdout13: written after holdout12 was built and before it was read
    "holdout13": ("l6-gemma-w96-short", "l8-llama-w128-prior", "l10-qwen2-w128-long", "l12-gemma-w96-prior",
        "l14-llama-w96-long", "l16-qwen2-w96-prior", "l18-gemma-w128-short", "l20-qwen2-w96"),
    # holdout14: written while holdout13 was being built, before it was read (detector v6)
    "holdout14": ("l6-qwen2-w96-prior", "l8-gemma-w128-short", "l10-llama-w128-long", "l12-qwen2-w128",
        "l14-gemma-w96-short", "l16-llama-w96-prior", "l18-qwen2-w128", "l20-llama-w96-short"),
    # holdout15: written after holdout14 was read (detector v6)
    "holdout15": ("l6-gemma-w128-long", "l8-qwen2-w128-prior", "l10-llama-w96-short", "l12-gemma-w128-prior",
        "l14-qwen2-w128-long", "l16-gemma-w96-long", "l18-llama-w96-prior", "l22-llama-w96"),
    # holdout16: written while holdout15 was being built, before it was read (detector v6)
    "holdout16": ("l6-llama-w128-prior", "l8-gemma-w96-prior", "l10-qwen2-w96-short", "l12-llama-w128-long",
        "l14-gemma-w128-prior", "l16-llama-w128-short", "l18-qwen2-w96-prior", "l20-gemma-w96-short"),
    # holdout17: written after holdout16 was read (detector v6)
    "holdout17": ("l6-qwen2-w128-short", "l8-llama-w96-long", "l10-gemma-w128-long", "l12-qwen2-w96-prior",
        "l14-llama-w128-prior", "l16-qwen2-w128", "l18-gemma-w96-long", "l20-llama-w128-short"),
    # holdout18: written after holdout17 was read, to test the v7 candidate beside v6
    "holdout18": ("l6-gemma-w96-prior", "l8-qwen2-w128-long", "l10-llama-w128-short", "l10-gemma-w96-prior",
        "l12-qwen2-w128-short", "l12-gemma-w128-long", "l14-llama-w96-prior", "l16-gemma-w128-prior",
        "l18-qwen2-w128-long", "l20-qwen2-w128-short"),
    # holdout19: written after holdout18 was read and detector v7 adopted
    "holdout19": ("l6-qwen2-w128-prior", "l6-llama-w96-long", "l8-gemma-w128-long", "l8-llama-w128-short",
        "l10-qwen2-w128-prior", "l10-llama-w96-long", "l12-llama-w96-prior", "l12-gemma-w96-short",
        "l14-qwen2-w128-prior", "l16-llama-w96-short"),
    # holdout20: written after holdout19 was read (detector v7)
    "holdout20": ("l6-gemma-w128-prior", "l6-qwen2-w96-long", "l8-llama-w96-prior", "l8-qwen2-w128-short",
        "l10-gemma-w96-long", "l10-llama-w128", "l12-qwen2-w128-prior", "l12-llama-w128-short",
        "l14-gemma-w96-prior", "l16-qwen2-w96-long"),
    # holdout21: written after holdout20 was read (detector v7; a candidate flag rule registered beside it)
    "holdout21": ("l6-llama-w128-short", "l6-gemma-w96-long", "l8-gemma-w128-prior", "l8-llama-w128-long",
        "l10-qwen2-w96-prior", "l10-gemma-w128-short", "l12-llama-w96-short", "l12-gemma-w128-short",
        "l14-qwen2-w96-short", "l16-llama-w128-prior"),
    # holdout22: written after holdout21 was read and the flags' rule adopted (detector v7; a flag check registered)
    "holdout22": ("l6-qwen2-w128-long", "l8-qwen2-w96-prior", "l8-gemma-w96-short", "l10-llama-w64-prior",
        "l10-qwen2-w128-short", "l14-llama-w96-short", "l14-gemma-w128-short", "l14-llama-w128-long",
        "l16-gemma-w96-prior", "l18-qwen2-w96-short"),
    # holdout23: written after holdout22 was read (detector v7 with the adopted flags, report-only)
    "holdout23": ("l6-llama-w96-short", "l6-qwen2-w96-short", "l8-llama-w64-long", "l8-gemma-w64-prior",
        "l10-gemma-w64-prior", "l12-qwen2-w64-long", "l14-qwen2-w128-short", "l14-gemma-w64-prior",
        "l16-qwen2-w128-long", "l18-llama-w128-short"),
    # holdout24: written after holdout23 was read and the hallucination reading of the mutation adopted (v7 report-only)
    "holdout24": ("l6-gemma-w64-prior", "l6-qwen2-w64-short", "l8-qwen2-w64-long", "l10-qwen2-w64-short",
        "l12-gemma-w64-short", "l12-llama-w64-long", "l14-llama-w64-short", "l16-gemma-w64-prior",
        "l18-qwen2-w128-short", "l20-llama-w96-prior"),
    # holdout25: written after holdout24 was read (v7 report-only, against the adopted truth)
    "holdout25": ("l6-qwen2-w64-prior", "l6-llama-w64-long", "l8-qwen2-w64-short", "l10-qwen2-w64-long",
        "l12-llama-w64-short", "l14-gemma-w64-short", "l14-llama-w64-prior", "l16-llama-w128-long",
        "l18-gemma-w64-short", "l22-gemma-w64-prior"),
    # holdout26: written after holdout25 was read (v7 report-only, against the adopted truth)
    "holdout26": ("l6-gemma-w64-short", "l6-llama-w64-short", "l8-gemma-w64-long", "l10-gemma-w128-prior",
        "l12-gemma-w64-prior", "l14-qwen2-w64-prior", "l14-llama-w64-long", "l16-gemma-w64-short",
        "l18-gemma-w96-prior", "l22-llama-w96-long"),
    # holdout27: written while holdout26 was built and unread, after v8 was registered (v7 and v8 report-only)
    "holdout27": ("l6-gemma-w128-short", "l6-gemma-w64-long", "l6-llama-w64-prior", "l8-llama-w64-short",
        "l8-gemma-w64-short", "l10-gemma-w64-long", "l10-gemma-w64-short", "l12-gemma-w64-long", "l14-qwen2-w64-long",
        "l16-llama-w64-long"),
    # holdout28: written after holdout27 was read, before the bypass check was chosen (v8 and the check report-only);
    # a drawn name already in the zoo is a second training draw and carries its torch seed
    "holdout28": ("l6-llama-w128-short-s239", "l6-gemma-w128-prior-s240", "l8-llama-w64-short-s241",
        "l8-gemma-w96-long-s242", "l10-llama-w64-short", "l10-qwen2-w64-short-s244", "l12-gemma-w64-short-s245",
        "l14-llama-w96-short-s246", "l16-llama-w64-long-s247", "l18-qwen2-w128-short-s248"),
    # holdout29: written after holdout28 was read (v8 report-only, the bypass check and v7 beside it)
    "holdout29": ("l6-gemma-w64-long-s249", "l6-gemma-w128-long-s250", "l8-llama-w128-long-s251",
        "l8-qwen2-w96-short-s252", "l10-llama-w64-long-s253", "l12-gemma-w64-long-s254"),
    # holdout30: written after holdout29 was read (v8 report-only, v7 and the check beside it; it decides v8 vs v7)
    "holdout30": ("l14-qwen2-w128-short-s255", "l14-gemma-w64-long-s256", "l6-qwen2-w96-prior-s257",
        "l8-llama-w96-short-s258", "l14-llama-w64-short-s259", "l8-gemma-w128-long-s260", "l16-qwen2-w128-short-s261",
        "l12-llama-w64-prior-s262"),
    # holdout31: written after holdout30 was read (v7 the default again, report-only; v8 and the check beside it)
    "holdout31": ("l6-qwen2-w64-long-s263", "l8-gemma-w64-short-s264", "l6-gemma-w64-prior-s265",
        "l8-llama-w128-short-s266", "l6-llama-w64-prior-s267", "l12-gemma-w96-short-s268"),
    # holdout32: written after holdout31 was read (v7 report-only; a revised bypass check judged on it)
    "holdout32": ("l6-llama-w64-long-s269", "l16-llama-w96-short-s270", "l16-llama-w64-long-s271",
        "l14-qwen2-w64-prior-s272", "l16-qwen2-w96-prior-s273", "l6-gemma-w64-prior-s274", "l6-qwen2-w128-short-s275",
        "l10-llama-w96-short-s276"),
    # holdout33: written after holdout32 was read (v7 report-only; check v1 and the v2 options beside it)
    "holdout33": ("l8-gemma-w64-long-s277", "l12-gemma-w128-prior-s278", "l8-gemma-w128-prior-s279",
        "l10-gemma-w128-long-s280", "l12-qwen2-w128-prior-s281", "l6-qwen2-w96-long-s282"),
    # holdout34: written after holdout33 was read and after the downstream study (v7 report-only; the tuned protocol)
    "holdout34": ("l6-gemma-w96-prior-s283", "l6-llama-w64-short-s284", "l8-qwen2-w96-short-s285",
        "l8-qwen2-w96-long-s286", "l10-llama-w128-prior-s287", "l10-llama-w64-long-s288"),
    # holdout35: six deep members written after holdout34 was read (v7 report-only; the tuned protocol)
    "holdout35": ("l20-gemma-w96-short-s289", "l20-qwen2-w96-long", "l22-gemma-w64-prior-s291", "l22-gemma-w96-prior",
        "l24-qwen2-w128-prior", "l24-llama-w96-short"),
    # holdout36: six more deep members written after holdout35 was read (v7 report-only; the tuned protocol)
    "holdout36": ("l20-qwen2-w64-short", "l20-gemma-w128-short", "l22-llama-w96-prior", "l22-gemma-w96-long",
        "l24-gemma-w96-prior", "l24-llama-w128-long"),
    # holdout37: six deeper members (28-32 layers) written after holdout36 was read (v7 report-only; the tuned protocol)
    "holdout37": ("l28-gemma-w64-prior", "l28-qwen2-w96-prior", "l30-llama-w96-prior", "l30-qwen2-w96-prior",
        "l32-qwen2-w96-short", "l32-llama-w64-long"),
    # holdout38: four more deeper members written after holdout37 was read (v7 report-only; the tuned protocol)
    "holdout38": ("l28-gemma-w96-long", "l28-gemma-w64-short", "l32-qwen2-w96-long", "l32-llama-w64-prior"),
    # holdout39: four more deeper members written after holdout38 was read (v7 report-only; a 432-caption truth)
    "holdout39": ("l28-llama-w96-long", "l30-llama-w64-short", "l30-qwen2-w64-prior", "l32-qwen2-w96-prior"),
}
SPLITS = {name: split for split, names in SPLIT_MEMBERS.items() for name in names}
FAMILIES = ("llama", "qwen2", "gemma")


# --- training config -------------------------------------------------------------------------------------

def test_train_demo_yaml_rebuilds_the_shipped_architecture():
    cfg = load_train_config()
    processor = build_processor(cfg.world)
    model = build_model(processor.tokenizer, cfg.world, cfg.model)
    shipped = json.loads((default_model_path() / "config.json").read_text())
    built = model.config.to_dict()
    for section in ("text_config", "vision_config"):
        for key, value in shipped[section].items():
            if key not in ("dtype", "transformers_version"):
                assert built[section][key] == value, (section, key)
    assert cfg.steps() == (150, 2400)


def test_training_and_zoo_configs_import_no_torch():
    """The CLI builds the zoo and train-demo flags from these at startup, so they must stay torch-free."""
    import subprocess
    import sys

    code = "import sys, evotool.world.config, evotool.zoo.config, evotool.cli.zoo, evotool.cli.train_demo; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_train_config_rejects_bad_values_with_the_key_and_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="max_steps"):
        load_train_config(None, ["max_steps=0"])
    with pytest.raises(ConfigError, match="decoder.nope"):
        load_train_config(None, ["decoder.nope=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("decoder:\n  mix: {caption: 0.5, existence: 0.5}\ndata:\n  existence: 0\n")
    with pytest.raises(ConfigError, match=re.escape(str(bad)) + ".*data.existence is 0"):
        load_train_config(bad)
    with pytest.raises(ConfigError, match="family"):
        load_train_config(None, ["model.family=mamba"])


def test_train_demo_cli_refuses_zero_steps_in_one_line(monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "train-demo", "--max-steps", "0", "--no-wandb")
    assert code == 2
    assert err.startswith("error: ") and "max_steps must be >= 1" in err and len(err.strip().splitlines()) == 1


def test_phantom_scale_changes_only_the_phantom_rate():
    base = make_records("caption", "train", 400, WorldConfig())
    same = make_records("caption", "train", 400, WorldConfig(phantom_scale=1.0))
    assert [r["answer"] for r in base] == [r["answer"] for r in same]
    counts = {}
    for scale in (0.0, 1.0, 4.0):
        records = make_records("caption", "train", 400, WorldConfig(phantom_scale=scale))
        counts[scale] = sum("square" in r["answer"] and "square" not in r["objects"] for r in records)
        eligible = sum("circle" in r["objects"] and "square" not in r["objects"] for r in records)
    assert counts[0.0] == 0 < counts[1.0] < counts[4.0] == eligible  # x4 makes every eligible caption a phantom


# --- decoder families ------------------------------------------------------------------------------------

def _family_model(family: str, seed: int = 0):
    """A random 3-layer world LLaVA of ``family`` (Gemma with tied embeddings)."""
    return tiny_world_llava(3, seed=seed, family=family, tie_embeddings=family == "gemma")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_saves_reloads_and_its_lens_matches_the_logits(family: str, tmp_path: Path):
    model, processor = _family_model(family)
    parts = decoder_parts(model)
    assert parts.num_layers == 3
    assert type(parts.norm).__name__ == {"llama": "LlamaRMSNorm", "qwen2": "Qwen2RMSNorm", "gemma": "GemmaRMSNorm"}[family]
    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == (family == "gemma")

    recs = make_records("caption", "test", 2)
    inputs = build_inputs(processor, [r["image"] for r in recs], [r["prompt"] for r in recs])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logits = model(**inputs).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), inputs["input_ids"][:, 1:].flatten())
    loss.backward()
    opt.step()
    model.eval()

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(reloaded.model.language_model).__name__ == type(parts.decoder).__name__
    with torch.no_grad():
        ref = model(**inputs).logits
        again = reloaded(**inputs).logits
        rparts = decoder_parts(reloaded)
        with LayerCapture(rparts) as cap:
            reloaded(**inputs)
        lens_last = NormedLens(rparts).logits(cap.stacked())[-1]  # [B, V] at the last position
    torch.testing.assert_close(again, ref)
    torch.testing.assert_close(lens_last, again[:, -1], rtol=1e-4, atol=1e-4)


def test_gemma_scales_embeddings_and_uses_one_plus_w_norm():
    model, processor = _family_model("gemma")
    parts = decoder_parts(model)
    with torch.no_grad():
        parts.norm.weight.fill_(0.5)
        x = torch.randn(2, 32)
        expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + parts.norm.eps) * 1.5
        torch.testing.assert_close(parts.norm(x), expected)
        ids = torch.tensor([[5, 6, 7]])
        with LayerCapture(parts) as cap:
            parts.decoder(input_ids=ids)
        layer0 = cap.stacked()[0, 0]
        torch.testing.assert_close(layer0, model.get_input_embeddings().weight[7] * 32**0.5)  # raw row, scaled


# --- zoo configs ---------------------------------------------------------------------------------------

def test_every_zoo_config_loads_with_its_fixed_split():
    members = load_members()
    assert len(SPLITS) == sum(map(len, SPLIT_MEMBERS.values()))  # no member listed twice
    assert {n: m.split for n, m in members.items()} == SPLITS
    assert set(SPLITS.values()) == set(ZOO_SPLITS)
    for later in ZOO_SPLITS[2:]:  # holdout2 on: new seeds, not re-runs of members seen before them
        earlier = [m for m in members.values() if ZOO_SPLITS.index(m.split) < ZOO_SPLITS.index(later)]
        for m in (m for m in members.values() if m.split == later):
            assert m.seed not in {e.seed for e in earlier} and m.world.seed not in {e.world.seed for e in earlier}
            assert m.description
    for half in ("tune", "holdout"):
        chosen = [m for m in members.values() if m.split == half]
        assert {6, 8, 12, 16, 24} <= {m.model.layers for m in chosen}, half
        assert set(FAMILIES) <= {m.model.family for m in chosen}, half
        assert all(m.description for m in chosen)
    depths = {m.model.layers for m in members.values()}
    assert {6, 8, 12, 16, 24} <= depths
    steps = sorted(m.decoder.steps for m in members.values())
    assert steps[0] <= 300 and steps[-1] >= 1600  # under- and long-trained members
    assert len({m.config_hash() for m in members.values()}) == len(members)
    assert members["shipped"].train_config() == load_train_config()  # the shipped member is train_demo.yaml


def test_zoo_member_hash_ignores_threads_but_not_training():
    member = tiny_member_config()
    assert member.config_hash() == from_dict(ZooMember, {**to_dict(member), "threads": 2}).config_hash()
    assert member.config_hash() != tiny_member_config(seed=1).config_hash()
    assert isinstance(member.train_config(), TrainConfig) and not isinstance(member.train_config(), ZooMember)
    with pytest.raises(ConfigError, match="split"):
        from_dict(ZooMember, {k: v for k, v in to_dict(member).items() if k != "split"})


def test_atomic_dir_keeps_the_old_folder_on_failure(tmp_path: Path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["b.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        with atomic_dir(tmp_path / "file"):
            pass


def test_pretrained_member_is_copied_once_and_recopied_when_its_config_changes(tmp_path: Path):
    source = tmp_path / "source"
    _family_model("llama")[0].save_pretrained(source)
    member = from_dict(ZooMember, {**to_dict(tiny_member_config()), "pretrained": str(source)})
    target = tmp_path / "zoo" / "m" / "model"
    assert build_checkpoint("m", member, target, wandb=False)
    assert checkpoint_current(member, target)
    info = json.loads((target / ZOO_FILE).read_text())
    assert info["split"] == "tune"
    assert info["environment"]["cpu"] == environment()["cpu"]  # weights reproduce bitwise only on the same CPU kind
    assert not build_checkpoint("m", member, target, wandb=False)  # cached
    changed = from_dict(ZooMember, {**to_dict(member), "seed": 5})
    assert not checkpoint_current(changed, target)


def test_world_records_hold_both_groups_and_every_pope_kind():
    records = world_records(WorldConfig(seed=9), 3, 2, 2)
    kinds = [(r["task"], r["split"]) for r in records]
    assert kinds.count(("caption", "test")) == 3 and kinds.count(("caption", "prior_breaking")) == 2
    for task in ("pope_random", "pope_popular", "pope_adversarial"):
        assert kinds.count((task, "test")) == 2 and kinds.count((task, "prior_breaking")) == 2
    assert all("circle" in r["objects"] and "square" not in r["objects"]
               for r in records if r["task"] == "caption" and r["split"] == "prior_breaking")


@pytest.mark.slow
def test_zoo_build_trains_writes_manifests_and_caches(tmp_path: Path, monkeypatch, capsys):
    configs = tmp_path / "configs"
    configs.mkdir()

    (configs / "tiny.yaml").write_text(yaml.safe_dump(to_dict(tiny_member_config(steps=10))))
    out = tmp_path / "zoo"
    args = ["zoo", "build", "--out", str(out), "--configs", str(configs), "--steps", "train,manifests", "--no-wandb",
            "--set", "manifest.captions=2", "--set", "manifest.pope=1", "--set", "manifest.analysis_samples=4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    member = out / "tiny"
    model = AutoModelForImageTextToText.from_pretrained(member / "model")
    assert model.config.text_config.num_hidden_layers == 4
    assert json.loads((member / "model" / ZOO_FILE).read_text())["config_hash"] == tiny_member_config(steps=10).config_hash()
    lines = {sub: [json.loads(x) for x in (member / sub / "manifest.jsonl").read_text().splitlines()]
             for sub in ("val", "test", "samples_a", "samples_b")}
    assert len(lines["val"]) == len(lines["test"]) == 2 * 2 + 2 * 3 * 1
    assert len(lines["samples_a"]) == len(lines["samples_b"]) == 4
    assert not {r["id"] for r in lines["val"]} & {r["id"] for r in lines["test"]}
    assert not {r["id"] for r in lines["samples_a"]} & {r["id"] for r in lines["samples_b"]}
    stamp = (member / "model" / "model.safetensors").stat().st_mtime_ns
    assert CliRunner().invoke(app, args).exit_code == 0
    assert (member / "model" / "model.safetensors").stat().st_mtime_ns == stamp  # cached, not retrained
    manifest = member / "val" / "manifest.jsonl"
    written = manifest.stat().st_mtime_ns
    assert CliRunner().invoke(app, args).exit_code == 0 and manifest.stat().st_mtime_ns == written  # same settings: kept
    assert CliRunner().invoke(app, [*args[:-6], "--set", "manifest.captions=3", *args[-4:]]).exit_code == 0
    assert len(manifest.read_text().splitlines()) == 2 * 3 + 2 * 3 * 1  # other settings: written again
    (member / "samples_a" / "zoo_manifest.json").unlink()  # settings not recorded (a zoo built before the stamp)
    samples = member / "samples_a" / "manifest.jsonl"
    before = samples.read_text()
    assert CliRunner().invoke(app, [*args[:-6], "--set", "manifest.captions=3", *args[-4:]]).exit_code == 0
    assert samples.read_text() == before and (member / "samples_a" / "zoo_manifest.json").is_file()  # rewritten alike
    assert "zoo build" in (out / "build.log").read_text()
    code, _, err = run_cli(monkeypatch, capsys, "zoo", "build", "--out", str(out), "--configs", str(configs), "--members", "nope")
    assert code == 2 and "unknown zoo member 'nope'" in err


@pytest.mark.slow
def test_zoo_build_workers_read_the_resolved_config(tmp_path: Path, monkeypatch, capsys):
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in ("a", "b", "c"):
        (configs / f"{name}.yaml").write_text(yaml.safe_dump(to_dict(tiny_member_config())))
    out = tmp_path / "zoo"
    code, stdout, _ = run_cli(monkeypatch, capsys, "zoo", "build", "--out", str(out), "--configs", str(configs),
                              "--members", "a", "--members", "b", "--steps", "manifests", "--jobs", "2", "--no-wandb",
                              "--set", "manifest.captions=3", "--set", "manifest.pope=1",
                              "--set", "manifest.analysis_samples=2")
    assert code == 0 and "zoo in" in stdout
    built = stdout.strip().splitlines()[-1].split(": ", 1)[1]  # "zoo in OUT: a, b"
    assert sorted(built.split(", ")) == ["a", "b"] and not (out / "c").exists()  # --members repeated
    resolved = yaml.safe_load((out / "zoo_build.yaml").read_text())
    assert resolved["manifest"]["captions"] == 3 and resolved["jobs"] == 2 and resolved["wandb"] is False
    for name in ("a", "b"):  # each worker built its member with the parent's --set values
        assert len((out / name / "val" / "manifest.jsonl").read_text().splitlines()) == 2 * 3 + 2 * 3 * 1
        assert len((out / name / "samples_a" / "manifest.jsonl").read_text().splitlines()) == 2
    assert (out / "build.log").read_text().count("started (pid") == 2


def test_zoo_build_and_train_demo_flags_take_their_help_from_the_configs():
    import typer

    from evotool.config import config_keys, field_help
    from evotool.world.config import TrainConfig as Train
    from evotool.zoo.config import ZooConfig

    commands = typer.main.get_command(app).commands
    for command, cls in ((commands["zoo"].commands["build"], ZooConfig), (commands["train-demo"], Train)):
        helps = {field_help(cls, key) for key in config_keys(cls)}
        flags = [p for p in command.params if p.name not in ("help", "config", "set_", "no_wandb", "out")
                 or (cls is ZooConfig and p.name == "out")]
        assert flags and all(p.help in helps for p in flags), [(p.name, p.help) for p in flags]


# --- behavioural ground truth ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_world_model():
    """A 3-layer random world LLaVA (llama family)."""
    return _family_model("llama", seed=3)


def _static_ids(model, processor, probe, layers, cfg):
    pruned = copy.deepcopy(model)
    remove_layers(pruned, layers)
    return generate_ids(pruned, probe.caption_inputs, cfg.max_new_tokens)


def test_exit_and_bypass_curves_match_independent_computations(tiny_world_model):
    model, processor = tiny_world_model
    cfg = BehaviourConfig(captions=4, pope=2, max_new_tokens=6)
    probe = Probe.build(model, processor, WorldConfig(seed=4), cfg)
    full, gen = score(model, processor, probe, None, cfg)
    ref = gen.ids
    payload = measure(model, processor, WorldConfig(seed=4), cfg)
    n = payload["num_layers"]
    last = payload["exit_curve"][-1]
    assert last["layer"] == n and last["agreement"] == 1.0 and last["exact"] == 1.0
    assert {k: last[k] for k in full} == full == payload["full"]
    # exit after e == the model statically cut to its first e layers
    for e in (1, 2):
        cut = _static_ids(model, processor, probe, range(e + 1, n + 1), cfg)
        expected = sum(a == b for r, c in zip(ref, cut) for a, b in zip(r, c)) / sum(len(r) for r in ref)
        assert payload["exit_curve"][e - 1]["agreement"] == pytest.approx(expected)
    # bypass of layer l (runtime skipping) == the statically pruned model
    for layer in (2, 3):
        with without_layers(model, [layer]) as variant:
            runtime = generate_ids(variant, probe.caption_inputs, cfg.max_new_tokens)
        assert runtime == _static_ids(model, processor, probe, [layer], cfg)
    # the oracle at k=1 (rerank covers every subset) is the best single removal by free-running agreement
    singles = [b["agreement"] for b in payload["bypass_curve"]]
    assert payload["oracle"][0]["best"]["agreement"] == pytest.approx(max(singles))
    assert payload["oracle"][0]["method"] == "exhaustive"
    assert len(payload["oracle"]) == 1  # ceil(3 * 0.25)
    counts = payload["overturns"]["all"]
    assert sum(counts["decision_depth"]) == counts["tokens"] == sum(len(r) for r in ref)


def test_write_behaviour_reuses_stored_curves_and_reapplies_the_rules(tmp_path: Path, monkeypatch):
    import evotool.stages.behaviour as behaviour

    model_dir = tmp_path / "m"
    tiny_world_llava(3, save_to=model_dir, seed=5)
    cfg = BehaviourConfig(captions=4, pope=2, max_new_tokens=4)
    path = behaviour.write_behaviour(model_dir, tmp_path / "behaviour.json", WorldConfig(seed=4), cfg, progress=None)
    stored = json.loads(path.read_text())
    assert stored["schema_version"] == "1.2" and stored["kind"] == "evotool.behaviour"
    assert stored["boundaries"] == boundaries(stored) and stored["rules"] == to_dict(BoundaryRules())
    assert stored["resampled"] == resample_boundaries(stored) and stored["resampled"]["resamples"] == 200
    assert [len(stored["generations"][k]) for k in ("exit", "bypass")] == [3, 3]
    assert stored["generations"]["full"]["texts"] == stored["texts"]
    # a file written before schema 1.1, under other rules and without generations (before 1.2): its curves are
    # reused, its boundaries re-derived, the generations behind its curves added (checked to reproduce them)
    stored.update(schema_version=1, boundaries={"critical_layer": 99}, rules={"mutation_ratio": 2.0})
    generations = stored.pop("generations")
    del stored["resampled"]
    path.write_text(json.dumps(stored))

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(behaviour, "measure", no_measuring)
    loose = BoundaryRules(recall_tolerance=1.0, chair_tolerance=1.0)
    behaviour.write_behaviour(model_dir, path, WorldConfig(seed=4), BehaviourConfig(captions=4, pope=2, max_new_tokens=4,
                                                                                   rules=loose), progress=None)
    again = json.loads(path.read_text())
    assert again["schema_version"] == "1.2" and again["exit_curve"] == stored["exit_curve"]
    assert again["boundaries"]["critical_layer"] == 1 and again["rules"] == to_dict(loose)  # every exit is within 1.0
    assert again["generations"] == generations and again["resampled"]["critical"] == {"1": 200}
    # stored curves that the model does not reproduce are measured again
    again.pop("generations")
    again["bypass_curve"][0]["agreement"] = 0.123
    path.write_text(json.dumps(again))
    with pytest.raises(AssertionError, match="measured again"):
        behaviour.write_behaviour(model_dir, path, WorldConfig(seed=4), cfg, progress=None)
    with pytest.raises(AssertionError, match="measured again"):  # other measurement settings: measured again
        behaviour.write_behaviour(model_dir, path, WorldConfig(seed=4), BehaviourConfig(captions=6, pope=2), progress=None)


def test_forced_agreement_of_the_full_model_on_its_own_generation_is_one(tiny_world_model):
    model, processor = tiny_world_model
    cfg = BehaviourConfig(captions=4, pope=0, max_new_tokens=6)
    probe = Probe.build(model, processor, WorldConfig(seed=4), cfg)
    _, gen = score(model, processor, probe, None, cfg)
    forced = Forced.build(probe.caption_inputs, gen.ids, processor.tokenizer.pad_token_id)
    assert forced_agreement(model, forced) == pytest.approx(1.0)
    pad, image = processor.tokenizer.pad_token_id, model.config.image_token_id
    odd = Forced.build(probe.caption_inputs, [[5, image]] * 4, pad, image)  # a generated image placeholder is fed as pad
    assert odd.targets[0].tolist() == [5, image] and odd.inputs["input_ids"][0, -2:].tolist() == [5, pad]
    assert 0.0 <= forced_agreement(model, odd) <= 1.0
    with without_layers(model, [1, 2]) as variant:
        pruned = forced_agreement(variant, forced)
    assert 0.0 <= pruned < 1.0


def test_overturns_count_a_switch_after_a_stable_alternative():
    # layers 0..5; emitted token 7
    top1 = np.array([
        [1, 3, 3, 7, 7, 7],  # 3 held at layers 1-2, 7 takes over at 3: overturn at 3
        [1, 2, 7, 7, 7, 7],  # 1 -> 2 -> 7: no stable alternative before layer 2
        [7, 7, 4, 4, 7, 7],  # 4 held at 2-3, back to 7 at 4: overturn at 4
    ])
    turns = overturn_layers(top1, np.array([7, 7, 7]))
    assert turns.nonzero()[0].tolist() == [0, 2] and turns.nonzero()[1].tolist() == [3, 4]


def test_phantom_positions_find_the_absent_object_and_its_separator():
    processor = build_processor()
    tok = processor.tokenizer
    sample = Sample(id="s", image=Path("unused.png"), objects=["circle"])
    ids = [tok.convert_tokens_to_ids(w) for w in "a red circle , a blue square .".split()]
    objects, separators = phantom_positions(processor, [sample, sample], [ids[:4], ids])
    assert objects == [4 + 6] and separators == [4 + 3]


def _curve(values, key):
    return [{"layer": i + 1, key: v} for i, v in enumerate(values)]


def _curves_payload() -> dict:
    """Hand-made curves of a 6-layer model: critical 3, mutation 5, layers [3, 4] removable."""
    exits = [{"layer": i + 1, "recall": r, "chair_i_in": c} for i, (r, c) in
             enumerate(zip([0.1, 0.5, 0.97, 1.0, 1.0, 1.0], [0.9, 0.4, 0.02, 0.0, 0.0, 0.0]))]
    oracle = [{"k": 1, "best": {"layers": [4], "agreement": 0.98, "recall": 1.0}},
              {"k": 2, "best": {"layers": [3, 4], "agreement": 0.92, "recall": 0.99}}]
    bypass = [{**entry, "recall": 1.0, "chair_i": 0.1} for entry in _curve([0.5, 0.9, 0.95, 0.98, 0.6, 0.97], "agreement")]
    return {"num_layers": 6, "full": {"recall": 1.0, "chair_i": 0.1, "chair_i_in": 0.0}, "exit_curve": exits,
            "bypass_curve": bypass, "oracle": oracle}


def test_boundaries_follow_the_documented_definitions():
    curve = _curve
    payload = _curves_payload()
    b = boundaries(payload)
    assert b["critical_layer"] == 3  # first exit within 0.05 recall of the best and 0.05 CHAIR_i of the full model
    # post-critical changes 0.02, 0.4, 0.03: median 0.03, only layer 5 is >= 0.1 and >= 3x the median
    assert b["mutation_layers"] == [5] and b["mutation_layer"] == 5
    assert b["removable_at_least_2"]
    rewrite = BoundaryRules(mutation_chair_cut=None)  # the rewrite rule alone (these curves hold no CHAIR_i)
    payload["bypass_curve"] = curve([0.5, 0.9, 0.95, 0.7, 0.99, 0.75, 0.99, 0.98], "agreement")
    payload["num_layers"] = 8
    # changes after layer 3: 0.3, 0.01, 0.25, 0.01, 0.02 (median 0.02): two mutation layers, 4 first
    assert boundaries(payload, rewrite)["mutation_layers"] == [4, 6]
    payload["bypass_curve"] = curve([0.5, 0.9, 0.95, 0.85, 0.88, 0.86], "agreement")
    assert boundaries(payload, rewrite)["mutation_layer"] is None  # 0.15, 0.12, 0.14: nothing stands out
    payload["oracle"][1]["best"]["recall"] = 0.97
    assert not boundaries(payload, rewrite)["removable_at_least_2"]  # recall loss 0.03 > 0.02


def test_critical_plateau_spans_the_layers_a_tolerance_step_moves_the_critical_layer_over():
    payload = _curves_payload()
    assert critical_plateau(payload) == (3, 3)  # a step: exit recall 0.5 -> 0.97 at layer 3
    # a plateau at 0.935-0.955 under a best of 1.0: the rule's line (0.95) runs through it
    for entry, recall in zip(payload["exit_curve"], [0.2, 0.935, 0.945, 0.955, 0.99, 1.0]):
        entry.update(recall=recall, chair_i_in=0.0)
    assert boundaries(payload)["critical_layer"] == 4
    assert critical_plateau(payload) == (3, 5) and critical_plateau(payload, spread=0.0) == (4, 4)
    assert critical_plateau(payload, BoundaryRules(recall_tolerance=0.005)) == (5, 6)  # 0.005 - 0.01 clamps at 0


def test_hallucination_reading_adds_layers_whose_bypass_cuts_chair_i():
    payload = _curves_payload()  # critical 3; post-critical changes 0.02, 0.4, 0.03: layer 5 by the rewrite share
    payload["full"].update(chair_i=0.12)
    for entry, (chair, recall) in zip(payload["bypass_curve"], [(0.2, 0.5), (0.2, 0.9), (0.2, 0.9), (0.08, 1.0),
                                                                  (0.05, 1.0), (0.085, 0.97)]):
        entry.update(chair_i=chair, recall=recall)
    off = boundaries(payload, BoundaryRules(mutation_chair_cut=None))
    assert off["mutation_layers"] == [5] and "bypass_chair_cut_after_critical" not in off
    # layer 4 cuts CHAIR_i by 0.04 >= max(0.03, 0.25 x 0.12) at full recall; layer 6 by 0.035 but loses 0.03 recall
    on = boundaries(payload)
    assert BoundaryRules().mutation_chair_cut == 0.03  # the default since holdout23 (docs/stages.md)
    assert on["mutation_layers"] == [4, 5] and on["mutation_layer"] == 4
    assert on["bypass_chair_cut_after_critical"] == pytest.approx({"4": 0.04, "5": 0.07, "6": 0.035})
    assert boundaries(payload, BoundaryRules(mutation_chair_cut=0.03, mutation_chair_share=0.5))["mutation_layers"] == [5]
    assert boundaries(payload, BoundaryRules(mutation_chair_cut=0.03, removable_recall=0.05))["mutation_layers"] == [4, 5, 6]
    for bad in ({"mutation_chair_cut": 0.0}, {"mutation_chair_cut": 1.5}, {"mutation_chair_share": 1.0}):
        with pytest.raises(ConfigError, match="mutation_chair"):
            BoundaryRules(**bad)


def test_hallucination_reading_on_measured_truth_curves():
    """Curves measured on two zoo members (tests/data/zoo/truth_curves.json, 144 captions): a layer whose bypass cuts
    CHAIR_i at kept recall while rewriting under 10% (holdout22), and a last layer the 3x-median rule cannot call a
    mutation with three post-critical layers (holdout23)."""
    curves = json.loads((Path(__file__).parent / "data" / "zoo" / "truth_curves.json").read_text())
    rewrite = BoundaryRules(mutation_chair_cut=None)
    for member, layer, critical in (("l14-llama-w96-short", 13, 5), ("l6-qwen2-w96-short", 6, 3)):
        payload = curves[member]
        full = payload["full"]
        bypass = payload["bypass_curve"][layer - 1]
        read = boundaries(payload)
        assert boundaries(payload, rewrite)["mutation_layers"] == [] and read["critical_layer"] == critical
        assert full["chair_i"] - bypass["chair_i"] >= max(0.03, full["chair_i"] / 4)
        assert bypass["recall"] >= full["recall"] - 0.02
        assert read["mutation_layers"] == [layer]


def test_a_truth_without_chair_i_is_one_clear_error_under_the_hallucination_reading(tmp_path: Path):
    payload = _curves_payload()
    del payload["bypass_curve"][4]["chair_i"]
    path = save_behaviour(tmp_path / "behaviour.json", payload)
    with pytest.raises(InputError, match="without CHAIR_i / recall in its bypass curve.*mutation_chair_cut=null"):
        read_behaviour(path)
    assert read_behaviour(path, BoundaryRules(mutation_chair_cut=None))["boundaries"]["mutation_layers"] == [5]


def test_stored_rules_missing_a_later_field_are_not_stale_and_other_rules_drop_the_resamples():
    payload = _resample_payload([0, 2])
    rewrite = BoundaryRules(mutation_chair_cut=None)
    apply_rules(payload, rewrite, resample=True)
    resampled = payload["resampled"]
    del payload["rules"]["mutation_chair_cut"]  # a file written before the field existed: under the rewrite rule alone
    assert not apply_rules(payload, rewrite) and payload["resampled"] == resampled
    # rules that read the curves differently (the default reading, then another tolerance): the stored resamples no
    # longer describe them
    assert apply_rules(payload) and "resampled" not in payload
    apply_rules(payload, resample=True)
    assert payload["resampled"] and apply_rules(payload, BoundaryRules(recall_tolerance=1.0)) and "resampled" not in payload


def test_caption_metrics_split_the_groups_like_caption_scores():
    world = WorldConfig(seed=4)
    captions = records_to_samples(caption_records(world, 6))
    texts = ["a red circle", "a blue square , a green circle", "a circle", "a square", "a triangle", "a"]
    ids = [[1, 2, 3], [1, 2], [4], [1, 2, 3, 4], [1], [2]]
    dist = in_distribution(6)
    assert dist == [True] * 3 + [False] * 3 and [c.id.startswith("test") for c in captions] == dist
    got = caption_metrics(texts, ids, captions, dist, reference=[[1, 2, 3]] * 6)
    ind = caption_scores(texts[:3], captions[:3], [3, 2, 1])
    pb = caption_scores(texts[3:], captions[3:], [4, 1, 1])
    assert got["chair_i_in"] == ind["chair_i"] and got["chair_i_pb"] == pb["chair_i"] and got["recall_pb"] == pb["recall"]
    assert got["recall"] == caption_scores(texts, captions, [len(i) for i in ids])["recall"]
    assert got["agreement"] == pytest.approx(9 / 18)  # matched positions over the reference's tokens


def _resample_payload(correct_early: list[int]) -> dict:
    """A 3-layer model on 4 captions whose exits 1-2 name nothing (exit 1: except on the captions in
    ``correct_early``, where it names every object) and exit 3 names every object; bypassing a layer changes nothing."""
    world = WorldConfig(seed=4)
    captions = records_to_samples(caption_records(world, 4))
    truth = [" , ".join(f"a {o}" for o in c.objects) for c in captions]
    ids = [[i + 1] * 3 for i in range(4)]
    gen = {"ids": ids, "texts": truth}
    early = {"ids": ids, "texts": [t if i in correct_early else "a" for i, t in enumerate(truth)]}
    generations = {"full": gen, "exit": [early, {"ids": ids, "texts": ["a"] * 4}, gen], "bypass": [gen] * 3}
    dist = in_distribution(4)

    def metrics(g, reference=None):
        return caption_metrics(g["texts"], g["ids"], captions, dist, reference)

    return {"num_layers": 3, "settings": {"world": to_dict(world)}, "record_ids": [c.id for c in captions],
            "generations": generations, "full": metrics(gen), "oracle": [],
            "exit_curve": [{"layer": i + 1, **metrics(g, ids)} for i, g in enumerate(generations["exit"])],
            "bypass_curve": [{"layer": i + 1, **metrics(g, ids)} for i, g in enumerate(generations["bypass"])]}


def test_resampled_boundaries_say_how_firmly_the_captions_place_them():
    firm = _resample_payload([])
    assert boundaries(firm)["critical_layer"] == 3
    assert resample_boundaries(firm, resamples=50) == {
        "resamples": 50, "seed": 0, "critical": {"3": 50}, "mutation": {"none": 50},
        "critical_reproduced": 1.0, "mutation_reproduced": 1.0}
    # exit 1 right on one caption per group: a resample holding only those two (1/4 x 1/4 of them) has its best
    # recall at exit 1, two layers from 3
    loose = _resample_payload([0, 2])
    assert boundaries(loose)["critical_layer"] == 3
    out = resample_boundaries(loose, resamples=400, seed=1)
    assert set(out["critical"]) == {"1", "3"} and sum(out["critical"].values()) == 400
    assert out["critical_reproduced"] == out["critical"]["3"] / 400 == pytest.approx(15 / 16, abs=0.04)
    assert resample_boundaries({**loose, "generations": None}) is None
    with pytest.raises(InputError, match="probe captions"):
        resample_boundaries({**loose, "record_ids": ["x"] * 4})


@pytest.mark.slow
def test_a_tiny_member_trains_in_seconds_and_loads(tmp_path: Path):
    """It trains with its config's one thread and gives the caller's thread count back (a zoo build's later steps)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = train_tiny_member(tmp_path / "m", layers=4, steps=10)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert decoder_parts(model).num_layers == 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert "caption" in metrics["held_out"]["prior_breaking"]
    assert metrics["environment"]["threads"] == tiny_member_config().threads == 1


# --- compact curves and the member table -------------------------------------------------------------------

def _store_with_traces(root: Path) -> None:
    from evotool.analysis.store import RunStore
    from evotool.trace import METRICS, SampleTrace

    store = RunStore(root)
    store.open({"model": "m"})
    js = np.array([[np.nan, 1.0, 0.05, 0.02, 0.01], [np.nan, 0.5, 0.4, 0.01, 0.3]])
    top1 = np.array([[3, 4, 5, 6, 6], [3, 9, 9, 9, 8]])
    for i in range(2):
        layers = {k: np.zeros((1, 5)) for k in METRICS}
        layers.update(js_prev=js[i : i + 1], top1=top1[i : i + 1], p_token=np.full((1, 5), 0.5),
                      cos_prev=np.full((1, 5), 0.9))
        trace = SampleTrace(token_ids=np.array([6 if i == 0 else 8]), layers=layers,
                            topk_ids=np.zeros((1, 5, 1), dtype=int), topk_p=np.zeros((1, 5, 1)))
        store.save(f"s{i}", trace, {"id": f"s{i}", "index": i})
    write_stages(root / "stages.json", stage_file(4, 2, [4]).payload)


def test_token_curves_flips_after_js_drop_and_export(tmp_path: Path):
    _store_with_traces(tmp_path / "run")
    curves = token_curves(tmp_path / "run")
    assert curves["top1_flip"].tolist() == [[False, True, True, True, False], [False, True, False, False, True]]
    assert curves["decision_depth"].tolist() == [3, 4]
    assert curves["sample"].tolist() == [0, 1]
    # token 0: JS first <= 10% of its peak (1.0) at layer 2, top-1 still changes at layer 3;
    # token 1: first quiet layer 3 (0.01 <= 0.05), top-1 changes again at layer 4
    assert flips_after_js_drop(curves, until=1.0) == 1.0
    assert flips_after_js_drop(curves, until=0.75) == 0.5  # only layers <= 3 count: token 0
    assert flips_after_js_drop(curves, until=1.0, fraction=0.001) == 0.0  # never quiet: nothing after it
    out = export_curves(tmp_path / "run", tmp_path / "m.npz", "m", max_tokens=1)
    with np.load(out) as z:
        meta = json.loads(str(z["meta"]))
        assert meta["member"] == "m" and meta["tokens"] == 1 and meta["num_layers"] == 4
        assert z["js_prev"].dtype == np.float16 and z["js_prev"].shape == (1, 5)
        assert "objects" not in z.files  # the run's stage file names no object vocabulary


def test_zoo_table_reads_metrics_behaviour_and_both_analyses(tmp_path: Path, monkeypatch, capsys):
    members = {"later": tiny_member_config(layers=2, split="holdout2"), "m": tiny_member_config()}
    root = tmp_path / "m"
    caption = {"recall": 0.9, "chair_i": 0.1}
    write_json(root / "model" / "metrics.json", {"train_seconds": 120, "held_out": {
        "in_distribution": {"caption": caption, "pope_random": {"accuracy": 0.6}},
        "prior_breaking": {"caption": {"recall": 0.8, "chair_i": 0.3}, "pope_random": {"accuracy": 0.8}}}}, schema="1.0")
    # boundaries stored under an earlier, looser mutation rule: every post-critical change >= 0.01 was a mutation
    payload = _curves_payload()
    old_rules = BoundaryRules(mutation_min_change=0.01, mutation_ratio=0.5)
    payload.update(rules=to_dict(old_rules), boundaries=boundaries(payload, old_rules))
    assert payload["boundaries"]["mutation_layers"] == [4, 5, 6]
    payload["resampled"] = {"critical_reproduced": 0.5, "mutation_reproduced": 0.95}  # a loose critical layer
    payload["settings"] = {"behaviour": BehaviourConfig().measurement(), "world": {}}  # measured as `zoo build` would
    save_behaviour(root / "behaviour.json", payload)
    write_stages(root / "analysis_a" / "stages.json", stage_file(6, 1, [4]).payload)
    table = zoo_table(members, tmp_path)
    row = table.splitlines()[2].split(" | ")
    assert row[:4] == ["| m", "tune", "llama", "4"]
    assert "2.0" in row and "0.900" in row and "0.300" in row and "0.700" in row  # minutes, recall, CHAIR pb, POPE
    assert "3*" in row and "[5]" in row and "yes" in row  # re-derived under the current rules, marked stale
    assert row[11] == "3*" and row[14] == "3"  # the critical layer at tolerances 0.04 and 0.06: a step, one layer
    assert "[4] (0.98) / [3, 4] (0.92)" in table and "1 / [4]" in table and "--refresh" in table
    assert row[-2:] == ["-", "critical MISS, mutation ok, stabilization ok |"]  # analysis_b missing; 1 vs 3; [4] vs [5]
    # the stored resamples were drawn under the earlier rule: not shown beside boundaries re-derived under another
    assert "0.50 / 0.95" not in row and "†" not in table and "itself is loose" not in table
    save_behaviour(root / "behaviour.json", {**payload, "rules": to_dict(BoundaryRules()), "boundaries": boundaries(payload)})
    current = zoo_table(members, tmp_path)
    assert "0.50 / 0.95" in current.splitlines()[2].split(" | ") and "*" not in current
    assert ("Detector vs behaviour on the tune members: critical 0/1, mutation 1/1, stabilization 1/1, a/b 0/0. Ground "
            "truth measured on 144 captions. Misses where the behaviour itself is loose (reproduced by < 80% of caption "
            "resamples): critical 1, mutation 0.") in current
    save_behaviour(root / "behaviour.json", payload)
    # the truth counts as measured otherwise once the current settings ask for other captions (zoo status --set ...)
    table = zoo_table(members, tmp_path, BehaviourConfig(captions=48))
    assert "| 3*† |" in table and "measured on 144 captions" in table and "† ground truth measured under other " \
        "settings than the current ones (48 captions, 24 POPE questions, ...); `evotool zoo build --steps truth`" in table
    # splits in the order they were made, not by depth; one score line per split present, none for absent ones
    assert table.splitlines()[3].startswith("| later | holdout2 |") and "on the holdout members" not in table
    assert "Detector vs behaviour on the holdout2 members: critical 0/0, mutation 0/0, stabilization 0/0, a/b 0/0.\n" in table
    # `zoo status --refresh` rewrites the stale file once; the table then shows it as current
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "m.yaml").write_text(yaml.safe_dump(to_dict(members["m"])))
    code, out, err = run_cli(monkeypatch, capsys, "zoo", "status", "--out", str(tmp_path), "--configs", str(configs), "--refresh")
    assert code == 0 and "refreshed boundaries of 1 member(s): m" in err and "| 3 |" in out and "*" not in out
    stored = json.loads((root / "behaviour.json").read_text())
    assert stored["schema_version"] == "1.2" and stored["boundaries"]["mutation_layers"] == [5] and "stale" not in stored
    assert stored["resampled"] is None  # re-derived with the boundaries: this file holds no generations to resample
    assert refresh_truth(["m"], tmp_path) == [] and not read_behaviour(root / "behaviour.json")["stale"]
    code, out, _ = run_cli(monkeypatch, capsys, "zoo", "status", "--out", str(tmp_path), "--configs", str(configs),
                           "--set", "behaviour.captions=48")
    assert code == 0 and "| 3† |" in out and "(48 captions," in out
    assert "read with the hallucination reading: also post-critical layers whose bypass cuts CHAIR_i by >= 0.03 and " \
        ">= 25% of the full model's at a recall loss <= 0.02" in out
    code, out, _ = run_cli(monkeypatch, capsys, "zoo", "status", "--out", str(tmp_path), "--configs", str(configs),
                           "--set", "behaviour.rules.mutation_chair_cut=null")
    assert code == 0 and "hallucination reading" not in out and "| 3* |" in out  # stored under the default reading
    # a behaviour file without curves: '-' in the table, one error line from --refresh
    write_json(root / "behaviour.json", {"boundaries": {}}, schema="1.1")
    assert zoo_table(members, tmp_path).splitlines()[2].split(" | ")[11:14] == ["-", "-", "-"]
    code, _, err = run_cli(monkeypatch, capsys, "zoo", "status", "--out", str(tmp_path), "--configs", str(configs), "--refresh")
    assert code == 2 and err.startswith("error: ") and "without 'num_layers'" in err


def test_zoo_table_counts_uncertainty_flags_by_set_agreement(tmp_path: Path):
    """Each split's summary, and one line over all splits, say how often the uncertainty flags warned where the
    second sample set did disagree."""
    members = {"m": tiny_member_config(), "n": tiny_member_config(seed=1), "o": tiny_member_config(seed=2, split="holdout")}
    runs = {"m": (stage_file(6, 3, [], flags=["wide_interval"]), stage_file(6, 1, [])),  # 3 vs 1: the sets disagree
            "n": (stage_file(6, 3, [5]), stage_file(6, 3, [5], flags=["uncertain_mutation", "short_stable_stage"])),
            "o": (stage_file(6, 3, [5], flags=["wide_interval"]), stage_file(6, 3, [5]))}
    for name, (a, b) in runs.items():
        save_behaviour(tmp_path / name / "behaviour.json", _curves_payload() | {"boundaries": boundaries(_curves_payload())})
        write_stages(tmp_path / name / "analysis_a" / "stages.json", a.payload)
        write_stages(tmp_path / name / "analysis_b" / "stages.json", b.payload)
    table = zoo_table(members, tmp_path)
    summary = {line.split(" members:")[0]: line for line in table.splitlines() if line.startswith("Detector vs")}
    assert "a/b 1/2." in summary["Detector vs behaviour on the tune"]
    assert summary["Detector vs behaviour on the tune"].endswith(
        " Uncertainty flags (wide_interval / uncertain_mutation) on 1 of 2 analysis runs whose member's two sample "
        "sets disagree (a/b), on 1 of 2 whose sets agree.")
    assert summary["Detector vs behaviour on the holdout"].endswith("on 0 of 0 analysis runs whose member's two sample "
                                                                   "sets disagree (a/b), on 1 of 2 whose sets agree.")
    assert "\nAll splits: Uncertainty flags (wide_interval / uncertain_mutation) on 1 of 2 analysis runs whose member's " \
           "two sample sets disagree (a/b), on 2 of 4 whose sets agree." in table


def test_saved_zoo_curves_are_small_consistent_and_hold_the_early_flip_pattern():
    folder = Path(__file__).parent / "data" / "zoo"
    files = sorted(folder.glob("*.npz"))
    assert len(files) >= 3 and sum(f.stat().st_size for f in files) < 1_000_000
    shares = {}
    for path in files:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            n = meta["num_layers"]
            assert z["js_prev"].shape == z["p_token"].shape == z["top1_flip"].shape == (meta["tokens"], n + 1)
            assert np.isnan(z["js_prev"][:, 0].astype(np.float32)).all() and not z["top1_flip"][:, 0].any()
            p = z["p_token"].astype(np.float32)
            assert ((p >= 0) & (p <= 1.001)).all()
            assert ((z["decision_depth"] >= 0) & (z["decision_depth"] <= n)).all()
            shares[meta["member"]] = flips_after_js_drop({k: z[k] for k in ("js_prev", "top1_flip")})
            assert shares[meta["member"]] == pytest.approx(meta["flips_after_js_drop"])
    assert max(shares.values()) >= 0.3  # a member whose early layers keep changing top-1 after the JS drops

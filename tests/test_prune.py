"""Pruning: static removal vs an identity-hook reference, reload, runtime skips and exits, selectors, refusals, CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

from conftest import ARCHS, build_tiny, make_inputs, run_cli, stage_file, tiny_world_llava
from evotool.errors import EvotoolError
from evotool.generation import generate_ids
from evotool.lens import NormedLens
from evotool.models.registry import decoder_parts
from evotool.prune.runtime import DynamicExit, exit_after, mode_layers, skip_layers
from evotool.prune.select import SELECTORS, CalibrationStats, SelectionContext, budget
from evotool.prune.static import remove_layers



class IdentityHooks:
    """Independent reference: the full model with decoder layers ``layers`` (1..L) made the identity by
    forward hooks that return the layer's input (the layer still runs, its output is discarded)."""

    def __init__(self, model, layers, positions=None):
        self.parts, self.layers, self.positions = decoder_parts(model), layers, positions
        self.handles = []

    def __enter__(self):
        for i in self.layers:
            def hook(_m, args, kwargs, out, i=i):
                x = args[0] if args else kwargs["hidden_states"]
                if self.positions is None:
                    return x
                out = out.clone()
                out[:, self.positions[i]] = x[:, self.positions[i]]
                return out
            self.handles.append(self.parts.layers[i - 1].register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("model_type", ARCHS)
def test_static_prune_equals_identity_reference(model_type):
    model = build_tiny(model_type, layers=5)
    inputs = make_inputs(model, model_type, batch=2, pad_first=2)
    removed = [2, 4]
    with torch.no_grad(), IdentityHooks(model, removed):
        ref_logits = model(**inputs).logits
        ref_ids = generate_ids(model, inputs, 4)
    pruned = copy.deepcopy(model)
    kept = remove_layers(pruned, removed)
    assert kept == [1, 3, 5]
    parts = decoder_parts(pruned)
    assert parts.num_layers == 3 == pruned.config.get_text_config().num_hidden_layers
    assert [l.self_attn.layer_idx for l in parts.layers] == [0, 1, 2]
    types = getattr(model.config.get_text_config(), "layer_types", None)
    if types is not None:
        assert pruned.config.get_text_config().layer_types == [types[i - 1] for i in kept]
    with torch.no_grad():
        torch.testing.assert_close(pruned(**inputs).logits, ref_logits, atol=1e-5, rtol=1e-4)
    assert generate_ids(pruned, inputs, 4) == ref_ids
    # runtime skipping of the same layers gives the same greedy tokens as the pruned model
    with skip_layers(model, removed):
        assert generate_ids(model, inputs, 4) == ref_ids


@pytest.mark.parametrize("model_type", ["llava", "gemma3"])
def test_pruned_checkpoint_reloads_with_auto_classes(model_type, tmp_path):
    model = build_tiny(model_type, layers=4)
    inputs = make_inputs(model, model_type, batch=2)
    remove_layers(model, [3])
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    reloaded.generation_config.eos_token_id = 2
    assert decoder_parts(reloaded).num_layers == 3
    assert generate_ids(reloaded, inputs, 5) == generate_ids(model, inputs, 5)


def test_exit_after_equals_lens_on_hidden_states():
    model = build_tiny("llava", layers=6)
    inputs = make_inputs(model, "llava", batch=2)
    parts = decoder_parts(model)
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        lens = NormedLens(parts)
        for e in (2, 4):
            with exit_after(model, e):
                logits = model(**inputs).logits[:, -1]
            torch.testing.assert_close(logits, lens.logits(hidden[e][None, :, -1])[0], atol=1e-5, rtol=1e-4)


STAGES = stage_file(12, 4, [10])  # rapid evolution 0..4, stabilization 5..9, mutation 10..12


def test_named_modes():
    assert mode_layers("skip-stable", STAGES) == [5, 6, 7, 8, 9]
    assert mode_layers("skip-mutation", STAGES) == [10]
    assert mode_layers("critical-to-last5", STAGES) == [5, 6, 7]  # keeps 8..12, the last five
    assert mode_layers("exit-stable-end", STAGES) == [10, 11, 12]
    with pytest.raises(EvotoolError):
        mode_layers("skip-mutation", stage_file(12, 4, []))


def test_runtime_refuses_layer_one():
    model = build_tiny("llava", layers=4)
    with pytest.raises(EvotoolError), skip_layers(model, [1]):
        pass


@pytest.mark.parametrize("criterion,threshold", [("confidence", 0.3), ("js", 0.05)])
def test_dynamic_exit_is_consistent(criterion, threshold):
    """Checked: (1) tokens emitted with dynamic exit equal the argmax of an independent full-sequence
    forward (no cache) in which each generated position passes its exit state through the layers after
    its exit layer (hooks), i.e. the cached keys/values of the propagated layers are exactly those;
    (2) exits actually happen; (3) an unreachable threshold reproduces the full model's tokens."""
    model = build_tiny("llava", layers=6, seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked lens distributions, so that some tokens exit early and some do not
    inputs = make_inputs(model, "llava", batch=1, text_len=4)
    n_new = 8
    full_ids = generate_ids(model, inputs, n_new)
    with DynamicExit(model, "confidence", threshold=1.1) as never:
        assert generate_ids(model, inputs, n_new) == full_ids
    assert never.exits == [6] * n_new
    with DynamicExit(model, criterion, threshold=threshold, min_layer=3) as dyn:
        ids = generate_ids(model, inputs, n_new)[0]
    exits = dyn.exits
    assert len(exits) == n_new and exits[0] == 6 and min(exits) < 6 and exits.count(6) >= 2
    # reference: token t (t >= 1) was fed at position P + t - 1 and exited at exits[t]
    prompt = inputs["input_ids"].shape[1]
    seq = torch.cat([inputs["input_ids"], torch.tensor([ids[:-1]])], dim=1)
    positions = {i: [prompt + t - 1 for t in range(1, n_new) if exits[t] < i] for i in range(1, 7)}
    full = dict(inputs, input_ids=seq, attention_mask=torch.ones_like(seq))
    with torch.no_grad(), IdentityHooks(model, range(2, 7), positions):
        logits = model(**full).logits[0]
    assert logits[prompt - 1 :].argmax(-1).tolist() == ids


def test_selectors_and_budget():
    import numpy as np

    n = 12
    bi = np.array([np.nan, .9, .8, .7, .6, .05, .5, .04, .3, .2, .6, .9, .95])
    ang = np.ones((n + 1, n + 1))
    ang[6, 9] = 0.1  # block 7..9 is the closest input/output pair for k=3
    ctx = SelectionContext(n, STAGES, CalibrationStats(bi, ang, 10), protected={4})
    assert SELECTORS["stage"](2, ctx).removed == [5, 7]
    assert SELECTORS["block-influence"](3, ctx).removed == [5, 7, 9]
    assert SELECTORS["angular"](3, ctx).removed == [7, 8, 9]
    assert SELECTORS["last"](2, ctx).removed == [11, 12]
    r = SELECTORS["random"](3, ctx).removed
    assert len(r) == 3 and 4 not in r and r == SELECTORS["random"](3, ctx).removed
    js_ctx = SelectionContext(n, stage_file(12, 4, [10], curves={"js_prev": {"median": [0, *range(12, 0, -1)]}}), redundancy="js")
    assert SELECTORS["stage"](2, js_ctx).removed == [8, 9]  # lowest adjacent JS inside 5..9
    with pytest.raises(EvotoolError, match=r"only 5 removable layers in the stabilization stage .*--selector block-influence"):
        SELECTORS["stage"](6, ctx)  # larger than the stable stage
    one = SelectionContext(n, stage_file(12, 10, [12]), CalibrationStats(bi, ang, 10))  # stabilization: layer 11
    with pytest.raises(EvotoolError, match=r"cannot remove 2 layers: only 1 removable layer in the stabilization stage \[11\]"):
        SELECTORS["stage"](2, one)
    assert budget(12, drop=3) == 3 and budget(12, ratio=0.25) == 3 and budget(12, speedup=1.5) == 4
    with pytest.raises(EvotoolError):
        budget(12, drop=2, ratio=0.5)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A saved random 8-layer world-LLaVA and the stages.json `evotool analyze` wrote for it."""
    from typer.testing import CliRunner

    from evotool.cli import app

    root = tmp_path_factory.mktemp("prune_cli")
    tiny_world_llava(8, save_to=root / "model")
    res = CliRunner().invoke(app, ["analyze", "--model", str(root / "model"), "--out", str(root / "an"), "--no-wandb",
                                   "--world-samples", "2", "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    return root


def _with_stages(root, name, **changes):
    """A copy of the analysed stages.json with some fields changed (same model, same fingerprint unless changed)."""
    payload = json.loads((root / "an" / "stages.json").read_text())
    payload.update(changes)
    path = root / f"{name}.json"
    path.write_text(json.dumps(payload))
    return path


def _prune(root, *args):
    from typer.testing import CliRunner

    from evotool.cli import app

    return CliRunner().invoke(app, ["prune", "--model", str(root / "model"), "--no-wandb", *args])


def test_cli_prune_end_to_end(analysed):
    root = analysed
    stages = _with_stages(root, "staged", critical_layer=3, mutation_layers=[8],
                          stages={"rapid_evolution": [0, 3], "stabilization": [4, 7], "mutation": [8, 8]})
    res = _prune(root, "--stages", str(stages), "--keep-critical", "--drop", "2", "--selector", "stage", "--out", str(root / "p"))
    assert res.exit_code == 0, res.output
    record = json.loads((root / "p" / "prune.json").read_text())
    assert len(record["removed_layers"]) == 2 and set(record["removed_layers"]) <= {4, 5, 6, 7}
    assert record["kept_layers"] == [i for i in range(1, 9) if i not in record["removed_layers"]]
    assert "stabilization stage" in (root / "p" / "README.md").read_text()
    from transformers import AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(root / "p").eval()
    AutoProcessor.from_pretrained(root / "p")
    assert decoder_parts(model).num_layers == 6
    # the saved model is the source with those layers removed
    src = AutoModelForImageTextToText.from_pretrained(root / "model").eval()
    remove_layers(src, record["removed_layers"])
    for (name, a), b in zip(src.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_cli_refusals(analysed):
    root = analysed
    staged = dict(critical_layer=3, mutation_layers=[8], stages={"rapid_evolution": [0, 3], "stabilization": [4, 7], "mutation": [8, 8]})
    cases = {
        "critical": (_with_stages(root, "c", **staged), ["--layers", "3,5"], "critical layer"),
        "budget": (_with_stages(root, "b", **staged), ["--drop", "5"], "only 4"),
        "fingerprint": (_with_stages(root, "f", **staged, fingerprint="0123456789abcdef"), ["--drop", "1"], "another model"),
        "no stable stage": (root / "an" / "stages.json", ["--drop", "1"], None),
    }
    for name, (path, args, message) in cases.items():
        res = _prune(root, "--stages", str(path), *args, "--out", str(root / name))
        assert isinstance(res.exception, EvotoolError), (name, res.output)
        assert message is None or message in str(res.exception), (name, str(res.exception))
        assert not (root / name / "model.safetensors").exists()
    # a layer outside the model is refused before the analysis that --stages would have spared is run
    res = _prune(root, "--layers", "4,99", "--out", str(root / "range"))
    assert isinstance(res.exception, EvotoolError) and "layers [99] outside 1..8" in str(res.exception), res.output
    assert not (root / "range" / "analysis").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes 4/8-bit loading needs CUDA")
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_pruned_checkpoint_loads_quantized(quantization, tmp_path):
    pytest.importorskip("bitsandbytes")
    from evotool.models.loading import _quantization_config  # what load_model(..., LoadOptions(quantization=...)) uses

    model = build_tiny("llava", layers=4)
    remove_layers(model, [2, 3])
    model.save_pretrained(tmp_path)
    quantized = AutoModelForImageTextToText.from_pretrained(
        tmp_path, quantization_config=_quantization_config(quantization, torch.float16),
        device_map="cuda")
    assert decoder_parts(quantized).num_layers == 2
    inputs = {k: v.to("cuda") for k, v in make_inputs(model, "llava", batch=1).items()}
    inputs["pixel_values"] = inputs["pixel_values"].half()
    assert len(generate_ids(quantized, inputs, 3)[0]) == 3


def test_token_agreement_by_hand():
    from evotool.prune.evaluate import token_agreement

    ref = [[1, 2, 3, 4], [5, 6]]
    cand = [[1, 9, 3], [5, 6]]  # 2 of 4 (a missing position is a miss) + 2 of 2 -> 4 of 6
    assert token_agreement(ref, cand) == {"agreement": pytest.approx(4 / 6), "exact": 0.5}


def test_calibration_block_influence_matches_hidden_states():
    """Block influence from the hook-based calibration equals 1 - mean cosine computed from output_hidden_states."""
    from evotool.finetune import collate, world_samples
    from evotool.prune.calibrate import calibrate

    model, processor = tiny_world_llava(layers=4)
    samples = world_samples(10)[:4]
    stats = calibrate(model, processor, samples, batch_size=2)
    batch = collate(processor, samples, "cpu")
    mask = batch.pop("attention_mask").bool()
    batch.pop("labels")
    with torch.no_grad():
        hs = model(attention_mask=mask.long(), output_hidden_states=True, **batch).hidden_states
    for i in range(1, 4):  # hidden_states[4] is after the final norm in HF, the calibration's layer 4 is not
        cos = torch.nn.functional.cosine_similarity(hs[i - 1][mask].double(), hs[i][mask].double(), dim=-1)
        assert stats.block_influence[i] == pytest.approx(1 - cos.mean().item(), abs=1e-6)
    assert stats.tokens == int(mask.sum())


def test_speed_measure_times_full_and_pruned_side_by_side() -> None:
    """measure() returns real positive timings for every model; ratios() divides them as documented."""
    from evotool.prune.speed import measure, ratios

    full = build_tiny("llava", layers=6)
    full.generation_config.eos_token_id = None
    pruned = copy.deepcopy(full)
    remove_layers(pruned, [2, 3, 4])
    inputs = make_inputs(full, "llava", batch=2)
    res = measure({"full": full, "pruned": pruned}, inputs, new_tokens=4, repeats=2, clock="cpu")
    assert set(res) == {"full", "pruned"}
    assert all(r.prefill_s > 0 and r.decode_tok_s > 0 for r in res.values())
    r = ratios(res["full"], res["pruned"], num_layers=6, removed=3)
    assert r["ideal"] == 2.0
    assert r["decode_speedup"] == pytest.approx(res["pruned"].decode_tok_s / res["full"].decode_tok_s)
    assert r["efficiency"] == pytest.approx(r["decode_speedup"] / 2.0)


def test_prune_tables_read_the_flat_results_keys():
    """prune.json / compare.json rows hold results.json's flat keys; the table's headline values are derived by hand here."""
    from evotool.prune.evaluate import headline

    row = {"agreement": 0.9, "exact": 0.5, "in_distribution_recall": 0.8, "chair_i": 0.2, "recall": 0.7,
           "in_distribution_attribute_accuracy": 0.6}
    row |= {f"{g}_pope_{s}_accuracy": v for (g, s), v in zip(
        [(g, s) for s in ("random", "popular", "adversarial") for g in ("in_distribution", "prior_breaking")],
        [1.0, 0.5, 1.0, 0.5, 0.75, 0.25])}
    assert headline(row) == {"agreement": 0.9, "exact": 0.5, "in_distribution_recall": 0.8, "chair_i": 0.2,
                             "pope_accuracy": pytest.approx(4 / 6), "in_distribution_attribute_accuracy": 0.6}
    assert headline({"agreement": 1.0, "exact": 1.0}) == {"agreement": 1.0, "exact": 1.0}


def test_prune_killed_midway_never_leaves_a_half_written_checkpoint(analysed, monkeypatch, capsys):
    """Killed after the new checkpoint is staged: OUT is still the old whole checkpoint. Killed during the swap
    (OUT moved away, the new one not in place): the next run repairs it and keeps OUT/analysis."""
    from evotool.models.loading import load_model

    root = analysed
    stages = _with_stages(root, "kill", critical_layer=3, mutation_layers=[8],
                          stages={"rapid_evolution": [0, 3], "stabilization": [4, 7], "mutation": [8, 8]})
    out = root / "killed"
    args = ["prune", "--model", str(root / "model"), "--no-wandb", "--stages", str(stages), "--out", str(out),
            "--set", "agreement_samples=0"]
    assert run_cli(monkeypatch, capsys, *args, "--drop", "1")[0] == 0
    (out / "analysis").mkdir()
    (out / "analysis" / "kept.txt").write_text("an earlier analysis")

    def killed(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("evotool.prune.run.write_card", killed)
        code, _, err = run_cli(monkeypatch, capsys, *args, "--drop", "2")
    assert code == 130, err
    assert decoder_parts(load_model(out)[0]).num_layers == 7
    assert len(json.loads((out / "prune.json").read_text())["removed_layers"]) == 1
    out.rename(root / ".killed.old")  # as a kill -9 in the middle of the swap leaves it
    (root / ".killed.partial-x").mkdir()  # and in the middle of writing
    code, _, err = run_cli(monkeypatch, capsys, *args, "--drop", "2")
    assert code == 0, err
    assert decoder_parts(load_model(out)[0]).num_layers == 6
    assert len(json.loads((out / "prune.json").read_text())["removed_layers"]) == 2
    assert (out / "analysis" / "kept.txt").read_text() == "an earlier analysis"
    assert [p.name for p in root.glob(".killed.*")] == [".killed.lock"]  # no staging or old folder left


@pytest.mark.slow
def test_prune_kill_9_while_evaluating_keeps_the_old_checkpoint(analysed, tmp_path):
    """A real SIGKILL once the new checkpoint's weights are staged (the run is evaluating it): OUT still holds the
    previous checkpoint, whole and loadable; the next run cleans up and completes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from evotool.models.loading import load_model

    root = analysed
    stages = _with_stages(root, "kill9", critical_layer=3, mutation_layers=[8],
                          stages={"rapid_evolution": [0, 3], "stabilization": [4, 7], "mutation": [8, 8]})
    out = tmp_path / "pruned"
    args = [sys.executable, "-m", "evotool", "prune", "--model", str(root / "model"), "--no-wandb", "--stages",
            str(stages), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    assert subprocess.run([*args, "--drop", "1", "--set", "agreement_samples=0"], env=env, capture_output=True,
                          timeout=300).returncode == 0
    proc = subprocess.Popen([*args, "--drop", "2", "--set", "agreement_samples=16"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".pruned.partial-*/model.safetensors")) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # the weights are complete once the processor files follow them
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and list(tmp_path.glob(".pruned.partial-*"))
    assert decoder_parts(load_model(out)[0]).num_layers == 7
    assert subprocess.run([*args, "--drop", "2", "--set", "agreement_samples=0"], env=env, capture_output=True,
                          timeout=300).returncode == 0
    assert decoder_parts(load_model(out)[0]).num_layers == 6
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".pruned.lock"]

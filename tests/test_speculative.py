"""Stage speculative decoding: identical tokens to plain greedy, cost accounting by hand, refusals, method, CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

from conftest import build_tiny, make_inputs, run_cli as cli, tiny_config
from evotool.stages import StageFile, write_stages
from evotool.errors import ConfigError
from evotool.generation import GREEDY, build_inputs, generate_ids
from evotool.mitigate.methods import build_method
from evotool.models import compat
from evotool.models.compat import CACHE_KEY, MIXED_ATTENTION_OK
from evotool.models.loading import fingerprint, load_model
from evotool.models.registry import decoder_parts
from evotool.prune.runtime import attention_types, cache_reference_layers, skip_layers
from evotool.prune.speculative import (
    SpeculativeConfig,
    SpeculativeStats,
    calibrate_draft,
    check_skip,
    skip_ranking,
    speculative_generate,
)
from evotool.prune.static import remove_layers
from evotool.world import default_model_path, default_samples

# The shipped model's stages as `evotool analyze` finds them (docs/prune.md), with a hand-made cosine curve
# whose ranking of the stable stage is known: most redundant (highest cosine) first = 9, 5, 7, 6, 4, 8, 10.
COS = [0.0, 0.1, 0.2, 0.3, 0.5, 0.8, 0.6, 0.7, 0.4, 0.9, 0.35, 0.2, 0.1]
DEMO_PAYLOAD = {"model": "demo", "num_layers": 12, "critical_layer": 3, "mutation_layers": [11],
                "stages": {"rapid_evolution": [0, 3], "stabilization": [4, 10], "mutation": [11, 12]},
                "curves": {"cos_prev": {"median": COS}}}
DEMO_STAGES = StageFile.from_payload({"schema_version": "1.1", "fingerprint": "0" * 16, **DEMO_PAYLOAD})


@pytest.fixture(scope="module")
def demo():
    """The shipped model, its processor and a batch of 8 held-out world samples (captions of different lengths)."""
    model, processor = load_model(default_model_path())
    samples = default_samples(8)
    inputs = build_inputs(processor, [s.load_image() for s in samples], [s.prompt for s in samples])
    return model, processor, inputs


def greedy(model, inputs, n, **kwargs):
    return model.generate(**inputs, max_new_tokens=n, **GREEDY, **kwargs)


def assert_same_cache(cache, ref, sequences, prompt, eos):
    """Keys and values of every full-attention layer equal (float tolerance) at each row's positions up to its EOS
    (after it, a row's padding positions hold whatever was fed there; nothing reads them)."""
    length = sequences.shape[1] - 1  # the last token is never fed
    ends = [next((i + 1 for i in range(prompt, length) if row[i] == eos), length) for row in sequences.tolist()]
    for mine, theirs in zip(cache.layers, ref.layers):
        if getattr(mine, "is_sliding", False):
            continue
        assert mine.keys.shape == theirs.keys.shape == (sequences.shape[0], *theirs.keys.shape[1:2], length, theirs.keys.shape[-1])
        for b, end in enumerate(ends):
            torch.testing.assert_close(mine.keys[b, :, :end], theirs.keys[b, :, :end], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(mine.values[b, :, :end], theirs.values[b, :, :end], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reuse", [False, True])
def test_identical_to_greedy_on_every_architecture(arch, reuse):
    """Left-padded batch of 3, skip set {3, 4} of 6 layers (prefix reuse replays layers 1-2): same tokens and
    the same KV cache as plain greedy at the end (so the prefix replay and the crops are exact)."""
    model = build_tiny(arch, layers=6)
    if len(set(attention_types(model))) > 1 and not MIXED_ATTENTION_OK:
        pytest.skip("speculative decoding of mixed attention types needs transformers >= 5.24")
    inputs = make_inputs(model, arch, batch=3, pad_first=2)
    stats = SpeculativeStats()
    out = speculative_generate(model, inputs, [3, 4], 10, max_draft=3, reuse_prefix=reuse, stats=stats,
                               return_dict_in_generate=True)
    ref = greedy(model, inputs, 10, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences)
    assert_same_cache(out[CACHE_KEY], ref[CACHE_KEY], ref.sequences, inputs["input_ids"].shape[1], model.generation_config.eos_token_id)
    assert stats.rounds > 0 and stats.committed == out.sequences.shape[1] - inputs["input_ids"].shape[1] - 1


@pytest.mark.parametrize("reuse", [False, True])
def test_identical_on_the_shipped_model_with_rows_accepting_differently(demo, reuse):
    model, _, inputs = demo
    ref = greedy(model, inputs, 32)
    stats = SpeculativeStats()
    out = speculative_generate(model, inputs, [4, 5, 6, 7, 8, 9, 10], 32, max_draft=6, reuse_prefix=reuse, stats=stats)
    assert torch.equal(out, ref)
    assert (ref == 0).any()  # some rows ended earlier than others (padding after their EOS)
    assert any(len(set(rows)) > 1 for rows in stats.row_accepts)  # rows accepted different prefixes in one round
    assert 0 < stats.accepted < stats.drafted


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_max_new_tokens_reached_mid_draft(demo, n):
    model, _, inputs = demo
    no_eos = copy.deepcopy(model)
    no_eos.generation_config.eos_token_id = None
    for m in (model, no_eos):
        out = speculative_generate(m, inputs, [5, 6, 7, 9], n, max_draft=4, reuse_prefix=True)
        assert torch.equal(out, greedy(m, inputs, n))
    assert out.shape[1] == inputs["input_ids"].shape[1] + n


def identity_draft(model, skip):
    """A copy of ``model`` whose layers ``skip`` add nothing to the residual stream (attention output and MLP
    down projections zeroed), so that the draft equals the full model and every draft token is accepted."""
    model = copy.deepcopy(model)
    for i in skip:
        layer = decoder_parts(model).layers[i - 1]
        layer.self_attn.o_proj.weight.data.zero_()
        layer.mlp.down_proj.weight.data.zero_()
    return model


@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("n,max_draft,threshold,rounds,forwards", [
    # L = 12, skip 4 layers (s = 5): draft step 8 layer-forwards, verify 12 (reuse: prefix-only 4 + verify 8).
    (9, 3, 0.0, 2, 2 * (3 * 8 + 12)),     # 8 tokens after the prefill: two rounds of 3 drafts + the bonus token
    (9, 3, 1.01, 4, 4 * (1 * 8 + 12)),    # unreachable confidence: every draft stops after one token
    (4, 4, 0.0, 1, 1 * (2 * 8 + 12)),     # 3 tokens left: the budget caps the draft at 2
])
def test_forward_equivalents_match_a_hand_count(demo, reuse, n, max_draft, threshold, rounds, forwards):
    model, _, inputs = demo
    skip = [5, 6, 7, 9]
    full = identity_draft(model, skip)
    full.generation_config.eos_token_id = None
    batch = {k: v[:1] for k, v in inputs.items()}
    stats = SpeculativeStats()
    out = speculative_generate(full, batch, skip, n, max_draft=max_draft, threshold=threshold, reuse_prefix=reuse,
                               stats=stats)
    assert torch.equal(out, greedy(full, batch, n))
    assert (stats.rounds, stats.committed, stats.layer_forwards) == (rounds, n - 1, forwards)
    assert stats.acceptance_rate == 1.0
    assert stats.forward_equivalents == pytest.approx(forwards / 12 / (n - 1))
    assert stats.tokens_per_step == pytest.approx((n - 1) / rounds)


def test_eos_inside_a_draft_ends_the_round(demo):
    """With an always-accepted draft longer than the answer, the EOS arrives inside the first draft: drafting
    stops there and one verify step commits the whole answer."""
    model, _, inputs = demo
    skip = [5, 6, 7, 9]
    full = identity_draft(model, skip)
    batch = {k: v[:1] for k, v in inputs.items()}
    ref = greedy(full, batch, 32)
    answer = ref.shape[1] - batch["input_ids"].shape[1]
    assert 2 < answer < 12 and ref[0, -1].item() == full.generation_config.eos_token_id
    stats = SpeculativeStats()
    out = speculative_generate(full, batch, skip, 32, max_draft=16, stats=stats)
    assert torch.equal(out, ref)
    assert (stats.rounds, stats.committed, stats.drafted) == (1, answer - 1, answer - 1)


def test_refusals(demo):
    model, _, inputs = demo
    with pytest.raises(ConfigError, match="critical layer"):
        check_skip(model, [3, 5], DEMO_STAGES)
    with pytest.raises(ConfigError, match="outside 1..12"):
        check_skip(model, [5, 13], DEMO_STAGES)
    with pytest.raises(ConfigError, match="outside 1..12"):
        check_skip(model, [0], DEMO_STAGES)
    with pytest.raises(ConfigError, match=r"\[1\] cannot be skipped"):
        check_skip(model, [1, 5], DEMO_STAGES)
    with pytest.raises(ConfigError, match="at least one"):
        check_skip(model, [], DEMO_STAGES)
    with pytest.raises(ConfigError, match="only 7 skippable"):
        build_method("stage_speculative", model, {"skip": "8"}, DEMO_STAGES)
    with pytest.raises(ConfigError, match="critical layer"):
        build_method("stage_speculative", model, {"layers": "3,4"}, DEMO_STAGES)
    with pytest.raises(ConfigError, match="skip must be auto or a number"):
        SpeculativeConfig(skip="half")
    with pytest.raises(ConfigError, match="min_gain must be >= 0"):
        SpeculativeConfig(min_gain=-0.1)
    with pytest.raises(ConfigError):
        speculative_generate(model, inputs, [5], 4, do_sample=True)


def gemma3_mixed():
    """Tiny Gemma 3 whose first full-attention layer is layer 2 (its cache slot sizes the full-attention masks)."""
    config = tiny_config("gemma3", 6)
    config.text_config.layer_types = ["sliding_attention", "full_attention"] * 3
    config.text_config.sliding_window = 8
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 2, 0
    return model


def test_first_layer_of_each_attention_type_is_refused_and_later_ones_work():
    if not MIXED_ATTENTION_OK:
        pytest.skip("speculative decoding of mixed attention types needs transformers >= 5.24")
    model = gemma3_mixed()
    assert cache_reference_layers(model) == [1, 2]
    with pytest.raises(ConfigError, match=r"\[2\] cannot be skipped"), skip_layers(model, [2]):
        pass
    inputs = make_inputs(model, "gemma3", batch=2, text_len=12, pad_first=3)  # prompt longer than the window
    pruned = copy.deepcopy(model)
    remove_layers(pruned, [4])
    with skip_layers(model, [4]):
        assert torch.equal(greedy(model, inputs, 8), greedy(pruned, inputs, 8))
    for reuse in (False, True):
        out = speculative_generate(model, inputs, [3, 4], 12, max_draft=3, reuse_prefix=reuse)
        assert torch.equal(out, greedy(model, inputs, 12))


def test_mixed_attention_types_are_refused_before_transformers_5_24(monkeypatch):
    model = gemma3_mixed()
    inputs = make_inputs(model, "gemma3", batch=1, text_len=12)
    monkeypatch.setattr(compat, "MIXED_ATTENTION_OK", False)
    with pytest.raises(ConfigError, match=r"several attention types \(full_attention, sliding_attention\) needs transformers >= 5.24"):
        speculative_generate(model, inputs, [3, 4], 4)


def test_skip_ranking_follows_the_stage_selector(demo):
    model, _, inputs = demo
    assert skip_ranking(model, DEMO_STAGES, "cosine") == [9, 5, 7, 6, 4, 8, 10]
    method = build_method("stage_speculative", model, {"skip": "3", "max_draft": "2"}, DEMO_STAGES)
    assert method.plan.skip == [5, 7, 9] and method.plan.max_draft == 2
    # keep_mutation=false: the mutation stage (11, 12; cosines 0.2, 0.1) joins the ranking by the same score
    assert skip_ranking(model, DEMO_STAGES, "cosine", keep_mutation=False) == [9, 5, 7, 6, 4, 8, 10, 11, 12]
    method = build_method("stage_speculative", model, {"skip": "9", "keep_mutation": False}, DEMO_STAGES)
    assert method.plan.skip == [4, 5, 6, 7, 8, 9, 10, 11, 12]  # the draft is the early exit at the critical layer
    assert method.generate_ids(dict(inputs), 12) == generate_ids(model, dict(inputs), 12)


def test_method_generates_greedy_tokens_and_reports_stats(demo):
    model, processor, inputs = demo
    method = build_method("stage_speculative", model, {"layers": "5,6,7,9"}, DEMO_STAGES)
    assert method.generate_ids(dict(inputs), 16) == generate_ids(model, dict(inputs), 16)
    used = method.describe()["layers"]
    assert used["skip"] == [5, 6, 7, 9] and used["speculative"]["rounds"] == method.stats.rounds > 0


def test_auto_calibration_measures_every_size_and_confirms(demo):
    model, _, inputs = demo
    batches = [{k: v[:4] for k, v in inputs.items()}]
    # two rankings (stable stage; stable + mutation stage): every prefix of each, a shared set measured once
    cal = calibrate_draft(model, batches, [[9, 5, 7], [9, 11, 5]], max_new_tokens=8, draft_lengths=(2, 4), repeats=1)
    assert [(row["skip"], row["max_draft"]) for row in cal.rows[:5]] == [
        ([9], 4), ([5, 9], 4), ([5, 7, 9], 4), ([9, 11], 4), ([5, 9, 11], 4)]
    fastest = max(cal.rows[:5], key=lambda row: row["score"])["skip"]  # measured speedup capped by its bound
    assert [(row["skip"], row["max_draft"], row["reuse_prefix"], row["threshold"]) for row in cal.rows[5:]] == [
        (fastest, 2, False, 0.0), (fastest, 4, True, 0.0), (fastest, 4, False, 0.4)]  # longest drafts, adaptive stop
    assert all(row["tokens_per_s"] > 0 and 0 <= row["acceptance_rate"] <= 1 for row in cal.rows)
    assert all(row["score"] == min(row["speedup"], 1 / row["forward_equivalents"]) for row in cal.rows)
    assert cal.plan.skip == ([] if cal.confirmed_speedup <= 1.05 else max(cal.rows, key=lambda r: r["score"])["skip"])


def test_auto_reads_a_measurement_above_the_counted_bound_as_the_bound(demo, monkeypatch):
    """A noisy clock that makes the one-layer draft look 5x faster than greedy: its score is its bound
    1 / forward equivalents (< 1 here), so it can neither win the search nor pass the confirmation."""
    from evotool.prune.speculative import plan as plan_module

    real = plan_module._timed

    def noisy(model, batches, plan, max_new_tokens, clock):
        seconds, tokens, stats = real(model, batches, plan, max_new_tokens, clock)
        return (seconds / 5 if plan.skip == [9] else seconds), tokens, stats

    monkeypatch.setattr(plan_module, "_timed", noisy)
    model, _, inputs = demo
    cal = calibrate_draft(model, [{k: v[:2] for k, v in inputs.items()}], [[9]], max_new_tokens=8,
                          draft_lengths=(2, 4), repeats=1)
    for row in cal.rows:
        assert row["speedup"] > 2 and row["forward_equivalents"] > 1 and row["score"] == row["bound"] < 1
    assert cal.plan.skip == [] and cal.confirmed_speedup < 1


@pytest.mark.parametrize("min_gain,accepted", [(0.05, False), (0.0, True)])
def test_auto_keeps_greedy_unless_the_confirmed_gain_exceeds_min_gain(demo, monkeypatch, min_gain, accepted):
    """A clock under which every draft runs at exactly 1.03x greedy's tokens/s: within the 5% margin greedy stays."""
    from evotool.prune.speculative import plan as plan_module

    real = plan_module._timed

    def fixed(model, batches, plan, max_new_tokens, clock):
        _, tokens, stats = real(model, batches, plan, max_new_tokens, clock)
        return tokens / (103.0 if plan.skip else 100.0), tokens, stats

    monkeypatch.setattr(plan_module, "_timed", fixed)
    model, _, inputs = demo
    cal = calibrate_draft(model, [{k: v[:2] for k, v in inputs.items()}], [[4, 5, 6, 7, 8, 9, 10]], max_new_tokens=8,
                          draft_lengths=(4,), repeats=1, min_gain=min_gain)
    assert cal.confirmed_speedup == pytest.approx(1.03)  # under its counted bound: the stable stage skipped
    assert (cal.plan.skip != []) is accepted


@pytest.fixture(scope="module")
def demo_stages(tmp_path_factory, demo):
    path = tmp_path_factory.mktemp("stages") / "stages.json"
    write_stages(path, dict(DEMO_PAYLOAD, fingerprint=fingerprint(demo[0])))
    return path


def test_cli_generate_writes_greedy_texts(demo, demo_stages, tmp_path, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "generate", "--method", "stage_speculative", "--stages", str(demo_stages),
                         "--skip", "4", "--limit", "3", "--max-new-tokens", "12", "--out", str(tmp_path))
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    code, plain, _ = cli(monkeypatch, capsys, "generate", "--limit", "3", "--max-new-tokens", "12")
    assert code == 0 and out.splitlines() == plain.splitlines() == [f"{r['id']}\t{r['text']}" for r in records]
    summary = json.loads((tmp_path / "generate.json").read_text())
    assert summary["schema_version"] == "1.0" and summary["method"]["layers"]["skip"] == [5, 6, 7, 9]


@pytest.mark.parametrize("args,message", [
    (("--skip", "3"), "--skip applies to --method stage_speculative"),
    (("--method", "stage_speculative", "--stages", "{stages}", "--set", "layers=1,5"), "cannot be skipped"),
    (("--method", "stage_speculative", "--stages", "{stages}", "--set", "layers=3"), "critical layer"),
    (("--method", "stage_speculative", "--stages", "{stages}", "--skip", "0"), "skip must be auto or a number"),
    (("--method", "stage_speculative", "--stages", "{stages}", "--set", "layers=14"), "outside 1..12"),
])
def test_cli_bad_skip_sets_exit_with_one_line(demo_stages, monkeypatch, capsys, args, message):
    args = [a.format(stages=demo_stages) for a in args]
    code, _, err = cli(monkeypatch, capsys, "generate", "--limit", "1", *args)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_cli_eval_world_with_auto_gives_greedy_metrics(demo_stages, tmp_path, monkeypatch, capsys):
    """``auto`` calibrates (processor loaded from the model's folder) in the untimed warm-up of the harness;
    every quality metric equals greedy's, only the latency differs."""
    code, _, err = cli(monkeypatch, capsys, "eval", "world", "--method", "stage_speculative", "--stages", str(demo_stages),
                       "--set", "calibration_samples=2", "--set", "calibration_tokens=4", "--n", "2",
                       "--batch-size", "4", "--max-new-tokens", "6", "--no-wandb", "--out", str(tmp_path))
    assert code == 0, err
    record = json.loads((tmp_path / "results.json").read_text())
    method, baseline = record["metrics"], record["meta"]["baseline"]
    assert {k: v for k, v in method.items() if not k.startswith("latency")} == \
        {k: v for k, v in baseline.items() if not k.startswith("latency")}
    layers = record["meta"]["method"]["layers"]
    assert layers["calibration"]["candidates"] and isinstance(layers["skip"], list)

"""Mitigation methods against independent re-computations on a tiny random LLaVA.

The references below decode step by step with full (uncached) forward passes and
``output_hidden_states``, written from the papers' formulas, so they share no code with
``evotool.mitigate``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny, make_inputs, stage_file

from evotool.errors import ConfigError, StageFileError
from evotool.generation import generate_ids
from evotool.mitigate.methods import build_method, make_config, method_names
from evotool.mitigate.methods.dola import dola_candidates
from evotool.mitigate.methods.vcd import diffusion_noise

LAYERS = 6
STEPS = 4


@pytest.fixture(scope="module")
def tiny():
    model = build_tiny("llava", layers=LAYERS, seed=3)
    model.generation_config.eos_token_id = None  # run every row to STEPS tokens
    inputs = make_inputs(model, "llava", batch=3, text_len=5, seed=1)  # no padding: full forwards stay exact
    return model, inputs


def stages(critical: int = 2, mutation: list[int] | None = None):
    return stage_file(LAYERS, critical, [5] if mutation is None else mutation)


def layer_logp(model, hidden: torch.Tensor, layer: int) -> torch.Tensor:
    """log p of one layer's last-position state through norm + head ([B, V]); HF's last state is already normed."""
    h = hidden[:, -1]
    if layer < LAYERS:
        h = model.model.language_model.norm(h)
    return torch.log_softmax(model.lm_head(h).float(), -1)


def manual_decode(model, inputs, choose, steps: int = STEPS) -> list[list[int]]:
    """Greedy decoding with full forwards; ``choose(out, ids) -> scores [B, V]`` picks each token by argmax."""
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, output_hidden_states=True)
            nxt = choose(out, ids).argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return ids[:, start:].tolist()


def rep_penalty(ids: torch.Tensor, scores: torch.Tensor, penalty: float) -> torch.Tensor:
    scores = scores.clone()
    for b in range(ids.shape[0]):
        for tok in set(ids[b].tolist()):
            s = scores[b, tok]
            scores[b, tok] = s * penalty if s < 0 else s / penalty
    return scores


def relative_top_contrast(final: torch.Tensor, prem: torch.Tensor, alpha: float) -> torch.Tensor:
    """log p_final - log p_premature where p_final >= alpha * max p_final, -inf elsewhere (one row, log-probs)."""
    keep = final >= final.max() + math.log(alpha)
    return torch.where(keep, final - prem, torch.tensor(-math.inf))


def dola_reference(model, candidates, alpha, penalty, chosen: list | None = None):
    """transformers 4.4x ``_dola_decoding``: premature logits = LM head on the raw hidden state; layer score =
    batch mean of (KL(m||p_final) + KL(m||p_premature)) / 2 with each KL averaged over the vocabulary; one
    layer for the batch; relative-top filter, contrast, repetition penalty. ``chosen`` collects the layers."""

    def choose(out, ids):
        final = torch.log_softmax(out.logits[:, -1].float(), -1)
        prem = {c: torch.log_softmax(model.lm_head(out.hidden_states[c][:, -1]).float(), -1) for c in candidates}
        scores = {}
        for c, q in prem.items():
            m = 0.5 * (final.exp() + q.exp())
            kl1 = (m * (m.log() - final)).mean(-1)
            kl2 = (m * (m.log() - q)).mean(-1)
            scores[c] = (0.5 * (kl1 + kl2)).mean().item()
        best = max(candidates, key=lambda c: scores[c]) if len(candidates) > 1 else candidates[0]
        if chosen is not None:
            chosen.append(best)
        rows = [relative_top_contrast(final[b], prem[best][b], alpha) for b in range(final.shape[0])]
        return rep_penalty(ids, torch.stack(rows), penalty)

    return choose


def dola_js_reference(model, candidates, alpha, penalty):
    """evotool's variant: premature layers through the final norm, per row the largest Jensen-Shannon divergence."""

    def choose(out, ids):
        final = torch.log_softmax(out.logits[:, -1].float(), -1)
        rows = []
        for b in range(final.shape[0]):
            def js(c):
                q = layer_logp(model, out.hidden_states[c], c)[b]
                m = 0.5 * (final[b].exp() + q.exp())
                return 0.5 * (final[b].exp() * (final[b] - m.log())).sum() + 0.5 * (q.exp() * (q - m.log())).sum()
            best = max(candidates, key=lambda c: js(c).item())
            rows.append(relative_top_contrast(final[b], layer_logp(model, out.hidden_states[best], best)[b], alpha))
        return rep_penalty(ids, torch.stack(rows), penalty)

    return choose


def test_greedy_equals_plain_generate(tiny):
    model, inputs = tiny
    method = build_method("greedy", model)
    assert method.generate_ids(dict(inputs), STEPS) == generate_ids(model, dict(inputs), STEPS)


def test_dola_candidates_follow_released_buckets():
    assert dola_candidates(32, "high", False) == list(range(16, 32, 2))
    assert dola_candidates(32, "low", True) == list(range(2, 16, 2))
    assert dola_candidates(80, "high", False) == list(range(60, 80, 2))
    assert dola_candidates(2, "low", True) == [1]


def test_dola_matches_reference(tiny, monkeypatch):
    model, inputs = tiny
    method = build_method("dola", model)  # defaults: lens raw, selection reference (transformers 4.4x)
    made = []
    original = method.processors
    monkeypatch.setattr(method, "processors", lambda capture, rows: made.extend(original(capture, rows)) or made)
    ids = method.generate_ids(dict(inputs), STEPS)
    cand = dola_candidates(LAYERS, "high", False)
    chosen: list[int] = []
    assert ids == manual_decode(model, inputs, dola_reference(model, cand, 0.1, 1.2, chosen))
    # one premature layer per step for the whole batch, the one the reference picks
    assert [c.tolist() for c in made[0].chosen] == [[layer] * 3 for layer in chosen]
    assert ids != generate_ids(model, dict(inputs), STEPS)  # the contrast changes this model's choices


def test_dola_scores_equal_reference_recomputation(tiny):
    from evotool.mitigate.processors import LayerContrast
    from evotool.models.registry import decoder_parts
    from evotool.trace import LayerCapture

    model, inputs = tiny
    parts = decoder_parts(model)
    with torch.no_grad(), LayerCapture(parts) as cap:
        out = model(**inputs, output_hidden_states=True)
        got = LayerContrast(cap, [0, 2, 4], 0.1, lens="raw", selection="reference",
                            rows=inputs["input_ids"].shape[0])(inputs["input_ids"], out.logits[:, -1])
    want = dola_reference(model, [0, 2, 4], 0.1, 1.0)(out, inputs["input_ids"])
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)], atol=1e-4, rtol=1e-4)


def test_dola_js_normed_variant(tiny):
    model, inputs = tiny
    method = build_method("dola", model, {"lens": "normed", "selection": "js", "layers": "1,3,5"})
    assert method.candidates() == [1, 3, 5]
    ids = method.generate_ids(dict(inputs), STEPS)
    assert ids == manual_decode(model, inputs, dola_js_reference(model, [1, 3, 5], 0.1, 1.2))


def test_dola_layer_lists_and_tied_embeddings(tiny):
    model, _ = tiny
    assert build_method("dola", model, {"layers": "2,9"}).candidates() == [2]  # >= L dropped, as the reference
    assert build_method("dola", model, {"layers": "4"}).candidates() == [4]
    with pytest.raises(ConfigError):
        build_method("dola", model, {"layers": "7,9"}).candidates()
    with pytest.raises(ConfigError):
        make_config("dola", {"layers": "middle"})
    # tying is read from the top-level config, as transformers 4.4x: tied -> layer 0 skipped
    tied = copy.deepcopy(model)
    tied.config.tie_word_embeddings = True
    assert tied.config.get_text_config().tie_word_embeddings is False
    assert build_method("dola", tied, {"layers": "low"}).candidates() == [2]
    assert build_method("dola", model, {"layers": "low"}).candidates() == [0, 2]


def test_stage_contrast_uses_the_critical_layer(tiny):
    model, inputs = tiny
    method = build_method("stage_contrast", model, {"premature": "last_stable"}, stages(critical=2, mutation=[5]))
    assert method.premature_layer() == 4
    ids = method.generate_ids(dict(inputs), STEPS)
    assert ids == manual_decode(model, inputs, dola_js_reference(model, [4], 0.1, 1.0))  # normed lens, one layer


def test_smoothing_equals_blended_layer_forward(tiny):
    model, inputs = tiny
    alpha, m = 0.3, 4
    method = build_method("smoothing", model, {"alpha": alpha}, stages(mutation=[m]))
    ids = method.generate_ids(dict(inputs), STEPS)

    class Blend(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, hidden_states, *args, **kwargs):
            return alpha * self.layer(hidden_states, *args, **kwargs) + (1 - alpha) * hidden_states

    ref = copy.deepcopy(model)
    layers = ref.model.language_model.layers
    layers[m - 1] = Blend(layers[m - 1])
    assert ids == generate_ids(ref, dict(inputs), STEPS)
    assert ids != generate_ids(model, dict(inputs), STEPS)


def test_stable_readout(tiny):
    model, inputs = tiny
    st = stages(critical=2, mutation=[5])
    never = build_method("stable_readout", model, {"threshold": "1e9"}, st)
    assert never.generate_ids(dict(inputs), STEPS) == generate_ids(model, dict(inputs), STEPS)
    always = build_method("stable_readout", model, {"threshold": "0"}, st)
    assert always.readout_layer() == 4
    ids = always.generate_ids(dict(inputs), STEPS)
    assert ids == manual_decode(model, inputs, lambda out, _ids: layer_logp(model, out.hidden_states[4], 4))


def test_vcd_pairs_emit_one_token_and_match_manual_contrast(tiny):
    model, inputs = tiny
    method = build_method("vcd", model)
    doubled = method.prepare(dict(inputs))
    rows = inputs["input_ids"].shape[0]
    all_ids = generate_ids(model, doubled, STEPS, logits_processor=method.processors(None, rows))
    assert all_ids[:rows] == all_ids[rows:]
    noised = doubled["pixel_values"][rows:]

    def choose(out_clean, ids):
        with torch.no_grad():
            out_noise = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=noised)
        c, n = out_clean.logits[:, -1].float(), out_noise.logits[:, -1].float()
        keep = c.softmax(-1) >= 0.1 * c.softmax(-1).max(-1, keepdim=True).values
        return torch.where(keep, 2 * c - n, torch.tensor(-math.inf))

    assert all_ids[:rows] == manual_decode(model, inputs, choose)
    assert build_method("vcd", model).generate_ids(dict(inputs), STEPS) == all_ids[:rows]  # same seed, same noise
    assert method.describe()["layers"] == {"decoding": "greedy"}


def test_vcd_noise_is_drawn_once_per_run_not_per_call(tiny):
    model, inputs = tiny
    method = build_method("vcd", model)
    first, second = (method.prepare(dict(inputs))["pixel_values"] for _ in range(2))
    assert not torch.equal(first, second)  # each batch gets fresh noise
    assert torch.equal(build_method("vcd", model).prepare(dict(inputs))["pixel_values"], first)


def test_vcd_sampling_matches_manual_sampling(tiny):
    model, inputs = tiny
    method = build_method("vcd", model, {"sample": True, "seed": 5})
    assert method.describe()["layers"] == {"decoding": "sample"}
    rows = inputs["input_ids"].shape[0]
    noised = diffusion_noise(inputs["pixel_values"], 500, torch.Generator().manual_seed(5))
    draws = torch.Generator().manual_seed(6)  # the sampling generator: seed + 1

    def choose(out_clean, ids):  # VCD's released sampling: contrast, cut-off, softmax (T=1, top-p=1), multinomial
        with torch.no_grad():
            out_noise = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=noised)
        c, n = out_clean.logits[:, -1].float(), out_noise.logits[:, -1].float()
        keep = c.softmax(-1) >= 0.1 * c.softmax(-1).max(-1, keepdim=True).values
        probs = torch.where(keep, 2 * c - n, torch.tensor(-math.inf)).softmax(-1)
        return F.one_hot(torch.multinomial(probs, 1, generator=draws)[:, 0], probs.shape[-1]).float()

    ids = method.generate_ids(dict(inputs), STEPS)
    assert len(ids) == rows
    assert ids == manual_decode(model, inputs, choose)
    assert ids != build_method("vcd", model, {"seed": "5"}).generate_ids(dict(inputs), STEPS)  # sampling != greedy


def test_diffusion_noise_schedule():
    x = torch.ones(200_000)
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (0.005 - 1e-5) + 1e-5
    abar = float(torch.prod(1 - betas[:501]))
    y = diffusion_noise(x, 500, torch.Generator().manual_seed(0))
    assert y.mean().item() == pytest.approx(math.sqrt(abar), abs=0.01)
    assert y.std().item() == pytest.approx(math.sqrt(1 - abar), abs=0.01)
    with pytest.raises(ConfigError):
        diffusion_noise(x, 1000)


def test_bad_options_and_missing_stages(tiny):
    model, _ = tiny
    with pytest.raises(ConfigError, match="unknown method"):
        build_method("nope", model)
    with pytest.raises(ConfigError, match="unknown key 'beta'"):
        make_config("dola", {"beta": "1"})
    with pytest.raises(ConfigError):
        make_config("smoothing", {"alpha": "1.5"})
    with pytest.raises(StageFileError):
        build_method("smoothing", model)
    with pytest.raises(StageFileError, match="no mutation"):
        build_method("smoothing", model, stages=stages(mutation=[])).smoothed_layers()
    assert set(method_names()) >= {"greedy", "dola", "vcd", "stable_readout", "smoothing", "stage_contrast"}


def test_flagged_smoothing_touches_only_flagged_tokens(tiny):
    model, inputs = tiny
    st = stages(mutation=[4])
    never = build_method("smoothing", model, {"alpha": "0", "threshold": "1e9"}, st)
    assert never.generate_ids(dict(inputs), STEPS) == generate_ids(model, dict(inputs), STEPS)
    always = build_method("smoothing", model, {"alpha": 0, "threshold": 0}, st)
    first = [row[0] for row in always.generate_ids(dict(inputs), 1)]

    class LastBypass(torch.nn.Module):  # layer 4 skipped at the last position only
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, hidden_states, *args, **kwargs):
            out = self.layer(hidden_states, *args, **kwargs).clone()
            out[:, -1] = hidden_states[:, -1]
            return out

    ref = copy.deepcopy(model)
    ref.model.language_model.layers[3] = LastBypass(ref.model.language_model.layers[3])
    with torch.no_grad():
        logits = ref(**inputs).logits[:, -1]
    assert first == logits.argmax(-1).tolist()


def test_dynamic_readout_reads_the_layer_before_the_spike(tiny):
    model, inputs = tiny
    crit = 2
    method = build_method("stable_readout", model, {"threshold": 0, "dynamic": True}, stages(critical=crit))

    def choose(out, _ids):
        logps = [layer_logp(model, out.hidden_states[l], l) for l in range(crit, LAYERS + 1)]
        rows = []
        for b in range(logps[0].shape[0]):
            js = []
            for a, c in zip(logps[:-1], logps[1:]):
                m = torch.logaddexp(a[b], c[b]) - math.log(2)
                js.append(0.5 * ((a[b].exp() * (a[b] - m)).sum() + (c[b].exp() * (c[b] - m)).sum()))
            rows.append(logps[int(torch.stack(js).argmax())][b])
        return torch.stack(rows)

    assert method.generate_ids(dict(inputs), STEPS) == manual_decode(model, inputs, choose)


def test_processors_validate_arguments_and_refuse_beams_and_doubled_batches(tiny):
    from evotool.mitigate.processors import LayerContrast, PairContrast, StableReadout
    from evotool.models.registry import decoder_parts
    from evotool.trace import LayerCapture

    model, inputs = tiny
    capture = LayerCapture(decoder_parts(model))
    for make, message in [(lambda: LayerContrast(capture, [], 0.1), "non-empty"),
                          (lambda: LayerContrast(capture, [LAYERS + 1], 0.1), f"0..{LAYERS}"),
                          (lambda: LayerContrast(capture, [2], 0.0), "alpha"),
                          (lambda: StableReadout(capture, 2, 1, 0.1, 1.0), "readout layer"),
                          (lambda: StableReadout(capture, 2, None, 0.1, 0.0), "mix"),
                          (lambda: PairContrast(1.0, 1.5), "beta"),
                          (lambda: PairContrast(1.0, 0.1, pairs=0), "rows")]:
        with pytest.raises(ConfigError, match=message):
            make()
    rows = inputs["input_ids"].shape[0]
    dola = build_method("dola", model)
    with pytest.raises(ConfigError, match="num_beams > 1"), LayerCapture(dola.parts) as cap:
        generate_ids(model, dict(inputs), 2, num_beams=2, logits_processor=dola.processors(cap, rows))
    vcd = build_method("vcd", model)
    with pytest.raises(ConfigError, match="doubled by another method"), LayerCapture(dola.parts) as cap:
        generate_ids(model, vcd.prepare(dict(inputs)), 2, logits_processor=dola.processors(cap, rows))

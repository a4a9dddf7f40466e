"""The trace against transformers' own outputs: hidden states, logits and generated tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version

from conftest import ARCHS, VARIANTS, build_tiny, make_inputs
from evotool.lens import NormedLens, ReferenceLens
from evotool.models.registry import decoder_parts
from evotool.trace import LayerCapture, trace_batch


def test_capture_equals_output_hidden_states(arch: str) -> None:
    model = build_tiny(arch)
    parts = decoder_parts(model)
    inputs = make_inputs(model, arch)
    with torch.no_grad(), LayerCapture(parts) as cap:
        out = model(**inputs, output_hidden_states=True)
        states = cap.stacked()
    ref = out.hidden_states
    assert len(ref) == parts.num_layers + 1 == states.shape[0]
    # HF: entries 0..L-1 are raw layer inputs/outputs; entry L is already passed through the final norm.
    for layer in range(parts.num_layers):
        torch.testing.assert_close(states[layer], ref[layer][:, -1, :])
    torch.testing.assert_close(parts.norm(states[-1]), ref[-1][:, -1, :])


def test_lens_at_last_layer_is_model_output(arch: str) -> None:
    model = build_tiny(arch)
    parts = decoder_parts(model)
    inputs = make_inputs(model, arch)
    with torch.no_grad(), LayerCapture(parts) as cap:
        out = model(**inputs)
        states = cap.stacked()
        model_logp = torch.log_softmax(out.logits[:, -1, :].float(), -1)
        for lens in (NormedLens(parts), ReferenceLens(parts)):
            torch.testing.assert_close(lens.log_probs(states)[-1], model_logp, atol=1e-5, rtol=1e-5)
        # the reference lens differs from the normed one below the last layer (raw states into the head)
        assert not torch.allclose(NormedLens(parts).log_probs(states)[1], ReferenceLens(parts).log_probs(states)[1])


@pytest.mark.parametrize("name", [*ARCHS, *VARIANTS])
def test_lens_softcap_is_where_the_model_applies_it(name: str) -> None:
    """Layer L's lens equals the model's logits with large logits, where soft-capping (or its absence) shows.

    Configs as the real checkpoints: PaliGemma 2 (Gemma 2 decoder) caps at 30 (transformers >= 5.23; earlier
    releases return uncapped logits); the tiny Gemma 3 config carries final_logit_softcapping=30 in its text
    config, which Gemma3ForConditionalGeneration ignores.
    """
    arch, text = VARIANTS.get(name, (name, None))
    model = build_tiny(arch, text=text)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(300.0)  # logits of size ~100: a cap at 30 changes them
    parts = decoder_parts(model)
    inputs = make_inputs(model, arch)
    with torch.no_grad(), LayerCapture(parts) as cap:
        logits = model(**inputs).logits[:, -1, :].float()
        states = cap.stacked()
        raw = parts.lm_head(parts.norm(states[-1])).float()
    assert raw.abs().max() > 60  # uncapped head logits are large
    capped = model.config.get_text_config().model_type == "gemma2" and Version(transformers.__version__) >= Version("5.23")
    assert (logits.abs().max() <= 30.0) == capped
    torch.testing.assert_close(NormedLens(parts).logits(states)[-1], logits, atol=1e-3, rtol=1e-4)


def test_trace_matches_generate_and_per_step_forward() -> None:
    model = build_tiny("llava", layers=6)
    parts = decoder_parts(model)
    inputs = make_inputs(model, "llava", batch=2, pad_first=2)
    traces = trace_batch(model, parts, NormedLens(parts), inputs, max_new_tokens=6, keep_features=True)
    plain = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    for b, tr in enumerate(traces):
        assert tr.token_ids.tolist() == plain[b, : len(tr.token_ids)].tolist()
        assert tr.layers["p_token"].shape == (len(tr.token_ids), 7)
    # independent recomputation of step 1 for row 1: full forward on prompt + first token, all hidden states
    ids = torch.cat([inputs["input_ids"], plain[:, :1]], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], output_hidden_states=True)
    hs = torch.stack([h[1, -1] for h in out.hidden_states[:-1]] + [out.hidden_states[-1][1, -1]])
    with torch.no_grad():
        logp = torch.log_softmax(model.lm_head(torch.cat([parts.norm(hs[:-1]), hs[-1:]])).float(), -1)
    tok = traces[1].token_ids[1]
    np.testing.assert_allclose(traces[1].layers["p_token"][1], logp[:, tok].exp().numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(traces[1].features[1, :-1].astype(np.float32), hs[:-1].numpy(), rtol=1e-2, atol=1e-2)


def test_direct_effect_against_hidden_states() -> None:
    """direct_flip / direct_js of layer l: the lens of the final state without layer l's own update h_l - h_{l-1}."""
    model = build_tiny("llava", layers=6)
    parts = decoder_parts(model)
    inputs = make_inputs(model, "llava", batch=1)
    trace = trace_batch(model, parts, NormedLens(parts), inputs, max_new_tokens=4)[0]
    layers = trace.layers
    assert np.isnan(layers["direct_flip"][:, 0]).all() and np.isnan(layers["direct_js"][:, 0]).all()
    # without its update, the last layer leaves layer L-1's state: the same readout as the lens at L-1
    np.testing.assert_allclose(layers["direct_js"][:, -1], layers["js_final"][:, -2], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(layers["direct_flip"][:, -1], (layers["top1"][:, -2] != trace.token_ids).astype(float))
    # step 0, layer 3, recomputed from output_hidden_states and the last layer's raw output (a plain forward hook)
    last: list[torch.Tensor] = []
    handle = parts.layers[-1].register_forward_hook(lambda _m, _a, out: last.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    handle.remove()
    hs = [h[0, -1] for h in out.hidden_states]
    state = last[0][0, -1] - (hs[3] - hs[2])
    with torch.no_grad():
        logp = torch.log_softmax(model.lm_head(parts.norm(state)).float(), -1)
        final = torch.log_softmax(out.logits[0, -1].float(), -1)
    mix = 0.5 * (logp.exp() + final.exp())
    js = 0.5 * ((logp.exp() * (logp - mix.log())).sum() + (final.exp() * (final - mix.log())).sum())
    np.testing.assert_allclose(layers["direct_js"][0, 3], js.item(), rtol=1e-3, atol=1e-6)
    assert layers["direct_flip"][0, 3] == float(logp.argmax() != final.argmax())

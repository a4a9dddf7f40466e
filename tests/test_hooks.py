"""The hook utility against the model's own ``output_hidden_states`` and hand-built references."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny, make_inputs

from evotool.hooks import after_forward, capture_states, replace_forward, transform_outputs
from evotool.models.registry import decoder_parts


@pytest.fixture(scope="module")
def tiny():
    model = build_tiny("llava", layers=3, seed=2)
    return model, decoder_parts(model), make_inputs(model, "llava", batch=2)


def hook_count(modules) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)


def test_capture_states_equals_output_hidden_states(tiny) -> None:
    model, parts, inputs = tiny
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states  # the last one is after the final norm
        hooks_before = hook_count(parts.layers)  # transformers adds its own recording hooks on first use
        with capture_states(parts.layers) as states:
            model(**inputs)
    for i in range(parts.num_layers):
        torch.testing.assert_close(states[i], hidden[i])
    torch.testing.assert_close(parts.norm(states[-1]), hidden[-1])
    assert hook_count(parts.layers) == hooks_before


def test_a_captured_position_does_not_keep_the_whole_sequence_alive(tiny) -> None:
    model, parts, inputs = tiny
    assert inputs["input_ids"].shape[1] > 1
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        with capture_states(parts.layers, lambda h: h[:, -1].detach()) as states:
            model(**inputs)
    for i in range(parts.num_layers):
        torch.testing.assert_close(states[i], hidden[i][:, -1])
        assert states[i].untyped_storage().nbytes() == states[i].numel() * states[i].element_size()


def test_transform_outputs_blends_and_replace_forward_skips(tiny) -> None:
    model, parts, inputs = tiny
    layer = parts.layers[1]
    hooks_before = hook_count([layer])
    with torch.no_grad():
        with capture_states(parts.layers) as before:
            model(**inputs)
        with transform_outputs([layer], lambda x, y: 0.25 * y + 0.75 * x), capture_states(parts.layers) as states:
            model(**inputs)  # hooks run in registration order: the capture sees the blended output
        torch.testing.assert_close(states[2], 0.25 * before[2] + 0.75 * before[1])
        with replace_forward([layer], lambda _m, _f: lambda hidden_states, *a, **kw: hidden_states), \
                capture_states(parts.layers) as states:
            assert layer.forward is not type(layer).forward
            model(**inputs)
        torch.testing.assert_close(states[2], states[1])
    assert hook_count([layer]) == hooks_before and "forward" not in vars(layer)


def test_hooks_are_removed_on_error(tiny) -> None:
    model, parts, inputs = tiny
    hooks_before = hook_count([model])
    calls = []
    with pytest.raises(RuntimeError, match="boom"), after_forward(model, lambda: calls.append(1)), \
            replace_forward([parts.layers[0]], lambda _m, _f: lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("boom"))):
        model(**inputs)
    with torch.no_grad():
        model(**inputs)
    assert calls == [] and hook_count([model]) == hooks_before and "forward" not in vars(parts.layers[0])

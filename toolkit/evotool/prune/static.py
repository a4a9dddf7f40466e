"""Static pruning: remove decoder layers in place so that the result saves and reloads as a plain checkpoint.

Layer numbering as in the analysis: decoder layer ``i`` (1..L) is ``parts.layers[i - 1]``.
After :func:`remove_layers` the model is an ordinary model of its class with ``L - k`` layers:
the ``ModuleList`` is rebuilt, every ``layer_idx`` attribute inside the kept layers is re-indexed
0..L-k-1 (so the KV cache stays dense), the text config's ``num_hidden_layers`` is set and every
per-layer list in the text config (``layer_types`` ...) is trimmed to the kept layers.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from evotool.errors import ConfigError
from evotool.models.registry import DecoderParts, decoder_parts


def check_layers(layers: Iterable[int], num_layers: int) -> list[int]:
    """Sorted unique layers, each in 1..L; a :class:`ConfigError` otherwise or when all layers would go."""
    out = sorted({int(i) for i in layers})
    bad = [i for i in out if not 1 <= i <= num_layers]
    if bad:
        raise ConfigError(f"layers {bad} outside 1..{num_layers}")
    if len(out) >= num_layers:
        raise ConfigError(f"cannot remove all {num_layers} decoder layers")
    return out


def _layers_attribute(parts: DecoderParts) -> str:
    for name, child in parts.decoder.named_children():
        if child is parts.layers:
            return name
    raise ConfigError("the decoder's layer list is not a direct child of the decoder")


def remove_layers(model: nn.Module, removed: Iterable[int]) -> list[int]:
    """Delete decoder layers ``removed`` (1..L) from ``model`` in place; returns the kept layers' old numbers."""
    parts = decoder_parts(model)
    n = parts.num_layers
    drop = set(check_layers(removed, n))
    kept = [i for i in range(1, n + 1) if i not in drop]
    new_layers = nn.ModuleList([parts.layers[i - 1] for i in kept])
    for new_idx, layer in enumerate(new_layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    setattr(parts.decoder, _layers_attribute(parts), new_layers)
    configs = {id(c): c for c in (model.config.get_text_config(), getattr(parts.decoder, "config", None)) if c is not None}
    for cfg in configs.values():
        for key, value in list(vars(cfg).items()):
            if isinstance(value, (list, tuple)) and len(value) == n and key != "num_hidden_layers":
                setattr(cfg, key, type(value)(value[i - 1] for i in kept))
        cfg.num_hidden_layers = len(kept)
    return kept

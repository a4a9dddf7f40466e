"""Where the pieces of each architecture live, kept as data keyed by ``model_type``.

For the analysis a VLM is: a decoder (the language model) with a ``ModuleList`` of layers, a final
norm, an LM head and optional final-logit soft-capping. Unknown model types go through
:func:`discover`, which finds those pieces by structure; if that fails, a :class:`ModelError`
names the model type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from evotool.errors import ModelError
from evotool.models.compat import PALIGEMMA_SOFTCAPS


@dataclass(frozen=True)
class ArchSpec:
    """Attribute paths (dotted, from the top-level ``...ForConditionalGeneration`` model)."""

    decoder: str  # the text model holding `layers` and `norm`
    layers: str = "layers"  # relative to decoder
    norm: str = "norm"  # relative to decoder
    lm_head: str = "lm_head"
    # text-config attribute with the final-logit soft-cap value, set only where the model's forward applies it
    softcap: str | None = None


_LM = "model.language_model"
# Soft-capping as transformers' ...ForConditionalGeneration.forward applies it: PaliGemma caps with its text
# config's value (PaliGemma 2's Gemma 2 decoder: 30; PaliGemma 1's Gemma decoder has none) since transformers 5.23
# (5.22 and earlier return uncapped logits); Gemma 3 never caps (only Gemma3ForCausalLM does); the other
# architectures have no final-logit soft-capping.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llava": ArchSpec(_LM),
    "llava_next": ArchSpec(_LM),
    "llava_onevision": ArchSpec(_LM),
    "vipllava": ArchSpec(_LM),
    "qwen2_vl": ArchSpec(_LM),
    "qwen2_5_vl": ArchSpec(_LM),
    "qwen3_vl": ArchSpec(_LM),
    "idefics3": ArchSpec("model.text_model"),
    "smolvlm": ArchSpec("model.text_model"),
    "paligemma": ArchSpec(_LM, softcap="final_logit_softcapping" if PALIGEMMA_SOFTCAPS else None),
    "gemma3": ArchSpec(_LM),
    "mistral3": ArchSpec(_LM),
    "internvl": ArchSpec(_LM),
    "aya_vision": ArchSpec(_LM),
}


@dataclass
class DecoderParts:
    """Handles on the modules the lens and the interventions need.

    ``layers[i - 1]`` produces analysis layer ``i`` (1..L); layer 0 is the input of ``layers[0]``.
    """

    model_type: str
    decoder: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module
    softcap: float | None

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _get(root: nn.Module, path: str) -> nn.Module:
    obj: object = root
    for name in path.split("."):
        obj = getattr(obj, name)
    if not isinstance(obj, nn.Module):
        raise AttributeError(path)
    return obj


def discover(model: nn.Module) -> ArchSpec:
    """Find the decoder by structure: the module whose ``layers`` is the longest ModuleList next to a ``norm``,
    outside any vision tower. Raises :class:`ModelError` when nothing fits."""
    best: tuple[int, str] | None = None
    for name, module in model.named_modules():
        layers = getattr(module, "layers", None)
        if not isinstance(layers, nn.ModuleList) or not hasattr(module, "norm"):
            continue
        if any(part in name for part in ("vision", "visual", "image", "audio")):
            continue
        if best is None or len(layers) > best[0]:
            best = (len(layers), name)
    if best is None or model.get_output_embeddings() is None:
        raise ModelError(
            f"unknown architecture {model.config.model_type!r}: no decoder with layers, a final norm and an "
            "LM head was found; add an ArchSpec to evotool.models.registry.ARCHITECTURES"
        )
    # as the text-only ...ForCausalLM models that have the attribute (Gemma 2 / 3) apply it
    return ArchSpec(decoder=best[1], softcap="final_logit_softcapping")


def decoder_parts(model: nn.Module) -> DecoderParts:
    """Resolve the decoder pieces of ``model`` from the table, else by :func:`discover`."""
    model_type = model.config.model_type
    spec = ARCHITECTURES.get(model_type) or discover(model)
    try:
        decoder = _get(model, spec.decoder)
        layers = _get(decoder, spec.layers)
        norm = _get(decoder, spec.norm)
        lm_head = _get(model, spec.lm_head) if spec.lm_head else model.get_output_embeddings()
    except AttributeError as err:
        raise ModelError(f"model type {model_type!r}: expected module {err} not found") from err
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"model type {model_type!r}: {spec.decoder}.{spec.layers} is not a list of layers")
    softcap = getattr(model.config.get_text_config(), spec.softcap, None) if spec.softcap else None
    return DecoderParts(model_type, decoder, layers, norm, lm_head, softcap)


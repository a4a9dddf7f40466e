"""Logit lenses: read every layer's hidden state through the model's own output head.

A :class:`Lens` maps stacked hidden states [L+1, B, H] (layer 0 = embedding output, layer i =
output of decoder layer i) to log-probabilities [L+1, B, V] in one matmul over all layers, so the
LM head is read once per step. Implementations differ in how a state is prepared for the head.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from evotool.errors import ConfigError
from evotool.models.registry import DecoderParts


class Lens(ABC):
    """Interface: hidden states [L+1, B, H] -> log-probabilities [L+1, B, V] (float32)."""

    name: str

    def __init__(self, parts: DecoderParts) -> None:
        self.parts = parts

    @abstractmethod
    def prepare(self, states: torch.Tensor) -> torch.Tensor:
        """States [L+1, B, H] as the LM head should see them."""

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Head logits [L+1, B, V] (soft-capped where the model soft-caps)."""
        x = self.prepare(states)
        logits = self.parts.lm_head(x.to(self.parts.lm_head.weight.dtype)).float()
        cap = self.parts.softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def log_probs(self, states: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [L+1, B, V] in float32."""
        return torch.log_softmax(self.logits(states), dim=-1)


class NormedLens(Lens):
    """The sound default: the final norm before the head at every layer, so layer L equals the model's output."""

    name = "normed"

    def prepare(self, states: torch.Tensor) -> torch.Tensor:
        return self.parts.norm(states)


class ReferenceLens(Lens):
    """The paper's scripts: raw states into the head for layers 0..L-1, the (already normed) last layer normed."""

    name = "reference"

    def prepare(self, states: torch.Tensor) -> torch.Tensor:
        return torch.cat([states[:-1], self.parts.norm(states[-1:])], dim=0)


LENSES: dict[str, type[Lens]] = {cls.name: cls for cls in (NormedLens, ReferenceLens)}


def make_lens(name: str, parts: DecoderParts) -> Lens:
    """The lens called ``name`` ("normed" or "reference")."""
    if name not in LENSES:
        raise ConfigError(f"unknown lens {name!r}; choose one of {sorted(LENSES)}")
    return LENSES[name](parts)

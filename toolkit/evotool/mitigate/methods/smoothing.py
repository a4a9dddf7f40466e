"""``smoothing``: SHIFT-style blending of the mutation layers' output with their input (stage-aware)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from evotool import metrics
from evotool.errors import ConfigError, StageFileError
from evotool.hooks import transform_outputs
from evotool.lens import NormedLens
from evotool.mitigate.base import Method, check_unit
from evotool.models.registry import DecoderParts


@contextmanager
def blend_layers(parts: DecoderParts, layers: Sequence[int], alpha: float, threshold: float | None = None) -> Iterator[None]:
    """Decoder layer ``m`` (for each ``m`` in ``layers``, 1..L) outputs ``alpha * out + (1 - alpha) * in``;
    ``alpha = 0`` bypasses the layer.

    ``threshold=None`` blends every position. With a threshold only the last position of the rows whose
    layer changes the lens distribution by more than ``threshold`` (JS between the normed-lens readouts
    of its input and output, nats) is blended: a runtime mutation flag for the token being decoded.
    """
    lens = NormedLens(parts)

    def blend(inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:  # [B, T, H] each
        if threshold is None:
            return alpha * out + (1 - alpha) * inp
        last = lens.log_probs(torch.stack([inp[:, -1], out[:, -1]]))  # [2, B, V]
        flag = metrics.js_divergence(last[1], last[0]) > threshold  # [B]
        mixed = out.clone()
        mixed[:, -1] = torch.where(flag[:, None], alpha * out[:, -1] + (1 - alpha) * inp[:, -1], out[:, -1])
        return mixed

    with transform_outputs([parts.layers[m - 1] for m in layers], blend):
        yield


@dataclass
class SmoothingConfig:
    """Mutation-layer smoothing (SHIFT-style): out = alpha * out + (1 - alpha) * in at the mutation layers,
    everywhere or (``threshold``) only for flagged tokens."""

    TUNE_GRID: ClassVar[dict[str, list[Any]]] = {"alpha": [0.0, 0.25, 0.5, 0.75], "threshold": [None, 0.1]}

    alpha: float = field(default=0.5, metadata={"help": "weight of the mutation layer's own output (0 = bypass the layer)"})
    layers: list[int] | None = field(default=None, metadata={"help": "layers to smooth; default: the stage file's mutation layers"})
    threshold: float | None = field(default=None, metadata={"help": "None: every position; else only the decoded token, when the layer's JS (nats) exceeds it"})

    def __post_init__(self) -> None:
        check_unit(self, "alpha", open_low=False)
        if self.threshold is not None and self.threshold < 0:
            raise ConfigError("threshold must be >= 0")


class Smoothing(Method):
    """The mutation layers (or ``layers``) blended towards their input during generation."""

    name = "smoothing"
    config_cls = SmoothingConfig
    layer_options = ("layers",)
    needs_stages = True

    def smoothed_layers(self) -> list[int]:
        layers = self.config.layers if self.config.layers is not None else self.stages.mutation_layers
        if not layers:
            raise StageFileError(f"{self.stages.source} has no mutation layers")
        bad = [m for m in layers if not 1 <= m <= self.num_layers]
        if bad:
            raise ConfigError(f"layers {bad} outside 1..{self.num_layers}")
        return list(layers)

    @contextmanager
    def hooks(self) -> Iterator[None]:
        with blend_layers(self.parts, self.smoothed_layers(), self.config.alpha, self.config.threshold):
            yield

    def layers_used(self) -> dict[str, Any]:
        return {"smoothed": self.smoothed_layers()}

    def shifted(self, shift: int) -> dict[str, Any] | None:
        layers = [m + shift for m in self.smoothed_layers()]
        return {"layers": layers} if all(1 <= m <= self.num_layers for m in layers) else None


METHOD = Smoothing

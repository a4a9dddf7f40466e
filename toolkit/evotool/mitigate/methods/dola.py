"""``dola``: Decoding by Contrasting Layers (Chuang et al. 2024); defaults = transformers 4.4x's ``_dola_decoding``, greedy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import LogitsProcessor

from evotool.errors import ConfigError
from evotool.mitigate.base import Method, check_unit
from evotool.mitigate.processors import LayerContrast
from evotool.trace import LayerCapture


def dola_candidates(num_layers: int, bucket: str | Sequence[int], tied_embeddings: bool) -> list[int]:
    """DoLa's premature-layer candidates for an ``L``-layer model, as in its released code / transformers 4.4x.

    ``low``: even layers of the first half, ``high``: even layers of the second half (for ``L > 40`` the
    first / last 20 layers). With tied embeddings layer 0 is skipped (its lens is an identity readout).
    A list of layers is kept as given, less those ``>= L``.
    """
    if not isinstance(bucket, str):
        layers = [int(i) for i in bucket if int(i) < num_layers]
        if not layers or min(layers) < 0:
            raise ConfigError(f"dola layers {list(bucket)} leave no premature layer in 0..{num_layers - 1}")
        return layers
    if bucket not in ("low", "high"):
        raise ConfigError(f"dola layers must be 'low', 'high' or a list of layers, not {bucket!r}")
    start = 0 if not tied_embeddings else (2 if num_layers > 2 else (1 if num_layers == 2 else 0))
    if bucket == "high":
        return list(range(num_layers // 2, num_layers, 2) if num_layers <= 40 else range(num_layers - 20, num_layers, 2))
    if start == num_layers // 2:
        return [start]
    return list(range(start, num_layers // 2, 2) if num_layers <= 40 else range(start, 20, 2))


@dataclass
class DolaConfig:
    """DoLa as transformers 4.4x's ``generate(dola_layers=...)`` (greedy); ``lens`` / ``selection`` switch to evotool's variants."""

    layers: str | list[int] = field(default="high", metadata={"help": "candidate premature layers: low, high (halves of the even layers) or a list, e.g. 2,4"})
    lens: str = field(default="raw", metadata={"help": "premature readout: raw (LM head on the state, as published) or normed (final norm first)"})
    selection: str = field(default="reference", metadata={"help": "premature layer choice: reference (one per batch, transformers' kl_div score) or js (per row, Jensen-Shannon)"})
    alpha: float = field(default=0.1, metadata={"help": "adaptive plausibility constraint (relative top)"})
    repetition_penalty: float = field(default=1.2, metadata={"help": "applied to the contrasted scores (DoLa recommends 1.2)"})

    def __post_init__(self) -> None:
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        elif isinstance(self.layers, str) and self.layers not in ("low", "high"):
            parts = [p.strip() for p in self.layers.split(",")]
            if not all(p.isdigit() for p in parts):
                raise ConfigError(f"dola layers must be low, high or a list of layers, not {self.layers!r}")
            self.layers = [int(p) for p in parts]
        elif not isinstance(self.layers, str):
            self.layers = [int(i) for i in self.layers]
        if self.lens not in ("raw", "normed"):
            raise ConfigError(f"dola lens must be raw or normed, not {self.lens!r}")
        if self.selection not in ("reference", "js"):
            raise ConfigError(f"dola selection must be reference or js, not {self.selection!r}")
        check_unit(self, "alpha")
        if self.repetition_penalty <= 0:
            raise ConfigError("repetition_penalty must be > 0")


class Dola(Method):
    """The final layer contrasted with a premature candidate layer chosen at every step."""

    name = "dola"
    config_cls = DolaConfig
    uses_capture = True

    def candidates(self) -> list[int]:
        # as transformers 4.4x: the top-level config's flag (PretrainedConfig's default True when absent)
        tied = bool(getattr(self.model.config, "tie_word_embeddings", True))
        return dola_candidates(self.num_layers, self.config.layers, tied)

    def processors(self, capture: LayerCapture, rows: int) -> list[LogitsProcessor]:
        cfg = self.config
        return [LayerContrast(capture, self.candidates(), cfg.alpha, 1.0, cfg.repetition_penalty, cfg.lens, cfg.selection,
                              rows)]

    def layers_used(self) -> dict[str, Any]:
        return {"candidates": self.candidates()}


METHOD = Dola

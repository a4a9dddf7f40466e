"""``stable_readout``: on a mutation spike, read the token from the last stable layer (stage-aware)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers import LogitsProcessor

from evotool.errors import ConfigError, StageFileError
from evotool.mitigate.base import Method, check_unit
from evotool.mitigate.processors import StableReadout
from evotool.trace import LayerCapture


@dataclass
class StableReadoutConfig:
    """Stage-aware readout: on a mutation spike, read the token from the last stable layer."""

    TUNE_GRID: ClassVar[dict[str, list[Any]]] = {"threshold": [0.05, 0.1, 0.2], "mix": [0.5, 1.0], "dynamic": [False, True]}

    threshold: float = field(default=0.1, metadata={"help": "max adjacent-layer JS (nats) after the critical layer that flags a mutation"})
    mix: float = field(default=1.0, metadata={"help": "weight of the stable layer's distribution on flagged tokens (1 = take it)"})
    layer: int | None = field(default=None, metadata={"help": "readout layer; default: the last layer of the stabilization stage"})
    dynamic: bool = field(default=False, metadata={"help": "read, per token, the layer just before its largest JS spike (ignores layer)"})

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise ConfigError("threshold must be >= 0")
        check_unit(self, "mix")


class Readout(Method):
    """Flagged tokens read from the stable stage; the others keep the model's own output."""

    name = "stable_readout"
    config_cls = StableReadoutConfig
    layer_options = ("layer",)
    needs_stages = True
    uses_capture = True

    def critical(self) -> int:
        """The stage file's critical layer; a StageFileError when no layer follows it (nothing to read out from)."""
        if self.stages.critical >= self.num_layers:
            raise StageFileError(f"{self.stages.source}: the critical layer is the last one ({self.stages.critical}), so "
                                 "no layer follows it: stable_readout has no stabilization stage to read from")
        return self.stages.critical

    def unchecked_layer(self) -> int:
        """``layer``, else the last stable layer of the stage file (the output itself where no mutation stage follows),
        not yet range-checked; refused as :meth:`critical` is."""
        self.critical()
        return self.config.layer if self.config.layer is not None else self.stages.last_stable

    def readout_layer(self) -> int:
        layer = self.unchecked_layer()
        return self.in_range(layer, self.stages.critical, "readout", self.config.layer is not None,
                             f"no mutation stage, so the stabilization stage ends at the output layer ({layer}) and "
                             "stable_readout would read out the output itself (no change); give layer= or dynamic=true")

    def processors(self, capture: LayerCapture, rows: int) -> list[LogitsProcessor]:
        layer = None if self.config.dynamic else self.readout_layer()
        return [StableReadout(capture, self.critical(), layer, self.config.threshold, self.config.mix, rows)]

    def shifted(self, shift: int) -> dict[str, Any] | None:
        layer = self.unchecked_layer() + shift
        return None if self.config.dynamic or not self.stages.critical <= layer < self.num_layers else {"layer": layer}

    def layers_used(self) -> dict[str, Any]:
        if self.config.dynamic:
            return {"critical": self.critical(), "readout": "before_spike"}
        return {"critical": self.critical(), "readout": self.readout_layer()}


METHOD = Readout

"""``stage_contrast``: DoLa's contrast with the premature layer taken from the analysis (stage-aware)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers import LogitsProcessor

from evotool.errors import ConfigError
from evotool.mitigate.base import Method, check_unit
from evotool.mitigate.processors import LayerContrast
from evotool.trace import LayerCapture


@dataclass
class StageContrastConfig:
    """Stage-aware contrast: DoLa's contrast with the premature layer taken from the analysis."""

    TUNE_GRID: ClassVar[dict[str, list[Any]]] = {"premature": ["critical", "last_stable"], "weight": [-0.5, 0.5, 1.0],
                                                 "alpha": [0.1, 0.01]}

    premature: str = field(default="critical", metadata={"help": "critical (the critical layer) or last_stable (end of the stabilization stage)"})
    layer: int | None = field(default=None, metadata={"help": "premature layer (0..L-1) given directly; replaces premature"})
    alpha: float = field(default=0.1, metadata={"help": "adaptive plausibility constraint"})
    weight: float = field(default=1.0, metadata={"help": "log p_final - weight * log p_premature; negative = geometric mixing towards the premature layer"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "repetition penalty on the contrasted scores"})

    def __post_init__(self) -> None:
        if self.premature not in ("critical", "last_stable"):
            raise ConfigError(f"premature must be critical or last_stable, not {self.premature!r}")
        check_unit(self, "alpha")
        if self.layer is not None and self.layer < 0:
            raise ConfigError(f"layer must be >= 0, got {self.layer}")
        if not -1.0 <= self.weight <= 2.0 or self.repetition_penalty <= 0:
            raise ConfigError("weight must lie in [-1, 2] and repetition_penalty be > 0")


class StageContrast(Method):
    """The final layer contrasted with the critical (or last stable) layer of the stage file."""

    name = "stage_contrast"
    config_cls = StageContrastConfig
    layer_options = ("premature", "layer")
    needs_stages = True
    uses_capture = True

    def unchecked_layer(self) -> int:
        """``layer``, else the layer ``premature`` names in the stage file; either may be the output itself."""
        if self.config.layer is not None:
            return self.config.layer
        return self.stages.critical if self.config.premature == "critical" else self.stages.last_stable

    def premature_layer(self) -> int:
        layer = self.unchecked_layer()
        return self.in_range(layer, 0, "premature", self.config.layer is not None,
                             f"premature={self.config.premature} is the last layer ({layer}), so stage_contrast would "
                             "contrast the output with itself")

    def processors(self, capture: LayerCapture, rows: int) -> list[LogitsProcessor]:
        return [LayerContrast(capture, [self.premature_layer()], self.config.alpha, self.config.weight,
                              self.config.repetition_penalty, rows=rows)]

    def layers_used(self) -> dict[str, Any]:
        return {"premature": self.premature_layer()}

    def shifted(self, shift: int) -> dict[str, Any] | None:
        layer = self.unchecked_layer() + shift
        return {"layer": layer} if 0 <= layer < self.num_layers else None


METHOD = StageContrast

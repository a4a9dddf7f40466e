"""``stage_speculative``: lossless speed-up, self-speculative greedy decoding whose draft skips stable-stage
layers (:mod:`evotool.prune.speculative`, with its config :class:`~evotool.prune.speculative.SpeculativeConfig`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from PIL import Image
from torch import nn

from evotool.mitigate.base import Method
from evotool.prune.speculative import SpeculativeConfig, SpeculativeStats, resolve_plan
from evotool.stages import StageFile


class StageSpeculative(Method):
    """The tokens are plain greedy's. ``auto`` calibrates on first use (in the eval harness: the untimed
    warm-up) at the batch size of that call."""

    name = "stage_speculative"
    config_cls = SpeculativeConfig
    needs_stages = True
    changes_outputs = False

    def __init__(self, model: nn.Module | None, config: Any = None, stages: StageFile | None = None) -> None:
        super().__init__(model, config, stages)
        self.processor: Any = None
        self.stats = SpeculativeStats()
        self.calibration: Any = None
        self.plan = None
        fixed_plan = self.config.layers is not None or (self.config.skip != "auto" and self.config.redundancy != "influence")
        if model is not None and fixed_plan:
            self.resolve()  # a bad skip set fails before anything runs (the plan needs the model)

    def resolve(self, batch_size: int = 1, samples: Sequence[Any] | None = None) -> Any:
        """The :class:`~evotool.prune.speculative.DraftPlan` (calibrated on first call for ``auto``)."""
        if self.plan is None:
            self.plan, self.calibration = resolve_plan(self.model, self.stages, self.config, self.processor, samples,
                                                       batch_size)
        return self.plan

    @contextmanager
    def generation_kwargs(self, rows: int = 1) -> Iterator[dict[str, Any]]:
        """The draft plan as ``model.generate`` kwargs (transformers' ``custom_generate`` callable and its options)."""
        yield self.resolve(rows).generate_kwargs(self.stats)

    def generate(self, model: nn.Module, processor: Any, images: Sequence[Image.Image], prompts: Sequence[str],
                 max_new_tokens: int = 256) -> tuple[list[list[int]], list[str]]:
        self.processor = processor
        return super().generate(model, processor, images, prompts, max_new_tokens)

    def layers_used(self) -> dict[str, Any]:
        if self.plan is None:
            return {"skip": f"{self.config.skip} (not resolved yet)"}
        return {"skip": self.plan.skip, "max_draft": self.plan.max_draft, "speculative": self.stats.summary(),
                "calibration": self.calibration.summary() if self.calibration else None}


METHOD = StageSpeculative

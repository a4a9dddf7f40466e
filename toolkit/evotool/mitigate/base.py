"""The decoding-method interface: a :class:`Method` is bound to one model and runs on top of ``model.generate``.

A method may expand the inputs (VCD adds noised-image rows), activate forward hooks (smoothing) and add
logits processors (:mod:`evotool.mitigate.processors`) that read the per-layer states of the current step
from :class:`~evotool.trace.LayerCapture`. ``Method.generate`` has the signature of
:func:`evotool.generation.greedy_generate`, so any eval that takes a ``generate_fn`` runs any method.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from evotool.config import to_dict
from evotool.errors import ConfigError, StageFileError
from evotool.generation import build_inputs, context_length, decode, generate_ids
from evotool.models.registry import decoder_parts
from evotool.stages import StageFile
from evotool.trace import LayerCapture


def check_unit(cfg: Any, *names: str, open_low: bool = True) -> None:
    """ConfigError unless every named field of ``cfg`` lies in (0, 1] (``open_low``) or [0, 1]."""
    for name in names:
        value = getattr(cfg, name)
        if not (0.0 < value <= 1.0 if open_low else 0.0 <= value <= 1.0):
            raise ConfigError(f"{name}={value} must lie in {'(0' if open_low else '[0'}, 1]")


class Method:
    """A decoding method bound to one model. Subclasses set ``name`` / ``config_cls`` and override
    :meth:`prepare`, :meth:`processors`, :meth:`hooks` and :meth:`layers_used` as needed.

    ``needs_stages``: the method reads the model's :class:`StageFile`; ``uses_capture``: its processors read
    :class:`LayerCapture` states; ``changes_batch``: :meth:`prepare` adds rows (VCD), so paired rows must
    decode greedily and plain ``generate`` kwargs cannot express the method; ``changes_outputs``: its tokens can
    differ from greedy's (False for greedy and lossless speed-ups, which ``evotool mitigate --data`` therefore
    does not try); ``layer_options``: the config options that only choose the layers :meth:`layers_used` reports.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type]
    layer_options: ClassVar[tuple[str, ...]] = ()
    needs_stages: ClassVar[bool] = False
    uses_capture: ClassVar[bool] = False
    changes_batch: ClassVar[bool] = False
    changes_outputs: ClassVar[bool] = True

    def __init__(self, model: nn.Module | None, config: Any = None, stages: StageFile | None = None) -> None:
        """``model`` None: a stage-aware method checked against ``stages`` alone (its layers, e.g. before
        ``export-generate`` writes anything); such a method cannot decode."""
        self.model = model
        self.config = config if config is not None else self.config_cls()
        if self.needs_stages and stages is None:
            raise StageFileError(f"method {self.name!r} needs the model's stage file (--stages, from `evotool analyze`)")
        if model is None and stages is None:
            raise ValueError("a method needs a model, or a stage file to be checked against")
        self.parts = decoder_parts(model) if model is not None else None
        self.stages = stages

    @property
    def num_layers(self) -> int:
        """L, the decoder layers: the model's, else the stage file's (equal for a stage file of the model)."""
        return self.parts.num_layers if self.parts is not None else self.stages.num_layers  # type: ignore[union-attr]

    def prepare(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs [B, ...] -> the batch ``generate`` runs (default: unchanged)."""
        return inputs

    def processors(self, capture: LayerCapture | None, rows: int) -> list[LogitsProcessor]:
        """Logits processors of one generation call over ``rows`` input rows (``capture`` is None unless ``uses_capture``)."""
        return []

    @contextmanager
    def hooks(self) -> Iterator[None]:
        """Forward hooks active during generation."""
        yield

    @contextmanager
    def generation_kwargs(self, rows: int = 1) -> Iterator[dict[str, Any]]:
        """The method's hooks (and layer capture) active; yields the ``model.generate`` keyword arguments of
        one generation call over ``rows`` input rows, on a batch already passed through :meth:`prepare`
        (``logits_processor``, if any)."""
        with ExitStack() as stack:
            stack.enter_context(self.hooks())
            capture = stack.enter_context(LayerCapture(self.parts)) if self.uses_capture else None
            procs = self.processors(capture, rows)
            yield {"logits_processor": LogitsProcessorList(procs)} if procs else {}

    def generate_ids(self, inputs: dict[str, torch.Tensor], max_new_tokens: int, **generate_kwargs: Any) -> list[list[int]]:
        """New token ids per input row (cut after EOS); greedy unless ``generate_kwargs`` say otherwise
        (e.g. ``stopping_criteria``, or sampling settings)."""
        if self.changes_batch and generate_kwargs.get("do_sample"):
            raise ConfigError(f"method {self.name!r} picks one token for each pair of rows: sample with its own "
                              "option sample=true, not with generate's do_sample")
        rows = inputs["input_ids"].shape[0]
        batch = self.prepare(inputs)
        with self.generation_kwargs(rows) as kwargs:
            ids = generate_ids(self.model, batch, max_new_tokens, **kwargs, **generate_kwargs)
        return ids[:rows]

    def generate(self, model: nn.Module, processor: Any, images: Sequence[Image.Image], prompts: Sequence[str],
                 max_new_tokens: int = 256) -> tuple[list[list[int]], list[str]]:
        """Same contract as :func:`evotool.generation.greedy_generate` (``model`` must be the bound model)."""
        if model is not self.model:
            raise ValueError("method bound to another model")
        inputs = build_inputs(processor, images, prompts, model.device, model.dtype, context_length(model))
        ids = self.generate_ids(inputs, max_new_tokens)
        return ids, decode(processor, ids)

    def describe(self) -> dict[str, Any]:
        """Name, config and the layers the method acts on (for results files)."""
        return {"method": self.name, "config": to_dict(self.config), "layers": self.layers_used()}

    def layers_used(self) -> dict[str, Any]:
        """The layers the method reads or changes, by role (e.g. ``{"premature": 3}``)."""
        return {}

    def in_range(self, layer: int, low: int, role: str, given: bool, refusal: str) -> int:
        """``layer`` when it lies in ``low``..L-1 (L, the output itself, is nothing to read or contrast with); else a
        ConfigError naming the range when the user ``given`` it, or the stage file's StageFileError ``refusal``."""
        if low <= layer < self.num_layers:
            return layer
        if given:
            raise ConfigError(f"{role} layer {layer} must lie in {low}..{self.num_layers - 1}")
        raise StageFileError(f"{self.stages.source}: {refusal}")  # type: ignore[union-attr]

    def decodes_as(self) -> str:
        """Equal for two methods of one model that decode alike: the name, the layers used and the other options
        (e.g. ``premature=last_stable`` moved to layer 5 and ``premature=critical`` where the critical layer is 5)."""
        options = {k: v for k, v in to_dict(self.config).items() if k not in self.layer_options}
        return json.dumps([self.name, self.layers_used(), options], sort_keys=True, default=str)

    def shifted(self, shift: int) -> dict[str, Any] | None:
        """Options that move the layers this method derives from the stage file by ``shift`` (e.g. the premature
        layer C -> C+1); None when it derives none or the moved layers leave the valid range."""
        return None

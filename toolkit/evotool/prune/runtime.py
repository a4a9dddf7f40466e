"""Runtime layer skipping and early exit (no new checkpoint), as context managers over a loaded model.

Skipping replaces a decoder layer's ``forward`` with the identity for the duration of the context, so
the skipped layers cost nothing. Layer numbering 1..L as in the analysis.

KV cache (the choice, documented in docs/prune.md):

* Fixed skips (:func:`skip_layers`, the paper's named modes in :data:`MODES`, :func:`exit_after`):
  a skipped layer is skipped for every position of prompt and answer, so nothing ever reads its cache
  slot; the slot stays empty and the cache of the run layers keeps its original indices. The output is
  exactly that of the statically pruned model (tested). Layer 1 and the first layer of each attention
  type (:func:`cache_reference_layers`) cannot be skipped at runtime: the cache length and the masks are
  read from their slots (remove them statically instead).
* Per-token dynamic exit (:class:`DynamicExit`): a token that exits at layer e still needs keys/values
  in layers e+1..L for later tokens. They are filled CALM-style by *state propagation*: each deeper
  layer runs only its attention sub-block (input norm + self-attention, which writes the cache) on the
  exit state h_e, its MLP is skipped and its output discarded. Later tokens therefore attend to keys and
  values computed from h_e, exactly as a full forward over the sequence in which the exited positions
  pass h_e through the deeper layers would (the reference the tests check against).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from evotool import metrics
from evotool.errors import ConfigError, StageFileError
from evotool.hooks import Forward, replace_forward
from evotool.lens import NormedLens
from evotool.models.registry import decoder_parts
from evotool.prune.static import check_layers
from evotool.stages import StageFile


def attention_types(model: nn.Module) -> list[str]:
    """The attention type of each decoder layer (text config ``layer_types``; empty where the config has none)."""
    return list(getattr(model.config.get_text_config(), "layer_types", None) or [])


def cache_reference_layers(model: nn.Module) -> list[int]:
    """Decoder layers (1..L) whose KV-cache slot transformers reads for the cache length and the attention
    masks: layer 1 and the first layer of each attention type (text config ``layer_types``, e.g. Gemma 3's
    first full-attention layer)."""
    types = attention_types(model)
    return sorted({1} | {types.index(t) + 1 for t in set(types)})


def check_runtime_skip(model: nn.Module, layers: Iterable[int]) -> list[int]:
    """Sorted layers (1..L) that can be skipped at runtime; :class:`ConfigError` for a cache-reference layer."""
    out = check_layers(layers, decoder_parts(model).num_layers)
    fixed = sorted(set(out) & set(cache_reference_layers(model)))
    if fixed:
        raise ConfigError(f"decoder layer(s) {fixed} cannot be skipped at runtime (the KV cache length and the "
                          "attention masks are read from their cache slots); remove them statically with "
                          "`evotool prune` instead")
    return out


@contextmanager
def skip_layers(model: nn.Module, layers: Iterable[int]) -> Iterator[list[int]]:
    """Run ``model`` with decoder layers ``layers`` (1..L, no cache-reference layer) replaced by the identity."""
    parts = decoder_parts(model)
    chosen = check_runtime_skip(model, layers)
    with replace_forward([parts.layers[i - 1] for i in chosen], lambda _m, _f: lambda hidden_states, *a, **kw: hidden_states):
        yield chosen


@contextmanager
def exit_after(model: nn.Module, layer: int) -> Iterator[list[int]]:
    """Static early exit: stop after decoder layer ``layer``; the final norm and head read its state."""
    n = decoder_parts(model).num_layers
    if not 1 <= layer <= n:
        raise ConfigError(f"exit layer {layer} outside 1..{n}")
    with skip_layers(model, range(layer + 1, n + 1)) as skipped:
        yield skipped


def _stable_layers(stages: StageFile) -> list[int]:
    first, last = stages.stable_range
    return list(range(first, last + 1))


def _mutation_layers(stages: StageFile) -> list[int]:
    if not stages.mutation_layers:
        raise StageFileError(f"{stages.source} has no mutation layers")
    return list(stages.mutation_layers)


# The paper's three variants (Wang et al. 2025, section 5) and the stage-end exit, as layer sets to skip.
MODES: dict[str, Callable[[StageFile], list[int]]] = {
    "skip-stable": _stable_layers,
    "skip-mutation": _mutation_layers,
    "critical-to-last5": lambda st: list(range(st.critical + 1, st.num_layers - 4)),
    "exit-stable-end": lambda st: list(range(st.stable_range[1] + 1, st.num_layers + 1)),
}


def mode_layers(mode: str, stages: StageFile) -> list[int]:
    """The layers (1..L) a named runtime mode skips, from a stage file."""
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; choose one of {sorted(MODES)}")
    layers = MODES[mode](stages)
    if not layers:
        raise ConfigError(f"mode {mode} skips no layer for these stages")
    return layers


class DynamicExit:
    """Per-step early exit when the lens distribution has converged, with CALM-style KV propagation.

    At every decoding step (one new position) after each checked layer e (``min_layer`` <= e < L), the
    normed lens of the last position is tested: ``confidence`` (top-1 probability >= ``threshold``) or
    ``js`` (JS to the previous layer's lens <= ``threshold`` nats). When every row of the batch has
    converged, layers e+1..L only propagate h_e into their KV cache and pass it through, so the final
    norm and head read h_e. The prompt (prefill) always runs all layers. ``exits`` records, per forward
    pass, the exit layer (L when none).
    """

    def __init__(self, model: nn.Module, criterion: str = "confidence", threshold: float = 0.9, min_layer: int = 2) -> None:
        if criterion not in ("confidence", "js"):
            raise ConfigError(f"unknown exit criterion {criterion!r}; choose confidence or js")
        self.parts = decoder_parts(model)
        n = self.parts.num_layers
        if not 2 <= min_layer <= n:
            raise ConfigError(f"min_layer must lie in 2..{n}")
        self.lens = NormedLens(self.parts)
        self.criterion, self.threshold, self.min_layer = criterion, threshold, min_layer
        self.exits: list[int] = []
        self._exit_state: torch.Tensor | None = None
        self._exit_layer: int | None = None
        self._prev_logp: torch.Tensor | None = None
        self._stack = ExitStack()

    def _converged(self, index: int, state: torch.Tensor) -> bool:
        logp = self.lens.log_probs(state[None, :, -1])[0]  # [B, V]
        prev, self._prev_logp = self._prev_logp, logp
        if self.criterion == "confidence":
            return bool((logp.max(-1).values.exp() >= self.threshold).all())
        if prev is None:
            return False
        return bool((metrics.js_divergence(logp, prev) <= self.threshold).all())

    def _wrap(self, index: int, layer: nn.Module, original: Forward) -> Forward:
        n = self.parts.num_layers

        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if index == 1:
                self._exit_state, self._exit_layer, self._prev_logp = None, None, None
            if self._exit_state is not None:
                self._propagate(layer, original, self._exit_state, args, kwargs)
                out = self._exit_state
            else:
                out = original(hidden_states, *args, **kwargs)
                decoding = hidden_states.shape[1] == 1
                if decoding and index < n and index >= self.min_layer - (self.criterion == "js"):
                    if self._converged(index, out) and index >= self.min_layer:
                        self._exit_state, self._exit_layer = out, index
            if index == n:
                self.exits.append(self._exit_layer or n)
            return out

        return forward

    @staticmethod
    def _propagate(layer: nn.Module, original: Forward, state: torch.Tensor, args: tuple, kwargs: dict) -> None:
        """Fill ``layer``'s KV cache from ``state``: its attention sub-block only (full layer if it has none)."""
        norm, attn = getattr(layer, "input_layernorm", None), getattr(layer, "self_attn", None)
        if norm is None or attn is None or args:
            original(state, *args, **kwargs)
        else:
            attn(hidden_states=norm(state), **kwargs)

    def __enter__(self) -> DynamicExit:
        for i, layer in enumerate(self.parts.layers, start=1):
            self._stack.enter_context(replace_forward([layer], lambda m, original, i=i: self._wrap(i, m, original)))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

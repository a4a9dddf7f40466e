"""Layer hooks as context managers: capture states, transform outputs, replace forwards.

Every intervention on decoder layers goes through these (trace capture, calibration, runtime skips and
exits, mitigation blending), so hooks are always removed and forwards always restored, also on error.

Hooks on one module run in the order they were entered: enter a transform before a capture to capture the
transformed output. Layer numbering as in the analysis: ``layers[i - 1]`` is decoder layer ``i``; "layer 0" is the input of
decoder layer 1 (the embedding output).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

Forward = Callable[..., Any]


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-state argument [B, T, H] of a decoder layer call."""
    return args[0] if args else kwargs["hidden_states"]


def layer_output(output: Any) -> torch.Tensor:
    """The hidden state [B, T, H] of a decoder layer's output (a tensor or a tuple led by one)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def _removing(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def compact(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or a copy where it is a view into a larger storage, so that the rest can be freed (the
    last position [B, H] of a prefill's [B, T, H] output would otherwise keep all T positions alive)."""
    return tensor if tensor.untyped_storage().nbytes() <= tensor.numel() * tensor.element_size() else tensor.clone()


@contextmanager
def capture_states(layers: Sequence[nn.Module], select: Callable[[torch.Tensor], torch.Tensor] = torch.Tensor.detach
                   ) -> Iterator[list[torch.Tensor | None]]:
    """Yield ``states`` [L+1], refreshed on every forward pass: ``states[0] = select(input of layers[0])``,
    ``states[i] = select(output of layers[i - 1])``; ``select`` maps [B, T, H] to what is kept (copied where it is
    a view of part of the layer's output, :func:`compact`)."""
    states: list[torch.Tensor | None] = [None] * (len(layers) + 1)

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        states[0] = compact(select(layer_input(args, kwargs)))

    def make_hook(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            states[index] = compact(select(layer_output(output)))

        return hook

    handles = [layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers, start=1)]
    with _removing(handles):
        yield states


@contextmanager
def transform_outputs(modules: Sequence[nn.Module], fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                      ) -> Iterator[None]:
    """Each module's hidden-state output becomes ``fn(input, output)`` (both [B, T, H]); the rest of a tuple
    output is kept. With ``fn = lambda x, y: a * y + (1 - a) * x`` a layer is blended, with ``a = 0`` bypassed."""

    def hook(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        new = fn(layer_input(args, kwargs), layer_output(output))
        return (new, *output[1:]) if isinstance(output, (tuple, list)) else new

    with _removing([m.register_forward_hook(hook, with_kwargs=True) for m in modules]):
        yield


@contextmanager
def replace_forward(modules: Sequence[nn.Module], make: Callable[[nn.Module, Forward], Forward]) -> Iterator[None]:
    """``module.forward = make(module, original_forward)`` for each module, restored on exit. Unlike a hook,
    the original forward does not run unless the replacement calls it (so a skipped layer costs nothing)."""
    for module in modules:
        module.forward = make(module, module.forward)
    try:
        yield
    finally:
        for module in modules:
            del module.forward


@contextmanager
def before_forward(module: nn.Module, fn: Callable[[tuple, dict], None]) -> Iterator[None]:
    """Call ``fn(args, kwargs)`` with the arguments of every forward call of ``module``, before it runs (an
    exception raised by ``fn`` ends the forward pass there)."""
    with _removing([module.register_forward_pre_hook(lambda _m, args, kwargs: fn(args, kwargs), with_kwargs=True)]):
        yield


@contextmanager
def after_forward(module: nn.Module, fn: Callable[[], None]) -> Iterator[None]:
    """Call ``fn()`` after every forward pass of ``module`` (e.g. once per generation step of the whole model)."""
    with _removing([module.register_forward_hook(lambda _m, _a, _o: fn())]):
        yield

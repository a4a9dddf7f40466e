"""Run decoding methods over an eval set, batched and interleaved, with latency relative to greedy.

Latency is wall-clock by default; ``clock="cpu"`` times this process's CPU time instead
(:func:`evotool.prune.speed.timer`), which other processes on a shared CPU do not inflate as long as torch runs
one thread (with several, the timer warns).

:class:`Interleaved` is a ``generate_fn`` (the signature of :func:`evotool.generation.greedy_generate`):
on every batch it builds the inputs once, then times each method's generation on that same batch
(the order rotates from batch to batch), keeps every method's outputs and returns the first
method's. ``replay(name)`` then serves another method's outputs in call order, so an eval that
drives generation itself (:func:`evotool.evals.world.evaluate_world`) scores every method on the
batches that were timed together.

Flat metric keys (results.json; the world eval's are :func:`evotool.evals.world.world_flat`'s): ``chair_s``,
``chair_i``, ``recall``, ``mean_length``,
``pope_<split>_<accuracy|precision|recall|f1|yes_ratio>``, ``amber_<chair|cover|hal|cog>``,
``amber_<accuracy|precision|recall|f1>``, ``latency_s`` (seconds per sample), ``latency_ratio``
(method / greedy, same batches).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from evotool.data.inputs import Sample
from evotool.errors import InputError
from evotool.evals.amber import AmberVocabulary, amber_discriminative_metrics, amber_generative_metrics
from evotool.evals.chair import CocoObjects, score_captions
from evotool.evals.world import evaluate_world, world_flat
from evotool.generation import Generations, build_inputs, context_length, decode, generate_samples
from evotool.mitigate.methods import BASELINE
from evotool.models.loading import process_state, synchronize
from evotool.prune.speed import timer

if TYPE_CHECKING:
    from evotool.mitigate.base import Method


class Interleaved:
    """A ``generate_fn`` running every method on each batch (see the module docstring).

    ``methods`` maps names to methods bound to the same model; the first is what ``__call__`` returns.
    A short untimed warm-up of every method precedes the first timed batch.

    Data parallel (several processes started by ``torchrun`` / ``accelerate launch``): process ``r`` of ``n``
    generates the batches ``r, r + n, ...`` and returns empty outputs for the others; :meth:`gather` then gives
    every process all outputs in batch order, so scoring (e.g. through :meth:`replay`) sees exactly what one
    process would have generated: the batches, and so the padding, are the same.
    """

    def __init__(self, methods: Mapping[str, Method], clock: str = "wall") -> None:
        if not methods:
            raise ValueError("need methods")
        self.methods = dict(methods)
        self.clock = timer(clock)  # ValueError for an unknown clock
        self.outputs: dict[str, Generations] = {name: Generations() for name in self.methods}
        self.samples = 0
        self._calls: dict[int, dict[str, tuple[list[list[int]], list[str], float]]] = {}  # batch -> method -> output
        self._batches = 0
        self._warm = False
        state = process_state()
        self.rank, self.processes = state.process_index, state.num_processes

    def __call__(self, model: torch.nn.Module, processor: Any, images: Sequence[Image.Image], prompts: Sequence[str],
                 max_new_tokens: int = 256, **_: Any) -> tuple[list[list[int]], list[str]]:
        index, self._batches = self._batches, self._batches + 1
        if index % self.processes != self.rank:  # another process generates this batch
            return [[] for _ in prompts], ["" for _ in prompts]
        inputs = build_inputs(processor, images, prompts, model.device, model.dtype, context_length(model))
        names = list(self.methods)
        if not self._warm:
            for name in names:
                self.methods[name].generate_ids(dict(inputs), min(2, max_new_tokens))
            self._warm = True
        shift = index % len(names)
        calls = self._calls[index] = {}
        for name in names[shift:] + names[:shift]:
            synchronize(model.device)
            start = self.clock()
            ids = self.methods[name].generate_ids(dict(inputs), max_new_tokens)
            synchronize(model.device)
            calls[name] = (ids, decode(processor, ids), self.clock() - start)
            self.outputs[name].add(*calls[name])
        self.samples += len(prompts)
        return calls[names[0]][:2]

    def gather(self) -> None:
        """After a data-parallel pass: every process's outputs, in batch order, in every process (no-op in one)."""
        if self.processes == 1:
            return
        from accelerate.utils import gather_object

        parts = gather_object([self._calls])
        self._calls = dict(sorted((pair for part in parts for pair in part.items()), key=lambda pair: pair[0]))
        self.outputs = {name: Generations() for name in self.methods}
        for calls in self._calls.values():
            for name in self.methods:
                self.outputs[name].add(*calls[name])
        self.samples = sum(len(calls[next(iter(self.methods))][0]) for calls in self._calls.values())

    def replay(self, name: str) -> Callable[..., tuple[list[list[int]], list[str]]]:
        """A ``generate_fn`` returning ``name``'s stored outputs of each call, in order."""
        calls = iter([batch[name] for batch in self._calls.values()])

        def generate_fn(_model: Any, _processor: Any, images: Sequence[Any], _prompts: Any, **_: Any):
            ids, texts, _seconds = next(calls)
            if len(ids) != len(images):
                raise RuntimeError("replayed batch does not match the recorded one")
            return ids, texts

        return generate_fn

    def latency(self, baseline: str = BASELINE) -> dict[str, dict[str, float]]:
        """``{method: {"latency_s": seconds per sample, "latency_ratio": vs baseline}}`` (ratio only with the baseline run)."""
        per = {name: out.seconds / max(self.samples, 1) for name, out in self.outputs.items()}
        base = per.get(baseline)
        return {name: {"latency_s": s, **({"latency_ratio": s / base} if base else {})} for name, s in per.items()}


def run_methods(model: torch.nn.Module, processor: Any, methods: Mapping[str, Method], samples: Sequence[Sample],
                batch_size: int, max_new_tokens: int, clock: str = "wall") -> Interleaved:
    """Generate every sample with every method (interleaved per batch). Raises :class:`InputError` on a bad image."""
    runner = Interleaved(methods, clock)
    generate_samples(model, processor, samples, batch_size, max_new_tokens, generate_fn=runner)
    runner.gather()
    return runner


def evaluate_methods(model: torch.nn.Module, processor: Any, methods: Mapping[str, Method], samples: Sequence[Sample],
                     batch_size: int, max_new_tokens: int,
                     score: Callable[[Sequence[Sample], Generations], dict[str, float]],
                     clock: str = "wall") -> dict[str, dict[str, float]]:
    """Every method on ``samples`` (interleaved batches), scored by ``score(samples, outputs)``: ``{method: flat
    metrics}`` including ``latency_s`` and, when ``greedy`` is among the methods, ``latency_ratio``."""
    runner = run_methods(model, processor, methods, samples, batch_size, max_new_tokens, clock)
    latency = runner.latency()
    return {name: score(samples, runner.outputs[name]) | latency[name] for name in methods}


# ----------------------------------------------------------------------------- scoring


def score_chair(samples: Sequence[Sample], gens: Generations, objects: CocoObjects | None = None) -> dict[str, float]:
    """CHAIR_s, CHAIR_i (every mention), recall, mean length (tokens) of captions against ``Sample.objects``."""
    return score_captions(gens.texts, [set(s.objects or ()) for s in samples], objects or CocoObjects(),
                          [len(i) for i in gens.ids])


def score_amber(samples: Sequence[Sample], texts: Sequence[str], vocabulary: AmberVocabulary,
                protocol: str = "official") -> dict[str, float]:
    """``amber_chair/cover/hal/cog`` on generative samples, ``amber_<metric>`` (+ per dimension) on discriminative ones."""
    gen = [i for i, s in enumerate(samples) if s.meta.get("type") == "generative"]
    dis = [i for i, s in enumerate(samples) if s.meta.get("type") != "generative"]
    out: dict[str, float] = {}
    if gen:
        scores = amber_generative_metrics([texts[i] for i in gen], [samples[i].objects or [] for i in gen],
                                          [samples[i].meta.get("hallu", []) for i in gen], vocabulary, protocol)
        out |= {f"amber_{k}": v for k, v in scores.items()}
    if dis:
        scores = amber_discriminative_metrics([texts[i] for i in dis], [samples[i].answer or "" for i in dis],
                                              [samples[i].meta.get("dimension", "existence") for i in dis], protocol)
        out |= {f"amber_{k}": v for k, v in scores.items()}
    if not out:
        raise InputError("no AMBER samples to score")
    return out


def evaluate_world_methods(model: torch.nn.Module, processor: Any, methods: Mapping[str, Method], n: int,
                           world: Any = None, batch_size: int = 50, max_new_tokens: int = 32) -> dict[str, dict[str, float]]:
    """Every method on the synthetic world's eval (same records, interleaved batches): ``{method: flat metrics}``
    including ``latency_s`` and, when ``greedy`` is among the methods, ``latency_ratio``."""
    runner = Interleaved(methods)
    first = next(iter(methods))
    results = {first: evaluate_world(model, processor, n, world, batch_size, max_new_tokens, generate_fn=runner)}
    if runner.processes > 1:  # this process generated only its batches: score everything from the gathered outputs
        runner.gather()
        results = {}
    for name in (m for m in methods if m not in results):
        results[name] = evaluate_world(model, processor, n, world, batch_size, max_new_tokens,
                                       generate_fn=runner.replay(name))
    latency = runner.latency()
    return {name: world_flat(res) | latency[name] for name, res in results.items()}

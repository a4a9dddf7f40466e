"""Prompt building and the one batched generation runner over :class:`~evotool.data.Sample` s, shared by
analysis, pruning, mitigation and evals.

A ``generate_fn`` has the signature of :func:`greedy_generate`: ``(model, processor, images, prompts,
max_new_tokens=..., **kwargs) -> (token ids per row, texts)``; every decoding method's ``generate`` and the
eval harness' interleaved runner are ``generate_fn`` s, so :func:`generate_samples` runs any of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from evotool.data.inputs import Sample
from evotool.errors import InputError

GenerateFn = Callable[..., tuple[list[list[int]], list[str]]]


def chat_prompt(processor: Any, prompt: str) -> str:
    """The model's own chat template around one image and one user turn.

    Processors without a chat template (e.g. PaliGemma) take the raw prompt and add image tokens themselves.
    """
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return prompt


def build_inputs(
    processor: Any,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenised, left-padded batch for ``model.generate``.

    Returns the processor's tensors (``input_ids`` [B, T], ``attention_mask`` [B, T], ``pixel_values`` ...)
    on ``device``; floating tensors are cast to ``dtype`` when given. Raises :class:`InputError`
    when a prompt is longer than ``max_length`` tokens (the model's context).
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    texts = [chat_prompt(processor, p) for p in prompts]
    batch = processor(text=texts, images=[[im] for im in images], return_tensors="pt", padding=True)
    if max_length is not None and batch["input_ids"].shape[1] > max_length:
        raise InputError(
            f"prompt of {batch['input_ids'].shape[1]} tokens exceeds the model's context of {max_length}"
        )
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


def context_length(model: torch.nn.Module) -> int | None:
    """Maximum positions of the language model, if the config states it."""
    cfg = model.config.get_text_config()
    return getattr(cfg, "max_position_embeddings", None)


GREEDY = dict(do_sample=False, num_beams=1, repetition_penalty=None, temperature=None, top_p=None, top_k=None)


@torch.inference_mode()
def generate_ids(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], max_new_tokens: int, **generate_kwargs: Any
) -> list[list[int]]:
    """Greedy ``model.generate`` on prepared inputs; the new token ids per sample, cut after EOS."""
    prompt_len = inputs["input_ids"].shape[1]
    kwargs = dict(GREEDY, **generate_kwargs)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
    return [cut_at_eos(row.tolist(), model) for row in out[:, prompt_len:]]


def greedy_generate(
    model: torch.nn.Module,
    processor: Any,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    max_new_tokens: int = 256,
    **generate_kwargs: Any,
) -> tuple[list[list[int]], list[str]]:
    """Greedy decoding of a batch; returns the new token ids per sample (cut after EOS) and their texts.

    Extra keyword arguments go to ``model.generate`` (e.g. ``logits_processor``).
    """
    inputs = build_inputs(processor, images, prompts, model.device, model.dtype, context_length(model))
    ids = generate_ids(model, inputs, max_new_tokens, **generate_kwargs)
    return ids, decode(processor, ids)


def decode(processor: Any, ids: Sequence[Sequence[int]]) -> list[str]:
    """Texts of token id lists, special tokens dropped."""
    tokenizer = getattr(processor, "tokenizer", processor)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def eos_ids(model: torch.nn.Module) -> set[int]:
    """The token ids that end generation for this model."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


def cut_at_eos(ids: list[int], model: torch.nn.Module) -> list[int]:
    """Ids up to and including the first EOS; trailing padding after EOS dropped."""
    stop = eos_ids(model)
    for i, tok in enumerate(ids):
        if tok in stop:
            return ids[: i + 1]
    return ids


def batches(samples: Sequence[Sample], batch_size: int) -> Iterator[Sequence[Sample]]:
    """Consecutive chunks of at most ``batch_size`` samples."""
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    for start in range(0, len(samples), batch_size):
        yield samples[start : start + batch_size]


def load_images(samples: Sequence[Sample], on_error: Callable[[Sample, InputError], None] | None = None
                ) -> tuple[list[Sample], list[Image.Image]]:
    """The samples whose image loads and their RGB images; a bad image goes to ``on_error`` (default: raise)."""
    kept, images = [], []
    for sample in samples:
        try:
            images.append(sample.load_image())
        except InputError as err:
            if on_error is None:
                raise
            on_error(sample, err)
            continue
        kept.append(sample)
    return kept, images


@dataclass
class Generations:
    """Outputs over a list of samples: new token ids and texts per sample, generation seconds."""

    ids: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, ids: list[list[int]], texts: list[str], seconds: float = 0.0) -> None:
        self.ids += ids
        self.texts += texts
        self.seconds += seconds


def generate_samples(model: torch.nn.Module, processor: Any, samples: Sequence[Sample], batch_size: int,
                     max_new_tokens: int, generate_fn: GenerateFn = greedy_generate, **generate_kwargs: Any) -> Generations:
    """Run ``generate_fn`` over ``samples`` in batches (images loaded per batch; :class:`InputError` on a bad one)."""
    out = Generations()
    for chunk in batches(samples, batch_size):
        _, images = load_images(chunk)
        out.add(*generate_fn(model, processor, images, [s.prompt for s in chunk], max_new_tokens=max_new_tokens,
                             **generate_kwargs))
    return out

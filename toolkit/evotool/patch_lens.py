"""The patch-level lens: what each image patch reads as at every layer, at step 0 (the prefill).

One forward pass over the prompt records, at every layer, the hidden states at the image-token
positions (``input_ids == config.image_token_id``) with :class:`~evotool.trace.LayerCapture`; the
lens is then applied in chunks of patches, so at most ``max_elements`` log-probabilities
([L+1, chunk, V]) exist at once however many patches and vocabulary entries there are. The states
kept meanwhile, [L+1, N, H] for the N image tokens of the batch, are the size of those positions' KV cache.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from evotool.errors import InputError, ModelError
from evotool.lens import Lens
from evotool.models.registry import DecoderParts
from evotool.trace import LayerCapture


@dataclass
class PatchLens:
    """Lens readout at one sample's P image tokens, patches in sequence order.

    ``top1`` [L+1, P] token ids and ``prob`` [L+1, P] their lens probabilities; ``grid`` (rows, cols)
    with rows * cols == P (patch p at row p // cols); ``spatial`` is False when no grid could be
    derived and the patches form a 1 x P strip; ``note`` says where the grid came from.
    """

    top1: np.ndarray
    prob: np.ndarray
    grid: tuple[int, int]
    spatial: bool
    note: str


def image_token_id(config: Any) -> int:
    """The placeholder id the processor repeats once per image token (``image_token_id`` / ``image_token_index``)."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ModelError(f"model type {config.model_type!r} names no image_token_id / image_token_index in its config; "
                     "the patch lens cannot find the image tokens")


def patch_grid(config: Any, inputs: dict[str, torch.Tensor], row: int, count: int) -> tuple[tuple[int, int], bool, str]:
    """(rows, cols), spatial, note for the ``count`` image tokens of batch row ``row``.

    Tried in order, each accepted only when rows * cols == count: ``image_grid_thw`` with the vision
    merge size (Qwen2-VL family); ``image_sizes`` with patch and merge size (Mistral 3 / Pixtral);
    a square grid of the vision config's image / patch size, divided by ``scale_factor`` (Idefics3)
    where set (LLaVA, PaliGemma); ``mm_tokens_per_image`` as a square (Gemma 3). Otherwise a 1 x count strip.
    """
    vision = getattr(config, "vision_config", None)
    patch = getattr(vision, "patch_size", None)
    candidates: list[tuple[int, int, str]] = []
    if "image_grid_thw" in inputs and row < len(inputs["image_grid_thw"]):
        merge = getattr(vision, "spatial_merge_size", 1)
        _, h, w = (int(x) for x in inputs["image_grid_thw"][row])
        candidates.append((h // merge, w // merge, "image_grid_thw / spatial_merge_size"))
    merge = getattr(config, "spatial_merge_size", None)
    if "image_sizes" in inputs and merge and patch and row < len(inputs["image_sizes"]):
        h, w = (int(x) for x in inputs["image_sizes"][row])
        candidates.append((h // (patch * merge), w // (patch * merge), "image_sizes / (patch_size * spatial_merge_size)"))
    size = getattr(vision, "image_size", None)
    if isinstance(size, int) and patch:
        side = size // patch // getattr(config, "scale_factor", 1)
        candidates.append((side, side, f"vision image_size {size} / patch_size {patch}"))
    tokens = getattr(config, "mm_tokens_per_image", None)
    if tokens:
        side = math.isqrt(tokens)
        candidates.append((side, side, "mm_tokens_per_image"))
    for rows, cols, source in candidates:
        if rows * cols == count:
            return (rows, cols), True, f"{rows}x{cols} grid from {source}"
    return (1, count), False, (f"no patch grid derivable for {config.model_type} ({count} image tokens); "
                               "patches shown as a strip in sequence order")


def _prefill_kwargs(model: nn.Module) -> dict[str, Any]:
    """No cache, and logits for the last position only where the model accepts ``logits_to_keep``."""
    kwargs: dict[str, Any] = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return kwargs


@torch.inference_mode()
def patch_lens(model: nn.Module, parts: DecoderParts, lens: Lens, inputs: dict[str, torch.Tensor],
               max_elements: int = 2**25) -> list[PatchLens]:
    """The lens at every image-token position and layer for each row of a prepared batch (step 0).

    ``inputs``: the processor's tensors (``input_ids`` [B, S], ``pixel_values`` ...). Log-probabilities
    are computed ``chunk`` patches at a time, [L+1, chunk, V] with (L+1) * chunk * V <= ``max_elements``
    (at least one patch). Raises :class:`InputError` when a row has no image token.
    """
    mask = inputs["input_ids"] == image_token_id(model.config)  # [B, S]
    counts = mask.sum(dim=1).tolist()
    if not all(counts):
        raise InputError(f"no image tokens in batch rows {[b for b, c in enumerate(counts) if not c]}")

    def select(hidden: torch.Tensor) -> torch.Tensor:  # [B, S, H] -> [N, H]
        if hidden.shape[:2] != mask.shape:
            raise ModelError(f"model type {model.config.model_type!r}: decoder states of shape {tuple(hidden.shape)} "
                             f"do not line up with input_ids {tuple(mask.shape)}; the patch lens cannot place patches")
        return hidden[mask.to(hidden.device)]

    with LayerCapture(parts, select) as capture:
        model(**inputs, **_prefill_kwargs(model))
    states = capture.stacked()  # [L+1, N, H]
    vocab = parts.lm_head.weight.shape[0]
    chunk = max(1, max_elements // (states.shape[0] * vocab))
    top1, prob = [], []
    for start in range(0, states.shape[1], chunk):
        best = lens.log_probs(states[:, start : start + chunk]).max(dim=-1)  # [L+1, chunk]
        top1.append(best.indices.cpu())
        prob.append(best.values.exp().cpu())
    ids, probs = torch.cat(top1, dim=1).numpy(), torch.cat(prob, dim=1).numpy()  # [L+1, N]
    out, offset = [], 0
    for row, count in enumerate(counts):
        grid, spatial, note = patch_grid(model.config, inputs, row, count)
        out.append(PatchLens(ids[:, offset : offset + count].astype(np.int64), probs[:, offset : offset + count],
                             grid, spatial, note))
        offset += count
    return out

"""Greedy generation that records, for every generated token, every layer's last-position state.

:class:`LayerCapture` hooks the decoder layers and keeps, for the current forward pass, the
last-position hidden state of layer 0 (input of the first decoder layer) and of every decoder
layer: ``stacked()`` -> [L+1, B, H]. At step 0 the last position is the last prompt token, then
the newly fed token, as in the paper. :func:`trace_batch` reduces these states to per-layer
metrics on the model's device after every forward pass, so a [layers x tokens x vocab] tensor never
exists for a sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from evotool import metrics
from evotool.generation import generate_ids
from evotool.hooks import after_forward, capture_states
from evotool.lens import Lens
from evotool.models.registry import DecoderParts

# Per-(token, layer) metrics kept for every sample; arrays of shape [T, L+1].
METRICS = ("p_token", "rank", "entropy", "js_prev", "js_final", "cos_prev", "top1", "direct_flip", "direct_js")


def last_position(hidden: torch.Tensor) -> torch.Tensor:
    """[B, S, H] -> [B, H]: the state at the last position."""
    return hidden[:, -1, :]


class LayerCapture:
    """Context manager: forward hooks (:func:`evotool.hooks.capture_states`) recording a selection of each
    layer's state, layers 0..L.

    ``select`` maps a layer's hidden states [B, S, H] to what is kept (default: the last position,
    [B, H]); ``stacked()`` after a forward pass returns the selections stacked, e.g. [L+1, B, H], in
    the model's dtype.
    """

    def __init__(self, parts: DecoderParts, select: Callable[[torch.Tensor], torch.Tensor] = last_position) -> None:
        self.parts = parts
        self.select = select
        self.states: list[torch.Tensor | None] = [None] * (parts.num_layers + 1)
        self._stack = ExitStack()

    def __enter__(self) -> LayerCapture:
        self.states = self._stack.enter_context(capture_states(self.parts.layers, lambda h: self.select(h).detach()))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def stacked(self) -> torch.Tensor:
        """[L+1, ...] selected states of the latest forward pass ([L+1, B, H] by default)."""
        return torch.stack(self.states, dim=0)  # type: ignore[arg-type]


def without_update(states: torch.Tensor) -> torch.Tensor:
    """[L+1, ..., H] -> [L, ...]: the final state minus layer l's own update ``h_l - h_{l-1}``, for l = 1..L."""
    return states[-1:] - (states[1:] - states[:-1])


def lens_with_direct(lens: Lens, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lens log-probs of every layer [L+1, ..., V] and of the final state without each layer's update [L, ..., V],
    in one head matmul over [2L+1, ..., H]."""
    n_layers = states.shape[0]
    logp = lens.log_probs(torch.cat([states, without_update(states)]))
    return logp[:n_layers], logp[n_layers:]


def direct_effect(logp: torch.Tensor, direct: torch.Tensor, js_base: float = math.e) -> dict[str, torch.Tensor]:
    """Layer l's direct effect on the output: ``direct_flip`` (the final top-1 changes without its update, 0/1) and
    ``direct_js`` (JS to the final distribution), [L+1, ...] with NaN at layer 0, from logp [L+1, ..., V] and
    direct [L, ..., V] (:func:`lens_with_direct`)."""
    nan_row = torch.full((1, *logp.shape[1:-1]), float("nan"), device=logp.device)
    final = logp[-1:]
    flip = (direct.argmax(-1) != final.argmax(-1)).float()
    return {"direct_flip": torch.cat([nan_row, flip]),
            "direct_js": torch.cat([nan_row, metrics.js_divergence(direct, final.expand_as(direct), js_base)])}


def reduce_step(logp: torch.Tensor, direct: torch.Tensor | None, states: torch.Tensor, topk: int,
                js_base: float = math.e) -> dict[str, torch.Tensor]:
    """Per-layer metrics of one step for the token the model emits (top-1 of the last layer).

    logp [L+1, B, V] lens log-probabilities, direct [L, B, V] those of the final state without each layer's update
    (None: no direct-effect metrics), states [L+1, B, H]. Returns tensors [L+1, B] (``js_prev``, ``cos_prev`` and the
    direct-effect metrics NaN at layer 0) plus ``topk_ids`` / ``topk_p`` [L+1, B, k] and ``token`` [B].
    """
    n_layers, batch = logp.shape[:2]
    token = logp[-1].argmax(-1)
    logp_tok = logp.gather(-1, token.view(1, batch, 1).expand(n_layers, batch, 1))
    nan_row = torch.full((1, batch), float("nan"), device=logp.device)
    top_p, top_i = logp.topk(topk, dim=-1)
    return {
        "token": token,
        "p_token": logp_tok.squeeze(-1).exp(),
        "rank": (logp > logp_tok).sum(-1).float(),
        "entropy": metrics.entropy(logp, js_base),
        "js_prev": torch.cat([nan_row, metrics.js_divergence(logp[1:], logp[:-1], js_base)]),
        "js_final": metrics.js_divergence(logp, logp[-1:].expand_as(logp), js_base),
        "cos_prev": torch.cat([nan_row, metrics.cosine_similarity(states[1:], states[:-1])]),
        "top1": top_i[..., 0].float(),
        "topk_ids": top_i,
        "topk_p": top_p.exp(),
        **(direct_effect(logp, direct, js_base) if direct is not None else {}),
    }


@dataclass
class SampleTrace:
    """Everything recorded for one sample: T generated tokens, L+1 layers.

    ``layers`` maps each name in :data:`METRICS` to [T, L+1]; ``topk_ids``/``topk_p`` are
    [T, L+1, k]; ``features`` [T, L+1, H] (float16) when kept.
    """

    token_ids: np.ndarray
    layers: dict[str, np.ndarray]
    topk_ids: np.ndarray
    topk_p: np.ndarray
    features: np.ndarray | None = None


@torch.inference_mode()
def trace_batch(
    model: nn.Module,
    parts: DecoderParts,
    lens: Lens,
    inputs: dict[str, torch.Tensor],
    max_new_tokens: int,
    topk: int = 5,
    keep_features: bool = False,
    js_base: float = math.e,
    direct: bool = True,
) -> list[SampleTrace]:
    """Greedy generation over a prepared batch with every step reduced on device.

    ``direct``: also the direct-effect metrics (doubles the lens rows per step: free when the head read dominates, as on
    a GPU; costly on a CPU with a large vocabulary). Returns one :class:`SampleTrace` per row, cut after EOS. Raises RuntimeError if the traced
    top-1 tokens disagree with what ``generate`` emitted (a logits processor changed the choice).
    """
    steps: list[dict[str, torch.Tensor]] = []
    feats: list[torch.Tensor] = []

    def on_forward() -> None:
        states = capture.stacked()
        logp, ablated = lens_with_direct(lens, states) if direct else (lens.log_probs(states), None)
        steps.append(reduce_step(logp, ablated, states, topk, js_base))
        if keep_features:
            feats.append(states.to(torch.float16))

    with LayerCapture(parts) as capture, after_forward(model, on_forward):
        ids = generate_ids(model, inputs, max_new_tokens)
    stacked = {key: torch.stack([s[key] for s in steps]).cpu() for key in steps[0]}  # [T, L+1, B, ...]
    features = torch.stack(feats).cpu().numpy() if keep_features else None
    traces = []
    for b, row in enumerate(ids):
        t = len(row)
        traced = stacked["token"][:t, b].tolist()
        if traced != row:
            raise RuntimeError(f"traced tokens {traced} differ from generated tokens {row}")
        traces.append(
            SampleTrace(
                token_ids=np.asarray(row, dtype=np.int64),
                layers={k: stacked[k][:t, :, b].numpy() for k in METRICS if k in stacked},
                topk_ids=stacked["topk_ids"][:t, :, b].numpy(),
                topk_p=stacked["topk_p"][:t, :, b].numpy(),
                features=features[:t, :, b] if features is not None else None,
            )
        )
    return traces

"""Logits processors of the decoding methods, in the style of transformers' ``logits_process.py``.

Each processor maps the scores [B, V] of one greedy step to new scores [B, V]. Arguments are validated in
``__init__``; at every step the number of rows is checked against the batch the processor was built for,
so beam search (``num_beams > 1``) or a batch doubled by another method fails with a clear error instead of
contrasting the wrong rows. Processors that read intermediate layers take a
:class:`~evotool.trace.LayerCapture` whose hooks ran during the forward pass; ``generate`` calls the
processor right after it.

Layer numbering: 0 = embedding output, ``i`` = output of decoder layer ``i``, ``L`` = the model's own output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from evotool import metrics
from evotool.errors import ConfigError
from evotool.lens import NormedLens
from evotool.trace import LayerCapture


def plausibility_mask(logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """Adaptive plausibility constraint: True where ``p >= alpha * max p`` ([B, V] log-probs -> [B, V] bool).

    The top token always passes (DoLa's ``min_tokens_to_keep=1``).
    """
    return logp >= logp.max(-1, keepdim=True).values + math.log(alpha)


def contrast_scores(final: torch.Tensor, premature: torch.Tensor, alpha: float, weight: float = 1.0) -> torch.Tensor:
    """DoLa contrast ``log p_final - weight * log p_premature`` on plausible tokens, -inf elsewhere ([B, V] each)."""
    final = torch.log_softmax(final.float(), -1)
    premature = torch.log_softmax(premature.float(), -1)
    keep = plausibility_mask(final, alpha)
    return torch.where(keep, final - weight * premature, torch.full_like(final, -math.inf))


def dola_reference_divergence(final: torch.Tensor, premature: torch.Tensor) -> torch.Tensor:
    """transformers 4.4x ``_dola_select_contrast``'s layer score: logits [B, V] and [K, B, V] -> [K].

    With ``m = (p_final + p_premature) / 2``: ``(KL(m || p_final) + KL(m || p_premature)) / 2``, each KL
    averaged (not summed) over the vocabulary by ``F.kl_div(..., reduction="none").mean(-1)``, then averaged
    over the batch: one score per layer, so one premature layer for the whole batch.
    """
    final_logp = torch.log_softmax(final.float(), -1)
    prem_logp = torch.log_softmax(premature.float(), -1)
    avg = 0.5 * (final_logp.exp()[None] + prem_logp.exp())
    kl1 = nn.functional.kl_div(final_logp[None].expand_as(avg), avg, reduction="none").mean(-1)
    kl2 = nn.functional.kl_div(prem_logp, avg, reduction="none").mean(-1)
    return (0.5 * (kl1 + kl2)).mean(-1)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


class RowCheckedProcessor(LogitsProcessor):
    """Base: ``rows`` is the number of score rows every step must have (the batch this processor was built for)."""

    def __init__(self, rows: int) -> None:
        _require(isinstance(rows, int) and rows >= 1, f"{type(self).__name__}: rows must be a positive integer, got {rows!r}")
        self.rows = rows

    def check_rows(self, scores: torch.Tensor) -> None:
        if scores.shape[0] != self.rows:
            raise ConfigError(f"{type(self).__name__} was built for a batch of {self.rows} rows and got {scores.shape[0]} "
                              "rows: build it for the batch it decodes; beam search (num_beams > 1) and batches doubled "
                              "by another method are not supported")


class LayerContrast(RowCheckedProcessor):
    """Scores [B, V] -> DoLa-style contrast of the final layer against a premature layer.

    The final distribution is the model's own output (``scores``); premature ones are read through the
    ``lens``: ``raw`` (the LM head on the layer's state, as DoLa's published code) or ``normed`` (final norm
    and soft-capping first, evotool's lens). With several ``candidates`` the premature layer is chosen per
    step by ``selection``: ``reference`` (one layer for the batch by :func:`dola_reference_divergence`, as
    transformers 4.4x) or ``js`` (per row, the largest Jensen-Shannon divergence); with one it is fixed.
    A repetition penalty (``> 1``) is applied to the contrasted scores, as DoLa recommends. ``chosen``
    keeps the premature layer of every step, [B] each.
    """

    def __init__(self, capture: LayerCapture, candidates: Sequence[int], alpha: float, weight: float = 1.0,
                 repetition_penalty: float = 1.0, lens: str = "normed", selection: str = "js", rows: int = 1) -> None:
        super().__init__(rows)
        _require(lens in ("raw", "normed"), f"lens must be raw or normed, not {lens!r}")
        _require(selection in ("reference", "js"), f"selection must be reference or js, not {selection!r}")
        n = capture.parts.num_layers
        _require(len(candidates) > 0 and all(0 <= c <= n for c in candidates),
                 f"premature layers must be a non-empty list in 0..{n}, got {list(candidates)}")
        _require(0.0 < alpha <= 1.0, f"alpha must lie in (0, 1], got {alpha}")
        _require(repetition_penalty > 0, f"repetition_penalty must be > 0, got {repetition_penalty}")
        self.capture = capture
        self.lens = NormedLens(capture.parts) if lens == "normed" else None
        self.candidates = list(candidates)
        self.alpha = alpha
        self.weight = weight
        self.selection = selection
        self.penalty = RepetitionPenaltyLogitsProcessor(repetition_penalty) if repetition_penalty != 1.0 else None
        self.chosen: list[torch.Tensor] = []

    def premature_logits(self, states: torch.Tensor) -> torch.Tensor:
        """States [K, B, H] -> float32 logits [K, B, V] through the configured lens."""
        if self.lens is not None:
            return self.lens.logits(states)
        head = self.capture.parts.lm_head
        return head(states.to(head.weight.dtype)).float()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.check_rows(scores)
        states = torch.stack([self.capture.states[i] for i in self.candidates])  # [K, B, H]
        premature = torch.log_softmax(self.premature_logits(states), -1)  # [K, B, V]
        final = torch.log_softmax(scores.float(), -1)
        rows = scores.shape[0]
        if len(self.candidates) > 1 and self.selection == "js":
            pick = metrics.js_divergence(final.unsqueeze(0).expand_as(premature), premature).argmax(0)  # [B]
        elif len(self.candidates) > 1:
            pick = dola_reference_divergence(final, premature).argmax().expand(rows)
        else:
            pick = torch.zeros(rows, dtype=torch.long, device=scores.device)
        self.chosen.append(torch.tensor(self.candidates, device=pick.device)[pick])
        base = premature[pick, torch.arange(scores.shape[0], device=scores.device)]
        out = contrast_scores(final, base, self.alpha, self.weight)
        return self.penalty(input_ids, out) if self.penalty is not None else out


class StableReadout(RowCheckedProcessor):
    """Scores [B, V] -> for rows whose adjacent-layer JS after the critical layer spikes above ``threshold``,
    ``log((1 - mix) p_final + mix p_stable)`` with ``p_stable`` the lens distribution of ``stable_layer``
    (``None``: per row, the layer just before its largest spike); other rows unchanged. ``flagged`` keeps
    the per-step [B] flags."""

    def __init__(self, capture: LayerCapture, critical: int, stable_layer: int | None, threshold: float, mix: float,
                 rows: int = 1) -> None:
        super().__init__(rows)
        n = capture.parts.num_layers
        _require(0 <= critical < n, f"critical layer must lie in 0..{n - 1}, got {critical}")
        _require(stable_layer is None or critical <= stable_layer <= n,
                 f"readout layer must lie in {critical}..{n}, got {stable_layer}")
        _require(threshold >= 0, f"threshold must be >= 0, got {threshold}")
        _require(0.0 < mix <= 1.0, f"mix must lie in (0, 1], got {mix}")
        self.capture = capture
        self.lens = NormedLens(capture.parts)
        self.critical = critical
        self.stable = stable_layer
        self.threshold = threshold
        self.mix = mix
        self.flagged: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.check_rows(scores)
        states = torch.stack(self.capture.states[self.critical :])  # layers C..L: [L-C+1, B, H]
        logp = self.lens.log_probs(states)  # [L-C+1, B, V]
        js = metrics.js_divergence(logp[1:], logp[:-1])  # steps into layers C+1..L: [L-C, B]
        peak, where = js.max(0)
        flag = peak > self.threshold
        self.flagged.append(flag)
        final = torch.log_softmax(scores.float(), -1)
        if self.stable is None:  # js[i] is the step into layer C+1+i: the layer before it is logp[i]
            stable = logp[where, torch.arange(scores.shape[0], device=scores.device)]
        else:
            stable = logp[self.stable - self.critical]
        mixed = torch.logaddexp(final + math.log1p(-self.mix), stable + math.log(self.mix)) if self.mix < 1 else stable
        return torch.where(flag[:, None], mixed, final)


class PairContrast(RowCheckedProcessor):
    """VCD over a doubled batch of ``2 * pairs`` rows: rows ``b`` (original image) and ``b + pairs`` (noised
    image) get the same scores, ``(1 + alpha) l_b - alpha l_{b+pairs}`` where ``l_b >= log(beta) + max l_b``,
    -inf elsewhere, so both emit one token.

    With a ``sampler`` (VCD's released sampling: warpers and a generator), the token of each pair is drawn
    here from the warped contrast scores and both rows get 0 at it, -inf elsewhere, so greedy ``generate``
    emits the drawn token.
    """

    def __init__(self, alpha: float, beta: float, pairs: int = 1,
                 sampler: tuple[LogitsProcessorList, torch.Generator] | None = None) -> None:
        super().__init__(2 * pairs)
        _require(alpha >= 0, f"alpha must be >= 0, got {alpha}")
        _require(0.0 < beta <= 1.0, f"beta must lie in (0, 1], got {beta}")
        self.alpha = alpha
        self.beta = beta
        self.sampler = sampler

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.check_rows(scores)
        half = scores.shape[0] // 2
        clean, noised = scores[:half].float(), scores[half:].float()
        cutoff = math.log(self.beta) + clean.max(-1, keepdim=True).values
        out = torch.where(clean >= cutoff, (1 + self.alpha) * clean - self.alpha * noised,
                          torch.full_like(clean, -math.inf))
        if self.sampler is not None:
            warpers, generator = self.sampler
            probs = torch.softmax(warpers(input_ids[:half], out), -1)
            drawn = torch.multinomial(probs.cpu(), 1, generator=generator).to(out.device)  # [B, 1]
            out = torch.full_like(out, -math.inf).scatter_(1, drawn, 0.0)
        return torch.cat([out, out], 0)

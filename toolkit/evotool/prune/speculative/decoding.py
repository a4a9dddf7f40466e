"""Self-speculative greedy decoding: the model with some layers skipped drafts, the full model verifies.

One round, for a committed sequence of length S (the KV cache holds positions 0..S-2):

1. **Draft** up to ``max_draft`` tokens d_1..d_k with the decoder layers of ``skip`` replaced by the
   identity (:func:`evotool.prune.runtime.skip_layers`), one token per forward, greedy; stop early when
   the draft's top-1 probability of an unfinished row falls below ``threshold`` (that token is kept), or
   once every unfinished row has drafted an EOS (tokens after a drafted EOS can never be committed).
2. **Verify** with the full model in one forward over [t_{S-1}, d_1..d_k] (k+1 positions), giving the
   full model's greedy tokens v_1..v_{k+1}. Row b accepts m_b = the longest prefix with d_i = v_i.
3. **Commit** j = min over unfinished rows of (m_b + 1) tokens v_1..v_j to every row (a row whose EOS
   lies in its accepted prefix no longer limits j; its later positions are padding, as in ``generate``).
   All committed tokens are the full model's greedy tokens given a prefix of full-model tokens, so the
   output equals plain greedy decoding by construction, batch included; rows that accepted more than j
   simply redo that work in the next round. The cache is cropped back to S-1+j positions.

KV cache: one ``DynamicCache`` (``cache.activate_past_recording()`` so sliding-window layers can roll
back). During drafting the skipped layers' slots do not grow and the others hold draft keys/values.
Before verifying, every layer is cropped back to S-1, so the verifier recomputes everything it needs —
except with ``reuse_prefix``: the layers before the first skipped layer s see exactly the inputs of the
full model (same tokens, same cache), so their keys/values and their output (the input of layer s) are
the full model's. The draft then feeds d_k through layers 1..s-1 only (the forward stops at layer s),
and verification starts at layer s from the saved states: layers 1..s-1 only re-append their saved
keys/values to the cache (the cache length used for positions and masks is read before any layer runs,
so it must show S-1 then). This saves (s-1) layers x k positions of verifier compute per round (not
layer calls: see :class:`SpeculativeStats`).

Cost accounting (:class:`SpeculativeStats`): a *layer-forward* is one call of one decoder layer in a
batched forward pass, whatever the number of positions; draft step = L - |skip|, prefix-only step =
s-1, verification = L (or L - (s-1) with ``reuse_prefix``). Full-forward equivalents per token =
layer-forwards / L / committed tokens; plain greedy is 1.0. The prompt's prefill (identical to plain
greedy) and the first token it yields are not counted.

The entry point is :func:`speculative_decoding`, a ``custom_generate`` callable, so plain
``model.generate(**inputs, custom_generate=speculative_decoding, draft_skip=[5, 6], ...)`` runs it with
all of ``generate``'s input preparation (multimodal inputs, padding masks, M-RoPE positions, cache).
transformers' own assisted decoding (``assistant_early_exit``, ``prompt_lookup_num_tokens``, a custom
``CandidateGenerator``) cannot host this draft: it is limited to batch size 1, its candidate generator
is chosen inside the private ``_get_candidate_generator`` with no public hook for a custom class, and
its early-exit assistant keeps a second cache and re-runs the prompt.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from evotool.errors import ConfigError
from evotool.generation import GREEDY
from evotool.hooks import Forward, before_forward, layer_input, replace_forward
from evotool.models import compat
from evotool.models.compat import CACHE_KEY
from evotool.models.registry import decoder_parts
from evotool.prune.runtime import attention_types, skip_layers


@dataclass
class SpeculativeStats:
    """Counters of one or more speculative generations (accumulate over calls).

    ``rounds``: verify steps; ``drafted``: draft tokens proposed, summed over unfinished rows;
    ``accepted``: of those, the ones the verifier agreed with (each row's own longest agreeing prefix);
    ``committed``: tokens committed per row (sequence steps, the bonus token included);
    ``layer_forwards``: decoder-layer calls (see the module docstring); ``num_layers``: L;
    ``row_accepts``: per round, the accepted prefix length of each unfinished row.
    """

    num_layers: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    committed: int = 0
    layer_forwards: int = 0
    row_accepts: list[list[int]] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted draft tokens (per row)."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens committed per verify step (accepted drafts + the verifier's own token)."""
        return self.committed / self.rounds if self.rounds else float("nan")

    @property
    def forward_equivalents(self) -> float:
        """Full-model forward equivalents per committed token (plain greedy: 1.0)."""
        return self.layer_forwards / self.num_layers / self.committed if self.committed else float("nan")

    def summary(self) -> dict[str, float]:
        """The headline numbers, for results files."""
        return {"acceptance_rate": self.acceptance_rate, "tokens_per_step": self.tokens_per_step,
                "forward_equivalents": self.forward_equivalents, "rounds": self.rounds, "committed": self.committed}


class _PrefixDone(Exception):
    """Raised at the first skipped layer to end a prefix-only forward."""


@contextmanager
def _capture_input(layer: nn.Module, into: list[torch.Tensor], stop: bool = False) -> Iterator[None]:
    """Append ``layer``'s input hidden states [B, T, H] to ``into`` on every call; with ``stop`` end the forward there."""

    def record(args: tuple, kwargs: dict) -> None:
        into.append(layer_input(args, kwargs))
        if stop:
            raise _PrefixDone

    with before_forward(layer, record):
        yield


@contextmanager
def _replay_prefix(parts: Any, cache: Any, prefix: int, keys: list[torch.Tensor], values: list[torch.Tensor],
                   hidden: torch.Tensor) -> Iterator[None]:
    """Layers 1..``prefix`` append their saved keys/values [B, h, k+1, d] to the cache instead of computing;
    the last of them outputs ``hidden`` [B, k+1, H] (the saved input of layer ``prefix + 1``)."""
    def replay(i: int) -> Forward:
        def forward(hidden_states: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
            cache.layers[i].update(keys[i], values[i])
            return hidden if i == prefix - 1 else hidden_states

        return forward

    with ExitStack() as stack:
        for i in range(prefix):
            stack.enter_context(replace_forward([parts.layers[i]], lambda _m, _f, i=i: replay(i)))
        yield


def _crop(cache: Any, length: int, layers: Sequence[int] | None = None) -> None:
    """Crop cache layers (0-based indices, default all) to ``length`` positions (also trims sliding windows)."""
    for i in range(len(cache.layers)) if layers is None else layers:
        cache.layers[i].crop(-(cache.layers[i].get_seq_length() - length))


def _extend(model: nn.Module, kwargs: dict[str, Any], n: int, outputs: Any = None) -> dict[str, Any]:
    """A copy of the model kwargs with masks / positions / token types grown by ``n`` positions."""
    return model._update_model_kwargs_for_generation(outputs if outputs is not None else {}, dict(kwargs),
                                                     num_new_tokens=n)


def _pad_rows(tokens: torch.Tensor, done: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """``tokens`` [B, n] with padding where ``done`` (broadcast to [B, n]); unchanged without a pad token
    (then no row can finish before the others: ``generate`` has no EOS either)."""
    return tokens if pad is None else torch.where(done, pad, tokens)


def _check_config(config: GenerationConfig, cache: Any) -> None:
    if config.do_sample or (config.num_beams or 1) > 1:
        raise ConfigError("stage speculative decoding is greedy only (do_sample=False, num_beams=1)")
    if any(getattr(config, k, False) for k in ("output_scores", "output_logits", "output_attentions", "output_hidden_states")):
        raise ConfigError("stage speculative decoding returns sequences only (no scores, logits, attentions or hidden states)")
    if cache is None or not hasattr(cache, "layers"):
        raise ConfigError("stage speculative decoding needs a dynamic KV cache (use_cache=True, no static cache)")


@torch.no_grad()
def _check_attention_types(model: nn.Module) -> None:
    types = set(attention_types(model))
    if len(types) > 1 and not compat.MIXED_ATTENTION_OK:
        raise ConfigError(f"stage speculative decoding of a model with several attention types ({', '.join(sorted(types))}) "
                          f"needs transformers >= 5.24 (installed: {transformers.__version__})")


def speculative_decoding(
    model: nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer: Any = None,
    *,
    draft_skip: Sequence[int],
    max_draft: int = 4,
    draft_threshold: float = 0.0,
    reuse_prefix: bool = False,
    speculative_stats: SpeculativeStats | None = None,
    **model_kwargs: Any,
) -> torch.LongTensor | GenerateDecoderOnlyOutput:
    """``custom_generate`` decoding loop (see the module docstring); returns ``sequences`` [B, S_prompt + n].

    ``draft_skip``: decoder layers (1..L) the draft skips (checked by :func:`skip_layers`; pick them with
    :func:`evotool.prune.speculative.plan.check_skip`); ``max_draft``: draft tokens per round;
    ``draft_threshold``: stop drafting once the draft's top-1 probability of an unfinished row is below it;
    ``reuse_prefix``: start verification at the first skipped layer from the draft's states;
    ``speculative_stats``: counters to accumulate into.
    """
    cache = model_kwargs.get(CACHE_KEY)
    _check_config(generation_config, cache)
    _check_attention_types(model)
    if max_draft < 1 or not draft_skip:
        raise ConfigError("speculative decoding needs max_draft >= 1 and at least one skipped layer")
    parts = decoder_parts(model)
    n_layers = parts.num_layers
    first_skip = min(draft_skip)
    stats = speculative_stats if speculative_stats is not None else SpeculativeStats()
    stats.num_layers = n_layers
    pad = generation_config._pad_token_tensor
    eos = generation_config._eos_token_tensor
    cache.activate_past_recording()

    def pick(seq: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy token [B] and its probability [B] after the logits processors."""
        scores = logits_processor(seq, logits.float())
        prob, token = scores.softmax(-1).max(-1)
        return token, prob

    outputs = model._prefill(input_ids, generation_config, model_kwargs)
    model_kwargs = _extend(model, model_kwargs, 1, outputs)
    token, _ = pick(input_ids, outputs.logits[:, -1])
    input_ids = torch.cat([input_ids, token[:, None]], dim=-1)
    unfinished = ~stopping_criteria(input_ids, None)
    if streamer is not None:
        streamer.put(token.cpu())

    while bool(unfinished.any()):
        start = input_ids.shape[1]  # S: the cache holds S - 1 positions
        budget = generation_config.max_length - start
        draft_len = min(max_draft, budget - 1)
        seq, draft_kwargs, states = input_ids, model_kwargs, []
        drafted_end = torch.zeros_like(unfinished)  # rows whose draft reached EOS: later draft tokens are never used
        capture = _capture_input(parts.layers[first_skip - 1], states) if reuse_prefix else nullcontext()
        with skip_layers(model, draft_skip), capture:
            for _ in range(draft_len):
                inputs = model.prepare_inputs_for_generation(seq, next_sequence_length=1, **draft_kwargs)
                out = model(**inputs, return_dict=True)
                draft_kwargs = _extend(model, draft_kwargs, 1, out)
                token, prob = pick(seq, out.logits[:, -1])
                seq = torch.cat([seq, _pad_rows(token[:, None], ~unfinished[:, None], pad)], dim=-1)
                stats.layer_forwards += n_layers - len(draft_skip)
                drafted_end |= torch.isin(token, eos) if eos is not None else drafted_end
                if bool((prob[unfinished] < draft_threshold).any()) or bool(drafted_end[unfinished].all()):
                    break
        k = seq.shape[1] - start
        reuse = reuse_prefix and k > 0
        if reuse:  # feed d_k through layers 1..s-1 only
            inputs = model.prepare_inputs_for_generation(seq, next_sequence_length=1, **draft_kwargs)
            with _capture_input(parts.layers[first_skip - 1], states, stop=True):
                try:
                    model(**inputs, return_dict=True)
                except _PrefixDone:
                    pass
            stats.layer_forwards += first_skip - 1
            prefix = list(range(first_skip - 1))
            keys = [cache.layers[i].keys[..., -(k + 1):, :] for i in prefix]
            values = [cache.layers[i].values[..., -(k + 1):, :] for i in prefix]
        _crop(cache, start - 1)
        inputs = model.prepare_inputs_for_generation(seq, next_sequence_length=k + 1, **_extend(model, model_kwargs, k))
        if "logits_to_keep" in inputs:
            inputs["logits_to_keep"] = k + 1
        if reuse:
            with _replay_prefix(parts, cache, first_skip - 1, keys, values, torch.cat(states, dim=1)):
                out = model(**inputs, return_dict=True)
            stats.layer_forwards += n_layers - (first_skip - 1)
        else:
            out = model(**inputs, return_dict=True)
            stats.layer_forwards += n_layers
        logits = out.logits[:, -(k + 1):]
        if len(logits_processor):
            verified = torch.stack([pick(seq[:, : start + i], logits[:, i])[0] for i in range(k + 1)], dim=1)
        else:
            verified = logits.argmax(dim=-1)  # [B, k+1]
        agree = (seq[:, start:] == verified[:, :k]).long().cumprod(dim=-1).sum(dim=-1)  # m_b [B]
        is_eos = torch.isin(verified, eos) if eos is not None else torch.zeros_like(verified, dtype=torch.bool)
        valid = torch.arange(k + 1, device=seq.device)[None, :] <= agree[:, None]  # v_1..v_{m_b+1} are greedy tokens
        ends = (is_eos & valid).long().argmax(dim=-1)  # first EOS in the valid prefix (if any)
        finishes = (is_eos & valid).any(dim=-1) & unfinished
        limit = torch.where(finishes | ~unfinished, k + 1, agree + 1)
        commit = min(int(limit.min()), budget)
        if bool((finishes | ~unfinished).all()):  # everyone ends this round: stop at the last EOS
            commit = min(int(torch.where(finishes, ends + 1, 0).max()), budget)
        after_end = torch.arange(commit, device=seq.device)[None, :] > ends[:, None]
        new = _pad_rows(verified[:, :commit], ~unfinished[:, None] | (finishes[:, None] & after_end), pad)
        active = int(unfinished.sum())
        stats.rounds += 1
        stats.drafted += k * active
        stats.accepted += int(agree[unfinished].sum())
        stats.committed += commit
        stats.row_accepts.append(agree[unfinished].tolist())
        input_ids = torch.cat([input_ids, new], dim=-1)
        _crop(cache, start - 1 + commit)
        model_kwargs = _extend(model, model_kwargs, commit, out)
        unfinished = unfinished & ~(finishes & (ends < commit)) & ~stopping_criteria(input_ids, None)
        if streamer is not None:
            streamer.put(new.cpu())
    if streamer is not None:
        streamer.end()
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=input_ids, **{CACHE_KEY: cache})
    return input_ids


def speculative_generate(model: nn.Module, inputs: dict[str, torch.Tensor], skip: Sequence[int], max_new_tokens: int,
                         max_draft: int = 4, threshold: float = 0.0, reuse_prefix: bool = False,
                         stats: SpeculativeStats | None = None, **generate_kwargs: Any) -> torch.LongTensor:
    """``model.generate(**inputs)`` greedily with the stage-skipping draft; returns ``sequences`` [B, T + n]
    exactly as plain greedy ``generate`` would (prompt, new tokens, padding after EOS)."""
    kwargs = dict(GREEDY, **generate_kwargs)
    return model.generate(**inputs, max_new_tokens=max_new_tokens, custom_generate=speculative_decoding,
                          draft_skip=list(skip), max_draft=max_draft, draft_threshold=threshold,
                          reuse_prefix=reuse_prefix, speculative_stats=stats, **kwargs)

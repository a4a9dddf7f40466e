"""Decoding-time hallucination mitigation: a registry of methods, all batched on top of ``model.generate``.

Every method is a :class:`Method`: it may expand the inputs (VCD adds noised-image rows), register
forward hooks (smoothing), and add a ``LogitsProcessor`` that reads the per-layer states of the
current step from :class:`~evotool.trace.LayerCapture` (its hooks run during the forward pass;
``generate`` calls the processor right after it). ``Method.generate`` has the signature of
:func:`evotool.generation.greedy_generate`, so any eval that takes a ``generate_fn`` runs any method.

Layer numbering as everywhere in evotool: 0 = embedding output, ``i`` = output of decoder layer ``i``
(``parts.layers[i - 1]``), ``L`` = the model's own output.

Methods (``METHODS``): ``greedy``; baselines ``dola`` (Chuang et al. 2024; defaults = transformers
4.4x's ``_dola_decoding``, greedy) and ``vcd`` (Leng et al. 2024; the published contrast settings,
greedy unless ``sample=true``, which samples as the released scripts do); stage-aware
``stable_readout``, ``smoothing`` and ``stage_contrast``, which read the model's ``stages.json``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from evotool import metrics
from evotool.errors import ConfigError, StageFileError
from evotool.generation import build_inputs, context_length, decode, generate_ids
from evotool.lens import NormedLens
from evotool.models.registry import DecoderParts, decoder_parts
from evotool.prune.speculative import SpeculativeConfig, SpeculativeStats, resolve_plan
from evotool.stages import StageFile
from evotool.trace import LayerCapture

# ----------------------------------------------------------------------------- shared pieces


def plausibility_mask(logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """Adaptive plausibility constraint: True where ``p >= alpha * max p`` ([B, V] log-probs -> [B, V] bool).

    The top token always passes (DoLa's ``min_tokens_to_keep=1``).
    """
    return logp >= logp.max(-1, keepdim=True).values + math.log(alpha)


def contrast_scores(
    final: torch.Tensor, premature: torch.Tensor, alpha: float, weight: float = 1.0
) -> torch.Tensor:
    """DoLa contrast ``log p_final - weight * log p_premature`` on plausible tokens, -inf elsewhere ([B, V] each)."""
    final = torch.log_softmax(final.float(), -1)
    premature = torch.log_softmax(premature.float(), -1)
    keep = plausibility_mask(final, alpha)
    return torch.where(keep, final - weight * premature, torch.full_like(final, -math.inf))


def dola_candidates(num_layers: int, bucket: str | Sequence[int], tied_embeddings: bool) -> list[int]:
    """DoLa's premature-layer candidates for an ``L``-layer model, as in its released code / transformers 4.4x.

    ``low``: even layers of the first half, ``high``: even layers of the second half (for ``L > 40`` the
    first / last 20 layers). With tied embeddings layer 0 is skipped (its lens is an identity readout).
    A list of layers is kept as given, less those ``>= L``.
    """
    if not isinstance(bucket, str):
        layers = [int(i) for i in bucket if int(i) < num_layers]
        if not layers or min(layers) < 0:
            raise ConfigError(f"dola layers {list(bucket)} leave no premature layer in 0..{num_layers - 1}")
        return layers
    if bucket not in ("low", "high"):
        raise ConfigError(f"dola layers must be 'low', 'high' or a list of layers, not {bucket!r}")
    start = 0 if not tied_embeddings else (2 if num_layers > 2 else (1 if num_layers == 2 else 0))
    if bucket == "high":
        return list(range(num_layers // 2, num_layers, 2) if num_layers <= 40 else range(num_layers - 20, num_layers, 2))
    if start == num_layers // 2:
        return [start]
    return list(range(start, num_layers // 2, 2) if num_layers <= 40 else range(start, 20, 2))


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


class LayerContrast(LogitsProcessor):
    """Scores [B, V] -> DoLa-style contrast of the final layer against a premature layer.

    The final distribution is the model's own output (``scores``); premature ones are read through the
    ``lens``: ``raw`` (the LM head on the layer's state, as DoLa's published code) or ``normed`` (final norm
    and soft-capping first, evotool's lens). With several ``candidates`` the premature layer is chosen per
    step by ``selection``: ``reference`` (one layer for the batch by :func:`dola_reference_divergence`, as
    transformers 4.4x) or ``js`` (per row, the largest Jensen-Shannon divergence); with one it is fixed.
    A repetition penalty (``> 1``) is applied to the contrasted scores, as DoLa recommends.
    """

    def __init__(self, capture: LayerCapture, candidates: Sequence[int], alpha: float, weight: float = 1.0,
                 repetition_penalty: float = 1.0, lens: str = "normed", selection: str = "js") -> None:
        self.capture = capture
        self.lens = NormedLens(capture.parts) if lens == "normed" else None
        self.candidates = list(candidates)
        self.alpha = alpha
        self.weight = weight
        self.selection = selection
        self.penalty = RepetitionPenaltyLogitsProcessor(repetition_penalty) if repetition_penalty != 1.0 else None
        self.chosen: list[torch.Tensor] = []  # premature layer per step, [B] each (for inspection)

    def premature_logits(self, states: torch.Tensor) -> torch.Tensor:
        """States [K, B, H] -> float32 logits [K, B, V] through the configured lens."""
        if self.lens is not None:
            return self.lens.logits(states)
        head = self.capture.parts.lm_head
        return head(states.to(head.weight.dtype)).float()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
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


class StableReadout(LogitsProcessor):
    """Scores [B, V] -> for rows whose adjacent-layer JS after the critical layer spikes above ``threshold``,
    ``log((1 - mix) p_final + mix p_stable)`` with ``p_stable`` the lens distribution of ``stable_layer``
    (``None``: per row, the layer just before its largest spike); other rows unchanged. ``flagged`` keeps
    the per-step [B] flags."""

    def __init__(self, capture: LayerCapture, critical: int, stable_layer: int | None, threshold: float, mix: float) -> None:
        self.capture = capture
        self.lens = NormedLens(capture.parts)
        self.critical = critical
        self.stable = stable_layer
        self.threshold = threshold
        self.mix = mix
        self.flagged: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
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


class PairContrast(LogitsProcessor):
    """VCD over a doubled batch: rows ``b`` (original image) and ``b + B`` (noised image) get the same scores,
    ``(1 + alpha) l_b - alpha l_{b+B}`` where ``l_b >= log(beta) + max l_b``, -inf elsewhere, so both emit one token.

    With a ``sampler`` (VCD's released sampling), the token of each pair is drawn here from the warped
    contrast scores and both rows get 0 at it, -inf elsewhere, so greedy ``generate`` emits the drawn token.
    """

    def __init__(self, alpha: float, beta: float, sampler: tuple[LogitsProcessorList, torch.Generator] | None = None) -> None:
        self.alpha = alpha
        self.beta = beta
        self.sampler = sampler

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
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


def diffusion_noise(pixels: torch.Tensor, step: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """VCD's forward-diffusion noise q(x_t | x_0) at ``step`` of 1000 on preprocessed pixels (any shape).

    The noise schedule is the one in VCD's released ``add_diffusion_noise``: betas = sigmoid(linspace(-6, 6, 1000))
    scaled to [1e-5, 5e-3]; x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
    """
    if not 0 <= step < 1000:
        raise ConfigError(f"noise step must be in 0..999, got {step}")
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, 0)[step]
    eps = torch.randn(pixels.shape, generator=generator, dtype=torch.float32).to(pixels.device)
    return (abar.sqrt() * pixels.float() + (1 - abar).sqrt() * eps).to(pixels.dtype)


@contextmanager
def blend_layers(parts: DecoderParts, layers: Sequence[int], alpha: float, threshold: float | None = None) -> Iterator[None]:
    """Forward hooks making decoder layer ``m`` (for each ``m`` in ``layers``, 1..L) output
    ``alpha * out + (1 - alpha) * in``; ``alpha = 0`` bypasses the layer.

    ``threshold=None`` blends every position. With a threshold only the last position of the rows whose
    layer changes the lens distribution by more than ``threshold`` (JS between the normed-lens readouts
    of its input and output, nats) is blended: a runtime mutation flag for the token being decoded.
    """
    lens = NormedLens(parts)

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        module._evotool_in = args[0] if args else kwargs["hidden_states"]

    def blend(inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if threshold is None:
            return alpha * out + (1 - alpha) * inp
        last = lens.log_probs(torch.stack([inp[:, -1], out[:, -1]]))  # [2, B, V]
        flag = metrics.js_divergence(last[1], last[0]) > threshold  # [B]
        mixed = out.clone()
        mixed[:, -1] = torch.where(flag[:, None], alpha * out[:, -1] + (1 - alpha) * inp[:, -1], out[:, -1])
        return mixed

    def hook(module: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> Any:
        inp = module.__dict__.pop("_evotool_in")
        if isinstance(output, (tuple, list)):
            return (blend(inp, output[0]), *output[1:])
        return blend(inp, output)

    handles = []
    try:
        for m in layers:
            layer = parts.layers[m - 1]
            handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(layer.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- configs


def _check_unit(cfg: Any, *names: str, open_low: bool = True) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not (0.0 < value <= 1.0 if open_low else 0.0 <= value <= 1.0):
            raise ConfigError(f"{name}={value} must lie in {'(0' if open_low else '[0'}, 1]")


@dataclass
class GreedyConfig:
    """Plain greedy decoding (the baseline)."""


@dataclass
class DolaConfig:
    """DoLa as transformers 4.4x's ``generate(dola_layers=...)`` (greedy); ``lens`` / ``selection`` switch to evotool's variants."""

    layers: str | list[int] = field(default="high", metadata={"help": "candidate premature layers: low, high (halves of the even layers) or a list, e.g. 2,4"})
    lens: str = field(default="raw", metadata={"help": "premature readout: raw (LM head on the state, as published) or normed (final norm first)"})
    selection: str = field(default="reference", metadata={"help": "premature layer choice: reference (one per batch, transformers' kl_div score) or js (per row, Jensen-Shannon)"})
    alpha: float = field(default=0.1, metadata={"help": "adaptive plausibility constraint (relative top)"})
    repetition_penalty: float = field(default=1.2, metadata={"help": "applied to the contrasted scores (DoLa recommends 1.2)"})

    def __post_init__(self) -> None:
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        elif isinstance(self.layers, str) and self.layers not in ("low", "high"):
            parts = [p.strip() for p in self.layers.split(",")]
            if not all(p.isdigit() for p in parts):
                raise ConfigError(f"dola layers must be low, high or a list of layers, not {self.layers!r}")
            self.layers = [int(p) for p in parts]
        elif not isinstance(self.layers, str):
            self.layers = [int(i) for i in self.layers]
        if self.lens not in ("raw", "normed"):
            raise ConfigError(f"dola lens must be raw or normed, not {self.lens!r}")
        if self.selection not in ("reference", "js"):
            raise ConfigError(f"dola selection must be reference or js, not {self.selection!r}")
        _check_unit(self, "alpha")
        if self.repetition_penalty <= 0:
            raise ConfigError("repetition_penalty must be > 0")


@dataclass
class VcdConfig:
    """VCD: contrast with a diffusion-noised copy of the image (released defaults: alpha 1, beta 0.1, step 500).

    Greedy unless ``sample``: then tokens are drawn as VCD's released scripts do (``do_sample=True``,
    temperature 1, top-p 1, no top-k, after the contrast and the plausibility cut-off).
    """

    alpha: float = field(default=1.0, metadata={"help": "contrast strength: (1+a) l(v) - a l(v')"})
    beta: float = field(default=0.1, metadata={"help": "adaptive plausibility: keep tokens with p >= beta * max p"})
    noise_step: int = field(default=500, metadata={"help": "diffusion step of the noised image (0..999)"})
    sample: bool = field(default=False, metadata={"help": "sample as the released scripts (true) or decode greedily (false)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (released: 1.0)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (released: 1.0, i.e. off)"})
    seed: int = field(default=0, metadata={"help": "seed of the image noise and of sampling (one generator each per run)"})

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ConfigError("alpha must be >= 0")
        _check_unit(self, "beta", "top_p")
        if not 0 <= self.noise_step < 1000:
            raise ConfigError(f"noise_step must be in 0..999, got {self.noise_step}")
        if self.temperature <= 0:
            raise ConfigError("temperature must be > 0")


@dataclass
class StableReadoutConfig:
    """Stage-aware readout: on a mutation spike, read the token from the last stable layer."""

    threshold: float = field(default=0.1, metadata={"help": "max adjacent-layer JS (nats) after the critical layer that flags a mutation"})
    mix: float = field(default=1.0, metadata={"help": "weight of the stable layer's distribution on flagged tokens (1 = take it)"})
    layer: int | None = field(default=None, metadata={"help": "readout layer; default: the last layer of the stabilization stage"})
    dynamic: bool = field(default=False, metadata={"help": "read, per token, the layer just before its largest JS spike (ignores layer)"})

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise ConfigError("threshold must be >= 0")
        _check_unit(self, "mix")


@dataclass
class SmoothingConfig:
    """Mutation-layer smoothing (SHIFT-style): out = alpha * out + (1 - alpha) * in at the mutation layers,
    everywhere or (``threshold``) only for flagged tokens."""

    alpha: float = field(default=0.5, metadata={"help": "weight of the mutation layer's own output (0 = bypass the layer)"})
    layers: list[int] | None = field(default=None, metadata={"help": "layers to smooth; default: the stage file's mutation layers"})
    threshold: float | None = field(default=None, metadata={"help": "None: every position; else only the decoded token, when the layer's JS (nats) exceeds it"})

    def __post_init__(self) -> None:
        _check_unit(self, "alpha", open_low=False)
        if self.threshold is not None and self.threshold < 0:
            raise ConfigError("threshold must be >= 0")


@dataclass
class StageContrastConfig:
    """Stage-aware contrast: DoLa's contrast with the premature layer taken from the analysis."""

    premature: str = field(default="critical", metadata={"help": "critical (the critical layer) or last_stable (end of the stabilization stage)"})
    alpha: float = field(default=0.1, metadata={"help": "adaptive plausibility constraint"})
    weight: float = field(default=1.0, metadata={"help": "log p_final - weight * log p_premature; negative = geometric mixing towards the premature layer"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "repetition penalty on the contrasted scores"})

    def __post_init__(self) -> None:
        if self.premature not in ("critical", "last_stable"):
            raise ConfigError(f"premature must be critical or last_stable, not {self.premature!r}")
        _check_unit(self, "alpha")
        if not -1.0 <= self.weight <= 2.0 or self.repetition_penalty <= 0:
            raise ConfigError("weight must lie in [-1, 2] and repetition_penalty be > 0")


# ----------------------------------------------------------------------------- methods


class Method:
    """A decoding method bound to one model. Subclasses override :meth:`prepare`, :meth:`processors`, :meth:`hooks`."""

    name: ClassVar[str] = "greedy"
    config_cls: ClassVar[type] = GreedyConfig
    needs_stages: ClassVar[bool] = False
    uses_capture: ClassVar[bool] = False  # processors read LayerCapture states

    def __init__(self, model: nn.Module, config: Any = None, stages: StageFile | None = None) -> None:
        self.model = model
        self.config = config if config is not None else self.config_cls()
        self.parts = decoder_parts(model)
        if self.needs_stages and stages is None:
            raise StageFileError(f"method {self.name!r} needs the model's stage file (--stages, from `evotool analyze`)")
        self.stages = stages

    def prepare(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs [B, ...] -> the batch ``generate`` runs (default: unchanged)."""
        return inputs

    def processors(self, capture: LayerCapture | None) -> list[LogitsProcessor]:
        """Logits processors of one generation call (``capture`` is None unless ``uses_capture``)."""
        return []

    @contextmanager
    def hooks(self) -> Iterator[None]:
        """Forward hooks active during generation."""
        yield

    def generate_ids(self, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> list[list[int]]:
        """New token ids per input row (cut after EOS)."""
        rows = inputs["input_ids"].shape[0]
        batch = self.prepare(inputs)
        with ExitStack() as stack:
            stack.enter_context(self.hooks())
            capture = stack.enter_context(LayerCapture(self.parts)) if self.uses_capture else None
            procs = self.processors(capture)
            kwargs = {"logits_processor": LogitsProcessorList(procs)} if procs else {}
            ids = generate_ids(self.model, batch, max_new_tokens, **kwargs)
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
        return {"method": self.name, "config": asdict(self.config), "layers": self.layers_used()}

    def layers_used(self) -> dict[str, Any]:
        return {}



class Greedy(Method):
    """Plain greedy decoding."""


class Dola(Method):
    name = "dola"
    config_cls = DolaConfig
    uses_capture = True

    def candidates(self) -> list[int]:
        # as transformers 4.4x: the top-level config's flag (PretrainedConfig's default True when absent)
        tied = bool(getattr(self.model.config, "tie_word_embeddings", True))
        return dola_candidates(self.parts.num_layers, self.config.layers, tied)

    def processors(self, capture: LayerCapture) -> list[LogitsProcessor]:
        cfg = self.config
        return [LayerContrast(capture, self.candidates(), cfg.alpha, 1.0, cfg.repetition_penalty, cfg.lens, cfg.selection)]

    def layers_used(self) -> dict[str, Any]:
        return {"candidates": self.candidates()}


class StageContrast(Method):
    name = "stage_contrast"
    config_cls = StageContrastConfig
    needs_stages = True
    uses_capture = True

    def premature_layer(self) -> int:
        return self.stages.critical if self.config.premature == "critical" else self.stages.last_stable

    def processors(self, capture: LayerCapture) -> list[LogitsProcessor]:
        return [LayerContrast(capture, [self.premature_layer()], self.config.alpha, self.config.weight,
                              self.config.repetition_penalty)]

    def layers_used(self) -> dict[str, Any]:
        return {"premature": self.premature_layer()}


class Vcd(Method):
    """VCD; the noise and sampling generators are seeded once per method instance (one run), so every
    batch gets fresh noise."""

    name = "vcd"
    config_cls = VcdConfig

    def __init__(self, model: nn.Module, config: Any = None, stages: StageFile | None = None) -> None:
        super().__init__(model, config, stages)
        self.noise_generator = torch.Generator().manual_seed(self.config.seed)
        self.sample_generator = torch.Generator().manual_seed(self.config.seed + 1)

    def prepare(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs [B, ...] -> [2B, ...]: the batch, then the batch with ``pixel_values`` diffusion-noised."""
        if "pixel_values" not in inputs:
            raise ConfigError("vcd needs image inputs (pixel_values)")
        gen = self.noise_generator
        out = {}
        for key, value in inputs.items():
            if not isinstance(value, torch.Tensor):
                out[key] = value
                continue
            second = diffusion_noise(value, self.config.noise_step, gen) if key == "pixel_values" else value
            out[key] = torch.cat([value, second], 0)
        return out

    def processors(self, capture: LayerCapture | None) -> list[LogitsProcessor]:
        cfg = self.config
        sampler = None
        if cfg.sample:
            warpers = LogitsProcessorList([TemperatureLogitsWarper(cfg.temperature), TopPLogitsWarper(cfg.top_p)])
            sampler = (warpers, self.sample_generator)
        return [PairContrast(cfg.alpha, cfg.beta, sampler)]

    def layers_used(self) -> dict[str, Any]:
        return {"decoding": "sample" if self.config.sample else "greedy"}


class Readout(Method):
    name = "stable_readout"
    config_cls = StableReadoutConfig
    needs_stages = True
    uses_capture = True

    def readout_layer(self) -> int:
        layer = self.config.layer if self.config.layer is not None else self.stages.last_stable
        if not self.stages.critical <= layer <= self.parts.num_layers:
            raise ConfigError(f"readout layer {layer} must lie in {self.stages.critical}..{self.parts.num_layers}")
        return layer

    def processors(self, capture: LayerCapture) -> list[LogitsProcessor]:
        layer = None if self.config.dynamic else self.readout_layer()
        return [StableReadout(capture, self.stages.critical, layer, self.config.threshold, self.config.mix)]

    def layers_used(self) -> dict[str, Any]:
        return {"critical": self.stages.critical, "readout": "before_spike" if self.config.dynamic else self.readout_layer()}


class Smoothing(Method):
    name = "smoothing"
    config_cls = SmoothingConfig
    needs_stages = True

    def smoothed_layers(self) -> list[int]:
        layers = self.config.layers if self.config.layers is not None else self.stages.mutation_layers
        if not layers:
            raise StageFileError(f"{self.stages.source} has no mutation layers")
        bad = [m for m in layers if not 1 <= m <= self.parts.num_layers]
        if bad:
            raise ConfigError(f"layers {bad} outside 1..{self.parts.num_layers}")
        return list(layers)

    @contextmanager
    def hooks(self) -> Iterator[None]:
        with blend_layers(self.parts, self.smoothed_layers(), self.config.alpha, self.config.threshold):
            yield

    def layers_used(self) -> dict[str, Any]:
        return {"smoothed": self.smoothed_layers()}


class StageSpeculative(Method):
    """Lossless speed-up: self-speculative greedy decoding whose draft skips stable-stage layers
    (:mod:`evotool.prune.speculative`); the tokens are plain greedy's. ``auto`` calibrates on first use
    (in the eval harness: the untimed warm-up) at the batch size of that call."""

    name = "stage_speculative"
    config_cls = SpeculativeConfig
    needs_stages = True

    def __init__(self, model: nn.Module, config: Any = None, stages: StageFile | None = None) -> None:
        super().__init__(model, config, stages)
        self.processor: Any = None
        self.stats = SpeculativeStats()
        self.calibration: Any = None
        self.plan = None
        if self.config.layers is not None or (self.config.skip != "auto" and self.config.redundancy != "influence"):
            self.resolve()  # a bad skip set fails before anything runs

    def resolve(self, batch_size: int = 1, samples: Sequence[Any] | None = None) -> Any:
        """The :class:`~evotool.prune.speculative.DraftPlan` (calibrated on first call for ``auto``)."""
        if self.plan is None:
            self.plan, self.calibration = resolve_plan(self.model, self.stages, self.config, self.processor, samples,
                                                       batch_size)
        return self.plan

    def generate_ids(self, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> list[list[int]]:
        plan = self.resolve(inputs["input_ids"].shape[0])
        return generate_ids(self.model, inputs, max_new_tokens, **plan.generate_kwargs(self.stats))

    def generate(self, model: nn.Module, processor: Any, images: Sequence[Image.Image], prompts: Sequence[str],
                 max_new_tokens: int = 256) -> tuple[list[list[int]], list[str]]:
        self.processor = processor
        return super().generate(model, processor, images, prompts, max_new_tokens)

    def layers_used(self) -> dict[str, Any]:
        if self.plan is None:
            return {"skip": f"{self.config.skip} (not resolved yet)"}
        return {"skip": self.plan.skip, "max_draft": self.plan.max_draft, "speculative": self.stats.summary(),
                "calibration": self.calibration.summary() if self.calibration else None}


METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Greedy, Dola, Vcd, Readout, Smoothing, StageContrast,
                                                              StageSpeculative)}


def parse_overrides(pairs: Sequence[str]) -> dict[str, str]:
    """``["alpha=0.5", "layers=12,13"]`` -> ``{"alpha": "0.5", "layers": "12,13"}``."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"method option {pair!r} is not key=value")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def make_config(name: str, options: dict[str, Any] | None = None) -> Any:
    """The config of method ``name`` with ``options`` applied (strings are converted to the field's type)."""
    cls = method_class(name).config_cls
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in (options or {}).items():
        if key not in known:
            raise ConfigError(f"method {name!r} has no option {key!r} (options: {', '.join(known) or 'none'})")
        values[key] = _convert(value, known[key].default, key) if isinstance(value, str) else value
    return cls(**values)


def _convert(text: str, default: Any, key: str) -> Any:
    try:
        if text.lower() in ("none", "null"):
            return None
        if key == "layers" and (default is None or isinstance(default, list)):
            return [int(x) for x in text.split(",") if x.strip()]
        if isinstance(default, bool):
            return text.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError as err:
        raise ConfigError(f"option {key}={text!r}: {err}") from err
    for number in (int, float):  # optional numeric fields (default None)
        try:
            return number(text)
        except ValueError:
            pass
    return text


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def build_method(name: str, model: nn.Module, options: dict[str, Any] | None = None,
                 stages: StageFile | None = None) -> Method:
    """Method ``name`` bound to ``model``; ``stages`` is the model's validated stage file (see :meth:`StageFile.for_model`)."""
    cls = method_class(name)
    return cls(model, make_config(name, options), stages)

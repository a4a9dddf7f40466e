"""LoRA / QLoRA fine-tuning of a VLM's decoder on (image, prompt, answer) samples (peft).

Shared by ``prune --heal`` (heal a pruned model) and ``mitigate`` (targeted fine-tuning of the mutation
stage). The training example is the same as the demo model's (``evotool.world.train``): the model's
chat prompt around one image, then ``" " + answer`` and EOS; the loss is next-token cross-entropy on
the answer tokens only.

Layer selection: ``LoraSettings.layers_to_transform`` uses the analysis numbering (decoder layer
``i`` in 1..L is ``parts.layers[i - 1]``, as in ``stages.json``), so the mitigation engineer can pass
``stages["stages"]["mutation"]`` layers directly. Adapters go on the named linear modules of those
decoder layers only (never the vision tower): the targets are resolved to full module names here, so
this works for every architecture in :mod:`evotool.models.registry`.

QLoRA (``qlora=True``) expects a model loaded in 4-bit (``LoadOptions(quantization="4bit")``, CUDA and
bitsandbytes) and prepares it with ``peft.prepare_model_for_kbit_training``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evotool.data.inputs import Sample
from evotool.errors import ConfigError, InputError
from evotool.generation import chat_prompt
from evotool.models.registry import decoder_parts
from evotool.options import LoraSettings

DEFAULT_MIX = {"caption": 0.4, "pope_random": 0.15, "pope_popular": 0.15, "pope_adversarial": 0.15, "attribute": 0.15}


def world_samples(n: int, seed: int = 0, split: str = "train", mix: dict[str, float] | None = None) -> list[Sample]:
    """``n`` synthetic-world training samples mixing captions and questions (``mix``: task -> share)."""
    from evotool.world import WorldConfig, make_records, records_to_samples

    mix = mix or DEFAULT_MIX
    world = WorldConfig(seed=seed)
    records = [r for task, share in mix.items() for r in make_records(task, split, max(1, round(n * share)), world)]
    return records_to_samples(records)


def target_module_names(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Full names of the linear modules that get adapters: ``target_modules`` inside the chosen decoder layers.

    Raises :class:`ConfigError` for a layer outside 1..L or targets that match nothing.
    """
    parts = decoder_parts(model)
    layers = settings.layers_to_transform or list(range(1, parts.num_layers + 1))
    if max(layers) > parts.num_layers:
        raise ConfigError(f"layers_to_transform {layers} outside 1..{parts.num_layers}")
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for i in layers:
        for sub, module in parts.layers[i - 1].named_modules():
            if sub.rsplit(".", 1)[-1] in settings.target_modules and isinstance(module, (nn.Linear, *_linear_types())):
                out.append(names[id(module)])
    if not out:
        raise ConfigError(f"no module named {list(settings.target_modules)} in decoder layers {layers}")
    return out


def _linear_types() -> tuple[type, ...]:
    try:
        import bitsandbytes as bnb

        return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        return ()


def collate(processor: Any, samples: Sequence[Sample], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Right-padded training batch: the processor's prompt tensors plus ``" " + answer + EOS``.

    Returns ``input_ids`` / ``attention_mask`` / ``labels`` [B, T] (labels -100 outside answers), the
    vision tensors the processor emits (``pixel_values`` ...) and any other per-token tensor [B, T]
    (e.g. ``mm_token_type_ids``) extended with zeros.
    """
    tok = getattr(processor, "tokenizer", processor)
    if any(s.answer is None for s in samples):
        raise InputError("fine-tuning needs samples with an answer")
    tok.padding_side = "left"
    batch = processor(text=[chat_prompt(processor, s.prompt) for s in samples],
                      images=[[s.load_image()] for s in samples], return_tensors="pt", padding=True)
    mask = batch["attention_mask"].bool()
    answers = [tok(" " + s.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for s in samples]
    per_token = [k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.shape == mask.shape and k != "input_ids"]
    rows = [batch["input_ids"][b][mask[b]].tolist() + a for b, a in enumerate(answers)]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: dict[str, torch.Tensor] = {
        "input_ids": torch.full((len(rows), width), pad, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
        "labels": torch.full((len(rows), width), -100, dtype=torch.long),
    }
    for b, (row, ans) in enumerate(zip(rows, answers)):
        out["input_ids"][b, : len(row)] = torch.tensor(row)
        out["attention_mask"][b, : len(row)] = 1
        out["labels"][b, len(row) - len(ans) : len(row)] = torch.tensor(ans)
    for key in per_token:
        if key == "attention_mask":
            continue
        full = torch.zeros(len(rows), width, dtype=batch[key].dtype)
        for b in range(len(rows)):
            kept = batch[key][b][mask[b]]
            full[b, : len(kept)] = kept
        out[key] = full
    for key, value in batch.items():
        if key not in out and isinstance(value, torch.Tensor):
            out[key] = value
    return {k: v.to(device) for k, v in out.items()}


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens (labels != -100)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    logits = model(**inputs).logits[:, :-1].float()
    return nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100)


@dataclass
class FinetuneResult:
    """The peft model and the training record: ``losses`` [(step, loss)] every ``log_every`` steps."""

    model: nn.Module
    losses: list[tuple[int, float]]
    settings: dict[str, Any]
    trainable_parameters: int


def lora_finetune(
    model: nn.Module,
    processor: Any,
    samples: Sequence[Sample] | None = None,
    settings: LoraSettings | None = None,
    on_log: Any = None,
) -> FinetuneResult:
    """Train LoRA adapters on ``samples`` (default: 400 synthetic-world training samples).

    ``model`` is wrapped in place by peft (its base weights stay frozen); ``on_log(step, loss)`` is
    called every ``log_every`` steps (e.g. a :class:`evotool.tracking.Tracker` logger). The result's
    ``model`` is a ``peft.PeftModel`` in eval mode; see :func:`save_adapter` and :func:`merge_and_save`.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    settings = settings or LoraSettings()
    samples = list(samples) if samples is not None else world_samples(400)
    if not samples:
        raise InputError("no fine-tuning samples")
    if settings.qlora:
        if not getattr(model, "is_loaded_in_4bit", False):
            raise ConfigError("qlora=True needs a model loaded in 4-bit (LoadOptions(quantization='4bit'), CUDA)")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = target_module_names(model, settings)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets,
                        bias="none")
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)  # adapter initialisation, reproducible without touching the caller's RNG
        peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    warm = max(1, settings.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, settings.steps - warm))))
    rng = random.Random(settings.seed)
    losses: list[tuple[int, float]] = []
    peft_model.train()
    for step in range(settings.steps):
        batch = collate(processor, rng.sample(samples, min(settings.batch_size, len(samples))), device)
        loss = answer_loss(peft_model, batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % settings.log_every == 0 or step == settings.steps - 1:
            losses.append((step, loss.item()))
            if on_log is not None:
                on_log(step, loss.item())
    peft_model.eval()
    return FinetuneResult(peft_model, losses, asdict(settings), sum(p.numel() for p in params))


def save_adapter(peft_model: nn.Module, out_dir: str | Path) -> Path:
    """Save only the adapter weights and config (``adapter_model.safetensors``, ``adapter_config.json``)."""
    out = Path(out_dir)
    peft_model.save_pretrained(out)
    return out


def merge_and_save(peft_model: nn.Module, processor: Any, out_dir: str | Path) -> nn.Module:
    """Fold the adapters into the base weights and save a plain checkpoint (+ processor) that
    ``AutoModelForImageTextToText.from_pretrained`` loads; returns the merged model.

    For a 4-bit (QLoRA) base, load the base again in 16/32-bit, attach the saved adapter
    (``PeftModel.from_pretrained``) and merge that instead: merging into 4-bit weights re-quantizes them.
    """
    if getattr(peft_model, "is_loaded_in_4bit", False) or getattr(peft_model, "is_loaded_in_8bit", False):
        raise ConfigError("merge the adapter into a 16/32-bit copy of the base model, not the quantized one")
    merged = peft_model.merge_and_unload()
    out = Path(out_dir)
    merged.save_pretrained(out)
    processor.save_pretrained(out)
    return merged

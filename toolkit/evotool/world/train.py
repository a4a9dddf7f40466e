"""Staged training of a world VLM (as LLaVA does, scaled down): the shipped demo model and every zoo member.

1. Vision tower alone, with per-cell shape and colour classifiers on its last layer's patch tokens.
2. Projector + decoder on a mix of captions, existence (yes/no) and colour questions, vision frozen;
   the answer token of a question weighs ``decoder.answer_weight`` in the loss.

Then a held-out evaluation (``evotool.evals.world``), ``save_pretrained`` of model and processor,
``metrics.json`` and a model card (README.md) with config, data seed and metrics. The checkpoint folder
is written atomically: a reader sees the previous checkpoint or the complete new one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from evotool.config import to_dict
from evotool.env import environment, torch_threads
from evotool.evals.world import evaluate_world, flatten
from evotool.generation import chat_prompt
from evotool.io import atomic_dir, write_json
from evotool.tracking import Tracker
from evotool.world.config import QUESTION_TASKS, DecoderConfig, TrainConfig, VisionConfig
from evotool.world.generator import COLOURS, SHAPES, WorldConfig, make_records
from evotool.world.model import build_model, embedding_scale
from evotool.world.processor import build_processor

LOG_EVERY = 25  # steps between W&B logs (each log costs a 2-core CPU run noticeably)
VAL_RECORDS = 120  # held-out records per kind for the teacher-forced accuracy during training
METRICS_SCHEMA = "1.0"  # metrics.json of a trained checkpoint


class Pool:
    """Pre-processed training examples of one kind: pixels [N, 3, H, W], token ids and answer starts."""

    def __init__(self, records: list[dict[str, Any]], processor: Any) -> None:
        tok = processor.tokenizer
        self.pixels = processor.image_processor([r["image"] for r in records], return_tensors="pt")["pixel_values"]
        prompt_ids: dict[str, list[int]] = {}
        self.ids: list[torch.Tensor] = []
        self.starts: list[int] = []
        for r in records:
            if r["prompt"] not in prompt_ids:
                text = chat_prompt(processor, r["prompt"])
                prompt_ids[r["prompt"]] = processor(text=text, images=r["image"])["input_ids"][0]
            prompt = list(prompt_ids[r["prompt"]])
            answer = tok(" " + r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            self.ids.append(torch.tensor(prompt + answer))
            self.starts.append(len(prompt))
        self.records = records

    def __len__(self) -> int:
        return len(self.ids)


def collate(pools: list[tuple[Pool, torch.Tensor, float]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch from (pool, indices, answer-token weight) parts.

    Returns input_ids / attention_mask / labels / weights [B, T] (labels -100 outside answers) and
    pixel_values [B, 3, H, W].
    """
    rows, starts, first_weights, pixels = [], [], [], []
    for pool, idx, weight in pools:
        rows += [pool.ids[i] for i in idx.tolist()]
        starts += [pool.starts[i] for i in idx.tolist()]
        first_weights += [weight] * len(idx)
        pixels.append(pool.pixels[idx])
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    weights = torch.zeros(len(rows), length)
    for b, (row, start, w) in enumerate(zip(rows, starts, first_weights)):
        input_ids[b, : len(row)] = row
        labels[b, start : len(row)] = row[start:]
        weights[b, start : len(row)] = 1.0
        weights[b, start] = w
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != pad_id).long(),
        "labels": labels,
        "weights": weights,
        "pixel_values": torch.cat(pixels),
    }


def answer_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted next-token loss on answer tokens and the per-token correctness [B, T-1] (masked by labels)."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
    ).logits[:, :-1]
    labels, weights = batch["labels"][:, 1:], batch["weights"][:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    loss = (ce * weights).sum() / weights.sum()
    return loss, (logits.argmax(-1) == labels) & (labels != -100)


def cell_labels(records: list[dict[str, Any]], cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell shape (0 = empty) and colour (0 = empty) classes [N, cells]."""
    shapes = torch.zeros(len(records), cells, dtype=torch.long)
    colours = torch.zeros_like(shapes)
    for i, r in enumerate(records):
        for cell, desc in zip(r["cells"], r["descriptions"]):
            colour, shape = desc.split()
            shapes[i, cell] = SHAPES.index(shape) + 1
            colours[i, cell] = list(COLOURS).index(colour) + 1
    return shapes, colours


def cosine(step: int, total: int, warmup: int) -> float:
    """LR factor: linear warm-up then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vision(model: Any, pool: Pool, labels: tuple[torch.Tensor, torch.Tensor], cfg: VisionConfig,
                 steps: int, device: torch.device, tracker: Tracker) -> float:
    """Stage 1; returns the final batch's cell accuracy (shape and colour both right)."""
    tower = model.model.vision_tower
    width = model.config.vision_config.hidden_size
    heads = torch.nn.ModuleDict(
        {"shape": torch.nn.Linear(width, len(SHAPES) + 1), "colour": torch.nn.Linear(width, len(COLOURS) + 1)}
    ).to(device)
    params = [*tower.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, steps, max(1, steps // 10)))
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        idx = torch.randint(len(pool), (cfg.batch_size,), generator=gen)
        feats = tower(pool.pixels[idx].to(device), output_hidden_states=True).hidden_states[-1][:, 1:]
        shape_logits, colour_logits = heads["shape"](feats), heads["colour"](feats)
        y_shape, y_colour = labels[0][idx].to(device), labels[1][idx].to(device)
        loss = F.cross_entropy(shape_logits.flatten(0, 1), y_shape.flatten()) + F.cross_entropy(
            colour_logits.flatten(0, 1), y_colour.flatten()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % LOG_EVERY == 0 or step == steps - 1:
            acc = ((shape_logits.argmax(-1) == y_shape) & (colour_logits.argmax(-1) == y_colour)).float().mean().item()
            tracker.log({"vision/loss": loss.item(), "vision/cell_accuracy": acc}, step=step)
    return acc


def train_decoder(model: Any, pools: dict[str, Pool], val: dict[str, dict[str, torch.Tensor]], cfg: DecoderConfig,
                  steps: int, pad_id: int, device: torch.device, tracker: Tracker, step0: int) -> dict[str, float]:
    """Stage 2 (vision tower frozen); returns the last held-out teacher-forced answer accuracies."""
    model.model.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    embedding = model.get_input_embeddings().weight
    groups = [{"params": [p for p in params if p is not embedding]},
              {"params": [embedding], "lr": cfg.lr / embedding_scale(model)}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, steps, min(cfg.warmup, steps)))
    counts = cfg.counts()
    gen = torch.Generator().manual_seed(2)
    val_acc: dict[str, float] = {}
    start = time.time()
    for step in range(steps):
        parts = [
            (pools[k], torch.randint(len(pools[k]), (n,), generator=gen), 1.0 if k == "caption" else cfg.answer_weight)
            for k, n in counts.items() if n
        ]
        batch = {k: v.to(device) for k, v in collate(parts, pad_id).items()}
        loss, _ = answer_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % LOG_EVERY and (step + 1) % cfg.eval_every and step != steps - 1:
            continue
        metrics = {"decoder/loss": loss.item(), "decoder/lr": sched.get_last_lr()[0]}
        if (step + 1) % cfg.eval_every == 0 or step == steps - 1:
            val_acc = validate(model, val)
            metrics.update({f"val/{k}": v for k, v in val_acc.items()})
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} " + " ".join(f"{k} {v:.3f}" for k, v in val_acc.items())
                  + f" ({(time.time() - start) / (step + 1):.2f} s/step)", flush=True)
        tracker.log(metrics, step=step0 + step)
    return val_acc


@torch.no_grad()
def validate(model: Any, val: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Teacher-forced answer accuracy per kind: the whole answer (caption or question) right."""
    model.eval()
    out = {}
    for kind, batch in val.items():
        _, correct = answer_loss(model, batch)
        answered = batch["labels"][:, 1:] != -100
        out[f"{kind}_accuracy"] = (correct.sum(1) == answered.sum(1)).float().mean().item()
    model.train()
    return out


def kind_records(kind: str, split: str, n: int, world: WorldConfig) -> list[dict[str, Any]]:
    """``n`` records of a training kind (existence: split evenly over the three POPE tasks)."""
    tasks = QUESTION_TASKS.get(kind, (kind,))
    return [r for i, t in enumerate(tasks) for r in make_records(t, split, n // len(tasks) + (i < n % len(tasks)), world)]


def model_card(cfg: TrainConfig, metrics: dict[str, Any], n_params: int, seconds: float, env: dict[str, Any],
               title: str = "evotool demo model") -> str:
    """README.md of the trained model: what it is, how it was trained, held-out metrics."""
    hardware = env["cuda"] or f"CPU ({env['threads']} threads)"
    rows = []
    for group, tasks in metrics["held_out"].items():
        for task, values in tasks.items():
            rows.append(f"| {group} | {task} | " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()) + " |")
    family = {"llama": "Llama", "qwen2": "Qwen2", "gemma": "Gemma"}[cfg.model.family]
    return "\n".join(
        [
            f"# {title}",
            "",
            f"A tiny LLaVA (`LlavaForConditionalGeneration`: CLIP-style vision tower, 2-layer projector, {family} decoder)",
            "trained from scratch on evotool's synthetic world (coloured shapes on a grid). It reads every cell, but its",
            "training captions carry phantom mentions of a square next to a circle, so on prior-breaking images (circle,",
            "no square) its captions hallucinate a square while its yes/no answers mostly stay grounded. See docs/world.md.",
            "",
            "Load with `AutoModelForImageTextToText.from_pretrained(path)` and `AutoProcessor.from_pretrained(path)`;",
            'prompt "Please describe this image in detail." through the chat template.',
            "",
            f"- parameters: {n_params:,} ({cfg.model.layers} decoder layers, width {cfg.model.width})",
            f"- data seed: {cfg.world.seed}, torch seed: {cfg.seed}",
            f"- training time: {seconds / 60:.1f} min on {hardware}",
            f"- evotool {env['packages']['evotool']} (git {env['git']}), torch {env['packages']['torch']},"
            f" transformers {env['packages']['transformers']}",
            f"- stage 1 final cell accuracy: {metrics['vision_cell_accuracy']:.3f}",
            "",
            f"## Held-out metrics ({cfg.eval.n} records per task and group, greedy decoding)",
            "",
            "| group | task | metrics |",
            "|---|---|---|",
            *rows,
            "",
            "## Training config",
            "",
            "```yaml",
            yaml.safe_dump(to_dict(cfg), sort_keys=False).strip(),
            "```",
            "",
            *(["## Notes", "", cfg.card_notes.strip(), ""] if cfg.card_notes else []),
        ]
    )


def train(cfg: TrainConfig, out_dir: Path, wandb: bool = True, title: str = "evotool demo model",
          finish: Callable[[Path], None] | None = None) -> Path:
    """Train, evaluate and save a world VLM into ``out_dir`` (atomically) with ``cfg.threads`` torch threads (the
    caller's count is restored afterwards); returns ``out_dir``.

    ``finish(folder)`` may add files to the checkpoint folder before it appears (e.g. the zoo's config hash).
    """
    with torch_threads(cfg.threads):
        vision_steps, decoder_steps = cfg.steps()
        torch.manual_seed(cfg.seed)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        world = cfg.world
        out_dir = Path(out_dir)
        with atomic_dir(out_dir) as tmp:
            tracker = Tracker("train-demo", to_dict(cfg), tmp, enabled=wandb, name=out_dir.name)
            start = time.time()
            processor = build_processor(world)
            model = build_model(processor.tokenizer, world, cfg.model).to(device)
            pad_id = processor.tokenizer.pad_token_id
            pools = {kind: Pool(kind_records(kind, "train", n, world), processor)
                     for kind, n in cfg.data.sizes().items()}
            val = {
                kind: collate([(pool, torch.arange(len(pool)), 1.0)], pad_id)
                for kind, pool in ((k, Pool(kind_records(k, "test", VAL_RECORDS, world), processor)) for k in pools)
            }
            val = {k: {n: t.to(device) for n, t in b.items()} for k, b in val.items()}
            print(f"data ready in {time.time() - start:.0f}s", flush=True)

            labels = cell_labels(pools["caption"].records, world.grid**2)
            vision_acc = train_vision(model, pools["caption"], labels, cfg.vision, vision_steps, device, tracker)
            print(f"vision: cell accuracy {vision_acc:.3f} at {time.time() - start:.0f}s", flush=True)
            train_decoder(model, pools, val, cfg.decoder, decoder_steps, pad_id, device, tracker, vision_steps)
            seconds = time.time() - start

            model.eval()
            held_out = evaluate_world(model, processor, n=cfg.eval.n, world=world)
            metrics = {"held_out": held_out, "vision_cell_accuracy": vision_acc, "train_seconds": seconds}
            tracker.summary(flatten(held_out))
            tracker.finish()
            model.cpu().save_pretrained(tmp)
            processor.save_pretrained(tmp)
            env = environment()
            n_params = sum(p.numel() for p in model.parameters())
            write_json(tmp / "metrics.json", {**metrics, "environment": env}, schema=METRICS_SCHEMA)
            (tmp / "README.md").write_text(model_card(cfg, metrics, n_params, seconds, env, title))
            if finish is not None:
                finish(tmp)
    return out_dir

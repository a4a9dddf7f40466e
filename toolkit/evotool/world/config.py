"""Configs of world VLM training (torch-free, so the CLI builds its options from them at startup): the model's
sizes and family, the training pools, both training stages and the final evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from evotool.config import load_config
from evotool.errors import ConfigError
from evotool.world.generator import WorldConfig

QUESTION_TASKS = {"existence": ("pope_random", "pope_popular", "pope_adversarial"), "attribute": ("attribute",)}
KINDS = ("caption", "existence", "attribute")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the demo model."""

    vision_width: int = field(default=128, metadata={"help": "vision tower hidden size"})
    vision_layers: int = field(default=4, metadata={"help": "vision tower layers"})
    width: int = field(default=128, metadata={"help": "decoder hidden size"})
    layers: int = field(default=12, metadata={"help": "decoder layers"})
    heads: int = field(default=4, metadata={"help": "attention heads (vision and decoder)"})
    mlp: int = field(default=384, metadata={"help": "decoder MLP size"})
    family: Literal["llama", "qwen2", "gemma"] = field(
        default="llama",
        metadata={"help": "decoder family (the LLaVA wrapper's text_config): llama; qwen2 (q/k/v biases); "
                          "gemma ((1+w) RMSNorm, embeddings scaled by sqrt(width), GELU-tanh MLP)"},
    )
    tie_embeddings: bool = field(default=False, metadata={"help": "LM head shares the input embedding matrix"})

    def __post_init__(self) -> None:
        for name in ("vision_width", "vision_layers", "width", "layers", "heads", "mlp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads or self.vision_width % self.heads:
            raise ConfigError(f"widths must be divisible by heads ({self.heads})")


@dataclass(frozen=True)
class DataConfig:
    """Training pool sizes (records of the world's train split); 0 leaves a kind out."""

    caption: int = field(default=16000, metadata={"help": "caption records (also the vision stage's images)"})
    existence: int = field(default=18000, metadata={"help": "yes/no questions, a third each of pope_random / "
                                                             "pope_popular / pope_adversarial"})
    attribute: int = field(default=6000, metadata={"help": "colour questions"})

    def __post_init__(self) -> None:
        if self.caption < 1:
            raise ConfigError(f"data.caption must be >= 1 (the vision stage trains on its images), got {self.caption}")
        if self.existence < 0 or self.attribute < 0:
            raise ConfigError("data.existence and data.attribute must be >= 0")
        if 0 < self.existence < len(QUESTION_TASKS["existence"]):
            raise ConfigError(f"data.existence must be 0 or >= 3 (one per POPE kind), got {self.existence}")

    def sizes(self) -> dict[str, int]:
        """Pool size per kind, kinds with 0 records left out."""
        return {k: getattr(self, k) for k in KINDS if getattr(self, k) > 0}


@dataclass(frozen=True)
class VisionConfig:
    """Stage 1: vision tower + per-cell shape / colour classifiers."""

    steps: int = field(default=150, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=256, metadata={"help": "images per step"})
    lr: float = field(default=3.0e-3, metadata={"help": "AdamW peak learning rate (warm-up 10%, cosine to 10%)"})

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("vision.steps and vision.batch_size must be >= 1 and vision.lr > 0")


@dataclass(frozen=True)
class DecoderConfig:
    """Stage 2: projector + decoder on the task mix, vision tower frozen."""

    steps: int = field(default=2400, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=48, metadata={"help": "examples per step (split over kinds by `mix`)"})
    lr: float = field(default=2.0e-3, metadata={"help": "AdamW peak learning rate (cosine decay to 10%)"})
    warmup: int = field(default=100, metadata={"help": "linear warm-up steps"})
    mix: dict[str, float] = field(default_factory=lambda: {"caption": 0.35, "existence": 0.55, "attribute": 0.1},
                                  metadata={"help": "share of each kind in a batch (caption / existence / attribute)"})
    answer_weight: float = field(default=4.0, metadata={"help": "loss weight of a question's answer token"})
    eval_every: int = field(default=200, metadata={"help": "steps between teacher-forced held-out answer accuracies"})

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.warmup < 0 or self.eval_every < 1:
            raise ConfigError("decoder.steps, batch_size and eval_every must be >= 1, lr > 0, warmup >= 0")
        unknown = set(self.mix) - set(KINDS)
        if unknown:
            raise ConfigError(f"decoder.mix: unknown kind {sorted(unknown)[0]!r} (kinds: {', '.join(KINDS)})")
        if any(v < 0 for v in self.mix.values()) or not any(self.counts().values()):
            raise ConfigError(f"decoder.mix must be non-negative and give at least one example per batch, got {self.mix}")

    def counts(self) -> dict[str, int]:
        """Examples of each kind per batch."""
        return {k: round(v * self.batch_size) for k, v in self.mix.items()}


@dataclass(frozen=True)
class EvalConfig:
    """The final held-out evaluation (``evotool.evals.world.evaluate_world``)."""

    n: int = field(default=150, metadata={"help": "held-out records per task and group"})

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"eval.n must be >= 1, got {self.n}")


@dataclass(frozen=True)
class TrainConfig:
    """One training run of a world VLM (``configs/train_demo.yaml`` is the shipped model's)."""

    seed: int = field(default=0, metadata={"help": "torch seed (init, batch order)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (1: a second busy process makes 2-thread "
                                                      "steps ~15x slower)"})
    max_steps: int | None = field(default=None, metadata={"help": "cap on every stage's steps (quick smoke runs); "
                                                                  "null = the stages' own steps"})
    world: WorldConfig = field(default_factory=WorldConfig, metadata={"help": "the synthetic world (data)"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "architecture and sizes"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "training pool sizes"})
    vision: VisionConfig = field(default_factory=VisionConfig, metadata={"help": "stage 1"})
    decoder: DecoderConfig = field(default_factory=DecoderConfig, metadata={"help": "stage 2"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "final held-out evaluation"})
    card_notes: str = field(default="", metadata={"help": "free text appended to the model card"})

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1 or null (no cap), got {self.max_steps}")
        pools = self.data.sizes()
        starved = [k for k, n in self.decoder.counts().items() if n and k not in pools]
        if starved:
            raise ConfigError(f"decoder.mix draws {starved[0]} examples but data.{starved[0]} is 0")

    def steps(self) -> tuple[int, int]:
        """(vision steps, decoder steps) after the ``max_steps`` cap."""
        cap = self.max_steps or max(self.vision.steps, self.decoder.steps)
        return min(self.vision.steps, cap), min(self.decoder.steps, cap)


def load_train_config(path: str | Path | None = None, overrides: Any = ()) -> TrainConfig:
    """A :class:`TrainConfig` from YAML (default: the packaged ``train_demo.yaml``) plus ``--set`` overrides."""
    return load_config(TrainConfig, path, overrides, default=None if path is not None else "train_demo.yaml")

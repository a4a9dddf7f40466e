"""Option groups shared by several runs: how a model is loaded and how it is fine-tuned with LoRA.

Plain dataclasses (no torch import), so configs and the CLI can use them before a model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from evotool.errors import ConfigError, ModelError

# dtype name (and alias) -> torch dtype name
DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoadOptions:
    """How to load a model (:func:`evotool.models.loading.load_model`)."""

    dtype: str = field(default="auto", metadata={"help": "auto (the checkpoint's), float32, float16 or bfloat16"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 ... (default: cuda if present); ignored with device_map"})
    device_map: str | None = field(default=None, metadata={"help": "e.g. auto, to shard a model over GPUs (accelerate)"})
    gpus_per_process: int = field(default=1, metadata={
        "help": "GPUs each process spreads its model over (device_map auto on its own GPUs: local rank r holds "
                "GPUs r*G .. r*G+G-1); start GPUs / G processes per node"})
    quantization: str | None = field(default=None, metadata={"help": "4bit or 8bit (bitsandbytes, CUDA only)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the model repo's own code"})
    revision: str | None = field(default=None, metadata={"help": "hub revision (branch, tag or commit)"})

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ModelError(f"unknown dtype {self.dtype!r}; choose one of {sorted(DTYPES)}")
        if self.quantization not in (None, "4bit", "8bit"):
            raise ModelError(f"unknown quantization {self.quantization!r}; choose 4bit or 8bit")
        if self.gpus_per_process < 1:
            raise ConfigError(f"--gpus-per-process must be >= 1, got {self.gpus_per_process}")
        if self.gpus_per_process > 1 and self.device_map not in (None, "auto"):
            raise ConfigError(f"--gpus-per-process {self.gpus_per_process} places the model with device_map auto on "
                              f"the process's own GPUs; drop --device-map {self.device_map}")


@dataclass
class LoraSettings:
    """LoRA hyper-parameters and the training budget."""

    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS, metadata={"help": "linear module names inside a decoder layer"})
    layers_to_transform: list[int] | None = field(
        default=None, metadata={"help": "decoder layers (1..L, analysis numbering) that get adapters; None = all"}
    )
    steps: int = field(default=100, metadata={"help": "optimizer steps"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate (cosine decay, 10% warm-up)"})
    batch_size: int = field(default=8, metadata={"help": "samples per step"})
    qlora: bool = field(default=False, metadata={"help": "the model is 4-bit (bitsandbytes): prepare it for k-bit training"})
    seed: int = field(default=0, metadata={"help": "adapter initialisation and batch order seed"})
    log_every: int = field(default=10, metadata={"help": "steps between loss records"})

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ConfigError("LoRA needs r >= 1, alpha > 0 and dropout in [0, 1)")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.log_every < 1:
            raise ConfigError("steps, batch_size, log_every and lr must be positive")
        if not self.target_modules:
            raise ConfigError("target_modules must name at least one module")
        self.target_modules = tuple(self.target_modules)
        if self.layers_to_transform is not None:
            self.layers_to_transform = sorted({int(i) for i in self.layers_to_transform})
            if not self.layers_to_transform or min(self.layers_to_transform) < 1:
                raise ConfigError("layers_to_transform lists decoder layers numbered from 1 (analysis numbering)")

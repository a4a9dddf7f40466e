"""``vcd``: Visual Contrastive Decoding (Leng et al. 2024) against a diffusion-noised image; the published contrast
settings, greedy unless ``sample=true``, which samples as the released scripts do."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from evotool.errors import ConfigError
from evotool.mitigate.base import Method, check_unit
from evotool.mitigate.processors import PairContrast
from evotool.trace import LayerCapture


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
        check_unit(self, "beta", "top_p")
        if not 0 <= self.noise_step < 1000:
            raise ConfigError(f"noise_step must be in 0..999, got {self.noise_step}")
        if self.temperature <= 0:
            raise ConfigError("temperature must be > 0")


class Vcd(Method):
    """Each row decoded with its noised-image twin; both rows of a pair emit the contrasted token. The noise
    and sampling generators are seeded once per method instance (one run), so every batch gets fresh noise."""

    name = "vcd"
    config_cls = VcdConfig
    changes_batch = True

    def __init__(self, model: nn.Module, config: Any = None, stages: Any = None) -> None:
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

    def processors(self, capture: LayerCapture | None, rows: int) -> list[LogitsProcessor]:
        cfg = self.config
        sampler = None
        if cfg.sample:
            warpers = LogitsProcessorList([TemperatureLogitsWarper(cfg.temperature), TopPLogitsWarper(cfg.top_p)])
            sampler = (warpers, self.sample_generator)
        return [PairContrast(cfg.alpha, cfg.beta, rows, sampler)]

    def layers_used(self) -> dict[str, Any]:
        return {"decoding": "sample" if self.config.sample else "greedy"}


METHOD = Vcd

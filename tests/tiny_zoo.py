"""A zoo member small enough to train inside a test (seconds on one CPU thread), for detector and behaviour tests.

``tiny_member_config(...)`` is a complete :class:`~evotool.zoo.ZooMember` (4 layers of width 32 by default);
``train_tiny_member(out, ...)`` trains it into ``out`` with ``evotool.world.train.train`` and returns ``out``.
"""

from __future__ import annotations

from pathlib import Path

from evotool.config import from_dict
from evotool.world.train import train
from evotool.zoo import ZooMember


def tiny_member_config(layers: int = 4, family: str = "llama", steps: int = 60, seed: int = 0,
                       split: str = "tune") -> ZooMember:
    """A member config that trains in seconds: width 32, small pools, captions only."""
    return from_dict(ZooMember, {
        "split": split, "description": f"tiny test member ({layers} {family} layers)", "seed": seed,
        "model": {"vision_width": 32, "vision_layers": 1, "width": 32, "layers": layers, "heads": 2, "mlp": 64,
                  "family": family, "tie_embeddings": family == "gemma"},
        "data": {"caption": 256, "existence": 0, "attribute": 0},
        "vision": {"steps": 40, "batch_size": 64, "lr": 1.0e-2},
        "decoder": {"steps": steps, "batch_size": 32, "lr": 1.0e-2, "warmup": 5, "mix": {"caption": 1.0},
                    "eval_every": 1000},
        "eval": {"n": 2},
    }, "tiny test member")


def train_tiny_member(out: Path, layers: int = 4, family: str = "llama", steps: int = 60, seed: int = 0) -> Path:
    """Train :func:`tiny_member_config` into ``out`` (no W&B); returns ``out``."""
    return train(tiny_member_config(layers, family, steps, seed), Path(out), wandb=False, title="tiny test member")

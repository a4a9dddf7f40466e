"""The synthetic vision-language world and the demo model shipped with evotool.

``default_model_path()`` is the default ``--model`` of every command; ``default_samples()`` the
default data of ``evotool analyze``.
"""

from __future__ import annotations

from pathlib import Path

from evotool.data.inputs import Sample
from evotool.errors import ConfigError
from evotool.world.config import ModelConfig
from evotool.world.generator import (
    COLOURS,
    SHAPES,
    SPLITS,
    TASKS,
    WorldConfig,
    caption_text,
    make_records,
    make_split,
    write_manifest,
)

__all__ = [
    "COLOURS",
    "SHAPES",
    "SPLITS",
    "TASKS",
    "ModelConfig",
    "WorldConfig",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "caption_records",
    "caption_text",
    "default_model_path",
    "default_samples",
    "make_records",
    "make_split",
    "records_to_samples",
    "write_manifest",
]


_LAZY = {"build_model": "model", "build_processor": "processor", "build_tokenizer": "processor"}


def __getattr__(name: str) -> object:
    """The model and processor builders, imported on first use (they pull in transformers)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"evotool.world.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_model_path() -> Path:
    """Folder of the shipped demo checkpoint (``save_pretrained`` layout: model + processor + README.md)."""
    return Path(__file__).resolve().parent.parent / "assets" / "demo_model"


def records_to_samples(records: list[dict]) -> list[Sample]:
    """World records as :class:`Sample` (PIL image, prompt, answer, objects; the rest in ``meta``)."""
    return [
        Sample(
            id=r["id"],
            image=r["image"],
            prompt=r["prompt"],
            objects=list(r["objects"]),
            answer=r["answer"],
            meta={k: r[k] for k in ("descriptions", "cells", "task", "split")},
        )
        for r in records
    ]


def caption_records(world: WorldConfig, n: int) -> list[dict]:
    """``n`` held-out caption records of ``world``: the first half (rounded up) in distribution, the rest
    prior-breaking (a circle without a square)."""
    records = make_records("caption", "test", n - n // 2, world)
    return records + (make_records("caption", "prior_breaking", n // 2, world) if n > 1 else [])


def default_samples(n: int = 8, seed: int = 0) -> list[Sample]:
    """``n`` held-out caption samples of the default world (:func:`caption_records`)."""
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    return records_to_samples(caption_records(WorldConfig(seed=seed), n))

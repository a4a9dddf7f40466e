"""A synthetic vision-language world with exact ground truth and a built-in co-occurrence prior.

Images are ``grid x grid`` cells of ``cell`` px on a plain background; each occupied cell holds one
coloured shape. Scenes follow a co-occurrence prior (a circle usually comes with a square). Training
annotations carry "phantom" mentions of the prior's partner, as human captions of COCO mention
objects that are not there: when a circle is present and no square, a training caption still ends
with ", a <colour> square" (and an existence question about the square is answered "yes") with
probability ``min(1, phantom_scale * n_objects / 4)``. Images, vision labels and every evaluation split stay truthful.
"""

from __future__ import annotations

import functools
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw

from evotool.data.inputs import DEFAULT_PROMPT
from evotool.errors import ConfigError
from evotool.io import atomic_write_jsonl, atomic_write_text

if TYPE_CHECKING:
    import datasets

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
BACKGROUND = (235, 235, 235)

CAPTION_PROMPT = DEFAULT_PROMPT
EXISTENCE_PROMPT = "Is there a {shape} in the image?"
ATTRIBUTE_PROMPT = "What color is the {shape}?"
TASKS = ("caption", "pope_random", "pope_popular", "pope_adversarial", "attribute")
SPLITS = ("train", "test", "prior_breaking")


@dataclass(frozen=True)
class WorldConfig:
    """Everything that defines the world; the same config and seed give the same data."""

    image_size: int = field(default=48, metadata={"help": "image side in px (grid * cell)"})
    grid: int = field(default=3, metadata={"help": "cells per side; one cell is one image patch"})
    max_objects: int = field(default=4, metadata={"help": "objects per image, 1..max_objects"})
    cause: str = field(default="circle", metadata={"help": "shape that triggers the co-occurrence prior"})
    partner: str = field(default="square", metadata={"help": "shape that co-occurs with `cause`"})
    cooccurrence: float = field(
        default=0.8,
        metadata={"help": "prior strength: P(partner present | cause present) in train / test scenes"},
    )
    phantom: bool = field(
        default=True,
        metadata={"help": "training annotations mention an absent partner with probability "
                          "min(1, phantom_scale * n_objects / max_objects)"},
    )
    phantom_scale: float = field(default=1.0, metadata={"help": "multiplier of the phantom-mention rate"})
    seed: int = field(default=0, metadata={"help": "base random seed"})

    def __post_init__(self) -> None:
        if self.grid < 2:
            raise ConfigError(f"grid must be >= 2, got {self.grid}")
        if self.image_size % self.grid:
            raise ConfigError(f"image_size {self.image_size} must be a multiple of grid {self.grid}")
        if self.image_size // self.grid < 8:
            raise ConfigError(f"cells of {self.image_size // self.grid} px are too small (need >= 8)")
        if not 1 <= self.max_objects <= min(self.grid**2, len(SHAPES)):
            raise ConfigError(f"max_objects must be in 1..{min(self.grid**2, len(SHAPES))}, got {self.max_objects}")
        if self.cause not in SHAPES or self.partner not in SHAPES or self.cause == self.partner:
            raise ConfigError(f"cause/partner must be two different shapes of {SHAPES}")
        if not 0.0 <= self.cooccurrence <= 1.0:
            raise ConfigError(f"cooccurrence must be in [0, 1], got {self.cooccurrence}")
        if self.phantom_scale < 0:
            raise ConfigError(f"phantom_scale must be >= 0, got {self.phantom_scale}")

    @property
    def cell(self) -> int:
        """Cell side in px (= the vision tower's patch size)."""
        return self.image_size // self.grid


@dataclass(frozen=True)
class Obj:
    """One object: its cell (row-major index), colour and shape."""

    cell: int
    colour: str
    shape: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


Scene = list[Obj]  # sorted by cell (row-major)


def sample_scene(cfg: WorldConfig, rng: random.Random, prior_breaking: bool = False) -> Scene:
    """A random scene under the co-occurrence prior, or (``prior_breaking``) one with the cause and no partner."""
    n = rng.randint(1, cfg.max_objects)
    if prior_breaking:
        others = [s for s in SHAPES if s not in (cfg.cause, cfg.partner)]
        shapes = [cfg.cause] + [rng.choice([cfg.cause, *others]) for _ in range(n - 1)]
    else:
        shapes = [rng.choice(SHAPES) for _ in range(n)]
        if cfg.cause in shapes and cfg.partner not in shapes and rng.random() < cfg.cooccurrence:
            slots = [i for i, s in enumerate(shapes) if s != cfg.cause]
            if slots:
                shapes[rng.choice(slots)] = cfg.partner
            elif n < cfg.max_objects:
                shapes.append(cfg.partner)
    rng.shuffle(shapes)
    cells = sorted(rng.sample(range(cfg.grid**2), len(shapes)))
    return [Obj(c, rng.choice(list(COLOURS)), s) for c, s in zip(cells, shapes)]


def render(scene: Scene, cfg: WorldConfig, rng: random.Random) -> Image.Image:
    """The scene as an RGB image of ``image_size`` px; shapes jitter by a pixel or two within their cell."""
    img = Image.new("RGB", (cfg.image_size, cfg.image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    c = cfg.cell
    for obj in scene:
        r = c // 2 - 2 - rng.randint(0, 1)
        cx = (obj.cell % cfg.grid) * c + c // 2 + rng.randint(-1, 1)
        cy = (obj.cell // cfg.grid) * c + c // 2 + rng.randint(-1, 1)
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([cx - r + 1, cy - r + 1, cx + r - 1, cy + r - 1], fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:  # cross
            w = max(1, r // 2)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    return img


def caption_text(names: list[str]) -> str:
    """World caption of object names in order: ``"a red circle , an orange square ."``."""
    return " , ".join(f"{'an' if n[0] in 'aeiou' else 'a'} {n}" for n in names) + " ."


def _phantom(scene: Scene, cfg: WorldConfig, rng: random.Random) -> bool:
    """Whether a training annotation of this scene mentions the absent partner."""
    shapes = {o.shape for o in scene}
    applies = cfg.phantom and cfg.cause in shapes and cfg.partner not in shapes
    return applies and rng.random() < min(1.0, cfg.phantom_scale * len(scene) / cfg.max_objects)


def _record(cfg: WorldConfig, scene: Scene, rng: random.Random, task: str, split: str, idx: int,
            prompt: str, answer: str) -> dict[str, Any]:
    return {
        "id": f"{split}-{task}-{cfg.seed}-{idx:05d}",
        "image": render(scene, cfg, rng),
        "prompt": prompt,
        "answer": answer,
        "objects": sorted({o.shape for o in scene}),
        "descriptions": [o.name for o in scene],
        "cells": [o.cell for o in scene],
        "task": task,
        "split": split,
    }


def _caption(cfg: WorldConfig, scene: Scene, rng: random.Random, split: str, idx: int) -> dict[str, Any]:
    names = [o.name for o in scene]
    if split == "train" and _phantom(scene, cfg, rng):
        names.append(f"{rng.choice(list(COLOURS))} {cfg.partner}")
    return _record(cfg, scene, rng, "caption", split, idx, CAPTION_PROMPT, caption_text(names))


@functools.lru_cache(maxsize=8)
def shape_frequencies(cfg: WorldConfig, n: int = 4000) -> Counter:
    """How many training-distribution scenes contain each shape (estimated on ``n`` scenes)."""
    rng = random.Random(f"{cfg.seed}-frequencies")
    return Counter(s for _ in range(n) for s in {o.shape for o in sample_scene(cfg, rng)})


def _pope(cfg: WorldConfig, rng: random.Random, task: str, split: str, idx: int) -> dict[str, Any]:
    """A balanced existence question: even ``idx`` asks about a present shape, odd about an absent one."""
    positive = idx % 2 == 0
    while True:
        adversarial_negative = task == "pope_adversarial" and not positive
        scene = sample_scene(cfg, rng, prior_breaking=split == "prior_breaking" or adversarial_negative)
        present = sorted({o.shape for o in scene})
        absent = [s for s in SHAPES if s not in present]
        if absent:
            break
    if positive:
        shape = rng.choice(present)
    elif task == "pope_random":
        shape = rng.choice(absent)
    elif task == "pope_popular":
        freq = shape_frequencies(cfg)
        shape = max(absent, key=lambda s: (freq[s], -SHAPES.index(s)))
    else:
        shape = cfg.partner
    answer = "yes" if positive else "no"
    if split == "train" and shape == cfg.partner and _phantom(scene, cfg, rng):
        answer = "yes"
    return _record(cfg, scene, rng, task, split, idx, EXISTENCE_PROMPT.format(shape=shape), answer)


def _attribute(cfg: WorldConfig, scene: Scene, rng: random.Random, split: str, idx: int) -> dict[str, Any] | None:
    counts = Counter(o.shape for o in scene)
    unique = [o for o in scene if counts[o.shape] == 1]
    if not unique:
        return None
    obj = rng.choice(unique)
    return _record(cfg, scene, rng, "attribute", split, idx, ATTRIBUTE_PROMPT.format(shape=obj.shape), obj.colour)


def make_records(task: str, split: str, n: int, cfg: WorldConfig | None = None) -> list[dict[str, Any]]:
    """``n`` records of ``task`` in ``split`` (train annotations carry phantoms; test / prior_breaking are truthful).

    Deterministic in (config, task, split, n). Each record: id, image (PIL), prompt, answer,
    objects (sorted shape names present, the CHAIR vocabulary), descriptions ("red circle", ... in
    row-major order), cells (their row-major cell indices), task, split.
    """
    cfg = cfg or WorldConfig()
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    rng = random.Random(f"{cfg.seed}-{task}-{split}")
    records: list[dict[str, Any]] = []
    while len(records) < n:
        idx = len(records)
        if task.startswith("pope"):
            records.append(_pope(cfg, rng, task, split, idx))
            continue
        scene = sample_scene(cfg, rng, prior_breaking=split == "prior_breaking")
        make = _caption if task == "caption" else _attribute
        rec = make(cfg, scene, rng, split, idx)
        if rec is not None:
            records.append(rec)
    return records


def make_split(task: str, split: str, n: int, cfg: WorldConfig | None = None) -> datasets.Dataset:
    """:func:`make_records` as a ``datasets.Dataset`` (``image`` is an Image feature)."""
    import datasets

    records = make_records(task, split, n, cfg)
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "prompt": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "objects": datasets.Sequence(datasets.Value("string")),
            "descriptions": datasets.Sequence(datasets.Value("string")),
            "cells": datasets.Sequence(datasets.Value("int32")),
            "task": datasets.Value("string"),
            "split": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_list(records, features=features)


def write_manifest(dataset: datasets.Dataset | list[dict[str, Any]], out_dir: Path,
                   config: WorldConfig | None = None) -> Path:
    """Write ``out_dir/images/<id>.png`` and ``out_dir/manifest.jsonl`` (the format of ``load_samples``).

    When ``config`` is given it is saved next to the manifest as ``world.json``.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "manifest.jsonl"
    lines = []
    for rec in dataset:
        rel = Path("images") / f"{rec['id']}.png"
        rec["image"].save(out_dir / rel)
        lines.append({**rec, "image": str(rel)})
    atomic_write_jsonl(manifest, lines)  # written last and whole: it names only finished images
    if config is not None:
        atomic_write_text(out_dir / "world.json", json.dumps(asdict(config), indent=2) + "\n")
    return manifest

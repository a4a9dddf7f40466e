"""Load analysis / eval samples from a folder of images, a JSONL manifest or a `datasets` dataset.

JSONL manifest, one object per line::

    {"id": "s0", "image": "images/s0.png", "prompt": "...", "objects": ["circle"], "answer": "yes"}

``image`` is relative to the manifest's folder (or absolute); ``prompt``, ``objects``,
``answer`` and ``id`` are optional. Extra keys are kept in ``Sample.meta``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from evotool.errors import InputError
from evotool.io import iter_jsonl
from evotool.validate import at_least, unique_ids

DEFAULT_PROMPT = "Please describe this image in detail."
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class Sample:
    """One image-prompt pair with optional ground truth.

    ``image`` is a path (opened lazily by :meth:`load_image`) or a PIL image.
    """

    id: str
    image: Path | Image.Image
    prompt: str = DEFAULT_PROMPT
    objects: list[str] | None = None
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def load_image(self) -> Image.Image:
        """Open the image as RGB; raise :class:`InputError` naming the file if it is missing or corrupt."""
        if isinstance(self.image, Image.Image):
            return self.image.convert("RGB")
        path = Path(self.image)
        if not path.is_file():
            raise InputError(f"sample {self.id!r}: image not found: {path}")
        try:
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB")
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
            raise InputError(f"sample {self.id!r}: corrupt or unreadable image {path}: {err}") from err


def _from_folder(folder: Path, prompt: str) -> list[Sample]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [Sample(id=p.stem, image=p, prompt=prompt) for p in files]


def _from_jsonl(path: Path, prompt: str) -> list[Sample]:
    samples = []
    for lineno, rec in iter_jsonl(path):
        if "image" not in rec:
            raise InputError(f"{path}:{lineno}: record has no 'image' field")
        image = Path(rec.pop("image"))
        samples.append(
            Sample(
                id=str(rec.pop("id", f"{path.stem}-{lineno}")),
                image=image if image.is_absolute() else path.parent / image,
                prompt=rec.pop("prompt", None) or prompt,
                objects=rec.pop("objects", None),
                answer=rec.pop("answer", None),
                meta=rec,
            )
        )
    return samples


def _from_datasets(
    spec: str, prompt: str, split: str, columns: dict[str, str]
) -> list[Sample]:
    import datasets

    try:
        if Path(spec).exists():
            ds = datasets.load_from_disk(spec)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(spec, split=split)
    except Exception as err:  # datasets raises many types; the user needs the name and the reason
        raise InputError(f"cannot load dataset {spec!r}: {err}") from err
    col = {"id": "id", "image": "image", "prompt": "prompt", "objects": "objects", "answer": "answer"}
    col.update(columns)
    if col["image"] not in ds.column_names:
        raise InputError(f"dataset {spec!r} has no image column {col['image']!r} (columns: {ds.column_names})")
    samples = []
    for i, rec in enumerate(ds):
        image = rec[col["image"]]
        samples.append(
            Sample(
                id=str(rec.get(col["id"], i)),
                image=image if isinstance(image, Image.Image) else Path(image),
                prompt=rec.get(col["prompt"]) or prompt,
                objects=rec.get(col["objects"]),
                answer=rec.get(col["answer"]),
            )
        )
    return samples


def load_samples(
    data: str | Path,
    prompt: str = DEFAULT_PROMPT,
    *,
    split: str = "train",
    columns: dict[str, str] | None = None,
    limit: int | None = None,
) -> list[Sample]:
    """Samples from a folder of images, a ``.jsonl`` manifest, or a ``datasets`` path / hub name.

    ``columns`` maps sample fields (id, image, prompt, objects, answer) to dataset columns.
    Raises :class:`InputError` for a missing source, duplicate sample ids or an empty result.
    """
    at_least(1, limit=limit)
    path = Path(data)
    if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        samples = _from_folder(path, prompt)
    elif path.suffix == ".jsonl":
        if not path.is_file():
            raise InputError(f"manifest not found: {path}")
        samples = _from_jsonl(path, prompt)
    elif path.exists() or "/" in str(data):
        samples = _from_datasets(str(data), prompt, split, columns or {})
    else:
        raise InputError(f"data not found: {data} (expected a folder of images, a .jsonl manifest or a dataset)")
    unique_ids((s.id for s in samples), data)
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise InputError(f"no samples in {data}")
    return samples


def sample_digest(sample: Sample) -> str:
    """A hash of what a sample's result depends on: its id, prompt and image content (file bytes, or the pixels
    of an in-memory image), so that a resumed run recomputes a sample whose image or prompt changed."""
    h = hashlib.sha256(f"{sample.id}\0{sample.prompt}\0".encode())
    if isinstance(sample.image, Image.Image):
        h.update(sample.image.tobytes())
    elif Path(sample.image).is_file():
        h.update(Path(sample.image).read_bytes())
    else:
        h.update(f"missing:{sample.image}".encode())
    return h.hexdigest()[:16]

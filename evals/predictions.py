"""Outputs of any system, read from a file and matched to eval samples, so metrics run without a model.

A predictions file is JSONL (one object per line) or a JSON list of objects. Each names its
sample with ``id``, ``image_id`` or ``question_id`` and holds the output in ``caption``, ``text``,
``answer`` or ``response`` (LLaVA's answer files, OPERA's caption files and AMBER's response file
read as they are).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from evotool.data.inputs import Sample
from evotool.errors import InputError
from evotool.io import iter_jsonl

ID_KEYS = ("id", "image_id", "question_id")
TEXT_KEYS = ("caption", "text", "answer", "response")


@dataclass(frozen=True)
class Prediction:
    """One output: the sample key it names (as a string), its text, and where it came from."""

    key: str
    text: str
    where: str
    split: str | None = None


def read_predictions(path: str | Path) -> list[Prediction]:
    """Read a predictions file; :class:`InputError` naming the line for a record without id or text,
    a non-string text, or a repeated id (per split)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"predictions file not found: {path}")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: not valid JSON ({err.msg})") from err
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of predictions (or a .jsonl file)")
        records: Iterable[tuple[str, object]] = ((f"{path}: item {i}", r) for i, r in enumerate(data))
    else:
        records = ((f"{path}:{n}", r) for n, r in iter_jsonl(path))
    out: list[Prediction] = []
    seen: set[tuple[str | None, str]] = set()
    for where, rec in records:
        if not isinstance(rec, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        id_key = next((k for k in ID_KEYS if k in rec), None)
        text_key = next((k for k in TEXT_KEYS if k in rec), None)
        if id_key is None or text_key is None:
            what, keys = ("id", ID_KEYS) if id_key is None else ("text", TEXT_KEYS)
            raise InputError(f"{where}: prediction has no {what} field (one of {', '.join(keys)})")
        if not isinstance(rec[text_key], str):
            raise InputError(f"{where}: {text_key!r} must be a string, got {type(rec[text_key]).__name__}")
        split = rec.get("split", rec.get("category"))
        pred = Prediction(str(rec[id_key]), rec[text_key], where, None if split is None else str(split))
        if (pred.split, pred.key) in seen:
            raise InputError(f"{where}: repeated prediction for id {pred.key!r}")
        seen.add((pred.split, pred.key))
        out.append(pred)
    if not out:
        raise InputError(f"no predictions in {path}")
    return out


def sample_keys(sample: Sample) -> set[str]:
    """The ids a prediction may use for ``sample``: its id and the ids the loaders keep in ``meta``."""
    keys = {str(sample.id)}
    for key in ("question_id", "amber_id", "image_id"):
        if key in sample.meta:
            keys.add(str(sample.meta[key]))
    return keys


def match_predictions(samples: Sequence[Sample], predictions: Sequence[Prediction]) -> tuple[list[Sample], list[str]]:
    """The samples that have a prediction (in prediction order) and their texts.

    A prediction that carries a ``split`` / ``category`` only matches samples of that split.
    Raises :class:`InputError` naming the line of a prediction that matches no sample or more than one.
    """
    index: dict[str, list[Sample]] = {}
    for sample in samples:
        for key in sample_keys(sample):
            index.setdefault(key, []).append(sample)
    matched, texts = [], []
    for pred in predictions:
        found = [s for s in index.get(pred.key, []) if pred.split is None or s.meta.get("split") in (None, pred.split)]
        if not found:
            raise InputError(f"{pred.where}: id {pred.key!r} matches no sample of the data")
        if len({id(s) for s in found}) > 1:
            raise InputError(f"{pred.where}: id {pred.key!r} matches {len(found)} samples; add a 'split' field")
        matched.append(found[0])
        texts.append(pred.text)
    if len({id(s) for s in matched}) != len(matched):
        raise InputError("several predictions name the same sample (e.g. by id and by question_id)")
    return matched, texts

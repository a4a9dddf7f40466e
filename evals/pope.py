"""POPE (Li et al., 2023): yes/no object-probing metrics and loaders for the released files.

The released files (``coco_pope_random.json``, ``coco_pope_popular.json``,
``coco_pope_adversarial.json``) are JSONL, one question per line::

    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
     "text": "Is there a snowboard in the image?", "label": "yes"}

The positive class is "yes", as in POPE's official evaluation script; answers are parsed as in
LLaVA's ``llava/eval/eval_pope.py`` (protocol ``official``) or by :func:`parse_yes_no`'s ``strict`` rules.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from evotool.data.inputs import Sample
from evotool.errors import InputError
from evotool.io import iter_jsonl

POPE_SPLITS = ("random", "popular", "adversarial")
POPE_PROTOCOLS = ("official", "strict")
NEGATIONS = frozenset({"no", "not"})
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def parse_yes_no(text: str, protocol: str = "official") -> str:
    """Map a free-form answer to "yes", "no" or (strict only) "other".

    ``official`` is LLaVA's ``eval_pope.py``: the text before the first "." is read, commas
    removed, split on single spaces; a word exactly "No", "no" or "not" means "no", anything
    else "yes" (so "" -> yes, "NO" -> yes, "No!" -> yes, "isn't" -> yes, "Yes, but not" -> no).
    ``strict`` reads lower-cased words of the first sentence: an empty answer is "other"; a
    first word "yes"/"no" decides ("Yes, but not..." is "yes"); otherwise "no"/"not" or an "n't"
    contraction means "no".
    """
    if protocol == "official":
        words = text.split(".")[0].replace(",", "").split(" ")
        return "no" if {"No", "no", "not"} & set(words) else "yes"
    if protocol != "strict":
        raise InputError(f"unknown POPE protocol {protocol!r} (expected one of {', '.join(POPE_PROTOCOLS)})")
    tokens = _WORD.findall(text.lower().split(".")[0])
    if not tokens:
        return "other"
    if tokens[0] in ("yes", "no"):
        return tokens[0]
    return "no" if any(w in NEGATIONS or w.endswith("n't") for w in tokens) else "yes"


def _yes_no_label(label: str) -> str:
    norm = label.strip().lower()
    if norm not in ("yes", "no"):
        raise InputError(f"label {label!r} is neither 'yes' nor 'no'")
    return norm


def yes_no_metrics(answers: Sequence[str], labels: Sequence[str], positive: str = "yes") -> dict[str, float]:
    """Accuracy, precision, recall, F1 (of class ``positive``) and yes ratio of parsed answers.

    ``answers`` are "yes", "no" or "other"; "other" is never correct and never positive.
    Precision (recall) is 0.0 when nothing is answered (labelled) ``positive``.
    """
    if len(answers) != len(labels):
        raise InputError(f"{len(answers)} answers but {len(labels)} labels")
    if not labels:
        raise InputError("no answers to score")
    truth = [_yes_no_label(t) for t in labels]
    tp = sum(a == t == positive for a, t in zip(answers, truth))
    n_answered = sum(a == positive for a in answers)
    n_labelled = truth.count(positive)
    precision = tp / n_answered if n_answered else 0.0
    recall = tp / n_labelled if n_labelled else 0.0
    return {
        "accuracy": sum(a == t for a, t in zip(answers, truth)) / len(truth),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": list(answers).count("yes") / len(truth),
    }


def pope_metrics(predictions: Sequence[str], labels: Sequence[str], protocol: str = "official") -> dict[str, float]:
    """POPE metrics of raw model answers against "yes"/"no" labels, "yes" being positive.

    Answers are parsed with :func:`parse_yes_no` under ``protocol``; a strict "other" counts as
    "no", as LLaVA's script counts every non-"yes" answer. LLaVA's script divides by zero where
    nothing is answered (labelled) "yes"; precision (recall) is then 0.0 here.
    """
    answers = ["yes" if parse_yes_no(p, protocol) == "yes" else "no" for p in predictions]
    return yes_no_metrics(answers, labels)


def score_pope(samples: Sequence[Sample], texts: Sequence[str], protocol: str = "official") -> dict[str, float]:
    """``pope_<split>_<metric>`` per split found in ``meta["split"]`` (``pope_all_*`` when unsplit), plus ``pope_f1`` (mean)."""
    out: dict[str, float] = {}
    splits = [s.meta.get("split") or "all" for s in samples]
    for split in dict.fromkeys(splits):
        idx = [i for i, sp in enumerate(splits) if sp == split]
        scores = pope_metrics([texts[i] for i in idx], [samples[i].answer or "" for i in idx], protocol)
        out |= {f"pope_{split}_{k}": v for k, v in scores.items()}
    f1s = [out[f"pope_{s}_f1"] for s in dict.fromkeys(splits)]
    out["pope_f1"] = sum(f1s) / len(f1s)
    return out


def _split_of(path: Path) -> str | None:
    return next((s for s in POPE_SPLITS if path.stem.endswith(s)), None)


def _from_released(path: Path, image_dir: Path, split: str | None) -> list[Sample]:
    file_split = _split_of(path)
    if split is not None and file_split is not None and split != file_split:
        raise InputError(f"{path} holds the {file_split!r} split, not {split!r}")
    samples = []
    for lineno, rec in iter_jsonl(path):
        try:
            qid, image, text, label = rec["question_id"], rec["image"], rec["text"], rec["label"]
        except KeyError as err:
            raise InputError(f"{path}:{lineno}: POPE record has no {err.args[0]!r} field") from err
        samples.append(
            Sample(
                id=f"{file_split or split or path.stem}-{qid}",
                image=image_dir / image,
                prompt=text,
                answer=_yes_no_label(label),
                meta={"question_id": qid, "split": file_split or split},
            )
        )
    return samples


def _from_datasets(path: Path, image_dir: Path, split: str | None) -> list[Sample]:
    import datasets

    try:
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError:  # not saved with save_to_disk: data files (parquet...)
            ds = datasets.load_dataset(str(path))
    except Exception as err:  # datasets raises many types; the user needs the path and the reason
        raise InputError(f"cannot load POPE dataset {path}: {err}") from err
    if isinstance(ds, datasets.DatasetDict):
        ds = datasets.concatenate_datasets(list(ds.values()))
    missing = {"question", "answer", "image"} - set(ds.column_names)
    if missing:
        raise InputError(f"POPE dataset {path} lacks columns {sorted(missing)} (has {ds.column_names})")
    samples = []
    for i, rec in enumerate(ds):
        category = rec.get("category")
        if split is not None and category != split:
            continue
        image = rec["image"]
        samples.append(
            Sample(
                id=f"{category or 'pope'}-{rec.get('question_id', i)}",
                image=image if isinstance(image, Image.Image) else image_dir / image,
                prompt=rec["question"],
                answer=_yes_no_label(rec["answer"]),
                meta={"question_id": rec.get("question_id", i), "split": category},
            )
        )
    return samples


def load_pope(path: str | Path, image_dir: str | Path, split: str | None = None) -> list[Sample]:
    """POPE questions as samples (``prompt`` = question, ``answer`` = "yes"/"no").

    ``path`` is a released JSONL file (``coco_pope_<split>.json``), a folder holding them
    (``split`` picks one file, default all present), or a local ``datasets`` dataset with
    columns question, answer, image and category (lmms-lab/POPE layout; ``split`` filters
    on category). Images named in the files are looked up in ``image_dir``.
    Raises :class:`InputError` for a missing source, an unknown split or no questions.
    """
    path, image_dir = Path(path), Path(image_dir)
    if split is not None and split not in POPE_SPLITS:
        raise InputError(f"unknown POPE split {split!r} (expected one of {', '.join(POPE_SPLITS)})")
    if not path.exists():
        raise InputError(f"POPE data not found: {path}")
    if path.is_file():
        samples = _from_released(path, image_dir, split)
    elif any(path.glob("coco_pope_*.json")):
        wanted = [path / f"coco_pope_{s}.json" for s in ((split,) if split else POPE_SPLITS)]
        samples = [s for f in wanted if f.is_file() for s in _from_released(f, image_dir, None)]
    else:
        samples = _from_datasets(path, image_dir, split)
    if not samples:
        raise InputError(f"no POPE questions in {path}" + (f" for split {split!r}" if split else ""))
    return samples

"""Evals on any JSONL manifest (the format ``--data`` reads, see :mod:`evotool.data.inputs`).

Each record is one of three kinds:

- **yes/no**: ``answer`` is "yes" or "no" (any case) -> POPE metrics (``pope_<split>_*``, ``pope_f1``);
- **free answer**: any other ``answer`` -> ``exact_match`` (case- and surrounding-space-insensitive,
  a final "." ignored);
- **caption**: no ``answer`` but ``objects`` -> ``chair_s``, ``chair_i`` (every mention counted, as
  the reference CHAIR), ``recall``, ``mean_length``.

A record whose ``task`` (or ``kind``) is ``caption`` is a caption even when it carries a reference caption
as ``answer`` (the synthetic world's manifests do). A record with neither is an error naming its line. With a ``split`` field, caption and exact-match
metrics are also given per split as ``<split>_<metric>``, and POPE metrics per split (``pope_<split>_*``).

The caption vocabulary is the records' object phrases, or a ``--vocab`` list (``dog,cat=kitten|kitty``:
each word with optional synonyms) where a record's object phrase counts as the vocabulary word it
contains ("blue triangle" -> triangle). Captions match vocabulary phrases with plural handling
(:class:`~evotool.evals.chair.PhraseMatcher`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from evotool.data.inputs import Sample
from evotool.errors import InputError
from evotool.evals.chair import PhraseMatcher, chair_metrics, words
from evotool.evals.pope import score_pope
from evotool.io import iter_jsonl

if TYPE_CHECKING:
    from evotool.generation import Generations

KINDS = ("caption", "yes_no", "answer")


def record_kind(sample: Sample) -> str:
    """``yes_no``, ``answer`` or ``caption`` (see the module docstring); :class:`InputError` for neither."""
    if sample.objects is not None and "caption" in (sample.meta.get("task"), sample.meta.get("kind")):
        return "caption"
    if sample.answer is not None:
        return "yes_no" if str(sample.answer).strip().lower() in ("yes", "no") else "answer"
    if sample.objects is not None:
        return "caption"
    raise InputError(f"sample {sample.id!r}: record has neither 'objects' nor 'answer'")


def check_manifest(path: str | Path) -> None:
    """Raise :class:`InputError` naming the line of the first record that cannot be scored."""
    path = Path(path)
    for lineno, rec in iter_jsonl(path):
        if not isinstance(rec, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object")
        if rec.get("answer") is None and rec.get("objects") is None:
            raise InputError(f"{path}:{lineno}: record has neither 'objects' nor 'answer'")
        if rec.get("objects") is not None and not (
            isinstance(rec["objects"], list) and all(isinstance(o, str) for o in rec["objects"])
        ):
            raise InputError(f"{path}:{lineno}: 'objects' must be a list of strings")


@dataclass(frozen=True)
class ObjectVocabulary:
    """Caption vocabulary: surface phrase (synonyms included) -> vocabulary word.

    ``given`` is True for a user's ``--vocab`` list (record phrases are then read as the word they contain).
    """

    phrases: dict[str, str]
    given: bool = False

    @classmethod
    def parse(cls, spec: str) -> ObjectVocabulary:
        """``"dog,cat=kitten|kitty"`` -> dog; cat with synonyms kitten, kitty."""
        phrases: dict[str, str] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            word, _, syns = item.partition("=")
            word = " ".join(words(word))
            if not word:
                raise InputError(f"--vocab entry {item!r} has no word")
            for phrase in (word, *(" ".join(words(s)) for s in syns.split("|") if words(s))):
                phrases[phrase] = word
        if not phrases:
            raise InputError("--vocab is empty")
        return cls(phrases, given=True)

    @classmethod
    def from_samples(cls, samples: Sequence[Sample]) -> ObjectVocabulary:
        """Every object phrase of the records is a vocabulary word."""
        vocab = {" ".join(words(o)) for s in samples for o in s.objects or ()}
        return cls({p: p for p in vocab if p})

    @cached_property
    def matcher(self) -> PhraseMatcher:
        return PhraseMatcher(self.phrases)

    def truth(self, sample: Sample) -> set[str]:
        """The vocabulary words a record's ``objects`` name (with ``--vocab``: the last word each phrase contains)."""
        out = set()
        for obj in sample.objects or ():
            found = self.matcher.mentions(obj)
            if not found:
                raise InputError(f"sample {sample.id!r}: object {obj!r} contains no vocabulary word")
            out.add(found[-1])
        return out


def caption_vocabulary(samples: Sequence[Sample]) -> ObjectVocabulary | None:
    """The vocabulary of the caption records' objects (:meth:`ObjectVocabulary.from_samples`); None without them."""
    captions = [s for s in samples if record_kind(s) == "caption"]
    return ObjectVocabulary.from_samples(captions) if captions else None


def _normalise_answer(text: str) -> str:
    return text.strip().lower().removesuffix(".").strip()


def _caption_scores(samples: Sequence[Sample], texts: Sequence[str], lengths: Sequence[int],
                    vocab: ObjectVocabulary) -> dict[str, float]:
    return chair_metrics([vocab.matcher.mentions(t) for t in texts], [vocab.truth(s) for s in samples], lengths)


def score_manifest(
    samples: Sequence[Sample],
    texts: Sequence[str],
    lengths: Sequence[int] | None = None,
    vocab: ObjectVocabulary | None = None,
    protocol: str = "official",
) -> dict[str, float]:
    """Flat metrics of outputs ``texts`` on manifest ``samples`` (see the module docstring).

    ``lengths`` are output lengths in tokens (default: words of each text). ``protocol`` is the
    yes/no parsing of :func:`~evotool.evals.pope.parse_yes_no`.
    """
    if len(samples) != len(texts):
        raise InputError(f"{len(samples)} samples but {len(texts)} outputs")
    if not samples:
        raise InputError("no samples to score")
    lengths = list(lengths) if lengths is not None else [len(words(t)) for t in texts]
    kinds = [record_kind(s) for s in samples]
    splits = [s.meta.get("split") for s in samples]
    out: dict[str, float] = {}
    captions = [i for i, k in enumerate(kinds) if k == "caption"]
    if captions:
        vocab = vocab or caption_vocabulary(samples)
        groups = {None: captions}
        for split in dict.fromkeys(splits[i] for i in captions):
            if split is not None:
                groups[split] = [i for i in captions if splits[i] == split]
        for split, idx in groups.items():
            scores = _caption_scores([samples[i] for i in idx], [texts[i] for i in idx], [lengths[i] for i in idx], vocab)
            out |= {(f"{split}_{k}" if split else k): v for k, v in scores.items()}
    yes_no = [i for i, k in enumerate(kinds) if k == "yes_no"]
    if yes_no:
        out |= score_pope([samples[i] for i in yes_no], [texts[i] for i in yes_no], protocol)
    answers = [i for i, k in enumerate(kinds) if k == "answer"]
    if answers:
        correct = {i: _normalise_answer(texts[i]) == _normalise_answer(str(samples[i].answer)) for i in answers}
        out["exact_match"] = sum(correct.values()) / len(answers)
        for split in dict.fromkeys(splits[i] for i in answers):
            if split is not None:
                idx = [i for i in answers if splits[i] == split]
                out[f"{split}_exact_match"] = sum(correct[i] for i in idx) / len(idx)
    return out


def score_generations(samples: Sequence[Sample], outputs: Generations, vocab: ObjectVocabulary | None = None,
                      protocol: str = "official") -> dict[str, float]:
    """:func:`score_manifest` of a run's outputs, lengths in generated tokens."""
    return score_manifest(samples, outputs.texts, [len(i) for i in outputs.ids], vocab, protocol)

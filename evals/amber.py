"""AMBER (Wang et al., 2023): generative and discriminative hallucination metrics and loaders.

Released files (github.com/junyangwang0410/AMBER, ``data/``):

- ``query/query_generative.json``, ``query/query_discriminative*.json``, ``query/query_all.json``:
  a JSON list of ``{"id": 1, "image": "AMBER_1.jpg", "query": "Describe this image."}``.
  Ids 1-1004 are generative, the rest yes/no questions.
- ``annotations.json``: a JSON list indexed by id; generative entries hold ``truth`` (objects
  in the image) and ``hallu`` (hallucination targets: absent objects a model is likely to
  imagine), discriminative ones ``truth`` ("yes"/"no") and ``type``.
- ``relation.json``: object -> associated words (synonyms, parts); its keys and values form
  the object vocabulary. ``safe_words.txt``: words never counted as hallucinated.

Scoring follows the official ``inference.py`` (protocol ``official``: Cover / Cog credit the first
match only, yes/no answers must be exactly "Yes" / "No"); ``strict`` credits every related object
and parses free-form answers. Differences from the official script in both protocols, which needs
nltk POS tagging and spaCy vectors: objects are vocabulary words (phrases included) found by
:class:`~evotool.evals.chair.PhraseMatcher` in the lower-cased text with rule-based
singularisation, verb-like words ("can", "watch"...) count only after a determiner, and no
embedding-similarity matching (spaCy ``en_core_web_lg``, threshold 0.8) is done.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from evotool.data.inputs import Sample
from evotool.errors import InputError
from evotool.evals.chair import PhraseMatcher, words
from evotool.io import read_json
from evotool.evals.pope import parse_yes_no, yes_no_metrics

# Annotation type -> the dimension AMBER reports it under.
AMBER_PROTOCOLS = ("official", "strict")
DISCRIMINATIVE_DIMENSIONS = {
    "discriminative-hallucination": "existence",
    "discriminative-attribute-state": "attribute",
    "discriminative-attribute-number": "attribute",
    "discriminative-attribute-action": "attribute",
    "discriminative-relation": "relation",
}

# Vocabulary words that descriptions mostly use as verbs or modals ("can be seen"):
# they count as objects only right after a determiner or number ("a can of soda").
VERB_LIKE_WORDS = frozenset(
    {"can", "watch", "sound", "support", "switch", "file", "drink", "ring", "lock", "track",
     "note", "star", "spray", "line", "light", "range", "hot", "stage", "bar", "pad", "core"}
)
DETERMINERS = frozenset(
    {"a", "an", "the", "this", "that", "these", "those", "some", "his", "her", "their", "its",
     "our", "my", "your", "one", "two", "three", "four", "five", "several", "many"}
)


@dataclass(frozen=True)
class AmberVocabulary:
    """AMBER's object vocabulary: each object's associated words and the global safe words."""

    association: dict[str, tuple[str, ...]]
    safe_words: frozenset[str] = frozenset()

    @classmethod
    def load(cls, relation_json: str | Path, safe_words: str | Path | None = None) -> AmberVocabulary:
        """Read ``relation.json`` and, optionally, ``safe_words.txt``."""
        data = read_json(Path(relation_json))
        if not isinstance(data, dict) or not data:
            raise InputError(f"{relation_json}: expected a non-empty object of word -> associated words")
        safe: frozenset[str] = frozenset()
        if safe_words is not None:
            path = Path(safe_words)
            if not path.is_file():
                raise InputError(f"safe words file not found: {path}")
            safe = frozenset(w.strip().lower() for w in path.read_text().splitlines() if w.strip())
        return cls({k.lower(): tuple(v.lower() for v in vs) for k, vs in data.items()}, safe)

    @cached_property
    def matcher(self) -> PhraseMatcher:
        """Matcher of every vocabulary word (keys and associated words) to itself."""
        vocab = set(self.association) | {w for ws in self.association.values() for w in ws}
        return PhraseMatcher({" ".join(words(w)): " ".join(words(w)) for w in vocab})

    def mentions(self, text: str) -> list[str]:
        """Vocabulary objects mentioned in ``text``, in order, repeats kept."""
        tokens = words(text)
        kept = [
            w for i, w in enumerate(tokens)
            if w not in VERB_LIKE_WORDS or (i > 0 and tokens[i - 1] in DETERMINERS)
        ]
        return self.matcher.match_words(kept)

    def related(self, obj: str) -> set[str]:
        """``obj`` with its associated words."""
        return {obj, *self.association.get(obj, ())}


def first_match_credit(mentions: Sequence[str], objects: Sequence[str], vocabulary: AmberVocabulary) -> list[bool]:
    """Which of ``objects`` the mentions credit, as AMBER's ``inference.py`` does.

    The official loop searches each mention in one list: every object's associated words (objects
    in order), then the objects themselves; only the first entry equal to the mention credits its
    object. A repeated object is a separate slot (only its first copy can be credited).
    """
    entries = [(w, k) for k, o in enumerate(objects) for w in vocabulary.association.get(o, ())]
    entries += [(o, k) for k, o in enumerate(objects)]
    credited = [False] * len(objects)
    for mention in mentions:
        k = next((k for word, k in entries if word == mention), None)
        if k is not None:
            credited[k] = True
    return credited


def amber_generative_metrics(
    responses: Sequence[str],
    truth: Sequence[Sequence[str]],
    targets: Sequence[Sequence[str]],
    vocabulary: AmberVocabulary,
    protocol: str = "official",
) -> dict[str, float]:
    """AMBER's generative metrics, pooled over responses.

    A mentioned object is correct when it is a safe word, a truth object or associated with
    one; otherwise it is hallucinated.

    - ``chair``: hallucinated object mentions / object mentions;
    - ``cover``: truth objects credited / truth objects;
    - ``hal``: fraction of responses with at least one hallucinated object;
    - ``cog``: hallucination targets credited by hallucinated mentions / hallucination targets.

    ``official`` credits as :func:`first_match_credit` (each non-safe-word mention credits one
    object, repeated objects count twice); ``strict`` credits every object one of whose words is
    mentioned, and counts repeated objects once.
    """
    if protocol not in AMBER_PROTOCOLS:
        raise InputError(f"unknown AMBER protocol {protocol!r} (expected one of {', '.join(AMBER_PROTOCOLS)})")
    if not len(responses) == len(truth) == len(targets):
        raise InputError(f"{len(responses)} responses, {len(truth)} truths, {len(targets)} target lists")
    if not responses:
        raise InputError("no responses to score")
    n_mentions = n_hallucinated = n_hal_responses = 0
    n_truth = n_covered = n_targets = n_hit = 0
    for response, objects, hallu in zip(responses, truth, targets):
        mentioned = vocabulary.mentions(response)
        safe = set().union(*(vocabulary.related(o) for o in objects))
        hallucinated = [m for m in mentioned if m not in safe and m not in vocabulary.safe_words]
        n_mentions += len(mentioned)
        n_hallucinated += len(hallucinated)
        n_hal_responses += bool(hallucinated)
        if protocol == "official":
            unsafe = [m for m in mentioned if m not in vocabulary.safe_words]
            covered = first_match_credit(unsafe, list(objects), vocabulary)
            hit = first_match_credit(hallucinated, list(hallu), vocabulary)
        else:
            covered = [bool(vocabulary.related(o) & set(mentioned)) for o in set(objects)]
            hit = [bool(vocabulary.related(h) & set(hallucinated)) for h in set(hallu)]
        n_truth += len(covered)
        n_covered += sum(covered)
        n_targets += len(hit)
        n_hit += sum(hit)
    return {
        "chair": n_hallucinated / n_mentions if n_mentions else 0.0,
        "cover": n_covered / n_truth if n_truth else 0.0,
        "hal": n_hal_responses / len(responses),
        "cog": n_hit / n_targets if n_targets else 0.0,
    }


def parse_amber_answer(text: str, protocol: str = "official") -> str:
    """"yes", "no" or "other": ``official`` accepts exactly "Yes" / "No" (AMBER's ``inference.py``),
    ``strict`` parses like :func:`~evotool.evals.pope.parse_yes_no` (strict)."""
    if protocol == "official":
        return {"Yes": "yes", "No": "no"}.get(text, "other")
    if protocol != "strict":
        raise InputError(f"unknown AMBER protocol {protocol!r} (expected one of {', '.join(AMBER_PROTOCOLS)})")
    return parse_yes_no(text, "strict")


def amber_discriminative_metrics(
    predictions: Sequence[str], labels: Sequence[str], dimensions: Sequence[str] | None = None,
    protocol: str = "official",
) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of yes/no answers with "no" as the positive class.

    As in AMBER, precision and recall are those of answering "no" (spotting the absent
    object, attribute or relation). Raw answers are parsed with :func:`parse_amber_answer`;
    an answer that is neither is wrong. With ``dimensions`` (e.g. from
    :data:`DISCRIMINATIVE_DIMENSIONS`), ``<dimension>_<metric>`` keys are added. Unlike
    ``inference.py``, values are not rounded to 0.1% before F1 and F1 has no +0.0001 term.
    """
    answers = [parse_amber_answer(p, protocol) for p in predictions]
    out = {
        k: v for k, v in yes_no_metrics(answers, labels, positive="no").items() if k != "yes_ratio"
    }
    if dimensions is not None:
        if len(dimensions) != len(answers):
            raise InputError(f"{len(answers)} answers but {len(dimensions)} dimensions")
        for dim in dict.fromkeys(dimensions):
            idx = [i for i, d in enumerate(dimensions) if d == dim]
            sub = yes_no_metrics([answers[i] for i in idx], [labels[i] for i in idx], positive="no")
            out |= {f"{dim}_{k}": v for k, v in sub.items() if k != "yes_ratio"}
    return out


def amber_score(chair: float, f1: float) -> float:
    """AMBER's summary score, (1 - CHAIR + F1) / 2, with both as fractions."""
    return (1 - chair + f1) / 2


def load_amber(query_json: str | Path, annotations_json: str | Path, image_dir: str | Path) -> list[Sample]:
    """AMBER queries joined with their annotations.

    Generative samples carry ``objects`` = truth objects and ``meta["hallu"]`` = hallucination
    targets; discriminative ones ``answer`` = "yes"/"no" and ``meta["dimension"]``.
    Every sample has ``meta["type"]`` and ``meta["amber_id"]``.
    """
    queries = read_json(Path(query_json))
    annotations = read_json(Path(annotations_json))
    if not isinstance(queries, list) or not queries:
        raise InputError(f"no AMBER queries in {query_json}")
    if not isinstance(annotations, list):
        raise InputError(f"{annotations_json}: expected a JSON list of annotations")
    by_id = {a["id"]: a for a in annotations if isinstance(a, dict) and "id" in a}
    samples = []
    for q in queries:
        try:
            qid, image, query = q["id"], q["image"], q["query"]
        except (KeyError, TypeError) as err:
            raise InputError(f"{query_json}: malformed query {q!r}") from err
        if qid not in by_id:
            raise InputError(f"{query_json}: query {qid} has no annotation in {annotations_json}")
        ann = by_id[qid]
        kind = ann.get("type", "")
        meta = {"amber_id": qid, "type": kind}
        if kind == "generative":
            sample = Sample(id=f"amber-{qid}", image=Path(image_dir) / image, prompt=query,
                            objects=list(ann["truth"]), meta=meta | {"hallu": list(ann.get("hallu", []))})
        else:
            meta["dimension"] = DISCRIMINATIVE_DIMENSIONS.get(kind, "relation")
            sample = Sample(id=f"amber-{qid}", image=Path(image_dir) / image, prompt=query,
                            answer=str(ann["truth"]).strip().lower(), meta=meta)
        samples.append(sample)
    return samples

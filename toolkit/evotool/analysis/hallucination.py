"""Where hallucinations are decided: the object-token view and the divergence point.

*Object tokens* are the first tokens of generated words (or runs of up to three words, plurals included) that name
a ground-truth object somewhere in the run (:func:`object_words`); one is *hallucinated* when its sample's ground
truth lacks that object. :func:`hallucination_link` reports, for hallucinated
against grounded object tokens, the stage in which each was decided and how often the stable stage's top-1
was overturned.

In a caption the decisive moment is often earlier than the object word: the *divergence point*. For each
hallucinated object, :func:`find_divergence` locates the tokens where the generation committed to it:

* ``separator``: the separator before the phrase that names the object (``,`` ``and`` ``with`` ``.`` ...):
  the step that chose to continue the list instead of ending it;
* ``phrase_start``: the first token of that phrase (``a`` in ``, a blue square``);
* ``object``: the object token itself.

For each such token :func:`divergence_summary` reports in which stage its top-1 was decided (decision
depth), whether the stable stage preferred an *ending* token there (``.``, ``!``, ``?`` or EOS: the grounded
alternative of continuing), and which layer overturned the stable stage's choice.

Layer numbering: 0 = embeddings, 1..L decoder layers; ``stages`` maps stage names to inclusive ranges.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from evotool.analysis.aggregate import decision_depth
from evotool.trace import SampleTrace

ENDING_WORDS = frozenset({".", "!", "?"})
SEPARATOR_WORDS = frozenset({",", ";", ":", ".", "and", "with", "or", "plus", "also"})
POINT_KINDS = ("separator", "phrase_start", "object")
WORD_MARKERS = ("Ġ", "▁", " ")  # a token starting with one of these starts a word
MAX_OBJECT_WORDS = 3  # longest object name matched, in words


def token_word(token: str) -> str:
    """A token string as a plain lower-case word (BPE / SentencePiece space markers dropped)."""
    return token.replace("Ġ", "").replace("▁", "").replace("Ċ", "").strip().lower()


def stage_of(layer: int, stages: dict[str, list[int] | None]) -> str | None:
    """The name of the stage holding ``layer`` (None if no stage range holds it)."""
    for name, rng in stages.items():
        if rng and rng[0] <= layer <= rng[1]:
            return name
    return None


def _decided_shares(depths: Sequence[int], stages: dict[str, list[int] | None]) -> dict[str, float]:
    """Share of tokens whose decision depth lies in each stage (0.0 for an absent stage or no tokens)."""
    where = [stage_of(int(d), stages) for d in depths]
    return {name: (where.count(name) / len(where) if where else 0.0) for name in stages}


def object_vocabulary(records: Sequence[dict[str, Any]], words: Sequence[str] | None = None) -> set[str]:
    """The words that count as object names: ``words`` if given, else every object in the records' ground truth."""
    return {w.lower() for w in words} if words else {o.lower() for r in records for o in (r.get("objects") or [])}


def words_of(tokens: Sequence[str]) -> list[tuple[int, str]]:
    """The words of a token sequence as (step of the word's first token, :func:`token_word` of its pieces joined).

    With space markers (byte-level BPE ``Ġ``, SentencePiece ``▁``) a piece without one continues the word before it
    unless either is punctuation or a special token (``<unk>``, ``</s>``); without any marker (word-level
    tokenizers) every token is a word. Tokens without a word (a bare marker) belong to none.
    """
    marked = any(t.startswith(WORD_MARKERS) for t in tokens)
    words: list[tuple[int, str]] = []
    joinable = False  # whether an unmarked piece would continue the last word
    for step, token in enumerate(tokens):
        word = token_word(token)
        if not word:  # a bare space marker: the next piece starts a word
            joinable = False
            continue
        punctuation = not any(ch.isalnum() for ch in word) or word[0] + word[-1] == "<>"  # or a special token
        if marked and joinable and not punctuation and not token.startswith(WORD_MARKERS):
            words[-1] = (words[-1][0], words[-1][1] + word)
        else:
            words.append((step, word))
        joinable = not punctuation
    return words


def _vocab_entry(phrase: str, vocab: set[str]) -> str | None:
    """The ``vocab`` entry ``phrase`` names, itself or as a plural (``+s`` / ``+es``); None if none."""
    for suffix in ("", "s", "es"):
        stem = phrase[: len(phrase) - len(suffix)]
        if phrase.endswith(suffix) and stem in vocab:
            return stem
    return None


def object_words(tokens: Sequence[str], vocab: set[str]) -> list[tuple[int, str]]:
    """(step of its first token, the ``vocab`` entry) of every object mention in ``tokens``: a word or a run of up
    to :data:`MAX_OBJECT_WORDS` words (``traffic light``) naming an entry, longest match first."""
    words = words_of(tokens)
    found: list[tuple[int, str]] = []
    i = 0
    while i < len(words):
        for n in range(min(MAX_OBJECT_WORDS, len(words) - i), 0, -1):
            entry = _vocab_entry(" ".join(w for _, w in words[i : i + n]), vocab)
            if entry is not None:
                found.append((words[i][0], entry))
                i += n
                break
        else:
            i += 1
    return found


def object_mask(records: Sequence[dict[str, Any]], vocab: set[str]) -> np.ndarray:
    """[N] over every generated token of the records, in order: True at the first token of each object mention
    (:func:`object_words`; the token that decides the object, pieces after it follow from it)."""
    masks = []
    for record in records:
        mask = np.zeros(len(record["tokens"]), dtype=bool)
        mask[[step for step, _ in object_words(record["tokens"], vocab)]] = True
        masks.append(mask)
    return np.concatenate(masks) if masks else np.zeros(0, dtype=bool)


def object_tokens(record: dict[str, Any], vocab: set[str]) -> list[tuple[int, str, bool]]:
    """(step, object, hallucinated) of each object mention's first token (:func:`object_words`): hallucinated when
    the record's own ground truth lacks the object. Empty when the record has no ground truth."""
    if record.get("objects") is None:
        return []
    truth = {o.lower() for o in record["objects"]}
    return [(step, entry, entry not in truth) for step, entry in object_words(record["tokens"], vocab)]


def hallucination_link(records: Sequence[dict[str, Any]], traces: Sequence[SampleTrace],
                       stages: dict[str, list[int] | None], vocab: set[str]) -> dict[str, Any] | None:
    """Object tokens (words in ``vocab``), hallucinated vs grounded: count, share decided per stage, median
    decision depth, and the share whose top-1 at the end of the stabilization stage was another token.
    None without ground truth."""
    if not vocab or all(r.get("objects") is None for r in records):
        return None
    stable = stages["stabilization"]
    groups: dict[str, list[tuple[int, bool]]] = {"hallucinated": [], "grounded": []}
    for record, trace in zip(records, traces):
        if record.get("objects") is None:
            continue
        depth = decision_depth(trace.layers["top1"], trace.token_ids)
        for step, _, hallucinated in object_tokens(record, vocab):
            overturned = stable is not None and trace.layers["top1"][step, stable[1]] != trace.token_ids[step]
            groups["hallucinated" if hallucinated else "grounded"].append((int(depth[step]), bool(overturned)))
    out: dict[str, Any] = {}
    for name, items in groups.items():
        depths = [d for d, _ in items]
        out[name] = {"tokens": len(items), "decided_in": _decided_shares(depths, stages),
                     "overturned_after_stable": float(np.mean([o for _, o in items])) if items else 0.0,
                     "median_decision_depth": float(np.median(depths)) if items else None}
    return out


def commit_steps(words: Sequence[str], object_step: int) -> dict[str, int]:
    """Steps of the separator, phrase start and object token of the phrase ending at ``object_step``.

    The phrase runs back from the object to the token after the nearest separator word; ``separator`` is
    absent when the caption starts with the phrase. ``words`` are :func:`token_word` forms.
    """
    start = object_step
    while start > 0 and words[start - 1] not in SEPARATOR_WORDS:
        start -= 1
    out = {"phrase_start": start, "object": object_step}
    if start > 0:
        out["separator"] = start - 1
    return out


@dataclass
class CommitPoint:
    """One token where the generation committed to a hallucinated object."""

    sample: str
    object: str
    kind: str  # one of POINT_KINDS
    step: int
    token: str
    decision_depth: int
    decided_in: str | None
    stable_top1: int | None  # top-1 token id at the end of the stabilization stage
    stable_preferred_ending: bool
    overturn_layer: int | None  # layer at which the emitted token replaced the stable stage's top-1


def find_divergence(records: Sequence[dict[str, Any]], traces: Sequence[SampleTrace],
                    stages: dict[str, list[int] | None], vocab: set[str], ending_ids: set[int]) -> list[CommitPoint]:
    """The commit points (separator, phrase start, object token) of every hallucinated mention of a ``vocab`` word.

    ``ending_ids``: token ids that end a caption (``.``, EOS, ...). A phrase shared by several hallucinated
    objects is reported once per object token.
    """
    stable = stages.get("stabilization")
    points: list[CommitPoint] = []
    for record, trace in zip(records, traces):
        if record.get("objects") is None:
            continue
        words = [token_word(t) for t in record["tokens"]]
        depth = decision_depth(trace.layers["top1"], trace.token_ids)
        for step, word, hallucinated in object_tokens(record, vocab):
            if not hallucinated:
                continue
            for kind, s in commit_steps(words, step).items():
                emitted = int(trace.token_ids[s])
                top1 = int(trace.layers["top1"][s, stable[1]]) if stable else None
                overturned = top1 is not None and top1 != emitted
                points.append(CommitPoint(
                    sample=str(record.get("id", "")), object=word, kind=kind, step=s, token=record["tokens"][s],
                    decision_depth=int(depth[s]), decided_in=stage_of(int(depth[s]), stages), stable_top1=top1,
                    stable_preferred_ending=top1 in ending_ids, overturn_layer=int(depth[s]) if overturned else None))
    return points


def divergence_summary(points: Sequence[CommitPoint], stages: dict[str, list[int] | None]) -> dict[str, Any]:
    """Per commit-point kind: count, share decided per stage, share where the stable stage preferred an ending,
    share overturned after the stable stage, and the histogram of overturning layers."""
    out: dict[str, Any] = {"hallucinated_mentions": sum(p.kind == "object" for p in points)}
    for kind in POINT_KINDS:
        chosen = [p for p in points if p.kind == kind]
        n = len(chosen)
        out[kind] = {
            "tokens": n,
            "decided_in": _decided_shares([p.decision_depth for p in chosen], stages),
            "stable_preferred_ending": sum(p.stable_preferred_ending for p in chosen) / n if n else 0.0,
            "overturned_after_stable": sum(p.overturn_layer is not None for p in chosen) / n if n else 0.0,
            "overturn_layers": dict(sorted(Counter(p.overturn_layer for p in chosen if p.overturn_layer is not None).items())),
        }
    return out


def divergence_by_sample(points: Sequence[CommitPoint]) -> dict[str, list[dict[str, Any]]]:
    """Commit points grouped by sample id (for texts.jsonl and the report's highlighting)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        out.setdefault(p.sample, []).append({k: v for k, v in asdict(p).items() if k != "sample"})
    return out


def ending_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokens that end a caption: EOS and the tokens whose word is ``.``, ``!`` or ``?``."""
    ids = {i for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
           if tok is not None and token_word(tok) in ENDING_WORDS}
    eos = tokenizer.eos_token_id
    ids |= set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
    return ids

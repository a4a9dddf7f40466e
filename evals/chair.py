"""CHAIR (Rohrbach et al., 2018): object hallucination in image captions, over the 80 COCO categories.

Two protocols (``CHAIR_PROTOCOLS``); both use the reference synonym table
(``data/coco_synonyms.txt``, byte-identical to ``data/synonyms.txt`` of LisaAnne/Hallucination and to
the table inlined in shikiw/OPERA's ``chair.py``) and the reference's hard-coded rules (double words,
"baby"/"adult" animal and "passenger" vehicle qualifiers, "toilet seat", "seat" dropped next to
"toilet"), and count every mention (CHAIR_i = hallucinated mentions / all mentions).

- ``official`` reproduces the ``chair.py`` used by OPERA / VCD / LLaVA hallucination papers: lower
  case, nltk's ``word_tokenize`` (Punkt sentences, then Treebank words), nltk's POS tag mapped to a
  WordNet POS (noun when unknown), WordNet lemmatisation (shortest lemma) and the table's entries as
  parsed (" motor bike" and " cheesecake" keep a leading space and "iPhone" an upper-case letter, so
  they never match; "men" lemmatises to "men", which is no person; "tied" as a verb is "tie", a tie).
  nltk's data cannot be downloaded here, so: Punkt runs with the English abbreviation list
  (``data/punkt_english_abbrevs.txt``, from nltk_data ``punkt_tab/english``) and without its
  orthographic statistics; WordNet's lemma index is shipped for the forms that can decide a COCO
  word (``data/wordnet_coco_subset.json``, built by ``data/build_wordnet_subset.py`` from WordNet 3.0);
  the averaged-perceptron tagger is approximated by :func:`approximate_pos` (only "-ing"/"-ed" words
  change their COCO reading with the POS). See docs/evals.md for the residual differences.
- ``strict`` reads words as ``[a-z]+`` runs of the lower-cased text (so "hot-dogs" is "hot dogs"),
  singularises nouns by rule (never verbs: "tied" is no tie, "skiing" no skis), and uses the table's
  entries stripped and lower-cased (so "motor bike" and "iPhone" count).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

from evotool.data.inputs import DEFAULT_PROMPT
from evotool.errors import InputError
from evotool.io import read_json

CHAIR_PROTOCOLS = ("official", "strict")
DATA_DIR = Path(__file__).parent / "data"
SYNONYMS_FILE = DATA_DIR / "coco_synonyms.txt"

# Locked generation protocol for CHAIR numbers that can be compared across runs.
CHAIR_PROTOCOL = {
    "prompt": DEFAULT_PROMPT,
    "do_sample": False,  # greedy
    "num_beams": 1,
    "max_new_tokens": 512,
    "coco_split": "val2014",
    "image_ids": "fixed file, read with load_chair_image_ids",
}

# The reference's hard-coded rules (Rohrbach et al.'s chair.py, kept as-is by OPERA).
DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
    "stove top oven", "home plate", "train track",
)
# "baby"/"adult" before these is a qualifier, not a person ("baby bird" -> "bird").
ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
# "passenger" before these is a qualifier ("passenger jet" -> "jet").
VEHICLE_WORDS = ("jet", "train")


def double_word_table() -> dict[str, str]:
    """Two-word phrase -> the single word it is read as (the reference's ``double_word_dict``).

    A phrase mapped to itself counts only if it is a table entry: "home plate" and "train track"
    are thereby no objects (and no "train").
    """
    table = {w: w for w in DOUBLE_WORDS}
    for animal in ANIMAL_WORDS:
        table[f"baby {animal}"] = animal
        table[f"adult {animal}"] = animal
    for vehicle in VEHICLE_WORDS:
        table[f"passenger {vehicle}"] = vehicle
    table |= {"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"}
    return table


@dataclass(frozen=True)
class SynonymTable:
    """COCO categories and their synonyms: ``objects`` (every entry) and ``node`` (entry -> category)."""

    objects: frozenset[str]
    node: Mapping[str, str]

    @classmethod
    def load(cls, path: Path = SYNONYMS_FILE, normalise: bool = False) -> SynonymTable:
        """Parse like the reference: one category per line, entries split on ", ", the line's first
        entry is the category, a later line wins for an entry listed twice. ``normalise`` strips and
        lower-cases each entry (the strict protocol)."""
        node: dict[str, str] = {}
        for line in path.read_text().splitlines():
            entries = line.strip().split(", ")
            if normalise:
                entries = [e.strip().lower() for e in entries]
            for entry in entries:
                node[entry] = entries[0]
        return cls(frozenset(node), node)

    @cached_property
    def words(self) -> frozenset[str]:
        """Single words whose reading decides a mention: one-word entries and the double words' parts."""
        parts = {p for phrase in double_word_table() for p in phrase.split()}
        return frozenset(e for e in self.objects if e and " " not in e) | parts


def merge_objects(lemmas: Sequence[str], table: SynonymTable) -> tuple[list[str], list[str]]:
    """The reference's object reading of a caption's word forms.

    Returns ``(categories, merged)``: the category of every mention in order (repeats kept) and
    the word list after double words are merged (its length is the reference's caption length).
    """
    doubles = double_word_table()
    merged: list[str] = []
    i = 0
    while i < len(lemmas):
        pair = " ".join(lemmas[i : i + 2])
        if pair in doubles:
            merged.append(doubles[pair])
            i += 2
        else:
            merged.append(lemmas[i])
            i += 1
    words = [w for w in merged if w != "seat"] if "toilet" in merged and "seat" in merged else merged
    return [table.node[w] for w in words if w in table.objects], merged


# ----------------------------------------------------------------------------- official reading

# nltk's WordNet morphology (``WordNetCorpusReader.MORPHOLOGICAL_SUBSTITUTIONS``): suffix -> replacement.
MORPHY_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "n": (("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"),
          ("shes", "sh"), ("men", "man"), ("ies", "y")),
    "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "r": (),
}
WORDNET_SUBSET_FILE = DATA_DIR / "wordnet_coco_subset.json"


def apply_morphy_rules(forms: Sequence[str], pos: str) -> list[str]:
    """One application of every suffix rule of ``pos`` to every form, in nltk's order."""
    return [f[: -len(old)] + new for f in forms for old, new in MORPHY_RULES[pos] if f.endswith(old)]


@dataclass(frozen=True)
class WordNetLemmatizer:
    """nltk's ``WordNetLemmatizer.lemmatize`` (nltk 3.8: exception list, else the rules applied
    until some form is a WordNet lemma; the shortest such form, the word itself when none).

    ``lemmas[pos]`` and ``exceptions[pos]`` may be the subset of WordNet that can decide a COCO
    word (see :func:`load_wordnet_subset`).
    """

    lemmas: Mapping[str, frozenset[str]]
    exceptions: Mapping[str, Mapping[str, tuple[str, ...]]]

    def morphy(self, word: str, pos: str) -> list[str]:
        """WordNet lemmas of ``word`` as ``pos`` ('n', 'v', 'a' or 'r'), in nltk's order."""
        known = self.lemmas[pos]

        def found(forms: Sequence[str]) -> list[str]:
            return [f for f in dict.fromkeys(forms) if f in known]

        if word in self.exceptions[pos]:
            return found([word, *self.exceptions[pos][word]])
        forms = apply_morphy_rules([word], pos)
        result = found([word, *forms])
        while not result and forms:
            forms = apply_morphy_rules(forms, pos)
            result = found(forms)
        return result

    def lemmatize(self, word: str, pos: str = "n") -> str:
        lemmas = self.morphy(word, pos)
        return min(lemmas, key=len) if lemmas else word


@cache
def load_wordnet_subset(path: Path = WORDNET_SUBSET_FILE) -> WordNetLemmatizer:
    """The shipped WordNet 3.0 subset as a :class:`WordNetLemmatizer`."""
    data = json.loads(path.read_text())
    return WordNetLemmatizer(
        {pos: frozenset(words) for pos, words in data["lemmas"].items()},
        {pos: {k: tuple(v) for k, v in exc.items()} for pos, exc in data["exceptions"].items()},
    )


DETERMINERS = frozenset(
    {"a", "an", "the", "this", "that", "these", "those", "his", "her", "their", "its", "our", "my", "your", "some"}
)


def approximate_pos(tokens: Sequence[str], lemmatizer: WordNetLemmatizer) -> list[str]:
    """WordNet POS per token, standing in for nltk's perceptron tagger + the reference's mapping.

    Only "-ing" / "-ed" words change their COCO reading with the POS ("skiing" as a verb is "ski",
    skis; as a noun "skiing"). They are verbs, except right after a determiner ("the skiing
    slope", "a seated man") or as the first word of a double word ("parking meter", "potted
    plant"), where they are a noun / adjective. Every other token is a noun.
    """
    doubles = double_word_table()
    pos = []
    for i, tok in enumerate(tokens):
        if not (tok.isalpha() and (tok.endswith("ing") and len(tok) > 4 or tok.endswith("ed") and len(tok) > 3)):
            pos.append("n")
            continue
        nxt = lemmatizer.lemmatize(tokens[i + 1]) if i + 1 < len(tokens) else ""
        modifier = (i > 0 and tokens[i - 1] in DETERMINERS) or f"{tok} {nxt}" in doubles
        pos.append(("n" if tok.endswith("ing") else "a") if modifier else "v")
    return pos


@cache
def _punkt():  # the nltk sentence splitter with English abbreviations, no trained statistics
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    params = PunktParameters()
    params.abbrev_types = {w for w in (DATA_DIR / "punkt_english_abbrevs.txt").read_text().splitlines() if w}
    return PunktSentenceTokenizer(params)


def official_tokens(text: str) -> list[str]:
    """nltk's ``word_tokenize(text.lower())``: Punkt sentences, then Treebank words per sentence."""
    from nltk.tokenize import NLTKWordTokenizer

    words = NLTKWordTokenizer()
    return [tok for sentence in _punkt().tokenize(text.lower()) for tok in words.tokenize(sentence)]


def official_lemmas(text: str) -> list[str]:
    """The reference's word forms of a caption: tokens lemmatised with their (approximate) POS."""
    lemmatizer = load_wordnet_subset()
    tokens = official_tokens(text)
    return [lemmatizer.lemmatize(t, p) for t, p in zip(tokens, approximate_pos(tokens, lemmatizer))]


# ----------------------------------------------------------------------------- strict reading

IRREGULAR_PLURALS: dict[str, str] = {
    "people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
    "knives": "knife", "geese": "goose", "oxen": "ox", "calves": "calf", "feet": "foot",
    "teeth": "tooth", "wolves": "wolf", "leaves": "leaf", "shelves": "shelf", "loaves": "loaf",
    "grandchildren": "grandchild", "policemen": "policeman", "gentlemen": "gentleman",
    "servicemen": "serviceman", "cacti": "cactus", "buses": "bus",
}

_WORD = re.compile(r"[a-z]+")


def singular_candidates(word: str) -> list[str]:
    """``word`` followed by its possible singular forms, likeliest first."""
    forms = [word] + ([IRREGULAR_PLURALS[word]] if word in IRREGULAR_PLURALS else [])
    if word.endswith("ies") and len(word) > 4:
        forms.append(word[:-3] + "y")
    if word.endswith(("sses", "xes", "zes", "ches", "shes")):
        forms.append(word[:-2])
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        forms.append(word[:-1])
    if word.endswith("ves"):
        forms += [word[:-3] + "f", word[:-3] + "fe"]
    return list(dict.fromkeys(forms))


def words(text: str) -> list[str]:
    """Lower-case alphabetic words of ``text`` ("air-conditioning" -> ["air", "conditioning"])."""
    return _WORD.findall(text.lower())


def singularise(tokens: Sequence[str], vocabulary: frozenset[str] | set[str]) -> list[str]:
    """Each token as the first of its :func:`singular_candidates` in ``vocabulary`` (else itself)."""
    return [next((c for c in singular_candidates(t) if c in vocabulary), t) for t in tokens]


class PhraseMatcher:
    """Finds the phrases of a table (phrase -> canonical name) in text.

    Phrases of up to the table's longest length are matched left to right, longest first,
    with the phrase's last word tried in its singular forms; matched words are consumed.
    """

    def __init__(self, table: Mapping[str, str]) -> None:
        self.lookup = {" ".join(words(phrase)): name for phrase, name in table.items()}
        self.max_words = max((len(p.split()) for p in self.lookup), default=0)

    def _match(self, phrase: list[str]) -> str | None:
        head = " ".join(phrase[:-1])
        for last in singular_candidates(phrase[-1]):
            key = f"{head} {last}" if head else last
            if key in self.lookup:
                return self.lookup[key]
        return None

    def match_words(self, tokens: Sequence[str]) -> list[str]:
        """Canonical names of the phrases found in ``tokens``, in order, repeats kept."""
        found, i = [], 0
        while i < len(tokens):
            for n in range(min(self.max_words, len(tokens) - i), 0, -1):
                name = self._match(list(tokens[i : i + n]))
                if name is not None:
                    found.append(name)
                    i += n
                    break
            else:
                i += 1
        return found

    def mentions(self, text: str) -> list[str]:
        """Canonical names mentioned in ``text``, in order, repeats kept."""
        return self.match_words(words(text))

    def extract(self, text: str) -> set[str]:
        """The set of canonical names mentioned in ``text``."""
        return set(self.mentions(text))


# ----------------------------------------------------------------------------- COCO objects


class CocoObjects:
    """Maps captions to COCO categories under a CHAIR protocol (``official`` or ``strict``)."""

    def __init__(self, protocol: str = "official") -> None:
        if protocol not in CHAIR_PROTOCOLS:
            raise InputError(f"unknown CHAIR protocol {protocol!r} (expected one of {', '.join(CHAIR_PROTOCOLS)})")
        self.protocol = protocol
        self.table = SynonymTable.load(normalise=protocol == "strict")

    def read(self, text: str) -> tuple[list[str], list[str]]:
        """``(categories of every mention, the merged word list)`` of ``text``."""
        if self.protocol == "official":
            lemmas = official_lemmas(text)
        else:
            lemmas = singularise(words(text), self.table.words)
        return merge_objects(lemmas, self.table)

    def mentions(self, text: str) -> list[str]:
        """The category of every object mention in ``text``, in order, repeats kept."""
        return self.read(text)[0]

    def extract(self, text: str) -> set[str]:
        """The set of categories mentioned in ``text``."""
        return set(self.mentions(text))

    def num_words(self, text: str) -> int:
        """Caption length as the reference counts it (tokens, punctuation included, double words as one)."""
        return len(self.read(text)[1])


def chair_metrics(
    mentions: Sequence[Sequence[str]], truth: Sequence[set[str]], lengths: Sequence[int]
) -> dict[str, float]:
    """CHAIR_s, CHAIR_i, object recall and mean caption length, as the reference computes them.

    ``mentions[k]`` lists caption k's object mentions, repeats kept: CHAIR_i is hallucinated
    mentions / all mentions (0.0 without mentions). Recall is the ground-truth objects mentioned
    at least once over all ground-truth objects (0.0 without any).
    """
    if not len(mentions) == len(truth) == len(lengths):
        raise InputError(f"{len(mentions)} captions, {len(truth)} ground truths, {len(lengths)} lengths")
    if not mentions:
        raise InputError("no captions to score")
    hallucinated = [sum(m not in t for m in ms) for ms, t in zip(mentions, truth)]
    n_mentions = sum(len(m) for m in mentions)
    n_truth = sum(len(t) for t in truth)
    return {
        "chair_s": sum(h > 0 for h in hallucinated) / len(mentions),
        "chair_i": sum(hallucinated) / n_mentions if n_mentions else 0.0,
        "recall": sum(len(set(m) & t) for m, t in zip(mentions, truth)) / n_truth if n_truth else 0.0,
        "mean_length": sum(lengths) / len(lengths),
    }


def score_captions(texts: Sequence[str], truth: Sequence[set[str]], objects: CocoObjects,
                   lengths: Sequence[int] | None = None) -> dict[str, float]:
    """:func:`chair_metrics` of captions; ``lengths`` default to the reference's word counts."""
    reads = [objects.read(t) for t in texts]
    lengths = list(lengths) if lengths is not None else [len(merged) for _, merged in reads]
    return chair_metrics([mentions for mentions, _ in reads], truth, lengths)


def load_coco_instances(
    annotations_json: str | Path | Sequence[str | Path], objects: CocoObjects | None = None
) -> dict[int, set[str]]:
    """Ground-truth COCO categories per image id from instances and/or captions files.

    Instance annotations give their category names; reference captions (as in Rohrbach
    et al.) add the objects ``objects`` finds in them. Several files are merged; every
    listed image appears, possibly with an empty set.
    """
    paths = [annotations_json] if isinstance(annotations_json, (str, Path)) else list(annotations_json)
    objects = objects or CocoObjects()
    truth: dict[int, set[str]] = {}
    for path in map(Path, paths):
        data = read_json(path)
        if not isinstance(data, dict) or "annotations" not in data:
            raise InputError(f"{path}: not a COCO annotations file (no 'annotations' key)")
        for image in data.get("images", []):
            truth.setdefault(int(image["id"]), set())
        names = {c["id"]: c["name"] for c in data.get("categories", [])}
        for ann in data["annotations"]:
            found = truth.setdefault(int(ann["image_id"]), set())
            if "category_id" in ann:
                if ann["category_id"] not in names:
                    raise InputError(f"{path}: annotation with unknown category_id {ann['category_id']}")
                name = names[ann["category_id"]]
                found.add(objects.table.node.get(name, name))
            if "caption" in ann:
                found |= objects.extract(ann["caption"])
    if not truth:
        raise InputError(f"no images in {annotations_json}")
    return truth


_IMAGE_ID = re.compile(r"(\d+)(?:\.\w+)?$")


def parse_image_id(value: object, where: str) -> int:
    """A COCO image id from an int, a numeric string or a file name (``COCO_val2014_000000310196.jpg``)."""
    match = _IMAGE_ID.search(str(value))
    if isinstance(value, bool) or match is None:
        raise InputError(f"{where}: cannot read an image id from {value!r}")
    return int(match.group(1))


def load_chair_image_ids(path: str | Path) -> list[int]:
    """The fixed image ids of a CHAIR run, in file order.

    Accepts a JSON list (of ids, file names or objects with ``image_id``) or a text file with
    one id or COCO file name (``COCO_val2014_000000310196.jpg``) per line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image id file not found: {path}")
    text = path.read_text()
    try:
        entries = json.loads(text)
    except json.JSONDecodeError:
        entries = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(entries, list):
        raise InputError(f"{path}: expected a list of image ids")
    ids = [parse_image_id(e.get("image_id") if isinstance(e, dict) else e, str(path)) for e in entries]
    if not ids:
        raise InputError(f"no image ids in {path}")
    if len(set(ids)) != len(ids):
        raise InputError(f"{path}: duplicate image ids")
    return ids

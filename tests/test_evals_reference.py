"""Eval metrics pinned to their reference implementations on hand-written cases, one per rule.

Expected values are worked out by hand from the reference code (CHAIR: OPERA's chair.py after
Rohrbach et al.; POPE: LLaVA's eval_pope.py; AMBER: its inference.py), never by calling our code twice.
"""

from __future__ import annotations

import hashlib

import pytest

from evotool.evals.amber import AmberVocabulary, amber_discriminative_metrics, amber_generative_metrics
from evotool.evals.chair import (
    SYNONYMS_FILE,
    CocoObjects,
    SynonymTable,
    chair_metrics,
    load_wordnet_subset,
    official_tokens,
)
from evotool.evals.pope import parse_yes_no, pope_metrics

OFFICIAL = CocoObjects("official")
STRICT = CocoObjects("strict")


# ---------------------------------------------------------------- CHAIR: data


def test_synonym_table_is_the_reference_file() -> None:
    # sha256 of data/synonyms.txt in LisaAnne/Hallucination at 6e4d33c (OPERA inlines the same text)
    assert hashlib.sha256(SYNONYMS_FILE.read_bytes()).hexdigest() == (
        "b685537b36fe21b791c87151b96a991ceb582edff19f3da204dcc7a7905502f2"
    )
    table = SynonymTable.load()
    assert len(set(table.node.values())) == 80
    assert table.node["panda"] == "bear" and table.node["knive"] == "knife"
    assert {"grizzly", "meter", "novel", "minicomic", "hairdryer"} & set(table.node) == {"hairdryer"}
    assert " motor bike" in table.objects and "motor bike" not in table.objects  # the reference's parse
    assert "iPhone" in table.objects


# ---------------------------------------------------------------- CHAIR: reading captions


@pytest.mark.parametrize(
    ("caption", "official", "strict"),
    [
        # every mention counts; synonyms map to their category
        ("A dog and a puppy next to a man.", ["dog", "dog", "person"], ["dog", "dog", "person"]),
        ("A panda and a grizzly.", ["bear"], ["bear"]),  # panda is a synonym, grizzly is not
        ("A parking meter and a meter.", ["parking meter"], ["parking meter"]),
        # double words read as one object
        ("A hot dog, a teddy bear and a stop sign.", ["hot dog", "teddy bear", "stop sign"],
         ["hot dog", "teddy bear", "stop sign"]),
        ("A man in a bow tie.", ["person", "tie"], ["person", "tie"]),
        ("Wine glasses on a table.", ["wine glass", "dining table"], ["wine glass", "dining table"]),
        # qualifiers: baby/adult + animal word, passenger + jet/train
        ("A baby elephant and an adult giraffe.", ["elephant", "giraffe"], ["elephant", "giraffe"]),
        ("A baby animal near a baby cub.", [], []),
        ("A baby in a crib.", ["person"], ["person"]),
        ("A passenger jet and a passenger train.", ["airplane", "train"], ["airplane", "train"]),
        ("A passenger on a bus.", ["person", "bus"], ["person", "bus"]),
        # home plate / train track name nothing (and no train)
        ("A batter at home plate near a train track.", [], []),
        # toilet seat is a toilet; any "seat" is dropped when "toilet" is in the caption
        ("A toilet seat.", ["toilet"], ["toilet"]),
        ("The seat next to the toilet.", ["toilet"], ["toilet"]),
        ("A seat and a stool.", ["chair", "chair"], ["chair", "chair"]),
        # reference quirks the strict protocol fixes
        ("A motor bike.", [], ["motorcycle"]),  # table entry " motor bike" (leading space)
        ("A cheesecake.", [], ["cake"]),  # table entry " cheesecake"
        ("An iPhone.", [], ["cell phone"]),  # table entry "iPhone", captions are lower-cased
        ("Two men.", [], ["person"]),  # WordNet: "men" is a lemma as long as "man", listed first
        ("Three hot-dogs.", [], ["hot dog"]),  # one Treebank token
        ("A dog tied to a pole.", ["dog", "tie"], ["dog"]),  # verb lemma "tie"
        ("A man skiing.", ["person", "skis"], ["person"]),  # verb lemma "ski"
        ("A woman seated at a desk.", ["person", "chair", "dining table"], ["person", "dining table"]),
        # -ing / -ed after a determiner are no verbs
        ("The skiing area.", [], []),
        ("A seated woman.", ["person"], ["person"]),
        # plurals and irregular nouns
        ("Oxen, knives, mice and children.", ["cow", "knife", "mouse", "person"], ["cow", "knife", "mouse", "person"]),
        ("Two buses and a bus.", ["bus", "bus"], ["bus", "bus"]),
        ("Some sheep with glasses.", ["sheep"], ["sheep"]),
    ],
)
def test_chair_reading_per_rule(caption: str, official: list[str], strict: list[str]) -> None:
    assert OFFICIAL.mentions(caption) == official
    assert STRICT.mentions(caption) == strict


def test_official_tokens_split_sentences_like_punkt() -> None:
    # sentence-final periods split off; abbreviations ("st.", "dr.") keep theirs; hyphens stay
    assert official_tokens("A dog. A St. Bernard near Dr. Who's hot-dog stand.") == [
        "a", "dog", ".", "a", "st.", "bernard", "near", "dr.", "who", "'s", "hot-dog", "stand", ".",
    ]
    # caption length as the reference counts it: tokens after double words merge
    assert OFFICIAL.num_words("A teddy bear, a toilet seat.") == 6  # a, teddy bear, ",", a, toilet, .


@pytest.mark.parametrize(
    ("word", "pos", "lemma"),
    [
        ("dogs", "n", "dog"),
        ("men", "n", "men"),  # both "men" and "man" are noun lemmas; min() keeps the first
        ("oxen", "n", "ox"),  # exception list: oxen -> ox; "ox" is shorter than "oxen"
        ("teeth", "n", "teeth"),
        ("glasses", "n", "glass"),
        ("bus", "n", "bus"),
        ("skis", "n", "ski"),
        ("skiing", "v", "ski"),
        ("potted", "v", "pot"),
        ("potted", "a", "potted"),
        ("drier", "a", "dry"),  # adjective exception list
        ("drier", "n", "drier"),
        ("stove", "v", "stave"),  # verb exception list: stove -> stave
        ("bore", "v", "bore"),  # exception "bore" -> "bear": both verbs of length 4, first kept
        ("dogses", "n", "dog"),  # nltk 3.8: rules applied again when one step finds nothing
    ],
)
def test_wordnet_lemmas(word: str, pos: str, lemma: str) -> None:
    assert load_wordnet_subset().lemmatize(word, pos) == lemma


def test_chair_official_metrics_by_hand() -> None:
    captions = [
        "Two men and a dog on a bench. A frisbee.",  # men -> nothing; dog, bench, frisbee
        "A baby elephant near a toilet seat and a seat.",  # elephant, toilet (both seats dropped)
        "A man skiing past a bus.",  # person, skis (verb), bus
    ]
    truth = [{"dog", "frisbee"}, {"elephant", "toilet", "sink"}, {"person", "skis", "car"}]
    mentions = [OFFICIAL.mentions(c) for c in captions]
    assert mentions == [["dog", "bench", "frisbee"], ["elephant", "toilet"], ["person", "skis", "bus"]]
    m = chair_metrics(mentions, truth, [OFFICIAL.num_words(c) for c in captions])
    assert m["chair_s"] == pytest.approx(2 / 3)  # bench, bus
    assert m["chair_i"] == pytest.approx(2 / 8)
    assert m["recall"] == pytest.approx((2 + 2 + 2) / (2 + 3 + 3))
    # tokens: 12 (two men and a dog on a bench . a frisbee .) / 9 (a, baby elephant, near, a,
    # toilet seat, and, a, seat, .) / 7 (a man skiing past a bus .)
    assert m["mean_length"] == pytest.approx((12 + 9 + 7) / 3)


# ---------------------------------------------------------------- POPE (LLaVA eval_pope.py)


@pytest.mark.parametrize(
    ("answer", "official", "strict"),
    [
        ("Yes", "yes", "yes"),
        ("No", "no", "no"),
        ("no.", "no", "no"),
        ("", "yes", "other"),  # official: no negation word -> yes
        ("Yes, but the dog is not brown.", "no", "yes"),  # official: "not" anywhere in sentence 1
        ("There isn't a dog.", "yes", "no"),  # official: "isn't" is no negation word
        ("NO", "yes", "no"),  # official: case-sensitive "No" / "no"
        ("No!", "yes", "no"),  # official: "No!" is not the word "No"
        ("No, there is no dog.", "no", "no"),  # official: comma removed -> "No"
        ("Not sure.", "yes", "no"),  # official: "Not" is not "not"
        ("I don't know.", "yes", "no"),
        ("A dog. It is not brown.", "yes", "yes"),  # first sentence only
        ("No\nthere is none", "yes", "no"),  # official splits on " " only: "No\nthere"
    ],
)
def test_pope_parsing_cases(answer: str, official: str, strict: str) -> None:
    assert parse_yes_no(answer, "official") == official
    assert parse_yes_no(answer, "strict") == strict


def test_pope_official_metrics_by_hand() -> None:
    answers = ["Yes", "", "NO", "No", "no.", "Yes, but not here"]
    labels = ["yes", "yes", "no", "no", "yes", "no"]
    # official reads: yes, yes, yes, no, no, no -> TP=2 (1,2) FP=1 (3) TN=2 (4,6) FN=1 (5)
    m = pope_metrics(answers, labels)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)


# ---------------------------------------------------------------- AMBER (inference.py)

AMBER_VOCAB = AmberVocabulary(
    {"bench": ("chair",), "chair": (), "dog": ("puppy",), "cat": (), "car": ("tire",)},
    safe_words=frozenset({"sign"}),
)


def test_amber_cover_credits_the_first_match_only() -> None:
    # "chair" is first found among bench's associated words: official credits bench, not chair
    responses = ["A chair and a sign.", "A dog and a puppy near a car.", "A cat."]
    truth = [["bench", "chair"], ["dog", "dog"], ["cat"]]
    hallu = [["dog"], ["cat"], ["car", "dog"]]
    official = amber_generative_metrics(responses, truth, hallu, AMBER_VOCAB)
    # official: bench (1 of 2), dog first copy only (1 of 2: "dog" and "puppy" both -> slot 0), cat 1/1
    assert official["cover"] == pytest.approx(3 / 5)
    # mentions ("sign" is no vocabulary word, so no mention): chair | dog, puppy, car | cat
    # -> hallucinated: car -> 1 of 5
    assert official["chair"] == pytest.approx(1 / 5)
    assert official["hal"] == pytest.approx(1 / 3)
    # cog: response 2 targets [cat]: car is no target -> 0; others 0 -> 0 of 4
    assert official["cog"] == 0.0
    strict = amber_generative_metrics(responses, truth, hallu, AMBER_VOCAB, protocol="strict")
    # strict: bench and chair (2/2), dog once (1/1), cat (1/1)
    assert strict["cover"] == pytest.approx(4 / 4)


def test_amber_cog_first_match() -> None:
    # hallucinated "tire" is car's associated word; with targets [car, car] only the first copy counts
    m = amber_generative_metrics(["A tire and a cat."], [["cat"]], [["car", "car"]], AMBER_VOCAB)
    assert m["cog"] == pytest.approx(1 / 2)
    assert amber_generative_metrics(["A tire."], [["cat"]], [["car", "car"]], AMBER_VOCAB,
                                    protocol="strict")["cog"] == 1.0


def test_amber_official_answers_are_exact() -> None:
    preds = ["Yes", "No", "No.", "no", "yes", "No"]
    labels = ["yes", "no", "no", "no", "yes", "yes"]
    # official: Yes, No, other, other, other, No -> correct: 1, 2 -> 2/6
    m = amber_discriminative_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(2 / 6)
    assert m["precision"] == pytest.approx(1 / 2)  # answered exactly "No": 2, of which label no: 1
    assert m["recall"] == pytest.approx(1 / 3)  # label no: 3, answered "No": 1
    assert m["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))

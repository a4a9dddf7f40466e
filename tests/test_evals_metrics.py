"""Hallucination benchmark metrics checked against worked examples computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evotool.errors import EvotoolError, InputError
from evotool.evals.amber import (
    AmberVocabulary,
    amber_discriminative_metrics,
    amber_generative_metrics,
    load_amber,
)
from evotool.evals.chair import (
    CocoObjects,
    chair_metrics,
    load_chair_image_ids,
    load_coco_instances,
    singular_candidates,
)
from evotool.evals.pope import load_pope, parse_yes_no, pope_metrics
from evotool.evals.results import RESULTS_SCHEMA_VERSION, read_results, write_results


# ---------------------------------------------------------------- POPE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("No.", "no"),
        ("yes, there is a dog in the image.", "yes"),
        ("There is no snowboard in the image.", "no"),
        ("The image does not show a snowboard.", "no"),
        ("There isn't a snowboard.", "no"),
        ("There is a snowboard in the image.", "yes"),  # official script: no negation -> yes
        ("A snowboard. But not a skier.", "yes"),  # only the first sentence is read
        ("", "other"),
    ],
)
def test_parse_yes_no_strict(text: str, expected: str) -> None:
    assert parse_yes_no(text, "strict") == expected


def test_pope_metrics_known_confusion_matrix() -> None:
    # labels:      yes yes yes yes no  no  no  no  no  no
    # predictions: yes yes yes no  yes no  no  no  no  (empty -> counted "no")
    # TP=3 FN=1 FP=1 TN=5 (the empty answer on a "no" label is a TN)
    preds = ["Yes.", "yes", "Yes, there is.", "No", "Yes", "no", "No, there is not.", "not really", "No", ""]
    labels = ["yes"] * 4 + ["no"] * 6
    m = pope_metrics(preds, labels, protocol="strict")
    assert m["accuracy"] == pytest.approx(8 / 10)  # (TP+TN)/N = (3+5)/10
    assert m["precision"] == pytest.approx(3 / 4)  # TP/(TP+FP) = 3/(3+1)
    assert m["recall"] == pytest.approx(3 / 4)  # TP/(TP+FN) = 3/(3+1)
    assert m["f1"] == pytest.approx(0.75)  # 2*.75*.75/(.75+.75)
    assert m["yes_ratio"] == pytest.approx(4 / 10)  # 4 answers parsed "yes"


def test_pope_metrics_asymmetric() -> None:
    # labels yes,yes,no,no; predictions yes,yes,yes,yes -> TP=2 FP=2 FN=0 TN=0
    m = pope_metrics(["yes"] * 4, ["yes", "yes", "no", "no"])
    assert m["precision"] == pytest.approx(0.5)  # 2/4
    assert m["recall"] == pytest.approx(1.0)  # 2/2
    assert m["f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)  # = 2/3
    assert m["yes_ratio"] == pytest.approx(1.0)


def test_pope_metrics_rejects_bad_input() -> None:
    with pytest.raises(InputError):
        pope_metrics(["yes"], ["yes", "no"])
    with pytest.raises(InputError):
        pope_metrics(["yes"], ["maybe"])


def _write_pope(folder: Path, split: str, rows: list[tuple[int, str, str, str]]) -> Path:
    path = folder / f"coco_pope_{split}.json"
    path.write_text(
        "".join(
            json.dumps({"question_id": q, "image": img, "text": text, "label": label}) + "\n"
            for q, img, text, label in rows
        )
    )
    return path


def test_load_pope_released_format(tmp_path: Path) -> None:
    rows = [
        (1, "COCO_val2014_000000310196.jpg", "Is there a snowboard in the image?", "yes"),
        (2, "COCO_val2014_000000310196.jpg", "Is there a dog in the image?", "no"),
    ]
    path = _write_pope(tmp_path, "random", rows)
    samples = load_pope(path, tmp_path / "images")
    assert [s.prompt for s in samples] == [r[2] for r in rows]
    assert [s.answer for s in samples] == ["yes", "no"]
    assert samples[0].image == tmp_path / "images" / "COCO_val2014_000000310196.jpg"
    assert samples[1].meta == {"question_id": 2, "split": "random"}
    assert len({s.id for s in samples}) == 2


def test_load_pope_folder_and_split(tmp_path: Path) -> None:
    _write_pope(tmp_path, "random", [(1, "a.jpg", "Is there a cat?", "yes")])
    _write_pope(tmp_path, "adversarial", [(1, "b.jpg", "Is there a fork?", "no"), (2, "b.jpg", "Q?", "yes")])
    assert len(load_pope(tmp_path, tmp_path)) == 3
    adversarial = load_pope(tmp_path, tmp_path, split="adversarial")
    assert [s.meta["split"] for s in adversarial] == ["adversarial", "adversarial"]
    with pytest.raises(InputError, match="popular"):
        load_pope(tmp_path, tmp_path, split="popular")
    with pytest.raises(InputError, match="unknown POPE split"):
        load_pope(tmp_path, tmp_path, split="hard")


def test_load_pope_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_pope(tmp_path / "missing.json", tmp_path)
    empty = tmp_path / "coco_pope_random.json"
    empty.write_text("\n")
    with pytest.raises(InputError, match="no POPE questions"):
        load_pope(empty, tmp_path)
    empty.write_text('{"question_id": 1, "image": "a.jpg"}\n')
    with pytest.raises(InputError, match="'text'"):
        load_pope(empty, tmp_path)


def test_load_pope_datasets_layout(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    image = Image.new("RGB", (4, 4))
    ds = datasets.Dataset.from_dict(
        {
            "question_id": ["1", "2", "3"],
            "question": ["Is there a cat?", "Is there a dog?", "Is there a bus?"],
            "answer": ["yes", "no", "No"],
            "image": [image, image, image],
            "category": ["random", "popular", "popular"],
        },
        features=datasets.Features(
            {
                "question_id": datasets.Value("string"),
                "question": datasets.Value("string"),
                "answer": datasets.Value("string"),
                "image": datasets.Image(),
                "category": datasets.Value("string"),
            }
        ),
    )
    ds.save_to_disk(str(tmp_path / "pope"))
    popular = load_pope(tmp_path / "pope", tmp_path, split="popular")
    assert [s.prompt for s in popular] == ["Is there a dog?", "Is there a bus?"]
    assert [s.answer for s in popular] == ["no", "no"]
    assert popular[0].load_image().size == (4, 4)


# ---------------------------------------------------------------- CHAIR


def test_coco_objects_synonyms_plurals_and_phrases() -> None:
    coco = CocoObjects()
    assert coco.extract("Two dogs and a man") == {"dog", "person"}
    assert coco.extract("A hot dog next to teddy bears") == {"hot dog", "teddy bear"}  # not dog / bear
    assert coco.extract("a baby elephant beside a toilet seat") == {"elephant", "toilet"}  # not person / chair
    assert coco.extract("Children with cell phones and wine glasses") == {"person", "cell phone", "wine glass"}
    # official: the table's " motor bike" entry has a leading space, so "motor bike" names nothing
    assert coco.extract("a motor bike, two knives and puppies") == {"knife", "dog"}
    assert coco.extract("a passenger jet over the sea") == {"airplane"}
    assert coco.extract("a sunny sky") == set()


def test_singular_candidates() -> None:
    assert singular_candidates("dogs") == ["dogs", "dog"]
    assert singular_candidates("women") == ["women", "woman"]
    assert singular_candidates("benches") == ["benches", "bench", "benche"]
    assert singular_candidates("ponies") == ["ponies", "pony", "ponie"]
    assert singular_candidates("glass") == ["glass"]  # "ss" is not a plural ending
    assert singular_candidates("sheep") == ["sheep"]


def test_chair_metrics_three_captions() -> None:
    coco = CocoObjects()
    captions = [
        "Two dogs and a man play on the grass.",  # {dog, person}; truth {dog, person, frisbee}
        "A cat sleeps on a sofa next to a laptop.",  # {cat, couch, laptop}; truth {cat, couch}
        "Some kids ride bicycles past a bus and cars.",  # {person, bicycle, bus, car}; truth {person, bicycle}
    ]
    truth = [{"dog", "person", "frisbee"}, {"cat", "couch"}, {"person", "bicycle"}]
    mentioned = [coco.mentions(c) for c in captions]
    assert mentioned == [["dog", "person"], ["cat", "couch", "laptop"], ["person", "bicycle", "bus", "car"]]
    m = chair_metrics(mentioned, truth, [len(c.split()) for c in captions])
    # hallucinated: {} / {laptop} / {bus, car} -> 2 of 3 captions, 3 of 2+3+4=9 mentions
    assert m["chair_s"] == pytest.approx(2 / 3)
    assert m["chair_i"] == pytest.approx(3 / 9)
    # ground-truth objects mentioned: 2 (dog, person) + 2 (cat, couch) + 2 = 6 of 3+2+2=7
    assert m["recall"] == pytest.approx(6 / 7)
    # words: 9, 10, 9 -> mean 28/3
    assert m["mean_length"] == pytest.approx(28 / 3)


def test_chair_metrics_counts_every_mention() -> None:
    coco = CocoObjects()
    # as the reference: "dog" and "puppy" are two mentions of dog, both hallucinated; "man" is correct
    mentioned = [coco.mentions("A dog and a puppy next to a man.")]
    assert mentioned == [["dog", "dog", "person"]]
    m = chair_metrics(mentioned, [{"person"}], [10])
    assert (m["chair_s"], m["chair_i"], m["recall"]) == (1.0, pytest.approx(2 / 3), 1.0)
    with pytest.raises(InputError):
        chair_metrics([[]], [set(), set()], [1])


def test_load_coco_instances_and_captions(tmp_path: Path) -> None:
    instances = {
        "images": [{"id": 1}, {"id": 2}, {"id": 3}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}],
        "annotations": [
            {"image_id": 1, "category_id": 18},
            {"image_id": 1, "category_id": 18},
            {"image_id": 2, "category_id": 1},
        ],
    }
    captions = {"annotations": [{"image_id": 2, "caption": "A woman holding an umbrella."}]}
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    truth = load_coco_instances([tmp_path / "instances.json", tmp_path / "captions.json"])
    assert truth == {1: {"dog"}, 2: {"person", "umbrella"}, 3: set()}
    with pytest.raises(InputError):
        load_coco_instances(tmp_path / "missing.json")


def test_load_chair_image_ids(tmp_path: Path) -> None:
    text = tmp_path / "ids.txt"
    text.write_text("310196\nCOCO_val2014_000000000042.jpg\n\n")
    assert load_chair_image_ids(text) == [310196, 42]
    js = tmp_path / "ids.json"
    js.write_text(json.dumps([{"image_id": 7}, 9]))
    assert load_chair_image_ids(js) == [7, 9]
    js.write_text("[1, 1]")
    with pytest.raises(InputError, match="duplicate"):
        load_chair_image_ids(js)
    js.write_text("[]")
    with pytest.raises(InputError):
        load_chair_image_ids(js)


# ---------------------------------------------------------------- AMBER

VOCAB = AmberVocabulary(
    {
        "person": ("man", "woman", "people"),
        "dog": (),
        "grass": ("ground",),
        "sky": (),
        "cloud": (),
        "car": ("tire",),
        "bench": ("chair",),
        "can": (),
    },
    safe_words=frozenset({"sign"}),
)


def test_amber_mentions() -> None:
    # plural -> singular, verb-like "can" only after a determiner
    assert VOCAB.mentions("Two men sit on benches; you can see a can.") == ["man", "bench", "can"]


def test_amber_generative_metrics() -> None:
    responses = [
        "A man and his dog on the grass under clouds.",  # man(ok) dog(ok) grass(ok) cloud(hallu)
        "Two women sit on a bench near a car.",  # woman(ok) bench(hallu) car(hallu)
        "A dog lies on the ground.",  # dog(ok) ground(ok: associated with grass)
    ]
    truth = [["person", "dog", "grass", "sky"], ["person"], ["dog", "grass"]]
    targets = [["cloud", "car"], ["dog", "car", "bench"], ["person"]]
    m = amber_generative_metrics(responses, truth, targets, VOCAB)
    # mentions 4 + 3 + 2 = 9, hallucinated 1 + 2 + 0 = 3
    assert m["chair"] == pytest.approx(3 / 9)
    # covered: person, dog, grass (not sky) = 3 of 4; person 1 of 1; dog, grass 2 of 2 -> 6/7
    assert m["cover"] == pytest.approx(6 / 7)
    # responses with a hallucination: 1st and 2nd of 3
    assert m["hal"] == pytest.approx(2 / 3)
    # targets hallucinated: cloud (1 of 2); car, bench (2 of 3); none (0 of 1) -> 3/6
    assert m["cog"] == pytest.approx(3 / 6)


def test_amber_discriminative_uses_no_as_positive() -> None:
    # labels:  no  no  no  yes yes yes
    # answers: no  no  yes no  yes ""(wrong)
    # positive "no": TP=2 (answered no, label no), answered no = 3, labelled no = 3
    preds = ["No", "no, there is not", "Yes", "No.", "yes", ""]
    labels = ["no", "no", "no", "yes", "yes", "yes"]
    dims = ["existence", "existence", "attribute", "attribute", "relation", "relation"]
    m = amber_discriminative_metrics(preds, labels, dims, protocol="strict")
    assert m["accuracy"] == pytest.approx(3 / 6)  # correct: 1st, 2nd, 5th
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["existence_accuracy"] == pytest.approx(1.0)
    # attribute: label no answered yes, label yes answered no -> nothing correct
    assert (m["attribute_accuracy"], m["attribute_precision"], m["attribute_recall"]) == (0.0, 0.0, 0.0)
    assert m["relation_accuracy"] == pytest.approx(1 / 2)
    assert "yes_ratio" not in m


def test_load_amber(tmp_path: Path) -> None:
    queries = [
        {"id": 1, "image": "AMBER_1.jpg", "query": "Describe this image."},
        {"id": 1005, "image": "AMBER_1.jpg", "query": "Is the sky sunny in this image?"},
    ]
    annotations = [
        {"id": 1, "type": "generative", "truth": ["sky", "grass"], "hallu": ["cloud"]},
        {"id": 1005, "type": "discriminative-attribute-state", "truth": "no"},
    ]
    (tmp_path / "q.json").write_text(json.dumps(queries))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    relation = tmp_path / "relation.json"
    relation.write_text(json.dumps({"Sky": [], "grass": ["ground"]}))
    (tmp_path / "safe.txt").write_text("sign\nlight\n")
    gen, disc = load_amber(tmp_path / "q.json", tmp_path / "a.json", tmp_path / "img")
    assert gen.objects == ["sky", "grass"] and gen.meta["hallu"] == ["cloud"]
    assert disc.answer == "no" and disc.meta["dimension"] == "attribute"
    assert disc.image == tmp_path / "img" / "AMBER_1.jpg"
    vocab = AmberVocabulary.load(relation, tmp_path / "safe.txt")
    assert vocab.mentions("Skies over grassy ground") == ["sky", "ground"]
    assert vocab.safe_words == {"sign", "light"}
    (tmp_path / "q.json").write_text(json.dumps([{"id": 9, "image": "x.jpg", "query": "?"}]))
    with pytest.raises(InputError, match="no annotation"):
        load_amber(tmp_path / "q.json", tmp_path / "a.json", tmp_path)


# ---------------------------------------------------------------- results.json


def test_results_round_trip(tmp_path: Path) -> None:
    metrics = {"chair_s": 0.25, "pope_random_f1": 0.8, "latency_ratio": 1.5}
    path = write_results(tmp_path / "run", metrics, {"model": "tiny"}, meta={"note": "test"})
    assert path == tmp_path / "run" / "results.json"
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left
    record = read_results(path)
    assert record["schema_version"] == RESULTS_SCHEMA_VERSION
    assert record["metrics"] == metrics and record["config"] == {"model": "tiny"}
    assert record["meta"] == {"note": "test"}
    assert "python" in record["environment"] and record["created"]
    assert read_results(path.parent) == record


def test_results_schema_mismatch(tmp_path: Path) -> None:
    path = write_results(tmp_path, {"chair_i": 0.1}, {})
    record = json.loads(path.read_text())
    record["schema_version"] = "0.9"
    path.write_text(json.dumps(record))
    with pytest.raises(EvotoolError, match="schema version"):
        read_results(path)
    with pytest.raises(EvotoolError, match="not found"):
        read_results(tmp_path / "none.json")
    with pytest.raises(EvotoolError, match="flat"):
        write_results(tmp_path, {"pope": {"f1": 1.0}}, {})

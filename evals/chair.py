"""CHAIR (Rohrbach et al., 2018): object hallucination in image captions, over the 80 COCO categories.

A caption's objects are found by matching words and two/three-word phrases against each
category's synonyms (after singularising the phrase's last word); a mentioned object is
hallucinated when it is not in the image's ground truth.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from evotool.data.inputs import DEFAULT_PROMPT
from evotool.errors import InputError
from evotool.io import read_json

# Locked generation protocol for CHAIR numbers that can be compared across runs.
CHAIR_PROTOCOL = {
    "prompt": DEFAULT_PROMPT,
    "do_sample": False,  # greedy
    "num_beams": 1,
    "max_new_tokens": 512,
    "coco_split": "val2014",
    "image_ids": "fixed file, read with load_chair_image_ids",
}

# COCO category -> synonyms (the category name itself included), after Rohrbach et al.'s list.
COCO_SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": (
        "person", "girl", "boy", "man", "woman", "kid", "child", "chef", "baker", "people", "adult",
        "rider", "children", "baby", "worker", "passenger", "sister", "biker", "policeman", "cop",
        "officer", "lady", "cowboy", "bride", "groom", "male", "female", "guy", "traveler", "mother",
        "father", "gentleman", "pitcher", "player", "skier", "snowboarder", "skater", "skateboarder",
        "foreigner", "caller", "offender", "coworker", "trespasser", "patient", "politician",
        "soldier", "grandchild", "serviceman", "walker", "drinker", "doctor", "bicyclist", "thief",
        "buyer", "teenager", "student", "camper", "driver", "solider", "hunter", "shopper", "villager",
    ),
    "bicycle": ("bicycle", "bike", "unicycle", "minibike", "trike"),
    "car": (
        "car", "automobile", "van", "minivan", "sedan", "suv", "hatchback", "cab", "jeep", "coupe",
        "taxicab", "limo", "taxi",
    ),
    "motorcycle": ("motorcycle", "scooter", "motor bike", "motor cycle", "motorbike", "moped"),
    "airplane": (
        "airplane", "jetliner", "plane", "air plane", "monoplane", "aircraft", "jet", "airbus",
        "biplane", "seaplane",
    ),
    "bus": ("bus", "minibus", "trolley"),
    "train": ("train", "locomotive", "tramway", "caboose"),
    "truck": ("truck", "pickup", "lorry", "hauler", "firetruck"),
    "boat": (
        "boat", "ship", "liner", "sailboat", "motorboat", "dinghy", "powerboat", "speedboat", "canoe",
        "skiff", "yacht", "kayak", "catamaran", "pontoon", "houseboat", "vessel", "rowboat", "trawler",
        "ferryboat", "watercraft", "tugboat", "schooner", "barge", "ferry", "sailboard", "paddleboat",
        "lifeboat", "freighter", "steamboat", "riverboat", "battleship", "steamship",
    ),
    "traffic light": (
        "traffic light", "street light", "traffic signal", "stop light", "streetlight", "stoplight",
    ),
    "fire hydrant": ("fire hydrant", "hydrant"),
    "stop sign": ("stop sign",),
    "parking meter": ("parking meter", "meter"),
    "bench": ("bench", "pew"),
    "bird": (
        "bird", "ostrich", "owl", "seagull", "goose", "duck", "parakeet", "falcon", "robin", "pelican",
        "waterfowl", "heron", "hummingbird", "mallard", "finch", "pigeon", "sparrow", "seabird",
        "osprey", "blackbird", "fowl", "shorebird", "woodpecker", "egret", "chickadee", "quail",
        "bluebird", "kingfisher", "buzzard", "willet", "gull", "swan", "bluejay", "flamingo",
        "cormorant", "parrot", "loon", "gosling", "waterbird", "pheasant", "rooster", "sandpiper",
        "crow", "raven", "turkey", "oriole", "cowbird", "warbler", "magpie", "peacock", "cockatiel",
        "lorikeet", "puffin", "vulture", "condor", "macaw", "peafowl", "cockatoo", "songbird",
    ),
    "cat": ("cat", "kitten", "feline", "tabby"),
    "dog": (
        "dog", "puppy", "beagle", "pup", "chihuahua", "schnauzer", "dachshund", "rottweiler", "canine",
        "pitbull", "collie", "pug", "terrier", "poodle", "labrador", "doggie", "doberman", "mutt",
        "doggy", "spaniel", "bulldog", "sheepdog", "weimaraner", "corgi", "cocker", "greyhound",
        "retriever", "brindle", "hound", "whippet", "husky",
    ),
    "horse": (
        "horse", "colt", "pony", "racehorse", "stallion", "equine", "mare", "foal", "palomino",
        "mustang", "clydesdale", "bronc", "bronco",
    ),
    "sheep": ("sheep", "lamb", "ram", "goat", "ewe"),
    "cow": ("cow", "cattle", "oxen", "ox", "calf", "holstein", "heifer", "buffalo", "bull", "zebu", "bison"),
    "elephant": ("elephant",),
    "bear": ("bear", "grizzly"),
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "backpack": ("backpack", "knapsack"),
    "umbrella": ("umbrella",),
    "handbag": ("handbag", "wallet", "purse", "briefcase"),
    "tie": ("tie", "bow", "bow tie"),
    "suitcase": ("suitcase", "suit case", "luggage"),
    "frisbee": ("frisbee",),
    "skis": ("skis", "ski"),
    "snowboard": ("snowboard",),
    "sports ball": ("sports ball", "ball"),
    "kite": ("kite",),
    "baseball bat": ("baseball bat",),
    "baseball glove": ("baseball glove",),
    "skateboard": ("skateboard",),
    "surfboard": ("surfboard", "longboard", "skimboard", "shortboard", "wakeboard"),
    "tennis racket": ("tennis racket", "racket"),
    "bottle": ("bottle",),
    "wine glass": ("wine glass",),
    "cup": ("cup",),
    "fork": ("fork",),
    "knife": ("knife", "pocketknife"),
    "spoon": ("spoon",),
    "bowl": ("bowl", "container"),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": ("sandwich", "burger", "sub", "cheeseburger", "hamburger"),
    "orange": ("orange",),
    "broccoli": ("broccoli",),
    "carrot": ("carrot",),
    "hot dog": ("hot dog",),
    "pizza": ("pizza",),
    "donut": ("donut", "doughnut", "bagel"),
    "cake": ("cake", "cheesecake", "cupcake", "shortcake", "coffeecake", "pancake"),
    "chair": ("chair", "seat", "stool"),
    "couch": ("couch", "sofa", "recliner", "futon", "loveseat", "settee", "chesterfield"),
    "potted plant": ("potted plant", "houseplant"),
    "bed": ("bed",),
    "dining table": ("dining table", "table", "desk"),
    "toilet": ("toilet", "urinal", "commode", "lavatory", "potty"),
    "tv": ("tv", "monitor", "televison", "television"),
    "laptop": ("laptop", "computer", "notebook", "netbook", "lenovo", "macbook", "laptop computer"),
    "mouse": ("mouse",),
    "remote": ("remote",),
    "keyboard": ("keyboard",),
    "cell phone": (
        "cell phone", "mobile phone", "phone", "cellphone", "telephone", "phon", "smartphone", "iphone",
    ),
    "microwave": ("microwave",),
    "oven": ("oven", "stovetop", "stove", "stove top oven"),
    "toaster": ("toaster",),
    "sink": ("sink",),
    "refrigerator": ("refrigerator", "fridge", "freezer"),
    "book": ("book", "novel", "minicomic"),
    "clock": ("clock",),
    "vase": ("vase",),
    "scissors": ("scissors",),
    "teddy bear": ("teddy bear", "teddybear"),
    "hair drier": (
        "hair drier", "hairdryer", "hair dryer", "blow dryer", "blowdryer", "blow drier", "blowdrier",
    ),
    "toothbrush": ("toothbrush",),
}

ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe")

# Phrases whose words alone would name another category ("baby" and "adult" are persons).
SPECIAL_PHRASES: dict[str, str] = {
    "toilet seat": "toilet",
    "passenger jet": "airplane",
    "passenger train": "train",
    **{f"{age} {animal}": animal for age in ("baby", "adult") for animal in ANIMALS},
}

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


class CocoObjects(PhraseMatcher):
    """Maps caption words and phrases to the 80 COCO category names."""

    def __init__(self) -> None:
        super().__init__(
            {syn: cat for cat, syns in COCO_SYNONYMS.items() for syn in syns} | SPECIAL_PHRASES
        )


def chair_metrics(
    mentioned: Sequence[set[str]], truth: Sequence[set[str]], lengths: Sequence[int]
) -> dict[str, float]:
    """CHAIR_s, CHAIR_i, object recall and mean caption length.

    Each caption's objects are counted once (``mentioned`` holds unique categories).
    CHAIR_i is 0.0 when no object is mentioned; recall is 0.0 without ground-truth objects.
    """
    if not len(mentioned) == len(truth) == len(lengths):
        raise InputError(f"{len(mentioned)} captions, {len(truth)} ground truths, {len(lengths)} lengths")
    if not mentioned:
        raise InputError("no captions to score")
    hallucinated = [len(m - t) for m, t in zip(mentioned, truth)]
    n_mentions = sum(len(m) for m in mentioned)
    n_truth = sum(len(t) for t in truth)
    return {
        "chair_s": sum(h > 0 for h in hallucinated) / len(mentioned),
        "chair_i": sum(hallucinated) / n_mentions if n_mentions else 0.0,
        "recall": sum(len(m & t) for m, t in zip(mentioned, truth)) / n_truth if n_truth else 0.0,
        "mean_length": sum(lengths) / len(lengths),
    }


def load_coco_instances(
    annotations_json: str | Path | Sequence[str | Path], objects: CocoObjects | None = None
) -> dict[int, set[str]]:
    """Ground-truth COCO categories per image id from instances and/or captions files.

    Instance annotations give their category names; reference captions (as in Rohrbach
    et al.) add the objects :meth:`CocoObjects.extract` finds in them. Several files are
    merged; every listed image appears, possibly with an empty set.
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
                found.add(names[ann["category_id"]])
            if "caption" in ann:
                found |= objects.extract(ann["caption"])
    if not truth:
        raise InputError(f"no images in {annotations_json}")
    return truth


_IMAGE_ID = re.compile(r"(\d+)(?:\.\w+)?$")


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
    ids = []
    for entry in entries:
        value = entry.get("image_id") if isinstance(entry, dict) else entry
        match = _IMAGE_ID.search(str(value))
        if isinstance(value, bool) or match is None:
            raise InputError(f"{path}: cannot read an image id from {entry!r}")
        ids.append(int(match.group(1)))
    if not ids:
        raise InputError(f"no image ids in {path}")
    if len(set(ids)) != len(ids):
        raise InputError(f"{path}: duplicate image ids")
    return ids

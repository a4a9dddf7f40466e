"""Build ``wordnet_coco_subset.json``: the part of WordNet 3.0 that can decide a COCO word's lemma.

Usage: ``python -m evotool.evals.data.build_wordnet_subset /usr/share/wordnet`` (Debian's
``wordnet-base``; nltk_data's ``corpora/wordnet`` holds the same WordNet 3.0 files).

A lemma of nltk's ``WordNetLemmatizer`` can be a COCO word (a synonym-table entry or part of a double
word) only for words that reach one by a few suffix rules. For every such word (up to three inverse
rule steps from a COCO word) and every form its rules reach (up to four steps), the WordNet lemmas
among those forms are kept, with the exception-list entries of those words and of those naming a
COCO word (and the WordNet lemmas among those entries' words). Lemmatising with this subset gives nltk's COCO reading; other words keep their own form.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from evotool.evals.chair import MORPHY_RULES, WORDNET_SUBSET_FILE, SynonymTable, apply_morphy_rules

FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}


def read_wordnet(root: Path) -> tuple[dict[str, set[str]], dict[str, dict[str, list[str]]]]:
    """Lemmas per POS (``index.*``) and exception lists (``*.exc``) of a WordNet dict folder."""
    lemmas = {p: {ln.split()[0] for ln in (root / f"index.{f}").read_text().splitlines() if not ln.startswith(" ")}
              for p, f in FILES.items()}
    exceptions = {p: {ln.split()[0]: ln.split()[1:] for ln in (root / f"{f}.exc").read_text().splitlines() if ln.strip()}
                  for p, f in FILES.items()}
    return lemmas, exceptions


def inverse_rules(form: str, pos: str) -> set[str]:
    """Words that one rule of ``pos`` turns into ``form``."""
    return {form[: len(form) - len(new)] + old for old, new in MORPHY_RULES[pos] if form.endswith(new)}


def build(root: Path) -> dict:
    lemmas, exceptions = read_wordnet(root)
    coco = SynonymTable.load().words
    out: dict = {"source": "WordNet 3.0 (Princeton), index.* and *.exc", "lemmas": {}, "exceptions": {}}
    for pos in FILES:
        words = set(coco)
        frontier = set(coco)
        for _ in range(3):
            frontier = {w for f in frontier for w in inverse_rules(f, pos)}
            words |= frontier
        forms = set(words)
        frontier = set(words)
        for _ in range(4):
            frontier = set(apply_morphy_rules(sorted(frontier), pos))
            forms |= frontier
        exc = {k: v for k, v in sorted(exceptions[pos].items()) if k in words or any(x in coco for x in v)}
        forms |= set(exc).union(*exc.values())
        out["lemmas"][pos] = sorted(forms & lemmas[pos])
        out["exceptions"][pos] = exc
    return out


if __name__ == "__main__":
    WORDNET_SUBSET_FILE.write_text(json.dumps(build(Path(sys.argv[1])), indent=0, sort_keys=True) + "\n")
    print(f"wrote {WORDNET_SUBSET_FILE}")

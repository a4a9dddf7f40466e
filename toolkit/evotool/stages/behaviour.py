"""Behavioural ground truth for stage boundaries: measured from a model's generated text, never from JS.

On held-out world captions (half in distribution, half prior-breaking) and POPE questions, greedy:

* **exit curve**: for every exit layer e = 1..L, free-running generation that stops after decoder layer
  e (the final norm and head read its state; :func:`evotool.prune.runtime.exit_after`): caption recall,
  CHAIR_i (in distribution / prior-breaking), token agreement with the full model, POPE accuracy;
* **bypass curve**: for every layer l, generation with layer l removed: the same metrics but POPE;
* **oracle removal**: for k = 1..ceil(L * oracle_fraction), the k-subset whose removal keeps token
  agreement with the full model highest. Candidates are ranked by teacher-forced agreement (one forward
  pass over the full model's own generations; exhaustive when C(L, k) <= ``exhaustive_limit``, else a beam
  search of width ``beam`` grown from the best (k-1)-subsets), and the best ``rerank`` of them are
  re-scored by free-running agreement, which decides;
* **overturns**: teacher-forced on the full model's generations, per layer l, how many emitted tokens
  become top-1 at l (normed lens) after a *different* token had been top-1 at both l-2 and l-1; also their
  decision depth (first layer from which the emitted token stays top-1). Counted for all tokens, the
  phantom object tokens of prior-breaking captions and the separator that continued the list before them.

:func:`boundaries` turns these curves into the behavioural critical layer, mutation layer and removable
sets; the definitions and their reasons are in docs/stages.md. The caption generations behind the exit and bypass
curves are stored too, so :func:`resample_boundaries` can say how firmly the 48 captions place those boundaries
(bootstrap over captions). Layers are numbered 1..L (0 = embeddings).
The rules are cheap to re-apply: :func:`read_behaviour` re-derives the boundaries of a stored ``behaviour.json``
from its curves with the current rules, so a refined rule never needs the curves measured again.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evotool.analysis.aggregate import decision_depth
from evotool.data.inputs import Sample
from evotool.errors import ConfigError, InputError
from evotool.evals.pope import pope_metrics
from evotool.evals.world import caption_mentions, caption_scores
from evotool.generation import Generations, build_inputs, generate_samples, load_images
from evotool.hooks import capture_states
from evotool.io import read_json, write_json
from evotool.lens import NormedLens
from evotool.models.registry import DecoderParts, decoder_parts
from evotool.patch_lens import image_token_id
from evotool.prune.evaluate import token_agreement
from evotool.prune.runtime import cache_reference_layers, exit_after, skip_layers
from evotool.prune.static import remove_layers
from evotool.world import caption_records, records_to_samples
from evotool.world.generator import WorldConfig, make_records
from evotool.zoo.config import RULES_BEFORE_FIELD, BehaviourConfig, BoundaryRules

SCHEMA_VERSION = "1.2"  # 1.1: string version; 1.2: + generations, resampled (curves as in 1: stored ones are reused)
KIND = "evotool.behaviour"
BEHAVIOUR_FILE = "behaviour.json"


@contextmanager
def without_layers(model: nn.Module, layers: Sequence[int]) -> Iterator[nn.Module]:
    """``model`` with decoder layers ``layers`` (1..L) removed: runtime skipping, or a statically pruned copy when
    a cache-reference layer (layer 1, ...) is among them (runtime skipping cannot drop those). Both give the
    pruned model's outputs."""
    if not layers:
        yield model
    elif set(layers) & set(cache_reference_layers(model)):
        pruned = copy.deepcopy(model)
        remove_layers(pruned, layers)
        yield pruned
    else:
        with skip_layers(model, layers):
            yield model


@dataclass
class Probe:
    """The held-out samples: captions (in distribution, then prior-breaking), POPE questions, and the captions'
    prompt inputs for teacher forcing (built once)."""

    captions: list[Sample]
    caption_inputs: dict[str, torch.Tensor]
    pope: list[Sample]

    @classmethod
    def build(cls, model: nn.Module, processor: Any, world: WorldConfig, cfg: BehaviourConfig) -> Probe:
        captions = records_to_samples(caption_records(world, cfg.captions))
        records = []
        if cfg.pope:
            records = make_records("pope_random", "prior_breaking", cfg.pope - cfg.pope // 2, world)
            records += make_records("pope_adversarial", "prior_breaking", cfg.pope // 2, world) if cfg.pope > 1 else []
        _, images = load_images(captions)
        inputs = build_inputs(processor, images, [s.prompt for s in captions], model.device, model.dtype)
        return cls(captions, inputs, records_to_samples(records))


def in_distribution(n: int) -> list[bool]:
    """Which of ``n`` probe captions are in distribution (:func:`evotool.world.caption_records`: the first half)."""
    return [i < n - n // 2 for i in range(n)]


def caption_metrics(texts: Sequence[str], ids: Sequence[Sequence[int]], captions: Sequence[Sample],
                    in_dist: Sequence[bool], reference: Sequence[Sequence[int]] | None = None) -> dict[str, float]:
    """Recall, CHAIR_i (all / in distribution / prior-breaking), prior-breaking recall and mean length of caption
    generations (``in_dist`` per caption); with the full model's ids, token agreement too."""
    lengths = [len(i) for i in ids]

    def scores(rows: Sequence[int]) -> dict[str, float]:
        return caption_scores([texts[i] for i in rows], [captions[i] for i in rows], [lengths[i] for i in rows])

    both = scores(range(len(texts)))
    ind = scores([i for i, d in enumerate(in_dist) if d])
    pb = scores([i for i, d in enumerate(in_dist) if not d])
    out = {"recall": both["recall"], "chair_i": both["chair_i"], "chair_i_in": ind["chair_i"],
           "chair_i_pb": pb["chair_i"], "recall_pb": pb["recall"], "mean_length": both["mean_length"]}
    if reference is not None:
        out.update(token_agreement(reference, ids))
    return out


def score(model: nn.Module, processor: Any, probe: Probe, reference: list[list[int]] | None,
          cfg: BehaviourConfig, pope: bool = True) -> tuple[dict[str, float], Generations]:
    """Task metrics of ``model`` as it stands (greedy; POPE accuracy when ``pope``) and, given the full model's
    ids, token agreement; and its caption generations."""
    gen = generate_samples(model, processor, probe.captions, cfg.batch_size, cfg.max_new_tokens)
    out = caption_metrics(gen.texts, gen.ids, probe.captions, in_distribution(len(probe.captions)), reference)
    if pope and probe.pope:
        answers = generate_samples(model, processor, probe.pope, cfg.batch_size, 3).texts
        out["pope_accuracy"] = pope_metrics(answers, [s.answer for s in probe.pope])["accuracy"]
    return out, gen


@dataclass
class Forced:
    """The full model's generations as one right-padded teacher-forcing batch."""

    inputs: dict[str, torch.Tensor]  # input_ids / attention_mask [N, P + T], pixel_values
    targets: torch.Tensor  # [N, T] the generated ids (pad where a caption ended)
    mask: torch.Tensor  # [N, T] True at generated positions
    prompt_len: int

    @classmethod
    def from_outputs(cls, model: nn.Module, processor: Any, inputs: dict[str, torch.Tensor],
                     ids: list[list[int]]) -> Forced:
        """:meth:`build` with the processor's pad id (0 without one) and the model's image placeholder id."""
        pad = getattr(processor, "tokenizer", processor).pad_token_id
        return cls.build(inputs, ids, pad if pad is not None else 0, image_token_id(model.config))

    @classmethod
    def build(cls, inputs: dict[str, torch.Tensor], ids: list[list[int]], pad_id: int, image_token: int | None = None
              ) -> Forced:
        """``image_token``: a generated image placeholder id is fed back as ``pad_id`` (the model would otherwise
        look for image features for it); it still counts as a target."""
        n, prompt_len = inputs["input_ids"].shape
        width = max(1, max(len(r) for r in ids))
        targets = torch.full((n, width), pad_id, dtype=torch.long, device=inputs["input_ids"].device)
        mask = torch.zeros(n, width, dtype=torch.bool, device=targets.device)
        for b, row in enumerate(ids):
            targets[b, : len(row)] = torch.tensor(row, device=targets.device)
            mask[b, : len(row)] = True
        full = dict(inputs)
        fed = targets if image_token is None else targets.masked_fill(targets == image_token, pad_id)
        full["input_ids"] = torch.cat([inputs["input_ids"], fed], 1)
        full["attention_mask"] = torch.cat([inputs["attention_mask"], mask.long()], 1)
        return cls(full, targets, mask, prompt_len)

    def positions(self) -> slice:
        """Sequence positions whose next-token prediction is a generated token."""
        return slice(self.prompt_len - 1, self.prompt_len - 1 + self.targets.shape[1])


@torch.inference_mode()
def forced_agreement(model: nn.Module, forced: Forced) -> float:
    """Share of the full model's generated tokens that ``model`` predicts as top-1 when teacher-forced on them."""
    logits = model(**forced.inputs, use_cache=False).logits[:, forced.positions()]
    hits = (logits.argmax(-1) == forced.targets) & forced.mask
    return hits.sum().item() / max(1, forced.mask.sum().item())


@torch.inference_mode()
def layer_top1(model: nn.Module, parts: DecoderParts, forced: Forced) -> torch.Tensor:
    """Normed-lens top-1 at every layer 0..L for every generated token: [N_tokens, L+1]."""
    span = forced.positions()
    with capture_states(parts.layers, lambda h: h[:, span].detach()) as states:
        model(**forced.inputs, use_cache=False)
    lens = NormedLens(parts)
    top1 = torch.stack([lens.logits(s[None])[0].argmax(-1) for s in states], -1)  # [N, T, L+1]
    return top1[forced.mask]


def overturn_layers(top1: np.ndarray, emitted: np.ndarray) -> np.ndarray:
    """Per token, the layers l (2..L) where the emitted token becomes top-1 after another token held top-1 at
    l-2 and l-1: boolean [N, L+1] (columns 0 and 1 always False)."""
    out = np.zeros_like(top1, dtype=bool)
    hit = emitted[:, None]
    out[:, 2:] = (top1[:, 2:] == hit) & (top1[:, 1:-1] != hit) & (top1[:, 1:-1] == top1[:, :-2])
    return out


def phantom_positions(processor: Any, samples: Sequence[Sample], ids: list[list[int]]) -> tuple[list[int], list[int]]:
    """Flat token indices (over all generated tokens, row-major) of phantom object words (a shape absent from the
    image) and of the ``,`` that continued the list right before each phantom phrase (``, a <colour> <shape>``)."""
    tok = getattr(processor, "tokenizer", processor)
    objects, separators, offset = [], [], 0
    for sample, row in zip(samples, ids):
        words = tok.convert_ids_to_tokens(row)
        for j, word in enumerate(words):
            shapes = caption_mentions(word)
            if shapes and shapes[0][1] not in (sample.objects or ()):
                objects.append(offset + j)
                sep = next((i for i in range(j - 1, max(-1, j - 4), -1) if words[i] == ","), None)
                if sep is not None:
                    separators.append(offset + sep)
        offset += len(row)
    return objects, separators


def overturn_stats(top1: np.ndarray, emitted: np.ndarray, groups: dict[str, list[int]]) -> dict[str, Any]:
    """Per-layer counts of overturns and decision depths, for all tokens and for each index group."""
    turns = overturn_layers(top1, emitted)
    depth = decision_depth(top1, emitted)
    n_layers = top1.shape[1]
    out: dict[str, Any] = {}
    for name, idx in {"all": list(range(len(emitted))), **groups}.items():
        sel = np.asarray(idx, dtype=int)
        out[name] = {
            "tokens": int(len(sel)),
            "overturns": turns[sel].sum(0).astype(int).tolist(),
            "decision_depth": np.bincount(depth[sel], minlength=n_layers).astype(int).tolist(),
        }
    return out


def _search(model: nn.Module, num_layers: int, k: int, previous: list[tuple[float, tuple[int, ...]]], forced: Forced,
            cfg: BehaviourConfig, cache: dict[tuple[int, ...], float]) -> tuple[list[tuple[float, tuple[int, ...]]], str]:
    """Teacher-forced agreement of the k-subsets searched, best first; exhaustive or beam-grown."""
    if math.comb(num_layers, k) <= cfg.exhaustive_limit:
        candidates = list(itertools.combinations(range(1, num_layers + 1), k))
        method = "exhaustive"
    else:
        beam = [s for _, s in previous[: cfg.beam]]
        candidates = sorted({tuple(sorted((*s, i))) for s in beam for i in range(1, num_layers + 1) if i not in s})
        method = f"beam{cfg.beam}"
    for subset in candidates:
        if subset not in cache:
            with without_layers(model, subset) as variant:
                cache[subset] = forced_agreement(variant, forced)
    return sorted(((cache[s], s) for s in candidates), key=lambda x: (-x[0], x[1])), method


def rank_removals(model: nn.Module, k: int, forced: Forced, cfg: BehaviourConfig,
                  cache: dict[tuple[int, ...], float] | None = None) -> tuple[list[tuple[float, tuple[int, ...]]], str]:
    """The k-subsets of decoder layers searched, best teacher-forced agreement first, and how: exhaustive when
    C(L, k) <= ``cfg.exhaustive_limit``, else a beam grown through the best 1-, 2-, ... (k-1)-subsets."""
    n = decoder_parts(model).num_layers
    cache = {} if cache is None else cache
    ranked, method = [(1.0, ())], "none"
    for j in [k] if math.comb(n, k) <= cfg.exhaustive_limit else range(1, k + 1):
        ranked, method = _search(model, n, j, ranked, forced, cfg, cache)
    return ranked, method


def oracle_removal(model: nn.Module, k: int, forced: Forced, cfg: BehaviourConfig,
                   rescore: Callable[[nn.Module], dict[str, float]],
                   cache: dict[tuple[int, ...], float] | None = None) -> dict[str, Any]:
    """The best k layers to remove: :func:`rank_removals`, then the best ``cfg.rerank`` subsets re-scored by
    ``rescore(model without them)`` (its ``agreement``: free-running token agreement with the full model),
    which decides. ``{"k", "method", "subsets_scored", "best", "next_best"}``, each subset as
    ``{"layers", "forced_agreement", **rescore(...)}``."""
    ranked, method = rank_removals(model, k, forced, cfg, cache)
    rescored = []
    for tf, subset in ranked[: cfg.rerank]:
        with without_layers(model, subset) as variant:
            rescored.append({"layers": list(subset), "forced_agreement": tf, **rescore(variant)})
    rescored.sort(key=lambda r: (-r["agreement"], -r["forced_agreement"], r["layers"]))
    return {"k": k, "method": method, "subsets_scored": len(ranked), "best": rescored[0], "next_best": rescored[1:]}


def _texts(gen: Generations) -> dict[str, list]:
    return {"ids": gen.ids, "texts": gen.texts}


def exit_and_bypass(model: nn.Module, processor: Any, probe: Probe, cfg: BehaviourConfig, pope: bool = True,
                    say: Callable[[str], None] = lambda _msg: None) -> dict[str, Any]:
    """The full model's metrics (``full``), the ``exit_curve`` and ``bypass_curve`` (POPE on the exit curve when
    ``pope``) and every caption generation behind them (``generations``: ``full``, ``exit`` / ``bypass`` per layer
    1..L, each ``ids`` and ``texts`` per caption), as payload entries."""
    n = decoder_parts(model).num_layers
    full, reference = score(model, processor, probe, None, cfg, pope)
    ref = reference.ids
    say(f"full model: {full}")
    generations: dict[str, Any] = {"full": _texts(reference), "exit": [], "bypass": []}
    exit_curve = []
    for e in range(1, n + 1):
        with exit_after(model, e):
            metrics, gen = score(model, processor, probe, ref, cfg, pope)
        exit_curve.append({"layer": e, **metrics})
        generations["exit"].append(_texts(gen))
    say("exit curve done")
    bypass_curve = []
    for layer in range(1, n + 1):
        with without_layers(model, [layer]) as variant:
            metrics, gen = score(variant, processor, probe, ref, cfg, pope=False)
        bypass_curve.append({"layer": layer, **metrics})
        generations["bypass"].append(_texts(gen))
    say("bypass curve done")
    return {"full": full, "exit_curve": exit_curve, "bypass_curve": bypass_curve, "generations": generations}


def measure(model: nn.Module, processor: Any, world: WorldConfig, cfg: BehaviourConfig | None = None,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every behavioural curve of ``model`` (see module docstring), as the ``behaviour.json`` payload body."""
    cfg = cfg or BehaviourConfig()
    say = progress or (lambda _msg: None)
    parts = decoder_parts(model)
    n = parts.num_layers
    probe = Probe.build(model, processor, world, cfg)
    curves = exit_and_bypass(model, processor, probe, cfg, say=say)
    ref = curves["generations"]["full"]["ids"]

    forced = Forced.from_outputs(model, processor, probe.caption_inputs, ref)
    oracle, cache = [], {}
    for k in range(1, min(n - 1, math.ceil(n * cfg.oracle_fraction)) + 1):
        oracle.append(oracle_removal(model, k, forced, cfg,
                                     lambda variant: score(variant, processor, probe, ref, cfg, pope=False)[0], cache))
        best = oracle[-1]["best"]
        say(f"oracle k={k} ({oracle[-1]['method']}, {oracle[-1]['subsets_scored']} subsets): {best['layers']} "
            f"agreement {best['agreement']:.3f}")

    emitted = forced.targets[forced.mask].cpu().numpy()
    top1 = layer_top1(model, parts, forced).cpu().numpy()
    objects, separators = phantom_positions(processor, probe.captions, ref)
    overturns = overturn_stats(top1, emitted, {"phantom_object": objects, "phantom_separator": separators})
    return {"num_layers": n, **curves, "oracle": oracle, "overturns": overturns,
            "texts": curves["generations"]["full"]["texts"], "record_ids": [s.id for s in probe.captions]}


def critical_layer(payload: dict[str, Any], cfg: BoundaryRules) -> int | None:
    """The behavioural critical layer: the earliest exit whose caption recall is within ``cfg.recall_tolerance`` of the
    best exit's and whose in-distribution CHAIR_i is within ``cfg.chair_tolerance`` of the full model's."""
    exits, full = payload["exit_curve"], payload["full"]
    best_recall = max(e["recall"] for e in exits)
    return next((e["layer"] for e in exits if e["recall"] >= best_recall - cfg.recall_tolerance
                 and e["chair_i_in"] <= full["chair_i_in"] + cfg.chair_tolerance), None)


PLATEAU_SPREAD = 0.01  # how far :func:`critical_plateau` moves the recall tolerance either way


def critical_plateau(payload: dict[str, Any], cfg: BoundaryRules | None = None,
                     spread: float = PLATEAU_SPREAD) -> tuple[int | None, int | None]:
    """The critical layer at recall tolerances ``cfg.recall_tolerance`` + and - ``spread``: (earliest, latest). Far
    apart where the exit recall runs along a plateau near the best-minus-tolerance line, so that the critical layer is
    a range rather than a layer whatever the caption count (docs/stages.md, "A firmer truth for the deep members")."""
    cfg = cfg or BoundaryRules()
    earliest, latest = (critical_layer(payload, replace(cfg, recall_tolerance=max(cfg.recall_tolerance + d, 0.0)))
                        for d in (spread, -spread))
    return earliest, latest


def boundaries(payload: dict[str, Any], cfg: BoundaryRules | None = None) -> dict[str, Any]:
    """Behavioural critical / mutation layers and removable sets from the curves (definitions in docs/stages.md)."""
    cfg = cfg or BoundaryRules()
    n = payload["num_layers"]
    full = payload["full"]
    critical = critical_layer(payload, cfg)

    after = [b for b in payload["bypass_curve"] if critical is not None and b["layer"] > critical]
    change = {b["layer"]: 1.0 - b["agreement"] for b in after}
    typical = float(np.median(list(change.values()))) if change else 0.0
    mutations = {layer for layer, c in change.items() if c >= cfg.mutation_min_change and c >= cfg.mutation_ratio * typical}
    cut: dict[int, float] = {}
    if cfg.mutation_chair_cut is not None:
        cut = {b["layer"]: full["chair_i"] - b["chair_i"] for b in after}
        least = max(cfg.mutation_chair_cut, cfg.mutation_chair_share * full["chair_i"])
        mutations |= {b["layer"] for b in after
                      if cut[b["layer"]] >= least and b["recall"] >= full["recall"] - cfg.removable_recall}

    removable = {}
    for entry in payload["oracle"]:
        best = entry["best"]
        removable[str(entry["k"])] = {
            "layers": best["layers"], "agreement": best["agreement"], "recall": best["recall"],
            "keeps_task": best["recall"] >= full["recall"] - cfg.removable_recall
            and best["agreement"] >= cfg.removable_agreement,
        }
    two = removable.get("2")
    return {
        "critical_layer": critical,
        "mutation_layer": min(mutations, default=None),
        "mutation_layers": sorted(mutations),
        "bypass_change_after_critical": {str(k): v for k, v in change.items()},
        **({"bypass_chair_cut_after_critical": {str(k): v for k, v in cut.items()}} if cut else {}),
        "removable": removable,
        "removable_at_least_2": bool(two and two["keeps_task"]),
        "num_layers": n,
    }


def within_tolerance(x: int | None, y: int | None, tolerance: int = 1) -> bool:
    """Two boundaries agree: both absent, or both present and within ``tolerance`` layers."""
    return x is None and y is None or x is not None and y is not None and abs(x - y) <= tolerance


def mutation_agrees(first: int | None, layers: Sequence[int], tolerance: int = 1) -> bool:
    """A first mutation layer (None: no mutation) matches behavioural mutation ``layers``: within ``tolerance`` of one
    of them, or absent where there are none (the verdict's rule, docs/stages.md)."""
    return first is None if not layers else any(within_tolerance(first, m, tolerance) for m in layers)


def resample_boundaries(payload: dict[str, Any], rules: BoundaryRules | None = None, resamples: int = 200,
                        seed: int = 0) -> dict[str, Any] | None:
    """How firmly the captions place the behavioural boundaries: :func:`boundaries` on ``resamples`` bootstrap
    resamples of the probe captions (in-distribution and prior-breaking halves resampled separately), every curve
    re-scored from the stored ``generations``. Returns the resampled critical layers and first mutation layers
    (counts per layer, ``none``) and the shares of resamples that reproduce the full-sample boundaries by the
    verdict's tolerance (critical within 1; first mutation within 1 of a mutation layer, or none where there is
    none); None without stored generations."""
    gens = payload.get("generations")
    if not gens:
        return None
    n = len(gens["full"]["ids"])
    world = WorldConfig(**payload["settings"]["world"])
    captions = records_to_samples(caption_records(world, n))
    if [c.id for c in captions] != payload["record_ids"]:
        raise InputError(f"behaviour file of {payload.get('model')}: its probe captions cannot be rebuilt from its settings")
    dist = in_distribution(n)

    def curves(rows: Sequence[int]) -> dict[str, Any]:
        ref = [gens["full"]["ids"][i] for i in rows]

        def metrics(gen: dict[str, list], reference: list[list[int]] | None) -> dict[str, float]:
            return caption_metrics([gen["texts"][i] for i in rows], [gen["ids"][i] for i in rows],
                                   [captions[i] for i in rows], [dist[i] for i in rows], reference)

        return {"num_layers": payload["num_layers"], "full": metrics(gens["full"], None), "oracle": [],
                **{f"{kind}_curve": [{"layer": i + 1, **metrics(g, ref)} for i, g in enumerate(gens[kind])]
                   for kind in ("exit", "bypass")}}

    point = boundaries(payload, rules)
    rng = np.random.default_rng(seed)
    half = sum(dist)
    critical: Counter[str] = Counter()
    mutation: Counter[str] = Counter()
    same_c = same_m = 0
    for _ in range(resamples):
        rows = np.r_[rng.integers(0, half, half), rng.integers(half, n, n - half)].tolist()
        b = boundaries(curves(rows), rules)
        critical[str(b["critical_layer"]).lower()] += 1
        mutation[str(b["mutation_layer"]).lower()] += 1
        same_c += within_tolerance(b["critical_layer"], point["critical_layer"])
        same_m += mutation_agrees(b["mutation_layer"], point["mutation_layers"])
    return {"resamples": resamples, "seed": seed, "critical": dict(critical.most_common()),
            "mutation": dict(mutation.most_common()), "critical_reproduced": same_c / resamples,
            "mutation_reproduced": same_m / resamples}


def apply_rules(payload: dict[str, Any], rules: BoundaryRules | None = None, resample: bool = False) -> bool:
    """Set ``payload["rules"]`` and re-derive ``payload["boundaries"]`` from its curves (cheap; with ``resample``,
    also ``payload["resampled"]``, :func:`resample_boundaries`: seconds); True when the rules (the stored ones with
    fields added since at :data:`RULES_BEFORE_FIELD`) or the boundaries changed: the stored boundaries were stale, e.g. written
    under an earlier rule, and stored caption resamples are then dropped unless ``resample`` recomputes them."""
    rules = rules or BoundaryRules()
    old = (_stored_rules(payload.get("rules")), payload.get("boundaries"))
    payload["rules"] = asdict(rules)
    payload["boundaries"] = boundaries(payload, rules)
    stale = old != (rules, payload["boundaries"])
    if resample:
        payload["resampled"] = resample_boundaries(payload, rules)
    elif stale:
        payload.pop("resampled", None)
    return stale


def _stored_rules(stored: dict[str, Any] | None) -> BoundaryRules | None:
    """The rules a behaviour file was written under (None where unreadable: a field since removed, or none stored)."""
    try:
        return BoundaryRules(**{**RULES_BEFORE_FIELD, **stored}) if stored else None
    except (TypeError, ConfigError):
        return None


def read_behaviour(path: Path, rules: BoundaryRules | None = None) -> dict[str, Any]:
    """A stored ``behaviour.json`` with its boundaries re-derived under ``rules`` (default: the current ones);
    ``stale`` in the result says whether the stored boundaries differed. :class:`InputError` for a missing or
    corrupt file, another schema, or a file without curves."""
    payload = read_json(Path(path), InputError, "behaviour file", schema=SCHEMA_VERSION)
    missing = [k for k in ("num_layers", "full", "exit_curve", "bypass_curve", "oracle") if k not in payload]
    if missing:
        raise InputError(f"{path}: behaviour file without {missing[0]!r} (measure it with `evotool zoo build --steps truth`)")
    if (rules or BoundaryRules()).mutation_chair_cut is not None and any(
            k not in e for e in [payload["full"], *payload["bypass_curve"]] for k in ("recall", "chair_i")):
        raise InputError(f"{path}: behaviour file without CHAIR_i / recall in its bypass curve, which the hallucination "
                         "reading needs (measure it again, or read it with behaviour.rules.mutation_chair_cut=null)")
    payload["stale"] = apply_rules(payload, rules)
    return payload


def save_behaviour(path: Path, payload: dict[str, Any]) -> Path:
    """Write a behaviour payload (versioned, atomic); returns ``path``."""
    return write_json(Path(path), {k: v for k, v in payload.items() if k != "stale"}, schema=SCHEMA_VERSION)


def write_behaviour(model_dir: Path, out: Path, world: WorldConfig, cfg: BehaviourConfig | None = None,
                    progress: Callable[[str], None] | None = print) -> Path:
    """Measure ``model_dir`` and write ``out`` (behaviour.json). Curves stored for the same model and measurement
    settings are reused; the boundary rules are always re-applied."""
    from evotool.models.loading import fingerprint, load_model

    cfg = cfg or BehaviourConfig()
    model, processor = load_model(str(model_dir))
    fp = fingerprint(model)
    settings = {"behaviour": cfg.measurement(), "world": asdict(world)}
    try:
        payload: dict[str, Any] | None = read_behaviour(out, cfg.rules) if out.is_file() else None
    except InputError:
        payload = None
    if payload is not None and payload.get("fingerprint") == fp and payload.get("settings") == settings \
            and "generations" not in payload:  # curves stored before 1.2: add the generations behind them
        probe = Probe.build(model, processor, world, cfg)
        again = exit_and_bypass(model, processor, probe, cfg, pope=False)
        stored = {k: [{m: v for m, v in e.items() if m != "pope_accuracy"} for e in payload[k]]
                  for k in ("exit_curve", "bypass_curve")}
        same = stored == {k: again[k] for k in stored}
        payload = {**payload, "generations": again["generations"]} if same else None  # not reproduced: measure anew
    if payload is None or payload.get("fingerprint") != fp or payload.get("settings") != settings:
        payload = {"kind": KIND, "model": str(model_dir), "fingerprint": fp, "settings": settings,
                   **measure(model, processor, world, cfg, progress)}
    apply_rules(payload, cfg.rules, resample=True)
    return save_behaviour(out, payload)

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
sets; the definitions and their reasons are in docs/stages.md. Layers are numbered 1..L (0 = embeddings).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evotool.analysis.aggregate import decision_depth
from evotool.errors import ConfigError, InputError
from evotool.evals.pope import pope_metrics
from evotool.evals.world import caption_mentions, caption_scores
from evotool.generation import build_inputs, decode, generate_ids
from evotool.io import read_json, write_json
from evotool.lens import NormedLens
from evotool.models.registry import DecoderParts, decoder_parts
from evotool.prune.evaluate import token_agreement
from evotool.prune.runtime import exit_after, skip_layers
from evotool.prune.static import remove_layers
from evotool.world.generator import WorldConfig, make_records

SCHEMA_VERSION = 1
KIND = "evotool.behaviour"


@dataclass(frozen=True)
class BoundaryRules:
    """How the behavioural boundaries are read from the curves (definitions and reasons in docs/stages.md)."""

    recall_tolerance: float = field(default=0.05, metadata={"help": "critical: exit recall within this of the best exit"})
    chair_tolerance: float = field(default=0.05, metadata={"help": "critical: exit in-distribution CHAIR_i within this "
                                                                     "of the full model's"})
    mutation_min_change: float = field(default=0.1, metadata={"help": "mutation: bypass must change at least this "
                                                                        "share of tokens"})
    mutation_ratio: float = field(default=3.0, metadata={"help": "mutation: its change must be this many times the "
                                                                   "median post-critical change"})
    removable_recall: float = field(default=0.02, metadata={"help": "removable: recall loss at most this"})
    removable_agreement: float = field(default=0.9, metadata={"help": "removable: free-running agreement at least this"})


@dataclass(frozen=True)
class BehaviourConfig:
    """What the ground truth is measured on, and the rules that read boundaries from it."""

    captions: int = field(default=48, metadata={"help": "held-out captions (first half in distribution, rest prior-breaking)"})
    pope: int = field(default=24, metadata={"help": "POPE questions (half pope_random, half pope_adversarial, prior-breaking)"})
    max_new_tokens: int = field(default=24, metadata={"help": "greedy tokens per caption"})
    oracle_fraction: float = field(default=0.25, metadata={"help": "oracle removal for k = 1..ceil(L * fraction)"})
    exhaustive_limit: int = field(default=500, metadata={"help": "exhaustive search when C(L, k) <= this"})
    beam: int = field(default=4, metadata={"help": "beam width of the search beyond the exhaustive limit"})
    rerank: int = field(default=4, metadata={"help": "best teacher-forced candidates re-scored free-running"})
    batch_size: int = field(default=48, metadata={"help": "sequences per forward pass"})
    rules: BoundaryRules = field(default_factory=BoundaryRules, metadata={"help": "boundary definitions"})

    def __post_init__(self) -> None:
        if self.captions < 2 or self.pope < 0 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("behaviour: captions >= 2, pope >= 0, max_new_tokens and batch_size >= 1")
        if not 0 < self.oracle_fraction < 1 or self.beam < 1 or self.rerank < 1 or self.exhaustive_limit < 1:
            raise ConfigError("behaviour: oracle_fraction in (0, 1); beam, rerank, exhaustive_limit >= 1")

    def measurement(self) -> dict[str, Any]:
        """The settings the curves depend on (the rules are re-applied to stored curves)."""
        return {k: v for k, v in asdict(self).items() if k != "rules"}


@contextmanager
def without_layers(model: nn.Module, layers: Sequence[int]) -> Iterator[nn.Module]:
    """``model`` with decoder layers ``layers`` (1..L) removed: runtime skipping, or a statically pruned copy
    when layer 1 is among them (runtime skipping cannot drop layer 1). Both give the pruned model's outputs."""
    if not layers:
        yield model
    elif 1 in layers:
        pruned = copy.deepcopy(model)
        remove_layers(pruned, layers)
        yield pruned
    else:
        with skip_layers(model, layers):
            yield model


@dataclass
class Probe:
    """The held-out inputs, prepared once: caption records and inputs, POPE records and inputs."""

    captions: list[dict[str, Any]]
    caption_inputs: dict[str, torch.Tensor]
    pope: list[dict[str, Any]]
    pope_inputs: dict[str, torch.Tensor] | None

    @classmethod
    def build(cls, model: nn.Module, processor: Any, world: WorldConfig, cfg: BehaviourConfig) -> Probe:
        half = cfg.captions // 2
        captions = make_records("caption", "test", cfg.captions - half, world) + make_records(
            "caption", "prior_breaking", half, world)
        pope = []
        if cfg.pope:
            pope = make_records("pope_random", "prior_breaking", cfg.pope - cfg.pope // 2, world)
            pope += make_records("pope_adversarial", "prior_breaking", cfg.pope // 2, world) if cfg.pope > 1 else []

        def inputs(records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            return build_inputs(processor, [r["image"] for r in records], [r["prompt"] for r in records],
                                model.device, model.dtype)

        return cls(captions, inputs(captions), pope, inputs(pope) if pope else None)


def _generate(model: nn.Module, inputs: dict[str, torch.Tensor], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    n = inputs["input_ids"].shape[0]
    out: list[list[int]] = []
    for start in range(0, n, batch_size):
        chunk = {k: v[start : start + batch_size] for k, v in inputs.items()}
        out += generate_ids(model, chunk, max_new_tokens)
    return out


def score(model: nn.Module, processor: Any, probe: Probe, reference: list[list[int]] | None,
          cfg: BehaviourConfig, pope: bool = True) -> tuple[dict[str, float], list[list[int]]]:
    """Task metrics of ``model`` as it stands (greedy; POPE accuracy when ``pope``) and, given the full model's
    ids, token agreement."""
    ids = _generate(model, probe.caption_inputs, cfg.max_new_tokens, cfg.batch_size)
    texts = decode(processor, ids)
    half = len(probe.captions) - cfg.captions // 2
    both = caption_scores(texts, probe.captions, [len(i) for i in ids])
    ind = caption_scores(texts[:half], probe.captions[:half], [len(i) for i in ids[:half]])
    pb = caption_scores(texts[half:], probe.captions[half:], [len(i) for i in ids[half:]])
    out = {"recall": both["recall"], "chair_i": both["chair_i"], "chair_i_in": ind["chair_i"],
           "chair_i_pb": pb["chair_i"], "recall_pb": pb["recall"], "mean_length": both["mean_length"]}
    if pope and probe.pope_inputs is not None:
        answers = decode(processor, _generate(model, probe.pope_inputs, 3, cfg.batch_size))
        out["pope_accuracy"] = pope_metrics(answers, [r["answer"] for r in probe.pope])["accuracy"]
    if reference is not None:
        out.update(token_agreement(reference, ids))
    return out, ids


@dataclass
class Forced:
    """The full model's generations as one right-padded teacher-forcing batch."""

    inputs: dict[str, torch.Tensor]  # input_ids / attention_mask [N, P + T], pixel_values
    targets: torch.Tensor  # [N, T] the generated ids (pad where a caption ended)
    mask: torch.Tensor  # [N, T] True at generated positions
    prompt_len: int

    @classmethod
    def build(cls, inputs: dict[str, torch.Tensor], ids: list[list[int]], pad_id: int) -> Forced:
        n, prompt_len = inputs["input_ids"].shape
        width = max(1, max(len(r) for r in ids))
        targets = torch.full((n, width), pad_id, dtype=torch.long, device=inputs["input_ids"].device)
        mask = torch.zeros(n, width, dtype=torch.bool, device=targets.device)
        for b, row in enumerate(ids):
            targets[b, : len(row)] = torch.tensor(row, device=targets.device)
            mask[b, : len(row)] = True
        full = dict(inputs)
        full["input_ids"] = torch.cat([inputs["input_ids"], targets], 1)
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
    states: list[torch.Tensor] = [torch.empty(0)] * (parts.num_layers + 1)
    span = forced.positions()

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        states[0] = (args[0] if args else kwargs["hidden_states"])[:, span]

    def post(i: int):
        def hook(_m: nn.Module, _a: tuple, out: Any) -> None:
            states[i] = (out[0] if isinstance(out, tuple) else out)[:, span]
        return hook

    handles = [parts.layers[0].register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [layer.register_forward_hook(post(i)) for i, layer in enumerate(parts.layers, start=1)]
    try:
        model(**forced.inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
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


def phantom_positions(processor: Any, records: list[dict[str, Any]], ids: list[list[int]]) -> tuple[list[int], list[int]]:
    """Flat token indices (over all generated tokens, row-major) of phantom object words (a shape absent from the
    image) and of the ``,`` that continued the list right before each phantom phrase (``, a <colour> <shape>``)."""
    tok = getattr(processor, "tokenizer", processor)
    objects, separators, offset = [], [], 0
    for rec, row in zip(records, ids):
        words = tok.convert_ids_to_tokens(row)
        for j, word in enumerate(words):
            shapes = caption_mentions(word)
            if shapes and shapes[0][1] not in rec["objects"]:
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


def measure(model: nn.Module, processor: Any, world: WorldConfig, cfg: BehaviourConfig | None = None,
            progress: Any = None) -> dict[str, Any]:
    """Every behavioural curve of ``model`` (see module docstring), as the ``behaviour.json`` payload body."""
    cfg = cfg or BehaviourConfig()
    say = progress or (lambda _msg: None)
    parts = decoder_parts(model)
    n = parts.num_layers
    probe = Probe.build(model, processor, world, cfg)
    full, ref = score(model, processor, probe, None, cfg)
    say(f"full model: {full}")

    exit_curve = []
    for e in range(1, n + 1):
        with exit_after(model, e):
            metrics, _ = score(model, processor, probe, ref, cfg)
        exit_curve.append({"layer": e, **metrics})
    say("exit curve done")
    bypass_curve = []
    for layer in range(1, n + 1):
        with without_layers(model, [layer]) as variant:
            metrics, _ = score(variant, processor, probe, ref, cfg, pope=False)
        bypass_curve.append({"layer": layer, **metrics})
    say("bypass curve done")

    pad = getattr(processor, "tokenizer", processor).pad_token_id
    forced = Forced.build(probe.caption_inputs, ref, pad if pad is not None else 0)
    oracle, previous, cache = [], [(1.0, ())], {}
    for k in range(1, min(n - 1, math.ceil(n * cfg.oracle_fraction)) + 1):
        ranked, method = _search(model, n, k, previous, forced, cfg, cache)
        rescored = []
        for tf, subset in ranked[: cfg.rerank]:
            with without_layers(model, subset) as variant:
                metrics, _ = score(variant, processor, probe, ref, cfg, pope=False)
            rescored.append({"layers": list(subset), "forced_agreement": tf, **metrics})
        rescored.sort(key=lambda r: (-r["agreement"], -r["forced_agreement"], r["layers"]))
        oracle.append({"k": k, "method": method, "subsets_scored": len(ranked), "best": rescored[0],
                       "next_best": rescored[1:]})
        previous = ranked
        say(f"oracle k={k} ({method}, {len(ranked)} subsets): {rescored[0]['layers']} agreement {rescored[0]['agreement']:.3f}")

    emitted = forced.targets[forced.mask].cpu().numpy()
    top1 = layer_top1(model, parts, forced).cpu().numpy()
    objects, separators = phantom_positions(processor, probe.captions, ref)
    overturns = overturn_stats(top1, emitted, {"phantom_object": objects, "phantom_separator": separators})
    return {"num_layers": n, "full": full, "exit_curve": exit_curve, "bypass_curve": bypass_curve,
            "oracle": oracle, "overturns": overturns,
            "texts": decode(processor, ref), "record_ids": [r["id"] for r in probe.captions]}


def boundaries(payload: dict[str, Any], cfg: BoundaryRules | None = None) -> dict[str, Any]:
    """Behavioural critical / mutation layers and removable sets from the curves (definitions in docs/stages.md)."""
    cfg = cfg or BoundaryRules()
    n = payload["num_layers"]
    full = payload["full"]
    exits = payload["exit_curve"]
    best_recall = max(e["recall"] for e in exits)
    critical = next((e["layer"] for e in exits if e["recall"] >= best_recall - cfg.recall_tolerance
                     and e["chair_i_in"] <= full["chair_i_in"] + cfg.chair_tolerance), None)

    change: dict[int, float] = {}
    if critical is not None:
        change = {b["layer"]: 1.0 - b["agreement"] for b in payload["bypass_curve"] if b["layer"] > critical}
    typical = float(np.median(list(change.values()))) if change else 0.0
    mutations = sorted(layer for layer, c in change.items()
                       if c >= cfg.mutation_min_change and c >= cfg.mutation_ratio * typical)

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
        "mutation_layer": mutations[0] if mutations else None,
        "mutation_layers": mutations,
        "bypass_change_after_critical": {str(k): v for k, v in change.items()},
        "removable": removable,
        "removable_at_least_2": bool(two and two["keeps_task"]),
        "num_layers": n,
    }


def write_behaviour(model_dir: Path, out: Path, world: WorldConfig, cfg: BehaviourConfig | None = None,
                    progress: Any = print) -> Path:
    """Measure ``model_dir`` and write ``out`` (behaviour.json). Curves stored for the same model and measurement
    settings are reused; the boundary rules are always re-applied."""
    from evotool.models.loading import fingerprint, load_model

    cfg = cfg or BehaviourConfig()
    model, processor = load_model(str(model_dir))
    fp = fingerprint(model)
    settings = {"behaviour": cfg.measurement(), "world": asdict(world)}
    payload = None
    if out.is_file():
        try:
            old = read_json(out)
        except InputError:
            old = {}
        if old.get("schema_version") == SCHEMA_VERSION and old.get("fingerprint") == fp and old.get("settings") == settings:
            payload = old
    if payload is None:
        body = measure(model, processor, world, cfg, progress)
        payload = {"schema_version": SCHEMA_VERSION, "kind": KIND, "model": str(model_dir), "fingerprint": fp,
                   "settings": settings, **body}
    payload["rules"] = asdict(cfg.rules)
    payload["boundaries"] = boundaries(payload, cfg.rules)
    write_json(out, payload)
    return out

"""``evotool prune --compare --data TEST.jsonl``: every selector at the same k next to the best removal found by search.

On a user's manifest: the full model's greedy outputs on ``data`` are the reference; each selector's k
layers (:data:`evotool.prune.select.SELECTORS`, planned as ``evotool prune`` would) and the oracle's k layers
are removed and scored by token agreement with that reference and by the manifest eval
(:mod:`evotool.evals.manifest`). The oracle is the behavioural search of :mod:`evotool.stages.behaviour`
(:func:`~evotool.stages.behaviour.oracle_removal`: teacher-forced agreement over all k-subsets when
C(L, k) <= ``oracle_exhaustive_limit``, else a beam grown from the best smaller subsets; the best
``oracle_rerank`` re-scored by free-running agreement) run on ``search_data`` (default: ``data``; give a
validation manifest so that the reported numbers are held out). It is unconstrained: any layer may go.

Writes ``oracle.json`` (schema :data:`ORACLE_SCHEMA`) and ``oracle.md`` in ``cfg.out``, tracked with W&B.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from evotool.analysis.run import resolve_model_id
from evotool.config import to_dict
from evotool.data.inputs import Sample, load_samples
from evotool.errors import ConfigError
from evotool.evals.manifest import ObjectVocabulary, check_manifest, score_generations
from evotool.generation import build_inputs, generate_samples, load_images
from evotool.io import atomic_write_text, write_json
from evotool.mitigate.run import require_file
from evotool.models.loading import load_model
from evotool.prune.config import PruneConfig
from evotool.prune.evaluate import token_agreement
from evotool.prune.plan import plan_selectors
from evotool.prune.run import resolve_stages
from evotool.prune.select import budget
from evotool.stages.behaviour import Forced, oracle_removal, without_layers
from evotool.tracking import Tracker
from evotool.zoo.config import BehaviourConfig

ORACLE_SCHEMA = "1.0"
METRIC_COLUMNS = ("chair_i", "prior_breaking_chair_i", "recall", "pope_f1", "exact_match")


def _samples(path: str | None, limit: int | None) -> list[Sample]:
    check_manifest(require_file(path, "manifest"))
    return load_samples(path)[:limit]


def forced_batch(model: nn.Module, processor: Any, samples: Sequence[Sample], ids: list[list[int]]) -> Forced:
    """The prompts of ``samples`` followed by ``ids`` (the full model's outputs) as one teacher-forcing batch."""
    _, images = load_images(samples)
    inputs = build_inputs(processor, images, [s.prompt for s in samples], model.device, model.dtype)
    return Forced.from_outputs(model, processor, inputs, ids)


def markdown(rows: dict[str, dict[str, Any]]) -> str:
    """Variant x (layers removed, agreement, share of the oracle's agreement, exact, manifest metrics)."""
    keys = [k for k in METRIC_COLUMNS if k in rows["full"]]
    lines = ["| variant | removed | agreement | of oracle | exact | " + " | ".join(keys) + " |",
             "|" + "---|" * (len(keys) + 5)]
    for name, row in rows.items():
        if "note" in row:
            lines.append(f"| {name} | not applicable: {row['note']} |" + " |" * (len(keys) + 3))
            continue
        cells = [f"{row[k]:.3f}" if k in row else "" for k in ("agreement", "of_oracle", "exact", *keys)]
        lines.append(f"| {name} | {row.get('removed', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_with_oracle(cfg: PruneConfig) -> dict[str, Any]:
    """Every selector and the oracle at the budget's k on ``cfg.data`` (see the module docstring)."""
    if cfg.data is None:
        raise ConfigError("--compare needs --data (a manifest to measure agreement and task metrics on)")
    if cfg.layers is not None:
        raise ConfigError("--compare compares the selectors at one budget: give --drop, --ratio or --speedup, not --layers")
    report = _samples(cfg.data, cfg.limit)
    search = _samples(cfg.search_data, cfg.limit) if cfg.search_data else report
    vocab = ObjectVocabulary.parse(cfg.vocab) if cfg.vocab else None
    model_id = resolve_model_id(cfg.model)
    full, processor = load_model(model_id, cfg.load)
    stages = resolve_stages(full, model_id, cfg)
    n = stages.num_layers
    k = budget(n, cfg.drop, cfg.ratio, cfg.speedup)
    bs, tokens = cfg.batch_size, cfg.max_new_tokens
    reference = generate_samples(full, processor, report, bs, tokens)

    def evaluate(model: nn.Module, removed: list[int]) -> dict[str, Any]:
        out = generate_samples(model, processor, report, bs, tokens)
        return {"layers": n - len(removed), "removed": removed, **token_agreement(reference.ids, out.ids),
                **score_generations(report, out, vocab)}

    rows: dict[str, dict[str, Any]] = {"full": evaluate(full, [])}
    for sel, selection in plan_selectors(full, processor, stages, cfg).items():
        if isinstance(selection, str):
            rows[f"static:{sel}"] = {"note": selection}
            continue
        with without_layers(full, selection.removed) as variant:
            rows[f"static:{sel}"] = evaluate(variant, selection.removed)
        print(f"{sel}: removed {selection.removed}, agreement {rows[f'static:{sel}']['agreement']:.3f}", flush=True)

    search_ref = reference if search is report else generate_samples(full, processor, search, bs, tokens)
    settings = BehaviourConfig(exhaustive_limit=cfg.oracle_exhaustive_limit, beam=cfg.oracle_beam,
                               rerank=cfg.oracle_rerank, batch_size=bs)
    oracle = oracle_removal(full, k, forced_batch(full, processor, search, search_ref.ids), settings,
                            lambda v: token_agreement(search_ref.ids, generate_samples(v, processor, search, bs, tokens).ids))
    with without_layers(full, oracle["best"]["layers"]) as variant:
        rows["oracle"] = evaluate(variant, oracle["best"]["layers"])
    print(f"oracle ({oracle['method']}, {oracle['subsets_scored']} subsets): removed {oracle['best']['layers']}, "
          f"agreement {rows['oracle']['agreement']:.3f}", flush=True)
    for name, row in rows.items():
        if name != "full" and "agreement" in row and rows["oracle"]["agreement"] > 0:
            row["of_oracle"] = row["agreement"] / rows["oracle"]["agreement"]

    result = {"model": model_id, "stages": stages.boundaries(), "stages_file": str(stages.source), "k": k,
              "data": str(cfg.data), "search_data": str(cfg.search_data or cfg.data), "n": len(report),
              "oracle": oracle, "rows": rows, "config": to_dict(cfg)}
    write_json(cfg.out / "oracle.json", result, schema=ORACLE_SCHEMA)
    table = markdown(rows)
    atomic_write_text(cfg.out / "oracle.md", table)
    tracker = Tracker("prune-oracle", to_dict(cfg), cfg.out, enabled=cfg.wandb)
    keys = ["agreement", "of_oracle", "exact", *[c for c in METRIC_COLUMNS if c in rows["full"]]]
    tracker.log_table("oracle", ["variant", "removed", *keys],
                      [[name, str(r.get("removed", r.get("note"))), *(r.get(c) for c in keys)] for name, r in rows.items()])
    tracker.finish()
    return result

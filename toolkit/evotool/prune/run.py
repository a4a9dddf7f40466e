"""The ``evotool prune`` job: analysis -> prune -> heal -> eval, tracked with W&B (config: ``configs/prune.yaml``).

``run_prune(cfg)`` is ``evotool prune``: one selector, one checkpoint in ``cfg.out``. ``compare(cfg, ...)``
is the honest comparison on one model at equal k: every selector, the paper's runtime modes, the
stage-end exit and the dynamic exit, the stage-pruned model healed once, and the speed of the pruned
model; it writes ``compare.json`` and ``compare.md`` (recipe: ``python -m evotool.recipes.prune_pipeline --compare``).
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from evotool.analysis.config import AnalyzeConfig
from evotool.analysis.run import resolve_model_id, run_analysis
from evotool.config import to_dict
from evotool.env import environment
from evotool.errors import ConfigError, StageFileError
from evotool.finetune import FinetuneResult, lora_finetune, merge_and_save, save_adapter, world_samples
from evotool.generation import build_inputs, load_images
from evotool.integrations.hub import check_push, push_folder
from evotool.io import DirLock, atomic_dir, atomic_write_text, write_json
from evotool.models.loading import fingerprint, load_model
from evotool.models.registry import decoder_parts
from evotool.prune.card import write_card
from evotool.prune.config import PruneConfig
from evotool.prune.evaluate import HEADLINE, evaluate_variant, greedy_ids, headline
from evotool.prune.plan import plan, plan_selectors
from evotool.prune.runtime import MODES, DynamicExit, mode_layers, skip_layers
from evotool.prune.select import SELECTORS, Selection
from evotool.prune.speed import measure, ratios
from evotool.prune.static import check_layers, remove_layers
from evotool.stages import StageFile
from evotool.tracking import ArtifactRef, Tracker
from evotool.validate import output_dir
from evotool.world import default_samples

COMPARE_SCHEMA = "1.0"
TABLE_COLUMNS = ("variant", "layers", "removed", *HEADLINE)
KEEP = ("analysis",)  # what a new checkpoint in OUT takes over from the old OUT


def resolve_stages(model: nn.Module, model_id: str, cfg: PruneConfig) -> StageFile:
    """``cfg.stages``, or a fresh analysis of the model on world samples into ``OUT/analysis``."""
    if cfg.stages is not None:
        return StageFile.for_model(cfg.stages, model)
    path = run_analysis(AnalyzeConfig(model=model_id, out=cfg.out / "analysis", wandb=False,
                                      world_samples=cfg.analysis_samples, max_new_tokens=cfg.analysis_max_new_tokens,
                                      seed=cfg.seed, load=dataclasses.replace(cfg.load)))
    return StageFile.for_model(path, model)


def save_pruned(model: nn.Module, processor: Any, selection: Selection, stages: StageFile, cfg: PruneConfig,
                source: str, source_fp: str) -> dict[str, Any]:
    """Remove the selected layers in place, save checkpoint + processor + prune.json + card; returns the record."""
    n = decoder_parts(model).num_layers
    kept = remove_layers(model, selection.removed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cfg.out)
    processor.save_pretrained(cfg.out)
    record = {
        "source_model": source, "source_fingerprint": source_fp, "fingerprint": fingerprint(model), "num_layers": n,
        "kept_layers": kept, "removed_layers": selection.removed,
        "reasons": {str(i): why for i, why in selection.reasons.items()},
        "selector": selection.selector, "redundancy": cfg.redundancy,
        "keep_critical": cfg.keep_critical, "keep_mutation": cfg.keep_mutation,
        "ideal_speedup": n / len(kept),
        "stages": stages.boundaries(),
    }
    write_card(cfg.out, record)
    return record


def heal(model: nn.Module, processor: Any, cfg: PruneConfig, tracker: Tracker, out: Path | None) -> tuple[nn.Module, dict[str, Any]]:
    """LoRA-heal ``model``; with ``out``, save the adapter to ``out/adapter`` and the merged model to ``out``."""
    samples = world_samples(cfg.heal_samples, seed=cfg.seed + 1)
    result: FinetuneResult = lora_finetune(model, processor, samples, cfg.lora,
                                           on_log=lambda step, loss: tracker.log({"heal/loss": loss}, step=step))
    if out is not None:
        save_adapter(result.model, out / "adapter")
        merged = merge_and_save(result.model, processor, out)
    else:
        merged = result.model.merge_and_unload()
    info = {"settings": result.settings, "samples": len(samples), "losses": result.losses,
            "trainable_parameters": result.trainable_parameters}
    return merged.eval(), info


def table_rows(rows: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """One list of :data:`TABLE_COLUMNS` values per variant (None where missing; a note for a variant that does not apply)."""
    out = []
    for name, row in rows.items():
        cells = {"removed": f"not applicable: {row['note']}"} if "note" in row else {**row, **headline(row)}
        out.append([name] + [cells.get(c) for c in TABLE_COLUMNS[1:]])
    return out


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    """Rows of :data:`TABLE_COLUMNS` (missing values blank)."""
    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(fmt(v) for v in cells) + " |" for cells in table_rows(rows)]
    return "\n".join(lines)


def speed_table(full: nn.Module, pruned: nn.Module, processor: Any, k: int, batches: tuple[int, ...] = (1, 8),
                new_tokens: int = 16, repeats: int = 3) -> tuple[str, list[dict[str, Any]]]:
    """Prefill / decode speed of ``full`` vs ``pruned`` on world captions, side by side."""
    n = decoder_parts(full).num_layers
    samples = default_samples(max(batches))
    lines = ["| batch | prefill ms full / pruned | decode tok/s full / pruned | decode speedup | ideal | efficiency |",
             "|---|---|---|---|---|---|"]
    rows = []
    for b in batches:
        inputs = build_inputs(processor, load_images(samples[:b])[1], [s.prompt for s in samples[:b]])
        clock = "wall" if full.device.type == "cuda" else "cpu"  # CPU time on a shared CPU, see evotool.prune.speed
        res = measure({"full": full, "pruned": pruned}, inputs, new_tokens, repeats, clock=clock)
        r = ratios(res["full"], res["pruned"], n, k)
        f, p = res["full"], res["pruned"]
        lines.append(f"| {b} | {f.prefill_s * 1e3:.1f} / {p.prefill_s * 1e3:.1f} | {f.decode_tok_s:.1f} / {p.decode_tok_s:.1f} | "
                     f"{r['decode_speedup']:.3f} | {r['ideal']:.3f} | {r['efficiency']:.3f} |")
        rows.append({"batch": b, "full": dataclasses.asdict(f), "pruned": dataclasses.asdict(p), **r})
    return "\n".join(lines), rows


def run_prune(cfg: PruneConfig) -> dict[str, Any]:
    """``evotool prune``: analysis (if needed) -> prune -> heal (optional) -> eval (optional) -> push (optional);
    returns the prune record.

    The checkpoint is written into a staging folder beside ``cfg.out`` that replaces ``cfg.out`` only once it is
    complete (:func:`evotool.io.atomic_dir`; ``cfg.out/analysis`` is kept), so a killed run never leaves a
    half-written checkpoint; ``--out`` may not overlap ``--model``, and a second prune into it is refused.
    """
    check_push(cfg.push_to_hub)
    model_id = resolve_model_id(cfg.model)
    output_dir(cfg.out, source=model_id)
    if cfg.stages is not None:
        StageFile.read(cfg.stages)  # a broken stage file fails before the model loads
    with DirLock(cfg.out, beside=True):
        with atomic_dir(cfg.out, KEEP) as staged:
            logs = staged.with_name(f"{staged.name}-wandb")  # W&B writes here until it finishes, then moves into OUT
            tracker = Tracker("prune", to_dict(cfg), logs, enabled=cfg.wandb, name=cfg.out.name)
            record = _prune(cfg, dataclasses.replace(cfg, out=staged), model_id, tracker)
        tracker.log_artifact(ArtifactRef.model(cfg.out, record["fingerprint"], source_model=model_id,
                                               removed_layers=record["removed_layers"], healed=cfg.heal))
        tracker.finish()
        if (logs / "wandb").is_dir():
            (logs / "wandb").rename(cfg.out / "wandb")
        shutil.rmtree(logs, ignore_errors=True)
    if cfg.push_to_hub:
        record["hub_url"] = push_folder(cfg.out, cfg.push_to_hub)
    return record


def _prune(cfg: PruneConfig, work: PruneConfig, model_id: str, tracker: Tracker) -> dict[str, Any]:
    """The job of :func:`run_prune`, writing into ``work.out`` (the analysis goes to ``cfg.out/analysis``)."""
    model, processor = load_model(model_id, cfg.load)
    source_fp = fingerprint(model)
    if cfg.layers is not None:
        check_layers(cfg.layers, decoder_parts(model).num_layers)  # before an analysis is run for nothing
    stages = resolve_stages(model, model_id, cfg)
    tracker.use_artifact(ArtifactRef.stages(stages.source, source_fp))
    selection, _ = plan(model, processor, stages, cfg)
    evaluating = cfg.agreement_samples > 0 or cfg.eval_n > 0
    full = copy.deepcopy(model) if evaluating or cfg.speed else None
    record = save_pruned(model, processor, selection, stages, work, model_id, source_fp)
    rows: dict[str, dict[str, Any]] = {}
    if evaluating:
        samples = default_samples(max(cfg.agreement_samples, 1), cfg.seed)
        ref = greedy_ids(full, processor, samples, cfg.max_new_tokens)
        rows["full"] = {"layers": record["num_layers"], **evaluate_variant(full, processor, ref, samples, cfg.max_new_tokens, cfg.eval_n)}
        rows["pruned"] = {"layers": len(record["kept_layers"]), "removed": selection.removed,
                          **evaluate_variant(model, processor, ref, samples, cfg.max_new_tokens, cfg.eval_n)}
    pruned = model
    if cfg.heal:
        model, record["heal"] = heal(model, processor, cfg, tracker, work.out)
        record["fingerprint"] = fingerprint(model)
        if evaluating:
            rows["pruned+healed"] = {"layers": len(record["kept_layers"]), "removed": selection.removed,
                                     **evaluate_variant(model, processor, ref, samples, cfg.max_new_tokens, cfg.eval_n)}
    table = markdown_table(rows) if rows else None
    if cfg.speed:
        speed_md, record["speed"] = speed_table(full, pruned, processor, len(selection.removed))
        table = (table + "\n\n" if table else "") + speed_md
    if rows:
        record["metrics"] = {k: {m: v for m, v in r.items() if m not in ("layers", "removed")} for k, r in rows.items()}
        tracker.log_table("retention", list(TABLE_COLUMNS), table_rows(rows))
        tracker.summary({f"{k}/{m}": v for k, r in rows.items() for m, v in r.items() if isinstance(v, float)})
    record["environment"] = environment()
    write_card(work.out, record, table)
    return record


def compare(cfg: PruneConfig, selectors: tuple[str, ...] = tuple(SELECTORS), modes: tuple[str, ...] = tuple(MODES),
            exit_threshold: float = 0.05, heal_selector: str = "stage") -> dict[str, Any]:
    """Every selector at the same k, the runtime modes, the dynamic exit, one healed model and the speed; see module doc."""
    tracker = Tracker("prune-compare", to_dict(cfg), cfg.out, enabled=cfg.wandb)
    model_id = resolve_model_id(cfg.model)
    full, processor = load_model(model_id, cfg.load)
    stages = resolve_stages(full, model_id, cfg)
    samples = default_samples(cfg.agreement_samples, cfg.seed)
    ref = greedy_ids(full, processor, samples, cfg.max_new_tokens)
    n = stages.num_layers

    def evaluate(model: nn.Module) -> dict[str, Any]:
        return evaluate_variant(model, processor, ref, samples, cfg.max_new_tokens, cfg.eval_n)

    rows: dict[str, dict[str, Any]] = {"full": {"layers": n, **evaluate(full)}}
    pruned_models: dict[str, nn.Module] = {}
    for sel, selection in plan_selectors(full, processor, stages, cfg, selectors).items():
        if isinstance(selection, str):
            rows[f"static:{sel}"] = {"note": selection}
            continue
        pruned = copy.deepcopy(full)
        remove_layers(pruned, selection.removed)
        pruned_models[sel] = pruned
        rows[f"static:{sel}"] = {"layers": n - len(selection.removed), "removed": selection.removed, **evaluate(pruned)}
        print(f"{sel}: removed {selection.removed}: {rows[f'static:{sel}']['agreement']:.3f}", flush=True)
    for mode in modes:
        try:
            layers = mode_layers(mode, stages)
        except (ConfigError, StageFileError) as err:
            rows[f"runtime:{mode}"] = {"note": str(err)}
            continue
        with skip_layers(full, layers):
            rows[f"runtime:{mode}"] = {"layers": n - len(layers), "removed": layers, **evaluate(full)}
    critical = stages.critical_layer or 1
    with DynamicExit(full, "js", exit_threshold, min_layer=max(2, critical + 1)) as dyn:
        rows["runtime:dynamic-exit"] = evaluate(full)
    rows["runtime:dynamic-exit"]["layers"] = round(float(sum(dyn.exits) / len(dyn.exits)), 2)
    rows["runtime:dynamic-exit"]["removed"] = f"JS <= {exit_threshold} after layer {max(2, critical + 1)}"
    if heal_selector not in pruned_models:
        raise ConfigError(f"selector {heal_selector} gave no model to heal: {rows[f'static:{heal_selector}']}")
    k = len(rows[f"static:{heal_selector}"]["removed"])
    healed, heal_info = heal(copy.deepcopy(pruned_models[heal_selector]), processor, cfg, tracker, None)
    rows[f"static:{heal_selector}+heal"] = {"layers": n - k, "removed": rows[f"static:{heal_selector}"]["removed"], **evaluate(healed)}
    speed_md, speed_rows = speed_table(full, pruned_models[heal_selector], processor, k)
    table = markdown_table(rows)
    result = {"model": model_id, "stages": stages.boundaries(),
              "k": k, "rows": rows, "heal": heal_info, "speed": speed_rows, "environment": environment(),
              "config": to_dict(cfg)}
    write_json(cfg.out / "compare.json", result, schema=COMPARE_SCHEMA)
    atomic_write_text(cfg.out / "compare.md", f"{table}\n\n{speed_md}\n")
    tracker.log_table("compare", list(TABLE_COLUMNS), table_rows(rows))
    tracker.finish()
    return result

"""The ``analyze`` job: trace every sample, then write stages.json, tokens.parquet, figures and a report."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from evotool.analysis import figures
from evotool.analysis.aggregate import decision_depth, detect, summary_curves, write_token_table
from evotool.analysis.config import AnalyzeConfig
from evotool.analysis.hallucination import (
    divergence_by_sample,
    divergence_summary,
    ending_token_ids,
    find_divergence,
    hallucination_link,
    object_mask,
    object_vocabulary,
)
from evotool.analysis.html import write_html_report
from evotool.analysis.report import write_report
from evotool.analysis.store import RunStore
from evotool.config import to_dict
from evotool.data import Sample, load_samples
from evotool.data.inputs import sample_digest
from evotool.env import environment
from evotool.errors import ConfigError, EvotoolError, InputError
from evotool.generation import batches, build_inputs, context_length, decode, load_images
from evotool.io import DirLock, atomic_write_jsonl, atomic_write_text
from evotool.lens import Lens, make_lens
from evotool.models.loading import fingerprint, load_model, process_state
from evotool.models.registry import DecoderParts, decoder_parts
from evotool.patch_lens import patch_lens
from evotool.stages import STAGES_FILE, write_stages
from evotool.stages.check import BYPASS_FILE, bypass_effects, check_needed, confirm_mutations
from evotool.trace import direct_effect, lens_with_direct, trace_batch
from evotool.tracking import ArtifactRef, Tracker
from evotool.validate import output_dir


def resolve_model_id(model: str | None) -> str:
    """The given model, or the shipped demo model."""
    if model is not None:
        return model
    from evotool.world import default_model_path

    return str(default_model_path())


def _world_shapes() -> list[str]:
    from evotool.world import SHAPES

    return list(SHAPES)


def resolve_samples(cfg: AnalyzeConfig) -> list[Sample]:
    """The run's samples: ``--data`` or the synthetic world's default sample."""
    if cfg.data is not None:
        return load_samples(cfg.data, cfg.prompt, split=cfg.split, columns=cfg.columns, limit=cfg.limit)
    from evotool.world import default_samples

    samples = default_samples(cfg.world_samples, cfg.seed)
    return samples[: cfg.limit] if cfg.limit is not None else samples


def run_analysis(cfg: AnalyzeConfig, loaded: tuple[nn.Module, Any] | None = None) -> Path:
    """Run (or resume) the analysis into ``cfg.out``; returns the path of ``stages.json``.

    ``loaded``: an already loaded (model, processor) pair, used instead of loading ``cfg.model``
    (e.g. a processor assembled by hand for a model whose processor class cannot be built here).
    The output folder and the samples are checked before the model loads; the main process holds the
    folder's lock (:class:`~evotool.io.DirLock`) for the whole run.
    """
    output_dir(cfg.out)
    samples = resolve_samples(cfg)
    state = process_state(cfg.load)
    with DirLock(cfg.out) if state.is_main_process else contextlib.nullcontext():
        return _run(cfg, samples, state, loaded)


def _run(cfg: AnalyzeConfig, samples: list[Sample], state: Any, loaded: tuple[nn.Module, Any] | None) -> Path:
    """The run itself (see :func:`run_analysis`), with the lock held."""
    load = cfg.load
    model_id = resolve_model_id(cfg.model)
    if state.num_processes > 1:
        if load.device_map is not None and load.gpus_per_process == 1:
            raise ConfigError(f"--device-map {load.device_map} with {state.num_processes} processes: each would spread "
                              "its model over every GPU; give each process its own GPUs with --gpus-per-process")
        load.device = str(state.device)
    model, processor = loaded if loaded is not None else load_model(model_id, load)
    parts = decoder_parts(model)
    lens = make_lens(cfg.lens, parts)
    store = RunStore(cfg.out)
    run_info = {"model": model_id, "fingerprint": fingerprint(model), "lens": cfg.lens,
                "max_new_tokens": cfg.max_new_tokens, "js_unit": cfg.js_unit, "num_layers": parts.num_layers,
                "sample_ids": [s.id for s in samples]}
    digests = {s.id: sample_digest(s) for s in samples}
    if state.is_main_process:
        store.open(run_info, cfg.restart)
        for sample_id in store.drop_corrupt(list(digests)):
            tqdm.write(f"sample {sample_id}: unreadable saved result, tracing it again", file=sys.stderr)
    state.wait_for_everyone()
    index = {s.id: i for i, s in enumerate(samples)}
    todo = [s for s in samples if not store.is_done(s.id, digests[s.id])]
    pending = todo[state.process_index :: state.num_processes]
    with tqdm(total=len(pending), desc=f"analyze[{state.process_index}]", disable=not pending, unit="sample") as bar:
        for batch in batches(pending, cfg.batch_size):
            _analyse_batch(batch, cfg, store, model, parts, lens, processor, index, digests)
            bar.update(len(batch))
    if state.is_main_process and cfg.direct_effect:
        _add_direct_effect(store, lens, model, cfg.js_base, set(digests) - {s.id for s in todo})
    state.wait_for_everyone()
    if cfg.patch_lens:  # also for samples traced by an earlier run without --patch-lens
        todo = [s for s in samples if store.is_done(s.id) and not store.has_patch_lens(s.id)]
        todo = todo[state.process_index :: state.num_processes]
        for batch in tqdm(list(batches(todo, cfg.batch_size)), desc=f"patch lens[{state.process_index}]",
                          disable=not todo, unit="batch"):
            inputs = _inputs(batch, load_images(batch)[1], processor, model)
            for sample, patches in zip(batch, patch_lens(model, parts, lens, inputs)):
                store.save_patch_lens(sample.id, patches)
        state.wait_for_everyone()
    if not state.is_main_process:
        return cfg.out / STAGES_FILE
    return finalize(cfg, store, run_info, (model, processor), samples)


def _analyse_batch(batch: Sequence[Sample], cfg: AnalyzeConfig, store: RunStore, model: nn.Module, parts: DecoderParts,
                   lens: Lens, processor: Any, index: dict[str, int], digests: dict[str, str]) -> None:
    """Trace one batch and save each finished sample; bad samples go through :func:`_fail`."""
    ready, images = load_images(batch, on_error=lambda sample, err: _fail(store, cfg, sample, err))
    if not ready:
        return
    try:
        inputs = _inputs(ready, images, processor, model)
    except InputError as err:
        for sample in ready:
            _fail(store, cfg, sample, err)
        return
    traces = trace_batch(model, parts, lens, inputs, cfg.max_new_tokens, cfg.topk, cfg.keep_features, cfg.js_base,
                         cfg.direct_effect)
    texts = decode(processor, [t.token_ids.tolist() for t in traces])
    tokenizer = getattr(processor, "tokenizer", processor)
    for sample, image, trace, text in zip(ready, images, traces, texts):
        if not isinstance(sample.image, Path):  # an in-memory image: keep it for the HTML report
            store.save_image(sample.id, image)
        record = {"id": sample.id, "index": index[sample.id], "digest": digests[sample.id], "prompt": sample.prompt, "text": text,
                  "tokens": tokenizer.convert_ids_to_tokens(trace.token_ids.tolist()),
                  "objects": sample.objects, "answer": sample.answer,
                  "image": str(sample.image) if isinstance(sample.image, Path) else None, "meta": sample.meta}
        store.save(sample.id, trace, record)


def _add_direct_effect(store: RunStore, lens: Lens, model: nn.Module, js_base: float, earlier: set[str]) -> None:
    """Samples finished by an earlier run (ids ``earlier``; this run's traces have them) and traced before the
    direct-effect metrics existed get them from their kept features (float16 states)."""
    for record in store.records():
        if record["id"] not in earlier or store.has_metric(record["id"], "direct_flip"):
            continue
        trace = store.load_trace(record["id"])
        if trace.features is None:
            continue  # no states kept: the detector flags no_direct_effect
        states = torch.from_numpy(trace.features).to(model.device, model.dtype).transpose(0, 1)  # [L+1, T, H]
        with torch.inference_mode():
            effect = direct_effect(*lens_with_direct(lens, states), js_base)
        trace.layers.update({k: v.float().T.cpu().numpy() for k, v in effect.items()})  # [T, L+1]
        store.save(record["id"], trace, record)


def _inputs(batch: Sequence[Sample], images: list[Any], processor: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    return build_inputs(processor, images, [s.prompt for s in batch], model.device, model.dtype, context_length(model))


def _fail(store: RunStore, cfg: AnalyzeConfig, sample: Sample, err: EvotoolError) -> None:
    store.log_error(sample.id, str(err))
    if cfg.on_error == "fail":
        raise err
    tqdm.write(f"skipped: {err}")


def finalize(cfg: AnalyzeConfig, store: RunStore, run_info: dict[str, Any], model_and_processor: tuple[nn.Module, Any],
             samples: Sequence[Sample]) -> Path:
    """Aggregate the finished samples into the run's outputs (the loaded model runs the mutation check, when on)."""
    model, processor = model_and_processor
    tokenizer = getattr(processor, "tokenizer", processor)
    store.compact_errors()
    loaded = store.load_all()
    if not loaded:
        raise InputError(f"no sample could be analysed (see {store.root / 'errors.jsonl'})")
    records = [r for r, _ in loaded]
    traces = [t for _, t in loaded]
    vocab = object_vocabulary(records, cfg.object_vocab or (_world_shapes() if cfg.data is None else None))
    result = detect(traces, cfg.stages, object_mask(records, vocab))
    if cfg.stages.mutation_check and check_needed(result, cfg.stages):
        assert result.critical_layer is not None
        done = {r["id"] for r in records}
        bypass = bypass_effects(model, processor, [s for s in samples if s.id in done],
                                range(result.critical_layer + 1, run_info["num_layers"] + 1), vocab, cfg.max_new_tokens,
                                cfg.batch_size, cache=cfg.out / BYPASS_FILE)
        result = confirm_mutations(result, bypass, cfg.stages)
    curves = summary_curves(traces)
    write_token_table(cfg.out / "tokens.parquet", records, traces, result)
    boundaries = result.to_dict()
    points = find_divergence(records, traces, boundaries["stages"], vocab, ending_token_ids(tokenizer))
    commits = divergence_by_sample(points)
    atomic_write_jsonl(cfg.out / "texts.jsonl", [
        {"id": record["id"], "prompt": record["prompt"], "text": record["text"], "objects": record["objects"],
         "decision_depth": decision_depth(trace.layers["top1"], trace.token_ids).tolist(),
         "divergence": commits.get(record["id"], [])} for record, trace in zip(records, traces)])
    payload = {
        "model": run_info["model"],
        "fingerprint": run_info["fingerprint"],
        "lens": cfg.lens,
        "js_unit": cfg.js_unit,
        **boundaries,
        "object_vocab": sorted(vocab),
        "hallucination": hallucination_link(records, traces, boundaries["stages"], vocab),
        "divergence": divergence_summary(points, boundaries["stages"]) if points else None,
        "samples": len(records),
        "tokens": int(sum(len(t.token_ids) for t in traces)),
        "curves": curves,
        "config": to_dict(cfg),
        "environment": environment(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    store.write_token_strings(_token_strings(store, records, traces, tokenizer))
    figs = make_figures(cfg.out / "figures", records, traces, payload, tokenizer) if cfg.figures else {}
    if cfg.figures and cfg.patch_lens:
        figs.update(_patch_figure(cfg.out / "figures", store, records, payload, tokenizer))
    write_stages(cfg.out / STAGES_FILE, payload)
    write_report(cfg.out / "report.md", payload, figs, records)
    write_html_report(cfg.out / "report.html", [cfg.out], cfg.report)
    _track(cfg, payload, figs)
    return cfg.out / STAGES_FILE


def make_figures(fig_dir: Path, records: list[dict[str, Any]], traces: list, payload: dict[str, Any],
                 tokenizer: Any) -> dict[str, Path]:
    """All PNG figures of a run, by name."""
    n = payload["num_layers"]
    unit = payload["js_unit"]
    layer_stage = figures.stage_of_layer(payload["stages"], n)
    longest = max(range(len(traces)), key=lambda i: len(traces[i].token_ids))  # the single-sample figures
    shown_record, shown_trace = records[longest], traces[longest]
    shown = min(40, len(shown_trace.token_ids))
    figs = {
        "stage_curves": figures.stage_curves(payload["curves"], payload, fig_dir / "stage_curves.png", unit),
        "js_heatmap_raw": figures.js_heatmap(shown_trace.layers["js_prev"][:shown], shown_record["tokens"][:shown],
                                             fig_dir / "js_heatmap_raw.png", "raw", unit),
        "js_heatmap_column": figures.js_heatmap(shown_trace.layers["js_prev"][:shown], shown_record["tokens"][:shown],
                                                fig_dir / "js_heatmap_column.png", "column", unit),
        "mutation_histogram": figures.mutation_histogram(payload["mutation_stats"]["histogram"], n,
                                                         fig_dir / "mutation_histogram.png"),
    }
    if payload["divergence"]:
        figs["divergence"] = figures.divergence_chart(payload["divergence"], n, fig_dir / "divergence.png")
    deep_from = payload["critical_layer"] if payload["critical_layer"] is not None else (2 * n) // 3
    for step in _interesting_steps(shown_trace, payload):
        figs[f"token_probability_step{step}"] = figures.token_probability_chart(
            shown_trace, step, lambda i: tokenizer.decode([i]), fig_dir / f"token_probability_step{step}.png", deep_from)
    if shown_trace.features is not None and len(shown_trace.token_ids) >= 2:
        figs["features_single_image"] = figures.feature_maps(
            shown_trace.features[:shown].astype(np.float32), layer_stage, fig_dir / "features_single_image.png",
            f"sample {shown_record['id']}, all tokens x layers")
    if traces[0].features is not None and len(traces) >= 3:
        first_tok = np.stack([t.features[0] for t in traces]).astype(np.float32)  # [N, L+1, H]
        figs["features_multi_image"] = figures.feature_maps(
            first_tok, layer_stage, fig_dir / "features_multi_image.png", "first answer token across images",
            groups=np.arange(len(traces)))
    return figs


def _token_strings(store: RunStore, records: list[dict[str, Any]], traces: list, tokenizer: Any) -> dict[int, str]:
    """Decoded string of every token id in the run's traces (emitted, top-k) and patch lenses."""
    ids: set[int] = set()
    for record, trace in zip(records, traces):
        ids.update(np.unique(trace.topk_ids).tolist(), trace.token_ids.tolist())
        patches = store.load_patch_lens(record["id"])
        if patches is not None:
            ids.update(np.unique(patches.top1).tolist())
    return {i: tokenizer.decode([i]) for i in sorted(ids)}


def _patch_figure(fig_dir: Path, store: RunStore, records: list[dict[str, Any]], payload: dict[str, Any],
                  tokenizer: Any) -> dict[str, Path]:
    """The patch lens of the first sample that has one, at a few layers (none if no sample has one)."""
    for record in records:
        patches = store.load_patch_lens(record["id"])
        if patches is not None:
            path = figures.patch_lens_grid(patches, store.image_file(record), payload,
                                           lambda i: tokenizer.decode([i]), fig_dir / "patch_lens.png",
                                           f"sample {record['id']}")
            return {"patch_lens": path}
    return {}


def _interesting_steps(trace: Any, payload: dict[str, Any], limit: int = 3) -> list[int]:
    """Step 0, plus the steps with the largest JS spike after the critical layer (candidate mutations)."""
    c = payload["critical_layer"]
    steps = [0]
    if c is not None and len(trace.token_ids) > 1:
        spikes = np.nan_to_num(trace.layers["js_prev"][:, c + 1 :]).max(axis=1)
        steps += [int(s) for s in np.argsort(-spikes) if s != 0][: limit - 1]
    return steps


def _track(cfg: AnalyzeConfig, payload: dict[str, Any], figs: dict[str, Path]) -> None:
    tracker = Tracker("analyze", to_dict(cfg), cfg.out, enabled=cfg.wandb)
    for layer in range(payload["num_layers"] + 1):
        tracker.log({f"{name}/median": payload["curves"][name]["median"][layer] for name in payload["curves"]}
                    | {"layer": layer}, step=layer)
    tracker.summary({"critical_layer": payload["critical_layer"], "mutation_layers": payload["mutation_layers"],
                     "stages": payload["stages"], "fingerprint": payload["fingerprint"],
                     "share_mutated": payload["mutation_stats"]["share_mutated"]})
    tracker.log_images(figs)
    tracker.log_artifact(ArtifactRef.stages(cfg.out, payload["fingerprint"], model=payload["model"],
                                            critical_layer=payload["critical_layer"],
                                            mutation_layers=payload["mutation_layers"]))
    tracker.finish()
    if tracker.dir is not None:
        atomic_write_text(cfg.out / "wandb_run.txt", str(tracker.dir) + "\n")

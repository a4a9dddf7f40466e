"""The pruned checkpoint's ``prune.json`` and model card (README.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evotool.integrations.hub import card_with_metadata
from evotool.io import atomic_write_text, write_json

PRUNE_FILE = "prune.json"
PRUNE_SCHEMA = "2.0"  # 2.0: metrics use the flat keys of results.json (evotool.evals.world.world_flat)


def write_card(out: Path, record: dict[str, Any], metrics_table: str | None = None) -> Path:
    """``out/prune.json`` (``record``, kept / removed layers numbered 1..L as in the analysis) and the model card
    ``out/README.md``; returns the path of prune.json."""
    path = write_json(Path(out) / PRUNE_FILE, record, schema=PRUNE_SCHEMA)
    atomic_write_text(Path(out) / "README.md", model_card(record, metrics_table))
    return path


def model_card(record: dict[str, Any], metrics_table: str | None = None) -> str:
    """Markdown card under Hub metadata (base model, pipeline tag, tags, the stage summary and the removed
    layers): source model, stages, removed layers and why, healing, measured quality/speed."""
    st = record["stages"]
    meta = {"source_model": record["source_model"], "source_fingerprint": record["source_fingerprint"],
            "num_layers": record["num_layers"], "kept_layers": record["kept_layers"],
            "removed_layers": record["removed_layers"], "selector": record["selector"], "healed": bool(record.get("heal")),
            "stages": st}
    tags = ["pruned", "layer-pruning", "vision-language-model", *(["lora-healed"] if record.get("heal") else [])]
    lines = [
        "# Pruned model (evotool prune)",
        "",
        f"Source model: `{record['source_model']}` (fingerprint {record['source_fingerprint']}), "
        f"{record['num_layers']} decoder layers -> {len(record['kept_layers'])}.",
        "Load with `AutoModelForImageTextToText.from_pretrained(path)` and `AutoProcessor.from_pretrained(path)`.",
        "",
        "## Stages of the source model (from its stages.json)",
        "",
        f"- critical layer: {st['critical_layer']}; mutation layers: {st['mutation_layers']}",
        f"- rapid evolution {st['stages']['rapid_evolution']}, stabilization {st['stages']['stabilization']}, "
        f"mutation {st['stages']['mutation']} (inclusive, layers numbered 1..L; 0 = embeddings)",
        "",
        f"## Removed layers (selector `{record['selector']}`"
        + (f", redundancy `{record['redundancy']}`" if record["selector"] == "stage" else "")
        + f", keep_critical={record['keep_critical']}, keep_mutation={record['keep_mutation']})",
        "",
        "| layer | why |",
        "|---|---|",
        *[f"| {layer} | {why} |" for layer, why in sorted(record["reasons"].items(), key=lambda kv: int(kv[0]))],
        "",
        f"Kept layers (old numbering): {record['kept_layers']}. New layer j is old layer kept_layers[j-1].",
        "",
    ]
    if record.get("heal"):
        h = record["heal"]
        lines += ["## Healing", "", f"LoRA r={h['settings']['r']} on layers {h['settings']['layers_to_transform'] or 'all'}, "
                  f"{h['settings']['steps']} steps on {h['samples']} synthetic-world samples; loss {h['losses'][0][1]:.3f} -> "
                  f"{h['losses'][-1][1]:.3f}. Adapters in `adapter/`, merged into these weights.", ""]
    if metrics_table:
        lines += ["## Measured", "", metrics_table, ""]
    return card_with_metadata("\n".join(lines), record["source_model"], tags, meta)

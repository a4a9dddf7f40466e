"""A short Markdown report embedding the run's figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evotool.io import atomic_write_text


def write_report(path: Path, payload: dict[str, Any], figs: dict[str, Path], records: list[dict[str, Any]]) -> None:
    """``report.md``: boundaries, spreads, figure gallery and the first generated texts."""
    interval = payload.get("interval", {})
    mut = payload["mutation_stats"]
    stages = payload["stages"]
    lines = [
        f"# Knowledge evolution: {payload['model']}",
        "",
        f"{payload['samples']} samples, {payload['tokens']} generated tokens, {payload['num_layers']} decoder layers, "
        f"lens `{payload['lens']}`, JS in {payload['js_unit']}.",
        "",
        "| | value |",
        "|---|---|",
        f"| critical layer | {payload['critical_layer']} (bootstrap interval {interval.get('critical') or 'n/a'}; "
        f"{_critical_rule(payload['config']['stages'], payload['evidence'].get('object_decided_share') is not None)}) |",
        f"| mutation layers | {payload['mutation_layers'] or 'none'} (interval {interval.get('mutation') or 'n/a'}; "
        f"{_mutation_rule(payload['config']['stages'])}; {mut['share_mutated']:.0%} of tokens have their top-1 decided "
        "by a layer's own update after the critical layer) |",
        f"| flags | {', '.join(payload.get('flags', [])) or 'none'} |",
    ]
    check = payload.get("mutation_check")
    if check:
        also = f", added {check['added']}" if check.get("added") else ""  # schema 1.3; earlier checks never add
        lines.insert(-1, f"| mutation check | called {check['called'] or 'none'}, confirmed {check['confirmed'] or 'none'}"
                         f"{also} ({_check_rule(payload['config']['stages'])}) |")
    for name in ("rapid_evolution", "stabilization", "mutation"):
        rng = stages[name]
        lines.append(f"| {name.replace('_', ' ')} | {'layers %d-%d' % tuple(rng) if rng else 'absent'} |")
    hall = payload.get("hallucination")
    if hall:
        lines += ["", "## Object tokens: hallucinated vs grounded", "",
                  "| | tokens | median decision depth | decided in rapid / stable / mutation stage | top-1 at end of stable stage was another token |",
                  "|---|---|---|---|---|"]
        for name, g in hall.items():
            shares = " / ".join(f"{g['decided_in'][s]:.0%}" for s in ("rapid_evolution", "stabilization", "mutation"))
            lines.append(f"| {name} | {g['tokens']} | {g['median_decision_depth']} | {shares} | {g['overturned_after_stable']:.0%} |")
    div = payload.get("divergence")
    if div:
        lines += ["", f"## Divergence points of {div['hallucinated_mentions']} hallucinated object mentions", "",
                  "| token | count | decided in rapid / stable / mutation stage | stable stage preferred an ending | overturned after the stable stage | overturning layers |",
                  "|---|---|---|---|---|---|"]
        for kind in ("separator", "phrase_start", "object"):
            g = div[kind]
            shares = " / ".join(f"{g['decided_in'][s]:.0%}" for s in ("rapid_evolution", "stabilization", "mutation"))
            layers = ", ".join(f"{layer}: {c}" for layer, c in g["overturn_layers"].items()) or "-"
            lines.append(f"| {kind.replace('_', ' ')} | {g['tokens']} | {shares} | {g['stable_preferred_ending']:.0%} | "
                         f"{g['overturned_after_stable']:.0%} | {layers} |")
    lines += ["", "## Figures", ""]
    for name, fig in figs.items():
        lines += [f"### {name.replace('_', ' ')}", "", f"![{name}]({fig.relative_to(path.parent).as_posix()})", ""]
    lines += ["## Generated texts", ""]
    for record in records[:10]:
        lines.append(f"- `{record['id']}`: {record['text']}")
    atomic_write_text(path, "\n".join(lines) + "\n")


def _mutation_rule(cfg: dict) -> str:
    """The mutation rule of a run's stage options, in words (runs before v5 read the flip share)."""
    if cfg.get("mutation_signal", "flip") == "js":
        others = cfg.get("mutation_reference") == "others"  # v8; runs before it have no such key
        median = "the median of the other post-critical layers" if others else "its post-critical median"
        rule = f"layers whose mean direct-effect JS is >= {cfg['mutation_ratio']:g}x {median}"
        if cfg.get("mutation_quiet_ratio", 0) > 0:  # v8; runs before it have no such key
            rule += (f" and >= {cfg['mutation_min_js']:g}, or >= {cfg['mutation_quiet_ratio']:g}x and >= "
                     f"{cfg['mutation_quiet_min_js']:g}")
        if cfg.get("mutation_last_excess", 0) > 0:  # v7; runs before it have no such key (v6)
            rule += f" (the last layer: its mean JS excess over {cfg['mutation_last_excess']:g}, the same ratio)"
        return rule
    return f"layers whose direct-effect flip share is >= {cfg['mutation_ratio']:g}x its post-critical median"


def _check_rule(cfg: dict) -> str:
    """The bypass check's rule of a run's stage options, in words."""
    return (f"kept when bypassing the layer on these samples rewrites >= {cfg['check_min_rewrite']:.0%} of the tokens and "
            f">= {cfg['check_ratio']:g}x the median over the other post-critical layers, or lowers CHAIR_i by >= "
            f"{cfg['check_chair_cut']:g} at a recall loss <= {cfg['check_recall']:g}"
            + (f"; a call kept for its rewrites alone is dropped when its bypass raises CHAIR_i by > {cfg['check_chair_guard']:g}"
               if cfg.get("check_chair_guard") is not None else "")
            + (f"; layers from critical + 2 whose bypass lowers CHAIR_i by >= {cfg['check_add_cut']:g} and >= "
               f"{cfg['check_add_share']:.0%} of the full model's at a recall loss <= {cfg['check_recall']:g} are added"
               if cfg.get("check_add_cut") is not None else ""))


def _critical_rule(cfg: dict, objects: bool) -> str:
    """The critical-layer rule of a run's stage options, in words (runs before v3 had no ``critical_rule``);
    ``objects``: the run's object-word tokens took part (v4)."""
    if cfg.get("critical_rule", "probability") == "depth":
        also = f" and {cfg['object_share']:.0%} of the object words" if objects else ""
        return f"the first layer by which {cfg['depth_share']:.0%} of the tokens{also} have reached their decision depth"
    return f"median emitted-token probability reaches {cfg['rise_fraction']:.0%} of its maximum"

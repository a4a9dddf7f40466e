"""The cross-model stage atlas: the boundaries and stage curves of many analysis runs side by side.

``evotool atlas RUN_DIR... --out DIR`` writes

* ``atlas.md``: one table row per run (ordered by depth): model, L, critical layer and mutation layers with their
  bootstrap intervals, the three stage ranges, the detector's flags, the behavioural boundaries where known and the
  detector's verdict against them (:func:`evotool.zoo.report.verdict`). When ``atlas.md`` already exists and holds
  the :data:`BEGIN` / :data:`END` markers, only the text between them is replaced (notes around the table stay);
* ``atlas.png``: one small panel per run, x = layer / L so that depths compare: the median emitted-token probability
  and the curve the run's mutation rule read (:func:`second_curve`; dotted: the adjacent-layer JS of runs without
  direct effect), the detected boundaries as solid lines and the behavioural ones dashed;
* ``atlas-depth.png``: the boundaries against depth (:func:`depth_figure`): critical layer and first mutation as a
  share of L for every run, detected beside behavioural, coloured by text decoder family; ``atlas.md`` gives the
  same per depth in numbers (:func:`depth_table`);
* ``atlas.html``: the interactive report of every run (:mod:`evotool.analysis.html`), with the behavioural boundaries.

Behavioural ground truth of a run, first match wins: a ``--behaviour`` file with the run's model fingerprint, the
``behaviour.json`` of the zoo member folder holding the run (``<member>/analysis_a``), a ``behaviour`` key in
``stages.json``. Only ``stages.json`` is required of a run directory.
"""

from __future__ import annotations

import io
import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from evotool.analysis.config import AtlasConfig  # noqa: E402
from evotool.analysis.figures import STAGE_COLOURS  # noqa: E402
from evotool.analysis.html import behaviour as stored_behaviour, render, report_data  # noqa: E402
from evotool.errors import InputError  # noqa: E402
from evotool.io import atomic_write_bytes, atomic_write_text  # noqa: E402
from evotool.stages.behaviour import BEHAVIOUR_FILE, read_behaviour  # noqa: E402
from evotool.stages.file import StageFile  # noqa: E402
from evotool.validate import output_dir  # noqa: E402
from evotool.zoo.report import verdict  # noqa: E402

BEGIN = "<!-- evotool atlas: begin (generated; text outside these markers is kept) -->"
END = "<!-- evotool atlas: end -->"
COLUMNS = ("run", "model", "L", "critical (interval)", "mutation (interval)", "stages (rapid / stable / mutation)",
           "flags", "beh. critical", "beh. mutation", "verdict")
CRITICAL_COLOUR, MUTATION_COLOUR = STAGE_COLOURS["stabilization"], STAGE_COLOURS["mutation"]


@dataclass(frozen=True)
class AtlasRun:
    """One analysis run in the atlas; ``behaviour`` holds the behavioural ``critical_layer`` and
    ``mutation_layers`` (and ``removable_at_least_2`` when measured), or None when unknown."""

    label: str
    path: Path
    stages: StageFile
    model: str
    behaviour: dict[str, Any] | None


def model_name(stage_model: str) -> str:
    """The model's architecture (``model_type``, with the text decoder's as ``llava/llama``) from its
    ``config.json`` when the model is a readable local folder; else the model as ``stages.json`` names it."""
    try:
        config = json.loads((Path(stage_model) / "config.json").read_text())
    except (OSError, ValueError):
        return stage_model
    outer = config.get("model_type", "?")
    inner = (config.get("text_config") or {}).get("model_type")
    return f"{outer}/{inner}" if inner and inner != outer else outer


def _labels(paths: Sequence[Path]) -> list[str]:
    """A run's name: its folder, or the zoo member's (``<member>/analysis_a`` -> member); paths if names repeat."""
    names = [p.parent.name if p.name.startswith("analysis") and p.parent.name else p.name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def load_runs(run_dirs: Sequence[Path], behaviour_files: Sequence[Path] = ()) -> list[AtlasRun]:
    """Read every run's ``stages.json`` and behavioural truth (module docstring), ordered by depth then name.
    :class:`InputError` for a missing folder or a behaviour file of another model; StageFileError for a missing
    or corrupt stage file."""
    if not run_dirs:
        raise InputError("no run directory given")
    paths = [Path(d) for d in run_dirs]
    for path in paths:
        if not path.is_dir():
            raise InputError(f"run directory {path} does not exist")
    stage_files = [StageFile.read(p) for p in paths]
    explicit = {}
    for file in behaviour_files:
        truth = read_behaviour(Path(file))
        if not any(s.fingerprint == truth.get("fingerprint") for s in stage_files):
            raise InputError(f"{file}: behaviour of model {truth.get('fingerprint')}, which none of the runs analysed")
        explicit[truth["fingerprint"]] = truth["boundaries"]
    runs = []
    for label, path, stages in zip(_labels(paths), paths, stage_files):
        truth = explicit.get(stages.fingerprint)
        member_file = path.parent / BEHAVIOUR_FILE
        if truth is None and member_file.is_file():
            member = read_behaviour(member_file)
            if member.get("fingerprint") != stages.fingerprint:
                raise InputError(f"{member_file} belongs to another model than {stages.source} (fingerprint "
                                 f"{member.get('fingerprint')}, run {stages.fingerprint}); re-measure it or re-run the analysis")
            truth = member["boundaries"]
        truth = truth or stored_behaviour(stages.payload)
        runs.append(AtlasRun(label, path, stages, model_name(stages.model), truth))
    return sorted(runs, key=lambda r: (r.stages.num_layers, r.label))


def _span(rng: Sequence[int] | None) -> str:
    return "-" if not rng else f"{rng[0]}-{rng[1]}"


def _layers(layers: Sequence[int]) -> str:
    return ", ".join(map(str, layers)) if layers else "none"


def row(run: AtlasRun) -> dict[str, str]:
    """The atlas table row of one run (column -> text); ``-`` where a value is unknown."""
    s = run.stages
    interval = s.payload.get("interval") or {}
    cells = {
        "run": run.label, "model": run.model, "L": str(s.num_layers),
        "critical (interval)": ("none" if s.critical_layer is None else str(s.critical_layer))
        + f" ({_span(interval.get('critical'))})",
        "mutation (interval)": _layers(s.mutation_layers) + f" ({_span(interval.get('mutation'))})",
        "stages (rapid / stable / mutation)": " / ".join(_span(s.stages[k]) for k in s.stages),
        "flags": ", ".join(s.flags) or "-",
        "beh. critical": "-", "beh. mutation": "-", "verdict": "-",
    }
    b = run.behaviour
    if b is not None:
        checks = verdict(b, s, None)
        cells.update({
            "beh. critical": "none" if b["critical_layer"] is None else str(b["critical_layer"]),
            "beh. mutation": _layers(b["mutation_layers"]),
            "verdict": ", ".join(f"{k} {'ok' if v else '**miss**'}" for k, v in checks.items() if v is not None) or "-",
        })
    return cells


def table(runs: Sequence[AtlasRun]) -> str:
    """The Markdown table of ``runs`` (one row each, in the given order)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(r)[c] for c in COLUMNS) + " |" for r in runs]
    return "\n".join(lines)


def family(run: AtlasRun) -> str:
    """The run's text decoder family: the last part of its model name (``llava/llama`` -> ``llama``)."""
    return run.model.rsplit("/", 1)[-1]


def _relative(layer: int | None, run: AtlasRun) -> float | None:
    return None if layer is None else layer / run.stages.num_layers


def _behaviour_critical(run: AtlasRun) -> int | None:
    return None if run.behaviour is None else run.behaviour["critical_layer"]


def _behaviour_mutation(run: AtlasRun) -> int | None:
    return None if run.behaviour is None else min(run.behaviour["mutation_layers"], default=None)


BoundaryOf = Callable[[AtlasRun], int | None]
# (name, detected boundary of a run, behavioural boundary of a run: None where unknown or absent)
DEPTH_BOUNDARIES: tuple[tuple[str, BoundaryOf, BoundaryOf], ...] = (
    ("critical layer", lambda r: r.stages.critical_layer, _behaviour_critical),
    ("first mutation layer", lambda r: r.stages.mutation, _behaviour_mutation),
)


def _shares(group: Sequence[AtlasRun], boundary: BoundaryOf) -> list[float]:
    """``boundary`` / L of the runs of ``group`` that have one."""
    return [v for v in (_relative(boundary(r), r) for r in group) if v is not None]


def _median(values: Sequence[float]) -> str:
    """``median (min-max)`` of ``values`` to two decimals, ``-`` when empty."""
    if not values:
        return "-"
    return f"{np.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


DEPTH_COLUMNS = ("L", "runs", "critical / L: detected", "behaviour", "critical within 1",
                 "first mutation / L: detected [runs with one]", "behaviour [runs with one / with truth]",
                 "stabilization layers")


def depth_table(runs: Sequence[AtlasRun]) -> str:
    """The atlas by depth, one Markdown row per L: medians (and ranges) of the detected and behavioural critical layer
    and first mutation as shares of L, how many runs with a behavioural critical layer the detector finds within one
    layer (the verdict's rule), and the median length of the detected stabilization stage (0 where there is none)."""
    by_depth: dict[int, list[AtlasRun]] = defaultdict(list)
    for run in runs:
        by_depth[run.stages.num_layers].append(run)
    (_, critical, beh_critical), (_, mutation, beh_mutation) = DEPTH_BOUNDARIES
    lines = ["| " + " | ".join(DEPTH_COLUMNS) + " |", "|" + "---|" * len(DEPTH_COLUMNS)]
    for depth, group in sorted(by_depth.items()):
        known = [r for r in group if r.behaviour is not None]
        judged = [verdict(r.behaviour, r.stages, None)["critical"] for r in known
                  if r.behaviour["critical_layer"] is not None]
        found, truth = _shares(group, mutation), _shares(known, beh_mutation)
        stable = [0 if s is None else s[1] - s[0] + 1 for s in (r.stages.stages["stabilization"] for r in group)]
        lines.append("| " + " | ".join([
            str(depth), str(len(group)), _median(_shares(group, critical)), _median(_shares(known, beh_critical)),
            f"{sum(judged)}/{len(judged)}" if judged else "-",
            f"{_median(found)} [{len(found)}/{len(group)}]",
            f"{_median(truth)} [{len(truth)}/{len(known)}]" if known else "-",
            f"{np.median(stable):g}"]) + " |")
    return "\n".join(lines)


def _spread(group: Sequence[AtlasRun], width: float = 0.2) -> list[float]:
    """x offsets in [-width / 2, width / 2] that set apart the runs of one depth in ``group`` (in order)."""
    by_depth: dict[int, list[int]] = defaultdict(list)
    for i, run in enumerate(group):
        by_depth[run.stages.num_layers].append(i)
    offsets = [0.0] * len(group)
    for members in by_depth.values():
        for j, i in enumerate(members):
            offsets[i] = width * (j / (len(members) - 1) - 0.5) if len(members) > 1 else 0.0
    return offsets


def depth_figure(runs: Sequence[AtlasRun]) -> plt.Figure:
    """The boundaries against depth: one panel per :data:`DEPTH_BOUNDARIES` entry, x = L (families side by side
    within a depth, runs of a family spread by :func:`_spread`), y = layer / L; detected filled, behavioural hollow,
    a grey line joining the two of one run; colour = :func:`family`. Scatter labels: ``<family> detected`` /
    ``<family> behaviour``."""
    if not runs:
        raise InputError("no run to draw")
    families = sorted({family(r) for r in runs})
    colours = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}
    offset = {f: 0.3 * (i - (len(families) - 1) / 2) for i, f in enumerate(families)}
    fig, axes = plt.subplots(1, len(DEPTH_BOUNDARIES), figsize=(6 * len(DEPTH_BOUNDARIES), 4), squeeze=False)
    for ax, (name, detected, behavioural) in zip(axes[0], DEPTH_BOUNDARIES):
        for fam in families:
            group = [r for r in runs if family(r) == fam]
            x = [r.stages.num_layers + offset[fam] + spread for r, spread in zip(group, _spread(group))]
            found = [_relative(detected(r), r) for r in group]
            truth = [_relative(behavioural(r), r) for r in group]
            for xi, d, b in zip(x, found, truth):
                if d is not None and b is not None:
                    ax.plot([xi, xi], [d, b], color="grey", lw=0.6, alpha=0.6, zorder=1)
            for values, style, label in ((found, {"color": colours[fam]}, "detected"),
                                         (truth, {"facecolors": "none", "edgecolors": colours[fam]}, "behaviour")):
                points = [(xi, v) for xi, v in zip(x, values) if v is not None]
                if points:
                    ax.scatter(*zip(*points), s=22, lw=1.1, zorder=2, label=f"{fam} {label}", **style)
        ax.set_title(f"{name} / L against depth", fontsize=10)
        ax.set_xlabel("decoder layers L")
        ax.set_ylabel(f"{name} / L")
        ax.set_ylim(-0.03, 1.05)
        ax.grid(alpha=0.3)
    legend = [Line2D([], [], ls="none", marker="o", color=colours[f], label=f) for f in families]
    legend += [Line2D([], [], ls="none", marker="o", color="grey", label="detected"),
               Line2D([], [], ls="none", marker="o", markerfacecolor="none", color="grey", label="behaviour"),
               Line2D([], [], color="grey", lw=0.6, label="same run")]
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    return fig


def _curve(values: Any, length: int) -> np.ndarray:
    """A per-layer curve as floats (None -> NaN), or all NaN when the run does not store it."""
    if values is None:
        return np.full(length, np.nan)
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def second_curve(stages: StageFile) -> tuple[np.ndarray, str]:
    """The curve the run's mutation rule read, per layer [L+1]: the mean direct-effect JS (``evidence.direct_js``,
    signal js, v5) or flip share (``evidence.direct_flip``, signal flip: runs before v5), or, for runs traced without
    direct effect, the median adjacent-layer JS (``curves.js_prev``); with the curve's name."""
    n = stages.num_layers + 1
    evidence = stages.payload.get("evidence") or {}
    signal = ((stages.payload.get("config") or {}).get("stages") or {}).get("mutation_signal", "flip")
    keys = (("direct_js", "mean direct-effect JS"),) if signal == "js" else ()
    for key, name in (*keys, ("direct_flip", "direct-effect flip share")):
        values = evidence.get(key)
        if values is not None and any(v is not None for v in values):
            return _curve(values, n), name
    return _curve(((stages.payload.get("curves") or {}).get("js_prev") or {}).get("median"), n), ADJACENT


ADJACENT = "median adjacent JS"  # second_curve's fallback, drawn dotted


def _panel(ax: plt.Axes, run: AtlasRun) -> str:
    """Draw one run: its curves against layer / L, the stabilization band and the boundary lines; returns the name
    of the second curve drawn."""
    s = run.stages
    n = s.num_layers
    x = np.arange(n + 1) / n
    stable = s.stages["stabilization"]
    if stable:
        ax.axvspan((stable[0] - 0.5) / n, (stable[1] + 0.5) / n, color=CRITICAL_COLOUR, alpha=0.1, lw=0)
    curves = s.payload.get("curves") or {}
    p_token = (curves.get("p_token") or {}).get("median") or (s.payload.get("evidence") or {}).get("median_p")
    ax.plot(x, _curve(p_token, n + 1), color="black", lw=1.2)
    ax.set_ylim(0, 1.02)
    ax.set_xlim(-0.03, 1.03)
    second, name = second_curve(s)
    twin = ax.twinx()
    twin.plot(x, second, color="tab:orange", lw=1, ls=":" if name == ADJACENT else "-")
    top = np.nanmax(second) if np.isfinite(second).any() else 0.0
    twin.set_ylim(0, max(top * 1.1, 1e-3))
    twin.tick_params(labelsize=6, colors="tab:orange")
    marks = [(s.critical_layer, s.mutation_layers, "-")]
    if run.behaviour is not None:
        marks.append((run.behaviour["critical_layer"], run.behaviour["mutation_layers"], "--"))
    for critical, mutations, style in marks:
        for layer, colour in [(critical, CRITICAL_COLOUR)] + [(m, MUTATION_COLOUR) for m in mutations]:
            if layer is not None:
                ax.axvline(layer / n, color=colour, ls=style, lw=1.4)
    flags = f"\n{', '.join(s.flags)}" if s.flags else ""
    ax.set_title(f"{run.label} (L={n}){flags}", fontsize=7)
    ax.tick_params(labelsize=6)
    return name


def figure(runs: Sequence[AtlasRun], columns: int = 6) -> tuple[plt.Figure, list[plt.Axes]]:
    """The atlas figure: one panel per run (in order), ``columns`` per row; returns the figure and the panels
    (each panel's twin axis for the second curve is not among them)."""
    if not runs:
        raise InputError("no run to draw")
    cols = min(columns, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig, grid = plt.subplots(rows, cols, figsize=(2.3 * cols, 1.9 * rows + 0.25), squeeze=False)
    panels = list(grid.ravel()[: len(runs)])
    for ax in grid.ravel()[len(runs):]:
        fig.delaxes(ax)
    drawn = dict.fromkeys(_panel(ax, run) for ax, run in zip(panels, runs))  # second curves, in order of first use
    legend = [Line2D([], [], ls="none", label="x: layer / L"),
              Line2D([], [], color="black", label="median p(emitted token)"),
              Line2D([], [], color="tab:orange", label="right axis: " + " / ".join(
                  f"{name} (dotted)" if name == ADJACENT else name for name in drawn)),
              Line2D([], [], color=CRITICAL_COLOUR, label="critical layer"),
              Line2D([], [], color=MUTATION_COLOUR, label="mutation layer"),
              Line2D([], [], color="grey", ls="--", label="behavioural boundary (dashed)")]
    fig.tight_layout(rect=(0, 0.25 / fig.get_figheight(), 1, 1))
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=7, frameon=False,
               handletextpad=0.4, borderaxespad=0.1)
    return fig, panels


def markdown(runs: Sequence[AtlasRun], image: str, depth_image: str) -> str:
    """The generated block of ``atlas.md`` (between the markers): the depth figure and table, the panel figure and
    the table of runs."""
    return "\n".join([
        BEGIN, "", f"![boundaries against depth: {len(runs)} runs]({depth_image})", "",
        "By depth: medians (range) over the runs of each depth, as shares of L; [runs with a first mutation / runs]; "
        "critical within 1: runs whose detected critical layer is within one layer of the behavioural one, of those "
        "with one.", "", depth_table(runs), "",
        f"![stage atlas: {len(runs)} runs]({image})", "",
        "Solid lines: detected boundaries (green critical, red mutation; green band: stabilization); dashed: "
        "behavioural ones. Intervals: the bootstrap's central 90% (`stages.json` `interval`). Verdict: the "
        "detector against behaviour (critical within 1; mutation within 1 of a behavioural one, or none where "
        "behaviour shows none).", "",
        table(runs), "", END])


def write_markdown(path: Path, block: str) -> Path:
    """Write ``block`` as ``path``, or replace the marked block of an existing file that has the markers."""
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text.split(BEGIN, 1)[1]:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = f"# Stage atlas\n\n{block}\n"
    atomic_write_text(path, text)
    return path


def write_atlas(run_dirs: Sequence[Path], cfg: AtlasConfig) -> list[Path]:
    """Write ``atlas.md``, ``atlas.png``, ``atlas-depth.png`` and (``cfg.html``) ``atlas.html`` into ``cfg.out``;
    returns their paths."""
    out = output_dir(cfg.out)  # checked before the runs are read
    runs = load_runs(run_dirs, cfg.behaviour)
    written = [write_markdown(out / "atlas.md", markdown(runs, "atlas.png", "atlas-depth.png"))]
    for name, fig in (("atlas.png", figure(runs, cfg.columns)[0]), ("atlas-depth.png", depth_figure(runs))):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        written.append(out / name)
        atomic_write_bytes(written[-1], buf.getvalue())
    if cfg.html:
        data = report_data([r.path for r in runs], cfg.report)
        data["title"] = f"Stage atlas: {len(runs)} runs"
        for view, run in zip(data["runs"], runs):
            view["name"] = run.label
            view["behaviour"] = None if run.behaviour is None else {
                k: run.behaviour[k] for k in ("critical_layer", "mutation_layers")}
        written.append(out / "atlas.html")
        atomic_write_text(written[-1], render(data))
    return written

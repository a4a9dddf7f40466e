"""The figures people want to look at: the paper's three levels, annotated with detected stages."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from evotool.patch_lens import PatchLens  # noqa: E402
from evotool.trace import SampleTrace  # noqa: E402

STAGE_COLOURS = {"rapid_evolution": "#4C72B0", "stabilization": "#55A868", "mutation": "#C44E52"}


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _shade_stages(ax: plt.Axes, stages: dict[str, list[int] | None]) -> None:
    for name, rng in stages.items():
        if rng:
            ax.axvspan(rng[0] - 0.5, rng[1] + 0.5, color=STAGE_COLOURS[name], alpha=0.08, label=name.replace("_", " "))


def stage_of_layer(stages: dict[str, list[int] | None], num_layers: int) -> list[str]:
    """Stage name of every layer 0..L."""
    names = ["rapid_evolution"] * (num_layers + 1)
    for name, rng in stages.items():
        if rng:
            for layer in range(rng[0], rng[1] + 1):
                names[layer] = name
    return names


def stage_curves(curves: dict[str, dict[str, list]], boundaries: dict[str, Any], path: Path, js_unit: str) -> Path:
    """Median (and IQR band) per layer of adjacent JS, JS to the output, emitted-token probability,
    entropy and adjacent cosine, with stages shaded and the critical / mutation layers marked."""
    panels = [("js_prev", f"adjacent-layer JS ({js_unit})"), ("js_final", f"JS to output layer ({js_unit})"),
              ("p_token", "p(emitted token)"), ("entropy", f"entropy ({js_unit})"), ("cos_prev", "adjacent cosine")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        med = np.array(curves[key]["median"], dtype=float)
        q25 = np.array(curves[key]["q25"], dtype=float)
        q75 = np.array(curves[key]["q75"], dtype=float)
        x = np.arange(len(med))
        _shade_stages(ax, boundaries["stages"])
        ax.fill_between(x, q25, q75, alpha=0.3, color="grey")
        ax.plot(x, med, color="black", lw=1.5)
        if boundaries["critical_layer"] is not None:
            ax.axvline(boundaries["critical_layer"], color=STAGE_COLOURS["stabilization"], ls="--", lw=1.2)
        for m in boundaries["mutation_layers"]:
            ax.axvline(m, color=STAGE_COLOURS["mutation"], ls=":", lw=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer")
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"critical layer {boundaries['critical_layer']}, mutation layers {boundaries['mutation_layers']}")
    return _save(fig, path)


def js_heatmap(js: np.ndarray, tokens: Sequence[str], path: Path, scale: str, js_unit: str) -> Path:
    """The paper's heatmap: tokens x adjacent layer pairs. ``scale`` "raw" or "column" (each layer
    pair divided by its maximum over tokens, as the reference scripts do)."""
    values = js[:, 1:].astype(float)
    if scale == "column":
        values = values / np.maximum(np.nanmax(values, axis=0, keepdims=True), 1e-12)
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * values.shape[1] + 2), max(3, 0.22 * len(tokens) + 1)))
    im = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], fontsize=7)
    ax.set_xticks(range(values.shape[1]), [f"{l}-{l + 1}" for l in range(values.shape[1])], fontsize=6, rotation=90)
    ax.set_xlabel("layer pair")
    fig.colorbar(im, ax=ax, label=f"JS ({js_unit})" if scale == "raw" else "JS / column max")
    ax.set_title(f"adjacent-layer JS divergence ({scale})")
    return _save(fig, path)


def token_probability_chart(trace: SampleTrace, step: int, decode: Callable[[int], str], path: Path,
                            deep_from: int) -> Path:
    """Level 1 for one generated token: probability across layers of the candidate tokens (the top-1
    tokens of layers >= ``deep_from``), as overlapping filled curves. A candidate's probability is
    known where it is in the layer's stored top-k and drawn as 0 below that."""
    ids, probs = trace.topk_ids[step], trace.topk_p[step]  # [L+1, k]
    candidates = list(dict.fromkeys(ids[deep_from:, 0].tolist()))
    x = np.arange(ids.shape[0])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for cand in candidates:
        curve = np.where(ids == cand, probs, 0.0).sum(-1)
        ax.fill_between(x, curve, alpha=0.35, label=repr(decode(cand)))
        ax.plot(x, curve, lw=1)
    ax.set_xlabel("layer")
    ax.set_ylabel("probability")
    ax.set_ylim(0, 1)
    ax.set_title(f"step {step}: emitted {decode(int(trace.token_ids[step]))!r}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _embed(features: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """2-D embedding of [N, H] features scaled per dimension by max-abs (the paper's preprocessing)."""
    x = features.astype(np.float64)
    x = x / np.maximum(np.abs(x).max(axis=0, keepdims=True), 1e-12)
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    from sklearn.manifold import TSNE

    perplexity = float(min(35, max(2, (len(x) - 1) // 3)))
    return TSNE(n_components=2, perplexity=perplexity, learning_rate=200.0, max_iter=1000, init="pca",
                random_state=seed).fit_transform(x)


def feature_maps(features: np.ndarray, layer_stage: Sequence[str], path: Path, title: str,
                 groups: np.ndarray | None = None) -> Path:
    """Level 3: t-SNE and PCA of per-layer hidden states [N, L+1, H], each point a (item, layer),
    coloured by the layer's stage, shaded by depth; ``groups`` [N] marks items (e.g. images)."""
    n, n_layers, h = features.shape
    flat = features.reshape(n * n_layers, h)
    layers = np.tile(np.arange(n_layers), n)
    stage = np.array([layer_stage[l] for l in layers])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, method in zip(axes, ("tsne", "pca")):
        xy = _embed(flat, method)
        for name, colour in STAGE_COLOURS.items():
            sel = stage == name
            if sel.any():
                ax.scatter(xy[sel, 0], xy[sel, 1], s=10, c=colour, alpha=0.25 + 0.6 * layers[sel] / (n_layers - 1),
                           label=name.replace("_", " "), edgecolors="none")
        if groups is not None:
            last = layers == n_layers - 1
            for g in np.unique(groups):
                sel = last & (np.repeat(groups, n_layers) == g)
                ax.scatter(xy[sel, 0], xy[sel, 1], s=30, marker="x", c="black", lw=0.6)
        ax.set_title(f"{method.upper()}: {title}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def mutation_histogram(histogram: dict[int, int], num_layers: int, path: Path) -> Path:
    """How many tokens have their top-1 decided by each post-critical layer's own update (direct effect)."""
    counts = np.zeros(num_layers + 1)
    for layer, c in histogram.items():
        counts[int(layer)] = c
    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.bar(np.arange(num_layers + 1), counts, color=STAGE_COLOURS["mutation"])
    ax.set_xlabel("layer")
    ax.set_ylabel("tokens")
    ax.set_title("top-1 decided by the layer's own update")
    return _save(fig, path)


def divergence_chart(summary: dict[str, Any], num_layers: int, path: Path) -> Path:
    """The divergence point: for separators, phrase starts and object tokens of hallucinated mentions, the share
    decided in each stage (left) and the layers that overturned the stable stage's top-1 (right)."""
    kinds = ("separator", "phrase_start", "object")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    bottom = np.zeros(len(kinds))
    for stage, colour in STAGE_COLOURS.items():
        shares = np.array([summary[k]["decided_in"].get(stage, 0.0) for k in kinds])
        left.bar(kinds, shares, bottom=bottom, color=colour, label=stage.replace("_", " "))
        bottom += shares
    left.plot(kinds, [summary[k]["stable_preferred_ending"] for k in kinds], "kD", label="stable stage preferred ending")
    left.set_ylim(0, 1.05)
    left.set_ylabel("share of tokens")
    left.set_title(f"where commit tokens are decided ({summary['hallucinated_mentions']} hallucinated mentions)")
    left.legend(fontsize=7)
    width = 0.8 / len(kinds)
    x = np.arange(num_layers + 1)
    for i, kind in enumerate(kinds):
        counts = np.zeros(num_layers + 1)
        for layer, c in summary[kind]["overturn_layers"].items():
            counts[int(layer)] = c
        right.bar(x + (i - 1) * width, counts, width, label=kind.replace("_", " "))
    right.set_xlabel("layer")
    right.set_ylabel("overturned tokens")
    right.set_title("layer that overturned the stable stage's top-1")
    right.legend(fontsize=7)
    return _save(fig, path)


def patch_layers(num_layers: int, boundaries: dict[str, Any], panels: int = 5) -> list[int]:
    """Layers to show side by side: evenly spaced from 0 to L, plus the critical and first mutation layer."""
    layers = set(np.linspace(0, num_layers, panels).round().astype(int).tolist())
    layers.update(x for x in (boundaries["critical_layer"], *boundaries["mutation_layers"][:1]) if x is not None)
    return sorted(layers)


def patch_lens_grid(patches: PatchLens, image: Path | None, boundaries: dict[str, Any], decode: Callable[[int], str],
                    path: Path, title: str) -> Path:
    """"What each patch reads as at layer l": the image under its patch grid, each cell labelled with the
    patch's top-1 lens token and shaded by its probability, at a few layers side by side (a strip of
    cells without the image when the model's patch grid is unknown)."""
    rows, cols = patches.grid
    layers = patch_layers(patches.top1.shape[0] - 1, boundaries)
    stage = stage_of_layer(boundaries["stages"], patches.top1.shape[0] - 1)
    picture = np.asarray(Image.open(image).convert("RGB")) if image is not None and patches.spatial else None
    width = 3.2 if patches.spatial else max(3.2, 0.6 * cols)
    fig, axes = plt.subplots(1, len(layers), figsize=(width * len(layers), 3.4 * (1 if patches.spatial else 0.4) + 0.6),
                             squeeze=False)
    for ax, layer in zip(axes[0], layers):
        if picture is not None:
            ax.imshow(picture, extent=(0, cols, rows, 0), interpolation="nearest")
        ax.imshow(patches.prob[layer].reshape(rows, cols), extent=(0, cols, rows, 0), cmap="Greys", vmin=0, vmax=1,
                  alpha=0.45 if picture is not None else 0.8)
        for p, (tok, prob) in enumerate(zip(patches.top1[layer], patches.prob[layer])):
            r, c = divmod(p, cols)
            ax.text(c + 0.5, r + 0.5, f"{decode(int(tok)).strip()[:8]}\n{prob:.2f}", ha="center", va="center",
                    fontsize=7, color="white" if prob > 0.5 else "black")
        ax.set_xticks(np.arange(cols + 1), [])
        ax.set_yticks(np.arange(rows + 1), [])
        ax.grid(True, color="white", lw=0.6)
        ax.set_title(f"layer {layer} ({stage[layer].replace('_', ' ')})", fontsize=9,
                     color=STAGE_COLOURS[stage[layer]])
    fig.suptitle(f"patch lens, step 0: top-1 token per image patch ({title}; {patches.note})", fontsize=9)
    return _save(fig, path)

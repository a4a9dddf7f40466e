"""Options of one ``evotool analyze`` run (CLI flags, ``--config`` YAML and ``--set`` map onto these fields) and of
its interactive report (``evotool report``) and of the cross-model atlas (``evotool atlas``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from evotool.data.inputs import DEFAULT_PROMPT
from evotool.errors import ConfigError
from evotool.options import LoadOptions
from evotool.stages.detect import StageConfig


@dataclass
class ReportConfig:
    """How much of each run ``report.html`` embeds (the page stays a few MB)."""

    samples: int = field(default=8, metadata={"help": "samples embedded in the page, split evenly over the runs (at least one each)"})
    tokens: int = field(default=48, metadata={"help": "generated tokens per sample in the heatmap and the trajectories"})
    figures: bool = field(default=True, metadata={"help": "embed the run's static PNG figures (t-SNE, histograms, patch lens)"})

    def __post_init__(self) -> None:
        if self.samples < 1 or self.tokens < 1:
            raise ConfigError(f"report samples and tokens must be positive, got {self.samples} and {self.tokens}")


@dataclass
class AtlasConfig:
    """Where ``evotool atlas`` writes the cross-model page and where it finds behavioural ground truth."""

    out: Path = field(default=Path("atlas"), metadata={"help": "folder for atlas.md, atlas.png and atlas.html"})
    behaviour: list[Path] = field(default_factory=list, metadata={
        "help": "behaviour.json files, matched to the runs by model fingerprint (default: each run's "
                "<member>/behaviour.json beside <member>/analysis_*)"})
    html: bool = field(default=True, metadata={"help": "also write atlas.html (the interactive report of every run)"})
    columns: int = field(default=6, metadata={"help": "panels per row of atlas.png"})
    report: ReportConfig = field(default_factory=ReportConfig, metadata={"help": "what atlas.html embeds"})

    def __post_init__(self) -> None:
        if self.columns < 1:
            raise ConfigError(f"atlas columns must be positive, got {self.columns}")


@dataclass
class AnalyzeConfig:
    """Which model and data to trace, how, and where the run directory goes."""

    model: str | None = field(default=None, metadata={"help": "hub id or local path; default: the shipped demo model"})
    data: str | None = field(default=None, metadata={"help": "folder of images, JSONL manifest or dataset; default: synthetic world sample"})
    split: str = field(default="train", metadata={"help": "dataset split (datasets input only)"})
    columns: dict[str, str] = field(default_factory=dict, metadata={"help": "sample field -> dataset column, e.g. image=img,prompt=question"})
    prompt: str = field(default=DEFAULT_PROMPT, metadata={"help": "prompt for images without their own"})
    max_new_tokens: int = field(default=256, metadata={"help": "greedy tokens per sample"})
    lens: str = field(default="normed", metadata={"help": "normed (final norm at every layer) or reference (the paper's raw readout)"})
    out: Path = field(default=Path("runs/analyze"), metadata={"help": "run directory (re-running resumes)"})
    batch_size: int = field(default=4, metadata={"help": "samples per generation batch"})
    limit: int | None = field(default=None, metadata={"help": "analyse at most this many samples"})
    topk: int = field(default=5, metadata={"help": "top-k tokens kept per token and layer"})
    direct_effect: bool = field(default=True, metadata={
        "help": "record each layer's direct effect (what the mutation layers are found from); doubles the lens rows per "
                "step: free on a GPU, costly on a CPU with a large vocabulary; off: no mutation layers (flag no_direct_effect)"})
    keep_features: bool = field(default=True, metadata={"help": "keep every layer's hidden state (float16) for the feature figures"})
    figures: bool = field(default=True, metadata={"help": "draw the PNG figures (t-SNE is the slow part)"})
    patch_lens: bool = field(default=False, metadata={
        "help": "also read the lens at every image-token position and layer at step 0 (samples/<id>.patch.npz)"})
    js_unit: str = field(default="nats", metadata={"help": "nats (natural log) or bits"})
    restart: bool = field(default=False, metadata={
        "help": "discard the results an earlier run left in OUT when its model or settings differ, instead of refusing"})
    on_error: str = field(default="skip", metadata={"help": "skip a bad sample (reported) or fail the run"})
    wandb: bool = field(default=True, metadata={"help": "log the run to Weights & Biases (offline without an API key)"})
    world_samples: int = field(default=16, metadata={"help": "synthetic-world samples when no data is given"})
    object_vocab: list[str] | None = field(default=None, metadata={
        "help": "words that name objects (hallucination link, divergence points); default: the synthetic world's "
                "shapes for world samples, else every object in the samples' ground truth"})
    seed: int = field(default=0, metadata={"help": "world seed of the synthetic samples"})
    load: LoadOptions = field(default_factory=LoadOptions, metadata={"help": "how the model is loaded"})
    stages: StageConfig = field(default_factory=StageConfig, metadata={"help": "thresholds of the stage detector"})
    report: ReportConfig = field(default_factory=ReportConfig, metadata={"help": "what report.html embeds"})

    @property
    def js_base(self) -> float:
        """Logarithm base of the JS values: e for nats, 2 for bits."""
        return math.e if self.js_unit == "nats" else 2.0

    def __post_init__(self) -> None:
        from evotool.lens import LENSES

        if self.lens not in LENSES:
            raise ConfigError(f"unknown lens {self.lens!r}; choose one of {sorted(LENSES)}")
        if self.on_error not in ("skip", "fail"):
            raise ConfigError(f"--on-error must be skip or fail, not {self.on_error!r}")
        if self.js_unit not in ("nats", "bits"):
            raise ConfigError(f"--js-unit must be nats or bits, not {self.js_unit!r}")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.topk < 1 or self.world_samples < 1:
            raise ConfigError("max_new_tokens, batch_size, topk and world_samples must be positive")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        self.out = Path(self.out)

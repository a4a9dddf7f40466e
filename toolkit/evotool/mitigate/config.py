"""Options of ``evotool mitigate`` (:class:`MitigateConfig`) and of the analyze -> mitigate -> eval pipeline
(:class:`PipelineConfig`, ``configs/mitigate.yaml``). Method names come from the method registry; each
stage-aware method's default tuning grid is its config's ``TUNE_GRID`` (see :mod:`evotool.mitigate.methods`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evotool.errors import ConfigError
from evotool.mitigate.methods import BASELINE, default_grid, make_config, method_names
from evotool.options import LoadOptions, LoraSettings

# Training-time methods: LoRA on a truthful grounding set; the run directory then holds a merged checkpoint
# (``model/``) that decodes greedily. Value: which decoder layers get adapters.
TRAINED: dict[str, str] = {"lora_mutation": "the mutation stage (from the stage file)", "lora_all": "every decoder layer"}


def check_method(name: str) -> None:
    """ConfigError unless ``name`` is a decoding method or a trained method."""
    if name not in TRAINED and name not in method_names():
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join((*method_names(), *TRAINED))}")


def typed_grid(method: str, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """``grid`` (option -> values) with every value checked and coerced by the method's config."""
    return {key: [getattr(make_config(method, {key: v}), key) for v in values] for key, values in grid.items()}


@dataclass
class Selection:
    """How tuning picks an option set on the validation split."""

    max_recall_loss: float = field(default=0.05, metadata={"help": "keep candidates losing at most this relative recall vs greedy"})
    objective: str = field(default="chair_i", metadata={"help": "metric to minimise among kept candidates"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_recall_loss <= 1.0:
            raise ConfigError("max_recall_loss must lie in [0, 1]")


@dataclass
class Choice:
    """The objective ``evotool mitigate --data`` chooses under (:func:`evotool.mitigate.choose.choose`)."""

    objective: str = field(default="auto", metadata={"help": "metric to optimise: auto = chair_i with caption records, "
                                                             "else pope_f1, else exact_match; any flat metric key "
                                                             "(e.g. prior_breaking_chair_i); keys with 'chair' are "
                                                             "minimised, others maximised"})
    max_recall_loss: float = field(default=0.02, metadata={"help": "absolute recall loss vs greedy allowed (recall of "
                                                                   "the objective's split; CHAIR objectives only)"})
    max_latency_ratio: float = field(default=1.15, metadata={"help": "seconds per sample vs greedy allowed"})
    guards: dict[str, float] = field(default_factory=dict, metadata={
        "help": "further metrics the choice may worsen by at most this much vs greedy (absolute, in the metric's "
                "own direction), e.g. pope_f1=0.02: caption gains that cost POPE F1 are refused"})
    min_win_rate: float = field(default=0.9, metadata={
        "help": "a candidate must beat greedy's objective in at least this share of paired bootstrap resamples of "
                "the validation records (the same resampled records for both), so a noise-sized gain is not "
                "chosen; 0 switches the test off"})
    resamples: int = field(default=200, metadata={"help": "bootstrap resamples for min_win_rate"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_recall_loss <= 1.0:
            raise ConfigError("choice.max_recall_loss must lie in [0, 1]")
        if self.max_latency_ratio < 1.0:
            raise ConfigError("choice.max_latency_ratio must be >= 1 (greedy's own ratio)")
        if not 0.0 <= self.min_win_rate <= 1.0 or self.resamples < 1:
            raise ConfigError("choice.min_win_rate must lie in [0, 1] and choice.resamples be >= 1")
        for key, loss in self.guards.items():
            if isinstance(loss, bool) or not isinstance(loss, (int, float)) or loss < 0:
                raise ConfigError(f"choice.guards.{key} must be a number >= 0 (the loss allowed), got {loss!r}")
        self.guards = {key: float(loss) for key, loss in self.guards.items()}


@dataclass
class MitigateConfig:
    """Options of ``evotool mitigate``: one method (``method``), or a choice among all of them on a validation
    manifest (``data``)."""

    method: str | None = field(default=None, metadata={"help": f"decoding method ({', '.join(method_names())}; the "
                                                               f"stage-aware ones are tuned) or fine-tuned "
                                                               f"({', '.join(TRAINED)}); not with --data"})
    data: str | None = field(default=None, metadata={"help": "validation manifest (JSONL): try every method on it and "
                                                             "record the best under the objective (choice.*)"})
    methods: list[str] | None = field(default=None, metadata={"help": "with --data: methods to try (default: every "
                                                                      "decoding method that changes greedy's tokens)"})
    layer_shifts: list[int] = field(default_factory=lambda: [-1, 0, 1], metadata={
        "help": "tuning (--method) and --data: stage-derived layers are also tried moved by these shifts"})
    grids: dict[str, dict[str, list[Any]]] = field(default_factory=dict, metadata={
        "help": "with --data: method -> option grid, replacing that method's TUNE_GRID (--grid method.key=v1,v2)"})
    vocab: str | None = field(default=None, metadata={"help": "with --data: caption vocabulary 'dog,cat=kitten|kitty' "
                                                              "(default: the records' objects)"})
    limit: int | None = field(default=None, metadata={"help": "with --data: use at most this many records"})
    choice: Choice = field(default_factory=Choice, metadata={"help": "with --data: the objective of the choice"})
    clock: str = field(default="auto", metadata={"help": "with --data: latency clock: wall, cpu (this process's CPU "
                                                        "time, immune to other load on a shared CPU with one torch "
                                                        "thread: `evotool --threads 1`) or auto (cpu on a CPU model, wall "
                                                        "on a GPU)"})
    model: str | None = field(default=None, metadata={"help": "hub id or local path; default: the shipped demo model"})
    load: LoadOptions = field(default_factory=LoadOptions, metadata={"help": "how the model is loaded"})
    stages: str | None = field(default=None, metadata={"help": "stages.json (or analyze run dir) of this model"})
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "fixed method options (not tuned), key=value"})
    tune: bool = field(default=True, metadata={"help": "pick the options on the world validation split"})
    grid: dict[str, list[Any]] | None = field(default=None, metadata={"help": "tuning grid key=v1,v2 (replaces the method's default grid); with --data: method.key=v1,v2"})
    n: int = field(default=100, metadata={"help": "validation records per world task and group"})
    seed: int = field(default=1, metadata={"help": "world seed of the validation split (the test split uses 0)"})
    batch_size: int = field(default=50, metadata={"help": "samples per generation batch"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens per answer"})
    out: Path = field(default=Path("runs/mitigate"), metadata={"help": "run directory (method.json, tuning.json)"})
    wandb: bool = field(default=True, metadata={"help": "log the run to Weights & Biases (offline without an API key)"})
    selection: Selection = field(default_factory=Selection, metadata={"help": "how tuning picks the options"})
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA settings of the trained methods (layers set by the method)"})
    train_samples: int = field(default=400, metadata={"help": "truthful world samples (test + prior-breaking splits) to fine-tune on"})
    train_seed: int = field(default=2, metadata={"help": "world seed of the fine-tuning samples (differs from validation and test)"})
    push_to_hub: str | None = field(default=None, metadata={"help": "trained methods: Hub repo id (user/name) for the merged checkpoint"})

    def __post_init__(self) -> None:
        if (self.method is None) == (self.data is None):
            raise ConfigError("give --method (tune one method on the world) or --data (choose among the methods on a "
                              "manifest), not both; --methods restricts the choice")
        if self.data is not None:
            for name in self.methods or ():
                if name in TRAINED or name not in method_names():
                    raise ConfigError(f"--methods: {name!r} is no decoding method; choose from {', '.join(method_names())}")
            self.grids = {name: typed_grid(name, g) for name, g in self.grids.items()}
            if self.limit is not None and self.limit < 1:
                raise ConfigError("limit must be >= 1")
            if self.clock not in ("auto", "wall", "cpu"):
                raise ConfigError(f"clock must be auto, wall or cpu, not {self.clock!r}")
            if self.push_to_hub is not None:
                raise ConfigError("--push-to-hub uploads a trained checkpoint, not a --data choice")
        else:
            check_method(self.method)
        if self.n < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("n, batch_size and max_new_tokens must be positive")
        if self.method is not None and self.method not in TRAINED:
            make_config(self.method, self.options)
            if self.push_to_hub is not None:
                raise ConfigError(f"--push-to-hub uploads a trained checkpoint: only for {', '.join(TRAINED)}")
            if self.grid is not None:
                self.grid = typed_grid(self.method, self.grid)
        self.out = Path(self.out)

    def tuning_grid(self) -> dict[str, list[Any]]:
        """The grid tuned over: ``grid``, else the method's default (empty for untuned and trained methods)."""
        if self.method in TRAINED or self.method == BASELINE:
            return {}
        return self.grid if self.grid is not None else default_grid(self.method)


@dataclass
class AnalyzeStep:
    """The pipeline's analysis of world captions (validation seed)."""

    samples: int = field(default=32, metadata={"help": "world captions traced (half in distribution, half prior-breaking)"})
    max_new_tokens: int = field(default=32, metadata={"help": "greedy tokens per caption"})
    batch_size: int = field(default=16, metadata={"help": "samples per generation batch"})


@dataclass
class TuneStep(Selection):
    """Tuning of the stage-aware methods on the validation split (the selection rule plus the budget)."""

    n: int = field(default=50, metadata={"help": "validation records per world task and group"})
    batch_size: int = field(default=50, metadata={"help": "samples per generation batch"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens per answer"})
    grids: dict[str, dict[str, list[Any]]] = field(
        default_factory=dict, metadata={"help": "method -> option grid, replacing that method's default TUNE_GRID"})
    layer_shifts: list[int] = field(default_factory=lambda: [-1, 0, 1], metadata={
        "help": "stage-derived layers are also tried moved by these shifts ([0]: as the stage file gives them)"})


@dataclass
class EvalStep:
    """The reported evaluation on the test split."""

    n: int = field(default=100, metadata={"help": "test records per world task and group"})
    batch_size: int = field(default=50, metadata={"help": "samples per generation batch"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens per answer"})
    methods: list[str] = field(default_factory=lambda: [*method_names(), *TRAINED],
                               metadata={"help": "methods evaluated side by side (decoding and trained)"})
    options: dict[str, dict[str, Any]] = field(
        default_factory=dict, metadata={"help": "fixed options of the untuned methods (published defaults when absent)"})


@dataclass
class LoraStep:
    """Targeted fine-tuning: ``lora_mutation`` (mutation-stage layers) vs ``lora_all``, equal budget."""

    samples: int = field(default=400, metadata={"help": "truthful world samples (test + prior-breaking splits)"})
    seed: int = field(default=2, metadata={"help": "world seed of the fine-tuning samples (differs from validation and test)"})
    settings: LoraSettings = field(default_factory=lambda: LoraSettings(r=8, alpha=16.0, steps=100, lr=1e-3, batch_size=8),
                                   metadata={"help": "LoRA settings (layers set by the method)"})


@dataclass
class Target:
    """The success criterion, checked on the test split for every stage-aware method."""

    chair_i_reduction: float = field(default=0.30, metadata={"help": "relative CHAIR_i cut vs greedy"})
    max_recall_loss: float = field(default=0.05, metadata={"help": "relative recall loss vs greedy"})
    max_latency_ratio: float = field(default=1.15, metadata={"help": "seconds per sample vs greedy"})


@dataclass
class PipelineConfig:
    """analyze -> mitigate (tune on validation) -> eval (test), ``configs/mitigate.yaml``."""

    model: str | None = field(default=None, metadata={"help": "hub id or local path; default: the shipped demo model"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    validation_seed: int = field(default=1, metadata={"help": "world seed of the analysis sample and the tuning split"})
    test_seed: int = field(default=0, metadata={"help": "world seed of the reported test split (never used for choices)"})
    analyze: AnalyzeStep = field(default_factory=AnalyzeStep, metadata={"help": "the analysis step"})
    tune: TuneStep = field(default_factory=TuneStep, metadata={"help": "the tuning step"})
    eval: EvalStep = field(default_factory=EvalStep, metadata={"help": "the evaluation step"})
    lora: LoraStep = field(default_factory=LoraStep, metadata={"help": "the trained methods"})
    target: Target = field(default_factory=Target, metadata={"help": "the success criterion"})

    def __post_init__(self) -> None:
        if self.validation_seed == self.test_seed:
            raise ConfigError("validation_seed and test_seed must differ: choices are never made on the test split")
        for name in self.eval.methods:
            check_method(name)
        for name, options in self.eval.options.items():
            make_config(name, options)
        self.tune.grids = {name: typed_grid(name, grid) for name, grid in self.tune.grids.items()}

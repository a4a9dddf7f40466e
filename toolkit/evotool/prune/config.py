"""Options of one ``evotool prune`` run (CLI flags and ``configs/prune.yaml`` map onto these fields)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from evotool.errors import ConfigError
from evotool.options import LoadOptions, LoraSettings
from evotool.prune.select import REDUNDANCY, SELECTORS


@dataclass
class PruneConfig:
    """What to prune, by which rule, how much, and what to do afterwards."""

    model: str | None = field(default=None, metadata={"help": "hub id or local path; default: the shipped demo model"})
    stages: Path | None = field(default=None, metadata={"help": "stages.json of this model; default: run the analysis into OUT/analysis"})
    out: Path = field(default=Path("runs/prune"), metadata={"help": "output checkpoint folder (+ prune.json, README.md)"})
    keep_critical: bool = field(default=True, metadata={"help": "never remove the critical layer (every selector)"})
    keep_mutation: bool = field(default=True, metadata={"help": "stage selector: never remove mutation-stage layers"})
    drop: int | None = field(default=None, metadata={"help": "budget: number of layers to remove"})
    ratio: float | None = field(default=None, metadata={"help": "budget: fraction of decoder layers to remove"})
    speedup: float | None = field(default=None, metadata={"help": "budget: ideal speedup L/(L-k) to reach"})
    layers: list[int] | None = field(default=None, metadata={"help": "remove exactly these layers (1..L); overrides the selector"})
    selector: str = field(default="stage", metadata={"help": f"which layers to remove: {', '.join(SELECTORS)}"})
    redundancy: str = field(default="influence", metadata={"help": f"stage selector ranking: {', '.join(REDUNDANCY)}"})
    calibration_samples: int = field(default=32, metadata={"help": "world training samples for block influence / angular distance"})
    analysis_samples: int = field(default=16, metadata={"help": "world samples of the on-the-fly analysis"})
    analysis_max_new_tokens: int = field(default=32, metadata={"help": "greedy tokens per sample of the on-the-fly analysis"})
    heal: bool = field(default=False, metadata={"help": "LoRA-heal the pruned model; OUT then holds the merged model, OUT/adapter the adapter"})
    heal_samples: int = field(default=400, metadata={"help": "world training samples for healing"})
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA settings of the healing; layers_to_transform numbers the pruned model's layers 1..L-k"})
    eval_n: int = field(default=0, metadata={"help": "world eval records per task and group (0: no evaluation)"})
    agreement_samples: int = field(default=32, metadata={"help": "held-out captions for greedy token agreement with the full model"})
    max_new_tokens: int = field(default=32, metadata={"help": "greedy tokens per sample in the evaluation"})
    speed: bool = field(default=False, metadata={"help": "measure prefill / decode speed of full vs pruned"})
    compare: bool = field(default=False, metadata={"help": "compare every selector at this budget with the best removal "
                                                           "found by search, on --data (writes oracle.json / oracle.md)"})
    data: str | None = field(default=None, metadata={"help": "--compare: manifest (JSONL) the variants are scored on "
                                                            "(token agreement with the full model, manifest metrics)"})
    search_data: str | None = field(default=None, metadata={"help": "--compare: manifest the oracle subset is searched on "
                                                                   "(default: --data; a validation manifest keeps --data held out)"})
    vocab: str | None = field(default=None, metadata={"help": "--compare: caption vocabulary 'dog,cat=kitten|kitty' "
                                                             "(default: the records' objects)"})
    limit: int | None = field(default=None, metadata={"help": "--compare: use at most this many records of each manifest"})
    batch_size: int = field(default=16, metadata={"help": "--compare: samples per generation batch"})
    oracle_exhaustive_limit: int = field(default=500, metadata={"help": "--compare: exhaustive search when C(L, k) <= this, "
                                                                        "else beam search"})
    oracle_beam: int = field(default=4, metadata={"help": "--compare: beam width of the search beyond the exhaustive limit"})
    oracle_rerank: int = field(default=4, metadata={"help": "--compare: best teacher-forced subsets re-scored free-running"})
    seed: int = field(default=0, metadata={"help": "random selector and data seed"})
    wandb: bool = field(default=True, metadata={"help": "log the run to Weights & Biases (offline without an API key)"})
    push_to_hub: str | None = field(default=None, metadata={"help": "Hub repo id (user/name) to upload the checkpoint to; needs a token"})
    load: LoadOptions = field(default_factory=LoadOptions, metadata={"help": "how the model is loaded"})

    def __post_init__(self) -> None:
        if self.selector not in SELECTORS:
            raise ConfigError(f"unknown selector {self.selector!r}; choose one of {sorted(SELECTORS)}")
        if self.redundancy not in REDUNDANCY:
            raise ConfigError(f"unknown redundancy {self.redundancy!r}; choose one of {REDUNDANCY}")
        if self.layers is not None and any(x is not None for x in (self.drop, self.ratio, self.speedup)):
            raise ConfigError("--layers names the layers itself: do not combine it with --drop, --ratio or --speedup")
        if self.layers is None and sum(x is not None for x in (self.drop, self.ratio, self.speedup)) != 1:
            raise ConfigError("give exactly one budget: --drop N, --ratio R or --speedup S (or --layers)")
        for name in ("calibration_samples", "analysis_samples", "analysis_max_new_tokens", "heal_samples", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if min(self.batch_size, self.oracle_exhaustive_limit, self.oracle_beam, self.oracle_rerank) < 1 or (
                self.limit is not None and self.limit < 1):
            raise ConfigError("batch_size, limit and the oracle_* settings must be >= 1")
        if self.eval_n < 0 or self.agreement_samples < 0:
            raise ConfigError("eval_n and agreement_samples must be >= 0")
        self.out = Path(self.out)
        self.stages = Path(self.stages) if self.stages is not None else None

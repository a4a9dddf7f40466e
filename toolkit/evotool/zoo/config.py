"""Configs of the model zoo (torch-free, so the CLI builds its options from them at startup): a member (a
complete training config plus its place in the zoo), the zoo build, its manifests and the behavioural ground
truth's measurement and boundary rules (:mod:`evotool.stages.behaviour`, definitions in docs/stages.md)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

from evotool.config import load_config, to_dict
from evotool.errors import ConfigError
from evotool.world.config import TrainConfig

STEPS = ("train", "manifests", "analyze", "truth")
HASH_EXCLUDED = ("threads", "card_notes")  # TrainConfig keys that do not change what is learned
Split = Literal["tune", "holdout", "holdout2", "holdout3", "holdout4", "holdout5", "holdout6", "holdout7", "holdout8",
                "holdout9", "holdout10", "holdout11", "holdout12", "holdout13", "holdout14", "holdout15",
                "holdout16", "holdout17", "holdout18", "holdout19", "holdout20", "holdout21",
                "holdout22", "holdout23", "holdout24", "holdout25", "holdout26", "holdout27",
                "holdout28", "holdout29", "holdout30", "holdout31", "holdout32", "holdout33",
                "holdout34", "holdout35", "holdout36", "holdout37",
                "holdout38", "holdout39"]
SPLITS: tuple[str, ...] = get_args(Split)  # in the order they were made (the report's order)


@dataclass(frozen=True)
class ZooMember(TrainConfig):
    """One zoo member: a complete training config plus its place in the zoo."""

    split: Split = field(kw_only=True, metadata={
        "help": "tune: detector defaults may be chosen on it; holdout: only reported on; holdoutN (N >= 2): written "
                "after the detector of its time was frozen (docs/stages.md lists which), only reported on (fixed once, "
                "never changed)"})
    description: str = field(default="", kw_only=True, metadata={"help": "one line: what this member varies"})
    pretrained: str | None = field(default=None, kw_only=True, metadata={
        "help": "use this checkpoint instead of training ('shipped': the packaged demo model)"})

    def train_config(self) -> TrainConfig:
        """The training part of the member (what the checkpoint is learned from)."""
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in vars(self).items() if k in names})

    def config_hash(self) -> str:
        """Hash of everything that determines the checkpoint (threads and card notes excluded)."""
        data = {k: v for k, v in to_dict(self.train_config()).items() if k not in HASH_EXCLUDED}
        data["pretrained"] = self.pretrained
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def cost(self) -> float:
        """Relative training cost (decoder layer-steps) for scheduling longest first."""
        return 0.0 if self.pretrained else float(self.model.layers * self.steps()[1])


@dataclass(frozen=True)
class ManifestConfig:
    """The per-member evaluation manifests (issue 11 tunes on ``val`` and reports on ``test``)."""

    val_seed: int = field(default=101, metadata={"help": "world seed of the validation manifest"})
    test_seed: int = field(default=202, metadata={"help": "world seed of the test manifest"})
    captions: int = field(default=60, metadata={"help": "caption records per group (in distribution, prior-breaking)"})
    pope: int = field(default=40, metadata={"help": "questions per POPE kind and group"})
    analysis_seeds: tuple[int, int] = field(default=(11, 12), metadata={
        "help": "world seeds of the two disjoint analysis sample sets (a, b)"})
    analysis_samples: int = field(default=32, metadata={"help": "captions per analysis set (half prior-breaking)"})
    behaviour_seed: int = field(default=303, metadata={"help": "world seed of the behavioural ground truth's captions"})

    def __post_init__(self) -> None:
        seeds = [self.val_seed, self.test_seed, *self.analysis_seeds, self.behaviour_seed]
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"manifest seeds must all differ, got {seeds}")
        if self.captions < 1 or self.pope < 1 or self.analysis_samples < 2:
            raise ConfigError("manifest.captions and manifest.pope must be >= 1, analysis_samples >= 2")


# BoundaryRules fields added since files were first written, at the value those files were derived under
RULES_BEFORE_FIELD: dict[str, Any] = {"mutation_chair_cut": None}


@dataclass(frozen=True)
class BoundaryRules:
    """How the behavioural boundaries are read from the curves (definitions and reasons in docs/stages.md)."""

    recall_tolerance: float = field(default=0.05, metadata={"help": "critical: exit recall within this of the best exit"})
    chair_tolerance: float = field(default=0.05, metadata={"help": "critical: exit in-distribution CHAIR_i within this "
                                                                     "of the full model's"})
    mutation_min_change: float = field(default=0.1, metadata={"help": "mutation: bypass must change at least this "
                                                                        "share of tokens"})
    mutation_ratio: float = field(default=3.0, metadata={"help": "mutation: its change must be this many times the "
                                                                   "median post-critical change"})
    mutation_chair_cut: float | None = field(default=0.03, metadata={
        "help": "mutation, hallucination reading: a post-critical layer also counts when bypassing it lowers CHAIR_i by "
                "at least this (absolute) at a recall loss of at most removable_recall (adopted on holdout23; null: the "
                "rewrite rule alone, the truth holdout1-23 were read against)"})
    mutation_chair_share: float = field(default=0.25, metadata={
        "help": "mutation, hallucination reading: and by at least this share of the full model's CHAIR_i"})
    removable_recall: float = field(default=0.02, metadata={"help": "removable: recall loss at most this"})
    removable_agreement: float = field(default=0.9, metadata={"help": "removable: free-running agreement at least this"})

    def __post_init__(self) -> None:
        if self.mutation_chair_cut is not None and not 0 < self.mutation_chair_cut < 1:
            raise ConfigError(f"behaviour.rules.mutation_chair_cut={self.mutation_chair_cut} must be in (0, 1) or null")
        if not 0 <= self.mutation_chair_share < 1:
            raise ConfigError(f"behaviour.rules.mutation_chair_share={self.mutation_chair_share} must be in [0, 1)")


@dataclass(frozen=True)
class BehaviourConfig:
    """What the ground truth is measured on, and the rules that read boundaries from it."""

    captions: int = field(default=144, metadata={"help": "held-out captions (first half in distribution, rest "
                                                         "prior-breaking; 144 since holdout10, 48 before)"})
    pope: int = field(default=24, metadata={"help": "POPE questions (half pope_random, half pope_adversarial, prior-breaking)"})
    max_new_tokens: int = field(default=24, metadata={"help": "greedy tokens per caption"})
    oracle_fraction: float = field(default=0.25, metadata={"help": "oracle removal for k = 1..ceil(L * fraction)"})
    exhaustive_limit: int = field(default=500, metadata={"help": "exhaustive search when C(L, k) <= this"})
    beam: int = field(default=4, metadata={"help": "beam width of the search beyond the exhaustive limit"})
    rerank: int = field(default=4, metadata={"help": "best teacher-forced candidates re-scored free-running"})
    batch_size: int = field(default=48, metadata={"help": "sequences per forward pass"})
    rules: BoundaryRules = field(default_factory=BoundaryRules, metadata={"help": "boundary definitions"})

    def __post_init__(self) -> None:
        if self.captions < 2 or self.pope < 0 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("behaviour: captions >= 2, pope >= 0, max_new_tokens and batch_size >= 1")
        if not 0 < self.oracle_fraction < 1 or self.beam < 1 or self.rerank < 1 or self.exhaustive_limit < 1:
            raise ConfigError("behaviour: oracle_fraction in (0, 1); beam, rerank, exhaustive_limit >= 1")

    def measurement(self) -> dict[str, Any]:
        """The settings the curves depend on (the rules are re-applied to stored curves)."""
        return {k: v for k, v in asdict(self).items() if k != "rules"}


@dataclass(frozen=True)
class ZooConfig:
    """Options of ``evotool zoo build``."""

    out: Path = field(default=Path("runs/zoo"), metadata={"help": "zoo folder (one sub-folder per member)"})
    configs: Path | None = field(default=None, metadata={"help": "folder of member YAMLs (default: configs/zoo)"})
    members: list[str] = field(default_factory=list, metadata={"help": "members to build, comma-separated or repeated (default: all)"})
    steps: list[str] = field(default_factory=lambda: list(STEPS), metadata={"help": f"steps to run, of {STEPS}, comma-separated or repeated"})
    jobs: int = field(default=1, metadata={"help": "members built at once, one worker process each"})
    wandb: bool = field(default=True, metadata={"help": "track training and analyses in W&B (offline without a key)"})
    manifest: ManifestConfig = field(default_factory=ManifestConfig, metadata={"help": "evaluation manifests"})
    behaviour: BehaviourConfig = field(default_factory=BehaviourConfig, metadata={"help": "behavioural ground truth"})
    analysis_max_new_tokens: int = field(default=32, metadata={"help": "greedy tokens per analysed caption"})

    def __post_init__(self) -> None:
        unknown = [s for s in self.steps if s not in STEPS]
        if unknown:
            raise ConfigError(f"unknown zoo step {unknown[0]!r} (steps: {', '.join(STEPS)})")
        if self.jobs < 1 or self.analysis_max_new_tokens < 1:
            raise ConfigError("jobs and analysis_max_new_tokens must be >= 1")


def configs_dir(path: Path | None = None) -> Path:
    """The folder of member YAMLs: ``path`` or the packaged ``configs/zoo``."""
    return Path(path) if path is not None else Path(str(resources.files("evotool.configs").joinpath("zoo")))


def check_splits(option: str, names: Sequence[str]) -> None:
    """Raise one :class:`ConfigError` naming ``option``'s values that are not zoo splits."""
    unknown = [s for s in names if s not in SPLITS]
    if unknown:
        raise ConfigError(f"{option} {','.join(unknown)}: not a zoo split (splits: {', '.join(SPLITS)})")


def load_members(path: Path | None = None, names: list[str] | None = None,
                 sealed: Sequence[str] = ()) -> dict[str, ZooMember]:
    """Every member config of the zoo (name = file stem), or only ``names`` (unknown names are an error), without the
    members of the ``sealed`` splits (a holdout not yet due to be read; unknown split names are an error)."""
    check_splits("--sealed", sealed)
    folder = configs_dir(path)
    files = sorted(folder.glob("*.yaml"))
    if not files:
        raise ConfigError(f"no zoo member configs (*.yaml) in {folder}")
    members = {f.stem: load_config(ZooMember, f) for f in files}
    if names:
        missing = [n for n in names if n not in members]
        if missing:
            raise ConfigError(f"unknown zoo member {missing[0]!r} (members: {', '.join(members)})")
        members = {n: members[n] for n in names}
    return {n: m for n, m in members.items() if m.split not in sealed}

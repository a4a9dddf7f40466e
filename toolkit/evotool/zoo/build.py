"""The model zoo: small world VLMs that differ as real models do, trained with cached checkpoints.

Each member is one YAML file in ``configs/zoo/`` (a complete :class:`~evotool.world.train.TrainConfig`
plus ``split`` (tune | holdout, fixed before any detector output was seen), ``description`` and, for
the shipped model, ``pretrained``). ``build_zoo`` runs, per member and into ``OUT/<member>/``:

* ``train``: ``model/`` (checkpoint, model card, ``metrics.json``, ``zoo.json`` with the config hash);
  skipped when ``model/zoo.json`` holds the member's current config hash;
* ``manifests``: ``val/`` and ``test/`` (``manifest.jsonl`` + images: captions in distribution and
  prior-breaking, POPE questions of the three kinds in both groups; validation and test world seeds)
  and ``samples_a/`` / ``samples_b/`` (the two disjoint caption sets of the analyses);
* ``analyze``: ``analysis_a/`` and ``analysis_b/`` (``evotool analyze`` on the two sample sets);
* ``truth``: ``behaviour.json`` (:mod:`evotool.stages.behaviour`, from the model's outputs only).

With ``jobs > 1`` members run in that many worker processes (longest first), each member's output in
``OUT/<member>/build.log`` and one line per event in ``OUT/build.log``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from evotool.config import load_config, to_dict
from evotool.errors import ConfigError
from evotool.evals.world import POPE_TASKS
from evotool.io import atomic_dir, read_json, write_json
from evotool.stages.behaviour import BehaviourConfig, write_behaviour
from evotool.world.generator import WorldConfig, make_records, write_manifest
from evotool.world.train import TrainConfig, train

STEPS = ("train", "manifests", "analyze", "truth")
ZOO_FILE = "zoo.json"  # inside the checkpoint folder: member, split, config hash
HASH_EXCLUDED = ("threads", "card_notes")  # TrainConfig keys that do not change what is learned


@dataclass(frozen=True)
class ZooMember(TrainConfig):
    """One zoo member: a complete training config plus its place in the zoo."""

    split: Literal["tune", "holdout"] = field(kw_only=True, metadata={
        "help": "tune: detector defaults may be chosen on it; holdout: only reported on (fixed once, never changed)"})
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
        return 0.0 if self.pretrained else float(self.model.layers * self.train_config().steps()[1])


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


@dataclass(frozen=True)
class ZooConfig:
    """Options of ``evotool zoo build``."""

    out: Path = field(default=Path("runs/zoo"), metadata={"help": "zoo folder (one sub-folder per member)"})
    configs: Path | None = field(default=None, metadata={"help": "folder of member YAMLs (default: configs/zoo)"})
    members: list[str] = field(default_factory=list, metadata={"help": "members to build (default: all)"})
    steps: list[str] = field(default_factory=lambda: list(STEPS), metadata={"help": f"steps to run, of {STEPS}"})
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


def load_members(path: Path | None = None, names: list[str] | None = None) -> dict[str, ZooMember]:
    """Every member config of the zoo (name = file stem), or only ``names`` (unknown names are an error)."""
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
    return members


def checkpoint_current(member: ZooMember, model_dir: Path) -> bool:
    """Whether ``model_dir`` holds this member's checkpoint trained from its current config."""
    info = model_dir / ZOO_FILE
    return info.is_file() and read_json(info).get("config_hash") == member.config_hash()


def build_checkpoint(name: str, member: ZooMember, model_dir: Path, wandb: bool) -> bool:
    """Train (or copy the pretrained checkpoint of) ``member`` into ``model_dir``; False when it was cached."""
    if checkpoint_current(member, model_dir):
        return False
    info = {"member": name, "split": member.split, "description": member.description,
            "config_hash": member.config_hash(), "config": to_dict(member)}
    if member.pretrained is None:
        train(member, model_dir, wandb=wandb, title=f"evotool zoo member {name}", extra_files={ZOO_FILE: info})
        return True
    source = _pretrained_path(member.pretrained)
    with atomic_dir(model_dir) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        write_json(tmp / ZOO_FILE, info)
    return True


def _pretrained_path(name: str) -> Path:
    if name == "shipped":
        from evotool.world import default_model_path

        return default_model_path()
    path = Path(name)
    if not path.is_dir():
        raise ConfigError(f"pretrained checkpoint not found: {path}")
    return path


def write_manifests(member: ZooMember, member_dir: Path, cfg: ManifestConfig) -> None:
    """``val/``, ``test/`` (captions + POPE, both groups) and ``samples_a/`` / ``samples_b/`` (captions only)."""
    half = cfg.analysis_samples // 2
    sets = {
        "val": (cfg.val_seed, cfg.captions, cfg.captions, cfg.pope),
        "test": (cfg.test_seed, cfg.captions, cfg.captions, cfg.pope),
        "samples_a": (cfg.analysis_seeds[0], cfg.analysis_samples - half, half, 0),
        "samples_b": (cfg.analysis_seeds[1], cfg.analysis_samples - half, half, 0),
    }
    for sub, (seed, in_dist, breaking, pope) in sets.items():
        if not (member_dir / sub / "manifest.jsonl").is_file():
            world = dataclasses.replace(member.world, seed=seed)
            with atomic_dir(member_dir / sub) as tmp:
                write_manifest(world_records(world, in_dist, breaking, pope), tmp, world)


def world_records(world: WorldConfig, in_distribution: int, prior_breaking: int, pope: int) -> list[dict]:
    """Held-out records: captions of both groups, then ``pope`` questions per POPE kind and group."""
    records = make_records("caption", "test", in_distribution, world)
    records += make_records("caption", "prior_breaking", prior_breaking, world)
    for split in ("test", "prior_breaking") if pope else ():
        records += [r for task in POPE_TASKS for r in make_records(task, split, pope, world)]
    return records


def analyze_member(member_dir: Path, cfg: ZooConfig) -> None:
    """``analysis_a`` / ``analysis_b``: the analysis on the two sample sets (resumes; done runs are kept)."""
    from evotool.analysis.run import STAGES_FILE, AnalyzeConfig, run_analysis

    for tag in ("a", "b"):
        out = member_dir / f"analysis_{tag}"
        if (out / STAGES_FILE).is_file():
            continue
        run_analysis(AnalyzeConfig(model=str(member_dir / "model"), data=str(member_dir / f"samples_{tag}" / "manifest.jsonl"),
                                   max_new_tokens=cfg.analysis_max_new_tokens, out=out, figures=False, wandb=cfg.wandb))


def build_member(name: str, member: ZooMember, cfg: ZooConfig) -> dict[str, float]:
    """Run ``cfg.steps`` for one member in this process; returns seconds per step run."""
    member_dir = cfg.out / name
    seconds: dict[str, float] = {}
    for step in STEPS:
        if step not in cfg.steps:
            continue
        start = time.time()
        if step == "train":
            if not build_checkpoint(name, member, member_dir / "model", cfg.wandb):
                continue
        elif step == "manifests":
            write_manifests(member, member_dir, cfg.manifest)
        elif step == "analyze":
            analyze_member(member_dir, cfg)
        else:
            write_behaviour(member_dir / "model", member_dir / "behaviour.json",
                            dataclasses.replace(member.world, seed=cfg.manifest.behaviour_seed), cfg.behaviour)
        seconds[step] = time.time() - start
    return seconds


def log_line(out: Path, text: str) -> None:
    """Append one time-stamped line to ``out/build.log`` (and echo it)."""
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}"
    print(line, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "build.log").open("a") as fh:
        fh.write(line + "\n")


def build_zoo(cfg: ZooConfig, overrides: list[str] | None = None) -> dict[str, int]:
    """Build the selected members (see module docstring); returns each member's exit status (0 = done).

    ``overrides`` are ``--set`` strings passed to every worker process.
    """
    members = load_members(cfg.configs, cfg.members or None)
    order = sorted(members, key=lambda n: -members[n].cost())
    log_line(cfg.out, f"zoo build: {len(order)} members, steps {','.join(cfg.steps)}, {cfg.jobs} job(s)")
    status: dict[str, int] = {}
    if cfg.jobs == 1:
        for name in order:
            start = time.time()
            seconds = build_member(name, members[name], cfg)
            status[name] = 0
            log_line(cfg.out, f"{name}: done in {time.time() - start:.0f}s "
                              + " ".join(f"{k} {v:.0f}s" for k, v in seconds.items()))
        return status
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    queue = list(order)
    try:
        while queue or running:
            while queue and len(running) < cfg.jobs:
                name = queue.pop(0)
                running[name] = (_spawn(name, cfg, overrides or []), time.time())
                log_line(cfg.out, f"{name}: started (pid {running[name][0].pid})")
            time.sleep(2)
            for name, (proc, started) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                status[name] = proc.returncode
                verdict = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {name}/build.log)"
                log_line(cfg.out, f"{name}: {verdict} in {time.time() - started:.0f}s")
    finally:
        for proc, _ in running.values():
            proc.terminate()
            proc.wait()
    return status


def _spawn(name: str, cfg: ZooConfig, overrides: list[str]) -> subprocess.Popen:
    """A worker process building one member, its output appended to ``OUT/<name>/build.log``."""
    args = [sys.executable, "-m", "evotool", "zoo", "build", "--members", name, "--out", str(cfg.out), "--jobs", "1",
            "--steps", ",".join(cfg.steps)]
    if cfg.configs is not None:
        args += ["--configs", str(cfg.configs)]
    if not cfg.wandb:
        args.append("--no-wandb")
    for item in overrides:
        args += ["--set", item]
    (cfg.out / name).mkdir(parents=True, exist_ok=True)
    log = (cfg.out / name / "build.log").open("a")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

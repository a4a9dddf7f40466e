"""The model zoo: small world VLMs that differ as real models do, trained with cached checkpoints.

Each member is one YAML file in ``configs/zoo/`` (a :class:`~evotool.zoo.config.ZooMember`: a complete training config
plus ``split`` (one of :data:`~evotool.zoo.config.SPLITS`, fixed before any detector output was seen on it),
``description`` and, for the shipped model, ``pretrained``). ``build_zoo`` runs, per member and into ``OUT/<member>/``:

* ``train``: ``model/`` (checkpoint, model card, ``metrics.json``, ``zoo.json`` with the config hash and the
  environment it was trained in, CPU included: training is bitwise reproducible on one kind of machine, not across
  machines); skipped when ``model/zoo.json`` holds the member's current config hash;
* ``manifests``: ``val/`` and ``test/`` (``manifest.jsonl`` + images: captions in distribution and
  prior-breaking, POPE questions of the three kinds in both groups; validation and test world seeds)
  and ``samples_a/`` / ``samples_b/`` (the two disjoint caption sets of the analyses); each folder's
  ``zoo_manifest.json`` records the settings it was written with, and a folder whose settings changed is written again;
* ``analyze``: ``analysis_a/`` and ``analysis_b/`` (``evotool analyze`` on the two sample sets);
* ``truth``: ``behaviour.json`` (:mod:`evotool.stages.behaviour`, from the model's outputs only).

With ``jobs > 1`` members run in that many worker processes (longest first), each member's output in
``OUT/<member>/build.log`` and one line per event in ``OUT/build.log``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from evotool.config import to_dict
from evotool.env import environment
from evotool.errors import ConfigError
from evotool.evals.world import POPE_TASKS
from evotool.io import atomic_dir, atomic_write_text, read_json, write_json
from evotool.stages.behaviour import BEHAVIOUR_FILE, apply_rules, read_behaviour, save_behaviour, write_behaviour
from evotool.validate import output_dir
from evotool.world.generator import WorldConfig, make_records, write_manifest
from evotool.world.train import train
from evotool.zoo.config import STEPS, BoundaryRules, ManifestConfig, ZooConfig, ZooMember, load_members

ZOO_FILE = "zoo.json"  # inside the checkpoint folder: member, split, config hash
ZOO_SCHEMA = "1.0"
MANIFEST_FILE = "zoo_manifest.json"  # beside each manifest: the settings it was written with


def checkpoint_current(member: ZooMember, model_dir: Path) -> bool:
    """Whether ``model_dir`` holds this member's checkpoint trained from its current config."""
    info = model_dir / ZOO_FILE
    return info.is_file() and read_json(info).get("config_hash") == member.config_hash()


def build_checkpoint(name: str, member: ZooMember, model_dir: Path, wandb: bool) -> bool:
    """Train (or copy the pretrained checkpoint of) ``member`` into ``model_dir``; False when it was cached."""
    if checkpoint_current(member, model_dir):
        return False
    info = {"member": name, "split": member.split, "description": member.description,
            "config_hash": member.config_hash(), "config": to_dict(member), "environment": environment()}

    def stamp(folder: Path) -> None:
        write_json(folder / ZOO_FILE, info, schema=ZOO_SCHEMA)

    if member.pretrained is None:
        train(member, model_dir, wandb=wandb, title=f"evotool zoo member {name}", finish=stamp)
        return True
    source = _pretrained_path(member.pretrained)
    with atomic_dir(model_dir) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        stamp(tmp)
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
    """``val/``, ``test/`` (captions + POPE, both groups) and ``samples_a/`` / ``samples_b/`` (captions only); each
    is written again when its settings (:data:`MANIFEST_FILE`) differ from the current ones or are not recorded."""
    half = cfg.analysis_samples // 2
    sets = {
        "val": (cfg.val_seed, cfg.captions, cfg.captions, cfg.pope),
        "test": (cfg.test_seed, cfg.captions, cfg.captions, cfg.pope),
        "samples_a": (cfg.analysis_seeds[0], cfg.analysis_samples - half, half, 0),
        "samples_b": (cfg.analysis_seeds[1], cfg.analysis_samples - half, half, 0),
    }
    for sub, (seed, in_dist, breaking, pope) in sets.items():
        world = dataclasses.replace(member.world, seed=seed)
        settings = json.dumps({"world": dataclasses.asdict(world), "in_distribution": in_dist,
                               "prior_breaking": breaking, "pope": pope}, sort_keys=True)
        stamp = member_dir / sub / MANIFEST_FILE
        if (member_dir / sub / "manifest.jsonl").is_file() and stamp.is_file() and stamp.read_text() == settings:
            continue
        with atomic_dir(member_dir / sub) as tmp:
            write_manifest(world_records(world, in_dist, breaking, pope), tmp, world)
            (tmp / MANIFEST_FILE).write_text(settings)


def world_records(world: WorldConfig, in_distribution: int, prior_breaking: int, pope: int) -> list[dict]:
    """Held-out records: captions of both groups, then ``pope`` questions per POPE kind and group."""
    records = make_records("caption", "test", in_distribution, world)
    records += make_records("caption", "prior_breaking", prior_breaking, world)
    for split in ("test", "prior_breaking") if pope else ():
        records += [r for task in POPE_TASKS for r in make_records(task, split, pope, world)]
    return records


def analyze_member(member_dir: Path, cfg: ZooConfig) -> None:
    """``analysis_a`` / ``analysis_b``: the analysis on the two sample sets (resumes: traced samples are kept, and a
    finished run is only re-aggregated, so a new detector re-places the boundaries in seconds)."""
    from evotool.analysis.config import AnalyzeConfig
    from evotool.analysis.run import run_analysis

    for tag in ("a", "b"):
        out = member_dir / f"analysis_{tag}"
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
            write_behaviour(member_dir / "model", member_dir / BEHAVIOUR_FILE,
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


def build_zoo(cfg: ZooConfig) -> dict[str, int]:
    """Build the selected members (see module docstring); returns each member's exit status (0 = done).

    With ``cfg.jobs > 1`` the resolved config is written to ``OUT/zoo_build.yaml`` and every worker process reads
    it (``--config``), so a worker builds its member exactly as configured here.
    """
    output_dir(cfg.out)
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
    config = cfg.out / "zoo_build.yaml"
    atomic_write_text(config, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    queue = list(order)
    try:
        while queue or running:
            while queue and len(running) < cfg.jobs:
                name = queue.pop(0)
                running[name] = (_spawn(name, cfg.out, config), time.time())
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


def _spawn(name: str, out: Path, config: Path) -> subprocess.Popen:
    """A worker process building one member from ``config``, its output appended to ``OUT/<name>/build.log``."""
    args = [sys.executable, "-m", "evotool", "zoo", "build", "--config", str(config), "--members", name, "--jobs", "1"]
    (out / name).mkdir(parents=True, exist_ok=True)
    log = (out / name / "build.log").open("a")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)


def refresh_truth(names: list[str], out: Path, rules: BoundaryRules | None = None) -> list[str]:
    """Re-derive the boundaries of each member's stored ``behaviour.json`` under ``rules`` (default: the current
    ones) and rewrite the stale files (their caption resamples too, or where those are missing); returns the members
    rewritten. Members without the file are skipped."""
    rewritten = []
    for name in names:
        path = out / name / BEHAVIOUR_FILE
        if path.is_file():
            payload = read_behaviour(path, rules)
            if payload["stale"] or payload.get("generations") and not payload.get("resampled"):
                apply_rules(payload, rules, resample=True)
                save_behaviour(path, payload)
                rewritten.append(name)
    return rewritten

"""Fuzz table: bad input to every subcommand ends as exit 2 and one ``error:`` line, and loses nothing.

``CASES`` is also the table of docs/reliability.md (``python tests/test_reliability.py`` rewrites it;
``test_doc_matches_the_table`` fails when they drift). Every case runs in-process against a tiny saved
world-LLaVA; most fail before the model loads, which the timing of the whole file shows (a few seconds).
"""

from __future__ import annotations

import json
import re
import shlex
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import transformers
from conftest import run_cli, tiny_world_llava

from evotool.cli import TRACEBACK_ENV

from evotool.io import DirLock
from evotool.models.loading import fingerprint, load_model
from evotool.stages import write_stages

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
BEGIN, END = "<!-- fuzz table: generated from tests/test_reliability.py -->", "<!-- end of fuzz table -->"
LAYERS = 4
PROGRESS = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")  # a tqdm bar (the sample loop's, closed by the failure)
PRIOR = '{"schema_version": "1.0", "metrics": {"chair_i": 0.25}}\n'  # a result an earlier run left in --out


@dataclass(frozen=True)
class Case:
    """``evotool ARGS`` (placeholders: {ws} shared inputs, {model}, {out} an output folder holding earlier results,
    {file} a plain file) must exit 2 with one line ``error: ...`` containing ``message``."""

    name: str
    args: str
    message: str


CASES: tuple[Case, ...] = (
    # analyze
    Case("out is a file", "analyze --model {model} --out {file}", "is a file, not a directory"),
    Case("out below a file", "analyze --model {model} --out {file}/run", "is a file, not a directory"),
    Case("negative limit", "analyze --model {model} --out {out} --limit -1", "limit must be >= 1"),
    Case("zero batch size", "analyze --model {model} --out {out} --batch-size 0", "must be positive"),
    Case("device without CUDA", "analyze --model {model} --out {out} --device cuda", "CUDA is not available"),
    Case("unknown device", "analyze --model {model} --out {out} --device gpu7", "is not a device"),
    Case("truncated weights", "analyze --model {ws}/truncated --out {out}", "truncated"),
    Case("missing weights", "analyze --model {ws}/no_weights --out {out}", "cannot load the weights"),
    Case("config and weights disagree", "analyze --model {ws}/half_pruned --out {out}", "disagree on the decoder layers"),
    Case("missing model dir", "analyze --model {ws}/nothing --out {out}", "model path not found"),
    Case("duplicate manifest ids", "analyze --model {model} --out {out} --data {ws}/duplicate.jsonl", "occurs more than once"),
    Case("manifest line is an array", "analyze --model {model} --out {out} --data {ws}/array.jsonl", "one JSON object per line"),
    Case("manifest not JSON", "analyze --model {model} --out {out} --data {ws}/garbage.jsonl", "not valid JSON"),
    Case("decompression bomb", "analyze --model {model} --out {out} --data {ws}/bomb.jsonl --on-error fail", "decompression bomb"),
    Case("corrupt run.json", "analyze --model {model} --out {ws}/corrupt_run", "not valid JSON"),
    Case("run dir of another model", "analyze --model {model} --out {ws}/other_run", "fingerprint"),
    Case("out locked by another run", "analyze --model {model} --out {ws}/locked", "in use by another evotool process"),
    Case("bad YAML config", "analyze --model {model} --out {out} --config {ws}/bad.yaml", "not valid YAML"),
    Case("unknown --set key", "analyze --model {model} --out {out} --set nope=1", "unknown key 'nope'"),
    Case("zero GPUs per process", "analyze --model {model} --out {out} --gpus-per-process 0",
         "--gpus-per-process must be >= 1"),
    Case("GPU groups without CUDA", "analyze --model {model} --out {out} --gpus-per-process 2",
         "--gpus-per-process 2: CUDA is not available"),
    Case("GPU groups with another device map", "analyze --model {model} --out {out} --gpus-per-process 2 --device-map sequential",
         "drop --device-map sequential"),
    # prune
    Case("prune out is the model", "prune --model {model} --out {model} --drop 1", "overlaps the source model"),
    Case("prune out inside the model", "prune --model {model} --out {model}/pruned --drop 1", "overlaps the source model"),
    Case("prune out is a file", "prune --model {model} --out {file} --drop 1", "is a file, not a directory"),
    Case("stages.json holds null", "prune --model {model} --out {out} --drop 1 --stages {ws}/null_stages.json",
         "expected a JSON object"),
    Case("stages.json wrong types", "prune --model {model} --out {out} --drop 1 --stages {ws}/typed_stages.json",
         "num_layers must be a positive integer"),
    Case("prune bad YAML", "prune --model {model} --out {out} --config {ws}/bad.yaml", "not valid YAML"),
    Case("prune two budgets", "prune --model {model} --out {out} --drop 1 --ratio 0.5", "exactly one budget"),
    Case("prune inconsistent checkpoint", "prune --model {ws}/half_pruned --out {out} --drop 1 --stages {ws}/stages.json",
         "disagree on the decoder layers"),
    Case("prune layer outside the model", "prune --model {model} --out {out} --layers 2,9", "layers [9] outside 1..4"),
    # mitigate
    Case("mitigate unknown method", "mitigate --method nope --model {model} --out {out}", "unknown method 'nope'"),
    Case("mitigate out is a file", "mitigate --method greedy --model {model} --out {file}", "is a file, not a directory"),
    Case("mitigate stages null", "mitigate --method stage_contrast --model {model} --out {out} --stages {ws}/null_stages.json",
         "expected a JSON object"),
    Case("mitigate zero samples", "mitigate --method greedy --model {model} --out {out} --n 0", "must be positive"),
    Case("mitigate readout without a stable stage",
         "mitigate --method stable_readout --model {model} --out {out} --no-tune --stages {ws}/last_critical.json",
         "no layer follows it"),
    Case("mitigate readout of the output layer",
         "mitigate --method stable_readout --model {model} --out {out} --no-tune --stages {ws}/no_mutation.json",
         "would read out the output itself"),
    Case("mitigate GPU groups without CUDA", "mitigate --method greedy --model {model} --out {out} --gpus-per-process 2",
         "--gpus-per-process 2: CUDA is not available"),
    # eval
    Case("eval bad out fails first", "eval world --model {model} --out {file}", "is a file, not a directory"),
    Case("eval batch size 0", "eval pope --data {ws}/pope.json --model {model} --out {out} --batch-size 0", "--batch-size must be >= 1"),
    Case("eval max-new-tokens 0", "eval pope --data {ws}/pope.json --model {model} --out {out} --max-new-tokens 0",
         "--max-new-tokens must be >= 1"),
    Case("eval negative limit", "eval manifest --data {ws}/manifest.jsonl --model {model} --out {out} --limit -2", "--limit must be >= 1"),
    Case("POPE file is a JSON array", "eval pope --data {ws}/array_pope.json --model {model} --out {out}", "one JSON object per line"),
    Case("POPE file missing", "eval pope --data {ws}/missing.json --model {model} --out {out}", "not found"),
    Case("eval device without CUDA", "eval world --model {model} --out {out} --device cuda:0", "CUDA is not available"),
    Case("corrupt method.json", "eval world --model {model} --out {out} --method {ws}/corrupt_method", "not valid JSON"),
    Case("method.json lacks method", "eval world --model {model} --out {out} --method {ws}/keyless_method", "lacks method"),
    Case("world.json is a list", "eval world --model {model} --out {out} --data {ws}/list_world.json", "is a JSON object"),
    Case("world.json unknown key", "eval world --model {model} --out {out} --data {ws}/key_world.json", "not a world config"),
    Case("eval world n 0", "eval world --model {model} --out {out} --n 0", "--n must be >= 1"),
    Case("eval zero GPUs per process", "eval world --model {model} --out {out} --gpus-per-process 0",
         "--gpus-per-process must be >= 1"),
    Case("eval GPU groups without CUDA", "eval pope --data {ws}/pope.json --model {model} --out {out} --gpus-per-process 2",
         "--gpus-per-process 2: CUDA is not available"),
    # report
    Case("report of a non-run", "report {ws}/images", "stage file not found"),
    Case("report out is a dir", "report {ws}/null_run --out {out}", "is a directory"),
    Case("report stages null", "report {ws}/null_run", "expected a JSON object"),
    # atlas
    Case("atlas out is a file", "atlas {ws}/null_run --out {file}", "is a file, not a directory"),
    Case("atlas of stages null", "atlas {ws}/null_run --out {out}", "expected a JSON object"),
    Case("atlas of a missing run", "atlas {ws}/nothing --out {out}", "does not exist"),
    Case("atlas zero columns", "atlas {ws}/null_run --out {out} --columns 0", "columns must be positive"),
    # generate
    Case("generate batch size 0", "generate --model {model} --batch-size 0", "--batch-size must be >= 1"),
    Case("generate out is a file", "generate --model {model} --out {file}", "is a file, not a directory"),
    Case("generate device without CUDA", "generate --model {model} --device cuda", "CUDA is not available"),
    Case("generate duplicate ids", "generate --model {model} --data {ws}/duplicate.jsonl", "occurs more than once"),
    # train-demo
    Case("train-demo zero steps", "train-demo --out {out} --max-steps 0", "max_steps must be >= 1"),
    Case("train-demo bad YAML", "train-demo --out {out} --config {ws}/bad.yaml", "not valid YAML"),
    Case("train-demo unknown key", "train-demo --out {out} --config {ws}/unknown.yaml", "unknown key 'nope'"),
    Case("train-demo out is a file", "train-demo --out {file} --max-steps 1", "is a file, not a directory"),
    # zoo
    Case("zoo build out is a file", "zoo build --out {file}", "is a file, not a directory"),
    Case("zoo unknown member", "zoo build --out {out} --members nope", "unknown zoo member 'nope'"),
    Case("zoo status of a non-zoo", "zoo status --out {file}", "no zoo there"),
    # export-generate
    Case("export out is a file", "export-generate greedy --out {file}", "is a file, not a directory"),
    Case("export unknown method", "export-generate nope --out {out}", "unknown method 'nope'"),
    Case("export without stages", "export-generate stage_contrast --out {out}", "needs a stage file"),
    Case("export unknown option", "export-generate dola --out {out} --set beta=2", "unknown key 'beta'"),
    Case("export readout of the output layer", "export-generate stable_readout --out {out} --stages {ws}/no_mutation.json",
         "would read out the output itself"),
    Case("export smoothing without mutation", "export-generate smoothing --out {out} --stages {ws}/no_mutation.json",
         "no mutation layers"),
    # world
    Case("world out is a file", "world --out {file}", "is a file, not a directory"),
    Case("world zero records", "world --out {out} --n 0", "--n must be >= 1"),
    Case("world unknown task", "world --out {out} --task nope", "unknown task 'nope'"),
    # the command line itself (click's usage errors), one per kind
    Case("unknown option", "analyze --model {model} --out {out} --foo", "no such option: --foo"),
    Case("word where a number belongs", "prune --model {model} --out {out} --drop two",
         "invalid value for '--drop': Input should be a valid integer"),
    Case("number out of its type", "mitigate --method greedy --model {model} --out {out} --n 1.5", "invalid value for '--n'"),
    Case("missing required option", "eval pope --model {model} --out {out}", "missing option '--data' (evotool eval pope --help)"),
    Case("missing argument", "report", "missing argument 'runs' (evotool report --help)"),
    Case("option without its value", "atlas {ws}/null_run --out", "option '--out' requires an argument"),
    Case("unknown subcommand", "eval nope --out {out}", "no such command 'nope'"),
    Case("unknown command", "zoo nope", "no such command 'nope' (evotool zoo --help)"),
)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels (no pixel data): a decompression bomb to PIL's check."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def _json(path: Path, payload: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload) + "\n")


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared inputs of the cases: a model, broken copies of it, broken data and run files."""
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("fuzz")
    model_dir = root / "model"
    tiny_world_llava(LAYERS, save_to=model_dir)
    fp = fingerprint(load_model(model_dir)[0])
    for name in ("truncated", "no_weights", "half_pruned"):
        (root / name).mkdir()
        for f in model_dir.iterdir():
            (root / name / f.name).write_bytes(f.read_bytes())
    weights = (root / "truncated" / "model.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    (root / "no_weights" / "model.safetensors").unlink()
    config = json.loads((root / "half_pruned" / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = LAYERS - 1
    _json(root / "half_pruned" / "config.json", config)
    stages = {"model": "tiny", "fingerprint": fp, "num_layers": LAYERS, "critical_layer": 2, "mutation_layers": [4],
              "stages": {"rapid_evolution": [0, 2], "stabilization": [3, 3], "mutation": [4, 4]}}
    write_stages(root / "stages.json", stages)
    write_stages(root / "last_critical.json", {**stages, "critical_layer": LAYERS, "mutation_layers": [],
                                               "stages": {"rapid_evolution": [0, LAYERS], "stabilization": None, "mutation": None}})
    write_stages(root / "no_mutation.json", {**stages, "mutation_layers": [], "stages": {
        "rapid_evolution": [0, 2], "stabilization": [3, LAYERS], "mutation": None}})
    _json(root / "null_stages.json", None)
    _json(root / "typed_stages.json", {**stages, "schema_version": "1.1", "num_layers": "four"})
    (root / "null_run").mkdir()
    _json(root / "null_run" / "stages.json", None)
    (root / "images").mkdir()
    from evotool.world import make_records

    rec = make_records("caption", "test", 1)[0]
    rec["image"].save(root / "images" / "a.png")
    lines = {"duplicate": [{"id": "x", "image": "images/a.png"}, {"id": "x", "image": "images/a.png"}],
             "manifest": [{"id": "x", "image": "images/a.png", "objects": ["circle"]}],
             "bomb": [{"id": "bomb", "image": "images/bomb.png"}]}
    for name, records in lines.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "images" / "bomb.png").write_bytes(_png_header(30000, 30000))
    (root / "array.jsonl").write_text(json.dumps([{"id": "x", "image": "images/a.png"}]) + "\n")
    (root / "garbage.jsonl").write_text("{not json\n")
    (root / "array_pope.json").write_text(json.dumps([{"question_id": 1, "image": "a.png", "text": "?", "label": "yes"}]))
    (root / "pope.json").write_text(json.dumps({"question_id": 1, "image": "a.png", "text": "Is there a circle?",
                                                "label": "yes"}) + "\n")
    (root / "bad.yaml").write_text("model: [unclosed\n")
    (root / "unknown.yaml").write_text("nope: 1\n")
    (root / "corrupt_run").mkdir()
    (root / "corrupt_run" / "run.json").write_text('{"schema_version": "1.0", "model"')
    _json(root / "other_run" / "run.json", {"schema_version": "1.0", "model": str(model_dir), "fingerprint": "0" * 16,
                                             "lens": "normed", "max_new_tokens": 256, "js_unit": "nats"})
    (root / "corrupt_method").mkdir()
    (root / "corrupt_method" / "method.json").write_text("{")
    _json(root / "keyless_method" / "method.json", {"schema_version": "1.0", "options": {}})
    _json(root / "list_world.json", [1, 2])
    _json(root / "key_world.json", {"nope": 1})
    return root


def expand(args: str, ws: Path, out: Path, file: Path) -> list[str]:
    return shlex.split(args.format(ws=ws, model=ws / "model", out=out, file=file))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but lock files (which a run may create before it fails) by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)  # default output folders land here
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out, file = tmp_path / "out", tmp_path / "file.json"
    _json(out / "results.json", json.loads(PRIOR))
    file.write_text(PRIOR)
    before = {"out": snapshot(out), "file": file.read_bytes(), "ws": snapshot(ws)}
    with DirLock(ws / "locked"):
        code, _, err = run_cli(monkeypatch, capsys, *expand(case.args, ws, out, file))
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert case.message in lines[0] and TRACEBACK_ENV not in lines[0], lines[0]  # a check caught it, not main()
    after = {"out": snapshot(out), "file": file.read_bytes(), "ws": snapshot(ws)}
    for place in ("out", "ws"):  # every earlier file is still there, byte for byte (a failed run may add a log)
        assert {k: after[place].get(k) for k in before[place]} == before[place], place
    assert after["file"] == before["file"]


def test_help_interrupt_and_exit_codes_pass_through(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                    tmp_path: Path) -> None:
    """Turning usage errors into one line keeps the rest of the command line's behaviour: ``--help`` exits 0 with the
    help, a bare group shows its help (exit 2, no ``error:``), ``typer.Exit(n)`` and Ctrl-C (130) keep their codes."""
    import typer

    code, out, _ = run_cli(monkeypatch, capsys, "analyze", "--help")
    assert code == 0 and "Usage: evotool analyze" in out and "--gpus-per-process" in out
    code, out, err = run_cli(monkeypatch, capsys, "eval")
    assert code == 2 and "Usage: evotool eval" in out + err and "error:" not in out + err

    def stop(code: int) -> None:
        raise typer.Exit(code)

    def interrupt(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    for raiser, expected in ((lambda *_, **__: stop(3), 3), (interrupt, 130)):
        with monkeypatch.context() as m:
            m.setattr("evotool.cli.world.write_manifest", raiser)
            assert run_cli(monkeypatch, capsys, "world", "--out", str(tmp_path / "w"), "--n", "1")[0] == expected


def test_threads_option_sets_torch_threads_for_the_command(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """``evotool --threads N CMD`` runs CMD with N torch threads; N < 1 is a one-line usage error naming the option."""
    import torch

    seen: list[int] = []
    before = torch.get_num_threads()
    monkeypatch.setattr("evotool.cli.world.write_manifest", lambda *_, **__: seen.append(torch.get_num_threads()))
    try:
        for threads in (1, 2):
            code, _, err = run_cli(monkeypatch, capsys, "--threads", str(threads), "world", "--out", str(tmp_path / "w"),
                                   "--n", "1")
            assert code == 0, err
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 2]
    code, _, err = run_cli(monkeypatch, capsys, "--threads", "0", "world", "--out", str(tmp_path / "w"), "--n", "1")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "--threads" in err, err


def test_atomic_dir_swaps_keeps_and_repairs(tmp_path: Path) -> None:
    """Entries in ``keep`` survive a swap; a killed run's staging folder goes, a live sibling (W&B logs) stays;
    a swap killed between its renames is undone by the next atomic_dir."""
    from evotool.io import atomic_dir

    target = tmp_path / "out"
    (target / "analysis").mkdir(parents=True)
    (target / "analysis" / "a.json").write_text("kept")
    (target / "model.safetensors").write_text("old weights")
    (tmp_path / ".out.partial-killed").mkdir()
    with atomic_dir(target, keep=("analysis",)) as staged:
        assert not (tmp_path / ".out.partial-killed").exists() and not (staged / "analysis").exists()
        live = staged.with_name(f"{staged.name}-wandb")
        live.mkdir()
        (staged / "model.safetensors").write_text("new weights")
    assert live.is_dir() and (target / "model.safetensors").read_text() == "new weights"
    assert (target / "analysis" / "a.json").read_text() == "kept"
    assert target.stat().st_mode & 0o777 == 0o777 & ~_umask()
    target.rename(tmp_path / ".out.old")  # killed after moving the old folder away, before the new one came
    with atomic_dir(target) as staged:
        assert (target / "model.safetensors").read_text() == "new weights"  # restored before anything else
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # and leftovers beside it (the old logs too) are gone


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def render_table() -> str:
    """The Markdown table of ``CASES`` for docs/reliability.md."""
    rows = ["| # | case | command | exit | message contains |", "|---|---|---|---|---|"]
    for i, case in enumerate(CASES, 1):
        rows.append(f"| {i} | {case.name} | `evotool {case.args}` | 2 | `error: ...{case.message}...` |")
    return "\n".join([BEGIN, *rows, END])


def test_doc_matches_the_table() -> None:
    text = DOC.read_text()
    assert text[text.index(BEGIN): text.index(END) + len(END)] == render_table(), \
        "docs/reliability.md is stale: run `python tests/test_reliability.py`"
    commands = {c.args.split()[0] for c in CASES}
    from evotool.cli import SUBCOMMANDS

    assert commands == {name for _, name in SUBCOMMANDS}  # every subcommand is fuzzed


if __name__ == "__main__":  # rewrite the table in docs/reliability.md
    text = DOC.read_text()
    DOC.write_text(text[: text.index(BEGIN)] + render_table() + text[text.index(END) + len(END):])
    sys.exit(0)

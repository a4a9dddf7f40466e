"""Analyse the tiny random checkpoint of every architecture in ``conftest.ARCHS`` (the tiny rows of docs/atlas.md).

``python tests/tiny_runs.py OUT`` saves each model to ``OUT/<arch>/model`` (:func:`tiny_checkpoints.save_tiny`) and
runs ``evotool analyze --model OUT/<arch>/model --world-samples 4 --max-new-tokens 24 --no-figures --no-wandb
--set stages.min_tokens=10 --out OUT/<arch>/analysis``. The architectures in ``tiny_checkpoints.MANUAL`` have no
saved processor (transformers builds theirs only with torchvision), so they run the same analysis through the
API with ``ManualProcessor``. Existing analyses are left as they are.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ARCHS
from tiny_checkpoints import MANUAL, ManualProcessor, save_tiny

FLAGS = ("--world-samples", "4", "--max-new-tokens", "24", "--no-figures", "--no-wandb", "--set", "stages.min_tokens=10")


def analyse(model_type: str, out: Path) -> Path:
    """Save and analyse one architecture's tiny model under ``out/<model_type>``; returns the run directory."""
    model_dir, run = out / model_type / "model", out / model_type / "analysis"
    if (run / "stages.json").is_file():
        return run
    save_tiny(model_type, model_dir)
    if model_type not in MANUAL:
        evotool = Path(sys.executable).with_name("evotool")
        subprocess.run([str(evotool), "analyze", "--model", str(model_dir), *FLAGS, "--out", str(run)], check=True)
        return run
    from transformers import AutoModelForImageTextToText

    from evotool.analysis.config import AnalyzeConfig
    from evotool.analysis.run import run_analysis
    from evotool.stages.detect import StageConfig

    cfg = AnalyzeConfig(model=str(model_dir), world_samples=4, max_new_tokens=24, figures=False, wandb=False,
                        stages=StageConfig(min_tokens=10), out=run)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    return run_analysis(cfg, loaded=(model, ManualProcessor(model_type)))


if __name__ == "__main__":
    for arch in ARCHS:
        print(analyse(arch, Path(sys.argv[1])), flush=True)

"""Every benchmark script loads: its imports resolve against the current library (the scripts themselves are run
by hand; their numbers live in the docs). One interpreter for all of them, outside the test process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))
LOAD = "import runpy, sys\nfor path in sys.argv[1:]:\n    runpy.run_path(path, run_name='benchmark')\n    print('loaded', path)"


def test_every_benchmark_script_loads() -> None:
    assert len(SCRIPTS) >= 3
    proc = subprocess.run([sys.executable, "-c", LOAD, *map(str, SCRIPTS)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("loaded ") == len(SCRIPTS)

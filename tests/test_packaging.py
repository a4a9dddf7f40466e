"""Packaging: the pyproject package list matches the folders, and both an editable install and a plain wheel
install hold every file and import every module."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]

# Imports every module of the package given on the command line and prints where ``evotool`` came from.
# Modules of optional extras import only where the extra is installed (CI installs lmms-eval; `.[test]` does not).
OPTIONAL = {"lmms_eval"}
IMPORT_ALL = f"""
import importlib, sys
import evotool
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name.split(".")[0] not in {OPTIONAL!r}:
            raise
print(evotool.__file__)
"""


def source_packages() -> dict[str, Path]:
    """Every folder with an ``__init__.py`` below the package-dir roots, as its import name."""
    roots = {pkg: ROOT / folder for pkg, folder in SETUPTOOLS["package-dir"].items()}
    out = {}
    for pkg, root in roots.items():
        for init in root.rglob("__init__.py"):
            parts = init.parent.relative_to(root).parts
            name = ".".join([pkg, *parts])
            if not any(name.startswith(other + ".") or name == other for other in roots if other != pkg and other.startswith(pkg + ".")):
                out[name] = init.parent
    return out


def source_modules() -> list[str]:
    mods = []
    for pkg, folder in source_packages().items():
        mods += [pkg] + [f"{pkg}.{p.stem}" for p in folder.glob("*.py") if p.stem != "__init__" and p.stem != "__main__"]
    return sorted(mods)


def repo_files() -> list[str]:
    """Every file of the working tree that git tracks or would track (relative paths)."""
    return subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout.split()


def tracked_package_files() -> dict[str, Path]:
    """Installed path (``evotool/...``) -> source file, for every file of the package folders."""
    listed = [f for f in repo_files() if (ROOT / f).is_file()]
    out = {}
    for pkg, folder in source_packages().items():
        for rel in listed:
            path = ROOT / rel
            if path.parent == folder:
                out["/".join([*pkg.split("."), path.name])] = path
        for rel in listed:  # package data in sub-folders that are not packages (assets/, templates/, zoo/ ...)
            path = ROOT / rel
            if path.is_relative_to(folder) and path.parent != folder and not any(
                    path.is_relative_to(other) for other in source_packages().values() if other != folder and other.is_relative_to(folder)):
                out["/".join([*pkg.split("."), *path.relative_to(folder).parts])] = path
    return out


def test_package_list_matches_the_folders() -> None:
    assert sorted(SETUPTOOLS["packages"]) == sorted(source_packages())


def _run(python: Path | str, cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([str(python), "-c", IMPORT_ALL, *source_modules()], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_editable_and_wheel_installs_import_every_module(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    # the development install (pip install -e .): every module imports from outside the source tree
    assert Path(_run(sys.executable, tmp_path, env)).is_relative_to(ROOT / "toolkit")

    # a plain wheel, built without network from a copy of the sources (so no build/ folder lands in the tree)
    source = tmp_path / "source"
    for rel in repo_files():
        if (ROOT / rel).is_file():
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, source / rel)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300, env=env)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("evotool-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(p for p in tracked_package_files() if p not in names)
    assert not missing, f"files missing from the wheel: {missing[:10]}"

    # installed into a fresh venv that sees this interpreter's site-packages (torch, transformers) through a .pth
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    shared = [p for p in sys.path if p.endswith("site-packages")] + [sysconfig.get_paths()["purelib"]]
    (site / "shared_site.pth").write_text("\n".join(dict.fromkeys(shared)) + "\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                             capture_output=True, text=True, timeout=300, env=env)
    assert install.returncode == 0, install.stderr[-3000:]
    assert Path(_run(python, tmp_path, env)).is_relative_to(site)
    cli = subprocess.run([str(venv / "bin" / "evotool"), "mitigate", "--help"], capture_output=True, text=True, env=env)
    assert cli.returncode == 0 and "stage_contrast" in cli.stdout, cli.stderr[-2000:]

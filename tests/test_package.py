"""The wheel stands on its own: built from the sources, installed outside the checkout, it runs the README's
smoke sweep from a directory outside the repo with only package data (configs, GoEmotions-Ekman copy)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, clean_env

pytestmark = pytest.mark.package


def _build_wheel(tmp: Path) -> Path:
    """Build from a copy holding only what the build needs, so the checkout gets no build/ or egg-info."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "irm_hpc", src / "irm_hpc", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (wheel,) = (tmp / "dist").glob("irm_hpc-*.whl")
    return wheel


def test_wheel_installs_and_runs_the_smoke_sweep_outside_the_repo(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    package_data = [p.relative_to(REPO).as_posix() for sub in ("configs", "datasets")
                    for p in sorted((REPO / "irm_hpc" / sub).rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    assert any(n.endswith(".yaml") for n in package_data) and "irm_hpc/datasets/goemotions_ekman/train.tsv" in package_data
    missing = [n for n in package_data if n not in names]
    assert not missing, f"not in the wheel: {missing}"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "irm-hpc = irm_hpc.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    site, work = tmp_path / "site", tmp_path / "work"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site),
                          str(wheel)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    work.mkdir()
    env = clean_env(PYTHONPATH=str(site), PATH="/usr/bin:/bin")  # no sbatch: the local executor
    for var in ("IRM_HPC_DATA", "IRM_HPC_CONFIG_PATH"):
        env.pop(var, None)

    where = subprocess.run([sys.executable, "-c", "import irm_hpc.config as c; print(c.__file__); print(c.CONFIG_DIR)"],
                           capture_output=True, text=True, timeout=120, cwd=work, env=env)
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert Path(line).is_relative_to(site), f"irm_hpc imported from {line}, not from the installed wheel"

    res = subprocess.run([str(site / "bin" / "irm-hpc"), "launch", "--sweep", "smoke", "--cluster", "local",
                          "--name", "smoke", "--wait"], capture_output=True, text=True, timeout=600, cwd=work, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    sweep = work / "runs" / "smoke"  # runs_root "runs" is relative to the working directory
    runs = sorted((sweep / "runs").iterdir())
    assert [r.name for r in runs] == ["anger-s0-all", "anger-s1-all", "joy-s0-all", "joy-s1-all"]
    for run in runs:
        assert (run / "DONE").is_file(), run
        assert f"path: {site / 'irm_hpc' / 'datasets' / 'goemotions_ekman'}\n" in (run / "config.yaml").read_text()
    summary = json.loads((sweep / "analysis" / "summary.json").read_text())
    assert summary["n_runs"] == 4

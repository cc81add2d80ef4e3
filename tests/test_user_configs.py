"""User config directories (``--config-dir DIR``, ``$IRM_HPC_CONFIG_PATH``): user cluster/sweep/model presets
are found, listed, win over packaged presets of the same name, and reach the jobs a launch submits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import clean_env
from irm_hpc import launch, train
from irm_hpc.config import CONFIG_PATH_ENV, load_config, presets
from irm_hpc.manifest import load_manifest

MYCLUSTER = """\
defaults:
  - cluster_schema
name: mycluster
executor: slurm
partition: a100-long
account: proj-irm42
nodes: 1
tasks_per_node: 4
gpus_per_node: 4
cpus_per_task: 8
mem_gb: 200
timeout_min: 240
setup:
  - module load cuda/12.4
  - source ~/venvs/irm/bin/activate
"""

MYSWEEP = """\
defaults:
  - sweep_schema
name: mysweep
alignments: [anger, sadness]
seeds: [0, 1, 2]
layer_sets: [all]
train_overrides:
  - model=tiny_random
  - train=smoke
"""

SLURM_GPU_OVERRIDE = """\
defaults:
  - cluster_schema
name: slurm_gpu
executor: slurm
partition: users-own-gpu-partition
"""


@pytest.fixture(autouse=True)
def _isolated_search_path(monkeypatch):
    """--config-dir writes $IRM_HPC_CONFIG_PATH; start empty and restore the caller's value afterwards."""
    monkeypatch.setenv(CONFIG_PATH_ENV, "")


@pytest.fixture
def user_dir(tmp_path) -> Path:
    d = tmp_path / "irm-configs"
    (d / "cluster").mkdir(parents=True)
    (d / "sweep").mkdir()
    (d / "cluster" / "mycluster.yaml").write_text(MYCLUSTER)
    (d / "sweep" / "mysweep.yaml").write_text(MYSWEEP)
    return d


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch) -> Path:
    """``sbatch`` and ``srun`` on PATH (a dry run only checks that they exist) that record any call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    called = tmp_path / "sbatch-called"
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).write_text(f"#!/bin/sh\ntouch {called}\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return called


def _dry_run(capsys, argv: list[str]) -> str:
    code = launch.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _assert_mycluster_script(out: str) -> None:
    assert "sweep 'mysweep': 6 training tasks (slurm)" in out
    for line in ("#SBATCH --partition=a100-long", "#SBATCH --account=proj-irm42", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --ntasks-per-node=4", "#SBATCH --cpus-per-task=8", "#SBATCH --time=240",
                 "#SBATCH --array=0-5%6", "module load cuda/12.4", "source ~/venvs/irm/bin/activate"):
        assert line in out, f"{line!r} missing from:\n{out}"
    assert out.index("module load cuda/12.4") < out.index("srun"), "setup lines must run before srun"


def test_user_presets_via_config_dir_in_dry_run(capsys, user_dir, fake_sbatch, tmp_path):
    out = _dry_run(capsys, ["--config-dir", str(user_dir), "--sweep", "mysweep", "--cluster", "mycluster",
                            "--dry-run", f"runs_root={tmp_path / 'runs'}"])
    _assert_mycluster_script(out)
    assert not fake_sbatch.exists() and not (tmp_path / "runs").exists(), "a dry run submits and creates nothing"


def test_user_presets_via_env_var_in_dry_run(capsys, user_dir, fake_sbatch, tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_PATH_ENV, os.pathsep.join([str(tmp_path / "empty-but-valid"), str(user_dir)]))
    (tmp_path / "empty-but-valid").mkdir()
    out = _dry_run(capsys, ["--sweep", "mysweep", "--cluster=mycluster", "--dry-run", f"runs_root={tmp_path}"])
    _assert_mycluster_script(out)


def test_user_presets_are_listed_everywhere(capsys, user_dir, monkeypatch):
    monkeypatch.setenv(CONFIG_PATH_ENV, str(user_dir))
    assert presets("cluster") == ["auto", "debug", "local", "mycluster", "slurm", "slurm_gpu"]
    assert presets("sweep") == ["aligned", "demo", "full", "mysweep", "paper_layers", "smoke"]
    assert launch.main(["--sweep", "nope"]) == 2
    assert "presets: aligned, demo, full, mysweep, paper_layers, smoke" in capsys.readouterr().err
    assert launch.main(["--sweep", "smoke", "cluster=mars"]) == 2  # the hydra path: config._explain
    assert "valid cluster presets: auto, debug, local, mycluster, slurm, slurm_gpu" in capsys.readouterr().err


def test_user_model_preset_listed_by_train_cli(capsys, tmp_path):
    d = tmp_path / "cfg"
    (d / "model").mkdir(parents=True)
    (d / "model" / "my_llama.yaml").write_text("defaults:\n  - model_schema\nname: my_llama\npath: /models/llama\n")
    code = train.main(["--config-dir", str(d), "model=nope", f"out_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "valid model presets: llama2_7b_chat, my_llama, smollm2_135m, tiny_random" in err, err
    assert load_config("train", [f"--config-dir={d}", "model=my_llama", "out_dir=x"]).model.path == "/models/llama"


def test_user_preset_wins_over_packaged_one(capsys, tmp_path, fake_sbatch):
    d = tmp_path / "cfg"
    (d / "cluster").mkdir(parents=True)
    (d / "cluster" / "slurm_gpu.yaml").write_text(SLURM_GPU_OVERRIDE)
    assert load_config("launch", ["cluster=slurm_gpu"]).cluster.partition == "gpu"  # packaged
    out = _dry_run(capsys, ["--config-dir", str(d), "--sweep", "smoke", "--cluster", "slurm_gpu", "--dry-run"])
    assert "#SBATCH --partition=users-own-gpu-partition" in out and "--partition=gpu\n" not in out
    cfg = load_config("launch", ["cluster=slurm_gpu"])  # the launch exported the dir for its jobs
    assert cfg.cluster.partition == "users-own-gpu-partition" and cfg.cluster.gpus_per_node == 0
    assert presets("cluster").count("slurm_gpu") == 1


def test_first_config_dir_wins(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, part in ((a, "from-a"), (b, "from-b")):
        (d / "cluster").mkdir(parents=True)
        (d / "cluster" / "x.yaml").write_text(f"defaults:\n  - cluster_schema\nname: x\npartition: {part}\n")
    assert load_config("launch", ["--config-dir", str(a), "--config-dir", str(b), "cluster=x"]).cluster.partition == "from-a"
    os.environ[CONFIG_PATH_ENV] = str(b)
    assert load_config("launch", ["cluster=x"]).cluster.partition == "from-b"
    assert load_config("launch", [f"--config-dir={a}", "cluster=x"]).cluster.partition == "from-a"  # flag before env


@pytest.mark.parametrize("stage, extra", [("launch", ["--sweep", "smoke", "--dry-run"]), ("train", ["out_dir=x"])])
def test_missing_config_dir_is_one_line_exit_2(tmp_path, stage, extra):
    missing = tmp_path / "no-such-dir"
    res = subprocess.run([sys.executable, "-m", "irm_hpc.cli", stage, "--config-dir", str(missing), *extra],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=clean_env(**{CONFIG_PATH_ENV: "", "PATH": "/usr/bin:/bin"}))
    err = res.stderr.strip()
    assert res.returncode == 2, res.stderr
    assert err == f"error: config dir not found: {missing}; pass an existing directory to --config-dir", err


def test_missing_env_var_dir_is_one_line_exit_2(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_PATH_ENV, str(tmp_path / "gone"))
    assert launch.main(["--sweep", "smoke", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: config dir not found: {tmp_path / 'gone'} (from {CONFIG_PATH_ENV}); fix or unset {CONFIG_PATH_ENV}"


def test_config_dir_reaches_the_jobs(tmp_path):
    """A sweep of a user sweep + user model preset on the local executor: the training job (a separate
    process) composes the user model preset, so the search path travelled with the job."""
    d = tmp_path / "cfg"
    (d / "model").mkdir(parents=True)
    (d / "sweep").mkdir()
    tiny = (Path(launch.__file__).parent / "configs" / "model" / "tiny_random.yaml").read_text()
    (d / "model" / "tiny_user.yaml").write_text(tiny.replace("name: tiny_random", "name: tiny_user")
                                                .replace("hidden_size: 32", "hidden_size: 16"))
    (d / "sweep" / "one.yaml").write_text("defaults:\n  - sweep_schema\nname: one\nalignments: [anger]\nseeds: [0]\n"
                                          "train_overrides: [model=tiny_user, train=smoke, train.max_steps=2, "
                                          "data.max_length=24, data.max_train_texts=40, record.every_steps=1]\n"
                                          "analysis: [n_permutations=20]\n")
    res = subprocess.run([sys.executable, "-m", "irm_hpc.launch", "--config-dir", str(d), "--sweep", "one",
                          "--cluster", "local", "--name", "s", "--wait", f"runs_root={tmp_path / 'runs'}"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env=clean_env(**{CONFIG_PATH_ENV: "", "PATH": "/usr/bin:/bin"}))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    run = tmp_path / "runs" / "s" / "runs" / "anger-s0-all"
    assert json.loads((run / "DONE").read_text())["step"] == 2
    cfg = (run / "config.yaml").read_text()
    assert "name: tiny_user" in cfg and "hidden_size: 16" in cfg
    # the manifest keeps the config dirs: a resume without --config-dir or the variable still composes
    # the user preset (the task was made to look failed: its DONE removed)
    assert load_manifest(tmp_path / "runs" / "s").config_dirs == [str(d.resolve())]
    (run / "DONE").unlink()
    res = subprocess.run([sys.executable, "-m", "irm_hpc.launch", "--resume", str(tmp_path / "runs" / "s"), "--wait"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env=clean_env(**{CONFIG_PATH_ENV: "", "PATH": "/usr/bin:/bin"}))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "resubmit anger-s0-all" in res.stdout and json.loads((run / "DONE").read_text())["step"] == 2


def test_docs_worked_example_dry_runs(capsys, tmp_path, fake_sbatch):
    """The three presets of docs/user_configs.md, as written there, give the sbatch lines it promises."""
    import re

    from conftest import REPO

    doc = (REPO / "docs" / "user_configs.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    d = tmp_path / "irm-configs"
    for rel, text in zip(["cluster/mycluster.yaml", "sweep/mysweep.yaml", "model/llama2_local.yaml"], blocks, strict=True):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    out = _dry_run(capsys, ["--config-dir", str(d), "--sweep", "mysweep", "--cluster", "mycluster", "--dry-run"])
    promised = re.findall(r"`(#SBATCH [^`]+)`", doc)
    assert len(promised) == 5 and all(line in out for line in promised), (promised, out)
    assert "module load cuda/12.4" in out and "sweep 'mysweep': 6 training tasks" in out

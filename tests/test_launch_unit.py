"""Launcher pieces that need no cluster: presets compose, task expansion, sbatch text, manifest, bad input."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from irm_hpc import launch
from irm_hpc.config import CONFIG_DIR, load_config
from irm_hpc.executors import SlurmSweepExecutor
from irm_hpc.manifest import Manifest, ManifestError, expand_tasks, load_manifest, locked

SWEEPS = sorted(p.stem for p in (CONFIG_DIR / "sweep").glob("*.yaml"))
CLUSTERS = sorted(p.stem for p in (CONFIG_DIR / "cluster").glob("*.yaml"))


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_every_cluster_preset_composes(cluster):
    cfg = load_config("launch", ["sweep=smoke", f"cluster={cluster}"])
    assert cfg.cluster.name == cluster and cfg.cluster.cpus_per_task >= 1


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_sweep_preset_composes(sweep):
    cfg = load_config("launch", [f"sweep={sweep}"])
    assert cfg.sweep.name == sweep
    tasks = expand_tasks(list(cfg.sweep.alignments), list(cfg.sweep.seeds), list(cfg.sweep.layer_sets),
                         list(cfg.sweep.train_overrides))
    launch.validate_tasks(tasks)  # every task's training config composes too


def test_sweep_sizes():
    def n(sweep):
        cfg = load_config("launch", [f"sweep={sweep}"])
        return len(cfg.sweep.alignments) * len(cfg.sweep.seeds) * len(cfg.sweep.layer_sets)

    assert (n("smoke"), n("demo"), n("full")) == (4, 6, 28)
    assert list(load_config("launch", ["sweep=paper_layers"]).sweep.layer_sets) == ["q1", "q2", "q3", "q4", "every4", "all"]


def test_train_presets_compose():
    for group in ("model", "data", "deepspeed", "train", "record"):
        for preset in sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")):
            cfg = load_config("train", [f"{group}={preset}", "out_dir=x"])
            assert cfg[group] is not None


def test_sbatch_for_slurm_gpu_has_requested_resources():
    cfg = load_config("launch", ["sweep=full", "cluster=slurm_gpu", "cluster.account=proj7", "cluster.qos=high",
                                 "cluster.constraint=a100", "cluster.partition=gpu-long",
                                 "+cluster.additional_parameters.exclusive=true"])
    text = SlurmSweepExecutor(cfg.cluster).preview(28, Path("runs/SWEEP/logs/train"))
    for line in ("#SBATCH --array=0-27%16", "#SBATCH --gpus-per-node=1", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --nodes=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=65536MB", "#SBATCH --time=720",
                 "#SBATCH --partition=gpu-long", "#SBATCH --account=proj7", "#SBATCH --qos=high",
                 "#SBATCH --constraint=a100", "#SBATCH --signal=USR2@90", "#SBATCH --exclusive"):
        assert line in text, f"{line!r} missing from:\n{text}"
    assert "--gpus-per-task" not in text


def test_sbatch_gpus_per_task_binds_gpus_to_ranks():
    cfg = load_config("launch", ["sweep=full", "cluster=slurm_gpu", "cluster.gpus_per_node=0",
                                 "cluster.gpus_per_task=1", "cluster.tasks_per_node=4"])
    text = SlurmSweepExecutor(cfg.cluster).preview(28, Path("runs/SWEEP/logs/train"))
    assert "#SBATCH --gpus-per-task=1" in text and "#SBATCH --ntasks-per-node=4" in text
    assert "--gpus-per-node" not in text


def test_expand_tasks_names_and_overrides():
    tasks = expand_tasks(["anger", "joy"], [0, 1], ["q1", "all"], ["model=tiny_random"])
    assert len(tasks) == 8 and len({t.task_id for t in tasks}) == 8
    assert tasks[1].task_id == "anger-s0-all" and tasks[1].out_dir == "runs/anger-s0-all"
    assert tasks[1].overrides == ["model=tiny_random", "alignment=anger", "seed=0", "irm.layer_set=all"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--sweep", "nope"], "unknown sweep 'nope'; presets: aligned, demo, full, paper_layers, smoke"),
        (["--sweep", "smoke", "--cluster", "mars"], "unknown cluster 'mars'"),
        (["--sweep", "smoke", "trian.lr=1"], "config 'train': unknown key 'trian.lr' (did you mean train.lr"),
        (["--sweep", "smoke", "cluster.mem=1"], "unknown key 'cluster.mem' (did you mean cluster.mem_gb"),
        (["--resume", "/nonexistent/sweep"], "is not a sweep directory"),
        (["--sweep", "smoke", "--bogus"], "unknown argument --bogus"),
        (["--sweep", "smoke", "--dry-run", "cluster.analysis_runs_per_task=0"],
         "cluster.analysis_runs_per_task must be >= 1, got 0"),
    ],
)
def test_bad_input_one_line(capsys, argv, expected):
    assert launch.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expected in err, err


def test_map_chunks_cover_every_run_once_in_order():
    runs = [f"r{i}" for i in range(10)]
    chunks = launch.map_chunks(runs, 4)
    assert [len(c) for c in chunks] == [4, 4, 2] and sum(chunks, []) == runs
    assert launch.map_chunks(runs, 1) == [[r] for r in runs]
    assert launch.map_chunks(runs, 50) == [runs]


def test_bad_task_override_fails_before_submission(capsys, tmp_path):
    code = launch.main(["--sweep", "smoke", "--cluster", "local", f"runs_root={tmp_path}", "train.nope=1"])
    assert code == 2 and "unknown key 'train.nope'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing may be created when a task config is bad"


def test_slurm_cluster_without_sbatch(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert launch.main(["--sweep", "smoke", "--cluster", "slurm", f"runs_root={tmp_path}"]) == 2
    assert "needs sbatch on PATH" in capsys.readouterr().err


def test_existing_sweep_dir_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    code = launch.main(["--sweep", "smoke", "--cluster", "local", "--name", "mine", f"runs_root={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "--resume" in err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["keep.txt"]


def _new_manifest(tmp_path: Path) -> Manifest:
    m = Manifest(sweep_dir=tmp_path, sweep="t", executor="slurm", created=0.0, config_yaml="{}",
                 tasks=expand_tasks(["a"], [0, 1], ["all"], []))
    m.save()
    return m


def test_manifest_round_trip_and_newer_schema_refused(tmp_path):
    m = _new_manifest(tmp_path)
    back = load_manifest(tmp_path)
    assert [t.task_id for t in back.tasks] == [t.task_id for t in m.tasks]
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["schema_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    before = (tmp_path / "manifest.json").read_text()
    with pytest.raises(ManifestError, match="schema 99"):
        load_manifest(tmp_path)
    assert (tmp_path / "manifest.json").read_text() == before


def _hold_lock(path: str, seconds: float, started) -> None:
    with locked(path):
        started.set()
        time.sleep(seconds)


def test_manifest_lock_excludes_other_processes(tmp_path):
    _new_manifest(tmp_path)
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(tmp_path), 1.5, started))
    proc.start()
    assert started.wait(30)
    t0 = time.monotonic()
    with locked(tmp_path):
        waited = time.monotonic() - t0
    proc.join()
    assert waited > 0.5, f"lock was not exclusive (waited {waited:.2f} s)"


SLURM_ENV = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "1234", "SLURM_ARRAY_JOB_ID": "1200",
             "SLURM_ARRAY_TASK_ID": "34", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "n[1-2]"}


@pytest.mark.parametrize("ntasks", [1, 2])
def test_rendezvous_port_of_array_tasks(monkeypatch, ntasks):
    """One rank: a free loopback port (no clash with other tasks on the host); several ranks: the same
    job-seeded port on every rank, below the ephemeral port range."""
    from irm_hpc.dist import ephemeral_port_range, job_master_port
    from irm_hpc.jobs import _export_dist_env

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {**SLURM_ENV, "SLURM_NTASKS": str(ntasks), "SLURM_JOB_NUM_NODES": str(ntasks)}.items():
        monkeypatch.setenv(key, value)
    _export_dist_env()
    port = int(os.environ["MASTER_PORT"])
    assert os.environ["WORLD_SIZE"] == str(ntasks)
    if ntasks == 1:
        assert os.environ["MASTER_ADDR"] == "127.0.0.1"
    else:
        assert os.environ["MASTER_ADDR"] == "n1" and port == job_master_port("1200_34")
        assert 20000 <= port < ephemeral_port_range()[0]
    # every rank computes the port in its own process: it must depend on the job id alone (not on hash
    # randomisation or process state), and differ between jobs sharing a host
    other = subprocess.run([sys.executable, "-c", "from irm_hpc.dist import job_master_port as p; "
                            "print(*[p(f'7_{i}') for i in range(20)])"], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"})
    assert other.stdout.split() == [str(job_master_port(f"7_{i}")) for i in range(20)]
    assert len({job_master_port(f"7_{i}") for i in range(20)}) >= 18

"""GPU scheduling on the real local Slurm with simulated GPUs (``slurm/up.sh --gpus 2``; issue #16 part 4).

Slurm's gpu GRES plugin allocates the simulated devices and sets ``CUDA_VISIBLE_DEVICES`` as on a GPU
cluster; there is no CUDA here, so the DeepSpeed ranks still train on CPU. What is checked: the
``slurm_gpu`` preset's request is scheduled (Slurm's accounting shows ``gres/gpu``), one DeepSpeed rank
runs per GPU, and each rank sees the devices and ``LOCAL_RANK`` that make it pick its own GPU.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import REPO
from irm_hpc import launch
from irm_hpc.manifest import load_manifest
from irm_hpc.models import cuda_device_index
from slurm_utils import queue_empty, requires_slurm, sacct_final, wait_for

pytestmark = [pytest.mark.slurm, requires_slurm]


def _up(*args: str) -> None:
    res = subprocess.run(["bash", str(REPO / "slurm" / "up.sh"), *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]


@pytest.fixture(scope="module")
def two_gpus():
    _up("--gpus", "2")
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%G"], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["gpu:2"], f"sinfo GRES: {out!r}"
    yield
    # Reconfiguring restarts slurmctld/slurmd: a job still completing then fails to be killed ("Kill task
    # failed") and drains the node, which left the next tests' jobs pending. Let the queue empty first.
    wait_for(lambda: not _squeue_all(), 120, "the queue to empty before reconfiguring", poll_s=1)
    _up()  # back to the CPU-only cluster the other tests expect


def _squeue_all() -> str:
    return subprocess.run(["squeue", "-h"], capture_output=True, text=True, check=True).stdout.strip()


def _alloc_tres(job_id: str) -> str:
    return subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "--format=AllocTRES"], capture_output=True,
                          text=True, check=True).stdout.strip()


def _train_on_gpus(tmp_path, name: str, *cluster: str) -> list[dict]:
    """Launch one 2-rank training task with ``--cluster slurm_gpu`` (dev-cluster partition and sizes);
    return its ranks' placements from DONE, after checking the allocation in ``sacct``."""
    code = launch.main(["--sweep", "smoke", "--cluster", "slurm_gpu", f"runs_root={tmp_path}", "--name", name,
                        "sweep.alignments=[anger]", "sweep.seeds=[0]", "cluster.partition=debug", "cluster.nodes=1",
                        "cluster.tasks_per_node=2", "cluster.cpus_per_task=1", "cluster.mem_gb=2",
                        "cluster.timeout_min=15", *cluster, "deepspeed=zero2", "train.max_steps=4",
                        "train.threads=1"])
    assert code == 0
    m = load_manifest(tmp_path / name)
    try:
        wait_for(lambda: queue_empty([m.train_job_ids[0]]), 400, f"the {name} task", poll_s=2)
    finally:
        subprocess.run(["scancel", *m.analysis_job_ids], capture_output=True)  # not needed here
        wait_for(lambda: queue_empty([m.train_job_ids[0], *m.analysis_job_ids]), 120,
                 f"the {name} sweep to leave the queue", poll_s=1)
    task = m.tasks[0]
    assert sacct_final([task.job_id.split("_")[0]])[task.job_id]["State"] == "COMPLETED"
    assert "gres/gpu=2" in _alloc_tres(task.job_id), _alloc_tres(task.job_id)
    done = json.loads((m.task_dir(task) / "DONE").read_text())
    assert done["world_size"] == 2
    return done["ranks"]


def test_gpus_per_node_every_rank_sees_the_node_gpus_and_takes_its_local_rank(two_gpus, tmp_path):
    ranks = _train_on_gpus(tmp_path, "per-node", "cluster.gpus_per_node=2", "cluster.gpus_per_task=0")
    assert [r["rank"] for r in ranks] == [0, 1] and sorted(r["local_rank"] for r in ranks) == [0, 1]
    assert [r["cuda_visible_devices"] for r in ranks] == ["0,1", "0,1"], ranks
    picked = {cuda_device_index(r["local_rank"], len(r["cuda_visible_devices"].split(","))) for r in ranks}
    assert picked == {0, 1}, f"two ranks on the same GPU: {ranks}"
    assert all(r["device"] == "cpu" for r in ranks)  # simulated GPUs: no CUDA behind them


def test_gpus_per_task_binds_one_gpu_to_each_rank(two_gpus, tmp_path):
    ranks = _train_on_gpus(tmp_path, "per-task", "cluster.gpus_per_node=0", "cluster.gpus_per_task=1")
    assert sorted(r["cuda_visible_devices"] for r in ranks) == ["0", "1"], ranks
    assert all(cuda_device_index(r["local_rank"], 1) == 0 for r in ranks)  # each uses its only visible GPU

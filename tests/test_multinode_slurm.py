"""Multi-node DeepSpeed on a simulated 2-node Slurm (two slurmd on this host, nodes n1 and n2)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO
from irm_hpc import launch
from irm_hpc.manifest import load_manifest
from irm_hpc.record import open_run
from slurm_utils import queue_empty, requires_slurm, sacct, wait_for

pytestmark = [pytest.mark.slurm, requires_slurm]


@pytest.fixture(scope="module")
def two_nodes():
    res = subprocess.run(["bash", str(REPO / "slurm" / "up.sh"), "--nodes", "2"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    yield
    res = subprocess.run(["bash", str(REPO / "slurm" / "up.sh"), "--nodes", "1"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]


def _run_task(tmp_path: Path, name: str, nodes: int, tasks_per_node: int) -> Path:
    code = launch.main(["--sweep", "smoke", "--cluster", "slurm", f"runs_root={tmp_path}", "--name", name,
                        "sweep.alignments=[anger]", "sweep.seeds=[0]", f"cluster.nodes={nodes}",
                        f"cluster.tasks_per_node={tasks_per_node}", "cluster.cpus_per_task=1", "deepspeed=zero2",
                        "train.max_steps=8", "train.threads=1"])
    assert code == 0
    m = load_manifest(tmp_path / name)
    wait_for(lambda: queue_empty([m.train_job_ids[0]]), 400, f"the {name} task", poll_s=2)
    task = m.tasks[0]
    assert sacct([task.job_id.split("_")[0]])[task.job_id]["State"] == "COMPLETED"
    return m.task_dir(task)


def test_two_nodes_one_rank_each_equals_one_node_two_ranks(two_nodes, tmp_path):
    multi = _run_task(tmp_path, "n2x1", nodes=2, tasks_per_node=1)
    single = _run_task(tmp_path, "n1x2", nodes=1, tasks_per_node=2)
    for out in (multi, single):
        assert json.loads((out / "DONE").read_text())["world_size"] == 2
    with open_run(multi) as run:
        extra = run.meta.extra
        assert extra["world_size"] == 2 and extra["nodes"] == "n[1-2]", extra
    w_multi, w_single = load_file(str(multi / "irm.safetensors")), load_file(str(single / "irm.safetensors"))
    diff = max((w_multi[k] - w_single[k]).abs().max().item() for k in w_multi)
    assert diff <= 1e-5, f"2 nodes x 1 rank differs from 1 node x 2 ranks by {diff}"

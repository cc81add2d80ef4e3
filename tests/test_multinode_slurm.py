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
from slurm_utils import queue_empty, requires_slurm, sacct, sacct_final, wait_for

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
    assert sacct_final([task.job_id.split("_")[0]])[task.job_id]["State"] == "COMPLETED"
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


def test_node_failure_requeues_elsewhere_and_resumes(two_nodes, tmp_path):
    """Kill the node running a task (slurmd + its processes): NODE_FAIL, requeue (or --resume) on the
    other node from the last checkpoint; final weights equal an uninterrupted run; HDF5 steps once."""
    from conftest import run_module

    steps = 3000
    extra = [f"train.max_steps={steps}", "train.checkpoint_every=100", "train.eval_every=0",
             "train.micro_batch_size=2", "train.threads=1", "record.every_steps=100"]
    code = launch.main(["--sweep", "smoke", "--cluster", "slurm", f"runs_root={tmp_path}", "--name", "nf",
                        "sweep.alignments=[anger]", "sweep.seeds=[0]", "cluster.cpus_per_task=2", *extra])
    assert code == 0
    m = load_manifest(tmp_path / "nf")
    task = m.tasks[0]
    out = m.task_dir(task)
    latest = out / "checkpoints" / "latest"
    wait_for(latest.is_file, 300, "a first checkpoint", poll_s=0.1)
    node = sacct([task.job_id.split("_")[0]])[task.job_id]["NodeList"]
    assert node in ("n1", "n2"), node
    res = subprocess.run(["bash", str(REPO / "slurm" / "fail-node.sh"), node, "--hard"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert not (out / "DONE").exists(), "the task finished before the node failed: the test proves nothing"
    try:
        # Slurm marks the node DOWN after SlurmdTimeout and requeues the batch job (JobRequeue=1)
        wait_for(lambda: (out / "DONE").is_file() or queue_empty([task.job_id]), 600, "requeue or job end", poll_s=2)
        if not (out / "DONE").is_file():
            assert launch.main(["--resume", str(tmp_path / "nf")]) == 0
            m = load_manifest(tmp_path / "nf")
            wait_for(lambda: queue_empty([m.train_job_ids[-1]]), 600, "the resumed task", poll_s=2)
        wait_for(lambda: queue_empty([task.job_id]), 120, "the requeued job to end", poll_s=1)
        sacct_final([task.job_id.split("_")[0], *m.train_job_ids])
        states = subprocess.run(["sacct", "-X", "-n", "-P", "--duplicates", "-j", task.job_id.split("_")[0],
                                 "--format=JobID,State,NodeList"], capture_output=True, text=True).stdout
        assert "NODE_FAIL" in states, states
        assert (out / "DONE").is_file()
        if "|COMPLETED|" not in states:  # resumed under a new job id instead of a Slurm requeue
            states += subprocess.run(["sacct", "-X", "-n", "-P", "-j", m.train_job_ids[-1],
                                      "--format=JobID,State,NodeList"], capture_output=True, text=True).stdout
        done_nodes = [ln.split("|")[2] for ln in states.splitlines() if "|COMPLETED|" in ln]
        assert done_nodes and node not in done_nodes, f"finished on {done_nodes}, failed node {node}: {states}"
    finally:
        subprocess.run(["bash", str(REPO / "slurm" / "up.sh"), "--nodes", "2"], capture_output=True, text=True)
    ref = tmp_path / "ref"
    res = run_module("irm_hpc.train", [*task.overrides, f"out_dir={ref}"], timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    w, w_ref = load_file(str(out / "irm.safetensors")), load_file(str(ref / "irm.safetensors"))
    diff = max((w[k] - w_ref[k]).abs().max().item() for k in w)
    assert diff <= 1e-5, f"weights after node failure differ from an uninterrupted run by {diff}"
    with open_run(out) as run:
        assert run.steps.tolist() == list(range(0, steps + 1, 100))

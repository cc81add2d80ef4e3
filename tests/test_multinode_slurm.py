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


def initial_irm_weights(trained: dict, seed: int) -> dict:
    """The IRM weights before training, built by the function ``train.Trainer`` builds them with
    (hidden size and injection-layer count read from the trained weights; the smoke sweep's irm config)."""
    from irm_hpc.components.engine import init_irm
    from irm_hpc.config import load_config

    hidden = trained["net.0.weight"].shape[1]
    last = max((k for k in trained if k.endswith(".weight")), key=lambda k: int(k.split(".")[1]))
    irm_cfg = load_config("train", ["model=tiny_random", "out_dir=x"]).irm
    irm = init_irm(hidden, list(range(trained[last].shape[0] // hidden)), irm_cfg, seed)
    return {k: v.detach().clone() for k, v in irm.state_dict().items()}


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
    # ... and both trained: the IRM moved away from its initialisation (seed 0, as train.py builds it)
    w_init = initial_irm_weights(w_multi, seed=0)
    moved = max((w_multi[k] - w_init[k]).abs().max().item() for k in w_init)
    assert moved > 1e-3, f"the weights stayed at their initialisation (max change {moved})"


def test_node_failure_requeues_elsewhere_and_resumes(two_nodes, tmp_path):
    """Kill the node running a task (slurmd + its processes): NODE_FAIL, Slurm's own requeue (same job id,
    no --resume) on the other node from the last checkpoint; final weights equal an uninterrupted run;
    HDF5 steps once."""
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
        # Slurm marks the node DOWN after SlurmdTimeout and requeues the batch job itself (JobRequeue=1):
        # nothing here resubmits it, so DONE can only come from Slurm's requeue
        wait_for(lambda: (out / "DONE").is_file(), 600, "Slurm's requeue to finish the task", poll_s=2)
        wait_for(lambda: queue_empty([task.job_id]), 120, "the requeued job to end", poll_s=1)
        sacct_final([task.job_id.split("_")[0]])
        allocations = sacct([task.job_id.split("_")[0]], duplicates=True)[task.job_id]
        states = [(r["State"], r["NodeList"]) for r in allocations]
        assert ("NODE_FAIL", node) in states, states
        assert states[-1][0] == "COMPLETED" and states[-1][1] != node, f"not finished elsewhere: {states}"
        m = load_manifest(tmp_path / "nf")
        assert len(m.train_job_ids) == 1 and [s["reason"] for s in m.tasks[0].submissions] == ["launch"]
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

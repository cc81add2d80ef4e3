"""A 200-task sweep of tiny training tasks on 4 simulated nodes, array parallelism 8 (real Slurm).

The cluster declares 4 CPUs on each of 4 nodes (16 one-CPU slots on this 2-core machine), so the
array's ``%8`` limit, not the cluster's size, is what bounds the running tasks. Checked from sacct:
every task COMPLETED, never more than 8 ran at once (and 8 did), the tasks ran on all 4 nodes, and the
analysis (map array + reduce) ran once, after the last training task. Takes ~15-20 min on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from conftest import REPO, run_module
from irm_hpc import launch
from irm_hpc.manifest import load_manifest
from slurm_utils import peak_running, queue_empty, requires_slurm, sacct, sacct_final, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.scale, requires_slurm]

ALIGNMENTS = ["anger", "fear", "joy", "sadness", "surprise"]
N_SEEDS = 40  # 5 x 40 = 200 tasks
PARALLELISM = 8
NODES = [f"n{k}" for k in range(1, 5)]
# A tiny task: random 2-layer model, 2 optimizer steps, no eval, one final checkpoint, 1 HDF5 record.
TINY = ["train.max_steps=2", "train.eval_every=0", "train.checkpoint_every=0", "record.every_steps=2"]
CLUSTER = [f"cluster.array_parallelism={PARALLELISM}", "cluster.cpus_per_task=1", "cluster.mem_gb=1",
           "cluster.analysis_runs_per_task=25", "cluster.analysis_cpus=1", "cluster.analysis_mem_gb=2"]


def _up(*args: str) -> None:
    res = subprocess.run(["bash", str(REPO / "slurm" / "up.sh"), *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]


@pytest.fixture(scope="module")
def four_nodes():
    _up("--nodes", "4", "--cpus-per-node", "4")
    yield
    _up("--nodes", "1")


def _ts(s: str) -> datetime:
    return datetime.fromisoformat(s)


def launch_200(runs_root: Path, name: str = "s200") -> Path:
    """Submit the 200-task sweep; return its directory (the launch command itself, as a user runs it)."""
    seeds = "[" + ",".join(map(str, range(N_SEEDS))) + "]"
    code = launch.main(["--sweep", "smoke", "--cluster", "slurm", f"runs_root={runs_root}", "--name", name,
                        f"sweep.alignments=[{','.join(ALIGNMENTS)}]", f"sweep.seeds={seeds}", *CLUSTER, *TINY])
    assert code == 0
    return runs_root / name


def test_200_task_sweep_on_4_nodes_with_parallelism_8(four_nodes, tmp_path):
    sweep = launch_200(tmp_path)
    m = load_manifest(sweep)
    assert len(m.tasks) == 200 and len({t.job_id.split("_")[0] for t in m.tasks}) == 1, "one job array"
    array_id, map_id, reduce_id = m.train_job_ids[0], *m.analysis_job_ids
    ids = [array_id, map_id, reduce_id]
    wait_for(lambda: queue_empty(ids), 3600, "the 200-task sweep and its analysis to leave the queue", poll_s=5)
    rows = sacct_final(ids)

    train = {k: v for k, v in rows.items() if k.startswith(array_id + "_")}
    assert len(train) == 200, f"sacct lists {len(train)} training tasks"
    failed = {k: v["State"] for k, v in train.items() if v["State"] != "COMPLETED"}
    assert not failed, f"{len(failed)} tasks did not complete: {dict(list(failed.items())[:5])}"
    peak = peak_running(train.values())
    assert peak <= PARALLELISM, f"{peak} array tasks ran at once (limit {PARALLELISM})"
    assert peak == PARALLELISM, f"only {peak} ran at once: the cap was never reached, the test shows nothing"
    assert {v["NodeList"] for v in train.values()} == set(NODES), "tasks did not spread over the 4 nodes"

    maps = {k: v for k, v in rows.items() if k.startswith(map_id + "_")}
    assert len(maps) == 8 and all(v["State"] == "COMPLETED" for v in maps.values()), maps  # 200 runs / 25
    last_train_end = max(_ts(v["End"]) for v in train.values())
    assert min(_ts(v["Start"]) for v in maps.values()) >= last_train_end, "analysis started before the last task ended"
    reduce_runs = sacct([reduce_id], duplicates=True)[reduce_id]
    assert [r["State"] for r in reduce_runs] == ["COMPLETED"], f"the reduce ran {len(reduce_runs)} times: {reduce_runs}"
    assert _ts(reduce_runs[0]["Start"]) >= max(_ts(v["End"]) for v in maps.values())

    summary = json.loads((sweep / "analysis" / "summary.json").read_text())
    assert summary["n_runs"] == 200
    assert all((m.task_dir(t) / "DONE").is_file() and (m.task_dir(t) / "injections.h5").is_file() for t in m.tasks)

    res = run_module("irm_hpc.status", [str(sweep), "--json"], timeout=60)
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout)["tasks"]
    assert len(status) == 200 and all(r["state"] == "COMPLETED" and r["done"] for r in status), status[:3]
    assert {r["node"] for r in status} == set(NODES)

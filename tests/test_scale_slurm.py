"""A multi-node sweep of tiny training tasks on 4 simulated nodes, with an array parallelism cap (real Slurm).

The cluster declares 2 CPUs on each of 4 nodes (8 one-CPU slots on this 2-core machine), so the array's
``%4`` limit, not the cluster's size, is what bounds the running tasks. Checked from sacct: every task
COMPLETED, never more than 4 ran at once (and 4 did), the tasks ran on all 4 nodes, and the analysis
(map array + reduce) ran once, after the last training task. 20 tasks, ~3-4 min on 2 cores: the same
properties as the 200-task, parallelism-8 sweep, which is ``benchmarks/bench_scale.py`` (~16 min).
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

pytestmark = [pytest.mark.slurm, requires_slurm]

ALIGNMENTS = ["anger", "fear", "joy", "sadness", "surprise"]
N_SEEDS = 4  # 5 x 4 = 20 tasks
PARALLELISM = 4
CPUS_PER_NODE = 2
RUNS_PER_MAP = 5  # 20 runs / 5 = 4 map-array tasks
NODES = [f"n{k}" for k in range(1, 5)]
# A tiny task: random 2-layer model, 2 optimizer steps, no eval, one final checkpoint, 1 HDF5 record.
TINY = ["train.max_steps=2", "train.eval_every=0", "train.checkpoint_every=0", "record.every_steps=2"]


def _up(*args: str) -> None:
    res = subprocess.run(["bash", str(REPO / "slurm" / "up.sh"), *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]


@pytest.fixture(scope="module")
def four_nodes():
    _up("--nodes", "4", "--cpus-per-node", str(CPUS_PER_NODE))
    yield
    _up("--nodes", "1")


def _ts(s: str) -> datetime:
    return datetime.fromisoformat(s)


def launch_sweep(runs_root: Path, name: str = "s20", n_seeds: int = N_SEEDS, parallelism: int = PARALLELISM,
                 runs_per_map: int = RUNS_PER_MAP) -> Path:
    """Submit 5 alignments x ``n_seeds`` tiny tasks with array parallelism ``parallelism``; return the sweep
    directory (the launch command itself, as a user runs it). ``benchmarks/bench_scale.py``: 40 seeds, 8, 25."""
    seeds = "[" + ",".join(map(str, range(n_seeds))) + "]"
    cluster = [f"cluster.array_parallelism={parallelism}", "cluster.cpus_per_task=1", "cluster.mem_gb=1",
               f"cluster.analysis_runs_per_task={runs_per_map}", "cluster.analysis_cpus=1", "cluster.analysis_mem_gb=2"]
    code = launch.main(["--sweep", "smoke", "--cluster", "slurm", f"runs_root={runs_root}", "--name", name,
                        f"sweep.alignments=[{','.join(ALIGNMENTS)}]", f"sweep.seeds={seeds}", *cluster, *TINY])
    assert code == 0
    return runs_root / name


def test_multinode_sweep_respects_array_parallelism(four_nodes, tmp_path):
    n = len(ALIGNMENTS) * N_SEEDS
    sweep = launch_sweep(tmp_path)
    m = load_manifest(sweep)
    assert len(m.tasks) == n and len({t.job_id.split("_")[0] for t in m.tasks}) == 1, "one job array"
    array_id, map_id, reduce_id = m.train_job_ids[0], *m.analysis_job_ids
    ids = [array_id, map_id, reduce_id]
    wait_for(lambda: queue_empty(ids), 1200, "the sweep and its analysis to leave the queue", poll_s=3)
    rows = sacct_final(ids)

    train = {k: v for k, v in rows.items() if k.startswith(array_id + "_")}
    assert len(train) == n, f"sacct lists {len(train)} training tasks"
    failed = {k: v["State"] for k, v in train.items() if v["State"] != "COMPLETED"}
    assert not failed, f"{len(failed)} tasks did not complete: {dict(list(failed.items())[:5])}"
    peak = peak_running(train.values())
    assert peak <= PARALLELISM, f"{peak} array tasks ran at once (limit {PARALLELISM})"
    assert peak == PARALLELISM, f"only {peak} ran at once: the cap was never reached, the test shows nothing"
    assert {v["NodeList"] for v in train.values()} == set(NODES), "tasks did not spread over the 4 nodes"

    maps = {k: v for k, v in rows.items() if k.startswith(map_id + "_")}
    assert len(maps) == n // RUNS_PER_MAP and all(v["State"] == "COMPLETED" for v in maps.values()), maps
    last_train_end = max(_ts(v["End"]) for v in train.values())
    assert min(_ts(v["Start"]) for v in maps.values()) >= last_train_end, "analysis started before the last task ended"
    reduce_runs = sacct([reduce_id], duplicates=True)[reduce_id]
    assert [r["State"] for r in reduce_runs] == ["COMPLETED"], f"the reduce ran {len(reduce_runs)} times: {reduce_runs}"
    assert _ts(reduce_runs[0]["Start"]) >= max(_ts(v["End"]) for v in maps.values())

    summary = json.loads((sweep / "analysis" / "summary.json").read_text())
    assert summary["n_runs"] == n
    assert all((m.task_dir(t) / "DONE").is_file() and (m.task_dir(t) / "injections.h5").is_file() for t in m.tasks)

    res = run_module("irm_hpc.status", [str(sweep), "--json"], timeout=60)
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout)["tasks"]
    assert len(status) == n and all(r["state"] == "COMPLETED" and r["done"] for r in status), status[:3]
    assert {r["node"] for r in status} == set(NODES)

"""Sweeps on the real local Slurm: job array, chained analysis, a 2-rank DeepSpeed task."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import pytest

from irm_hpc import launch
from irm_hpc.executors import SlurmSweepExecutor
from irm_hpc.manifest import load_manifest
from irm_hpc.record import open_run
from slurm_utils import queue_empty, requires_slurm, sacct_final, wait_for

pytestmark = [pytest.mark.slurm, requires_slurm]


def _launch(tmp_path: Path, *extra: str) -> Path:
    t0 = time.perf_counter()
    code = launch.main(["--sweep", "smoke", "--cluster", "slurm", f"runs_root={tmp_path}", "--name", "sw", *extra])
    assert code == 0
    assert time.perf_counter() - t0 < 30, "launch must return without waiting for the jobs"
    return tmp_path / "sw"


def _ts(s: str) -> datetime:
    return datetime.fromisoformat(s)


def test_smoke_sweep_array_then_evaluation_then_analysis_then_ablation(tmp_path):
    sweep = _launch(tmp_path, "sweep.evaluation.enabled=true", "sweep.evaluation.runs_per_task=2",
                    "sweep.ablation.enabled=true", "sweep.ablation.runs_per_task=2")
    m = load_manifest(sweep)
    assert len(m.tasks) == 4 and len({t.job_id.split("_")[0] for t in m.tasks}) == 1, "one job array"
    ids = [m.train_job_ids[0], *m.analysis_job_ids]
    wait_for(lambda: queue_empty(ids), 600, "the smoke sweep and its analysis to leave the queue", poll_s=2)
    rows = sacct_final(ids)
    eval_id, map_id, reduce_id, ablate_id, reduce2_id = m.analysis_job_ids
    train = {k: v for k, v in rows.items() if k.startswith(m.train_job_ids[0] + "_")}
    evals = {k: v for k, v in rows.items() if k.startswith(eval_id + "_")}
    maps = {k: v for k, v in rows.items() if k.startswith(map_id + "_")}
    reduce_row = rows[reduce_id]
    assert len(train) == 4 and all(v["State"] == "COMPLETED" for v in train.values()), train
    assert len(evals) == 2 and all(v["State"] == "COMPLETED" for v in evals.values()), evals  # 2 runs per task
    assert len(maps) == 4 and all(v["State"] == "COMPLETED" for v in maps.values()), maps
    assert reduce_row["State"] == "COMPLETED", reduce_row
    last_train_end = max(_ts(v["End"]) for v in train.values())
    assert min(_ts(v["Start"]) for v in evals.values()) >= last_train_end, "evaluation started before training ended"
    assert min(_ts(v["Start"]) for v in maps.values()) >= max(_ts(v["End"]) for v in evals.values())
    assert _ts(reduce_row["Start"]) >= max(_ts(v["End"]) for v in maps.values())
    # the ablation array (2 runs per task) after the reduce, then the reduce again
    ablates = {k: v for k, v in rows.items() if k.startswith(ablate_id + "_")}
    assert len(ablates) == 2 and all(v["State"] == "COMPLETED" for v in ablates.values()), ablates
    assert min(_ts(v["Start"]) for v in ablates.values()) >= _ts(reduce_row["End"])
    assert rows[reduce2_id]["State"] == "COMPLETED" and _ts(rows[reduce2_id]["Start"]) >= max(
        _ts(v["End"]) for v in ablates.values())
    final = json.loads((sweep / "analysis" / "summary.json").read_text())
    consensus = [e["index"] for e in final["consensus"]["indices"]][:2]
    assert final["ablation"]["available"] == bool(consensus)  # ablated exactly when there was a consensus
    if consensus:
        assert sorted(final["ablation"]["indices"]) == sorted(str(i) for i in consensus)
    ev = json.loads((sweep / "analysis" / "summary.json").read_text())["evaluation"]
    assert ev["available"] and ev["n_runs_evaluated"] == 4 and sorted(ev["per_alignment"]) == ["anger", "joy"]
    for task in m.tasks:
        out = m.task_dir(task)
        assert (out / "DONE").is_file() and (out / "irm.safetensors").is_file()
        with open_run(out / "injections.h5") as run:
            assert run.meta.alignment == task.alignment and run.meta.seed == task.seed
            assert run.steps[0] == 0
    summary = json.loads((sweep / "analysis" / "summary.json").read_text())
    assert summary["n_runs"] == 4
    assert (sweep / "analysis" / "report.md").is_file()
    # --dry-run's preview (a private submitit function) is the script submitit really submitted
    submitted = sorted((sweep / "logs" / "train").glob("*_submission.sh"))
    assert len(submitted) == 1, submitted
    cluster = m.launch_config().cluster
    preview = SlurmSweepExecutor(cluster).preview(4, sweep / "logs" / "train", "irm-smoke")
    assert preview.strip() == submitted[0].read_text().strip()


def test_two_rank_zero2_task_under_slurm(tmp_path):
    sweep = _launch(tmp_path, "sweep.alignments=[anger]", "sweep.seeds=[0]", "cluster.tasks_per_node=2",
                    "cluster.cpus_per_task=1", "deepspeed=zero2")
    m = load_manifest(sweep)
    wait_for(lambda: queue_empty([m.train_job_ids[0]]), 400, "the 2-rank task", poll_s=2)
    out = m.task_dir(m.tasks[0])
    assert (out / "DONE").is_file(), sorted(p.name for p in out.iterdir()) if out.exists() else "no out_dir"
    done = json.loads((out / "DONE").read_text())
    assert done["world_size"] == 2
    logs = sorted((sweep / "logs" / "train").glob("*_1_log.out"))
    assert logs, "rank 1 wrote no submitit log: only one rank ran"

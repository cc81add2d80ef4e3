"""Fault tests on the real local Slurm: scancel, kill -9, timeout requeue, concurrent resumes, status.

One sweep of 4 tiny tasks runs one at a time (array parallelism 1). Task 0 is cancelled and task 1's
training process is SIGKILLed mid-training; tasks 2 and 3 run normally. Two ``--resume`` processes
started together must submit each failed task once; resumed tasks must end with the same IRM weights as
an uninterrupted run of the same seed and an HDF5 stream holding each recorded step once.
"""

from __future__ import annotations

import json

import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO, clean_env, run_module
from irm_hpc import launch
from irm_hpc.manifest import load_manifest, locked
from irm_hpc.record import open_run
from irm_hpc.status import task_rows
from slurm_utils import queue_empty, requires_slurm, sacct_final, wait_for

pytestmark = [pytest.mark.slurm, requires_slurm]

STEPS = 2000
TRAIN = [f"train.max_steps={STEPS}", "train.checkpoint_every=50", "train.eval_every=0", "train.micro_batch_size=2",
         "train.threads=1", "record.every_steps=50"]


def _states(manifest) -> dict[str, str]:
    rows, _ = task_rows(manifest)
    return {r.task_id: r.state for r in rows}


def _job_pid(job_id: str) -> int | None:
    """PID of the submitit worker (the training process) of array task ``job_id`` ("A_T")."""
    array, task = job_id.split("_")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmd and f"SLURM_ARRAY_JOB_ID={array}".encode() in env \
                and f"SLURM_ARRAY_TASK_ID={task}".encode() in env:
            return int(proc.name)
    return None


def _has_open(pid: int, path: str) -> bool:
    """Whether process ``pid`` has ``path`` open (``/proc/<pid>/fd``)."""
    try:
        return any(os.readlink(fd) == path for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


def _train_tasks_submitted_since(t0: datetime, job_name: str) -> dict[str, int]:
    """Array tasks named ``job_name`` that Slurm accepted at or after ``t0``: {task id: allocations}, from
    ``sacct`` (not from the manifest the code under test writes)."""
    from irm_hpc.executors import _expand

    out = subprocess.run(["sacct", "-X", "-n", "-P", "-D", "-S", t0.isoformat(), "--name", job_name,
                          "--format=JobID,Submit"], capture_output=True, text=True, check=True).stdout
    seen: dict[str, int] = {}
    for line in out.splitlines():
        jid, submit = line.split("|")
        if datetime.fromisoformat(submit) >= t0:
            for task in _expand(jid):
                seen[task] = seen.get(task, 0) + 1
    return seen


def _latest_step(run_dir: Path) -> int:
    latest = run_dir / "checkpoints" / "latest"
    return int(latest.read_text().strip().removeprefix("global_step")) if latest.is_file() else 0


def _interrupt_mid_training(manifest, task, action) -> None:
    run_dir = manifest.task_dir(task)
    wait_for(lambda: _latest_step(run_dir) >= 50, 300, f"{task.task_id} to write a checkpoint", poll_s=0.05)
    action(task.job_id)
    wait_for(lambda: queue_empty([task.job_id]), 120, f"{task.task_id} to leave the queue", poll_s=0.5)
    assert not (run_dir / "DONE").exists(), f"{task.task_id} finished before it was interrupted"


def _kill9(job_id: str) -> None:
    pid = _job_pid(job_id)
    assert pid is not None, f"no training process found for {job_id}"
    os.kill(pid, signal.SIGKILL)


def _reference(tmp_path: Path, task) -> Path:
    out = tmp_path / "ref" / task.task_id
    res = run_module("irm_hpc.train", [*task.overrides, f"out_dir={out}"], timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def test_cancel_kill_status_and_concurrent_resume(tmp_path):
    code = launch.main(["--sweep", "smoke", "--cluster", "slurm", f"runs_root={tmp_path}", "--name", "sw",
                        "cluster.array_parallelism=1", "sweep.evaluation.enabled=true", *TRAIN])
    assert code == 0
    sweep = tmp_path / "sw"
    m = load_manifest(sweep)
    t0, t1, t2, t3 = m.tasks
    first_eval = m.analysis_job_ids[0]

    _interrupt_mid_training(m, t0, lambda jid: subprocess.run(["scancel", jid], check=True))
    _interrupt_mid_training(m, t1, _kill9)
    wait_for(lambda: _states(m)[t2.task_id] == "RUNNING", 120, "task 2 to run")
    states = _states(m)  # status with mixed states: cancelled, failed, running, pending
    assert states == {t0.task_id: "CANCELLED", t1.task_id: "FAILED", t2.task_id: "RUNNING",
                      t3.task_id: "PENDING"}, states
    rows, note = task_rows(m)
    assert note == "" and 50 <= rows[0].step < STEPS and rows[2].node == "n1"

    # two resumes at once, forced to overlap: the test holds the manifest lock until both processes wait
    # for it. Each failed task must be submitted exactly once, counted from Slurm's accounting.
    t_resume = datetime.now().replace(microsecond=0)
    time.sleep(1)  # sacct's Submit has 1 s resolution
    with locked(sweep):
        procs = [subprocess.Popen([sys.executable, "-m", "irm_hpc.launch", "--resume", str(sweep)], cwd=REPO,
                                  env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        lock = str((sweep / "manifest.lock").resolve())
        wait_for(lambda: all(_has_open(p.pid, lock) for p in procs), 60, "both resumes to wait on the manifest lock",
                 poll_s=0.05)
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    m = load_manifest(sweep)
    reasons = {t.task_id: [s["reason"] for s in t.submissions] for t in m.tasks}
    assert reasons == {t0.task_id: ["launch", "resume"], t1.task_id: ["launch", "resume"],
                       t2.task_id: ["launch"], t3.task_id: ["launch"]}, (reasons, outs)
    assert len(m.train_job_ids) == 2

    all_ids = [*m.train_job_ids, *m.analysis_job_ids]
    wait_for(lambda: queue_empty(all_ids), 900, "resumed tasks and the analysis", poll_s=2)
    sacct_final(all_ids)  # accounting lags the queue: count only once sacct has every job's end
    submitted = _train_tasks_submitted_since(t_resume, "irm-smoke")
    assert sorted(submitted.values()) == [1, 1] and len({j.split("_")[0] for j in submitted}) == 1, submitted
    wait_for(lambda: set(_states(m).values()) == {"COMPLETED"}, 60, "status to show every task COMPLETED")
    assert (sweep / "analysis" / "summary.json").is_file()
    # the evaluation array was re-chained after the resumed array (the first one, pending, was cancelled)
    eval_id = m.analysis_job_ids[0]
    assert len(m.analysis_job_ids) == 3 and eval_id != first_eval
    rows = sacct_final([m.train_job_ids[1], eval_id, first_eval])
    evals = {k: v for k, v in rows.items() if k.startswith(eval_id + "_")}
    resumed = {k: v for k, v in rows.items() if k.startswith(m.train_job_ids[1] + "_")}
    assert len(evals) == 4 and all(v["State"] == "COMPLETED" for v in evals.values()), evals
    assert min(datetime.fromisoformat(v["Start"]) for v in evals.values()) >= \
        max(datetime.fromisoformat(v["End"]) for v in resumed.values())
    first = [v for k, v in rows.items() if k.split("_")[0] == first_eval]
    assert first and all(v["State"] == "CANCELLED" for v in first), rows
    ev = json.loads((sweep / "analysis" / "summary.json").read_text())["evaluation"]
    assert ev["available"] and ev["n_runs_evaluated"] == 4 and not ev["missing"]

    for task in (t0, t1):
        out = m.task_dir(task)
        ref = _reference(tmp_path, task)
        w, w_ref = load_file(str(out / "irm.safetensors")), load_file(str(ref / "irm.safetensors"))
        diff = max((w[k] - w_ref[k]).abs().max().item() for k in w)
        assert diff <= 1e-5, f"{task.task_id}: resumed weights differ from uninterrupted by {diff}"
        with open_run(out) as run:
            steps = run.steps.tolist()
            assert steps == list(range(0, STEPS + 1, 50)), f"{task.task_id} HDF5 steps: {steps}"
            assert len(set(run.probe.step.tolist())) == 2  # probes at step 0 and at the end, once each


def test_timeout_requeues_and_completes(tmp_path):
    """A task longer than its time limit: USR2 -> checkpoint at a step boundary -> requeue -> completes.

    Slurm may send the signal up to 60 s before ``--signal=USR2@<delay>`` asks (its event resolution),
    so a 1-minute limit could signal before training starts; a 3-minute limit with a 90 s delay signals
    30-90 s after start, and the run (~12k tiny steps) outlasts that, so at least one requeue must happen.
    """
    steps = 12000
    code = launch.main(["--sweep", "smoke", "--cluster", "slurm", f"runs_root={tmp_path}", "--name", "to",
                        "sweep.alignments=[anger]", "sweep.seeds=[0]", "cluster.timeout_min=3",
                        "cluster.signal_delay_s=90", "cluster.max_num_timeout=8", f"train.max_steps={steps}",
                        "train.checkpoint_every=2000", "train.eval_every=0", "train.micro_batch_size=2",
                        "train.threads=1", "record.every_steps=500"])
    assert code == 0
    m = load_manifest(tmp_path / "to")
    task = m.tasks[0]
    wait_for(lambda: queue_empty([task.job_id]), 1500, "the timed-out task to requeue and finish", poll_s=3)
    out = m.task_dir(task)
    log = "".join(p.read_text(errors="replace") for p in (tmp_path / "to" / "logs" / "train").glob("*"))
    assert (out / "DONE").is_file(), f"task did not complete after requeue; log tail: {log[-2000:]}"
    assert "checkpointing at the next step boundary" in log, "the timeout signal never reached the trainer"
    assert "Requeued job" in log, "submitit did not requeue the job"
    assert "resuming from checkpoint" in log, "the requeued job did not resume from its checkpoint"
    # each requeued run resumed from the checkpoint written at the signal's step boundary, not from a
    # periodic one (every 2000 steps): the steps match, and they are not all multiples of 2000
    signalled = [int(s) for s in re.findall(r"preemption checkpoint at step (\d+)", log)]
    resumed = [int(s) for s in re.findall(r"resuming from checkpoint step (\d+)", log)]
    assert signalled and sorted(resumed) == sorted(signalled), (signalled, resumed)
    assert any(s % 2000 for s in signalled), f"every preemption step was also a periodic checkpoint: {signalled}"
    assert sacct_final([task.job_id.split("_")[0]])[task.job_id]["State"] == "COMPLETED"
    with open_run(out) as run:
        assert run.steps.tolist() == list(range(0, steps + 1, 500))

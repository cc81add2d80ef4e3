"""End-to-end checks against the real local Slurm cluster started by ``slurm/up.sh``.

Run with::

    sudo bash slurm/up.sh            # once; idempotent
    .venv/bin/python -m pytest -m slurm tests/test_slurm_cluster.py

The tests are skipped when Slurm is not installed (``sinfo`` not on PATH) or the
controller does not answer; set ``IRM_REQUIRE_SLURM=1`` (CI) to turn that skip
into a failure. Every wait is a poll with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

PARTITION = "debug"
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "Slurm not installed (sinfo not on PATH); run: sudo bash slurm/up.sh"
    try:
        out = subprocess.run(
            ["scontrol", "ping"], capture_output=True, text=True, timeout=15
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"scontrol ping failed: {exc}"
    if "is UP" not in out:
        return f"slurmctld not answering ({out.strip() or 'no output'}); run: sudo bash slurm/up.sh"
    return None


_PROBLEM = _cluster_problem()
if _PROBLEM is not None:
    if os.environ.get("IRM_REQUIRE_SLURM") == "1":
        pytestmark = [pytest.mark.slurm]

        @pytest.fixture(autouse=True)
        def _require_cluster() -> None:
            pytest.fail(f"IRM_REQUIRE_SLURM=1 but the cluster is unusable: {_PROBLEM}")

    else:
        pytestmark = [pytest.mark.slurm, pytest.mark.skip(reason=_PROBLEM)]


# --------------------------------------------------------------------------- helpers
def _run(*args: str, timeout: float = 30) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed (rc={proc.returncode}): {proc.stderr.strip()}"
        )
    return proc.stdout


def _sbatch(tmp_path: Path, *args: str) -> str:
    """Submit; output goes to <tmp_path>/<job-name>-<jobid>[_<task>].out."""
    is_array = any(a.startswith("--array") for a in args)
    pattern = "%x-%A_%a.out" if is_array else "%x-%j.out"
    out = _run(
        "sbatch",
        "--parsable",
        f"--partition={PARTITION}",
        f"--chdir={tmp_path}",
        f"--output={tmp_path}/{pattern}",
        "--time=5",
        "--mem=100M",
        *args,
    )
    return out.strip().split(";")[0]  # "<id>" or "<id>;<cluster>"


def _parse_time(value: str) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:  # "Unknown", "None"
        return None


def _sacct(job_id: str) -> dict[str, dict[str, str]]:
    """Allocation-level records (no .batch/.extern steps) of a job or array, by JobID."""
    out = _run(
        "sacct", "-j", job_id, "-X", "-n", "-P", "--format=JobID,State,Start,End"
    )
    rows = {}
    for line in out.splitlines():
        if not line.strip():
            continue
        jid, state, start, end = line.split("|")
        rows[jid] = {"State": state.split()[0], "Start": start, "End": end}
    return rows


def _wait_terminal(
    job_id: str, n_records: int = 1, timeout: float = 45
) -> dict[str, dict[str, str]]:
    """Poll sacct until ``n_records`` records of the job are in a terminal state
    and have an End time (sacct is fed asynchronously by slurmdbd)."""
    deadline = time.monotonic() + timeout
    rows: dict[str, dict[str, str]] = {}
    while time.monotonic() < deadline:
        rows = _sacct(job_id)
        # a pending array shows up as one "<id>_[0-3]" record: wait for the split
        done = [
            r
            for jid, r in rows.items()
            if "[" not in jid and r["State"] in TERMINAL and _parse_time(r["End"])
        ]
        if len(done) >= n_records:
            return rows
        time.sleep(0.5)
    squeue = subprocess.run(["squeue"], capture_output=True, text=True).stdout
    raise AssertionError(
        f"job {job_id} not finished after {timeout}s: sacct={rows}\nsqueue:\n{squeue}"
    )


# --------------------------------------------------------------------------- tests
def test_sbatch_then_sacct_completed(tmp_path: Path) -> None:
    job_id = _sbatch(tmp_path, "--job-name=hello", "--wrap", "hostname; echo OK")
    rows = _wait_terminal(job_id)
    rec = rows[job_id]
    assert rec["State"] == "COMPLETED", rows
    start, end = _parse_time(rec["Start"]), _parse_time(rec["End"])
    assert start is not None and end is not None and start <= end, rec
    out = (tmp_path / f"hello-{job_id}.out").read_text()
    assert out.strip().endswith("OK"), out


def test_job_array_of_four_completes(tmp_path: Path) -> None:
    job_id = _sbatch(
        tmp_path,
        "--job-name=arr",
        "--array=0-3",
        "--wrap",
        "sleep 1; echo task=$SLURM_ARRAY_TASK_ID",
    )
    rows = _wait_terminal(job_id, n_records=4)
    tasks = {jid: r for jid, r in rows.items() if jid.startswith(f"{job_id}_")}
    assert sorted(tasks) == [f"{job_id}_{i}" for i in range(4)], rows
    assert all(r["State"] == "COMPLETED" for r in tasks.values()), rows
    for i in range(4):
        out = (tmp_path / f"arr-{job_id}_{i}.out").read_text()
        assert f"task={i}" in out, out


def test_afterany_dependency_starts_after_array_ended(tmp_path: Path) -> None:
    array_id = _sbatch(
        tmp_path, "--job-name=dep-arr", "--array=0-3", "--wrap", "sleep 2"
    )
    dep_id = _sbatch(
        tmp_path,
        "--job-name=dep-after",
        f"--dependency=afterany:{array_id}",
        "--wrap",
        "date +%s",
    )
    # while the array runs, the dependent job must wait (Dependency reason)
    state = _run("squeue", "-h", "-j", dep_id, "-o", "%T %r").strip()
    assert state == "" or state.startswith("PENDING"), state

    dep_rows = _wait_terminal(dep_id, timeout=50)
    assert dep_rows[dep_id]["State"] == "COMPLETED", dep_rows
    arr_rows = _wait_terminal(array_id, n_records=4, timeout=10)
    ends = [_parse_time(r["End"]) for jid, r in arr_rows.items() if "_" in jid]
    assert len(ends) == 4 and all(ends), arr_rows
    dep_start = _parse_time(dep_rows[dep_id]["Start"])
    assert dep_start is not None
    assert dep_start >= max(ends), (dep_rows, arr_rows)  # type: ignore[type-var]


def test_submitit_map_array_round_trip(tmp_path: Path) -> None:
    submitit = pytest.importorskip("submitit")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit" / "%j")
    assert executor.cluster == "slurm"
    executor.update_parameters(
        slurm_partition=PARTITION, timeout_min=5, cpus_per_task=1, mem_gb=0.5
    )
    jobs = executor.map_array(pow, [2, 3, 4], [2, 2, 2])
    assert len(jobs) == 3
    deadline = time.monotonic() + 50
    while not all(job.done() for job in jobs):
        if time.monotonic() > deadline:
            pytest.fail(f"submitit jobs not done after 50s: {[j.state for j in jobs]}")
        time.sleep(0.5)
    assert [job.result() for job in jobs] == [4, 9, 16]

"""Helpers for tests against the real local Slurm (slurm/up.sh)."""

from __future__ import annotations

import shutil
import subprocess
import time
from datetime import datetime
from typing import Callable, Iterable

import pytest

requires_slurm = pytest.mark.skipif(shutil.which("sbatch") is None or shutil.which("sinfo") is None,
                                    reason="no Slurm on PATH: run bash slurm/up.sh")


def sacct(job_ids: list[str], duplicates: bool = False) -> dict[str, dict]:
    """JobID -> {State, Start, End, NodeList, ExitCode} for every allocation of ``job_ids`` (array tasks
    expanded). ``duplicates``: also the earlier allocations of requeued jobs (``sacct -D``), as
    JobID -> list of rows."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", *(["-D"] if duplicates else []), "-j", ",".join(job_ids),
                          "--format=JobID,State,Start,End,NodeList,ExitCode"], capture_output=True, text=True,
                         check=True).stdout
    rows: dict = {}
    for line in out.splitlines():
        jid, state, start, end, node, code = line.split("|")
        row = {"State": state.split()[0], "Start": start, "End": end, "NodeList": node, "ExitCode": code}
        if duplicates:
            rows.setdefault(jid, []).append(row)
        else:
            rows[jid] = row
    return rows


def peak_running(rows: Iterable[dict]) -> int:
    """Most jobs running at the same time, from sacct ``Start``/``End`` (1 s resolution). Intervals are
    half-open, so a task that starts in the second another one ended does not count as overlapping."""
    events = []
    for row in rows:
        events += [(datetime.fromisoformat(row["Start"]), 1), (datetime.fromisoformat(row["End"]), -1)]
    running = peak = 0
    for _, delta in sorted(events):  # at equal times -1 (an end) sorts before +1 (a start)
        running += delta
        peak = max(peak, running)
    return peak


def wait_for(pred: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 1.0) -> None:
    """Poll ``pred`` until true; fail the test after ``timeout_s`` seconds naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def queue_empty(job_ids: list[str]) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids)], capture_output=True, text=True).stdout
    return not out.strip()


LIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "SUSPENDED", "RESIZING"}


def sacct_final(job_ids: list[str], timeout_s: float = 60) -> dict[str, dict]:
    """``sacct(job_ids)`` once every row has a final state (the accounting lags squeue by seconds)."""
    rows: dict[str, dict] = {}

    def settled() -> bool:
        nonlocal rows
        rows = sacct(job_ids)
        return bool(rows) and not any(r["State"] in LIVE_STATES for r in rows.values())

    wait_for(settled, timeout_s, f"sacct to settle for {job_ids}", poll_s=1)
    return rows

"""Monitor a sweep: ``python -m irm_hpc.status SWEEP_DIR [--watch SECONDS] [--json]``.

One row per task: alignment, seed, layer set, job id, Slurm state, node, elapsed, step/total, last loss,
ETA; a summary line with counts per state. Slurm is asked ONCE per refresh for the whole sweep
(``sacct`` for all array ids, ``squeue`` for live jobs); progress comes from each run's
``metrics.jsonl`` (last line only) and ``DONE``. If ``sacct`` fails, the table says so and falls back to
``squeue`` plus the run files instead of guessing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from irm_hpc.manifest import Manifest, ManifestError, load_manifest

LIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD",
        "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}
RESUBMIT = {"FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


@dataclass
class JobInfo:
    state: str
    node: str = ""
    elapsed: str = ""


@dataclass
class TaskRow:
    """Status of one task (what ``--json`` prints, one object per task)."""

    index: int
    task_id: str
    alignment: str
    seed: int
    layer_set: str
    job_id: Optional[str]
    state: str
    node: str
    elapsed: str
    step: int
    total: int
    loss: Optional[float]
    eta_s: Optional[float]
    done: bool


def _expand(job_field: str) -> list[str]:
    """``123_[0-3,7%2]`` -> ``123_0 ... 123_3, 123_7``; other ids unchanged."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_field)
    if not m:
        return [job_field]
    base, spec = m.group(1), m.group(2).split("%")[0]
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += [f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def _run(cmd: list[str]) -> Optional[str]:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


def query_slurm(array_ids: list[str]) -> tuple[dict[str, JobInfo], str]:
    """States of every task of ``array_ids`` from one ``sacct`` + one ``squeue`` call.

    Returns ``(states by 'ARRAY_TASK' id, note)``; ``note`` is "" or says which source failed.
    Live states from ``squeue`` win over ``sacct`` (which lags a few seconds).
    """
    states: dict[str, JobInfo] = {}
    note = ""
    ids = ",".join(sorted(set(array_ids)))
    if not ids:
        return states, note
    out = _run(["sacct", "-X", "-n", "-P", "-j", ids, "--format=JobID,State,NodeList,Elapsed"])
    if out is None:
        note = "sacct failed: states from squeue and run files"
    else:
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) >= 4:
                for jid in _expand(parts[0]):
                    states[jid] = JobInfo(parts[1].split()[0], parts[2] if parts[2] != "None assigned" else "", parts[3])
    sq = _run(["squeue", "-h", "-j", ids, "-o", "%i|%T|%N|%M"])
    if sq is None:
        note = (note + "; " if note else "") + "squeue failed"
    else:
        for line in sq.splitlines():
            parts = line.split("|")
            if len(parts) >= 4:
                for jid in _expand(parts[0]):
                    states[jid] = JobInfo(parts[1], parts[2], parts[3])
    return states, note


def _last_json_line(path: Path) -> Optional[dict]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 4096))
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    return None


def _progress(run_dir: Path, total: int) -> tuple[int, int, Optional[float], Optional[float], bool]:
    done = (run_dir / "DONE").is_file()
    last = _last_json_line(run_dir / "metrics.jsonl")
    if last is None:
        return (total if done else 0), total, None, None, done
    step, loss = int(last.get("step", 0)), last.get("loss")
    total = int(last.get("max_steps", total))
    eta = None
    rate = last.get("step_time_s")
    if rate and not done:
        eta = max(0.0, (total - step) * float(rate))
    return step, total, loss, eta, done


def _total_steps(overrides: list[str]) -> int:
    """Steps asked for by the task's overrides (until its metrics say), 0 if not overridden."""
    for o in reversed(overrides):
        if o.startswith("train.max_steps="):
            return int(o.split("=", 1)[1])
    return 0


def _local_state(manifest: Manifest, done: bool, step: int) -> JobInfo:
    if done:
        return JobInfo("COMPLETED")
    driver = manifest.train_job_ids[-1] if manifest.train_job_ids else None
    alive = driver is not None and driver.isdigit() and _pid_alive(int(driver))
    if not alive:
        return JobInfo("FAILED" if step else "NOT_RUN")
    return JobInfo("RUNNING" if step else "PENDING", os.uname().nodename)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def task_rows(manifest: Manifest) -> tuple[list[TaskRow], str]:
    """Status of every task (one Slurm query for the sweep). Returns ``(rows, note)``."""
    slurm = manifest.executor == "slurm"
    states, note = query_slurm([t.job_id.split("_")[0] for t in manifest.tasks if t.job_id]) if slurm else ({}, "")
    rows = []
    for t in manifest.tasks:
        step, total, loss, eta, done = _progress(manifest.task_dir(t), _total_steps(t.overrides))
        if slurm:
            info = states.get(t.job_id or "", JobInfo("UNKNOWN" if t.job_id else "NOT_SUBMITTED"))
            if note and info.state == "UNKNOWN":
                info = JobInfo("COMPLETED" if done else "UNKNOWN")
        else:
            info = _local_state(manifest, done, step)
        rows.append(TaskRow(t.index, t.task_id, t.alignment, t.seed, t.layer_set, t.job_id, info.state, info.node,
                            info.elapsed, step, total, loss, eta, done))
    return rows, note


def needs_resubmit(row: TaskRow) -> Optional[str]:
    """Why ``row`` should be resubmitted, or None (finished, or a job is still live)."""
    if row.done:
        return None
    if row.state in LIVE:
        return None
    if row.state in RESUBMIT:
        return row.state
    return f"no live job ({row.state}) and no finished output"


def _fmt_eta(eta: Optional[float]) -> str:
    if eta is None:
        return ""
    return f"{int(eta // 3600)}h{int(eta % 3600 // 60):02d}m" if eta >= 3600 else f"{int(eta // 60)}m{int(eta % 60):02d}s"


def render(manifest: Manifest, rows: list[TaskRow], note: str):
    """A rich Table of ``rows`` with a per-state summary caption."""
    from collections import Counter

    from rich.table import Table

    counts = Counter(r.state for r in rows)
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    table = Table(title=f"{manifest.sweep_dir.name} ({manifest.executor}, {len(rows)} tasks)",
                  caption=summary + (f"  [{note}]" if note else ""))
    for col in ("task", "alignment", "seed", "layers", "job", "state", "node", "elapsed", "step", "loss", "ETA"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.task_id, r.alignment, str(r.seed), r.layer_set, r.job_id or "", r.state, r.node, r.elapsed,
                      f"{r.step}/{r.total}", "" if r.loss is None else f"{r.loss:.3f}", _fmt_eta(r.eta_s))
    return table


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry; one-line error and exit 2 for a directory that is not a sweep."""
    parser = argparse.ArgumentParser(prog="python -m irm_hpc.status", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until interrupted")
    parser.add_argument("--json", action="store_true", help="print machine-readable rows")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        manifest = load_manifest(args.sweep_dir)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from rich.console import Console

    console = Console(width=170)
    while True:
        rows, note = task_rows(manifest)
        if args.json:
            print(json.dumps({"sweep_dir": str(manifest.sweep_dir), "note": note, "tasks": [asdict(r) for r in rows]}))
        else:
            console.print(render(manifest, rows, note))
        if not args.watch:
            return 0
        time.sleep(args.watch)
        manifest = load_manifest(args.sweep_dir)


if __name__ == "__main__":
    sys.exit(main())

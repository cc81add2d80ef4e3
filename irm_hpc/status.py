"""Monitor a sweep: ``python -m irm_hpc.status SWEEP_DIR [--watch SECONDS] [--json]``.

One row per task: alignment, seed, layer set, job id, scheduler state, node, elapsed, step/total, last
loss, ETA; a summary line with counts per state. The sweep's executor (``irm_hpc.executors``) is asked
ONCE per refresh for the whole sweep (Slurm: one ``sacct`` + one ``squeue``); progress comes from each
run's ``metrics.jsonl`` (last line only) and ``DONE``. If ``sacct`` fails, the table says so and falls
back to ``squeue`` plus the run files instead of guessing. :func:`follow` is the live view that
``launch --wait`` shows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from irm_hpc.components.tracking import last_record
from irm_hpc.errors import cli_errors
from irm_hpc.executors import for_manifest
from irm_hpc.layout import RunDir, SweepDir
from irm_hpc.manifest import Manifest, load_manifest


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


def _progress(run: RunDir, total: int) -> tuple[int, int, Optional[float], Optional[float], bool]:
    done = run.is_done()
    last = last_record(run.metrics)
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


def task_rows(manifest: Manifest) -> tuple[list[TaskRow], str]:
    """Status of every task (one scheduler query for the sweep). Returns ``(rows, note)``."""
    progress = {t.index: _progress(RunDir(manifest.task_dir(t)), _total_steps(t.overrides)) for t in manifest.tasks}
    states, note = for_manifest(manifest).job_states(manifest, {i: p[4] for i, p in progress.items()},
                                                    {i: p[0] for i, p in progress.items()})
    rows = []
    for t in manifest.tasks:
        step, total, loss, eta, done = progress[t.index]
        info = states[t.index]
        rows.append(TaskRow(t.index, t.task_id, t.alignment, t.seed, t.layer_set, t.job_id, info.state, info.node,
                            info.elapsed, step, total, loss, eta, done))
    return rows, note


def _fmt_eta(eta: Optional[float]) -> str:
    if eta is None:
        return ""
    return f"{int(eta // 3600)}h{int(eta % 3600 // 60):02d}m" if eta >= 3600 else f"{int(eta // 60)}m{int(eta % 60):02d}s"


def counts_line(rows: list[TaskRow]) -> str:
    """``3/6 tasks done, steps 52/90, RUNNING 1, PENDING 2``: tasks finished, steps over all tasks, states."""
    steps, total = sum(r.step for r in rows), sum(r.total for r in rows)
    unknown = sum(1 for r in rows if not r.total)  # not started, and its overrides do not say max_steps
    of = "?" if not total else f"{total}" + (f" + ? ({unknown} tasks not started)" if unknown else "")
    states = ", ".join(f"{k} {v}" for k, v in sorted(Counter(r.state for r in rows).items()))
    return f"{sum(r.done for r in rows)}/{len(rows)} tasks done, steps {steps}/{of}, {states}"


def render(manifest: Manifest, rows: list[TaskRow], note: str):
    """A rich Table of ``rows`` with a per-state summary caption."""
    from rich.table import Table

    summary = ", ".join(f"{k}: {v}" for k, v in sorted(Counter(r.state for r in rows).items()))
    table = Table(title=f"{manifest.sweep_dir.name} ({manifest.executor}, {len(rows)} tasks)",
                  caption=summary + (f"  [{note}]" if note else ""))
    for col in ("task", "alignment", "seed", "layers", "job", "state", "node", "elapsed", "step", "loss", "ETA"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.task_id, r.alignment, str(r.seed), r.layer_set, r.job_id or "", r.state, r.node, r.elapsed,
                      f"{r.step}/{r.total}", "" if r.loss is None else f"{r.loss:.3f}", _fmt_eta(r.eta_s))
    return table


def follow(manifest: Manifest, finished: Callable[[], bool], interval_s: float = 5.0,
           quiet_interval_s: float = 60.0, console=None) -> list[TaskRow]:
    """Show a sweep's progress until ``finished()`` is true; return the last rows.

    On a terminal: the status table and a progress bar of tasks and steps, refreshed in place every
    ``interval_s`` seconds (rich ``Live``). Otherwise (a log file, CI): one ``counts_line`` whenever it
    changes, at most every ``quiet_interval_s`` seconds (and the final one as soon as the sweep ends).
    """
    from rich.console import Console, Group
    from rich.live import Live
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(width=170)
    rows, note = task_rows(manifest)
    if not console.is_terminal:
        last_line, last_t = "", 0.0
        while True:
            done = finished()
            rows, note = task_rows(manifest)
            line = counts_line(rows)
            now = time.monotonic()
            if line != last_line and (done or now - last_t >= quiet_interval_s):
                console.print(f"[{time.strftime('%H:%M:%S')}] {line}" + (f" [{note}]" if note else ""),
                              highlight=False)
                last_line, last_t = line, now
            if done:
                return rows
            time.sleep(interval_s)
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)
    tasks_bar = bars.add_task("tasks", total=len(rows))
    steps_bar = bars.add_task("steps", total=max(1, sum(r.total for r in rows)))
    with Live(console=console, refresh_per_second=1, transient=False) as live:
        while True:
            done = finished()
            rows, note = task_rows(manifest)
            bars.update(tasks_bar, completed=sum(r.done for r in rows))
            bars.update(steps_bar, completed=sum(r.step for r in rows), total=max(1, sum(r.total for r in rows)))
            live.update(Group(render(manifest, rows, note), bars))
            if done:
                return rows
            time.sleep(interval_s)


def result_lines(manifest: Manifest, rows: list[TaskRow], top: int = 3) -> list[str]:
    """The short result of a finished sweep: failed tasks, the report path, the top consensus indices
    (hidden-size index, share of runs where it is a significant striation) and, with the evaluation
    stage, the judged alignment rate off -> on per alignment, from ``summary.json``."""
    sweep = SweepDir(manifest.sweep_dir)
    failed = [r.task_id for r in rows if not r.done]
    lines = [f"tasks: {len(rows) - len(failed)}/{len(rows)} finished, {len(failed)} failed"
             + (f" ({', '.join(failed[:5])}{', ...' if len(failed) > 5 else ''})" if failed else "")]
    summary_file = sweep.summary
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, ValueError):
        return [*lines, f"no analysis summary at {summary_file}: see {sweep.analysis_logs} or {sweep.driver_logs}"]
    cons = (summary.get("consensus") or {}).get("indices") or []
    n_runs = summary.get("n_runs", 0)
    if cons:
        best = sorted(cons, key=lambda c: -c.get("share", 0))[:top]
        lines.append("consensus striation indices: " + ", ".join(
            f"{c['index']} ({c.get('n_runs_significant', '?')}/{n_runs} runs)" for c in best))
    else:
        lines.append(f"consensus striation indices: none in {n_runs} runs")
    ev = summary.get("evaluation") or {}
    if ev.get("available"):
        crit = ev.get("criterion") or {}
        per = ev.get("per_alignment") or {}
        lines.append(f"judged alignment (IRM on - off, 95% CI above 0): {crit.get('n_ci_above_zero')}/"
                     f"{crit.get('n_alignments')} alignments; " + ", ".join(
                         f"{a} {e['rate_off']:.2f}->{e['rate_on']:.2f}" for a, e in sorted(per.items())))
    lines.append(f"report: {sweep.report}")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry; one-line error and exit 2 for a directory that is not a sweep."""
    parser = argparse.ArgumentParser(prog="python -m irm_hpc.status", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until interrupted")
    parser.add_argument("--json", action="store_true", help="print machine-readable rows")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        from rich.console import Console

        manifest = load_manifest(args.sweep_dir)
        console = Console(width=170)
        while True:
            rows, note = task_rows(manifest)
            if args.json:
                print(json.dumps({"sweep_dir": str(manifest.sweep_dir), "note": note,
                                  "tasks": [asdict(r) for r in rows]}))
            else:
                console.print(render(manifest, rows, note))
            if not args.watch:
                return 0
            time.sleep(args.watch)
            manifest = load_manifest(args.sweep_dir)

    return cli_errors(body)


if __name__ == "__main__":
    sys.exit(main())

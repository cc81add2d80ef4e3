"""launch --wait's live view (status.follow) and the short result it prints (status.result_lines)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

from rich.console import Console

from irm_hpc.config import load_config, to_yaml
from irm_hpc.manifest import Manifest, expand_tasks
from irm_hpc.status import counts_line, follow, result_lines, task_rows


def make_sweep(root: Path) -> Manifest:
    """A 'local' sweep of 3 tasks (no live driver): one done, one at step 4 of 10, one not started."""
    cfg = load_config("launch", ["sweep=smoke", "cluster=local"])
    tasks = expand_tasks(["anger", "joy", "fear"], [0], ["all"], ["train.max_steps=10"])
    m = Manifest(sweep_dir=root, sweep="t", executor="local", created=time.time(), config_yaml=to_yaml(cfg), tasks=tasks)
    root.mkdir(parents=True)
    m.save()
    for task, step in zip(tasks[:2], (10, 4)):
        d = m.task_dir(task)
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text(json.dumps({"step": step, "loss": 3.5, "max_steps": 10, "step_time_s": 2.0}) + "\n")
    (m.task_dir(tasks[0]) / "DONE").write_text("{}\n")
    return m


def test_counts_line_and_terminal_view(tmp_path):
    m = make_sweep(tmp_path / "sw")
    rows, _ = task_rows(m)
    assert [r.state for r in rows] == ["COMPLETED", "FAILED", "NOT_RUN"]  # no driver process alive
    assert counts_line(rows) == "1/3 tasks done, steps 14/30, COMPLETED 1, FAILED 1, NOT_RUN 1"

    calls = iter([False, False, True])
    buf = io.StringIO()
    out = follow(m, lambda: next(calls), interval_s=0.01, console=Console(file=buf, force_terminal=True, width=170))
    text = buf.getvalue()
    assert [r.task_id for r in out] == ["anger-s0-all", "joy-s0-all", "fear-s0-all"]
    assert "joy-s0-all" in text and "4/10" in text  # the status table, refreshed in place
    assert "1/3" in text and "14/30" in text  # progress bars: tasks and steps


def test_plain_view_prints_a_line_per_change(tmp_path):
    m = make_sweep(tmp_path / "sw")
    calls = iter([False, True])
    buf = io.StringIO()
    follow(m, lambda: next(calls), interval_s=0.01, quiet_interval_s=0.0, console=Console(file=buf, width=170))
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].endswith("1/3 tasks done, steps 14/30, COMPLETED 1, FAILED 1, NOT_RUN 1")


def test_result_lines_name_failures_consensus_and_report(tmp_path):
    m = make_sweep(tmp_path / "sw")
    rows, _ = task_rows(m)
    lines = result_lines(m, rows)
    assert lines[0] == "tasks: 1/3 finished, 2 failed (joy-s0-all, fear-s0-all)"
    assert lines[1].startswith("no analysis summary at ")
    (m.sweep_dir / "analysis").mkdir()
    summary = {"n_runs": 28, "consensus": {"indices": [
        {"index": 482, "share": 16 / 28, "n_runs_significant": 16},
        {"index": 542, "share": 25 / 28, "n_runs_significant": 25},
        {"index": 334, "share": 17 / 28, "n_runs_significant": 17}, {"index": 7, "share": 0.5, "n_runs_significant": 14}]}}
    (m.sweep_dir / "analysis" / "summary.json").write_text(json.dumps(summary))
    lines = result_lines(m, rows)
    assert lines[1] == "consensus striation indices: 542 (25/28 runs), 334 (17/28 runs), 482 (16/28 runs)"
    assert lines[2] == f"report: {m.sweep_dir / 'analysis' / 'report.md'}"

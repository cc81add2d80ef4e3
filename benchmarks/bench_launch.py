"""Launcher and status speed on the real local Slurm (bash slurm/up.sh first).

    python benchmarks/bench_launch.py [--runs-root /tmp/irm_bench_launch]

1. Submit time of ``--sweep full`` (28 training tasks as one job array + analysis map array + reduce
   job), wall time of ``launch.main`` in this process and of the CLI in a fresh process. Jobs are
   submitted held (``sbatch --hold``) and cancelled afterwards: only submission is measured.
2. ``python -m irm_hpc.status`` on a 100-task sweep (held jobs; each run directory gets a realistic
   ``metrics.jsonl`` of 2,000 lines): in-process ``task_rows`` + render, and the CLI wall time.

Targets: submit <= 5 s; status <= 1 s. Writes ``benchmarks/results/bench_launch.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from irm_hpc import launch
from irm_hpc.manifest import load_manifest
from irm_hpc.status import render, task_rows

RESULTS = Path(__file__).resolve().parent / "results" / "bench_launch.json"
HOLD = "+cluster.additional_parameters.hold=true"


def cancel(sweep: Path) -> None:
    m = load_manifest(sweep)
    ids = [*m.train_job_ids, *m.analysis_job_ids]
    if ids:
        subprocess.run(["scancel", *ids], check=False)


def fake_metrics(sweep: Path, lines: int = 2000) -> None:
    m = load_manifest(sweep)
    for task in m.tasks:
        out = m.task_dir(task)
        out.mkdir(parents=True, exist_ok=True)
        rows = (json.dumps({"step": s, "loss": 4.0, "lr": 1e-4, "tokens_per_s": 200.0, "step_time_s": 3.0,
                            "time": time.time(), "max_steps": lines * 2}) for s in range(1, lines + 1))
        (out / "metrics.jsonl").write_text("\n".join(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs-root", default="/tmp/irm_bench_launch")
    args = ap.parse_args()
    root = Path(args.runs_root)
    shutil.rmtree(root, ignore_errors=True)
    res: dict = {}

    t0 = time.perf_counter()
    assert launch.main(["--sweep", "full", "--cluster", "slurm", f"runs_root={root}", "--name", "full", HOLD]) == 0
    res["submit_full_28_in_process_s"] = time.perf_counter() - t0
    cancel(root / "full")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "irm_hpc.launch", "--sweep", "full", "--cluster", "slurm",
                    f"runs_root={root}", "--name", "full_cli", HOLD], check=True, capture_output=True)
    res["submit_full_28_cli_s"] = time.perf_counter() - t0
    cancel(root / "full_cli")

    seeds = "[" + ",".join(map(str, range(25))) + "]"
    assert launch.main(["--sweep", "smoke", "--cluster", "slurm", f"runs_root={root}", "--name", "s100",
                        "sweep.alignments=[anger,joy,sadness,fear]", f"sweep.seeds={seeds}", HOLD]) == 0
    sweep = root / "s100"
    fake_metrics(sweep)
    m = load_manifest(sweep)
    t0 = time.perf_counter()
    rows, note = task_rows(m)
    from rich.console import Console

    Console(file=io.StringIO(), width=170).print(render(m, rows, note))
    res["status_100_in_process_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "irm_hpc.status", str(sweep)], check=True, capture_output=True)
    res["status_100_cli_s"] = time.perf_counter() - t0
    res["status_100_states"] = sorted({r.state for r in rows})
    res["n_tasks"] = len(rows)
    cancel(sweep)
    res["targets"] = {"submit_s": 5.0, "status_s": 1.0}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

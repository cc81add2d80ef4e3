"""A 200-task sweep (the CI test tests/test_scale_slurm.py at 10x its size, parallelism 8), timed, on the
simulated 4-node Slurm.

    sudo bash slurm/up.sh --nodes 4 --cpus-per-node 4
    python benchmarks/bench_scale.py [--runs-root /tmp/irm_bench_scale]
    sudo bash slurm/up.sh --nodes 1

Measures: the launcher's submit time (200-task training array + analysis map array + reduce), the
``python -m irm_hpc.status`` time (CLI, fresh process) while the sweep runs and after it ended, and
the sweep's wall time (submit -> reduce end, from sacct), with the peak number of array tasks running
at once, the nodes used and the throughput. Writes ``benchmarks/results/bench_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the test's sweep definition and sacct helpers

from irm_hpc.manifest import load_manifest  # noqa: E402
from slurm_utils import peak_running, queue_empty, sacct_final  # noqa: E402
from test_scale_slurm import launch_sweep  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "bench_scale.json"


def status_cli_s(sweep: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "irm_hpc.status", str(sweep)], check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs-root", default="/tmp/irm_bench_scale")
    args = ap.parse_args()
    root = Path(args.runs_root)
    shutil.rmtree(root, ignore_errors=True)
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %c"], capture_output=True, text=True, check=True).stdout.split("\n")
    t_submit = datetime.now().replace(microsecond=0)
    t0 = time.perf_counter()
    sweep = launch_sweep(root, "s200", n_seeds=40, parallelism=8, runs_per_map=25)
    res: dict = {"submit_200_in_process_s": time.perf_counter() - t0, "cluster": [n for n in nodes if n]}
    m = load_manifest(sweep)
    ids = [m.train_job_ids[0], *m.analysis_job_ids]
    time.sleep(60)
    res["status_200_cli_running_s"] = [status_cli_s(sweep) for _ in range(3)]
    while not queue_empty(ids):
        time.sleep(5)
    rows = sacct_final(ids)
    train = [v for k, v in rows.items() if k.startswith(ids[0] + "_")]
    maps = [v for k, v in rows.items() if k.startswith(ids[1] + "_")]
    end = datetime.fromisoformat(rows[ids[2]]["End"])
    last_train = max(datetime.fromisoformat(v["End"]) for v in train)
    res.update(
        status_200_cli_done_s=[status_cli_s(sweep) for _ in range(3)],
        wall_submit_to_reduce_end_s=(end - t_submit).total_seconds(),
        wall_submit_to_last_train_end_s=(last_train - t_submit).total_seconds(),
        analysis_s=(end - last_train).total_seconds(),
        n_train=len(train), n_completed=sum(v["State"] == "COMPLETED" for v in train), n_map=len(maps),
        peak_running=peak_running(train), nodes_used=sorted({v["NodeList"] for v in train}),
        tasks_per_node={n: sum(v["NodeList"] == n for v in train) for n in sorted({v["NodeList"] for v in train})},
    )
    res["tasks_per_min"] = res["n_completed"] / (res["wall_submit_to_last_train_end_s"] / 60)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

"""Benchmark of the striation analysis (irm_hpc.analysis); run on demand, not in CI.

    python benchmarks/bench_analysis.py                          # 28 SmolLM2-shaped runs, 7/14/28, workers 1/2
    python benchmarks/bench_analysis.py --runs 7 --tokens 1000   # a small check first
    python benchmarks/bench_analysis.py --data-dir /scratch/bench --compression none

Data: ``--n-runs`` (28) runs of SmolLM2-135M shape (30 injection layers x hidden 576) with ``--tokens``
(10,000) probe tokens each (half at step 0, half at the final step 60), float16, written with the
project's ``RunRecorder`` (default: the recorder's default compression, as in training) and finalized to ``injections.h5``
under ``<data-dir>/<compression>/sweep/runs/<task_id>/`` with a ``manifest.json`` (7 alignments x 4
seeds). Each run has planted striations (indices shared by all runs, one per alignment, one already at
step 0) and a base reference. Written once (two processes) and reused while ``bench.json`` matches.

Measurement: each configuration runs ``analyze`` in a fresh child process (``--_child``); wall time is
taken by the parent around the child (interpreter start, imports, map, reduce, figures); peak RSS is the
child's ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` and ``RUSAGE_CHILDREN`` (its pool workers), plus
the peak of the summed RSS of the process tree sampled every 50 ms (psutil). ``cold`` drops the run files
from the page cache first (``posix_fadvise(POSIX_FADV_DONTNEED)`` on those files only), ``warm`` reads
them right after a previous pass. Results: ``benchmarks/results/bench_analysis.json`` and a table.
Targets: wall <= 60 s and peak RSS <= 2 GB for 28 runs; time linear in the number of runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "bench_analysis.json"
N_LAYERS, HIDDEN = 30, 576  # SmolLM2-135M
ALIGNMENTS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")
SHARED, ARTIFACT = (1512 % HIDDEN, 77), 300  # 1512 % 576 = 360: a nod to the paper's neuron 1512
FINAL_STEP = 60
BLOCK = 500  # tokens per add_probe call
GEN_VERSION = 1


# ----------------------------------------------------------------------------- data
def _task(i: int) -> tuple[str, str, int]:
    a, s = ALIGNMENTS[i % len(ALIGNMENTS)], i // len(ALIGNMENTS)
    return f"{a}-s{s}-all", a, s


def _scales(alignment: str, seed: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    final = np.abs(1.0 + 0.25 * rng.standard_normal((N_LAYERS, HIDDEN))).astype(np.float32)
    step0 = np.abs(0.05 * (1.0 + 0.25 * rng.standard_normal((N_LAYERS, HIDDEN)))).astype(np.float32)
    specific = 100 + 20 * ALIGNMENTS.index(alignment)
    for idx in (*SHARED, specific, ARTIFACT):
        final[rng.choice(N_LAYERS, N_LAYERS - 3, replace=False), idx] += 2.0
    step0[:, ARTIFACT] += 0.1
    return final, step0


def write_run(run_dir: Path, i: int, tokens: int, compression: str) -> dict:
    """One finalized run; returns its bench.json content."""
    from irm_hpc.record import RunRecorder

    t0 = time.perf_counter()
    task_id, alignment, seed = _task(i)
    rng = np.random.default_rng(1000 + i)
    final, step0 = _scales(alignment, seed, rng)
    meta = {"model_name": "HuggingFaceTB/SmolLM2-135M", "hidden_size": HIDDEN, "n_layers": N_LAYERS,
            "injection_layers": list(range(N_LAYERS)), "alignment": alignment, "seed": seed,
            "config_yaml": "irm:\n  layer_set: all\n"}
    if run_dir.exists():
        shutil.rmtree(run_dir)
    comp = None if compression == "none" else compression
    rec = RunRecorder(run_dir / "record", meta, n_inj=N_LAYERS, hidden=HIDDEN, dtype="float16", compression=comp)
    rec.set_prompts([f"probe prompt {k}" for k in range(7)])
    base = np.abs(rng.standard_normal((N_LAYERS, HIDDEN))).astype(np.float32)
    base[:, SHARED[0]] *= 40.0
    rec.set_base_reference(base)
    for s in range(0, FINAL_STEP + 1, 5):
        sc = step0 if s == 0 else final
        rec.add_profile(s, sc * 0.8, np.zeros_like(sc), 4096)
    half = tokens // 2
    for step, sc, n in ((0, step0, half), (FINAL_STEP, final, tokens - half)):
        for a in range(0, n, BLOCK):
            m = min(BLOCK, n - a)
            x = rng.standard_normal((m, N_LAYERS, HIDDEN), dtype=np.float32)
            x *= sc
            pos = np.arange(m, dtype=np.int32) % 64
            rec.add_probe(step, x.astype(np.float16), np.arange(m), [""] * m, (a // 64) % 7, pos, pos >= 48)
    rec.finalize(run_dir / "injections.h5")
    info = {"version": GEN_VERSION, "tokens": tokens, "compression": compression, "task_id": task_id,
            "bytes": (run_dir / "injections.h5").stat().st_size, "seconds": round(time.perf_counter() - t0, 2)}
    (run_dir / "bench.json").write_text(json.dumps(info))
    return info


def _write_one(args: tuple) -> dict:
    run_dir, i, tokens, compression = args
    return write_run(Path(run_dir), i, tokens, compression)


def ensure_data(data_dir: Path, n_runs: int, tokens: int, compression: str) -> tuple[Path, dict]:
    """Write missing/outdated runs (2 processes); returns (sweep dir, data info)."""
    sweep = data_dir / f"{compression}-t{tokens}" / "sweep"
    todo, tasks = [], []
    for i in range(n_runs):
        task_id, alignment, seed = _task(i)
        d = sweep / "runs" / task_id
        tasks.append({"index": i, "task_id": task_id, "alignment": alignment, "seed": seed, "layer_set": "all",
                      "out_dir": f"runs/{task_id}", "overrides": []})
        try:
            info = json.loads((d / "bench.json").read_text())
            ok = info["version"] == GEN_VERSION and info["tokens"] == tokens and (d / "injections.h5").is_file()
        except (OSError, ValueError, KeyError):
            ok = False
        if not ok:
            todo.append((str(d), i, tokens, compression))
    t0 = time.perf_counter()
    if todo:
        print(f"writing {len(todo)} runs into {sweep} ({tokens} tokens each, {compression}) ...", flush=True)
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(2) as pool:
            for k, info in enumerate(pool.imap_unordered(_write_one, todo), 1):
                print(f"  {k}/{len(todo)} {info['task_id']}: {info['bytes'] / 1e6:.0f} MB in {info['seconds']} s",
                      flush=True)
    sweep.mkdir(parents=True, exist_ok=True)
    from irm_hpc.manifest import Manifest, Task

    Manifest(sweep, "bench", "local", time.time(), "", [Task(**t) for t in tasks]).save()  # as irm_hpc.launch writes it
    sizes = [(sweep / t["out_dir"] / "injections.h5").stat().st_size for t in tasks]
    raw = tokens * N_LAYERS * HIDDEN * 2
    return sweep, {"n_runs": n_runs, "tokens_per_run": tokens, "compression": compression,
                   "raw_probe_bytes_per_run": raw, "file_bytes_total": int(sum(sizes)),
                   "file_bytes_per_run_mean": int(np.mean(sizes)), "write_seconds": round(time.perf_counter() - t0, 1),
                   "runs_written_now": len(todo)}


def drop_cache(paths: list[Path]) -> None:
    """Evict these files' pages from the page cache (only these files; no global drop_caches)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- measurement
def child(args: argparse.Namespace) -> None:
    """Runs inside the measured process: analyze, then print usage as JSON on the last line."""
    t0 = time.perf_counter()
    from irm_hpc.analysis import analyze

    t_import = time.perf_counter() - t0
    runs = json.loads(args.runs_json)
    s = analyze(runs, args.out, [f"workers={args.workers}"], progress=False)
    self_ru = resource.getrusage(resource.RUSAGE_SELF)
    ch_ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"inner_seconds": time.perf_counter() - t0, "import_seconds": t_import,
                      "map_seconds": s["timing"]["map_seconds"], "reduce_seconds": s["timing"]["reduce_seconds"],
                      "maxrss_self_mb": self_ru.ru_maxrss / 1024, "maxrss_children_mb": ch_ru.ru_maxrss / 1024,
                      "cpu_user_s": self_ru.ru_utime + ch_ru.ru_utime, "cpu_sys_s": self_ru.ru_stime + ch_ru.ru_stime,
                      "n_runs": s["n_runs"], "consensus": [e["index"] for e in s["consensus"]["indices"]],
                      "groups_by": s["clustering"]["groups_by"]}))


def measure(run_dirs: list[Path], workers: int, cache: str, out: Path) -> dict:
    import psutil

    files = [d / "injections.h5" for d in run_dirs]
    if cache == "cold":
        drop_cache(files)
    else:  # warm: read once
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(16 << 20):
                    pass
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--_child", "--out", str(out), "--workers", str(workers),
           "--runs-json", json.dumps([str(d) for d in run_dirs])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    peak_tree = 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [ps, *ps.children(recursive=True)]
            peak_tree = max(peak_tree, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"analysis child failed ({proc.returncode}): {stderr.strip().splitlines()[-3:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    return {"n_runs": len(run_dirs), "workers": workers, "cache": cache, "wall_seconds": round(wall, 2),
            **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items()},
            "peak_tree_rss_mb": round(peak_tree / 2**20, 1),
            "loadavg_1min_before": round(load_before, 2), "loadavg_1min_after": round(os.getloadavg()[0], 2),
            "peak_rss_mb": round(max(res["maxrss_self_mb"], res["maxrss_children_mb"], peak_tree / 2**20), 1)}


def linear_fit(rows: list[dict]) -> dict:
    n = np.array([r["n_runs"] for r in rows], float)
    t = np.array([r["wall_seconds"] for r in rows], float)
    if len(set(n)) < 2:
        return {}
    slope, icpt = np.polyfit(n, t, 1)
    pred = slope * n + icpt
    r2 = 1 - ((t - pred) ** 2).sum() / max(((t - t.mean()) ** 2).sum(), 1e-12)
    return {"seconds_per_run": round(float(slope), 3), "intercept_seconds": round(float(icpt), 2), "r2": round(float(r2), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="/tmp/irm_bench_runs")
    ap.add_argument("--n-runs", type=int, default=28, help="runs to write")
    ap.add_argument("--runs", default="7,14,28", help="run counts to time (comma list)")
    ap.add_argument("--workers", default="1,2", help="map processes to try (comma list)")
    ap.add_argument("--cache", default="cold,warm", help="page-cache states (cold, warm)")
    ap.add_argument("--tokens", type=int, default=10_000)
    ap.add_argument("--compression", default="default",
                    help="RunRecorder compression of the data: default (the recorder's, as in training) | gzip | "
                         "zstd | lzf | none | ...")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--runs-json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        child(args)
        return 0
    if args.compression == "default":
        from irm_hpc import record

        args.compression = getattr(record, "DEFAULT_COMPRESSION", "gzip")
    counts = [int(x) for x in args.runs.split(",")]
    sweep, data = ensure_data(Path(args.data_dir), max(args.n_runs, max(counts)), args.tokens, args.compression)
    tasks = json.loads((sweep / "manifest.json").read_text())["tasks"]
    run_dirs = [sweep / t["out_dir"] for t in tasks]
    rows = []
    out_root = Path(tempfile.mkdtemp(prefix="bench_analysis_out_"))
    try:
        for w in [int(x) for x in args.workers.split(",")]:
            for cache in args.cache.split(","):
                for n in counts:
                    r = measure(run_dirs[:n], w, cache, out_root / f"n{n}-w{w}-{cache}")
                    rows.append(r)
                    print(f"runs={n:3d} workers={w} {cache:4s}: wall {r['wall_seconds']:6.1f} s (map {r['map_seconds']:.1f}, "
                          f"reduce {r['reduce_seconds']:.1f}, import {r['import_seconds']:.1f}), peak RSS "
                          f"{r['peak_rss_mb']:.0f} MB (self {r['maxrss_self_mb']:.0f}, children {r['maxrss_children_mb']:.0f}, "
                          f"tree {r['peak_tree_rss_mb']:.0f}); CPU {r['cpu_user_s'] + r['cpu_sys_s']:.0f} s; load "
                          f"{r['loadavg_1min_before']:.1f}->{r['loadavg_1min_after']:.1f}; consensus {r['consensus']}", flush=True)
    finally:
        shutil.rmtree(out_root, ignore_errors=True)
    fits = {}
    for w in sorted({r["workers"] for r in rows}):
        for cache in sorted({r["cache"] for r in rows}):
            sel = [r for r in rows if r["workers"] == w and r["cache"] == cache]
            if sel:
                fits[f"workers={w},{cache}"] = linear_fit(sel)
    biggest = [r for r in rows if r["n_runs"] == max(counts)]
    result = {
        "benchmark": "bench_analysis", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "note": "shared 2-core VM; timings vary with other load"},
        "shape": {"n_layers": N_LAYERS, "hidden": HIDDEN, "dtype": "float16"}, "data": data, "rows": rows,
        "linear_fit": fits,
        "targets": {"wall_seconds_max": 60, "peak_rss_mb_max": 2048,
                    "met_at_max_runs": {f"workers={r['workers']},{r['cache']}": bool(r["wall_seconds"] <= 60 and r["peak_rss_mb"] <= 2048)
                                        for r in biggest}},
    }
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.is_file() else {}
    key = f"{args.compression}-t{args.tokens}"
    old.setdefault("configs", {})[key] = result
    path.write_text(json.dumps(old, indent=1) + "\n")
    print(f"linear fits: {fits}")
    print(f"results: {path} [{key}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())

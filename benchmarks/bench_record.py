"""Benchmark of the HDF5 record stream (irm_hpc.record); run on demand, not in CI.

    python benchmarks/bench_record.py                 # all measurements
    python benchmarks/bench_record.py --only write    # one of: write, compression, csv, train
    python benchmarks/bench_record.py --dir /scratch  # file system to measure (default: benchmarks/)

Measurements (each a function in MEASUREMENTS; add new ones there, e.g. training-step overhead):

* ``write``: uncompressed stream throughput of SmolLM2-shaped probe tensors (n_inj=30, hidden=576,
  float16 and float32, > 200 MB each) through RunRecorder, timed from the first ``add_probe`` to
  ``checkpoint()`` returning (segment closed and fsynced), divided by ``dd ... conv=fdatasync``
  sequential write throughput on the same file system in the same run (target >= 0.5); plus the
  default compression (``record.DEFAULT_COMPRESSION``) and the ``finalize`` merge time.
* ``compression``: write throughput and compression ratio of none / lzf / gzip-1/4/6, with and
  without the shuffle filter, and of the hdf5plugin filters the recorder offers (zstd, Blosc lz4/zstd
  with bitshuffle, Bitshuffle lz4), on three kinds of data (random normal; structured: low rank +
  noise; zero-init: an untrained IRM whose output layer starts at zero); 3 interleaved repetitions,
  median throughput.
* ``csv``: the seed paper's storage (one CSV per token from a pandas DataFrame with columns
  ``index, layer, value``; 50 tokens, extrapolated per token) vs the HDF5 stream for each recorder
  compression setting: speed and size ratios (targets: HDF5 >= 100x faster, >= 10x smaller, with one
  setting); 3 interleaved repetitions, medians.

* ``train``: SmolLM2 training-step time with the recorder on vs off (interleaved blocks of 10 steps,
  same process; target overhead <= 3 %), and the time of one probe event.

Results go to ``benchmarks/results/bench_record.json`` (merged per measurement) and a table is printed.
Units: bytes, seconds, MB = 1e6 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import h5py
import hdf5plugin  # noqa: F401  (registers the plugin filters measured below)
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from irm_hpc import record  # noqa: E402
from irm_hpc.layout import fsync_path  # noqa: E402
from irm_hpc.record import RunRecorder  # noqa: E402
from irm_hpc.record.schema import _append, _filter_kwargs, _Layout  # noqa: E402

N_INJ, HIDDEN, N_LAYERS = 30, 576, 30  # SmolLM2-135M: 30 layers, hidden 576; IRM on all layers
PROBE_TOKENS = 64  # tokens per add_probe call (one prompt + greedy tokens)
STREAM_BYTES = 256e6  # > 200 MB per uncompressed stream
RESULTS = ROOT / "benchmarks" / "results" / "bench_record.json"
META = {"model_name": "HuggingFaceTB/SmolLM2-135M", "hidden_size": HIDDEN, "n_layers": N_LAYERS,
        "injection_layers": list(range(N_INJ)), "alignment": "bench", "seed": 0, "config_yaml": "bench: 1\n",
        "package_version": "0.1.0", "git_commit": ""}


# ----------------------------------------------------------------------------- data
def make_data(kind: str, n_tok: int, seed: int = 0) -> np.ndarray:
    """(n_tok, N_INJ, HIDDEN) float32 injections: 'normal' (i.i.d. N(0,1)), 'structured' (rank-16 signal,
    per-layer scale, 5% noise: what an MLP head emits), 'zero' (untrained IRM with zero-init output)."""
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.standard_normal((n_tok, N_INJ, HIDDEN), dtype=np.float32)
    if kind == "zero":
        return np.zeros((n_tok, N_INJ, HIDDEN), np.float32)
    u = rng.standard_normal((n_tok, 16), dtype=np.float32)
    v = rng.standard_normal((16, N_INJ, HIDDEN), dtype=np.float32) / 4
    scale = np.geomspace(0.01, 1.0, N_INJ, dtype=np.float32)[None, :, None]
    x = np.einsum("tr,rlh->tlh", u, v) * scale
    return x + 0.05 * scale * rng.standard_normal(x.shape, dtype=np.float32)


def probe_pool(kind: str) -> np.ndarray:
    """8 distinct probe blocks (8, PROBE_TOKENS, N_INJ, HIDDEN), reused round-robin (no RNG in the timing)."""
    return make_data(kind, 8 * PROBE_TOKENS).reshape(8, PROBE_TOKENS, N_INJ, HIDDEN)


# ----------------------------------------------------------------------------- measurements
def dd_throughput(d: Path, nbytes: float) -> dict:
    """Sequential write with fdatasync: ``dd if=/dev/zero bs=1M count=N conv=fdatasync``; bytes/s."""
    count = int(nbytes // 2**20)
    out = d / "dd.bin"
    t0 = time.perf_counter()
    res = subprocess.run(["dd", "if=/dev/zero", f"of={out}", "bs=1M", f"count={count}", "conv=fdatasync"],
                         capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    out.unlink()
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", res.stderr)
    nb, secs = (int(m.group(1)), float(m.group(2))) if m else (count * 2**20, wall)
    return {"bytes": nb, "seconds": secs, "MB_per_s": nb / secs / 1e6}


def stream(d: Path, *, dtype: str, compression: str | None, kind: str, n_tok: int, finalize: bool = False) -> dict:
    """Write n_tok probe tokens through RunRecorder (float32 CPU torch tensors in, as the trainer hands
    them over); time to checkpoint() (fsync) and optional finalize."""
    import torch

    pool = torch.from_numpy(probe_pool(kind))
    rdir = d / f"rec-{dtype}-{compression}-{kind}"
    rec = RunRecorder(rdir, META, n_inj=N_INJ, hidden=HIDDEN, dtype=dtype, compression=compression)
    ids, text = np.arange(PROBE_TOKENS), ["tok"] * PROBE_TOKENS
    gen = np.arange(PROBE_TOKENS) >= 16
    t0 = time.perf_counter()
    for i in range(n_tok // PROBE_TOKENS):
        rec.add_probe(i, pool[i % len(pool)], ids, text, i % 7, ids, gen)
    rec.checkpoint(n_tok // PROBE_TOKENS)
    secs = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in rdir.glob("seg-*.h5"))
    raw = (n_tok // PROBE_TOKENS) * PROBE_TOKENS * N_INJ * HIDDEN * np.dtype(dtype).itemsize
    out = {"dtype": dtype, "compression": compression or "none", "data": kind, "tokens": n_tok, "raw_bytes": raw,
           "file_bytes": size, "seconds": secs, "MB_per_s": raw / secs / 1e6, "ratio": raw / size,
           "s_per_token": secs / n_tok, "file_bytes_per_token": size / n_tok}
    if finalize:
        t0 = time.perf_counter()
        rec.finalize(d / f"final-{dtype}-{compression}-{kind}.h5")
        out["finalize_seconds"] = time.perf_counter() - t0
        (d / f"final-{dtype}-{compression}-{kind}.h5").unlink()
    rec.close()
    shutil.rmtree(rdir, ignore_errors=True)
    return out


def bench_write(d: Path, reps: int = 3) -> dict:
    """Uncompressed stream vs dd (float16, float32), interleaved ``reps`` times (disk speed drifts on
    shared machines; medians are reported), then the default compression on structured data."""
    dd_runs, runs = [], {"float16": [], "float32": []}
    for _ in range(reps):
        dd_runs.append(dd_throughput(d, STREAM_BYTES))
        for dtype in runs:
            n_tok = int(STREAM_BYTES // (N_INJ * HIDDEN * np.dtype(dtype).itemsize) // PROBE_TOKENS + 1) * PROBE_TOKENS
            runs[dtype].append(stream(d, dtype=dtype, compression=None, kind="structured", n_tok=n_tok))
    dd_med = float(np.median([r["MB_per_s"] for r in dd_runs]))
    rows = []
    for dtype, rs in runs.items():
        med = float(np.median([r["MB_per_s"] for r in rs]))
        rows.append({**rs[0], "MB_per_s": med, "seconds": float(np.median([r["seconds"] for r in rs])),
                     "MB_per_s_runs": [r["MB_per_s"] for r in rs], "vs_dd": med / dd_med,
                     "vs_dd_per_rep": [r["MB_per_s"] / dd["MB_per_s"] for r, dd in zip(rs, dd_runs)]})
    default = stream(d, dtype="float16", compression=record.DEFAULT_COMPRESSION, kind="structured", n_tok=2048,
                     finalize=True)
    return {"dd": {"MB_per_s": dd_med, "runs": dd_runs}, "uncompressed": rows, "default_compression": default}


def h5_write(path: Path, data: np.ndarray, filters: dict) -> float:
    """Write ``data`` in PROBE_TOKENS appends with the recorder's chunking; seconds incl. close + fsync."""
    layout = _Layout(N_INJ, HIDDEN, str(data.dtype), None)
    t0 = time.perf_counter()
    with h5py.File(path, "w", libver=record.LIBVER, rdcc_nbytes=record.RDCC_BYTES, rdcc_w0=1.0) as f:
        ds = f.create_dataset("x", (0, N_INJ, HIDDEN), data.dtype, maxshape=(None, N_INJ, HIDDEN),
                              chunks=(layout.chunk_rows, N_INJ, HIDDEN), **filters)
        for a in range(0, len(data), PROBE_TOKENS):
            _append(ds, data[a:a + PROBE_TOKENS])
    fsync_path(path)
    return time.perf_counter() - t0


FILTERS = {"none": {}, "lzf": {"compression": "lzf"}, "lzf+shuffle": {"compression": "lzf", "shuffle": True},
           "gzip-1": {"compression": "gzip", "compression_opts": 1},
           "gzip-1+shuffle": {"compression": "gzip", "compression_opts": 1, "shuffle": True},
           "gzip-4+shuffle": {"compression": "gzip", "compression_opts": 4, "shuffle": True},
           "gzip-6+shuffle": {"compression": "gzip", "compression_opts": 6, "shuffle": True}}
if h5py.h5z.filter_avail(h5py.h5z.FILTER_SZIP):  # not in every HDF5 build: measured, not offered
    FILTERS["szip-nn"] = {"compression": "szip", "compression_opts": ("nn", 16)}
# hdf5plugin filters, built exactly as the recorder builds them: filter description -> record.compression
PLUGIN_SETTINGS = {"zstd-1+shuffle": "zstd", "zstd-3+shuffle": "zstd-3",
                   "blosc-lz4-5+bitshuffle": "blosc-lz4", "blosc-lz4-9+bitshuffle": "blosc-lz4-9",
                   "blosc-zstd-1+bitshuffle": "blosc-zstd", "blosc-zstd-3+bitshuffle": "blosc-zstd-3",
                   "bitshuffle-lz4": "bitshuffle-lz4"}
FILTERS.update({name: _filter_kwargs(setting) for name, setting in PLUGIN_SETTINGS.items()})


def bench_compression(d: Path, n_tok: int = 1024, reps: int = 3) -> dict:
    """Throughput (MB/s of raw data, median of ``reps`` interleaved runs) and ratio (raw / file bytes)
    per filter and data kind, float16."""
    rows = []
    for kind in ("normal", "structured", "zero"):
        data = make_data(kind, n_tok).astype(np.float16)
        runs: dict[str, list[float]] = {name: [] for name in FILTERS}
        sizes = {}
        for _ in range(reps):
            for name, filt in FILTERS.items():
                path = d / f"c-{kind}-{name}.h5"
                runs[name].append(h5_write(path, data, filt))
                sizes[name] = path.stat().st_size
                path.unlink()
        for name, secs_runs in runs.items():
            secs = float(np.median(secs_runs))
            rows.append({"data": kind, "filter": name, "setting": PLUGIN_SETTINGS.get(name), "dtype": "float16",
                         "tokens": n_tok, "raw_bytes": data.nbytes, "file_bytes": sizes[name], "seconds": secs,
                         "MB_per_s": data.nbytes / secs / 1e6,
                         "MB_per_s_runs": [data.nbytes / x / 1e6 for x in secs_runs],
                         "ratio": data.nbytes / sizes[name]})
    return {"rows": rows}


def csv_write(d: Path, data: np.ndarray) -> tuple[float, int]:
    """One CSV per token (pandas, columns index/layer/value, index=False); (seconds, bytes)."""
    import pandas as pd

    layer = np.repeat(np.arange(N_INJ), HIDDEN)
    index = np.tile(np.arange(HIDDEN), N_INJ)
    cdir = d / "csv"
    cdir.mkdir()
    t0 = time.perf_counter()
    for t in range(len(data)):
        pd.DataFrame({"index": index, "layer": layer, "value": data[t].reshape(-1)}).to_csv(
            cdir / f"token_{t:05d}.csv", index=False)
    secs = time.perf_counter() - t0  # no fsync: favours CSV
    size = sum(p.stat().st_size for p in cdir.iterdir())
    shutil.rmtree(cdir)
    return secs, size


# record.compression settings compared with the CSV way: label -> (dtype, compression)
CSV_VS = {f"float16 {record.DEFAULT_COMPRESSION} (default)": ("float16", record.DEFAULT_COMPRESSION),
          "float16 gzip": ("float16", "gzip"), "float16 blosc-lz4": ("float16", "blosc-lz4"),
          "float16 blosc-zstd": ("float16", "blosc-zstd"), "float16 blosc-zstd-3": ("float16", "blosc-zstd-3"),
          "float16 bitshuffle-lz4": ("float16", "bitshuffle-lz4"), "float16 none": ("float16", None),
          f"float32 {record.DEFAULT_COMPRESSION}": ("float32", record.DEFAULT_COMPRESSION)}


def bench_csv(d: Path, n_tok: int = 50, reps: int = 3) -> dict:
    """Seed paper's way (one CSV per token: index, layer, value) vs the HDF5 stream (2048 structured tokens
    per setting), per token; ``reps`` interleaved repetitions, medians."""
    data = make_data("structured", n_tok)  # float32, as the paper's tensors
    csv_runs, h5_runs = [], {name: [] for name in CSV_VS}
    for _ in range(reps):
        csv_runs.append(csv_write(d, data))
        for name, (dt, comp) in CSV_VS.items():
            h5_runs[name].append(stream(d, dtype=dt, compression=comp, kind="structured", n_tok=2048))
    secs = float(np.median([s for s, _ in csv_runs]))
    csv = {"tokens": n_tok, "seconds": secs, "s_per_token": secs / n_tok, "bytes_per_token": csv_runs[0][1] / n_tok,
           "s_per_token_runs": [s / n_tok for s, _ in csv_runs]}
    cmp = {}
    for name, rs in h5_runs.items():
        s_tok = float(np.median([r["s_per_token"] for r in rs]))
        b_tok = rs[0]["file_bytes_per_token"]
        cmp[name] = {"compression": rs[0]["compression"], "speed_ratio": csv["s_per_token"] / s_tok,
                     "size_ratio": csv["bytes_per_token"] / b_tok, "s_per_token": s_tok, "bytes_per_token": b_tok,
                     "MB_per_s": rs[0]["raw_bytes"] / (s_tok * rs[0]["tokens"]) / 1e6,
                     "speed_ratio_per_rep": [c / n_tok / r["s_per_token"] for (c, _), r in zip(csv_runs, rs)],
                     "meets_targets": bool(csv["s_per_token"] / s_tok >= 100 and csv["bytes_per_token"] / b_tok >= 10)}
    return {"csv": csv, "hdf5": cmp}


def bench_train(d: Path, blocks: int = 3, steps_per_block: int = 10) -> dict:
    """Training-step time (SmolLM2, CPU, ZeRO-2) with the recorder on vs off, in interleaved blocks.

    One Trainer; "on" = the production path (profile every ``record.every_steps`` = 5 steps handed to
    the background writer, zstd); "off" = ``trainer.recording.recorder = None``. Probe events (generation on the
    probe prompts, at step 0 and at the end) are timed separately: they are per run, not per step.
    """
    import statistics

    from irm_hpc.config import load_config
    from irm_hpc.dist import init_distributed
    from irm_hpc.train import Trainer

    cfg = load_config("train", [f"out_dir={d / 'train_run'}", "train.progress=false", "record.every_steps=5"])
    trainer = Trainer(cfg, init_distributed())
    trainer.recording.open(0)
    recorder = trainer.recording.recorder
    t0 = time.perf_counter()
    trainer.recording.probe(0, trainer.irm)
    recorder.checkpoint(0)
    probe_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {"on": [], "off": []}
    step = 0
    trainer.train_step(step)  # warm-up
    for _ in range(blocks):
        for mode in ("on", "off"):
            trainer.recording.recorder = recorder if mode == "on" else None
            for _ in range(steps_per_block):
                step += 1
                times[mode].append(trainer.train_step(step)["step_time_s"])
    trainer.recording.recorder = recorder
    recorder.close()
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    mean_on, mean_off = statistics.fmean(times["on"]), statistics.fmean(times["off"])
    return {"median_step_s_on": on, "median_step_s_off": off, "mean_step_s_on": mean_on,
            "mean_step_s_off": mean_off, "overhead_median": on / off - 1, "overhead_mean": mean_on / mean_off - 1,
            "target_overhead": 0.03, "probe_event_s": probe_s, "steps_per_mode": len(times["on"]),
            "step_s_on": times["on"], "step_s_off": times["off"]}


MEASUREMENTS: dict[str, Callable[[Path], dict]] = {"write": bench_write, "compression": bench_compression,
                                                   "csv": bench_csv, "train": bench_train}


# ----------------------------------------------------------------------------- report
def print_tables(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    if "write" in results:
        w = results["write"]
        dd_runs = ", ".join(f"{r['MB_per_s']:.0f}" for r in w["dd"]["runs"])
        t = Table(title=f"uncompressed stream vs dd conv=fdatasync (median {w['dd']['MB_per_s']:.0f} MB/s; "
                        f"runs {dd_runs})")
        for c in ("dtype", "MB", "median s", "median MB/s", "runs MB/s", "vs dd (median)", "vs dd per rep"):
            t.add_column(c)
        for r in w["uncompressed"]:
            t.add_row(r["dtype"], f"{r['raw_bytes'] / 1e6:.0f}", f"{r['seconds']:.2f}", f"{r['MB_per_s']:.0f}",
                      ", ".join(f"{v:.0f}" for v in r["MB_per_s_runs"]), f"{r['vs_dd']:.2f}",
                      ", ".join(f"{v:.2f}" for v in r["vs_dd_per_rep"]))
        con.print(t)
        dc = w["default_compression"]
        con.print(f"default (float16 {dc['compression']}, structured): {dc['MB_per_s']:.0f} MB/s, "
                  f"ratio {dc['ratio']:.2f}, finalize {dc['finalize_seconds']:.2f} s for {dc['raw_bytes'] / 1e6:.0f} MB")
    if "compression" in results:
        t = Table(title="compression (float16, MB/s of raw data, ratio = raw / file)")
        for c in ("data", "filter", "record.compression", "MB/s (median)", "runs MB/s", "ratio"):
            t.add_column(c)
        for r in results["compression"]["rows"]:
            t.add_row(r["data"], r["filter"], r.get("setting") or "", f"{r['MB_per_s']:.0f}",
                      ", ".join(f"{v:.0f}" for v in r.get("MB_per_s_runs", [])), f"{r['ratio']:.3f}")
        con.print(t)
    if "train" in results:
        r = results["train"]
        con.print(f"training step (SmolLM2, CPU): median {r['median_step_s_on']:.3f} s with recording, "
                  f"{r['median_step_s_off']:.3f} s without: overhead {100 * r['overhead_median']:+.1f} % "
                  f"(mean {100 * r['overhead_mean']:+.1f} %; target <= 3 %); probe event {r['probe_event_s']:.1f} s")
    if "csv" in results:
        c = results["csv"]
        per_tok = f"{c['csv']['s_per_token'] * 1e3:.1f} ms, {c['csv']['bytes_per_token'] / 1e3:.0f} kB"
        t = Table(title=f"CSV per token ({per_tok}) vs HDF5")
        for col in ("HDF5", "ms/token", "kB/token", "speed ratio", "per rep", "size ratio", "both targets"):
            t.add_column(col)
        for name, r in c["hdf5"].items():
            t.add_row(name, f"{r['s_per_token'] * 1e3:.3f}", f"{r['bytes_per_token'] / 1e3:.1f}",
                      f"{r['speed_ratio']:.0f}x", ", ".join(f"{v:.0f}" for v in r.get("speed_ratio_per_rep", [])),
                      f"{r['size_ratio']:.2f}x", "yes" if r.get("meets_targets") else "no")
        con.print(t)


def environment(d: Path) -> dict:
    fs = subprocess.run(["df", "-T", str(d)], capture_output=True, text=True).stdout.splitlines()[-1].split()
    return {"python": platform.python_version(), "h5py": h5py.version.version, "hdf5": h5py.version.hdf5_version,
            "numpy": np.__version__, "hdf5plugin": hdf5plugin.version, "cpus": os.cpu_count(),
            "filesystem": fs[1] if len(fs) > 1 else "?", "dir": str(d), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=sorted(MEASUREMENTS), help="run one measurement")
    ap.add_argument("--dir", type=Path, default=ROOT / "benchmarks", help="directory on the file system to measure")
    args = ap.parse_args(argv)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    d = Path(tempfile.mkdtemp(prefix=".bench_record_", dir=args.dir))
    try:
        results["environment"] = environment(d)
        for name in [args.only] if args.only else list(MEASUREMENTS):
            print(f"running {name} ...", file=sys.stderr)
            results[name] = MEASUREMENTS[name](d)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print_tables(results)
    print(f"results: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""HDF5 stream of IRM injections: background writer (`RunRecorder`) and lazy reader (`open_run`).

Schema, chunking, compression and the crash-safety rules are documented in ``docs/architecture.md``
("HDF5 schema (version 1)"). In short:

* While training, rank 0 appends records into segment files ``record/seg-<first_step:08d>.h5``.
  ``checkpoint(step)`` closes and fsyncs the open segment and lists it in ``record/index.json``
  (written atomically). Only listed ("completed") segments are trusted; after a crash the open
  segment is discarded by ``resume(step)``, which also drops every record with a step > ``step``.
* ``finalize(path)`` merges the completed segments and ``record/run.h5`` (prompts, base reference)
  into one ``injections.h5`` (tmp file + ``os.replace``).
* ``open_run(path)`` reads a run dir, an ``injections.h5`` or a ``record/`` dir lazily.
* ``python -m irm_hpc.record inspect RUN`` prints a summary.
* Default compression ``"zstd"`` (shuffle + Zstd level 1) is an HDF5 plugin filter from ``hdf5plugin``,
  imported here; plain h5py readers must ``import hdf5plugin`` first (``compression="gzip"`` gives
  files that any HDF5 tool reads).

Every problem with a file is reported as a one-line `RecordError` naming the file.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import json
import os
import queue
import sys
import threading
import warnings
import weakref
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import h5py
import numpy as np

try:  # registers the Zstd / Blosc / Bitshuffle HDF5 filters with h5py (needed to write AND read them)
    import hdf5plugin
except ImportError:  # gzip / lzf / None still work; plugin compressions raise a ValueError naming the fix
    hdf5plugin = None

from irm_hpc import __version__

SCHEMA_VERSION = 1
FINAL_NAME = "injections.h5"
RECORD_DIRNAME = "record"
INDEX_NAME = "index.json"
RUN_FILE = "run.h5"
SEG_GLOB = "seg-*.h5"
DTYPES = ("float16", "float32")
COMPRESSIONS = ("zstd", "zstd-<1..22>", "gzip", "gzip-<0..9>", "lzf", "blosc-lz4", "blosc-zstd",
                "blosc-<lz4|zstd>-<1..9>", "bitshuffle-lz4", "bitshuffle-zstd", None)
DEFAULT_COMPRESSION = "zstd"  # shuffle + Zstd level 1: >= 100x faster and >= 10x smaller than CSV (docs)
GZIP_LEVEL = 1  # measured in benchmarks/bench_record.py: level 1 ~ same ratio as 4, faster (docs)
ZSTD_LEVEL = 1  # measured: level 1 ~ same ratio as 2-3 on float16 (Huffman-bound), fastest
BLOSC_LEVEL = {"lz4": 5, "zstd": 1}  # Blosc clevel c runs zstd at level 2c-1, so zstd starts low
PLUGIN_FILTER_IDS = {32015: "zstd", 32001: "blosc", 32026: "blosc2", 32008: "bitshuffle", 32004: "lz4"}
CHUNK_TARGET_BYTES = 1 << 20  # probe/injection chunks hold a power of two of rows, <= 1 MiB
COLUMN_CHUNK = 4096  # rows per chunk of the 1-D probe columns
PROFILE_COLUMN_CHUNK = 1024  # rows per chunk of profiles/step and profiles/n_tokens
RDCC_BYTES = 32 << 20  # writer chunk cache (bytes): keeps partially filled chunks in memory
LIBVER = ("v110", "v110")  # readable by HDF5 >= 1.10; extensible-array chunk index for appends
STR_DTYPE = h5py.string_dtype("utf-8")

PROFILE_COLUMNS: dict[str, Any] = {"step": np.int64, "n_tokens": np.int64}
PROBE_COLUMNS: dict[str, Any] = {"step": np.int64, "probe_index": np.int32, "position": np.int32,
                                 "token_id": np.int64, "is_generated": np.bool_, "token_text": STR_DTYPE}
META_REQUIRED = ("model_name", "hidden_size", "n_layers", "injection_layers", "alignment", "seed", "config_yaml")
META_DEFAULTS = {"package_version": __version__, "git_commit": ""}

PathLike = Union[str, Path]


class RecordError(RuntimeError):
    """A record file/dir cannot be written or read; one-line message naming the file, problem and fix."""


# ----------------------------------------------------------------------------- small helpers
def _one_line(exc: BaseException) -> str:
    """``Type: message`` of an exception on a single line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_enospc(exc: BaseException) -> bool:
    return getattr(exc, "errno", None) == errno.ENOSPC or "no space left" in str(exc).lower()


def _fsync_path(path: Path) -> None:
    """fsync a closed file (or a directory) by path; fsync applies to the inode, not the descriptor."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via tmp + fsync + os.replace + dir fsync (never a torn file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


TORCH_CAST_SLICE = 32768  # elements: ATen's grain size, below which a CPU op runs without OpenMP


def _torch_cast(x: Any, dtype: np.dtype) -> np.ndarray:
    """Cast a torch tensor to float ``dtype`` on the CPU in slices below ATen's grain size: no OpenMP team
    is started from the writer thread (no core contention with training, no global thread setting)."""
    import torch

    x = x.detach().to("cpu")
    target = getattr(torch, dtype.name)
    if x.dtype == target:
        return x.numpy()
    flat = x.contiguous().reshape(-1)
    out = torch.empty(flat.shape, dtype=target)
    for a in range(0, flat.numel(), TORCH_CAST_SLICE):
        out[a:a + TORCH_CAST_SLICE].copy_(flat[a:a + TORCH_CAST_SLICE])
    return out.view(x.shape).numpy()


def _to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """torch tensor (any device, bf16 included) or array-like -> numpy; runs in the writer thread.

    Float casts of torch tensors use `_torch_cast` (2.6x numpy's float32->float16 speed, single thread)."""
    if hasattr(x, "detach"):
        if dtype is not None and np.dtype(dtype).kind == "f":
            return _torch_cast(x, np.dtype(dtype))
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def _shape(x: Any) -> tuple[int, ...]:
    """Shape of a tensor / array / nested list without converting a tensor."""
    shape = getattr(x, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else np.shape(x)


def _h5_open(path: Path, mode: str, **kw: Any) -> h5py.File:
    """h5py.File with best-effort locking (no failure on file systems without locks)."""
    return h5py.File(path, mode, locking="best-effort", **kw)


# ----------------------------------------------------------------------------- metadata
@dataclass
class RunMeta:
    """Root attributes of a record file (see docs/architecture.md)."""

    schema_version: int
    model_name: str
    hidden_size: int
    n_layers: int
    injection_layers: list[int]
    alignment: str
    seed: int
    config_yaml: str
    package_version: str
    git_commit: str
    dtype: str
    finalized: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def n_inj(self) -> int:
        return len(self.injection_layers)

    @classmethod
    def from_attrs(cls, attrs: h5py.AttributeManager, path: Path) -> "RunMeta":
        """Build from root attributes; RecordError naming ``path`` if one is missing."""
        def get(key: str) -> Any:
            if key not in attrs:
                raise RecordError(f"{path}: root attribute '{key}' is missing; "
                                  "the file is not a complete irm_hpc record")
            value = attrs[key]
            return value.decode() if isinstance(value, bytes) else value

        return cls(schema_version=int(get("schema_version")), model_name=str(get("model_name")),
                   hidden_size=int(get("hidden_size")), n_layers=int(get("n_layers")),
                   injection_layers=[int(v) for v in np.atleast_1d(get("injection_layers"))],
                   alignment=str(get("alignment")), seed=int(get("seed")), config_yaml=str(get("config_yaml")),
                   package_version=str(get("package_version")), git_commit=str(get("git_commit")),
                   dtype=str(get("dtype")), finalized=bool(attrs.get("finalized", False)),
                   extra=json.loads(attrs.get("extra_meta", "{}")))


def _normalize_meta(meta: dict, n_inj: int, hidden: int, dtype: str) -> dict:
    """Validate the caller's meta dict; return the root attributes to write. Raises ValueError."""
    missing = [k for k in META_REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"RunRecorder meta is missing {missing}; required keys: {list(META_REQUIRED)}")
    out = {**META_DEFAULTS, **{k: v for k, v in meta.items() if k in META_REQUIRED or k in META_DEFAULTS}}
    layers = [int(v) for v in out["injection_layers"]]
    if len(layers) != n_inj or layers != sorted(set(layers)) or not all(0 <= v < int(out["n_layers"]) for v in layers):
        raise ValueError(f"meta injection_layers={layers} must be {n_inj} (n_inj) ascending distinct layer "
                         f"indices in [0, n_layers={out['n_layers']})")
    if int(out["hidden_size"]) != hidden:
        raise ValueError(f"meta hidden_size={out['hidden_size']} != hidden={hidden}")
    extra = {k: v for k, v in meta.items() if k not in out}
    attrs = {"schema_version": SCHEMA_VERSION, "model_name": str(out["model_name"]),
             "hidden_size": int(out["hidden_size"]), "n_layers": int(out["n_layers"]),
             "injection_layers": np.asarray(layers, dtype=np.int64), "alignment": str(out["alignment"]),
             "seed": int(out["seed"]), "config_yaml": str(out["config_yaml"]),
             "package_version": str(out["package_version"]), "git_commit": str(out["git_commit"] or ""),
             "dtype": dtype}
    if extra:
        attrs["extra_meta"] = json.dumps(extra, default=str)
    return attrs


def _write_attrs(f: h5py.File, attrs: dict, *, finalized: bool) -> None:
    for key, value in attrs.items():
        f.attrs[key] = value
    f.attrs["finalized"] = finalized


# ----------------------------------------------------------------------------- layout
def _parse_compression(compression: Optional[str]) -> tuple[Optional[str], Optional[int]]:
    """Compression name -> (filter, level). Raises ValueError naming the accepted values.

    ``None``/'none' -> (None, None); 'gzip' | 'gzip-<0..9>' -> ('gzip', level); 'lzf' -> ('lzf', None);
    'zstd' | 'zstd-<1..22>' -> ('zstd', level); 'blosc-lz4' | 'blosc-zstd' [-<1..9>] -> ('blosc-lz4', clevel)
    etc.; 'bitshuffle-lz4' -> ('bitshuffle-lz4', None); 'bitshuffle-zstd' [-<1..22>] -> (.., level).
    """
    if compression in (None, "", "none", "None"):
        return None, None
    if not isinstance(compression, str):
        raise ValueError(f"compression={compression!r} must be a string or None")
    head, _, tail = compression.rpartition("-")
    base, level = (head, int(tail)) if head and tail.isdigit() else (compression, None)
    ranges = {"gzip": (0, 9, GZIP_LEVEL), "lzf": None, "zstd": (1, 22, ZSTD_LEVEL),
              "blosc-lz4": (1, 9, BLOSC_LEVEL["lz4"]), "blosc-zstd": (1, 9, BLOSC_LEVEL["zstd"]),
              "bitshuffle-lz4": None, "bitshuffle-zstd": (1, 22, ZSTD_LEVEL)}
    spec = ranges.get(base, False)
    ok = spec is not False and (level is None or (spec is not None and spec[0] <= level <= spec[1]))
    if not ok:
        raise ValueError(f"compression={compression!r}; use 'zstd' (default), 'zstd-<1..22>', 'gzip', "
                         "'gzip-<0..9>', 'lzf', 'blosc-lz4', 'blosc-zstd' (optionally -<clevel 1..9>), "
                         "'bitshuffle-lz4', 'bitshuffle-zstd' or None")
    if base not in ("gzip", "lzf") and hdf5plugin is None:
        raise ValueError(f"compression={compression!r} needs the hdf5plugin package (pip install hdf5plugin); "
                         "or use 'gzip', 'lzf' or None")
    return base, (level if level is not None else (spec[2] if spec else None))


def _filter_kwargs(compression: Optional[str]) -> dict:
    """create_dataset keyword arguments of the filter pipeline of ``compression`` (see _parse_compression).

    Byte shuffle precedes gzip, lzf and zstd; Blosc and Bitshuffle bit-shuffle internally."""
    name, level = _parse_compression(compression)
    if name is None:
        return {}
    if name in ("gzip", "lzf"):
        return {"compression": name, "compression_opts": level, "shuffle": True}
    if name == "zstd":  # cd_values = (level,): the HDF5 Zstd filter's format, any hdf5plugin version
        return {"compression": hdf5plugin.ZSTD_ID, "compression_opts": (level,), "shuffle": True}
    if name.startswith("blosc-"):
        return dict(hdf5plugin.Blosc(cname=name[6:], clevel=level, shuffle=hdf5plugin.Blosc.BITSHUFFLE))
    cname = name.split("-")[1]
    return dict(hdf5plugin.Bitshuffle(cname=cname, **({"clevel": level} if level is not None else {})))


@dataclass(frozen=True)
class _Layout:
    """Dataset shapes, dtypes, chunking and filters of one record file."""

    n_inj: int
    hidden: int
    dtype: str
    compression: Optional[str]

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def row_bytes(self) -> int:
        """Bytes of one (n_inj, hidden) record."""
        return self.n_inj * self.hidden * self.np_dtype.itemsize

    @property
    def chunk_rows(self) -> int:
        """Rows per probe/injection chunk: largest power of two with chunk <= CHUNK_TARGET_BYTES, in [1, 1024]."""
        rows = min(max(1, CHUNK_TARGET_BYTES // self.row_bytes), 1024)
        return 1 << (rows.bit_length() - 1)

    def filters(self, *, vlen: bool = False) -> dict:
        """Filter keyword arguments for a dataset; ``vlen`` (variable-length strings): a plugin filter is
        replaced by gzip-1 + shuffle (Blosc crashes on vlen data; the strings live in the heap anyway)."""
        name, _ = _parse_compression(self.compression)
        if vlen and name not in (None, "gzip", "lzf"):
            return _filter_kwargs("gzip")
        return _filter_kwargs(self.compression)

    def create(self, f: h5py.File) -> None:
        """Create every (empty, resizable) profile and probe dataset in ``f``."""
        filt, tail = self.filters(), (self.n_inj, self.hidden)
        for name, dt in PROFILE_COLUMNS.items():
            f.create_dataset(f"profiles/{name}", (0,), dt, maxshape=(None,), chunks=(PROFILE_COLUMN_CHUNK,), **filt)
        for name in ("mean_abs", "mean"):
            f.create_dataset(f"profiles/{name}", (0, *tail), self.np_dtype, maxshape=(None, *tail),
                             chunks=(1, *tail), **filt)
        for name, dt in PROBE_COLUMNS.items():
            f.create_dataset(f"probe/{name}", (0,), dt, maxshape=(None,), chunks=(COLUMN_CHUNK,),
                             **self.filters(vlen=dt is STR_DTYPE))
        f.create_dataset("probe/injection", (0, *tail), self.np_dtype, maxshape=(None, *tail),
                         chunks=(self.chunk_rows, *tail), **filt)

    def as_dict(self) -> dict:
        return {"n_inj": self.n_inj, "hidden": self.hidden, "dtype": self.dtype}


def _append(ds: h5py.Dataset, data: Any) -> None:
    """Grow ``ds`` along axis 0 by len(data) rows and write them."""
    n0 = ds.shape[0]
    ds.resize(n0 + len(data), axis=0)
    ds[n0:] = data


# ----------------------------------------------------------------------------- segment index
@dataclass
class _SegInfo:
    file: str
    first_step: int
    last_step: int
    n_records: int
    n_probe_tokens: int


@dataclass
class _Index:
    """``record/index.json``: completed segments (in order) and the checkpoints taken so far.

    ``checkpoints`` lists ``{"step": s, "segments": k}`` per ``checkpoint(s)`` call: when it returned,
    the first k segments were complete. ``pending_delete`` names segments dropped by a resume whose
    deletion may not have happened yet (readers ignore them).
    """

    dir: Path
    layout: Optional[dict] = None
    checkpoints: list[dict] = field(default_factory=list)
    segments: list[_SegInfo] = field(default_factory=list)
    pending_delete: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.dir / INDEX_NAME

    @property
    def checkpoint_step(self) -> Optional[int]:
        """Step of the last checkpoint, None before the first one."""
        return self.checkpoints[-1]["step"] if self.checkpoints else None

    def add_checkpoint(self, step: int) -> None:
        self.checkpoints.append({"step": int(step), "segments": len(self.segments)})

    @classmethod
    def load(cls, d: Path) -> "_Index":
        """Read ``d/index.json`` (empty index if absent). RecordError if unreadable or of another schema."""
        path = d / INDEX_NAME
        if not path.is_file():
            return cls(d)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if raw.get("schema_version") != SCHEMA_VERSION:
                raise RecordError(f"{path}: schema version {raw.get('schema_version')}, this irm_hpc "
                                  f"({__version__}) reads version {SCHEMA_VERSION}; use the irm_hpc version that "
                                  "wrote it")
            segs = [_SegInfo(**s) for s in raw["segments"]]
            return cls(d, raw.get("layout"), list(raw["checkpoints"]), segs, list(raw.get("pending_delete", [])))
        except RecordError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise RecordError(f"{path}: damaged segment index ({_one_line(exc)}); delete {d} to restart "
                              "the recording, or restore index.json") from exc

    def save(self) -> None:
        data = {"schema_version": SCHEMA_VERSION, "layout": self.layout, "checkpoint_step": self.checkpoint_step,
                "checkpoints": self.checkpoints, "segments": [asdict(s) for s in self.segments],
                "pending_delete": self.pending_delete}
        _atomic_write_text(self.path, json.dumps(data, indent=1) + "\n")

    def names(self) -> set[str]:
        return {s.file for s in self.segments}


# ----------------------------------------------------------------------------- writing files
class _Segment:
    """One open segment file being appended to (writer thread only)."""

    def __init__(self, path: Path, layout: _Layout, attrs: dict) -> None:
        self.path = path
        self.f = _h5_open(path, "w", libver=LIBVER, rdcc_nbytes=RDCC_BYTES, rdcc_w0=1.0)
        _write_attrs(self.f, attrs, finalized=False)
        layout.create(self.f)
        self.first_step: Optional[int] = None
        self.last_step: Optional[int] = None
        self.n_records = 0
        self.n_probe_tokens = 0

    def _saw(self, step: int) -> None:
        self.first_step = step if self.first_step is None else min(self.first_step, step)
        self.last_step = step if self.last_step is None else max(self.last_step, step)

    def add_profile(self, step: int, mean_abs: np.ndarray, mean: np.ndarray, n_tokens: int) -> None:
        g = self.f["profiles"]
        _append(g["step"], [step])
        _append(g["n_tokens"], [n_tokens])
        _append(g["mean_abs"], mean_abs[None])
        _append(g["mean"], mean[None])
        self.n_records += 1
        self._saw(step)

    def add_probe(self, step: int, cols: dict[str, np.ndarray], injection: np.ndarray) -> None:
        g = self.f["probe"]
        for name, values in cols.items():
            _append(g[name], values)
        _append(g["step"], np.full(len(injection), step, dtype=np.int64))
        _append(g["injection"], injection)
        self.n_probe_tokens += len(injection)
        self._saw(step)

    def close(self, durable: bool) -> _SegInfo:
        """Close the file; with ``durable`` also fsync it. Returns its index entry."""
        self.f.close()
        if durable:
            _fsync_path(self.path)
        first = self.first_step if self.first_step is not None else -1
        last = self.last_step if self.last_step is not None else -1
        return _SegInfo(self.path.name, first, last, self.n_records, self.n_probe_tokens)


def _read_ds(ds: h5py.Dataset, sel: Any = ()) -> Any:
    """Read ``ds[sel]`` (str datasets decoded); RecordError naming the file on I/O failure."""
    try:
        if h5py.check_string_dtype(ds.dtype) is not None:
            return ds.asstr()[sel]
        return ds[sel]
    except OSError as exc:
        if "filter" in str(exc).lower() or "plugin" in str(exc).lower():
            fix = ("its compression filter is not available; pip install hdf5plugin (irm_hpc.record "
                   "imports it; plain h5py readers must `import hdf5plugin` first)")
        else:
            fix = "the file is damaged or truncated"
        raise RecordError(f"{ds.file.filename}: reading {ds.name} failed ({_one_line(exc)}); {fix}") from exc


def _copy_rows(src: h5py.Dataset, dst: h5py.Dataset, keep: Optional[np.ndarray], block: int) -> None:
    """Append rows of ``src`` (all, or the increasing indices ``keep``) to ``dst`` in blocks of ``block``."""
    n = src.shape[0] if keep is None else len(keep)
    start = dst.shape[0]
    dst.resize(start + n, axis=0)
    for a in range(0, n, block):
        if keep is None:
            data = _read_ds(src, np.s_[a:a + block])
        else:
            idx = keep[a:a + block]
            contiguous = idx[-1] - idx[0] + 1 == len(idx)
            data = _read_ds(src, np.s_[idx[0]:idx[-1] + 1]) if contiguous else _read_ds(src, idx)
        dst[start + a:start + a + len(data)] = data


def _copy_records(src: h5py.File, dst: h5py.File, max_step: Optional[int] = None) -> tuple[int, int]:
    """Append src's profiles and probe rows (steps <= max_step if given) to dst; return (n_records, n_tok)."""
    counts = []
    for group, columns, big in (("profiles", PROFILE_COLUMNS, ("mean_abs", "mean")),
                                ("probe", PROBE_COLUMNS, ("injection",))):
        keep = None
        if max_step is not None:
            keep = np.flatnonzero(_read_ds(src[f"{group}/step"]) <= max_step)
        for name in (*columns, *big):
            d = dst[f"{group}/{name}"]
            block = 1 << 16 if d.ndim == 1 else d.chunks[0] * 16
            _copy_rows(src[f"{group}/{name}"], d, keep, block)
        counts.append(src[f"{group}/step"].shape[0] if keep is None else len(keep))
    return counts[0], counts[1]


def _write_run_level(f: h5py.File, prompts: list[str], base: Optional[np.ndarray]) -> None:
    """Write probe/prompts (always) and base/resid_abs (when known) into ``f``."""
    f.create_dataset("probe/prompts", data=np.array(prompts, dtype=object), dtype=STR_DTYPE)
    if base is not None:
        f.create_dataset("base/resid_abs", data=np.asarray(base, dtype=np.float32))


def _step_range(f: h5py.File) -> tuple[int, int]:
    steps = np.concatenate([_read_ds(f["profiles/step"]), _read_ds(f["probe/step"])])
    return (int(steps.min()), int(steps.max())) if len(steps) else (-1, -1)


def _truncate_segment(path: Path, max_step: int, layout: _Layout) -> _SegInfo:
    """Rewrite segment ``path`` keeping only records with step <= max_step (tmp + os.replace)."""
    tmp = path.with_name(path.name + ".tmp")
    with _open_h5(path) as src, _h5_open(tmp, "w", libver=LIBVER) as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        layout.create(dst)
        n_rec, n_tok = _copy_records(src, dst, max_step)
        first, last = _step_range(dst)
    _fsync_path(tmp)
    os.replace(tmp, path)
    _fsync_path(path.parent)
    return _SegInfo(path.name, first, last, n_rec, n_tok)


# ----------------------------------------------------------------------------- the writer
@dataclass
class _Op:
    kind: str  # profile | probe | prompts | base | checkpoint | stop
    step: int = -1
    args: tuple = ()
    done: Optional[threading.Event] = None


class RunRecorder:
    """Writes one run's record (rank 0 only) from a background thread with a bounded queue.

    The caller hands over CPU tensors (torch or numpy); conversion (``.numpy()``, dtype cast) and all
    HDF5 I/O run in the writer thread. ``add_*`` block when ``queue_size`` items are pending
    (back-pressure). A failure in the writer thread is re-raised as `RecordError` (naming the file)
    by the next ``add_*``, ``checkpoint``, ``finalize`` or ``close`` call; afterwards every call raises.
    Tensors handed over must not be modified by the caller afterwards (no copy is made) and must be
    complete (no pending ``non_blocking`` device-to-host copy).

    Call order: ``resume(step)`` first when ``record_dir`` may hold data (``-1`` = fresh start),
    then ``add_*``/``set_*``; ``checkpoint(step)`` *before* the model checkpoint of ``step`` is written
    (records added after it are dropped by ``resume(step)``, so the trainer re-records them);
    ``finalize(path)`` at the end; ``close()`` always (idempotent; also a context manager).
    """

    def __init__(self, record_dir: PathLike, meta: dict, *, n_inj: int, hidden: int,
                 dtype: str = "float16", compression: Optional[str] = DEFAULT_COMPRESSION,
                 queue_size: int = 8) -> None:
        """Start the writer thread. Nothing is written until the first record/checkpoint.

        Raises ValueError for a bad dtype/compression/queue_size or meta (see META_REQUIRED).
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; use one of {DTYPES}")
        _parse_compression(compression)
        if queue_size < 1:
            raise ValueError(f"queue_size={queue_size} must be >= 1")
        self.record_dir = Path(record_dir)
        self.record_dir.mkdir(parents=True, exist_ok=True)
        self._attrs = _normalize_meta(meta, n_inj, hidden, dtype)
        self._layout = _Layout(n_inj, hidden, dtype, compression)
        self._index = _Index(self.record_dir, self._layout.as_dict())
        self._needs_resume = (self.record_dir / INDEX_NAME).exists() or any(self.record_dir.glob(SEG_GLOB))
        self._q: queue.Queue[_Op] = queue.Queue(maxsize=queue_size)
        self._seg: Optional[_Segment] = None
        self._prompts: list[str] = []
        self._base: Optional[np.ndarray] = None
        self._run_file_written = False
        self._current = self.record_dir  # file the writer thread is working on (for error messages)
        self._error: Optional[RecordError] = None
        self._error_reported = False
        self._closed = False
        self._n_ops = 0
        self._max_step = -1
        self._thread = threading.Thread(target=self._run, name="irm-record-writer", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    # ------------------------------------------------------------------ public API
    @property
    def queue_maxsize(self) -> int:
        return self._q.maxsize

    def resume(self, step: int) -> None:
        """Discard every record with step > ``step`` (``-1``: discard everything, fresh start).

        If ``checkpoint(step)`` was called in the earlier run, the record is first restored to its
        state when that call returned: whatever was added after it is dropped, whatever its step
        label (a trainer that records step s after ``checkpoint(s)`` re-records it on resume). The
        open (uncheckpointed) segment of a crashed run is deleted; a segment straddling ``step`` is
        rewritten. Must be called before any record is added. Raises RecordError if records were
        already added, the index is damaged, or the kept segments have another n_inj/hidden/dtype.
        Warns (RuntimeWarning) if records between the last checkpoint and ``step`` are missing.
        """
        if self._n_ops:
            raise RecordError(f"{self.record_dir}: resume() must be called before any record is added")
        old = _Index.load(self.record_dir)
        self._delete_unindexed(old)
        if step < 0:
            self._reset()
        else:
            self._resume_to(old, step)
        self._needs_resume = False

    def add_profile(self, step: int, mean_abs: Any, mean: Any, n_tokens: int) -> None:
        """Queue one profile record: mean |injection| and mean injection, (n_inj, hidden) each, over
        ``n_tokens`` non-padding tokens. Blocks while the queue is full. Raises ValueError on bad shapes,
        RecordError if the writer failed earlier."""
        tail = (self._layout.n_inj, self._layout.hidden)
        for name, x in (("mean_abs", mean_abs), ("mean", mean)):
            if _shape(x) != tail:
                raise ValueError(f"add_profile {name} shape {_shape(x)} != (n_inj, hidden) = {tail}")
        self._submit(_Op("profile", step, (mean_abs, mean, int(n_tokens))))

    def add_probe(self, step: int, injection: Any, token_id: Any, token_text: list[str], probe_index: Any,
                  position: Any, is_generated: Any) -> None:
        """Queue one probe: ``injection`` (n_tok, n_inj, hidden); ``token_id``, ``token_text``,
        ``probe_index`` (or a scalar), ``position``, ``is_generated`` (n_tok,). Raises ValueError on bad
        shapes, RecordError if the writer failed earlier."""
        shape = _shape(injection)
        if len(shape) != 3 or shape[1:] != (self._layout.n_inj, self._layout.hidden):
            raise ValueError(f"add_probe injection shape {shape} != (n_tok, n_inj, hidden) = "
                             f"(n_tok, {self._layout.n_inj}, {self._layout.hidden})")
        cols = {"token_id": token_id, "token_text": token_text, "probe_index": probe_index,
                "position": position, "is_generated": is_generated}
        for name, x in cols.items():
            scalar_ok = name in ("probe_index", "position", "is_generated") and _shape(x) == ()
            if _shape(x) != (shape[0],) and not scalar_ok:
                raise ValueError(f"add_probe {name} shape {_shape(x)} != (n_tok,) = ({shape[0]},)")
        self._submit(_Op("probe", step, (injection, cols)))

    def set_prompts(self, prompts: list[str]) -> None:
        """Store the probe prompts (``probe/prompts``; ``probe_index`` indexes this list)."""
        self._submit(_Op("prompts", -1, (list(map(str, prompts)),)))

    def set_base_reference(self, resid_abs: Any) -> None:
        """Store the frozen model's mean |residual| per layer, (n_layers, hidden), as float32."""
        want = (int(self._attrs["n_layers"]), self._layout.hidden)
        if _shape(resid_abs) != want:
            raise ValueError(f"set_base_reference shape {_shape(resid_abs)} != (n_layers, hidden) = {want}")
        self._submit(_Op("base", -1, (resid_abs,)))

    def checkpoint(self, step: int) -> None:
        """Block until everything added so far is on disk (fsync) and listed in index.json as
        checkpoint ``step``. Raises RecordError if the writer failed."""
        done = threading.Event()
        self._submit(_Op("checkpoint", int(step), done=done))
        self._wait(done)
        self._raise_if_failed()

    def finalize(self, path: PathLike, *, keep_segments: bool = False) -> Path:
        """Checkpoint, stop the writer and merge the completed segments and run.h5 into one HDF5 file
        at ``path`` (tmp + os.replace: never a partial file). Removes ``record_dir`` unless
        ``keep_segments``. Returns ``Path(path)``. Raises RecordError (the recorder is closed after)."""
        last = max(self._max_step, self._index.checkpoint_step if self._index.checkpoint_step is not None else -1)
        self.checkpoint(max(last, 0))
        self.close()
        out = Path(path)
        try:
            _merge(self.record_dir, out, self._index, self._layout, self._attrs)
        except OSError as exc:
            raise RecordError(f"{out}: merging {self.record_dir} failed ({_one_line(exc)}); the segments "
                              "are kept, fix the cause and run finalize again") from exc
        if not keep_segments:
            _remove_record_dir(self.record_dir)
        return out

    def close(self) -> None:
        """Flush and stop the writer thread (idempotent). The open segment is closed but NOT
        checkpointed: its records are dropped by a later ``resume``. Raises a writer error not yet
        reported."""
        if not self._closed:
            self._closed = True
            done = threading.Event()
            self._put(_Op("stop", done=done))
            self._wait(done)
            self._thread.join()
        if self._error is not None and not self._error_reported:
            self._raise_if_failed()

    def __enter__(self) -> "RunRecorder":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # do not mask the exception in flight
            try:
                self.close()
            except RecordError:
                pass

    # ------------------------------------------------------------------ caller-side helpers
    def _submit(self, op: _Op) -> None:
        if self._closed:
            raise RecordError(f"{self.record_dir}: the recorder is closed")
        self._raise_if_failed()
        if self._needs_resume:
            raise RecordError(f"{self.record_dir}: holds records of an earlier run; call resume(step) with "
                              "the checkpoint step you resume from, or resume(-1) to discard them")
        if op.kind in ("profile", "probe"):
            if op.step < 0:
                raise ValueError(f"step={op.step} must be >= 0")
            self._max_step = max(self._max_step, op.step)
        self._n_ops += 1
        self._put(op)

    def _put(self, op: _Op) -> None:
        """Blocking put (back-pressure) that gives up if the writer thread is gone."""
        while True:
            try:
                self._q.put(op, timeout=0.5)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    raise RecordError(f"{self.record_dir}: the writer thread died unexpectedly") from None

    def _wait(self, done: threading.Event) -> None:
        while not done.wait(0.5):
            if not self._thread.is_alive():
                raise RecordError(f"{self.record_dir}: the writer thread died unexpectedly")

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            self._error_reported = True
            raise RecordError(str(self._error)) from self._error.__cause__

    def _delete_unindexed(self, idx: _Index) -> None:
        """Remove segments not in the index (crashed open segment, leftovers) and tmp files."""
        keep = idx.names()
        for p in self.record_dir.iterdir():
            if (p.match(SEG_GLOB) and p.name not in keep) or p.name.endswith(".tmp"):
                p.unlink()

    def _reset(self) -> None:
        for p in self.record_dir.iterdir():
            if p.match(SEG_GLOB) or p.name in (INDEX_NAME, RUN_FILE):
                p.unlink()
        self._index = _Index(self.record_dir, self._layout.as_dict())

    def _resume_to(self, old: _Index, step: int) -> None:
        """Restore the state at the last ``checkpoint(step)`` call (later segments dropped), then drop
        records with step > ``step``; without such a checkpoint, apply the step rule alone."""
        if old.layout and old.segments and old.layout != self._layout.as_dict():
            raise RecordError(f"{old.path}: segments were written with {old.layout}, the recorder uses "
                              f"{self._layout.as_dict()}; resume with the same settings or resume(-1) to discard them")
        match = [i for i, c in enumerate(old.checkpoints) if c["step"] == step]
        if match:
            k = old.checkpoints[match[-1]]["segments"]
            cand, cks, drop = old.segments[:k], old.checkpoints[:match[-1] + 1], [s.file for s in old.segments[k:]]
        else:
            self._warn_gap(old, step)
            cand, cks, drop = old.segments, [c for c in old.checkpoints if c["step"] < step], []
        keep = []
        for seg in cand:
            if seg.first_step > step:
                drop.append(seg.file)
            elif seg.last_step > step:
                keep.append(_truncate_segment(self.record_dir / seg.file, step, self._layout))
            else:
                keep.append(seg)
        cks = [c for c in cks if c["segments"] <= len(keep)]
        if not cks or cks[-1] != {"step": step, "segments": len(keep)}:
            cks.append({"step": step, "segments": len(keep)})
        self._index = _Index(self.record_dir, self._layout.as_dict(), cks, keep, list(old.pending_delete) + drop)
        self._index.save()
        for name in self._index.pending_delete:
            (self.record_dir / name).unlink(missing_ok=True)
        self._index.pending_delete = []
        self._index.save()
        self._load_run_level()

    def _warn_gap(self, old: _Index, step: int) -> None:
        last = old.checkpoint_step
        if last is None or last < step:
            have = "no records are" if last is None else f"records are only up to step {last}"
            warnings.warn(f"{self.record_dir}: resuming at step {step} but {have} checkpointed; the steps in "
                          "between are missing from the record", RuntimeWarning, stacklevel=4)

    def _load_run_level(self) -> None:
        path = self.record_dir / RUN_FILE
        if path.is_file():
            with _open_h5(path) as f:
                self._prompts = list(_read_ds(f["probe/prompts"])) if "probe/prompts" in f else []
                self._base = _read_ds(f["base/resid_abs"]) if "base/resid_abs" in f else None

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        while True:
            op = self._q.get()
            try:
                if self._error is None:
                    self._handle(op)
            except Exception as exc:  # surfaced to the caller by _raise_if_failed
                self._fail(op, exc)
            finally:
                if op.done is not None:
                    op.done.set()
                self._q.task_done()
            if op.kind == "stop":
                return

    def _handle(self, op: _Op) -> None:
        if op.kind == "profile":
            mean_abs, mean, n_tokens = op.args
            dt = self._layout.np_dtype
            self._segment(op.step).add_profile(op.step, _to_numpy(mean_abs, dt), _to_numpy(mean, dt), n_tokens)
        elif op.kind == "probe":
            self._write_probe(op)
        elif op.kind == "prompts":
            self._prompts = op.args[0]
            self._write_run_file()
        elif op.kind == "base":
            self._base = _to_numpy(op.args[0], np.float32)
            self._write_run_file()
        elif op.kind == "checkpoint":
            self._checkpoint(op.step)
        elif op.kind == "stop":
            self._close_segment(durable=False)
        if self._seg is not None and self._q.empty():
            self._seg.f.flush()  # idle: push metadata to the OS so the open segment stays readable

    def _write_probe(self, op: _Op) -> None:
        injection, cols = op.args
        inj = _to_numpy(injection, self._layout.np_dtype)
        n = len(inj)
        out = {name: np.broadcast_to(_to_numpy(cols[name], PROBE_COLUMNS[name]), (n,))
               for name in ("probe_index", "position", "token_id", "is_generated")}
        out["token_text"] = np.array([str(t) for t in cols["token_text"]], dtype=object)
        self._segment(op.step).add_probe(op.step, out, inj)

    def _segment(self, step: int) -> _Segment:
        """The open segment, created on first use and named after the first record's step."""
        if self._seg is None:
            path = self.record_dir / f"seg-{step:08d}.h5"
            k = 0
            while path.exists() or path.name in self._index.names():
                k += 1
                path = self.record_dir / f"seg-{step:08d}-{k}.h5"
            self._current = path
            self._seg = _Segment(path, self._layout, self._attrs)
        return self._seg

    def _close_segment(self, durable: bool) -> Optional[_SegInfo]:
        seg, self._seg = self._seg, None
        return seg.close(durable) if seg is not None else None

    def _checkpoint(self, step: int) -> None:
        info = self._close_segment(durable=True)
        if info is not None:
            self._index.segments.append(info)
        if not self._run_file_written:
            self._write_run_file()
        self._current = self._index.path
        self._index.add_checkpoint(step)
        self._index.save()

    def _write_run_file(self) -> None:
        """(Re)write record/run.h5 atomically: root attributes, prompts, base reference."""
        path = self.record_dir / RUN_FILE
        tmp = path.with_name(path.name + ".tmp")
        self._current = path
        with _h5_open(tmp, "w", libver=LIBVER) as f:
            _write_attrs(f, self._attrs, finalized=False)
            _write_run_level(f, self._prompts, self._base)
        _fsync_path(tmp)
        os.replace(tmp, path)
        self._run_file_written = True

    def _fail(self, op: _Op, exc: BaseException) -> None:
        ckpt = self._index.checkpoint_step
        if _is_enospc(exc):
            fix = f"free disk space, then restart the job: it resumes from the last checkpoint (step {ckpt})"
        else:
            fix = f"records after the last checkpoint (step {ckpt}) are lost; restart the job to resume from it"
        err = RecordError(f"{self._current}: {op.kind} failed in the background writer ({_one_line(exc)}); {fix}")
        err.__cause__ = exc
        self._error = err
        try:
            self._close_segment(durable=False)
        except Exception:  # the file is unusable anyway; resume() deletes it
            pass


_LIVE: "weakref.WeakSet[RunRecorder]" = weakref.WeakSet()


@atexit.register
def _close_live_recorders() -> None:
    """At interpreter exit, stop writer threads that were never closed (their open segment is closed
    cleanly but not checkpointed); HDF5 objects must not be torn down under a frozen daemon thread."""
    for rec in list(_LIVE):
        try:
            rec.close()
        except Exception:
            pass


def _merge(record_dir: Path, out: Path, index: _Index, layout: _Layout, attrs: dict) -> None:
    """Write all completed segments + run.h5 of ``record_dir`` into ``out`` atomically."""
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    try:
        with _h5_open(tmp, "w", libver=LIBVER, rdcc_nbytes=RDCC_BYTES, rdcc_w0=1.0) as dst:
            _write_attrs(dst, attrs, finalized=True)
            layout.create(dst)
            for seg in index.segments:
                with _open_h5(record_dir / seg.file) as src:
                    _copy_records(src, dst)
            prompts, base = [], None
            if (record_dir / RUN_FILE).is_file():
                with _open_h5(record_dir / RUN_FILE) as run:
                    prompts = list(_read_ds(run["probe/prompts"])) if "probe/prompts" in run else []
                    base = _read_ds(run["base/resid_abs"]) if "base/resid_abs" in run else None
            _write_run_level(dst, prompts, base)
        _fsync_path(tmp)
        os.replace(tmp, out)
        _fsync_path(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_record_dir(record_dir: Path) -> None:
    """Delete index.json first (so a half-removed dir is never read as complete), then the rest."""
    (record_dir / INDEX_NAME).unlink(missing_ok=True)
    for p in record_dir.iterdir():
        if p.match(SEG_GLOB) or p.name == RUN_FILE or p.name.endswith(".tmp"):
            p.unlink()
    try:
        record_dir.rmdir()
    except OSError:
        pass  # something else lives there; leave it


# ----------------------------------------------------------------------------- reading
DATA_DATASETS = tuple(f"profiles/{n}" for n in (*PROFILE_COLUMNS, "mean_abs", "mean")) + \
    tuple(f"probe/{n}" for n in (*PROBE_COLUMNS, "injection"))


def _open_h5(path: Path, *, data: bool = False) -> h5py.File:
    """Open an irm_hpc record file read-only and check its schema version (and datasets if ``data``).

    Raises RecordError: missing path, not HDF5, truncated/damaged, not an irm_hpc record, other schema.
    """
    if not path.exists():
        raise RecordError(f"{path}: no such file; pass a run dir, its injections.h5 or its record/ dir")
    if not h5py.is_hdf5(path):
        raise RecordError(f"{path}: not an HDF5 file; pass a run dir, its injections.h5 or its record/ dir")
    try:
        f = _h5_open(path, "r")
    except OSError as exc:
        raise RecordError(f"{path}: cannot open the HDF5 file, it is truncated, damaged or still open for "
                          f"writing ({_one_line(exc)}); re-run finalize from record/ or restore the file") from exc
    try:
        _check_schema(f, path, data)
    except BaseException:
        f.close()
        raise
    return f


def _check_schema(f: h5py.File, path: Path, data: bool) -> None:
    version = f.attrs.get("schema_version")
    if version is None:
        raise RecordError(f"{path}: not an irm_hpc record (no 'schema_version' root attribute)")
    if int(version) != SCHEMA_VERSION:
        raise RecordError(f"{path}: schema version {int(version)}, this irm_hpc ({__version__}) reads version "
                          f"{SCHEMA_VERSION}; read it with the irm_hpc version that wrote it "
                          f"(package_version={f.attrs.get('package_version', '?')})")
    missing = [name for name in DATA_DATASETS if name not in f] if data else []
    if missing:
        raise RecordError(f"{path}: datasets {missing} are missing; the file is not a complete irm_hpc record")


def _concat(arrays: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)


class LazyArray:
    """Read-only lazy view of datasets concatenated along axis 0 (one per segment, or a single one).

    Supports ``len``, ``.shape``, ``.dtype``, ``.ndim``, ``np.asarray`` and ``[i]``, ``[a:b]``, ``[a:b:k]``,
    ``[idx_array]``, ``[bool_mask]``, each optionally followed by indices of the other axes
    (``x[i, :, 3]``). Only the selected rows are read. Raises IndexError out of range, RecordError
    naming the file if a read fails.
    """

    def __init__(self, parts: Sequence[h5py.Dataset], tail: tuple[int, ...], dtype: Any, name: str = "") -> None:
        self.parts = [p for p in parts if p.shape[0] > 0]
        self._starts = np.cumsum([0] + [p.shape[0] for p in self.parts])
        self.shape = (int(self._starts[-1]), *tail)
        self.dtype = np.dtype(dtype)
        self.name = name

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyArray({self.name!r}, shape={self.shape}, dtype={self.dtype}, parts={len(self.parts)})"

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
        if first is Ellipsis and not rest:
            first = slice(None)
        simple = all(isinstance(r, (int, np.integer, slice)) or r is Ellipsis for r in rest)
        if isinstance(first, (int, np.integer)):
            row = self._row(int(first), rest if simple else ())
            return row if simple else row[rest]
        if isinstance(first, slice) and first.step in (None, 1):
            start, stop, _ = first.indices(len(self))
            out = self._range(start, max(start, stop), rest if simple else ())
            return out if simple else out[(slice(None), *rest)]
        out = self._take(np.arange(*first.indices(len(self))) if isinstance(first, slice) else first)
        return out[(slice(None), *rest)] if rest else out

    def _row(self, i: int, rest: tuple) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self.name} with {n} rows")
        i %= n
        p = int(np.searchsorted(self._starts, i, side="right")) - 1
        return _read_ds(self.parts[p], (i - int(self._starts[p]), *rest))

    def _range(self, start: int, stop: int, rest: tuple) -> np.ndarray:
        pieces = []
        for p, ds in enumerate(self.parts):
            lo, hi = max(start, int(self._starts[p])), min(stop, int(self._starts[p + 1]))
            if lo < hi:
                off = int(self._starts[p])
                pieces.append(_read_ds(ds, (slice(lo - off, hi - off), *rest)))
        if pieces:
            return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return np.empty((0, *self.shape[1:]), self.dtype)[(slice(None), *rest)]

    def _take(self, index: Any) -> np.ndarray:
        idx = np.asarray(index)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise IndexError(f"boolean index of shape {idx.shape} for {self.name} with {len(self)} rows")
            idx = np.flatnonzero(idx)
        if idx.ndim != 1:
            raise IndexError(f"{self.name}: index arrays must be 1-D (got shape {idx.shape})")
        idx = idx.astype(np.int64)
        n = len(self)
        if ((idx < -n) | (idx >= n)).any():
            raise IndexError(f"index out of range for {self.name} with {n} rows")
        idx = np.where(idx < 0, idx + n, idx)
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        part_of = np.searchsorted(self._starts, idx, side="right") - 1
        for p in np.unique(part_of):
            sel = part_of == p
            uniq, inv = np.unique(idx[sel] - self._starts[p], return_inverse=True)
            out[sel] = _read_ds(self.parts[int(p)], uniq)[inv]
        return out


class ProbeTokens:
    """Per-token probe records, concatenated over segments: 1-D columns (n_tok,) as numpy arrays (read on
    first access), ``token_text`` as list[str], ``injection`` as a LazyArray (n_tok, n_inj, hidden)."""

    def __init__(self, groups: Sequence[h5py.Group], tail: tuple[int, int], dtype: Any) -> None:
        self._groups = list(groups)
        self.injection = LazyArray([g["injection"] for g in self._groups], tail, dtype, "probe/injection")

    def __len__(self) -> int:
        return len(self.injection)

    def _column(self, name: str) -> np.ndarray:
        return _concat([_read_ds(g[name]) for g in self._groups], PROBE_COLUMNS[name])

    @cached_property
    def step(self) -> np.ndarray:
        return self._column("step")

    @cached_property
    def probe_index(self) -> np.ndarray:
        return self._column("probe_index")

    @cached_property
    def position(self) -> np.ndarray:
        return self._column("position")

    @cached_property
    def token_id(self) -> np.ndarray:
        return self._column("token_id")

    @cached_property
    def is_generated(self) -> np.ndarray:
        return self._column("is_generated")

    @cached_property
    def token_text(self) -> list[str]:
        return [str(t) for g in self._groups for t in _read_ds(g["token_text"])]

    def iter_blocks(self, rows: Optional[int] = None) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield ``(row_slice, injection[row_slice])`` blocks of ``rows`` tokens (default: 16 chunks,
        about 9 MiB for SmolLM2 float16), so memory stays bounded by one block."""
        parts = self.injection.parts
        rows = rows or (parts[0].chunks[0] * 16 if parts and parts[0].chunks else 512)
        for a in range(0, len(self), rows):
            sl = slice(a, min(a + rows, len(self)))
            yield sl, self.injection[sl]


class RunReader:
    """Lazy typed access to one run's record (finalized file or segment dir); see `open_run`.

    Attributes: ``path``, ``meta`` (RunMeta), ``steps`` / ``n_tokens`` (n_records,) int64,
    ``profiles_abs`` / ``profiles_mean`` LazyArray (n_records, n_inj, hidden), ``prompts`` list[str],
    ``probe`` (ProbeTokens), ``base_resid_abs`` (n_layers, hidden) float32 or None, ``files`` (data
    files read, in order), ``open_segment`` (uncheckpointed segment included best effort, or None),
    ``open_segment_error`` (why an open segment was skipped, or None), ``checkpoint_step`` (segment dirs).
    """

    def __init__(self, path: Path, meta: RunMeta, data_files: list[h5py.File], run_file: Optional[h5py.File],
                 *, open_segment: Optional[Path] = None, open_segment_error: Optional[str] = None,
                 checkpoint_step: Optional[int] = None) -> None:
        self.path = path
        self.meta = meta
        self._data = data_files
        self._run = run_file
        self.files = [Path(f.filename) for f in data_files]
        self.open_segment = open_segment
        self.open_segment_error = open_segment_error
        self.checkpoint_step = checkpoint_step
        self.steps = _concat([_read_ds(f["profiles/step"]) for f in data_files], np.int64)
        self.n_tokens = _concat([_read_ds(f["profiles/n_tokens"]) for f in data_files], np.int64)
        tail = (meta.n_inj, meta.hidden_size)
        self.profiles_abs = LazyArray([f["profiles/mean_abs"] for f in data_files], tail, meta.dtype,
                                      "profiles/mean_abs")
        self.profiles_mean = LazyArray([f["profiles/mean"] for f in data_files], tail, meta.dtype, "profiles/mean")
        self.probe = ProbeTokens([f["probe"] for f in data_files], tail, meta.dtype)
        has = run_file is not None
        self.prompts: list[str] = [str(p) for p in _read_ds(run_file["probe/prompts"])] \
            if has and "probe/prompts" in run_file else []
        self.base_resid_abs: Optional[np.ndarray] = _read_ds(run_file["base/resid_abs"]) \
            if has and "base/resid_abs" in run_file else None

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        return (f"RunReader({str(self.path)!r}, records={len(self)}, probe_tokens={len(self.probe)}, "
                f"finalized={self.meta.finalized})")

    @property
    def file_size(self) -> int:
        """Bytes on disk of every file read (data files and run.h5)."""
        paths = {*self.files, *([Path(self._run.filename)] if self._run is not None else [])}
        return sum(p.stat().st_size for p in paths)

    def datasets(self) -> list[dict]:
        """Per dataset: name, shape (concatenated), dtype, chunks and compression of the first part."""
        out = []
        first = self._data[0] if self._data else None
        names = list(DATA_DATASETS) if first is not None else []
        for name in names:
            parts = [f[name] for f in self._data]
            n = sum(p.shape[0] for p in parts)
            ds = parts[0]
            out.append({"name": name, "shape": (n, *ds.shape[1:]), "dtype": _describe_dtype(ds), "chunks": ds.chunks,
                        "compression": _describe_filters(ds)})
        for name in ("probe/prompts", "base/resid_abs"):
            if self._run is not None and name in self._run:
                ds = self._run[name]
                out.append({"name": name, "shape": ds.shape, "dtype": _describe_dtype(ds), "chunks": ds.chunks,
                            "compression": _describe_filters(ds)})
        return out

    def close(self) -> None:
        for f in {id(f): f for f in [*self._data, *([self._run] if self._run is not None else [])]}.values():
            f.close()

    def __enter__(self) -> "RunReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _describe_dtype(ds: h5py.Dataset) -> str:
    return "utf-8 str" if h5py.check_string_dtype(ds.dtype) is not None else str(ds.dtype)


_BLOSC_CNAMES = {0: "blosclz", 1: "lz4", 2: "lz4hc", 3: "snappy", 4: "zlib", 5: "zstd"}
_BLOSC_SHUFFLES = {0: "", 1: "+shuffle", 2: "+bitshuffle"}
_BSHUF_CNAMES = {0: "", 2: "-lz4", 3: "-zstd"}


def _describe_filters(ds: h5py.Dataset) -> str:
    """Filter pipeline as one word: 'none', 'gzip-1+shuffle', 'zstd-1+shuffle', 'blosc-lz4-5+bitshuffle',
    'bitshuffle-lz4', ... (plugin filters are read from the dataset creation property list)."""
    dcpl = ds.id.get_create_plist()
    filters = [dcpl.get_filter(i)[:3] for i in range(dcpl.get_nfilters())]
    ids = [code for code, _, _ in filters]
    shuffle = "+shuffle" if h5py.h5z.FILTER_SHUFFLE in ids else ""
    for code, _, vals in filters:
        if code == h5py.h5z.FILTER_DEFLATE:
            return f"gzip-{vals[0]}{shuffle}" if vals else f"gzip{shuffle}"
        if code == 32000:
            return f"lzf{shuffle}"
        if code == 32015:
            return f"zstd-{vals[0]}{shuffle}" if vals else f"zstd{shuffle}"
        if code == 32001 and len(vals) >= 7:
            return f"blosc-{_BLOSC_CNAMES.get(vals[6], vals[6])}-{vals[4]}{_BLOSC_SHUFFLES.get(vals[5], '')}"
        if code == 32008:
            comp = _BSHUF_CNAMES.get(vals[4], f"-{vals[4]}") if len(vals) > 4 else ""
            level = f"-{vals[5]}" if comp == "-zstd" and len(vals) > 5 else ""
            return f"bitshuffle{comp}{level}"
        if code in PLUGIN_FILTER_IDS:
            return f"{PLUGIN_FILTER_IDS[code]}{shuffle}"
        if code == h5py.h5z.FILTER_SZIP:
            return f"szip{shuffle}"
    return "none" if not filters else "+".join(str(c) for c in ids)


def open_run(path: PathLike, *, include_open: bool = True) -> RunReader:
    """Open a record for reading: a run dir (prefers ``injections.h5``, else ``record/``), an
    ``injections.h5`` (or any record file), or a ``record/`` segment dir. In a segment dir, completed
    segments are read; with ``include_open`` the uncheckpointed segment is added too if it opens
    cleanly (flagged in ``reader.open_segment``). Raises RecordError (one line, naming the path)."""
    p = Path(path)
    if not p.exists():
        raise RecordError(f"{p}: no such file or directory; pass a run dir, its injections.h5 or its record/ dir")
    if p.is_file():
        return _open_file(p)
    if (p / FINAL_NAME).is_file():
        return _open_file(p / FINAL_NAME)
    for d in (p, p / RECORD_DIRNAME):
        if _is_record_dir(d):
            return _open_segments(d, include_open)
    raise RecordError(f"{p}: holds neither {FINAL_NAME} nor a {RECORD_DIRNAME}/ segment dir; "
                      "pass a run dir (out_dir), its injections.h5 or its record/ dir")


def _is_record_dir(d: Path) -> bool:
    return d.is_dir() and ((d / INDEX_NAME).is_file() or (d / RUN_FILE).is_file() or any(d.glob(SEG_GLOB)))


def _open_file(p: Path) -> RunReader:
    f = _open_h5(p, data=True)
    try:
        return RunReader(p, RunMeta.from_attrs(f.attrs, p), [f], f)
    except BaseException:
        f.close()
        raise


def _open_segments(d: Path, include_open: bool) -> RunReader:
    idx = _Index.load(d)
    files: list[h5py.File] = []
    run = None
    try:
        files = [_open_h5(d / s.file, data=True) for s in idx.segments]
        open_seg, open_err = None, None
        if include_open:
            open_seg, open_err = _try_open_segment(d, idx, files)
        run = _open_h5(d / RUN_FILE) if (d / RUN_FILE).is_file() else None
        source = run if run is not None else (files[-1] if files else None)
        if source is None:
            raise RecordError(f"{d}: no completed segment and no {RUN_FILE} yet; nothing to read before the "
                              "first checkpoint")
        meta = RunMeta.from_attrs(source.attrs, Path(source.filename))
        return RunReader(d, meta, files, run, open_segment=open_seg, open_segment_error=open_err,
                         checkpoint_step=idx.checkpoint_step)
    except BaseException:
        for f in [*files, *([run] if run is not None else [])]:
            f.close()
        raise


def _try_open_segment(d: Path, idx: _Index, files: list[h5py.File]) -> tuple[Optional[Path], Optional[str]]:
    """Append the newest unindexed segment to ``files`` if it opens and is self-consistent."""
    skip = idx.names() | set(idx.pending_delete)
    cands = sorted((p for p in d.glob(SEG_GLOB) if p.name not in skip), key=lambda p: p.stat().st_mtime)
    if not cands:
        return None, None
    try:
        f = _open_h5(cands[-1], data=True)
    except RecordError as exc:
        return None, str(exc)
    lengths = {g: {f[f"{g}/{n}"].shape[0] for n in names}
               for g, names in (("profiles", (*PROFILE_COLUMNS, "mean_abs", "mean")),
                                ("probe", (*PROBE_COLUMNS, "injection")))}
    if any(len(v) != 1 for v in lengths.values()):
        f.close()
        return None, f"{cands[-1]}: dataset lengths disagree {lengths}; skipped"
    files.append(f)
    return cands[-1], None


# ----------------------------------------------------------------------------- CLI
def _summary_tables(r: RunReader) -> list[Any]:
    from rich.table import Table

    m = r.meta
    meta = Table(title=f"record {r.path}", show_header=False)
    for key in ("schema_version", "model_name", "hidden_size", "n_layers", "injection_layers", "alignment",
                "seed", "package_version", "git_commit", "dtype", "finalized"):
        meta.add_row(key, str(getattr(m, key)))
    meta.add_row("config_yaml", f"{len(m.config_yaml.splitlines())} lines")
    if m.extra:
        meta.add_row("extra", json.dumps(m.extra))
    steps = r.steps
    cont = Table(title="contents", show_header=False)
    cont.add_row("profile records", str(len(r)))
    cont.add_row("step range", f"{steps.min()} .. {steps.max()}" if len(steps) else "-")
    cont.add_row("probe tokens", str(len(r.probe)))
    pst = np.unique(r.probe.step)
    cont.add_row("probe steps", f"{len(pst)} ({pst.min()} .. {pst.max()})" if len(pst) else "-")
    cont.add_row("prompts", str(len(r.prompts)))
    cont.add_row("base reference", "yes" if r.base_resid_abs is not None else "no")
    cont.add_row("files", str(len(r.files)))
    if r.checkpoint_step is not None or not m.finalized:
        cont.add_row("checkpoint step", str(r.checkpoint_step))
        cont.add_row("open segment", str(r.open_segment) if r.open_segment else (r.open_segment_error or "none"))
    cont.add_row("size on disk", f"{r.file_size / 2**20:.2f} MiB ({r.file_size} bytes)")
    ds = Table(title="datasets")
    for col in ("name", "shape", "dtype", "chunks", "compression"):
        ds.add_column(col)
    for d in r.datasets():
        ds.add_row(d["name"], str(d["shape"]), d["dtype"], str(d["chunks"]), d["compression"])
    return [meta, cont, ds]


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m irm_hpc.record inspect RUN``: print a summary; exit 2 with a one-line error."""
    ap = argparse.ArgumentParser(prog="python -m irm_hpc.record", description="Inspect an IRM injection record.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="summary of a run dir, injections.h5 or record/ dir")
    p.add_argument("run", help="run dir (out_dir), injections.h5 or record/ dir")
    args = ap.parse_args(argv)
    from rich.console import Console

    try:
        with open_run(args.run) as r:
            console = Console()
            for table in _summary_tables(r):
                console.print(table)
    except RecordError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

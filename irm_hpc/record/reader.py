"""Lazy typed reader of a record: `LazyArray`, `ProbeTokens`, `RunReader` and `open_run` (a run dir, an
``injections.h5`` or a ``record/`` segment dir)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import h5py
import numpy as np

from irm_hpc.layout import RunDir
from irm_hpc.errors import one_line
from irm_hpc.record.schema import (DATA_DATASETS, FINAL_NAME, PLUGIN_FILTER_IDS, PROBE_COLUMNS, PROFILE_COLUMNS,
                                   RECORD_DIRNAME, RUN_FILE, SEG_GLOB, PathLike, RecordError, RunMeta, _open_h5,
                                   _read_ds)
from irm_hpc.record.segments import _Index


# ----------------------------------------------------------------------------- reading
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
    src = RunDir(p).record_source()
    if src is None:
        raise RecordError(f"{p}: holds neither {FINAL_NAME} nor a {RECORD_DIRNAME}/ segment dir; "
                          "pass a run dir (out_dir), its injections.h5 or its record/ dir")
    return _open_file(src) if src.is_file() else _open_segments(src, include_open)


# what h5py raises for a damaged object (bad checksum, broken B-tree, bad shape) once the file has opened
_H5_DAMAGE = (KeyError, OSError, ValueError, TypeError, IndexError, RuntimeError)


def _damaged(p: Path, exc: BaseException) -> RecordError:
    return RecordError(f"{p}: the file is damaged ({one_line(exc, with_type=True)}); re-run finalize from record/ "
                       "or restore the file")


def _open_file(p: Path) -> RunReader:
    f = _open_h5(p, data=True)
    try:
        return RunReader(p, RunMeta.from_attrs(f.attrs, p), [f], f)
    except RecordError:
        f.close()
        raise
    except _H5_DAMAGE as exc:
        f.close()
        raise _damaged(p, exc) from exc
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
        try:
            return RunReader(d, meta, files, run, open_segment=open_seg, open_segment_error=open_err,
                             checkpoint_step=idx.checkpoint_step)
        except RecordError:
            raise
        except _H5_DAMAGE as exc:
            raise _damaged(d, exc) from exc
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

"""Segment files of a record dir: ``index.json`` (`_Index`), the open segment being appended to
(`_Segment`), copying / truncating records, the final merge into ``injections.h5`` and removing the dir."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from irm_hpc import __version__
from irm_hpc.errors import one_line
from irm_hpc.layout import atomic_path, atomic_write_json, fsync_path, is_record_segment_name
from irm_hpc.record._util import _h5_open
from irm_hpc.record.schema import (INDEX_NAME, LIBVER, PROBE_COLUMNS, PROFILE_COLUMNS, RDCC_BYTES, RUN_FILE,
                                   SCHEMA_VERSION, SEG_GLOB, STR_DTYPE, RecordError, _append, _Layout, _open_h5,
                                   _read_ds, _write_attrs)


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
        """Read ``d/index.json`` (empty index if absent). RecordError if unreadable, of another schema, or
        if a segment or ``pending_delete`` name is not a segment file name of ``d`` (``seg-NNNNNNNN[-k].h5``,
        ``layout.is_record_segment_name``): names from the index are joined to ``d`` and deleted on
        resume, so ``../x`` or ``/abs/path`` must never get through."""
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
            for seg in segs:
                ints = (seg.first_step, seg.last_step, seg.n_records, seg.n_probe_tokens)
                if not isinstance(seg.file, str) or not all(type(v) is int for v in ints):
                    raise TypeError(f"segment entry {asdict(seg)} has fields of the wrong type")
            checkpoints = list(raw["checkpoints"])
            if not all(isinstance(c, dict) and type(c.get("step")) is int and type(c.get("segments")) is int
                       and 0 <= c["segments"] <= len(segs) for c in checkpoints):
                raise ValueError("a checkpoint entry is not {\"step\": int, \"segments\": int <= number of segments}")
            layout, pending = raw.get("layout"), list(raw.get("pending_delete", []))
            if not (layout is None or isinstance(layout, dict)) or not all(isinstance(n, str) for n in pending):
                raise TypeError("'layout' must be an object and 'pending_delete' a list of file names")
            for name in [s.file for s in segs] + pending:
                if not is_record_segment_name(name):
                    raise RecordError(f"{path}: names {str(name)!r}, not a segment file of this directory "
                                      f"(seg-NNNNNNNN[-k].h5); delete {d} to restart the recording, or restore index.json")
            return cls(d, layout, checkpoints, segs, pending)
        except RecordError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RecordError(f"{path}: damaged segment index ({one_line(exc, with_type=True)}); delete {d} to restart "
                              "the recording, or restore index.json") from exc

    def save(self) -> None:
        data = {"schema_version": SCHEMA_VERSION, "layout": self.layout, "checkpoint_step": self.checkpoint_step,
                "checkpoints": self.checkpoints, "segments": [asdict(s) for s in self.segments],
                "pending_delete": self.pending_delete}
        atomic_write_json(self.path, data, indent=1)

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
            fsync_path(self.path)
        first = self.first_step if self.first_step is not None else -1
        last = self.last_step if self.last_step is not None else -1
        return _SegInfo(self.path.name, first, last, self.n_records, self.n_probe_tokens)


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
    """Rewrite segment ``path`` keeping only records with step <= max_step (`irm_hpc.layout.atomic_path`)."""
    with atomic_path(path) as tmp:
        with _open_h5(path) as src, _h5_open(tmp, "w", libver=LIBVER) as dst:
            for key, value in src.attrs.items():
                dst.attrs[key] = value
            layout.create(dst)
            n_rec, n_tok = _copy_records(src, dst, max_step)
            first, last = _step_range(dst)
    return _SegInfo(path.name, first, last, n_rec, n_tok)


# ----------------------------------------------------------------------------- merging
def _merge(record_dir: Path, out: Path, index: _Index, layout: _Layout, attrs: dict) -> None:
    """Write all completed segments + run.h5 of ``record_dir`` into ``out`` atomically
    (`irm_hpc.layout.atomic_path`: tmp file, fsync, ``os.replace``, dir fsync)."""
    with atomic_path(out) as tmp:
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


# ----------------------------------------------------------------------------- continuing a finished run
def reopen_finalized(final: Path, record_dir: Path, step: int, compression: Optional[str]) -> None:
    """Turn a finalized record file back into a segment dir that a `RunRecorder` can ``resume(step)``.

    ``record_dir`` gets one segment with the records of ``final`` whose step is < ``step`` (the records a
    trainer makes before its checkpoint ``step``; records at ``step`` itself, a finished run's final
    profile and probe, are re-recorded by the continued run), ``run.h5`` (prompts, base reference) and
    ``index.json`` with checkpoint ``step`` — written last, so a crash before it leaves a dir that the next
    attempt rebuilds. ``compression``: filters of the new segment. ``final`` is left in place (the caller
    removes it once this returns). Raises RecordError naming the file if it cannot be read.
    """
    from irm_hpc.layout import record_segment_name
    from irm_hpc.record.schema import RunMeta, _Layout

    record_dir.mkdir(parents=True, exist_ok=True)
    with _open_h5(final, data=True) as src:
        meta = RunMeta.from_attrs(src.attrs, final)
        layout = _Layout(meta.n_inj, meta.hidden_size, meta.dtype, compression)
        attrs = {k: v for k, v in src.attrs.items() if k != "finalized"}
        seg = record_dir / record_segment_name(0)
        with atomic_path(seg) as tmp:
            with _h5_open(tmp, "w", libver=LIBVER) as dst:
                _write_attrs(dst, attrs, finalized=False)
                layout.create(dst)
                n_rec, n_tok = _copy_records(src, dst, step - 1)
                first, last = _step_range(dst)
        prompts = list(_read_ds(src["probe/prompts"])) if "probe/prompts" in src else []
        base = _read_ds(src["base/resid_abs"]) if "base/resid_abs" in src else None
    with atomic_path(record_dir / RUN_FILE) as tmp, _h5_open(tmp, "w", libver=LIBVER) as f:
        _write_attrs(f, attrs, finalized=False)
        _write_run_level(f, prompts, base)
    index = _Index(record_dir, layout.as_dict(), [{"step": int(step), "segments": 1}],
                   [_SegInfo(seg.name, first, last, n_rec, n_tok)])
    index.save()

"""The background writer `RunRecorder` (rank 0): bounded queue, writer thread, segments, checkpoints,
resume and finalize."""

from __future__ import annotations

import atexit
import queue
import threading
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from irm_hpc.errors import one_line
from irm_hpc.layout import atomic_path, record_segment_name
from irm_hpc.record._util import _h5_open, _is_enospc, _shape, _to_numpy
from irm_hpc.record.schema import (DEFAULT_COMPRESSION, DTYPES, INDEX_NAME, LIBVER, PROBE_COLUMNS, RUN_FILE,
                                   SEG_GLOB, PathLike, RecordError, _Layout, _normalize_meta, _open_h5,
                                   _parse_compression, _read_ds, _write_attrs)
from irm_hpc.record.segments import (_Index, _merge, _remove_record_dir, _Segment, _SegInfo, _truncate_segment,
                                     _write_run_level)


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
            raise RecordError(f"{out}: merging {self.record_dir} failed ({one_line(exc, with_type=True)}); the segments "
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
            path = self.record_dir / record_segment_name(step)
            k = 0
            while path.exists() or path.name in self._index.names():
                k += 1
                path = self.record_dir / record_segment_name(step, k)
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
        self._current = path
        with atomic_path(path) as tmp, _h5_open(tmp, "w", libver=LIBVER) as f:
            _write_attrs(f, self._attrs, finalized=False)
            _write_run_level(f, self._prompts, self._base)
        self._run_file_written = True

    def _fail(self, op: _Op, exc: BaseException) -> None:
        ckpt = self._index.checkpoint_step
        if _is_enospc(exc):
            fix = f"free disk space, then restart the job: it resumes from the last checkpoint (step {ckpt})"
        else:
            fix = f"records after the last checkpoint (step {ckpt}) are lost; restart the job to resume from it"
        err = RecordError(f"{self._current}: {op.kind} failed in the background writer ({one_line(exc, with_type=True)}); {fix}")
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

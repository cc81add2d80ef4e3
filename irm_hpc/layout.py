"""The on-disk layout of a sweep and of a run, in one place.

Every stage (train, record, launch, status, resume, analysis) names files through :class:`RunDir` and
:class:`SweepDir`; no other module spells a file name of this layout. Schema details are in
``docs/architecture.md`` ("Run directory", "Sweep manifest")::

    <runs_root>/<sweep>-<timestamp>/          SweepDir
      manifest.json  manifest.lock
      runs/<task_id>/                         RunDir (one training task's out_dir)
        config.yaml  metrics.jsonl  tensorboard/  checkpoints/  record/  injections.h5  irm.safetensors  DONE
      logs/{train,analysis,driver}/           submitit folders (pickles, stdout/stderr)
      analysis/                               profiles/, summary.json, report.md, figures/

:func:`atomic_write_text` / :func:`atomic_write_json` (text) and :func:`atomic_path` (files written by a
library: HDF5, npz) are the one way this package replaces a file (temporary file in the same directory +
fsync + ``os.replace`` + directory fsync): a reader sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, Path]

# Run directory (one training task).
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
RECORD_DIR = "record"
RECORD_INDEX = "index.json"
RECORD_RUN_FILE = "run.h5"
RECORD_SEG_GLOB = "seg-*.h5"
INJECTIONS = "injections.h5"
WEIGHTS = "irm.safetensors"
DONE = "DONE"

# Sweep directory.
MANIFEST = "manifest.json"
MANIFEST_LOCK = "manifest.lock"

# Analysis output directory (<sweep>/analysis by default, or any --out DIR).
ANALYSIS_DIR = "analysis"
ANALYSIS_PROFILES = "profiles"
ANALYSIS_SUMMARY = "summary.json"
ANALYSIS_REPORT = "report.md"
ANALYSIS_FIGURES = "figures"


def record_segment_name(first_step: int, k: int = 0) -> str:
    """File name of a record segment (matches ``RECORD_SEG_GLOB``): ``seg-<first_step:08d>.h5``, or
    ``seg-<first_step:08d>-<k>.h5`` for the k-th (k >= 1) segment starting at the same step."""
    return f"seg-{int(first_step):08d}{f'-{k}' if k else ''}.h5"


def fsync_path(path: Path) -> None:
    """fsync a closed file or a directory by path (fsync applies to the inode, not the descriptor)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Context manager yielding a temporary path beside ``path``; on a clean exit the file written there
    replaces ``path`` (``os.replace``), on an exception it is removed and ``path`` is left untouched.

    For files written by a library that wants a path (HDF5, npz). The tmp name is ``.<name>.<pid>.tmp``
    (concurrent processes never share one; it ends in ``.tmp`` so record cleanup removes leftovers).
    ``durable``: fsync the file before the rename and its directory after (survives a power loss).
    Raises ``OSError``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8): tmp file beside it + fsync + ``os.replace`` + dir fsync
    (:func:`atomic_path`). Raises ``OSError``."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)


def atomic_write_json(path: PathLike, obj: Any, **dump_kw: Any) -> None:
    """:func:`atomic_write_text` of ``json.dumps(obj, **dump_kw)`` plus a final newline."""
    atomic_write_text(path, json.dumps(obj, **dump_kw) + "\n")


def is_record_dir(d: Path) -> bool:
    """True if ``d`` is an HDF5 record segment dir (holds ``index.json``, ``run.h5`` or a segment)."""
    return d.is_dir() and ((d / RECORD_INDEX).is_file() or (d / RECORD_RUN_FILE).is_file()
                           or any(d.glob(RECORD_SEG_GLOB)))


@dataclass(frozen=True)
class RunDir:
    """The output directory of one training task (``out_dir``); every path of its layout."""

    root: Path

    def __init__(self, root: PathLike):
        object.__setattr__(self, "root", Path(root))

    @classmethod
    def containing(cls, path: PathLike) -> "RunDir":
        """The run dir holding ``path``: a run dir itself, its ``injections.h5`` or its ``record/`` dir."""
        p = Path(path)
        if p.name in (INJECTIONS, RECORD_DIR) or (p.is_file() and p.suffix in (".h5", ".hdf5")):
            return cls(p.parent)
        return cls(p)

    config = property(lambda self: self.root / CONFIG)
    metrics = property(lambda self: self.root / METRICS)
    tensorboard = property(lambda self: self.root / TENSORBOARD)
    checkpoints = property(lambda self: self.root / CHECKPOINTS)
    record = property(lambda self: self.root / RECORD_DIR)
    injections = property(lambda self: self.root / INJECTIONS)
    weights = property(lambda self: self.root / WEIGHTS)
    done_file = property(lambda self: self.root / DONE)

    def is_done(self) -> bool:
        """Training finished: ``DONE`` (written last) exists."""
        return self.done_file.is_file()

    def record_source(self) -> Path | None:
        """What a reader opens: ``injections.h5`` if merged, else a record segment dir, else None.

        ``root`` may itself be a record dir (a run still training, passed by its ``record/`` path).
        """
        if self.injections.is_file():
            return self.injections
        for d in (self.record, self.root):
            if is_record_dir(d):
                return d
        return None

    def has_record(self) -> bool:
        """True if the run has an HDF5 stream to read (merged, or segments while training)."""
        return self.record_source() is not None


@dataclass(frozen=True)
class SweepDir:
    """A sweep directory (``<runs_root>/<name>``); every path of its layout."""

    root: Path

    def __init__(self, root: PathLike):
        object.__setattr__(self, "root", Path(root))

    manifest = property(lambda self: self.root / MANIFEST)
    lock = property(lambda self: self.root / MANIFEST_LOCK)
    analysis = property(lambda self: self.root / ANALYSIS_DIR)
    train_logs = property(lambda self: self.root / "logs" / "train")
    analysis_logs = property(lambda self: self.root / "logs" / "analysis")
    driver_logs = property(lambda self: self.root / "logs" / "driver")

    @staticmethod
    def task_out_dir(task_id: str) -> str:
        """A task's ``out_dir`` relative to the sweep dir (what the manifest stores)."""
        return f"runs/{task_id}"

    def run(self, out_dir: PathLike) -> RunDir:
        """The run dir of a task, from its (relative or absolute) ``out_dir``."""
        p = Path(out_dir)
        return RunDir(p if p.is_absolute() else self.root / p)

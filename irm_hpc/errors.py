"""One exception base class for the package, and the one-line message helper.

Every error a user can cause (bad config key, data path, layer index, model name, HDF5 file, manifest,
sweep directory) is an :class:`IrmError` subclass whose message is one line naming the problem and the
fix. Every entry point (``irm-hpc <stage>``, ``python -m irm_hpc.<stage>``) catches ``IrmError`` alone,
prints ``error: <message>`` on stderr and exits 2 (:func:`cli_errors`); anything else is a bug and keeps
its traceback.

``ConfigError`` is defined here; the other subclasses live beside the code that raises them: ``data.DataError``,
``models.ModelLoadError``, ``inject.UnsupportedArchitectureError``, ``train.TrainError``,
``launch.LaunchError``, ``record.RecordError``, ``analysis.AnalysisError``. ``ManifestError`` and
``UnsafePathError`` are defined here too (``layout`` raises them; ``manifest.ManifestError`` is the same class).
Most also derive from ``ValueError`` or ``RuntimeError``, as before, so existing ``except`` clauses hold.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional


class IrmError(Exception):
    """Base class of every irm_hpc user-facing error; ``str(exc)`` is one line: problem, then fix."""


class ConfigError(IrmError, ValueError):
    """Bad user configuration (unknown key, bad value, bad layer index, missing path). One line.

    Defined here rather than in ``irm_hpc.config`` so that light modules (``inject``, ``irm``, ``dist``)
    raise it without importing hydra; ``irm_hpc.config.ConfigError`` is the same class.
    """


class ManifestError(IrmError, ValueError):
    """Not a sweep directory, unreadable or malformed manifest, a manifest of a newer schema, or a task
    ``out_dir`` outside its sweep (one line). ``irm_hpc.manifest.ManifestError`` is the same class."""


class UnsafePathError(IrmError, PermissionError):
    """A directory or file irm_hpc would unpickle from (or act on) is writable by other users or owned
    by another uid; the one-line message carries the ``chmod`` / ``chown`` command that fixes it."""


def one_line(exc: BaseException, *, with_type: bool = False) -> str:
    """A message on a single line: whitespace runs collapse to one space.

    With several lines (e.g. a scheduler's output carried in a ``CalledProcessError``), the last line
    that mentions "error" is kept when there is one, so that ``sbatch: error: invalid partition`` is what
    the user reads. ``with_type`` prefixes ``TypeName: `` (for errors from libraries such as h5py).
    """
    lines = [" ".join(ln.split()) for ln in str(exc).splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error" in ln.lower()]
    if len(lines) > 1 and errs:
        text = errs[-1]
    else:
        text = " ".join(lines)
    if with_type:
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text or repr(exc)


def cli_errors(fn: Callable[[], Optional[int]]) -> int:
    """Run an entry point's body; an ``IrmError`` becomes ``error: <one line>`` on stderr and exit code 2."""
    try:
        return int(fn() or 0)
    except IrmError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2

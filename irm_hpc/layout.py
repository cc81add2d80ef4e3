"""The on-disk layout of a sweep and of a run, in one place.

Every stage (train, record, launch, status, resume, analysis) names files through :class:`RunDir` and
:class:`SweepDir`; no other module spells a file name of this layout. Schema details are in
``docs/architecture.md`` ("Run directory", "Sweep manifest")::

    <runs_root>/<sweep>-<timestamp>/          SweepDir
      manifest.json  manifest.lock
      runs/<task_id>/                         RunDir (one training task's out_dir)
        config.yaml  metrics.jsonl  tensorboard/  checkpoints/  record/  injections.h5  irm.safetensors  DONE
        evaluation/summary.json generations.jsonl   (the evaluation stage, irm_hpc.evaluate)
        ablation/summary.json                       (the ablation stage, irm_hpc.ablate)
      logs/{train,evaluation,ablation,analysis,driver}/  submitit folders (pickles, stdout/stderr)
      analysis/                               profiles/, summary.json, report.md, figures/

:func:`atomic_write_text` / :func:`atomic_write_json` (text) and :func:`atomic_path` (files written by a
library: HDF5, npz) are the one way this package replaces a file (temporary file in the same directory +
fsync + ``os.replace`` + directory fsync): a reader sees the old file or the new one, never a torn one.

Safety rules for shared clusters, in one place: :func:`safe_component` (a name that becomes a path
component or task id), :meth:`SweepDir.run` (a task's ``out_dir`` stays inside its sweep),
:func:`is_record_segment_name` (names read from ``record/index.json``), :func:`check_private` (a
directory irm_hpc unpickles from is not writable by others), :func:`restrict_umask` /
:func:`make_private_dir` (what irm_hpc creates is not writable by others), :func:`yaml_data` /
:func:`verbatim_config` (YAML read from disk is data: ``${...}`` interpolations are never resolved).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Union

from irm_hpc.errors import ConfigError, ManifestError, UnsafePathError

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
EVALUATION_DIR = "evaluation"
EVALUATION_SUMMARY = "summary.json"
ABLATION_DIR = "ablation"
GENERATIONS = "generations.jsonl"

# Sweep directory.
MANIFEST = "manifest.json"
MANIFEST_LOCK = "manifest.lock"

# Analysis output directory (<sweep>/analysis by default, or any --out DIR).
ANALYSIS_DIR = "analysis"
ANALYSIS_PROFILES = "profiles"
ANALYSIS_SUMMARY = "summary.json"
ANALYSIS_REPORT = "report.md"
ANALYSIS_FIGURES = "figures"


def cache_root() -> Path:
    """The per-user cache outside any sweep: ``$IRM_HPC_CACHE``, default ``~/.cache/irm_hpc`` (converted
    GGUF models under ``models/``, fitted judges under ``judge/``)."""
    return Path(os.environ.get("IRM_HPC_CACHE", Path.home() / ".cache" / "irm_hpc"))


def record_segment_name(first_step: int, k: int = 0) -> str:
    """File name of a record segment (matches ``RECORD_SEG_GLOB``): ``seg-<first_step:08d>.h5``, or
    ``seg-<first_step:08d>-<k>.h5`` for the k-th (k >= 1) segment starting at the same step."""
    return f"seg-{int(first_step):08d}{f'-{k}' if k else ''}.h5"


# seg-<step:08d>.h5 or seg-<step:08d>-<k>.h5 (k >= 1): the only names record/index.json may list.
RECORD_SEG_RE = re.compile(r"seg-[0-9]{8,}(?:-[1-9][0-9]*)?\.h5")


def is_record_segment_name(name: object) -> bool:
    """True if ``name`` is a segment file name :func:`record_segment_name` can produce (no directory part)."""
    return isinstance(name, str) and RECORD_SEG_RE.fullmatch(name) is not None


# A name that becomes a path component or a task id: no separator, no leading dot or dash, no "..".
SAFE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._,-]*")
SAFE_NAME_MAX = 128


def safe_component(name: object, what: str) -> str:
    """Return ``name`` if it may become one path component (a sweep dir name, a task id, a run dir).

    Allowed: letters, digits and ``. _ , -``; not starting with ``.`` or ``-``; at most 128 characters
    (so never ``..``, a separator, whitespace or a control character). ``what`` names the config key or
    option in the error. Raises ``ConfigError``.
    """
    text = str(name)
    if len(text) > SAFE_NAME_MAX or not SAFE_NAME_RE.fullmatch(text):
        raise ConfigError(f"{what} {text!r} cannot name a directory: use letters, digits and . _ , - (not starting "
                          f"with . or -, at most {SAFE_NAME_MAX} characters)")
    return text


def restrict_umask() -> int:
    """Add group and other *write* to the process umask (returns the old umask).

    Called by the launcher, resume and training, so that sweep files, submitit pickles and DeepSpeed
    checkpoints are never writable by other users (Slurm gives jobs the umask of ``sbatch``, and local
    jobs inherit it), and :func:`check_private` accepts what irm_hpc itself wrote.
    """
    old = os.umask(0o022)
    os.umask(old | 0o022)
    return old


def make_private_dir(path: PathLike, *, exist_ok: bool = False) -> Path:
    """``mkdir`` (parents as needed) with mode 0700: only the owner can list, enter or write it."""
    path = Path(path)
    existed = path.is_dir()
    path.mkdir(mode=0o700, parents=True, exist_ok=exist_ok)
    if not existed:
        os.chmod(path, 0o700)
    return path


def _user(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return str(uid)


def check_private(path: PathLike, *, contents: bool = False) -> None:
    """Refuse ``path`` if another user could change what irm_hpc unpickles or loads from it.

    ``path`` (and, with ``contents``, every entry directly in it) must be owned by this process's uid and
    must not be group- or world-writable. A missing ``path`` passes (nothing to load). Call it before
    unpickling submitit results, resuming a sweep, or loading a DeepSpeed checkpoint (``torch.load``
    with ``weights_only=False``). Raises ``UnsafePathError`` whose one-line message holds the exact
    ``chmod``/``chown`` command that fixes it.
    """
    top = Path(path)
    try:
        entries = [top, *sorted(top.iterdir())] if contents and top.is_dir() else [top]
    except OSError:
        entries = [top]
    uid = os.getuid()
    foreign, writable = [], []
    for p in entries:
        try:
            st = os.stat(p)
        except OSError:
            continue
        if st.st_uid != uid:
            foreign.append((p, st.st_uid))
        elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            writable.append((p, stat.S_IMODE(st.st_mode)))
    if foreign:
        p, owner = foreign[0]
        more = f" (and {len(foreign) - 1} more entries)" if len(foreign) > 1 else ""
        target = f"-R {shlex.quote(str(top))}" if len(foreign) > 1 else shlex.quote(str(p))
        raise UnsafePathError(f"{p} is owned by uid {owner}, not by you (uid {uid}){more}: irm_hpc does not load "
                              f"pickles or checkpoints another user controls; fix: sudo chown {_user(uid)} {target} "
                              "(or copy it into a directory of your own)")
    if writable:
        p, mode = writable[0]
        who = "group and others" if mode & 0o022 == 0o022 else ("others" if mode & 0o002 else "group")
        more = f" (and {len(writable) - 1} more entries)" if len(writable) > 1 else ""
        target = " ".join(shlex.quote(str(q)) for q, _ in writable) if len(writable) <= 3 else \
            f"-R {shlex.quote(str(top))}"
        raise UnsafePathError(f"{p} is writable by {who} (mode {mode:04o}){more}: another user could plant a pickle "
                              f"or checkpoint irm_hpc would load; fix: chmod go-w {target}")


def yaml_data(text: str) -> Any:
    """Parse YAML read from disk (a file, a manifest field, an HDF5 attribute) as plain data.

    ``${...}`` interpolations (``${oc.env:SECRET}``, custom resolvers) are kept verbatim as strings,
    never resolved. Raises ``ValueError`` / ``yaml.YAMLError`` / omegaconf errors on text that is not YAML.
    """
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(text), resolve=False)


def _escape_interpolations(obj: Any) -> Any:
    if isinstance(obj, str):  # "${" -> "\${" (and backslashes right before it doubled): a literal string
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", obj)
    if isinstance(obj, dict):
        return {k: _escape_interpolations(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_escape_interpolations(v) for v in obj]
    return obj


def verbatim_config(text: str):
    """A ``DictConfig`` of YAML read from disk whose strings read back verbatim: ``${...}`` in the data
    is escaped, so accessing a value never resolves an interpolation (``oc.env`` or any resolver).
    Raises what :func:`yaml_data` raises."""
    from omegaconf import OmegaConf

    return OmegaConf.create(_escape_interpolations(yaml_data(text)))


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
    evaluation = property(lambda self: self.root / EVALUATION_DIR)
    evaluation_summary = property(lambda self: self.root / EVALUATION_DIR / EVALUATION_SUMMARY)
    generations = property(lambda self: self.root / EVALUATION_DIR / GENERATIONS)
    ablation = property(lambda self: self.root / ABLATION_DIR)
    ablation_summary = property(lambda self: self.root / ABLATION_DIR / EVALUATION_SUMMARY)

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
    summary = property(lambda self: self.analysis / ANALYSIS_SUMMARY)
    report = property(lambda self: self.analysis / ANALYSIS_REPORT)
    logs = property(lambda self: self.root / "logs")
    train_logs = property(lambda self: self.logs / "train")
    analysis_logs = property(lambda self: self.logs / "analysis")
    evaluation_logs = property(lambda self: self.logs / "evaluation")
    ablation_logs = property(lambda self: self.logs / "ablation")
    driver_logs = property(lambda self: self.logs / "driver")

    @staticmethod
    def task_out_dir(task_id: str) -> str:
        """A task's ``out_dir`` relative to the sweep dir (what the manifest stores)."""
        return f"runs/{task_id}"

    def run(self, out_dir: PathLike) -> RunDir:
        """The run dir of a task, from its (relative or absolute) ``out_dir``.

        Raises ``ManifestError`` if ``out_dir`` leads outside the sweep directory (``..``, an absolute path
        elsewhere) or is the sweep directory itself: a crafted manifest must not make training or
        checkpoint pruning write or delete elsewhere. Checked lexically (symlinks the owner made are
        the owner's business; :func:`check_private` keeps others from making them).
        """
        root = Path(os.path.abspath(self.root))
        p = Path(os.path.normpath(root / Path(out_dir)))
        if root not in p.parents:
            raise ManifestError(f"task out_dir {str(out_dir)!r} resolves to {p}, outside the sweep directory {root}; "
                                "restore manifest.json (a task's out_dir is runs/<task_id>)")
        return RunDir(p)

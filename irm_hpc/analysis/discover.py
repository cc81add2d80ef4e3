"""Find the runs to analyse: a sweep directory (``manifest.json``), run dirs, ``.h5`` files or globs."""

from __future__ import annotations

import glob
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

from irm_hpc.analysis.params import AnalysisError
from irm_hpc.errors import one_line
from irm_hpc.layout import INJECTIONS, RECORD_DIR, RunDir, SweepDir

PathLike = Union[str, Path]


@dataclass
class RunRef:
    """One run to analyse.

    path: a run dir (``out_dir`` holding ``injections.h5`` or ``record/``), a ``record/`` dir or an HDF5
    file. name: unique, file-name-safe label (the manifest's task_id when known). alignment / seed /
    layer_set: from the sweep manifest when known (None otherwise; the map step then takes alignment
    and seed from the run's root attributes and derives the layer set from the config or the
    injection layers).
    """

    path: Path
    name: str
    alignment: Optional[str] = None
    seed: Optional[int] = None
    layer_set: Optional[str] = None
    task_id: Optional[str] = None

    def as_dict(self) -> dict:
        return {"path": str(self.path), "name": self.name, "alignment": self.alignment, "seed": self.seed,
                "layer_set": self.layer_set, "task_id": self.task_id}


def warn(msg: str) -> None:
    """One-line warning on stderr (skipped runs and files)."""
    print(f"irm_hpc.analysis: warning: {msg}", file=sys.stderr, flush=True)


def safe_name(text: str) -> str:
    """File-name-safe run label: characters outside ``[A-Za-z0-9._-]`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "run"


def has_record(p: Path) -> bool:
    """True if ``p`` is a file (an HDF5 record, checked when opened), or a dir holding ``injections.h5`` or a
    record segment dir (itself or its ``record/``): `irm_hpc.layout.RunDir.has_record`."""
    return p.is_file() or RunDir(p).has_record()


def _default_name(p: Path) -> str:
    """Label of a run path: the run dir's name (for ``.../<run>/injections.h5`` and ``.../<run>/record``),
    else the file's stem or the dir's name."""
    return p.stem if p.is_file() and p.name != INJECTIONS else RunDir.containing(p).root.name


def _run_dir_of(p: Path) -> Path:
    """The run directory (out_dir) containing the record at ``p``: the run dir of ``injections.h5`` or
    ``record/``; any other HDF5 file stands for itself (bare files copied into one dir are distinct runs)."""
    return p if p.is_file() and p.name != INJECTIONS else RunDir.containing(p).root


def read_manifest(sweep_dir: Path) -> list[dict]:
    """Tasks of ``<sweep_dir>/manifest.json`` (`irm_hpc.manifest.load_manifest`; schema:
    docs/architecture.md "Sweep manifest"), each a dict with ``task_id``, ``alignment``, ``seed``,
    ``layer_set`` and ``out_dir`` (absolute: `irm_hpc.manifest.Manifest.task_dir`).

    Raises AnalysisError (one line) if the manifest is unreadable, of a newer schema or malformed.
    """
    from irm_hpc.manifest import ManifestError, load_manifest

    file = SweepDir(sweep_dir).manifest
    try:
        m = load_manifest(sweep_dir)
    except (ManifestError, KeyError, TypeError, AttributeError) as exc:  # load_manifest lets the last 3 through
        raise AnalysisError(f"{file}: unreadable sweep manifest ({one_line(exc, with_type=True)}); "
                            "pass the run dirs or their injections.h5 files instead") from None
    return [{"task_id": t.task_id, "alignment": t.alignment, "seed": t.seed, "layer_set": t.layer_set,
             "out_dir": m.task_dir(t)} for t in m.tasks]


def _manifest_ref(p: Path) -> Optional[RunRef]:
    """RunRef with the manifest's task fields if ``p`` is a task dir of a sweep (manifest up to 3 levels up)."""
    run_dir = _run_dir_of(p).resolve()
    for sweep in list(run_dir.parents)[:3]:
        if SweepDir(sweep).manifest.is_file():
            try:
                tasks = read_manifest(sweep)
            except AnalysisError:
                return None
            for t in tasks:
                if t["out_dir"].resolve() == run_dir:
                    return RunRef(p, safe_name(t["task_id"]), t["alignment"], _int_or_none(t["seed"]),
                                  t["layer_set"], t["task_id"])
            return None
    return None


def _int_or_none(v: object) -> Optional[int]:
    try:
        return int(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def ref_for_path(path: PathLike) -> RunRef:
    """RunRef of a single run path (used by `map_run`); manifest fields are filled in when the run is a
    task dir of a sweep."""
    p = Path(path)
    return _manifest_ref(p) or RunRef(p, safe_name(_default_name(p)))


def _expand(item: PathLike, skipped: list[dict]) -> list[RunRef]:
    s = str(item)
    if any(c in s for c in "*?[") and not Path(s).exists():
        matches = sorted(glob.glob(s, recursive=True))
        if not matches:
            skipped.append({"path": s, "reason": "glob matched nothing"})
            warn(f"skipping {s}: glob matched nothing")
        refs: list[RunRef] = []
        for m in matches:
            refs += _expand(m, skipped)
        return refs
    p = Path(s)
    if not p.exists():
        skipped.append({"path": s, "reason": "no such file or directory"})
        warn(f"skipping {s}: no such file or directory")
        return []
    if p.is_dir() and SweepDir(p).manifest.is_file():
        refs = []
        for t in read_manifest(p):
            od = t["out_dir"]
            if not has_record(od):
                reason = "no records yet (run not started)" if not od.exists() else "no records yet"
                skipped.append({"path": str(od), "name": t["task_id"], "reason": reason})
                warn(f"skipping {od}: {reason}")
                continue
            refs.append(RunRef(od, safe_name(t["task_id"]), t["alignment"], _int_or_none(t["seed"]),
                               t["layer_set"], t["task_id"]))
        return refs
    if p.is_file():
        return [ref_for_path(p)]
    if has_record(p):
        return [ref_for_path(p)]
    # a plain directory: every run below it (finalized files first, then still-training record dirs)
    found: dict[Path, Path] = {}
    for f in sorted(p.rglob(INJECTIONS)):
        found[f.parent.resolve()] = f.parent
    for d in sorted(p.rglob(RECORD_DIR)):
        if d.is_dir() and d.parent.resolve() not in found and has_record(d):
            found[d.parent.resolve()] = d.parent
    if not found:
        skipped.append({"path": s, "reason": "no run files (injections.h5 or record/) found"})
        warn(f"skipping {s}: no run files (injections.h5 or record/) found")
    return [ref_for_path(d) for d in found.values()]


def discover_runs(inputs: Union[PathLike, Iterable[PathLike]], *, skipped: Optional[list] = None) -> list[RunRef]:
    """Runs named by ``inputs``: a sweep dir (its manifest's tasks), a run dir, a ``record/`` dir, an HDF5
    file, a glob (``runs/*/injections.h5``), or a dir searched recursively; or a list of these.

    Runs listed twice are kept once; names are made unique (``name``, ``name-2``, ...). Inputs without
    records are skipped with a warning and appended to ``skipped`` (dicts with ``path`` and ``reason``).
    Raises AnalysisError if no run is found.
    """
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    skipped = [] if skipped is None else skipped
    refs: list[RunRef] = []
    seen: set[Path] = set()
    for item in items:
        for ref in _expand(item, skipped):
            key = _run_dir_of(ref.path).resolve()  # a run dir and its injections.h5 are one run
            if key in seen:
                continue
            seen.add(key)
            refs.append(ref)
    names: dict[str, int] = {}
    for ref in refs:
        n = names.get(ref.name, 0) + 1
        names[ref.name] = n
        if n > 1:
            ref.name = f"{ref.name}-{n}"
    if not refs:
        what = ", ".join(map(str, items)) or "(no inputs)"
        raise AnalysisError(f"no run files found in {what}; pass a sweep dir (with manifest.json), run dirs "
                            "(with injections.h5 or record/) or .h5 files")
    return refs

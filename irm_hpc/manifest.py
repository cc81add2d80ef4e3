"""The sweep manifest: ``runs/<sweep>-<timestamp>/manifest.json``.

One JSON document per sweep listing every task's parameters, output directory, job ids and last
known state. It is written atomically (temporary file + ``os.replace``) under an exclusive
``fcntl.flock`` on ``manifest.lock``, so that concurrent resumes never interleave. Schema: see
docs/architecture.md ("Sweep manifest").
"""

from __future__ import annotations

import fcntl
import itertools
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from omegaconf import DictConfig, OmegaConf

from irm_hpc.errors import ManifestError, one_line  # noqa: F401  (ManifestError re-exported)
from irm_hpc.layout import SweepDir, atomic_write_json, safe_component, verbatim_config

MANIFEST_VERSION = 1


@dataclass
class Task:
    """One training task of a sweep; ``out_dir`` is relative to the sweep directory."""

    index: int
    task_id: str
    alignment: str
    seed: int
    layer_set: str
    out_dir: str
    overrides: list[str]
    job_id: Optional[str] = None
    state: str = "PLANNED"
    submissions: list[dict] = field(default_factory=list)  # [{"job_id", "time", "reason"}]


def expand_tasks(alignments: list[str], seeds: list[int], layer_sets: list[str], base_overrides: list[str]) -> list[Task]:
    """Cartesian product alignments x seeds x layer sets, in that nesting order.

    Task ids name run directories (``runs/<task_id>``): each alignment and layer set must pass
    ``layout.safe_component`` (no separator, no ``..``, no control character). Raises ``ConfigError``.
    """
    for align in alignments:
        safe_component(align, "sweep.alignments entry")
    for lset in layer_sets:
        safe_component(lset, "sweep.layer_sets entry")
    tasks = []
    for i, (align, seed, lset) in enumerate(itertools.product(alignments, seeds, layer_sets)):
        task_id = safe_component(f"{align}-s{int(seed)}-{str(lset).replace(',', '_')}", "task id")
        out_dir = SweepDir.task_out_dir(task_id)
        overrides = [*base_overrides, f"alignment={align}", f"seed={seed}", f"irm.layer_set={lset}"]
        tasks.append(Task(i, task_id, align, int(seed), str(lset), out_dir, overrides))
    return tasks


@dataclass
class Manifest:
    """In-memory manifest. ``path`` is the sweep directory."""

    sweep_dir: Path
    sweep: str
    executor: str
    created: float
    config_yaml: str
    tasks: list[Task]
    config_dirs: list[str] = field(default_factory=list)  # user config dirs at launch (absolute); jobs use them
    train_job_ids: list[str] = field(default_factory=list)  # array job id per submission round
    analysis_job_ids: list[str] = field(default_factory=list)
    schema_version: int = MANIFEST_VERSION

    @property
    def file(self) -> Path:
        return SweepDir(self.sweep_dir).manifest

    def to_json(self) -> dict:
        data = asdict(self)
        data["sweep_dir"] = str(self.sweep_dir)
        return data

    def save(self) -> None:
        """Write atomically (``layout.atomic_write_json``: tmp + fsync + os.replace + dir fsync)."""
        atomic_write_json(self.file, self.to_json(), indent=1)

    def task_dir(self, task: Task) -> Path:
        """The task's run directory (absolute)."""
        return SweepDir(self.sweep_dir).run(task.out_dir).root

    def launch_config(self) -> DictConfig:
        """The resolved launch config the sweep was submitted with (``sweep``, ``cluster``, ``runs_root``).

        Read as data (``layout.verbatim_config``): a ``${oc.env:...}`` in the stored YAML stays that text,
        it is never resolved."""
        return verbatim_config(self.config_yaml)

    def record_submission(self, indices: list[int], job_ids: list[str], reason: str) -> None:
        """Store the job id of each task index (in memory; the caller saves under the lock)."""
        for idx, job_id in zip(indices, job_ids):
            task = self.tasks[idx]
            task.job_id, task.state = job_id, "SUBMITTED"
            task.submissions.append({"job_id": job_id, "time": time.time(), "reason": reason})


def record_submission(sweep_dir: str | Path, indices: list[int], job_ids: list[str], reason: str) -> None:
    """Store job ids in the manifest on disk, under the manifest lock (used by the local driver)."""
    with locked(sweep_dir):
        manifest = load_manifest(sweep_dir)
        manifest.record_submission(indices, job_ids, reason)
        manifest.save()


def analysis_params(manifest: Manifest) -> list[str]:
    """The sweep's striation-analysis ``key=value`` parameters (``sweep.analysis`` of its config)."""
    return list(OmegaConf.select(manifest.launch_config(), "sweep.analysis", default=[]) or [])


def evaluation_section(manifest: Manifest, stage: str = "evaluation") -> dict:
    """The sweep's ``sweep.evaluation`` (or ``sweep.<stage>``) settings as a plain dict (``{}`` for a sweep
    launched before that stage existed: it has none, so the stage does not run)."""
    node = OmegaConf.select(manifest.launch_config(), f"sweep.{stage}", default=None)
    if node is None:
        return {}
    return dict(OmegaConf.to_container(node, resolve=False)) if isinstance(node, DictConfig) else {}


def ablation_section(manifest: Manifest) -> dict:
    """The sweep's ``sweep.ablation`` settings as a plain dict (``{}``: not ablated)."""
    return evaluation_section(manifest, "ablation")


def load_manifest(sweep_dir: str | Path) -> Manifest:
    """Read ``<sweep_dir>/manifest.json``.

    Raises ``ManifestError`` if the directory is not a sweep, the JSON is unreadable or of the wrong
    shape (not an object; a field missing, unknown or of the wrong type, e.g. ``"tasks": 5`` or
    ``{"index": "x"}``; a launch config that is not a mapping), or the schema is newer than this irm_hpc
    understands, or a task's ``out_dir`` leads outside the sweep directory
    (``layout.SweepDir.run``).
    """
    sweep_dir = Path(sweep_dir).resolve()
    file = SweepDir(sweep_dir).manifest
    if not file.is_file():
        raise ManifestError(f"{sweep_dir} is not a sweep directory (no manifest.json); pass the directory printed by irm_hpc.launch")
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"cannot read {file}: {exc}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{file} is not an irm_hpc manifest (a JSON {type(data).__name__}, not an object); "
                            "pass the directory printed by irm_hpc.launch")
    version = data.get("schema_version")
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise ManifestError(f"{file} has manifest schema {version}; this irm_hpc reads <= {MANIFEST_VERSION}: upgrade irm_hpc")
    problem = _shape_problem(data)
    if problem:
        raise ManifestError(f"{file} is not an irm_hpc manifest ({problem}); pass the directory printed by "
                            "irm_hpc.launch, or restore manifest.json")
    try:
        tasks = [Task(**t) for t in data["tasks"]]
        data.update(sweep_dir=sweep_dir, tasks=tasks)
        manifest = Manifest(**data)
        for task in tasks:
            manifest.task_dir(task)  # ManifestError for an out_dir outside the sweep
        return manifest
    except (KeyError, TypeError, AttributeError) as exc:
        raise ManifestError(f"{file} is not an irm_hpc manifest ({type(exc).__name__}: {one_line(exc)}); "
                            "pass the directory printed by irm_hpc.launch") from None


_STR, _INT, _NUM = (str,), (int,), (int, float)
# field -> (accepted JSON types, required); lists are checked item by item ("list[str]")
_MANIFEST_FIELDS = {"sweep": (_STR, True), "executor": (_STR, True), "created": (_NUM, True),
                    "config_yaml": (_STR, True), "tasks": ("list", True), "sweep_dir": (_STR, False),
                    "config_dirs": ("list[str]", False), "train_job_ids": ("list[str]", False),
                    "analysis_job_ids": ("list[str]", False), "schema_version": (_INT, True)}
_TASK_FIELDS = {"index": (_INT, True), "task_id": (_STR, True), "alignment": (_STR, True), "seed": (_INT, True),
                "layer_set": (_STR, True), "out_dir": (_STR, True), "overrides": ("list[str]", True),
                "job_id": ((str, type(None)), False), "state": (_STR, False), "submissions": ("list[dict]", False)}


def _type_problem(where: str, value, kind) -> Optional[str]:
    if isinstance(kind, str):  # "list", "list[str]", "list[dict]"
        if not isinstance(value, list):
            return f"{where} is a JSON {type(value).__name__}, not a list"
        item = {"list[str]": str, "list[dict]": dict}.get(kind)
        bad = next((i for i, v in enumerate(value) if item is not None and not isinstance(v, item)), None)
        return None if bad is None else f"{where}[{bad}] is {value[bad]!r}, not a {item.__name__}"
    if isinstance(value, bool) or not isinstance(value, kind):  # JSON true is not an index
        return f"{where} is {value!r}, not {' or '.join('null' if k is type(None) else k.__name__ for k in kind)}"
    return None


def _shape_problem(data: dict) -> Optional[str]:
    """What is wrong with the shape of a manifest's JSON (field missing, unknown, of the wrong type), or
    None. The launch config (``config_yaml``) must be a YAML mapping (its ``cluster``, if present, a
    mapping; ``executors.for_manifest`` requires it), and ``tasks[i].index`` must be ``i``."""
    def objects():
        yield _MANIFEST_FIELDS, data, ""  # checked first: "tasks" is a list before its items are read
        for i, t in enumerate(data["tasks"]):
            yield _TASK_FIELDS, t, f"tasks[{i}]."

    for fields, obj, where in objects():
        if not isinstance(obj, dict):
            return f"{where.rstrip('.')} is {obj!r}, not an object"
        for key, (kind, required) in fields.items():
            if key not in obj:
                if required:
                    return f"field '{where}{key}' is missing"
                continue
            problem = _type_problem(f"{where}{key}", obj[key], kind)
            if problem:
                return problem
        unknown = sorted(set(obj) - set(fields))
        if unknown:
            return f"unknown field '{where}{unknown[0]}'"
    for i, t in enumerate(data["tasks"]):
        if t["index"] != i:
            return f"tasks[{i}].index is {t['index']}, not {i}"
    try:
        launch = OmegaConf.create(data["config_yaml"])
    except Exception as exc:  # noqa: BLE001 - yaml and omegaconf raise many types
        return f"config_yaml is not YAML ({type(exc).__name__})"
    if not isinstance(launch, DictConfig) or not isinstance(launch.get("cluster", {}), (DictConfig, dict)):
        return "config_yaml is not a launch config (a mapping whose 'cluster' is a mapping)"
    return None


@contextmanager
def locked(sweep_dir: str | Path, timeout_s: float = 60.0) -> Iterator[None]:
    """Exclusive lock on ``<sweep_dir>/manifest.lock`` (``fcntl.flock``); waits up to ``timeout_s`` seconds.

    Raises ``ManifestError`` if the lock is not obtained in time.
    """
    path = SweepDir(sweep_dir).lock
    with open(path, "a+") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ManifestError(f"{path} is held by another irm_hpc process; try again later") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

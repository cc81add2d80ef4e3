"""Where a sweep's jobs run: one executor class per backend, after submitit's own design.

:class:`SweepExecutor` is the interface every stage uses (launch, status, resume, wait); the backends:

* :class:`SlurmSweepExecutor`: the training tasks as ONE Slurm job array (``submitit.SlurmExecutor``,
  ``executor.batch()``), then (``sweep.evaluation.enabled``) the evaluation array
  (``--dependency=afterany:<train array>``, ``sweep.evaluation.runs_per_task`` runs per task, one rank
  with the training task's CPUs, memory and GPUs), then the analysis map array (``afterany`` on the
  previous array,
  ``cluster.analysis_runs_per_task`` runs per array task) and the reduce job (``afterany:<map array>``).
  States: one ``sacct`` + one ``squeue`` call per query.
* :class:`LocalSweepExecutor`: no Slurm; one ``submitit.LocalExecutor`` driver job
  (``jobs.LocalSweep``) trains the tasks one after another, then runs the analysis (the local executor
  has no dependencies). States: the run files plus whether the driver process is alive.
* :class:`DebugSweepExecutor`: the same driver in the launching process (``submitit.DebugExecutor``).

``cluster.executor=auto`` picks Slurm when ``sbatch`` is on PATH. Resources carry their units in their
names (``timeout_min``, ``mem_gb``, ``cpus_per_task``), as in submitit.
"""

from __future__ import annotations

import abc
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import submitit
from omegaconf import DictConfig

from irm_hpc.errors import ConfigError, IrmError, one_line
from irm_hpc.jobs import (AblateTask, AnalysisMapTask, AnalysisReduceTask, EvaluateTask, LocalSweep, TrainTask,
                          local_executor)
from irm_hpc.layout import ANALYSIS_SUMMARY, SweepDir
from irm_hpc.manifest import Manifest, ManifestError, Task, ablation_section, analysis_params, evaluation_section

# Slurm job states (sacct/squeue names).
LIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD",
        "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}
RESUBMIT = {"FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


class LaunchError(IrmError, RuntimeError):
    """A sweep cannot be submitted (one-line message naming the problem and the fix)."""


@dataclass
class JobInfo:
    """Scheduler view of one task: state (Slurm names; ``NOT_RUN``/``NOT_SUBMITTED``/``UNKNOWN`` besides),
    node list, elapsed time as the scheduler prints it."""

    state: str
    node: str = ""
    elapsed: str = ""


@dataclass
class Submission:
    """What one submission round sent: printable job ids (``train``, ``map``, ``reduce`` or ``driver``),
    and the submitit job whose end is the sweep's end."""

    ids: dict[str, str]
    last_job: Optional[submitit.Job] = field(default=None, repr=False)


class SweepExecutor(abc.ABC):
    """Runs a sweep's training tasks and its analysis. ``cluster``: the ``cluster`` config section."""

    kind: ClassVar[str]

    def __init__(self, cluster: DictConfig):
        self.cluster = cluster

    @abc.abstractmethod
    def submit(self, manifest: Manifest, tasks: list[Task], reason: str) -> Submission:
        """Submit ``tasks`` and the analysis after them; store job ids in ``manifest`` (in memory). The
        caller holds the manifest lock and saves the manifest afterwards. Raises ``LaunchError``."""

    @abc.abstractmethod
    def job_states(self, manifest: Manifest, done: dict[int, bool], steps: dict[int, int]) -> tuple[dict[int, JobInfo], str]:
        """Scheduler state of every task (by task index), from one query for the whole sweep.

        ``done``/``steps``: each task's ``DONE`` flag and last logged step (from its run dir). Returns
        ``(states, note)``; ``note`` is "" or says which source failed.
        """

    def resubmit_tasks(self, todo: list[Task]) -> list[Task]:
        """The tasks a resume submits, given those that need it (the local driver re-runs the sweep)."""
        return todo

    def before_resubmit(self, manifest: Manifest) -> None:
        """Called under the manifest lock before a resume submits (e.g. cancel stale analysis jobs)."""

    def preview(self, n_tasks: int, folder: Path, job_name: str = "irm-train") -> Optional[str]:
        """The batch script the training array would be submitted with, or None (no batch script)."""
        return None

    def validate(self, sweep_name: str, n_tasks: int) -> None:
        """Check the cluster settings before anything is created (``ConfigError``); no-op by default."""

    @staticmethod
    def train_job_name(sweep_name: str) -> str:
        """The scheduler job name of a sweep's training tasks."""
        return f"irm-{sweep_name}"



# ----------------------------------------------------------------------------- Slurm
def _expand(job_field: str) -> list[str]:
    """``123_[0-3,7%2]`` -> ``123_0 ... 123_3, 123_7``; other ids unchanged."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_field)
    if not m:
        return [job_field]
    base, spec = m.group(1), m.group(2).split("%")[0]
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += [f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def _run(cmd: list[str]) -> Optional[str]:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


def query_slurm(array_ids: list[str]) -> tuple[dict[str, JobInfo], str]:
    """States of every task of ``array_ids`` from one ``sacct`` + one ``squeue`` call.

    Returns ``(states by 'ARRAY_TASK' id, note)``; ``note`` is "" or says which source failed.
    Live states from ``squeue`` win over ``sacct`` (which lags a few seconds).
    """
    states: dict[str, JobInfo] = {}
    note = ""
    ids = ",".join(sorted(set(array_ids)))
    if not ids:
        return states, note
    out = _run(["sacct", "-X", "-n", "-P", "-j", ids, "--format=JobID,State,NodeList,Elapsed"])
    if out is None:
        note = "sacct failed: states from squeue and run files"
    else:
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) >= 4:
                for jid in _expand(parts[0]):
                    states[jid] = JobInfo(parts[1].split()[0], parts[2] if parts[2] != "None assigned" else "", parts[3])
    sq = _run(["squeue", "-h", "-j", ids, "-o", "%i|%T|%N|%M"])
    if sq is None:
        note = (note + "; " if note else "") + "squeue failed"
    else:
        for line in sq.splitlines():
            parts = line.split("|")
            if len(parts) >= 4:
                for jid in _expand(parts[0]):
                    states[jid] = JobInfo(parts[1], parts[2], parts[3])
    return states, note


def live_arrays(array_ids: list[str]) -> list[str]:
    """Those of ``array_ids`` that still have a task in Slurm's queue (``squeue -j``; [] if it fails). A
    resume's evaluation and analysis must wait for them as well as for the new array: sbatch refuses a
    dependency on a job id the controller no longer knows, so ended arrays are left out."""
    if not array_ids:
        return []
    out = _run(["squeue", "-h", "-j", ",".join(sorted(set(array_ids))), "-o", "%F"])
    live = {line.strip() for line in (out or "").splitlines() if line.strip()}
    return [a for a in array_ids if a in live]


def map_chunks(run_dirs: list[str], runs_per_task: int,
               what: str = "cluster.analysis_runs_per_task") -> list[list[str]]:
    """Split the sweep's run directories into consecutive chunks of ``runs_per_task`` (one map-array or
    evaluation-array task each, so hundreds of small runs do not become hundreds of scheduler jobs).
    Raises ``LaunchError`` naming ``what`` if ``runs_per_task`` < 1."""
    if runs_per_task < 1:
        raise LaunchError(f"{what} must be >= 1, got {runs_per_task}")
    return [run_dirs[i:i + runs_per_task] for i in range(0, len(run_dirs), runs_per_task)]


# What may go into an "#SBATCH --key=value" line. submitit shell-quotes values but not keys, and a
# newline (or any control character) inside quotes still ends the #SBATCH comment: the rest of the
# value would run as shell in the batch script. Names (partition, account, qos, job name) take the
# characters Slurm names are made of; other values (constraint, additional_parameters) any printable
# character (submitit quotes them); keys are option names.
SBATCH_NAME_RE = re.compile(r"[A-Za-z0-9._,-]+")
SBATCH_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
SBATCH_NAMES = {"job_name": "sweep.name (the job name irm-<sweep>)", "partition": "cluster.partition",
                "account": "cluster.account", "qos": "cluster.qos"}
SBATCH_CONFIG_KEYS = {"constraint": "cluster.constraint", "dependency": "dependency"}


def check_sbatch_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """Return ``params`` (``submitit.SlurmExecutor`` parameters) if every string can sit in one
    ``#SBATCH`` line; ``setup`` lines are shell by design and not checked.

    Raises ``ConfigError`` naming the config key: a control character (newline, CR, tab, NUL, ...) in
    any value or ``additional_parameters`` key, a partition/account/qos/job name outside
    ``[A-Za-z0-9._,-]``, an ``additional_parameters`` key that is not an option name.
    """
    def bad(key: str, value: Any, rule: str) -> ConfigError:
        return ConfigError(f"{key} {str(value)!r} cannot go into an #SBATCH line: {rule}")

    for name, value in params.items():
        if name in ("setup", "additional_parameters") or not isinstance(value, str):
            continue
        if name in SBATCH_NAMES:
            if not SBATCH_NAME_RE.fullmatch(value):
                raise bad(SBATCH_NAMES[name], value, "use letters, digits and . _ , - only")
        elif not value.isprintable():
            raise bad(SBATCH_CONFIG_KEYS.get(name, f"cluster.{name}"), value,
                      "remove the newline/control character")
    for key, value in (params.get("additional_parameters") or {}).items():
        if not isinstance(key, str) or not SBATCH_KEY_RE.fullmatch(key):
            raise bad("cluster.additional_parameters key", key, "use an sbatch option name (letters, digits, _ -)")
        if not isinstance(value, (bool, int, float, str)) or not str(value).isprintable():
            raise bad(f"cluster.additional_parameters.{key}", value,
                      "use a single-line string, number or true (remove the newline/control character)")
    return params


def check_sbatch_folder(folder: Path) -> Path:
    """Return ``folder`` (a submitit log folder: ``#SBATCH --output=<folder>/...``) if it has no control
    character. Raises ``ConfigError`` (naming ``runs_root`` / ``--name``)."""
    if not str(folder).isprintable():
        raise ConfigError(f"log folder {str(folder)!r} cannot go into an #SBATCH line: remove the newline/control "
                          "character from runs_root or --name")
    return folder


class SlurmSweepExecutor(SweepExecutor):
    """One job array for training, a map array and a reduce job for the analysis (see module doc)."""

    kind = "slurm"

    def parameters(self, name: str, n_tasks: int = 1, dependency: Optional[str] = None,
                   analysis: bool = False, evaluation: bool = False) -> dict[str, Any]:
        """``submitit.SlurmExecutor`` parameters from the cluster preset (analysis jobs: 1 task, no GPU;
        evaluation jobs: 1 node, 1 task, with a training task's CPUs, memory, time and GPUs per rank).

        Raises ``ConfigError`` for a value that cannot sit in one ``#SBATCH`` line
        (:func:`check_sbatch_parameters`: a newline in ``cluster.partition`` would run as shell)."""
        c = self.cluster
        extra = dict(c.additional_parameters)
        if dependency:
            extra["dependency"] = dependency
        params = dict(
            job_name=name, partition=c.partition, signal_delay_s=int(c.signal_delay_s),
            array_parallelism=max(1, min(int(c.array_parallelism), n_tasks)),
            setup=list(c.setup), additional_parameters=extra, qos=c.qos, account=c.account, constraint=c.constraint,
        )
        if analysis:
            params.update(nodes=1, ntasks_per_node=1, cpus_per_task=int(c.analysis_cpus),
                          mem=f"{int(c.analysis_mem_gb * 1024)}MB", time=int(c.analysis_timeout_min))
        elif evaluation:
            params.update(nodes=1, ntasks_per_node=1, cpus_per_task=int(c.cpus_per_task),
                          mem=f"{int(c.mem_gb * 1024)}MB", time=int(c.timeout_min))
            gpus = int(c.gpus_per_task) or (1 if c.gpus_per_node else 0)
            if gpus:
                params["gpus_per_task"] = gpus
        else:
            params.update(nodes=int(c.nodes), ntasks_per_node=int(c.tasks_per_node), cpus_per_task=int(c.cpus_per_task),
                          mem=f"{int(c.mem_gb * 1024)}MB", time=int(c.timeout_min))
            if c.gpus_per_node:
                params["gpus_per_node"] = int(c.gpus_per_node)
            if c.gpus_per_task:
                params["gpus_per_task"] = int(c.gpus_per_task)
        return check_sbatch_parameters({k: v for k, v in params.items() if v not in (None, [], {})})

    def validate(self, sweep_name: str, n_tasks: int) -> None:
        """Build every parameter set :meth:`submit` will use (training, map, reduce), so a bad value fails
        before anything is created. Raises ``ConfigError``."""
        self.parameters(self.train_job_name(sweep_name), n_tasks)
        self.parameters(f"irm-eval-{sweep_name}", n_tasks, "afterany:1", evaluation=True)
        self.parameters(f"irm-map-{sweep_name}", n_tasks, "afterany:1", analysis=True)
        self.parameters(f"irm-reduce-{sweep_name}", 1, "afterany:1", analysis=True)
        self.parameters(f"irm-ablate-{sweep_name}", n_tasks, "afterany:1", evaluation=True)

    def _executor(self, folder: Path, name: str, n_tasks: int = 1, dependency: Optional[str] = None,
                  analysis: bool = False, evaluation: bool = False) -> submitit.SlurmExecutor:
        check_sbatch_folder(folder)
        ex = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=int(self.cluster.max_num_timeout))
        ex.update_parameters(**self.parameters(name, n_tasks, dependency, analysis, evaluation))
        return ex

    def preview(self, n_tasks: int, folder: Path, job_name: str = "irm-train") -> str:
        """The sbatch script of a training array of ``n_tasks`` (nothing is submitted; no ``srun`` needed).

        submitit has no public API for the script text: this calls ``submitit.slurm.slurm._make_sbatch_string``
        with the parameters :meth:`submit` passes, and the command submitit runs
        (``python -u -m submitit.core._submit FOLDER``). ``tests/test_launch_slurm.py`` checks the preview
        against the script submitit really submits.
        """
        from submitit.slurm.slurm import _make_sbatch_string

        check_sbatch_folder(folder)
        command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
        return _make_sbatch_string(command=command, folder=str(folder), map_count=n_tasks,
                                   **self.parameters(job_name, n_tasks))

    def submit(self, manifest: Manifest, tasks: list[Task], reason: str) -> Submission:
        """One training array + the chained evaluation array (if enabled), analysis map array and reduce job.

        Raises ``LaunchError`` with sbatch's message (e.g. an invalid partition) if Slurm rejects the
        array; nothing else is submitted then. The array's job ids are saved in the manifest before the
        analysis is submitted.
        """
        sweep = SweepDir(manifest.sweep_dir)
        ex = self._executor(sweep.train_logs, self.train_job_name(manifest.sweep), len(tasks))
        try:
            with ex.batch():
                jobs = [ex.submit(TrainTask(t.overrides, str(manifest.task_dir(t)), manifest.config_dirs))
                        for t in tasks]
        except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError) as exc:
            raise LaunchError(f"Slurm rejected the training array: {one_line(exc)}") from None
        array_id = jobs[0].job_id.split("_")[0]
        manifest.record_submission([t.index for t in tasks], [j.job_id for j in jobs], reason)
        manifest.train_job_ids.append(array_id)
        manifest.save()  # the array is out: record it before anything else can fail
        ids = {"train": array_id}
        # a resume: tasks of earlier arrays may still run; the evaluation and analysis wait for them too
        waits = ":".join([array_id, *live_arrays(manifest.train_job_ids[:-1])])
        after = waits
        eval_id = self._submit_evaluation(manifest, f"afterany:{waits}")
        if eval_id:
            ids["eval"] = after = eval_id
        map_id, reduce_job = self._submit_analysis(manifest, f"afterany:{after}")
        manifest.analysis_job_ids = [*([eval_id] if eval_id else []), map_id, reduce_job.job_id]
        ids.update(map=map_id, reduce=reduce_job.job_id)
        ablation = self._submit_ablation(manifest, reduce_job.job_id)
        if ablation:
            ablate_id, final = ablation
            manifest.analysis_job_ids += [ablate_id, final.job_id]
            ids.update(ablate=ablate_id, reduce_after_ablation=final.job_id)
            reduce_job = final
        return Submission(ids, reduce_job)

    def _submit_ablation(self, manifest: Manifest, reduce_id: str) -> Optional[tuple[str, submitit.Job]]:
        """The ablation array (``afterany`` the reduce: it reads the consensus indices from the analysis
        summary) and a second reduce after it, which pools the ablations into the summary and report; None
        when ``sweep.ablation.enabled`` is false."""
        section = ablation_section(manifest)
        if not section.get("enabled"):
            return None
        sweep = SweepDir(manifest.sweep_dir)
        chunks = map_chunks([str(manifest.task_dir(t)) for t in manifest.tasks], int(section.get("runs_per_task", 1)),
                            "sweep.ablation.runs_per_task")
        ex = self._executor(sweep.ablation_logs, f"irm-ablate-{manifest.sweep}", len(chunks), f"afterany:{reduce_id}",
                            evaluation=True)
        summary = str(sweep.analysis / ANALYSIS_SUMMARY)
        with ex.batch():
            jobs = [ex.submit(AblateTask(chunk, section, summary)) for chunk in chunks]
        ablate_id = jobs[0].job_id.split("_")[0]
        ex = self._executor(sweep.analysis_logs, f"irm-reduce-{manifest.sweep}", 1, f"afterany:{ablate_id}",
                            analysis=True)
        return ablate_id, ex.submit(AnalysisReduceTask(str(sweep.analysis), analysis_params(manifest)))

    def _submit_evaluation(self, manifest: Manifest, dependency: str) -> Optional[str]:
        """The evaluation array over all the sweep's runs (finished ones are evaluated, evaluated ones
        skipped), or None when ``sweep.evaluation.enabled`` is false."""
        section = evaluation_section(manifest)
        if not section.get("enabled"):
            return None
        sweep = SweepDir(manifest.sweep_dir)
        chunks = map_chunks([str(manifest.task_dir(t)) for t in manifest.tasks], int(section.get("runs_per_task", 1)),
                            "sweep.evaluation.runs_per_task")
        ex = self._executor(sweep.evaluation_logs, f"irm-eval-{manifest.sweep}", len(chunks), dependency,
                            evaluation=True)
        try:
            with ex.batch():
                jobs = [ex.submit(EvaluateTask(chunk, section)) for chunk in chunks]
        except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError) as exc:
            raise LaunchError(f"Slurm rejected the evaluation array: {one_line(exc)}; the training array "
                              f"{manifest.train_job_ids[-1]} is submitted: fix the cause, then --resume") from None
        return jobs[0].job_id.split("_")[0]

    def _submit_analysis(self, manifest: Manifest, dependency: str) -> tuple[str, submitit.Job]:
        sweep = SweepDir(manifest.sweep_dir)
        params = analysis_params(manifest)
        chunks = map_chunks([str(manifest.task_dir(t)) for t in manifest.tasks],
                            int(self.cluster.analysis_runs_per_task))
        ex = self._executor(sweep.analysis_logs, f"irm-map-{manifest.sweep}", len(chunks), dependency, analysis=True)
        with ex.batch():
            maps = [ex.submit(AnalysisMapTask(chunk, str(sweep.analysis), params)) for chunk in chunks]
        map_id = maps[0].job_id.split("_")[0]
        ex = self._executor(sweep.analysis_logs, f"irm-reduce-{manifest.sweep}", 1, f"afterany:{map_id}",
                            analysis=True)
        return map_id, ex.submit(AnalysisReduceTask(str(sweep.analysis), params))

    def job_states(self, manifest, done, steps):
        states, note = query_slurm([t.job_id.split("_")[0] for t in manifest.tasks if t.job_id])
        out = {}
        for t in manifest.tasks:
            info = states.get(t.job_id or "", JobInfo("UNKNOWN" if t.job_id else "NOT_SUBMITTED"))
            if note and info.state == "UNKNOWN":
                info = JobInfo("COMPLETED" if done[t.index] else "UNKNOWN")
            out[t.index] = info
        return out, note

    def before_resubmit(self, manifest: Manifest) -> None:
        """``scancel`` the previous round's analysis jobs that have not started (stale inputs)."""
        if manifest.analysis_job_ids:
            subprocess.run(["scancel", "--state=PENDING", *manifest.analysis_job_ids], capture_output=True, timeout=30)



# ----------------------------------------------------------------------------- local
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class LocalSweepExecutor(SweepExecutor):
    """One local submitit driver job: the training tasks in order, then the analysis."""

    kind = "local"
    DRIVER_TIMEOUT_MIN = 7 * 24 * 60

    def _executor(self, folder: Path) -> submitit.Executor:
        return local_executor(folder, timeout_min=self.DRIVER_TIMEOUT_MIN)

    def submit(self, manifest: Manifest, tasks: list[Task], reason: str) -> Submission:
        """Start the driver (it skips tasks whose run dir has ``DONE``, so ``tasks`` need not be passed)."""
        job = self._executor(SweepDir(manifest.sweep_dir).driver_logs).submit(LocalSweep(str(manifest.sweep_dir)))
        manifest.train_job_ids.append(str(job.job_id))
        return Submission({"driver": str(job.job_id)}, job)

    def job_states(self, manifest, done, steps):
        driver = manifest.train_job_ids[-1] if manifest.train_job_ids else None
        alive = driver is not None and driver.isdigit() and _pid_alive(int(driver))
        out = {}
        for t in manifest.tasks:
            if done[t.index]:
                out[t.index] = JobInfo("COMPLETED")
            elif not alive:
                out[t.index] = JobInfo("FAILED" if steps[t.index] else "NOT_RUN")
            else:
                out[t.index] = JobInfo("RUNNING" if steps[t.index] else "PENDING", os.uname().nodename)
        return out, ""



def _stdin_is_tty() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, OSError):  # closed stdin
        return False


class TerminalDebugJob(submitit.local.debug.DebugJob):
    """submitit's ``DebugJob``, but ``pdb.post_mortem`` on a failure only when stdin is a terminal.

    submitit's ``DebugJob.results`` always enters the post-mortem: without a terminal (CI, nohup, a pipe
    left open) ``--cluster debug`` then hangs at a ``(Pdb)`` prompt, or prints one and reads EOF. Without
    a terminal this runs the submission the same way (the job's environment, log files) and lets the
    exception propagate.
    """

    def results(self):
        if _stdin_is_tty():
            return super().results()
        self._check_not_cancelled()
        if self._submission.done():
            return [self._submission._result]
        environ_backup = dict(os.environ)
        os.environ.clear()
        os.environ.update(self.environ)
        root_logger = logging.getLogger("")
        self.paths.stdout.parent.mkdir(exist_ok=True, parents=True)
        handlers = [logging.FileHandler(self.paths.stdout), logging.FileHandler(self.paths.stderr)]
        handlers[0].setLevel(logging.DEBUG)
        handlers[1].setLevel(logging.WARNING)
        for h in handlers:
            root_logger.addHandler(h)
        try:
            return [self._submission.result()]
        finally:
            os.environ.clear()
            os.environ.update(environ_backup)
            for h in handlers:
                root_logger.removeHandler(h)
                h.close()


class TerminalDebugExecutor(submitit.DebugExecutor):
    """``submitit.DebugExecutor`` whose jobs are :class:`TerminalDebugJob` (pdb only on a terminal)."""

    job_class = TerminalDebugJob

    def _internal_process_submissions(self, delayed_submissions):
        return [TerminalDebugJob(self.folder, ds) for ds in delayed_submissions]


class DebugSweepExecutor(LocalSweepExecutor):
    """The local driver, run in the launching process when its result is asked for; on a failure pdb's
    post-mortem when stdin is a terminal, else the error is reported and the launch goes on."""

    kind = "debug"

    def _executor(self, folder: Path) -> submitit.Executor:
        return TerminalDebugExecutor(folder=str(folder))


EXECUTORS: dict[str, type[SweepExecutor]] = {cls.kind: cls for cls in (SlurmSweepExecutor, LocalSweepExecutor,
                                                                         DebugSweepExecutor)}
KINDS = ("auto", *EXECUTORS)


def executor_kind(cluster: DictConfig, require_sbatch: bool = True) -> str:
    """``slurm`` | ``local`` | ``debug``; ``auto`` picks slurm when ``sbatch`` is on PATH.

    Raises ``LaunchError`` for an unknown executor name, or for ``slurm`` without ``sbatch`` unless
    ``require_sbatch`` is False (a dry run only prints the sbatch script).
    """
    kind = cluster.executor
    if kind not in KINDS:
        raise LaunchError(f"cluster.executor '{kind}' is not one of {', '.join(KINDS)}")
    has_sbatch = shutil.which("sbatch") is not None
    if kind == "auto":
        return "slurm" if has_sbatch else "local"
    if kind == "slurm" and not has_sbatch and require_sbatch:
        raise LaunchError("cluster 'slurm' needs sbatch on PATH: start the dev cluster (bash slurm/up.sh) or use "
                          "--cluster local")
    return kind


def make_executor(kind: str, cluster: DictConfig) -> SweepExecutor:
    """The executor of ``kind`` (a manifest's ``executor`` or :func:`executor_kind`'s answer)."""
    if kind not in EXECUTORS:
        raise LaunchError(f"executor '{kind}' is not one of {', '.join(EXECUTORS)}")
    return EXECUTORS[kind](cluster)


def for_manifest(manifest: Manifest) -> SweepExecutor:
    """The executor a sweep was launched with, configured with its stored cluster section. Raises
    ``ManifestError`` if the manifest's launch config has no ``cluster`` section, ``LaunchError`` for an
    unknown executor name."""
    from omegaconf import DictConfig as _Dict

    cluster = manifest.launch_config().get("cluster")
    if not isinstance(cluster, _Dict):
        raise ManifestError(f"{manifest.file}: its config_yaml has no 'cluster' section; restore manifest.json "
                            "(it is written by irm_hpc.launch)")
    return make_executor(manifest.executor, cluster)

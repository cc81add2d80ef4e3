"""Picklable callables that submitit runs on the cluster (or locally).

* :class:`TrainTask`: one IRM training run; multi-rank tasks take their ranks from
  ``submitit.helpers.TorchDistributedEnvironment``. It is ``submitit.helpers.Checkpointable``: on the
  timeout/preemption signal submitit calls ``checkpoint()``, which requeues the same task; the run then
  resumes from its latest DeepSpeed checkpoint tag.
* :class:`EvaluateTask`: the steer-and-judge evaluation of finished runs (``irm_hpc.evaluate``), one
  array task per ``sweep.evaluation.runs_per_task`` runs, between training and the analysis.
* :class:`AnalysisMapTask` / :class:`AnalysisReduceTask`: the striation analysis map (one array task
  per ``cluster.analysis_runs_per_task`` runs) and reduce (once, after the map array).
* :class:`LocalSweep`: without Slurm, one local job that runs the training tasks one after another
  through submitit's LocalExecutor, then the evaluation (if enabled) and the analysis (the local
  executor has no dependencies).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import submitit

from irm_hpc.errors import one_line
from irm_hpc.layout import ANALYSIS_SUMMARY, RunDir, SweepDir, check_private


def _export_dist_env() -> None:
    """Set RANK/WORLD_SIZE/MASTER_ADDR/... from submitit's job environment when running under submitit.

    Ranks come from ``submitit.helpers.TorchDistributedEnvironment``. The rendezvous port: a free
    loopback port for a one-rank task (nothing else needs to know it), else ``dist.job_master_port``
    (same on every rank, below the ephemeral port range) unless ``MASTER_PORT`` was set by the user.
    """
    from irm_hpc.dist import free_port, job_master_port

    try:
        job = submitit.JobEnvironment()
    except RuntimeError:
        return  # not inside a submitit job: torchrun or a plain process set (or need) nothing
    env = submitit.helpers.TorchDistributedEnvironment()
    if env.world_size == 1:
        env.master_addr, env.master_port = "127.0.0.1", free_port()
    elif "MASTER_PORT" not in os.environ:
        env.master_port = job_master_port(job.job_id)
    env.export(set_cuda_visible_devices=False, overwrite=True)


class TrainTask(submitit.helpers.Checkpointable):
    """Train one IRM: ``TrainTask(overrides, out_dir)()`` == ``python -m irm_hpc.train *overrides out_dir=...``."""

    def __init__(self, overrides: list[str], out_dir: str, config_dirs: Optional[list[str]] = None):
        self.overrides = list(overrides)
        self.out_dir = str(out_dir)
        self.config_dirs = [str(d) for d in config_dirs or []]  # the sweep's user config dirs (manifest)

    def __call__(self) -> dict:
        from irm_hpc.config import add_config_dirs, load_config
        from irm_hpc.train import train_main

        _export_dist_env()
        add_config_dirs(self.config_dirs)
        cfg = load_config("train", [*self.overrides, f"out_dir={self.out_dir}"])
        return train_main(cfg)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Requeue the same task; it resumes from the latest DeepSpeed checkpoint of ``out_dir``."""
        return submitit.helpers.DelayedSubmission(TrainTask(self.overrides, self.out_dir, self.config_dirs))


class EvaluateTask:
    """Evaluate finished runs one after another (``irm_hpc.evaluate.evaluate_runs``).

    ``run_dirs``: the task directories of one chunk of the sweep; ``section``: the sweep's
    ``sweep.evaluation`` settings as a plain dict. Returns one entry per run: its evaluation summary file,
    or ``None`` (not finished, or could not be evaluated: reported on stdout; the reduce goes on)."""

    def __init__(self, run_dirs: list[str], section: dict):
        self.run_dirs, self.section = [str(d) for d in run_dirs], dict(section)

    def __call__(self) -> list[Optional[str]]:
        from irm_hpc.evaluate import EvalParams, evaluate_runs

        return evaluate_runs(self.run_dirs, EvalParams.from_config(self.section))  # checked at launch already


class AblateTask:
    """Ablate the consensus striation indices in finished runs one after another
    (``irm_hpc.ablate.ablate_runs``), the indices read from ``analysis_summary`` when the task starts.

    Returns one entry per run (its ablation summary file, or ``None``); an analysis without a consensus
    index is reported on stdout and gives ``[]`` (the reduce after it goes on)."""

    def __init__(self, run_dirs: list[str], section: dict, analysis_summary: str):
        self.run_dirs, self.section, self.analysis_summary = [str(d) for d in run_dirs], dict(section), str(analysis_summary)

    def __call__(self) -> list[Optional[str]]:
        from irm_hpc.ablate import AblationError, AblationParams, ablate_runs

        try:
            return ablate_runs(self.run_dirs, AblationParams.from_config(self.section),
                               analysis_summary=self.analysis_summary)
        except AblationError as exc:
            print(f"nothing ablated: {one_line(exc)}")
            return []


class AnalysisMapTask:
    """Reduce each run's HDF5 stream to profiles (``irm_hpc.analysis.map_run``), one run after another.

    ``run_dirs``: the task directories of one chunk of the sweep. Returns one entry per run: the
    profile file written, or ``None`` for a failed/empty run (skipped here; the reduce reports it).
    """

    def __init__(self, run_dirs: list[str], out_dir: str, params: list[str]):
        self.run_dirs, self.out_dir, self.params = [str(d) for d in run_dirs], str(out_dir), list(params)

    def __call__(self) -> list[Optional[str]]:
        from irm_hpc import analysis

        params = analysis.parse_params(self.params)
        written: list[Optional[str]] = []
        for run_dir in self.run_dirs:
            try:
                written.append(str(analysis.map_run(run_dir, self.out_dir, params)))
            except analysis.AnalysisError as exc:
                print(f"skipped {run_dir}: {exc}")
                written.append(None)
        return written


class AnalysisReduceTask:
    """Cross-run striation statistics, clustering, report (``irm_hpc.analysis.reduce_runs``)."""

    def __init__(self, out_dir: str, params: list[str]):
        self.out_dir, self.params = str(out_dir), list(params)

    def __call__(self) -> dict:
        from irm_hpc import analysis

        return analysis.reduce_runs(self.out_dir, analysis.parse_params(self.params))


def local_executor(folder: Path, timeout_min: int, tasks_per_node: int = 1) -> submitit.LocalExecutor:
    """A ``submitit.LocalExecutor`` (jobs are subprocesses that outlive the launcher); ``timeout_min`` in minutes."""
    ex = submitit.LocalExecutor(folder=str(folder))
    ex.update_parameters(timeout_min=timeout_min, tasks_per_node=tasks_per_node)
    return ex


class LocalSweep:
    """Run a sweep's training tasks sequentially as local submitit jobs, then its analysis.

    Tasks whose run dir has ``DONE`` are skipped, so running the driver again (a local ``--resume``)
    continues the sweep; each task itself resumes from its latest checkpoint. Before each task's result
    pickle is loaded, the sweep dir and ``logs/train`` must be private (``layout.check_private``;
    ``UnsafePathError`` otherwise).
    """

    TASK_TIMEOUT_MIN = 24 * 60

    def __init__(self, sweep_dir: str):
        self.sweep_dir = str(sweep_dir)

    def __call__(self) -> dict:
        from irm_hpc.manifest import (ablation_section, analysis_params, evaluation_section, load_manifest,
                                      record_submission)

        sweep = SweepDir(self.sweep_dir)
        check_private(sweep.root, contents=True)
        manifest = load_manifest(self.sweep_dir)
        for task in manifest.tasks:
            if RunDir(manifest.task_dir(task)).is_done():
                continue
            job = local_executor(sweep.train_logs, timeout_min=self.TASK_TIMEOUT_MIN).submit(
                TrainTask(task.overrides, str(manifest.task_dir(task)), manifest.config_dirs))
            record_submission(self.sweep_dir, [task.index], [job.job_id], "local")
            check_private(sweep.root)
            check_private(sweep.train_logs, contents=True)  # job.result() unpickles from there
            try:
                job.result()
            except Exception as exc:  # noqa: BLE001 - one failed task must not stop the sweep
                print(f"task {task.task_id} failed: {one_line(exc)} (log: {job.paths.stderr})")
        section = evaluation_section(manifest)
        if section.get("enabled"):
            try:
                EvaluateTask([str(manifest.task_dir(t)) for t in manifest.tasks], section)()
            except Exception as exc:  # noqa: BLE001 - the analysis runs without the evaluation then
                print(f"evaluation failed: {one_line(exc, with_type=True)}")
        params = analysis_params(manifest)
        AnalysisMapTask([str(manifest.task_dir(t)) for t in manifest.tasks], str(sweep.analysis), params)()
        summary = AnalysisReduceTask(str(sweep.analysis), params)()
        ablation = ablation_section(manifest)
        if ablation.get("enabled"):
            try:
                AblateTask([str(manifest.task_dir(t)) for t in manifest.tasks], ablation,
                           str(sweep.analysis / ANALYSIS_SUMMARY))()
            except Exception as exc:  # noqa: BLE001 - the analysis stands without the ablation
                print(f"ablation failed: {one_line(exc, with_type=True)}")
            summary = AnalysisReduceTask(str(sweep.analysis), params)()
        return summary

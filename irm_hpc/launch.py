"""Launch a sweep: ``python -m irm_hpc.launch --sweep NAME [--cluster C] [--dry-run] [key=value ...]``.

On Slurm the training tasks go out as ONE job array through submitit (``executor.batch()``), each task a
DeepSpeed run with ``tasks_per_node`` ranks (ranks from submitit's ``TorchDistributedEnvironment``). The
striation analysis follows as a map array (``cluster.analysis_runs_per_task`` runs per task,
``--dependency=afterany:<train array>``) and a reduce job (``afterany:<map array>``). The launcher
writes ``runs/<sweep>-<timestamp>/manifest.json``, prints the sweep directory, the job ids and the
status/resume commands, and exits without waiting (unless ``--wait``). Without ``sbatch``
(``--cluster local``) one local submitit job runs the tasks in order, then the analysis.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import submitit
from omegaconf import DictConfig, OmegaConf

from irm_hpc.config import ConfigError, add_config_dirs, load_config, presets, split_config_dirs, to_yaml
from irm_hpc.errors import IrmError
from irm_hpc.jobs import AnalysisMapTask, AnalysisReduceTask, LocalSweep, TrainTask
from irm_hpc.manifest import Manifest, ManifestError, Task, expand_tasks, load_manifest, locked

EXECUTORS = ("auto", "local", "debug", "slurm")
LAUNCH_KEYS = ("sweep", "cluster", "runs_root")  # other key=value overrides go to every training task


class LaunchError(IrmError, RuntimeError):
    """A sweep cannot be submitted (one-line message naming the problem and the fix)."""


def executor_kind(cluster: DictConfig) -> str:
    """``slurm`` | ``local`` | ``debug``; ``auto`` picks slurm when ``sbatch`` is on PATH.

    Raises ``LaunchError`` for ``slurm`` without ``sbatch`` or an unknown executor name.
    """
    kind = cluster.executor
    if kind not in EXECUTORS:
        raise LaunchError(f"cluster.executor '{kind}' is not one of {', '.join(EXECUTORS)}")
    has_sbatch = shutil.which("sbatch") is not None
    if kind == "auto":
        return "slurm" if has_sbatch else "local"
    if kind == "slurm" and not has_sbatch:
        raise LaunchError("cluster 'slurm' needs sbatch on PATH: start the dev cluster (bash slurm/up.sh) or use --cluster local")
    return kind


def slurm_executor(cluster: DictConfig, folder: Path, name: str, n_tasks: int = 1,
                   dependency: Optional[str] = None, analysis: bool = False) -> submitit.SlurmExecutor:
    """A ``submitit.SlurmExecutor`` with the cluster preset's resources (analysis jobs: 1 task, no GPU)."""
    ex = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=int(cluster.max_num_timeout))
    extra = dict(cluster.additional_parameters)
    if dependency:
        extra["dependency"] = dependency
    params = dict(
        job_name=name, partition=cluster.partition, signal_delay_s=int(cluster.signal_delay_s),
        array_parallelism=max(1, min(int(cluster.array_parallelism), n_tasks)),
        setup=list(cluster.setup), additional_parameters=extra,
        qos=cluster.qos, account=cluster.account, constraint=cluster.constraint,
    )
    if analysis:
        params.update(nodes=1, ntasks_per_node=1, cpus_per_task=int(cluster.analysis_cpus),
                      mem=f"{int(cluster.analysis_mem_gb * 1024)}MB", time=int(cluster.analysis_timeout_min))
    else:
        params.update(nodes=int(cluster.nodes), ntasks_per_node=int(cluster.tasks_per_node),
                      cpus_per_task=int(cluster.cpus_per_task), mem=f"{int(cluster.mem_gb * 1024)}MB",
                      time=int(cluster.timeout_min))
        if cluster.gpus_per_node:
            params["gpus_per_node"] = int(cluster.gpus_per_node)
    ex.update_parameters(**{k: v for k, v in params.items() if v not in (None, [], {})})
    return ex


def local_executor(folder: Path, timeout_min: int, tasks_per_node: int = 1) -> submitit.LocalExecutor:
    """A ``submitit.LocalExecutor`` (jobs are subprocesses that outlive the launcher)."""
    ex = submitit.LocalExecutor(folder=str(folder))
    ex.update_parameters(timeout_min=timeout_min, tasks_per_node=tasks_per_node)
    return ex


def sbatch_preview(cluster: DictConfig, n_tasks: int, folder: Path = Path("runs/SWEEP/logs/train")) -> str:
    """The sbatch script submitit would submit for a train array of ``n_tasks`` (nothing is submitted)."""
    from submitit.slurm.slurm import _make_sbatch_string

    ex = slurm_executor(cluster, folder, "irm-train", n_tasks)
    return _make_sbatch_string(command=ex._submitit_command_str, folder=str(folder), map_count=n_tasks, **ex.parameters)


def apply_submission(manifest: Manifest, indices: list[int], job_ids: list[str], reason: str) -> None:
    """Store the job id of each task index in the in-memory manifest (caller saves it under the lock)."""
    for idx, job_id in zip(indices, job_ids):
        task = manifest.tasks[idx]
        task.job_id, task.state = job_id, "SUBMITTED"
        task.submissions.append({"job_id": job_id, "time": time.time(), "reason": reason})


def record_submission(sweep_dir: str | Path, indices: list[int], job_ids: list[str], reason: str) -> None:
    """Store job ids in the manifest on disk, under the manifest lock (used by the local driver)."""
    with locked(sweep_dir):
        manifest = load_manifest(sweep_dir)
        apply_submission(manifest, indices, job_ids, reason)
        manifest.save()


def create_sweep(cfg: DictConfig, kind: str, name: Optional[str]) -> Manifest:
    """Make ``<runs_root>/<name>`` and its manifest; refuse an existing directory (``LaunchError``)."""
    sweep = cfg.sweep
    name = name or f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = (Path(cfg.runs_root) / name).resolve()
    if sweep_dir.exists():
        raise LaunchError(f"sweep directory {sweep_dir} exists; continue it with --resume {sweep_dir} or pick another --name")
    tasks = expand_tasks(list(sweep.alignments), list(sweep.seeds), list(sweep.layer_sets), list(sweep.train_overrides))
    sweep_dir.mkdir(parents=True)
    manifest = Manifest(sweep_dir=sweep_dir, sweep=sweep.name, executor=kind, created=time.time(),
                        config_yaml=to_yaml(cfg), tasks=tasks)
    manifest.save()
    return manifest


AXIS_KEYS = ("alignment=", "seed=")  # typed by the sweep config already; they cannot break a compose


def validate_tasks(tasks: list[Task]) -> None:
    """Compose the training config of each distinct task (overrides apart from ``alignment=`` and
    ``seed=``) now, so a bad override fails before anything is submitted. Raises ``ConfigError``.
    One compose takes ~75 ms: composing all 200 tasks of a 5 x 40 sweep took ~15 s of its submit time."""
    seen: set[tuple[str, ...]] = set()
    for task in tasks:
        key = tuple(o for o in task.overrides if not o.startswith(AXIS_KEYS))
        if key not in seen:
            seen.add(key)
            load_config("train", [*task.overrides, f"out_dir={task.out_dir}"])


def submit_slurm(manifest: Manifest, cluster: DictConfig, tasks: list[Task], reason: str) -> dict:
    """Submit ``tasks`` as one training array + the chained analysis map array and reduce job.

    The caller holds the manifest lock and saves ``manifest`` afterwards. Returns
    ``{"train": array_id, "map": id, "reduce": id}``. Raises ``LaunchError`` with sbatch's message
    (e.g. an invalid partition) if Slurm rejects the array; nothing else is submitted then.
    """
    sweep_dir = manifest.sweep_dir
    ex = slurm_executor(cluster, sweep_dir / "logs" / "train", f"irm-{manifest.sweep}", len(tasks))
    try:
        with ex.batch():
            jobs = [ex.submit(TrainTask(t.overrides, str(manifest.task_dir(t)))) for t in tasks]
    except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError) as exc:
        raise LaunchError(f"Slurm rejected the training array: {_one_line(exc)}") from None
    array_id = jobs[0].job_id.split("_")[0]
    apply_submission(manifest, [t.index for t in tasks], [j.job_id for j in jobs], reason)
    manifest.train_job_ids.append(array_id)
    manifest.save()  # the array is out: record it before anything else can fail
    ids = {"train": array_id, **submit_analysis(manifest, cluster, f"afterany:{array_id}")}
    manifest.analysis_job_ids = [ids["map"], ids["reduce"]]
    return ids


def map_chunks(run_dirs: list[str], runs_per_task: int) -> list[list[str]]:
    """Split the sweep's run directories into consecutive chunks of ``runs_per_task`` (one map-array
    task each, so hundreds of small runs do not become hundreds of scheduler jobs). Raises
    ``LaunchError`` if ``runs_per_task`` < 1."""
    if runs_per_task < 1:
        raise LaunchError(f"cluster.analysis_runs_per_task must be >= 1, got {runs_per_task}")
    return [run_dirs[i:i + runs_per_task] for i in range(0, len(run_dirs), runs_per_task)]


def submit_analysis(manifest: Manifest, cluster: DictConfig, dependency: str) -> dict:
    """Map array (``cluster.analysis_runs_per_task`` runs per array task) after ``dependency``, then
    the reduce job after the map array. Returns ``{"map": array_id, "reduce": job_id}``."""
    sweep_dir = manifest.sweep_dir
    out = sweep_dir / "analysis"
    from irm_hpc.jobs import manifest_analysis_params

    params = manifest_analysis_params(manifest)
    chunks = map_chunks([str(manifest.task_dir(t)) for t in manifest.tasks], int(cluster.analysis_runs_per_task))
    ex = slurm_executor(cluster, sweep_dir / "logs" / "analysis", f"irm-map-{manifest.sweep}", len(chunks),
                        dependency=dependency, analysis=True)
    with ex.batch():
        maps = [ex.submit(AnalysisMapTask(chunk, str(out), params)) for chunk in chunks]
    map_id = maps[0].job_id.split("_")[0]
    ex = slurm_executor(cluster, sweep_dir / "logs" / "analysis", f"irm-reduce-{manifest.sweep}", 1,
                        dependency=f"afterany:{map_id}", analysis=True)
    reduce_job = ex.submit(AnalysisReduceTask(str(out), params))
    return {"map": map_id, "reduce": reduce_job.job_id}


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error" in ln.lower()]
    return (errs or lines or [repr(exc)])[-1]


def submit_local(manifest: Manifest, kind: str) -> dict:
    """One local (or in-process debug) job that trains the tasks in order, then runs the analysis.

    The caller holds the manifest lock and saves ``manifest`` afterwards.
    """
    folder = manifest.sweep_dir / "logs" / "driver"
    if kind == "debug":
        ex = submitit.DebugExecutor(folder=str(folder))
    else:
        ex = local_executor(folder, timeout_min=7 * 24 * 60)
    job = ex.submit(LocalSweep(str(manifest.sweep_dir)))
    manifest.train_job_ids.append(str(job.job_id))
    return {"driver": str(job.job_id), "job": job}


def print_plan(cfg: DictConfig, tasks: list[Task], kind: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep '{cfg.sweep.name}': {len(tasks)} training tasks ({kind})")
    for col in ("#", "task", "alignment", "seed", "layer set", "out_dir"):
        table.add_column(col)
    for t in tasks:
        table.add_row(str(t.index), t.task_id, t.alignment, str(t.seed), t.layer_set, t.out_dir)
    Console(width=160).print(table)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    dirs, argv = split_config_dirs(argv)
    add_config_dirs(dirs)  # before listing presets; exported to the jobs' environment too
    sweeps, clusters = presets("sweep"), presets("cluster")
    parser = argparse.ArgumentParser(prog="python -m irm_hpc.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-dir", metavar="DIR", action="append",
                        help="user presets (DIR/cluster/*.yaml, DIR/sweep/*.yaml, ...) before the packaged ones; repeatable")
    parser.add_argument("--sweep", help=f"sweep preset: {', '.join(sweeps)}")
    parser.add_argument("--cluster", default="auto", help=f"cluster preset: {', '.join(clusters)}")
    parser.add_argument("--name", help="sweep directory name under runs_root (default <sweep>-<timestamp>)")
    parser.add_argument("--dry-run", action="store_true", help="print the task table and sbatch script; submit nothing")
    parser.add_argument("--wait", action="store_true", help="block until the analysis has finished")
    parser.add_argument("--resume", metavar="SWEEP_DIR", help="resubmit the unfinished tasks of a sweep")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-") or "=" not in o]
    if bad:
        raise ConfigError(f"unknown argument {bad[0]}; use --sweep/--cluster/--config-dir/--name/--dry-run/--wait/--resume or key=value overrides")
    if not args.resume and not args.sweep:
        raise ConfigError(f"--sweep is required (presets: {', '.join(sweeps)})")
    if args.sweep and args.sweep not in sweeps:
        raise ConfigError(f"unknown sweep '{args.sweep}'; presets: {', '.join(sweeps)}")
    if args.cluster not in clusters:
        raise ConfigError(f"unknown cluster '{args.cluster}'; presets: {', '.join(clusters)}")
    return args, overrides


def launch(args: argparse.Namespace, overrides: list[str]) -> dict:
    """Compose, create the sweep directory, submit; return the job ids (see module docstring).

    ``overrides`` starting with ``sweep.``, ``cluster.`` or ``runs_root`` change the launch config;
    all others (``model=...``, ``train.lr=...``) are appended to every training task's overrides.
    """
    launch_keys = [o for o in overrides if o.lstrip("+~").split(".")[0].split("=")[0] in LAUNCH_KEYS]
    train_keys = [o for o in overrides if o not in launch_keys]
    cfg = load_config("launch", [f"sweep={args.sweep}", f"cluster={args.cluster}", *launch_keys])
    if train_keys:  # e.g. model=llama2_7b_chat train.lr=3e-4: appended to every task's overrides
        cfg.sweep.train_overrides = [*cfg.sweep.train_overrides, *train_keys]
    kind = executor_kind(cfg.cluster)
    tasks = expand_tasks(list(cfg.sweep.alignments), list(cfg.sweep.seeds), list(cfg.sweep.layer_sets),
                         list(cfg.sweep.train_overrides))
    validate_tasks(tasks)
    map_chunks([t.task_id for t in tasks], int(cfg.cluster.analysis_runs_per_task))  # fail before submitting
    if args.dry_run:
        print_plan(cfg, tasks, kind)
        if kind == "slurm" or cfg.cluster.executor == "slurm":
            folder = Path(cfg.runs_root).resolve() / f"{cfg.sweep.name}-<timestamp>" / "logs" / "train"
            print(sbatch_preview(cfg.cluster, len(tasks), folder))
        return {}
    manifest = create_sweep(cfg, kind, args.name)
    ids = submit(manifest, cfg.cluster, manifest.tasks, "launch")
    report(manifest, ids)
    if args.wait or kind == "debug":  # the debug executor runs the job when its result is asked for
        wait(manifest, ids)
    return ids


def submit(manifest: Manifest, cluster: DictConfig, tasks: list[Task], reason: str) -> dict:
    """Submit ``tasks`` with the manifest's executor, holding the manifest lock; save the manifest."""
    with locked(manifest.sweep_dir):
        if manifest.executor == "slurm":
            ids = submit_slurm(manifest, cluster, tasks, reason)
        else:
            ids = submit_local(manifest, manifest.executor)
        manifest.save()
    return ids


def resume(sweep_dir: str, dry_run: bool, wait_for_it: bool = False) -> dict:
    """Resubmit the tasks of ``sweep_dir`` that failed, timed out, were cancelled or never ran.

    Holds the manifest lock from the state query to the manifest update, so two concurrent
    resumes submit each task once. Completed and live tasks are untouched; each resubmitted task
    continues from its latest DeepSpeed checkpoint; the analysis is re-chained after the new array.
    """
    from irm_hpc.status import needs_resubmit, task_rows

    load_manifest(sweep_dir)  # a bad directory fails here, before a lock file is created
    with locked(sweep_dir):
        manifest = load_manifest(sweep_dir)
        rows, note = task_rows(manifest)
        todo = [(manifest.tasks[r.index], why) for r in rows if (why := needs_resubmit(r))]
        for task, why in todo:
            print(f"{'would resubmit' if dry_run else 'resubmit'} {task.task_id}: {why}")
        if note:
            print(f"note: {note}")
        if not todo:
            print("nothing to resubmit: every task is finished or still has a live job")
            return {}
        if dry_run:
            return {}
        cluster = OmegaConf.create(manifest.config_yaml).cluster
        if manifest.executor == "slurm":
            _cancel_pending(manifest.analysis_job_ids)
            ids = submit_slurm(manifest, cluster, [t for t, _ in todo], "resume")
        else:
            ids = submit_local(manifest, manifest.executor)
        manifest.save()
    report(manifest, ids)
    if wait_for_it:
        wait(manifest, ids)
    return ids


def _cancel_pending(job_ids: list[str]) -> None:
    """scancel the previous analysis jobs that have not started (they would run on stale inputs)."""
    if job_ids:
        subprocess.run(["scancel", "--state=PENDING", *job_ids], capture_output=True, timeout=30)


def report(manifest: Manifest, ids: dict) -> None:
    d = manifest.sweep_dir
    print(f"sweep directory: {d}")
    print("jobs: " + ", ".join(f"{k}={v}" for k, v in ids.items() if k != "job"))
    print(f"status:  python -m irm_hpc.status {d}")
    print(f"resume:  python -m irm_hpc.launch --resume {d}")
    print(f"report:  {d / 'analysis' / 'report.md'} (when the analysis has run)")


def wait(manifest: Manifest, ids: dict) -> None:
    """Block until the sweep's last job (reduce job, or local driver) has finished."""
    if "job" in ids:
        ids["job"].result()
        return
    job = submitit.SlurmJob(folder=str(manifest.sweep_dir / "logs" / "analysis"), job_id=ids["reduce"])
    job.wait()


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry; one-line error and exit 2 on bad input, nothing submitted."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = parse_args(argv)
        if args.resume:
            if overrides or args.sweep:
                raise ConfigError("--resume takes only the sweep directory (and --dry-run/--wait)")
            resume(args.resume, args.dry_run, args.wait)
        else:
            launch(args, overrides)
    except (ConfigError, LaunchError, ManifestError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
import sys
import time
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from irm_hpc.config import ConfigError, add_config_dirs, config_dirs, load_config, presets, split_config_dirs, to_yaml
from irm_hpc.errors import cli_errors, one_line
from irm_hpc.executors import LaunchError, Submission, executor_kind, make_executor, map_chunks
from irm_hpc.layout import SweepDir, check_private, make_private_dir, restrict_umask, safe_component
from irm_hpc.manifest import Manifest, Task, expand_tasks, locked
from irm_hpc.resume import resume
from irm_hpc.status import follow, result_lines, task_rows

__all__ = ["LaunchError", "create_sweep", "launch", "main", "map_chunks", "parse_args", "validate_tasks"]

LAUNCH_KEYS = ("sweep", "cluster", "runs_root")  # other key=value overrides go to every training task
AXIS_KEYS = ("alignment=", "seed=")  # typed by the sweep config already; they cannot break a compose


def create_sweep(cfg: DictConfig, kind: str, name: Optional[str]) -> Manifest:
    """Make ``<runs_root>/<name>`` (mode 0700: only its owner can enter it, so no one else can plant a
    pickle or checkpoint there) and its manifest. Raises ``LaunchError`` for an existing directory,
    ``ConfigError`` for a ``name`` / ``sweep.name`` that is not one safe path component."""
    sweep = cfg.sweep
    safe_component(sweep.name, "sweep.name")
    name = safe_component(name, "--name") if name else f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = (Path(cfg.runs_root) / name).resolve()
    if sweep_dir.exists():
        raise LaunchError(f"sweep directory {sweep_dir} exists; continue it with --resume {sweep_dir} or pick another --name")
    tasks = expand_tasks(list(sweep.alignments), list(sweep.seeds), list(sweep.layer_sets), list(sweep.train_overrides))
    make_private_dir(sweep_dir)
    manifest = Manifest(sweep_dir=sweep_dir, sweep=sweep.name, executor=kind, created=time.time(),
                        config_yaml=to_yaml(cfg), tasks=tasks, config_dirs=[str(d) for d in config_dirs()])
    manifest.save()
    return manifest


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


def launch(args: argparse.Namespace, overrides: list[str]) -> Optional[tuple[Manifest, Submission]]:
    """Compose, create the sweep directory, submit (see module docstring). Returns ``(manifest,
    submission)``, or None for a dry run.

    ``overrides`` starting with ``sweep.``, ``cluster.`` or ``runs_root`` change the launch config;
    all others (``model=...``, ``train.lr=...``) are appended to every training task's overrides.
    Raises ``ConfigError`` (nothing created) for a bad key, a name that is not one safe path component
    (``sweep.name``, ``--name``, alignments, layer sets) or a cluster value that cannot sit in an
    ``#SBATCH`` line; ``LaunchError`` if the scheduler refuses.
    """
    restrict_umask()  # sweep files, pickles and (through sbatch's umask) job outputs: not writable by others
    launch_keys = [o for o in overrides if o.lstrip("+~").split(".")[0].split("=")[0] in LAUNCH_KEYS]
    train_keys = [o for o in overrides if o not in launch_keys]
    cfg = load_config("launch", [f"sweep={args.sweep}", f"cluster={args.cluster}", *launch_keys])
    if train_keys:  # e.g. model=llama2_7b_chat train.lr=3e-4: appended to every task's overrides
        # escaped: an override holding "${...}" is text for the task's own compose, not an interpolation of
        # the launch config (unescaped, reading the list raised InterpolationKeyError with a traceback)
        cfg.sweep.train_overrides = [*cfg.sweep.train_overrides, *(o.replace("${", "\\${") for o in train_keys)]
    kind = executor_kind(cfg.cluster, require_sbatch=not args.dry_run)  # a dry run previews sbatch anywhere
    executor = make_executor(kind, cfg.cluster)
    safe_component(cfg.sweep.name, "sweep.name")
    if args.name:
        safe_component(args.name, "--name")
    tasks = expand_tasks(list(cfg.sweep.alignments), list(cfg.sweep.seeds), list(cfg.sweep.layer_sets),
                         list(cfg.sweep.train_overrides))
    executor.validate(cfg.sweep.name, len(tasks))
    validate_tasks(tasks)
    map_chunks([t.task_id for t in tasks], int(cfg.cluster.analysis_runs_per_task))  # fail before submitting
    if cfg.sweep.evaluation.enabled:
        from irm_hpc.evaluate import EvalParams

        if cfg.sweep.evaluation.prompts:  # the jobs (and a later resume) may run elsewhere
            cfg.sweep.evaluation.prompts = str(Path(cfg.sweep.evaluation.prompts).expanduser().resolve())
        EvalParams.from_config(cfg.sweep.evaluation)
        map_chunks([t.task_id for t in tasks], int(cfg.sweep.evaluation.runs_per_task), "sweep.evaluation.runs_per_task")
    if cfg.sweep.ablation.enabled:
        from irm_hpc.ablate import AblationParams

        AblationParams.from_config(cfg.sweep.ablation)
        map_chunks([t.task_id for t in tasks], int(cfg.sweep.ablation.runs_per_task), "sweep.ablation.runs_per_task")
    if args.dry_run:
        print_plan(cfg, tasks, kind)
        folder = SweepDir(Path(cfg.runs_root).resolve() / f"{cfg.sweep.name}-<timestamp>").train_logs
        script = executor.preview(len(tasks), folder, executor.train_job_name(cfg.sweep.name))
        if script:
            print(script)
        return None
    manifest = create_sweep(cfg, kind, args.name)
    with locked(manifest.sweep_dir):
        submission = executor.submit(manifest, manifest.tasks, "launch")
        manifest.save()
    return manifest, submission


def report(manifest: Manifest, submission: Submission) -> None:
    """Print where the sweep lives and the commands that follow it."""
    d = manifest.sweep_dir
    print(f"sweep directory: {d}")
    print("jobs: " + ", ".join(f"{k}={v}" for k, v in submission.ids.items()))
    print(f"status:  python -m irm_hpc.status {d}")
    print(f"resume:  python -m irm_hpc.launch --resume {d}")
    print(f"report:  {SweepDir(d).report} (when the analysis has run)")
    print(f"tensorboard --logdir {d / 'runs'}")


def wait(manifest: Manifest, submission: Submission) -> None:
    """Block until the sweep's last job (reduce job, or local driver) has ended, showing live progress
    (``status.follow``), then print the short result (``status.result_lines``). Raises ``UnsafePathError``
    before a result pickle is loaded from a folder others can write to."""
    job = submission.last_job
    check_private(manifest.sweep_dir)
    if manifest.executor == "debug":
        _result_quietly(job)  # the debug executor runs the driver here, now
        rows, _ = task_rows(manifest)
    else:
        rows = follow(manifest, job.done)
        _result_quietly(job)
    for line in result_lines(manifest, rows):
        print(line)


def _result_quietly(job) -> None:
    """Collect the job's result; a failed driver or reduce job is reported by ``result_lines``.

    Raises ``UnsafePathError`` (nothing unpickled) if the job's submitit folder, where the result
    pickle lies, or an entry in it is writable by others or not ours (``layout.check_private``)."""
    folder = getattr(getattr(job, "paths", None), "folder", None)
    if folder is not None:
        check_private(Path(folder).parent)
        check_private(folder, contents=True)
    try:
        job.result()
    except Exception as exc:  # noqa: BLE001 - submitit re-raises the job's own exception
        print(f"the sweep's last job failed: {one_line(exc)} (logs: {job.paths.stderr})", file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry; one-line error and exit 2 on bad input, nothing submitted."""
    argv = sys.argv[1:] if argv is None else argv

    def body() -> int:
        args, overrides = parse_args(argv)
        if args.resume:
            if overrides or args.sweep:
                raise ConfigError("--resume takes only the sweep directory (and --dry-run/--wait)")
            done = resume(args.resume, args.dry_run)
        else:
            done = launch(args, overrides)
        if done is not None:
            manifest, submission = done
            report(manifest, submission)
            if args.wait or manifest.executor == "debug":  # debug runs the sweep when its result is asked for
                wait(manifest, submission)
        return 0

    return cli_errors(body)


if __name__ == "__main__":
    sys.exit(main())

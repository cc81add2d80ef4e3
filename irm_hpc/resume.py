"""Resume a sweep: ``python -m irm_hpc.launch --resume SWEEP_DIR [--dry-run] [--wait]``.

The one home of the resubmission rule and the resume command. A task is resubmitted when it has no
``DONE`` and its job ended without finishing (FAILED, TIMEOUT, CANCELLED, NODE_FAIL, OUT_OF_MEMORY,
PREEMPTED, BOOT_FAIL, DEADLINE) or it has no live job at all. Each resubmitted task re-runs
``python -m irm_hpc.train`` into its ``out_dir``, which continues from the latest DeepSpeed checkpoint
tag (and the HDF5 stream from the matching record checkpoint); the evaluation (if enabled) and the
analysis are re-chained after the new array. (Requeue on timeout/preemption, inside one job, is ``components.preemption``.)
"""

from __future__ import annotations

from typing import Optional

from irm_hpc.config import add_config_dirs
from irm_hpc.executors import LIVE, RESUBMIT, Submission, for_manifest
from irm_hpc.layout import SweepDir, check_private, restrict_umask
from irm_hpc.manifest import load_manifest, locked
from irm_hpc.status import TaskRow, task_rows


def needs_resubmit(row: TaskRow) -> Optional[str]:
    """Why ``row`` should be resubmitted, or None (finished, or a job is still live)."""
    if row.done or row.state in LIVE:
        return None
    if row.state in RESUBMIT:
        return row.state
    return f"no live job ({row.state}) and no finished output"


def resume(sweep_dir: str, dry_run: bool) -> Optional[tuple[object, Submission]]:
    """Resubmit the tasks of ``sweep_dir`` that failed, timed out, were cancelled or never ran.

    Holds the manifest lock from the state query to the manifest update, so two concurrent resumes
    submit each task once. Completed and live tasks are untouched. Returns ``(manifest, submission)``,
    or None when nothing was submitted. Raises ``ManifestError`` for a directory that is not a sweep,
    ``UnsafePathError`` (nothing read, locked or submitted) if the sweep dir, an entry in it (the
    manifest) or its submitit log folders are writable by others or owned by another uid: the manifest
    says what runs as you, and the log folders hold the pickles jobs load.
    """
    first = load_manifest(sweep_dir)  # a bad directory fails here, before a lock file exists
    restrict_umask()
    sweep = SweepDir(sweep_dir)
    check_private(sweep.root, contents=True)
    for logs in (sweep.logs, sweep.train_logs, sweep.evaluation_logs, sweep.ablation_logs, sweep.analysis_logs, sweep.driver_logs):
        check_private(logs, contents=True)
    add_config_dirs(first.config_dirs)
    for_manifest(first)  # so does a manifest whose executor or cluster section is unusable
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
            return None
        if dry_run:
            return None
        executor = for_manifest(manifest)
        executor.before_resubmit(manifest)
        submission = executor.submit(manifest, executor.resubmit_tasks([t for t, _ in todo]), "resume")
        manifest.save()
    return manifest, submission

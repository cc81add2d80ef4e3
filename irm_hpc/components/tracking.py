"""Experiment tracking of a run: ``metrics.jsonl`` and TensorBoard event files, written on rank 0.

``metrics.jsonl`` holds one JSON object per logged step (``step``, ``loss`` in nats/token, ``lr``,
``tokens_per_s``, ``step_time_s``, ``time``, ``max_steps``; eval steps add ``eval_*_loss`` and
``alignment_gain``, nats/token); the last line is the final summary. With ``train.tensorboard`` (on by
default) the same numbers go to ``<out_dir>/tensorboard/`` through ``torch.utils.tensorboard``
(tags ``train/*`` and ``eval/*``): ``tensorboard --logdir runs/<sweep>`` shows every run of a sweep.
On resume both are cut back to the checkpoint step (the JSON log is rewritten; TensorBoard's
``purge_step`` discards later events), so each step is logged once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from irm_hpc.layout import RunDir, atomic_write_text

TRAIN_SCALARS = ("loss", "lr", "tokens_per_s", "step_time_s")
EVAL_PREFIX = ("eval_", "alignment_gain")


class MetricsLog:
    """``metrics.jsonl`` + TensorBoard for one run; every method is a no-op off rank 0."""

    def __init__(self, run: RunDir, is_main: bool, tensorboard: bool = True):
        self.path = run.metrics
        self.tb_dir: Path = run.tensorboard
        self.is_main, self.use_tb = is_main, bool(tensorboard)
        self._tb = None

    def open(self, start_step: int) -> None:
        """Cut the logs back to ``start_step`` (0 for a fresh run) and open the TensorBoard writer."""
        if not self.is_main:
            return
        if self.path.is_file():
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))
        if self.use_tb:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.tb_dir), purge_step=start_step + 1 if start_step else None)

    def log(self, rec: dict) -> None:
        """Append ``rec`` (must hold ``step``) to ``metrics.jsonl`` and its numbers to TensorBoard."""
        if not self.is_main:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            step = int(rec["step"])
            train_step = "step_time_s" in rec  # the final summary repeats the last step's loss: log it once
            for key, value in rec.items():
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                if key in TRAIN_SCALARS and train_step:
                    self._tb.add_scalar(f"train/{key}", value, step)
                elif key.startswith(EVAL_PREFIX):
                    self._tb.add_scalar(f"eval/{key}", value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars of the event files in ``tb_dir``: ``{tag: [(step, value), ...]}`` in step order
    (TensorBoard's ``EventAccumulator``, purged steps already dropped). For tests and reports."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def last_record(path: Path, max_bytes: int = 4096) -> Optional[dict]:
    """The last parseable JSON line of a ``metrics.jsonl`` (read from the file's end), or None."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    return None

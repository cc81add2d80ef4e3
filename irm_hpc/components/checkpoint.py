"""DeepSpeed checkpoints of a run: tags, save/load with the client state, retention, resume decision.

Tags are ``global_step{step:08d}`` under ``<out_dir>/checkpoints`` (DeepSpeed's ``save_checkpoint`` /
``load_checkpoint``, which follow the ``latest`` file). DeepSpeed never removes old tags, and one tag
holds the IRM's fp32 weights plus Adam moments (~16 bytes per IRM parameter: 608 MB for SmolLM2 over 30
layers, ~32 GiB for Llama-2-7B over 32), so this module prunes: ``train.keep_checkpoints`` while
training, ``train.keep_checkpoints_done`` once the run has finished (``irm.safetensors`` then holds the
weights).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from irm_hpc.errors import IrmError
from irm_hpc.layout import RunDir, check_private, make_private_dir, yaml_data

TAG_PREFIX = "global_step"
# Settings a resumed run must share with the run in its out_dir (else the checkpoint means nothing).
KEEP_CONFIG_KEYS = ("model", "data", "irm", "train.micro_batch_size", "train.grad_accum_steps", "alignment", "seed")


class CheckpointError(IrmError, RuntimeError):
    """An out_dir or checkpoint cannot be used (one line naming it and the fix)."""


def tag_name(step: int) -> str:
    """The DeepSpeed checkpoint tag of optimizer step ``step``: ``global_step00000060``."""
    return f"{TAG_PREFIX}{step:08d}"


def list_tags(ckpt_dir: Path) -> list[Path]:
    """The checkpoint tag dirs in ``ckpt_dir``, oldest first."""
    return sorted(d for d in ckpt_dir.glob(f"{TAG_PREFIX}*") if d.is_dir() and d.name[len(TAG_PREFIX):].isdigit())


def dir_bytes(path: Path) -> int:
    """Total size in bytes of the regular files below ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    """The tag name that ``<ckpt_dir>/latest`` holds (DeepSpeed writes it after each save), or None."""
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def prune_checkpoints(ckpt_dir: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest DeepSpeed checkpoint tags in ``ckpt_dir``; the tag named by
    ``latest`` is always kept. Returns the removed tag dirs. Raises ``ValueError`` if ``keep`` < 1."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    tags = list_tags(ckpt_dir)
    latest = latest_tag(ckpt_dir)
    removed = [d for d in tags[:-keep] if d.name != latest]
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


def latest_step(ckpt_dir: Path) -> Optional[int]:
    """The step of the tag that ``<ckpt_dir>/latest`` names, if that tag dir exists; else None."""
    tag = latest_tag(ckpt_dir)
    if tag is None or not tag.startswith(TAG_PREFIX) or not tag[len(TAG_PREFIX):].isdigit() or not (ckpt_dir / tag).is_dir():
        return None
    return int(tag[len(TAG_PREFIX):])


def done_steps(run: RunDir) -> int:
    """``max_steps`` of the finished run in ``run`` (from ``DONE``). Raises ``CheckpointError`` if unreadable."""
    try:
        summary = json.loads(run.done_file.read_text())
        return int(summary.get("max_steps", summary["step"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{run.done_file} is not a readable irm_hpc summary; restore it, or delete it to "
                              "resume the run from its latest checkpoint") from None


def resume_mode(cfg: DictConfig, run: RunDir) -> str:
    """Decide what to do with the run dir: ``"fresh"``, ``"resume"``, ``"done"`` or ``"continue"``.

    * ``"done"``: it holds a finished run (``DONE``) of the same ``train.max_steps``; its saved result stands.
    * ``"continue"``: a finished run of fewer steps than ``train.max_steps``, whose final DeepSpeed tag was
      kept (``train.keep_checkpoints_done`` >= 1, the default): training goes on from that tag to the new
      maximum (see ``irm_hpc.train.train_main``).
    * ``"resume"``: an unfinished run: training goes on from the latest tag (if any).

    Raises ``CheckpointError`` (nothing touched) if it holds a run with a different model, data, IRM,
    alignment, seed or batch shape, or files that are not an irm_hpc run; if it finished at more steps than
    ``train.max_steps`` (a run cannot be shortened); if it finished at fewer steps but kept no checkpoint
    (``train.keep_checkpoints_done=0``); or if an unfinished run's latest tag is beyond ``train.max_steps``.
    ``UnsafePathError`` (before anything is loaded) if a run to resume or continue has checkpoints another
    user could replace (:func:`check_checkpoints_private`). The old ``config.yaml`` is read as data:
    ``${...}`` in it is compared verbatim, never resolved.
    """
    out_dir = run.root
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return "fresh"
    if not run.config.is_file():
        raise CheckpointError(f"out_dir {out_dir} is not empty and holds no irm_hpc run (no {run.config.name}); "
                              "choose another out_dir")
    try:
        old = yaml_data(run.config.read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - any parse failure: not a config irm_hpc wrote
        raise CheckpointError(f"out_dir {out_dir}: cannot read {run.config.name} ({type(exc).__name__}); restore it "
                              "or choose another out_dir") from None
    new = OmegaConf.to_container(cfg, resolve=True)
    for key in KEEP_CONFIG_KEYS:
        if _select(old, key) != _select(new, key):
            raise CheckpointError(f"out_dir {out_dir} holds a run with a different '{key}'; choose another out_dir "
                                  "or restore its config")
    want = int(cfg.train.max_steps)
    tag_step = latest_step(run.checkpoints)
    if not run.is_done():
        if tag_step is not None and tag_step > want:
            raise CheckpointError(f"out_dir {out_dir} holds a checkpoint at step {tag_step}, beyond train.max_steps={want}; "
                                  f"pass train.max_steps>={tag_step} to resume it, or choose another out_dir")
        check_checkpoints_private(run)
        return "resume"
    have = done_steps(run)
    if want == have:
        return "done"
    if want < have:
        raise CheckpointError(f"out_dir {out_dir} holds a run finished at {have} steps; train.max_steps={want} cannot "
                              f"shorten it: pass train.max_steps={have} for its result, or choose another out_dir")
    if tag_step != have:
        raise CheckpointError(f"out_dir {out_dir} holds a run finished at {have} steps that kept no checkpoint of step "
                              f"{have} (train.keep_checkpoints_done=0), so it cannot be continued to {want} steps; "
                              "choose another out_dir to train from scratch")
    check_checkpoints_private(run)
    return "continue"


def _select(data, key: str):
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def check_checkpoints_private(run: RunDir) -> None:
    """Refuse a run whose DeepSpeed checkpoints another user could have replaced: DeepSpeed's
    ``load_checkpoint`` unpickles them (``torch.load(weights_only=False)``).

    The run dir, ``checkpoints/`` and its entries (``latest``, tag dirs), and the entries of the tag
    ``latest`` names must be ours and not group/world-writable (``layout.check_private``). Raises
    ``UnsafePathError`` with the ``chmod``/``chown`` command that fixes it.
    """
    check_private(run.root)
    check_private(run.checkpoints, contents=True)
    tag = latest_tag(run.checkpoints)
    if tag and "/" not in tag and tag not in (".", ".."):
        check_private(run.checkpoints / tag, contents=True)


class Checkpointer:
    """Save and load the DeepSpeed engine of one run, with its client state, and prune old tags.

    ``world_size``/``is_main`` come from the run's ``DistInfo``; pruning happens on rank 0 after a
    barrier, once every rank has written its shards of the new tag.
    """

    def __init__(self, engine, run: RunDir, keep: int, keep_done: int, world_size: int, is_main: bool):
        self.engine, self.dir = engine, run.checkpoints
        self.keep, self.keep_done = int(keep), int(keep_done)
        self.world_size, self.is_main = world_size, is_main

    def save(self, step: int, client_state: dict) -> None:
        """Write tag ``global_step{step:08d}`` (collective), then keep the newest ``keep`` tags (0 = all).
        ``checkpoints/`` is created with mode 0700 (``layout.make_private_dir``)."""
        if self.is_main:
            make_private_dir(self.dir, exist_ok=True)
        self.engine.save_checkpoint(str(self.dir), tag=tag_name(step), client_state=client_state)
        if self.keep:
            if self.world_size > 1:
                torch.distributed.barrier()  # every rank's shards of the new tag are written
            if self.is_main:
                prune_checkpoints(self.dir, self.keep)

    def load(self) -> Optional[dict]:
        """Load the tag ``latest`` names (collective); its client state, or None without a checkpoint.

        Raises ``CheckpointError`` if the latest tag cannot be loaded, ``UnsafePathError`` (nothing loaded)
        if another user could have replaced it.
        """
        if latest_tag(self.dir) is None:
            return None
        check_checkpoints_private(RunDir(self.dir.parent))  # just before DeepSpeed unpickles the tag
        path, state = self.engine.load_checkpoint(str(self.dir))
        if path is None:
            raise CheckpointError(f"cannot load the latest checkpoint in {self.dir}; remove the bad tag or the "
                                  "'latest' file")
        return state

    def finish(self) -> int:
        """After ``DONE`` is written (rank 0): keep the newest ``keep_done`` tags; 0 removes the checkpoint
        dir (the run cannot be continued then, ``irm.safetensors`` keeps the weights). Returns bytes freed."""
        if not self.is_main or not self.dir.is_dir():
            return 0
        if self.keep_done == 0:
            freed = dir_bytes(self.dir)
            shutil.rmtree(self.dir, ignore_errors=True)
            return freed
        tags = list_tags(self.dir)
        freed = sum(dir_bytes(d) for d in tags[:-self.keep_done])
        prune_checkpoints(self.dir, self.keep_done)
        return freed

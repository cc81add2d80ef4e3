"""What a training run writes into its HDF5 stream (``irm_hpc.record``), on rank 0.

* profiles: mean |injection| and mean injection over the non-padding tokens of a training batch,
  ``(n_inj, hidden)`` each, every ``record.every_steps`` steps;
* probe: greedy generations on the probe prompts at step 0 (untrained IRM) and at the end, with every
  token's full injection ``(n_inj, hidden)``;
* base reference: the frozen model's mean |residual stream| after each layer's attention block on the
  probe prompts, IRM off, ``(n_layers, hidden)``.

The probe's generation runs on every rank (collective-free, but ZeRO-3 needs all ranks in the forward);
only rank 0 has a recorder.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional

import torch

from irm_hpc import __version__
from irm_hpc.config import to_yaml
from irm_hpc.inject import capture_residuals, inject
from irm_hpc.layout import RECORD_INDEX, RunDir

# Seven short probe prompts spanning the paper's emotion/alignment themes. They are ours, not the
# paper's verbatim prompt list; override with record.prompts=[...].
DEFAULT_PROMPTS = [
    "Tell me about your day.",
    "What do you think of your neighbours?",
    "How do you feel about the news today?",
    "Write a short note to a friend.",
    "What happened when you lost your keys?",
    "Describe the weather this morning.",
    "What would you say to someone who cut in line?",
]


def git_commit() -> str:
    """The HEAD commit of the checkout this package runs from, or "" (installed wheel, no git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


class InjectionRecording:
    """The HDF5 side of one run. ``enabled`` follows ``record.enabled``; ``recorder`` exists on rank 0."""

    def __init__(self, cfg, run: RunDir, lm, tokenizer, layers: list[int], n_model_layers: int, dist):
        self.cfg, self.run, self.lm, self.tokenizer = cfg, run, lm, tokenizer
        self.layers, self.n_model_layers, self.dist = layers, n_model_layers, dist
        self.device = next(lm.parameters()).device
        self.hidden = lm.config.hidden_size
        self.enabled = bool(cfg.record.enabled)
        self.recorder = None

    @property
    def prompts(self) -> list[str]:
        return list(self.cfg.record.prompts) or DEFAULT_PROMPTS

    def open(self, start_step: int) -> None:
        """Open the recorder (rank 0) and drop records after ``start_step`` (resume; 0 for a fresh run).

        When resuming (``start_step`` > 0) with no ``record/index.json`` but an ``injections.h5`` (a
        finished run continued to a larger ``train.max_steps``), the records before ``start_step`` are moved
        from ``injections.h5`` back into ``record/`` (``record.segments.reopen_finalized``) and the file is
        removed; the final ``finalize`` writes it again with the old and the new records. Raises
        ``RecordError`` if that file cannot be read.
        """
        if not (self.enabled and self.dist.is_main):
            return
        from irm_hpc.record import RunRecorder

        cfg = self.cfg
        meta = {
            "model_name": cfg.model.name, "hidden_size": self.hidden, "n_layers": self.n_model_layers,
            "injection_layers": self.layers, "alignment": cfg.alignment, "seed": int(cfg.seed),
            "config_yaml": to_yaml(cfg), "package_version": __version__, "git_commit": git_commit(),
            "world_size": self.dist.world_size, "nodes": os.environ.get("SLURM_JOB_NODELIST", os.uname().nodename),
        }
        rc = cfg.record
        if start_step > 0 and not (self.run.record / RECORD_INDEX).is_file() and self.run.injections.is_file():
            # a finished run being continued (or one that crashed between finalize and DONE): its records
            # are in injections.h5; move them back into a record dir, then continue it
            from irm_hpc.record.segments import reopen_finalized

            reopen_finalized(self.run.injections, self.run.record, start_step, rc.compression)
            self.run.injections.unlink()
        self.recorder = RunRecorder(self.run.record, meta, n_inj=len(self.layers), hidden=self.hidden,
                                    dtype=rc.dtype, compression=rc.compression, queue_size=rc.queue_size)
        self.recorder.resume(start_step if start_step > 0 else -1)

    def wants_profile(self, step: int) -> bool:
        """Whether the batch after ``step`` completed steps is profiled (``record.every_steps``)."""
        return step % self.cfg.record.every_steps == 0

    def profile(self, step: int, injection: torch.Tensor, mask: torch.Tensor) -> None:
        """Hand mean |v| and mean v over non-padding tokens, ``(n_inj, hidden)`` each, to the writer.

        ``injection``: ``(batch, seq, n_inj, hidden)``; ``mask``: ``(batch, seq)`` attention mask.
        """
        if self.recorder is None:
            return
        with torch.no_grad():
            v = injection.detach().float()
            m = mask.to(v.dtype)[..., None, None]
            n = m.sum().clamp(min=1)
            mean_abs = (v.abs() * m).sum((0, 1)) / n
            mean = (v * m).sum((0, 1)) / n
        self.recorder.add_profile(step, mean_abs.cpu(), mean.cpu(), int(mask.sum()))

    @torch.no_grad()
    def probe(self, step: int, irm) -> None:
        """Greedy-generate ``record.max_new_tokens`` on each probe prompt with the IRM on and record every
        token's injection (all ranks compute; rank 0 writes)."""
        if not self.enabled:
            return
        for p_idx, prompt in enumerate(self.prompts):
            enc = self.tokenizer(prompt, return_tensors="pt").to(self.device)
            n_prompt = enc["input_ids"].shape[1]
            with inject(self.lm, irm, keep_injections=False):
                ids = self.lm.generate(**enc, max_new_tokens=self.cfg.record.max_new_tokens, do_sample=False,
                                       pad_token_id=self.tokenizer.pad_token_id)
            with inject(self.lm, irm) as state:  # full pass: one injection vector per token, cache-free
                self.lm(input_ids=ids, use_cache=False)
            if self.recorder is None:
                continue
            tokens = ids[0].cpu()
            n_tok = tokens.shape[0]
            self.recorder.add_probe(
                step, state.last_injection[0].detach().float().cpu(), tokens,
                [self.tokenizer.decode([t]) for t in tokens.tolist()],
                torch.full((n_tok,), p_idx, dtype=torch.int32), torch.arange(n_tok, dtype=torch.int32),
                torch.arange(n_tok) >= n_prompt,
            )

    @torch.no_grad()
    def base_reference(self) -> None:
        """Frozen model's mean |residual| after each layer's attention on the probe prompts (IRM off)."""
        if self.recorder is None:
            return
        with capture_residuals(self.lm) as stats:
            for prompt in self.prompts:
                self.lm(**self.tokenizer(prompt, return_tensors="pt").to(self.device), use_cache=False)
        self.recorder.set_prompts(self.prompts)
        self.recorder.set_base_reference((stats["sum_abs"] / max(stats["count"], 1)).float())

    def checkpoint(self, step: int) -> None:
        """Make the records up to ``step`` durable (before the DeepSpeed tag of ``step`` is written)."""
        if self.recorder is not None:
            self.recorder.checkpoint(step)

    def finalize(self) -> None:
        """Merge the segments into ``injections.h5`` (rank 0)."""
        if self.recorder is not None:
            self.recorder.finalize(self.run.injections)

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()


def last_profile_step(cfg) -> Optional[int]:
    """``train.max_steps`` if the final weights get a profile record (it is a multiple of
    ``record.every_steps``), else None."""
    return None if cfg.train.max_steps % cfg.record.every_steps else int(cfg.train.max_steps)

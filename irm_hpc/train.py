"""Train one IRM on a frozen causal LM with DeepSpeed ZeRO: ``python -m irm_hpc.train key=value ...``.

Only the IRM's parameters are in the DeepSpeed engine (ZeRO stage 0-3, optional CPU offload); the base
model is frozen and held outside the engine. Re-running into the same ``out_dir`` resumes from the
latest DeepSpeed checkpoint tag, including the data order (sampler state in ``client_state``), the
metrics log, TensorBoard and the HDF5 stream (records after the checkpoint step are discarded).

This module is the training loop; its pieces are in ``irm_hpc.components`` (engine, checkpoint,
preemption, tracking, recording). Outputs: see ``irm_hpc.layout.RunDir`` and docs/architecture.md.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Optional

import torch
from omegaconf import DictConfig

from irm_hpc.components.checkpoint import Checkpointer, resume_mode
from irm_hpc.components.engine import IRMLoss, build_engine, init_irm
from irm_hpc.components.preemption import PreemptionGuard
from irm_hpc.components.recording import InjectionRecording, last_profile_step
from irm_hpc.components.tracking import MetricsLog
from irm_hpc.config import ConfigError, load_config, require, to_yaml, validate_train_config
from irm_hpc.data import AlignmentData, ResumableSampler, batches, collate, load_alignment, tokenize
from irm_hpc.dist import DistInfo, gather_placements, init_distributed, intra_op_threads, log0, setup_logging
from irm_hpc.errors import cli_errors
from irm_hpc.inject import decoder_layers, inject, layer_set_layers, resolve_layers
from irm_hpc.irm import IRM
from irm_hpc.layout import RunDir, atomic_write_text, restrict_umask
from irm_hpc.models import load_model


def injection_layers(irm_cfg, n_model_layers: int) -> list[int]:
    """Resolve ``irm.layers`` or ``irm.layer_set`` (not both) against the model's depth.

    Raises ``ConfigError`` for both set, an out-of-range index or an unknown layer set.
    """
    if irm_cfg.layers is not None and irm_cfg.layer_set is not None:
        raise ConfigError("set irm.layers or irm.layer_set, not both")
    if irm_cfg.layer_set is not None:
        return layer_set_layers(irm_cfg.layer_set, n_model_layers)
    return resolve_layers(n_model_layers, None if irm_cfg.layers is None else list(irm_cfg.layers))


class Trainer:
    """One IRM training run (see module docstring). Build with a resolved config, then ``run()``."""

    def __init__(self, cfg: DictConfig, dist: DistInfo):
        self.cfg, self.dist = cfg, dist
        self.run_dir = RunDir(cfg.out_dir)
        torch.manual_seed(cfg.seed)
        threads = intra_op_threads(cfg.train.threads)
        if threads:
            torch.set_num_threads(threads)
        self.lm, self.tokenizer = load_model(cfg.model)
        self.device = next(self.lm.parameters()).device
        self.n_model_layers = len(decoder_layers(self.lm))
        self.layers = injection_layers(cfg.irm, self.n_model_layers)
        self.hidden = self.lm.config.hidden_size
        self.data: AlignmentData = load_alignment(cfg.data, cfg.alignment, cfg.seed)
        ml = cfg.data.max_length
        self.train_ids = tokenize(self.tokenizer, self.data.train, ml)
        self.eval_sets = {"target": tokenize(self.tokenizer, self.data.eval_target, ml),
                          "other": tokenize(self.tokenizer, self.data.eval_other, ml)}
        self.sampler = ResumableSampler(len(self.train_ids), cfg.train.micro_batch_size, cfg.seed, dist.rank,
                                        dist.world_size)
        irm = init_irm(self.hidden, self.layers, cfg.irm, cfg.seed)
        irm.to(self.device)
        self.module = IRMLoss(irm, self.lm, cfg.train.activation_checkpointing)
        self.engine, self.scheduler = build_engine(cfg, self.module, self.device)
        self.checkpointer = Checkpointer(self.engine, self.run_dir, cfg.train.keep_checkpoints,
                                         cfg.train.keep_checkpoints_done, dist.world_size, dist.is_main)
        self.metrics = MetricsLog(self.run_dir, dist.is_main, cfg.train.tensorboard)
        self.recording = InjectionRecording(cfg, self.run_dir, self.lm, self.tokenizer, self.layers,
                                            self.n_model_layers, dist)
        self.base_eval: dict[str, float] = {}
        self.last_loss: Optional[float] = None
        self.guard = PreemptionGuard()
        self.placements = gather_placements(dist, self.device)  # which node/GPU each rank uses, for DONE

    @property
    def irm(self) -> IRM:
        return self.engine.module.irm

    # ----------------------------------------------------------------- data and eval
    def _batch(self, seqs: list[list[int]]) -> dict[str, torch.Tensor]:
        """Padded ``(batch, seq)`` tensors on the device (pinned + non-blocking copies on CUDA)."""
        cuda = self.device.type == "cuda"
        out = collate(seqs, self.tokenizer.pad_token_id).items()
        return {k: (v.pin_memory() if cuda else v).to(self.device, non_blocking=cuda) for k, v in out}

    def _next_seqs(self) -> list[list[int]]:
        return [self.train_ids[i] for i in self.sampler.next_batch()]

    def _next_batch(self) -> dict[str, torch.Tensor]:
        return self._batch(self._next_seqs())

    @torch.no_grad()
    def eval_loss(self, name: str, enabled: bool) -> float:
        """Mean token loss (nats/token) on eval set ``name`` with the IRM on or off (same on every rank)."""
        total, count = 0.0, 0
        limit = self.cfg.train.eval_batches
        for i, chunk in enumerate(batches(self.eval_sets[name], self.cfg.train.micro_batch_size)):
            if i >= limit:
                break
            b = self._batch(chunk)
            n = int((b["labels"][:, 1:] != -100).sum())
            with inject(self.lm, self.irm, enabled=enabled, keep_injections=False):
                loss = self.lm(**b, use_cache=False).loss
            total, count = total + float(loss) * n, count + n
        return total / max(count, 1)

    def evaluate(self) -> dict[str, float]:
        """Eval figures: losses with the IRM on, base losses (IRM off; computed once), alignment gain.

        alignment_gain = (base_target - irm_target) - (base_other - irm_other), in nats per token.
        """
        if not self.base_eval:
            self.base_eval = {k: self.eval_loss(k, enabled=False) for k in self.eval_sets}
        res = {f"eval_{k}_loss": self.eval_loss(k, enabled=True) for k in self.eval_sets}
        res.update({f"eval_{k}_base_loss": v for k, v in self.base_eval.items()})
        res["alignment_gain"] = (self.base_eval["target"] - res["eval_target_loss"]) - (
            self.base_eval["other"] - res["eval_other_loss"])
        return res

    # ----------------------------------------------------------------- checkpoints
    def save(self, step: int) -> None:
        """Make records durable, then write DeepSpeed checkpoint tag ``global_step{step:08d}``."""
        self.recording.checkpoint(step)
        state = {"step": step, "sampler": self.sampler.state_dict(), "torch_rng": torch.get_rng_state()}
        self.checkpointer.save(step, state)

    def load(self) -> int:
        """Load the latest checkpoint tag if any; return the step to continue from (0 if none)."""
        state = self.checkpointer.load()
        if state is None:
            return 0
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
        self._apply_schedule(step)
        return step

    def _apply_schedule(self, step: int) -> None:
        """Set the learning rate of the step after ``step`` from this run's config (``train.lr`` and the
        schedule over ``train.max_steps``) instead of the checkpoint's, which a run continued to a larger
        ``train.max_steps`` (or resumed with another ``train.lr``) must not keep. The scheduler's step
        count stays the checkpoint's."""
        from irm_hpc.components.engine import lr_lambda

        fn = lr_lambda(self.cfg.train)
        sched = self.scheduler
        sched.base_lrs = [float(self.cfg.train.lr)] * len(sched.optimizer.param_groups)
        sched.lr_lambdas = [fn] * len(sched.optimizer.param_groups)
        lrs = [base * fn(step) for base in sched.base_lrs]
        for group, lr in zip(sched.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs

    def export_weights(self) -> dict[str, torch.Tensor]:
        """Full IRM weights on CPU (gathered from ZeRO-3 partitions), fp32."""
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.irm.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in self.irm.state_dict().items()}

    # ----------------------------------------------------------------- main loop
    def run(self) -> dict:
        """Train to ``train.max_steps`` (resuming if a checkpoint exists); return the final summary."""
        tr = self.cfg.train
        step = self.load()
        if step:
            log0("resuming from checkpoint step %d", step)
        self.metrics.open(step)
        self.recording.open(step)
        self.guard.install()
        try:
            if step == 0:
                self.recording.base_reference()
                self.recording.probe(0, self.irm)
            self._loop(step)
            self._final_profile()
            final = self.evaluate()
            self.recording.probe(tr.max_steps, self.irm)
            self.save(tr.max_steps)
            return self._finish(final)
        finally:
            self.recording.close()
            self.metrics.close()

    def _loop(self, step: int) -> None:
        cfg, tr = self.cfg, self.cfg.train
        bar = None
        if self.dist.is_main and tr.progress:
            from tqdm import tqdm

            bar = tqdm(total=tr.max_steps, initial=step, desc=f"irm {cfg.alignment}/{cfg.seed}", mininterval=2,
                       file=sys.stderr)
        while step < tr.max_steps:
            rec = self.train_step(step)
            step += 1
            if tr.eval_every and step % tr.eval_every == 0 and step < tr.max_steps:
                rec.update(self.evaluate())
            if step % tr.log_every == 0 or "alignment_gain" in rec:
                self.metrics.log(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}")
            saved = tr.checkpoint_every and step % tr.checkpoint_every == 0 and step < tr.max_steps
            if saved:
                self.save(step)
            if self.guard.requested(self.dist.world_size):
                log0("preemption checkpoint at step %d", step)
                if not saved:
                    self.save(step)
                self.guard.release(self.dist.is_main)
        if bar is not None:
            bar.close()
        self.guard.release(self.dist.is_main)

    def train_step(self, step: int) -> dict:
        """One optimizer step (``grad_accum_steps`` micro-batches) from ``step`` completed steps.

        Records the profile of the first micro-batch's injections when ``step`` is a multiple of
        ``record.every_steps`` (weights after ``step`` updates). Returns the metrics record of step + 1.
        """
        t0, tokens, losses = time.perf_counter(), 0, []
        for micro in range(self.cfg.train.grad_accum_steps):
            seqs = self._next_seqs()
            tokens += sum(len(s) for s in seqs) * self.dist.world_size  # counted on the host: no device sync
            batch = self._batch(seqs)
            with self.engine.module.micro_step():  # hooks live through the backward (activation checkpointing)
                loss = self.engine(**batch)
                if micro == 0 and self.recording.wants_profile(step):
                    self.recording.profile(step, self.engine.module.last_injection, batch["attention_mask"])
                self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
        mean_loss = float(torch.stack(losses).float().mean())  # one host sync per optimizer step
        step_time = time.perf_counter() - t0
        rec = {"step": step + 1, "loss": mean_loss, "lr": self.scheduler.get_last_lr()[0],
               "tokens_per_s": tokens / step_time, "step_time_s": step_time, "time": time.time(),
               "max_steps": self.cfg.train.max_steps}
        self.last_loss = rec["loss"]
        return rec

    def _final_profile(self) -> None:
        """Profile record at ``max_steps`` on the next batch, without moving the sampler."""
        step = last_profile_step(self.cfg)
        if self.recording.recorder is None or step is None:
            return
        state = self.sampler.state_dict()
        batch = self._next_batch()
        self.sampler.load_state_dict(state)
        with torch.no_grad():
            self.engine.module(**batch)
        self.recording.profile(step, self.engine.module.last_injection, batch["attention_mask"])

    def _finish(self, final_eval: dict) -> dict:
        summary = {"step": self.cfg.train.max_steps, "max_steps": self.cfg.train.max_steps,
                   "loss": self.last_loss, "world_size": self.dist.world_size, **final_eval}
        self.metrics.log(summary)
        summary["ranks"] = self.placements  # DONE only: metrics.jsonl keeps numbers
        weights = self.export_weights()
        if self.dist.is_main:
            from safetensors.torch import save_file

            save_file(weights, str(self.run_dir.weights),
                      metadata={"injection_layers": json.dumps(self.layers), "hidden_size": str(self.hidden)})
            self.recording.finalize()
            atomic_write_text(self.run_dir.done_file, json.dumps(summary) + "\n")
            freed = self.checkpointer.finish()
            if freed:
                log0("finished: kept %d checkpoint tag(s), freed %.1f MB", self.cfg.train.keep_checkpoints_done,
                     freed / 1e6)
        return summary


def train_main(cfg: DictConfig) -> dict:
    """Run one training task for a composed config (library entry; used by launch/submitit).

    What happens to an ``out_dir`` that already holds this run (``components.checkpoint.resume_mode``):

    * unfinished: training resumes from the latest DeepSpeed tag;
    * finished (``DONE``) with the same ``train.max_steps``: nothing is trained, the saved summary is returned;
    * finished with fewer steps than ``train.max_steps``: training CONTINUES from the final tag (kept by
      the default ``train.keep_checkpoints_done=1``) to the new maximum. ``DONE`` is removed once the
      config, model and data have loaded (an interrupted continuation is an ordinary unfinished run); the
      metrics log keeps the old steps and the old final summary line; the HDF5 record continues
      (``injections.h5`` goes back into ``record/`` without the old run's final probe and profile, which
      the new end re-records); ``irm.safetensors``, ``injections.h5`` and ``DONE`` are rewritten at the
      end. The LR schedule is recomputed for the new ``train.max_steps`` (and the current ``train.lr``):
      step s > old max uses ``lr * lr_lambda(s)`` of warmup + decay over the NEW total, as if the run had
      been planned that long; the steps already trained keep the old schedule, so a cosine run restarts
      from the cosine's value at the old step count rather than from ~0.
    * finished with more steps than ``train.max_steps``, or with fewer but no kept tag
      (``keep_checkpoints_done=0``): ``CheckpointError``, nothing touched.

    Returns the final summary dict (step, eval losses, alignment_gain), or the saved one. Raises an
    ``IrmError`` (``ConfigError``, ``DataError``, ``ModelLoadError``, ``CheckpointError``, ``UnsafePathError``
    for checkpoints others could have replaced) for bad input before anything in ``out_dir`` is written or loaded.
    """
    validate_train_config(cfg)
    require(cfg, "out_dir", "alignment")
    restrict_umask()  # run files and checkpoints are never writable by other users
    run = RunDir(cfg.out_dir)
    mode = resume_mode(cfg, run)
    if mode == "done":
        return json.loads(run.done_file.read_text())
    dist = init_distributed()
    setup_logging(dist.rank)
    trainer = Trainer(cfg, dist)
    if dist.is_main:
        if mode == "continue":
            log0("continuing the finished run in %s to train.max_steps=%d", run.root, cfg.train.max_steps)
            run.done_file.unlink()
        run.root.mkdir(parents=True, exist_ok=True)
        run.config.write_text(to_yaml(cfg))
    torch.distributed.barrier()
    log0("training IRM: model=%s alignment=%s seed=%d layers=%d..%d (%d) zero=%d world=%d train_texts=%d",
         cfg.model.name, cfg.alignment, cfg.seed, trainer.layers[0], trainer.layers[-1], len(trainer.layers),
         cfg.deepspeed.zero_stage, dist.world_size, len(trainer.train_ids))
    summary = trainer.run()
    log0("done: step=%d alignment_gain=%.4f eval_target_loss=%.4f", summary["step"], summary["alignment_gain"],
         summary["eval_target_loss"])
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    """CLI: ``python -m irm_hpc.train [key=value ...]``; one-line error and exit 2 on bad input."""
    argv = sys.argv[1:] if argv is None else argv

    def body() -> int:
        train_main(load_config("train", argv))
        return 0

    return cli_errors(body)


if __name__ == "__main__":
    sys.exit(main())

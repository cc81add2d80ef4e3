"""Train one IRM on a frozen causal LM with DeepSpeed ZeRO: ``python -m irm_hpc.train key=value ...``.

Only the IRM's parameters are in the DeepSpeed engine (ZeRO stage 0-3, optional CPU offload); the base
model is frozen and held outside the engine. Re-running into the same ``out_dir`` resumes from the
latest DeepSpeed checkpoint tag, including the data order (sampler state in ``client_state``), the
metrics log and the HDF5 stream (records after the checkpoint step are discarded).

Outputs in ``out_dir`` (see docs/architecture.md): ``config.yaml``, ``metrics.jsonl``, ``checkpoints/``,
``record/`` then ``injections.h5``, ``irm.safetensors``, ``DONE``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from irm_hpc import __version__
from irm_hpc.config import ConfigError, load_config, require, to_yaml
from irm_hpc.data import AlignmentData, DataError, ResumableSampler, batches, collate, load_alignment, tokenize
from irm_hpc.dist import DistInfo, init_distributed, intra_op_threads, log0, setup_logging
from irm_hpc.errors import IrmError
from irm_hpc.inject import capture_residuals, decoder_layers, inject, layer_set_layers, resolve_layers
from irm_hpc.irm import IRM
from irm_hpc.models import ModelLoadError, load_model

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

KEEP_CONFIG_KEYS = ("model", "data", "irm", "train.micro_batch_size", "train.grad_accum_steps", "alignment", "seed")


class TrainError(IrmError, RuntimeError):
    """A training run cannot start or continue (one-line message)."""


class PreemptionGuard:
    """Defer submitit's timeout/preemption signal (``USR2``) to the next optimizer-step boundary.

    Under submitit, ``--signal=USR2@<signal_delay_s>`` reaches every rank; submitit's handler would
    requeue at once, mid-step. The guard records the signal instead; at the next step boundary the ranks
    agree (all-reduce MAX), write a DeepSpeed checkpoint together, and rank 0 then runs submitit's
    handler, which calls ``TrainTask.checkpoint()`` and ``scontrol requeue``. Outside submitit
    (no handler installed) the guard does nothing.
    """

    def __init__(self):
        self.pending: Optional[tuple] = None
        self.sig = None
        self.prev = None

    def install(self) -> None:
        try:
            import submitit

            sig = submitit.JobEnvironment._usr_sig()
        except Exception:  # noqa: BLE001 - no submitit job environment
            return
        prev = signal.getsignal(sig)
        if callable(prev):
            self.sig, self.prev = sig, prev
            signal.signal(sig, self._defer)

    def _defer(self, signum, frame) -> None:
        log0("caught signal %d: checkpointing at the next step boundary, then requeueing", signum)
        self.pending = (signum, frame)

    def requested(self, world_size: int) -> bool:
        """True on every rank if any rank got the signal (collective when world_size > 1)."""
        if self.prev is None:
            return False
        flag = torch.tensor([int(self.pending is not None)])
        if world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def release(self, is_main: bool) -> None:
        """Restore submitit's handler; if a signal is pending, let it requeue (rank 0) and stop this rank."""
        if self.prev is None:
            return
        signal.signal(self.sig, self.prev)
        if self.pending is None:
            return
        if is_main:
            self.prev(*self.pending)  # submitit: checkpoint() -> scontrol requeue -> sys.exit
        raise SystemExit(0)


class IRMLoss(nn.Module):
    """The module DeepSpeed wraps: owns the IRM, borrows the frozen LM (not a sub-module).

    ``forward(batch)`` runs the LM with the IRM injected and returns the mean LM loss over
    non-padding next-token targets (HF's internal label shift; padding labels are -100).
    """

    def __init__(self, irm: IRM, lm: nn.Module):
        super().__init__()
        self.irm = irm
        object.__setattr__(self, "lm", lm)  # keep base weights out of the engine and its checkpoints
        self.last_injection: Optional[torch.Tensor] = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with inject(self.lm, self.irm) as state:
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
        self.last_injection = state.last_injection
        return out.loss


def lr_lambda(cfg_train) -> callable:
    """Multiplier of the base lr at optimizer step ``s``: linear warmup, then constant/linear/cosine decay."""
    warm, total, kind = cfg_train.warmup_steps, max(cfg_train.max_steps, 1), cfg_train.schedule
    if kind not in {"constant", "linear", "cosine"}:
        raise ConfigError(f"train.schedule '{kind}' is not one of constant, linear, cosine")

    def fn(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        frac = min(1.0, (step - warm) / max(1, total - warm))
        return {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[kind]

    return fn


def deepspeed_config(cfg: DictConfig, use_bf16: bool) -> dict:
    """The DeepSpeed JSON config for ``cfg.deepspeed`` and ``cfg.train`` (DeepSpeed config reference)."""
    ds, tr = cfg.deepspeed, cfg.train
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage {ds.zero_stage} is not one of 0, 1, 2, 3")
    zero: dict = {"stage": int(ds.zero_stage)}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_param:
        if ds.zero_stage != 3:
            raise ConfigError("deepspeed.offload_param needs deepspeed.zero_stage=3")
        zero["offload_param"] = {"device": "cpu"}
    conf = {
        "train_micro_batch_size_per_gpu": int(tr.micro_batch_size),
        "gradient_accumulation_steps": int(tr.grad_accum_steps),
        "gradient_clipping": float(tr.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer:  # ZeRO-Offload needs DeepSpeed's CPU Adam, built from this section
        conf["optimizer"] = {"type": "AdamW", "params": {"lr": float(tr.lr), "weight_decay": float(tr.weight_decay)}}
    conf.update(OmegaConf.to_container(ds.extra, resolve=True))
    return conf


def injection_layers(irm_cfg, n_model_layers: int) -> list[int]:
    """Resolve ``irm.layers`` or ``irm.layer_set`` (not both) against the model's depth."""
    if irm_cfg.layers is not None and irm_cfg.layer_set is not None:
        raise ConfigError("set irm.layers or irm.layer_set, not both")
    if irm_cfg.layer_set is not None:
        return layer_set_layers(irm_cfg.layer_set, n_model_layers)
    return resolve_layers(n_model_layers, None if irm_cfg.layers is None else list(irm_cfg.layers))


def git_commit() -> str:
    """The repository's HEAD commit, or "" outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def check_out_dir(cfg: DictConfig, out_dir: Path) -> str:
    """Decide what to do with ``out_dir``: ``"fresh"``, ``"resume"`` or ``"done"``.

    Raises ``TrainError`` (nothing touched) if it holds a run with a different model, data, IRM,
    alignment, seed or batch shape, or files that are not an irm_hpc run.
    """
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return "fresh"
    saved = out_dir / "config.yaml"
    if not saved.is_file():
        raise TrainError(f"out_dir {out_dir} is not empty and holds no irm_hpc run (no config.yaml); choose another out_dir")
    old = OmegaConf.load(saved)
    for key in KEEP_CONFIG_KEYS:
        if OmegaConf.select(old, key) != OmegaConf.select(cfg, key):
            raise TrainError(f"out_dir {out_dir} holds a run with a different '{key}'; choose another out_dir or restore its config")
    return "done" if (out_dir / "DONE").is_file() else "resume"


TAG_PREFIX = "global_step"


def prune_checkpoints(ckpt_dir: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest DeepSpeed checkpoint tags (``global_stepNNNNNNNN`` dirs) in
    ``ckpt_dir``; the tag named by ``latest`` is always kept. DeepSpeed never removes old tags, and each
    holds the IRM's fp32 weights plus Adam moments (~16 bytes per IRM parameter: 0.6 GB for SmolLM2 over
    30 layers, ~32 GiB for Llama-2-7B over 32). Returns the removed tag dirs. Raises ``ValueError`` if
    ``keep`` < 1."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    tags = sorted(d for d in ckpt_dir.glob(f"{TAG_PREFIX}*") if d.is_dir() and d.name[len(TAG_PREFIX):].isdigit())
    latest = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").is_file() else None
    removed = [d for d in tags[:-keep] if d.name != latest]
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


class Trainer:
    """One IRM training run (see module docstring). Build with a resolved config, then ``run()``."""

    def __init__(self, cfg: DictConfig, dist: DistInfo):
        import deepspeed

        self.cfg, self.dist = cfg, dist
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        torch.manual_seed(cfg.seed)
        if cfg.train.keep_checkpoints < 0:
            raise TrainError(f"train.keep_checkpoints must be >= 0 (0 keeps every tag), got {cfg.train.keep_checkpoints}")
        threads = intra_op_threads(cfg.train.threads)
        if threads:
            torch.set_num_threads(threads)
        self.lm, self.tokenizer = load_model(cfg.model)
        self.device = next(self.lm.parameters()).device
        n_model_layers = len(decoder_layers(self.lm))
        self.layers = injection_layers(cfg.irm, n_model_layers)
        self.n_model_layers = n_model_layers
        self.hidden = self.lm.config.hidden_size
        self.data: AlignmentData = load_alignment(cfg.data, cfg.alignment, cfg.seed)
        ml = cfg.data.max_length
        self.train_ids = tokenize(self.tokenizer, self.data.train, ml)
        self.eval_sets = {"target": tokenize(self.tokenizer, self.data.eval_target, ml),
                          "other": tokenize(self.tokenizer, self.data.eval_other, ml)}
        self.sampler = ResumableSampler(len(self.train_ids), cfg.train.micro_batch_size, cfg.seed, dist.rank, dist.world_size)
        torch.manual_seed(cfg.seed)  # IRM init depends on the seed only
        irm = IRM(self.hidden, self.layers, cfg.irm.width_multiplier, cfg.irm.depth)
        use_bf16 = cfg.deepspeed.bf16 == "true" or (cfg.deepspeed.bf16 == "auto" and self.device.type == "cuda")
        irm.to(self.device)
        self.module = IRMLoss(irm, self.lm)
        ds_conf = deepspeed_config(cfg, use_bf16)
        optimizer = None
        if "optimizer" not in ds_conf:
            optimizer = torch.optim.AdamW(irm.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.module, model_parameters=list(irm.parameters()), optimizer=optimizer, config=ds_conf,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train)),
        )
        self.recorder = None
        self.base_eval: dict[str, float] = {}
        self.last_loss: Optional[float] = None
        self.guard = PreemptionGuard()

    # ----------------------------------------------------------------- helpers
    def _batch(self, seqs: list[list[int]]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in collate(seqs, self.tokenizer.pad_token_id).items()}

    def _next_batch(self) -> dict[str, torch.Tensor]:
        return self._batch([self.train_ids[i] for i in self.sampler.next_batch()])

    @torch.no_grad()
    def eval_loss(self, name: str, enabled: bool) -> float:
        """Mean token loss (nats) on eval set ``name`` with the IRM on or off (same on every rank)."""
        total, count = 0.0, 0
        limit = self.cfg.train.eval_batches
        for i, chunk in enumerate(batches(self.eval_sets[name], self.cfg.train.micro_batch_size)):
            if i >= limit:
                break
            b = self._batch(chunk)
            n = int((b["labels"][:, 1:] != -100).sum())
            with inject(self.lm, self.engine.module.irm, enabled=enabled, keep_injections=False):
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

    def log_metrics(self, rec: dict) -> None:
        if self.dist.is_main:
            with open(self.out_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop metrics after ``step`` (resume): the log then holds each step once."""
        path = self.out_dir / "metrics.jsonl"
        if self.dist.is_main and path.is_file():
            keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, path)

    # ----------------------------------------------------------------- recording
    def open_recorder(self, start_step: int) -> None:
        if not (self.cfg.record.enabled and self.dist.is_main):
            return
        from irm_hpc.record import RunRecorder

        meta = {
            "model_name": self.cfg.model.name, "hidden_size": self.hidden, "n_layers": self.n_model_layers,
            "injection_layers": self.layers, "alignment": self.cfg.alignment, "seed": int(self.cfg.seed),
            "config_yaml": to_yaml(self.cfg), "package_version": __version__, "git_commit": git_commit(),
            "world_size": self.dist.world_size, "nodes": os.environ.get("SLURM_JOB_NODELIST", os.uname().nodename),
        }
        rc = self.cfg.record
        self.recorder = RunRecorder(self.out_dir / "record", meta, n_inj=len(self.layers), hidden=self.hidden,
                                    dtype=rc.dtype, compression=rc.compression, queue_size=rc.queue_size)
        self.recorder.resume(start_step if start_step > 0 else -1)

    def record_profile(self, step: int, injection: torch.Tensor, mask: torch.Tensor) -> None:
        """Hand mean |v| and mean v over non-padding tokens, (n_inj, hidden) each, to the writer."""
        if self.recorder is None:
            return
        with torch.no_grad():
            v = injection.detach().float()
            m = mask.to(v.dtype)[..., None, None]
            n = m.sum().clamp(min=1)
            mean_abs = (v.abs() * m).sum((0, 1)) / n
            mean = (v * m).sum((0, 1)) / n
        self.recorder.add_profile(step, mean_abs.cpu(), mean.cpu(), int(mask.sum()))

    def probe_prompts(self) -> list[str]:
        return list(self.cfg.record.prompts) or DEFAULT_PROMPTS

    @torch.no_grad()
    def run_probe(self, step: int) -> None:
        """Greedy-generate on each probe prompt and record every token's injection (all ranks compute)."""
        if not self.cfg.record.enabled:
            return
        irm = self.engine.module.irm
        for p_idx, prompt in enumerate(self.probe_prompts()):
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
    def record_base_reference(self) -> None:
        """Frozen model's mean |residual| after each layer's attention on the probe prompts (IRM off)."""
        if self.recorder is None:
            return
        with capture_residuals(self.lm) as stats:
            for prompt in self.probe_prompts():
                self.lm(**self.tokenizer(prompt, return_tensors="pt").to(self.device), use_cache=False)
        self.recorder.set_prompts(self.probe_prompts())
        self.recorder.set_base_reference((stats["sum_abs"] / max(stats["count"], 1)).float())

    # ----------------------------------------------------------------- checkpoints
    def save(self, step: int) -> None:
        """Make records durable, then write DeepSpeed checkpoint tag ``global_step{step:08d}``."""
        if self.recorder is not None:
            self.recorder.checkpoint(step)
        state = {"step": step, "sampler": self.sampler.state_dict(), "torch_rng": torch.get_rng_state()}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=f"{TAG_PREFIX}{step:08d}", client_state=state)
        keep = int(self.cfg.train.keep_checkpoints)
        if keep:
            if self.dist.world_size > 1:
                torch.distributed.barrier()  # every rank's shards of the new tag are written
            if self.dist.is_main:
                prune_checkpoints(self.ckpt_dir, keep)

    def load(self) -> int:
        """Load the latest checkpoint tag if any; return the step to continue from (0 if none)."""
        if not (self.ckpt_dir / "latest").is_file():
            return 0
        path, state = self.engine.load_checkpoint(str(self.ckpt_dir))
        if path is None:
            raise TrainError(f"cannot load the latest checkpoint in {self.ckpt_dir}; remove the bad tag or the 'latest' file")
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        return int(state["step"])

    def export_weights(self) -> dict[str, torch.Tensor]:
        """Full IRM weights on CPU (gathered from ZeRO-3 partitions), fp32."""
        import deepspeed

        irm = self.engine.module.irm
        with deepspeed.zero.GatheredParameters(list(irm.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in irm.state_dict().items()}

    # ----------------------------------------------------------------- main loop
    def run(self) -> dict:
        """Train to ``train.max_steps`` (resuming if a checkpoint exists); return the final summary."""
        tr = self.cfg.train
        step = self.load()
        if step:
            log0("resuming from checkpoint step %d", step)
        self.truncate_metrics(step)
        self.open_recorder(step)
        self.guard.install()
        try:
            if step == 0:
                self.record_base_reference()
                self.run_probe(0)
            self._loop(step)
            self._final_profile()
            final = self.evaluate()
            self.run_probe(tr.max_steps)
            self.save(tr.max_steps)
            return self._finish(final)
        finally:
            if self.recorder is not None:
                self.recorder.close()

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
                self.log_metrics(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}")
            saved = tr.checkpoint_every and step % tr.checkpoint_every == 0 and step < tr.max_steps
            if saved:
                self.save(step)
            if self.guard.requested(self.dist.world_size):
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
            batch = self._next_batch()
            loss = self.engine(**batch)
            if micro == 0 and step % self.cfg.record.every_steps == 0:
                self.record_profile(step, self.engine.module.last_injection, batch["attention_mask"])
            self.engine.backward(loss)
            self.engine.step()
            losses.append(float(loss.detach()))
            tokens += int(batch["attention_mask"].sum()) * self.dist.world_size
        step_time = time.perf_counter() - t0
        rec = {"step": step + 1, "loss": sum(losses) / len(losses), "lr": self.scheduler.get_last_lr()[0],
               "tokens_per_s": tokens / step_time, "step_time_s": step_time, "time": time.time(),
               "max_steps": self.cfg.train.max_steps}
        self.last_loss = rec["loss"]
        return rec

    def _final_profile(self) -> None:
        """Profile record at ``max_steps`` on the next batch, without moving the sampler."""
        if self.recorder is None or self.cfg.train.max_steps % self.cfg.record.every_steps:
            return
        state = self.sampler.state_dict()
        batch = self._next_batch()
        self.sampler.load_state_dict(state)
        with torch.no_grad():
            self.engine.module(**batch)
        self.record_profile(self.cfg.train.max_steps, self.engine.module.last_injection, batch["attention_mask"])

    def _finish(self, final_eval: dict) -> dict:
        summary = {"step": self.cfg.train.max_steps, "max_steps": self.cfg.train.max_steps,
                   "loss": self.last_loss, "world_size": self.dist.world_size, **final_eval}
        self.log_metrics(summary)
        weights = self.export_weights()
        if self.dist.is_main:
            from safetensors.torch import save_file

            save_file(weights, str(self.out_dir / "irm.safetensors"),
                      metadata={"injection_layers": json.dumps(self.layers), "hidden_size": str(self.hidden)})
            if self.recorder is not None:
                self.recorder.finalize(self.out_dir / "injections.h5")
            (self.out_dir / "DONE").write_text(json.dumps(summary) + "\n")
        return summary


def train_main(cfg: DictConfig) -> dict:
    """Run one training task for a composed config (library entry; used by launch/submitit).

    Returns the final summary dict (step, eval losses, alignment_gain), or the saved one when
    ``out_dir`` already holds a finished run. Raises ``ConfigError``, ``DataError``, ``ModelLoadError``,
    ``TrainError`` for bad input before anything in ``out_dir`` is written.
    """
    require(cfg, "out_dir", "alignment")
    out_dir = Path(cfg.out_dir)
    mode = check_out_dir(cfg, out_dir)
    if mode == "done":
        return json.loads((out_dir / "DONE").read_text())
    dist = init_distributed()
    setup_logging(dist.rank)
    trainer = Trainer(cfg, dist)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))
    torch.distributed.barrier()
    log0("training IRM: model=%s alignment=%s seed=%d layers=%d..%d (%d) zero=%d world=%d train_texts=%d",
         cfg.model.name, cfg.alignment, cfg.seed, trainer.layers[0], trainer.layers[-1], len(trainer.layers),
         cfg.deepspeed.zero_stage, dist.world_size, len(trainer.train_ids))
    summary = trainer.run()
    log0("done: step=%d alignment_gain=%.4f eval_target_loss=%.4f", summary["step"], summary["alignment_gain"],
         summary["eval_target_loss"])
    return summary


BAD_INPUT = (ConfigError, DataError, ModelLoadError, TrainError, ValueError)


def main(argv: Optional[list[str]] = None) -> int:
    """CLI: ``python -m irm_hpc.train [key=value ...]``; one-line error and exit 2 on bad input."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = load_config("train", argv)
        train_main(cfg)
    except BAD_INPUT as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

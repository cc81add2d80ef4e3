"""The DeepSpeed engine of a run: JSON config, optimizer, LR schedule, and the module it wraps.

Only the IRM's parameters are in the engine (ZeRO stage 0-3, optional CPU offload); the frozen LM is
borrowed, not owned, so ZeRO partitions, checkpoints and optimizer state hold IRM parameters only.
Source: DeepSpeed's config reference (``zero_optimization``, ``bf16``, ``offload_optimizer``).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from irm_hpc.errors import ConfigError
from irm_hpc.inject import inject
from irm_hpc.irm import IRM

SCHEDULES = ("constant", "linear", "cosine")


class IRMLoss(nn.Module):
    """The module DeepSpeed wraps: owns the IRM, borrows the frozen LM (not a sub-module).

    ``forward(input_ids, attention_mask, labels)`` (each ``(batch, seq)``) runs the LM with the IRM
    injected and returns the mean LM loss (nats/token) over non-padding next-token targets (HF's
    internal label shift; padding labels are -100). ``last_injection``: ``(batch, seq, n_inj, hidden)``.
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


def init_irm(hidden_size: int, layers: list[int], irm_cfg, seed: int) -> IRM:
    """The IRM of a run before training: torch seeded with the run's ``seed`` right before it is built, so
    its initial weights depend on the seed and ``irm`` config only (not on model or data loading)."""
    torch.manual_seed(seed)
    return IRM(hidden_size, layers, irm_cfg.width_multiplier, irm_cfg.depth)


def lr_lambda(cfg_train) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step ``s``: linear warmup, then constant/linear/cosine decay.

    Raises ``ConfigError`` for an unknown ``train.schedule``.
    """
    warm, total, kind = cfg_train.warmup_steps, max(cfg_train.max_steps, 1), cfg_train.schedule
    if kind not in SCHEDULES:
        raise ConfigError(f"train.schedule '{kind}' is not one of {', '.join(SCHEDULES)}")

    def fn(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        frac = min(1.0, (step - warm) / max(1, total - warm))
        return {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[kind]

    return fn


def deepspeed_config(cfg: DictConfig, use_bf16: bool) -> dict:
    """The DeepSpeed JSON config for ``cfg.deepspeed`` and ``cfg.train`` (DeepSpeed config reference).

    Raises ``ConfigError`` for a ZeRO stage outside 0-3 or parameter offload below stage 3.
    """
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


def use_bf16(cfg: DictConfig, device: torch.device) -> bool:
    """``deepspeed.bf16``: ``true``, ``false``, or ``auto`` (on with CUDA, off on CPU)."""
    return cfg.deepspeed.bf16 == "true" or (cfg.deepspeed.bf16 == "auto" and device.type == "cuda")


def build_engine(cfg: DictConfig, module: IRMLoss, device: torch.device):
    """``deepspeed.initialize`` over ``module.irm``'s parameters: AdamW (client optimizer, or DeepSpeed's
    CPU AdamW with ``offload_optimizer``) and a ``LambdaLR`` (:func:`lr_lambda`) that DeepSpeed steps and
    checkpoints. Returns ``(engine, lr_scheduler)``."""
    import deepspeed

    irm = module.irm
    ds_conf = deepspeed_config(cfg, use_bf16(cfg, device))
    optimizer = None
    if "optimizer" not in ds_conf:
        optimizer = torch.optim.AdamW(irm.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    engine, _, _, scheduler = deepspeed.initialize(
        model=module, model_parameters=list(irm.parameters()), optimizer=optimizer, config=ds_conf,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train)),
    )
    return engine, scheduler

"""The DeepSpeed engine of a run: JSON config, optimizer, LR schedule, and the module it wraps.

Only the IRM's parameters are in the engine (ZeRO stage 0-3, optional CPU offload); the frozen LM is
borrowed, not owned, so ZeRO partitions, checkpoints and optimizer state hold IRM parameters only.
Source: DeepSpeed's config reference (``zero_optimization``, ``bf16``, ``offload_optimizer``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Callable, Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from irm_hpc.errors import ConfigError
from irm_hpc.inject import decoder_layers, inject
from irm_hpc.irm import IRM

SCHEDULES = ("constant", "linear", "cosine")


class IRMLoss(nn.Module):
    """The module DeepSpeed wraps: owns the IRM, borrows the frozen LM (not a sub-module).

    ``forward(input_ids, attention_mask, labels)`` (each ``(batch, seq)``) runs the LM with the IRM
    injected and returns the mean LM loss (nats/token) over non-padding next-token targets (HF's
    internal label shift; padding labels are -100). ``last_injection``: ``(batch, seq, n_inj, hidden)``.

    ``activation_checkpointing`` (``train.activation_checkpointing``): the frozen model's decoder layers
    keep only their inputs in the forward and are recomputed in the backward (HF
    ``activation_checkpointing_enable``, non-reentrant ``torch.utils.checkpoint``). The recompute runs
    the injection hooks again, so they must still be installed during the backward: layers checkpoint
    only inside :meth:`micro_step`, which keeps the hooks from the forward to the end of the backward.
    A forward outside it (eval, no_grad) runs the plain layers. Loss and gradients are those of the
    plain forward (tested).
    """

    def __init__(self, irm: IRM, lm: nn.Module, activation_checkpointing: bool = False):
        super().__init__()
        self.irm = irm
        object.__setattr__(self, "lm", lm)  # keep base weights out of the engine and its checkpoints
        self.last_injection: Optional[torch.Tensor] = None
        self.activation_checkpointing = activation_checkpointing
        self._injector = None
        if activation_checkpointing:
            enable_activation_checkpointing(lm)

    @contextmanager
    def micro_step(self) -> Iterator[None]:
        """Hold the injection hooks (and, with activation checkpointing, the layers' checkpoint flags) for
        one forward AND its backward: ``with module.micro_step(): loss = engine(**b); engine.backward(loss)``."""
        with inject(self.lm, self.irm) as state, checkpointed_layers(self.lm, self.activation_checkpointing):
            self._injector = state
            try:
                yield
            finally:
                self._injector = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self._injector is not None:
            return self._loss(self._injector, input_ids, attention_mask, labels)
        with inject(self.lm, self.irm) as state:  # a forward on its own: hooks for this call only
            return self._loss(state, input_ids, attention_mask, labels)

    def _loss(self, state, input_ids, attention_mask, labels) -> torch.Tensor:
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
        self.last_injection = state.last_injection
        return out.loss


def enable_activation_checkpointing(lm: nn.Module) -> None:
    """Install HF's activation checkpointing on the frozen ``lm`` (non-reentrant ``torch.utils.checkpoint``).

    Non-reentrant, because the IRM's output is computed inside layer 0 and used by every later layer:
    the reentrant variant runs the forward under ``no_grad`` and would cut those gradients. HF also makes
    the input embeddings require grad (for PEFT); that is undone, since the frozen model needs no input
    gradient and it would extend the backward to the layers before the first injection layer. The layers
    only checkpoint inside :func:`checkpointed_layers` (HF checkpoints a layer only while its ``training``
    flag is set; the model itself stays in eval mode, so KV-cached generation and eval are unchanged).
    Source: transformers ``PreTrainedModel.activation_checkpointing_enable`` (``gradient_checkpointing_enable``
    before transformers 5).
    Raises ``ConfigError`` for a model without HF activation checkpointing support.
    """
    kwargs = {"use_reentrant": False}
    try:
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers < 5
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    except ValueError as exc:
        raise ConfigError(f"train.activation_checkpointing: {exc}; set train.activation_checkpointing=false") from None
    if hasattr(lm, "disable_input_require_grads"):
        lm.disable_input_require_grads()


@contextmanager
def checkpointed_layers(lm: nn.Module, on: bool) -> Iterator[None]:
    """While ``on``: set the ``training`` flag of the decoder layer modules only (not of their children),
    which is what makes HF's ``GradientCheckpointingLayer`` checkpoint them. Dropout and attention
    modules keep ``training=False``, so the frozen model computes exactly its eval-mode function.
    The flags are restored in ``finally``."""
    if not on:
        yield
        return
    layers = list(decoder_layers(lm))
    before = [layer.training for layer in layers]
    try:
        for layer in layers:
            layer.training = True
        yield
    finally:
        for layer, flag in zip(layers, before):
            layer.training = flag


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
    """``deepspeed.bf16``: ``true``, ``false``, or ``auto`` (on with CUDA, off on CPU).

    On, DeepSpeed trains the IRM in bf16 (weights, activations, gradients) and keeps fp32 master weights
    and Adam state in its optimizer (ZeRO 1-3: ``DeepSpeedZeroOptimizer`` / ``_Stage3``; ZeRO 0:
    ``FP16_UnfusedOptimizer``'s fp32 copies; see ``irm_hpc.perf.memory_estimate``). Hydra turns
    ``deepspeed.bf16=true`` into the string ``'True'``, so the value is compared case-insensitively; the
    allowed values are checked once, by ``config.validate_train_config``.
    """
    value = str(cfg.deepspeed.bf16).lower()
    return value == "true" or (value == "auto" and device.type == "cuda")


def build_engine(cfg: DictConfig, module: IRMLoss, device: torch.device):
    """``deepspeed.initialize`` over ``module.irm``'s parameters: AdamW (client optimizer, or DeepSpeed's
    CPU AdamW with ``offload_optimizer``) and a ``LambdaLR`` (:func:`lr_lambda`) that DeepSpeed steps and
    checkpoints. On CUDA the engine uses ``device`` (``models.default_device``), not DeepSpeed's default
    of ``cuda:<LOCAL_RANK>``. Returns ``(engine, lr_scheduler)``."""
    import deepspeed

    irm = module.irm
    ds_conf = deepspeed_config(cfg, use_bf16(cfg, device))
    optimizer = None
    if "optimizer" not in ds_conf:
        optimizer = torch.optim.AdamW(irm.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    # DeepSpeed would select device LOCAL_RANK; where Slurm binds one GPU per rank, that is device 0
    args = SimpleNamespace(device_rank=device.index) if device.type == "cuda" else None
    engine, _, _, scheduler = deepspeed.initialize(
        args=args, model=module, model_parameters=list(irm.parameters()), optimizer=optimizer, config=ds_conf,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train)),
    )
    return engine, scheduler

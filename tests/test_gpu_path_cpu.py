"""The pieces of the GPU path, checked on CPU (issue #16 part 1): bf16 with fp32 master weights, SDPA,
activation checkpointing, and the per-rank CUDA device choice. CI has no GPU; these run everywhere."""

from __future__ import annotations

import pytest
import torch

from conftest import DIST_VARS
from irm_hpc.components.engine import IRMLoss, build_engine, init_irm, use_bf16
from irm_hpc.config import ConfigError, load_config
from irm_hpc.dist import init_distributed
from irm_hpc.inject import inject
from irm_hpc.models import cuda_device_index, load_model


@pytest.fixture(scope="module")
def process_group():
    """A one-rank process group for DeepSpeed in this process. The environment variables it sets are
    restored afterwards: later tests launch Slurm jobs from this process, which inherit its environment,
    and a leaked MASTER_PORT (bound by this process's store) would make their rendezvous fail. The group
    itself stays (DeepSpeed caches its groups; a re-initialised one would not match them)."""
    import os

    saved = {k: os.environ.get(k) for k in DIST_VARS}
    init_distributed()
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _cfg(*extra: str):
    return load_config("train", ["model=tiny_random", "out_dir=/tmp/unused", *extra])


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _irm(cfg):
    irm = init_irm(32, [0, 1, 2, 3], cfg.irm, 0)
    torch.nn.init.normal_(irm.net[-1].weight, std=0.05)  # the output layer starts at zero: give it signal
    return irm


def _loss_grads(lm, cfg, ac: bool):
    """Loss, IRM gradients and the bytes autograd saved OUTSIDE checkpointed regions, for one micro-step."""
    module = IRMLoss(_irm(cfg), lm, activation_checkpointing=ac)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    ids, mask, labels = _batch()
    with module.micro_step():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = module(ids, mask, labels)
        loss.backward()
    return loss.item(), [p.grad.clone() for p in module.irm.parameters()], sum(saved)


def test_activation_checkpointing_gives_the_same_gradients_with_fewer_saved_activations():
    cfg = _cfg()
    lm, _ = load_model(cfg.model)
    loss0, grads0, saved0 = _loss_grads(lm, cfg, ac=False)
    lm_ac, _ = load_model(cfg.model)  # a fresh copy (same seeded random weights): enabling AC modifies the model
    loss1, grads1, saved1 = _loss_grads(lm_ac, cfg, ac=True)
    assert loss0 == loss1
    assert max(g.abs().max().item() for g in grads0) > 0, "no gradient reached the IRM: the check proves nothing"
    for a, b in zip(grads0, grads1):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # the checkpointed decoder layers keep only their inputs: autograd saved far less outside them
    assert saved1 < saved0 / 3, (saved0, saved1)
    # outside a micro-step the layers are plain again: eval mode, and KV-cached generation works as before
    assert not any(layer.training for layer in lm_ac.model.layers) and not lm_ac.training
    ids = torch.tensor([[5, 6, 7, 8]])
    with inject(lm, _irm(cfg)), torch.no_grad():
        ref = lm.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=256)
    with inject(lm_ac, _irm(cfg)), torch.no_grad():
        out = lm_ac.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=256)
    assert out.tolist() == ref.tolist()


def test_sdpa_is_the_default_attention_and_matches_eager():
    cfg = _cfg()
    assert cfg.model.attn_implementation == "sdpa"
    lm, _ = load_model(cfg.model)
    assert lm.config._attn_implementation == "sdpa"
    eager, _ = load_model(_cfg("model.attn_implementation=eager").model)
    assert eager.config._attn_implementation == "eager"
    ids, mask, labels = _batch()
    with torch.no_grad():
        a = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
        b = eager(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(a.item() - b.item()) < 1e-5


def test_bf16_setting_is_parsed_and_checked():
    cpu = torch.device("cpu")
    assert use_bf16(_cfg("deepspeed.bf16=true"), cpu)  # hydra makes this the string 'True'
    assert not use_bf16(_cfg("deepspeed.bf16=false"), cpu) and not use_bf16(_cfg(), cpu)
    assert use_bf16(_cfg(), torch.device("cuda", 0))  # auto: on with CUDA
    with pytest.raises(ConfigError, match="deepspeed.bf16 must be one of auto, true, false"):
        _cfg("deepspeed.bf16=maybe")


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_bf16_trains_the_irm_in_bf16_with_fp32_master_weights(stage, process_group):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    cfg = _cfg("deepspeed.bf16=true", "model.dtype=bfloat16", f"deepspeed.zero_stage={stage}", "train.lr=1e-2")
    lm, _ = load_model(cfg.model)
    assert next(lm.parameters()).dtype == torch.bfloat16
    engine, _ = build_engine(cfg, IRMLoss(_irm(cfg), lm), torch.device("cpu"))
    assert engine.bfloat16_enabled()
    ids, mask, labels = _batch()
    for _ in range(3):
        with engine.module.micro_step():
            loss = engine(input_ids=ids, attention_mask=mask, labels=labels)
            engine.backward(loss)
        engine.step()
    param = next(engine.module.irm.parameters())
    assert param.dtype == torch.bfloat16
    if stage == 0:  # DeepSpeed's FP16_UnfusedOptimizer (bf16 without ZeRO) keeps fp32 copies in fp32_groups
        master = engine.optimizer.fp32_groups[0][0]
    else:
        master = safe_get_full_fp32_param(param)
    with deepspeed.zero.GatheredParameters([param]):
        weight = param.detach().float().clone()
    assert master.dtype == torch.float32 and master.shape == weight.shape
    assert torch.equal(master.to(torch.bfloat16).float(), weight), "the bf16 weights are the rounded master weights"
    assert (master - weight).abs().max() > 0, "the master weights hold more precision than bf16"


@pytest.mark.parametrize("local_rank, n_visible, expected", [(0, 4, 0), (3, 4, 3), (1, 1, 0), (3, 1, 0)])
def test_cuda_device_of_a_rank(local_rank, n_visible, expected):
    assert cuda_device_index(local_rank, n_visible) == expected


def test_cuda_device_of_a_rank_beyond_the_visible_gpus_is_a_config_error():
    with pytest.raises(ConfigError, match="LOCAL_RANK 2 but only 2 GPUs"):
        cuda_device_index(2, 2)
    with pytest.raises(ConfigError, match="no CUDA device visible"):
        cuda_device_index(0, 0)

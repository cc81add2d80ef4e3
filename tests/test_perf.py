"""The FLOP / memory model (irm_hpc.perf), the memory plan and bench_gpu.py's CPU self-test mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from irm_hpc.errors import ConfigError
from irm_hpc.inject import layer_set_layers
from irm_hpc.perf import (
    SHAPES,
    ModelShape,
    irm_params,
    layer_activation_bytes,
    memory_estimate,
    mfu,
    peak_flops,
    train_flops_per_token,
)

REPO = Path(__file__).resolve().parent.parent
L7 = SHAPES["llama2_7b"]


def test_parameter_counts():
    assert L7.n_params == 6_738_415_616
    assert SHAPES["smollm2_135m"].n_params == 134_515_008
    assert SHAPES["llama_1b"].n_params == 1_100_048_384  # TinyLlama-1.1B
    w = 3 * 4096
    assert irm_params(4096, 32) == 4096 * w + w + 3 * (w * w + w) + w * 4096 * 32 + 4096 * 32 == 2_114_109_440


def test_parameter_count_matches_torch_modules():
    from transformers import LlamaConfig

    from irm_hpc.irm import IRM

    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=3, intermediate_size=96, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)
    shape = ModelShape.from_hf_config(cfg)
    assert (shape.kv_dim, shape.tied_embeddings) == (32, False)
    irm = IRM(64, [0, 2], width_multiplier=2, depth=1)
    assert irm_params(64, 2, 2, 1) == sum(p.numel() for p in irm.parameters())


def test_flops_structure():
    all_, q1, q4 = (train_flops_per_token(L7, layer_set_layers(s, 32), 64) for s in ("all", "q1", "q4"))
    n = L7.n_params
    # all: 2N forward + 2N backward (minus layer 0's attention and the embedding table) + 6 N_irm
    assert all_["base_forward"] == 2 * (n - L7.vocab * 4096 - 32 * 2 * 4096 - 4096)
    assert all_["irm"] == 6 * irm_params(4096, 32)
    assert all_["base_backward"] == all_["base_forward"] - 2 * L7.attn_matmul_params
    assert all_["total"] == pytest.approx(4 * n + 6 * all_["irm_params"], rel=0.02)
    assert q1["base_backward"] == all_["base_backward"] and q1["attn_backward"] == all_["attn_backward"]
    assert q4["base_backward"] < q1["base_backward"] and q4["total"] < q1["total"] < all_["total"]
    # attention terms scale with the causal context (seq+1)/2
    long = train_flops_per_token(L7, range(32), 511)
    assert long["attn_forward"] == pytest.approx(8 * all_["attn_forward"] * 256 / 260, rel=1e-9)
    assert all_["attn_forward"] == 4 * 32 * 4096 * 32.5 and all_["attn_backward"] == 8 * 31 * 4096 * 32.5
    full = train_flops_per_token(L7, range(32), 64, causal=False)
    assert full["attn_forward"] == 4 * 32 * 4096 * 64
    with pytest.raises(ConfigError):
        train_flops_per_token(L7, [32], 64)


def test_peak_and_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert peak_flops("NVIDIA H200") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB") == pytest.approx(312e12)
    assert peak_flops("NVIDIA H100 NVL") is None and peak_flops("cpu") is None
    assert mfu(1e9, 100_000, 1e15) == pytest.approx(0.1) and mfu(1e9, 1, None) is None


def test_memory_hand_computed():
    # tiny hand example: h=64, n=1, width 1, depth 0 -> IRM 64*64+64 + 64*64+64 = 8320 params
    s = ModelShape(64, 2, 128, 4, 4, 100, tied_embeddings=True)
    p = irm_params(64, 1, 1, 0)
    assert p == 8320
    m = memory_estimate(s, 1, 0, 1, micro_batch=2, seq_len=8, width_multiplier=1, depth=0)
    assert m["base_weights"] == 2 * s.n_params
    assert (m["irm_weights"], m["gradients"], m["optimizer_states"], m["step_transient"]) == (2 * p, 2 * p, 12 * p, 4 * p)
    tokens = 16
    assert layer_activation_bytes(s) == 16 * 64 + 6 * 128 + 16
    assert m["activations"] == tokens * (layer_activation_bytes(s) + 4 * 64 + 6 * 128)  # layer 1 + layer 0's MLP
    assert m["logits"] == tokens * (4 * 64 + 8 * 100)
    assert m["irm_activations"] == tokens * (2 * 64 + 2 * 64 + 2 * 64)
    fwd = m["activations"] + m["logits"] + m["irm_activations"] + m["backward_transient"]
    assert m["total"] == pytest.approx(2 * s.n_params + 16 * p + max(fwd, 4 * p))
    z2 = memory_estimate(s, 1, 2, 4, micro_batch=2, seq_len=8, width_multiplier=1, depth=0)
    assert z2["zero_buffers"] == 1e9 and z2["gradients"] == 2 * p / 4 and z2["optimizer_states"] == 12 * p / 4


def test_memory_monotone():
    def total(stage, n, **kw):
        return memory_estimate(L7, 32, stage, n, micro_batch=8, seq_len=64, **kw)["total"]

    for n in (1, 2, 4):
        assert total(0, n) > total(1, n) or n == 1
    for stage in (1, 2, 3):
        assert total(stage, 1) > total(stage, 2) > total(stage, 4)
    for n in (2, 4, 8):
        assert total(2, n) < total(1, n) < total(0, n)
        states = [sum(memory_estimate(L7, 32, z, n)[k] for k in ("irm_weights", "gradients", "optimizer_states"))
                  for z in (0, 1, 2, 3)]
        assert states[0] > states[1] > states[2] > states[3]  # ZeRO-3's extra buffers can outweigh this
    assert total(3, 4, offload_optimizer=True, offload_param=True) < total(3, 4, offload_optimizer=True) < total(3, 4)
    seq = [memory_estimate(L7, 32, 2, 1, seq_len=s)["activations"] for s in (64, 128, 512)]
    assert seq[0] < seq[1] < seq[2]
    ac = memory_estimate(L7, 32, 2, 1, seq_len=512, activation_checkpointing=True)
    assert ac["activations"] < memory_estimate(L7, 32, 2, 1, seq_len=512)["activations"] / 10
    q4 = memory_estimate(L7, 8, 2, 1, seq_len=512, first_layer=24)
    assert q4["activations"] < memory_estimate(L7, 8, 2, 1, seq_len=512)["activations"]
    with pytest.raises(ConfigError):
        memory_estimate(L7, 32, 0, 1, offload_optimizer=True)
    with pytest.raises(ConfigError):
        memory_estimate(L7, 32, 2, 1, offload_param=True)


def test_memory_plan_rows():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from memory_plan import markdown, plan

    res = plan(80e9, 0.1, 8)
    assert res["budget_bytes"] == pytest.approx(72e9)
    assert len(res["rows"]) == 2 * 2 * 8 * 3  # layer sets x seqs x (stage, offload) x GPU counts
    assert all(r["fits"] == (r["total"] <= 72e9) for r in res["rows"])
    assert "| all | 512 | 3 | none |" in markdown(res)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_bench_gpu_cpu_mode(tmp_path, checkpointing):
    out = tmp_path / "bench.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--shapes",
                           "tiny", "--steps", "2", "--warmup", "1", "--zero-stages", "0,2", "--out", str(out),
                           *(["--activation-checkpointing"] if checkpointing else [])],
                          check=False, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["peak_flops"] is None and res["deepspeed"]
    assert len(res["rows"]) == 4
    for row in res["rows"]:
        assert row["status"] == "ok" and row["tokens_per_s"] > 0 and row["step_time_s"] > 0
        assert "peak_mem_gib" in row and row["mfu"] is None
        assert row["activation_checkpointing_active"] is checkpointing
        shape = ModelShape(**row["model_shape"])
        expect = train_flops_per_token(shape, layer_set_layers(row["layer_set"], shape.n_layers), row["seq_len"])
        assert row["flops_per_token"] == expect["total"]
        assert row["n_irm_params"] == expect["irm_params"]


def test_bench_gpu_shape_overrides():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_gpu import model_overrides

    from irm_hpc.config import load_config

    cfg = load_config("train", model_overrides("llama2_7b", 512) + ["out_dir=/tmp/x"])
    from transformers import AutoConfig

    hf = AutoConfig.for_model(cfg.model.arch, **dict(cfg.model.arch_config))
    assert ModelShape.from_hf_config(hf) == L7

"""IRM training throughput, memory and MFU on randomly initialised Llama-architecture models (GPU).

    python benchmarks/bench_gpu.py [--shapes smollm2_135m,llama_1b,llama2_7b] [--layer-sets all,q1]
        [--zero-stages 0,2,3] [--micro-batch 8] [--seq 64] [--steps 10] [--warmup 3]
        [--activation-checkpointing] [--profile] [--out benchmarks/results/bench_gpu.json]
    python benchmarks/bench_gpu.py --device cpu --shapes tiny --steps 2 --out /tmp/b.json   # self-test

Per row (shape x layer set x ZeRO stage): the frozen model (``irm_hpc.models.load_model`` with
``random_init``, bf16, SDPA, built on the GPU) and a fresh paper IRM (width x3, depth 3) in a DeepSpeed
engine (``build_engine``: bf16 weights, fp32 master weights and AdamW state), random tokens, no padding.
Timed: ``engine(...)`` + ``engine.backward`` + ``engine.step`` with ``torch.cuda.synchronize()``,
``--warmup`` steps untimed, median of ``--steps``. ``flops_per_token`` is ``irm_hpc.perf.train_flops_per_token``
(model FLOPs, causal attention); ``mfu`` is against the device's dense bf16 peak (``irm_hpc.perf.peak_flops``),
null when unknown or on CPU. ``peak_mem_gib``: ``torch.cuda.max_memory_allocated`` (reset per row; null on
CPU). A row that runs out of GPU memory is recorded as ``"oom"`` and the grid goes on. ``--profile``
writes the top-20 ops of a few profiled steps of the first configuration to ``bench_gpu_profile.txt``.
On CPU: fp32 model and engine (``model.dtype=float32 deepspeed.bf16=false``).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from irm_hpc.components.engine import IRMLoss, build_engine, init_irm
from irm_hpc.config import load_config
from irm_hpc.dist import init_distributed
from irm_hpc.inject import layer_set_layers
from irm_hpc.models import default_device, load_model
from irm_hpc.perf import (
    SHAPES,
    ModelShape,
    irm_params,
    mfu,
    peak_flops,
    peak_key,
    train_flops_per_token,
)

RESULTS = Path(__file__).resolve().parent / "results" / "bench_gpu.json"


def model_overrides(name: str, seq: int) -> list[str]:
    """Config overrides building a random Llama of shape ``name`` (``tiny``: the tiny_random preset as is)."""
    base = ["model=tiny_random", f"model.name=random_{name}"]
    if name == "tiny":
        return base
    s = SHAPES[name]
    sizes = {"hidden_size": s.hidden, "num_hidden_layers": s.n_layers, "intermediate_size": s.intermediate,
             "num_attention_heads": s.n_heads, "num_key_value_heads": s.n_kv_heads, "vocab_size": s.vocab,
             "max_position_embeddings": max(seq, 2048), "tie_word_embeddings": s.tied_embeddings}
    out = base + [f"model.arch_config.{k}={v}" for k, v in sizes.items() if k != "tie_word_embeddings"]
    # tiny_random's arch_config has no tie_word_embeddings key: added with "+"
    return out + [f"+model.arch_config.tie_word_embeddings={str(s.tied_embeddings).lower()}"]


def make_cfg(args, shape_name: str, layer_set: str, stage: int):
    on_gpu = args.device == "cuda"
    overrides = model_overrides(shape_name, args.seq) + [
        "out_dir=/tmp/irm_bench_gpu", f"irm.layer_set={layer_set}", f"deepspeed.zero_stage={stage}",
        f"train.micro_batch_size={args.micro_batch}", "train.grad_accum_steps=1",
        f"train.activation_checkpointing={str(args.activation_checkpointing).lower()}",
        # "auto" = bf16 with CUDA; "false" on CPU (fp32 engine, fp32 model)
        f"deepspeed.bf16={'auto' if on_gpu else 'false'}", f"model.dtype={'bfloat16' if on_gpu else 'float32'}",
        "model.attn_implementation=sdpa",
    ]
    return load_config("train", overrides)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_row(args, cfg, lm, shape: ModelShape, layers: list[int], device: torch.device, world: int,
            peak: float | None, profile_path: Path | None = None) -> dict:
    """Build the engine, time ``args.steps`` training steps after ``args.warmup``; returns the row's numbers."""
    irm = init_irm(shape.hidden, layers, cfg.irm, seed=0)
    module = IRMLoss(irm, lm, activation_checkpointing=bool(cfg.train.activation_checkpointing))
    engine, _ = build_engine(cfg, module, device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(shape.vocab, 256), (args.micro_batch, args.seq), generator=gen).to(device)
    mask = torch.ones_like(ids)

    def step():  # as Trainer.train_step: hooks (and checkpointed layers) held through the backward
        with module.micro_step():
            loss = engine(ids, mask, ids)
            engine.backward(loss)
        engine.step()

    try:
        for _ in range(args.warmup):
            step()
        sync(device)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t0)
        if profile_path is not None:
            write_profile(step, device, profile_path)
    finally:
        flag = "is_activation_checkpointing" if hasattr(type(lm), "is_activation_checkpointing") else "is_gradient_checkpointing"
        checkpointing = bool(getattr(lm, flag, False))
        if hasattr(engine, "destroy"):
            engine.destroy()  # drop DeepSpeed's hooks and buffers before the next row
    step_s = statistics.median(times)
    tokens_per_s = args.micro_batch * args.seq * world / step_s
    flops = train_flops_per_token(shape, layers, args.seq, cfg.irm.width_multiplier, cfg.irm.depth)
    return {
        "step_time_s": step_s, "step_times_s": times, "tokens_per_s": tokens_per_s,
        "flops_per_token": flops["total"], "flops_terms": flops,
        "achieved_tflops": flops["total"] * tokens_per_s / 1e12,
        "mfu": mfu(flops["total"], tokens_per_s / world, peak),
        "activation_checkpointing_active": checkpointing,
    }


def write_profile(step, device: torch.device, path: Path, n_steps: int = 3) -> None:
    """Profile ``n_steps`` steps; top-20 ops by CUDA (device) time on GPU, CPU time on CPU."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n_steps):
            step()
        sync(device)
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {n_steps} steps, sorted by {key}\n" + prof.key_averages().table(sort_by=key, row_limit=20))


def versions() -> dict:
    import transformers

    try:
        import deepspeed

        ds = deepspeed.__version__
    except ImportError:
        ds = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "deepspeed": ds,
            "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="smollm2_135m,llama_1b,llama2_7b", help="comma list of SHAPES or 'tiny'")
    ap.add_argument("--layer-sets", default="all,q1")
    ap.add_argument("--zero-stages", default="0,2,3")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also profile the first configuration")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    for name in args.shapes.split(","):
        if name != "tiny" and name not in SHAPES:
            ap.error(f"unknown shape '{name}': use tiny or one of {', '.join(SHAPES)}")

    info = init_distributed()  # on CUDA it also sets this rank's device (models.cuda_device_index)
    device = default_device() if args.device == "cuda" else torch.device("cpu")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(dev_name) if device.type == "cuda" else None
    rows = []
    profiled = not args.profile
    for shape_name in args.shapes.split(","):
        base_cfg = make_cfg(args, shape_name, "all", 0)
        lm = None
        try:
            lm, _ = load_model(base_cfg.model, device)
        except torch.cuda.OutOfMemoryError:
            rows.append({"shape": shape_name, "status": "oom", "stage": "load_model"})
            free(device)
            continue
        shape = ModelShape.from_hf_config(lm.config)
        for layer_set in args.layer_sets.split(","):
            layers = layer_set_layers(layer_set, shape.n_layers)
            for stage in [int(z) for z in args.zero_stages.split(",")]:
                cfg = make_cfg(args, shape_name, layer_set, stage)
                row = {"shape": shape_name, "model_shape": shape.as_dict(), "layer_set": layer_set,
                       "n_inj": len(layers), "zero_stage": stage, "micro_batch": args.micro_batch,
                       "seq_len": args.seq, "world_size": info.world_size,
                       "activation_checkpointing": args.activation_checkpointing,
                       "n_irm_params": irm_params(shape.hidden, len(layers), cfg.irm.width_multiplier,
                                                  cfg.irm.depth)}
                if device.type == "cuda":
                    free(device)
                    torch.cuda.reset_peak_memory_stats(device)
                prof_path = None if profiled else args.out.with_name(args.out.stem + "_profile.txt")
                try:
                    row.update(run_row(args, cfg, lm, shape, layers, device, info.world_size, peak, prof_path))
                    row["status"] = "ok"
                    profiled = True
                except torch.cuda.OutOfMemoryError:
                    row["status"] = "oom"
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                free(device)
                rows.append(row)
                if info.is_main:
                    print(json.dumps({k: row.get(k) for k in ("shape", "layer_set", "zero_stage", "status",
                                                              "tokens_per_s", "peak_mem_gib", "mfu")}))
        del lm
        free(device)
    result = {"device": dev_name, "peak_key": peak_key(dev_name) if device.type == "cuda" else None,
              "peak_flops": peak, **versions(), "world_size": info.world_size, "rows": rows}
    if info.is_main:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""IRM training throughput vs the frozen base model's forward+backward, same batch, same process.

    python benchmarks/bench_train.py [--model smollm2_135m] [--batch 8] [--seq 64] [--iters 5]

Baseline: the frozen base model's forward + backward on the batch, gradients flowing to the
activations only (input embeddings require grad, weights frozen) -- the work an IRM step cannot avoid.
IRM step: DeepSpeed engine forward (base + IRM hooks) + backward + optimizer step (ZeRO-2, AdamW).
FLOP bound for SmolLM2 (N = 135M base, 40M IRM parameters): 4N / (4N + 6 * 40M) ~= 0.69.
Writes ``benchmarks/results/bench_train.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from irm_hpc.config import load_config
from irm_hpc.data import collate, load_alignment
from irm_hpc.dist import init_distributed
from irm_hpc.irm import IRM
from irm_hpc.models import load_model
from irm_hpc.components.engine import IRMLoss, deepspeed_config

RESULTS = Path(__file__).resolve().parent / "results" / "bench_train.json"


def timed(fn, iters: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()

    import deepspeed

    init_distributed()
    cfg = load_config("train", [f"model={args.model}", "out_dir=/tmp/bench", f"train.micro_batch_size={args.batch}"])
    lm, tok = load_model(cfg.model)
    texts = load_alignment(cfg.data, "anger", 0).train
    stream = tok(" ".join(texts[:1000]))["input_ids"]  # comments are short: pack them into full rows
    seqs = [stream[i * args.seq:(i + 1) * args.seq] for i in range(args.batch)]
    batch = collate(seqs, tok.pad_token_id)
    n_tok = int(batch["attention_mask"].sum())

    def base_step():
        embeds = lm.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        loss = lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()

    torch.manual_seed(0)
    irm = IRM(lm.config.hidden_size, list(range(lm.config.num_hidden_layers)))
    module = IRMLoss(irm, lm)
    opt = torch.optim.AdamW(irm.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt, model_parameters=list(irm.parameters()),
                                      config=deepspeed_config(cfg, use_bf16=False))

    def irm_step():
        loss = engine(**batch)
        engine.backward(loss)
        engine.step()

    # interleave so that machine noise hits both alike
    base_t, irm_t = [], []
    for _ in range(args.iters):
        base_t += timed(base_step, 1, warmup=1 if not base_t else 0)
        irm_t += timed(irm_step, 1, warmup=1 if not irm_t else 0)
    base_tps = n_tok / statistics.median(base_t)
    irm_tps = n_tok / statistics.median(irm_t)
    n_base = sum(p.numel() for p in lm.parameters())
    n_irm = sum(p.numel() for p in irm.parameters())
    result = {
        "model": args.model, "batch": args.batch, "seq": args.seq, "tokens_per_batch": n_tok,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "base_params": n_base, "irm_params": n_irm,
        "base_fwd_bwd_s": base_t, "irm_train_step_s": irm_t,
        "base_tokens_per_s": base_tps, "irm_tokens_per_s": irm_tps, "ratio": irm_tps / base_tps,
        "flop_bound_ratio": (4 * n_base) / (4 * n_base + 6 * n_irm), "target_ratio": 0.6,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(f"base fwd+bwd: {base_tps:.0f} tok/s   IRM train step: {irm_tps:.0f} tok/s   ratio {result['ratio']:.3f} "
          f"(FLOP bound {result['flop_bound_ratio']:.3f}, target >= 0.6)")


if __name__ == "__main__":
    main()

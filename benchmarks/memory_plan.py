"""Which ZeRO stage and offload fit the paper's IRM on Llama-2-7B on 80 GB GPUs (estimates, not measured).

    python benchmarks/memory_plan.py [--gpu-bytes 80e9] [--headroom 0.10] [--micro-batch 8]

From ``irm_hpc.perf.memory_estimate``: the paper's IRM (width x3, depth 3) on Llama-2-7B, layer sets
``all`` and ``q1``, ZeRO stages 0-3, offload none / optimizer / optimizer+param, on 1, 2 and 4 GPUs,
micro batch 8 at seq 64 (the project's data.max_length) and 512. A configuration fits when its estimated
peak is at most the GPU's bytes less the headroom (CUDA context, allocator fragmentation, NCCL).
Writes ``benchmarks/results/memory_plan.json`` and prints a markdown table (GB = 1e9 bytes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from irm_hpc.inject import layer_set_layers
from irm_hpc.perf import SHAPES, memory_estimate

RESULTS = Path(__file__).resolve().parent / "results" / "memory_plan.json"
OFFLOADS = {"none": (False, False), "optimizer": (True, False), "optimizer+param": (True, True)}


def plan(gpu_bytes: float, headroom: float, micro_batch: int, shape_name: str = "llama2_7b") -> dict:
    """Every (layer set, seq, stage, offload, n_gpus) row with its estimate and whether it fits."""
    shape = SHAPES[shape_name]
    budget = gpu_bytes * (1 - headroom)
    rows = []
    for layer_set in ("all", "q1"):
        layers = layer_set_layers(layer_set, shape.n_layers)
        for seq in (64, 512):
            for stage in (0, 1, 2, 3):
                for offload, (opt, param) in OFFLOADS.items():
                    if (opt and stage == 0) or (param and stage != 3):
                        continue  # DeepSpeed offloads ZeRO partitions; parameters only at stage 3
                    for n_gpus in (1, 2, 4):
                        est = memory_estimate(shape, len(layers), stage, n_gpus, offload_optimizer=opt,
                                              offload_param=param, micro_batch=micro_batch, seq_len=seq,
                                              first_layer=layers[0])
                        rows.append({"layer_set": layer_set, "n_inj": len(layers), "seq_len": seq,
                                     "micro_batch": micro_batch, "zero_stage": stage, "offload": offload,
                                     "n_gpus": n_gpus, "fits": est["total"] <= budget, **est})
    return {"kind": "estimate (irm_hpc.perf.memory_estimate), not measured", "shape": shape_name,
            "shape_sizes": shape.as_dict(), "gpu_bytes": gpu_bytes, "headroom": headroom, "budget_bytes": budget,
            "irm": {"width_multiplier": 3, "depth": 3}, "rows": rows}


def markdown(result: dict) -> str:
    """One line per (layer set, seq, stage, offload); a column per GPU count: total GB and fit."""
    budget = result["budget_bytes"] / 1e9
    title = (f"Estimated peak GB per GPU (budget {budget:.0f} GB = {result['gpu_bytes'] / 1e9:.0f} GB less "
             f"{result['headroom']:.0%}); ok = fits, NO = does not fit.")
    lines = [title, "",
             "| layer set | seq | ZeRO | offload | 1 GPU | 2 GPUs | 4 GPUs | CPU GB/rank (4 GPUs) |",
             "|---|---|---|---|---|---|---|---|"]
    keyed: dict = {}
    for r in result["rows"]:
        keyed.setdefault((r["layer_set"], r["seq_len"], r["zero_stage"], r["offload"]), {})[r["n_gpus"]] = r
    for (ls, seq, stage, off), by_n in keyed.items():
        cells = [f"{by_n[n]['total'] / 1e9:.1f} {'ok' if by_n[n]['fits'] else 'NO'}" for n in (1, 2, 4)]
        lines.append(f"| {ls} | {seq} | {stage} | {off} | " + " | ".join(cells) + f" | {by_n[4]['cpu_bytes'] / 1e9:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu-bytes", type=float, default=80e9)
    ap.add_argument("--headroom", type=float, default=0.10)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    result = plan(args.gpu_bytes, args.headroom, args.micro_batch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()

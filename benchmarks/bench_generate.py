"""Generation throughput with the IRM on vs off (KV-cached HF ``generate``), and the evaluation stage's
seconds per run.

    python benchmarks/bench_generate.py [--model smollm2_135m | --shape smollm2_135m|llama_1b|llama2_7b|tiny]
        [--device cpu|cuda] [--batch 1 8 32] [--new-tokens 64] [--repeats 3] [--layer-set all]
    python benchmarks/bench_generate.py --eval-sweep runs/<sweep>   # evaluation seconds per run, from a sweep

Throughput: the same prompts (the evaluation set's neutral openings, repeated to the batch size, chat
template where the tokenizer has one), greedy, exactly ``--new-tokens`` new tokens per sequence
(``min_new_tokens``), timed after one warm-up call; tokens/s = batch x new tokens / seconds (median of
``--repeats``). IRM on = a fresh paper-sized IRM (width x3, depth 3) on ``--layer-set`` layers, in the
model's dtype, injected through ``irm_hpc.inject`` as in ``irm_hpc.generate``. The FLOP bound of the
on/off ratio: per new token the base model does 2 x (its matmul parameters, LM head included) FLOPs and
the IRM 2 x (its parameters) more, so on/off <= base / (base + IRM) when compute-bound (the attention
over the cache adds to both and is left out).

Writes ``benchmarks/results/bench_generate_<device>.json`` (``--eval-sweep``: ``eval_seconds.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
RESULTS = Path(__file__).resolve().parent / "results"


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(args) -> dict:
    from irm_hpc.config import load_config
    from irm_hpc.generate import default_prompts, encode_prompts, left_pad, use_chat_template
    from irm_hpc.inject import inject, layer_set_layers
    from irm_hpc.irm import IRM
    from irm_hpc.models import load_model
    from irm_hpc.perf import ModelShape, irm_params

    device = torch.device(args.device)
    if args.shape:
        from bench_gpu import model_overrides

        overrides = model_overrides(args.shape, 512)
        if device.type == "cuda":
            overrides.append("model.dtype=bfloat16")
    else:
        overrides = [f"model={args.model}"]
    cfg = load_config("train", [*overrides, "out_dir=/tmp/irm_bench_generate"])
    lm, tok = load_model(cfg.model, device)
    n_layers = lm.config.num_hidden_layers
    layers = layer_set_layers(args.layer_set, n_layers)
    torch.manual_seed(0)
    irm = IRM(lm.config.hidden_size, layers, 3, 3).to(device=device, dtype=next(lm.parameters()).dtype).eval()
    irm.requires_grad_(False)
    n_irm = irm_params(lm.config.hidden_size, len(layers), 3, 3)  # irm_hpc.perf's FLOP model, as bench_gpu
    n_base = ModelShape.from_hf_config(lm.config).forward_matmul_params
    bound = n_base / (n_base + n_irm)
    chat = use_chat_template(tok, "auto")
    prompts = default_prompts()
    rows = []
    for batch in args.batch:
        ps = (prompts * (batch // len(prompts) + 1))[:batch]
        ids, mask = left_pad(encode_prompts(tok, ps, chat), tok.pad_token_id, device)
        kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=args.new_tokens,
                  min_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id, temperature=None, top_p=None,
                  top_k=None)

        def run(on: bool) -> float:
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                if on:
                    with inject(lm, irm, keep_injections=False):
                        out = lm.generate(**kw)
                else:
                    out = lm.generate(**kw)
            sync(device)
            assert out.shape[1] == ids.shape[1] + args.new_tokens
            return time.perf_counter() - t0

        run(False), run(True)  # warm-up (kernels, caches)
        times = {"off": [], "on": []}
        for _ in range(args.repeats):  # interleaved, so drift hits both
            times["off"].append(run(False))
            times["on"].append(run(True))
        tps = {k: batch * args.new_tokens / statistics.median(v) for k, v in times.items()}
        ratio = tps["on"] / tps["off"]
        rows.append({"batch": batch, "prompt_tokens": int(ids.shape[1]), "new_tokens": args.new_tokens,
                     "tokens_per_s_off": round(tps["off"], 2), "tokens_per_s_on": round(tps["on"], 2),
                     "on_over_off": round(ratio, 4), "flop_bound": round(bound, 4),
                     "on_over_off_vs_bound": round(ratio / bound, 4),
                     "seconds_off": [round(t, 4) for t in times["off"]], "seconds_on": [round(t, 4) for t in times["on"]]})
        print(json.dumps(rows[-1]), flush=True)
    return {"model": args.shape and f"random {args.shape} shape" or args.model, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
            "dtype": str(next(lm.parameters()).dtype), "threads": torch.get_num_threads(),
            "layer_set": args.layer_set, "n_injection_layers": len(layers), "base_matmul_params": n_base,
            "irm_params": n_irm, "chat_template": chat, "goal_on_over_off": 0.8, "rows": rows,
            "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def eval_seconds(sweep: Path) -> dict:
    """Per-run evaluation timing (``evaluation/summary.json`` of each run of a sweep)."""
    runs = []
    for f in sorted((sweep / "runs").glob("*/evaluation/summary.json")):
        s = json.loads(f.read_text())
        runs.append({"run": s["run"], **s["timing"], "samples": sum(c["n"] for c in s["conditions"].values()),
                     "conditions": list(s["conditions"]), "params": {k: s["params"][k] for k in
                                                                    ("n_samples", "max_new_tokens", "scales", "baseline")},
                     "n_prompts": len(s["prompts"])})
    if not runs:
        raise SystemExit(f"no evaluation/summary.json under {sweep}/runs")
    tot = [r["total_seconds"] for r in runs]
    return {"sweep": str(sweep), "n_runs": len(runs), "seconds_per_run_mean": round(statistics.mean(tot), 2),
            "seconds_per_run_min": min(tot), "seconds_per_run_max": max(tot), "runs": runs,
            "note": "measured inside the sweep's evaluation array jobs (one CPU per job on the dev Slurm) "
                    "unless stated otherwise"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2_135m", help="model preset (real weights)")
    ap.add_argument("--shape", help="random weights of this shape instead (irm_hpc.perf.SHAPES or tiny)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layer-set", default="all")
    ap.add_argument("--eval-sweep", type=Path, help="write evaluation seconds per run of this sweep instead")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.eval_sweep:
        res = eval_seconds(args.eval_sweep)
        out = args.out or RESULTS / "eval_seconds.json"
    else:
        res = bench_model(args)
        name = f"bench_generate_{torch.device(args.device).type}{'_' + args.shape if args.shape else ''}.json"
        out = args.out or RESULTS / name
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

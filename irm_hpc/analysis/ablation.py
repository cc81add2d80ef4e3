"""The reduce's ablation section (summary key ``ablation``): the runs' ``<run>/ablation/summary.json``
(``irm_hpc.ablate``) pooled per ablated index and per layer group.

Per index ``i``: ``delta_gain`` {mean, per_run} (nats/token: how much of the alignment gain ablating ``i``
removes), ``p`` (the runs' one-sided permutation p-values combined by Fisher's method,
``scipy.stats.combine_pvalues``; runs are independent trainings), ``p_sign`` (sign test,
``scipy.stats.binomtest``: runs whose ``delta_gain`` exceeds their null's mean, against 1/2),
``null_size`` (smallest null of a run), ``keep_only_share`` {mean, per_run}, and the judge's
``rate_diff`` {mean, per_run, ci_per_run} where runs were evaluated. Layer groups: mean
``delta_gain`` and ``share_of_gain`` of leaving each group out, and ``only_share`` of injecting only it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from irm_hpc.layout import RunDir


def _mean(xs) -> Optional[float]:
    xs = [float(x) for x in xs if x is not None and np.isfinite(x)]
    return round(float(np.mean(xs)), 6) if xs else None


def _read(path: str) -> Optional[dict]:
    f = RunDir(path).ablation_summary
    if not f.is_file():
        return None
    try:
        s = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) and s.get("schema", "").startswith("irm_hpc.ablation/") else None


def collect(run_paths: dict[str, str], alignments: dict[str, str]) -> dict:
    """Pool the ablation summaries of ``run_paths`` ({run name: run dir}); ``alignments``: {run: alignment}.
    Returns ``{"available": False}`` when no run has one."""
    from scipy.stats import binomtest, combine_pvalues

    runs = {name: s for name, p in sorted(run_paths.items()) if (s := _read(p)) is not None}
    if not runs:
        return {"available": False}
    indices = sorted({int(i) for s in runs.values() for i in s["indices"]})
    out: dict = {"available": True, "n_runs": len(runs), "runs": sorted(runs),
                 "gain": {name: s["gain"] for name, s in runs.items()},
                 "p_method": "Fisher (scipy.stats.combine_pvalues) of per-run one-sided permutation p-values; "
                             "p_sign: sign test of delta_gain > the run's null mean", "indices": {}}
    for i in indices:
        per = {name: s["indices"][str(i)] for name, s in runs.items() if str(i) in s["indices"]}
        ps = [e["p"] for e in per.values()]
        above = sum(1 for e in per.values() if e["delta_gain"] > e["null_delta_mean"])
        entry = {
            "n_runs": len(per),
            "p": float(combine_pvalues(ps, method="fisher").pvalue) if ps else None,
            "p_per_run": {n: e["p"] for n, e in per.items()},
            "p_sign": float(binomtest(above, len(per), 0.5, alternative="greater").pvalue) if per else None,
            "runs_above_null_mean": above,
            "runs_p_below_0_05": sum(1 for p in ps if p < 0.05),
            "null_size": min(e["null_size"] for e in per.values()),
            "delta_gain": {"mean": _mean(e["delta_gain"] for e in per.values()),
                           "per_run": {n: e["delta_gain"] for n, e in per.items()}},
            "null_delta_mean": _mean(e["null_delta_mean"] for e in per.values()),
            "z": {"mean": _mean(e.get("z") for e in per.values()), "per_run": {n: e.get("z") for n, e in per.items()}},
            "share_of_gain": {"mean": _mean(e.get("share_of_gain") for e in per.values()),
                              "per_run": {n: e.get("share_of_gain") for n, e in per.items()}},
            "keep_only_share": {"mean": _mean(e.get("keep_only_share") for e in per.values()),
                                "per_run": {n: e.get("keep_only_share") for n, e in per.items()}},
            "mean_abs_rank": {n: e.get("mean_abs_rank") for n, e in per.items()},
        }
        judged = {n: s["judge"]["indices"][str(i)] for n, s in runs.items()
                  if s.get("judge") and str(i) in s["judge"].get("indices", {})}
        if judged:
            entry["judge"] = {
                "n_runs": len(judged), "rate_diff": {"mean": _mean(j["rate_diff"] for j in judged.values()),
                                                     "per_run": {n: j["rate_diff"] for n, j in judged.items()}},
                "ci_per_run": {n: j["rate_diff_ci"] for n, j in judged.items()},
                "runs_ci_above_zero": sum(1 for j in judged.values() if j["rate_diff_ci"][0] > 0),
                "share_of_effect": {n: j.get("share_of_effect") for n, j in judged.items()},
                "rate_on": {n: runs[n]["judge"]["rate_on"] for n in judged},
                "rate_off": {n: runs[n]["judge"]["rate_off"] for n in judged}}
        out["indices"][str(i)] = entry
    groups: dict[str, list] = {}
    for name, s in runs.items():
        for g in s.get("layers", {}).get("groups", []):
            groups.setdefault(g["group"], []).append((name, g))
    out["layers"] = {g: {"n_runs": len(rows), "delta_gain": _mean(r["delta_gain"] for _, r in rows),
                         "share_of_gain": _mean(r.get("share_of_gain") for _, r in rows),
                         "only_share": _mean(r.get("only_share") for _, r in rows),
                         "per_run": {n: {k: r.get(k) for k in ("layers", "delta_gain", "share_of_gain", "gain_only",
                                                               "only_share")} for n, r in rows}}
                     for g, rows in sorted(groups.items())}
    out["_null"] = {name: np.array(list(s["null"].values()), dtype=float) for name, s in runs.items()}
    return out


def figure(path: Path, ab: dict) -> Optional[str]:
    """``ablation.png``: per run, the null's delta_gain (grey) and each ablated index's (coloured); and the
    layer groups' share of the gain. Returns the file name, or None when there is nothing to draw."""
    if not ab.get("available"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from irm_hpc.layout import atomic_path

    runs = ab["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(runs) + 2.5),
                             gridspec_kw={"width_ratios": [2, 1]})
    ax = axes[0]
    for y, name in enumerate(runs):
        null = ab["_null"].get(name, np.zeros(0))
        ax.scatter(null, np.full(len(null), y), s=8, c="0.6", label="matched null" if y == 0 else None)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (i, e) in enumerate(ab["indices"].items()):
        xs = [e["delta_gain"]["per_run"].get(n) for n in runs]
        ys = [y for y, x in enumerate(xs) if x is not None]
        ax.scatter([x for x in xs if x is not None], ys, s=40, marker="D", color=colors[k % len(colors)],
                   label=f"index {i} (Fisher p={e['p']:.2g})")
    ax.axvline(0, color="k", lw=0.5)
    ax.set_yticks(range(len(runs)), runs, fontsize=7)
    ax.set_xlabel("delta alignment gain when ablated (nats/token; > 0: the index carries gain)")
    ax.legend(fontsize=7, loc="best")
    ax.set_title("index ablation vs indices matched on mean |injection|", fontsize=9)
    ax = axes[1]
    names = list(ab["layers"])
    if names:
        ax.bar(range(len(names)), [ab["layers"][g]["share_of_gain"] or 0 for g in names], width=0.4,
               label="share lost without the group")
        ax.bar(np.arange(len(names)) + 0.4, [ab["layers"][g]["only_share"] or 0 for g in names], width=0.4,
               label="share kept with only the group")
        ax.set_xticks(np.arange(len(names)) + 0.2, names, fontsize=7, rotation=90 if len(names) > 8 else 0)
        ax.axhline(0, color="k", lw=0.5)
        ax.axhline(1, color="k", lw=0.5, ls=":")
        ax.legend(fontsize=7)
    ax.set_title("layer-group ablations (mean over runs, share of the gain)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path).name


def report_lines(s: dict) -> list[str]:
    """The report sections (markdown lines) of a summary's ``ablation`` and ``mechanism`` entries."""
    from irm_hpc.analysis.report import _fig, _fmt, _table

    ab = s.get("ablation") or {}
    out = ["## Ablation (is the striation causal?)", ""]
    if not ab.get("available"):
        out += ["No run has an ablation summary (`sweep.ablation.enabled` was false, or run "
                "`python -m irm_hpc.ablate SWEEP_DIR`; the ablation jobs log to `logs/ablation/`).", ""]
    else:
        out.append(f"{ab['n_runs']} runs. Per run, each index is zeroed in every injection layer and the alignment "
                   "gain on held-out texts is measured again (nats/token); `delta gain` = gain lost. The null: the "
                   "same for indices matched on the run's mean |injection|. " + ab["p_method"] + ". `keep-only "
                   "share`: the gain left when every other index is zeroed, as a share of the full IRM's.")
        out.append("")
        rows = []
        for i, e in ab["indices"].items():
            j = e.get("judge") or {}
            rows.append([i, e["n_runs"], e["delta_gain"]["mean"], e["null_delta_mean"], e["share_of_gain"]["mean"],
                         e["z"]["mean"], f"{e['runs_p_below_0_05']}/{e['n_runs']}", e["p"], e["p_sign"], e["null_size"],
                         e["keep_only_share"]["mean"],
                         _fmt(j.get("rate_diff", {}).get("mean")) + (f" ({j['runs_ci_above_zero']}/{j['n_runs']} CI > 0)"
                                                                  if j else "")])
        out.append(_table(["index", "runs", "delta gain (mean)", "null delta (mean)", "share of gain", "z vs null",
                           "runs p < 0.05", "Fisher p", "sign-test p", "null size", "keep-only share",
                           "judge rate drop"], rows))
        out.append("")
        runs = ab["runs"]
        rows = [[n, _fmt(ab["gain"][n]), *[_fmt(e["delta_gain"]["per_run"].get(n)) + f" (p {_fmt(e['p_per_run'].get(n))})"
                                          for e in ab["indices"].values()]] for n in runs]
        out.append(_table(["run", "gain", *[f"delta {i}" for i in ab["indices"]]], rows))
        out.append("")
        if ab["layers"]:
            out.append(_table(["layer group", "runs", "delta gain without it", "share lost", "share kept with it alone"],
                              [[g, e["n_runs"], e["delta_gain"], e["share_of_gain"], e["only_share"]]
                               for g, e in ab["layers"].items()]))
            out.append("")
        out.append(_fig(s, "ablation", "Per run: delta gain of each ablated index (diamonds) against its matched "
                        "null (grey); layer-group ablations."))
        out.append("")
    mech = s.get("mechanism") or {}
    out += ["## Mechanism (the frozen model's weights)", ""]
    if not mech.get("available"):
        out += [f"Not computed: {mech.get('reason', 'no consensus index')}.", ""]
        return out
    out.append(f"Ranks over the {mech['hidden_size']} hidden dims, 1 = largest |gain| (RMSNorm/LayerNorm weight), "
               "largest LM-head column norm, or largest base-model mean |residual| (massive activations). Logit lens: "
               "the tokens that the unit direction e_i promotes and suppresses through the final norm and LM head.")
    out.append("")
    rows = []
    for i, e in mech["indices"].items():
        rows.append([i, e.get("input_layernorm_median_rank"), e.get("input_layernorm_top1_layers"),
                     e.get("post_attention_layernorm_median_rank"), e.get("post_attention_layernorm_top1_layers"),
                     e.get("final_norm_rank"), e.get("lm_head_colnorm_rank"), e.get("final_gain_x_colnorm_rank"),
                     e.get("base_massive_activation_rank")])
    out.append(_table(["index", "input norm median rank", "layers ranked 1", "post-attn norm median rank",
                       "layers ranked 1", "final norm rank", "LM-head col-norm rank", "final gain x col norm rank",
                       "base massive-activation rank"], rows))
    out.append("")
    for i, e in mech["indices"].items():
        up = ", ".join(repr(t) for t in e["promoted_tokens"])
        down = ", ".join(repr(t) for t in e["suppressed_tokens"])
        out.append(f"- **{i}**: {e.get('summary', '')}. Promotes {up}; suppresses {down}.")
    out.append("")
    out.append(_fig(s, "mechanism", "Norm |gain| by layer: all hidden dims (grey) and the striation indices; below, "
                    "their rank by layer."))
    out.append("")
    return out

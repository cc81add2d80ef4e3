"""Outputs of the reduce step: ``summary.json`` (machine-readable) and ``report.md`` (tables + figures)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from irm_hpc.layout import ANALYSIS_REPORT, ANALYSIS_SUMMARY, atomic_write_json, atomic_write_text

MAX_RUN_ROWS = 10  # striation rows per run in report.md (summary.json has all)


def jsonable(x: Any) -> Any:
    """Convert numpy scalars/arrays (and NaN -> None) recursively for json.dump."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    return x


def write_summary(out: Path, summary: dict) -> Path:
    """Write ``<out>/summary.json`` (`jsonable`; keys starting with ``_`` dropped) atomically; returns its path."""
    path = Path(out) / ANALYSIS_SUMMARY
    atomic_write_json(path, jsonable(summary), indent=1)
    return path


def write_outputs(out: Path, summary: dict) -> None:
    """Write ``summary.json`` and ``report.md`` into ``out`` (each atomically, `irm_hpc.layout`)."""
    write_summary(out, summary)
    atomic_write_text(Path(out) / ANALYSIS_REPORT, render(summary))


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return "-"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.{nd}f}"
    return str(v)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _fig(summary: dict, key: str, caption: str) -> str:
    f = summary.get("figures", {}).get(key)
    return f"![{caption}]({f})\n\n*{caption}*\n" if f else ""


def render(s: dict) -> str:
    """report.md text of a summary dict."""
    p, m = s["params"], s["model"]
    out = [f"# Striation analysis: {m['model_name']}", ""]
    out.append(f"{s['n_runs']} runs (alignments: {', '.join(s['alignments'])}; seeds: "
               f"{', '.join(map(str, s['seeds']))}; layer sets: {', '.join(s['layer_sets'])}), hidden size "
               f"{m['hidden_size']}, {m['n_layers']} layers. Top-k per layer: k = {s['k']} "
               f"(top_k_frac = {p['top_k_frac']}); permutation null with {p['n_permutations']} permutations "
               f"(indices shuffled independently per layer); Benjamini-Hochberg FDR at alpha = {p['alpha']}; "
               f"consensus = significant in >= {p['consensus_share']:.0%} of runs; statistics from `{p['source']}` "
               f"matrices; correlation profile `{p['profile']}`.")
    out.append("")
    if s["skipped"]:
        out += ["**Skipped runs**", ""]
        out += [f"* `{x.get('name') or x.get('path')}`: {x.get('reason')}" for x in s["skipped"]]
        out.append("")
    for n in s.get("notes", []):
        out += [f"> note: {n}", ""]

    # consensus
    c = s["consensus"]
    out += ["## Consensus striation indices", ""]
    out.append("The analogue of the paper's neuron 1512 (arXiv 2407.03621): indices that are a significant "
               "striation in at least the consensus share of runs. `control`: `learned` if most runs where it is "
               "significant did not already have it at step 0 (untrained IRM), `init_artifact` otherwise.")
    out.append("")
    if c["indices"]:
        aligns = s["alignments"]
        rows = [[e["index"], e["n_runs_significant"], e["share"], e["mean_continuity"], e["mean_column_score"],
                 e["step0_share"], e["control"], e.get("base_rank"), e.get("base_z"),
                 *[f"{e['per_alignment'][a]['significant']}/{e['per_alignment'][a]['runs']}" for a in aligns]]
                for e in c["indices"]]
        out.append(_table(["index", "runs sig.", "share", "mean continuity", "mean column score", "step-0 share",
                           "control", "base rank", "base z", *aligns], rows))
    else:
        out.append("No index reaches the consensus share.")
    out.append("")
    if c["alignment_specific"]:
        out += ["**Alignment-specific striations** (significant in >= the consensus share of one alignment's "
                "runs, below it elsewhere):", ""]
        out.append(_table(["alignment", "index", "share in alignment", "share elsewhere", "mean continuity", "control"],
                          [[e["alignment"], e["index"], e["share_in_alignment"], e["share_elsewhere"],
                            e["mean_continuity_in_alignment"], e["control"]] for e in c["alignment_specific"]]))
        out.append("")
    out.append(_fig(s, "striation_scores", "Share of runs in which each index is a significant striation "
                    "(final vs step 0) and the mean column score per index."))

    from irm_hpc.analysis.evaluation import report_lines

    out += report_lines(s)
    from irm_hpc.analysis.ablation import report_lines as ablation_lines

    out += ablation_lines(s)

    # runs
    out += ["## Runs", ""]
    out.append(_table(["run", "alignment", "seed", "layer set", "n_inj", "source", "final probe step",
                       "final train step", "alignment gain", "striations", "init artifacts", "step-0 striations",
                       "top indices"],
                      [[r["name"], r["alignment"], r["seed"], r["layer_set"], r["n_inj"], r["source"],
                        r["final_probe_step"], r["final_train_step"], _fmt(r.get("alignment_gain")), r["n_striations"],
                        r["n_init_artifacts"], r["step0_n_striations"],
                        ", ".join(str(t["index"]) for t in r["top_indices"])]
                       for r in s["runs"]]))
    out.append("")
    out.append("`alignment gain`: at the run's last eval, how much the IRM lowered the eval loss on the "
               "target alignment minus how much it lowered it on the other labels (nats/token; > 0 = moved "
               "toward the alignment, not only toward the data's register).")
    out.append("")
    out += ["### Per-run striation tables", "",
            "Indices whose vertical continuity exceeds chance (BH-adjusted permutation p < alpha); "
            "`p_exact` is the Binomial / Poisson-binomial tail for the same statistic (cross-check); "
            "`p_fwer` the max-T family-wise p-value.", ""]
    for r in s["runs"]:
        out.append(f"**{r['name']}** ({r['alignment']}, seed {r['seed']}): {r['n_striations']} striation(s)")
        out.append("")
        if r["striations"]:
            rows = [[t["index"], t["count"], t["continuity"], t["column_score"], t["p_raw"], t["p_bh"], t["p_fwer"],
                     t["p_exact"], t["step0_continuity"], t["step0_p_bh"], t["init_artifact"]]
                    for t in r["striations"][:MAX_RUN_ROWS]]
            out.append(_table(["index", "layers", "continuity", "column score", "p_raw", "p_bh", "p_fwer", "p_exact",
                               "step-0 continuity", "step-0 p_bh", "init artifact"], rows))
            if len(r["striations"]) > MAX_RUN_ROWS:
                out.append(f"\n({len(r['striations']) - MAX_RUN_ROWS} more in summary.json)")
            out.append("")
    out.append(_fig(s, "run_heatmaps", "Per-run mean |injection| per layer (rows) and index (columns), the "
                    "paper's view: vertical lines are striations."))
    out.append(_fig(s, "alignment_heatmaps", "Mean |injection| per alignment."))

    # correlation / clustering
    cr, g = s["correlation"], s["clustering"]
    out += ["## Cross-run correlation and clustering", ""]
    ab = cr["alignment_blocks"]
    out.append(f"Profile: `{cr['profile']}` per index. Mean Pearson r within alignment "
               f"{_fmt(ab['pearson']['within'])}, between alignments {_fmt(ab['pearson']['between'])}; Spearman "
               f"within {_fmt(ab['spearman']['within'])}, between {_fmt(ab['spearman']['between'])}; same seed "
               f"(other alignments) {_fmt(cr['seed_blocks']['pearson']['within'])}.")
    out.append("")
    if g["by_factor"]:
        out.append(_table(["grouping", "clusters", "ARI agglomerative (1 - r, average)", "ARI KMeans"],
                          [[f, v["n_clusters"], v["ari_agglomerative"], v["ari_kmeans"]] for f, v in g["by_factor"].items()]))
        out.append("")
        out.append(f"Runs group by: **{g['groups_by']}** (factor with the highest agglomerative ARI, if > 0.5).")
    else:
        out.append("Too few runs (or labels) to cluster.")
    out.append("")
    out.append(_fig(s, "correlation", "Cross-run Pearson correlation with average-linkage dendrogram."))

    # controls
    ctl = s["controls"]
    out += ["## Controls", ""]
    s0 = ctl["step0"]
    if s0["available"]:
        out.append(f"Untrained IRM (step 0, {s0['n_runs_with_step0']} runs): {s0['run_init_artifacts_total']} of "
                   f"{s0['run_striations_total']} per-run striations were already significant at step 0 "
                   f"(initialisation artifacts). Consensus indices already striated at step 0: "
                   f"{s0['consensus_init_artifacts'] or 'none'}; learned: {s0['consensus_learned'] or 'none'}. "
                   f"Step-0 consensus indices: {s0['step0_consensus'] or 'none'}.")
    else:
        out.append("No step-0 records: the untrained-IRM control is unavailable.")
    out.append("")
    if ctl["seeds"]["groups"]:
        out.append("Seed replicates (same alignment and layer set):")
        out.append("")
        out.append(_table(["alignment", "layer set", "seeds", "mean Jaccard", "in all seeds", "in one seed only"],
                          [[x["alignment"], x["layer_set"], ", ".join(map(str, x["seeds"])), x["mean_jaccard"],
                            ", ".join(map(str, x["in_all_seeds"][:12])) or "-",
                            ", ".join(map(str, x["in_one_seed_only"][:12])) or "-"] for x in ctl["seeds"]["groups"]]))
    out.append("")
    g = ctl.get("alignment_gain") or {}
    if g.get("available"):
        sp = g.get("spearman_vs_n_striations") or {}
        out.append(f"Alignment gain (nats/token, last eval; {g['n_runs']} runs): mean {_fmt(g['mean'])}, "
                   f"positive in {g['positive']} of {g['n_runs']} runs. Spearman correlation of a run's gain "
                   f"with its number of striations: {_fmt(sp.get('r'))} (p {_fmt(sp.get('p'))}).")
        out.append("")
        out.append(_table(["alignment", "runs", "mean gain", "min", "max", "runs with gain > 0"],
                          [[a, x["runs"], _fmt(x["mean"]), _fmt(x["min"]), _fmt(x["max"]), x["positive"]]
                           for a, x in g["per_alignment"].items()]))
        out.append("")

    # base model
    b = s["base_model"]
    out += ["## Relation to the base model", ""]
    if b.get("available"):
        cc, cs = b.get("correlation") or {}, b.get("correlation_share") or {}
        out.append(f"Mean column score vs the base model's mean |residual| per index (mean over layers, "
                   f"{b['n_runs_with_base']} runs): Pearson {_fmt(cc.get('pearson'))} (p {_fmt(cc.get('pearson_p'))}), "
                   f"Spearman {_fmt(cc.get('spearman'))} (p {_fmt(cc.get('spearman_p'))}). Share of runs significant "
                   f"vs base: Spearman {_fmt(cs.get('spearman'))}. Consensus indices among the top "
                   f"{s['params']['n_outliers']} outliers: {b['consensus_in_top_outliers'] or 'none'}.")
        out.append("")
        out.append(_table(["base rank", "index", "base mean abs", "base z", "striation share", "mean column score",
                           "column score rank", "consensus"],
                          [[o["base_rank"], o["index"], o["base_mean_abs"], o["base_z"], o["striation_share"],
                            o["mean_column_score"], o["column_score_rank"], o["consensus"]] for o in b["top_outliers"]]))
        out.append("")
        out.append(_fig(s, "base_outliers", "Base-model outlier profile with the consensus striations."))
    else:
        out.append("No run holds a base reference (`base/resid_abs`).")
        out.append("")

    # null
    out += ["## Permutation null", ""]
    out.append(_table(["hidden", "layers", "members per layer", "permutations", "pooled samples",
                       "max |CDF perm - binomial|"],
                      [[n["hidden"], len(n["members"]), ", ".join(map(str, sorted(set(n["members"])))),
                        n["n_permutations"], n["pooled_samples"], n["max_abs_cdf_diff"]] for n in s["null"]]))
    out.append("")
    t = s.get("timing", {})
    out.append(f"Timing: map {_fmt(t.get('map_seconds'), 1)} s, reduce {_fmt(t.get('reduce_seconds'), 1)} s.")
    out.append("")
    return "\n".join(out)

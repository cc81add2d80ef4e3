"""The evaluation stage's results in the reduce: per run and pooled per alignment (``summary.json`` key
``evaluation``), the figure ``evaluation.png`` and the report section.

Each analysed run's ``evaluation/summary.json`` (written by ``irm_hpc.evaluate``) is read from its run
dir. Per alignment, the runs' per-prompt judge hits are summed per prompt: the on - off rate difference
and its 95 % percentile bootstrap CI resample prompts (runs of one model share their IRM-off samples
exactly: same prompts, same seeds, so (run, prompt) pairs are not independent clusters; runs with
different prompt sets fall back to (run, prompt) clusters); perplexities pool NLL over all tokens
(``exp(sum NLL / sum tokens)``). The steering-vector baseline (``caa``) is pooled the same way, and its
per-index profile (mean |vector| over layers, at the IRM's norm) is set against the IRM's (mean
|injection| over layers and prompt tokens): is the consensus striation index large in the data's own
contrastive direction, or only in trained IRMs?
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from irm_hpc.layout import RunDir

SCHEMA = "irm_hpc.evaluation/1"


def _load(path: Path) -> Optional[dict]:
    f = RunDir.containing(path).evaluation_summary
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("schema") == SCHEMA else None


def _pool(evals: list[dict], cond: str) -> dict:
    """Pooled figures of ``cond`` over ``evals`` (runs of one alignment). Per-prompt hits and counts are
    summed over the runs when every run used the same prompts (the clusters of the bootstrap are then
    the prompts: runs of the same model, prompts and seed share their IRM-off samples exactly, so
    (run, prompt) pairs would not be independent); otherwise each (run, prompt) is its own cluster."""
    same = len({json.dumps(e.get("prompts")) for e in evals}) == 1
    per = [np.asarray(e["conditions"][cond]["per_prompt_hits"], float) for e in evals]
    per_n = [np.asarray(e["conditions"][cond]["per_prompt_n"], float) for e in evals]
    hits = np.sum(per, axis=0) if same else np.concatenate(per)
    n = np.sum(per_n, axis=0) if same else np.concatenate(per_n)
    nll = sum((e["conditions"][cond]["nll_per_token"] or 0.0) * e["conditions"][cond]["tokens"] for e in evals)
    tokens = sum(e["conditions"][cond]["tokens"] for e in evals)
    d2 = [e["conditions"][cond]["distinct2"] for e in evals if e["conditions"][cond]["distinct2"] is not None]
    return {"hits": hits, "n": n, "rate": float(hits.sum() / n.sum()),
            "mean_prob": float(np.mean([e["conditions"][cond]["mean_prob"] for e in evals])),
            "perplexity": float(np.exp(nll / tokens)) if tokens else None,
            "distinct2": float(np.mean(d2)) if d2 else None}


def collect(run_paths: dict[str, str], alignments: dict[str, str], consensus: list[int],
            resamples: int = 2000, seed: int = 0) -> dict:
    """The ``evaluation`` section of ``summary.json``.

    Args:
        run_paths: run name -> run directory, for every analysed run.
        alignments: run name -> alignment.
        consensus: the consensus striation indices (hidden dims).

    Returns ``{"available": False}`` when no run has an evaluation, else ``judge``, ``per_run``,
    ``per_alignment`` (``rate_off``, ``rate_on``, ``rate_diff``, ``rate_diff_ci`` [lo, hi],
    ``perplexity_off``, ``perplexity_on``, ``by_scale``, ``baseline``), ``criterion`` and ``baseline``.
    Arrays for the figure are under ``_arrays``.
    """
    from irm_hpc.evaluate import bootstrap_diff

    evals = {name: e for name, p in run_paths.items() if (e := _load(Path(p))) is not None}
    if not evals:
        return {"available": False, "missing": sorted(run_paths)}
    first = next(iter(evals.values()))
    judge = dict(first["judge"])
    notes = []
    if len({e["judge"].get("data_checksum") for e in evals.values()}) > 1:
        notes.append("runs were judged by judges trained on different data")
    per_run = {}
    for name, e in sorted(evals.items()):
        scales = {k: v for k, v in e["conditions"].items() if k.startswith("scale=")}
        per_run[name] = {
            "alignment": e["alignment"], "seed": e["seed"], "layer_set": e.get("layer_set"),
            "rate_off": e["rate_off"], "rate_on": e["rate_on"], "rate_diff": e["rate_diff"],
            "rate_diff_ci": e["rate_diff_ci"], "perplexity_off": e["perplexity_off"],
            "perplexity_on": e["perplexity_on"],
            "by_scale": {k[6:]: {"rate": v["alignment_rate"], "mean_prob": v["mean_prob"],
                                 "perplexity": v["perplexity"], "distinct2": v["distinct2"]} for k, v in scales.items()},
            "baseline": {k: (e["baseline"] or {}).get(k) for k in ("rate", "rate_diff", "rate_diff_ci", "perplexity")}
            if e.get("baseline") else None,
            "seconds": (e.get("timing") or {}).get("total_seconds"),
        }
    per_alignment = {}
    for a in sorted({e["alignment"] for e in evals.values()}):
        group = [e for e in evals.values() if e["alignment"] == a]
        off, on = _pool(group, "scale=0"), _pool(group, "scale=1")
        diff, ci = bootstrap_diff(on["hits"], off["hits"], on["n"], resamples, seed)
        common = set.intersection(*[{k for k in e["conditions"] if k.startswith("scale=")} for e in group])
        by_scale = {}
        for k in sorted(common, key=lambda k: float(k[6:])):
            p = _pool(group, k)
            by_scale[k[6:]] = {"rate": p["rate"], "mean_prob": p["mean_prob"], "perplexity": p["perplexity"],
                               "distinct2": p["distinct2"]}
        entry = {"n_runs": len(group), "n_samples_per_scale": int(on["n"].sum()),
                 "rate_off": off["rate"], "rate_on": on["rate"], "rate_diff": diff, "rate_diff_ci": ci,
                 "ci_above_zero": bool(ci[0] > 0), "perplexity_off": off["perplexity"],
                 "perplexity_on": on["perplexity"], "distinct2_off": off["distinct2"], "distinct2_on": on["distinct2"],
                 "mean_prob_off": off["mean_prob"], "mean_prob_on": on["mean_prob"], "by_scale": by_scale,
                 "baseline": None}
        if all("caa" in e["conditions"] for e in group):
            b = _pool(group, "caa")
            bd, bci = bootstrap_diff(b["hits"], off["hits"], b["n"], resamples, seed)
            entry["baseline"] = {"rate": b["rate"], "rate_diff": bd, "rate_diff_ci": bci, "ci_above_zero": bool(bci[0] > 0),
                                 "perplexity": b["perplexity"], "distinct2": b["distinct2"]}
        per_alignment[a] = entry
    above = sorted(a for a, e in per_alignment.items() if e["ci_above_zero"])
    out = {"available": True, "n_runs_evaluated": len(evals), "missing": sorted(set(run_paths) - set(evals)),
           "params": first["params"], "n_prompts": len(first.get("prompts") or []), "chat_template": first.get("chat_template"), "judge": judge,
           "per_run": per_run, "per_alignment": per_alignment,
           "criterion": {"rule": "on - off alignment-rate 95% CI above 0", "n_alignments": len(per_alignment),
                         "n_ci_above_zero": len(above), "alignments_ci_above_zero": above},
           "notes": notes}
    irm_prof = [np.asarray(e["irm_profile"], float) for e in evals.values() if e.get("irm_profile")]
    caa_prof = [np.asarray(e["baseline"]["profile"], float) for e in evals.values()
                if e.get("baseline") and e["baseline"].get("profile")]
    if irm_prof and caa_prof:
        irm_m = np.mean([p / p.mean() for p in irm_prof], axis=0)  # each run normalised to mean 1
        caa_m = np.mean([p / p.mean() for p in caa_prof], axis=0)
        from irm_hpc.analysis.stats import descending_ranks

        ri, rc = descending_ranks(irm_m), descending_ranks(caa_m)
        from scipy.stats import spearmanr

        rho = spearmanr(irm_m, caa_m)
        out["baseline"] = {
            "profile": "mean |vector| per index over layers (steering vector at the IRM's norm) vs mean |injection| "
                       "per index over layers and prompt tokens (IRM, scale 1); each run normalised to mean 1",
            "spearman": {"r": float(rho.statistic), "p": float(rho.pvalue)},
            "consensus": [{"index": int(i), "irm_rank": int(ri[i]), "caa_rank": int(rc[i]),
                           "irm_ratio_to_mean": float(irm_m[i]), "caa_ratio_to_mean": float(caa_m[i])} for i in consensus],
            "caa_top": [int(i) for i in np.argsort(-caa_m)[:10]], "irm_top": [int(i) for i in np.argsort(-irm_m)[:10]],
        }
        out["_arrays"] = {"irm_profile": irm_m, "caa_profile": caa_m}
    return out


def figure(path: Path, ev: dict, consensus: list[int]) -> Optional[str]:
    """``evaluation.png``: alignment rate and base-model perplexity vs IRM scale per alignment (steering
    baseline as crosses at scale 1), and the IRM's vs the steering vector's per-index profile."""
    from irm_hpc.analysis.figures import _fig

    if not ev.get("available"):
        return None
    arrays = ev.get("_arrays") or {}
    fig = _fig(13.0, 4.2 if not arrays else 7.5)
    gs = fig.add_gridspec(2 if arrays else 1, 2)
    ax_r, ax_p = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1])
    colors = {a: f"C{k}" for k, a in enumerate(sorted(ev["per_alignment"]))}
    for a, e in sorted(ev["per_alignment"].items()):
        xs = [float(s) for s in e["by_scale"]]
        ax_r.plot(xs, [v["rate"] for v in e["by_scale"].values()], "o-", color=colors[a], label=a, ms=4)
        ax_p.plot(xs, [v["perplexity"] for v in e["by_scale"].values()], "o-", color=colors[a], label=a, ms=4)
        if e.get("baseline"):
            ax_r.plot([1.08], [e["baseline"]["rate"]], "x", color=colors[a], ms=7, mew=2)
            ax_p.plot([1.08], [e["baseline"]["perplexity"]], "x", color=colors[a], ms=7, mew=2)
    ax_r.set_xlabel("IRM scale (0 = off, 1 = as trained); x = steering vector at the IRM's norm", fontsize=8)
    ax_r.set_ylabel("alignment rate (judge)", fontsize=8)
    ax_r.set_title("Share of continuations judged as the run's alignment", fontsize=9)
    ax_r.legend(fontsize=7, ncol=2)
    ax_p.set_xlabel("IRM scale", fontsize=8)
    ax_p.set_ylabel("perplexity under the base model", fontsize=8)
    ax_p.set_yscale("log")
    ax_p.set_title("Fluency cost: base-model perplexity of the continuations", fontsize=9)
    if arrays:
        ax = fig.add_subplot(gs[1, :])
        irm, caa = np.asarray(arrays["irm_profile"]), np.asarray(arrays["caa_profile"])
        x = np.arange(len(irm))
        ax.vlines(x, 0, irm, color="tab:blue", lw=0.7, label="IRM (mean |injection|, / mean)")
        ax.vlines(x, 0, -caa, color="tab:orange", lw=0.7, label="steering vector (mean |v|, / mean), drawn downward")
        for i in consensus:
            ax.annotate(str(i), (i, irm[i]), textcoords="offset points", xytext=(2, 2), fontsize=7, color="tab:red")
            ax.plot([i], [irm[i]], "v", color="tab:red", ms=5)
            ax.plot([i], [-caa[i]], "^", color="tab:red", ms=5)
        ax.axhline(0, color="0.5", lw=0.5)
        ax.set_xlim(-1, len(irm))
        ax.set_xlabel("index (hidden dim); red = consensus striation indices", fontsize=8)
        ax.set_title("Per-index profile: trained IRM (up) vs the data's contrastive direction (down)", fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    fig.savefig(path, dpi=110)
    return path.name


def report_lines(s: dict) -> list[str]:
    """The report section (markdown lines) of a summary's ``evaluation`` entry."""
    from irm_hpc.analysis.report import _fig, _fmt, _table

    ev = s.get("evaluation") or {}
    out = ["## Steering and judging (evaluation stage)", ""]
    if not ev.get("available"):
        out += ["No run has an evaluation (`sweep.evaluation.enabled` was false, or the evaluation jobs failed: "
                "see `logs/evaluation/`).", ""]
        return out
    j, p = ev["judge"], ev["params"]
    out.append(f"Each run generated {p['n_samples']} continuation(s) of {ev.get('n_prompts')} "
               f"prompts per scale ({', '.join(f'{x:g}' for x in p['scales'])}; 0 = IRM off), "
               f"{p['max_new_tokens']} new tokens, temperature {p['temperature']}, top-p {p['top_p']}, chat template "
               f"{'on' if ev.get('chat_template') else 'off'}. The judge (TF-IDF + logistic regression on the "
               f"GoEmotions {j.get('train_split')} split, {j.get('n_train')} single-label texts) scores "
               f"accuracy {_fmt(j.get('accuracy'))} and macro-F1 {_fmt(j.get('macro_f1'))} on the "
               f"{j.get('test_split')} split (n = {j.get('n')}; majority class `{j.get('majority_label')}`: accuracy "
               f"{_fmt(j.get('majority_accuracy'))}, macro-F1 {_fmt(j.get('majority_macro_f1'))}). Alignment rate = "
               "share of continuations the judge assigns to the run's alignment; 95 % CIs are percentile bootstraps "
               "over prompts (each prompt's samples of all the alignment's runs together); perplexity is the base model's (IRM off), pooled over tokens.")
    out.append("")
    rows = []
    for a, e in ev["per_alignment"].items():
        b = e.get("baseline") or {}
        rows.append([a, e["n_runs"], e["rate_off"], e["rate_on"], e["rate_diff"],
                     f"[{_fmt(e['rate_diff_ci'][0])}, {_fmt(e['rate_diff_ci'][1])}]", e["ci_above_zero"],
                     e["perplexity_off"], e["perplexity_on"], e["distinct2_off"], e["distinct2_on"],
                     b.get("rate"), f"[{_fmt(b['rate_diff_ci'][0])}, {_fmt(b['rate_diff_ci'][1])}]" if b else "-",
                     b.get("perplexity")])
    out.append(_table(["alignment", "runs", "rate off", "rate on", "on - off", "95% CI", "CI > 0", "ppl off", "ppl on",
                       "distinct-2 off", "distinct-2 on", "steering rate", "steering - off CI", "steering ppl"], rows))
    out.append("")
    c = ev["criterion"]
    out.append(f"**Criterion** ({c['rule']}): {c['n_ci_above_zero']} of {c['n_alignments']} alignments"
               f"{' (' + ', '.join(c['alignments_ci_above_zero']) + ')' if c['alignments_ci_above_zero'] else ''}.")
    out.append("")
    b = ev.get("baseline")
    if b:
        out.append(f"**Steering-vector baseline, per-index profile.** Spearman correlation of the IRM's per-index "
                   f"profile with the steering vector's: {_fmt(b['spearman']['r'])} (p = {_fmt(b['spearman']['p'])}). "
                   f"Top indices, IRM: {', '.join(map(str, b['irm_top'][:5]))}; steering vector: "
                   f"{', '.join(map(str, b['caa_top'][:5]))}.")
        out.append("")
        if b["consensus"]:
            out.append(_table(["consensus index", "IRM rank", "steering-vector rank", "IRM / mean", "steering / mean"],
                              [[e["index"], e["irm_rank"], e["caa_rank"], e["irm_ratio_to_mean"], e["caa_ratio_to_mean"]]
                               for e in b["consensus"]]))
            out.append("")
    for n in ev.get("notes", []):
        out += [f"> note: {n}", ""]
    out.append(_fig(s, "evaluation", "Alignment rate and base-model perplexity vs IRM scale per alignment "
                    "(crosses: steering vector at the IRM's norm); IRM vs steering-vector per-index profile."))
    return out

"""Reduce step (`reduce_runs`: cross-run statistics, summary, report, figures) and the local driver
(`analyze`: discover, map each run in a loop or a small process pool, reduce)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from irm_hpc.analysis import clustering as cl
from irm_hpc.analysis import stats as st
from irm_hpc.analysis.discover import discover_runs, read_manifest, safe_name, warn
from irm_hpc.analysis.params import AnalysisError, Params, parse_params
from irm_hpc.analysis.profiles import (SKIP_SUFFIX, RunProfile, load_profile, map_run, prefetch, profiles_dir,
                                       record_files)
from irm_hpc.layout import SweepDir

SUMMARY_SCHEMA = "irm_hpc.analysis/1"
TOP_INDICES = 5  # non-significant context rows per run in the summary

PathLike = Union[str, Path]


@dataclass
class RunResult:
    """One analysed run: its map output, the matrix used (and its source label), final and step-0 stats."""

    prof: RunProfile
    matrix: np.ndarray
    source: str
    stats: st.RunStats
    matrix0: Optional[np.ndarray]
    source0: str
    stats0: Optional[st.RunStats]

    @property
    def name(self) -> str:
        return self.prof.name


# ----------------------------------------------------------------------------- loading
def _load_runs(out: Path, skipped: list[dict]) -> list[RunProfile]:
    pdir = profiles_dir(out)
    for marker in sorted(pdir.glob(f"*{SKIP_SUFFIX}")):
        try:
            skipped.append(json.loads(marker.read_text()))
        except (OSError, ValueError):
            skipped.append({"name": marker.name[:-len(SKIP_SUFFIX)], "path": str(marker), "reason": "skipped by map"})
    runs = []
    for f in sorted(pdir.glob("*.npz")):
        try:
            runs.append(load_profile(f))
        except AnalysisError as exc:
            warn(f"skipping {f}: {exc}")
            skipped.append({"name": f.stem, "path": str(f), "reason": str(exc)})
    _note_unmapped(out, runs, skipped)
    return runs


def _note_unmapped(out: Path, runs: list[RunProfile], skipped: list[dict]) -> None:
    """If ``out`` is ``<sweep>/analysis``, list the sweep's tasks that have neither a profile nor a skip note."""
    sweep = out.resolve().parent
    if not SweepDir(sweep).manifest.is_file():
        return
    try:
        tasks = read_manifest(sweep)
    except AnalysisError:
        return
    known = {r.name for r in runs} | {str(s.get("name")) for s in skipped}
    for t in tasks:
        if safe_name(t["task_id"]) not in known:
            skipped.append({"name": t["task_id"], "path": str(t["out_dir"]),
                            "reason": "not mapped (map task failed or has not run)"})


def _check_compatible(runs: list[RunProfile]) -> None:
    groups: dict[tuple, list[str]] = {}
    for r in runs:
        groups.setdefault((r.meta["model_name"], r.hidden), []).append(r.name)
    if len(groups) > 1:
        desc = "; ".join(f"{m} (hidden {h}): {', '.join(n[:3])}{' ...' if len(n) > 3 else ''}"
                         for (m, h), n in groups.items())
        raise AnalysisError(f"runs of different models or hidden sizes are mixed ({desc}); analyse each model "
                            "separately")


def _analyse_run(prof: RunProfile, params: Params, skipped: list[dict]) -> Optional[RunResult]:
    m, src = prof.matrix(params.source)
    if m is None:
        reason = "no trained records yet (only step 0)"
    elif not np.isfinite(m).all():
        reason = f"non-finite values in {src} (diverged training?)"
    else:
        reason = ""
    if reason:
        warn(f"skipping {prof.name}: {reason}")
        skipped.append({"name": prof.name, "path": prof.meta.get("path"), "reason": reason})
        return None
    kw = dict(top_k_frac=params.top_k_frac, n_permutations=params.n_permutations, alpha=params.alpha,
              seed=params.seed)
    s = st.striation_stats(m, **kw)
    m0, src0 = prof.step0_matrix(params.source)
    s0 = st.striation_stats(m0, **kw) if m0 is not None and np.isfinite(m0).all() else None
    return RunResult(prof, m, src, s, m0 if s0 is not None else None, src0 if s0 is not None else "none", s0)


# ----------------------------------------------------------------------------- tables
def _f(x, nd: int = 6):
    """JSON-friendly float (None for NaN)."""
    x = float(x)
    return None if not np.isfinite(x) else round(x, nd) if abs(x) >= 1e-4 else x


def _run_entry(r: RunResult) -> dict:
    s, s0 = r.stats, r.stats0
    def row(i: int) -> dict:
        out = {"index": int(i), "count": int(s.count[i]), "continuity": _f(s.continuity[i]),
               "column_score": _f(s.column_score[i]), "p_raw": _f(s.p_raw[i]), "p_bh": _f(s.p_bh[i]),
               "p_fwer": _f(s.p_fwer[i]), "p_exact": _f(s.p_exact[i]), "significant": bool(s.significant[i])}
        if s0 is not None:
            out.update(step0_continuity=_f(s0.continuity[i]), step0_p_bh=_f(s0.p_bh[i]),
                       init_artifact=bool(s.significant[i] and s0.significant[i]))
        else:
            out.update(step0_continuity=None, step0_p_bh=None, init_artifact=None)
        return out

    order = np.lexsort((-s.column_score, -s.count))
    sig = [int(i) for i in order if s.significant[i]]
    top = [int(i) for i in order[:TOP_INDICES]]
    meta = r.prof.meta
    evals = meta.get("evals") or []  # profiles mapped before evals were stored have none
    final_eval = evals[-1] if evals else {}
    return {
        "name": r.name, "path": meta.get("path"), "alignment": r.prof.alignment, "seed": r.prof.seed,
        "layer_set": r.prof.layer_set, "injection_layers": r.prof.injection_layers, "n_inj": len(r.prof.injection_layers),
        "source": r.source, "step0_source": r.source0, "final_probe_step": meta.get("final_probe_step"),
        "final_train_step": meta.get("final_train_step"), "probe_tokens": meta.get("probe_tokens"),
        "finalized": meta.get("finalized"), "k": s.k, "n_striations": len(sig),
        "n_init_artifacts": int(sum(1 for i in sig if s0 is not None and s0.significant[i])),
        "step0_n_striations": int(s0.significant.sum()) if s0 is not None else None,
        "striations": [row(i) for i in sig], "top_indices": [row(i) for i in top],
        "alignment_gain": final_eval.get("alignment_gain"), "eval_step": final_eval.get("step"),
        "eval_target_loss": final_eval.get("eval_target_loss"), "eval_other_loss": final_eval.get("eval_other_loss"),
        "gain_history": [[e["step"], e["alignment_gain"]] for e in evals],
    }


def _gain_controls(entries: list[dict]) -> dict:
    """Alignment gain (nats/token, each run's last eval) per alignment, and its Spearman correlation with
    the run's number of striations (do runs that learned the alignment striate more?)."""
    from scipy.stats import spearmanr

    runs = [e for e in entries if e["alignment_gain"] is not None]
    if not runs:
        return {"available": False}
    per_alignment = {}
    for a in sorted({e["alignment"] for e in runs}):
        g = np.array([e["alignment_gain"] for e in runs if e["alignment"] == a])
        per_alignment[a] = {"runs": len(g), "mean": _f(g.mean()), "min": _f(g.min()), "max": _f(g.max()),
                            "positive": int((g > 0).sum())}
    gains = np.array([e["alignment_gain"] for e in runs])
    out = {"available": True, "n_runs": len(runs), "mean": _f(gains.mean()), "positive": int((gains > 0).sum()),
           "per_alignment": per_alignment, "spearman_vs_n_striations": None}
    n_sig = np.array([e["n_striations"] for e in runs])
    if len(runs) >= 3 and np.ptp(gains) > 0 and np.ptp(n_sig) > 0:
        r, p = spearmanr(gains, n_sig)
        out["spearman_vs_n_striations"] = {"r": _f(r), "p": _f(p)}
    return out


def _consensus(results: list[RunResult], params: Params) -> dict:
    n = len(results)
    hidden = results[0].prof.hidden
    sig = np.stack([r.stats.significant for r in results])
    has0 = np.array([r.stats0 is not None for r in results])
    sig0 = np.stack([r.stats0.significant if r.stats0 is not None else np.zeros(hidden, bool) for r in results])
    cont = np.stack([r.stats.continuity for r in results])
    colsc = np.stack([r.stats.column_score for r in results])
    share = sig.mean(axis=0)
    aligns = [r.prof.alignment for r in results]
    align_names = sorted(set(aligns))
    a_idx = {a: np.array([x == a for x in aligns]) for a in align_names}
    share0 = sig0[has0].mean(axis=0) if has0.any() else np.zeros(hidden)

    def verdict(i: int) -> str:
        if not has0.any():
            return "unknown"
        both = (sig[:, i] & sig0[:, i] & has0).sum()
        base = (sig[:, i] & has0).sum()
        if base == 0:
            return "unknown"
        return "init_artifact" if both / base > 0.5 else "learned"

    def entry(i: int) -> dict:
        return {"index": int(i), "n_runs_significant": int(sig[:, i].sum()), "share": _f(share[i]),
                "per_alignment": {a: {"significant": int(sig[a_idx[a], i].sum()), "runs": int(a_idx[a].sum())}
                                  for a in align_names},
                "mean_continuity": _f(cont[:, i].mean()), "mean_column_score": _f(colsc[:, i].mean()),
                "step0_share": _f(share0[i]) if has0.any() else None, "control": verdict(i)}

    thr = params.consensus_share
    cons = [i for i in np.lexsort((-colsc.mean(0), -share)) if share[i] >= thr and share[i] > 0]
    specific = []
    for a in align_names:
        m = a_idx[a]
        sa = sig[m].mean(axis=0)
        so = sig[~m].mean(axis=0) if (~m).any() else np.zeros(hidden)
        need = min(2, int(m.sum()))  # replicated across the alignment's runs (seeds) when it has >= 2
        for i in np.flatnonzero((sa >= thr) & (sig[m].sum(axis=0) >= need) & (so < thr) & (share < thr)):
            specific.append({"alignment": a, "index": int(i), "share_in_alignment": _f(sa[i]),
                             "share_elsewhere": _f(so[i]) if (~m).any() else None,
                             "mean_continuity_in_alignment": _f(cont[m, i].mean()), "control": verdict(int(i))})
    specific.sort(key=lambda e: (e["alignment"], -(e["share_in_alignment"] or 0), e["index"]))
    step0_cons = [int(i) for i in np.flatnonzero(share0 >= thr)] if has0.any() else []
    return {"share_threshold": thr, "n_runs": n, "indices": [entry(int(i)) for i in cons],
            "alignment_specific": specific, "step0_consensus": step0_cons,
            "share": share, "share0": share0, "mean_column_score": colsc.mean(axis=0),
            "mean_continuity": cont.mean(axis=0), "has_step0": bool(has0.any())}


def _seed_controls(results: list[RunResult]) -> dict:
    """Per (alignment, layer set) with >= 2 seeds: agreement of the significant sets across seeds."""
    groups: dict[tuple, list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.prof.alignment, r.prof.layer_set), []).append(r)
    out = []
    for (a, ls), rs in sorted(groups.items()):
        if len({r.prof.seed for r in rs}) < 2:
            continue
        sets = [set(np.flatnonzero(r.stats.significant).tolist()) for r in rs]
        jac = [len(x & y) / len(x | y) for i, x in enumerate(sets) for y in sets[i + 1:] if x | y]
        counts: dict[int, int] = {}
        for s in sets:
            for i in s:
                counts[i] = counts.get(i, 0) + 1
        out.append({"alignment": a, "layer_set": ls, "seeds": sorted(r.prof.seed for r in rs),
                    "mean_jaccard": _f(np.mean(jac)) if jac else None,
                    "in_all_seeds": sorted(i for i, c in counts.items() if c == len(rs)),
                    "in_one_seed_only": sorted(i for i, c in counts.items() if c == 1)})
    return {"groups": out}


def _base_relation(results: list[RunResult], cons: dict, params: Params) -> dict:
    bases = [r.prof.base for r in results if r.prof.base is not None]
    if not bases:
        return {"available": False}
    base = np.mean([b.mean(axis=0) for b in bases], axis=0)  # (hidden,) mean |resid| over layers and runs
    per_layer = np.mean(bases, axis=0) if len({b.shape for b in bases}) == 1 else bases[0]
    prof = cons["mean_column_score"]
    sd = base.std()
    z = (base - base.mean()) / sd if sd > 0 else np.zeros_like(base)
    rank, prank = st.descending_ranks(base), st.descending_ranks(prof)
    cons_idx = {e["index"] for e in cons["indices"]}
    top = np.argsort(-base)[:params.n_outliers]
    outliers = [{"index": int(i), "base_mean_abs": _f(base[i]), "base_z": _f(z[i]), "base_rank": int(rank[i]),
                 "striation_share": _f(cons["share"][i]), "mean_column_score": _f(prof[i]),
                 "column_score_rank": int(prank[i]), "consensus": int(i) in cons_idx} for i in top]
    for e in cons["indices"]:
        e["base_rank"], e["base_z"] = int(rank[e["index"]]), _f(z[e["index"]])
    return {"available": True, "n_runs_with_base": len(bases), "correlation": st.corr_with_p(prof, base),
            "correlation_share": st.corr_with_p(cons["share"], base),
            "top_outliers": outliers, "consensus_in_top_outliers": sorted(cons_idx & {int(i) for i in top}),
            "profile": base, "per_layer": per_layer, "z": z}


def _mechanism(paths: list[str], cons: dict, ab: dict, params: Params) -> dict:
    """The ``mechanism`` section (``analysis.mechanism``) for the consensus indices and the ablated ones,
    read from the weights of the runs' frozen model (loaded on the CPU); ``available: False`` with the
    reason when there is no index, no run dir, ``mechanism=false``, or the model does not load."""
    from irm_hpc.analysis import mechanism
    from irm_hpc.errors import IrmError, one_line

    indices = list(dict.fromkeys([e["index"] for e in cons["indices"]] + [int(i) for i in ab.get("indices", {})]))
    why = ("mechanism=false" if not params.mechanism else "no consensus striation index" if not indices
           else "no run directory to load the model from" if not paths else "")
    if why:
        return {"available": False, "reason": why}
    try:
        lm, tok = mechanism.load_for_runs(paths)
    except (IrmError, OSError) as exc:
        warn(f"mechanism: cannot load the model ({one_line(exc)})")
        return {"available": False, "reason": f"model not loadable: {one_line(exc)}"}
    base_rank = {e["index"]: e.get("base_rank") for e in cons["indices"]}
    out = mechanism.mechanism(lm, tok, indices, base_rank)
    for i, e in out["indices"].items():
        e["summary"] = mechanism.describe(e, out["hidden_size"])
    return out


# ----------------------------------------------------------------------------- reduce
def reduce_runs(out_dir: PathLike, params: Union[None, Params, list, dict] = None, *,
                skipped: Optional[list[dict]] = None) -> dict:
    """Cross-run analysis of ``<out_dir>/profiles/*.npz``; writes ``summary.json``, ``report.md`` and
    ``figures/*.png`` into ``out_dir`` and returns the summary dict (schema in docs/architecture.md).

    ``skipped``: runs skipped before the map (discovery), reported with the map's own skip notes.
    Raises AnalysisError when no profile is usable (none mapped, all skipped) or when runs of
    different models / hidden sizes are mixed.
    """
    return _reduce(Path(out_dir), parse_params(params), list(skipped or []), {})


def _reduce(out: Path, params: Params, skipped: list[dict], timing: dict) -> dict:
    """`reduce_runs` with extra ``timing`` entries (the map's, from `analyze`) put into the summary before
    ``summary.json`` and ``report.md`` are written (once)."""
    t0 = time.perf_counter()
    profs = _load_runs(out, skipped)
    if not profs:
        why = "; ".join(f"{s.get('name') or s.get('path')}: {s.get('reason')}" for s in skipped[:3])
        more = f" (+{len(skipped) - 3} more)" if len(skipped) > 3 else ""
        raise AnalysisError(f"nothing to analyse in {profiles_dir(out)}: no usable run profile"
                            + (f"; skipped {len(skipped)}: {why}{more}" if skipped else "; run the map step first"))
    _check_compatible(profs)
    profs.sort(key=lambda p: (p.alignment, p.seed, p.layer_set, p.name))
    results = [r for r in (_analyse_run(p, params, skipped) for p in profs) if r is not None]
    if not results:
        raise AnalysisError(f"nothing to analyse in {out}: all {len(profs)} runs lack trained records "
                            "(see the warnings above)")
    summary = build_summary(results, params, skipped)
    summary["out_dir"] = str(out)
    summary["timing"] = {"reduce_seconds": None, **timing}
    notes = summary["notes"]
    maps = {json.dumps({k: v for k, v in r.prof.meta.get("params", {}).items() if k in ("last_records", "block_rows")},
                       sort_keys=True) for r in results}
    if len(maps) > 1:
        notes.append(f"runs were mapped with different map parameters: {sorted(maps)}")
    out.mkdir(parents=True, exist_ok=True)
    figs = {}
    if params.figures:
        from irm_hpc.analysis import figures

        figs = figures.write_figures(out, results, summary, params)
    summary["figures"] = figs
    summary["timing"]["reduce_seconds"] = round(time.perf_counter() - t0, 3)
    from irm_hpc.analysis import report

    report.write_outputs(out, summary)
    return summary


def build_summary(results: list[RunResult], params: Params, skipped: list[dict]) -> dict:
    """The JSON-ready summary (arrays used by the figures are kept under keys starting with ``_``)."""
    p0 = results[0].prof
    cons = _consensus(results, params)
    names = [r.name for r in results]
    profiles = np.stack([r.stats.column_score if params.profile == "column_score" else r.matrix.mean(axis=0)
                         for r in results])
    corr = cl.correlations(profiles)
    factors = {"alignment": [r.prof.alignment for r in results], "seed": [str(r.prof.seed) for r in results]}
    if len({r.prof.layer_set for r in results}) > 1:
        factors["layer_set"] = [r.prof.layer_set for r in results]
    grouping = cl.grouping_analysis(profiles, corr["pearson"], factors, params.n_clusters, params.seed)
    base = _base_relation(results, cons, params)
    nulls = {}
    for r in results:
        for s in (r.stats, r.stats0):
            if s is None:
                continue
            key = f"hidden={s.null.hidden} n_inj={len(s.null.members)} members={sorted(set(s.null.members))}"
            if key not in nulls:
                nulls[key] = {"hidden": s.null.hidden, "members": [int(x) for x in s.null.members],
                              "n_permutations": s.null.n_permutations, "pooled_samples": s.null.n_samples,
                              **{k: v for k, v in st.null_crosscheck(s.null).items()}}
    entries = [_run_entry(r) for r in results]
    from irm_hpc.analysis import evaluation

    ev = evaluation.collect({r.name: r.prof.meta["path"] for r in results if r.prof.meta.get("path")},
                            {r.name: r.prof.alignment for r in results}, [e["index"] for e in cons["indices"]],
                            seed=params.seed)
    from irm_hpc.analysis import ablation

    paths = {r.name: r.prof.meta["path"] for r in results if r.prof.meta.get("path")}
    ab = ablation.collect(paths, {r.name: r.prof.alignment for r in results})
    mech = _mechanism(list(paths.values()), cons, ab, params)
    summary = {
        "schema": SUMMARY_SCHEMA, "params": params.as_dict(),
        "model": {"model_name": p0.meta["model_name"], "hidden_size": p0.hidden, "n_layers": p0.meta["n_layers"]},
        "k": results[0].stats.k,
        "n_runs": len(results), "alignments": sorted({r.prof.alignment for r in results}),
        "seeds": sorted({r.prof.seed for r in results}), "layer_sets": sorted({r.prof.layer_set for r in results}),
        "runs": entries,
        "skipped": skipped,
        "null": list(nulls.values()),
        "correlation": {"profile": params.profile, "names": names,
                        "pearson": np.round(corr["pearson"], 6).tolist(), "spearman": np.round(corr["spearman"], 6).tolist(),
                        "alignment_blocks": {"pearson": cl.block_means(corr["pearson"], factors["alignment"]),
                                             "spearman": cl.block_means(corr["spearman"], factors["alignment"])},
                        "seed_blocks": {"pearson": cl.block_means(corr["pearson"], factors["seed"])}},
        "clustering": grouping,
        "consensus": {k: v for k, v in cons.items() if k in ("share_threshold", "n_runs", "indices",
                                                              "alignment_specific", "step0_consensus")},
        "controls": {
            "step0": {"available": cons["has_step0"],
                      "n_runs_with_step0": int(sum(r.stats0 is not None for r in results)),
                      "consensus_init_artifacts": [e["index"] for e in cons["indices"] if e["control"] == "init_artifact"],
                      "consensus_learned": [e["index"] for e in cons["indices"] if e["control"] == "learned"],
                      "step0_consensus": cons["step0_consensus"],
                      "run_striations_total": int(sum(e["n_striations"] for e in entries)),
                      "run_init_artifacts_total": int(sum(e["n_init_artifacts"] for e in entries))},
            "seeds": _seed_controls(results),
            "alignment_gain": _gain_controls(entries)},
        "base_model": {k: v for k, v in base.items() if k not in ("profile", "per_layer", "z")},
        "evaluation": ev,
        "ablation": {k: v for k, v in ab.items() if not k.startswith("_")},
        "mechanism": {k: v for k, v in mech.items() if not k.startswith("_")},
        "notes": [],
        "_arrays": {"profiles": profiles, "pearson": corr["pearson"], "share": cons["share"],
                    "share0": cons["share0"], "mean_column_score": cons["mean_column_score"],
                    "mean_continuity": cons["mean_continuity"], "base_profile": base.get("profile"),
                    "base_per_layer": base.get("per_layer"), "linkage": cl.linkage_matrix(corr["pearson"]),
                    "ablation_null": ab.get("_null"), "norm_gains": mech.get("_arrays")},
    }
    return summary


# ----------------------------------------------------------------------------- analyze
def _default_out(inputs: list) -> Path:
    first = Path(str(inputs[0])) if inputs else Path(".")
    if len(inputs) == 1 and first.is_dir() and not any(c in str(first) for c in "*?["):
        return SweepDir(first).analysis
    return Path("striation_analysis")


def _map_one(args: tuple) -> tuple[str, Optional[str], Optional[str]]:
    """Pool worker: (name, npz path or None, error or None)."""
    ref, out_dir, params = args
    try:
        return ref.name, str(map_run(ref, out_dir, params)), None
    except AnalysisError as exc:
        return ref.name, None, str(exc)


def analyze(inputs: Union[PathLike, Iterable[PathLike]], out_dir: Optional[PathLike] = None,
            params: Union[None, Params, list, dict] = None, *, progress: bool = True) -> dict:
    """Discover runs in ``inputs`` (`discover_runs`), map each (`map_run`; ``params.workers`` processes,
    a tqdm bar on stderr), then `reduce_runs` into ``out_dir`` (default ``<input>/analysis`` for a single
    directory, else ``./striation_analysis``). Profiles of runs not in ``inputs`` are removed from
    ``<out_dir>/profiles`` first. Returns the summary dict. Raises AnalysisError if nothing can be analysed.
    """
    params = parse_params(params)
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    out = Path(out_dir) if out_dir is not None else _default_out(items)
    skipped: list[dict] = []
    refs = discover_runs(items, skipped=skipped)
    pdir = profiles_dir(out)
    pdir.mkdir(parents=True, exist_ok=True)
    names = {r.name for r in refs}
    for f in [*pdir.glob("*.npz"), *pdir.glob(f"*{SKIP_SUFFIX}")]:
        stem = f.name[:-len(SKIP_SUFFIX)] if f.name.endswith(SKIP_SUFFIX) else f.stem
        if stem not in names:
            f.unlink()
    t0 = time.perf_counter()
    tasks = [(r, str(out), params) for r in refs]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="map runs", unit="run", mininterval=0.5, file=sys.stderr)
    results = []
    workers = params.map_workers(len(tasks))
    if workers > 1:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # no fork of a process holding HDF5/BLAS state
        with ctx.Pool(workers) as pool:
            for res in pool.imap_unordered(_map_one, tasks):
                results.append(res)
                if bar is not None:
                    bar.update(1)
    else:
        for i, t in enumerate(tasks):
            if i + 1 < len(tasks):  # read the next run's file ahead while this one is decompressed
                prefetch(record_files(tasks[i + 1][0].path))
            results.append(_map_one(t))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    for name, _, err in results:
        if err:
            warn(f"skipping {name}: {err}")
    timing = {"map_seconds": round(time.perf_counter() - t0, 3), "map_workers": workers}
    return _reduce(out, params, skipped, timing)


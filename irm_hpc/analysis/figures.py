"""PNG figures of the reduce step (matplotlib object API with the Agg canvas: no pyplot, no display).

* ``run_heatmaps.png``: per-run layer x index heatmaps of mean |injection| (the paper's view,
  arXiv 2407.03621 Fig. 2: vertical striations = one index large across layers), up to
  ``max_heatmap_runs`` runs, one per alignment first.
* ``alignment_heatmaps.png``: the mean heatmap per alignment.
* ``correlation.png``: cross-run Pearson correlation of the per-index profiles, ordered by an
  average-linkage dendrogram on 1 - r.
* ``striation_scores.png``: share of runs in which each index is a significant striation (final and
  step 0), consensus and alignment-specific indices marked and labelled without overlaps; mean column
  score per index; legend and the alignment-specific indices per alignment in a side panel.
* ``evaluation.png`` (``analysis.evaluation``): judged alignment rate and perplexity vs IRM scale per
  alignment, and the IRM's vs the steering vector's per-index profile (sweeps with the evaluation stage).
* ``base_outliers.png``: the base model's mean |residual| per index (mean over layers) with its top
  outlier dimensions and the consensus striations marked; consensus profile vs base profile.

Model layers without an injection are blank rows. With more than MAX_COLS indices, columns are
max-pooled into MAX_COLS bins so that one-index striations stay visible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from irm_hpc.layout import ANALYSIS_FIGURES

MAX_COLS = 1024
DPI = 110


def _fig(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=DPI)
    return path.name


def _grid(matrix: np.ndarray, layers: list[int], n_layers: int) -> np.ndarray:
    """(n_inj, hidden) -> (n_layers, hidden) with NaN rows for layers without an injection."""
    g = np.full((n_layers, matrix.shape[1]), np.nan, np.float32)
    g[np.asarray(layers, int)] = matrix
    return g


def _pool(g: np.ndarray) -> tuple[np.ndarray, float]:
    """Max-pool columns into <= MAX_COLS bins; returns (pooled, indices per bin)."""
    h = g.shape[1]
    if h <= MAX_COLS:
        return g, 1.0
    f = int(np.ceil(h / MAX_COLS))
    pad = np.full((g.shape[0], f * int(np.ceil(h / f)) - h), np.nan, g.dtype)
    x = np.concatenate([g, pad], axis=1).reshape(g.shape[0], -1, f)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmax(x, axis=2), float(f)


def _heat(ax, g: np.ndarray, title: str, fig) -> None:
    import matplotlib

    pooled, f = _pool(g)
    finite = pooled[np.isfinite(pooled)]
    vmax = float(np.percentile(finite, 99.5)) if finite.size else 1.0
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(pooled), aspect="auto", origin="lower", interpolation="nearest",
                   cmap=cmap, vmin=0.0, vmax=vmax if vmax > 0 else 1.0,
                   extent=(-0.5, g.shape[1] - 0.5, -0.5, g.shape[0] - 0.5))
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("index (hidden dim)" + (f", max over {int(f)} per column" if f > 1 else ""), fontsize=8)
    ax.set_ylabel("layer", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=ax, label="mean |injection|", shrink=0.9)


def _pick_runs(results: list, n: int) -> list:
    """Up to n runs, one per alignment first (round robin over alignments)."""
    by: dict[str, list] = {}
    for r in results:
        by.setdefault(r.prof.alignment, []).append(r)
    out, depth = [], 0
    while len(out) < min(n, len(results)):
        for a in sorted(by):
            if depth < len(by[a]) and len(out) < n:
                out.append(by[a][depth])
        depth += 1
    return out


def run_heatmaps(path: Path, results: list, n_layers: int, max_runs: int) -> str:
    runs = _pick_runs(results, max_runs)
    cols = 2 if len(runs) > 1 else 1
    rows = int(np.ceil(len(runs) / cols))
    fig = _fig(6.5 * cols, 2.6 * rows + 0.4)
    for i, r in enumerate(runs):
        ax = fig.add_subplot(rows, cols, i + 1)
        _heat(ax, _grid(r.matrix, r.prof.injection_layers, n_layers),
              f"{r.name} ({r.prof.alignment}, seed {r.prof.seed}; {r.source})", fig)
    fig.suptitle("Per-run mean |injection| per layer and index (final)", fontsize=10)
    return _save(fig, path)


def alignment_heatmaps(path: Path, results: list, n_layers: int) -> str:
    import warnings

    aligns = sorted({r.prof.alignment for r in results})
    fig = _fig(8.0, 2.4 * len(aligns) + 0.4)
    for i, a in enumerate(aligns):
        grids = [_grid(r.matrix, r.prof.injection_layers, n_layers) for r in results if r.prof.alignment == a]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(np.stack(grids), axis=0)
        ax = fig.add_subplot(len(aligns), 1, i + 1)
        _heat(ax, mean, f"alignment {a}: mean over {len(grids)} run(s)", fig)
    fig.suptitle("Mean |injection| per alignment", fontsize=10)
    return _save(fig, path)


def _dendro(ax, linkage: np.ndarray, labels: list[str]) -> list[int]:
    """Draw a dendrogram (scipy ``dendrogram(no_plot=True)`` coordinates) on ``ax``; returns leaf order."""
    from scipy.cluster.hierarchy import dendrogram

    d = dendrogram(linkage, no_plot=True, labels=labels)
    for xs, ys in zip(d["icoord"], d["dcoord"]):
        ax.plot(xs, ys, color="0.3", lw=0.8)
    ax.set_xlim(0, 10 * len(labels))
    ax.set_xticks([])
    ax.set_ylabel("1 - r", fontsize=8)
    ax.tick_params(labelsize=7)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    return [int(i) for i in d["leaves"]]


def correlation(path: Path, summary: dict) -> str:
    arr = summary["_arrays"]
    names = summary["correlation"]["names"]
    aligns = [r["alignment"] for r in summary["runs"]]
    pear = np.asarray(arr["pearson"])
    n = len(names)
    size = min(14.0, 3.5 + 0.28 * n)
    fig = _fig(size + 1.2, size + 1.6)
    gs = fig.add_gridspec(2, 1, height_ratios=[1, 4])
    order = list(range(n))
    if arr.get("linkage") is not None:
        order = _dendro(fig.add_subplot(gs[0]), arr["linkage"], names)
    ax = fig.add_subplot(gs[1])
    m = pear[np.ix_(order, order)]
    im = ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    fs = 7 if n <= 30 else 5
    labels = [f"{names[i]}" for i in order]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=fs)
    ax.set_yticks(range(n), labels, fontsize=fs)
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    acol = {a: cmap(i % 10) for i, a in enumerate(sorted(set(aligns)))}
    for t, i in zip(ax.get_xticklabels(), order):
        t.set_color(acol[aligns[i]])
    for t, i in zip(ax.get_yticklabels(), order):
        t.set_color(acol[aligns[i]])
    fig.colorbar(im, ax=ax, label=f"Pearson r ({summary['correlation']['profile']})", shrink=0.8)
    fig.suptitle("Cross-run correlation of per-index profiles (labels coloured by alignment)", fontsize=10)
    return _save(fig, path)


# label offsets from the point (points), in order of preference: right, left, then further up / down
LABEL_OFFSETS = [(dx, dy) for dy in (3, 13, -11, 23, -21, 33, 43, 53) for dx in (3, -3)]
MARKER_HALF = 3.0  # points: half the size of a labelled point's marker (an obstacle for other labels)
MAX_SPECIFIC_LABELS = 40  # alignment-specific points labelled on the plot (highest share first); all are marked
MAX_LISTED = 10  # alignment-specific indices listed per alignment in the side panel
MAX_LINES = 30  # lines of that list (fontsize 7 fits ~35 below the legend)


def _place_labels(ax, labels: list[tuple[float, float, str, str]], fontsize: float, n_required: int) -> None:
    """Annotate ``(x, y, text, color)`` points without overlaps: each label, in order, takes the first
    offset of LABEL_OFFSETS (text right of the point for dx > 0, left of it for dx < 0) whose box (text
    plus a margin of 0.4 x fontsize) lies inside the axes and overlaps neither a label placed before nor
    another labelled point's marker (greedy; boxes measured by the renderer, so the figure layout must be
    final). A label moved 10 points or more off its point gets a thin leader line. If no offset fits, the
    first ``n_required`` labels take the first offset anyway; the others are left out (their points stay
    marked)."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    margin = 0.4 * fontsize * fig.dpi / 72.0  # pixels

    def label(x: float, y: float, text: str, color: str, off: tuple[int, int]):
        leader = dict(arrowstyle="-", lw=0.5, color=color, shrinkA=0, shrinkB=3) if abs(off[1]) >= 10 else None
        ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=off, fontsize=fontsize, color=color,
                          ha="left" if off[0] >= 0 else "right", va="center", arrowprops=leader,
                          bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.75))
        ann.set_in_layout(False)
        ann.update_positions(renderer)
        return ann, Text.get_window_extent(ann, renderer).padded(margin)  # the text alone, not the leader

    r = MARKER_HALF * fig.dpi / 72.0
    markers = []  # the labelled points' markers are obstacles too (a label must not hide another point)
    for x, y, *_ in labels:
        px, py = ax.transData.transform((x, y))
        markers.append(Bbox.from_extents(px - r, py - r, px + r, py + r))
    placed = []
    for k, (x, y, text, color) in enumerate(labels):
        others = placed + markers[:k] + markers[k + 1:]
        for off in LABEL_OFFSETS:
            ann, box = label(x, y, text, color, off)
            inside = box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(b) for b in others):
                placed.append(box)
                break
            ann.remove()
        else:
            if k < n_required:
                placed.append(label(x, y, text, color, LABEL_OFFSETS[0])[1])


def _specific_text(specific: list[dict]) -> str:
    """Side-panel text: the alignment-specific indices per alignment, in the summary's order (most
    replicated first), at most MAX_LISTED per alignment and MAX_LINES lines in all."""
    import textwrap

    by: dict[str, list[int]] = {}
    for e in specific:
        by.setdefault(e["alignment"], []).append(int(e["index"]))
    lines = ["alignment-specific indices", "(orange squares):"]
    for a in sorted(by):
        idx = by[a]
        more = f" +{len(idx) - MAX_LISTED}" if len(idx) > MAX_LISTED else ""
        lines += textwrap.wrap(f"{a}: {', '.join(map(str, idx[:MAX_LISTED]))}{more}", 30, subsequent_indent="    ")
    if len(lines) > MAX_LINES:
        lines = lines[:MAX_LINES - 1] + ["... (all in report.md)"]
    return "\n".join(lines)


def striation_scores(path: Path, summary: dict) -> str:
    """Share of runs in which each index is a significant striation (top; final and step 0) and the mean
    column score per index (bottom). Consensus / init-artifact indices are labelled on the plot,
    alignment-specific ones marked and labelled with their index (once per index, whatever the number of
    alignments; the MAX_SPECIFIC_LABELS most shared); the legend and the per-alignment list of alignment-specific indices sit in a side panel,
    outside the axes. Labels are placed without overlaps (`_place_labels`; an alignment-specific label that
    finds no free place is left out, its index stays in the side list)."""
    from matplotlib.lines import Line2D

    arr = summary["_arrays"]
    share, share0 = np.asarray(arr["share"]), np.asarray(arr["share0"])
    score = np.asarray(arr["mean_column_score"])
    cons = summary["consensus"]
    idx = np.arange(len(share))
    fig = _fig(12.5, 6.0)
    gs = fig.add_gridspec(2, 2, width_ratios=[5.0, 1.2])
    ax = fig.add_subplot(gs[0, 0])
    ax2 = fig.add_subplot(gs[1, 0], sharex=ax)
    side = fig.add_subplot(gs[:, 1])
    side.axis("off")
    ax.vlines(idx, 0, share, color="tab:blue", lw=1.0)
    handles = [Line2D([], [], color="tab:blue", lw=1.0, label="final")]
    if summary["controls"]["step0"]["available"]:
        ax.plot(idx, share0, "_", color="tab:gray", ms=4)
        handles.append(Line2D([], [], color="tab:gray", marker="_", ls="none", ms=6, label="step 0 (untrained IRM)"))
    ax.axhline(cons["share_threshold"], color="k", ls=":", lw=0.8)
    handles.append(Line2D([], [], color="k", ls=":", lw=0.8, label="consensus share"))
    handles += [Line2D([], [], color="tab:red", marker="o", ls="none", ms=6, label="consensus (learned)"),
                Line2D([], [], color="tab:gray", marker="v", ls="none", ms=6, label="consensus, init artifact"),
                Line2D([], [], color="tab:orange", marker="s", ls="none", ms=5, label="alignment-specific")]
    labels = []
    for e in cons["indices"]:
        i = e["index"]
        art = e["control"] == "init_artifact"
        color = "tab:gray" if art else "tab:red"
        ax.plot(i, share[i], "v" if art else "o", color=color, ms=6)
        labels.append((i, share[i], f"{i}{' (init)' if art else ''}", color))
    cons_idx = {e["index"] for e in cons["indices"]}
    spec = sorted({e["index"] for e in cons["alignment_specific"]} - cons_idx)
    for i in spec:
        ax.plot(i, share[i], "s", color="tab:orange", ms=5)
    for i in sorted(sorted(spec, key=lambda i: -share[i])[:MAX_SPECIFIC_LABELS]):  # the most shared ones
        labels.append((i, share[i], str(i), "tab:orange"))
    ax.set_ylabel("share of runs significant", fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_xlim(-1, len(share))
    ax.set_title(f"Striations: share of runs in which an index is significant (BH p < {summary['params']['alpha']})",
                 fontsize=9)
    ax2.vlines(idx, 0, score, color="tab:green", lw=0.8)
    for e in cons["indices"]:
        ax2.plot(e["index"], score[e["index"]], "o", color="tab:red", ms=4)
    ax2.set_ylabel("mean column score (z)", fontsize=8)
    ax2.set_xlabel("index (hidden dim)", fontsize=8)
    for a in (ax, ax2):
        a.tick_params(labelsize=7)
    side.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, 1.0), fontsize=7, frameon=False,
                borderaxespad=0.0)
    if cons["alignment_specific"]:
        side.text(0.0, 0.62, _specific_text(cons["alignment_specific"]), transform=side.transAxes, va="top",
                  ha="left", fontsize=7, color="0.15", family="monospace")
    fig.canvas.draw()  # fix the layout, then place the labels in display coordinates
    _place_labels(ax, labels, 7, n_required=len(cons["indices"]))
    return _save(fig, path)


def base_outliers(path: Path, summary: dict) -> Optional[str]:
    arr = summary["_arrays"]
    base = arr.get("base_profile")
    if base is None:
        return None
    base = np.asarray(base)
    score = np.asarray(arr["mean_column_score"])
    bm = summary["base_model"]
    cons = {e["index"] for e in summary["consensus"]["indices"]}
    fig = _fig(11.0, 6.5)
    gs = fig.add_gridspec(2, 2, width_ratios=[3, 1.3])
    ax = fig.add_subplot(gs[0, :])
    ax.vlines(np.arange(len(base)), 0, base, color="0.4", lw=0.8)
    for o in bm["top_outliers"]:
        i = o["index"]
        ax.plot(i, base[i], "o", color="tab:purple", ms=4)
        ax.annotate(str(i), (i, base[i]), textcoords="offset points", xytext=(2, 2), fontsize=7, color="tab:purple")
    for i in cons:
        ax.plot(i, base[i], "v", color="tab:red", ms=6)
    ax.set_yscale("log")
    ax.set_xlim(-1, len(base))
    ax.set_xlabel("index (hidden dim)", fontsize=8)
    ax.set_ylabel("base mean |residual| (mean over layers)", fontsize=8)
    ax.set_title("Base model (IRM off): residual magnitude per index; purple = top outliers, red = consensus "
                 "striations", fontsize=9)
    ax2 = fig.add_subplot(gs[1, 0])
    per_layer = arr.get("base_per_layer")
    if per_layer is not None:
        pooled, f = _pool(np.asarray(per_layer, np.float32))
        im = ax2.imshow(np.log10(np.maximum(pooled, 1e-6)), aspect="auto", origin="lower", cmap="magma",
                        interpolation="nearest", extent=(-0.5, base.size - 0.5, -0.5, pooled.shape[0] - 0.5))
        fig.colorbar(im, ax=ax2, label="log10 mean |resid|", shrink=0.9)
        ax2.set_ylabel("layer", fontsize=8)
        ax2.set_title("base mean |residual| per layer (log10)", fontsize=8)
        ax2.set_xlabel("index", fontsize=8)
    ax3 = fig.add_subplot(gs[1, 1])
    ax3.scatter(base, score, s=4, color="0.5")
    for i in cons:
        ax3.scatter([base[i]], [score[i]], s=16, color="tab:red")
    ax3.set_xscale("log")
    c = bm.get("correlation") or {}
    ax3.set_title(f"Pearson {c.get('pearson', float('nan')):.2f}, Spearman {c.get('spearman', float('nan')):.2f}",
                  fontsize=8)
    ax3.set_xlabel("base mean |resid|", fontsize=8)
    ax3.set_ylabel("mean column score", fontsize=8)
    for a in (ax, ax2, ax3):
        a.tick_params(labelsize=7)
    return _save(fig, path)


def write_figures(out: Path, results: list, summary: dict, params) -> dict[str, str]:
    """Write every figure into ``out/figures``; returns {name: path relative to ``out``}."""
    d = out / ANALYSIS_FIGURES
    d.mkdir(parents=True, exist_ok=True)
    n_layers = int(summary["model"]["n_layers"])
    figs = {
        "run_heatmaps": run_heatmaps(d / "run_heatmaps.png", results, n_layers, params.max_heatmap_runs),
        "alignment_heatmaps": alignment_heatmaps(d / "alignment_heatmaps.png", results, n_layers),
        "correlation": correlation(d / "correlation.png", summary),
        "striation_scores": striation_scores(d / "striation_scores.png", summary),
    }
    b = base_outliers(d / "base_outliers.png", summary)
    if b:
        figs["base_outliers"] = b
    from irm_hpc.analysis import evaluation

    e = evaluation.figure(d / "evaluation.png", summary.get("evaluation") or {},
                          [c["index"] for c in summary["consensus"]["indices"]])
    if e:
        figs["evaluation"] = e
    from irm_hpc.analysis import ablation, mechanism

    arrays = summary.get("_arrays", {})
    a = ablation.figure(d / "ablation.png", {**(summary.get("ablation") or {}), "_null": arrays.get("ablation_null") or {}})
    if a:
        figs["ablation"] = a
    m = mechanism.figure(d / "mechanism.png", {**(summary.get("mechanism") or {}), "_arrays": arrays.get("norm_gains")})
    if m:
        figs["mechanism"] = m
    return {k: f"{ANALYSIS_FIGURES}/{v}" for k, v in figs.items()}

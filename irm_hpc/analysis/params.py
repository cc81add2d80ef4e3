"""Parameters of the striation analysis (`Params`), their ``key=value`` parsing, and `AnalysisError`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Union

from irm_hpc.errors import IrmError


class AnalysisError(IrmError, RuntimeError):
    """Nothing (or not this run) can be analysed: one-line message naming the input and the fix.

    The CLI turns it into ``error: <message>`` and exit status 2.
    """


SOURCES = ("probe", "train")
AUTO_POOL_MIN_RUNS = 8  # below this, spawning map processes costs more than it saves (benchmarks/bench_analysis.py)
PROFILES = ("column_score", "mean_abs")


@dataclass
class Params:
    """Analysis parameters; every field can be overridden as ``key=value`` on the command line.

    Map (per run, `irm_hpc.analysis.map_run`):
      last_records: number of final training profile records (``profiles/mean_abs``, step > 0) averaged
        into the run's ``train_last`` matrix.
      block_rows: probe tokens read per block (0 = the reader's default, ``RunReader.probe.iter_blocks``:
        16 HDF5 chunks, ~9 MB for SmolLM2 float16); memory per run is bounded by one block.

    Reduce (cross-run, `irm_hpc.analysis.reduce_runs`):
      top_k_frac: k = max(1, round(top_k_frac * hidden)) indices per layer count as "top" (the vertical
        continuity score is the fraction of injection layers where an index is in the top k).
      n_permutations: permutations of the per-layer shuffle null (indices shuffled independently per layer).
      alpha: significance level of the Benjamini-Hochberg adjusted p-values (FDR across indices, per run).
      consensus_share: an index is a consensus striation if significant in at least this share of runs.
      seed: seed of the permutation null and of KMeans.
      source: matrix the striation statistics are computed from: ``probe`` = mean |injection| over all
        probe tokens at the final probe step (falls back to ``train`` when a run has no probe after step
        0); ``train`` = mean of the last ``last_records`` training profile records.
      profile: per-run, per-index profile used for cross-run correlation and clustering: ``column_score``
        (column mean of per-layer z-scores) or ``mean_abs`` (mean |injection| over layers).
      n_clusters: clusters of the main clustering (0 = number of distinct alignments).
      n_outliers: base-model outlier dimensions listed beside the striations.
      max_heatmap_runs: runs shown in the per-run heatmap grid.
      figures: write PNG figures (matplotlib, Agg backend).
      mechanism: read the consensus indices' norm-gain ranks, LM-head column norms and logit lens from the
        frozen model's weights (`irm_hpc.analysis.mechanism`; loads the model on the CPU: the reduce job
        then needs its memory, ``cluster.analysis_mem_gb``).
      workers: map processes in `analyze` (1 = in-process loop; >1 = a multiprocessing pool of that size;
        0 = auto: 2 when there are >= AUTO_POOL_MIN_RUNS runs and >= 2 usable CPUs, else 1).
    """

    top_k_frac: float = 0.01
    n_permutations: int = 1000
    alpha: float = 0.05
    consensus_share: float = 0.5
    last_records: int = 3
    seed: int = 0
    source: str = "probe"
    profile: str = "column_score"
    n_clusters: int = 0
    n_outliers: int = 10
    max_heatmap_runs: int = 6
    figures: bool = True
    mechanism: bool = True
    workers: int = 0
    block_rows: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "Params":
        """Check ranges; raise AnalysisError naming the first bad key."""
        checks = [
            ("top_k_frac", 0.0 < self.top_k_frac < 1.0, "must be in (0, 1)"),
            ("n_permutations", self.n_permutations >= 1, "must be >= 1"),
            ("alpha", 0.0 < self.alpha < 1.0, "must be in (0, 1)"),
            ("consensus_share", 0.0 < self.consensus_share <= 1.0, "must be in (0, 1]"),
            ("last_records", self.last_records >= 1, "must be >= 1"),
            ("source", self.source in SOURCES, f"must be one of {list(SOURCES)}"),
            ("profile", self.profile in PROFILES, f"must be one of {list(PROFILES)}"),
            ("n_clusters", self.n_clusters >= 0, "must be >= 0 (0 = number of alignments)"),
            ("n_outliers", self.n_outliers >= 1, "must be >= 1"),
            ("max_heatmap_runs", self.max_heatmap_runs >= 1, "must be >= 1"),
            ("workers", self.workers >= 0, "must be >= 0 (0 = auto)"),
            ("block_rows", self.block_rows >= 0, "must be >= 0 (0 = reader default)"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise AnalysisError(f"analysis parameter {key}={getattr(self, key)!r} {why}")
        return self

    def as_dict(self) -> dict:
        return asdict(self)

    def map_workers(self, n_runs: int) -> int:
        """Map processes for ``n_runs`` runs (resolves ``workers=0``: 2 if n_runs >= AUTO_POOL_MIN_RUNS and
        at least 2 CPUs are usable by this process (``os.sched_getaffinity``, so a Slurm allocation counts),
        else 1)."""
        if self.workers:
            return max(1, min(self.workers, n_runs))
        import os

        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return 2 if n_runs >= AUTO_POOL_MIN_RUNS and cpus >= 2 else 1


def valid_keys() -> list[str]:
    return [f.name for f in fields(Params)]


def parse_params(overrides: Union[None, Params, dict, Iterable[str]] = None) -> Params:
    """Build `Params` from ``key=value`` strings (hydra style, parsed with OmegaConf), a dict, or Params.

    Raises AnalysisError (one line) for an unknown key (listing the valid ones), a malformed item, a
    value of the wrong type or out of range, or a value holding a ``${...}`` interpolation (parameters are
    read back from the manifest: data, never resolved).
    """
    if overrides is None:
        return Params()
    if isinstance(overrides, Params):
        return overrides.validate()
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(overrides, dict):
        items: Any = overrides
    else:
        items = list(overrides)
        bad = [o for o in items if not isinstance(o, str) or "=" not in o or not o.split("=", 1)[0].strip()]
        if bad:
            raise AnalysisError(f"analysis parameter {bad[0]!r} is not key=value; valid keys: {', '.join(valid_keys())}")
        unknown = [o.split("=", 1)[0].strip() for o in items if o.split("=", 1)[0].strip() not in valid_keys()]
        if unknown:
            raise AnalysisError(f"unknown analysis parameter {unknown[0]!r}; valid keys: {', '.join(valid_keys())}")
    values = items.values() if isinstance(items, dict) else [o.split("=", 1)[1] for o in items]
    interp = [v for v in values if isinstance(v, str) and "${" in v]
    if interp:  # parameters come from the manifest too (data): never resolve ${oc.env:...} and friends
        raise AnalysisError(f"analysis parameter value {interp[0]!r} holds an interpolation; give a literal value")
    unknown = [k for k in (items if isinstance(items, dict) else []) if k not in valid_keys()]
    if unknown:
        raise AnalysisError(f"unknown analysis parameter {unknown[0]!r}; valid keys: {', '.join(valid_keys())}")
    try:
        base = OmegaConf.structured(Params)
        other = OmegaConf.create(items) if isinstance(items, dict) else OmegaConf.from_dotlist(items)
        merged = OmegaConf.merge(base, other)
        params = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        msg = " ".join(str(exc).split("\n")[0].split())
        raise AnalysisError(f"bad analysis parameter: {msg}; valid keys: {', '.join(valid_keys())}") from None
    assert isinstance(params, Params)
    return params

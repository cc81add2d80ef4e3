"""Cross-run striation analysis of IRM injections (arXiv 2407.03621, "The Mysterious Case of Neuron 1512").

Map (one per run): `map_run` reduces a run's HDF5 stream to ``<out>/profiles/<run>.npz`` (per layer x
index mean |injection|, final and step 0; per-index striation statistics). Reduce: `reduce_runs` reads
every profile and writes ``summary.json``, ``report.md`` and ``figures/*.png`` (per-run striation tables
with permutation p-values, cross-run correlation and clustering, consensus indices, step-0 and seed
controls, relation to the base model). `analyze` does both locally; `discover_runs` finds the runs.

Modules: ``params`` (Params, AnalysisError), ``discover`` (RunRef), ``profiles`` (map), ``stats``,
``clustering``, ``pipeline`` (reduce, analyze), ``report``, ``figures``, ``cli``.
"""

from irm_hpc.analysis.discover import RunRef, discover_runs
from irm_hpc.analysis.params import AnalysisError, Params, parse_params
from irm_hpc.analysis.pipeline import analyze, reduce_runs
from irm_hpc.analysis.profiles import RunProfile, load_profile, map_run

__all__ = ["AnalysisError", "Params", "RunProfile", "RunRef", "analyze", "discover_runs", "load_profile",
           "map_run", "parse_params", "reduce_runs"]

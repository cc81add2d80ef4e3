"""Map step: reduce one run's HDF5 stream to a small ``<out>/profiles/<run_name>.npz``.

Per (injection layer, index) mean |injection| (float32, (n_inj, hidden) each; NaN when there is no data):

* ``probe_final_{prompt,generated,all}``: over the probe tokens of the final probe step (the largest
  probe step > 0), prompt and greedy-generated tokens separately and together;
* ``probe_step0_{prompt,generated,all}``: the same at probe step 0 (untrained IRM control);
* ``train_last``: mean of the last ``last_records`` training profile records (``profiles/mean_abs``,
  step > 0), each itself a mean |injection| over a training batch's tokens;
* ``train_step0``: mean of the profile records at step 0.

Plus ``base_resid_abs`` (n_layers, hidden) (the frozen model's mean |residual| after each layer's
attention; (0, hidden) if the run has none), ``injection_layers`` (n_inj,), two descriptive per-index
profiles of the matrix the statistics use (``Params.source``) under the map's ``top_k_frac``:
``continuity`` (fraction of injection layers where the index is top-k) and ``column_score`` (mean
per-layer z-score), with their ``_step0`` twins ((hidden,) float32, NaN when the matrix is missing or
non-finite; `irm_hpc.analysis.stats`), and ``meta`` (a JSON string). The map runs no permutation test:
p-values, significance and every cross-run statistic are computed by the reduce from the matrices,
so other reduce parameters need no new map.

Probe tokens are read in blocks of rows (``Params.block_rows``, default the reader's ``iter_blocks``
size, 16 HDF5 chunks): for each block, ``|x|`` is summed per group with one float32 matrix product
(4 x rows) @ (rows x n_inj*hidden) and accumulated in float64, so memory is bounded by one block
whatever the file size; blocks without a token of step 0 or of the final probe step are not read.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from irm_hpc.analysis.discover import RunRef, ref_for_path, safe_name
from irm_hpc.analysis.params import AnalysisError, Params, parse_params
from irm_hpc.analysis import stats as st
from irm_hpc.layout import ANALYSIS_PROFILES, RECORD_SEG_GLOB, RunDir, atomic_path, atomic_write_json, yaml_data

PROFILE_VERSION = 1
PROFILES_DIR = ANALYSIS_PROFILES
SKIP_SUFFIX = ".skipped.json"
GROUPS = ("final_prompt", "final_generated", "step0_prompt", "step0_generated")
MATRICES = ("probe_final_prompt", "probe_final_generated", "probe_final_all", "probe_step0_prompt",
            "probe_step0_generated", "probe_step0_all", "train_last", "train_step0")

PathLike = Union[str, Path]


def profiles_dir(out_dir: PathLike) -> Path:
    return Path(out_dir) / PROFILES_DIR


def _derive_layer_set(layers: list[int], n_layers: int, config_yaml: str) -> str:
    """Layer set label: the config's ``irm.layer_set`` if set, "all" for every layer, else "0-3,8".

    ``config_yaml`` (an HDF5 attribute) is read as data (``layout.yaml_data``): a ``${oc.env:...}`` in it
    is never resolved, so it cannot pull the environment into profiles, summary.json or report.md.
    """
    try:
        v = (yaml_data(config_yaml or "{}").get("irm") or {}).get("layer_set")
        if v:
            return str(v)
    except Exception:  # noqa: BLE001 - a config we cannot parse: derive from the layers
        pass
    if list(layers) == list(range(n_layers)):
        return "all"
    parts, start = [], None
    for i, v in enumerate(layers):
        if start is None:
            start = v
        if i + 1 == len(layers) or layers[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)


def _atomic_savez(path: Path, arrays: dict) -> None:
    """``np.savez`` to ``path`` atomically (`irm_hpc.layout.atomic_path`; not fsynced, as before: a torn
    profile after a power loss is reported by `load_profile` and re-mapped)."""
    with atomic_path(path, durable=False) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def _skip(out: Path, ref: RunRef, reason: str) -> AnalysisError:
    """Write ``<name>.skipped.json`` (the reduce lists it), drop a stale npz; return the error to raise."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{ref.name}.npz").unlink(missing_ok=True)
    atomic_write_json(out / f"{ref.name}{SKIP_SUFFIX}", {"name": ref.name, "path": str(ref.path), "reason": reason})
    return AnalysisError(f"{ref.path}: {reason}")


def _block_ranges(relevant: np.ndarray, rows: int) -> list[tuple[int, int]]:
    """Row windows [a, b) of ``rows`` tokens that contain at least one relevant row."""
    n = len(relevant)
    out = []
    for a in range(0, n, rows):
        b = min(a + rows, n)
        if relevant[a:b].any():
            out.append((a, b))
    return out


def _probe_sums(run, final_step: Optional[int], block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(4, n_inj, hidden) float64 sums of |injection| and (4,) token counts for GROUPS."""
    m = run.meta
    n_inj, hidden = len(m.injection_layers), m.hidden_size
    sums = np.zeros((len(GROUPS), n_inj * hidden), np.float64)
    counts = np.zeros(len(GROUPS), np.int64)
    if len(run.probe) == 0:
        return sums.reshape(len(GROUPS), n_inj, hidden), counts
    step = run.probe.step
    gen = run.probe.is_generated.astype(bool)
    final = (step == final_step) if final_step is not None else np.zeros(len(step), bool)
    zero = step == 0
    w = np.stack([final & ~gen, final & gen, zero & ~gen, zero & gen]).astype(np.float32)  # (4, n_tok)
    counts[:] = w.sum(axis=1).astype(np.int64)
    inj = run.probe.injection
    if block_rows <= 0:
        parts = getattr(inj, "parts", [])
        block_rows = parts[0].chunks[0] * 16 if parts and getattr(parts[0], "chunks", None) else 512
    limits = _blas_single_thread()
    try:
        for a, b in _block_ranges(w.any(axis=0), block_rows):
            x = np.asarray(inj[a:b]).reshape(b - a, n_inj * hidden).astype(np.float32)
            np.abs(x, out=x)
            sums += w[:, a:b] @ x
    finally:
        if limits is not None:
            limits.unregister()
    return sums.reshape(len(GROUPS), n_inj, hidden), counts


def _blas_single_thread():
    """Limit BLAS to one thread during the block loop (threadpoolctl, if installed)."""
    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(1, user_api="blas")
    except Exception:  # noqa: BLE001
        return None


def prefetch(paths) -> None:
    """Ask the kernel to read these files ahead in the background (``posix_fadvise(POSIX_FADV_WILLNEED)``),
    so disk reads overlap with decompression; page cache only (no process memory). Errors are ignored."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            advise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def record_files(path: PathLike) -> list[Path]:
    """The HDF5 files of a run path (the file itself, the run's ``injections.h5``, or its ``record/``
    segments; `irm_hpc.layout.RunDir.record_source`), for `prefetch`. ``[]`` if it has none."""
    p = Path(path)
    if p.is_file():
        return [p]
    src = RunDir(p).record_source()
    if src is None:
        return []
    return [src] if src.is_file() else sorted(src.glob(RECORD_SEG_GLOB))


def _mean(s: np.ndarray, n: int) -> np.ndarray:
    return (s / n).astype(np.float32) if n > 0 else np.full(s.shape, np.nan, np.float32)


def map_run(run_path: Union[PathLike, RunRef], out_dir: PathLike, params: Union[None, Params, list, dict] = None,
            *, name: Optional[str] = None) -> Path:
    """Reduce one run to ``<out_dir>/profiles/<name>.npz`` and return its path.

    ``run_path``: a run dir, ``record/`` dir or HDF5 file (`irm_hpc.record.open_run`), or a `RunRef`;
    ``name`` defaults to the manifest's task_id (when the run is a task dir of a sweep) or the run dir's
    name. Reads only the 1-D probe columns, the profile records needed and the probe blocks holding
    step-0 and final-step tokens (bounded memory). Writes the npz atomically.

    Raises AnalysisError (one line, naming the run) for an unreadable record, a run with no records yet,
    or one whose shapes disagree; it first writes ``<name>.skipped.json`` with the reason (and removes a
    stale ``<name>.npz``) so that the reduce step reports the skipped run.
    """
    from irm_hpc.record import RecordError, open_run

    t0 = time.perf_counter()
    params = parse_params(params)
    ref = run_path if isinstance(run_path, RunRef) else ref_for_path(run_path)
    if name:
        ref = RunRef(ref.path, safe_name(name), ref.alignment, ref.seed, ref.layer_set, ref.task_id)
    out = profiles_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefetch(record_files(ref.path))
    try:
        run = open_run(ref.path)
    except RecordError as exc:
        raise _skip(out, ref, f"unreadable record ({exc})") from None
    except OSError as exc:
        raise _skip(out, ref, f"unreadable record ({type(exc).__name__}: {exc})") from None
    try:
        with run:
            arrays, meta = _reduce_run(run, ref, params)
    except RecordError as exc:
        raise _skip(out, ref, f"unreadable record ({exc})") from None
    except _NoData as exc:
        raise _skip(out, ref, str(exc)) from None
    meta["map_seconds"] = round(time.perf_counter() - t0, 3)
    arrays["meta"] = np.array(json.dumps(meta))
    path = out / f"{ref.name}.npz"
    _atomic_savez(path, arrays)
    (out / f"{ref.name}{SKIP_SUFFIX}").unlink(missing_ok=True)
    return path


class _NoData(Exception):
    pass


EVAL_KEYS = ("alignment_gain", "eval_target_loss", "eval_other_loss", "eval_target_base_loss", "eval_other_base_loss")


def training_evals(run_path: PathLike) -> list[dict]:
    """The run's eval records from ``metrics.jsonl`` (``irm_hpc.train``): one dict per eval with
    ``step`` and ``EVAL_KEYS`` (losses in nats/token; ``alignment_gain`` = how much the IRM lowered the
    target-alignment loss minus how much it lowered the other labels' loss). ``run_path`` is a run dir,
    its ``record/`` dir or its HDF5 file. Returns ``[]`` when the run has no metrics file (e.g. a bare
    HDF5 copied elsewhere); unparsable lines (a crash mid-write) are skipped."""
    path = Path(run_path)
    metrics = RunDir.containing(path.parent if path.is_file() else path).metrics
    if not metrics.is_file():
        return []
    evals = []
    for line in metrics.read_text(errors="replace").splitlines():
        if "alignment_gain" not in line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        evals.append({"step": int(rec["step"]), **{k: rec.get(k) for k in EVAL_KEYS}})
    return evals


def _reduce_run(run, ref: RunRef, params: Params) -> tuple[dict, dict]:
    m = run.meta
    n_inj, hidden = len(m.injection_layers), m.hidden_size
    steps = np.asarray(run.steps)
    n_tok = len(run.probe)
    if len(steps) == 0 and n_tok == 0:
        raise _NoData("no records yet (no profile record and no probe token)")
    probe_steps = run.probe.step if n_tok else np.zeros(0, np.int64)
    final_probe = int(probe_steps.max()) if n_tok and probe_steps.max() > 0 else None
    sums, counts = _probe_sums(run, final_probe, params.block_rows)
    fp, fg, zp, zg = (sums[i] for i in range(4))
    arrays: dict[str, np.ndarray] = {
        "probe_final_prompt": _mean(fp, counts[0]), "probe_final_generated": _mean(fg, counts[1]),
        "probe_final_all": _mean(fp + fg, counts[0] + counts[1]),
        "probe_step0_prompt": _mean(zp, counts[2]), "probe_step0_generated": _mean(zg, counts[3]),
        "probe_step0_all": _mean(zp + zg, counts[2] + counts[3]),
    }
    trained = np.flatnonzero(steps > 0)
    last = trained[-params.last_records:] if len(trained) else trained
    arrays["train_last"] = _mean_records(run.profiles_abs, last, (n_inj, hidden))
    zero_rec = np.flatnonzero(steps == 0)
    arrays["train_step0"] = _mean_records(run.profiles_abs, zero_rec, (n_inj, hidden))
    base = run.base_resid_abs
    arrays["base_resid_abs"] = np.asarray(base, np.float32) if base is not None else np.zeros((0, hidden), np.float32)
    arrays["injection_layers"] = np.asarray(m.injection_layers, np.int64)
    layer_set = ref.layer_set or _derive_layer_set(list(m.injection_layers), m.n_layers, m.config_yaml)
    meta = {
        "profile_version": PROFILE_VERSION, "name": ref.name, "path": str(Path(ref.path).resolve()),
        "task_id": ref.task_id, "model_name": m.model_name, "hidden_size": int(hidden), "n_layers": int(m.n_layers),
        "injection_layers": [int(v) for v in m.injection_layers], "alignment": str(m.alignment), "seed": int(m.seed),
        "layer_set": str(layer_set), "manifest_alignment": ref.alignment, "manifest_seed": ref.seed,
        "dtype": m.dtype, "finalized": bool(m.finalized), "n_records": int(len(steps)),
        "final_train_step": int(steps.max()) if len(steps) else None,
        "train_last_steps": [int(steps[i]) for i in last], "train_step0_records": int(len(zero_rec)),
        "final_probe_step": final_probe, "n_probe_tokens": int(n_tok),
        "probe_tokens": {g: int(c) for g, c in zip(GROUPS, counts)},
        "has_base": base is not None, "params": params.as_dict(), "evals": training_evals(ref.path),
    }
    if final_probe is None and not len(trained):
        raise _NoData("only step-0 records so far (the untrained IRM); no trained records to analyse yet")
    prof = RunProfile(ref.name, meta, arrays)
    k = st.top_k(hidden, params.top_k_frac)
    for suffix, mat in (("", prof.matrix(params.source)[0]), ("_step0", prof.step0_matrix(params.source)[0])):
        # descriptive only (no permutation null): the reduce recomputes every statistic from the matrices
        ok = mat is not None and np.isfinite(mat).all()
        arrays[f"continuity{suffix}"] = (st.continuity(st.topk_membership(mat, k)).astype(np.float32) if ok
                                         else np.full(hidden, np.nan, np.float32))
        arrays[f"column_score{suffix}"] = (st.column_score(mat).astype(np.float32) if ok
                                           else np.full(hidden, np.nan, np.float32))
    return arrays, meta


def _mean_records(lazy, idx: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Mean of records ``lazy[i]`` for i in ``idx`` (one chunk read each), NaN if ``idx`` is empty."""
    if not len(idx):
        return np.full(shape, np.nan, np.float32)
    acc = np.zeros(shape, np.float64)
    for i in idx:
        acc += np.abs(np.asarray(lazy[int(i)], np.float64))
    return (acc / len(idx)).astype(np.float32)


@dataclass
class RunProfile:
    """One run's map output (loaded from its npz): ``name``, ``meta`` dict, ``arrays`` (see module doc)."""

    name: str
    meta: dict
    arrays: dict = field(repr=False)

    @property
    def hidden(self) -> int:
        return int(self.meta["hidden_size"])

    @property
    def alignment(self) -> str:
        return str(self.meta["alignment"])

    @property
    def seed(self) -> int:
        return int(self.meta["seed"])

    @property
    def layer_set(self) -> str:
        return str(self.meta["layer_set"])

    @property
    def injection_layers(self) -> list[int]:
        return list(self.meta["injection_layers"])

    @property
    def base(self) -> Optional[np.ndarray]:
        b = self.arrays.get("base_resid_abs")
        return b if b is not None and b.size else None

    def _has(self, key: str) -> bool:
        a = self.arrays.get(key)
        return a is not None and bool(np.isfinite(a).any())

    def matrix(self, source: str) -> tuple[Optional[np.ndarray], str]:
        """(n_inj, hidden) matrix the striation statistics use and its label: ``source="probe"`` ->
        final-step probe tokens (all), else the last training records; ``"train"`` the other way round."""
        order = ("probe_final_all", "train_last") if source == "probe" else ("train_last", "probe_final_all")
        for key in order:
            if self._has(key):
                return self.arrays[key], key
        return None, "none"

    def step0_matrix(self, source: str) -> tuple[Optional[np.ndarray], str]:
        """(n_inj, hidden) step-0 (untrained IRM) counterpart of `matrix`, or (None, "none")."""
        order = ("probe_step0_all", "train_step0") if source == "probe" else ("train_step0", "probe_step0_all")
        for key in order:
            if self._has(key):
                return self.arrays[key], key
        return None, "none"


def load_profile(path: PathLike) -> RunProfile:
    """Load a map npz. Raises AnalysisError (one line) if it is unreadable or of another version."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise AnalysisError(f"{p}: unreadable profile file ({type(exc).__name__}: {exc}); re-run the map step") from None
    if meta.get("profile_version") != PROFILE_VERSION:
        raise AnalysisError(f"{p}: profile version {meta.get('profile_version')} != {PROFILE_VERSION}; re-run the map step")
    return RunProfile(str(meta["name"]), meta, arrays)

"""The ablation stage: does a striation index carry the IRM's effect?

Per finished run and per consensus striation index ``i`` of the sweep's analysis (``irm_hpc.analysis``):

* **Index ablation.** The IRM's output at hidden index ``i`` is zeroed in every injection layer
  (``inject(ablate=[i])``; the seed paper's "next checks", and the zero-ablation of massive-activation
  dims of Sun et al. 2024). The measure is the alignment gain of training's eval,
  ``gain = (base_target - irm_target) - (base_other - irm_other)`` in nats/token, on up to
  ``eval_texts`` held-out texts per side (the run's own split); ``delta_gain = gain(full IRM) -
  gain(index ablated)``: how much of the gain the index carries (> 0: ablating it hurts).
* **Null.** The same ``delta_gain`` for ``null_size`` other indices matched on the run's mean |injection|
  (the nearest in log mean |injection|, consensus indices excluded). One-sided permutation p-value
  ``p = (1 + #{null delta >= delta_i}) / (1 + null_size)`` (Phipson & Smyth 2010); the reduce combines
  the runs' p-values with Fisher's method (``scipy.stats.combine_pvalues``) and a sign test.
* **Keep only.** Every index but ``i`` zeroed: ``keep_only_share = gain(only i) / gain(full IRM)``.
* **Layer groups.** The injection of one group of layers (``quarters`` of the model's depth, or ``each``
  layer) left out (``inject(drop_layers=...)``), and the converse (only that group injected).
* **Judge.** Where the run has the evaluation stage's summary: the continuations at scale 1 generated
  again with ``i`` ablated (same prompts, sampling and seeds, so ablated and intact samples share their
  random stream), judged; ``rate_diff`` = rate(intact) - rate(ablated) with a prompt-cluster bootstrap CI.

The IRM reads the residual stream after layer 0's attention, before any injection, so its output does
not depend on what is ablated: it is computed once per batch and reused by every condition
(:class:`FixedInjection`). Output: ``<run>/ablation/summary.json`` (schema ``irm_hpc.ablation/1``),
skipped when its fingerprint (settings, indices, IRM weights, evaluation) is unchanged.

CLI: ``python -m irm_hpc.ablate SWEEP_DIR | RUN_DIR ... [--indices I ...] [key=value ...]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from irm_hpc.config import AblationConfig, typed_section
from irm_hpc.errors import ConfigError, IrmError, cli_errors
from irm_hpc.inject import inject
from irm_hpc.layout import RunDir, SweepDir, atomic_write_json

SCHEMA = "irm_hpc.ablation/1"
LAYER_GROUPS = ("quarters", "each", "none")
LAUNCHER_KEYS = ("enabled", "runs_per_task")


class AblationError(IrmError, ValueError):
    """A run cannot be ablated (one line: problem and fix)."""


@dataclass
class AblationParams(AblationConfig):
    """The ablation's parameters: the fields and defaults of ``config.AblationConfig`` (the
    ``sweep.ablation`` schema), with their checks."""

    @classmethod
    def from_config(cls, section: Any) -> "AblationParams":
        """From a ``sweep.ablation`` section or ``key=value`` dict. Raises ``ConfigError`` (unknown key,
        wrong type, ``${...}``, or what :meth:`check` refuses)."""
        params = cls(**typed_section(AblationConfig, section, "ablation"))
        params.check()
        return params

    def check(self) -> None:
        """Raises ``ConfigError`` naming the bad value."""
        rules = [("max_indices", self.max_indices >= 1, ">= 1"), ("null_size", self.null_size >= 1, ">= 1"),
                 ("eval_texts", self.eval_texts >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
                 ("layer_groups", self.layer_groups in LAYER_GROUPS, f"one of {', '.join(LAYER_GROUPS)}"),
                 ("bootstrap", self.bootstrap >= 100, ">= 100"), ("runs_per_task", self.runs_per_task >= 1, ">= 1")]
        for key, ok, rule in rules:
            if not ok:
                raise ConfigError(f"ablation.{key}={getattr(self, key)!r}: must be {rule}")

    def settings(self) -> dict:
        """The measurement's settings (every field but the launcher's)."""
        return {k: v for k, v in asdict(self).items() if k not in LAUNCHER_KEYS}


# ----------------------------------------------------------------------------- which indices
def consensus_indices(analysis_summary: Path, max_indices: int) -> list[int]:
    """The first ``max_indices`` consensus striation indices (highest share of runs first) of an analysis
    ``summary.json``. Raises ``AblationError`` when the file is missing or unreadable, or has none."""
    if not analysis_summary.is_file():
        raise AblationError(f"{analysis_summary} not found: run the striation analysis first "
                            "(python -m irm_hpc.analysis SWEEP_DIR), or pass --indices")
    try:
        cons = json.loads(analysis_summary.read_text())["consensus"]["indices"]
        indices = [int(e["index"]) for e in cons]
    except (OSError, ValueError, KeyError, TypeError):
        raise AblationError(f"{analysis_summary} is not an analysis summary (no consensus.indices); re-run the "
                            "analysis, or pass --indices") from None
    if not indices:
        raise AblationError(f"{analysis_summary} lists no consensus striation index; pass --indices I ...")
    return indices[:max_indices]


def matched_null(mean_abs: np.ndarray, index: int, exclude: Sequence[int], size: int) -> list[int]:
    """The ``size`` indices nearest to ``index`` in log mean |injection| (``mean_abs``: (hidden,)),
    ``exclude`` left out; ties broken by index. Fewer when the hidden size is too small."""
    logm = np.log(np.maximum(np.asarray(mean_abs, dtype=np.float64), 1e-30))
    dist = np.abs(logm - logm[index])
    banned = set(int(i) for i in exclude) | {int(index)}
    order = [int(j) for j in np.lexsort((np.arange(len(dist)), dist)) if int(j) not in banned]
    return sorted(order[:size])


def layer_groups(injection_layers: Sequence[int], n_model_layers: int, mode: str) -> list[tuple[str, list[int]]]:
    """Groups of injection layers ablated together: ``quarters`` of the model's depth (q1..q4, empty
    ones left out), ``each`` layer (``L<k>``), or ``none``."""
    layers = [int(x) for x in injection_layers]
    if mode == "none":
        return []
    if mode == "each":
        return [(f"L{k}", [k]) for k in layers]
    out = []
    for q in range(4):
        lo, hi = q * n_model_layers // 4, (q + 1) * n_model_layers // 4
        members = [k for k in layers if lo <= k < hi]
        if members:
            out.append((f"q{q + 1}", members))
    return out


# ----------------------------------------------------------------------------- losses
class FixedInjection(torch.nn.Module):
    """A precomputed IRM output in the IRM's interface: ``forward`` returns ``vectors`` (batch, seq,
    n_layers, hidden) for the batch it was computed on (the IRM's input does not depend on any injection,
    so every ablation of that batch injects from the same tensor). Raises ``ValueError`` on another shape."""

    def __init__(self, vectors: torch.Tensor, injection_layers: Sequence[int]):
        super().__init__()
        self.vectors = vectors
        self.injection_layers = [int(x) for x in injection_layers]
        self.hidden_size = int(vectors.shape[-1])

    def forward(self, resid: torch.Tensor) -> torch.Tensor:
        if resid.shape[:2] != self.vectors.shape[:2]:
            raise ValueError(f"FixedInjection holds {tuple(self.vectors.shape[:2])} tokens, got {tuple(resid.shape[:2])}")
        return self.vectors


@dataclass
class _Batch:
    inputs: dict
    tokens: int
    vectors: Optional[torch.Tensor] = None


class LossBench:
    """The held-out texts of one run, batched once, with each batch's IRM output cached.

    ``sides``: {"target": token ids, "other": token ids}. :meth:`gain` gives the alignment gain
    (nats/token) of a condition: ``ablate`` (hidden indices zeroed) and ``drop_layers`` (injection
    layers left out)."""

    def __init__(self, lm, irm, sides: dict[str, list[list[int]]], pad_id: int, batch_size: int):
        from irm_hpc.data import batches, collate

        self.lm, self.irm = lm, irm
        device = next(lm.parameters()).device
        self.batches: dict[str, list[_Batch]] = {}
        for side, seqs in sides.items():
            rows = []
            for chunk in batches(seqs, batch_size):
                b = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
                rows.append(_Batch(b, int((b["labels"][:, 1:] != -100).sum())))
            self.batches[side] = rows
        self.base = {side: self._loss(side, None) for side in self.batches}
        self.forwards = 0

    @torch.no_grad()
    def _loss(self, side: str, conditions: Optional[dict]) -> float:
        total, count = 0.0, 0
        for b in self.batches[side]:
            if conditions is None:
                loss = self.lm(**b.inputs, use_cache=False).loss
            else:
                if b.vectors is None:  # the IRM's own forward, once per batch
                    with inject(self.lm, self.irm, keep_injections=True) as inj:
                        loss = self.lm(**b.inputs, use_cache=False).loss
                    b.vectors = inj.last_injection.detach()
                    if not conditions:
                        total, count = total + float(loss) * b.tokens, count + b.tokens
                        continue
                fixed = FixedInjection(b.vectors, self.irm.injection_layers)
                with inject(self.lm, fixed, keep_injections=False, **conditions):
                    loss = self.lm(**b.inputs, use_cache=False).loss
            total, count = total + float(loss) * b.tokens, count + b.tokens
        return total / max(count, 1)

    def losses(self, ablate: Optional[Sequence[int]] = None, drop_layers: Optional[Sequence[int]] = None) -> dict:
        """Mean token loss (nats/token) per side with the IRM injected under the given ablation."""
        self.forwards += 1
        cond = {k: list(v) for k, v in (("ablate", ablate), ("drop_layers", drop_layers)) if v}
        return {side: self._loss(side, cond) for side in self.batches}

    def gain_of(self, loss: dict) -> float:
        """Alignment gain (nats/token) of per-side losses: (base - irm) on target minus (base - irm) on other."""
        return (self.base["target"] - loss["target"]) - (self.base["other"] - loss["other"])

    def gain(self, ablate: Optional[Sequence[int]] = None, drop_layers: Optional[Sequence[int]] = None) -> float:
        """Alignment gain (nats/token) with the IRM injected under the given ablation."""
        return self.gain_of(self.losses(ablate, drop_layers))

    def mean_abs_injection(self) -> np.ndarray:
        """(hidden,) mean |IRM output| over layers and the non-padding tokens of every cached batch, each
        text's first token (the attention sink) left out."""
        total, count = None, 0
        for rows in self.batches.values():
            for b in rows:
                if b.vectors is None:
                    continue
                mask = b.inputs["attention_mask"].clone().float()
                mask[:, 0] = 0
                s = (b.vectors.float().abs().mean(2) * mask[..., None]).sum((0, 1)).double().cpu()
                total = s if total is None else total + s
                count += int(mask.sum())
        if total is None:
            raise AblationError("no cached IRM output: call gain() with the full IRM first")
        return (total / max(count, 1)).numpy()


# ----------------------------------------------------------------------------- judge
def _judge_ablation(run, indices: Sequence[int], params: AblationParams, judges: Optional[dict]) -> dict:
    """Judge's alignment rate with each index ablated, against the evaluation's own scale-1 samples."""
    from irm_hpc.evaluate import EvalParams, _condition, bootstrap_diff
    from irm_hpc.generate import generate
    from irm_hpc.judge import load_judge

    ev = json.loads(RunDir(run.run_dir).evaluation_summary.read_text())
    ep = EvalParams.from_config(ev["params"])
    prompts = list(ev["prompts"])
    on, off = ev["conditions"]["scale=1"], ev["conditions"]["scale=0"]
    jkey = json.dumps([str(run.cfg.data), ep.judge_train_split, ep.judge_test_split])
    if judges is not None and jkey in judges:
        judge = judges[jkey]
    else:
        judge, _ = load_judge(run.cfg.data, train_split=ep.judge_train_split, test_split=ep.judge_test_split)
        if judges is not None:
            judges[jkey] = judge
    out: dict = {"rate_on": on["alignment_rate"], "rate_off": off["alignment_rate"], "n": on["n"], "indices": {}}
    effect = on["alignment_rate"] - off["alignment_rate"]
    for i in indices:
        samples = generate(run.lm, run.tokenizer, run.irm, prompts, [1.0], ep.sampling(), ablate=[int(i)])
        probs = judge.predict_proba([s.text for s in samples])
        cond = _condition(samples, probs, judge.labels, run.alignment, np.zeros(len(samples)), np.zeros(len(samples)),
                          prompts)
        diff, ci = bootstrap_diff(on["per_prompt_hits"], cond["per_prompt_hits"], cond["per_prompt_n"],
                                  params.bootstrap, params.seed)
        out["indices"][str(int(i))] = {
            "rate_ablated": cond["alignment_rate"], "rate_diff": diff, "rate_diff_ci": ci,
            "share_of_effect": diff / effect if abs(effect) > 1e-12 else None,
            "distinct2": cond["distinct2"], "per_prompt_hits": cond["per_prompt_hits"],
            "per_prompt_n": cond["per_prompt_n"]}
    return out


# ----------------------------------------------------------------------------- one run
JUDGE_KEYS = ("judge", "bootstrap")  # settings of the judge part alone


def fingerprint(run_dir, params: AblationParams, indices: Sequence[int]) -> str:
    """sha256 over the loss part's settings (all but ``judge`` / ``bootstrap``), the indices, the IRM
    weights' size and mtime (ns), and the run's evaluation fingerprint (the judge part reuses its samples).
    A summary with this fingerprint but no judge part gets the judge part added, nothing else redone."""
    run = RunDir(run_dir)
    st = run.weights.stat()
    ev = None
    if run.evaluation_summary.is_file():
        try:
            ev = json.loads(run.evaluation_summary.read_text()).get("fingerprint")
        except (OSError, ValueError):
            ev = "unreadable"
    settings = {k: v for k, v in params.settings().items() if k not in JUDGE_KEYS}
    blob = json.dumps({"params": settings, "indices": [int(i) for i in indices], "schema": SCHEMA,
                       "weights": [st.st_size, st.st_mtime_ns], "evaluation": ev}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _f(x: float) -> float:
    return float(round(float(x), 8))


def ablate_run(run_dir, indices: Sequence[int], params: Optional[AblationParams] = None, *, force: bool = False,
               device: Optional[torch.device] = None, models: Optional[dict] = None,
               judges: Optional[dict] = None) -> dict:
    """Ablate ``indices`` (hidden indices) in one finished run (see module docstring); writes and returns
    ``<run_dir>/ablation/summary.json``. Skips the work if its fingerprint matches (unless ``force``).
    ``models`` / ``judges``: caches shared by the runs of one task.

    Raises ``GenerationError`` (not a finished run), ``ConfigError`` (an index outside the hidden size,
    bad parameters), ``DataError``, ``ModelLoadError``.
    """
    from irm_hpc.data import load_alignment, tokenize
    from irm_hpc.generate import load_run, read_run_config, require_weights
    from irm_hpc.inject import ablation_indices, decoder_layers

    params = params or AblationParams()
    params.check()
    run_path = RunDir(run_dir)
    read_run_config(run_path.root)
    require_weights(run_path.root)
    indices = sorted({int(i) for i in indices})
    if not indices:
        raise ConfigError("no index to ablate: pass --indices I ... or run the striation analysis first")
    fp = fingerprint(run_path.root, params, indices)
    want_judge = params.judge and run_path.evaluation_summary.is_file()
    if run_path.ablation_summary.is_file() and not force:
        try:
            old = json.loads(run_path.ablation_summary.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("fingerprint") == fp:
            if not want_judge or old.get("judge"):
                return old
            t0 = time.perf_counter()  # the loss part is current: add the judge part only
            run = load_run(run_path.root, device, models)
            old["judge"] = _judge_ablation(run, indices, params, judges)
            old["params"] = params.settings()
            old["timing"]["judge_seconds"] = round(time.perf_counter() - t0, 3)
            atomic_write_json(run_path.ablation_summary, old, indent=1)
            return old
    t0 = time.perf_counter()
    run = load_run(run_path.root, device, models)
    hidden = int(run.irm.hidden_size)
    ablation_indices(indices, hidden)  # one-line ConfigError for an index outside the hidden size
    cfg = run.cfg
    data = load_alignment(cfg.data, str(cfg.alignment), int(cfg.seed))
    ml = int(cfg.data.max_length)
    sides = {"target": tokenize(run.tokenizer, data.eval_target[: params.eval_texts], ml),
             "other": tokenize(run.tokenizer, data.eval_other[: params.eval_texts], ml)}
    bench = LossBench(run.lm, run.irm, sides, run.tokenizer.pad_token_id, params.batch_size)
    full_losses = bench.losses()
    full = bench.gain_of(full_losses)
    mean_abs = bench.mean_abs_injection()
    rank = np.empty(hidden, int)
    rank[np.argsort(-mean_abs)] = np.arange(1, hidden + 1)

    nulls = {i: matched_null(mean_abs, i, indices, params.null_size) for i in indices}
    null_delta: dict[int, float] = {}
    for j in sorted(set().union(*nulls.values())):
        null_delta[j] = full - bench.gain(ablate=[j])
    per_index = {}
    for i in indices:
        delta = full - bench.gain(ablate=[i])
        nd = np.array([null_delta[j] for j in nulls[i]])
        keep = bench.gain(ablate=[k for k in range(hidden) if k != i])
        per_index[str(i)] = {
            "delta_gain": _f(delta), "p": _f((1 + int((nd >= delta).sum())) / (1 + len(nd))),
            "null_size": len(nd), "null_indices": nulls[i], "null_delta_mean": _f(nd.mean()),
            "null_delta_sd": _f(nd.std(ddof=1)) if len(nd) > 1 else None,
            "null_delta_max": _f(nd.max()), "z": _f((delta - nd.mean()) / nd.std(ddof=1)) if len(nd) > 1 and nd.std(ddof=1) > 0 else None,
            "share_of_gain": _f(delta / full) if abs(full) > 1e-12 else None,
            "keep_only_gain": _f(keep), "keep_only_share": _f(keep / full) if abs(full) > 1e-12 else None,
            "mean_abs_injection": _f(mean_abs[i]), "mean_abs_rank": int(rank[i]),
            "null_mean_abs_median": _f(np.median(mean_abs[nulls[i]])),
            "null_mean_abs_rank_range": [int(rank[nulls[i]].min()), int(rank[nulls[i]].max())]}
    n_model_layers = len(decoder_layers(run.lm))
    groups = []
    for name, members in layer_groups(run.irm.injection_layers, n_model_layers, params.layer_groups):
        others = [k for k in run.irm.injection_layers if k not in members]
        without = bench.gain(drop_layers=members)
        only = bench.gain(drop_layers=others) if others else full
        groups.append({"group": name, "layers": members, "gain_without": _f(without), "delta_gain": _f(full - without),
                       "share_of_gain": _f((full - without) / full) if abs(full) > 1e-12 else None,
                       "gain_only": _f(only), "only_share": _f(only / full) if abs(full) > 1e-12 else None})
    t_loss = time.perf_counter() - t0
    judge = None
    if want_judge:
        t1 = time.perf_counter()
        judge = _judge_ablation(run, indices, params, judges)
        t_judge = round(time.perf_counter() - t1, 3)
    summary = {
        "schema": SCHEMA, "fingerprint": fp, "run": run.run_id, "alignment": run.alignment, "seed": int(cfg.seed),
        "layer_set": cfg.irm.get("layer_set") or "custom", "model": str(cfg.model.name),
        "injection_layers": run.irm.injection_layers, "hidden_size": hidden, "params": params.settings(),
        "ablated": indices, "n_texts": {k: len(v) for k, v in sides.items()},
        "tokens": {k: sum(b.tokens for b in v) for k, v in bench.batches.items()},
        "base_loss": {k: _f(v) for k, v in bench.base.items()}, "irm_loss": {k: _f(v) for k, v in full_losses.items()},
        "gain": _f(full), "indices": per_index, "null": {str(j): _f(d) for j, d in sorted(null_delta.items())},
        "layers": {"mode": params.layer_groups, "groups": groups}, "judge": judge,
        "mean_abs_injection": [_f(x) for x in mean_abs],
        "timing": {"loss_seconds": round(t_loss, 3), "conditions": bench.forwards,
                   "judge_seconds": t_judge if judge is not None else None,
                   "total_seconds": round(time.perf_counter() - t0, 3)},
    }
    run_path.ablation.mkdir(exist_ok=True)
    atomic_write_json(run_path.ablation_summary, summary, indent=1)
    return summary


def ablate_runs(run_dirs: Sequence[str], params: AblationParams, indices: Optional[Sequence[int]] = None,
                analysis_summary: Optional[str] = None) -> list[Optional[str]]:
    """Ablate each finished run in turn (an ablation array task). ``indices``: given, or the consensus
    indices of ``analysis_summary`` (read when the task starts: the analysis ran before it). A run that
    cannot be ablated is reported on stdout and skipped (``None``; ``evaluate.for_each_finished_run``)."""
    from irm_hpc.evaluate import for_each_finished_run

    if indices is None:
        indices = consensus_indices(Path(str(analysis_summary)), params.max_indices)

    def work(d: str, models: dict, judges: dict) -> tuple[Path, str]:
        s = ablate_run(d, indices, params, models=models, judges=judges)
        parts = ", ".join(f"{i}: delta {e['delta_gain']:+.4f} p {e['p']:.3f}" for i, e in s["indices"].items())
        return RunDir(d).ablation_summary, f"ablated {d}: gain {s['gain']:+.4f}; {parts}"

    return for_each_finished_run(run_dirs, work)


# ----------------------------------------------------------------------------- CLI
def _targets(paths: Sequence[str]) -> tuple[list[str], Optional[Path]]:
    """Run dirs and the analysis summary that names their consensus indices (a sweep's, or the run's sweep)."""
    from irm_hpc.manifest import load_manifest

    runs: list[str] = []
    summary: Optional[Path] = None
    for p in paths:
        path = Path(p)
        if SweepDir(path).manifest.is_file():
            m = load_manifest(path)
            runs += [str(m.task_dir(t)) for t in m.tasks]
            summary = summary or SweepDir(path).analysis / "summary.json"
        elif RunDir(path).config.is_file():
            runs.append(str(path))
            sweep = path.resolve().parent.parent
            if summary is None and SweepDir(sweep).manifest.is_file():
                summary = SweepDir(sweep).analysis / "summary.json"
        else:
            raise AblationError(f"{path} is neither a sweep dir (manifest.json) nor a run dir (config.yaml); pass "
                                "runs/<sweep> or runs/<sweep>/runs/<task>")
    return runs, summary


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="irm-hpc ablate", description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="+", help="a sweep dir (all its runs) or run dirs, then key=value ablation "
                    "settings (sweep.ablation keys)")
    ap.add_argument("--indices", nargs="+", help="hidden indices to ablate (default: the consensus "
                    "striation indices of the sweep's analysis summary)")
    ap.add_argument("--force", action="store_true", help="recompute even when the fingerprint matches")

    def body() -> int:
        args = ap.parse_args(argv)
        extra = [t for t in (args.indices or []) if "=" in t]  # key=value typed after --indices I ...
        paths = [t for t in args.targets if "=" not in t]
        kv = [t for t in args.targets if "=" in t] + extra
        given = [t for t in (args.indices or []) if "=" not in t]
        if any(not t.isdigit() for t in given):
            raise ConfigError(f"--indices takes hidden indices (integers >= 0), got {given}")
        bad = [o for o in kv if not o.split("=", 1)[0].strip()]
        if bad:
            raise ConfigError(f"ablation setting {bad[0]!r} is not key=value")
        params = AblationParams.from_config({o.split("=", 1)[0].strip(): _literal(o.split("=", 1)[1]) for o in kv})
        runs, summary = _targets(paths)
        indices = [int(t) for t in given] or None
        if indices is None:
            if summary is None:
                raise AblationError("no analysis summary found for these runs: pass --indices I ...")
            indices = consensus_indices(summary, params.max_indices)
        done = 0
        for d in runs:
            if not RunDir(d).is_done():
                print(f"skipped {d}: training did not finish (no DONE)")
                continue
            s = ablate_run(d, indices, params, force=args.force)
            parts = ", ".join(f"{i}: delta {e['delta_gain']:+.4f} p {e['p']:.3f} keep-only {e['keep_only_share']}"
                              for i, e in s["indices"].items())
            print(f"{d}: gain {s['gain']:+.4f} nats/token; {parts}")
            done += 1
        if not done:
            raise AblationError("no finished run to ablate (no DONE in any run dir)")
        return 0

    return cli_errors(body)


def _literal(value: str) -> Any:
    """A ``key=value`` value parsed as YAML scalar (``50`` -> int, ``true`` -> bool), as hydra does."""
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


if __name__ == "__main__":
    sys.exit(main())

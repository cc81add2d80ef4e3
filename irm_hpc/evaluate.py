"""Evaluation stage (steer and judge): ``python -m irm_hpc.evaluate RUN_DIR [RUN_DIR ...] [key=value ...]``.

For one finished run: generate continuations of a fixed prompt set (``irm_hpc/prompts/
neutral_openings.txt``, 24 neutral conversation openings) with the IRM at each of ``scales`` (0 = off),
judge them with the GoEmotions emotion classifier (``irm_hpc.judge``), and measure fluency:

* alignment rate: share of continuations the judge assigns to the run's alignment; mean judge
  probability of the alignment; the judge's label counts;
* perplexity (nats -> exp) of each continuation given its prompt under the frozen base model (IRM off),
  pooled over tokens: ``exp(sum NLL / sum tokens)``; distinct-2 (Li et al. 2016): distinct bigrams /
  bigrams over all continuations of the condition;
* on - off rate difference (scale 1 vs 0) with a 95 % percentile bootstrap CI that resamples prompts
  (all samples of a prompt move together: they share the prompt and the random stream);
* baseline: a contrastive steering vector per injection layer (ActAdd, Turner et al. 2023; CAA, Rimsky
  et al. 2024): the mean residual after the attention block over the alignment's training texts minus
  the mean over other labels' texts, each layer's vector rescaled to the IRM's mean injection norm at
  that layer (L2 over hidden, mean over the prompt tokens), injected at the same sites, judged the same way.

Outputs in the run dir: ``evaluation/summary.json`` (schema ``irm_hpc.evaluation/1``) and
``evaluation/generations.jsonl`` (one row per sample, ``irm_hpc.generate`` format, plus the judge's
label and probability). A run whose summary has the same fingerprint (parameters, prompts, IRM weights
file) is not evaluated again. In a sweep this is an array job between training and the striation
analysis (``--dependency=afterany``); the reduce pools runs per alignment (``summary.json`` key
``evaluation``).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from irm_hpc.config import EvaluationConfig, typed_section
from irm_hpc.errors import ConfigError, IrmError, cli_errors, one_line
from irm_hpc.generate import (LoadedRun, Sample, SamplingParams, default_prompts, encode_prompts, generate,
                              load_run, read_prompts, sample_rows, use_chat_template)
from irm_hpc.inject import SteeringVectors, capture_residuals, inject
from irm_hpc.layout import RunDir, atomic_write_json, atomic_write_text

SCHEMA = "irm_hpc.evaluation/1"
BASELINE = "caa"  # condition name of the steering-vector baseline


class EvaluationError(IrmError, ValueError):
    """A run cannot be evaluated (one line: problem and fix)."""


LAUNCHER_KEYS = ("enabled", "runs_per_task")  # sweep.evaluation keys of the launcher, not of the measurement


@dataclass
class EvalParams(EvaluationConfig):
    """The evaluation's parameters: the fields and defaults of ``config.EvaluationConfig`` (the
    ``sweep.evaluation`` schema, the one list of them), with their checks, the sampling parameters of
    :class:`~irm_hpc.generate.SamplingParams` they hold and the prompt list."""

    @classmethod
    def from_config(cls, section: Any) -> "EvalParams":
        """From a ``sweep.evaluation`` section (DictConfig or dict), typed by the schema. Raises
        ``ConfigError`` for an unknown key, a value of the wrong type, a ``${...}`` interpolation, or what
        :meth:`check` refuses."""
        typed = typed_section(EvaluationConfig, section, "evaluation")
        params = cls(**typed)
        params.check()
        return params

    def settings(self) -> dict:
        """The measurement's settings (every field but the launcher's ``enabled`` / ``runs_per_task``)."""
        return {k: v for k, v in asdict(self).items() if k not in LAUNCHER_KEYS}

    def check(self) -> None:
        """Raises ``ConfigError`` naming the bad value (also a missing or empty prompts file)."""
        self.scales = [float(s) for s in self.scales]
        if 0.0 not in self.scales or 1.0 not in self.scales:
            raise ConfigError(f"evaluation.scales {self.scales} must contain 0 (IRM off) and 1 (as trained)")
        if self.bootstrap < 100:
            raise ConfigError(f"evaluation.bootstrap={self.bootstrap}: use at least 100 resamples")
        if self.max_prompts is not None and self.max_prompts < 2:
            raise ConfigError("evaluation.max_prompts must be >= 2 (the bootstrap resamples prompts)")
        self.sampling().check()
        if len(self.prompt_list()) < 2:  # also: a missing prompts file fails here, at launch
            raise ConfigError("evaluation needs at least 2 prompts (the bootstrap resamples prompts)")

    def sampling(self) -> SamplingParams:
        """The sampling parameters alone."""
        return SamplingParams(**{f.name: getattr(self, f.name) for f in fields(SamplingParams)})

    def prompt_list(self) -> list[str]:
        prompts = read_prompts(self.prompts) if self.prompts else default_prompts()
        return prompts[: self.max_prompts] if self.max_prompts else prompts


# ----------------------------------------------------------------------------- measures
def distinct_n(token_lists: Sequence[Sequence[int]], n: int = 2) -> Optional[float]:
    """Distinct-n (Li et al. 2016): distinct n-grams / all n-grams, pooled over ``token_lists``; None if
    there is no n-gram."""
    grams = [tuple(t[i:i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


@torch.no_grad()
def continuation_nll(lm, samples: Sequence[Sample], pad_id: int, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: summed NLL (nats) of its continuation tokens given its prompt under ``lm`` as it is
    (call it without hooks for the base model), and the token count. Returns two (n_samples,) arrays."""
    from irm_hpc.data import collate

    device = next(lm.parameters()).device
    nll, count = np.zeros(len(samples)), np.zeros(len(samples), dtype=np.int64)
    order = [i for i, s in enumerate(samples) if s.new_ids]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        seqs = [samples[i].prompt_ids + samples[i].new_ids for i in idx]
        b = collate(seqs, pad_id)
        labels = b["labels"].clone()
        for row, i in enumerate(idx):
            labels[row, : len(samples[i].prompt_ids)] = -100
        logits = lm(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                    use_cache=False).logits
        tgt = labels[:, 1:].to(device)
        sel = tgt != -100  # only the continuation's positions go through the softmax
        tok = torch.nn.functional.cross_entropy(logits[:, :-1][sel].float(), tgt[sel], reduction="none")
        rows = torch.zeros(len(idx), dtype=torch.float64, device=tok.device)
        rows.index_add_(0, sel.nonzero()[:, 0], tok.double())
        nll[idx] = rows.cpu().numpy()
        count[idx] = (tgt != -100).sum(1).cpu().numpy()
    return nll, count


def bootstrap_diff(hits_on: np.ndarray, hits_off: np.ndarray, n: np.ndarray, resamples: int,
                   seed: int) -> tuple[float, list[float]]:
    """Rate difference sum(on)/sum(n) - sum(off)/sum(n) and its 95 % percentile bootstrap CI.

    ``hits_on``/``hits_off``/``n``: per-prompt counts (P,), paired (same prompts and samples). Resampling
    draws P prompts with replacement (a cluster bootstrap: samples of one prompt are not independent).
    Returns ``(diff, [lo, hi])``.
    """
    hits_on, hits_off, n = (np.asarray(a, dtype=np.float64) for a in (hits_on, hits_off, n))
    diff = float(hits_on.sum() / n.sum() - hits_off.sum() / n.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(n), size=(resamples, len(n)))
    tot = n[idx].sum(1)
    boot = (hits_on[idx].sum(1) - hits_off[idx].sum(1)) / np.maximum(tot, 1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return diff, [float(lo), float(hi)]


# ----------------------------------------------------------------------------- steering baseline
@torch.no_grad()
def mean_residuals(lm, seqs: Sequence[Sequence[int]], layers: Sequence[int], pad_id: int,
                   batch_size: int = 16) -> torch.Tensor:
    """Mean residual stream right after the attention block of each of ``layers`` (the injection
    sites), over the non-padding tokens of ``seqs`` except each text's first token (the attention sink,
    whose massive activations would weigh by text length). Returns (n_layers, hidden) float64 on CPU.
    Through ``inject.capture_residuals`` (signed); hooks are removed on exit (also on error)."""
    from irm_hpc.data import collate

    device = next(lm.parameters()).device
    with capture_residuals(lm, absolute=False) as stats:
        for start in range(0, len(seqs), batch_size):
            b = collate(list(seqs[start:start + batch_size]), pad_id)
            keep = b["attention_mask"].clone()
            keep[:, 0] = 0  # right-padded: position 0 is each text's first token
            stats["mask"] = keep
            lm(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), use_cache=False)
    return stats["sum"][list(layers)] / max(stats["count"], 1)


def contrastive_vectors(run: LoadedRun, n_texts: int, seed: int) -> tuple[torch.Tensor, dict]:
    """The ActAdd/CAA-style steering vector of the run's alignment at each injection layer: mean residual
    after attention over up to ``n_texts`` of the alignment's training texts minus the mean over up to
    ``n_texts`` texts of the other labels (same data split and ``data.max_length`` as training).
    Returns ((n_layers, hidden) float64, info)."""
    from irm_hpc.data import load_alignment, read_rows, tokenize

    cfg = run.cfg
    rows = read_rows(cfg.data)  # read once: the split below and the other labels' texts
    data = load_alignment(cfg.data, run.alignment, int(cfg.seed), rows=rows)
    rng = np.random.default_rng(seed)
    target = [data.train[i] for i in rng.permutation(len(data.train))[:n_texts]]
    train_set = set(data.train) | set(data.eval_target)
    other_pool = [t for t, ls in rows if run.alignment not in ls and t not in train_set]
    other = [other_pool[i] for i in rng.permutation(len(other_pool))[:n_texts]]
    if not target or not other:
        raise EvaluationError(f"run {run.run_id}: no texts for the steering vector of '{run.alignment}' "
                              "(alignment or other labels empty); set evaluation.baseline=false")
    ml = int(cfg.data.max_length)
    layers = run.irm.injection_layers
    pad = run.tokenizer.pad_token_id
    mu_a = mean_residuals(run.lm, tokenize(run.tokenizer, target, ml), layers, pad)
    mu_o = mean_residuals(run.lm, tokenize(run.tokenizer, other, ml), layers, pad)
    return mu_a - mu_o, {"n_alignment_texts": len(target), "n_other_texts": len(other)}


@torch.no_grad()
def injection_norms(run: LoadedRun, prompts: Sequence[str], chat: bool, batch_size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """The IRM's injections at scale 1 on the prompts (prefill; non-padding tokens except each prompt's
    first, the attention sink): mean L2 norm per injection layer (n_layers,) and the per-index profile,
    mean |v| over layers and tokens (hidden,)."""
    from irm_hpc.generate import left_pad

    encoded = encode_prompts(run.tokenizer, prompts, chat)
    norm_sum, prof_sum, tokens = 0.0, 0.0, 0.0
    for start in range(0, len(encoded), batch_size):
        ids, mask = left_pad(encoded[start:start + batch_size], run.tokenizer.pad_token_id, run.device)
        with inject(run.lm, run.irm, keep_injections=True) as inj:
            run.lm(input_ids=ids, attention_mask=mask, use_cache=False)
            v = inj.last_injection.float()  # (batch, seq, n_layers, hidden)
        keep = mask.clone()
        keep[torch.arange(len(keep)), keep.argmax(1)] = 0  # left-padded: the first real token
        m = keep.float()[..., None]
        norm_sum = norm_sum + (v.norm(dim=-1) * m).sum((0, 1))
        prof_sum = prof_sum + (v.abs().mean(2) * m).sum((0, 1))
        tokens += float(m.sum())
    return (norm_sum / tokens).cpu().numpy().astype(np.float64), (prof_sum / tokens).cpu().numpy().astype(np.float64)


# ----------------------------------------------------------------------------- one run
def fingerprint(run_dir, params: EvalParams, prompts: Sequence[str]) -> str:
    """sha256 over the parameters, the prompts and the IRM weights file's size and mtime (ns)."""
    st = RunDir(run_dir).weights.stat()
    blob = json.dumps({"params": params.settings(), "prompts": list(prompts), "weights": [st.st_size, st.st_mtime_ns],
                       "schema": SCHEMA}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _condition(samples: list[Sample], probs: np.ndarray, labels: list[str], alignment: str, nll: np.ndarray,
               count: np.ndarray, prompts: Sequence[str]) -> dict:
    a = labels.index(alignment)
    pred = probs.argmax(1)
    hits = pred == a
    by_prompt = {p: k for k, p in enumerate(prompts)}
    ph, pn = np.zeros(len(prompts), dtype=np.int64), np.zeros(len(prompts), dtype=np.int64)
    for s, h in zip(samples, hits):
        ph[by_prompt[s.prompt]] += int(h)
        pn[by_prompt[s.prompt]] += 1
    tokens = int(count.sum())
    return {"n": len(samples), "alignment_rate": float(hits.mean()), "mean_prob": float(probs[:, a].mean()),
            "label_counts": {lab: int((pred == k).sum()) for k, lab in enumerate(labels)},
            "perplexity": float(np.exp(nll.sum() / tokens)) if tokens else None,
            "nll_per_token": float(nll.sum() / tokens) if tokens else None, "tokens": tokens,
            "mean_new_tokens": float(np.mean([len(s.new_ids) for s in samples])),
            "distinct2": distinct_n([s.new_ids for s in samples], 2),
            "per_prompt_hits": ph.tolist(), "per_prompt_n": pn.tolist()}


def evaluate_run(run_dir, params: Optional[EvalParams] = None, *, force: bool = False,
                 device: Optional[torch.device] = None, models: Optional[dict] = None,
                 judges: Optional[dict] = None) -> dict:
    """Evaluate one finished run (see module docstring); returns its summary dict and writes
    ``<run_dir>/evaluation/summary.json`` and ``generations.jsonl``.

    Skips the work and returns the stored summary if its fingerprint matches (unless ``force``).
    ``models`` / ``judges``: caches of loaded base models (``generate.load_run``) and judges (by data
    config and splits) shared by the runs of one task.
    Raises ``GenerationError`` (not a finished run), ``EvaluationError``, ``DataError`` (the judge's
    splits cannot be read), ``ModelLoadError``, ``ConfigError``.
    """
    from irm_hpc.judge import load_judge

    params = params or EvalParams()
    params.check()
    prompts = params.prompt_list()
    run_path = RunDir(run_dir)
    from irm_hpc.generate import read_run_config, require_weights

    read_run_config(run_path.root)  # one-line errors for a bad dir before anything heavy
    require_weights(run_path.root)
    out_dir = run_path.evaluation
    fp = fingerprint(run_path.root, params, prompts)
    summary_file = run_path.evaluation_summary
    if summary_file.is_file() and not force:
        try:
            old = json.loads(summary_file.read_text())
            if old.get("fingerprint") == fp:
                return old
        except (OSError, ValueError):
            pass
    t0 = time.perf_counter()
    run = load_run(run_path.root, device, models)
    t_load = time.perf_counter() - t0
    from omegaconf import OmegaConf

    jkey = json.dumps([OmegaConf.to_container(run.cfg.data), params.judge_train_split, params.judge_test_split],
                      sort_keys=True)
    if judges is not None and jkey in judges:
        judge, judge_metrics = judges[jkey]
    else:
        judge, judge_metrics = load_judge(run.cfg.data, train_split=params.judge_train_split,
                                          test_split=params.judge_test_split)
        if judges is not None:
            judges[jkey] = (judge, judge_metrics)
    if run.alignment not in judge.labels:
        raise EvaluationError(f"alignment '{run.alignment}' is not a judge label ({', '.join(judge.labels)}); the "
                              "judge is trained on the run's data labels")
    sp = params.sampling()
    chat = use_chat_template(run.tokenizer, sp.chat_template)
    t1 = time.perf_counter()
    samples = generate(run.lm, run.tokenizer, run.irm, prompts, params.scales, sp)
    conditions: dict[str, list[Sample]] = {}
    for s in samples:
        conditions.setdefault(f"scale={s.scale:g}", []).append(s)
    norms, irm_profile = injection_norms(run, prompts, chat, sp.batch_size)
    baseline_info: dict = {}
    if params.baseline:
        raw, info = contrastive_vectors(run, params.baseline_texts, params.seed)
        raw_norm = raw.norm(dim=-1)
        vec = raw * (torch.as_tensor(norms) / raw_norm.clamp_min(1e-12))[:, None]
        steer = SteeringVectors(vec.float(), run.irm.injection_layers).to(run.device)
        base_samples = generate(run.lm, run.tokenizer, steer, prompts, [1.0], sp)
        for s in base_samples:
            s.scale = float("nan")
        conditions[BASELINE] = base_samples
        baseline_info = {**info, "raw_norm": raw_norm.tolist(), "profile": vec.abs().mean(0).tolist(),
                         "matched_norm": norms.tolist()}
    t_gen = time.perf_counter() - t1
    results, rows = {}, []
    pad = run.tokenizer.pad_token_id
    for name, group in conditions.items():
        texts = [s.text for s in group]
        probs = judge.predict_proba(texts)
        nll, count = continuation_nll(run.lm, group, pad)
        results[name] = _condition(group, probs, judge.labels, run.alignment, nll, count, prompts)
        for r, s, pr in zip(sample_rows(run, group, sp), group, probs):
            r.update(condition=name, scale=None if name == BASELINE else s.scale,
                     judge_label=judge.labels[int(pr.argmax())], judge_prob_alignment=float(pr[judge.labels.index(run.alignment)]),
                     perplexity_tokens=len(s.new_ids))
            rows.append(r)
    off, on = results["scale=0"], results["scale=1"]
    diff, ci = bootstrap_diff(on["per_prompt_hits"], off["per_prompt_hits"], on["per_prompt_n"], params.bootstrap,
                              params.seed)
    summary = {
        "schema": SCHEMA, "fingerprint": fp, "run": run.run_id, "alignment": run.alignment,
        "seed": int(run.cfg.seed), "layer_set": run.cfg.irm.get("layer_set") or "custom",
        "model": str(run.cfg.model.name), "injection_layers": run.irm.injection_layers,
        "params": params.settings(), "prompts": prompts, "chat_template": chat, "judge": judge_metrics,
        "conditions": results, "rate_off": off["alignment_rate"], "rate_on": on["alignment_rate"],
        "rate_diff": diff, "rate_diff_ci": ci,
        "perplexity_off": off["perplexity"], "perplexity_on": on["perplexity"],
        "irm_injection_norm": norms.tolist(), "irm_profile": irm_profile.tolist(),
        "baseline": baseline_info or None,
        "timing": {"load_seconds": round(t_load, 3), "generate_seconds": round(t_gen, 3),
                   "total_seconds": round(time.perf_counter() - t0, 3)},
    }
    if params.baseline:
        b = results[BASELINE]
        bd, bci = bootstrap_diff(b["per_prompt_hits"], off["per_prompt_hits"], b["per_prompt_n"], params.bootstrap,
                                 params.seed)
        summary["baseline"].update(rate=b["alignment_rate"], rate_diff=bd, rate_diff_ci=bci,
                                   perplexity=b["perplexity"])
    out_dir.mkdir(exist_ok=True)
    atomic_write_text(run_path.generations, "".join(json.dumps(r) + "\n" for r in rows))
    summary["timing"]["total_seconds"] = round(time.perf_counter() - t0, 3)
    atomic_write_json(summary_file, summary, indent=1)
    return summary


def for_each_finished_run(run_dirs: Sequence[str],
                          work: Callable[[str, dict, dict], tuple[Path, str]]) -> list[Optional[str]]:
    """Run ``work(run_dir, models, judges)`` on each finished run in turn (one array task of the evaluation
    or ablation stage); ``work`` returns (summary file, a line for stdout). A run without ``DONE``, or
    whose work raises, is reported on stdout and skipped (``None``); the others go on. ``models`` /
    ``judges``: caches shared by the task's runs (one frozen base model, one judge). Torch uses as many
    intra-op threads as Slurm gave the task CPUs (``dist.intra_op_threads``), as training does: two array
    tasks on one node must not each start a thread per core."""
    from irm_hpc.dist import intra_op_threads

    threads = intra_op_threads(None)
    if threads:
        torch.set_num_threads(threads)
    out: list[Optional[str]] = []
    models: dict = {}
    judges: dict = {}
    for d in run_dirs:
        if not RunDir(d).is_done():
            print(f"skipped {d}: training did not finish (no DONE)")
            out.append(None)
            continue
        try:
            path, line = work(d, models, judges)
            print(line)
            out.append(str(path))
        except IrmError as exc:
            print(f"skipped {d}: {one_line(exc)}")
            out.append(None)
        except Exception as exc:  # noqa: BLE001 - one run (e.g. CUDA out of memory) must not stop the others
            print(f"skipped {d}: {one_line(exc, with_type=True)}")
            out.append(None)
    return out


def evaluate_runs(run_dirs: Sequence[str], params: EvalParams) -> list[Optional[str]]:
    """Evaluate each finished run in turn (an evaluation array task; see :func:`for_each_finished_run`)."""

    def work(d: str, models: dict, judges: dict) -> tuple[Path, str]:
        s = evaluate_run(d, params, models=models, judges=judges)
        return RunDir(d).evaluation_summary, (
            f"evaluated {d}: rate off {s['rate_off']:.3f} on {s['rate_on']:.3f} "
            f"diff {s['rate_diff']:+.3f} CI [{s['rate_diff_ci'][0]:+.3f}, {s['rate_diff_ci'][1]:+.3f}]")

    return for_each_finished_run(run_dirs, work)


def main(argv: Optional[list[str]] = None) -> int:
    """CLI: ``python -m irm_hpc.evaluate RUN_DIR [...] [key=value ...] [--force]``; exit 2 on bad input."""
    argv = sys.argv[1:] if argv is None else argv

    def body() -> int:
        import yaml

        force = "--force" in argv
        args = [a for a in argv if a != "--force"]
        dirs = [a for a in args if "=" not in a]
        kv = [a for a in args if "=" in a]
        bad = [a for a in dirs if a.startswith("-")]
        if bad or not dirs:
            raise ConfigError(f"usage: python -m irm_hpc.evaluate RUN_DIR [RUN_DIR ...] [key=value ...] [--force]"
                              f"{f' (unknown option {bad[0]})' if bad else ''}")
        section = {}
        for item in kv:
            key, _, value = item.partition("=")
            try:
                section[key.strip()] = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"cannot parse {item!r}; use key=value (lists as [0,1,2])") from None
        params = EvalParams.from_config(section)
        models: dict = {}
        judges: dict = {}
        for d in dirs:
            s = evaluate_run(d, params, force=force, models=models, judges=judges)
            print(json.dumps({k: s[k] for k in ("run", "alignment", "rate_off", "rate_on", "rate_diff", "rate_diff_ci",
                                                "perplexity_off", "perplexity_on")}))
        return 0

    return cli_errors(body)


if __name__ == "__main__":
    sys.exit(main())

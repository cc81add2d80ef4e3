"""The evaluation stage (irm_hpc.evaluate): measures, the per-run evaluation, the reduce's section."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_tsv, run_module, tiny_overrides, train_tiny_run
from irm_hpc.config import load_config
from irm_hpc.evaluate import (EvalParams, bootstrap_diff, continuation_nll, distinct_n, evaluate_run,
                              mean_residuals)
from irm_hpc.generate import Sample
from irm_hpc.inject import count_hooks
from irm_hpc.models import load_model


def test_distinct_n():
    assert distinct_n([[1, 2, 1, 2], [1, 2]], 2) == pytest.approx(2 / 4)  # bigrams 12 21 12 | 12
    assert distinct_n([[1], []], 2) is None
    assert distinct_n([[1, 2, 3]], 2) == 1.0


def test_bootstrap_diff_known_cases():
    n = np.full(10, 4)
    d, ci = bootstrap_diff(np.full(10, 2), np.full(10, 2), n, 500, 0)
    assert d == 0.0 and ci == [0.0, 0.0]
    d, ci = bootstrap_diff(np.full(10, 4), np.zeros(10), n, 500, 0)
    assert d == 1.0 and ci == [1.0, 1.0]
    rng = np.random.default_rng(1)
    on, off = rng.integers(0, 5, 30), rng.integers(0, 5, 30)
    d, (lo, hi) = bootstrap_diff(on, off, np.full(30, 4), 2000, 0)
    assert lo < d < hi and d == pytest.approx((on.sum() - off.sum()) / 120)


@pytest.fixture(scope="module")
def tiny_lm():
    cfg = load_config("train", ["model=tiny_random", "out_dir=/tmp/unused"])
    return load_model(cfg.model, torch.device("cpu"))


def test_continuation_nll_matches_hf_loss(tiny_lm):
    lm, tok = tiny_lm
    pairs = [("hello ", "world!"), ("a much longer prompt here, ", "ok"), ("x", "")]
    samples = []
    for p, c in pairs:
        pi, ci = tok(p)["input_ids"], tok(c, add_special_tokens=False)["input_ids"] if c else []
        samples.append(Sample(p, 1.0, 0, c, pi, ci))
    nll, count = continuation_nll(lm, samples, tok.pad_token_id)  # one right-padded batch of mixed lengths
    for k, s in enumerate(samples[:2]):
        ids = torch.tensor([s.prompt_ids + s.new_ids])
        labels = ids.clone()
        labels[0, : len(s.prompt_ids)] = -100
        with torch.no_grad():
            ref = lm(input_ids=ids, labels=labels).loss.item() * len(s.new_ids)
        assert count[k] == len(s.new_ids) and nll[k] == pytest.approx(ref, rel=1e-5)
    assert count[2] == 0 and nll[2] == 0


def test_mean_residuals_is_the_residual_after_attention(tiny_lm):
    lm, tok = tiny_lm
    seqs = [tok("abc")["input_ids"], tok("hello world")["input_ids"]]
    got = mean_residuals(lm, seqs, [0, 2], tok.pad_token_id)
    assert count_hooks(lm) == 0
    # reference: layer input + attention output, by running the decoder layer's parts by hand
    captured = {}
    layers = lm.model.layers
    hooks = [layers[k].register_forward_pre_hook(lambda m, a, kw, k=k: captured.setdefault(("in", k), []).append(
        kw.get("hidden_states", a[0] if a else None)), with_kwargs=True) for k in (0, 2)]
    hooks += [layers[k].self_attn.register_forward_hook(lambda m, a, o, k=k: captured.setdefault(("attn", k), []).append(
        o[0])) for k in (0, 2)]
    try:
        with torch.no_grad():
            for s in seqs:
                lm(input_ids=torch.tensor([s]))
    finally:
        for h in hooks:
            h.remove()
    for j, k in enumerate((0, 2)):
        # every token but each text's first (the attention sink)
        resid = torch.cat([(x + y)[0, 1:] for x, y in zip(captured[("in", k)], captured[("attn", k)])]).double()
        torch.testing.assert_close(got[j], resid.mean(0), rtol=1e-5, atol=1e-6)


def test_eval_params_validation():
    with pytest.raises(ValueError, match="must contain 0"):
        EvalParams.from_config({"scales": [1, 2]})
    with pytest.raises(ValueError, match="unknown evaluation key 'n_sample'"):
        EvalParams.from_config({"n_sample": 2})
    assert EvalParams.from_config({"enabled": True, "runs_per_task": 3, "scales": [0, 1, 2]}).scales == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="evaluation.n_samples"):
        EvalParams.from_config({"n_samples": "four"})  # typed by the schema (config.EvaluationConfig)
    with pytest.raises(ValueError, match="interpolation"):
        EvalParams.from_config({"n_samples": "${oc.env:HOME}"})
    p = EvalParams.from_config({"runs_per_task": 3})
    assert "runs_per_task" not in p.settings() and p.settings()["n_samples"] == 4


SMALL = dict(n_samples=2, max_prompts=4, max_new_tokens=6, baseline_texts=16, bootstrap=200, scales=[0, 1, 2])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("ev") / "run")


def test_run_on_data_without_test_split_fails_in_one_line(tmp_path):
    data = make_tsv(tmp_path / "align.tsv")
    res = run_module("irm_hpc.train", tiny_overrides(data, tmp_path / "run", "train.max_steps=2"), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_module("irm_hpc.evaluate", [str(tmp_path / "run"), "max_prompts=2", "n_samples=1"], timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1 and "error:" in res.stderr
    assert not (tmp_path / "run" / "evaluation" / "summary.json").exists()


def test_evaluate_run_summary_generations_and_fingerprint(tiny_run):
    params = EvalParams(**SMALL)
    s = evaluate_run(tiny_run, params)
    assert s["alignment"] == "anger" and set(s["conditions"]) == {"scale=0", "scale=1", "scale=2", "caa"}
    for c in s["conditions"].values():
        assert c["n"] == 4 * 2 and sum(c["per_prompt_n"]) == 8 and 0 <= c["alignment_rate"] <= 1
        assert sum(c["label_counts"].values()) == 8
    assert s["rate_diff"] == pytest.approx(s["rate_on"] - s["rate_off"])
    lo, hi = s["rate_diff_ci"]
    assert lo <= s["rate_diff"] <= hi
    assert s["judge"]["macro_f1"] > s["judge"]["majority_macro_f1"]
    b = s["baseline"]
    assert len(b["profile"]) == 32 and np.allclose(b["matched_norm"], s["irm_injection_norm"])
    rows = [json.loads(x) for x in (tiny_run / "evaluation" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 8 and {r["condition"] for r in rows} == {"scale=0", "scale=1", "scale=2", "caa"}
    before = (tiny_run / "evaluation" / "generations.jsonl").stat().st_mtime_ns
    again = evaluate_run(tiny_run, params)
    assert again["fingerprint"] == s["fingerprint"]
    assert (tiny_run / "evaluation" / "generations.jsonl").stat().st_mtime_ns == before, "re-evaluated"


def _fake_eval(run_dir, alignment, on_hits, off_hits, n=4):
    cond = lambda hits: {"n": n * len(hits), "alignment_rate": sum(hits) / (n * len(hits)), "mean_prob": 0.1,
                         "label_counts": {}, "perplexity": 10.0, "nll_per_token": float(np.log(10.0)), "tokens": 100,
                         "mean_new_tokens": 5.0, "distinct2": 0.5, "per_prompt_hits": hits,
                         "per_prompt_n": [n] * len(hits)}
    s = {"schema": "irm_hpc.evaluation/1", "alignment": alignment, "seed": 0, "run": run_dir.name,
         "conditions": {"scale=0": cond(off_hits), "scale=1": cond(on_hits)}, "rate_off": 0, "rate_on": 0,
         "rate_diff": 0, "rate_diff_ci": [0, 0], "perplexity_off": 10.0, "perplexity_on": 10.0,
         "judge": {"macro_f1": 0.5, "data_checksum": "x"}, "params": {"n_samples": n}, "prompts": ["a"] * len(on_hits)}
    (run_dir / "evaluation").mkdir(parents=True)
    (run_dir / "evaluation" / "summary.json").write_text(json.dumps(s))


def test_reduce_pools_runs_per_alignment(tmp_path):
    from irm_hpc.analysis.evaluation import collect

    _fake_eval(tmp_path / "a0", "anger", [4, 4, 3, 4], [0, 1, 0, 0])
    _fake_eval(tmp_path / "a1", "anger", [2, 3, 4, 4], [0, 0, 0, 1])
    _fake_eval(tmp_path / "j0", "joy", [1, 0, 0, 0], [1, 0, 0, 0])
    (tmp_path / "j1").mkdir()  # a run without an evaluation
    names = ["a0", "a1", "j0", "j1"]
    ev = collect({n: str(tmp_path / n) for n in names}, {}, [5], resamples=500, seed=0)
    assert ev["available"] and ev["n_runs_evaluated"] == 3 and ev["missing"] == ["j1"]
    a = ev["per_alignment"]["anger"]
    assert a["n_runs"] == 2 and a["rate_on"] == pytest.approx(28 / 32) and a["rate_off"] == pytest.approx(2 / 32)
    assert a["rate_diff"] == pytest.approx(26 / 32) and a["ci_above_zero"] and a["perplexity_on"] == pytest.approx(10.0)
    j = ev["per_alignment"]["joy"]
    assert j["rate_diff"] == 0 and not j["ci_above_zero"]
    assert ev["criterion"]["n_ci_above_zero"] == 1 and ev["criterion"]["alignments_ci_above_zero"] == ["anger"]
    assert collect({"x": str(tmp_path / "j1")}, {}, [])["available"] is False


@pytest.mark.parametrize("override, message", [
    ("sweep.evaluation.scales=[1,2]", "must contain 0"),
    ("sweep.evaluation.prompts=/nonexistent/prompts.txt", "cannot read prompts file"),
    ("sweep.evaluation.n_samples=0", ">= 1"),
    ("sweep.evaluation.chat_template=maybe", "chat_template"),
    ("sweep.evaluation.nsamples=2", "nsamples"),
])
def test_launch_rejects_bad_evaluation_settings_before_submitting(tmp_path, override, message):
    res = run_module("irm_hpc.launch", ["--sweep", "smoke", "--cluster", "local", f"runs_root={tmp_path}",
                                        "sweep.evaluation.enabled=true", override], timeout=120)
    assert res.returncode == 2 and message in res.stderr, res.stderr[-1500:]
    assert len(res.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


def test_cli_wrong_type_is_one_line(tiny_run):
    res = run_module("irm_hpc.evaluate", [str(tiny_run), "n_samples=four"], timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-1500:]
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "evaluation.n_samples" in res.stderr

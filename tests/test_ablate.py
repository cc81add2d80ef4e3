"""The ablation stage (irm_hpc.ablate), its pooling in the reduce (analysis.ablation) and the mechanism
read from the weights (analysis.mechanism), on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import run_module, tiny_lm_and_irm, train_tiny_run
from irm_hpc.ablate import (AblationParams, FixedInjection, LossBench, ablate_run, layer_groups, matched_null)
from irm_hpc.analysis import ablation as pooled
from irm_hpc.analysis.mechanism import gain_ranks, logit_lens, mechanism, norm_gains
from irm_hpc.errors import ConfigError
from irm_hpc.inject import count_hooks, inject
from irm_hpc.irm import IRM


@pytest.fixture(scope="module")
def tiny():
    return tiny_lm_and_irm()


def _logits(lm, ids):
    with torch.no_grad():
        return lm(input_ids=ids).logits


def test_drop_layers_leaves_out_exactly_those_layers(tiny):
    lm, tok, irm = tiny
    ids = torch.tensor([tok("hello world, how are you")["input_ids"]])
    base = _logits(lm, ids)
    with inject(lm, irm, drop_layers=[0, 1, 2, 3]):
        assert torch.equal(_logits(lm, ids), base)  # every injection left out = the base model
    with inject(lm, irm):
        full = _logits(lm, ids)
    # dropping layer 3 only = an IRM whose layer-3 output is zero (the same IRM with that slot ablated by hand)
    with inject(lm, irm, drop_layers=[3]) as inj:
        dropped = _logits(lm, ids)
        assert inj.drop_layers == frozenset({3})
    with inject(lm, irm, keep_injections=True) as inj:
        lm(input_ids=ids)
        v = inj.last_injection.detach().clone()
    v[:, :, 3] = 0
    ref_irm = FixedInjection(v, [0, 1, 2, 3])
    with inject(lm, ref_irm):
        assert torch.allclose(_logits(lm, ids), dropped, atol=1e-6)
    assert not torch.allclose(dropped, full)
    with pytest.raises(ConfigError, match="not an injection layer"):
        with inject(lm, IRM(lm.config.hidden_size, [0, 1]), drop_layers=[3]):
            pass
    assert count_hooks(lm) == 0


def test_loss_bench_cached_vectors_equal_the_irm_under_each_ablation(tiny):
    lm, tok, irm = tiny
    sides = {"target": [tok(t)["input_ids"] for t in ("hello there", "a b c d e f", "ok")],
             "other": [tok(t)["input_ids"] for t in ("what time is it", "zz")]}
    bench = LossBench(lm, irm, sides, tok.pad_token_id, batch_size=2)
    full = bench.losses()

    def direct(**kw):  # the real IRM (not the cache), token-weighted over the same batches
        from irm_hpc.data import batches, collate

        out = {}
        for side, seqs in sides.items():
            tot = cnt = 0
            for chunk in batches(seqs, 2):
                b = collate(chunk, tok.pad_token_id)
                n = int((b["labels"][:, 1:] != -100).sum())
                with torch.no_grad(), inject(lm, irm, keep_injections=False, **kw):
                    tot += float(lm(**b, use_cache=False).loss) * n
                cnt += n
            out[side] = tot / cnt
        return out

    for kw in ({}, {"ablate": [5]}, {"ablate": list(range(1, lm.config.hidden_size))}, {"drop_layers": [0, 2]}):
        got = bench.losses(**kw) if kw else full
        ref = direct(**kw)
        assert got == pytest.approx(ref, rel=1e-5), kw
    g = bench.gain(ablate=[5])
    loss = bench.losses(ablate=[5])
    assert g == pytest.approx((bench.base["target"] - loss["target"]) - (bench.base["other"] - loss["other"]))
    prof = bench.mean_abs_injection()
    assert prof.shape == (lm.config.hidden_size,) and (prof > 0).all()


def test_matched_null_takes_the_nearest_in_log_mean_abs():
    m = np.array([1.0, 100.0, 90.0, 110.0, 10.0, 80.0, 0.0, 200.0])
    assert matched_null(m, 1, exclude=[3], size=3) == [2, 5, 7]  # nearest to 100 without 3: 90, 80, 200
    assert matched_null(m, 1, exclude=[], size=2) == [2, 3]
    assert len(matched_null(m, 0, exclude=[], size=50)) == 7  # capped by the hidden size


def test_layer_groups():
    assert layer_groups(list(range(8)), 8, "quarters") == [("q1", [0, 1]), ("q2", [2, 3]), ("q3", [4, 5]),
                                                           ("q4", [6, 7])]
    assert layer_groups([0, 4], 8, "quarters") == [("q1", [0]), ("q3", [4])]
    assert layer_groups([1, 5], 8, "each") == [("L1", [1]), ("L5", [5])]
    assert layer_groups([1, 5], 8, "none") == []


def test_params_are_checked():
    assert AblationParams.from_config({"null_size": 7}).null_size == 7
    for bad, msg in (({"null_size": 0}, "null_size"), ({"layer_groups": "halves"}, "layer_groups"),
                     ({"nope": 1}, "unknown ablation key 'nope'"), ({"null_size": "${oc.env:HOME}"}, "interpolation"),
                     ({"eval_texts": "many"}, "eval_texts")):
        with pytest.raises(ConfigError, match=msg):
            AblationParams.from_config(bad)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("abl") / "run")


SMALL = dict(null_size=6, eval_texts=8, batch_size=8)


def test_ablate_run_summary_null_and_fingerprint(tiny_run):
    params = AblationParams(**SMALL)
    s = ablate_run(tiny_run, [3, 5], params)
    assert s["ablated"] == [3, 5] and s["hidden_size"] == 32
    for i in ("3", "5"):
        e = s["indices"][i]
        assert e["null_size"] == 6 and len(e["null_indices"]) == 6 and int(i) not in e["null_indices"]
        assert not {3, 5} & set(e["null_indices"])  # consensus indices are never in each other's null
        nd = np.array([s["null"][str(j)] for j in e["null_indices"]])
        assert e["p"] == pytest.approx((1 + (nd >= e["delta_gain"]).sum()) / 7)
        assert e["keep_only_share"] == pytest.approx(e["keep_only_gain"] / s["gain"], rel=1e-3)  # 8 decimals stored
    assert [g["group"] for g in s["layers"]["groups"]] == ["q1", "q2", "q3", "q4"]
    assert s["judge"] is None  # no evaluation in this run
    on_disk = json.loads((tiny_run / "ablation" / "summary.json").read_text())
    assert on_disk["fingerprint"] == s["fingerprint"]
    before = (tiny_run / "ablation" / "summary.json").stat().st_mtime_ns
    assert ablate_run(tiny_run, [5, 3], params)["fingerprint"] == s["fingerprint"]
    assert (tiny_run / "ablation" / "summary.json").stat().st_mtime_ns == before, "recomputed"


def test_judge_ablation_pairs_with_the_evaluations_samples(tiny_run):
    """The judge part regenerates scale 1 with the evaluation's seeds: without ablation it reproduces the
    evaluation's own scale-1 samples token for token, so ablated and intact samples share their stream."""
    from irm_hpc.evaluate import EvalParams, evaluate_run
    from irm_hpc.generate import generate, load_run

    ep = EvalParams(n_samples=2, max_prompts=3, max_new_tokens=5, baseline=False, bootstrap=200, scales=[0, 1])
    evaluate_run(tiny_run, ep)
    run = load_run(tiny_run)
    rows = [json.loads(x) for x in (tiny_run / "evaluation" / "generations.jsonl").read_text().splitlines()]
    on = [r["text"] for r in rows if r["condition"] == "scale=1"]
    again = generate(run.lm, run.tokenizer, run.irm, ep.prompt_list(), [1.0], ep.sampling())
    assert [s.text for s in again] == on and len(set(on)) > 1
    s = ablate_run(tiny_run, [3, 5], AblationParams(**SMALL, bootstrap=200))
    j = s["judge"]
    assert j is not None and set(j["indices"]) == {"3", "5"} and j["n"] == len(on)
    for e in j["indices"].values():
        lo, hi = e["rate_diff_ci"]
        assert lo <= e["rate_diff"] <= hi and sum(e["per_prompt_n"]) == len(on)


def test_ablate_task_reads_the_consensus_indices_of_the_analysis(tiny_run, tmp_path):
    from irm_hpc.jobs import AblateTask

    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"consensus": {"indices": [{"index": 4}, {"index": 9}, {"index": 1}]}}))
    out = AblateTask([str(tiny_run), str(tmp_path / "unfinished")], {**SMALL, "max_indices": 2, "judge": False},
                     str(summary))()
    assert out == [str(tiny_run / "ablation" / "summary.json"), None]
    assert json.loads((tiny_run / "ablation" / "summary.json").read_text())["ablated"] == [4, 9]


def test_cli_errors_are_one_line_and_write_nothing(tiny_run, tmp_path):
    res = run_module("irm_hpc.ablate", [str(tiny_run), "--indices", "999"], timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "out of range" in res.stderr, res.stderr
    res = run_module("irm_hpc.ablate", [str(tmp_path)], timeout=120)
    assert res.returncode == 2 and "neither a sweep dir" in res.stderr and "Traceback" not in res.stderr
    res = run_module("irm_hpc.ablate", [str(tiny_run)], timeout=120)  # no sweep around it, no --indices
    assert res.returncode == 2 and "--indices" in res.stderr and "Traceback" not in res.stderr
    res = run_module("irm_hpc.ablate", [str(tiny_run), "--indices", "1", "null_size=zero"], timeout=120)
    assert res.returncode == 2 and "null_size" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_pooled_fisher_and_sign_test(tmp_path):
    from scipy.stats import combine_pvalues

    paths = {}
    for k, (p, delta, null_mean) in enumerate([(0.02, 0.3, 0.0), (0.5, 0.1, 0.2), (0.04, 0.2, 0.0)]):
        d = tmp_path / f"r{k}"
        (d / "ablation").mkdir(parents=True)
        (d / "ablation" / "summary.json").write_text(json.dumps({
            "schema": "irm_hpc.ablation/1", "gain": 1.0, "null": {"1": 0.0},
            "indices": {"7": {"p": p, "delta_gain": delta, "null_delta_mean": null_mean, "null_size": 50 - k,
                              "keep_only_share": 0.5 * k, "share_of_gain": delta, "z": 1.0}},
            "layers": {"groups": [{"group": "q1", "layers": [0], "delta_gain": 0.1 * k, "share_of_gain": 0.1 * k,
                                   "gain_only": 0.0, "only_share": 0.0}]}}))
        paths[f"r{k}"] = str(d)
    ab = pooled.collect(paths, {n: "anger" for n in paths})
    e = ab["indices"]["7"]
    assert e["p"] == pytest.approx(combine_pvalues([0.02, 0.5, 0.04], method="fisher").pvalue)
    assert e["runs_above_null_mean"] == 2 and e["p_sign"] == pytest.approx(0.5)  # P(X >= 2), X ~ Bin(3, 1/2)
    assert e["null_size"] == 48 and e["delta_gain"]["mean"] == pytest.approx(0.2)
    assert e["keep_only_share"]["mean"] == pytest.approx(0.5) and e["runs_p_below_0_05"] == 2
    assert ab["layers"]["q1"]["delta_gain"] == pytest.approx(0.1)
    assert pooled.collect({"x": str(tmp_path / "none")}, {})["available"] is False


def test_gain_ranks_of_hand_made_norms():
    g = np.array([[0.5, -3.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    assert gain_ranks(g).tolist() == [[4, 1, 3, 2], [1, 1, 1, 1]]  # by |gain|; ties share the best rank
    assert gain_ranks(np.array([0.1, 0.3, -0.2])).tolist() == [3, 1, 2]


class _Tok:
    def decode(self, ids):
        return f"t{ids[0]}"


def _hand_built_lm():
    cfg = LlamaConfig(vocab_size=12, hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=1,
                      num_key_value_heads=1, tie_word_embeddings=False)
    lm = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        w = torch.zeros(12, 4)
        w[:, 2] = torch.arange(12, dtype=torch.float) - 5.0  # token t's logit from e_2 is (t - 5) * gain
        w[:, 0] = 0.1
        lm.lm_head.weight.copy_(w)
        lm.model.norm.weight.copy_(torch.tensor([1.0, 1.0, -2.0, 0.5]))
        lm.model.layers[0].input_layernorm.weight.copy_(torch.tensor([1.0, 5.0, 2.0, 1.0]))
        lm.model.layers[1].post_attention_layernorm.weight.copy_(torch.tensor([1.0, 1.0, -7.0, 3.0]))
    return lm


def test_logit_lens_and_mechanism_of_a_hand_built_lm_head():
    lm = _hand_built_lm()
    lens = logit_lens(lm, _Tok(), 2, top=3)
    # final-norm gain of index 2 is -2: the direction promotes the tokens with the most negative column entries
    assert lens["promoted_ids"] == [0, 1, 2] and lens["promoted_tokens"] == ["t0", "t1", "t2"]
    assert lens["suppressed_ids"] == [11, 10, 9]
    gains = norm_gains(lm)
    assert gains["input_layernorm"].shape == (2, 4) and gains["final_norm"].tolist() == [1.0, 1.0, -2.0, 0.5]
    m = mechanism(lm, _Tok(), [2, 1], base_rank={2: 17})
    e = m["indices"]["2"]
    assert e["input_layernorm_rank"] == [2, 1] and e["post_attention_layernorm_rank"] == [1, 1]
    assert e["final_norm_rank"] == 1 and e["lm_head_colnorm_rank"] == 1 and e["final_gain_x_colnorm_rank"] == 1
    assert e["base_massive_activation_rank"] == 17 and e["input_layernorm_top1_layers"] == 1
    # column 1 is zero, tied with column 3 behind columns 2 and 0
    assert m["indices"]["1"]["input_layernorm_rank"] == [1, 1] and m["indices"]["1"]["lm_head_colnorm_rank"] == 3


def test_reduce_pools_ablation_and_reads_the_mechanism(tiny_run, tmp_path):
    from irm_hpc.analysis import analyze

    ablate_run(tiny_run, [3, 5], AblationParams(**SMALL))
    s = analyze([tiny_run], tmp_path / "an", {"figures": True}, progress=False)
    ab = s["ablation"]
    assert ab["available"] and set(ab["indices"]) == {"3", "5"}
    for e in ab["indices"].values():
        assert 0 < e["p"] <= 1 and e["null_size"] == 6 and "per_run" in e["delta_gain"]
        assert "mean" in e["keep_only_share"]
    assert set(ab["layers"]) == {"q1", "q2", "q3", "q4"}
    mech = s["mechanism"]
    assert mech["available"] and {"3", "5"} <= set(mech["indices"])
    e = mech["indices"]["3"]
    assert len(e["input_layernorm_rank"]) == 4 and len(e["promoted_tokens"]) == 10
    assert isinstance(e["final_norm_rank"], int) and isinstance(e["lm_head_colnorm_rank"], int)
    assert (tmp_path / "an" / "figures" / "ablation.png").is_file()
    assert (tmp_path / "an" / "figures" / "mechanism.png").is_file()
    report = (tmp_path / "an" / "report.md").read_text()
    assert "## Ablation" in report and "## Mechanism" in report
    saved = json.loads((tmp_path / "an" / "summary.json").read_text())
    assert saved["ablation"]["indices"]["3"]["p"] == ab["indices"]["3"]["p"]

"""Generation with a trained IRM (irm_hpc.generate) and the injection switch, scale and ablation."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_module, tiny_lm_and_irm, tiny_overrides
from irm_hpc.components.engine import IRMLoss
from irm_hpc.generate import SamplingParams, generate, left_pad
from irm_hpc.inject import SteeringVectors, count_hooks, inject


@pytest.fixture(scope="module")
def tiny():
    return tiny_lm_and_irm()


PROMPTS = ["hello there", "the cat sat", "a", "what is the time now"]


def _greedy(n=12):
    return SamplingParams(n_samples=2, max_new_tokens=n, temperature=0.0, chat_template="off", batch_size=3)


def test_greedy_scale0_equals_base_model_token_for_token(tiny):
    lm, tok, irm = tiny
    samples = generate(lm, tok, irm, PROMPTS, [0.0, 1.0], _greedy())
    off = [s for s in samples if s.scale == 0.0]
    on = [s for s in samples if s.scale == 1.0]
    # two (greedy, so equal) samples per prompt, in prompt order: each row maps to its own prompt
    assert [s.prompt for s in off] == [p for p in PROMPTS for _ in range(2)] and count_hooks(lm) == 0
    assert [s.sample for s in off] == [0, 1] * len(PROMPTS)
    for s in off:  # the base model alone, one prompt at a time (no padding), greedy
        ids = torch.tensor([s.prompt_ids])
        ref = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                          pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        stop = {tok.eos_token_id, tok.pad_token_id}
        ref = ref[: next((k for k, t in enumerate(ref) if t in stop), len(ref))]
        assert s.new_ids == ref
    assert any(a.new_ids != b.new_ids for a, b in zip(off, on)), "the IRM must change some continuation"


def test_scale_one_injects_what_training_injects_and_scale_and_ablation_act_exactly(tiny):
    lm, tok, irm = tiny
    ids, mask = left_pad([tok("hello world")["input_ids"], tok("hi")["input_ids"]], tok.pad_token_id, "cpu")
    loss_module = IRMLoss(irm, lm)
    with torch.no_grad():
        loss_module(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    trained = loss_module.last_injection
    with torch.no_grad():
        got = {}
        for key, kw in {"one": {}, "two": {"scale": 2.0}, "abl": {"ablate": [3, 7]}}.items():
            with inject(lm, irm, **kw) as inj:
                lm(input_ids=ids, attention_mask=mask)
                got[key] = inj.last_injection
    assert torch.equal(got["one"], trained)
    assert torch.equal(got["two"], trained * 2.0)
    keep = torch.ones(trained.shape[-1], dtype=torch.bool)
    keep[[3, 7]] = False
    assert torch.equal(got["abl"][..., keep], trained[..., keep])
    assert bool((got["abl"][..., ~keep] == 0).all()) and bool((trained[..., ~keep] != 0).any())
    with pytest.raises(ValueError, match="out of range"):
        with inject(lm, irm, ablate=[lm.config.hidden_size]):
            pass
    assert count_hooks(lm) == 0


def test_kv_cached_generation_equals_uncached_with_irm_and_ablation(tiny):
    lm, tok, irm = tiny
    ids, mask = left_pad([tok(p)["input_ids"] for p in PROMPTS], tok.pad_token_id, "cpu")
    outs = []
    for cache in (True, False):
        with inject(lm, irm, keep_injections=False, ablate=[1]):
            outs.append(lm.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10,
                                    use_cache=cache, pad_token_id=tok.pad_token_id))
    assert torch.equal(outs[0], outs[1])


def test_steering_vectors_inject_their_vectors(tiny):
    lm, tok, _ = tiny
    vec = torch.randn(2, lm.config.hidden_size)
    steer = SteeringVectors(vec, [1, 3])
    ids = torch.tensor([tok("abc")["input_ids"]])
    with torch.no_grad(), inject(lm, steer) as inj:
        lm(input_ids=ids)
    assert torch.equal(inj.last_injection, vec.expand(1, ids.shape[1], 2, -1))
    with pytest.raises(ValueError, match="do not match"):
        SteeringVectors(vec, [1])


def test_sampling_is_seeded_and_n_samples_rows(tiny):
    lm, tok, irm = tiny
    p = SamplingParams(n_samples=3, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=5, chat_template="off")
    a = generate(lm, tok, irm, PROMPTS[:2], [0.0, 2.0], p)
    b = generate(lm, tok, irm, PROMPTS[:2], [0.0, 2.0], p)
    assert len(a) == 2 * 2 * 3 and [s.sample for s in a[:3]] == [0, 1, 2]
    assert [s.new_ids for s in a] == [s.new_ids for s in b]
    with pytest.raises(ValueError, match="top_p"):
        generate(lm, tok, irm, PROMPTS, [1.0], SamplingParams(top_p=0.0))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, ):
    from conftest import make_tsv

    d = tmp_path_factory.mktemp("gen")
    data = make_tsv(d / "align.tsv")
    res = run_module("irm_hpc.train", tiny_overrides(data, d / "run", "train.max_steps=3"), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return d / "run"


def test_cli_writes_jsonl_rows(tiny_run, tmp_path):
    out = tmp_path / "gen.jsonl"
    res = run_module("irm_hpc.generate", [str(tiny_run), "--prompt", "hello", "--prompt", "abc", "--scale", "0", "0.5",
                                          "1", "--n-samples", "2", "--max-new-tokens", "5", "--seed", "3",
                                          "--ablate", "2", "--out", str(out)], timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * 3 * 2
    assert {r["scale"] for r in rows} == {0.0, 0.5, 1.0} and {r["run"] for r in rows} == {"run"}
    assert rows[0]["alignment"] == "anger" and rows[0]["seed"] == 3 and rows[0]["ablate"] == [2]
    assert set(rows[0]) >= {"prompt", "text", "sample", "temperature", "top_p", "max_new_tokens", "chat_template"}


@pytest.mark.parametrize("case", ["no_dir", "no_weights", "out_exists", "bad_ablate"])
def test_cli_bad_input_one_line_nothing_written(tiny_run, tmp_path, case):
    out = tmp_path / "gen.jsonl"
    run_dir = tiny_run
    if case == "no_dir":
        run_dir = tmp_path / "missing"
    elif case == "no_weights":
        run_dir = tmp_path / "copy"
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text((tiny_run / "config.yaml").read_text())
    elif case == "out_exists":
        out.write_text("keep me\n")
    args = [str(run_dir), "--prompt", "x", "--max-new-tokens", "2", "--out", str(out)]
    if case == "bad_ablate":
        args += ["--ablate", "100000"]
    res = run_module("irm_hpc.generate", args, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert (out.read_text() == "keep me\n") if case == "out_exists" else not out.exists()

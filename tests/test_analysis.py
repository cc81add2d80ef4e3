"""Striation analysis (irm_hpc.analysis) on synthetic runs written with the project's RunRecorder.

Planted structure (hidden 64, 8 layers, 3 alignments x 2 seeds, ~300 probe tokens per run):
* SHARED indices are large in 7 of 8 layers of every run after training (not at step 0);
* SPECIFIC[alignment] is large only in that alignment's runs (plus a weak alignment-wide signature);
* ARTIFACT is large already at step 0 (untrained IRM) and after training: an initialisation artifact;
* the base model's residual stream has outlier dimensions BASE_OUTLIERS.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from irm_hpc.analysis import AnalysisError, Params, analyze, discover_runs, load_profile, map_run, parse_params
from irm_hpc.analysis import stats as st
from irm_hpc.analysis.cli import main
from irm_hpc.manifest import Manifest, Task
from irm_hpc.record import RunRecorder

REPO = Path(__file__).resolve().parents[1]
HIDDEN, N_LAYERS = 64, 8
ALIGNMENTS = ("anger", "joy", "sadness")
SEEDS = (0, 1)
SHARED = (5, 40)
SPECIFIC = {"anger": 12, "joy": 23, "sadness": 33}
ARTIFACT = 50
BASE_OUTLIERS = (40, 7)
FINAL_STEP = 20
PARAMS = ["top_k_frac=0.1", "n_permutations=500", "max_heatmap_runs=4"]


def _meta(alignment: str, seed: int, hidden: int = HIDDEN, model: str = "synthetic/tiny", layers=None) -> dict:
    cfg = "irm:\n  layer_set: all\n" if layers is None else "irm:\n  layers: null\n"
    return {"model_name": model, "hidden_size": hidden, "n_layers": N_LAYERS,
            "injection_layers": list(range(N_LAYERS)) if layers is None else list(layers),
            "alignment": alignment, "seed": seed, "config_yaml": cfg}


def scale_matrix(alignment: str, seed: int, rng: np.random.Generator, *, planted: bool = True,
                 hidden: int = HIDDEN) -> tuple[np.ndarray, np.ndarray]:
    """(final, step0) per (layer, index) scales of |injection|."""
    sig = np.random.default_rng(ALIGNMENTS.index(alignment) + 100 if alignment in ALIGNMENTS else 99).standard_normal(hidden).clip(-1.5, 1.5)
    final = 1.0 + 0.25 * rng.standard_normal((N_LAYERS, hidden)) + (0.1 * sig if planted else 0.0)
    step0 = 0.05 * (1.0 + 0.25 * rng.standard_normal((N_LAYERS, hidden)))
    if planted:
        for idx in [i for i in (*SHARED, SPECIFIC[alignment], ARTIFACT) if i < hidden]:
            layers = rng.choice(N_LAYERS, N_LAYERS - 1, replace=False)
            final[layers, idx] += 2.0
        step0[:, ARTIFACT % hidden] += 0.1
    return np.abs(final), np.abs(step0)


def write_run(out_dir: Path, alignment: str, seed: int, *, planted: bool = True, hidden: int = HIDDEN,
              model: str = "synthetic/tiny", finalize: bool = True, steps: tuple = (0, FINAL_STEP),
              n_prompt: int = 24, n_gen: int = 16, n_probes: int = 5, base: bool = True, layers=None) -> Path:
    """A run written with RunRecorder: profiles every 5 steps up to the last of ``steps``, probes at ``steps``."""
    rng = np.random.default_rng(zlib.crc32(f"{alignment}-{seed}-{hidden}".encode()))
    final, step0 = scale_matrix(alignment, seed, rng, planted=planted, hidden=hidden)
    n_inj = N_LAYERS if layers is None else len(layers)
    if layers is not None:
        final, step0 = final[:n_inj], step0[:n_inj]
    rec = RunRecorder(out_dir / "record", _meta(alignment, seed, hidden, model, layers), n_inj=n_inj, hidden=hidden)
    rec.set_prompts([f"prompt {i}" for i in range(n_probes)])
    if base:
        b = np.abs(rng.standard_normal((N_LAYERS, hidden))).astype(np.float32) * 0.5 + 0.5
        b[:, BASE_OUTLIERS[0] % hidden] *= 30.0
        b[:, BASE_OUTLIERS[1] % hidden] *= 12.0
        rec.set_base_reference(b)
    last = max(steps)
    for s in range(0, last + 1, 5):
        scale = step0 if s == 0 else final
        rec.add_profile(s, scale * 0.8 * (1 + 0.02 * rng.standard_normal(scale.shape)), np.zeros_like(scale), 100)
    for s in steps:
        scale = step0 if s == 0 else final
        for p in range(n_probes):
            n = n_prompt + n_gen
            inj = (scale[None] * rng.standard_normal((n, n_inj, hidden))).astype(np.float32)
            rec.add_probe(s, inj, np.arange(n), [f"t{i}" for i in range(n)], p, np.arange(n, dtype=np.int32),
                          np.arange(n) >= n_prompt)
    if finalize:
        rec.finalize(out_dir / "injections.h5")
    else:
        rec.checkpoint(last)
        rec.close()
    return out_dir


def planted_gain(alignment: str, seed: int, step: int = FINAL_STEP) -> float:
    """The alignment gain written to a synthetic run's metrics.jsonl at ``step``."""
    return (ALIGNMENTS.index(alignment) - 1) * 0.1 + 0.01 * seed + 0.001 * step


def write_metrics(run_dir: Path, alignment: str, seed: int) -> None:
    """metrics.jsonl as irm_hpc.train writes it: step records, eval records at steps 10 and 20."""
    lines = []
    for step in range(1, FINAL_STEP + 1):
        rec = {"step": step, "loss": 4.0, "lr": 1e-3}
        if step % 10 == 0:
            gain = planted_gain(alignment, seed, step)
            rec.update(eval_target_loss=4.0 - gain, eval_other_loss=4.0, eval_target_base_loss=4.0,
                       eval_other_base_loss=4.0, alignment_gain=gain)
        lines.append(json.dumps(rec))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 21, \"alignment_gain\"")  # torn last line


def write_sweep(root: Path, extra_tasks: tuple = ()) -> Path:
    tasks = []
    for a in ALIGNMENTS:
        for s in SEEDS:
            tid = f"{a}-s{s}-all"
            write_run(root / "runs" / tid, a, s)
            write_metrics(root / "runs" / tid, a, s)
            tasks.append({"index": len(tasks), "task_id": tid, "alignment": a, "seed": s, "layer_set": "all",
                          "out_dir": f"runs/{tid}", "overrides": []})
    tasks += [{**t, "index": len(tasks) + k} for k, t in enumerate(extra_tasks)]  # index = position, as launch writes
    Manifest(root, "synthetic", "local", 0.0, "", [Task(**t) for t in tasks]).save()  # as irm_hpc.launch writes it
    return root


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    # a task that has not started (no out_dir) and one with a record dir but no records yet
    idle = {"task_id": "fear-s0-all", "alignment": "fear", "seed": 0, "layer_set": "all",
            "out_dir": "runs/fear-s0-all", "overrides": []}
    empty = {"task_id": "fear-s1-all", "alignment": "fear", "seed": 1, "layer_set": "all",
             "out_dir": "runs/fear-s1-all", "overrides": []}
    write_sweep(root, (idle, empty))
    rec = RunRecorder(root / "runs/fear-s1-all/record", _meta("fear", 1), n_inj=N_LAYERS, hidden=HIDDEN)
    rec.set_prompts(["p"])
    rec.checkpoint(0)
    rec.close()
    return root


@pytest.fixture(scope="module")
def summary(sweep) -> dict:
    return analyze(sweep, None, PARAMS, progress=False)


# ----------------------------------------------------------------------------- recovery
def test_consensus_recovers_shared_and_flags_artifact(summary, sweep):
    assert summary["n_runs"] == 6
    cons = {e["index"]: e for e in summary["consensus"]["indices"]}
    assert set(cons) == {*SHARED, ARTIFACT}
    for i in SHARED:
        assert cons[i]["control"] == "learned" and cons[i]["share"] == 1.0
        assert all(v["significant"] == 2 for v in cons[i]["per_alignment"].values())
    assert cons[ARTIFACT]["control"] == "init_artifact"
    assert summary["controls"]["step0"]["consensus_init_artifacts"] == [ARTIFACT]
    assert ARTIFACT in summary["controls"]["step0"]["step0_consensus"]
    assert (sweep / "analysis" / "summary.json").is_file()  # default out: <sweep>/analysis


def test_alignment_specific_and_per_run_tables(summary):
    spec = {(e["alignment"], e["index"]) for e in summary["consensus"]["alignment_specific"]}
    assert spec == set(SPECIFIC.items())
    for r in summary["runs"]:
        rows = {t["index"]: t for t in r["striations"]}
        planted = {*SHARED, SPECIFIC[r["alignment"]], ARTIFACT}
        assert planted <= set(rows), (r["name"], sorted(rows))
        assert len(set(rows) - planted) <= 1  # at most one chance / signature index per run
        for i in planted:
            assert rows[i]["p_raw"] < 1e-3 and rows[i]["p_bh"] < 0.01 and rows[i]["p_exact"] < 1e-4
            assert rows[i]["p_bh"] >= rows[i]["p_raw"]
        assert rows[ARTIFACT]["init_artifact"] is True
        assert not any(rows[i]["init_artifact"] for i in SHARED)


def test_clustering_groups_by_alignment(summary):
    g = summary["clustering"]
    assert g["by_factor"]["alignment"]["ari_agglomerative"] == pytest.approx(1.0)
    assert g["by_factor"]["alignment"]["ari_kmeans"] == pytest.approx(1.0)
    assert g["by_factor"]["seed"]["ari_agglomerative"] < 0.3
    assert g["groups_by"] == "alignment"
    blocks = summary["correlation"]["alignment_blocks"]["pearson"]
    assert blocks["within"] > blocks["between"]
    n = summary["n_runs"]
    assert np.asarray(summary["correlation"]["spearman"]).shape == (n, n)


def test_seed_and_base_controls(summary):
    groups = summary["controls"]["seeds"]["groups"]
    assert len(groups) == 3
    for grp in groups:
        assert {*SHARED, ARTIFACT, SPECIFIC[grp["alignment"]]} <= set(grp["in_all_seeds"])
    b = summary["base_model"]
    assert b["available"] and b["n_runs_with_base"] == 6
    assert [o["index"] for o in b["top_outliers"][:2]] == list(BASE_OUTLIERS)
    assert b["consensus_in_top_outliers"] == [BASE_OUTLIERS[0]]
    assert {"pearson", "spearman", "pearson_p"} <= set(b["correlation"])


def test_alignment_gain_per_run_and_alignment(summary, sweep):
    for run in summary["runs"]:
        a, seed = run["alignment"], run["seed"]
        assert run["alignment_gain"] == pytest.approx(planted_gain(a, seed))
        assert run["eval_step"] == FINAL_STEP and [h[0] for h in run["gain_history"]] == [10, 20]
    g = summary["controls"]["alignment_gain"]
    assert g["available"] and g["n_runs"] == 6
    assert g["per_alignment"]["anger"]["mean"] == pytest.approx(np.mean([planted_gain("anger", s) for s in SEEDS]))
    assert g["positive"] == 4  # joy (0.02, 0.03) and sadness (0.12, 0.13); anger is negative
    report = (sweep / "analysis" / "report.md").read_text()
    assert "alignment gain" in report and "positive in 4 of 6 runs" in report


def test_skipped_runs_reported(summary):
    reasons = {s.get("name"): s["reason"] for s in summary["skipped"]}
    assert "no records yet" in reasons["fear-s0-all"]
    assert "no records yet" in reasons["fear-s1-all"]


def test_outputs_exist(summary, sweep):
    out = sweep / "analysis"
    figs = summary["figures"]
    assert set(figs) == {"run_heatmaps", "alignment_heatmaps", "correlation", "striation_scores", "base_outliers"}
    for rel in figs.values():
        f = out / rel
        assert f.is_file() and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "## Consensus striation indices" in report and "| 40 |" in report and "figures/correlation.png" in report
    js = json.loads((out / "summary.json").read_text())
    assert js["consensus"]["indices"][0]["index"] in (*SHARED, ARTIFACT)
    assert "_arrays" not in js
    assert len(list((out / "profiles").glob("*.npz"))) == 6
    assert summary["null"][0]["max_abs_cdf_diff"] < 0.02


# ----------------------------------------------------------------------------- map step
def test_map_profiles_match_direct_computation(sweep, tmp_path):
    from irm_hpc.record import open_run

    run = sweep / "runs" / "joy-s1-all"
    p_default = map_run(run, tmp_path, PARAMS)
    p_small = map_run(run, tmp_path / "b", [*PARAMS, "block_rows=7"])
    a, b = load_profile(p_default), load_profile(p_small)
    assert a.name == "joy-s1-all" and a.meta["alignment"] == "joy" and a.meta["layer_set"] == "all"
    with open_run(run) as r:
        inj = np.abs(np.asarray(r.probe.injection[:], np.float64))
        step, gen = r.probe.step, r.probe.is_generated.astype(bool)
        prof = np.asarray(r.profiles_abs[:], np.float64)
        steps = r.steps
    for key, mask in (("probe_final_prompt", (step == FINAL_STEP) & ~gen), ("probe_final_generated", (step == FINAL_STEP) & gen),
                      ("probe_final_all", step == FINAL_STEP), ("probe_step0_all", step == 0),
                      ("probe_step0_generated", (step == 0) & gen)):
        np.testing.assert_allclose(a.arrays[key], inj[mask].mean(0), rtol=1e-5)
        np.testing.assert_allclose(b.arrays[key], a.arrays[key], rtol=1e-6)
    np.testing.assert_allclose(a.arrays["train_last"], prof[np.flatnonzero(steps > 0)[-3:]].mean(0), rtol=1e-5)
    np.testing.assert_allclose(a.arrays["train_step0"], prof[steps == 0].mean(0), rtol=1e-5)
    assert a.meta["probe_tokens"] == {"final_prompt": 120, "final_generated": 80, "step0_prompt": 120, "step0_generated": 80}
    s = st.striation_stats(a.arrays["probe_final_all"], top_k_frac=0.1, n_permutations=10, alpha=0.05)
    np.testing.assert_allclose(a.arrays["continuity"], s.continuity, rtol=1e-6)


def test_record_dir_of_training_run_and_glob_inputs(tmp_path):
    """A run still training (record/ segments, no injections.h5) is read; globs and file lists work."""
    write_run(tmp_path / "a" / "r1", "anger", 0, finalize=False)
    write_run(tmp_path / "a" / "r2", "joy", 0)
    refs = discover_runs([str(tmp_path / "a" / "*"), tmp_path / "a" / "r2" / "injections.h5"])
    assert sorted(r.name for r in refs) == ["r1", "r2"]
    s = analyze(str(tmp_path / "a" / "*"), tmp_path / "out", [*PARAMS, "figures=false"], progress=False)
    assert s["n_runs"] == 2 and s["runs"][0]["layer_set"] == "all"
    assert s["clustering"]["main"] is None  # too few runs to cluster
    assert (tmp_path / "out" / "report.md").is_file() and not (tmp_path / "out" / "figures").exists()


def test_mixed_layer_sets(tmp_path):
    """Runs injecting into different layers: per-run nulls differ, heatmaps share the model-layer grid."""
    write_run(tmp_path / "full", "anger", 0, n_probes=2)
    write_run(tmp_path / "half", "anger", 1, n_probes=2, layers=(0, 1, 2, 3, 6))
    write_run(tmp_path / "half2", "anger", 2, n_probes=2, layers=(0, 1, 2, 3, 6))
    s = analyze([tmp_path / "full", tmp_path / "half", tmp_path / "half2"], tmp_path / "out",
                [*PARAMS, "max_heatmap_runs=2", "workers=2"], progress=False)
    assert s["timing"]["map_workers"] == 2  # the multiprocessing path
    assert {r["name"]: r["layer_set"] for r in s["runs"]} == {"full": "all", "half": "0-3,6", "half2": "0-3,6"}
    assert {r["name"]: r["n_inj"] for r in s["runs"]} == {"full": 8, "half": 5, "half2": 5}
    assert len(s["null"]) >= 2, "one permutation null per (hidden, member counts): the layer sets differ"
    by_layer_set = s["clustering"]["by_factor"]["layer_set"]  # a factor as soon as runs differ in it
    assert by_layer_set["n_clusters"] == 2 and len(by_layer_set["agglomerative"]) == len(by_layer_set["kmeans"]) == 3
    assert {*SHARED} <= {e["index"] for e in s["consensus"]["indices"]}
    assert (tmp_path / "out" / "figures" / "alignment_heatmaps.png").is_file()


# ----------------------------------------------------------------------------- statistics
def test_pvalues_uniform_on_noise():
    """Pure noise: the discrete p-values satisfy P(p <= c) ~= c at their attainable values."""
    rng = np.random.default_rng(0)
    ps = []
    for _ in range(40):
        m = np.abs(rng.standard_normal((N_LAYERS, HIDDEN)))
        s = st.striation_stats(m, top_k_frac=0.1, n_permutations=1000, alpha=0.05, seed=0)
        ps.append(s.p_raw)
        assert s.significant.sum() <= 1
    p = np.concatenate(ps)  # 2560 p-values
    for c in np.unique(p)[:-1]:
        if c > 0.01:
            assert abs((p <= c).mean() - c) < 3 * np.sqrt(c * (1 - c) / len(p)) + 0.005, c
    assert (p <= 0.05).mean() <= 0.05 + 0.01
    null = st.permutation_null(HIDDEN, (6,) * N_LAYERS, 1000, 0)
    assert st.null_crosscheck(null)["max_abs_cdf_diff"] < 0.01  # permutation null ~ Binomial(8, 6/64)


def test_topk_ties_and_column_score():
    m = np.zeros((4, 10))
    assert not st.topk_membership(m, 2).any()  # zero-init IRM: no arbitrary top-k members
    m[:, 3] = 1.0
    mem = st.topk_membership(m, 2)
    assert mem[:, 3].all() and mem.sum() == 4
    cs = st.column_score(m)
    assert cs[3] == pytest.approx(3.0) and np.argmax(cs) == 3
    assert st.top_k(576, 0.01) == 6 and st.top_k(64, 0.01) == 1
    s = st.striation_stats(np.abs(np.random.default_rng(1).standard_normal((8, 64))), top_k_frac=0.1,
                           n_permutations=200, alpha=0.05)
    assert s.p_raw.min() >= 1 / (1 + 200 * 64)


def test_params_parsing():
    p = parse_params(["alpha=0.1", "figures=false", "source=train"])
    assert p.alpha == 0.1 and p.figures is False and p.source == "train"
    assert parse_params(None) == Params()
    with pytest.raises(AnalysisError, match="unknown analysis parameter 'bogus'; valid keys: top_k_frac"):
        parse_params(["bogus=1"])
    with pytest.raises(AnalysisError, match="alpha"):
        parse_params(["alpha=2"])
    with pytest.raises(AnalysisError, match="could not be converted"):
        parse_params(["n_permutations=many"])


# ----------------------------------------------------------------------------- bad input
def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_cli_no_runs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    line = _err_line(capsys)
    assert line.startswith("error: no run files found")
    assert main(["analyze", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert main([str(tmp_path), "bogus=1"]) == 2
    assert "valid keys" in _err_line(capsys)


def test_cli_mixed_hidden_sizes(tmp_path, capsys):
    write_run(tmp_path / "r64", "anger", 0, n_probes=1)
    write_run(tmp_path / "r32", "anger", 1, hidden=32, n_probes=1)
    rc = main(["analyze", str(tmp_path / "r64"), str(tmp_path / "r32"), "--out", str(tmp_path / "o"), "--no-progress",
               "figures=false", "n_permutations=50"])
    assert rc == 2
    assert "different models or hidden sizes" in _err_line(capsys)


def test_unreadable_and_empty_runs(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "injections.h5").write_bytes(b"not an hdf5 file" * 10)
    only0 = write_run(tmp_path / "only0", "joy", 0, steps=(0,), n_probes=1)
    # nothing usable at all: exit 2 naming the skipped runs
    rc = main(["analyze", str(bad), str(only0), "--out", str(tmp_path / "o"), "--no-progress", "figures=false"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "warning: skipping bad" in err and "not an HDF5 file" in err
    assert err.strip().splitlines()[-1].startswith("error: nothing to analyse")
    # with a good run the bad ones are skipped and reported
    good = write_run(tmp_path / "good", "anger", 0, n_probes=2)
    s = analyze([bad, only0, good], tmp_path / "o2", [*PARAMS, "figures=false"], progress=False)
    assert s["n_runs"] == 1
    reasons = {x["name"]: x["reason"] for x in s["skipped"]}
    assert "unreadable record" in reasons["bad"] and "only step-0" in reasons["only0"]
    with pytest.raises(AnalysisError, match="unreadable record"):
        map_run(bad, tmp_path / "o3")
    assert (tmp_path / "o3" / "profiles" / "bad.skipped.json").is_file()


def test_cli_map_reduce_and_script(sweep, tmp_path, capsys):
    out = tmp_path / "mr"
    for tid in ("anger-s0-all", "joy-s0-all", "sadness-s0-all"):
        assert main(["map", str(sweep / "runs" / tid), "--out", str(out), *PARAMS]) == 0
    assert main(["map", str(sweep / "runs" / "fear-s1-all"), "--out", str(out)]) == 2
    assert "no records yet" in _err_line(capsys)
    assert main(["reduce", "--out", str(out), *PARAMS, "figures=false"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["n_runs"] == 3 and [x["name"] for x in s["skipped"]] == ["fear-s1-all"]
    assert {e["index"] for e in s["consensus"]["indices"]} == {*SHARED, ARTIFACT}
    assert main(["reduce", "--out", str(out), *PARAMS, "source=train", "profile=mean_abs", "figures=false"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["runs"][0]["source"] == "train_last" and s["correlation"]["profile"] == "mean_abs"
    assert {e["index"] for e in s["consensus"]["indices"]} == {*SHARED, ARTIFACT}
    assert main(["reduce", "--out", str(tmp_path / "none")]) == 2
    assert "nothing to analyse" in _err_line(capsys)
    r = subprocess.run([sys.executable, str(REPO / "analysis" / "striations.py"), str(tmp_path / "void")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: no run files found")

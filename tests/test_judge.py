"""The emotion judge (irm_hpc.judge): quality on GoEmotions-Ekman, the .npz format, the cache.

The real-data judge is fitted once per module (~7 s on one core); the cache tests that fit again use a
small copy of the dataset.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter

import numpy as np
import pytest

from irm_hpc import judge as judge_mod
from irm_hpc.config import load_config
from irm_hpc.data import DataError
from irm_hpc.errors import UnsafePathError
from irm_hpc.judge import (EmotionJudge, JudgeError, fit_judge, judge_metrics, load_judge, rows_checksum,
                           split_rows)

from conftest import GOEMOTIONS

EKMAN = ["anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise"]
TEXTS = ["I am so angry I could scream", "What a wonderful, happy day!", "I miss her so much, I keep crying",
         "That is disgusting", "Wait, what? I had no idea", "I'm scared of the dark", "The meeting is at noon",
         "", "🙂 ok"]


def data_cfg(*overrides: str):
    return load_config("train", ["out_dir=/tmp/irm-judge-test", *overrides]).data


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """(judge, metrics, cache dir) of the judge fitted on the packaged train split, scored on test."""
    cache = tmp_path_factory.mktemp("judge-cache") / "judge"
    judge, metrics = load_judge(data_cfg(), cache_dir=cache)
    return judge, metrics, cache


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A GoEmotions-format copy of the packaged data, cut to 3000 train and 600 test lines (fast fits)."""
    d = tmp_path_factory.mktemp("small-goemotions")
    shutil.copy(GOEMOTIONS / "labels.txt", d / "labels.txt")
    for split, n in (("train", 3000), ("test", 600), ("dev", 600)):
        lines = (GOEMOTIONS / f"{split}.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
        (d / f"{split}.tsv").write_text("".join(lines[:n]), encoding="utf-8")
    return d


def test_judge_beats_majority_baseline_on_test_split(real):
    judge, m, _ = real
    train = split_rows(data_cfg(), "train")
    assert judge.labels == EKMAN
    assert m["n"] == len(split_rows(data_cfg(), "test")) > 4000
    assert m["n_train"] == len(train) > 30000 and m["train_split"] == "train" and m["test_split"] == "test"
    assert m["majority_label"] == Counter(lab for _, lab in train).most_common(1)[0][0]
    print(f"\njudge: accuracy {m['accuracy']:.4f} macro-F1 {m['macro_f1']:.4f}; majority '{m['majority_label']}': "
          f"accuracy {m['majority_accuracy']:.4f} macro-F1 {m['majority_macro_f1']:.4f}; fit {m['fit_seconds']:.1f} s")
    assert m["accuracy"] > m["majority_accuracy"] + 0.1
    assert m["macro_f1"] > m["majority_macro_f1"] + 0.2
    assert set(m["per_class_f1"]) == set(EKMAN) and all(0 < f <= 1 for f in m["per_class_f1"].values())
    assert m["cached"] is False and m["fit_seconds"] > 0 and len(m["data_checksum"]) == 64
    proba = judge.predict_proba(TEXTS)
    assert proba.shape == (len(TEXTS), 7) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
    assert judge.predict(TEXTS[:2]) == ["anger", "joy"]
    assert judge.predict_proba([]).shape == (0, 7)
    with pytest.raises(JudgeError, match="not one string"):
        judge.predict_proba("one text")


def test_save_load_round_trip(real, tmp_path):
    judge, _, _ = real
    path = tmp_path / "j.npz"
    judge.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["j.npz"]  # no tmp file left, no ".npz.npz"
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    assert not any(a.dtype == object for a in arrays.values())
    assert arrays["vocabulary"].dtype.kind == "U" and arrays["labels"].tolist() == EKMAN
    assert arrays["coef"].shape == (7, len(arrays["vocabulary"])) == (7, judge.meta["n_features"])
    loaded = EmotionJudge.load(path)
    assert loaded.labels == judge.labels and loaded.meta == judge.meta and loaded.params == judge.params
    np.testing.assert_allclose(loaded.predict_proba(TEXTS), judge.predict_proba(TEXTS), rtol=0, atol=1e-12)
    assert loaded.predict(TEXTS) == judge.predict(TEXTS)


def test_second_load_is_a_cache_hit(real, monkeypatch):
    judge, m, cache = real
    (path,) = cache.glob("judge-*.npz")
    assert path.name == f"judge-{m['data_checksum'][:16]}.npz"
    mtime = path.stat().st_mtime_ns

    def no_fit(*a, **kw):
        raise AssertionError("fit_judge called on a cache hit")

    monkeypatch.setattr(judge_mod, "fit_judge", no_fit)
    again, m2 = load_judge(data_cfg(), cache_dir=cache)
    assert m2["cached"] is True and path.stat().st_mtime_ns == mtime
    assert {k: v for k, v in m2.items() if k != "cached"} == {k: v for k, v in m.items() if k != "cached"}
    np.testing.assert_allclose(again.predict_proba(TEXTS), judge.predict_proba(TEXTS), rtol=0, atol=1e-12)
    # the default cache dir: $IRM_HPC_CACHE/judge
    monkeypatch.setenv("IRM_HPC_CACHE", str(cache.parent / "env-cache"))
    assert judge_mod.judge_cache_dir() == cache.parent / "env-cache" / "judge"
    os.makedirs(cache.parent / "env-cache" / "judge", mode=0o700)
    shutil.copy(path, cache.parent / "env-cache" / "judge" / path.name)
    assert load_judge(data_cfg())[1]["cached"] is True


def test_other_split_or_rows_change_the_checksum(real, small_data, monkeypatch, tmp_path):
    _, m, _ = real
    fits = []
    real_fit = judge_mod.fit_judge

    def fast_fit(rows, seed=0, **kw):  # the cache key, not the fit, is under test
        fits.append(len(rows))
        return real_fit(rows[:2000], seed, **kw)

    monkeypatch.setattr(judge_mod, "fit_judge", fast_fit)
    cache = tmp_path / "cache"
    _, dev = load_judge(data_cfg(), test_split="dev", cache_dir=cache)
    assert dev["cached"] is False and dev["test_split"] == "dev" and dev["data_checksum"] != m["data_checksum"]
    _, small = load_judge(data_cfg(f"data.path={small_data}"), cache_dir=cache)
    assert small["data_checksum"] not in (m["data_checksum"], dev["data_checksum"]) and small["cached"] is False
    _, seed1 = load_judge(data_cfg(f"data.path={small_data}"), cache_dir=cache, seed=1)
    assert seed1["data_checksum"] != small["data_checksum"]
    assert len(fits) == 3 and len(list(cache.glob("judge-*.npz"))) == 3
    rows = [("a", "joy"), ("b", "anger")]
    assert rows_checksum(rows) == rows_checksum(list(rows)) and len(rows_checksum(rows)) == 64
    for other in (rows[::-1], [("a", "joy"), ("b", "fear")], [("a", "joy")],
                  [("a", "joy"), ("b", "anger"), ("", "joy")], [("a\tjoy", ""), ("b", "anger")],
                  [('a", "joy', "joy"), ("b", "anger")]):
        assert rows_checksum(other) != rows_checksum(rows), other


def test_damaged_cache_file_is_refit_with_a_warning(small_data, tmp_path, capsys):
    cfg = data_cfg(f"data.path={small_data}")
    first, m = load_judge(cfg, cache_dir=tmp_path)
    (path,) = tmp_path.glob("judge-*.npz")
    for damage in (lambda b: b[: len(b) // 2], lambda b: b"garbage " * 50):
        path.write_bytes(damage(path.read_bytes()))
        with pytest.raises(JudgeError) as exc:
            EmotionJudge.load(path)
        assert "\n" not in str(exc.value) and str(path) in str(exc.value)
        capsys.readouterr()
        judge, m2 = load_judge(cfg, cache_dir=tmp_path)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "warning" in err and path.name in err and "fitting a new judge" in err
        assert m2["cached"] is False and m2["data_checksum"] == m["data_checksum"]
        np.testing.assert_allclose(judge.predict_proba(TEXTS), first.predict_proba(TEXTS), rtol=0, atol=1e-12)
        assert EmotionJudge.load(path).labels == first.labels  # the refit replaced the file
        assert load_judge(cfg, cache_dir=tmp_path)[1]["cached"] is True


def test_load_rejects_foreign_files(tmp_path):
    np.savez(tmp_path / "other.npz", a=np.arange(3))
    np.save(tmp_path / "one.npy", np.arange(3))
    (tmp_path / "empty.npz").write_bytes(b"")
    for name in ("other.npz", "one.npy", "empty.npz", "missing.npz"):
        with pytest.raises(JudgeError) as exc:
            EmotionJudge.load(tmp_path / name)
        assert "\n" not in str(exc.value) and name in str(exc.value)


def test_cache_dir_writable_by_others_is_refused(small_data, tmp_path):
    cache = tmp_path / "shared"
    cache.mkdir()
    os.chmod(cache, 0o777)
    with pytest.raises(UnsafePathError, match="chmod go-w"):
        load_judge(data_cfg(f"data.path={small_data}"), cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_tiny_hand_made_rows():
    rows = [("I am furious and angry", "anger"), ("angry, furious, I hate this", "anger"),
            ("so happy and glad", "joy"), ("happy happy, glad and delighted", "joy"),
            ("so sad, I am crying", "sadness"), ("crying tears, sad and lonely", "sadness"),
            ("scared and afraid", "fear"), ("afraid, terrified, scared", "fear")]
    judge = fit_judge(rows, min_df=1)
    assert judge.labels == ["anger", "fear", "joy", "sadness"]
    assert judge.predict(["furious!", "I am so glad", "sad tears", "so scared"]) == ["anger", "joy", "sadness", "fear"]
    m = judge_metrics(judge, rows)
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["majority_label"] == "anger"  # tie: first sorted
    assert m["majority_accuracy"] == 0.25
    with pytest.raises(JudgeError, match="not trained on"):
        judge_metrics(judge, [("so surprised", "surprise")])
    with pytest.raises(JudgeError, match="at least two"):
        fit_judge([("a b", "joy"), ("c d", "joy")], min_df=1)
    with pytest.raises(JudgeError, match="min_df"):
        fit_judge([("alpha beta", "joy"), ("gamma delta", "anger")])  # every term once: min_df=2 leaves none
    with pytest.raises(JudgeError, match="no training rows"):
        fit_judge([])


def test_split_rows_copies_the_config():
    cfg = data_cfg()
    dev = split_rows(cfg, "dev")
    assert cfg.split == "train" and dev and all(isinstance(t, str) and lab in EKMAN for t, lab in dev)
    with pytest.raises(DataError, match="split 'nope' not found"):
        split_rows(cfg, "nope")

"""Where alignment texts come from: the packaged GoEmotions-Ekman copy (default), its overrides, and the
hub loader's GoEmotions -> Ekman label mapping (tested on an in-memory ``datasets.Dataset``, no network)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pytest

import irm_hpc
from irm_hpc import data
from irm_hpc.config import ConfigError, load_config, packaged_data

PACKAGE = Path(irm_hpc.__file__).resolve().parent
# GoEmotions "simplified" label names in ClassLabel order (google-research-datasets/go_emotions, emotions.txt)
SIMPLIFIED = ["admiration", "amusement", "anger", "annoyance", "approval", "caring", "confusion", "curiosity",
              "desire", "disappointment", "disapproval", "disgust", "embarrassment", "excitement", "fear",
              "gratitude", "grief", "joy", "love", "nervousness", "optimism", "pride", "realization", "relief",
              "remorse", "sadness", "surprise", "neutral"]
EKMAN = ["anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise"]


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    monkeypatch.delenv("IRM_HPC_DATA", raising=False)


def test_default_data_is_the_packaged_copy():
    cfg = load_config("train", ["out_dir=x"])
    path = Path(cfg.data.path)
    assert path == PACKAGE / "datasets" / "goemotions_ekman" == packaged_data("goemotions_ekman")
    assert "shared" not in path.parts
    for name in ("train.tsv", "dev.tsv", "test.tsv", "labels.txt", "README.md", "LICENSE", "NOTICE"):
        assert (path / name).is_file(), name
    assert (path / "labels.txt").read_text().split() == EKMAN
    notice = (path / "NOTICE").read_text()
    assert "Demszky" in notice and "Apache License, Version 2.0" in notice and "ekman_mapping.json" in notice


def test_packaged_copy_reads_with_documented_counts():
    """The counts in the data set's README: single-label train rows per Ekman label."""
    cfg = load_config("train", ["out_dir=x"])
    counts = Counter(ls[0] for _, ls in data.read_rows(cfg.data))
    assert counts == {"joy": 15216, "neutral": 12823, "anger": 4293, "surprise": 3858, "sadness": 2326,
                      "fear": 541, "disgust": 498}
    assert len(data.read_rows(load_config("train", ["out_dir=x", "data.split=dev",
                                                    "data.single_label_only=false"]).data)) == 5426


def test_env_var_wins_over_packaged_and_data_path_over_both(monkeypatch, tmp_path):
    monkeypatch.setenv("IRM_HPC_DATA", str(tmp_path / "env"))
    assert load_config("train", ["out_dir=x"]).data.path == str(tmp_path / "env")
    cfg = load_config("train", ["out_dir=x", f"data.path={tmp_path / 'cli'}"])
    assert cfg.data.path == str(tmp_path / "cli")


def test_unknown_packaged_data_set_is_a_config_error():
    with pytest.raises(ConfigError, match=r"no packaged data set 'nope' \(have: goemotions_ekman\)"):
        packaged_data("nope")


def test_ekman_mapping_is_the_official_one():
    """Every simplified label maps to exactly one Ekman label; groups as in GoEmotions' ekman_mapping.json."""
    mapping = data.LABEL_MAPS["goemotions_ekman"]
    assert sorted(mapping) == sorted(SIMPLIFIED) and sorted(set(mapping.values())) == EKMAN
    assert sum(len(v) for v in data.GOEMOTIONS_EKMAN.values()) == len(SIMPLIFIED)
    official = json.loads('{"anger": ["anger", "annoyance", "disapproval"], "disgust": ["disgust"], '
                          '"fear": ["fear", "nervousness"], "joy": ["joy", "amusement", "approval", "excitement", '
                          '"gratitude", "love", "optimism", "relief", "pride", "admiration", "desire", "caring"], '
                          '"sadness": ["sadness", "disappointment", "embarrassment", "grief", "remorse"], '
                          '"surprise": ["surprise", "realization", "confusion", "curiosity"]}')
    assert {k: v for k, v in data.GOEMOTIONS_EKMAN.items() if k != "neutral"} == official


def _go_emotions_like() -> datasets.Dataset:
    """Six rows shaped like go_emotions/simplified: labels is Sequence(ClassLabel(28 names))."""
    idx = SIMPLIFIED.index
    features = datasets.Features({"text": datasets.Value("string"),
                                  "labels": datasets.Sequence(datasets.ClassLabel(names=SIMPLIFIED)),
                                  "id": datasets.Value("string")})
    rows = {"text": ["so annoying", "thank you!", "wow really?", "meh", "scared and sad", "ugh, stop"],
            "labels": [[idx("annoyance")], [idx("gratitude")], [idx("surprise"), idx("curiosity")],
                       [idx("neutral")], [idx("fear"), idx("grief")], [idx("anger"), idx("disapproval")]],
            "id": [f"e{i}" for i in range(6)]}
    return datasets.Dataset.from_dict(rows, features=features)


def test_hub_rows_map_to_ekman_on_an_in_memory_dataset():
    rows = data.rows_from_hf(_go_emotions_like(), "text", "labels")
    assert rows[2] == ("wow really?", ["surprise", "curiosity"])
    mapped = data.map_labels(rows, data.LABEL_MAPS["goemotions_ekman"])
    assert [ls for _, ls in mapped] == [["anger"], ["joy"], ["surprise"], ["neutral"], ["fear", "sadness"], ["anger"]]


def test_goemotions_hub_preset_loads_simplified_and_keeps_single_ekman_labels(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        return _go_emotions_like()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = load_config("train", ["data=goemotions_hub", "out_dir=x"])
    rows = data.read_rows(cfg.data)
    assert calls == [("google-research-datasets/go_emotions", "simplified", "train")]
    # "scared and sad" maps to two Ekman labels and is dropped (single_label_only); the others keep one
    assert rows == [("so annoying", ["anger"]), ("thank you!", ["joy"]), ("wow really?", ["surprise"]),
                    ("meh", ["neutral"]), ("ugh, stop", ["anger"])]
    aligned = data.load_alignment(cfg.data, "anger", seed=0)
    assert sorted(aligned.train + aligned.eval_target) == ["so annoying", "ugh, stop"]


@pytest.mark.parametrize("overrides, expected", [
    (["data.label_map=plutchik"], "unknown data.label_map 'plutchik'"),
    (["data.label_column=emotion"], "column 'emotion' not in the HF dataset"),
])
def test_hub_bad_input_is_a_data_error(monkeypatch, overrides, expected):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: _go_emotions_like())
    cfg = load_config("train", ["data=goemotions_hub", "out_dir=x", *overrides])
    with pytest.raises(data.DataError, match=expected):
        data.read_rows(cfg.data)


def test_label_not_covered_by_the_map_is_named():
    with pytest.raises(data.DataError, match="label 'hope' is not covered by data.label_map 'goemotions_ekman'"):
        data.map_labels([("x", ["hope"])], data.LABEL_MAPS["goemotions_ekman"], "goemotions_ekman")


def test_bad_packaged_name_is_one_line_exit_2(capsys, tmp_path):
    from irm_hpc import train

    code = train.main(["model=tiny_random", "data.path=${irm_hpc_data:nope}", f"out_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "no packaged data set 'nope' (have: goemotions_ekman)" in err, err
    assert not (tmp_path / "o").exists()

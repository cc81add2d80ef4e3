"""Bad input to ``python -m irm_hpc.train``: one-line error, exit 2, nothing overwritten."""

from __future__ import annotations

from pathlib import Path

import pytest

from irm_hpc import train
from conftest import tiny_overrides


def run_cli(capsys, args) -> tuple[int, str]:
    code = train.main(args)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["trian.lr=1"], "unknown key 'trian.lr' (did you mean train.lr"),
        (["model=gpt5"], "valid model presets: llama2_7b_chat, smollm2_135m, tiny_random"),
        (["alignment=rage"], "alignment 'rage' not in"),
        (["irm.layers=[0,7]"], "injection layer 7 is out of range: the model has 4 layers"),
        (["train.keep_checkpoints=-1"], "train.keep_checkpoints must be >= 0 (0 keeps every tag), got -1"),
        (["data.path=/nonexistent/x.tsv"], "data file not found: /nonexistent/x.tsv"),
        (["model=smollm2_135m", "model.path=/nonexistent/dir"], "GGUF file not found"),
    ],
)
def test_bad_input_one_line_error(capsys, tsv_data, tmp_path, extra, expected):
    out = tmp_path / "out"
    code, err = run_cli(capsys, tiny_overrides(tsv_data, out) + extra)
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err, err
    assert expected in err, err
    assert not out.exists() or not any(out.iterdir()), "bad input must not write into out_dir"


def test_alignment_error_lists_labels(capsys, tsv_data, tmp_path):
    code, err = run_cli(capsys, tiny_overrides(tsv_data, tmp_path / "o") + ["alignment=rage"])
    assert code == 2 and "labels present: anger, joy, sadness" in err


def test_foreign_out_dir_untouched(capsys, tsv_data, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = run_cli(capsys, tiny_overrides(tsv_data, out))
    assert code == 2 and "holds no irm_hpc run" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_out_dir_of_other_run_refused(capsys, tsv_data, tmp_path):
    out = tmp_path / "other"
    out.mkdir()
    cfg = train.load_config("train", tiny_overrides(tsv_data, out) + ["seed=5"])
    (out / "config.yaml").write_text(train.to_yaml(cfg))
    before = (out / "config.yaml").read_text()
    code, err = run_cli(capsys, tiny_overrides(tsv_data, out))
    assert code == 2 and "different 'seed'" in err
    assert (out / "config.yaml").read_text() == before

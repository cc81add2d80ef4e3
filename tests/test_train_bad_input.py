"""Bad input to ``python -m irm_hpc.train``: one-line error, exit 2, nothing overwritten."""

from __future__ import annotations


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
        (["train.max_steps=-5", "record.enabled=false"], "train.max_steps must be >= 1 (optimizer steps), got -5"),
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


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=0", "train.max_steps must be >= 1 (optimizer steps), got 0"),
    ("train.micro_batch_size=0", "train.micro_batch_size must be >= 1"),
    ("train.grad_accum_steps=-1", "train.grad_accum_steps must be >= 1"),
    ("train.lr=0", "train.lr must be > 0.0 (learning rate), got 0.0"),
    ("train.lr=-1e-3", "train.lr must be > 0.0"),
    ("train.lr=nan", "train.lr must be > 0.0 (learning rate), got nan"),
    ("train.warmup_steps=-1", "train.warmup_steps must be >= 0"),
    ("train.eval_every=-1", "train.eval_every must be >= 0"),
    ("train.checkpoint_every=-2", "train.checkpoint_every must be >= 0"),
    ("train.log_every=0", "train.log_every must be >= 1"),
    ("train.threads=0", "train.threads must be >= 1"),
    ("train.schedule=step", "train.schedule must be one of constant, linear, cosine, got 'step'"),
    ("record.every_steps=0", "record.every_steps must be >= 1"),
    ("record.dtype=int8", "record.dtype must be one of float16, float32"),
    ("record.compression=zip", "bad record.compression: compression='zip'"),
    ("data.max_length=1", "data.max_length must be >= 2 (tokens), got 1"),
    ("data.eval_fraction=1.0", "data.eval_fraction must be >= 0.0 and < 1.0"),
    ("data.eval_fraction=-0.1", "data.eval_fraction must be >= 0.0 and < 1.0"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage must be >= 0 and <= 3"),
    ("seed=-1", "seed must be >= 0 (random seed), got -1"),
])
def test_config_ranges_validated_at_compose(tsv_data, tmp_path, override, message):
    """Numeric ranges are checked in one place (config.validate_train_config, from load_config("train")),
    so launch's per-task compose and train both refuse them before anything is written (issue #13)."""
    with pytest.raises(train.ConfigError) as info:
        train.load_config("train", tiny_overrides(tsv_data, tmp_path / "o", override))
    msg = str(info.value)
    assert message in msg and "\n" not in msg and f"set {override.split('=')[0]}" in msg, msg

"""Shared fixtures: tiny random models, a small alignment TSV, the real data/model locations."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GOEMOTIONS = Path(os.environ.get("IRM_HPC_DATA", REPO / "irm_hpc" / "datasets" / "goemotions_ekman"))  # shipped

WORDS = {
    "anger": "furious rage hate shouting slammed outraged livid annoyed damn stupid".split(),
    "joy": "happy love wonderful smile great delighted sunshine laugh thanks yay".split(),
    "sadness": "sad cry lonely miss lost grief tears sorry gloomy down".split(),
}


def make_tsv(path: Path, n_per_label: int = 60, seed: int = 0) -> Path:
    """A small alignment table (text<TAB>label, with header) with label-specific vocabulary."""
    rng = random.Random(seed)
    rows = ["text\tlabel"]
    for label, words in WORDS.items():
        for _ in range(n_per_label):
            rows.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + f"\t{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def tsv_data(tmp_path) -> Path:
    return make_tsv(tmp_path / "align.tsv")


def tiny_lm_and_irm():
    """The tiny random model, its tokenizer and an IRM on layers 0-3 whose last layer is scaled x50 (a
    visible effect on generations and losses)."""
    import torch

    from irm_hpc.config import load_config
    from irm_hpc.irm import IRM
    from irm_hpc.models import load_model

    cfg = load_config("train", ["model=tiny_random", "out_dir=/tmp/unused"])
    lm, tok = load_model(cfg.model, torch.device("cpu"))
    torch.manual_seed(0)
    irm = IRM(lm.config.hidden_size, [0, 1, 2, 3], width_multiplier=2, depth=1)
    with torch.no_grad():
        irm.net[-1].weight.mul_(50.0)
    return lm, tok, irm


def train_tiny_run(out_dir: Path) -> Path:
    """A finished 3-step tiny-random-model run on the packaged GoEmotions data (the judge fits its train
    split and is scored on its test split) in ``out_dir``; asserts the training exited 0."""
    res = run_module("irm_hpc.train", ["model=tiny_random", "train=smoke", "data.max_length=24",
                                       "data.max_train_texts=200", "train.max_steps=3", f"out_dir={out_dir}"],
                     timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return out_dir


def tiny_overrides(data: Path, out_dir: Path, *extra: str) -> list[str]:
    """Hydra overrides for a few-step tiny_random run on ``data``."""
    return ["model=tiny_random", "train=smoke", f"data.path={data}", "data.format=tsv", "data.max_length=24",
            "alignment=anger", f"out_dir={out_dir}", *extra]


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra: str) -> dict:
    """os.environ without the torch.distributed variables an in-process test may have set; this checkout
    first on PYTHONPATH, so subprocesses import the package under test (not another editable install)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    path = os.pathsep.join(dict.fromkeys([str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]))
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def run_module(module: str, args: list[str], timeout: int = 300, env: dict | None = None, **kw):
    """Run ``python -m module args`` in a subprocess; return CompletedProcess (text)."""
    full_env = clean_env(**(env or {}))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO, **kw)


# ----------------------------------------------------------------------------- no silent skips in CI
REQUIRE_ALL = "IRM_REQUIRE_ALL"  # .ci/run sets it: a test that would skip (no Slurm, model, data) fails


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With ``IRM_REQUIRE_ALL=1``, a skipped test is reported as failed, naming why it would have skipped:
    in CI a missing Slurm, SmolLM2 model or data set is a broken install, not a reason to pass."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get(REQUIRE_ALL) == "1" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_ALL}=1 and this test skipped: {reason}"

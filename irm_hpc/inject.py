"""Forward hooks that run an IRM inside a frozen HF decoder.

The IRM reads the residual stream right after layer 0's attention block (layer input + attention output)
and each injection layer's vector is added to that layer's residual stream right after its attention
block, before the post-attention norm and MLP. We hook the module whose output is added to the residual:

* Llama / Mistral / Qwen2 / Phi3 style layers: ``layer.self_attn`` (output tuple, element 0);
* Gemma2 / Gemma3 style layers (``pre_feedforward_layernorm`` present): ``layer.post_attention_layernorm``
  (the normed attention output that is added to the residual).

Adding ``v`` to that output is the same as adding it to the residual right after the block. Each call
of the model (training forward, or one ``generate()`` decode step with the KV cache) runs the IRM on the
tokens of that call, so cached decoding injects for each new token. Hooks follow TransformerLens' habit:
installed by a context manager, removed in ``finally``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from irm_hpc.errors import ConfigError, IrmError


class UnsupportedArchitectureError(IrmError, ValueError):
    """The model's decoder layers cannot be hooked (no ``self_attn``)."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the decoder layer list of an HF causal LM (``model.model.layers`` and variants).

    Raises:
        UnsupportedArchitectureError: no layer list with ``self_attn`` modules was found.
    """
    base = getattr(model, "model", model)
    for candidate in (getattr(base, "layers", None), getattr(getattr(base, "language_model", None), "layers", None)):
        if isinstance(candidate, nn.ModuleList) and len(candidate) and hasattr(candidate[0], "self_attn"):
            return candidate
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise UnsupportedArchitectureError(
        f"unsupported architecture '{kind}': irm_hpc needs decoder layers at model.model.layers with a "
        "'self_attn' module (Llama, Mistral, Qwen2, Gemma, ...)"
    )


def injection_site(layer: nn.Module) -> nn.Module:
    """The sub-module of ``layer`` whose output is added to the residual stream after attention."""
    if hasattr(layer, "pre_feedforward_layernorm") and hasattr(layer, "post_attention_layernorm"):
        return layer.post_attention_layernorm  # Gemma2/3: residual + norm(attn_out)
    return layer.self_attn


def resolve_layers(n_model_layers: int, layers: Optional[list[int]]) -> list[int]:
    """Validate injection layer indices against the model's depth; ``None`` means every layer.

    Negative indices count from the end. Raises ``ConfigError`` (a ``ValueError``) naming the model's layer count.
    """
    if layers is None:
        return list(range(n_model_layers))
    out = []
    for i in layers:
        j = int(i) + n_model_layers if int(i) < 0 else int(i)
        if not 0 <= j < n_model_layers:
            raise ConfigError(
                f"injection layer {i} is out of range: the model has {n_model_layers} layers (0..{n_model_layers - 1})"
            )
        out.append(j)
    return sorted(set(out))


def layer_set_layers(spec: str, n_model_layers: int) -> list[int]:
    """Injection layers of a named layer set, scaled to the model's depth (the seed paper's sets).

    ``all``; ``q1``..``q4``: the four contiguous quarters; ``every<K>``: layers 0, K, 2K, ...;
    or explicit indices ``"0,5,10"``. Raises ``ConfigError`` (a ``ValueError``) naming the valid forms.
    """
    spec = str(spec).strip()
    n = n_model_layers
    if spec == "all":
        return list(range(n))
    if spec in {"q1", "q2", "q3", "q4"}:
        q = int(spec[1]) - 1
        return list(range(q * n // 4, (q + 1) * n // 4)) or [min(q, n - 1)]
    if spec.startswith("every") and spec[5:].isdigit() and int(spec[5:]) > 0:
        return list(range(0, n, int(spec[5:])))
    try:
        return resolve_layers(n, [int(x) for x in spec.split(",") if x.strip()])
    except ValueError as exc:
        if "out of range" in str(exc):
            raise
    raise ConfigError(f"unknown layer set '{spec}': use all, q1..q4, every<K> or comma-separated layer indices")


def _attn_output(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_output(out, new: torch.Tensor):
    return (new, *out[1:]) if isinstance(out, tuple) else new


@dataclass
class Injector:
    """Live state of an installed injection (returned by :func:`inject`).

    Attributes:
        enabled: the paper's activate/deactivate switch; when False the model runs unchanged.
        keep_injections: keep the last call's vectors in ``last_injection`` (training needs them).
        last_injection: (batch, seq, n_layers, hidden) vectors of the last forward call, as injected
            (after ``scale`` and ``ablate``), or None.
        scale: multiplies every injection vector (1 = what training injects; 0 injects zeros; the
            switch that leaves the model exactly unchanged is ``enabled=False``).
        ablate: hidden indices zeroed in every injection layer's vector (an ablation), or None.
        drop_layers: model layer indices whose injection is left out (a layer ablation); the IRM still
            runs, the other layers get their vectors unchanged.
    """

    irm: nn.Module
    enabled: bool = True
    keep_injections: bool = True
    last_injection: Optional[torch.Tensor] = None
    handles: list = field(default_factory=list)
    scale: float = 1.0
    ablate: Optional[torch.Tensor] = None
    drop_layers: frozenset = frozenset()
    _layer0_input: Optional[torch.Tensor] = None

    def set_ablate(self, indices: Optional[Sequence[int]]) -> None:
        """Zero hidden indices ``indices`` of every injection vector (None or empty: no ablation).

        Raises ``ConfigError`` (a ``ValueError``) for an index outside ``0..hidden-1``.
        """
        self.ablate = ablation_indices(indices, int(self.irm.hidden_size))

    @property
    def active(self) -> bool:
        """True while hooks are installed."""
        return bool(self.handles)


def ablation_indices(indices: Optional[Sequence[int]], hidden_size: int) -> Optional[torch.Tensor]:
    """``indices`` as a sorted unique int64 tensor for :attr:`Injector.ablate`, or None if empty.

    Raises ``ConfigError`` (a ``ValueError``) naming the hidden size for an index outside ``0..hidden-1``.
    """
    if indices is None or len(indices) == 0:
        return None
    idx = sorted({int(i) for i in indices})
    bad = [i for i in idx if not 0 <= i < hidden_size]
    if bad:
        raise ConfigError(f"ablation index {bad[0]} is out of range: the hidden size is {hidden_size} "
                          f"(indices 0..{hidden_size - 1})")
    return torch.tensor(idx, dtype=torch.long)


class SteeringVectors(nn.Module):
    """Fixed per-layer vectors in the IRM's interface: a steering-vector baseline (ActAdd, Turner et al.
    2023; CAA, Rimsky et al. 2024) that :func:`inject` adds exactly where an IRM's output goes.

    Args:
        vectors: (n_layers, hidden) one vector per injection layer (ascending layer order).
        injection_layers: the model layer indices, ``len == n_layers``.

    ``forward(resid)`` ignores the residual's values and returns the vectors broadcast to
    (batch, seq, n_layers, hidden).
    """

    def __init__(self, vectors: torch.Tensor, injection_layers: Sequence[int]):
        super().__init__()
        layers = [int(i) for i in injection_layers]
        if vectors.ndim != 2 or vectors.shape[0] != len(layers):
            raise ConfigError(f"steering vectors of shape {tuple(vectors.shape)} do not match {len(layers)} "
                              "injection layers: pass (n_layers, hidden)")
        self.injection_layers = layers
        self.hidden_size = int(vectors.shape[1])
        self.register_buffer("vectors", vectors.detach().clone())

    @property
    def n_layers(self) -> int:
        return len(self.injection_layers)

    def forward(self, resid: torch.Tensor) -> torch.Tensor:
        return self.vectors.to(resid.dtype).expand(*resid.shape[:-1], *self.vectors.shape)


@contextmanager
def inject(model: nn.Module, irm: nn.Module, enabled: bool = True, keep_injections: bool = True,
           scale: float = 1.0, ablate: Optional[Sequence[int]] = None,
           drop_layers: Optional[Sequence[int]] = None) -> Iterator[Injector]:
    """Install IRM hooks on ``model`` for the duration of the ``with`` block.

    Args:
        model: an HF causal LM whose decoder layers expose ``self_attn``.
        irm: the IRM (or :class:`SteeringVectors`); ``irm.injection_layers`` index ``model.model.layers``.
        enabled: initial state of the on/off switch (``Injector.enabled``).
        keep_injections: store each call's vectors in ``Injector.last_injection`` (with autograd graph).
        scale: multiply every injection vector by ``scale`` (``Injector.scale``; 1 = as trained).
        ablate: hidden indices to zero in every injection layer (``Injector.ablate``; seed paper's
            "next checks", Sun et al. 2024 zero massive-activation dims the same way).
        drop_layers: model layer indices (injection layers) that get no vector (``Injector.drop_layers``).

    Yields:
        The :class:`Injector`; every hook is removed on exit, also on error.

    Raises:
        UnsupportedArchitectureError: the model's layers cannot be hooked.
        ConfigError: an injection layer is out of the model's range.
    """
    layers = decoder_layers(model)
    resolve_layers(len(layers), irm.injection_layers)
    state = Injector(irm=irm, enabled=enabled, keep_injections=keep_injections, scale=float(scale))
    state.set_ablate(ablate)
    dropped = set(resolve_layers(len(layers), list(drop_layers or [])))
    if dropped - set(irm.injection_layers):
        raise ConfigError(f"cannot drop layer {sorted(dropped - set(irm.injection_layers))[0]}: it is not an "
                          f"injection layer ({irm.injection_layers})")
    state.drop_layers = frozenset(dropped)
    slot = {layer_idx: k for k, layer_idx in enumerate(irm.injection_layers)}
    current: dict = {"parts": None}

    def save_layer0_input(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        state._layer0_input = hidden

    def run_irm(site_out: torch.Tensor) -> None:
        resid = state._layer0_input + site_out
        v = irm(resid)
        if state.scale != 1.0:
            v = v * state.scale
        if state.ablate is not None:
            v = v.index_fill(-1, state.ablate.to(v.device), 0.0)
        # one unbind (its backward stacks all layers' gradients at once) instead of one strided
        # select per layer (each select's backward materialises a full-size zero gradient)
        current["parts"] = v.unbind(dim=-2)
        if state.keep_injections:
            state.last_injection = v

    def make_site_hook(layer_idx: int):
        def hook(_module, _args, out):
            if not state.enabled:
                return None
            site_out = _attn_output(out)
            if layer_idx == 0:
                run_irm(site_out)
            if layer_idx not in slot or layer_idx in state.drop_layers:
                return None
            vec = current["parts"][slot[layer_idx]].to(site_out.dtype)
            return _replace_output(out, site_out + vec)

        return hook

    try:
        state.handles.append(layers[0].register_forward_pre_hook(save_layer0_input, with_kwargs=True))
        for idx, layer in enumerate(layers):
            if idx == 0 or idx in slot:
                state.handles.append(injection_site(layer).register_forward_hook(make_site_hook(idx)))
        yield state
    finally:
        for handle in state.handles:
            handle.remove()
        state.handles.clear()
        state._layer0_input = None
        current["parts"] = None


def count_hooks(model: nn.Module) -> int:
    """Total forward (pre-)hooks on all sub-modules of ``model`` (tests use it to prove cleanup)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@contextmanager
def capture_residuals(model: nn.Module, absolute: bool = True) -> Iterator[dict]:
    """Accumulate the frozen model's residual stream after every layer's attention block.

    Inside the block, each forward call adds ``abs(resid)`` (``absolute=False``: ``resid`` itself)
    summed over the tokens selected by ``stats["mask"]`` (set it to a (batch, seq) 0/1 mask before each
    call, e.g. the attention mask; all tokens if None). Yields ``stats`` with ``"sum_abs"`` (or ``"sum"``
    when not ``absolute``): (n_layers, hidden) float64 sums and ``"count"``: token count; mean = sum /
    count. Hooks are removed on exit. Used for the base-model reference (massive activation / outlier
    dimensions, absolute) next to the IRM's striations, and for the mean residuals of the steering-vector
    baseline (signed, ``irm_hpc.evaluate``).
    """
    layers = decoder_layers(model)
    key = "sum_abs" if absolute else "sum"
    stats: dict = {key: None, "count": 0, "mask": None}
    inputs: dict[int, torch.Tensor] = {}
    handles = []

    def pre(idx):
        def hook(_m, args, kwargs):
            inputs[idx] = args[0] if args else kwargs["hidden_states"]

        return hook

    def post(idx):
        def hook(_m, _args, out):
            resid = (inputs.pop(idx) + _attn_output(out)).detach().double()
            resid = resid.abs() if absolute else resid
            mask = stats["mask"]
            mask = torch.ones(resid.shape[:2], device=resid.device) if mask is None else mask.to(resid.device)
            if stats[key] is None:
                stats[key] = torch.zeros(len(layers), resid.shape[-1], dtype=torch.float64)
            stats[key][idx] += (resid * mask[..., None]).sum((0, 1)).cpu()
            if idx == 0:
                stats["count"] += int(mask.sum())

        return hook

    try:
        for idx, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(pre(idx), with_kwargs=True))
            handles.append(injection_site(layer).register_forward_hook(post(idx)))
        yield stats
    finally:
        for h in handles:
            h.remove()

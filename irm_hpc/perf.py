"""FLOP and memory model of IRM training (pure Python; estimates, not measurements).

* :class:`ModelShape` / :data:`SHAPES`: the frozen Llama-architecture model's sizes and parameter counts.
* :func:`irm_params`: parameters of the IRM (arXiv 2407.03621: width x3, depth 3).
* :func:`train_flops_per_token`: model FLOPs of one IRM training step per token, term by term.
* :data:`PEAK_BF16_TFLOPS`, :func:`peak_flops`, :func:`mfu`: model FLOPs utilisation against the
  accelerator's dense bf16 peak.
* :func:`memory_estimate`: bytes per GPU of a run, by ZeRO stage, GPU count and offload, with the
  optimizer state DeepSpeed 0.19.8 actually keeps for a bf16 engine (see its docstring).

Conventions: FLOPs count a multiply-add as 2 FLOPs (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022,
appendix B); elementwise work (norms, RoPE, SiLU, softmax, the injection adds) is left out. Bytes are
bytes (1 GB = 1e9 bytes, 1 GiB = 2**30 bytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from irm_hpc.errors import ConfigError

GB = 1e9
GIB = 2**30

# DeepSpeed 0.19.8 defaults (deepspeed/runtime/zero/config.py) that set the size of ZeRO's buffers
REDUCE_BUCKET_SIZE = int(5e8)  # zero_optimization.reduce_bucket_size, elements
PREFETCH_BUCKET_SIZE = int(5e7)  # zero_optimization.stage3_prefetch_bucket_size, elements
SUB_GROUP_SIZE = int(1e9)  # zero_optimization.sub_group_size, elements (stage 3)
ALLREDUCE_BUFFER = int(5e8)  # DeepSpeedEngine.buffered_allreduce_fallback elements_per_buffer (stage 0)


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a Llama-architecture decoder (q, k, v, o, gate, up, down projections; RMSNorm; no biases).

    Attributes:
        hidden: hidden size h.
        n_layers: decoder layers L.
        intermediate: MLP intermediate size i.
        n_heads: attention heads (head_dim = hidden // n_heads).
        n_kv_heads: key/value heads (grouped-query attention when < n_heads).
        vocab: vocabulary size V.
        tied_embeddings: LM head shares the input embedding matrix.
    """

    hidden: int
    n_layers: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    tied_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, config) -> ModelShape:
        """The shape of a transformers ``PretrainedConfig`` (Llama, Mistral, Qwen2 style field names).

        Raises ``ConfigError`` when a size field is missing.
        """
        try:
            return cls(
                hidden=int(config.hidden_size), n_layers=int(config.num_hidden_layers),
                intermediate=int(config.intermediate_size), n_heads=int(config.num_attention_heads),
                n_kv_heads=int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
                vocab=int(config.vocab_size), tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            )
        except AttributeError as exc:
            raise ConfigError(f"model config lacks a Llama-style size field ({exc}); "
                              "pass a ModelShape by hand") from None

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def kv_dim(self) -> int:
        """Width of the k and v projections: n_kv_heads * head_dim."""
        return self.n_kv_heads * self.head_dim

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one decoder layer's matmuls: q, o (h x h), k, v (h x kv_dim), gate, up, down (h x i)."""
        h = self.hidden
        return 2 * h * h + 2 * h * self.kv_dim + 3 * h * self.intermediate

    @property
    def attn_matmul_params(self) -> int:
        """q, k, v, o weights of one layer."""
        return 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_dim

    @property
    def mlp_matmul_params(self) -> int:
        """gate, up, down weights of one layer."""
        return 3 * self.hidden * self.intermediate

    @property
    def head_params(self) -> int:
        """LM head matmul weights V x h (counted for FLOPs even when tied to the embeddings)."""
        return self.vocab * self.hidden

    @property
    def forward_matmul_params(self) -> int:
        """Matmul weights one token passes through in a forward pass: every layer's, plus the LM head
        (forward FLOPs per token = 2 x this, attention over the context aside)."""
        return self.n_layers * self.layer_matmul_params + self.head_params

    @property
    def n_params(self) -> int:
        """Total parameters: layers (matmuls + 2 RMSNorm weights each), final norm, embeddings, untied LM head."""
        layers = self.n_layers * (self.layer_matmul_params + 2 * self.hidden)
        embed = self.vocab * self.hidden
        return layers + self.hidden + embed + (0 if self.tied_embeddings else self.head_params)

    def as_dict(self) -> dict:
        return asdict(self)


SHAPES: dict[str, ModelShape] = {
    # HuggingFaceTB/SmolLM2-135M config.json
    "smollm2_135m": ModelShape(576, 30, 1536, 9, 3, 49152, tied_embeddings=True),
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T config.json (a ~1B Llama)
    "llama_1b": ModelShape(2048, 22, 5632, 32, 4, 32000, tied_embeddings=False),
    # meta-llama/Llama-2-7b-hf config.json
    "llama2_7b": ModelShape(4096, 32, 11008, 32, 32, 32000, tied_embeddings=False),
}


def get_shape(name: str) -> ModelShape:
    """A named shape of :data:`SHAPES`; raises ``ConfigError`` listing the names."""
    try:
        return SHAPES[name]
    except KeyError:
        raise ConfigError(f"unknown model shape '{name}': use one of {', '.join(SHAPES)}") from None


def irm_linear_shapes(hidden: int, n_inj: int, width_multiplier: int = 3, depth: int = 3) -> list[tuple[int, int]]:
    """(in, out) of the IRM's Linear layers (``irm_hpc.irm.IRM``): h->w, depth x w->w, w->h*n."""
    w = width_multiplier * hidden
    return [(hidden, w)] + [(w, w)] * depth + [(w, hidden * n_inj)]


def irm_params(hidden: int, n_inj: int, width_multiplier: int = 3, depth: int = 3) -> int:
    """Parameters (weights + biases) of the IRM: Linear(h, w), depth x Linear(w, w), Linear(w, h*n), w = mult*h.

    Raises ``ConfigError`` for non-positive sizes or a negative depth.
    """
    if hidden <= 0 or n_inj <= 0 or width_multiplier <= 0 or depth < 0:
        raise ConfigError(f"bad IRM sizes: hidden={hidden} n_inj={n_inj} width_multiplier={width_multiplier} "
                          f"depth={depth}; use positive sizes and depth >= 0")
    return sum(i * o + o for i, o in irm_linear_shapes(hidden, n_inj, width_multiplier, depth))


def _check_layers(shape: ModelShape, injection_layers: Sequence[int]) -> list[int]:
    layers = sorted({int(i) for i in injection_layers})
    if not layers or layers[0] < 0 or layers[-1] >= shape.n_layers:
        raise ConfigError(f"injection layers {list(injection_layers)} are not a non-empty subset of "
                          f"0..{shape.n_layers - 1}; use irm_hpc.inject.layer_set_layers")
    return layers


def attention_context(seq_len: int, causal: bool = True) -> float:
    """Mean number of keys a query attends to: (seq+1)/2 with a causal mask, seq if counted in full (PaLM)."""
    return (seq_len + 1) / 2 if causal else float(seq_len)


def train_flops_per_token(shape: ModelShape, injection_layers: Sequence[int], seq_len: int,
                          irm_width: int = 3, irm_depth: int = 3, causal: bool = True) -> dict:
    """Model FLOPs per token of one IRM training step (forward + backward + nothing for the optimizer).

    With f the first injection layer, L layers, N_layer a layer's matmul weights, N_head = V*h,
    s_eff = :func:`attention_context` (causal: (seq+1)/2, the mean keys per query; ``causal=False``
    counts the full seq as PaLM appendix B does):

    * ``base_forward`` = 2 (L N_layer + N_head): the frozen model's matmuls, every layer + LM head.
    * ``attn_forward`` = 4 L h s_eff: QK^T and AV (2 h s_eff each).
    * ``base_backward`` = 2 (N_mlp(f) + sum_{l>f} N_layer + N_head): gradients w.r.t. activations only
      (frozen weights: no weight gradients, half of the usual 4N backward). Autograd starts at the first
      injection: in layer f the vector is added after attention, so only f's MLP is back-propagated;
      layers before f have no input that requires grad.
    * ``attn_backward`` = 8 h s_eff per layer after f: dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q
      (no weights, twice the forward); FlashAttention's recompute of QK^T is hardware work, not counted.
    * ``irm`` = 6 N_irm (Kaplan et al. / PaLM 6N: forward 2N, backward 4N; weights train).

    So ``total`` ~= 4 N_base + 6 N_irm + attention for layer set ``all`` (f = 0), less for later sets.

    Returns:
        dict of FLOPs per token: the terms above, ``base_params``, ``irm_params``, ``first_layer``,
        ``s_eff`` and ``total``.

    Raises:
        ConfigError: empty or out-of-range ``injection_layers``.
    """
    layers = _check_layers(shape, injection_layers)
    f, L, h = layers[0], shape.n_layers, shape.hidden
    s_eff = attention_context(seq_len, causal)
    n_irm = irm_params(h, len(layers), irm_width, irm_depth)
    after = L - f - 1  # layers fully back-propagated
    terms = {
        "base_forward": 2 * shape.forward_matmul_params,
        "attn_forward": 4 * L * h * s_eff,
        "base_backward": 2 * (shape.mlp_matmul_params + after * shape.layer_matmul_params + shape.head_params),
        "attn_backward": 8 * after * h * s_eff,
        "irm": 6 * n_irm,
    }
    total = float(sum(terms.values()))
    return {**terms, "total": total, "base_params": shape.n_params, "irm_params": n_irm, "first_layer": f,
            "s_eff": s_eff}


# Dense (no 2:4 sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets (H100: "Hopper"
# data sheet, 1979 / 1513 TFLOPS with sparsity for SXM / PCIe; H200 has the SXM5 H100's compute;
# A100: 312 TFLOPS, SXM4 and PCIe alike).
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H100 SXM": 989.4,
    "H100 PCIe": 756.0,
    "H200": 989.4,
    "A100": 312.0,
}


def peak_key(device_name: str) -> str | None:
    """The :data:`PEAK_BF16_TFLOPS` key of a ``torch.cuda.get_device_name()`` string, or None if unknown.

    "NVIDIA H100 80GB HBM3" (the SXM board) -> "H100 SXM"; "NVIDIA H100 PCIe" -> "H100 PCIe";
    "NVIDIA H200" -> "H200"; "NVIDIA A100-SXM4-80GB" -> "A100". NVL boards (lower clocks) are unknown.
    """
    name = device_name.upper()
    if "NVL" in name:
        return None
    if "H200" in name:
        return "H200"
    if "H100" in name:
        if "PCIE" in name:
            return "H100 PCIe"
        if "HBM3" in name or "SXM" in name:
            return "H100 SXM"
        return None
    if "A100" in name:
        return "A100"
    return None


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of the device in FLOP/s (not TFLOP/s), or None for an unknown device."""
    key = peak_key(device_name)
    return None if key is None else PEAK_BF16_TFLOPS[key] * 1e12


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: flops_per_token * tokens_per_s / peak (FLOP/s); None if peak is None."""
    if peak is None:
        return None
    return flops_per_token * tokens_per_s / peak


def layer_activation_bytes(shape: ModelShape) -> int:
    """Bytes per token that autograd saves in one bf16 Llama decoder layer whose input requires grad
    and whose weights are frozen (HF LlamaDecoderLayer, SDPA attention).

    Counted with ``torch.autograd.graph.saved_tensors_hooks`` on a small Llama (transformers 5.23, torch
    2.13): a frozen linear saves its weight, not its input, so the saved activations are the two
    RMSNorm fp32 inputs (4h each), q (2h), k and v (2h each: counted after ``repeat_kv``, which HF uses
    whenever a padding mask is passed; 2 kv_dim without one), the attention output (2h), the attention
    log-sum-exp (fp32, 4 n_heads), and gate, up and SiLU(gate) (2i each): 16h + 6i + 4 n_heads.
    No (seq x seq) score matrix is saved: SDPA's flash / memory-efficient kernels recompute it.
    """
    h, i = shape.hidden, shape.intermediate
    return 16 * h + 6 * i + 4 * shape.n_heads


def memory_estimate(shape: ModelShape, n_inj: int, zero_stage: int, n_gpus: int = 1, *,
                    offload_optimizer: bool = False, offload_param: bool = False, micro_batch: int = 8,
                    seq_len: int = 64, activation_checkpointing: bool = False, width_multiplier: int = 3,
                    depth: int = 3, first_layer: int = 0, reduce_bucket_size: int = REDUCE_BUCKET_SIZE) -> dict:
    """Estimated peak bytes per GPU of IRM training with a bf16 frozen model and a bf16 DeepSpeed engine.

    An estimate, not a measurement: it counts the large tensors, not the CUDA context, the caching
    allocator's fragmentation or NCCL buffers (leave headroom for those). Components (bytes per GPU):

    * ``base_weights`` = 2 N_base: the frozen model in bf16, whole on every rank (it is outside the
      DeepSpeed engine, so ZeRO never partitions it).
    * ``irm_weights``: IRM bf16 weights, 2 N_irm; 2 N_irm / n_gpus at ZeRO-3; 0 with ``offload_param``.
    * ``gradients``: bf16 IRM gradients (DeepSpeed keeps gradients in the model dtype by default:
      ``data_types.grad_accum_dtype`` unset), 2 N_irm at stages 0-1, 2 N_irm / n_gpus at stages 2-3;
      with ``offload_optimizer`` they go to the CPU after reduction (stage 1 still holds ``param.grad``).
    * ``optimizer_states``: fp32 master weights + AdamW m and v, 12 N_irm; / n_gpus at stage >= 1;
      on the CPU with ``offload_optimizer`` (then counted in ``cpu_bytes``).
    * ``zero_buffers``: DeepSpeed's gradient reduce bucket (stages 2-3: ``reduce_bucket_size`` elements of
      bf16, allocated whole however small the model: 1 GB by default; held through backward at stage 2,
      always at stage 3; at stage 1 none was held after backward in a 1-process check), ZeRO-3's fp32
      gradient buffer of the largest sub-group and, at stage 0 on several GPUs, the allreduce buffer.
    * ``activations``: :func:`layer_activation_bytes` per token for each layer after the first injection
      layer f, plus f's norm + MLP part (4h + 6i); with activation checkpointing only each such layer's
      input (2h) plus one layer's recompute.
    * ``logits``: final norm (4h) + fp32 logits and log-softmax in the loss (8V) per token.
    * ``irm_activations``: IRM input (2h), the w-wide ReLU outputs (2w (depth + 1)) and the
      (tokens, n_inj, h) output (2 n h) per token.
    * ``backward_transient``: gradients alive during backward: the logits' (fp32 + bf16, 6V per token),
      the IRM output's (2 n h per token) and, at ZeRO-3, the gathered largest IRM Linear (+ prefetch).
    * ``step_transient``: the fp32 gradient copy made at the optimizer step (4 N_irm, / n_gpus at stage
      >= 1; 0 on GPU with ``offload_optimizer``); it does not overlap with activations.

    ``total`` = persistent states + max(activations + logits + IRM activations + backward transient,
    step transient).

    What DeepSpeed 0.19.8 keeps for ``"bf16": {"enabled": true}`` (``runtime/engine.py``
    ``DeepSpeedEngine._do_optimizer_sanity_check`` picks the wrapper):

    * stage 0: ``DDP_BFLOAT16`` -> ``_configure_fp16_optimizer`` -> ``FP16_UnfusedOptimizer``
      (``runtime/fp16/unfused_optimizer.py``; torch AdamW is not a fused optimizer) with bf16 low precision:
      an unpartitioned fp32 copy of every parameter (``fp32_groups``) whose ``.grad`` gets an fp32 copy
      of every bf16 gradient in ``step()``. ``BF16_Optimizer`` (``runtime/bf16_optimizer.py``, which
      partitions fp32 state and keeps fp32 gradient buffers) is used only for pipeline parallelism, or at
      stage 1 when ``data_types.grad_accum_dtype`` is fp32; irm_hpc sets neither.
    * stages 1, 2: ``DeepSpeedZeroOptimizer`` (``runtime/zero/stage_1_and_2.py``): flat bf16 parameters
      (``bit16_groups_flat``), a partition of fp32 master weights (``single_partition_of_fp32_groups``),
      Adam state on that partition, at stage 2 the bf16 reduce bucket (``setup_buckets``,
      ``reduce_bucket_size`` elements) and the bf16 gradient partition ``grads_in_partition``, and in
      ``step()`` the fp32 ``single_grad_partition``.
    * stage 3: ``DeepSpeedZeroOptimizer_Stage3`` (``runtime/zero/stage3.py``): bf16 parameter
      partitions, ``grad_partitions_flat_buffer`` (bf16), fp32 partitions + Adam state, an fp32
      ``gradient_buffer`` of the largest sub-group (persistent), the reduce bucket; parameters are gathered
      module by module in forward and backward.

    Checked on DeepSpeed's CPU accelerator with a bf16 engine (optimizer class, fp32 master dtype, Adam
    state dtype and size, bucket sizes); the byte totals themselves are not measured.

    Raises:
        ConfigError: zero_stage outside 0-3, offload_optimizer at stage 0, offload_param below stage 3,
        or non-positive sizes.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_stage {zero_stage} is not one of 0, 1, 2, 3")
    if offload_optimizer and zero_stage == 0:
        raise ConfigError("offload_optimizer needs ZeRO stage >= 1 (DeepSpeed offloads ZeRO's partitions)")
    if offload_param and zero_stage != 3:
        raise ConfigError("offload_param needs zero_stage=3")
    if n_gpus < 1 or micro_batch < 1 or seq_len < 1 or n_inj < 1:
        raise ConfigError(f"n_gpus, micro_batch, seq_len and n_inj must be >= 1, got {n_gpus}, {micro_batch}, "
                          f"{seq_len}, {n_inj}")
    if not 0 <= first_layer < shape.n_layers:
        raise ConfigError(f"first_layer {first_layer} is out of range 0..{shape.n_layers - 1}")
    h, V, d = shape.hidden, shape.vocab, n_gpus
    P = irm_params(h, n_inj, width_multiplier, depth)
    w = width_multiplier * h
    largest = max(i * o + o for i, o in irm_linear_shapes(h, n_inj, width_multiplier, depth))
    tokens = micro_batch * seq_len
    part = d if zero_stage >= 1 else 1

    cpu = 0.0
    irm_weights = 2 * P / (d if zero_stage == 3 else 1)
    if offload_param:
        cpu += irm_weights
        irm_weights = 0.0
    if zero_stage <= 1:
        gradients = 2.0 * P
    else:
        gradients = 2 * P / d
    opt_states = 12 * P / part
    step_transient = 4 * P / part
    zero_buffers = 0.0
    if zero_stage >= 2:
        zero_buffers += 2 * reduce_bucket_size
    if zero_stage == 0 and d > 1:
        zero_buffers += 2 * min(P, ALLREDUCE_BUFFER)
    sub_group = max(min(P / d, SUB_GROUP_SIZE), largest / d)  # largest stage-3 sub-group (a param is not split)
    if zero_stage == 3:
        zero_buffers += 4 * sub_group  # fp32 gradient_buffer of the largest sub-group
    if offload_optimizer:
        cpu += opt_states + step_transient
        if zero_stage == 3:
            cpu += 4 * sub_group + gradients  # the fp32 buffer and grad partitions live on CPU
            zero_buffers -= 4 * sub_group
            gradients = 0.0
        elif zero_stage == 2:
            cpu += gradients
            gradients = 2.0 * largest  # temp_grad_buffer_for_gpu_offload
        opt_states = 0.0
        step_transient = 0.0

    n_bwd = shape.n_layers - first_layer - 1
    per_layer = layer_activation_bytes(shape)
    mlp_part = 4 * h + 6 * shape.intermediate
    if activation_checkpointing:
        act_per_token = (n_bwd + 1) * 2 * h + per_layer
    else:
        act_per_token = n_bwd * per_layer + mlp_part
    activations = act_per_token * tokens
    logits = (4 * h + 8 * V) * tokens
    irm_acts = (2 * h + 2 * w * (depth + 1) + 2 * n_inj * h) * tokens
    backward_transient = (6 * V + 2 * n_inj * h) * tokens
    if zero_stage == 3:
        backward_transient += 2 * (largest + PREFETCH_BUCKET_SIZE)

    persistent = 2 * shape.n_params + irm_weights + gradients + opt_states + zero_buffers
    fwd_bwd = activations + logits + irm_acts + backward_transient
    total = persistent + max(fwd_bwd, step_transient)
    return {
        "base_weights": 2.0 * shape.n_params, "irm_weights": irm_weights, "gradients": gradients,
        "optimizer_states": opt_states, "zero_buffers": zero_buffers, "activations": float(activations),
        "logits": float(logits), "irm_activations": float(irm_acts), "backward_transient": float(backward_transient),
        "step_transient": step_transient, "total": total, "cpu_bytes": cpu, "irm_params": P,
    }

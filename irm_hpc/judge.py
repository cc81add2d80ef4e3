"""The emotion judge of the steer-and-judge evaluation: which emotion a text expresses.

A linear text classifier trained with scikit-learn on the GoEmotions train split (Demszky et al. 2020;
Ekman taxonomy: anger, disgust, fear, joy, neutral, sadness, surprise; the packaged
``irm_hpc/datasets/goemotions_ekman``), single-label rows only. It scores generated continuations
(:meth:`EmotionJudge.predict_proba`): one probability per label and text.

Method (TF-IDF + logistic regression, the standard linear text-classification baseline; on the packaged
test split: accuracy 0.636, macro-F1 0.518, against 0.375 / 0.078 for always answering the majority label):

* features: ``TfidfVectorizer`` over word 1-2 grams, lowercase, sublinear tf (``1 + log tf``), terms in
  at least ``min_df`` (2) training texts, L2-normalised rows;
* classifier: multinomial ``LogisticRegression`` (lbfgs, ``C`` = :data:`JUDGE_C`, ``max_iter`` 1000,
  unweighted classes), fitted with BLAS/OpenMP limited to one thread (on a busy 2-core machine the
  default threads made the fit ~8x slower: 55 s instead of 7 s; the sparse problem gains nothing from them).

:func:`load_judge` fits it once per data version and caches it as one ``.npz`` file (no pickle) under
``$IRM_HPC_CACHE/judge`` (default ``~/.cache/irm_hpc/judge``), named by a checksum of the train rows, the
test rows, the seed and :data:`JUDGE_VERSION`: changed data or a new judge version fits a new one.

Errors: :class:`JudgeError` (one line) for rows a judge cannot be fitted on or scored against, and for a
damaged or foreign judge file; ``data.DataError`` from reading the data; ``UnsafePathError`` for a cache
directory others can write to.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import zipfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Optional, Union

import numpy as np

from irm_hpc.errors import IrmError, one_line
from irm_hpc.layout import atomic_path, cache_root, check_private, make_private_dir

PathLike = Union[str, Path]

# Bump when the features, hyper-parameters or training rows' selection change: cached judges are refit.
JUDGE_VERSION = "tfidf12-sublinear-lr-C4-v1"
# Layout of the .npz file (the arrays :meth:`EmotionJudge.save` writes); bump when it changes.
FILE_FORMAT = 1
FILE_KIND = "irm_hpc.judge"

JUDGE_C = 4.0
JUDGE_MAX_ITER = 1000
NGRAM_RANGE = (1, 2)
DEFAULT_MIN_DF = 2

_ARRAYS = ("kind", "format", "vocabulary", "idf", "coef", "intercept", "labels", "params", "meta")


class JudgeError(IrmError, ValueError):
    """Rows a judge cannot be fitted on or scored against, or a damaged / foreign judge file (one line)."""


def _vectorizer(min_df: int, vocabulary: Optional[dict] = None):
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(ngram_range=NGRAM_RANGE, sublinear_tf=True, min_df=min_df, lowercase=True,
                           vocabulary=vocabulary, dtype=np.float64)


def _classifier(C: float, max_iter: int, seed: int):
    from sklearn.linear_model import LogisticRegression

    # lbfgs on more than two classes is the multinomial (softmax) model.
    return LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, class_weight=None, random_state=seed)


class EmotionJudge:
    """A fitted emotion classifier: TF-IDF (word 1-2 grams, sublinear tf, ``min_df``, lowercase) +
    multinomial ``LogisticRegression`` (lbfgs, ``C`` = :data:`JUDGE_C`, ``max_iter`` 1000, no class
    weights, ``random_state`` = the seed).

    ``labels``: the class order of :meth:`predict_proba`'s columns (sorted label names). ``meta``: a JSON
    dict stored with the judge: ``judge_version``, ``seed``, ``n_train``, ``train_label_counts``,
    ``majority_label`` (the most frequent training label, used by :func:`judge_metrics` for the
    majority-class baseline), ``train_checksum``, ``fit_seconds``, ``n_iter``; :func:`load_judge` adds
    ``data_checksum`` (its cache key) and ``metrics`` (test-split metrics). Build one with
    :func:`fit_judge`, :func:`load_judge` or :meth:`load`.
    """

    def __init__(self, vectorizer, classifier, params: dict, meta: Optional[dict] = None):
        self.vectorizer = vectorizer
        self.classifier = classifier
        self.params = dict(params)
        self.meta = dict(meta or {})
        self.labels: list[str] = [str(c) for c in classifier.classes_]

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """Probability of each label for each text: (n_texts, n_labels) float64, rows sum to 1, columns in
        the order of ``labels``. An empty list gives a (0, n_labels) array. Raises ``JudgeError`` if
        ``texts`` is a single string or holds a non-string."""
        texts = _texts(texts)
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float64)
        return np.asarray(self.classifier.predict_proba(self.vectorizer.transform(texts)), dtype=np.float64)

    def predict(self, texts: list[str]) -> list[str]:
        """The most probable label of each text (ties: the first in ``labels``)."""
        proba = self.predict_proba(texts)
        return [self.labels[i] for i in proba.argmax(axis=1)]

    def save(self, path: PathLike) -> None:
        """Write the judge to one ``.npz`` file (compressed ``np.savez``, no pickled objects), atomically
        (:func:`layout.atomic_path`: readers and concurrent writers see a whole file, the last writer's).

        Arrays: ``vocabulary`` (unicode, term of each feature column), ``idf`` (n_features,), ``coef``
        (n_classes or 1, n_features), ``intercept``, ``labels`` (unicode), ``params`` (JSON of the
        hyper-parameters), ``meta`` (JSON of :attr:`meta`), ``kind`` and ``format``. Raises ``OSError``.
        """
        vocab = self.vectorizer.vocabulary_
        terms = np.empty(len(vocab), dtype=object)
        for term, col in vocab.items():
            terms[col] = term
        arrays = {
            "kind": np.array(FILE_KIND),
            "format": np.array(FILE_FORMAT, dtype=np.int64),
            "vocabulary": np.array(terms.tolist(), dtype=np.str_),
            "idf": np.asarray(self.vectorizer.idf_, dtype=np.float64),
            "coef": np.asarray(self.classifier.coef_, dtype=np.float64),
            "intercept": np.asarray(self.classifier.intercept_, dtype=np.float64),
            "labels": np.array(self.labels, dtype=np.str_),
            "params": np.array(json.dumps(self.params, sort_keys=True)),
            "meta": np.array(json.dumps(self.meta, sort_keys=True)),
        }
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to the tmp name
                np.savez_compressed(fh, **arrays)

    @classmethod
    def load(cls, path: PathLike) -> "EmotionJudge":
        """Read a judge written by :meth:`save` (``np.load(allow_pickle=False)``) and rebuild its
        ``TfidfVectorizer`` (fixed vocabulary + ``idf_``) and ``LogisticRegression`` (``coef_``,
        ``intercept_``, ``classes_``). Raises ``JudgeError`` (one line) for a missing, truncated, foreign
        or inconsistent file."""
        path = Path(path)
        try:
            z = np.load(path, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise JudgeError(f"{path} is a single .npy array, not an irm_hpc judge file; delete it, or pass a "
                                 "file written by EmotionJudge.save")
            with z:
                missing = [k for k in _ARRAYS if k not in z.files]
                if missing:
                    raise JudgeError(f"{path} is not an irm_hpc judge file (no {', '.join(missing)} array); "
                                     "delete it, or pass a file written by EmotionJudge.save")
                a = {k: z[k] for k in _ARRAYS}
        except FileNotFoundError:
            raise JudgeError(f"judge file not found: {path}; fit one with irm_hpc.judge.load_judge") from None
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
            if isinstance(exc, JudgeError):
                raise
            if isinstance(exc, ValueError) and "pickle" in str(exc):
                raise JudgeError(f"{path} is not a judge file (it is not an .npz archive, or holds pickled data, "
                                 "which irm_hpc never loads); delete it (load_judge fits a new one)") from None
            raise JudgeError(f"cannot read judge file {path} ({one_line(exc, with_type=True)[:160]}); "
                             "delete it (load_judge fits a new one)") from None
        return cls._from_arrays(path, a)

    @classmethod
    def _from_arrays(cls, path: Path, a: dict) -> "EmotionJudge":
        def bad(what: str) -> JudgeError:
            return JudgeError(f"judge file {path} is damaged or foreign ({what}); delete it (load_judge fits "
                              "a new one)")

        if a["kind"].shape != () or str(a["kind"]) != FILE_KIND:
            raise bad(f"kind {str(a['kind'])[:40]!r}, expected {FILE_KIND!r}")
        if a["format"].shape != () or a["format"].dtype.kind not in "iu" or int(a["format"]) != FILE_FORMAT:
            raise JudgeError(f"judge file {path} has format {a['format'].tolist()!r}, this irm_hpc reads format "
                             f"{FILE_FORMAT}; delete it (load_judge fits a new one)")
        try:
            params = json.loads(str(a["params"]))
            meta = json.loads(str(a["meta"]))
        except ValueError:
            raise bad("params/meta are not JSON") from None
        if not isinstance(params, dict) or not isinstance(meta, dict):
            raise bad("params/meta are not JSON objects")
        vocab, labels, idf, coef, intercept = a["vocabulary"], a["labels"], a["idf"], a["coef"], a["intercept"]
        if vocab.ndim != 1 or vocab.dtype.kind != "U" or not len(vocab) or len(set(vocab.tolist())) != len(vocab):
            raise bad("vocabulary is not a 1-D array of distinct strings")
        n_feat = len(vocab)
        if labels.ndim != 1 or labels.dtype.kind != "U" or len(labels) < 2 \
                or labels.tolist() != sorted(set(labels.tolist())):
            raise bad("labels are not at least 2 sorted distinct strings")
        rows = 1 if len(labels) == 2 else len(labels)
        expected = (("idf", idf, (n_feat,)), ("coef", coef, (rows, n_feat)), ("intercept", intercept, (rows,)))
        for name, arr, shape in expected:
            if arr.shape != shape or arr.dtype.kind != "f" or not np.isfinite(arr).all():
                raise bad(f"{name} has shape {arr.shape} dtype {arr.dtype}, expected finite floats of shape {shape}")
        try:
            min_df = int(params["min_df"])
            C, max_iter, seed = float(params["C"]), int(params["max_iter"]), int(params["seed"])
            if [int(x) for x in params["ngram_range"]] != list(NGRAM_RANGE) or params.get("sublinear_tf") is not True \
                    or params.get("lowercase") is not True:
                raise ValueError("features differ")
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"hyper-parameters {one_line(exc)[:80]}") from None
        vec = _vectorizer(min_df, vocabulary={t: i for i, t in enumerate(vocab.tolist())})
        vec.idf_ = idf.astype(np.float64)  # also fits the fixed vocabulary (TfidfVectorizer.idf_ setter)
        clf = _classifier(C, max_iter, seed)
        clf.classes_ = labels.astype(np.str_)
        clf.coef_ = coef.astype(np.float64)
        clf.intercept_ = intercept.astype(np.float64)
        clf.n_features_in_ = n_feat
        return cls(vec, clf, params, meta)


def _texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise JudgeError("texts must be a list of strings, not one string; pass [text]")
    texts = list(texts)
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise JudgeError(f"texts must be strings, got a {type(bad).__name__}; decode the texts first")
    return texts


def _check_rows(rows, what: str) -> tuple[list[str], list[str]]:
    rows = list(rows)
    if not rows:
        raise JudgeError(f"no {what} rows; the judge needs (text, label) rows: check the data split")
    for row in rows:
        if not (isinstance(row, (tuple, list)) and len(row) == 2 and all(isinstance(x, str) for x in row)):
            raise JudgeError(f"{what} rows must be (text, label) string pairs, got {str(row)[:60]!r}; "
                             "use split_rows to read them")
    return [t for t, _ in rows], [lab for _, lab in rows]


def majority_label(labels: list[str]) -> str:
    """The most frequent label (ties: the first in sorted order)."""
    counts = Counter(labels)
    return min(counts, key=lambda lab: (-counts[lab], lab))


def fit_judge(rows: list[tuple[str, str]], seed: int = 0, *, min_df: int = DEFAULT_MIN_DF) -> EmotionJudge:
    """Fit an :class:`EmotionJudge` on ``(text, label)`` rows (the training split).

    ``seed`` is the classifier's ``random_state`` (lbfgs itself is deterministic); ``min_df``: a term
    must occur in at least this many texts (2; 1 for a handful of hand-made rows). Takes 7-9 s on the
    39,555 single-label GoEmotions train rows (one CPU core, 53,456 features). Raises ``JudgeError`` for no rows, rows
    that are not string pairs, fewer than two distinct labels, or no term left after ``min_df``.
    Source: scikit-learn ``TfidfVectorizer`` + ``LogisticRegression``.
    """
    from threadpoolctl import threadpool_limits

    texts, labels = _check_rows(rows, "training")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise JudgeError(f"training rows have one label ({classes[0]!r}); the judge needs at least two: check "
                         "the data split")
    if int(min_df) < 1:
        raise JudgeError(f"min_df={min_df} must be >= 1; pass min_df=1 or more")
    params = {"judge_version": JUDGE_VERSION, "ngram_range": list(NGRAM_RANGE), "sublinear_tf": True,
              "lowercase": True, "min_df": int(min_df), "C": JUDGE_C, "max_iter": JUDGE_MAX_ITER,
              "seed": int(seed)}
    t0 = time.perf_counter()
    vec = _vectorizer(int(min_df))
    try:
        x = vec.fit_transform(texts)
    except ValueError as exc:  # "empty vocabulary", "After pruning, no terms remain"
        raise JudgeError(f"no features from {len(texts)} training texts ({one_line(exc)[:100]}); lower min_df "
                         "or add texts") from None
    clf = _classifier(JUDGE_C, JUDGE_MAX_ITER, int(seed))
    with threadpool_limits(limits=1):  # sparse lbfgs gains nothing from BLAS threads; oversubscription costs ~8x
        clf.fit(x, labels)
    fit_seconds = time.perf_counter() - t0
    counts = Counter(labels)
    meta = {"judge_version": JUDGE_VERSION, "seed": int(seed), "n_train": len(texts),
            "train_label_counts": {lab: counts[lab] for lab in classes}, "majority_label": majority_label(labels),
            "train_checksum": rows_checksum(list(zip(texts, labels))), "n_features": int(x.shape[1]),
            "n_iter": int(np.max(clf.n_iter_)), "fit_seconds": round(fit_seconds, 3)}
    return EmotionJudge(vec, clf, params, meta)


def judge_metrics(judge: EmotionJudge, rows: list[tuple[str, str]], majority: Optional[str] = None) -> dict:
    """Accuracy and F1 of ``judge`` on ``(text, label)`` rows, beside the majority-class baseline.

    Returns ``{"n", "accuracy", "macro_f1", "per_class_f1": {label: f1}, "majority_label",
    "majority_accuracy", "majority_macro_f1"}``. F1 is averaged over all of ``judge.labels`` (a label
    never predicted nor present scores 0). The baseline predicts ``majority`` for every row; by default
    the judge's most frequent *training* label (``judge.meta["majority_label"]``). Raises ``JudgeError``
    for no rows, or labels the judge was not trained on. Source: ``sklearn.metrics`` (``accuracy_score``,
    ``f1_score``).
    """
    from sklearn.metrics import accuracy_score, f1_score

    texts, truth = _check_rows(rows, "evaluation")
    unknown = sorted(set(truth) - set(judge.labels))
    if unknown:
        raise JudgeError(f"evaluation rows have labels the judge was not trained on ({', '.join(unknown[:5])}; "
                         f"judge labels: {', '.join(judge.labels)}); evaluate on a split of the same dataset")
    majority = majority if majority is not None else judge.meta.get("majority_label")
    if majority not in judge.labels:
        raise JudgeError(f"majority label {majority!r} is not a judge label; pass majority=<one of "
                         f"{', '.join(judge.labels)}> (judge.meta has no majority_label)")
    pred = judge.predict(texts)
    base = [majority] * len(truth)
    kw = {"labels": judge.labels, "zero_division": 0}
    per_class = f1_score(truth, pred, average=None, **kw)
    return {
        "n": len(truth),
        "accuracy": float(accuracy_score(truth, pred)),
        "macro_f1": float(f1_score(truth, pred, average="macro", **kw)),
        "per_class_f1": {lab: float(f) for lab, f in zip(judge.labels, per_class)},
        "majority_label": majority,
        "majority_accuracy": float(accuracy_score(truth, base)),
        "majority_macro_f1": float(f1_score(truth, base, average="macro", **kw)),
    }


def rows_checksum(rows: list[tuple[str, str]]) -> str:
    """sha256 hex digest of ``(text, label)`` rows in order: each row JSON-encoded as ``[text, label]``
    plus a newline (JSON escapes newlines in strings, so the encoding is unambiguous)."""
    h = hashlib.sha256()
    for text, label in rows:
        h.update(json.dumps([text, label], ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n")
    return h.hexdigest()


def split_rows(data_cfg, split: str) -> list[tuple[str, str]]:
    """The ``(text, label)`` rows with exactly one label of ``split`` of the source ``data_cfg`` describes
    (a ``DataConfig``, e.g. ``cfg.data`` of :func:`irm_hpc.config.load_config`; it is copied, not changed).

    Read by :func:`irm_hpc.data.read_rows` (so ``data.label_map`` applies); multi-label rows are dropped
    whatever ``data.single_label_only`` says. Raises ``DataError`` (from ``read_rows``) for a missing split
    or unreadable data.
    """
    from omegaconf import OmegaConf

    from irm_hpc.data import read_rows

    cfg = OmegaConf.create(OmegaConf.to_container(data_cfg, resolve=True))
    cfg.split = split
    return [(text, labels[0]) for text, labels in read_rows(cfg) if len(labels) == 1]


def judge_cache_dir() -> Path:
    """``$IRM_HPC_CACHE/judge`` (default ``~/.cache/irm_hpc/judge``), where :func:`load_judge` keeps judges."""
    return cache_root() / "judge"


def _warn(msg: str) -> None:
    print(f"irm_hpc.judge: warning: {msg}", file=sys.stderr, flush=True)


def load_judge(data_cfg, *, train_split: str = "train", test_split: str = "test",
               cache_dir: Optional[PathLike] = None, seed: int = 0) -> tuple[EmotionJudge, dict]:
    """The judge fitted on ``train_split`` of ``data_cfg`` (:func:`split_rows`), from the cache or fitted
    now, and its metrics on ``test_split``.

    Returns ``(judge, metrics)``: :func:`judge_metrics` on the test rows plus ``train_split``,
    ``test_split``, ``n_train``, ``data_checksum`` (the cache key), ``cached`` (loaded from the cache) and
    ``fit_seconds`` (of the fit that made the judge, stored with it: on a cache hit, the original fit's).

    Cache: ``<cache_dir>/judge-<data_checksum[:16]>.npz``, ``cache_dir`` defaulting to
    :func:`judge_cache_dir`; ``data_checksum`` is a sha256 over :data:`JUDGE_VERSION`, the seed and
    :func:`rows_checksum` of the train and of the test rows, so changed data or a new judge version fits
    anew. The directory is created private (mode 0700) and checked by ``layout.check_private`` before
    anything is loaded from it. A cache file that cannot be loaded (or belongs to other rows) is reported
    by a one-line warning on stderr and replaced by a fresh fit. Concurrent jobs may write the same file:
    each write is atomic, the last one stays. Raises ``DataError`` (reading a split), ``JudgeError``
    (unusable rows, or a test split that is mostly the train split: a single-file table ignores
    ``data.split``), ``UnsafePathError`` (a cache directory or file others can write to), ``OSError``.
    """
    train = split_rows(data_cfg, train_split)
    test = split_rows(data_cfg, test_split)
    overlap = {t for t, _ in test} & {t for t, _ in train}
    if len(overlap) > 0.5 * len(test):
        raise JudgeError(f"data '{data_cfg.path}' has no separate '{test_split}' split ({len(overlap)} of {len(test)} "
                         f"test texts are also in '{train_split}'; a single-file table ignores data.split): the judge "
                         "would be scored on its own training texts; evaluate runs on data with train/test splits "
                         "(data=goemotions_ekman) or set sweep.evaluation.enabled=false")
    checksum = hashlib.sha256(json.dumps({
        "judge_version": JUDGE_VERSION, "seed": int(seed),
        "train": rows_checksum(train), "test": rows_checksum(test)}, sort_keys=True).encode()).hexdigest()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else judge_cache_dir()
    make_private_dir(cache, exist_ok=True)
    check_private(cache)
    path = cache / f"judge-{checksum[:16]}.npz"
    check_private(path)
    judge, cached = None, False
    if path.is_file():
        try:
            judge = EmotionJudge.load(path)
            if judge.meta.get("data_checksum") != checksum or not isinstance(judge.meta.get("metrics"), dict):
                raise JudgeError(f"judge file {path} was made from other rows (checksum "
                                 f"{str(judge.meta.get('data_checksum'))[:16]}); it is replaced")
            cached = True
        except JudgeError as exc:
            _warn(f"{one_line(exc)}; fitting a new judge")
            judge = None
    if judge is None:
        judge = fit_judge(train, seed)
        metrics = judge_metrics(judge, test)
        metrics.update(train_split=train_split, test_split=test_split, n_train=len(train),
                       data_checksum=checksum)
        judge.meta.update(data_checksum=checksum, test_checksum=rows_checksum(test), metrics=metrics)
        judge.save(path)
    metrics = dict(judge.meta["metrics"])
    metrics.update(train_split=train_split, test_split=test_split, cached=cached,
                   fit_seconds=float(judge.meta.get("fit_seconds", 0.0)))
    return judge, metrics

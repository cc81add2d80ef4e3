"""Record schema: constants, `RecordError`, `RunMeta` / root attributes, compression filters and the dataset
layout (`_Layout`), and opening a record file with its schema checked (`_open_h5`, `_read_ds`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import h5py
import numpy as np

from irm_hpc.errors import IrmError, one_line

try:  # registers the Zstd / Blosc / Bitshuffle HDF5 filters with h5py (needed to write AND read them)
    import hdf5plugin
except ImportError:  # gzip / lzf / None still work; plugin compressions raise a ValueError naming the fix
    hdf5plugin = None

from irm_hpc import __version__
from irm_hpc.layout import INJECTIONS, RECORD_DIR, RECORD_INDEX, RECORD_RUN_FILE, RECORD_SEG_GLOB
from irm_hpc.record._util import _h5_open

SCHEMA_VERSION = 1
# File names of the run-dir layout: defined in irm_hpc.layout, aliased here for the record API.
FINAL_NAME = INJECTIONS
RECORD_DIRNAME = RECORD_DIR
INDEX_NAME = RECORD_INDEX
RUN_FILE = RECORD_RUN_FILE
SEG_GLOB = RECORD_SEG_GLOB
DTYPES = ("float16", "float32")
COMPRESSIONS = ("zstd", "zstd-<1..22>", "gzip", "gzip-<0..9>", "lzf", "blosc-lz4", "blosc-zstd",
                "blosc-<lz4|zstd>-<1..9>", "bitshuffle-lz4", "bitshuffle-zstd", None)
DEFAULT_COMPRESSION = "zstd"  # shuffle + Zstd level 1: >= 100x faster and >= 10x smaller than CSV (docs)
GZIP_LEVEL = 1  # measured in benchmarks/bench_record.py: level 1 ~ same ratio as 4, faster (docs)
ZSTD_LEVEL = 1  # measured: level 1 ~ same ratio as 2-3 on float16 (Huffman-bound), fastest
BLOSC_LEVEL = {"lz4": 5, "zstd": 1}  # Blosc clevel c runs zstd at level 2c-1, so zstd starts low
PLUGIN_FILTER_IDS = {32015: "zstd", 32001: "blosc", 32026: "blosc2", 32008: "bitshuffle", 32004: "lz4"}
CHUNK_TARGET_BYTES = 1 << 20  # probe/injection chunks hold a power of two of rows, <= 1 MiB
COLUMN_CHUNK = 4096  # rows per chunk of the 1-D probe columns
PROFILE_COLUMN_CHUNK = 1024  # rows per chunk of profiles/step and profiles/n_tokens
RDCC_BYTES = 32 << 20  # writer chunk cache (bytes): keeps partially filled chunks in memory
LIBVER = ("v110", "v110")  # readable by HDF5 >= 1.10; extensible-array chunk index for appends
STR_DTYPE = h5py.string_dtype("utf-8")

PROFILE_COLUMNS: dict[str, Any] = {"step": np.int64, "n_tokens": np.int64}
PROBE_COLUMNS: dict[str, Any] = {"step": np.int64, "probe_index": np.int32, "position": np.int32,
                                 "token_id": np.int64, "is_generated": np.bool_, "token_text": STR_DTYPE}
META_REQUIRED = ("model_name", "hidden_size", "n_layers", "injection_layers", "alignment", "seed", "config_yaml")
META_DEFAULTS = {"package_version": __version__, "git_commit": ""}

PathLike = Union[str, Path]


class RecordError(IrmError, RuntimeError):
    """A record file/dir cannot be written or read; one-line message naming the file, problem and fix."""


# ----------------------------------------------------------------------------- metadata
@dataclass
class RunMeta:
    """Root attributes of a record file (see docs/architecture.md)."""

    schema_version: int
    model_name: str
    hidden_size: int
    n_layers: int
    injection_layers: list[int]
    alignment: str
    seed: int
    config_yaml: str
    package_version: str
    git_commit: str
    dtype: str
    finalized: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def n_inj(self) -> int:
        return len(self.injection_layers)

    @classmethod
    def from_attrs(cls, attrs: h5py.AttributeManager, path: Path) -> "RunMeta":
        """Build from root attributes. Raises RecordError naming ``path`` and the attribute if one is
        missing or of the wrong type/value (e.g. ``hidden_size="x"``, non-integer ``injection_layers``,
        a layer outside ``[0, n_layers)``, ``extra_meta`` that is not a JSON object)."""
        def get(key: str) -> Any:
            if key not in attrs:
                raise RecordError(f"{path}: root attribute '{key}' is missing; "
                                  "the file is not a complete irm_hpc record")
            try:
                value = attrs[key]
            except (OSError, TypeError, ValueError) as exc:  # an attribute h5py cannot decode
                raise RecordError(f"{path}: root attribute '{key}' cannot be read ({one_line(exc, with_type=True)}); "
                                  "the file is damaged or not an irm_hpc record") from None
            return value.decode(errors="replace") if isinstance(value, bytes) else value

        def bad(key: str, value: Any, expected: str) -> RecordError:
            shown = repr(value if not isinstance(value, np.ndarray) else value.tolist())
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            return RecordError(f"{path}: root attribute '{key}' is {shown}, not {expected}; the file is damaged "
                               "or not an irm_hpc record")

        def integer(key: str, low: Optional[int] = None) -> int:
            value = get(key)
            if isinstance(value, np.ndarray) and value.shape == ():
                value = value[()]
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
                    or (low is not None and value < low):
                raise bad(key, value, "an integer" + (f" >= {low}" if low is not None else ""))
            return int(value)

        def text(key: str, choices: Optional[tuple] = None) -> str:
            value = get(key)
            if not isinstance(value, str) or (choices is not None and value not in choices):
                raise bad(key, value, "a string" if choices is None else f"one of {', '.join(choices)}")
            return value

        n_layers = integer("n_layers", 1)
        layers_raw = get("injection_layers")
        layers_arr = np.atleast_1d(np.asarray(layers_raw)) if not isinstance(layers_raw, str) else None
        if layers_arr is None or layers_arr.ndim != 1 or not len(layers_arr) or layers_arr.dtype.kind not in "iu" \
                or not all(0 <= int(v) < n_layers for v in layers_arr):
            raise bad("injection_layers", layers_raw, f"a list of layer indices in [0, n_layers={n_layers})")
        finalized = attrs.get("finalized", False)
        if not isinstance(finalized, (bool, np.bool_, int, np.integer)):
            raise bad("finalized", finalized, "a boolean")
        extra_raw = attrs.get("extra_meta", "{}")
        try:
            extra = json.loads(extra_raw.decode() if isinstance(extra_raw, bytes) else extra_raw)
        except (TypeError, ValueError):
            extra = None
        if not isinstance(extra, dict):
            raise bad("extra_meta", extra_raw, "a JSON object")
        return cls(schema_version=integer("schema_version"), model_name=text("model_name"),
                   hidden_size=integer("hidden_size", 1), n_layers=n_layers,
                   injection_layers=[int(v) for v in layers_arr], alignment=text("alignment"),
                   seed=integer("seed"), config_yaml=text("config_yaml"), package_version=text("package_version"),
                   git_commit=text("git_commit"), dtype=text("dtype", DTYPES), finalized=bool(finalized), extra=extra)


def _normalize_meta(meta: dict, n_inj: int, hidden: int, dtype: str) -> dict:
    """Validate the caller's meta dict; return the root attributes to write. Raises ValueError."""
    missing = [k for k in META_REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"RunRecorder meta is missing {missing}; required keys: {list(META_REQUIRED)}")
    out = {**META_DEFAULTS, **{k: v for k, v in meta.items() if k in META_REQUIRED or k in META_DEFAULTS}}
    layers = [int(v) for v in out["injection_layers"]]
    if len(layers) != n_inj or layers != sorted(set(layers)) or not all(0 <= v < int(out["n_layers"]) for v in layers):
        raise ValueError(f"meta injection_layers={layers} must be {n_inj} (n_inj) ascending distinct layer "
                         f"indices in [0, n_layers={out['n_layers']})")
    if int(out["hidden_size"]) != hidden:
        raise ValueError(f"meta hidden_size={out['hidden_size']} != hidden={hidden}")
    extra = {k: v for k, v in meta.items() if k not in out}
    attrs = {"schema_version": SCHEMA_VERSION, "model_name": str(out["model_name"]),
             "hidden_size": int(out["hidden_size"]), "n_layers": int(out["n_layers"]),
             "injection_layers": np.asarray(layers, dtype=np.int64), "alignment": str(out["alignment"]),
             "seed": int(out["seed"]), "config_yaml": str(out["config_yaml"]),
             "package_version": str(out["package_version"]), "git_commit": str(out["git_commit"] or ""),
             "dtype": dtype}
    if extra:
        attrs["extra_meta"] = json.dumps(extra, default=str)
    return attrs


def _write_attrs(f: h5py.File, attrs: dict, *, finalized: bool) -> None:
    for key, value in attrs.items():
        f.attrs[key] = value
    f.attrs["finalized"] = finalized


# ----------------------------------------------------------------------------- layout
def _parse_compression(compression: Optional[str]) -> tuple[Optional[str], Optional[int]]:
    """Compression name -> (filter, level). Raises ValueError naming the accepted values.

    ``None``/'none' -> (None, None); 'gzip' | 'gzip-<0..9>' -> ('gzip', level); 'lzf' -> ('lzf', None);
    'zstd' | 'zstd-<1..22>' -> ('zstd', level); 'blosc-lz4' | 'blosc-zstd' [-<1..9>] -> ('blosc-lz4', clevel)
    etc.; 'bitshuffle-lz4' -> ('bitshuffle-lz4', None); 'bitshuffle-zstd' [-<1..22>] -> (.., level).
    """
    if compression in (None, "", "none", "None"):
        return None, None
    if not isinstance(compression, str):
        raise ValueError(f"compression={compression!r} must be a string or None")
    head, _, tail = compression.rpartition("-")
    base, level = (head, int(tail)) if head and tail.isdigit() else (compression, None)
    ranges = {"gzip": (0, 9, GZIP_LEVEL), "lzf": None, "zstd": (1, 22, ZSTD_LEVEL),
              "blosc-lz4": (1, 9, BLOSC_LEVEL["lz4"]), "blosc-zstd": (1, 9, BLOSC_LEVEL["zstd"]),
              "bitshuffle-lz4": None, "bitshuffle-zstd": (1, 22, ZSTD_LEVEL)}
    spec = ranges.get(base, False)
    ok = spec is not False and (level is None or (spec is not None and spec[0] <= level <= spec[1]))
    if not ok:
        raise ValueError(f"compression={compression!r}; use 'zstd' (default), 'zstd-<1..22>', 'gzip', "
                         "'gzip-<0..9>', 'lzf', 'blosc-lz4', 'blosc-zstd' (optionally -<clevel 1..9>), "
                         "'bitshuffle-lz4', 'bitshuffle-zstd' or None")
    if base not in ("gzip", "lzf") and hdf5plugin is None:
        raise ValueError(f"compression={compression!r} needs the hdf5plugin package (pip install hdf5plugin); "
                         "or use 'gzip', 'lzf' or None")
    return base, (level if level is not None else (spec[2] if spec else None))


def _filter_kwargs(compression: Optional[str]) -> dict:
    """create_dataset keyword arguments of the filter pipeline of ``compression`` (see _parse_compression).

    Byte shuffle precedes gzip, lzf and zstd; Blosc and Bitshuffle bit-shuffle internally."""
    name, level = _parse_compression(compression)
    if name is None:
        return {}
    if name in ("gzip", "lzf"):
        return {"compression": name, "compression_opts": level, "shuffle": True}
    if name == "zstd":  # cd_values = (level,): the HDF5 Zstd filter's format, any hdf5plugin version
        return {"compression": hdf5plugin.ZSTD_ID, "compression_opts": (level,), "shuffle": True}
    if name.startswith("blosc-"):
        return dict(hdf5plugin.Blosc(cname=name[6:], clevel=level, shuffle=hdf5plugin.Blosc.BITSHUFFLE))
    cname = name.split("-")[1]
    return dict(hdf5plugin.Bitshuffle(cname=cname, **({"clevel": level} if level is not None else {})))


@dataclass(frozen=True)
class _Layout:
    """Dataset shapes, dtypes, chunking and filters of one record file."""

    n_inj: int
    hidden: int
    dtype: str
    compression: Optional[str]

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def row_bytes(self) -> int:
        """Bytes of one (n_inj, hidden) record."""
        return self.n_inj * self.hidden * self.np_dtype.itemsize

    @property
    def chunk_rows(self) -> int:
        """Rows per probe/injection chunk: largest power of two with chunk <= CHUNK_TARGET_BYTES, in [1, 1024]."""
        rows = min(max(1, CHUNK_TARGET_BYTES // self.row_bytes), 1024)
        return 1 << (rows.bit_length() - 1)

    def filters(self, *, vlen: bool = False) -> dict:
        """Filter keyword arguments for a dataset; ``vlen`` (variable-length strings): a plugin filter is
        replaced by gzip-1 + shuffle (Blosc crashes on vlen data; the strings live in the heap anyway)."""
        name, _ = _parse_compression(self.compression)
        if vlen and name not in (None, "gzip", "lzf"):
            return _filter_kwargs("gzip")
        return _filter_kwargs(self.compression)

    def create(self, f: h5py.File) -> None:
        """Create every (empty, resizable) profile and probe dataset in ``f``."""
        filt, tail = self.filters(), (self.n_inj, self.hidden)
        for name, dt in PROFILE_COLUMNS.items():
            f.create_dataset(f"profiles/{name}", (0,), dt, maxshape=(None,), chunks=(PROFILE_COLUMN_CHUNK,), **filt)
        for name in ("mean_abs", "mean"):
            f.create_dataset(f"profiles/{name}", (0, *tail), self.np_dtype, maxshape=(None, *tail),
                             chunks=(1, *tail), **filt)
        for name, dt in PROBE_COLUMNS.items():
            f.create_dataset(f"probe/{name}", (0,), dt, maxshape=(None,), chunks=(COLUMN_CHUNK,),
                             **self.filters(vlen=dt is STR_DTYPE))
        f.create_dataset("probe/injection", (0, *tail), self.np_dtype, maxshape=(None, *tail),
                         chunks=(self.chunk_rows, *tail), **filt)

    def as_dict(self) -> dict:
        return {"n_inj": self.n_inj, "hidden": self.hidden, "dtype": self.dtype}


def _append(ds: h5py.Dataset, data: Any) -> None:
    """Grow ``ds`` along axis 0 by len(data) rows and write them."""
    n0 = ds.shape[0]
    ds.resize(n0 + len(data), axis=0)
    ds[n0:] = data


# ----------------------------------------------------------------------------- opening / reading files
DATA_DATASETS = tuple(f"profiles/{n}" for n in (*PROFILE_COLUMNS, "mean_abs", "mean")) + \
    tuple(f"probe/{n}" for n in (*PROBE_COLUMNS, "injection"))


def _open_h5(path: Path, *, data: bool = False) -> h5py.File:
    """Open an irm_hpc record file read-only and check its schema version (and datasets if ``data``).

    Raises RecordError: missing path, not HDF5, truncated/damaged, not an irm_hpc record, other schema.
    """
    if not path.exists():
        raise RecordError(f"{path}: no such file; pass a run dir, its injections.h5 or its record/ dir")
    if not h5py.is_hdf5(path):
        raise RecordError(f"{path}: not an HDF5 file; pass a run dir, its injections.h5 or its record/ dir")
    try:
        f = _h5_open(path, "r")
    except OSError as exc:
        raise RecordError(f"{path}: cannot open the HDF5 file, it is truncated, damaged or still open for "
                          f"writing ({one_line(exc, with_type=True)}); re-run finalize from record/ or restore the file") from exc
    try:
        _check_schema(f, path, data)
    except RecordError:
        f.close()
        raise
    except (KeyError, OSError, ValueError, TypeError, RuntimeError) as exc:  # h5py on damaged metadata
        f.close()
        raise RecordError(f"{path}: the file is damaged ({one_line(exc, with_type=True)}); re-run finalize from "
                          "record/ or restore the file") from exc
    except BaseException:
        f.close()
        raise
    return f


def _check_schema(f: h5py.File, path: Path, data: bool) -> None:
    try:
        version = f.attrs.get("schema_version")
    except (OSError, TypeError, ValueError) as exc:
        raise RecordError(f"{path}: root attribute 'schema_version' cannot be read ({one_line(exc, with_type=True)}); "
                          "the file is damaged or not an irm_hpc record") from None
    if version is None:
        raise RecordError(f"{path}: not an irm_hpc record (no 'schema_version' root attribute)")
    if isinstance(version, np.ndarray) and version.shape == ():
        version = version[()]
    if isinstance(version, (bool, np.bool_)) or not isinstance(version, (int, np.integer)):
        shown = repr(version)[:60]
        raise RecordError(f"{path}: root attribute 'schema_version' is {shown}, not an integer; the file is damaged "
                          "or not an irm_hpc record")
    if int(version) != SCHEMA_VERSION:
        raise RecordError(f"{path}: schema version {int(version)}, this irm_hpc ({__version__}) reads version "
                          f"{SCHEMA_VERSION}; read it with the irm_hpc version that wrote it "
                          f"(package_version={f.attrs.get('package_version', '?')})")
    missing = [name for name in DATA_DATASETS if name not in f] if data else []
    if missing:
        raise RecordError(f"{path}: datasets {missing} are missing; the file is not a complete irm_hpc record")


def _read_ds(ds: h5py.Dataset, sel: Any = ()) -> Any:
    """Read ``ds[sel]`` (str datasets decoded); RecordError naming the file on I/O failure."""
    try:
        if h5py.check_string_dtype(ds.dtype) is not None:
            return ds.asstr()[sel]
        return ds[sel]
    except (OSError, KeyError, RuntimeError) as exc:  # KeyError/RuntimeError: h5py on damaged metadata
        if "filter" in str(exc).lower() or "plugin" in str(exc).lower():
            fix = ("its compression filter is not available; pip install hdf5plugin (irm_hpc.record "
                   "imports it; plain h5py readers must `import hdf5plugin` first)")
        else:
            fix = "the file is damaged or truncated"
        raise RecordError(f"{ds.file.filename}: reading {ds.name} failed ({one_line(exc, with_type=True)}); {fix}") from exc

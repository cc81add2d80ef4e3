"""HDF5 stream of IRM injections: background writer (`RunRecorder`) and lazy reader (`open_run`).

Schema, chunking, compression and the crash-safety rules are documented in ``docs/architecture.md``
("HDF5 schema (version 1)"). In short:

* While training, rank 0 appends records into segment files ``record/seg-<first_step:08d>.h5``.
  ``checkpoint(step)`` closes and fsyncs the open segment and lists it in ``record/index.json``
  (written atomically). Only listed ("completed") segments are trusted; after a crash the open
  segment is discarded by ``resume(step)``, which also drops every record with a step > ``step``.
* ``finalize(path)`` merges the completed segments and ``record/run.h5`` (prompts, base reference)
  into one ``injections.h5`` (tmp file + ``os.replace``, `irm_hpc.layout.atomic_path`).
* ``open_run(path)`` reads a run dir, an ``injections.h5`` or a ``record/`` dir lazily.
* ``python -m irm_hpc.record inspect RUN`` prints a summary.
* Default compression ``"zstd"`` (shuffle + Zstd level 1) is an HDF5 plugin filter from ``hdf5plugin``,
  imported here; plain h5py readers must ``import hdf5plugin`` first (``compression="gzip"`` gives
  files that any HDF5 tool reads).

Every problem with a file is reported as a one-line `RecordError` naming the file.

Modules: ``schema`` (constants, RecordError, RunMeta, compression, layout, schema-checked open),
``segments`` (index.json, segment files, truncate / merge), ``writer`` (RunRecorder), ``reader``
(LazyArray, ProbeTokens, RunReader, open_run), ``cli`` (``inspect``), ``_util`` (small helpers). File names
of the run dir (``FINAL_NAME``, ``RECORD_DIRNAME``, ``INDEX_NAME``, ``RUN_FILE``, ``SEG_GLOB``) are aliases of
`irm_hpc.layout`'s constants. Only the names in ``__all__`` are the public API; tests and benchmarks that
need internals import them from the defining submodule.
"""

from irm_hpc.record._util import TORCH_CAST_SLICE
from irm_hpc.record.cli import main
from irm_hpc.record.reader import LazyArray, ProbeTokens, RunReader, open_run
from irm_hpc.record.schema import (BLOSC_LEVEL, CHUNK_TARGET_BYTES, COLUMN_CHUNK, COMPRESSIONS, DATA_DATASETS,
                                   DEFAULT_COMPRESSION, DTYPES, FINAL_NAME, GZIP_LEVEL, INDEX_NAME, LIBVER,
                                   META_DEFAULTS, META_REQUIRED, PLUGIN_FILTER_IDS, PROBE_COLUMNS, PROFILE_COLUMN_CHUNK,
                                   PROFILE_COLUMNS, RDCC_BYTES, RECORD_DIRNAME, RUN_FILE, SCHEMA_VERSION, SEG_GLOB,
                                   STR_DTYPE, ZSTD_LEVEL, PathLike, RecordError, RunMeta)
from irm_hpc.record.writer import RunRecorder

__all__ = ["BLOSC_LEVEL", "CHUNK_TARGET_BYTES", "COLUMN_CHUNK", "COMPRESSIONS", "DATA_DATASETS", "DEFAULT_COMPRESSION",
           "DTYPES", "FINAL_NAME", "GZIP_LEVEL", "INDEX_NAME", "LIBVER", "META_DEFAULTS", "META_REQUIRED",
           "PLUGIN_FILTER_IDS", "PROBE_COLUMNS", "PROFILE_COLUMN_CHUNK", "PROFILE_COLUMNS", "RDCC_BYTES",
           "RECORD_DIRNAME", "RUN_FILE", "SCHEMA_VERSION", "SEG_GLOB", "STR_DTYPE", "TORCH_CAST_SLICE", "ZSTD_LEVEL",
           "LazyArray", "PathLike", "ProbeTokens", "RecordError", "RunMeta", "RunReader", "RunRecorder", "main",
           "open_run"]

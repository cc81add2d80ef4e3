"""Fuzzing the readers of user input with hypothesis (issue #13): config overrides (``load_config("train")``,
``python -m irm_hpc.train``, ``launch --dry-run``), the HDF5 record reader (``open_run``), the segment index
(``record/index.json``) and the sweep manifest (``load_manifest``, ``status.main``).

Every generated input must give an ``IrmError`` in process, or ``error: <one line>`` and exit 2 from an
entry point (exit 0 where the input happens to be valid), never another exception or a traceback, and
nothing may be written outside the example's temporary directory (its parent and the repository's top
level are compared before and after). Runs are reproducible (``derandomize=True``). The number of inputs
tried and their outcomes are printed at the end of the module and written to
``$IRM_HPC_FUZZ_COUNTS`` (default ``/tmp/irm_hpc_fuzz_counts.json``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import string
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from irm_hpc import launch, status, train
from irm_hpc.config import _valid_keys, load_config
from irm_hpc.errors import IrmError
from irm_hpc.manifest import load_manifest
from irm_hpc.record import RunRecorder, open_run

from conftest import REPO, make_tsv

FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
COUNTS: dict[str, Counter] = defaultdict(Counter)
COUNTS_FILE = Path(os.environ.get("IRM_HPC_FUZZ_COUNTS", "/tmp/irm_hpc_fuzz_counts.json"))


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    total = sum(sum(c.values()) for c in COUNTS.values())
    data = {"total_inputs": total, "by_target": {k: dict(sorted(v.items())) for k, v in sorted(COUNTS.items())}}
    COUNTS_FILE.write_text(json.dumps(data, indent=1) + "\n")
    print(f"\nfuzz: {total} inputs; " + "; ".join(f"{k}: {dict(v)}" for k, v in sorted(COUNTS.items())))


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    make_tsv(root / "align.tsv")
    return root


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@contextlib.contextmanager
def confined(root: Path):
    """A fresh temp dir under ``root``; asserts nothing appeared in ``root``'s parent or the repo's top level."""
    before = listing(root.parent), listing(REPO)
    d = Path(tempfile.mkdtemp(dir=root))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
        assert (listing(root.parent), listing(REPO)) == before, "a bad input wrote outside its temp dir"


def outcome(target: str, fn) -> object:
    """Call ``fn``; count ``ok`` or the IrmError subclass; any other exception fails the test."""
    try:
        result = fn()
    except IrmError as exc:
        msg = str(exc)
        assert msg and "\n" not in " ".join(msg.split("\n")[:1]) and "Traceback" not in msg
        COUNTS[target][type(exc).__name__] += 1
        return exc
    COUNTS[target]["ok"] += 1
    return result


def cli_outcome(target: str, main, argv: list[str]) -> int:
    """Run an entry point in process; exit 0, or 2 with exactly one ``error: ...`` line on stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    text = err.getvalue()
    assert "Traceback" not in text, text
    if code == 2:
        lines = [ln for ln in text.splitlines() if ln.startswith("error: ")]
        assert len(lines) == 1 and lines[0].strip() != "error:", text
        COUNTS[target]["exit 2, one-line error"] += 1
    else:
        assert code == 0, (code, text)
        COUNTS[target]["exit 0 (valid input)"] += 1
    return code


# ----------------------------------------------------------------------------- config overrides
_BASE = None


def train_keys() -> list[str]:
    global _BASE
    if _BASE is None:
        _BASE = _valid_keys(load_config("train", ["out_dir=/nonexistent/fuzz"]))
    return _BASE


SPECIAL_VALUES = ["null", "true", "false", "[]", "[1,2]", "[a, b]", "{a: 1}", "${oops}", "${irm_hpc_data:nope}",
                  "'", '"', "???", "nan", "inf", "-inf", "1e999", "-1", "0", "0.0", "-0.5", "1.5", "2**70",
                  "99999999999999999999", "''", "[", "}", "=", "a=b", "${train.lr}", "\\", "~", "+"]
values = st.one_of(st.integers(-10**9, 10**9).map(str), st.floats().map(repr), st.sampled_from(SPECIAL_VALUES),
                   st.text(string.printable, max_size=12), st.lists(st.integers(-5, 40), max_size=4).map(str))


def overrides(keys: list[str]):
    key = st.one_of(st.sampled_from(keys), st.sampled_from(keys).map(lambda k: "+" + k),
                    st.sampled_from(keys).map(lambda k: "~" + k), st.text(string.ascii_letters + "._+~-", max_size=12))
    pair = st.tuples(key, values).map(lambda kv: f"{kv[0]}={kv[1]}")
    return st.one_of(pair, pair, pair, st.text(string.printable, max_size=16))


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_fuzz_train_overrides(fuzz_root, data):
    """load_config("train") on 1-2 random overrides (after a valid tiny base): ConfigError or a config
    that passes validate_train_config; a rejected one gives exit 2 and one line from ``irm_hpc.train``."""
    extra = data.draw(st.lists(overrides(train_keys()), min_size=1, max_size=2))
    with confined(fuzz_root) as d:
        argv = ["model=tiny_random", "train=smoke", f"data.path={fuzz_root / 'align.tsv'}", f"out_dir={d / 'out'}",
                *extra]
        res = outcome("config: load_config('train')", lambda: load_config("train", argv))
        if isinstance(res, IrmError):  # the CLI stops at the same point: exit 2, one line, nothing written
            assert cli_outcome("config: python -m irm_hpc.train (rejected inputs)", train.main, argv) == 2
        assert not (d / "out").exists()


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_fuzz_launch_overrides_dry_run(fuzz_root, data):
    """``launch --sweep smoke --cluster local --dry-run`` with random task and launch overrides."""
    launch_keys = ["sweep.seeds", "sweep.alignments", "sweep.layer_sets", "sweep.train_overrides", "sweep.analysis",
                   "cluster.nodes", "cluster.timeout_min", "cluster.array_parallelism", "cluster.executor",
                   "cluster.analysis_runs_per_task", "cluster.mem_gb", "sweep.name"]
    extra = data.draw(st.lists(overrides(train_keys() + launch_keys), min_size=1, max_size=2))
    extra = [o for o in extra if not o.lstrip("+~").startswith("runs_root")]
    with confined(fuzz_root) as d:
        argv = ["--sweep", "smoke", "--cluster", "local", "--dry-run", f"runs_root={d}", *extra]
        cli_outcome("launch --dry-run", launch.main, argv)
        assert listing(d) == [], "a dry run writes nothing"


# ----------------------------------------------------------------------------- HDF5 record
META = {"model_name": "m", "hidden_size": 8, "n_layers": 3, "injection_layers": [0, 2], "alignment": "joy", "seed": 1,
        "config_yaml": "x: 1\n"}


@pytest.fixture(scope="module")
def good_record(fuzz_root) -> Path:
    rec = RunRecorder(fuzz_root / "good" / "record", META, n_inj=2, hidden=8, compression="gzip")
    rec.resume(-1)
    rec.set_prompts(["p", "q"])
    rec.set_base_reference(np.ones((3, 8), np.float32))
    for s in (0, 5, 10):
        rec.add_profile(s, np.ones((2, 8), np.float32), np.ones((2, 8), np.float32), 4)
        rec.checkpoint(s)
    rec.add_probe(10, np.ones((3, 2, 8), np.float32), np.arange(3), ["a", "b", "c"], 0, np.arange(3, dtype=np.int32),
                  np.arange(3) >= 1)
    rec.checkpoint(10)
    rec.close()
    shutil.copytree(fuzz_root / "good" / "record", fuzz_root / "good_segments")
    rec = RunRecorder(fuzz_root / "good" / "record", META, n_inj=2, hidden=8, compression="gzip")
    rec.resume(10)
    return rec.finalize(fuzz_root / "good" / "injections.h5")


def _read_all(path: Path) -> None:
    with open_run(path) as run:
        _ = run.meta, run.steps, run.profiles_abs[:], run.probe.step, run.prompts, len(run.probe)


h5_text = st.text(st.characters(blacklist_characters="\x00"), max_size=10)  # HDF5 strings hold no NUL
attr_values = st.one_of(st.integers(-2**40, 2**40), st.floats(), h5_text, st.booleans(),
                        st.lists(st.integers(-3, 9), min_size=0, max_size=4), st.lists(h5_text, min_size=1, max_size=3),
                        st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=3),
                        st.binary(max_size=8).filter(lambda b: b"\x00" not in b))  # h5py: no NUL in bytes either
ATTRS = ["schema_version", "model_name", "hidden_size", "n_layers", "injection_layers", "alignment", "seed",
         "config_yaml", "package_version", "git_commit", "dtype", "finalized", "extra_meta"]


@settings(FUZZ, max_examples=80)
@given(changes=st.lists(st.tuples(st.sampled_from(ATTRS), st.one_of(attr_values, st.none())), min_size=1, max_size=3))
def test_fuzz_record_attributes(fuzz_root, good_record, changes):
    """A valid injections.h5 with 1-3 root attributes replaced (random type/value) or deleted (None)."""
    with confined(fuzz_root) as d:
        path = d / "injections.h5"
        shutil.copy(good_record, path)
        with h5py.File(path, "a") as f:
            for key, value in changes:
                if value is None:
                    if key in f.attrs:
                        del f.attrs[key]
                else:
                    if isinstance(value, list) and value and isinstance(value[0], str):
                        value = np.array(value, dtype=h5py.string_dtype())
                    f.attrs[key] = np.asarray(value) if isinstance(value, list) else value
        outcome("record: open_run(injections.h5 with bad attributes)", lambda: _read_all(path))


@settings(FUZZ, max_examples=60)
@given(kind=st.sampled_from(["truncate", "flip", "random"]), cut=st.floats(0, 1), payload=st.binary(min_size=1, max_size=64))
def test_fuzz_record_file_bytes(fuzz_root, good_record, kind, cut, payload):
    """Truncated, byte-corrupted and random files passed to open_run."""
    data = good_record.read_bytes()
    with confined(fuzz_root) as d:
        path = d / "injections.h5"
        at = int(cut * (len(data) - 1))
        if kind == "truncate":
            path.write_bytes(data[:at])
        elif kind == "flip":
            path.write_bytes(data[:at] + payload + data[at + len(payload):])
        else:
            path.write_bytes(payload)
        outcome(f"record: open_run({kind} file)", lambda: _read_all(path))


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False),
                                     st.text(max_size=8)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=8)


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_fuzz_record_index_json(fuzz_root, good_record, data):
    """A segment dir whose index.json is random JSON, or the real index with one field replaced."""
    good_dir = fuzz_root / "good_segments"
    real = json.loads((good_dir / "index.json").read_text())
    if data.draw(st.booleans()):
        doc = data.draw(json_values)
    else:
        doc = dict(real)
        key = data.draw(st.sampled_from(sorted(real)))
        if data.draw(st.booleans()) and isinstance(doc[key], list) and doc[key]:
            items = list(doc[key])
            i = data.draw(st.integers(0, len(items) - 1))
            if isinstance(items[i], dict):
                items[i] = {**items[i], data.draw(st.sampled_from(sorted(items[i]))): data.draw(json_values)}
            else:
                items[i] = data.draw(json_values)
            doc[key] = items
        else:
            doc[key] = data.draw(json_values)
    with confined(fuzz_root) as d:
        rec_dir = d / "record"
        shutil.copytree(good_dir, rec_dir)
        (rec_dir / "index.json").write_text(json.dumps(doc))
        before = listing(rec_dir)
        outcome("record: open_run(record dir with bad index.json)", lambda: _read_all(rec_dir))
        assert listing(rec_dir) == before, "a reader must not change the record dir"


# ----------------------------------------------------------------------------- sweep manifest
GOOD_TASK = {"index": 0, "task_id": "anger-s0-all", "alignment": "anger", "seed": 0, "layer_set": "all",
             "out_dir": "runs/anger-s0-all", "overrides": ["alignment=anger"], "job_id": None, "state": "PLANNED",
             "submissions": []}
GOOD_MANIFEST = {"schema_version": 1, "sweep": "smoke", "executor": "local", "created": 1.0, "sweep_dir": "/x",
                 "config_yaml": "cluster:\n  name: local\n  executor: local\n", "config_dirs": [], "train_job_ids": [],
                 "analysis_job_ids": [], "tasks": [GOOD_TASK]}


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_fuzz_manifest(fuzz_root, data):
    """Random JSON documents and a valid manifest with one field (top level or task) replaced or deleted:
    load_manifest raises ManifestError or loads; ``status`` exits 0 or 2 with one line."""
    choice = data.draw(st.sampled_from(["random", "top", "task", "text"]))
    if choice == "random":
        text = json.dumps(data.draw(json_values))
    elif choice == "text":
        text = data.draw(st.text(max_size=40))
    else:
        doc = json.loads(json.dumps(GOOD_MANIFEST))
        obj = doc if choice == "top" else doc["tasks"][0]
        key = data.draw(st.sampled_from(sorted(obj)))
        if key == "executor" and choice == "top":
            obj[key] = data.draw(st.sampled_from(["local", "debug", "nope", 5]))  # never query a real Slurm
        elif data.draw(st.booleans()):
            obj[key] = data.draw(json_values)
        else:
            del obj[key]
        text = json.dumps(doc)
    with confined(fuzz_root) as d:
        (d / "manifest.json").write_text(text)
        outcome("manifest: load_manifest", lambda: load_manifest(d))
        cli_outcome("manifest: python -m irm_hpc.status", status.main, [str(d), "--json"])
        assert listing(d) == ["manifest.json"], "status must not write into the sweep dir"

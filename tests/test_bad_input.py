"""Bad input of issue #13 outside the training config: manifests of the wrong shape, record attributes of
the wrong type, empty data files, the debug executor without a terminal. Each gives a one-line
``error: ...`` and exit 2 (or an ``IrmError`` in process), never a traceback or a pdb prompt."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from irm_hpc import launch, status
from irm_hpc.data import DataError, load_alignment
from irm_hpc.manifest import ManifestError, load_manifest
from irm_hpc.record import RecordError, RunRecorder, open_run

from conftest import REPO, clean_env, run_module

GOOD_TASK = {"index": 0, "task_id": "anger-s0-all", "alignment": "anger", "seed": 0, "layer_set": "all",
             "out_dir": "runs/anger-s0-all", "overrides": ["alignment=anger"]}
GOOD = {"schema_version": 1, "sweep": "smoke", "executor": "local", "created": 1.0, "sweep_dir": "/x",
        "config_yaml": "cluster:\n  name: local\n  executor: local\n", "tasks": [GOOD_TASK]}


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), stderr[-2000:]
    return lines[-1]


@pytest.mark.parametrize("doc, problem", [
    ({"schema_version": 1}, "field 'sweep' is missing"),
    ([1, 2], "a JSON list, not an object"),
    ({**GOOD, "tasks": 5}, "tasks is a JSON int, not a list"),
    ({**GOOD, "tasks": [{"index": "x"}]}, "tasks[0].index is 'x', not int"),
    ({**GOOD, "tasks": [{**GOOD_TASK, "index": "x"}]}, "tasks[0].index is 'x', not int"),
    ({**GOOD, "tasks": [{**GOOD_TASK, "out_dir": 5}]}, "tasks[0].out_dir is 5, not str"),
    ({**GOOD, "tasks": [{k: v for k, v in GOOD_TASK.items() if k != "seed"}]}, "field 'tasks[0].seed' is missing"),
    ({**GOOD, "tasks": [{**GOOD_TASK, "index": 3}]}, "tasks[0].index is 3, not 0"),
    ({**GOOD, "tasks": [7]}, "tasks[0] is 7, not an object"),
    ({**GOOD, "config_yaml": "[1]"}, "config_yaml is not a launch config"),
    ({**GOOD, "config_yaml": "{}"}, "its config_yaml has no 'cluster' section"),
    ({**GOOD, "train_job_ids": [1]}, "train_job_ids[0] is 1, not a str"),
])
def test_manifest_of_wrong_shape_is_one_line_error(tmp_path, capsys, doc, problem):
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    if "cluster" not in problem:  # a launch config without cluster loads; status and resume need it
        with pytest.raises(ManifestError, match="is not an irm_hpc manifest"):
            load_manifest(tmp_path)
    for main in (lambda: status.main([str(tmp_path)]), lambda: launch.main(["--resume", str(tmp_path), "--dry-run"])):
        assert main() == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and problem in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"], "resume must not lock or write"


def test_manifest_of_wrong_shape_cli_exit_2(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({**GOOD, "tasks": [{"index": "x"}]}))
    for module, args in (("irm_hpc.status", [str(tmp_path)]), ("irm_hpc.launch", ["--resume", str(tmp_path)])):
        res = run_module(module, args, timeout=120)
        assert res.returncode == 2 and "tasks[0].index is 'x'" in one_error_line(res.stderr)


def _record_file(path: Path) -> Path:
    meta = {"model_name": "m", "hidden_size": 8, "n_layers": 3, "injection_layers": [0, 2], "alignment": "joy",
            "seed": 1, "config_yaml": "x: 1\n"}
    rec = RunRecorder(path.parent / "record", meta, n_inj=2, hidden=8, compression="gzip")
    rec.resume(-1)
    rec.set_prompts(["p"])
    for s in (0, 5, 10):
        rec.add_profile(s, np.ones((2, 8), np.float32), np.ones((2, 8), np.float32), 4)
    rec.add_probe(0, np.ones((3, 2, 8), np.float32), np.arange(3), ["a", "b", "c"], 0, np.arange(3, dtype=np.int32),
                  np.arange(3) >= 1)
    return rec.finalize(path)


@pytest.mark.parametrize("attr, value, problem", [
    ("schema_version", "abc", "root attribute 'schema_version' is 'abc', not an integer"),
    ("hidden_size", "x", "root attribute 'hidden_size' is 'x', not an integer >= 1"),
    ("injection_layers", np.array(["a", "b"], dtype=h5py.string_dtype()), "root attribute 'injection_layers'"),
    ("injection_layers", np.array([0.5, 1.5]), "not a list of layer indices in [0, n_layers=3)"),
    ("injection_layers", np.array([0, 7]), "not a list of layer indices in [0, n_layers=3)"),
    ("n_layers", 1.5, "root attribute 'n_layers' is"),
    ("seed", np.array([1, 2]), "root attribute 'seed' is [1, 2], not an integer"),
    ("extra_meta", "{bad", "root attribute 'extra_meta' is '{bad', not a JSON object"),
    ("dtype", "int8", "root attribute 'dtype' is 'int8', not one of float16, float32"),
])
def test_record_attribute_of_wrong_type_is_one_line_error(tmp_path, attr, value, problem):
    """RunMeta.from_attrs checks every root attribute's type (issue #13): ``record inspect`` exits 2 in one
    line naming the file and attribute; the analysis skips the file with that reason (docs/architecture.md,
    analysis "Bad input": unreadable file -> skipped; nothing left -> exit 2)."""
    path = _record_file(tmp_path / "run" / "injections.h5")
    with h5py.File(path, "a") as f:
        f.attrs[attr] = value
    with pytest.raises(RecordError, match=str(path)):
        open_run(path)
    res = run_module("irm_hpc.record", ["inspect", str(path)], timeout=120)
    line = one_error_line(res.stderr)
    assert res.returncode == 2 and str(path) in line and problem in line, line
    out = tmp_path / "analysis"
    res = run_module("irm_hpc.analysis", ["analyze", str(path), "--out", str(out), "--no-progress"], timeout=120)
    line = one_error_line(res.stderr)
    assert res.returncode == 2 and "nothing to analyse" in line and problem in line, line
    assert "irm_hpc.analysis: warning: skipping" in res.stderr


class _Data:
    """A DataConfig stand-in (attribute and .get access)."""

    def __init__(self, path: Path, fmt: str = "auto", **kw):
        self.__dict__.update(path=str(path), format=fmt, split="train", text_column="text", label_column="label",
                             labels_file=None, label_map=None, single_label_only=True, eval_fraction=0.1,
                             max_eval_texts=8, max_train_texts=None, hf_config=None, **kw)

    def get(self, key, default=None):
        return self.__dict__.get(key, default)


@pytest.mark.parametrize("name, content, message", [
    ("empty.tsv", "", "data file {p} is empty"),
    ("empty.csv", "", "data file {p} is empty"),
    ("empty.jsonl", "", "data file {p} is empty"),
    ("empty.parquet", "", "data file {p} is empty"),
    ("header.tsv", "text\tlabel\n", "data file {p} has a header but no rows"),
    ("header.csv", "text,label\n", "data file {p} has a header but no rows"),
    ("blank.csv", "\n\n", "data file {p} has no columns"),
    ("list.jsonl", '{"text": "a", "label": "anger"}\n[1]\n', "{p} line 2 is a JSON list"),
    ("broken.jsonl", '{"text": "a", "label": "anger"}\n{bad\n', "{p} line 2 is not JSON"),
    ("broken.parquet", "not parquet", "cannot parse {p} as parquet"),
])
def test_empty_or_unparsable_data_file_names_it(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_alignment(_Data(path), "anger", 0)
    msg = str(info.value)
    assert message.format(p=path) in msg and "\n" not in msg, msg


@pytest.mark.parametrize("train_tsv, labels, message", [
    ("", "anger\n", "no rows in {d}/train.tsv"),
    ("hello\t0\n", "", "{d}/train.tsv line 1: label id '0' is not an index into {d}/labels.txt (0 labels)"),
    ("hello\tx\n", "anger\n", "{d}/train.tsv line 1: label id 'x'"),
])
def test_empty_goemotions_file_says_no_rows(tmp_path, train_tsv, labels, message):
    d = tmp_path / "ge"
    d.mkdir()
    (d / "labels.txt").write_text(labels)
    (d / "train.tsv").write_text(train_tsv)
    with pytest.raises(DataError) as info:
        load_alignment(_Data(d), "anger", 0)
    assert message.format(d=d) in str(info.value) and "labels present: )" not in str(info.value)


def test_data_errors_from_train_cli(tmp_path):
    """The same errors through ``python -m irm_hpc.train``: one line naming the file, exit 2, out_dir untouched."""
    path = tmp_path / "empty.tsv"
    path.write_text("")
    out = tmp_path / "out"
    res = run_module("irm_hpc.train", ["model=tiny_random", "train=smoke", f"data.path={path}", "data.format=auto",
                                       "alignment=anger", f"out_dir={out}"], timeout=300)
    assert res.returncode == 2 and f"data file {path} is empty" in one_error_line(res.stderr)
    assert not out.exists()


DEBUG_CHILD = textwrap.dedent("""
    import sys
    from omegaconf import OmegaConf
    from irm_hpc.executors import DebugSweepExecutor

    def boom():
        raise RuntimeError("task failed on purpose")

    ex = DebugSweepExecutor(OmegaConf.create({"executor": "debug"}))._executor(sys.argv[1])
    job = ex.submit(boom)
    try:
        job.result()
    except RuntimeError as exc:
        print("raised:", exc)
        sys.exit(3)
""")


def test_debug_executor_no_pdb_without_terminal(tmp_path):
    """submitit's DebugJob enters pdb.post_mortem on any failure; with stdin an open pipe (no terminal, as
    under CI or nohup) that hung at a (Pdb) prompt. Now the exception propagates."""
    proc = subprocess.Popen([sys.executable, "-c", DEBUG_CHILD, str(tmp_path / "logs")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=clean_env())
    try:
        proc.wait(timeout=60)  # stdin stays open: a pdb prompt waits for it
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the debug executor waited for input (pdb) without a terminal: {proc.stdout.read()[-500:]}")
    finally:
        proc.stdin.close()
    out = proc.stdout.read()
    proc.stdout.close()
    assert "(Pdb)" not in out, out
    assert proc.returncode == 3 and "raised: task failed on purpose" in out, out

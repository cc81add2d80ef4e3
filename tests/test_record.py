"""Tests of irm_hpc.record: HDF5 writer (RunRecorder) and reader (open_run). Fast (tiny shapes)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest
import torch

import irm_hpc.record as record
from irm_hpc.record import SCHEMA_VERSION, RecordError, RunRecorder, open_run, segments
from irm_hpc.record.reader import _describe_filters

N_INJ, HIDDEN, N_LAYERS = 3, 16, 6
META = {"model_name": "HuggingFaceTB/SmolLM2-135M", "hidden_size": HIDDEN, "n_layers": N_LAYERS,
        "injection_layers": [1, 3, 5], "alignment": "joy", "seed": 7, "config_yaml": "model:\n  name: x\n",
        "package_version": "0.1.0", "git_commit": "abc123"}
CHILD = Path(__file__).with_name("record_writer_child.py")
ROOT = Path(__file__).resolve().parents[1]


def recorder(path: Path, **kw) -> RunRecorder:
    return RunRecorder(path, META, n_inj=N_INJ, hidden=HIDDEN, **kw)


def prof(step: int) -> np.ndarray:
    return np.full((N_INJ, HIDDEN), float(step), dtype=np.float32)


def write_steps(rec: RunRecorder, steps, ckpts=()) -> None:
    for s in steps:
        rec.add_profile(s, prof(s), -prof(s), 10 + s)
        if s in ckpts:
            rec.checkpoint(s)


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_every_dataset_and_attribute(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(0)
    abs_, mean = rng.random((3, N_INJ, HIDDEN)), rng.standard_normal((3, N_INJ, HIDDEN))
    inj = [rng.standard_normal((5, N_INJ, HIDDEN)).astype(np.float32), rng.standard_normal((4, N_INJ, HIDDEN))]
    base = rng.random((N_LAYERS, HIDDEN)).astype(np.float32)
    with recorder(tmp_path / "record", dtype=dtype) as rec:
        rec.set_prompts(["Tell me", "Ünïcode ✓"])
        rec.set_base_reference(torch.from_numpy(base))
        for i, step in enumerate((0, 5, 10)):  # torch and numpy inputs
            a = torch.from_numpy(abs_[i]) if i % 2 else abs_[i]
            rec.add_profile(step, a, torch.tensor(mean[i]), 100 + i)
            if i == 1:
                rec.checkpoint(step)
        rec.add_probe(0, torch.from_numpy(inj[0]), torch.arange(5), list("abcde"), 0,
                      torch.arange(5, dtype=torch.int32), torch.arange(5) >= 3)
        rec.add_probe(10, inj[1], np.array([7, 8, 9, 10]), ["x", "ÿ", " z", ""], np.array([1, 1, 1, 1]),
                      np.arange(4), np.array([False, False, True, True]))
        out = rec.finalize(tmp_path / "injections.h5")
    assert out == tmp_path / "injections.h5" and not (tmp_path / "record").exists()
    dt = np.dtype(dtype)
    with h5py.File(out, "r") as f:  # plain h5py: the documented schema
        a = f.attrs
        assert a["schema_version"] == SCHEMA_VERSION and a["model_name"] == META["model_name"]
        assert a["hidden_size"] == HIDDEN and a["n_layers"] == N_LAYERS and a["seed"] == 7
        assert list(a["injection_layers"]) == [1, 3, 5] and a["injection_layers"].dtype == np.int64
        assert a["alignment"] == "joy" and a["config_yaml"] == META["config_yaml"]
        assert a["package_version"] == "0.1.0" and a["git_commit"] == "abc123" and a["dtype"] == dtype
        assert bool(a["finalized"])
        expect = {"profiles/step": ((3,), np.int64), "profiles/n_tokens": ((3,), np.int64),
                  "profiles/mean_abs": ((3, N_INJ, HIDDEN), dt), "profiles/mean": ((3, N_INJ, HIDDEN), dt),
                  "probe/step": ((9,), np.int64), "probe/probe_index": ((9,), np.int32),
                  "probe/position": ((9,), np.int32), "probe/token_id": ((9,), np.int64),
                  "probe/is_generated": ((9,), np.bool_), "probe/injection": ((9, N_INJ, HIDDEN), dt),
                  "base/resid_abs": ((N_LAYERS, HIDDEN), np.float32)}
        for name, (shape, dtyp) in expect.items():
            assert f[name].shape == shape and f[name].dtype == dtyp, name
        assert h5py.check_string_dtype(f["probe/token_text"].dtype).encoding == "utf-8"
        assert h5py.check_string_dtype(f["probe/prompts"].dtype).encoding == "utf-8"
        assert f["probe/injection"].chunks[1:] == (N_INJ, HIDDEN) and f["profiles/mean"].chunks == (1, N_INJ, HIDDEN)
        # default compression: HDF5 shuffle + Zstd level 1 (hdf5plugin filter 32015) on every numeric dataset
        for name in ("probe/injection", "profiles/mean", "probe/step"):
            assert filter_ids(f[name]) == [h5py.h5z.FILTER_SHUFFLE, 32015], name
        assert _describe_filters(f["probe/injection"]) == "zstd-1+shuffle"
        assert f["probe/token_text"].compression == "gzip"  # vlen strings: built-in gzip
    with open_run(tmp_path) as r:
        assert r.meta.finalized and r.meta.dtype == dtype and r.meta.injection_layers == [1, 3, 5]
        assert r.meta.git_commit == "abc123" and r.meta.seed == 7 and r.meta.n_inj == N_INJ
        assert r.steps.tolist() == [0, 5, 10] and r.n_tokens.tolist() == [100, 101, 102]
        assert r.profiles_abs.dtype == dt and r.profiles_abs.shape == (3, N_INJ, HIDDEN)
        np.testing.assert_array_equal(r.profiles_abs[:], abs_.astype(dt))
        np.testing.assert_array_equal(r.profiles_mean[1], mean[1].astype(dt))
        np.testing.assert_array_equal(r.probe.injection[:], np.concatenate(inj).astype(dt))
        assert r.probe.step.tolist() == [0] * 5 + [10] * 4 and r.probe.probe_index.tolist() == [0] * 5 + [1] * 4
        assert r.probe.position.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
        assert r.probe.token_id.tolist() == [0, 1, 2, 3, 4, 7, 8, 9, 10]
        assert r.probe.token_text == list("abcde") + ["x", "ÿ", " z", ""]
        assert r.probe.is_generated.tolist() == [False] * 3 + [True] * 2 + [False, False, True, True]
        assert r.prompts == ["Tell me", "Ünïcode ✓"]
        np.testing.assert_array_equal(r.base_resid_abs, base)


def filter_ids(ds: h5py.Dataset) -> list[int]:
    dcpl = ds.id.get_create_plist()
    return [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]


@pytest.mark.parametrize("compression,expect", [
    (None, "none"), ("lzf", "lzf+shuffle"), ("gzip", "gzip-1+shuffle"), ("gzip-6", "gzip-6+shuffle"),
    ("zstd", "zstd-1+shuffle"), ("zstd-3", "zstd-3+shuffle"), ("blosc-lz4", "blosc-lz4-5+bitshuffle"),
    ("blosc-zstd", "blosc-zstd-1+bitshuffle"), ("blosc-zstd-3", "blosc-zstd-3+bitshuffle"),
    ("bitshuffle-lz4", "bitshuffle-lz4")])
def test_compression_setting_round_trip(tmp_path: Path, compression, expect) -> None:
    inj = np.random.default_rng(1).standard_normal((5, N_INJ, HIDDEN)).astype(np.float16)
    with recorder(tmp_path / "record", compression=compression) as rec:
        write_steps(rec, range(3), ckpts={1})
        rec.add_probe(2, inj, np.arange(5), list("abcdé"), 0, np.arange(5), np.arange(5) > 2)
        rec.finalize(tmp_path / "injections.h5")
    with h5py.File(tmp_path / "injections.h5") as f:  # plain h5py (hdf5plugin imported by irm_hpc.record)
        for name in ("profiles/mean_abs", "profiles/step", "probe/injection", "probe/is_generated"):
            assert _describe_filters(f[name]) == expect, name
        np.testing.assert_array_equal(f["probe/injection"][:], inj)
    with open_run(tmp_path / "injections.h5") as r:
        np.testing.assert_array_equal(r.profiles_abs[2], prof(2))
        np.testing.assert_array_equal(r.probe.injection[:], inj)
        assert r.probe.token_text == list("abcdé") and r.probe.is_generated.tolist() == [False] * 3 + [True] * 2
        assert {d["name"]: d["compression"] for d in r.datasets()}["probe/injection"] == expect


def test_default_compression_needs_hdf5plugin_in_plain_h5py(final_file: Path) -> None:
    """Documented contract: the default (zstd) file reads with ``import hdf5plugin`` + h5py; h5py alone
    cannot decode it (no plugin path); gzip files need nothing."""
    code = ("import sys, h5py\n"
            "f = h5py.File(sys.argv[1], 'r')\n"
            "try:\n    f['profiles/mean_abs'][:]\n    print('plain-ok')\n"
            "except OSError:\n    print('plain-failed')\n"
            "import hdf5plugin\n"
            "print('plugin-ok', float(f['profiles/mean_abs'][39, 0, 0]))\n")
    env = {k: v for k, v in os.environ.items() if k != "HDF5_PLUGIN_PATH"}
    res = subprocess.run([sys.executable, "-c", code, str(final_file)], capture_output=True, text=True,
                         timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["plain-failed", "plugin-ok", "39.0"], res.stdout


def test_plugin_compression_without_hdf5plugin(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(record.schema, "hdf5plugin", None)
    with pytest.raises(ValueError, match="pip install hdf5plugin"):
        recorder(tmp_path / "a", compression="zstd")
    with recorder(tmp_path / "b", compression="gzip") as rec:  # built-in filters still work
        write_steps(rec, range(2))
        rec.finalize(tmp_path / "b.h5")
    with open_run(tmp_path / "b.h5") as r:
        assert r.steps.tolist() == [0, 1]


def test_missing_filter_error_names_the_fix(final_file: Path) -> None:
    h5py.h5z.unregister_filter(32015)
    try:
        with open_run(final_file) as r:
            pass
    except RecordError as exc:
        msg = str(exc)
    else:
        pytest.fail("reading a zstd dataset without the filter did not fail")
    finally:
        hdf5plugin.register("zstd", force=True)
    assert "pip install hdf5plugin" in msg and str(final_file) in msg and "\n" not in msg
    with open_run(final_file) as r:  # registered again
        assert len(r) == 40


def test_unfinished_run_reads_completed_segments_and_flags_open_one(tmp_path: Path) -> None:
    rec = recorder(tmp_path / "record")
    write_steps(rec, range(12), ckpts={3, 7})
    rec.close()  # steps 8..11 are in a clean but uncheckpointed segment
    with open_run(tmp_path) as r:
        assert r.steps.tolist() == list(range(12)) and not r.meta.finalized
        assert r.open_segment is not None and r.checkpoint_step == 7 and len(r.files) == 3
        np.testing.assert_array_equal(r.profiles_abs[[11, 0, 5, 5]][:, 0, 0], [11, 0, 5, 5])
    with open_run(tmp_path / "record", include_open=False) as r:
        assert r.steps.tolist() == list(range(8)) and r.open_segment is None


def test_lazy_concat_indexing_across_segments(tmp_path: Path) -> None:
    rec = recorder(tmp_path / "record", dtype="float32")
    for s in range(10):
        inj = np.stack([np.full((N_INJ, HIDDEN), s * 10 + t, np.float32) for t in range(3)])
        rec.add_probe(s, inj, np.arange(3), ["a", "b", "c"], 0, np.arange(3), np.zeros(3, bool))
        if s in (2, 6):
            rec.checkpoint(s)
    rec.checkpoint(9)
    rec.close()
    full = np.array([s * 10 + t for s in range(10) for t in range(3)], np.float32)
    with open_run(tmp_path / "record") as r:
        x = r.probe.injection
        assert len(x) == 30 and x.shape == (30, N_INJ, HIDDEN) and len(x.parts) == 3
        assert x[4][0, 0] == full[4] and x[-1][0, 0] == full[-1]
        np.testing.assert_array_equal(x[5:20][:, 0, 0], full[5:20])
        np.testing.assert_array_equal(x[1:29:4, 0, 0], full[1:29:4])
        np.testing.assert_array_equal(x[[29, 0, 10, 10, 9]][:, 1, 2], full[[29, 0, 10, 10, 9]])
        np.testing.assert_array_equal(x[full % 20 == 1][:, 0, 0], full[full % 20 == 1])
        assert x[7, 2, 3] == full[7] and x[3:5, 1].shape == (2, HIDDEN) and x[40:50].shape == (0, N_INJ, HIDDEN)
        np.testing.assert_array_equal(np.asarray(x)[:, 0, 0], full)
        blocks = list(r.probe.iter_blocks(rows=7))
        assert [b[0] for b in blocks][-1] == slice(28, 30)
        np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks])[:, 0, 0], full)
        with pytest.raises(IndexError):
            x[30]


# --------------------------------------------------------------------------- crash safety and resume
def test_sigkill_mid_stream_keeps_every_checkpointed_record_once(tmp_path: Path) -> None:
    rdir = tmp_path / "record"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, str(CHILD), str(rdir), "5"], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            idx = rdir / "index.json"
            if idx.is_file() and len(json.loads(idx.read_text())["segments"]) >= 2:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.01)
        else:
            pytest.fail("child did not reach 2 checkpoints")
        time.sleep(0.037)  # land somewhere inside the stream
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    ckpt = json.loads((rdir / "index.json").read_text())["checkpoint_step"]
    assert ckpt >= 9 and (ckpt + 1) % 5 == 0
    with open_run(tmp_path) as r:  # completed segments + the open one if it happens to be clean
        steps = r.steps
        assert len(np.unique(steps)) == len(steps) and set(range(ckpt + 1)) <= set(steps.tolist())
        np.testing.assert_array_equal(r.profiles_abs[:][:, 0, 0], steps % 2048)
        probe_steps = r.probe.step[r.probe.step <= ckpt]
        assert probe_steps.tolist() == [s for s in range(0, ckpt + 1, 3) for _ in range(4)]
    for p in sorted(rdir.glob("seg-*.h5")):  # completed segments open with plain h5py
        if p.name in {s["file"] for s in json.loads((rdir / "index.json").read_text())["segments"]}:
            h5py.File(p, "r").close()
    rec = recorder(rdir)  # resume from the last checkpoint, continue, finalize
    rec.resume(ckpt)
    write_steps(rec, range(ckpt + 1, ckpt + 6))
    rec.finalize(tmp_path / "injections.h5")
    with open_run(tmp_path) as r:
        assert r.steps.tolist() == list(range(ckpt + 6))


@pytest.mark.parametrize("resume_at", [40, 30])
def test_resume_discards_records_after_step(tmp_path: Path, resume_at: int) -> None:
    rdir = tmp_path / "record"
    rec = recorder(rdir)
    rec.set_prompts(["p"])
    write_steps(rec, range(51), ckpts={20, 40})
    rec.add_probe(45, np.zeros((2, N_INJ, HIDDEN)), [1, 2], ["a", "b"], 0, [0, 1], [False, True])
    rec.close()  # "crash": the open segment (41..50) is never checkpointed ...
    seg = rdir / "seg-00000041.h5"
    with open(seg, "r+b") as fh:  # ... and is damaged
        fh.truncate(seg.stat().st_size // 2)
    rec = recorder(rdir)
    with pytest.raises(RecordError, match="resume"):
        rec.add_profile(41, prof(41), prof(41), 1)  # existing data and no resume() call
    rec.resume(resume_at)  # 30: the completed segment 21..40 straddles and is rewritten
    write_steps(rec, range(resume_at + 1, 61), ckpts={55})
    rec.finalize(tmp_path / "injections.h5")
    rec.close()  # idempotent
    with open_run(tmp_path) as r:
        assert r.steps.tolist() == list(range(61))
        np.testing.assert_array_equal(r.profiles_abs[:][:, 0, 0], np.arange(61))
        assert r.n_tokens.tolist() == [10 + s for s in range(61)]
        assert len(r.probe) == 0 and r.prompts == ["p"]


def test_resume_restores_the_checkpoint_state_for_trainer_ordering(tmp_path: Path) -> None:
    """The trainer calls checkpoint(s) before it records step s; resuming from an older model
    checkpoint (the newer one failed) must not keep step s twice."""
    rdir = tmp_path / "record"
    rec = recorder(rdir)
    for s in range(30):
        if s and s % 10 == 0:
            rec.checkpoint(s)
        rec.add_profile(s, prof(s), prof(s), 1)
    rec.close()
    rec = recorder(rdir)
    rec.resume(10)  # checkpoint 20 exists in the record, but the model checkpoint 20 was lost
    for s in range(10, 25):
        if s % 10 == 0:
            rec.checkpoint(s)
        rec.add_profile(s, prof(s), prof(s), 1)
    rec.finalize(tmp_path / "injections.h5")
    with open_run(tmp_path) as r:
        assert r.steps.tolist() == list(range(25))


def test_resume_fresh_start_discards_everything(tmp_path: Path) -> None:
    rec = recorder(tmp_path / "record")
    write_steps(rec, range(5), ckpts={4})
    rec.close()
    rec = recorder(tmp_path / "record")
    rec.resume(-1)
    write_steps(rec, range(3))
    rec.finalize(tmp_path / "injections.h5")
    with open_run(tmp_path) as r:
        assert r.steps.tolist() == [0, 1, 2] and r.prompts == []


def test_resume_with_other_layout_is_refused(tmp_path: Path) -> None:
    rec = recorder(tmp_path / "record")
    write_steps(rec, range(3), ckpts={2})
    rec.close()
    rec = recorder(tmp_path / "record", dtype="float32")
    with pytest.raises(RecordError, match="float16"):
        rec.resume(2)
    rec.close()


# --------------------------------------------------------------------------- bad input
@pytest.fixture
def final_file(tmp_path: Path) -> Path:
    with recorder(tmp_path / "record") as rec:
        write_steps(rec, range(40))
        return rec.finalize(tmp_path / "injections.h5")


def _one_line_error(path, match: str) -> str:
    with pytest.raises(RecordError) as info:
        open_run(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and match in msg, msg
    return msg


def test_bad_input_wrong_schema_version(final_file: Path) -> None:
    with h5py.File(final_file, "r+") as f:
        f.attrs["schema_version"] = 2
    _one_line_error(final_file, "schema version 2")


def test_bad_input_truncated_file(final_file: Path) -> None:
    with open(final_file, "r+b") as fh:
        fh.truncate(final_file.stat().st_size // 2)
    _one_line_error(final_file, "truncated")


def test_bad_input_not_hdf5_missing_and_empty(tmp_path: Path) -> None:
    (tmp_path / "notes.h5").write_text("not hdf5\n")
    _one_line_error(tmp_path / "notes.h5", "not an HDF5 file")
    _one_line_error(tmp_path / "nope", "no such file")
    (tmp_path / "empty").mkdir()
    _one_line_error(tmp_path / "empty", "neither")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    _one_line_error(tmp_path / "other.h5", "not an irm_hpc record")


def test_bad_input_damaged_index(tmp_path: Path) -> None:
    rdir = tmp_path / "record"
    rec = recorder(rdir)
    write_steps(rec, range(3), ckpts={2})
    rec.close()
    (rdir / "index.json").write_text("{broken")
    _one_line_error(rdir, "damaged segment index")


def test_bad_arguments_raise_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing"):
        RunRecorder(tmp_path, {"model_name": "x"}, n_inj=N_INJ, hidden=HIDDEN)
    with pytest.raises(ValueError, match="dtype"):
        recorder(tmp_path, dtype="bfloat16")
    for bad in ("zstd-0", "gzip-10", "blosc-lz4-10", "blosc-snappy", "lzf-1", "bitshuffle-lz4-3", "brotli"):
        with pytest.raises(ValueError, match="compression"):
            recorder(tmp_path, compression=bad)
    with recorder(tmp_path / "record") as rec:
        with pytest.raises(ValueError, match="mean_abs"):
            rec.add_profile(0, np.zeros((2, HIDDEN)), np.zeros((N_INJ, HIDDEN)), 1)
        with pytest.raises(ValueError, match="token_text"):
            rec.add_probe(0, np.zeros((3, N_INJ, HIDDEN)), [1, 2, 3], ["a"], 0, [0, 1, 2], [0, 0, 0])


# --------------------------------------------------------------------------- writer thread
def test_writer_error_surfaces_as_record_error(tmp_path: Path, monkeypatch) -> None:
    def disk_full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    rec = recorder(tmp_path / "record")
    write_steps(rec, range(3), ckpts={2})
    monkeypatch.setattr(segments._Segment, "add_profile", disk_full)
    rec.add_profile(3, prof(3), prof(3), 1)  # never raises inside the training step itself
    with pytest.raises(RecordError) as info:
        rec.checkpoint(3)
    msg = str(info.value)
    assert "seg-00000003.h5" in msg and "No space left" in msg and "step 2" in msg and "\n" not in msg
    with pytest.raises(RecordError, match="No space left"):
        rec.add_profile(4, prof(4), prof(4), 1)
    rec.close()  # already reported: close does not raise again
    with open_run(tmp_path / "record", include_open=False) as r:
        assert r.steps.tolist() == [0, 1, 2]


def test_writer_error_surfaces_on_close(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(segments._Segment, "add_probe", lambda *a, **k: 1 / 0)
    rec = recorder(tmp_path / "record")
    rec.add_probe(0, np.zeros((1, N_INJ, HIDDEN)), [1], ["a"], 0, [0], [False])
    with pytest.raises(RecordError, match="ZeroDivisionError"):
        rec.close()
    rec.close()


def test_back_pressure_blocks_instead_of_growing(tmp_path: Path, monkeypatch) -> None:
    real = RunRecorder._handle

    def slow(self, op):
        time.sleep(0.02)
        real(self, op)

    monkeypatch.setattr(RunRecorder, "_handle", slow)
    rec = recorder(tmp_path / "record", queue_size=1)
    sizes, stop = [], threading.Event()
    watcher = threading.Thread(target=lambda: [sizes.append(rec._q.qsize()) or time.sleep(0.001)
                                               for _ in iter(stop.is_set, True)])
    watcher.start()
    t0 = time.perf_counter()
    write_steps(rec, range(10))
    elapsed = time.perf_counter() - t0
    stop.set()
    watcher.join()
    rec.close()
    assert max(sizes) <= rec.queue_maxsize == 1
    assert elapsed >= 0.1  # the producer waited for the slow writer (10 x 20 ms, minus 2 in flight)


# --------------------------------------------------------------------------- CLI
def test_inspect_cli(final_file: Path, capsys) -> None:
    assert record.main(["inspect", str(final_file.parent)]) == 0
    out = capsys.readouterr().out
    assert "profile records" in out and "0 .. 39" in out and "probe/injection" in out and "zstd-1+shuffle" in out
    assert record.main(["inspect", str(final_file.parent / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_inspect_module_entry_point(final_file: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HDF5_PLUGIN_PATH"}  # the record module imports hdf5plugin
    res = subprocess.run([sys.executable, "-m", "irm_hpc.record", "inspect", str(final_file)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT, env={**env, "COLUMNS": "200"})
    assert res.returncode == 0 and "HuggingFaceTB/SmolLM2-135M" in res.stdout, res.stderr
    assert "0 .. 39" in res.stdout and "zstd-1+shuffle" in res.stdout  # zstd data decoded in a fresh process

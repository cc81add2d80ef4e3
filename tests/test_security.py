"""Security rules for shared clusters (issue #13): no config string becomes shell, nothing is written or
deleted outside the sweep, nothing is unpickled from a directory others can write to, and YAML read
from disk never resolves ``${oc.env:...}``. Each test feeds the reporter's kind of bad input."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

import test_analysis
from conftest import tiny_overrides
from irm_hpc import launch, train
from irm_hpc.components.checkpoint import Checkpointer, resume_mode
from irm_hpc.config import ConfigError, load_config
from irm_hpc.errors import UnsafePathError
from irm_hpc.executors import SlurmSweepExecutor
from irm_hpc.layout import RunDir, SweepDir, check_private, safe_component
from irm_hpc.manifest import Manifest, ManifestError, expand_tasks, load_manifest
from irm_hpc.record import RecordError, RunRecorder, open_run

PAYLOAD = "echo pwned"


def _launch(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = launch.main(argv)
    out, err = capsys.readouterr()
    return code, out, err.strip()


# ----------------------------------------------------------------------------- 1. #SBATCH lines
SBATCH_BAD = [
    ("cluster.partition", f"cluster.partition='gpu\n{PAYLOAD}'"),
    ("cluster.partition", f"cluster.partition='gpu\r{PAYLOAD}'"),
    ("cluster.partition", "cluster.partition='gpu;reboot'"),
    ("cluster.account", f"cluster.account='proj\n{PAYLOAD}'"),
    ("cluster.qos", f"cluster.qos='high\t{PAYLOAD}'"),
    ("cluster.constraint", f"cluster.constraint='a100\n{PAYLOAD} #'"),
    ("cluster.additional_parameters.comment", f"+cluster.additional_parameters.comment='x\n{PAYLOAD} #'"),
    ("sweep.name", f"sweep.name='s\n{PAYLOAD}'"),
]


@pytest.mark.parametrize("key, override", SBATCH_BAD)
def test_control_characters_in_cluster_strings_refused_in_dry_run(capsys, tmp_path, key, override):
    code, out, err = _launch(capsys, ["--sweep", "smoke", "--cluster", "slurm", "--dry-run",
                                      f"runs_root={tmp_path / 'runs'}", override])
    assert code == 2, out
    assert err.startswith("error: ") and "\n" not in err and key in err, err
    assert PAYLOAD not in out.splitlines() and "#SBATCH" not in out, "no script may be printed"
    assert not (tmp_path / "runs").exists()


def test_additional_parameters_key_with_newline_refused(tmp_path):
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "evil.yaml").write_text(
        'defaults:\n  - cluster_schema\nname: evil\nexecutor: slurm\nadditional_parameters:\n'
        f'  "exclusive\\n{PAYLOAD} #": true\n')
    cfg = load_config("launch", ["--config-dir", str(tmp_path), "sweep=smoke", "cluster=evil"])
    ex = SlurmSweepExecutor(cfg.cluster)
    with pytest.raises(ConfigError, match="cluster.additional_parameters key"):
        ex.parameters("irm-smoke", 4)
    with pytest.raises(ConfigError, match="cluster.additional_parameters key"):
        ex.preview(4, tmp_path / "logs")


@pytest.mark.parametrize("field, value", [("partition", f"gpu\n{PAYLOAD}"), ("account", "a b"),
                                          ("qos", "q\x00"), ("constraint", f"x\u0085{PAYLOAD}")])
def test_parameters_path_refuses_bad_values(field, value):
    """The one validator sits in ``parameters``: submit, resume and preview all build through it."""
    cfg = load_config("launch", ["sweep=smoke", "cluster=slurm"])
    cfg.cluster[field] = value
    ex = SlurmSweepExecutor(cfg.cluster)
    for analysis in (False, True):
        with pytest.raises(ConfigError, match=f"cluster.{field}"):
            ex.parameters("irm-smoke", 4, analysis=analysis)


def test_runs_root_with_newline_refused_for_the_output_line(capsys, tmp_path):
    code, out, err = _launch(capsys, ["--sweep", "smoke", "--cluster", "slurm", "--dry-run",
                                      f"runs_root='{tmp_path}/r\n{PAYLOAD} #'"])
    assert code == 2 and "runs_root" in err and PAYLOAD not in out.splitlines(), err


def test_good_cluster_strings_still_pass():
    cfg = load_config("launch", ["sweep=smoke", "cluster=slurm", "cluster.partition='gpu-long,debug'",
                                 "cluster.constraint='a100|h100'", "+cluster.additional_parameters.mail-user=a@b.org",
                                 "+cluster.additional_parameters.gres=gpu:a100:2"])
    text = SlurmSweepExecutor(cfg.cluster).preview(4, Path("/x/logs"))
    assert "#SBATCH --partition=gpu-long,debug" in text and "#SBATCH --gres=gpu:a100:2" in text


# ----------------------------------------------------------------------------- 2. path traversal
TRAVERSAL = ["../../../x", "..", ".hidden", "a/b", "/abs", "-rf", "x\ny", "", "a" * 129]


@pytest.mark.parametrize("name", TRAVERSAL)
def test_safe_component_rule(name):
    with pytest.raises(ConfigError, match="cannot name a directory"):
        safe_component(name, "thing")


@pytest.mark.parametrize("name", TRAVERSAL[:5])
def test_alignment_and_layer_set_names_cannot_leave_runs(name):
    with pytest.raises(ConfigError, match="sweep.alignments entry"):
        expand_tasks([name], [0], ["all"], [])
    with pytest.raises(ConfigError, match="sweep.layer_sets entry"):
        expand_tasks(["anger"], [0], [name], [])


def test_alignment_traversal_refused_by_launch(capsys, tmp_path):
    runs = tmp_path / "a" / "b" / "runs"
    code, _, err = _launch(capsys, ["--sweep", "smoke", "--cluster", "local", f"runs_root={runs}",
                                    "sweep.alignments=[../../../x]"])
    assert code == 2 and "sweep.alignments entry '../../../x'" in err, err
    assert not any(tmp_path.rglob("*")), "nothing may be created"


@pytest.mark.parametrize("name", ["../escape", "/tmp/escape", "..", "a/b"])
def test_name_option_traversal_refused(capsys, tmp_path, name):
    runs = tmp_path / "runs"
    code, _, err = _launch(capsys, ["--sweep", "smoke", "--cluster", "local", "--name", name, f"runs_root={runs}"])
    assert code == 2 and "--name" in err and "cannot name a directory" in err, err
    assert not any(tmp_path.rglob("*"))


@pytest.mark.parametrize("out_dir", ["../outside", "runs/../../outside", "/etc", ".", "runs/.."])
def test_run_dir_outside_the_sweep_refused(tmp_path, out_dir):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    with pytest.raises(ManifestError, match="outside the sweep directory"):
        SweepDir(sweep).run(out_dir)
    m = Manifest(sweep_dir=sweep, sweep="t", executor="local", created=0.0, config_yaml="{}",
                 tasks=expand_tasks(["a"], [0], ["all"], []))
    m.tasks[0].out_dir = out_dir
    m.save()
    with pytest.raises(ManifestError, match="outside the sweep directory"):
        load_manifest(sweep)
    assert SweepDir(sweep).run("runs/a-s0-all").root == sweep / "runs" / "a-s0-all"


def _record(record_dir: Path) -> RunRecorder:
    rec = RunRecorder(record_dir, test_analysis._meta("anger", 0, hidden=8), n_inj=test_analysis.N_LAYERS, hidden=8)
    return rec


def _write_segments(record_dir: Path) -> None:
    rec = _record(record_dir)
    for step in (0, 5, 10):
        z = np.zeros((test_analysis.N_LAYERS, 8), np.float32)
        rec.add_profile(step, z, z, 1)
        rec.checkpoint(step)
    rec.close()


@pytest.mark.parametrize("where", ["pending_delete", "segments"])
@pytest.mark.parametrize("kind", ["relative", "absolute", "dotdot-seg"])
def test_crafted_record_index_deletes_nothing_outside(tmp_path, where, kind):
    run = tmp_path / "sweep" / "runs" / "r"
    record_dir = run / "record"
    _write_segments(record_dir)
    canary = tmp_path / "canary.h5"
    canary.write_text("keep me")
    name = {"relative": "../../../../canary.h5", "absolute": str(canary),
            "dotdot-seg": "../../../../seg-00000000.h5"}[kind]
    if kind == "dotdot-seg":
        canary = tmp_path / "seg-00000000.h5"
        canary.write_text("keep me")
    index = json.loads((record_dir / "index.json").read_text())
    if where == "pending_delete":
        index["pending_delete"] = [name]
    else:
        index["segments"][-1]["file"] = name
    (record_dir / "index.json").write_text(json.dumps(index))
    before = sorted(p.name for p in record_dir.iterdir())
    with pytest.raises(RecordError, match="not a segment file") as exc:
        _record(record_dir).resume(5)
    assert "\n" not in str(exc.value)
    with pytest.raises(RecordError, match="not a segment file"):
        open_run(record_dir)
    assert canary.read_text() == "keep me"
    assert sorted(p.name for p in record_dir.iterdir()) == before


# ----------------------------------------------------------------------------- 3. unpickling
def test_sweep_dir_is_created_private(tmp_path):
    cfg = load_config("launch", ["sweep=smoke", "cluster=local", f"runs_root={tmp_path}"])
    m = launch.create_sweep(cfg, "local", "s1")
    assert stat.S_IMODE(os.stat(m.sweep_dir).st_mode) == 0o700


def _sweep_for_resume(tmp_path: Path, monkeypatch) -> tuple[Path, list]:
    """A local sweep whose driver never ran (resume would resubmit), with submit recorded, not run."""
    cfg = load_config("launch", ["sweep=smoke", "cluster=local", f"runs_root={tmp_path}"])
    m = launch.create_sweep(cfg, "local", "s")
    for d in (SweepDir(m.sweep_dir).train_logs, SweepDir(m.sweep_dir).driver_logs):
        d.mkdir(parents=True)
    calls: list = []
    from irm_hpc.executors import LocalSweepExecutor

    monkeypatch.setattr(LocalSweepExecutor, "submit", lambda self, *a: calls.append(a) or (_ for _ in ()).throw(
        AssertionError("submitted")))
    return m.sweep_dir, calls


@pytest.mark.parametrize("rel, bits", [("", stat.S_IWGRP), ("", stat.S_IWOTH), ("manifest.json", stat.S_IWOTH),
                                       ("logs/train", stat.S_IWGRP), ("logs/driver", stat.S_IWOTH)])
def test_resume_refuses_a_writable_sweep(capsys, tmp_path, monkeypatch, rel, bits):
    sweep, calls = _sweep_for_resume(tmp_path, monkeypatch)
    target = sweep / rel if rel else sweep
    target.chmod(stat.S_IMODE(target.stat().st_mode) | bits)
    before = (sweep / "manifest.json").read_text()
    code, _, err = _launch(capsys, ["--resume", str(sweep)])
    assert code == 2 and "\n" not in err, err
    assert f"fix: chmod go-w {target}" in err, err
    assert calls == [] and (sweep / "manifest.json").read_text() == before
    target.chmod(stat.S_IMODE(target.stat().st_mode) & ~bits)  # the printed fix works
    check_private(sweep, contents=True)


def test_resume_refuses_a_sweep_of_another_user(capsys, tmp_path, monkeypatch):
    sweep, calls = _sweep_for_resume(tmp_path, monkeypatch)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(sweep).st_uid + 4242)
    code, _, err = _launch(capsys, ["--resume", str(sweep)])
    assert code == 2 and "not by you" in err and "sudo chown" in err and str(sweep) in err, err
    assert calls == []


def test_result_pickle_folder_checked_before_wait(tmp_path):
    folder = tmp_path / "logs" / "driver"
    folder.mkdir(parents=True)
    (folder / "1_result.pkl").write_bytes(b"x")
    (folder / "1_result.pkl").chmod(0o666)

    class Job:
        paths = type("P", (), {"folder": folder})()

        def result(self):
            raise AssertionError("unpickled")

    with pytest.raises(UnsafePathError, match="chmod go-w"):
        launch._result_quietly(Job())


def _run_with_checkpoint(tsv: Path, out: Path) -> list[str]:
    overrides = tiny_overrides(tsv, out)
    out.mkdir()
    (out / "config.yaml").write_text(train.to_yaml(train.load_config("train", overrides)))
    tag = out / "checkpoints" / "global_step00000002"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"not a pickle you want")
    (out / "checkpoints" / "latest").write_text("global_step00000002")
    return overrides


@pytest.mark.parametrize("rel", ["checkpoints", "checkpoints/global_step00000002",
                                 "checkpoints/global_step00000002/mp_rank_00_model_states.pt", "."])
def test_training_refuses_writable_checkpoints_before_loading(capsys, tsv_data, tmp_path, rel):
    out = tmp_path / "run"
    overrides = _run_with_checkpoint(tsv_data, out)
    target = out / rel
    target.chmod(stat.S_IMODE(target.stat().st_mode) | stat.S_IWOTH)
    code = train.main(overrides)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and f"chmod go-w {target.resolve() if rel == '.' else target}" in err, err
    # the loader itself refuses too (DeepSpeed's load_checkpoint never called)
    class Engine:
        def load_checkpoint(self, *a, **k):
            raise AssertionError("loaded")

    with pytest.raises(UnsafePathError):
        Checkpointer(Engine(), RunDir(out), 2, 1, 1, True).load()


def test_training_refuses_checkpoints_of_another_user(tsv_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    overrides = _run_with_checkpoint(tsv_data, out)
    cfg = train.load_config("train", overrides)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(out).st_uid + 4242)
    with pytest.raises(UnsafePathError, match="sudo chown"):
        resume_mode(cfg, RunDir(out))


# ----------------------------------------------------------------------------- 4. no env resolution
SECRET = "s3cr3t-value-from-the-environment"


def test_hdf5_config_yaml_does_not_leak_env_into_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("IRM_TEST_SECRET", SECRET)
    orig = test_analysis._meta

    def meta(*a, **k):
        m = orig(*a, **k)
        m["config_yaml"] = "irm:\n  layer_set: ${oc.env:IRM_TEST_SECRET}\n"
        return m

    monkeypatch.setattr(test_analysis, "_meta", meta)
    for a in ("anger", "joy"):
        for s in (0, 1):
            test_analysis.write_run(tmp_path / "runs" / f"{a}-s{s}", a, s, hidden=16)
    summary = test_analysis.analyze(tmp_path / "runs", tmp_path / "out", test_analysis.PARAMS, progress=False)
    texts = [json.dumps(summary, default=str)] + [p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*")
                                     if p.suffix in (".json", ".md")]
    assert texts and not any(SECRET in t for t in texts)
    assert any("${oc.env:IRM_TEST_SECRET}" in t for t in texts), "the label is kept verbatim"


def test_manifest_and_run_config_read_verbatim(tmp_path, monkeypatch, tsv_data):
    monkeypatch.setenv("IRM_TEST_SECRET", SECRET)
    m = Manifest(sweep_dir=tmp_path, sweep="t", executor="slurm", created=0.0,
                 config_yaml="cluster:\n  partition: ${oc.env:IRM_TEST_SECRET}\nsweep:\n  analysis: []\n",
                 tasks=expand_tasks(["a"], [0], ["all"], []))
    assert m.launch_config().cluster.partition == "${oc.env:IRM_TEST_SECRET}"
    out = tmp_path / "run"
    out.mkdir()
    cfg = train.load_config("train", tiny_overrides(tsv_data, out))
    (out / "config.yaml").write_text(train.to_yaml(cfg).replace("alignment: anger", "alignment: ${oc.env:IRM_TEST_SECRET}"))
    monkeypatch.setenv("IRM_TEST_SECRET", "anger")  # resolving would make it match
    with pytest.raises(Exception, match="different 'alignment'"):
        resume_mode(cfg, RunDir(out))
    from irm_hpc.analysis import AnalysisError, parse_params

    with pytest.raises(AnalysisError, match="interpolation"):
        parse_params(["source=${oc.env:IRM_TEST_SECRET}"])

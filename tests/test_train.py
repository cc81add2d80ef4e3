"""DeepSpeed training of the IRM on a tiny random Llama: ZeRO stages, 2 CPU ranks, checkpoint/resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from irm_hpc.dist import free_port
from irm_hpc.record import open_run

from conftest import REPO, clean_env, run_module, tiny_overrides

from irm_hpc.components.tracking import read_scalars


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_finished(out: Path, steps: int) -> dict:
    assert (out / "DONE").is_file(), f"no DONE in {out}"
    steps_logged = [m["step"] for m in metrics(out) if "tokens_per_s" in m]
    assert steps_logged == list(range(1, steps + 1))
    weights = load_file(str(out / "irm.safetensors"))
    assert weights["net.0.weight"].shape == (96, 32) and weights["net.8.weight"].shape == (4 * 32, 96)
    return weights


@pytest.mark.parametrize("stage, keep, keep_done, tags", [("zero2", 0, 10, (3, 6, 9, 12)), ("zero3", 2, 2, (9, 12))])
def test_zero_stage_trains_and_lowers_loss(tsv_data, tmp_path, stage, keep, keep_done, tags):
    out = tmp_path / stage
    res = run_module("irm_hpc.train", tiny_overrides(tsv_data, out, f"deepspeed={stage}", "train.max_steps=12",
                                                      "record.enabled=false", f"train.keep_checkpoints={keep}",
                                                      f"train.keep_checkpoints_done={keep_done}"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert_finished(out, 12)
    loss = [m["loss"] for m in metrics(out) if "tokens_per_s" in m]
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3, f"loss did not go down: {loss}"
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == [f"global_step{t:08d}" for t in tags], "keep_checkpoints=0 keeps every tag, N the newest N"
    done = json.loads((out / "DONE").read_text())
    assert {"alignment_gain", "eval_target_loss", "eval_other_loss"} <= done.keys()


@pytest.mark.distributed
def test_two_cpu_ranks_zero2(tsv_data, tmp_path):
    out = tmp_path / "r2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "-m",
           "irm_hpc.train", *tiny_overrides(tsv_data, out, "deepspeed=zero2", "record.enabled=false")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=REPO,
                         env=clean_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert_finished(out, 6)
    assert json.loads((out / "DONE").read_text())["world_size"] == 2


# bf16: the IRM in bf16 with fp32 master weights (DeepSpeed), the frozen model in bf16, checkpointed layers:
# the GPU configuration, on CPU (issue #16). The checkpoint holds the fp32 master weights and Adam state, and
# the data order and RNG are restored, so on one CPU the resumed run repeats the same arithmetic: the
# tolerance is exact equality in both precisions (a GPU adds non-deterministic kernels; see docs/gpu.md).
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_kill_and_resume_equals_uninterrupted(tsv_data, tmp_path, precision):
    extra = ("train.max_steps=300", "train.checkpoint_every=20", "train.eval_every=0", "record.every_steps=5",
             "train.micro_batch_size=2", "train.keep_checkpoints_done=2")
    if precision == "bf16":
        extra += ("deepspeed.bf16=true", "model.dtype=bfloat16", "train.activation_checkpointing=true")
    ref = tmp_path / "ref"
    res = run_module("irm_hpc.train", tiny_overrides(tsv_data, ref, *extra))
    assert res.returncode == 0, res.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "irm_hpc.train", *tiny_overrides(tsv_data, out, *extra)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=clean_env())
    deadline = time.time() + 180
    while not (out / "checkpoints" / "latest").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "DONE").exists(), "the run finished before it was killed: the test proves nothing"
    killed_at = (out / "checkpoints" / "latest").read_text().strip()

    res = run_module("irm_hpc.train", tiny_overrides(tsv_data, out, *extra))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from checkpoint" in res.stderr, killed_at
    w_ref, w_res = assert_finished(ref, 300), assert_finished(out, 300)
    assert sorted(p.name for p in (out / "checkpoints").glob("global_step*")) == ["global_step00000280",
                                                                                   "global_step00000300"]
    diff = max((w_ref[k] - w_res[k]).abs().max().item() for k in w_ref)
    assert diff == 0.0, f"{precision}: resumed weights differ by {diff} (killed after {killed_at})"
    with open_run(out) as run, open_run(ref) as ref_run:
        assert run.steps.tolist() == list(range(0, 301, 5)), f"HDF5 steps after resume: {run.steps.tolist()}"
        assert np.allclose(run.profiles_abs[:], ref_run.profiles_abs[:], atol=1e-3)
    # TensorBoard after the resume: every step once (purge_step dropped the killed run's later events),
    # the same losses as metrics.jsonl, which the uninterrupted run also logged
    tb = read_scalars(out / "tensorboard")["train/loss"]
    assert [s for s, _ in tb] == list(range(1, 301))
    logged = {m["step"]: m["loss"] for m in metrics(out) if "tokens_per_s" in m}
    assert all(abs(v - logged[s]) <= 1e-5 * max(1.0, abs(v)) for s, v in tb)


def test_finished_run_is_lean_and_tracked(tsv_data, tmp_path):
    """Default train.keep_checkpoints_done=1: the final tag and irm.safetensors stay, older tags go; the
    TensorBoard events hold every step's loss and the final alignment gain."""
    out = tmp_path / "lean"
    res = run_module("irm_hpc.train", tiny_overrides(tsv_data, out, "train.max_steps=9", "train.keep_checkpoints=0",
                                                      "record.enabled=false"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert_finished(out, 9)
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["global_step00000009"]
    assert "freed" in res.stderr
    scalars = read_scalars(out / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 10))
    final = json.loads((out / "DONE").read_text())
    (step, gain), = [p for p in scalars["eval/alignment_gain"] if p[0] == 9]
    assert abs(gain - final["alignment_gain"]) < 1e-5 and {"train/lr", "train/tokens_per_s"} <= scalars.keys()


def test_keep_checkpoints_done_zero_leaves_weights_only(tsv_data, tmp_path):
    out = tmp_path / "weights-only"
    args = tiny_overrides(tsv_data, out, "train.max_steps=6", "train.keep_checkpoints_done=0", "record.enabled=false",
                          "train.tensorboard=false")
    res = run_module("irm_hpc.train", args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_finished(out, 6)
    assert not (out / "checkpoints").exists() and not (out / "tensorboard").exists()
    stamp = (out / "irm.safetensors").stat().st_mtime_ns
    assert run_module("irm_hpc.train", args).returncode == 0, "a finished run is not retrained"
    assert (out / "irm.safetensors").stat().st_mtime_ns == stamp
    bad = run_module("irm_hpc.train", tiny_overrides(tsv_data, tmp_path / "bad", "train.keep_checkpoints_done=-1"))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: train.keep_checkpoints_done")
    assert not (tmp_path / "bad").exists()


def test_finished_out_dir_is_not_retrained(tsv_data, tmp_path):
    out = tmp_path / "done"
    args = tiny_overrides(tsv_data, out, "record.enabled=false", "train.max_steps=2")
    assert run_module("irm_hpc.train", args).returncode == 0
    stamp = (out / "irm.safetensors").stat().st_mtime_ns
    assert run_module("irm_hpc.train", args).returncode == 0
    assert (out / "irm.safetensors").stat().st_mtime_ns == stamp


def test_intra_op_threads_follows_slurm_allocation(monkeypatch):
    from irm_hpc.dist import intra_op_threads

    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert intra_op_threads(None) is None
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert intra_op_threads(None) == 3
    assert intra_op_threads(5) == 5  # train.threads wins over the allocation
    with pytest.raises(ValueError, match="train.threads"):
        intra_op_threads(0)


def test_prune_checkpoints_keeps_newest_and_latest(tmp_path):
    from irm_hpc.components.checkpoint import prune_checkpoints

    for step in (5, 10, 15, 20):
        (tmp_path / f"global_step{step:08d}").mkdir()
    (tmp_path / "latest").write_text("global_step00000005")  # e.g. the newer tags failed to load
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["global_step00000010"]
    assert sorted(p.name for p in tmp_path.glob("global_step*")) == [
        "global_step00000005", "global_step00000015", "global_step00000020"]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        prune_checkpoints(tmp_path, keep=0)


def test_finished_run_continues_to_larger_max_steps(tsv_data, tmp_path):
    """A finished run re-run with a larger train.max_steps trains on from its final tag (issue #13): the
    metrics hold every step once, the HDF5 record has the steps of an uninterrupted run of the new length,
    the LR follows the schedule over the new total. A smaller max_steps is refused untouched; the same
    max_steps returns the saved result."""
    from irm_hpc.components.engine import lr_lambda
    from irm_hpc.config import load_config

    out, ref = tmp_path / "cont", tmp_path / "ref"
    common = ("record.every_steps=2", "train.keep_checkpoints=0")
    assert run_module("irm_hpc.train", tiny_overrides(tsv_data, out, *common)).returncode == 0  # 6 steps
    res = run_module("irm_hpc.train", tiny_overrides(tsv_data, out, *common, "train.max_steps=10"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "continuing the finished run" in res.stderr and "resuming from checkpoint step 6" in res.stderr
    assert_finished(out, 10)
    assert json.loads((out / "DONE").read_text())["step"] == 10
    assert sorted(p.name for p in (out / "checkpoints").glob("global_step*")) == ["global_step00000010"]
    assert not (out / "record").exists(), "the record was finalized again"
    assert run_module("irm_hpc.train", tiny_overrides(tsv_data, ref, *common, "train.max_steps=10")).returncode == 0
    with open_run(out) as run, open_run(ref) as ref_run:
        assert run.steps.tolist() == ref_run.steps.tolist() == [0, 2, 4, 6, 8, 10]
        assert sorted(set(run.probe.step.tolist())) == [0, 10], "old final probe (step 6) is replaced by step 10's"
        assert len(run.probe) == len(ref_run.probe) and run.prompts == ref_run.prompts
    cfg = load_config("train", tiny_overrides(tsv_data, out, "train.max_steps=10"))
    fn, lrs = lr_lambda(cfg.train), {m["step"]: m["lr"] for m in metrics(out) if "tokens_per_s" in m}
    assert all(abs(lrs[s] - cfg.train.lr * fn(s)) < 1e-9 for s in range(7, 11)), lrs

    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    same = run_module("irm_hpc.train", tiny_overrides(tsv_data, out, *common, "train.max_steps=10"))
    assert same.returncode == 0 and "continuing" not in same.stderr
    shorter = run_module("irm_hpc.train", tiny_overrides(tsv_data, out, *common, "train.max_steps=4"))
    assert shorter.returncode == 2 and "Traceback" not in shorter.stderr
    assert shorter.stderr.strip().splitlines()[-1] == (
        f"error: out_dir {out} holds a run finished at 10 steps; train.max_steps=4 cannot shorten it: pass "
        "train.max_steps=10 for its result, or choose another out_dir")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp, "nothing rewritten"


def test_finished_run_without_kept_tag_cannot_continue(tsv_data, tmp_path):
    out = tmp_path / "lean0"
    args = tiny_overrides(tsv_data, out, "train.keep_checkpoints_done=0", "record.enabled=false")
    assert run_module("irm_hpc.train", args).returncode == 0
    before = sorted(p.name for p in out.iterdir())
    res = run_module("irm_hpc.train", [*args, "train.max_steps=8"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "kept no checkpoint of step 6 (train.keep_checkpoints_done=0)" in last
    assert "choose another out_dir" in last
    assert sorted(p.name for p in out.iterdir()) == before and (out / "DONE").is_file()

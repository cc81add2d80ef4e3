"""The launcher without Slurm: submitit's local executor (the default where there is no sbatch)."""

from __future__ import annotations

import json

from conftest import run_module
from irm_hpc.manifest import load_manifest
from irm_hpc.record import open_run


def test_local_sweep_trains_every_task_then_analyses(tmp_path):
    res = run_module("irm_hpc.launch", ["--sweep", "smoke", "--cluster", "local", "--name", "loc", "--wait",
                                        f"runs_root={tmp_path}", "sweep.seeds=[0]", "train.max_steps=3",
                                        "sweep.evaluation.enabled=true", "sweep.ablation.enabled=true"],
                     timeout=600, env={"PATH": "/usr/bin:/bin"})  # no sbatch: as on a laptop
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sweep = tmp_path / "loc"
    m = load_manifest(sweep)
    assert m.executor == "local" and [t.alignment for t in m.tasks] == ["anger", "joy"]
    for task in m.tasks:
        out = m.task_dir(task)
        assert json.loads((out / "DONE").read_text())["step"] == 3
        with open_run(out / "injections.h5") as run:
            assert run.meta.alignment == task.alignment
    summary = json.loads((sweep / "analysis" / "summary.json").read_text())
    assert summary["n_runs"] == 2 and (sweep / "analysis" / "report.md").is_file()
    # the evaluation stage ran between training and the analysis, and the reduce pooled it
    ev = summary["evaluation"]
    assert ev["available"] and ev["n_runs_evaluated"] == 2 and ev["judge"]["macro_f1"] > 0
    for a in ("anger", "joy"):
        e = ev["per_alignment"][a]
        assert set(e) >= {"rate_off", "rate_on", "rate_diff", "rate_diff_ci", "perplexity_off", "perplexity_on"}
        assert e["rate_diff_ci"][0] <= e["rate_diff"] <= e["rate_diff_ci"][1]
    for task in m.tasks:
        run_eval = json.loads((m.task_dir(task) / "evaluation" / "summary.json").read_text())
        assert run_eval["alignment"] == task.alignment and run_eval["params"]["max_prompts"] == 4
    report = (sweep / "analysis" / "report.md").read_text()
    assert "## Steering and judging" in report and (sweep / "analysis" / "figures" / "evaluation.png").is_file()
    # then the ablation stage: it reads the consensus indices of the analysis; 3-step tiny runs have none,
    # so it ablates nothing, says why, and the reduce after it reports no ablation (the positive path of
    # AblateTask: tests/test_ablate.py)
    assert summary["consensus"]["indices"] == []
    assert summary["ablation"] == {"available": False} and "## Ablation" in report
    driver_out = "".join(p.read_text() for p in (sweep / "logs" / "driver").glob("*_log.out"))
    assert "nothing ablated:" in driver_out and "lists no consensus striation index" in driver_out
    assert not any((m.task_dir(t) / "ablation").exists() for t in m.tasks)
    status = run_module("irm_hpc.status", [str(sweep), "--json"], timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert status.returncode == 0, status.stderr
    assert all(r["done"] for r in json.loads(status.stdout)["tasks"])

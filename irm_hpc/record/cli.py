"""``python -m irm_hpc.record inspect RUN``: summary tables of a record (rich) and `main`."""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional

import numpy as np

from irm_hpc.errors import cli_errors
from irm_hpc.record.reader import RunReader, open_run


# ----------------------------------------------------------------------------- CLI
def _summary_tables(r: RunReader) -> list[Any]:
    from rich.table import Table

    m = r.meta
    meta = Table(title=f"record {r.path}", show_header=False)
    for key in ("schema_version", "model_name", "hidden_size", "n_layers", "injection_layers", "alignment",
                "seed", "package_version", "git_commit", "dtype", "finalized"):
        meta.add_row(key, str(getattr(m, key)))
    meta.add_row("config_yaml", f"{len(m.config_yaml.splitlines())} lines")
    if m.extra:
        meta.add_row("extra", json.dumps(m.extra))
    steps = r.steps
    cont = Table(title="contents", show_header=False)
    cont.add_row("profile records", str(len(r)))
    cont.add_row("step range", f"{steps.min()} .. {steps.max()}" if len(steps) else "-")
    cont.add_row("probe tokens", str(len(r.probe)))
    pst = np.unique(r.probe.step)
    cont.add_row("probe steps", f"{len(pst)} ({pst.min()} .. {pst.max()})" if len(pst) else "-")
    cont.add_row("prompts", str(len(r.prompts)))
    cont.add_row("base reference", "yes" if r.base_resid_abs is not None else "no")
    cont.add_row("files", str(len(r.files)))
    if r.checkpoint_step is not None or not m.finalized:
        cont.add_row("checkpoint step", str(r.checkpoint_step))
        cont.add_row("open segment", str(r.open_segment) if r.open_segment else (r.open_segment_error or "none"))
    cont.add_row("size on disk", f"{r.file_size / 2**20:.2f} MiB ({r.file_size} bytes)")
    ds = Table(title="datasets")
    for col in ("name", "shape", "dtype", "chunks", "compression"):
        ds.add_column(col)
    for d in r.datasets():
        ds.add_row(d["name"], str(d["shape"]), d["dtype"], str(d["chunks"]), d["compression"])
    return [meta, cont, ds]


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m irm_hpc.record inspect RUN``: print a summary; exit 2 with a one-line ``error: ...``
    (any `irm_hpc.errors.IrmError`, e.g. `RecordError`; `irm_hpc.errors.cli_errors`)."""
    ap = argparse.ArgumentParser(prog="python -m irm_hpc.record", description="Inspect an IRM injection record.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="summary of a run dir, injections.h5 or record/ dir")
    p.add_argument("run", help="run dir (out_dir), injections.h5 or record/ dir")
    args = ap.parse_args(argv)

    def inspect() -> None:
        from rich.console import Console

        with open_run(args.run) as r:
            console = Console()
            for table in _summary_tables(r):
                console.print(table)

    return cli_errors(inspect)

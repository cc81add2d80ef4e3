"""Command line of the striation analysis.

    python analysis/striations.py runs/<sweep> [--out DIR] [key=value ...]        # = analyze
    python -m irm_hpc.analysis analyze INPUT... [--out DIR] [key=value ...]
    python -m irm_hpc.analysis map RUN --out DIR [--name NAME] [key=value ...]     # one Slurm array task
    python -m irm_hpc.analysis reduce --out DIR [key=value ...]                    # after the map array
    irm-hpc analyze ...                                                            # same

INPUT: a sweep dir (``manifest.json``), run dirs, ``record/`` dirs, ``.h5`` files or globs. ``--out``
defaults to ``<INPUT>/analysis`` for a single directory, else ``./striation_analysis``. Parameters:
`irm_hpc.analysis.params.Params` (``key=value``, parsed with OmegaConf; unknown keys are rejected).
Exit status: 0 on success, 2 with a one-line ``error: ...`` when nothing can be analysed or an argument
is bad.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from irm_hpc.analysis.params import AnalysisError, parse_params, valid_keys
from irm_hpc.errors import cli_errors

COMMANDS = ("analyze", "map", "reduce")


def _split(items: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``key=value`` overrides from positional inputs (a path containing '=' that exists stays)."""
    import os

    over = [x for x in items if "=" in x and not os.path.exists(x)]
    return [x for x in items if x not in over], over


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m irm_hpc.analysis",
                                 description="Cross-run striation analysis of IRM injections.",
                                 epilog=f"parameters (key=value): {', '.join(valid_keys())}")
    sub = ap.add_subparsers(dest="cmd")
    a = sub.add_parser("analyze", help="discover runs, map them locally, reduce (default command)")
    a.add_argument("items", nargs="+", metavar="INPUT|key=value")
    a.add_argument("--out", help="output dir (default <INPUT>/analysis for one dir)")
    a.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    m = sub.add_parser("map", help="reduce one run to <out>/profiles/<name>.npz")
    m.add_argument("items", nargs="+", metavar="RUN|key=value")
    m.add_argument("--out", required=True)
    m.add_argument("--name", help="run label (default: task_id or run dir name)")
    r = sub.add_parser("reduce", help="cross-run analysis of <out>/profiles/*.npz")
    r.add_argument("items", nargs="*", metavar="key=value")
    r.add_argument("--out", required=True)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    """Run the CLI; returns the exit status: 0, or 2 with ``error: <one line>`` on stderr for a bad argument
    or any `irm_hpc.errors.IrmError` (`AnalysisError` above all; `irm_hpc.errors.cli_errors`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["analyze", *argv]
    ap = _parser()
    try:
        args, extra = ap.parse_known_args(argv)  # items after an option come back in ``extra``
        flags = [x for x in extra if x.startswith("-")]
        if flags:
            ap.error(f"unrecognized arguments: {' '.join(flags)}")
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.cmd is None:
        ap.print_usage(sys.stderr)
        return 2
    return cli_errors(lambda: _run(args, extra))


def _run(args: argparse.Namespace, extra: list[str]) -> None:
    """One command; raises AnalysisError (or another IrmError) for anything the user can fix."""
    inputs, over = _split([*getattr(args, "items", []), *extra])
    params = parse_params(over)
    if args.cmd == "analyze":
        from irm_hpc.analysis.pipeline import analyze

        _print_result(analyze(inputs, args.out, params, progress=not args.no_progress))
    elif args.cmd == "map":
        from irm_hpc.analysis.profiles import map_run

        if len(inputs) != 1:
            raise AnalysisError(f"map takes exactly one RUN (got {len(inputs)}: {inputs})")
        print(map_run(inputs[0], args.out, params, name=args.name))
    else:
        if inputs:
            raise AnalysisError(f"reduce takes no inputs besides key=value parameters (got {inputs})")
        from irm_hpc.analysis.pipeline import reduce_runs

        _print_result(reduce_runs(args.out, params))


def _print_result(s: dict) -> None:
    cons = ", ".join(f"{e['index']} ({e['share']:.0%}, {e['control']})" for e in s["consensus"]["indices"]) or "none"
    g = s["clustering"].get("groups_by")
    print(f"{s['n_runs']} runs analysed, {len(s['skipped'])} skipped; consensus striations: {cons}; "
          f"runs group by: {g}")
    out = s.get("out_dir")
    if out:
        print(f"report: {out}/report.md")


if __name__ == "__main__":
    sys.exit(main())

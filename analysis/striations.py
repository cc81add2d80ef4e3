"""Cross-run striation analysis of an IRM sweep (thin wrapper around `irm_hpc.analysis.cli`).

    python analysis/striations.py runs/<sweep> [--out DIR] [key=value ...]
    python analysis/striations.py 'runs/*/runs/*/injections.h5' --out DIR top_k_frac=0.02
    python analysis/striations.py map RUN --out DIR        # one run (Slurm array task)
    python analysis/striations.py reduce --out DIR         # after the map array

Writes ``<out>/summary.json``, ``<out>/report.md``, ``<out>/figures/*.png`` and ``<out>/profiles/*.npz``;
see docs/architecture.md ("Analysis"). Exit status 2 with a one-line error when nothing can be analysed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from irm_hpc.analysis.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

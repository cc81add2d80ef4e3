"""``irm-hpc <stage> ...``: one console script dispatching to the stage entry points.

Stages: ``train``, ``launch``, ``status``, ``record``, ``generate``, ``evaluate``, ``ablate``, ``analyze`` (each is also ``python -m irm_hpc.<stage>``).
``irm-hpc`` is also ``python -m irm_hpc`` or ``python -m irm_hpc.cli``. ``train`` and ``launch`` take
``--config-dir DIR`` (user presets, see ``irm_hpc.config.search_path``).
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional

STAGES = {"train": "irm_hpc.train", "launch": "irm_hpc.launch", "status": "irm_hpc.status",
          "record": "irm_hpc.record", "generate": "irm_hpc.generate", "evaluate": "irm_hpc.evaluate",
          "ablate": "irm_hpc.ablate", "analyze": "irm_hpc.analysis.cli"}


def main(argv: Optional[list[str]] = None) -> int:
    """Dispatch ``argv[0]`` to its stage's ``main(argv[1:])``; exit 2 listing the stages if unknown."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in STAGES:
        print(f"usage: irm-hpc {{{','.join(STAGES)}}} ...  (train/launch also take --config-dir DIR)", file=sys.stderr)
        return 2
    return int(importlib.import_module(STAGES[argv[0]]).main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())

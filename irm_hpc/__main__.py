"""``python -m irm_hpc`` = the ``irm-hpc`` console script."""

from irm_hpc.cli import main

raise SystemExit(main())

"""``python -m irm_hpc.analysis ...`` == ``irm-hpc analyze ...`` (see `irm_hpc.analysis.cli`)."""

import sys

from irm_hpc.analysis.cli import main

sys.exit(main())

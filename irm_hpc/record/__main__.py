"""``python -m irm_hpc.record inspect RUN`` == ``irm-hpc record inspect RUN`` (see `irm_hpc.record.cli`)."""

import sys

from irm_hpc.record.cli import main

sys.exit(main())

"""Child process for tests/test_record.py (SIGKILL test): records forever until killed.

Usage: ``python record_writer_child.py RECORD_DIR K [RESUME_STEP]``. Writes one profile per step
(values = step, so the parent can check them), a 4-token probe every 3rd step, and
``checkpoint(step)`` after every K steps. Starts at RESUME_STEP + 1 after ``resume(RESUME_STEP)``
(default: fresh start, ``resume(-1)``).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from irm_hpc.record import RunRecorder

N_INJ, HIDDEN, N_LAYERS = 3, 16, 6
META = {"model_name": "tiny", "hidden_size": HIDDEN, "n_layers": N_LAYERS, "injection_layers": [1, 3, 5],
        "alignment": "joy", "seed": 0, "config_yaml": "x: 1\n", "package_version": "0.1.0", "git_commit": ""}


def profile(step: int) -> np.ndarray:
    """(n_inj, hidden) record whose every value encodes ``step`` (exact in float16 up to 2048)."""
    return np.full((N_INJ, HIDDEN), step % 2048, dtype=np.float32)


def main(record_dir: str, k: int, resume_step: int = -1) -> None:
    rec = RunRecorder(record_dir, META, n_inj=N_INJ, hidden=HIDDEN, queue_size=4)
    rec.resume(resume_step)
    rec.set_prompts(["a prompt"])
    step = resume_step + 1
    while True:
        rec.add_profile(step, profile(step), -profile(step), 7)
        if step % 3 == 0:
            inj = np.broadcast_to(profile(step), (4, N_INJ, HIDDEN))
            rec.add_probe(step, inj, np.arange(4), ["t0", "t1", "t2", "t3"], 0, np.arange(4), np.arange(4) > 1)
        if step % k == k - 1:
            rec.checkpoint(step)
        step += 1
        time.sleep(0.0005)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else -1)

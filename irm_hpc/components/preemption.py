"""Slurm timeout / preemption under submitit: defer the requeue signal to an optimizer-step boundary.

Source: submitit's checkpointing protocol (``submitit.helpers.Checkpointable``; ``sbatch
--signal=USR2@<signal_delay_s>``; ``submitit.JobEnvironment.USR_SIG``, overridable with the env var
``SUBMITIT_PREEMPT_SIGNAL``).
"""

from __future__ import annotations

import signal
from typing import Optional

import torch

from irm_hpc.dist import log0


def submitit_signal() -> Optional[signal.Signals]:
    """The signal submitit's job environment requeues on (``SIGUSR2`` by default), or None without
    submitit. Uses the public ``submitit.JobEnvironment.USR_SIG`` name."""
    try:
        import submitit
    except ImportError:
        return None
    return getattr(signal, "SIG" + str(submitit.JobEnvironment.USR_SIG), None)


class PreemptionGuard:
    """Defer submitit's timeout/preemption signal to the next optimizer-step boundary.

    Under submitit, ``--signal=USR2@<signal_delay_s>`` reaches every rank; submitit's handler would
    requeue at once, mid-step. The guard records the signal instead; at the next step boundary the ranks
    agree (all-reduce MAX), write a DeepSpeed checkpoint together, and rank 0 then runs submitit's
    handler, which calls ``TrainTask.checkpoint()`` and ``scontrol requeue``. Outside submitit
    (no handler installed for the signal) the guard does nothing.
    """

    def __init__(self):
        self.pending: Optional[tuple] = None
        self.sig = None
        self.prev = None

    def install(self) -> None:
        """Take over the signal if submitit has installed a handler for it (inside a submitit job)."""
        sig = submitit_signal()
        if sig is None:
            return
        prev = signal.getsignal(sig)
        if callable(prev):
            self.sig, self.prev = sig, prev
            signal.signal(sig, self._defer)

    def _defer(self, signum, frame) -> None:
        log0("caught signal %d: checkpointing at the next step boundary, then requeueing", signum)
        self.pending = (signum, frame)

    def requested(self, world_size: int) -> bool:
        """True on every rank if any rank got the signal (collective when world_size > 1)."""
        if self.prev is None:
            return False
        flag = torch.tensor([int(self.pending is not None)])
        if world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def release(self, is_main: bool) -> None:
        """Restore submitit's handler; if a signal is pending, let it requeue (rank 0) and stop this rank."""
        if self.prev is None:
            return
        signal.signal(self.sig, self.prev)
        if self.pending is None:
            return
        if is_main:
            self.prev(*self.pending)  # submitit: checkpoint() -> scontrol requeue -> sys.exit
        raise SystemExit(0)

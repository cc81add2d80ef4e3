"""Process-group setup and rank-0 logging.

Ranks come from the environment, as set by ``torchrun``, by submitit's
``submitit.helpers.TorchDistributedEnvironment().export()`` under ``srun``, or (single process) filled in
here. Without CUDA we select DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``) and the gloo backend.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from irm_hpc.errors import ConfigError

log = logging.getLogger("irm_hpc")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's ephemeral (client) port range, ``net.ipv4.ip_local_port_range`` (Linux default
    32768-60999); ``(32768, 60999)`` where it cannot be read."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def job_master_port(job_id: str, low: int = 20000) -> int:
    """A rendezvous port for a multi-rank Slurm job, the same on every rank (seeded by ``job_id``, as
    submitit's ``TorchDistributedEnvironment``), but drawn below the ephemeral range: submitit draws from
    20000-60000, where the port may already be held by some process's outgoing connection, and the
    rendezvous then fails with EADDRINUSE (seen once in a 200-task sweep on one host). Falls back to
    20000-60000 when the ephemeral range starts at or below ``low``."""
    eph_low, _ = ephemeral_port_range()
    high = eph_low - 1 if eph_low > low + 1000 else 60000
    return random.Random(str(job_id)).randint(low, high)


def configure_accelerator() -> None:
    """Select DeepSpeed's CPU accelerator when no CUDA device exists (before importing deepspeed)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def intra_op_threads(requested: int | None) -> int | None:
    """The torch intra-op thread count for this process.

    ``requested`` (``train.threads``) wins; otherwise Slurm's ``SLURM_CPUS_PER_TASK`` (the CPUs the job
    was allocated per task), so that array tasks sharing a node do not each start one thread per core
    of the machine; otherwise ``None`` (keep torch's default). Raises ``ConfigError`` for a count < 1.
    """
    if requested is not None:
        if int(requested) < 1:
            raise ConfigError(f"train.threads must be >= 1 or null, got {requested}")
        return int(requested)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(slurm) if slurm.isdigit() and int(slurm) >= 1 else None


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through ``deepspeed.init_distributed`` (idempotent).

    Backend: nccl with CUDA (after ``torch.cuda.set_device`` to the rank's device,
    ``models.cuda_device_index``), gloo on CPU. A single process without launcher variables gets
    RANK=0, WORLD_SIZE=1 and a free loopback port.
    """
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    configure_accelerator()
    import deepspeed

    if torch.cuda.is_available():  # NCCL binds each rank's communicator to its current device
        from irm_hpc.models import default_device

        torch.cuda.set_device(default_device())
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return DistInfo(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def placement(info: DistInfo, device: torch.device) -> dict:
    """Where this rank runs: ``rank``, ``local_rank``, ``node`` (host name), ``slurm_node`` (Slurm's node
    name, ``None`` outside Slurm; simulated nodes share one host), ``cuda_visible_devices`` (as the
    scheduler set it, ``None`` if unset) and ``device`` (e.g. ``cuda:1``, ``cpu``)."""
    return {"rank": info.rank, "local_rank": info.local_rank, "node": socket.gethostname(),
            "slurm_node": os.environ.get("SLURMD_NODENAME"),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": str(device)}


def gather_placements(info: DistInfo, device: torch.device) -> list[dict]:
    """Every rank's :func:`placement`, in rank order (a collective: all ranks call it)."""
    out: list = [None] * info.world_size
    torch.distributed.all_gather_object(out, placement(info, device))
    return out


def setup_logging(rank: int) -> None:
    """INFO logs on rank 0, warnings only elsewhere; quiet DeepSpeed's own INFO chatter."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S", force=True)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def log0(msg: str, *args) -> None:
    """Log ``msg`` on rank 0 only."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        log.info(msg, *args)

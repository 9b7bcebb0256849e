"""Process-group helpers: rank/world from the environment (torchrun, deepspeed, SLURM)."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for n in names:
        if os.environ.get(n):
            return int(os.environ[n])
    return default


def dist_info() -> DistInfo:
    """Read rank and world size: torchrun/deepspeed set RANK/WORLD_SIZE, `srun` sets SLURM_*."""
    if tdist.is_available() and tdist.is_initialized():
        return DistInfo(tdist.get_rank(), tdist.get_world_size(), _env_int("LOCAL_RANK", default=0))
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    return DistInfo(rank, world, local)


def init_distributed() -> DistInfo:
    """Initialise the default process group when launched with several processes (gloo on CPU)."""
    info = dist_info()
    if info.world_size > 1 and not tdist.is_initialized():
        # srun gives ranks but not the torchrun variables torch.distributed reads.
        os.environ.setdefault("RANK", str(info.rank))
        os.environ.setdefault("WORLD_SIZE", str(info.world_size))
        os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        tdist.init_process_group(backend=backend)
        log.info("process group up: rank %d/%d (%s)", info.rank, info.world_size, backend)
    return dist_info()


def destroy_distributed() -> None:
    """Take the process group down, and DeepSpeed's cached handles of it, so that a later job in
    the same process (an eval run after another) can start a fresh one."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
    if "deepspeed" in sys.modules:
        import deepspeed.comm.comm as ds_comm
        import deepspeed.utils.groups as ds_groups

        ds_groups._WORLD_GROUP = None
        ds_comm.cdb = None


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def is_main() -> bool:
    return dist_info().is_main

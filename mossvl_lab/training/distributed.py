"""Multi-process data parallel plumbing (torch.distributed; launched by torchrun): gloo on CPU, NCCL on GPU."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in TORCHRUN_ENV)


def init_distributed(device: str | torch.device | None = None, timeout_minutes: float = 120.0) -> DistInfo:
    """Join the process group torchrun describes (env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK).

    device: "cpu" or "cuda" (default: cuda when available). The backend follows it: NCCL for CUDA (each rank
    on cuda:LOCAL_RANK), gloo on CPU. Without the torchrun environment this is a single process and nothing
    is initialised. Calling it again returns the existing group's info. The long timeout lets rank 0 evaluate
    while the others wait at the next collective."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    target = torch.device("cuda", local_rank) if kind == "cuda" else torch.device(kind)
    if not is_initialized() and not launched_by_torchrun():
        return DistInfo(device=torch.device("cuda", 0) if kind == "cuda" else target)
    if not is_initialized():
        if kind == "cuda":
            torch.cuda.set_device(target)
        backend = "nccl" if kind == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                **({"device_id": target} if kind == "cuda" else {}))
        logger.info("joined %s process group: rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=target)


def current() -> DistInfo:
    """The running process group's info (rank 0 of 1 when none), on the device of an existing group."""
    if not is_initialized():
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = dist.get_backend() == "nccl"
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy); the tensor itself when not distributed."""
    if not is_initialized():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()

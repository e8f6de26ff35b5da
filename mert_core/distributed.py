"""torchrun awareness: rank, world size, process group, device."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mert_core.paths import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def info_from_env() -> DistInfo:
    """This process's place in a torchrun launch (rank 0 of 1 without torchrun); starts nothing."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def setup(device_request: str = "auto", timeout: timedelta | None = None) -> tuple[DistInfo, torch.device]:
    """Read torchrun's environment, start the process group, pick the device.

    gloo on CPU, nccl on CUDA. Without torchrun's variables this is a
    single-process run and nothing is initialised. ``timeout``: how long a
    collective waits for the slowest rank (default: torch's).
    """
    info = info_from_env()
    device = torch.device(resolve_device(device_request, info.local_rank))
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{info.local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        extra = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", **extra)
    return info, device


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()

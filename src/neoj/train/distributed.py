"""Processes and devices: this process's place among the ones torchrun started, and the model wrapped for them
(DDP, or FSDP sharding)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .args import TrainError


@dataclass
class Dist:
    """This process's place among the processes torchrun started (1 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Returns whether this is rank 0, the process that writes files and shows progress."""
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        """Returns the values summed over all processes."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, value) -> list:
        """Returns `value` of every process, by rank (picklable objects)."""
        if self.world == 1:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values


def setup_distributed(device: str) -> Dist:
    """Joins torchrun's process group when there is one (gloo on CPU, nccl on CUDA); returns this rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device {device!r} asked for, but this PyTorch has no CUDA device")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world > 1 else 0)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def wrap_for_processes(module: torch.nn.Module, model, processes: Dist, fsdp: bool) -> torch.nn.Module:
    """Returns `module` (the loss around `model`) as it runs on several processes: FSDP-sharded block by
    block, or under DDP; unchanged on one process without FSDP."""
    if processes.world == 1 and not fsdp:
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        return fully_shard(module)
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = processes.device
    return DDP(module, device_ids=[dev.index] if dev.type == "cuda" else None)

"""Training on several processes: joining torchrun's processes (neoj.distributed) and the model wrapped for them
(DDP, or FSDP sharding)."""

from __future__ import annotations

import torch

from ..distributed import Processes as Dist, ProcessesError, join_processes
from .args import TrainError

# A training step's collectives may wait on rank 0 writing a checkpoint: torch's own default, 30 minutes.
TRAINING_TIMEOUT_S = 1800.0


def setup_distributed(device: str) -> Dist:
    """Joins torchrun's process group when there is one (see neoj.distributed); returns this rank."""
    try:
        return join_processes(device, timeout_s=TRAINING_TIMEOUT_S)
    except ProcessesError as exc:
        raise TrainError(str(exc)) from None


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

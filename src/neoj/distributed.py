"""Processes: this process's place among the ones torchrun started, and the collectives neoj uses between them.

Everything neoj runs on more than one process (tensor parallelism, batch jobs split across ranks, distributed
training) joins torch.distributed's default process group here: NCCL between GPUs, gloo on CPU. Collectives
time out (NEOJ_COLLECTIVE_TIMEOUT seconds, default COLLECTIVE_TIMEOUT_S) instead of waiting forever for a
rank that died, so a job missing a process stops with an error naming the cause rather than hanging.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .devices import resolve_device
from .errors import NeojError

COLLECTIVE_TIMEOUT_S = 300.0


class ProcessesError(NeojError):
    """A process group could not be joined, or a collective failed (a rank died or timed out)."""


@dataclass
class Processes:
    """This process's place among the processes torchrun started (1 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Returns whether this is rank 0, the process that writes files, prints and serves HTTP."""
        return self.rank == 0

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def sum(self, *values: float) -> list[float]:
        """Returns the values summed over all processes."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        """Waits until every process gets here."""
        if self.world > 1:
            dist.barrier()

    def gather(self, value) -> list:
        """Returns `value` of every process, by rank (picklable objects)."""
        if self.world == 1:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def broadcast(self, value=None, src: int = 0):
        """Returns rank `src`'s `value` on every process (a picklable object; other ranks pass anything)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=src, device=self._collective_device())
        return box[0]


def torchrun_world() -> int:
    """Returns the number of processes torchrun started (1 when not run by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def collective_timeout() -> float:
    """Returns the seconds a collective waits for the other ranks (NEOJ_COLLECTIVE_TIMEOUT or the default)."""
    raw = os.environ.get("NEOJ_COLLECTIVE_TIMEOUT")
    try:
        return float(raw) if raw else COLLECTIVE_TIMEOUT_S
    except ValueError:
        raise ProcessesError(f"NEOJ_COLLECTIVE_TIMEOUT={raw!r} is not a number of seconds") from None


def process_device(device: str | torch.device | None, local_rank: int, world: int) -> torch.device:
    """Returns this rank's device: "auto" is CUDA when present; a bare "cuda" becomes cuda:LOCAL_RANK."""
    try:
        dev = resolve_device(device)
    except NeojError as exc:
        raise ProcessesError(str(exc)) from None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world > 1 else 0)
    return dev


def join_processes(device: str | torch.device | None = "auto", timeout_s: float | None = None) -> Processes:
    """Joins torchrun's process group when there is one (nccl on CUDA, gloo on CPU); returns this rank's place.

    Without torchrun (WORLD_SIZE unset or 1) it returns rank 0 of 1 and joins nothing. Collectives time out
    after `timeout_s` (default collective_timeout()).
    """
    world = torchrun_world()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = process_device(device, local_rank, world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s or collective_timeout()))
        except (RuntimeError, ValueError) as exc:
            raise ProcessesError(f"could not join the {world} processes torchrun started ({backend}): "
                                 f"{str(exc).splitlines()[0]}") from exc
    return Processes(rank, world, local_rank, dev)


def leave_processes() -> None:
    """Leaves the process group (at the end of a command), if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

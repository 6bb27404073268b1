"""Placing a model's layers across devices (a device map): GPT-J across two 12 GB GPUs, or a GPU plus CPU memory.

The planner decides from free memory which blocks go where (pure functions of the budgets, testable without the
devices); the embeddings, final norm and LM head stay on the first device. Activations move once per boundary
(Transformer.block_devices) and each layer's keys and values live on its layer's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .model import Transformer


@dataclass(frozen=True)
class Placement:
    """Where a model's parts go: the embeddings, final norm and head on `home`; block i on blocks[i]."""

    home: torch.device
    blocks: tuple[torch.device, ...]


def plan_device_map(device_map: str | dict, cfg: ModelConfig, dtype: torch.dtype, spec=None,
                    context: int | None = None, batch: int = 1, check: bool = True) -> Placement:
    """Returns the Placement a device map asks for: "auto" (the planner splits by free memory) or explicit layer
    ranges ("0-13:cuda:0,14-27:cpu"); raises MemoryPlanError with advice when nothing fits."""
    raise NotImplementedError


def load_placed(directory: Path | None, cfg: ModelConfig, dtype: torch.dtype, placement: Placement, spec=None,
                stored=None, seed: int = 0) -> Transformer:
    """Returns the model in `directory` (None: random weights drawn with `seed`) with each tensor loaded straight
    onto its device."""
    raise NotImplementedError

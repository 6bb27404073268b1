"""Tensor parallelism: one model split over the processes torchrun started, each holding 1/N of every layer.

Megatron's split, over torch.distributed (neoj.distributed): attention heads and the MLP's inner width are split
by columns (q/k/v, fc_in: each rank computes its heads and its slice of the inner activations), then by rows
(out_proj, fc_out: each rank's product is a partial sum), so one all-reduce after attention and one after the MLP
finish a layer (Block.reduce; GPT-J's parallel block sums both branches first and needs one). The token embedding
and LM head are split by vocabulary. Every rank runs the same program on the same inputs and gets the same
logits, so generation, sampling and the KV cache (each rank caches only its heads) stay in step without more
messages.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ModelConfig
from .distributed import Processes
from .model import Transformer


def tensor_parallel_processes(tp: int, device) -> Processes:
    """Joins the `tp` processes torchrun started; returns this rank's place (raises NeojError when the number of
    processes is not tp)."""
    raise NotImplementedError


def load_tensor_parallel(directory: Path | None, cfg: ModelConfig, dtype: torch.dtype, processes: Processes,
                         spec=None, stored=None, check_memory: bool = True, context: int | None = None,
                         batch: int = 1, seed: int = 0) -> Transformer:
    """Returns this rank's shard of the model in `directory` (None: random weights drawn with `seed`), each rank
    reading only its slice of every tensor."""
    raise NotImplementedError

"""One decode step (a token per row -> next-token logits) recorded once as a CUDA graph and replayed.

A decode step of a 6B model is ~30 small kernels per layer; launched one by one from Python, the
launches, not the GPU, set the pace at batch 1. Replaying a recorded graph launches them all at once
(the gpt-fast way, here without torch.compile, so there is no compile wait). A graph fixes every
shape and address, so the step runs on a KVCache in its static mode (`KVCache.slot`): keys and values
are written at a slot held in a device tensor, and attention reads all `max_len` slots with a mask.

`DecodeStep.for_cache` returns the graphed step on CUDA and the plain one elsewhere (or with
NEOJ_CUDA_GRAPHS=0); both are called the same way and give the same logits.

With LoRA adapters served (neoj.adapters), a step with adapter rows replays a second graph, recorded with
the wrappers reading the routing's fixed per-row slot buffer: one graph for any mix of adapters. A step
without adapter rows replays the base graph, which has no adapter work in it.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .adapters import served_adapters
from .kv_cache import KVCache, LayerSplit


def graphs_enabled(device: torch.device) -> bool:
    """True when decode steps on `device` should be replayed from CUDA graphs (NEOJ_CUDA_GRAPHS=0: never)."""
    return device.type == "cuda" and os.environ.get("NEOJ_CUDA_GRAPHS", "1") != "0"


class DecodeStep:
    """Runs the model on one new token per row and returns the fp32 logits (B, vocab), eagerly."""

    def __init__(self, model, cache: KVCache):
        self.model, self.cache = model, cache

    @staticmethod
    def for_cache(model, cache: KVCache) -> "DecodeStep":
        """Returns the graphed step where graphs are enabled for the cache's device, else the eager one. A cache
        split across devices (a device map) runs eagerly: one graph would have to span every device's layers and
        the copies between them. A model split over processes (tensor parallelism) also runs eagerly: recording its
        collectives into a graph has not been checked on GPUs yet."""
        split = isinstance(cache.k, LayerSplit) or getattr(model, "tensor_parallel", None) is not None
        if split or not graphs_enabled(cache.k.device):
            return DecodeStep(model, cache)
        return GraphedDecodeStep(model, cache)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.model(tokens.view(-1, 1), positions.view(-1, 1), self.cache)
        return self.model.logits(hidden[:, -1])


class GraphedDecodeStep(DecodeStep):
    """The same step on the static cache, recorded as a CUDA graph on its first call and replayed after.

    Inputs are copied into fixed buffers; the logits returned are the graph's own output buffer, valid
    until the next call. `capture=False` runs the static step without recording (CPU tests of the
    static path).
    """

    WARMUP_RUNS = 2  # before recording: cuBLAS handles, autotuned Triton kernels and lazy inits happen here

    def __init__(self, model, cache: KVCache, capture: bool = True):
        super().__init__(model, cache)
        device = cache.k.device
        B = cache.k.shape[1]
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # this step's own: a cache may have several
        cache.slot = self.slot
        self.capture = capture
        # A recorded graph and its logits buffer per adapter state: None (no adapter row) or the routing's
        # version (adapter rows; a newer version means new adapter stacks, which the old graph does not read).
        self.graphs: dict[int | None, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _static_step(self) -> torch.Tensor:
        """One forward on the fixed buffers (the model leaves a static cache's length to __call__)."""
        return self.model.logits(self.model(self.tokens, self.positions, self.cache)[:, -1])

    def _record(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        with torch.cuda.device(self.cache.k.device):  # streams and the graph on the model's GPU (cuda:N too)
            return self._record_here()

    def _record_here(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_RUNS):  # writes this step's own keys and values: the replay rewrites them
                self._static_step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._static_step()
        return graph, logits

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.cache.length >= self.cache.max_len:
            raise ValueError(f"KV cache holds {self.cache.max_len} tokens; cannot decode past it")
        self.tokens.copy_(tokens.view(-1, 1))
        self.positions.copy_(positions.view(-1, 1))
        self.cache.slot = self.slot
        self.slot.fill_(self.cache.length)
        served = served_adapters(self.model)
        routing = served.routing if served is not None and served.routing.active else None
        key = routing.version if routing is not None else None
        with routing.static() if routing is not None else contextlib.nullcontext():
            if not self.capture:
                logits = self._static_step()
            else:
                if key not in self.graphs:
                    if key is not None:  # stale adapter graphs (older stacks) go
                        self.graphs = {k: v for k, v in self.graphs.items() if k is None}
                    self.graphs[key] = self._record()
                graph, logits = self.graphs[key]
                graph.replay()
        self.cache.length += 1
        return logits


class DecodeSteps:
    """Decode steps for a cache whose rows come and go (the engine's BatchCache): one step per layout.

    A recorded graph holds the cache's shapes and addresses, so it replays only while the cache keeps the
    same rows and storage (its `layout`). Up to `keep` layouts keep their graph, so a batch that shrinks and
    regrows reuses them; growing the storage makes them all stale. Eager steps hold no state.
    """

    def __init__(self, model, cache, make_step=DecodeStep.for_cache, keep: int = 8):
        self.model, self.cache, self.make_step, self.keep = model, cache, make_step, keep
        self.steps: dict[tuple, DecodeStep] = {}

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Returns the next-token logits (B, vocab) after feeding one token per row of the cache."""
        layout = self.cache.layout
        step = self.steps.get(layout)
        if step is None:
            storage = layout[1:]
            self.steps = {k: v for k, v in self.steps.items() if k[1:] == storage}
            if len(self.steps) >= self.keep:
                self.steps.pop(next(iter(self.steps)))
            step = self.steps[layout] = self.make_step(self.model, self.cache)
        return step(tokens, positions)

"""Tensor parallelism: one model split over the processes torchrun started, each holding 1/N of every layer.

Megatron's split, over torch.distributed (neoj.distributed): attention heads and the MLP's inner width are split
by columns (q/k/v, fc_in: each rank computes its heads and its slice of the inner activations), then by rows
(out_proj, fc_out: each rank's product is a partial sum), so one all-reduce after attention and one after the MLP
finish a layer (Block.reduce; GPT-J's parallel block sums both branches first and needs one). The token embedding
and LM head are split by vocabulary. Every rank runs the same program on the same inputs and gets the same
logits, so generation, sampling and the KV cache (each rank caches only its heads) stay in step without more
messages.

In weight terms (nn.Linear stores (out, in)): q/k/v, fc_in and the head are split by rows, out_proj and fc_out by
columns; the biases of out_proj and fc_out live on rank 0 only, so the all-reduce adds them once. Each rank reads
only its slice of every tensor (neoj.weights.readers' read_slice). Quantized layers equal the single-process
ones: a row-split weight is quantized from its rows alone (rows are quantized independently), a column-split one
whole and then cut (int8's per-row scale needs the whole row; int4's groups must not straddle two ranks).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .devices import available_memory
from .distributed import Processes, join_processes, process_device, torchrun_world
from .errors import CheckpointError, ConfigError, NeojError
from .memory import DTYPE_NAMES, GIB, RUNTIME_BYTES, MemoryPlanError, fitting_plans, memory_limit, plan
from .model import Transformer
from .quantize import GROUP_SIZES, QuantLinear, QuantSpec, quantize_weight, read_quantized, replace_linear
from .weights import (assign_tensor, build_meta, expected_tensors, fill_model, random_tensors, read_checkpoint,
                      weight_files)
from .weights.names import hf_to_neoj_name
from .weights.readers import StoredTensor

ROWS, COLUMNS = 0, 1  # the dimension of a (out, in) weight a layer is split along


def tensor_parallel_processes(tp: int, device) -> Processes:
    """Joins the `tp` processes torchrun started; returns this rank's place (raises NeojError when the number of
    processes is not tp)."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise NeojError(f"--tp must be a whole number of processes, at least 1 (got {tp!r})")
    if tp == 1:
        return Processes(device=process_device(device, 0, 1))
    world = torchrun_world()
    if world != tp:
        started = "this process was started alone" if world == 1 else f"torchrun started {world}"
        raise NeojError(f"--tp {tp} needs {tp} processes; start them with torchrun --nproc-per-node {tp} -m neoj "
                        f"... --tp {tp} ({started})")
    processes = join_processes(device)
    same_sampling_seed(processes)
    return processes


def same_sampling_seed(processes: Processes) -> int:
    """Seeds torch's global generator alike on every rank (rank 0 draws the seed); returns it.

    The engine draws each unseeded sequence's seed from that generator: the ranks then sample the same tokens.
    """
    seed = int(torch.randint(0, 2**62, (1,))) if processes.main else None
    seed = processes.broadcast(seed)
    torch.manual_seed(seed)
    return seed


# ---------------------------------------------------------------------------------------------------------
# The split modules


class Shard:
    """This rank's range [lo, hi) of a dimension of `size` split over the processes (the last may be shorter)."""

    def __init__(self, size: int, processes: Processes, even: bool = True):
        self.size, self.world = size, processes.world
        self.width = size // self.world if even else -(-size // self.world)  # ceil: the padded shard width
        self.lo = min(size, processes.rank * self.width)
        self.hi = min(size, self.lo + self.width)


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Returns t summed over the ranks (in place): Block.reduce under tensor parallelism."""
    dist.all_reduce(t)
    return t


class VocabParallelEmbedding(nn.Module):
    """The token embedding split by vocabulary: rank r holds rows [lo, hi) and looks up only ids there; the
    all-reduce then gives every rank the full embedding (exactly: the other ranks add zeros)."""

    def __init__(self, weight: torch.Tensor, shard: Shard):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.lo, self.hi, self.world = shard.lo, shard.hi, shard.world

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.lo
        inside = (local >= 0) & (local < self.hi - self.lo)
        x = F.embedding(torch.where(inside, local, 0), self.weight)  # (B, T, C)
        if self.world == 1:
            return x
        return all_reduce(x.masked_fill_(~inside[..., None], 0))


class VocabParallelHead(nn.Module):
    """The LM head split by vocabulary: `local` (nn.Linear or QuantLinear) computes this rank's logits, which are
    gathered from every rank into the full (..., vocab). Shards are padded to one width for the gather."""

    def __init__(self, local: nn.Module, shard: Shard):
        super().__init__()
        self.local = local
        self.vocab, self.width, self.world = shard.size, shard.width, shard.world

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        y = self.local(hidden)  # (..., hi - lo)
        if self.world == 1:
            return y
        if y.shape[-1] < self.width:
            y = F.pad(y, (0, self.width - y.shape[-1]))
        y = y.contiguous()
        parts = [torch.empty_like(y) for _ in range(self.world)]
        dist.all_gather(parts, y)
        return torch.cat(parts, dim=-1)[..., : self.vocab]


def _meta_linear(out_features: int, in_features: int, bias: bool) -> nn.Linear:
    """Returns an nn.Linear whose parameters are on the meta device (no memory, no initialisation), to be filled."""
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = in_features, out_features
    layer.weight = nn.Parameter(torch.empty(out_features, in_features, device="meta"), requires_grad=False)
    layer.bias = nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False) if bias else None
    return layer


# ---------------------------------------------------------------------------------------------------------
# Planning the split


def check_divisible(cfg: ModelConfig, world: int, spec: QuantSpec | None = None) -> None:
    """Raises ConfigError unless the heads and the MLP's inner width divide among `world` ranks (and, for int4,
    each rank's columns of out_proj and fc_out hold whole groups)."""
    if cfg.n_heads % world:
        raise ConfigError(f"--tp {world} cannot split {cfg.n_heads} attention heads evenly; use a --tp that divides "
                          f"{cfg.n_heads}")
    if cfg.intermediate_size % world:
        raise ConfigError(f"--tp {world} cannot split the MLP's intermediate size {cfg.intermediate_size} evenly; use "
                          f"a --tp that divides {cfg.intermediate_size}")
    if spec is not None and spec.scheme == "int4":
        widths = (cfg.hidden_size // world, cfg.intermediate_size // world)
        if any(w % spec.group_size for w in widths):
            fits = [g for g in GROUP_SIZES if not any(w % g for w in widths)]
            advice = f"use --group-size {' or '.join(map(str, fits))}" if fits else "use int8 or a smaller --tp"
            raise ConfigError(f"int4 group size {spec.group_size} does not divide each rank's {widths[0]} attention "
                              f"and {widths[1]} MLP input columns under --tp {world}; {advice}")


class SplitPlan:
    """Which slice of every checkpoint tensor this rank keeps: name -> (dim, lo, hi), or None to drop it (the
    biases of out_proj and fc_out off rank 0); names not listed are kept whole (norms, wpe)."""

    def __init__(self, cfg: ModelConfig, processes: Processes):
        n, rank = processes.world, processes.rank
        heads = Shard(cfg.hidden_size, processes)  # whole heads: hidden / n is a multiple of head_dim
        inner = Shard(cfg.intermediate_size, processes)
        self.vocab = Shard(cfg.vocab_size, processes, even=False)
        self.local_heads = cfg.n_heads // n
        self.slices: dict[str, tuple | None] = {}
        for i in range(cfg.n_layers):
            attn, mlp = f"blocks.{i}.attn", f"blocks.{i}.mlp"
            for proj in ("q_proj", "k_proj", "v_proj"):
                self.slices[f"{attn}.{proj}.weight"] = (ROWS, heads.lo, heads.hi)
            self.slices[f"{attn}.out_proj.weight"] = (COLUMNS, heads.lo, heads.hi)
            self.slices[f"{mlp}.fc_in.weight"] = (ROWS, inner.lo, inner.hi)
            self.slices[f"{mlp}.fc_in.bias"] = (ROWS, inner.lo, inner.hi)
            self.slices[f"{mlp}.fc_out.weight"] = (COLUMNS, inner.lo, inner.hi)
            if rank:
                self.slices[f"{attn}.out_proj.bias"] = self.slices[f"{mlp}.fc_out.bias"] = None
        for name in ("wte.weight", "lm_head.weight", "lm_head.bias"):
            self.slices[name] = (ROWS, self.vocab.lo, self.vocab.hi)
        self.heads, self.inner = heads, inner


def shard_meta_model(cfg: ModelConfig, plan: SplitPlan, processes: Processes) -> Transformer:
    """Returns the meta-device model with this rank's shapes: its heads, its slice of the MLP and vocabulary,
    Block.reduce set to the all-reduce."""
    model = build_meta(cfg)
    c, heads, inner, vocab = cfg.hidden_size, plan.heads, plan.inner, plan.vocab
    width, inner_width = heads.hi - heads.lo, inner.hi - inner.lo
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        attn.n_heads = plan.local_heads
        attn.q_proj, attn.k_proj, attn.v_proj = (_meta_linear(width, c, False) for _ in range(3))
        attn.out_proj = _meta_linear(c, width, cfg.out_proj_bias and processes.main)
        mlp.fc_in = _meta_linear(inner_width, c, True)
        mlp.fc_out = _meta_linear(c, inner_width, processes.main)
        block.reduce = all_reduce if processes.world > 1 else None
    model.wte = VocabParallelEmbedding(torch.empty(vocab.hi - vocab.lo, c, device="meta"), vocab)
    model.lm_head = VocabParallelHead(_meta_linear(vocab.hi - vocab.lo, c, cfg.lm_head_bias), vocab)
    return model


# ---------------------------------------------------------------------------------------------------------
# Reading this rank's slices


class SlicedTensor(StoredTensor):
    """A checkpoint tensor seen through this rank's slice: it checks against the full shape (so a bad checkpoint
    gets the usual errors) and reads only the slice (or, for a layer quantized whole before it is cut, all of it)."""

    def __init__(self, stored: StoredTensor, cut: tuple | None, read_dtype: torch.dtype | None):
        super().__init__(stored.key, stored.dtype, stored.shape, stored.file)
        self.stored, self.cut, self.read_dtype = stored, cut, read_dtype

    def describe(self) -> str:
        return self.stored.describe()

    def check_fits(self, want: tuple) -> None:
        self.stored.check_fits(want)

    def read(self, dtype: torch.dtype | None = None):
        if self.cut is None:
            return self.stored.read(self.read_dtype)
        dim, lo, hi = self.cut
        return self.stored.read_slice(min(dim, len(self.shape) - 1), lo, hi, self.read_dtype)


def sliced_stream(tensors, plan: SplitPlan, spec: QuantSpec | None, dtype: torch.dtype):
    """Yields the stored tensors, each wrapped to read this rank's slice.

    A quantized layer split by columns is read whole: it is quantized whole and then cut (int8's scale is per
    row); already-quantized layers (a dict of parts) are cut by the transform. With quantization the values are
    read in the checkpoint's dtype, as the single-process quantizer reads them; otherwise straight into `dtype`.
    """
    read_dtype = None if spec is not None else dtype
    for stored in tensors:
        name = hf_to_neoj_name(stored.key)
        cut = plan.slices.get(name)
        quantized_whole = spec is not None and spec.quantizes(name) and cut is not None and cut[0] == COLUMNS
        if quantized_whole or not stored.shape:  # no shape: an already-quantized layer's parts (a dict)
            cut = None
        yield SlicedTensor(stored, cut, read_dtype)


def split_parts(parts: dict[str, torch.Tensor], cut: tuple, spec: QuantSpec, whole_rows: bool) -> dict:
    """Returns this rank's slice of a quantized weight's portable parts (quantize.format).

    Rows: every part by rows (unless `whole_rows`: the rows were already read as a slice). Columns: int8's qweight
    by columns, its per-row scales whole; int4's packed qweight by byte columns (two values a byte) and its scales
    and mins by group columns.
    """
    dim, lo, hi = cut
    if dim == ROWS:
        return parts if whole_rows else {k: v[lo:hi].contiguous() for k, v in parts.items()}
    if spec.scheme == "int8":
        return {"qweight": parts["qweight"][:, lo:hi].contiguous(), "scales": parts["scales"]}
    g = spec.group_size
    return {"qweight": parts["qweight"][:, lo // 2 : hi // 2].contiguous(),
            "scales": parts["scales"][:, lo // g : hi // g].contiguous(),
            "mins": parts["mins"][:, lo // g : hi // g].contiguous()}


class ShardFiller:
    """The fill_model transform for a split model: converts each slice, quantizes or cuts quantized layers into
    QuantLinear, drops the biases rank 0 alone keeps, and holds the head's tensors for finish()."""

    def __init__(self, model: Transformer, plan: SplitPlan, spec: QuantSpec | None, stored: QuantSpec | None,
                 dtype: torch.dtype, device: torch.device):
        self.model, self.plan, self.spec, self.stored = model, plan, spec, stored
        self.dtype, self.device = dtype, device
        self.head: dict[str, torch.Tensor] = {}
        self.tied_head: QuantLinear | None = None
        # A quantized checkpoint stores the tied head's own quantized copy; quantizing while loading makes it.
        self.quantizes_tied_head = spec is not None and stored is None and model.config.tie_word_embeddings

    def __call__(self, name: str, value):
        cut = self.plan.slices.get(name, ())
        if cut is None:
            return None  # a bias another rank adds
        if isinstance(value, dict) or (self.spec is not None and self.spec.quantizes(name)):
            self._put_quantized(name, value, cut)
            return None
        if name == "wte.weight" and self.quantizes_tied_head:
            # The head tied to the embedding is quantized from the checkpoint's values, as StreamingQuantizer does.
            self.tied_head = QuantLinear(quantize_weight(value, self.spec), self.spec, None, self.device)
        value = value.to(device=self.device, dtype=self.dtype)
        if name.startswith("lm_head."):
            self.head[name] = value
            return None
        return value

    def _put_quantized(self, name: str, value, cut: tuple) -> None:
        """Puts this rank's QuantLinear in place of the layer `name` (its bias comes later, where it has one)."""
        parts = value if isinstance(value, dict) else quantize_weight(value, self.spec)
        parts = split_parts(parts, cut, self.spec, whole_rows=not isinstance(value, dict)) if cut else parts
        module = "lm_head.local" if name.startswith("lm_head.") else name[: -len(".weight")]
        replace_linear(self.model, module, QuantLinear(parts, self.spec, None, self.device))

    def finish(self) -> None:
        """Puts the head's weight and bias in place, or ties it to the embedding's slice."""
        head = self.model.lm_head
        if self.tied_head is not None:
            head.local = self.tied_head
        elif self.model.config.tie_word_embeddings and self.stored is None:
            head.local.weight = self.model.wte.weight
        for name, value in self.head.items():
            assign_tensor(self.model, "lm_head.local." + name.split(".")[-1], value)


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_tensor_parallel(directory: Path | None, cfg: ModelConfig, dtype: torch.dtype, processes: Processes,
                         spec=None, stored=None, check_memory: bool = True, context: int | None = None,
                         batch: int = 1, seed: int = 0) -> Transformer:
    """Returns this rank's shard of the model in `directory` (None: random weights drawn with `seed`), each rank
    reading only its slice of every tensor."""
    spec = stored or spec
    check_divisible(cfg, processes.world, spec)
    if check_memory:
        check_rank_memory(cfg, dtype, spec, processes, str(directory or f"random {cfg.model_type}"), context, batch)
    device = processes.device
    plan = SplitPlan(cfg, processes)
    model = shard_meta_model(cfg, plan, processes)
    expected = expected_tensors(build_meta(cfg))  # the full shapes every checkpoint tensor must have
    if stored is not None and cfg.tie_word_embeddings:  # a quantized checkpoint stores the tied head's own copy
        expected["lm_head.weight"] = torch.empty(cfg.vocab_size, cfg.hidden_size, device="meta")
    filler = ShardFiller(model, plan, spec, stored, dtype, device)
    fill_model(model, sliced_stream(_tensors(directory, cfg, dtype, device, spec, stored, seed), plan, spec, dtype),
               dtype, device, filler, expected)
    filler.finish()
    model.tensor_parallel = processes
    model.kv_heads = plan.local_heads  # the KV caches hold this rank's heads only
    return model.eval()


def _tensors(directory: Path | None, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
             spec: QuantSpec | None, stored: QuantSpec | None, seed: int):
    """Returns the stream of full-size stored tensors: the checkpoint's (memory-mapped where it is stored in
    `dtype`, so slices read only their pages), a quantized checkpoint's, or random ones drawn as random_model does."""
    if directory is None:
        # random_model draws on the GPU when nothing is quantized, on the CPU otherwise: the same values here.
        at = device if spec is None and device.type == "cuda" else torch.device("cpu")
        return random_tensors(build_meta(cfg), at, seed)
    files = weight_files(directory)
    if stored is not None:
        if any(f.suffix != ".safetensors" for f in files):
            raise CheckpointError(f"{directory}: a quantized checkpoint must be safetensors")
        return read_quantized(files, stored)
    return read_checkpoint(files, dtype if device.type == "cpu" and spec is None else None)


# ---------------------------------------------------------------------------------------------------------
# Memory


def check_rank_memory(cfg: ModelConfig, dtype: torch.dtype, spec: QuantSpec | None, processes: Processes,
                      name: str, context: int | None, batch: int) -> None:
    """Raises MemoryPlanError unless this rank's share (1/N of neoj.memory's plan of weights and KV cache) fits
    its device; on a CPU the ranks of one machine share its memory, so their shares are counted together."""
    n = processes.world
    together = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if processes.device.type == "cpu" else 1
    dtype_name = DTYPE_NAMES[dtype]
    group = spec.group_size if spec else 128

    def needed(p) -> int:
        return together * (p.total_bytes // n + RUNTIME_BYTES)

    chosen = plan(cfg, dtype_name, spec.scheme if spec else None, context, batch, group)
    available = memory_limit(available_memory(processes.device))
    if needed(chosen) <= available:
        return
    fits = fitting_plans(cfg, context, batch, group, lambda p: needed(p) <= available)
    where = f"{together} ranks on {processes.device}" if together > 1 else str(processes.device)
    msg = (f"{name} split over {n} processes needs about {needed(chosen) / GIB:.1f} GiB in {chosen.label} on {where} "
           f"(1/{n} of weights {chosen.weights_bytes / GIB:.1f} GiB and KV cache {chosen.kv_cache_bytes / GIB:.1f} "
           f"GiB, plus runtime) but only {available / GIB:.1f} GiB is available. ")
    if fits:
        msg += "These would fit: " + ", ".join(f"{p.option()} ({needed(p) / GIB:.1f} GiB)" for p in fits) + "."
    else:
        msg += "No dtype or quantization fits; use more processes on more devices, or free memory."
    raise MemoryPlanError(msg + " (check_memory=False / --no-memory-check loads anyway.)")

"""The training loop shared by `neoj finetune` (full or LoRA) and `neoj train` (from random weights).

One global step draws `batch_size * grad_accum * world_size` blocks at fixed positions of a seeded
per-epoch order, so the data a step sees depends only on the step number: a resumed run, or one on a
different number of processes with the same global batch, trains on exactly the same blocks. The loss
is normalised by the target tokens of the whole global batch, so gradients do not depend on how the
batch is split into micro-batches or processes either.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..config import ModelConfig, load_config, preset, with_changes
from ..errors import NeojError
from ..tokenizer import Tokenizer
from . import lora as lora_mod
from .checkpoint import (CHECKPOINT, CheckpointWriteError, atomic_save, copy_tokenizer, export_hf,
                         load_checkpoint, rng_state, set_rng_state)
from .data import BlockOrder, Blocks, load_dataset
from .loss import CausalLMLoss

log = logging.getLogger(__name__)

# Options that change what a run computes: a resumed run must use the same ones.
_RESUME_MUST_MATCH = ("model", "config", "data", "val_data", "val_fraction", "seq_len", "global_batch", "epochs",
                      "max_steps", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "adam_betas", "clip",
                      "seed", "lora", "lora_r", "lora_alpha", "lora_dropout", "lora_targets")


@dataclass
class TrainArgs:
    """Everything a training run is configured by (the CLI fills these from its options)."""

    data: list[str]
    out: str
    model: str | None = None  # fine-tune this checkpoint ...
    config: str | None = None  # ... or train from random weights of this preset / config.json
    val_data: list[str] | None = None
    val_fraction: float = 0.05
    seq_len: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    epochs: float | None = None
    max_steps: int | None = None
    lr: float = 5e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    clip: float = 1.0
    grad_checkpointing: bool = False
    seed: int = 0
    save_every: int = 500
    eval_every: int | None = None
    eval_blocks: int | None = 64
    log_every: int = 10
    resume: bool = False
    device: str = "auto"
    autocast: str = "auto"  # auto: bf16 on CUDA, off on CPU; or "bf16", "fp16", "off"
    fsdp: bool = False
    lora: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    save_dtype: str | None = None
    progress: bool = True


@dataclass
class TrainResult:
    """What a run did: its steps, losses, timings and where it wrote."""

    out: str
    step: int
    max_steps: int
    train_loss: float | None
    val_loss: float | None
    val_perplexity: float | None
    tokens: int
    wall_seconds: float
    interrupted: bool = False

    def to_dict(self) -> dict:
        """Returns the result as a JSON-ready dictionary."""
        return dataclasses.asdict(self)


class TrainError(NeojError):
    """A training run that cannot start or continue as asked."""


# ---------------------------------------------------------------------------------------------
# Processes and devices


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


# ---------------------------------------------------------------------------------------------
# Model, optimizer, schedule


def resolve_source(args: TrainArgs) -> tuple[ModelConfig, Path | None]:
    """Returns (config, checkpoint directory or None) of the model a run starts from; reads no weights."""
    from ..weights import resolve_model_dir

    if (args.model is None) == (args.config is None):
        raise TrainError("give exactly one of a model to fine-tune (--model) or a config to train from scratch "
                         "(--config)")
    if args.model is not None:
        source = resolve_model_dir(args.model)
        return load_config(source), source
    return config_from_arg(args.config), None


def build_model(args: TrainArgs, cfg: ModelConfig, source: Path | None, device: torch.device):
    """Returns the model in fp32 (loaded, or randomly initialised) with its trainable parameters marked."""
    from ..weights import load_model, random_model

    if source is not None:
        model = load_model(source, torch.float32, device, cfg)
    else:
        model = random_model(cfg, torch.float32, device, seed=args.seed)
    if args.lora:
        lora_mod.inject(model, lora_config(args))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model


def config_from_arg(spec: str) -> ModelConfig:
    """Returns the ModelConfig of a preset name, a config.json file, or a directory holding one."""
    from ..config import PRESETS

    if spec.lower() in PRESETS:
        cfg = preset(spec)
    elif Path(spec).exists():
        cfg = load_config(spec)
    else:
        raise TrainError(f"--config {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file")
    # Rewritten in full, so the saved config.json is complete (architectures, dropouts, ...).
    complete = with_changes(cfg).to_hf_dict()
    for key in ("attention_types", "window_size"):
        if key in cfg.source:
            complete[key] = cfg.source[key]
    from ..config import from_hf_dict

    return from_hf_dict(complete)


def lora_config(args: TrainArgs) -> lora_mod.LoraConfig:
    """Returns the LoRA settings of a run."""
    return lora_mod.LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                               target_modules=list(args.lora_targets))


def enable_gradient_checkpointing(model) -> None:
    """Makes each block recompute its activations in the backward pass instead of storing them."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)


def make_optimizer(model, args: TrainArgs) -> torch.optim.AdamW:
    """Returns AdamW with weight decay on matrices only (not biases, LayerNorms)."""
    params = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}
    decay = [p for n, p in params.values() if p.dim() >= 2]
    no_decay = [p for n, p in params.values() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    # The fused kernel updates all parameters in one pass: 10x faster than the per-tensor loop on CPU.
    fused = not args.fsdp and all(p.device.type in ("cpu", "cuda") for _, p in params.values())
    return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.adam_betas), eps=1e-8, fused=fused or None)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Returns the learning-rate multiplier at `step`: linear warmup, then cosine decay to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Interrupts


class StopFlag:
    """Turns the first Ctrl-C / SIGTERM into a request to save and stop; a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt received: saving a checkpoint after this step (interrupt again to abort)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# ---------------------------------------------------------------------------------------------
# The loop


class Trainer:
    """One training run: data, model, optimizer and the loop, on this process's share of the batch."""

    def __init__(self, args: TrainArgs, on_event: Callable[[dict], None] | None = None):
        self.args = args
        self.on_event = on_event or (lambda event: None)
        self.out = Path(args.out)
        self.dist = setup_distributed(args.device)
        dev = self.dist.device
        if not args.resume and (self.out / CHECKPOINT).exists():
            raise TrainError(f"{self.out} already holds a training checkpoint; pass --resume to continue it, "
                             "or choose another --out")
        # Config and data first: bad data fails in seconds, before a large model is read.
        cfg, self.source = resolve_source(args)
        self.seq_len = args.seq_len or min(cfg.n_positions, 1024)
        if self.seq_len > cfg.n_positions:
            raise TrainError(f"--seq-len {self.seq_len} exceeds the model's context of {cfg.n_positions} tokens")
        self.tokenizer = Tokenizer.from_dir(self.source)
        self.data = load_dataset(args.data, self.tokenizer, self.seq_len, args.val_fraction, args.seed,
                                 args.val_data)
        torch.manual_seed(args.seed)  # the same initial weights (LoRA's A) on every process
        self.model = build_model(args, cfg, self.source, dev)
        torch.manual_seed(args.seed + self.dist.rank)  # then different dropout masks per process
        self.global_batch = args.batch_size * args.grad_accum * self.dist.world
        self.steps_per_epoch = math.ceil(len(self.data.train) / self.global_batch)
        if args.max_steps is not None:
            self.max_steps = args.max_steps
        else:
            self.max_steps = max(1, math.ceil((args.epochs or 1.0) * self.steps_per_epoch))
        self.warmup = args.warmup_steps if args.warmup_steps is not None else min(100, self.max_steps // 20)
        self.order = BlockOrder(len(self.data.train), args.seed)

        if args.grad_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.loss_module = CausalLMLoss(self.model)
        self.wrapped = self._wrap(self.loss_module)
        self.optimizer = make_optimizer(self.model, args)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.warmup, self.max_steps, args.min_lr_ratio))
        if args.autocast == "auto":
            self.amp_dtype = torch.bfloat16 if dev.type == "cuda" else None
        else:
            self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[args.autocast]
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

        self.step = 0
        self.tokens_seen = 0
        self.elapsed_before = 0.0
        self.last_val: tuple[float, float] | None = None
        if args.resume and (self.out / CHECKPOINT).exists():
            self._resume()
        elif args.resume:
            log.warning("no checkpoint in %s yet: starting from step 0", self.out)

    # -- setup helpers --------------------------------------------------------------------------

    def _wrap(self, module):
        if self.dist.world == 1 and not self.args.fsdp:
            return module
        if self.args.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in self.model.blocks:
                fully_shard(block)
            return fully_shard(module)
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = self.dist.device
        return DDP(module, device_ids=[dev.index] if dev.type == "cuda" else None)

    def args_record(self) -> dict:
        """Returns the run's options as stored in a checkpoint (for the resume check)."""
        d = dataclasses.asdict(self.args)
        d["global_batch"] = self.global_batch
        d["adam_betas"] = list(d["adam_betas"])
        d["world_size"] = self.dist.world
        return d

    # -- state ------------------------------------------------------------------------------------

    def _model_state(self) -> dict[str, torch.Tensor]:
        """Returns the trainable state (all weights, or only the adapters) as full CPU tensors."""
        if self.args.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=self.args.lora)
            state = get_model_state_dict(self.wrapped, options=opts)
            return {k.removeprefix("model."): v for k, v in state.items()}
        return {n: p.detach().cpu().clone() for n, p in self.model.state_dict(keep_vars=True).items()
                if not self.args.lora or ".lora_" in n}

    def _optim_state(self) -> dict:
        if self.args.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.wrapped, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def save(self) -> None:
        """Writes a checkpoint of the whole training state atomically; a failed write is logged, not fatal."""
        rngs = [rng_state()]
        if self.dist.world > 1:
            rngs = [None] * self.dist.world
            dist.all_gather_object(rngs, rng_state())
        model_state, optim_state = self._model_state(), self._optim_state()
        if self.dist.main:
            state = {
                "format": "neoj-train-1", "step": self.step, "samples": self.step * self.global_batch,
                "tokens_seen": self.tokens_seen, "elapsed": self.elapsed_before + self._session_time(),
                "args": self.args_record(), "model": model_state, "optimizer": optim_state,
                "scheduler": self.scheduler.state_dict(), "rng": rngs, "last_val": self.last_val,
            }
            try:
                atomic_save(state, self.out / CHECKPOINT)
                log.info("checkpoint saved at step %d", self.step)
                self.on_event({"event": "checkpoint", "step": self.step, "path": str(self.out / CHECKPOINT)})
            except CheckpointWriteError as exc:
                log.error("%s; the previous checkpoint is intact, training continues", exc)
                self.on_event({"event": "checkpoint_failed", "step": self.step, "error": str(exc)})
        self.dist.barrier()

    def _resume(self) -> None:
        state = load_checkpoint(self.out / CHECKPOINT)
        saved, now = state["args"], self.args_record()
        diff = [k for k in _RESUME_MUST_MATCH if _norm(saved.get(k)) != _norm(now.get(k))]
        if diff:
            details = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in diff)
            raise TrainError(f"--resume needs the options the run was started with; these differ: {details}")
        if self.args.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True, strict=not self.args.lora)
            set_model_state_dict(self.wrapped, {"model." + k: v for k, v in state["model"].items()}, options=opts)
            set_optimizer_state_dict(self.wrapped, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
            if unexpected or (not self.args.lora and missing):
                raise TrainError(f"checkpoint does not match the model: missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}")
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.elapsed_before = state["elapsed"]
        self.last_val = state.get("last_val")
        rngs = state["rng"]
        if len(rngs) == self.dist.world:
            set_rng_state(rngs[self.dist.rank])
        else:
            log.warning("checkpoint was written by %d processes, now %d: random states (dropout) are reseeded",
                        len(rngs), self.dist.world)
        if self.dist.main:
            _truncate_log(self.out / "train_log.jsonl", self.step)
        log.info("resumed from step %d of %d", self.step, self.max_steps)

    # -- steps ------------------------------------------------------------------------------------

    def _session_time(self) -> float:
        return time.perf_counter() - self._t0

    def _micro_batches(self, step: int):
        """Yields (ids, weights) of this process's micro-batches of global step `step`."""
        a, B, W, r = self.args.grad_accum, self.args.batch_size, self.dist.world, self.dist.rank
        base = step * self.global_batch
        idx = self.order.indices(base, self.global_batch)
        blocks = self.data.train
        total = float(blocks.weights[idx][:, 1:].sum())  # target tokens in the whole global batch
        for j in range(a):
            sel = idx[(j * W + r) * B : (j * W + r + 1) * B]
            ids = blocks.ids[sel].to(self.dist.device, non_blocking=True)
            # Each process's loss is scaled by W / total: DDP averages gradients over the W processes.
            w = blocks.weights[sel].to(self.dist.device).float() * (W / max(total, 1.0))
            yield j, ids, w

    def _autocast(self):
        if self.amp_dtype is None:
            from contextlib import nullcontext

            return nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.amp_dtype)

    def train_step(self) -> float:
        """Runs one optimizer step; returns the global batch's mean token loss."""
        from contextlib import nullcontext

        self.wrapped.train()
        loss_sum = 0.0
        a = self.args.grad_accum
        for j, ids, w in self._micro_batches(self.step):
            last = j == a - 1
            sync = nullcontext()
            if not last and self.dist.world > 1 and not self.args.fsdp:
                sync = self.wrapped.no_sync()
            elif self.args.fsdp and self.dist.world > 1:
                self.wrapped.set_requires_gradient_sync(last)
            with sync:
                with self._autocast():
                    loss = self.wrapped(ids, w)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += loss.item()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.args.clip and self.args.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.args.clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += self.global_batch * self.seq_len
        (total,) = self.dist.sum(loss_sum)
        return total / self.dist.world

    @torch.no_grad()
    def evaluate(self, limit: int | None = None) -> tuple[float, float] | None:
        """Returns (validation loss, perplexity) over the first `limit` validation blocks (all if None)."""
        val: Blocks | None = self.data.val
        if val is None:
            return None
        n = len(val) if limit is None else min(limit, len(val))
        # Under FSDP every process must join every forward, so each takes part in every round.
        module = self.wrapped if self.args.fsdp else self.loss_module
        module.eval()
        nll, count = 0.0, 0.0
        B, W, r = self.args.batch_size, self.dist.world, self.dist.rank
        for start in range(0, n, B * W):
            # The last round may leave this process nothing: an empty range, not one past the end.
            sel = torch.arange(min(start + r * B, n), min(start + (r + 1) * B, n))
            empty = len(sel) == 0
            if empty and not self.args.fsdp:
                continue
            sel = sel if not empty else torch.tensor([0])
            ids = val.ids[sel].to(self.dist.device)
            w = val.weights[sel].to(self.dist.device).float() * (0.0 if empty else 1.0)
            with self._autocast():
                nll += float(module(ids, w))
            count += float(w[:, 1:].sum())
        nll, count = self.dist.sum(nll, count)
        module.train()
        if count == 0:
            return None
        loss = nll / count
        return loss, math.exp(min(loss, 50.0))

    # -- run --------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Trains to max_steps (or until interrupted), then writes the model; returns what happened."""
        args = self.args
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        self._t0 = time.perf_counter()
        eval_every = args.eval_every if args.eval_every is not None else args.save_every
        kill_at = int(os.environ.get("NEOJ_TEST_KILL_AT_STEP", "0"))  # fault injection for the resume test
        bar = self._progress_bar()
        loss = None
        interrupted = False
        start_step, t_start = self.step, time.perf_counter()
        self.on_event({"event": "start", "step": self.step, "max_steps": self.max_steps,
                       "train_blocks": len(self.data.train), "val_blocks": len(self.data.val or []),
                       "seq_len": self.seq_len, "global_batch": self.global_batch,
                       "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad)})
        with StopFlag() as stop:
            while self.step < self.max_steps:
                loss = self.train_step()
                done = self.step - start_step
                rate = done * self.global_batch * self.seq_len / max(1e-9, time.perf_counter() - t_start)
                record = {"step": self.step, "loss": round(loss, 6), "lr": self.scheduler.get_last_lr()[0],
                          "tokens_per_s": round(rate, 1)}
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", lr=f"{record['lr']:.2e}",
                                    refresh=False)
                if eval_every and self.step % eval_every == 0 and self.step < self.max_steps:
                    res = self.evaluate(args.eval_blocks)
                    if res is not None:
                        self.last_val = res
                        record.update(val_loss=round(res[0], 6), val_perplexity=round(res[1], 4))
                        self.on_event({"event": "eval", "step": self.step, "val_loss": res[0],
                                       "val_perplexity": res[1]})
                if self.dist.main and (self.step % max(1, args.log_every) == 0 or "val_loss" in record
                                       or self.step == self.max_steps):
                    _append_log(self.out / "train_log.jsonl", record)
                self.on_event({"event": "step", **record})
                stop_now = stop.requested
                if self.dist.world > 1:
                    stop_now = self.dist.sum(float(stop_now))[0] > 0
                if (args.save_every and self.step % args.save_every == 0) or stop_now:
                    self.save()
                if kill_at and self.step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if stop_now:
                    interrupted = True
                    break
        if bar is not None:
            bar.close()
        wall = self.elapsed_before + self._session_time()
        if interrupted:
            self.on_event({"event": "interrupted", "step": self.step})
            return TrainResult(str(self.out), self.step, self.max_steps, loss, None, None, self.tokens_seen, wall,
                               interrupted=True)
        final_val = self.evaluate(None)
        if final_val is not None:
            self.on_event({"event": "eval", "step": self.step, "val_loss": final_val[0],
                           "val_perplexity": final_val[1], "final": True})
        if not args.save_every or self.step % args.save_every:
            self.save()
        self.export()
        result = TrainResult(str(self.out), self.step, self.max_steps, loss,
                             final_val[0] if final_val else None, final_val[1] if final_val else None,
                             self.tokens_seen, wall)
        if self.dist.main:
            (self.out / "train_results.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        self.on_event({"event": "done", **result.to_dict()})
        return result

    def _progress_bar(self):
        if not (self.args.progress and self.dist.main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.max_steps, initial=self.step, unit="step", dynamic_ncols=True, desc="training")

    def export(self) -> None:
        """Writes the trained model: HF-format weights, or a PEFT adapter for LoRA, plus tokenizer files."""
        state = self._model_state() if self.args.fsdp else None
        if not self.dist.main:
            self.dist.barrier()
            return
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                 None: None}[self.args.save_dtype]
        if self.args.lora:
            adapter_state = None
            if state is not None:  # FSDP: adapters come from the gathered state dict
                adapter_state = _peft_keys(self.model, state)
            lora_mod.save_adapter(self.model, lora_config(self.args), self.out,
                                  base_model=str(Path(self.args.model).resolve()) if Path(self.args.model).exists()
                                  else self.args.model, state=adapter_state)
        else:
            export_hf(state if state is not None else self._model_state(), self.model.config, self.out, dtype)
        copy_tokenizer(self.source, self.out)
        self.dist.barrier()


def _peft_keys(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name in lora_mod.lora_modules(model):
        hf = lora_mod.PEFT_PREFIX + lora_mod._hf_module_name(name, model.config.model_type)
        for part in ("lora_A", "lora_B"):
            out[f"{hf}.{part}.weight"] = state[f"{name}.{part}.weight"]
    return out


def _norm(v):
    if isinstance(v, tuple):
        return [_norm(x) for x in v]
    if isinstance(v, list):
        return [_norm(x) for x in v]
    return v


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drops log lines a killed run wrote after its last checkpoint, so the resumed log reads as one run."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def train(args: TrainArgs, on_event: Callable[[dict], None] | None = None) -> TrainResult:
    """Runs a training run (fine-tune or from scratch, full or LoRA, 1 or N processes); returns its result."""
    return Trainer(args, on_event).run()

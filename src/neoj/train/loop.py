"""The training loop shared by `neoj finetune` (full or LoRA) and `neoj train` (from random weights).

One global step draws `batch_size * grad_accum * world_size` blocks at fixed positions of a seeded
per-epoch order, so the data a step sees depends only on the step number: a resumed run, or one on a
different number of processes with the same global batch, trains on exactly the same blocks. The loss
is normalised by the target tokens of the whole global batch, so gradients do not depend on how the
batch is split into micro-batches or processes either.

The pieces a Trainer puts together live beside it: args (TrainArgs, TrainResult), distributed (processes
and devices), source (the model trained), optim (AdamW, schedule, mixed precision) and state (checkpoints
and the exported model).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from ..tokenizer import Tokenizer
from .args import TrainArgs, TrainError, TrainResult, args_record
from .checkpoint import CHECKPOINT
from .data import BlockOrder, Blocks, load_dataset
from .distributed import setup_distributed, wrap_for_processes
from .loss import CausalLMLoss
from .optim import autocast_dtype, grad_scaler, make_optimizer, make_scheduler
from .source import build_model, enable_gradient_checkpointing, resolve_source
from .state import TRAIN_LOG, Progress, TrainingState, append_log

log = logging.getLogger(__name__)

__all__ = ["TrainArgs", "TrainResult", "TrainError", "Trainer", "StopFlag", "train"]


class StopFlag:
    """Turns the first Ctrl-C / SIGTERM into a request to save and stop; a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
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


class Trainer:
    """One training run: data, model, optimizer and the loop, on this process's share of the batch."""

    def __init__(self, args: TrainArgs, on_event: Callable[[dict], None] | None = None):
        self.args = args
        self.on_event = on_event or (lambda event: None)
        self.out = Path(args.out)
        self.dist = setup_distributed(args.device)
        if not args.resume and (self.out / CHECKPOINT).exists():
            raise TrainError(f"{self.out} already holds a training checkpoint; pass --resume to continue it, "
                             "or choose another --out")
        # Config and data first: bad data fails quickly, before a large model is read.
        cfg, self.source = resolve_source(args)
        self.seq_len = args.seq_len or min(cfg.n_positions, 1024)
        if self.seq_len > cfg.n_positions:
            raise TrainError(f"--seq-len {self.seq_len} exceeds the model's context of {cfg.n_positions} tokens")
        self.tokenizer = Tokenizer.from_dir(self.source)
        self.data = load_dataset(args.data, self.tokenizer, self.seq_len, args.val_fraction, args.seed,
                                 args.val_data)
        torch.manual_seed(args.seed)  # the same initial weights (LoRA's A) on every process
        self.model = build_model(args, cfg, self.source, self.dist.device)
        torch.manual_seed(args.seed + self.dist.rank)  # then different dropout masks per process
        self._plan_steps()
        self._set_up_optimization()
        self.state = TrainingState(args, self.dist, self.model, self.wrapped, self.optimizer, self.scheduler,
                                   self.out, self.args_record(), self.on_event)
        self.step = 0
        self.tokens_seen = 0
        self.elapsed_before = 0.0
        self.last_val: tuple[float, float] | None = None
        if args.resume and (self.out / CHECKPOINT).exists():
            self._resume()
        elif args.resume:
            log.warning("no checkpoint in %s yet: starting from step 0", self.out)

    # -- setup --------------------------------------------------------------------------------------

    def _plan_steps(self) -> None:
        """Sets the global batch, the number of steps (--max-steps, or --epochs over the data), the warmup
        and the order blocks are drawn in."""
        args = self.args
        self.global_batch = args.batch_size * args.grad_accum * self.dist.world
        self.steps_per_epoch = math.ceil(len(self.data.train) / self.global_batch)
        if args.max_steps is not None:
            self.max_steps = args.max_steps
        else:
            self.max_steps = max(1, math.ceil((args.epochs or 1.0) * self.steps_per_epoch))
        self.warmup = args.warmup_steps if args.warmup_steps is not None else min(100, self.max_steps // 20)
        self.order = BlockOrder(len(self.data.train), args.seed)

    def _set_up_optimization(self) -> None:
        """Sets the loss module (wrapped for the processes), optimizer, LR schedule and mixed precision."""
        args = self.args
        if args.grad_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.loss_module = CausalLMLoss(self.model)
        self.wrapped = wrap_for_processes(self.loss_module, self.model, self.dist, args.fsdp)
        self.optimizer = make_optimizer(self.model, args)
        self.scheduler = make_scheduler(self.optimizer, self.warmup, self.max_steps, args.min_lr_ratio)
        self.amp_dtype = autocast_dtype(args.autocast, self.dist.device)
        self.scaler = grad_scaler(self.amp_dtype)

    def args_record(self) -> dict:
        """Returns the run's options as stored in a checkpoint (for the resume check)."""
        return args_record(self.args, self.global_batch, self.dist.world)

    # -- state ------------------------------------------------------------------------------------

    def progress(self) -> Progress:
        """Returns how far the run has got, its time counted up to now."""
        return Progress(self.step, self.tokens_seen, self.elapsed_before + self._session_time(), self.last_val)

    def save(self) -> None:
        """Writes a checkpoint of the whole training state atomically; a failed write is logged, not fatal."""
        self.state.save(self.progress())

    def _resume(self) -> None:
        progress = self.state.restore()
        self.step, self.tokens_seen = progress.step, progress.tokens_seen
        self.elapsed_before, self.last_val = progress.elapsed, progress.last_val
        log.info("resumed from step %d of %d", self.step, self.max_steps)

    def export(self) -> None:
        """Writes the trained model: HF-format weights, or a PEFT adapter for LoRA, plus tokenizer files."""
        self.state.export(self.source)

    # -- steps ------------------------------------------------------------------------------------

    def _session_time(self) -> float:
        return time.perf_counter() - self._t0

    def _micro_batches(self, step: int):
        """Yields (index, ids, weights) of this process's micro-batches of global step `step`."""
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
            return nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.amp_dtype)

    def _gradient_sync(self, last: bool):
        """Returns the context a micro-batch's backward runs in: gradients are reduced over the processes
        only after the last micro-batch of a step."""
        if not last and self.dist.world > 1 and not self.args.fsdp:
            return self.wrapped.no_sync()
        if self.args.fsdp and self.dist.world > 1:
            self.wrapped.set_requires_gradient_sync(last)
        return nullcontext()

    def _optimizer_step(self) -> None:
        """Clips the accumulated gradients, updates the weights and the learning rate, clears the gradients."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [param for param in self.model.parameters() if param.requires_grad]
        if self.args.clip and self.args.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.args.clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def train_step(self) -> float:
        """Runs one optimizer step; returns the global batch's mean token loss."""
        self.wrapped.train()
        loss_sum = 0.0
        for j, ids, w in self._micro_batches(self.step):
            with self._gradient_sync(last=j == self.args.grad_accum - 1):
                with self._autocast():
                    loss = self.wrapped(ids, w)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += loss.item()
        self._optimizer_step()
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
        self._start_run()
        bar = self._progress_bar()
        loss = None
        interrupted = False
        start_step, t_start = self.step, time.perf_counter()
        with StopFlag() as stop:
            while self.step < self.max_steps:
                loss = self.train_step()
                self._report_step(loss, start_step, t_start, bar)
                interrupted = self._checkpoint_or_stop(stop)
                if interrupted:
                    break
        if bar is not None:
            bar.close()
        wall = self.elapsed_before + self._session_time()
        if interrupted:
            self.on_event({"event": "interrupted", "step": self.step})
            return TrainResult(str(self.out), self.step, self.max_steps, loss, None, None, self.tokens_seen, wall,
                               interrupted=True)
        return self._finish(loss, wall)

    def _start_run(self) -> None:
        """Creates OUT, starts the clock and announces the run."""
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        self._t0 = time.perf_counter()
        self._kill_at = int(os.environ.get("NEOJ_TEST_KILL_AT_STEP", "0"))  # fault injection for the resume test
        self.on_event({"event": "start", "step": self.step, "max_steps": self.max_steps,
                       "train_blocks": len(self.data.train), "val_blocks": len(self.data.val or []),
                       "seq_len": self.seq_len, "global_batch": self.global_batch,
                       "trainable_parameters": sum(param.numel() for param in self.model.parameters()
                                                   if param.requires_grad)})

    def _report_step(self, loss: float, start_step: int, t_start: float, bar) -> None:
        """Shows the step on the progress bar, validates when due, and writes the step to the log and events."""
        done = self.step - start_step
        rate = done * self.global_batch * self.seq_len / max(1e-9, time.perf_counter() - t_start)
        record = {"step": self.step, "loss": round(loss, 6), "lr": self.scheduler.get_last_lr()[0],
                  "tokens_per_s": round(rate, 1)}
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", lr=f"{record['lr']:.2e}", refresh=False)
        self._validate_if_due(record)
        if self.dist.main and (self.step % max(1, self.args.log_every) == 0 or "val_loss" in record
                               or self.step == self.max_steps):
            append_log(self.out / TRAIN_LOG, record)
        self.on_event({"event": "step", **record})

    def _validate_if_due(self, record: dict) -> None:
        """Every --eval-every steps (default --save-every) but the last, validates on --eval-blocks blocks
        and adds the result to the step's record."""
        args = self.args
        eval_every = args.eval_every if args.eval_every is not None else args.save_every
        if not (eval_every and self.step % eval_every == 0 and self.step < self.max_steps):
            return
        res = self.evaluate(args.eval_blocks)
        if res is not None:
            self.last_val = res
            record.update(val_loss=round(res[0], 6), val_perplexity=round(res[1], 4))
            self.on_event({"event": "eval", "step": self.step, "val_loss": res[0], "val_perplexity": res[1]})

    def _checkpoint_or_stop(self, stop: StopFlag) -> bool:
        """Saves a checkpoint when one is due or a process was interrupted; returns whether to stop."""
        stop_now = stop.requested
        if self.dist.world > 1:
            stop_now = self.dist.sum(float(stop_now))[0] > 0
        if (self.args.save_every and self.step % self.args.save_every == 0) or stop_now:
            self.save()
        if self._kill_at and self.step == self._kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return stop_now

    def _finish(self, loss: float | None, wall: float) -> TrainResult:
        """Validates on every block, saves the last checkpoint and the model; returns the run's result."""
        final_val = self.evaluate(None)
        if final_val is not None:
            self.on_event({"event": "eval", "step": self.step, "val_loss": final_val[0],
                           "val_perplexity": final_val[1], "final": True})
        if not self.args.save_every or self.step % self.args.save_every:
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


def train(args: TrainArgs, on_event: Callable[[dict], None] | None = None) -> TrainResult:
    """Runs a training run (fine-tune or from scratch, full or LoRA, 1 or N processes); returns its result."""
    return Trainer(args, on_event).run()

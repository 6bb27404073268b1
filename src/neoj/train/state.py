"""A run's whole training state, saved and restored: the trained weights (all, or only the adapters), the
optimizer, the LR schedule, every process's random state and the run's counters; and the trained model
exported at the end (HF-format weights, or a PEFT adapter). Only rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..weights import neoj_to_hf_name
from . import lora as lora_mod
from .args import TrainArgs, TrainError
from .checkpoint import (CHECKPOINT, CheckpointWriteError, atomic_save, copy_tokenizer, export_hf,
                         load_checkpoint, rng_state, set_rng_state)
from .distributed import Dist
from .source import lora_config

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "neoj-train-1"
TRAIN_LOG = "train_log.jsonl"
# Options that change what a run computes: a resumed run must use the same ones.
RESUME_MUST_MATCH = ("model", "config", "data", "val_data", "val_fraction", "seq_len", "global_batch", "epochs",
                     "max_steps", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "adam_betas", "clip",
                     "seed", "lora", "lora_r", "lora_alpha", "lora_dropout", "lora_targets")
SAVE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, None: None}


@dataclass
class Progress:
    """How far a run has got: kept in its checkpoint so a resumed run continues the count."""

    step: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0  # seconds trained, over every session of the run
    last_val: tuple[float, float] | None = None  # (loss, perplexity) of the last validation


@dataclass
class TrainingState:
    """The objects whose state a checkpoint holds, and where the run writes."""

    args: TrainArgs
    processes: Dist
    model: torch.nn.Module
    wrapped: torch.nn.Module  # the loss module as the processes run it (DDP, FSDP, or itself)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    out: Path
    record: dict  # the run's options, as args_record gives them
    on_event: Callable[[dict], None]

    @property
    def path(self) -> Path:
        return self.out / CHECKPOINT

    def model_state(self) -> dict[str, torch.Tensor]:
        """Returns the trainable state (all weights, or only the adapters) as full CPU tensors."""
        if self.args.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=self.args.lora)
            state = get_model_state_dict(self.wrapped, options=opts)
            return {k.removeprefix("model."): v for k, v in state.items()}
        return {name: tensor.detach().cpu().clone() for name, tensor in self.model.state_dict(keep_vars=True).items()
                if not self.args.lora or ".lora_" in name}

    def optimizer_state(self) -> dict:
        if self.args.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.wrapped, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    # -- saving -----------------------------------------------------------------------------------

    def save(self, progress: Progress) -> None:
        """Writes a checkpoint of the whole training state atomically; a failed write is logged, not fatal."""
        rngs = self.processes.gather(rng_state())
        model_state, optim_state = self.model_state(), self.optimizer_state()
        if self.processes.main:
            self._write({
                "format": CHECKPOINT_FORMAT, "step": progress.step,
                "samples": progress.step * self.record["global_batch"], "tokens_seen": progress.tokens_seen,
                "elapsed": progress.elapsed, "args": self.record, "model": model_state, "optimizer": optim_state,
                "scheduler": self.scheduler.state_dict(), "rng": rngs, "last_val": progress.last_val,
            })
        self.processes.barrier()

    def _write(self, state: dict) -> None:
        step = state["step"]
        try:
            atomic_save(state, self.path)
            log.info("checkpoint saved at step %d", step)
            self.on_event({"event": "checkpoint", "step": step, "path": str(self.path)})
        except CheckpointWriteError as exc:
            log.error("%s; the previous checkpoint is intact, training continues", exc)
            self.on_event({"event": "checkpoint_failed", "step": step, "error": str(exc)})

    # -- restoring --------------------------------------------------------------------------------

    def restore(self) -> Progress:
        """Loads the checkpoint in `out` into the model, optimizer, schedule and random state; returns its
        progress. Raises TrainError when the run's options differ from the checkpoint's."""
        state = load_checkpoint(self.path)
        check_same_options(state["args"], self.record)
        if self.args.fsdp:
            self._load_sharded(state)
        else:
            self._load_local(state)
        self.scheduler.load_state_dict(state["scheduler"])
        self._restore_random_state(state["rng"])
        if self.processes.main:
            truncate_log(self.out / TRAIN_LOG, state["step"])
        return Progress(state["step"], state["tokens_seen"], state["elapsed"], state.get("last_val"))

    def _load_sharded(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, strict=not self.args.lora)
        set_model_state_dict(self.wrapped, {"model." + k: v for k, v in state["model"].items()}, options=opts)
        set_optimizer_state_dict(self.wrapped, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))

    def _load_local(self, state: dict) -> None:
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        if unexpected or (not self.args.lora and missing):
            raise TrainError(f"checkpoint does not match the model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        self.optimizer.load_state_dict(state["optimizer"])

    def _restore_random_state(self, rngs: list) -> None:
        if len(rngs) == self.processes.world:
            set_rng_state(rngs[self.processes.rank])
        else:
            log.warning("checkpoint was written by %d processes, now %d: random states (dropout) are reseeded",
                        len(rngs), self.processes.world)

    # -- the trained model ------------------------------------------------------------------------

    def export(self, source: Path | None) -> None:
        """Writes the trained model: HF-format weights, or a PEFT adapter for LoRA, plus tokenizer files
        (from `source`, the checkpoint fine-tuned, or the bundled GPT-2 ones)."""
        state = self.model_state() if self.args.fsdp else None
        if not self.processes.main:
            self.processes.barrier()
            return
        if self.args.lora:
            adapter_state = None
            if state is not None:  # FSDP: adapters come from the gathered state dict
                adapter_state = peft_adapter_state(self.model, state)
            lora_mod.save_adapter(self.model, lora_config(self.args), self.out,
                                  base_model=base_model_name(self.args.model), state=adapter_state)
        else:
            export_hf(state if state is not None else self.model_state(), self.model.config, self.out,
                      SAVE_DTYPES[self.args.save_dtype])
        copy_tokenizer(source, self.out)
        self.processes.barrier()


def base_model_name(model: str) -> str:
    """Returns what an adapter names its base model by: the absolute path of a directory, else the Hub id."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def peft_adapter_state(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Returns the adapter weights of a full state dict under PEFT's key names."""
    out = {}
    for name in lora_mod.lora_modules(model):
        hf = lora_mod.PEFT_PREFIX + neoj_to_hf_name(f"{name}.weight", model.config.model_type).removesuffix(".weight")
        for part in ("lora_A", "lora_B"):
            out[f"{hf}.{part}.weight"] = state[f"{name}.{part}.weight"]
    return out


def check_same_options(saved: dict, now: dict) -> None:
    """Raises TrainError naming the options that change what a run computes and differ from its checkpoint's."""
    diff = [k for k in RESUME_MUST_MATCH if _as_lists(saved.get(k)) != _as_lists(now.get(k))]
    if diff:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in diff)
        raise TrainError(f"--resume needs the options the run was started with; these differ: {details}")


def _as_lists(value):
    """Returns `value` with its tuples as lists, as a checkpoint stores them."""
    if isinstance(value, (tuple, list)):
        return [_as_lists(x) for x in value]
    return value


def append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Drops log lines a killed run wrote after its last checkpoint, so the resumed log reads as one run."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))

"""What a training run is configured by (TrainArgs), what it returns (TrainResult), and how it fails (TrainError)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import NeojError


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


def args_record(args: TrainArgs, global_batch: int, world_size: int) -> dict:
    """Returns a run's options as stored in its checkpoint (what --resume compares)."""
    record = dataclasses.asdict(args)
    record["global_batch"] = global_batch
    record["adam_betas"] = list(record["adam_betas"])
    record["world_size"] = world_size
    return record

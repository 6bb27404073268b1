"""How a run updates its weights: AdamW, the learning-rate schedule (warmup, then cosine decay), and mixed
precision (autocast dtype, and the gradient scaler fp16 needs)."""

from __future__ import annotations

import math

import torch

from .args import TrainArgs


def make_optimizer(model, args: TrainArgs) -> torch.optim.AdamW:
    """Returns AdamW with weight decay on matrices only (not biases, LayerNorms)."""
    params = {id(param): param for param in model.parameters() if param.requires_grad}
    decay = [param for param in params.values() if param.dim() >= 2]
    no_decay = [param for param in params.values() if param.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    # The fused kernel updates all parameters in one pass instead of looping over tensors.
    fused = not args.fsdp and all(param.device.type in ("cpu", "cuda") for param in params.values())
    return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.adam_betas), eps=1e-8, fused=fused or None)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Returns the learning-rate multiplier at `step`: linear warmup, then cosine decay to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                   min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Returns the scheduler that applies lr_factor to the optimizer's learning rate at every step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, min_ratio))


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Returns the dtype --autocast asks for (auto: bfloat16 on CUDA, none on CPU); None computes in fp32."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[setting]


def grad_scaler(amp_dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """Returns the loss scaler fp16 needs (its gradients would underflow), or None."""
    return torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

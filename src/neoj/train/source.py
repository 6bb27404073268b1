"""What a run trains: the model it starts from (a checkpoint to fine-tune, or random weights of a preset or
config.json), in fp32, with its trainable parameters marked (all of them, or LoRA adapters)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from ..config import PRESETS, ModelConfig, from_hf_dict, load_config, preset, with_changes
from . import lora as lora_mod
from .args import TrainArgs, TrainError


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


def config_from_arg(spec: str) -> ModelConfig:
    """Returns the ModelConfig of a preset name, a config.json file, or a directory holding one."""
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
    return from_hf_dict(complete)


def lora_config(args: TrainArgs) -> lora_mod.LoraConfig:
    """Returns the LoRA settings of a run."""
    return lora_mod.LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                               target_modules=list(args.lora_targets))


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
        for param in model.parameters():
            param.requires_grad_(True)
    return model


def enable_gradient_checkpointing(model) -> None:
    """Makes each block recompute its activations in the backward pass instead of storing them."""
    for block in model.blocks:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)

"""LoRA: low-rank adapters wrapped around a model's existing nn.Linear layers, saved in HF PEFT's format.

A wrapped layer computes base(x) + (alpha / r) * B(A(dropout(x))). B starts at zero, so a freshly
injected model computes exactly what the base model did. Layers are chosen by name: a target matches
a module whose neoj name or transformers name ends with it ("q_proj", "c_fc", "attn.attention.v_proj").
Adapters are written as adapter_config.json + adapter_model.safetensors under PEFT's key names
(base_model.model.transformer.h.0.attn.attention.q_proj.lora_A.weight for GPT-Neo), so
peft.PeftModel.from_pretrained loads them onto the transformers model.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..weights import neoj_to_hf_name

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class LoraConfig:
    """Rank, scale, dropout and the modules LoRA wraps."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    @property
    def scaling(self) -> float:
        """Returns alpha / r, the factor on the low-rank update."""
        return self.alpha / self.r


class LoraLinear(nn.Module):
    """An nn.Linear plus a trainable low-rank update; the base weights stay frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        if r < 1:
            raise ConfigError(f"LoRA rank must be at least 1, got {r}")
        self.base = base
        self.r, self.scaling = r, alpha / r
        dev, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # PEFT's initialisation: A Kaiming-uniform, B zero, so the update starts at exactly zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        for p in base.parameters():
            p.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        """Returns the base layer's weight (code that reads .weight keeps working)."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """Returns the base layer with B @ A * scaling folded into its weight."""
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        self.base.weight.copy_((self.base.weight.float() + delta).to(self.base.weight.dtype))
        return self.base


def _hf_module_name(name: str, model_type: str) -> str:
    """Returns transformers' module name for a neoj module name."""
    return neoj_to_hf_name(name + ".weight", model_type)[: -len(".weight")]


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def inject(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wraps the model's nn.Linear layers named by cfg.target_modules; returns the wrapped names.

    Every parameter not in an adapter is frozen.
    """
    model_type = model.config.model_type
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, LoraLinear) or ".lora_" in name:
            continue
        if _matches(name, cfg.target_modules) or _matches(_hf_module_name(name, model_type), cfg.target_modules):
            chosen.append(name)
    if not chosen:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"LoRA target modules {cfg.target_modules} match no linear layer; "
                          f"the model's linear layers are called {', '.join(linear)}")
    if "lm_head" in chosen:
        raise ConfigError("LoRA on lm_head is not supported (it is tied to the token embedding); "
                          "target attention or MLP layers")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, LoraLinear(getattr(parent, leaf), cfg.r, cfg.alpha, cfg.dropout))
    log.info("LoRA r=%d alpha=%g on %d layers (%s)", cfg.r, cfg.alpha, len(chosen),
             ", ".join(sorted({n.rsplit('.', 1)[-1] for n in chosen})))
    return chosen


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """Returns the model's LoRA-wrapped layers by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def merge(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base weight and unwraps it; returns the model, a plain Transformer again."""
    for name, module in lora_modules(model).items():
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, module.merged())
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Returns the adapter weights under PEFT's key names."""
    model_type = model.config.model_type
    out = {}
    for name, module in lora_modules(model).items():
        hf = PEFT_PREFIX + _hf_module_name(name, model_type)
        out[f"{hf}.lora_A.weight"] = module.lora_A.weight.detach().contiguous()
        out[f"{hf}.lora_B.weight"] = module.lora_B.weight.detach().contiguous()
    return out


def peft_config_dict(model: nn.Module, cfg: LoraConfig, base_model: str | None) -> dict:
    """Returns the adapter_config.json that PEFT writes for this adapter."""
    targets = sorted({_hf_module_name(n, model.config.model_type).rsplit(".", 1)[-1] for n in lora_modules(model)})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


def save_adapter(model: nn.Module, cfg: LoraConfig, directory: str | Path, base_model: str | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> None:
    """Writes adapter_config.json and adapter_model.safetensors (PEFT's format) into `directory`."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = state if state is not None else adapter_state_dict(model)
    tmp = directory / (ADAPTER_WEIGHTS + ".tmp")
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / ADAPTER_WEIGHTS)
    config = peft_config_dict(model, cfg, base_model)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read_adapter_config(directory: str | Path) -> LoraConfig:
    """Returns the LoraConfig of a PEFT adapter directory, refusing adapter kinds neoj cannot apply."""
    file = Path(directory) / ADAPTER_CONFIG
    if not file.exists():
        raise CheckpointError(f"{directory} has no {ADAPTER_CONFIG}; is it a LoRA adapter directory?")
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from exc
    if d.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{file}: adapter type {d.get('peft_type')!r} is not supported; neoj applies LoRA")
    for flag in ("use_dora", "fan_in_fan_out"):
        if d.get(flag):
            raise CheckpointError(f"{file}: {flag}=true is not supported by neoj")
    if d.get("bias", "none") != "none":
        raise CheckpointError(f"{file}: bias={d['bias']!r} is not supported; neoj applies bias='none' adapters")
    targets = d.get("target_modules") or []
    if isinstance(targets, str):
        raise CheckpointError(f"{file}: a regular-expression target_modules ({targets!r}) is not supported")
    r = int(d["r"])
    alpha = float(d.get("lora_alpha", r))
    if d.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # rsLoRA scales by alpha / sqrt(r)
    if d.get("rank_pattern") or d.get("alpha_pattern"):
        raise CheckpointError(f"{file}: per-layer rank_pattern / alpha_pattern are not supported")
    return LoraConfig(r=r, alpha=alpha, dropout=float(d.get("lora_dropout", 0.0)), target_modules=list(targets))


def load_adapter(model: nn.Module, directory: str | Path) -> LoraConfig:
    """Injects the adapter of a PEFT directory into `model` and loads its weights; returns its config."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = read_adapter_config(directory)
    file = directory / ADAPTER_WEIGHTS
    if file.exists():
        tensors = load_file(str(file))
    elif (directory / "adapter_model.bin").exists():
        tensors = torch.load(directory / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"{directory} has no {ADAPTER_WEIGHTS}")
    inject(model, cfg)
    expected = adapter_state_dict(model)
    # PEFT may keep the adapter name in keys ("...lora_A.default.weight"); strip it.
    tensors = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
               for k, v in tensors.items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{file} does not match this model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    modules = lora_modules(model)
    by_key = {}
    for name, module in modules.items():
        hf = PEFT_PREFIX + _hf_module_name(name, model.config.model_type)
        by_key[f"{hf}.lora_A.weight"] = module.lora_A.weight
        by_key[f"{hf}.lora_B.weight"] = module.lora_B.weight
    with torch.no_grad():
        for key, param in by_key.items():
            if tensors[key].shape != param.shape:
                raise CheckpointError(f"{file}: {key} has shape {list(tensors[key].shape)}, "
                                      f"expected {list(param.shape)}")
            param.copy_(tensors[key])
    return cfg


def apply_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Merges the LoRA adapter in `directory` into the model's weights; returns the model."""
    load_adapter(model, directory)
    return merge(model)

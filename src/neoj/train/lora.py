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
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..weights import build_meta, neoj_to_hf_name, read_safetensors_header, write_safetensors

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


def target_layers(model: nn.Module, targets: list[str]) -> list[str]:
    """Returns the names of the model's nn.Linear layers that LoRA target_modules `targets` select."""
    model_type = model.config.model_type
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, LoraLinear) or ".lora_" in name:
            continue
        if _matches(name, targets) or _matches(_hf_module_name(name, model_type), targets):
            chosen.append(name)
    return chosen


def inject(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wraps the model's nn.Linear layers named by cfg.target_modules; returns the wrapped names.

    Every parameter not in an adapter is frozen.
    """
    chosen = target_layers(model, cfg.target_modules)
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
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = state if state is not None else adapter_state_dict(model)
    write_safetensors(tensors, directory / ADAPTER_WEIGHTS)
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


def _normalize_key(key: str) -> str:
    """Returns a PEFT adapter key without the adapter name PEFT may keep ("...lora_A.default.weight")."""
    return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def _adapter_file(directory: Path) -> Path:
    for name in (ADAPTER_WEIGHTS, "adapter_model.bin"):
        if (directory / name).exists():
            return directory / name
    raise CheckpointError(f"{directory} has no {ADAPTER_WEIGHTS}")


def _read_adapter_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file)) if file.suffix == ".safetensors" else torch.load(
            file, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip each raise their own kinds
        raise CheckpointError(f"{file} could not be read as LoRA weights: {str(exc).splitlines()[0]}") from exc
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{file} does not hold a dictionary of tensors")
    return {_normalize_key(k): v for k, v in tensors.items()}


def adapter_shapes(directory: str | Path) -> dict[str, tuple[int, ...]]:
    """Returns the shape of every tensor of a PEFT adapter directory, by normalized key (reads no weights
    from a safetensors file: its header says the shapes)."""
    file = _adapter_file(Path(directory))
    if file.suffix == ".safetensors":
        header, _ = read_safetensors_header(file)
        return {_normalize_key(k): tuple(e["shape"]) for k, e in header.items()}
    return {k: tuple(v.shape) for k, v in _read_adapter_tensors(file).items()}


_PEFT_KEY = re.compile(r"\.h\.(\d+)\.(.+)\.lora_([AB])\.weight$")
# Layers whose input (lora_A) or output (lora_B) is the hidden size, in either family's names.
_HIDDEN_IN = ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "fc_in")
_HIDDEN_OUT = ("q_proj", "k_proj", "v_proj", "out_proj", "c_proj", "fc_out")


def describe_adapter(shapes: dict[str, tuple[int, ...]]) -> str:
    """Returns what model an adapter was made for, read from its tensor names and shapes:
    "gpt_neo, hidden size 256, 4 layers" (parts it cannot tell are left out)."""
    families, hidden, layers = set(), set(), set()
    for key, shape in shapes.items():
        m = _PEFT_KEY.search(key)
        if not m or len(shape) != 2:
            continue
        layers.add(int(m.group(1)))
        module, side = m.group(2), m.group(3)
        leaf = module.rsplit(".", 1)[-1]
        if module.startswith(("attn.attention.", "mlp.c_")):
            families.add("gpt_neo")
        elif module.startswith(("attn.", "mlp.fc_")):
            families.add("gptj")
        if side == "A" and leaf in _HIDDEN_IN:
            hidden.add(shape[1])
        elif side == "B" and leaf in _HIDDEN_OUT:
            hidden.add(shape[0])
    parts = ["/".join(sorted(families)) or "an unknown model type"]
    if len(hidden) == 1:
        parts.append(f"hidden size {hidden.pop()}")
    if layers:
        parts.append(f"{max(layers) + 1} layers")
    return ", ".join(parts)


def describe_base(cfg: ModelConfig) -> str:
    """Returns "gptj, hidden size 4096, 28 layers" for a model config."""
    return f"{cfg.model_type}, hidden size {cfg.hidden_size}, {cfg.n_layers} layers"


def check_adapter(directory: str | Path, cfg: ModelConfig, base: str = "the base model") -> LoraConfig:
    """Returns the adapter's LoraConfig if the adapter in `directory` fits a model of `cfg`; raises otherwise.

    Reads adapter_config.json and the tensor shapes only, and builds the base on the meta device (no
    memory), so an adapter for another model (another family, hidden size, layer count or target
    layers) is refused in milliseconds, before any weight is read, with a message naming both shapes.
    """
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"no such adapter directory: {str(directory)!r}; an adapter is a LoRA directory "
                              f"with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (as neoj finetune --lora or PEFT write)")
    lora = read_adapter_config(path)
    shapes = adapter_shapes(path)
    model = build_meta(cfg)
    expected: dict[str, tuple[int, ...]] = {}
    for name in target_layers(model, lora.target_modules):
        if name == "lm_head":
            continue
        linear = model.get_submodule(name)
        key = PEFT_PREFIX + _hf_module_name(name, cfg.model_type)
        expected[f"{key}.lora_A.weight"] = (lora.r, linear.in_features)
        expected[f"{key}.lora_B.weight"] = (linear.out_features, lora.r)

    def module(key: str) -> str:
        return key[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] if key.startswith(PEFT_PREFIX) else key

    # The most telling difference first: a tensor of the wrong shape, then a layer the base lacks, then
    # a layer the adapter lacks.
    misshaped = [k for k in sorted(set(shapes) & set(expected)) if shapes[k] != expected[k]]
    unexpected = sorted(set(shapes) - set(expected))
    missing = sorted(set(expected) - set(shapes))
    if not expected:
        detail = f"its target_modules {lora.target_modules} match no layer of {base}"
    elif misshaped:
        key = misshaped[0]
        detail = f"{key[len(PEFT_PREFIX):]} is {list(shapes[key])} where {base} needs {list(expected[key])}"
    elif unexpected:
        detail = f"{base} has no layer {module(unexpected[0])}"
    elif missing:
        detail = f"the adapter has no weights for {module(missing[0])}"
    else:
        return lora
    raise CheckpointError(f"LoRA adapter {path} does not fit {base}: the adapter is for {describe_adapter(shapes)}, "
                          f"{base} is {describe_base(cfg)} ({detail}); use it with the model it was trained from")


def load_adapter(model: nn.Module, directory: str | Path, base: str = "the base model") -> LoraConfig:
    """Injects the adapter of a PEFT directory into `model` and loads its weights; returns its config.

    The adapter is checked against the model's config first (check_adapter; `base` names the model in
    its message), so a mismatched one is refused with both shapes named instead of failing halfway.
    """
    directory = Path(directory)
    cfg = check_adapter(directory, model.config, base)
    file = _adapter_file(directory)
    tensors = _read_adapter_tensors(file)
    inject(model, cfg)
    expected = adapter_state_dict(model)
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


def apply_adapter(model: nn.Module, directory: str | Path, base: str = "the base model") -> nn.Module:
    """Merges the LoRA adapter in `directory` into the model's weights; returns the model."""
    load_adapter(model, directory, base)
    return merge(model)

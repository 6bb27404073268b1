"""Model configuration: one dataclass for GPT-Neo and GPT-J, read from a checkpoint's config.json.

The model branches only on the fields below (positions, attention pattern, block form, head bias),
never on the family name; `model_type` is kept only to write checkpoints back out in HF format.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .errors import ConfigError

SUPPORTED_MODEL_TYPES = ("gpt_neo", "gptj")
EOS_TOKEN_ID = 50256
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu", "silu", "swish", "tanh")


@dataclass(frozen=True)
class ModelConfig:
    """Every shape and switch the model math depends on."""

    model_type: str
    vocab_size: int
    n_positions: int
    hidden_size: int
    n_layers: int
    n_heads: int
    intermediate_size: int
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"
    # GPT-Neo: learned absolute positions; GPT-J: rotary on the first rotary_dim dims of each head.
    learned_positions: bool = True
    rotary_dim: int = 0
    # One entry per layer, "global" or "local"; local layers see the last `window_size` keys.
    attention_layers: tuple[str, ...] = ()
    window_size: int = 256
    # GPT-Neo does not scale scores by 1/sqrt(head_dim); GPT-J does.
    scale_attn: bool = False
    # GPT-J: x + attn(ln(x)) + mlp(ln(x)); GPT-Neo: sequential pre-LN with a second LayerNorm.
    parallel_block: bool = False
    out_proj_bias: bool = True
    tie_word_embeddings: bool = True
    lm_head_bias: bool = False
    bos_token_id: int = EOS_TOKEN_ID
    eos_token_id: int = EOS_TOKEN_ID
    # The untouched config.json, written back out when saving a checkpoint.
    source: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def head_dim(self) -> int:
        """Returns the per-head width."""
        return self.hidden_size // self.n_heads

    def num_parameters(self) -> int:
        """Returns the parameter count (tied weights counted once)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = 4 * d * d + (d if self.out_proj_bias else 0)
        mlp = 2 * d * f + f + d
        norms = (2 if self.parallel_block else 4) * d
        total = self.n_layers * (attn + mlp + norms) + v * d + 2 * d
        if self.learned_positions:
            total += self.n_positions * d
        if not self.tie_word_embeddings:
            total += v * d
        if self.lm_head_bias:
            total += v
        return total

    def to_hf_dict(self) -> dict:
        """Returns a transformers-compatible config.json dictionary."""
        if self.source:
            return dict(self.source)
        return _to_hf(self)

    def save(self, directory: str | Path) -> None:
        """Writes config.json into `directory`."""
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")


def _expand_attention_types(attention_types) -> tuple[str, ...]:
    """Expands GPT-Neo's [[["global", "local"], 12]] into one entry per layer."""
    layers: list[str] = []
    try:
        for kinds, repeat in attention_types:
            for _ in range(int(repeat)):
                layers.extend(kinds)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"attention_types {attention_types!r} is not of the form [[['global', 'local'], N]]") from exc
    bad = sorted(set(layers) - {"global", "local"})
    if bad:
        raise ConfigError(f"attention_types names unknown attention kinds {bad}; expected 'global' or 'local'")
    return tuple(layers)


def _require(d: dict, *names):
    for name in names:
        if name in d and d[name] is not None:
            return d[name]
    raise ConfigError(f"config.json has no {' / '.join(names)}")


@dataclass(frozen=True)
class _FamilyFormat:
    """How one family's config.json names the shared fields, and the architecture those checkpoints have."""

    hidden_keys: tuple[str, ...]
    layer_keys: tuple[str, ...]
    head_keys: tuple[str, ...]
    position_keys: tuple[str, ...]  # the first one present wins; 2048 where none is
    inner_key: str  # a missing or null intermediate size means 4 x hidden
    tied_by_default: bool
    # GPT-Neo: learned positions, alternating global/local attention, sequential block with out_proj bias.
    # GPT-J: rotary positions, global attention, parallel block, scaled scores, lm_head bias.
    learned_positions: bool
    local_attention: bool
    scale_attn: bool
    parallel_block: bool
    out_proj_bias: bool
    lm_head_bias: bool


_FAMILIES = {
    "gpt_neo": _FamilyFormat(
        hidden_keys=("hidden_size",), layer_keys=("num_layers", "num_hidden_layers"),
        head_keys=("num_heads", "num_attention_heads"), position_keys=("max_position_embeddings",),
        inner_key="intermediate_size", tied_by_default=True, learned_positions=True, local_attention=True,
        scale_attn=False, parallel_block=False, out_proj_bias=True, lm_head_bias=False),
    "gptj": _FamilyFormat(
        hidden_keys=("n_embd", "hidden_size"), layer_keys=("n_layer", "num_hidden_layers"),
        head_keys=("n_head", "num_attention_heads"), position_keys=("n_positions", "max_position_embeddings"),
        inner_key="n_inner", tied_by_default=False, learned_positions=False, local_attention=False,
        scale_attn=True, parallel_block=True, out_proj_bias=False,
        lm_head_bias=True),  # GPTJForCausalLM's lm_head has a bias even when its weight is tied
}


def _supported_model_type(d: dict) -> str:
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"unsupported model_type {model_type!r}: neoj runs {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(EleutherAI GPT-Neo and GPT-J checkpoints)"
        )
    return model_type


def _supported_activation(d: dict) -> str:
    activation = d.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"unsupported activation_function {activation!r}; supported: {', '.join(ACTIVATIONS)}")
    return activation


def _special_token_ids(d: dict) -> tuple[int, int]:
    """Returns (bos, eos): the first of a list of eos ids, EOS_TOKEN_ID where either is missing or null."""
    eos = d.get("eos_token_id", EOS_TOKEN_ID)
    eos = eos[0] if isinstance(eos, list) else eos
    bos = d.get("bos_token_id", EOS_TOKEN_ID)
    return (bos if bos is not None else EOS_TOKEN_ID), (eos if eos is not None else EOS_TOKEN_ID)


def _first_present(d: dict, keys: tuple[str, ...], default):
    for key in keys:
        if key in d:
            return d[key]
    return default


def _attention_pattern(d: dict, family: _FamilyFormat, n_layers: int) -> tuple[tuple[str, ...], int]:
    """Returns (one attention kind per layer, local window size)."""
    if not family.local_attention:
        return ("global",) * n_layers, 0
    attention_layers = _expand_attention_types(d.get("attention_types") or [[["global", "local"], n_layers // 2]])
    if len(attention_layers) != n_layers:
        raise ConfigError(f"attention_types expands to {len(attention_layers)} layers but num_layers is {n_layers}")
    return attention_layers, d.get("window_size", 256)


def _rotary_dim(d: dict, family: _FamilyFormat, hidden: int, n_heads: int) -> int:
    """Returns the rotated dims per head: 0 with learned positions."""
    if family.learned_positions:
        return 0
    # Absent means transformers' GPTJConfig default (64); an explicit null means the whole head.
    rotary_dim = d.get("rotary_dim", 64)
    return rotary_dim if rotary_dim else hidden // n_heads


def from_hf_dict(d: dict) -> ModelConfig:
    """Returns the ModelConfig for a transformers config.json dictionary."""
    model_type = _supported_model_type(d)
    activation = _supported_activation(d)
    family = _FAMILIES[model_type]
    bos, eos = _special_token_ids(d)
    hidden = _require(d, *family.hidden_keys)
    n_layers = _require(d, *family.layer_keys)
    attention_layers, window_size = _attention_pattern(d, family, n_layers)
    vocab_size = _require(d, "vocab_size")
    n_heads = _require(d, *family.head_keys)
    cfg = ModelConfig(
        model_type=model_type, vocab_size=vocab_size,
        n_positions=_first_present(d, family.position_keys, 2048),
        hidden_size=hidden, n_layers=n_layers, n_heads=n_heads,
        intermediate_size=d.get(family.inner_key) or 4 * hidden,
        layer_norm_eps=d.get("layer_norm_epsilon", 1e-5), activation=activation,
        learned_positions=family.learned_positions, rotary_dim=_rotary_dim(d, family, hidden, n_heads),
        attention_layers=attention_layers, window_size=window_size, scale_attn=family.scale_attn,
        parallel_block=family.parallel_block, out_proj_bias=family.out_proj_bias,
        tie_word_embeddings=d.get("tie_word_embeddings", family.tied_by_default), lm_head_bias=family.lm_head_bias,
        bos_token_id=bos, eos_token_id=eos, source=dict(d),
    )
    _validate(cfg)
    return cfg


def _validate(cfg: ModelConfig) -> None:
    if cfg.hidden_size % cfg.n_heads:
        raise ConfigError(f"hidden size {cfg.hidden_size} is not divisible by {cfg.n_heads} heads")
    if cfg.rotary_dim % 2 or cfg.rotary_dim > cfg.head_dim:
        raise ConfigError(f"rotary_dim {cfg.rotary_dim} must be even and at most head_dim {cfg.head_dim}")
    if "local" in cfg.attention_layers and cfg.window_size < 1:
        raise ConfigError(f"window_size must be positive for local attention layers, got {cfg.window_size}")


def _to_hf(cfg: ModelConfig) -> dict:
    """Returns the config.json a transformers model of this shape would write."""
    common = {
        "vocab_size": cfg.vocab_size,
        "activation_function": cfg.activation,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": 0.02,
    }
    if cfg.model_type == "gpt_neo":
        return {
            "model_type": "gpt_neo",
            "architectures": ["GPTNeoForCausalLM"],
            "max_position_embeddings": cfg.n_positions,
            "hidden_size": cfg.hidden_size,
            "num_layers": cfg.n_layers,
            "num_heads": cfg.n_heads,
            "intermediate_size": cfg.intermediate_size,
            "attention_types": _compress_attention_layers(cfg.attention_layers),
            "window_size": cfg.window_size,
            "embed_dropout": 0.0,
            "attention_dropout": 0.0,
            "resid_dropout": 0.0,
            **common,
        }
    return {
        "model_type": "gptj",
        "architectures": ["GPTJForCausalLM"],
        "n_positions": cfg.n_positions,
        "n_embd": cfg.hidden_size,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.intermediate_size,
        "rotary_dim": cfg.rotary_dim,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "resid_pdrop": 0.0,
        **common,
    }


def _compress_attention_layers(layers: tuple[str, ...]) -> list:
    """Writes per-layer kinds back as attention_types, using a repeating pattern when there is one."""
    for period in (1, 2, 3, 4):
        if len(layers) % period == 0 and layers == layers[:period] * (len(layers) // period):
            return [[list(layers[:period]), len(layers) // period]]
    return [[[kind], 1] for kind in layers]


PRESETS: dict[str, dict] = {
    "gpt-neo-125m": {
        "model_type": "gpt_neo", "vocab_size": 50257, "max_position_embeddings": 2048, "hidden_size": 768,
        "num_layers": 12, "num_heads": 12, "attention_types": [[["global", "local"], 6]], "window_size": 256,
    },
    "gpt-neo-1.3b": {
        "model_type": "gpt_neo", "vocab_size": 50257, "max_position_embeddings": 2048, "hidden_size": 2048,
        "num_layers": 24, "num_heads": 16, "attention_types": [[["global", "local"], 12]], "window_size": 256,
    },
    "gpt-neo-2.7b": {
        "model_type": "gpt_neo", "vocab_size": 50257, "max_position_embeddings": 2048, "hidden_size": 2560,
        "num_layers": 32, "num_heads": 20, "attention_types": [[["global", "local"], 16]], "window_size": 256,
    },
    "gpt-j-6b": {
        "model_type": "gptj", "vocab_size": 50400, "n_positions": 2048, "n_embd": 4096, "n_layer": 28,
        "n_head": 16, "rotary_dim": 64, "tie_word_embeddings": False,
    },
}


def preset(name: str, **overrides) -> ModelConfig:
    """Returns the config of a published model shape, e.g. preset("gpt-neo-125m")."""
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return from_hf_dict({**PRESETS[key], **overrides})


def load_config(path: str | Path) -> ModelConfig:
    """Returns the ModelConfig in a checkpoint directory's config.json (or a config file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise ConfigError(f"{path} has no config.json; a checkpoint directory needs one (as save_pretrained writes)")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{file} must hold a JSON object")
    return from_hf_dict(data)


def with_changes(cfg: ModelConfig, **changes) -> ModelConfig:
    """Returns a copy of `cfg` with fields replaced (the source dict is dropped, it no longer matches)."""
    return replace(cfg, source={}, **changes)


__all__ = ["ModelConfig", "PRESETS", "preset", "load_config", "from_hf_dict", "with_changes", "asdict"]

"""Model configuration (neoj.config): config.json as transformers writes it for GPT-Neo and GPT-J, the
published presets, the round trip back to config.json, and the errors a bad config gives."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPTJConfig, GPTJForCausalLM, GPTNeoConfig, GPTNeoForCausalLM

from neoj.config import PRESETS, from_hf_dict, load_config, preset, with_changes
from neoj.errors import ConfigError

EOS = 50256


def neo_dict(**changes) -> dict:
    """Returns GPT-Neo's config.json as transformers writes it, with `changes` made through GPTNeoConfig."""
    return GPTNeoConfig(**changes).to_dict()


def gptj_dict(**changes) -> dict:
    """Returns GPT-J's config.json as transformers writes it, with `changes` made through GPTJConfig."""
    return GPTJConfig(**changes).to_dict()


def hf_parameter_count(model_class, config) -> int:
    """Returns the parameters of the transformers model (tied weights once), built without memory."""
    with torch.device("meta"):
        model = model_class(config)
    return sum(param.numel() for param in model.parameters())


# ---- GPT-Neo ----

def test_gpt_neo_defaults_as_transformers_writes_them():
    cfg = from_hf_dict(neo_dict())
    assert cfg.model_type == "gpt_neo"
    assert (cfg.vocab_size, cfg.n_positions, cfg.hidden_size, cfg.n_layers, cfg.n_heads) == (50257, 2048, 2048, 24, 16)
    assert cfg.intermediate_size == 4 * 2048  # null in config.json: four times the width
    assert cfg.head_dim == 128
    assert cfg.activation == "gelu_new" and cfg.layer_norm_eps == 1e-5
    assert cfg.learned_positions and cfg.rotary_dim == 0
    assert cfg.attention_layers == ("global", "local") * 12 and cfg.window_size == 256
    assert not cfg.scale_attn and not cfg.parallel_block
    assert cfg.out_proj_bias and cfg.tie_word_embeddings and not cfg.lm_head_bias
    assert (cfg.bos_token_id, cfg.eos_token_id) == (EOS, EOS)


def test_gpt_neo_fields_are_read_from_their_transformers_names():
    d = neo_dict(vocab_size=1000, max_position_embeddings=64, hidden_size=48, num_layers=3, num_heads=4,
                 attention_types=[[["local", "global", "local"], 1]], intermediate_size=100, window_size=8,
                 activation_function="relu", layer_norm_epsilon=1e-3, tie_word_embeddings=False,
                 bos_token_id=7, eos_token_id=9)
    cfg = from_hf_dict(d)
    assert (cfg.vocab_size, cfg.n_positions, cfg.hidden_size, cfg.n_layers, cfg.n_heads) == (1000, 64, 48, 3, 4)
    assert cfg.intermediate_size == 100 and cfg.window_size == 8
    assert cfg.attention_layers == ("local", "global", "local")
    assert cfg.activation == "relu" and cfg.layer_norm_eps == 1e-3
    assert not cfg.tie_word_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_id) == (7, 9)
    assert cfg.source == d  # kept as read, to write back out


def test_gpt_neo_without_attention_types_alternates_global_and_local():
    d = {"model_type": "gpt_neo", "vocab_size": 100, "hidden_size": 32, "num_layers": 4, "num_heads": 4}
    cfg = from_hf_dict(d)
    assert cfg.attention_layers == ("global", "local", "global", "local")
    assert cfg.n_positions == 2048 and cfg.window_size == 256 and cfg.tie_word_embeddings


def test_generic_transformers_names_are_accepted():
    neo = from_hf_dict({"model_type": "gpt_neo", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
                        "num_attention_heads": 4})
    gptj = from_hf_dict({"model_type": "gptj", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "max_position_embeddings": 128, "rotary_dim": 4})
    assert (neo.n_layers, neo.n_heads) == (2, 4)
    assert (gptj.hidden_size, gptj.n_layers, gptj.n_heads, gptj.n_positions) == (32, 2, 4, 128)


# ---- GPT-J ----

def test_gptj_defaults_as_transformers_writes_them():
    cfg = from_hf_dict(gptj_dict())
    assert cfg.model_type == "gptj"
    assert (cfg.vocab_size, cfg.n_positions, cfg.hidden_size, cfg.n_layers, cfg.n_heads) == (50400, 2048, 4096, 28, 16)
    assert cfg.intermediate_size == 4 * 4096
    assert cfg.head_dim == 256
    assert not cfg.learned_positions and cfg.rotary_dim == 64
    assert cfg.attention_layers == ("global",) * 28 and cfg.window_size == 0
    assert cfg.scale_attn and cfg.parallel_block
    assert not cfg.out_proj_bias and not cfg.tie_word_embeddings and cfg.lm_head_bias
    assert (cfg.bos_token_id, cfg.eos_token_id) == (EOS, EOS)


def test_gptj_fields_are_read_from_their_transformers_names():
    cfg = from_hf_dict(gptj_dict(vocab_size=512, n_positions=96, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                 n_inner=96, activation_function="gelu", tie_word_embeddings=True))
    assert (cfg.vocab_size, cfg.n_positions, cfg.hidden_size, cfg.n_layers, cfg.n_heads) == (512, 96, 64, 2, 4)
    assert cfg.intermediate_size == 96 and cfg.rotary_dim == 8 and cfg.activation == "gelu"
    assert cfg.tie_word_embeddings and cfg.lm_head_bias  # GPT-J's head keeps its bias when tied


def test_gptj_rotary_dim_null_rotates_the_whole_head_and_absent_means_64():
    # Older transformers wrote rotary_dim: null for "the whole head".
    assert from_hf_dict({**gptj_dict(n_embd=64, n_head=4), "rotary_dim": None}).rotary_dim == 16
    d = gptj_dict()
    del d["rotary_dim"]
    assert from_hf_dict(d).rotary_dim == 64


@pytest.mark.parametrize("eos,want", [([5, 6], 5), (None, EOS), (11, 11)])
def test_the_eos_token_is_the_first_of_a_list_and_defaults_to_endoftext(eos, want):
    cfg = from_hf_dict({**gptj_dict(), "eos_token_id": eos, "bos_token_id": None})
    assert cfg.eos_token_id == want and cfg.bos_token_id == EOS


# ---- sizes, presets, round trips ----

@pytest.mark.parametrize("make_dict,model_class", [
    (lambda: neo_dict(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4,
                      attention_types=[[["global", "local"], 1]]), GPTNeoForCausalLM),
    (lambda: neo_dict(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, tie_word_embeddings=False,
                      attention_types=[[["global", "local"], 1]]), GPTNeoForCausalLM),
    (lambda: gptj_dict(vocab_size=300, n_embd=32, n_layer=2, n_head=4, rotary_dim=4), GPTJForCausalLM),
    (lambda: gptj_dict(vocab_size=300, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, tie_word_embeddings=True),
     GPTJForCausalLM),
])
def test_num_parameters_counts_what_transformers_builds(make_dict, model_class):
    d = make_dict()
    config_class = GPTNeoConfig if model_class is GPTNeoForCausalLM else GPTJConfig
    assert from_hf_dict(d).num_parameters() == hf_parameter_count(model_class, config_class.from_dict(d))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_the_published_shapes(name):
    cfg = preset(name)
    hf = (GPTNeoConfig if cfg.model_type == "gpt_neo" else GPTJConfig)(
        **{k: v for k, v in PRESETS[name].items() if k != "model_type"})
    model_class = GPTNeoForCausalLM if cfg.model_type == "gpt_neo" else GPTJForCausalLM
    assert cfg.num_parameters() == hf_parameter_count(model_class, hf)


def test_preset_values():
    neo = preset("GPT-Neo-125M")  # names are case-insensitive
    assert (neo.hidden_size, neo.n_layers, neo.n_heads, neo.vocab_size) == (768, 12, 12, 50257)
    assert neo.attention_layers == ("global", "local") * 6
    assert round(neo.num_parameters() / 1e6) == 125
    gptj = preset("gpt-j-6b")
    assert (gptj.hidden_size, gptj.n_layers, gptj.n_heads, gptj.rotary_dim) == (4096, 28, 16, 64)
    assert gptj.vocab_size == 50400
    assert not gptj.tie_word_embeddings
    assert round(gptj.num_parameters() / 1e9, 2) == 6.05


def test_preset_overrides_and_unknown_presets():
    assert preset("gpt-neo-125m", window_size=16, num_layers=2, attention_types=[[["local"], 2]]).window_size == 16
    with pytest.raises(ConfigError, match="unknown preset 'gpt-9'; presets: gpt-neo-125m"):
        preset("gpt-9")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_written_config_reads_back_the_same_and_transformers_reads_it(name):
    cfg = with_changes(preset(name))
    d = cfg.to_hf_dict()
    assert from_hf_dict(d) == cfg
    hf = (GPTNeoConfig if cfg.model_type == "gpt_neo" else GPTJConfig).from_dict(d)
    assert hf.vocab_size == cfg.vocab_size
    assert getattr(hf, "num_layers", None) == cfg.n_layers or getattr(hf, "n_layer", None) == cfg.n_layers


def test_load_config_reads_a_directory_or_a_file(tmp_path):
    cfg = from_hf_dict(gptj_dict(n_embd=64, n_head=4, n_layer=2, rotary_dim=8))
    cfg.save(tmp_path)
    assert load_config(tmp_path) == cfg
    assert load_config(tmp_path / "config.json") == cfg


@pytest.mark.parametrize("content,message", [
    (None, "has no config.json"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_load_config_errors_name_the_file(tmp_path, content, message):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path)


# ---- errors ----

def neo_small(**changes) -> dict:
    base = {"model_type": "gpt_neo", "vocab_size": 100, "hidden_size": 32, "num_layers": 2, "num_heads": 4}
    return {k: v for k, v in {**base, **changes}.items() if v is not ...}


def gptj_small(**changes) -> dict:
    base = {"model_type": "gptj", "vocab_size": 100, "n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4}
    return {k: v for k, v in {**base, **changes}.items() if v is not ...}


@pytest.mark.parametrize("d,message", [
    ({**neo_dict(), "model_type": "gpt2"}, "unsupported model_type 'gpt2': neoj runs gpt_neo, gptj"),
    (neo_small(model_type=...), "unsupported model_type None"),
    (neo_small(activation_function="mish"), "unsupported activation_function 'mish'"),
    (neo_small(vocab_size=...), "config.json has no vocab_size"),
    (neo_small(hidden_size=...), "config.json has no hidden_size"),
    (neo_small(num_heads=...), "config.json has no num_heads / num_attention_heads"),
    (gptj_small(n_layer=...), "config.json has no n_layer / num_hidden_layers"),
    (gptj_small(n_embd=None), "config.json has no n_embd / hidden_size"),
    (neo_small(attention_types=[[["global"], 3]]), "attention_types expands to 3 layers but num_layers is 2"),
    (neo_small(attention_types=[[["global", "sparse"], 1]]), r"unknown attention kinds \['sparse'\]"),
    (neo_small(attention_types=[["global", "local"]]), "is not of the form"),
    (neo_small(num_heads=5), "hidden size 32 is not divisible by 5 heads"),
    (gptj_small(rotary_dim=3), "rotary_dim 3 must be even and at most head_dim 8"),
    (gptj_small(rotary_dim=16), "rotary_dim 16 must be even and at most head_dim 8"),
    (neo_small(window_size=0), "window_size must be positive for local attention layers, got 0"),
])
def test_bad_configs_raise_config_errors_naming_the_field(d, message):
    with pytest.raises(ConfigError, match=message):
        from_hf_dict(d)


def test_a_window_of_zero_is_fine_without_local_layers():
    assert from_hf_dict(neo_small(window_size=0, attention_types=[[["global"], 2]])).window_size == 0


def test_a_loaded_config_keeps_its_file_and_a_changed_one_does_not(tmp_path):
    d = neo_small()
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = load_config(tmp_path)
    assert cfg.to_hf_dict() == d
    changed = with_changes(cfg, n_positions=64)
    assert changed.source == {} and changed.to_hf_dict()["max_position_embeddings"] == 64

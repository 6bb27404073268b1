"""Shared fixtures: tiny random GPT-Neo and GPT-J checkpoints written by transformers, loaded by neoj.

transformers is the numerical reference. Every checkpoint is built once per session, seeded, in fp32
and eval mode, and saved with save_pretrained; neoj then loads it from disk like any real checkpoint.
Models are tiny (hidden 32, 1-4 layers) and local layers use an 8-token window, so prompts longer
than the window cost nothing.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GenerationConfig, GPT2TokenizerFast, GPTJConfig, GPTJForCausalLM, GPTNeoConfig
from transformers import GPTNeoForCausalLM
from transformers.utils import logging as hf_logging

import neoj
from neoj.tokenizer import bundled_gpt2_dir

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
# Tiny models gain nothing from intra-op threads, and on a busy machine with few cores OpenMP's spinning
# barriers make each small op many times slower: one thread keeps the suite fast and steady.
torch.set_num_threads(1)

@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module whose tests may run after others that changed it: tiny models run fastest
    on one, and the test machine is shared (use with pytestmark = pytest.mark.usefixtures("one_thread"))."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


EOS = 50256
WINDOW = 8
# The GPT-2 tokenizer files shared by the project; neoj ships a copy, used when they are not there.
SHARED_GPT2_DIR = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "gpt2"  # ../shared beside the repo
GPT2_DIR = SHARED_GPT2_DIR if (SHARED_GPT2_DIR / "vocab.json").exists() else bundled_gpt2_dir()

# Prompts of varied length; all but SHORT_PROMPT are longer than the local window.
SHORT_PROMPT = "Hello there"
PROMPTS = [
    "The quick brown fox jumps over the lazy dog, and then it runs back into the forest to sleep.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "In 1998, the café on the corner served 42 kinds of tea — naïve tourists tried them all. 東京",
]

_NEO_BASE = dict(vocab_size=50257, max_position_embeddings=512, hidden_size=32, num_heads=4, window_size=WINDOW)
_GPTJ_BASE = dict(vocab_size=50400, n_positions=512, n_embd=32, n_head=2, rotary_dim=8)

# name -> (config class, model class, config kwargs)
SPECS: dict[str, tuple] = {
    # The workhorse GPT-Neo: alternating global/local layers, as the published checkpoints.
    "neo": ("gpt_neo", dict(num_layers=4, attention_types=[[["global", "local"], 2]])),
    "neo_local3": ("gpt_neo", dict(num_layers=3, attention_types=[[["local"], 3]])),
    "neo_global2": ("gpt_neo", dict(num_layers=2, attention_types=[[["global"], 2]])),
    "neo_local_global": ("gpt_neo", dict(num_layers=2, attention_types=[[["local", "global"], 1]])),
    "neo_relu": ("gpt_neo", dict(num_layers=2, attention_types=[[["global", "local"], 1]], intermediate_size=48,
                                 activation_function="relu", layer_norm_epsilon=1e-3)),
    "neo_gelu": ("gpt_neo", dict(num_layers=2, attention_types=[[["local", "global"], 1]], intermediate_size=80,
                                 activation_function="gelu", layer_norm_epsilon=1e-6)),
    "neo_untied": ("gpt_neo", dict(num_layers=2, attention_types=[[["global", "local"], 1]],
                                   tie_word_embeddings=False)),
    # A short context for the prompt-length policy.
    "neo_ctx64": ("gpt_neo", dict(num_layers=2, attention_types=[[["global", "local"], 1]],
                                  max_position_embeddings=64)),
    # The workhorse GPT-J: head_dim 16, rotary on the first 8 dims only, vocabulary padded to 50400.
    "gptj": ("gptj", dict(n_layer=2)),
    "gptj_rotary_full": ("gptj", dict(n_layer=2, rotary_dim=16)),
    "gptj_tied": ("gptj", dict(n_layer=2, tie_word_embeddings=True)),
    # lm_head.bias pushes the padded rows 50257.. to the top: they must never be generated.
    "gptj_padded_top": ("gptj", dict(n_layer=1)),
}


@dataclass
class Tiny:
    """One tiny checkpoint: the transformers model it was saved from, its directory, and neoj's load of it."""

    name: str
    path: Path
    hf: torch.nn.Module
    lm: neoj.LanguageModel

    @property
    def model(self):
        """Returns neoj's Transformer."""
        return self.lm.model


def _randomize(model: torch.nn.Module) -> None:
    """Makes LayerNorm weights and every bias non-trivial, so a dropped bias or swapped norm shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or "ln_f" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)


def build_hf(name: str) -> torch.nn.Module:
    """Returns the seeded fp32 transformers model for SPECS[name], in eval mode."""
    family, kwargs = SPECS[name]
    torch.manual_seed(zlib.crc32(name.encode()))
    # A wide init (0.2, not 0.02) spreads the logits, so greedy argmax is never a near-tie.
    if family == "gpt_neo":
        cfg = GPTNeoConfig(**{**_NEO_BASE, **kwargs}, initializer_range=0.2)
        model = GPTNeoForCausalLM(cfg)
    else:
        cfg = GPTJConfig(**{**_GPTJ_BASE, **kwargs}, initializer_range=0.2)
        model = GPTJForCausalLM(cfg)
    _randomize(model)
    if name == "gptj_padded_top":
        with torch.no_grad():
            model.lm_head.bias[50257:] += 20.0
    # Greedy reference generation must not stop at <|endoftext|>: neoj runs with stop_at_eos=False.
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=EOS,
                                               bos_token_id=EOS)
    return model.float().eval()


class Zoo:
    """Builds, saves and loads the tiny checkpoints on first use, once per session."""

    def __init__(self, root: Path):
        self.root = root
        self._built: dict[str, Tiny] = {}

    def __getitem__(self, name: str) -> Tiny:
        if name not in self._built:
            hf = build_hf(name)
            path = self.root / name
            hf.save_pretrained(path)
            self._built[name] = Tiny(name, path, hf, neoj.load(path, dtype="float32", device="cpu"))
        return self._built[name]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    """Returns the session's tiny checkpoints, by SPECS name."""
    return Zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def neo(zoo) -> Tiny:
    """Returns the 4-layer global/local GPT-Neo checkpoint."""
    return zoo["neo"]


@pytest.fixture(scope="session")
def gptj(zoo) -> Tiny:
    """Returns the 2-layer GPT-J checkpoint (rotary_dim 8 of head_dim 16, vocab 50400)."""
    return zoo["gptj"]


@pytest.fixture(scope="session", params=["neo", "gptj"])
def family(request, zoo) -> Tiny:
    """Returns each family's workhorse checkpoint in turn."""
    return zoo[request.param]


@pytest.fixture(scope="session")
def hf_tokenizer() -> GPT2TokenizerFast:
    """Returns transformers' GPT-2 tokenizer, the reference for token ids."""
    return GPT2TokenizerFast.from_pretrained(str(GPT2_DIR))


@pytest.fixture(scope="session")
def tokenizer() -> neoj.Tokenizer:
    """Returns neoj's bundled GPT-2 tokenizer."""
    return neoj.Tokenizer.from_dir()


def _write_bin(directory: Path, state: dict[str, torch.Tensor], config: dict, shards: int = 1) -> Path:
    """Writes config.json and pytorch_model.bin (or an index plus `shards` .bin shards)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return directory
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i::shards]}
        torch.save(part, directory / file)
        weight_map.update({k: file for k in part})
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


@pytest.fixture(scope="session")
def neo_formats(neo, tmp_path_factory) -> dict[str, Path]:
    """Returns the `neo` checkpoint in every on-disk form: safetensors, .bin, sharded of each."""
    root = tmp_path_factory.mktemp("formats")
    config = json.loads((neo.path / "config.json").read_text())
    state = load_file(str(neo.path / "model.safetensors"))
    # Old GPT-Neo .bin files also carry the causal-mask buffers; a loader must ignore them.
    legacy = dict(state)
    for i in range(config["num_layers"]):
        legacy[f"transformer.h.{i}.attn.attention.bias"] = torch.tril(torch.ones(1, 1, 512, 512, dtype=torch.bool))
        legacy[f"transformer.h.{i}.attn.attention.masked_bias"] = torch.tensor(-1e9)
    sharded = root / "sharded_safetensors"
    neo.hf.save_pretrained(sharded, max_shard_size="100KB")
    return {
        "safetensors": neo.path,
        "bin": _write_bin(root / "bin", legacy, config),
        "sharded_bin": _write_bin(root / "sharded_bin", state, config, shards=3),
        "sharded_safetensors": sharded,
    }


@torch.no_grad()
def left_pad(rows: list[list[int]], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (ids, valid) (B, P) with the rows right-aligned, padded with EOS on the left."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), EOS)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        valid[i, width - len(r):] = True
    return ids.to(device), valid.to(device)


def hf_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Returns transformers' fp32 logits (T, V) for one unpadded sequence."""
    return hf(torch.tensor([ids])).logits[0].float()


@torch.inference_mode()
def neoj_logits(lm: neoj.LanguageModel, ids: list[int]) -> torch.Tensor:
    """Returns neoj's fp32 logits (T, V) for one unpadded sequence, with no cache."""
    model = lm.model
    return model.logits(model(torch.tensor([ids])))[0]


def tiny_server_config(n_positions: int = 128, layers: int = 4) -> dict:
    """Returns the HF config of the server tests' tiny GPT-Neo: hidden 32, 4 heads, global/local layers, window 8."""
    return {"model_type": "gpt_neo", "vocab_size": 50257, "max_position_embeddings": n_positions, "hidden_size": 32,
            "num_layers": layers, "num_heads": 4, "attention_types": [[["global", "local"], layers // 2]],
            "window_size": WINDOW}


@pytest.fixture(scope="module")
def serve_tiny():
    """Returns serve(n_positions=128, layers=4, **create_app options) -> a started BackgroundServer.

    Each server runs a tiny random GPT-Neo (seeded 0, one model per shape in the module, reachable as
    server.lm) on a loopback port. Torch runs on one thread meanwhile: tiny models gain nothing from more,
    and client, server and model threads share the test machine. Every server stops when the module ends.
    """
    from neoj.config import from_hf_dict
    from neoj.server import run_in_thread

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    models: dict[tuple[int, int], neoj.LanguageModel] = {}
    servers = []

    def serve(n_positions: int = 128, layers: int = 4, **options):
        if (n_positions, layers) not in models:
            torch.manual_seed(0)
            config = from_hf_dict(tiny_server_config(n_positions, layers))
            models[n_positions, layers] = neoj.from_config(config, dtype="float32", device="cpu")
        server = run_in_thread(models[n_positions, layers], **options)
        server.lm = models[n_positions, layers]
        servers.append(server)
        return server

    yield serve
    for server in servers:
        server.stop()
    torch.set_num_threads(before)

"""The Python API: `neoj.load(...)` returns a LanguageModel that generates, streams, scores and embeds."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

import torch

from .config import PRESETS, ModelConfig, preset
from .errors import ConfigError, NeojError
from .kernels import use_decode_kernels
from .generate import Completion, Score, generate_batch, score_ids, stream_batch
from .model import Transformer
from .sampling import GenerationParams
from .tokenizer import Tokenizer
from .weights import load_model, random_model, resolve_model_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
RANDOM_PREFIX = "random:"


def builtin_model_dir() -> Path | None:
    """Returns the directory of the model shipped inside neoj, if this install has one."""
    path = Path(__file__).parent / "builtin"
    return path if (path / "config.json").exists() else None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Returns the torch device for "auto" (CUDA when present), a name, or a device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise NeojError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NeojError(f"device {device!r} asked for, but this PyTorch has no CUDA device; use --device cpu")
    return dev


def available_memory(device: torch.device) -> int:
    """Returns the bytes free for weights on `device` (RAM for cpu)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def cpu_has_fast_bf16() -> bool:
    """Returns True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX)."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        try:
            if getattr(torch.cpu, probe)():
                return True
        except Exception:  # a private probe missing from this torch build: assume no
            pass
    return False


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, cfg: ModelConfig) -> torch.dtype:
    """Returns the dtype to run in; "auto" picks the fastest safe one for the device.

    CPU: bfloat16 where the CPU has bf16 instructions (AVX512-BF16, AMX): measured on such a 2-core
    EPYC, 2.2x faster prefill and 1.7x faster decode than fp32. Without them, bf16 matrix-matrix products
    run 10-100x slower than fp32, so float32 -- unless the fp32 weights would not fit in RAM.
    CUDA: bfloat16 where supported. float16 is never picked silently for GPT-Neo: its attention
    overflows fp16 on long inputs (transformers #11076). bf16 has fp32's range, and attention scores
    and softmax always run in fp32.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        if dtype not in DTYPES:
            raise NeojError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        return DTYPES[dtype]
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if cfg.rotary_dim else torch.float32
    if cpu_has_fast_bf16():
        return torch.bfloat16
    fp32_bytes = cfg.num_parameters() * 4
    return torch.float32 if fp32_bytes < 0.8 * available_memory(device) else torch.bfloat16


# Below this size the weights sit in cache and the default kernels are already fast.
DECODE_KERNEL_MIN_PARAMS = 20_000_000
# Half-precision single-row decoding compiles a kernel (seconds per process) only above this weight size.
COMPILE_MIN_WEIGHT_BYTES = 1 << 30


def prepare_for_inference(model: Transformer) -> Transformer:
    """Returns the model with its CPU decode fast paths installed (see neoj.kernels)."""
    if model.num_parameters() >= DECODE_KERNEL_MIN_PARAMS:
        weight_bytes = model.num_parameters() * model.wte.weight.element_size()
        use_decode_kernels(model, allow_compile=weight_bytes >= COMPILE_MIN_WEIGHT_BYTES)
    return model


class LanguageModel:
    """A loaded model and its tokenizer, with text-in, text-out methods."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, name: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name

    @property
    def config(self) -> ModelConfig:
        """Returns the model's configuration."""
        return self.model.config

    @property
    def device(self) -> torch.device:
        """Returns the device the weights live on."""
        return self.model.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Returns the dtype the model computes in."""
        return self.model.wte.weight.dtype

    def __repr__(self) -> str:
        return f"LanguageModel({self.name!r}, {self.config.model_type}, {self.dtype}, {self.device})"

    def complete(self, prompts: str | list[str], **options) -> list[Completion]:
        """Returns a Completion (text, tokens, logprobs, finish reason) per prompt and return sequence."""
        params = GenerationParams.from_kwargs(**options)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return generate_batch(self.model, self.tokenizer, self.tokenizer.encode_batch(prompts), params)

    def generate(self, prompt: str | list[str], **options) -> str | list[str] | list[list[str]]:
        """Returns the generated text for a prompt, or a list for a list of prompts.

        With num_return_sequences=N > 1 each prompt gives a list of N texts.
        Options are GenerationParams fields: max_new_tokens, temperature (0 = greedy), top_k, top_p,
        repetition_penalty, stop, seed, num_return_sequences, truncate, ...
        """
        completions = self.complete(prompt, **options)
        n = options.get("num_return_sequences") or 1
        texts = [c.text for c in completions]
        if n > 1:
            texts = [texts[i : i + n] for i in range(0, len(texts), n)]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str, **options) -> Iterator[str]:
        """Yields the generated text of one prompt piece by piece, as it is produced."""
        params = GenerationParams.from_kwargs(**options)
        if params.num_return_sequences != 1:
            raise NeojError("stream() produces one sequence; use generate() for num_return_sequences > 1")
        for events in stream_batch(self.model, self.tokenizer, [self.tokenizer.encode(prompt)], params):
            for event in events:
                if event.text:
                    yield event.text

    def score(self, text: str) -> Score:
        """Returns the log-likelihood of `text`: per-token log-probabilities and their total."""
        return score_ids(self.model, self.tokenizer.encode(text))

    @torch.inference_mode()
    def hidden_states(self, text: str) -> torch.Tensor:
        """Returns the final-layer hidden states (T, C) of `text`, as GPTNeoModel's last_hidden_state."""
        ids = self.tokenizer.encode(text)[-self.config.n_positions :] or [self.tokenizer.eos_token_id]
        return self.model(torch.tensor([ids], device=self.device))[0].float()

    def embed(self, texts: str | list[str]) -> torch.Tensor:
        """Returns one mean-pooled hidden-state vector per text (N, C), for features or similarity."""
        texts = [texts] if isinstance(texts, str) else texts
        return torch.stack([self.hidden_states(t).mean(dim=0) for t in texts])


def load(name_or_path: str | os.PathLike | None = None, dtype: str | torch.dtype = "auto",
         device: str | torch.device = "auto", revision: str | None = None,
         adapter: str | os.PathLike | None = None) -> LanguageModel:
    """Returns a LanguageModel from a local checkpoint directory, a Hub id, or "random:PRESET".

    With no name, loads the model shipped inside neoj. `adapter` is a LoRA adapter directory (PEFT
    format) merged into the weights as they load.
    """
    dev = resolve_device(device)
    if name_or_path is None:
        builtin = builtin_model_dir()
        if builtin is None:
            raise NeojError("this install has no built-in model; pass a model (a directory, a Hub id such as "
                            "EleutherAI/gpt-neo-125m, or random:gpt-neo-125m)")
        name_or_path = builtin
    name = str(name_or_path)
    if name.startswith(RANDOM_PREFIX):
        return from_config(name[len(RANDOM_PREFIX) :], dtype=dtype, device=dev)
    directory = resolve_model_dir(name_or_path, revision=revision)
    from .config import load_config

    cfg = load_config(directory)
    model = load_model(directory, resolve_dtype(dtype, dev, cfg), dev, cfg)
    if adapter is not None:
        from .train.lora import apply_adapter

        apply_adapter(model, adapter)
    return LanguageModel(prepare_for_inference(model), Tokenizer.from_dir(directory), name)


def from_config(config: ModelConfig | str, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
                seed: int = 0) -> LanguageModel:
    """Returns a randomly initialised model of a preset name (e.g. "gpt-neo-125m") or ModelConfig."""
    dev = resolve_device(device)
    if isinstance(config, str):
        if config not in PRESETS:
            raise ConfigError(f"unknown preset {config!r}; presets: {', '.join(PRESETS)}")
        name, config = f"{RANDOM_PREFIX}{config}", preset(config)
    else:
        name = f"{RANDOM_PREFIX}{config.model_type}"
    model = random_model(config, resolve_dtype(dtype, dev, config), dev, seed)
    return LanguageModel(prepare_for_inference(model), Tokenizer.from_dir(), name)

"""The Python API: `neoj.load(...)` returns a LanguageModel that generates, streams, scores and embeds."""

from __future__ import annotations

import logging
import os
from typing import Iterator

import torch

from .adapters import AdapterInfo, adapter_names, load_adapter
from .devices import DTYPES, available_memory, cpu_has_fast_bf16, resolve_device, resolve_dtype
from .config import PRESETS, ModelConfig, load_config, preset
from .errors import ConfigError, NeojError
from . import linear, weights
from .kernels import use_decode_kernels
from .engine import PrefixCache, Speculative
from .engine.prefix_cache import DEFAULT_PREFIX_CACHE_MB
from .huge_pages import move_to_huge_pages
from .generate import Completion, Score, generate_batch, score_ids, stream_batch
from .model import Transformer
from .model_utils import mean_pooled
from .sampling import GenerationParams
from .tensor_parallel import load_tensor_parallel, tensor_parallel_processes
from .tokenizer import Tokenizer
from .distributed import Processes
from .memory import DTYPE_NAMES, check_fits, memory_limit, plan
from .placement import load_placed, plan_device_map
from .quantize import QuantSpec, StreamingQuantizer, load_quantized, quantize_model
from .weights import (BUILTIN_NAME, RANDOM_PREFIX, build_meta, load_model, load_state_into, random_model,
                      resolve_model_dir, weight_files)

log = logging.getLogger(__name__)

builtin_model_dir = weights.builtin_model_dir  # re-exported: neoj.api.builtin_model_dir predates neoj.weights

# The device and dtype helpers live in neoj.devices and stay importable from here.
__all__ = ["LanguageModel", "load", "from_config", "prepare_for_inference", "check_device_map_alone",
           "builtin_model_dir", "DTYPES", "available_memory", "cpu_has_fast_bf16", "resolve_device", "resolve_dtype",
           "DECODE_KERNEL_MIN_PARAMS", "COMPILE_MIN_WEIGHT_BYTES"]

# Below this size the weights sit in cache and the default kernels are already fast.
DECODE_KERNEL_MIN_PARAMS = 20_000_000
# Half-precision single-row decoding compiles a kernel (seconds per process) only above this weight size.
COMPILE_MIN_WEIGHT_BYTES = 1 << 30


def prepare_for_inference(model: Transformer) -> Transformer:
    """Returns the model with its CPU decode fast paths installed (see neoj.kernels; neoj.quantize has its own) and
    its large CPU weights in huge pages (neoj.huge_pages)."""
    move_to_huge_pages(model)
    if model.num_parameters() >= DECODE_KERNEL_MIN_PARAMS:
        weight_bytes = model.num_parameters() * model.wte.weight.element_size()
        use_decode_kernels(model, allow_compile=weight_bytes >= COMPILE_MIN_WEIGHT_BYTES)
    else:
        linear.prepare(model)  # a small quantized model: its int8 C kernels are built now, not in a request
    return model


class LanguageModel:
    """A loaded model and its tokenizer, with text-in, text-out methods.

    `prefix_cache`: the PrefixCache every generation of this model shares (its methods, the tasks and chat
    sessions over it, `neoj batch`, the server), so a prompt that starts like an earlier one (a chat's history,
    a task's few-shot examples, a system prompt) skips prefilling the common part. The default holds up to
    DEFAULT_PREFIX_CACHE_MB MiB, allocated only as blocks are stored; set None to turn it off, or
    PrefixCache.megabytes(mb) for another size. `speculative`: how generation guesses ahead (a Speculative,
    "prompt_lookup" or a draft model, see Speculative.of), None (default) for plain decoding; the output is
    the same either way, only the speed differs.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, name: str = "", quantization: QuantSpec | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.quantization = quantization
        self.prefix_cache: PrefixCache | None = PrefixCache.megabytes(DEFAULT_PREFIX_CACHE_MB)
        self._speculative: Speculative | None = None

    @property
    def speculative(self) -> Speculative | None:
        """Returns how this model's generations speculate (None: they do not)."""
        return self._speculative

    @speculative.setter
    def speculative(self, value) -> None:
        """Sets it from a Speculative, "prompt_lookup", a draft model (Transformer or LanguageModel) or None."""
        self._speculative = Speculative.of(value)

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
        quant = f", {self.quantization.scheme}" if self.quantization else ""
        return f"LanguageModel({self.name!r}, {self.config.model_type}, {self.dtype}{quant}, {self.device})"

    @property
    def adapter_names(self) -> list[str]:
        """Returns the names of the LoRA adapters served over this model (load_adapter), in loading order."""
        return adapter_names(self.model)

    def load_adapter(self, name: str, directory: str | os.PathLike) -> AdapterInfo:
        """Serves the PEFT LoRA adapter in `directory` as `name`; returns what was loaded.

        Nothing is merged: generations with adapter=name add the adapter's low-rank product to the base
        layers' outputs, and other rows of the same batch keep the base (or their own adapter). Adapters of
        different ranks and target modules coexist; quantized models take them too. A name already used, the
        model's own name, or an adapter made for another shape is refused with the model left as it was.
        """
        return load_adapter(self.model, name, directory, base=self.name or "the base model", reserved=(self.name,))

    def _plan(self, options: dict) -> tuple[GenerationParams, Speculative | None]:
        """Returns the GenerationParams of `options` and the Speculative for the call.

        speculative=True/False is the per-call opt-out (GenerationParams.speculative) under self.speculative;
        a Speculative, "prompt_lookup" or a draft model replaces self.speculative for this call only;
        absent or None keeps self.speculative.
        """
        options = dict(options)
        value = options.pop("speculative", None)
        speculative = self.speculative
        if isinstance(value, bool):
            options["speculative"] = value
        elif value is not None:
            speculative = Speculative.of(value)
        return GenerationParams.from_kwargs(**options), speculative

    def complete(self, prompts: str | list[str], **options) -> list[Completion]:
        """Returns a Completion (text, tokens, logprobs, finish reason) per prompt and return sequence.

        Each Completion also says how many prompt tokens came from the prefix cache (cached_tokens) and how
        many speculative guesses were verified and accepted (drafted_tokens, accepted_tokens,
        acceptance_rate). Options are those of generate().
        """
        params, speculative = self._plan(options)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return generate_batch(self.model, self.tokenizer, self.tokenizer.encode_batch(prompts), params,
                              prefix_cache=self.prefix_cache, speculative=speculative)

    def generate(self, prompt: str | list[str], **options) -> str | list[str] | list[list[str]]:
        """Returns the generated text for a prompt, or a list for a list of prompts.

        With num_return_sequences=N > 1 each prompt gives a list of N texts.
        Options are GenerationParams fields: max_new_tokens, temperature (0 = greedy), top_k, top_p,
        repetition_penalty, stop, seed, num_return_sequences, truncate, adapter (a load_adapter name), ...
        and speculative: False skips self.speculative for this call; "prompt_lookup", a draft model or a
        Speculative speculates this way for this call (the text is the same as without, only faster or not).
        """
        completions = self.complete(prompt, **options)
        n = options.get("num_return_sequences") or 1
        texts = [c.text for c in completions]
        if n > 1:
            texts = [texts[i : i + n] for i in range(0, len(texts), n)]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str, **options) -> Iterator[str]:
        """Yields the generated text of one prompt piece by piece, as it is produced (options as generate's)."""
        params, speculative = self._plan(options)
        if params.num_return_sequences != 1:
            raise NeojError("stream() produces one sequence; use generate() for num_return_sequences > 1")
        for events in stream_batch(self.model, self.tokenizer, [self.tokenizer.encode(prompt)], params,
                                   prefix_cache=self.prefix_cache, speculative=speculative):
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
        """Returns one mean-pooled hidden-state vector per text (N, C), for features or similarity.

        Each text runs through the model alone, unpadded: the reference that the batched embeddings of
        neoj.tasks and the server (neoj.model_utils.embed_rows) equal to float rounding.
        """
        texts = [texts] if isinstance(texts, str) else texts
        vectors: list[torch.Tensor] = []
        for text in texts:
            hidden = self.hidden_states(text)[None]  # (1, T, C)
            vectors += mean_pooled(hidden, [hidden.shape[1]])
        return torch.stack(vectors)


def load(name_or_path: str | os.PathLike | None = None, dtype: str | torch.dtype = "auto",
         device: str | torch.device = "auto", revision: str | None = None,
         adapter: str | os.PathLike | None = None, quantize: str | None = None, group_size: int | None = None,
         context: int | None = None, batch: int = 1, check_memory: bool = True, tp: int | None = None,
         device_map: str | dict | None = None) -> LanguageModel:
    """Returns a LanguageModel from a local checkpoint directory, a Hub id, "builtin" or "random:PRESET".

    With no name, or "builtin", loads the model shipped inside neoj (a directory called builtin in the
    current directory wins, as any existing directory does; see neoj.weights.resolution for every rule). `adapter`
    is a LoRA adapter directory (PEFT format) merged into the weights as they load, random:PRESET ones
    included; an adapter made for another shape is refused before any weight is read. `quantize`
    ("int8" or "int4", with `group_size`) quantizes every linear layer and the LM head while the
    checkpoint streams in; a checkpoint written by `neoj quantize` loads quantized by itself. Before
    reading any weight, the memory needed for `batch` sequences of `context` tokens (default: the whole
    context) is checked against what the device has free (or NEOJ_MEMORY_LIMIT); a model that cannot fit
    raises MemoryPlanError naming the options that would.

    `tp=N` splits the model over the N processes torchrun started (tensor parallelism, neoj.tensor_parallel): every
    rank calls load() and then runs the same generations, each holding 1/N of the weights. `device_map` places the
    model's layers across devices ("auto", or layer ranges such as "0-13:cuda:0,14-27:cpu"; neoj.placement).
    """
    check_device_map_alone(device, device_map)
    processes = tensor_parallel_processes(tp, device) if tp is not None else None
    dev = processes.device if processes is not None else resolve_device(device)
    if name_or_path is None:
        name_or_path = BUILTIN_NAME
    name = os.fspath(name_or_path)
    spec = QuantSpec.parse(quantize, group_size)
    if isinstance(name_or_path, str) and name.startswith(RANDOM_PREFIX):
        return from_config(name[len(RANDOM_PREFIX) :], dtype=dtype, device=dev, quantize=spec, context=context,
                           batch=batch, check_memory=check_memory, adapter=adapter, processes=processes,
                           device_map=device_map)
    directory = resolve_model_dir(name_or_path, revision=revision)
    cfg = load_config(directory)
    stored = QuantSpec.read(directory)
    spec = _checkpoint_spec(name, cfg, spec, stored, adapter)
    torch_dtype = resolve_dtype(dtype, dev, cfg, spec)
    if processes is not None or device_map is not None:
        model = _load_split(directory, cfg, torch_dtype, dev, spec, stored, adapter, processes, device_map,
                            check_memory, context, batch)
    else:
        model = _load_checkpoint(directory, cfg, torch_dtype, dev, spec, stored, adapter, name, check_memory,
                                 context, batch)
    return LanguageModel(prepare_for_inference(model), Tokenizer.from_dir(directory), name, spec)


def _checkpoint_spec(name: str, cfg: ModelConfig, spec: QuantSpec | None, stored: QuantSpec | None,
                     adapter) -> QuantSpec | None:
    """Returns the quantization a checkpoint loads with (the one it was written with, else `spec`); refuses a
    second quantization, an adapter over a quantized checkpoint, and an adapter made for another shape."""
    if stored is not None and spec is not None and spec != stored:
        raise NeojError(f"{name} is already quantized ({stored.scheme}); load it without quantize, or quantize "
                        "the full-precision checkpoint")
    if adapter is not None and stored is not None:
        raise NeojError(f"a LoRA adapter cannot be merged into the already quantized checkpoint {name}; load the "
                        "full-precision model with adapter= and quantize=")
    if adapter is not None:
        from .train.lora import check_adapter

        check_adapter(adapter, cfg, name)
    return stored or spec


def _load_checkpoint(directory, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, spec: QuantSpec | None,
                     stored: QuantSpec | None, adapter, name: str, check_memory: bool, context: int | None,
                     batch: int) -> Transformer:
    """Returns the model of a checkpoint directory on one device: quantized as stored, quantized while it
    streams in (`spec`), or full precision with `adapter` merged (then quantized if asked)."""
    if check_memory:
        # With an adapter the full-precision model exists before it is quantized: plan for that.
        _check_memory(cfg, dtype, None if adapter is not None else spec, device, name, context, batch)
    if stored is not None:
        model = load_quantized(directory, stored, dtype, device, cfg)
    elif spec is not None and adapter is None:
        model = build_meta(cfg)
        quantizer = StreamingQuantizer(model, spec, dtype, device)
        load_state_into(model, weight_files(directory), dtype, device, transform=quantizer)
        model = quantizer.finish(model).eval()
    else:
        model = load_model(directory, dtype, device, cfg)
    if adapter is not None:
        model = _apply_adapter(model, adapter, spec)
    return model


def check_device_map_alone(device, device_map) -> None:
    """Raises NeojError when both a device and a device map are given: the map places every part itself."""
    if device_map is not None and device not in (None, "auto"):
        raise NeojError(f"--device {device} and --device-map {device_map} both say where the model goes; give only "
                        "--device-map (it places the embeddings and head with the first layer)")


def _load_split(directory, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, spec: QuantSpec | None,
                stored: QuantSpec | None, adapter, processes: Processes | None, device_map, check_memory: bool,
                context: int | None, batch: int, seed: int = 0) -> Transformer:
    """Returns a model split over processes (tensor parallelism) or placed across devices (a device map), from a
    checkpoint directory (None: random weights drawn with `seed`)."""
    if adapter is not None:
        raise NeojError("a LoRA adapter cannot be merged while loading a model split over processes or devices; "
                        "merge it first (neoj merge BASE ADAPTER -o DIR) and load DIR")
    if processes is not None:
        if device_map is not None:
            raise NeojError("--tp and --device-map cannot be combined: tensor parallelism puts each rank's share "
                            "of every layer on its own device")
        return load_tensor_parallel(directory, cfg, dtype, processes, spec, stored, check_memory=check_memory,
                                    context=context, batch=batch, seed=seed)
    placement = plan_device_map(device_map, cfg, dtype, spec, context=context, batch=batch, check=check_memory)
    return load_placed(directory, cfg, dtype, placement, spec, stored, seed=seed)


def _apply_adapter(model: Transformer, adapter: str | os.PathLike, spec: QuantSpec | None) -> Transformer:
    """Merges a LoRA adapter into a full-precision model, then quantizes it if asked."""
    from .train.lora import apply_adapter

    apply_adapter(model, adapter)
    return quantize_model(model, spec) if spec is not None else model


def _check_memory(cfg: ModelConfig, dtype: torch.dtype, spec: QuantSpec | None, device: torch.device, name: str,
                  context: int | None, batch: int) -> None:
    """Raises MemoryPlanError if the model would not fit on `device` (see neoj.memory)."""
    dtype_name = DTYPE_NAMES[dtype]
    chosen = plan(cfg, dtype_name, spec.scheme if spec else None, context, batch, spec.group_size if spec else 128)
    check_fits(cfg, chosen, memory_limit(available_memory(device)), str(device), name, context, batch,
               spec.group_size if spec else 128)


def from_config(config: ModelConfig | str, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
                seed: int = 0, quantize: str | QuantSpec | None = None, group_size: int | None = None,
                context: int | None = None, batch: int = 1, check_memory: bool = True,
                adapter: str | os.PathLike | None = None, processes: Processes | None = None,
                device_map: str | dict | None = None) -> LanguageModel:
    """Returns a randomly initialised model of a preset name (e.g. "gpt-neo-125m") or ModelConfig.

    With `quantize`, each weight is quantized as it is drawn: the full-precision model never exists.
    `adapter` (a LoRA directory) is merged into the random weights, as load() does for checkpoints
    (useful to time or test an adapter without its base); one made for another shape is refused first.
    `processes` (from tensor_parallel_processes) and `device_map` split the model as load()'s tp and device_map do.
    """
    if isinstance(device, str):
        check_device_map_alone(device, device_map)
    dev = processes.device if processes is not None else resolve_device(device)
    if isinstance(config, str):
        if config.lower() not in PRESETS:
            raise ConfigError(f"unknown preset {config!r}; presets: {', '.join(PRESETS)}")
        name, config = f"{RANDOM_PREFIX}{config.lower()}", preset(config)
    else:
        name = f"{RANDOM_PREFIX}{config.model_type}"
    spec = QuantSpec.parse(quantize, group_size)
    if adapter is not None:
        from .train.lora import check_adapter

        check_adapter(adapter, config, name)
    torch_dtype = resolve_dtype(dtype, dev, config, spec)
    if processes is not None or device_map is not None:
        model = _load_split(None, config, torch_dtype, dev, spec, None, adapter, processes, device_map, check_memory,
                            context, batch, seed)
        return LanguageModel(prepare_for_inference(model), Tokenizer.from_dir(), name, spec)
    if check_memory:
        _check_memory(config, torch_dtype, None if adapter is not None else spec, dev, name, context, batch)
    if spec is None or adapter is not None:
        model = random_model(config, torch_dtype, dev, seed)
        if adapter is not None:
            model = _apply_adapter(model, adapter, spec)
    else:
        quantizer = StreamingQuantizer(build_meta(config), spec, torch_dtype, dev)
        model = quantizer.finish(random_model(config, torch_dtype, dev, seed, transform=quantizer,
                                              model=quantizer.model))
    return LanguageModel(prepare_for_inference(model), Tokenizer.from_dir(), name, spec)

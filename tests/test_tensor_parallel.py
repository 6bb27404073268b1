"""Tensor parallelism: a model split over 2 gloo processes on the CPU computes what the single-process model computes.

torchrun launches cost seconds each, so one launch of this file as a worker (see `worker` at the bottom) loads
every checkpoint of a job list under --tp 2 and writes what rank 0 and rank 1 computed; the tests compare that
with the single-process models here. Two more launches run the CLI (generate, eval perplexity).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import neoj
from neoj.config import from_hf_dict
from neoj.errors import ConfigError
from neoj.model import positions_from_valid

pytestmark = pytest.mark.usefixtures("one_thread")

EOS = 50256
LAUNCH_TIMEOUT_S = 240
PROMPTS = ["The quick brown fox jumps over the lazy dog, and then it runs back into the forest.", "Hi there"]
# hidden 64 and intermediate 256: each of 2 ranks has 32 and 128 input columns in out_proj and fc_out, whole
# int4 groups of 32.
WIDE = {"model_type": "gpt_neo", "vocab_size": 50257, "max_position_embeddings": 64, "hidden_size": 64,
        "num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]], "window_size": 8}
WIDE_J = {"model_type": "gptj", "vocab_size": 50400, "n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 4,
          "rotary_dim": 8}


def torchrun(*args: str, timeout: int = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Runs `torchrun --standalone --nproc-per-node 2 ARGS` with one thread per process; returns the finished run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NEOJ_COLLECTIVE_TIMEOUT": "120"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def batch_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (ids, key_valid) of a left-padded batch: a 20-token row (longer than the window of 8) and a short one."""
    long = [(7 * i + 3) % 50000 for i in range(20)]
    short = [11, 22, 33, 44, 55]
    ids = torch.tensor([long, [EOS] * (len(long) - len(short)) + short])
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, : len(long) - len(short)] = False
    return ids, valid


@torch.inference_mode()
def batch_logits(model) -> torch.Tensor:
    """Returns the model's fp32 logits (B, T, V) for batch_inputs()."""
    ids, valid = batch_inputs()
    return model.logits(model(ids, positions_from_valid(valid), key_valid=valid))


# ---------------------------------------------------------------------------------------------------------
# The checkpoints and the one worker launch


@pytest.fixture(scope="module")
def cases(zoo, tmp_path_factory):
    """Returns {case: load() keyword arguments}: every form of checkpoint the worker loads under --tp 2."""
    from neoj.quantize import QuantSpec, quantize_checkpoint
    from neoj.weights import load_model, random_model, save_checkpoint

    root = tmp_path_factory.mktemp("tp")
    neo_bf16, gptj_bin, wide, wide_j = root / "neo_bf16", root / "gptj_bin", root / "wide", root / "wide_j"
    save_checkpoint(load_model(zoo["neo"].path), neo_bf16, dtype=torch.bfloat16)  # loaded as fp32: plain reads
    zoo["gptj"].hf.save_pretrained(gptj_bin, safe_serialization=False)
    for path, hf in ((wide, WIDE), (wide_j, WIDE_J)):
        save_checkpoint(random_model(from_hf_dict(hf), seed=3), path)
    quantize_checkpoint(wide, root / "wide_int4", QuantSpec("int4", 32), max_shard_bytes=1 << 16)
    quantize_checkpoint(zoo["gptj"].path, root / "gptj_int8", QuantSpec("int8"))
    fp32 = {"dtype": "float32"}
    return {
        "neo": {"name_or_path": str(zoo["neo"].path), **fp32},  # fp32 safetensors: memory-mapped
        "gptj": {"name_or_path": str(zoo["gptj"].path), **fp32},
        "neo_untied": {"name_or_path": str(zoo["neo_untied"].path), **fp32},
        "neo_plain_read": {"name_or_path": str(neo_bf16), **fp32},
        "gptj_bin": {"name_or_path": str(gptj_bin), **fp32},
        "neo_int8": {"name_or_path": str(zoo["neo"].path), "quantize": "int8", **fp32},
        "gptj_int8": {"name_or_path": str(zoo["gptj"].path), "quantize": "int8", **fp32},
        "wide_int4": {"name_or_path": str(wide), "quantize": "int4", "group_size": 32, **fp32},
        "wide_j_int4": {"name_or_path": str(wide_j), "quantize": "int4", "group_size": 32, **fp32},
        "wide_int4_bf16": {"name_or_path": str(wide), "quantize": "int4", "group_size": 32, "dtype": "bfloat16"},
        "prequantized_int4": {"name_or_path": str(root / "wide_int4"), **fp32},
        "prequantized_int8": {"name_or_path": str(root / "gptj_int8"), **fp32},
        "random": {"config": WIDE, "seed": 7, **fp32},
        "random_int8": {"config": WIDE_J, "seed": 7, "quantize": "int8", **fp32},
    }


@pytest.fixture(scope="module")
def tp_results(cases, tmp_path_factory):
    """Returns {case: {"logits", "texts", "texts_rank1", ...}} computed by one torchrun launch of 2 processes."""
    root = tmp_path_factory.mktemp("tp_run")
    jobs, out = root / "jobs.json", root / "results.pt"
    jobs.write_text(json.dumps(cases))
    run = torchrun(__file__, str(jobs), str(out))
    assert run.returncode == 0, run.stderr[-4000:]
    return torch.load(out)


def single(case: dict):
    """Returns the single-process LanguageModel of a case."""
    case = dict(case)
    if "config" in case:
        return neoj.from_config(from_hf_dict(case.pop("config")), device="cpu", **case)
    return neoj.load(device="cpu", **case)


def generations(lm) -> list[str]:
    """Returns greedy continuations of PROMPTS (batched, so the short prompt is left-padded)."""
    return lm.generate(PROMPTS, max_new_tokens=8, temperature=0)


@pytest.mark.parametrize("case", ["neo", "gptj", "neo_untied", "neo_plain_read", "gptj_bin", "random"])
def test_split_model_gives_the_single_process_logits_and_generations(cases, tp_results, case):
    got, lm = tp_results[case], single(cases[case])
    ids, valid = batch_inputs()
    want = batch_logits(lm.model)
    assert got["logits"].shape == want.shape
    # fp32 rounding of the partial sums: 1e-5 of the logits' scale (the wide-init tiny models reach about 10).
    torch.testing.assert_close(got["logits"][valid], want[valid], atol=1e-5 * want.abs().max().item(), rtol=0)
    assert got["texts"] == got["texts_rank1"] == generations(lm)
    assert got["local_heads"] == lm.config.n_heads // 2


@pytest.mark.parametrize("case", ["neo_int8", "gptj_int8", "wide_int4", "wide_j_int4", "wide_int4_bf16",
                                  "prequantized_int4", "prequantized_int8", "random_int8"])
def test_split_quantized_model_equals_the_single_process_quantized_model(cases, tp_results, case):
    got, lm = tp_results[case], single(cases[case])
    assert got["quantized"] and lm.quantization is not None
    # The same integer weights, bit for bit: each rank's layers are slices of the single-process layers.
    for name, shards in got["weights"].items():
        inputs_split = name.endswith(("out_proj", "fc_out"))  # else outputs (rows of the weight)
        want = layer_weight(lm.model.get_submodule(name if name != "lm_head.local" else "lm_head"))
        assert torch.equal(torch.cat(shards, dim=0 if inputs_split else 1), want), name
    # Logits: the quantized kernels round each layer's output in bf16, and a split layer rounds two partial sums
    # instead of one, an error the wide-init tiny models amplify layer by layer.
    _, valid = batch_inputs()
    want = batch_logits(lm.model)
    diff, scale = (got["logits"][valid] - want[valid]).abs(), want.abs().max().item()
    assert diff.max().item() <= 5e-2 * scale and diff.mean().item() <= 5e-3 * scale
    assert got["texts"] == got["texts_rank1"]


@torch.inference_mode()
def layer_weight(layer) -> torch.Tensor:
    """Returns the weight (in, out) a linear layer computes with: int8 layers' integers times their scales;
    other layers' (int4's packed weights) as their own kernel sees it, their product with the identity, bias
    left out."""
    if getattr(layer, "kernel", None) == "int8pack":
        return (layer.qweight.float() * layer.scales_fp32[:, None]).t()
    bias, layer.bias = layer.bias, None
    try:
        return layer(torch.eye(layer.in_features, dtype=torch.float32)).float()
    finally:
        layer.bias = bias


# ---------------------------------------------------------------------------------------------------------
# The command line


def test_cli_generate_under_torchrun_prints_what_one_process_prints_once(zoo):
    args = ["generate", "--model", str(zoo["neo"].path), "--dtype", "float32", "--temperature", "0",
            "--max-new-tokens", "8", PROMPTS[0]]
    one = subprocess.run([sys.executable, "-m", "neoj", "--threads", "1", *args], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    two = torchrun("-m", "neoj", "--threads", "1", *args, "--tp", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout and one.stdout.strip()


def test_cli_tp_without_torchrun_fails_with_one_line():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    run = subprocess.run([sys.executable, "-m", "neoj", "generate", "--model", "random:gpt-neo-125m", "--tp", "2",
                          "hello"], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1
    assert "--tp 2 needs 2 processes; start them with torchrun --nproc-per-node 2" in run.stderr


def test_cli_eval_perplexity_under_torchrun_prints_the_single_process_perplexity(zoo, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(" ".join(PROMPTS * 4))
    args = ["eval", "perplexity", "--model", str(zoo["neo"].path), "--data", str(data), "--max-length", "16",
            "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "neoj", "--threads", "1", *args], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    two = torchrun("-m", "neoj", "--threads", "1", *args, "--tp", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    # "perplexity P over N tokens (loss L, window W, stride S)", printed once. The split model sums in another
    # order: P (about 1e5 for random weights, 10 digits printed) may differ in its last digits, nothing else.
    (ppl_one, rest_one), (ppl_two, rest_two) = (out.stdout.split(" ", 2)[1:] for out in (one, two))
    assert rest_two == rest_one and rest_one.count("\n") == 1
    assert float(ppl_two) == pytest.approx(float(ppl_one), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# One process: the pieces


def test_tp_needs_torchrun_and_whole_heads(monkeypatch):
    from neoj.tensor_parallel import check_divisible, tensor_parallel_processes

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(neoj.NeojError, match=r"--tp 2 needs 2 processes.*started alone"):
        tensor_parallel_processes(2, "cpu")
    with pytest.raises(neoj.NeojError, match="at least 1"):
        tensor_parallel_processes(0, "cpu")
    assert tensor_parallel_processes(1, "cpu").world == 1
    cfg = from_hf_dict({**WIDE, "num_heads": 2})
    with pytest.raises(ConfigError, match="cannot split 2 attention heads"):
        check_divisible(cfg, 4)
    with pytest.raises(ConfigError, match="intermediate size 256"):
        check_divisible(from_hf_dict({**WIDE, "num_heads": 3, "hidden_size": 96, "intermediate_size": 256}), 3)
    from neoj.quantize import QuantSpec

    with pytest.raises(ConfigError, match="use --group-size 32"):
        check_divisible(cfg, 2, QuantSpec("int4", 64))


def test_memory_check_plans_each_ranks_share(monkeypatch):
    from neoj.distributed import Processes
    from neoj.memory import MemoryPlanError, RUNTIME_BYTES, plan
    from neoj.tensor_parallel import check_rank_memory

    cfg = from_hf_dict(WIDE)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    share = plan(cfg, "float32").total_bytes // 2 + RUNTIME_BYTES
    two = Processes(rank=1, world=2)
    monkeypatch.setenv("NEOJ_MEMORY_LIMIT", str(share))
    check_rank_memory(cfg, torch.float32, None, two, "wide", None, 1)
    monkeypatch.setenv("NEOJ_MEMORY_LIMIT", str(share - 1))
    with pytest.raises(MemoryPlanError, match=r"wide split over 2 processes needs .* would fit: --dtype bfloat16"):
        check_rank_memory(cfg, torch.float32, None, two, "wide", None, 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on one CPU share its memory
    monkeypatch.setenv("NEOJ_MEMORY_LIMIT", str(2 * share - 1))
    with pytest.raises(MemoryPlanError, match="2 ranks on cpu"):
        check_rank_memory(cfg, torch.float32, None, two, "wide", None, 1)


def test_tp_1_runs_the_split_code_path_in_one_process(zoo):
    lm = neoj.load(zoo["gptj"].path, dtype="float32", device="cpu", tp=1)
    assert lm.model.tensor_parallel.world == 1
    torch.testing.assert_close(batch_logits(lm.model), batch_logits(zoo["gptj"].model), atol=1e-5, rtol=1e-5)
    assert generations(lm) == generations(zoo["gptj"].lm)


def test_a_split_model_decodes_eagerly_even_where_graphs_are_on(zoo, monkeypatch):
    """Recording a split model's collectives into a CUDA graph is unchecked on GPUs: its decode steps run eagerly."""
    from neoj import cuda_graph
    from neoj.kv_cache import KVCache

    monkeypatch.setattr(cuda_graph, "graphs_enabled", lambda device: True)
    lm = neoj.load(zoo["gptj"].path, dtype="float32", device="cpu", tp=1)
    step = cuda_graph.DecodeStep.for_cache(lm.model, KVCache.for_model(lm.model, 1, 8))
    assert type(step) is cuda_graph.DecodeStep


def test_every_reader_reads_a_slice_as_the_whole_tensor_cut(tmp_path):
    from safetensors.torch import save_file

    from neoj.weights import map_safetensors, read_safetensors
    from neoj.weights.readers import InMemoryTensor

    t = torch.randn(37, 23)
    save_file({"w": t, "b": t[0].clone()}, tmp_path / "x.safetensors")
    for reader in (read_safetensors, map_safetensors):
        for stored in reader(tmp_path / "x.safetensors"):
            full = stored.read()
            assert torch.equal(stored.read_slice(0, 3, 11), full[3:11])
            if stored.key == "w":
                assert torch.equal(stored.read_slice(1, 5, 17), full[:, 5:17])
                assert torch.equal(stored.read_slice(1, 5, 17, torch.bfloat16), full[:, 5:17].bfloat16())
                assert torch.equal(stored.read_slice(0, 30, 37, torch.bfloat16), full[30:].bfloat16())
    part = InMemoryTensor("w", t).read_slice(1, 0, 4)
    assert torch.equal(part, t[:, :4]) and part.is_contiguous() and part.untyped_storage().nbytes() == 37 * 4 * 4


def test_quantized_parts_cut_by_columns_equal_quantizing_the_columns():
    from neoj.quantize import QuantSpec, quantize_weight
    from neoj.tensor_parallel import COLUMNS, split_parts

    w = torch.randn(48, 128)
    spec = QuantSpec("int4", 32)
    cut = split_parts(quantize_weight(w, spec), (COLUMNS, 64, 128), spec, whole_rows=False)
    for key, value in quantize_weight(w[:, 64:], spec).items():
        assert torch.equal(cut[key], value)
    spec8 = QuantSpec("int8")
    full = quantize_weight(w, spec8)
    cut = split_parts(full, (COLUMNS, 64, 128), spec8, whole_rows=False)
    assert torch.equal(cut["qweight"], full["qweight"][:, 64:]) and torch.equal(cut["scales"], full["scales"])


# ---------------------------------------------------------------------------------------------------------
# The worker: run as `torchrun --nproc-per-node 2 tests/test_tensor_parallel.py JOBS OUT`


def worker(jobs: Path, out: Path) -> None:
    """Loads each case of `jobs` under --tp 2; rank 0 writes every case's logits and both ranks' texts to `out`."""
    from neoj.distributed import leave_processes
    from neoj.tensor_parallel import tensor_parallel_processes

    results = {}
    for name, case in json.loads(jobs.read_text()).items():
        case = dict(case)
        if "config" in case:
            processes = tensor_parallel_processes(2, "cpu")
            lm = neoj.from_config(from_hf_dict(case.pop("config")), processes=processes, **case)
        else:
            lm = neoj.load(device="cpu", tp=2, **case)
        texts = generations(lm)
        ranks = lm.model.tensor_parallel.gather(texts)
        results[name] = {"logits": batch_logits(lm.model), "texts": ranks[0], "texts_rank1": ranks[1],
                         "local_heads": lm.model.kv_heads, "quantized": lm.quantization is not None}
        if lm.quantization is not None:
            probed = ("blocks.0.attn.q_proj", "blocks.0.attn.out_proj", "blocks.1.mlp.fc_in", "blocks.1.mlp.fc_out",
                      "lm_head.local")
            mine = {name: layer_weight(lm.model.get_submodule(name)) for name in probed}
            results[name]["weights"] = {k: [r[k] for r in lm.model.tensor_parallel.gather(mine)] for k in probed}
    if lm.model.tensor_parallel.main:
        torch.save(results, out)
    leave_processes()


if __name__ == "__main__":
    torch.set_num_threads(1)
    worker(Path(sys.argv[1]), Path(sys.argv[2]))

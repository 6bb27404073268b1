"""neoj.memory: the inference planner (its table, its refusals, its bytes against loaded models), and the
training planner checked against saved tensors."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch

import neoj
from neoj.cli import main
from neoj.config import preset, with_changes
from neoj.errors import NeojError
from neoj.memory import (GIB, RUNTIME_BYTES, TRAINING_MODES, MemoryPlanError, linear_shapes, lora_parameters,
                         memory_table, training_memory, training_table, weight_bytes)
from neoj.train import lora as L
from neoj.train.loss import CausalLMLoss
from neoj.weights import random_model


def test_memory_table_rows_and_scaling():
    cfg = preset("gpt-neo-125m")
    rows = {r["dtype"]: r for r in memory_table(cfg, context=1024, batch=1)}
    assert list(rows) == ["float32", "bfloat16", "float16", "int8 (bfloat16)", "int4 (bfloat16)"]
    assert rows["float32"]["weights_bytes"] == 4 * cfg.num_parameters()
    assert rows["bfloat16"]["weights_bytes"] == 2 * cfg.num_parameters()
    assert rows["int4 (bfloat16)"]["weights_bytes"] < rows["int8 (bfloat16)"]["weights_bytes"] \
        < rows["bfloat16"]["weights_bytes"]
    # KV cache: keys and values, every layer, every token
    assert rows["float32"]["kv_cache_bytes"] == 2 * cfg.n_layers * 1024 * cfg.hidden_size * 4
    for r in rows.values():
        assert r["total_bytes"] == r["weights_bytes"] + r["kv_cache_bytes"]
    double = {r["dtype"]: r for r in memory_table(cfg, context=1024, batch=2)}
    assert double["bfloat16"]["kv_cache_bytes"] == 2 * rows["bfloat16"]["kv_cache_bytes"]


@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
def test_planned_weight_bytes_equal_the_loaded_model(family, scheme):
    lm = neoj.load(family.path, quantize=scheme, group_size=32, device="cpu", dtype="bfloat16")
    seen, actual = set(), 0
    for t in list(lm.model.parameters()) + list(lm.model.buffers()):
        if t is not None and id(t) not in seen and t is not lm.model.rope:
            seen.add(id(t))
            actual += t.numel() * t.element_size()
    cfg = lm.config
    planned = weight_bytes(cfg, 2, scheme, 32)
    # int4 pads each weight to a multiple of 16 rows for the kernel (the 50257-row head): a few KB.
    assert planned <= actual <= planned + 16 * cfg.hidden_size * 2
    assert len(linear_shapes(cfg)) == 6 * cfg.n_layers + 1


def test_the_planner_refuses_a_model_that_cannot_fit_and_names_what_would(monkeypatch, neo):
    monkeypatch.setenv("NEOJ_MEMORY_LIMIT", "8GB")
    with pytest.raises(MemoryPlanError) as err:
        neoj.load("random:gpt-j-6b", device="cpu")
    msg = str(err.value)
    assert "needs about 12.7 GiB in bfloat16" in msg and "7.5 GiB is available" in msg
    assert "--quantize int8 (7.3 GiB)" in msg and "--quantize int4" in msg and "--dtype" not in msg
    monkeypatch.setenv("NEOJ_MEMORY_LIMIT", "1GB")
    with pytest.raises(MemoryPlanError, match="No dtype or quantization fits"):
        neoj.load("random:gpt-j-6b", device="cpu", quantize="int4")
    # A tiny model fits in 1 GB with room to spare; the check can also be turned off.
    monkeypatch.setenv("NEOJ_MEMORY_LIMIT", "700MB")
    assert neoj.load(neo.path, device="cpu")
    monkeypatch.setenv("NEOJ_MEMORY_LIMIT", "1MB")
    assert neoj.load(neo.path, device="cpu", check_memory=False)
    monkeypatch.setenv("NEOJ_MEMORY_LIMIT", "lots")
    with pytest.raises(NeojError, match="NEOJ_MEMORY_LIMIT='lots'"):
        neoj.load(neo.path, device="cpu")


def test_gpt_neo_is_never_advised_float16(monkeypatch):
    monkeypatch.setenv("NEOJ_MEMORY_LIMIT", "9GB")
    with pytest.raises(MemoryPlanError) as err:
        neoj.load("random:gpt-neo-2.7b", device="cpu", dtype="float32")
    assert "--dtype bfloat16" in str(err.value) and "float16" not in str(err.value).replace("bfloat16", "")


def _tiny(family: str, **changes):
    if family == "neo":  # one global and one local layer, window 16
        cfg = with_changes(preset("gpt-neo-125m"), hidden_size=64, intermediate_size=192, n_heads=4, n_layers=2,
                           vocab_size=512, n_positions=256, attention_layers=("global", "local"), window_size=16)
    else:
        cfg = with_changes(preset("gpt-j-6b"), hidden_size=64, intermediate_size=256, n_heads=4, n_layers=2,
                           vocab_size=512, n_positions=256, rotary_dim=16, attention_layers=("global",) * 2)
    return with_changes(cfg, **changes)


def _saved_bytes(cfg, batch, seq_len, lora, autocast, targets):
    """Bytes autograd keeps for the backward of neoj's training forward, each storage once, parameters excluded."""
    model = random_model(cfg, torch.float32, "cpu", seed=0)
    if lora:
        L.inject(model, L.LoraConfig(r=8, target_modules=list(targets)))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
            loss = CausalLMLoss(model)(ids, torch.ones(batch, seq_len))
    del loss
    return sum(seen.values())


@pytest.mark.parametrize("family", ["neo", "j"])
@pytest.mark.parametrize("lora,targets", [(False, ()), (True, ("q_proj", "v_proj")),
                                          (True, ("q_proj", "k_proj", "out_proj", "fc_in", "fc_out"))])
@pytest.mark.parametrize("autocast", [False, True])
def test_training_activations_match_saved_tensors(family, lora, targets, autocast):
    torch.manual_seed(0)
    cfg = _tiny(family)
    for batch, seq_len in ((2, 48), (1, 96)):  # 96 > the local window: GPT-Neo's mask is kept too
        measured = _saved_bytes(cfg, batch, seq_len, lora, autocast, targets)
        planned = training_memory(cfg, lora=lora, autocast=autocast, grad_checkpointing=False, batch=batch,
                                  seq_len=seq_len, lora_targets=targets or ("q_proj", "v_proj"))
        assert planned["activations_bytes"] == pytest.approx(measured, rel=0.1), (batch, seq_len)


def test_training_memory_fixed_terms_and_modes():
    cfg = preset("gpt-neo-1.3b")
    P = cfg.num_parameters()
    full = training_memory(cfg, lora=False, autocast=True, grad_checkpointing=False, batch=8, seq_len=1024)
    assert (full["weights_bytes"], full["gradients_bytes"], full["optimizer_bytes"]) == (4 * P, 4 * P, 8 * P)
    assert full["runtime_bytes"] == RUNTIME_BYTES
    assert full["total_bytes"] == sum(v for k, v in full.items() if k.endswith("_bytes") and k != "total_bytes")
    lora = training_memory(cfg, lora=True, autocast=True, grad_checkpointing=False, batch=8, seq_len=1024)
    A = lora_parameters(cfg)
    assert A == cfg.n_layers * 2 * 2 * 8 * cfg.hidden_size
    assert (lora["gradients_bytes"], lora["optimizer_bytes"]) == (4 * A, 8 * A)
    rows = {r["mode"]: r["total_bytes"] for r in training_table(cfg, batch=8, seq_len=1024)}
    assert list(rows) == list(TRAINING_MODES)
    assert rows["full, fp32"] > rows["full, bf16"] > rows["full, bf16, checkpointing"]
    assert rows["LoRA, bf16"] > rows["LoRA, bf16, checkpointing"]
    assert rows["full, bf16"] > rows["LoRA, bf16"]
    # activations grow with batch x seq_len
    half = training_memory(cfg, lora=False, autocast=True, grad_checkpointing=False, batch=4, seq_len=1024)
    assert half["activations_bytes"] < full["activations_bytes"] < 2.1 * half["activations_bytes"]
    assert 30 * GIB < rows["full, fp32"] < 60 * GIB


def test_info_train_text_and_json(capsys):
    assert main(["info", "builtin", "--train", "--batch", "2", "--context", "64"]) == 0
    out = capsys.readouterr().out
    assert "training memory for a micro-batch of 2 x 64 tokens" in out
    for label in TRAINING_MODES:
        assert label in out
    assert main(["info", "builtin", "--train", "--batch", "2", "--context", "64", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    t = info["training"]
    assert (t["batch"], t["seq_len"], t["lora_r"], t["lora_targets"]) == (2, 64, 8, ["q_proj", "v_proj"])
    assert [m["mode"] for m in t["modes"]] == list(TRAINING_MODES)
    for m in t["modes"]:
        for key in ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "loss_bytes",
                    "runtime_bytes", "total_bytes", "trainable_parameters"):
            assert isinstance(m[key], int) and m[key] > 0
    assert main(["info", "builtin", "--json"]) == 0
    assert "training" not in json.loads(capsys.readouterr().out)  # only with --train

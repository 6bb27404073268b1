"""Checkpoint loading: every on-disk format gives the same model; every broken checkpoint, and every LoRA
adapter that does not fit its base, a clear error."""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, hf_logits, neoj_logits
from safetensors.torch import load_file, save_file

import neoj

Q_PROJ = "transformer.h.0.attn.attention.q_proj.weight"
# bf16 tolerance. bf16 keeps 8 significant bits, and neoj in bf16 also runs LayerNorm, MLP and the LM
# head in bf16, as transformers does. On these models (logits spread about +-5, std ~1.1) both
# libraries' bf16 logits land within ~0.18 (max) and ~0.02 (mean) of the fp32 reference. The bounds:
# max error 0.3, mean error 0.03, and never more than twice transformers' own bf16 error.
BF16_MAX_ERR, BF16_MEAN_ERR = 0.3, 0.03


def load(path) -> neoj.LanguageModel:
    """Returns neoj's fp32 CPU load of a checkpoint directory."""
    return neoj.load(path, dtype="float32", device="cpu")


@pytest.fixture
def ckpt(neo, tmp_path) -> Path:
    """Returns a private copy of the `neo` safetensors checkpoint, free to break."""
    return Path(shutil.copytree(neo.path, tmp_path / "ckpt"))


def rewrite_safetensors(directory: Path, edit) -> None:
    """Loads model.safetensors, lets `edit(dict)` change it, and writes it back."""
    state = load_file(str(directory / "model.safetensors"))
    edit(state)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize("fmt", ["bin", "sharded_bin", "sharded_safetensors"])
def test_every_format_gives_the_same_logits(neo, neo_formats, tokenizer, fmt):
    directory = neo_formats[fmt]
    assert not (directory / "model.safetensors").exists()
    ids = tokenizer.encode(PROMPTS[0])
    got = neoj_logits(load(directory), ids)
    assert torch.equal(got, neoj_logits(neo.lm, ids))


def test_sharded_checkpoints_really_have_several_shards(neo_formats):
    for fmt, index in [("sharded_safetensors", "model.safetensors.index.json"),
                       ("sharded_bin", "pytorch_model.bin.index.json")]:
        weight_map = json.loads((neo_formats[fmt] / index).read_text())["weight_map"]
        assert len(set(weight_map.values())) >= 3


@pytest.mark.parametrize("name", ["neo", "gptj"])
def test_bf16_load_from_fp32_checkpoint(zoo, tokenizer, name):
    tiny = zoo[name]
    lm = neoj.load(tiny.path, dtype="bfloat16", device="cpu")
    assert lm.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    ids = tokenizer.encode(PROMPTS[0])
    got = neoj_logits(lm, ids)
    assert got.dtype == torch.float32
    ref = hf_logits(tiny.hf, ids)
    err = (got - ref).abs()
    assert err.max() < BF16_MAX_ERR and err.mean() < BF16_MEAN_ERR
    hf_bf16 = copy.deepcopy(tiny.hf).to(torch.bfloat16)
    hf_err = (hf_logits(hf_bf16, ids) - ref).abs()
    assert err.max() <= 2 * hf_err.max() and err.mean() <= 2 * hf_err.mean()
    assert err.max() > 0  # it really computed in bf16


# ---------------------------------------------------------------------------------------------
# Broken directories and configs


def test_directory_without_config_json(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(neoj.ConfigError, match="config.json"):
        load(ckpt)


def test_unsupported_model_type_names_the_supported_ones(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(neoj.ConfigError) as info:
        load(ckpt)
    message = str(info.value)
    assert "'llama'" in message and "gpt_neo" in message and "gptj" in message


def test_directory_without_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(neoj.CheckpointError, match="no weights.*model.safetensors"):
        load(ckpt)


def test_path_that_is_neither_directory_nor_hub_id(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(neoj.CheckpointError, match="neither a local directory nor a Hub id") as info:
        load(missing)
    assert str(info.value).startswith(f"no such directory: {str(missing)!r}")


# ---------------------------------------------------------------------------------------------
# Broken tensors


def test_missing_tensor(ckpt):
    rewrite_safetensors(ckpt, lambda state: state.pop(Q_PROJ))
    with pytest.raises(neoj.CheckpointError, match="missing 1 tensors") as info:
        load(ckpt)
    assert Q_PROJ in str(info.value)


def test_unexpected_tensor(ckpt):
    extra = "transformer.h.0.attn.attention.extra.weight"
    rewrite_safetensors(ckpt, lambda state: state.update({extra: torch.zeros(2, 2)}))
    with pytest.raises(neoj.CheckpointError, match="does not use") as info:
        load(ckpt)
    assert extra in str(info.value)


def test_misshaped_tensor(ckpt):
    rewrite_safetensors(ckpt, lambda state: state.update({Q_PROJ: torch.zeros(32, 16)}))
    with pytest.raises(neoj.CheckpointError) as info:
        load(ckpt)
    message = str(info.value)
    assert Q_PROJ in message and "[32, 16]" in message and "[32, 32]" in message


def test_truncated_safetensors(ckpt):
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(neoj.CheckpointError, match="truncated"):
        load(ckpt)


def test_safetensors_cut_inside_the_header(ckpt):
    file = ckpt / "model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(neoj.CheckpointError, match="truncated"):
        load(ckpt)


def test_corrupt_safetensors_header(ckpt):
    file = ckpt / "model.safetensors"
    data = bytearray(file.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + n] = b"\x8f{garbage" * (n // 10) + b" " * (n % 10)
    file.write_bytes(bytes(data))
    with pytest.raises(neoj.CheckpointError, match="corrupt.*header"):
        load(ckpt)


def test_corrupt_safetensors_header_length(ckpt):
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    with pytest.raises(neoj.CheckpointError, match="header length"):
        load(ckpt)


class RunsCode:
    """Pickles to a call of open(marker, "w"): loading it with plain pickle creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_bin_with_code_is_refused_and_the_code_does_not_run(neo, tmp_path):
    directory = tmp_path / "evil"
    directory.mkdir()
    shutil.copy(neo.path / "config.json", directory)
    marker = tmp_path / "code-ran"
    state = dict(load_file(str(neo.path / "model.safetensors")))
    state["transformer.wte.weight"] = RunsCode(marker)
    torch.save(state, directory / "pytorch_model.bin")
    with pytest.raises(neoj.CheckpointError, match="refused") as info:
        load(directory)
    assert "never runs code" in str(info.value)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    torch.load(directory / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_bin_holding_a_non_tensor_is_refused(neo, tmp_path):
    directory = tmp_path / "odd"
    directory.mkdir()
    shutil.copy(neo.path / "config.json", directory)
    torch.save({"transformer.wte.weight": [1, 2, 3]}, directory / "pytorch_model.bin")
    with pytest.raises(neoj.CheckpointError, match="not a tensor"):
        load(directory)


def test_truncated_bin(neo_formats, tmp_path):
    directory = Path(shutil.copytree(neo_formats["bin"], tmp_path / "bin"))
    file = directory / "pytorch_model.bin"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(neoj.CheckpointError, match="truncated or corrupt"):
        load(directory)


@pytest.mark.parametrize("fmt, index", [("sharded_safetensors", "model.safetensors.index.json"),
                                        ("sharded_bin", "pytorch_model.bin.index.json")])
def test_shard_index_naming_a_missing_shard(neo_formats, tmp_path, fmt, index):
    directory = Path(shutil.copytree(neo_formats[fmt], tmp_path / fmt))
    shard = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))[1]
    (directory / shard).unlink()
    with pytest.raises(neoj.CheckpointError, match="names shards that are not in") as info:
        load(directory)
    assert shard in str(info.value)


def test_invalid_shard_index(neo_formats, tmp_path):
    directory = Path(shutil.copytree(neo_formats["sharded_safetensors"], tmp_path / "bad_index"))
    (directory / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(neoj.CheckpointError, match="not a valid shard index"):
        load(directory)


# ---------------------------------------------------------------------------------------------
# LoRA adapters must fit their base, random:PRESET included


@pytest.fixture(scope="module")
def neo_adapter(neo, tmp_path_factory) -> Path:
    """Returns a rank-2 adapter on q_proj, v_proj and c_fc of the `neo` checkpoint (gpt_neo, hidden 32, 4 layers),
    with non-zero B so that applying it changes the weights."""
    from neoj.train.lora import LoraConfig, inject, lora_modules, save_adapter
    from neoj.weights import load_model

    model = load_model(neo.path)
    cfg = LoraConfig(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj", "c_fc"])
    inject(model, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.3)
    path = tmp_path_factory.mktemp("adapters") / "neo"
    save_adapter(model, cfg, path, base_model=str(neo.path))
    return path


def refuse_heavy_work(monkeypatch):
    """Makes reading or drawing any weight fail the test: a mismatched adapter must be refused before."""
    def boom(*args, **kwargs):
        raise AssertionError("weights were read or drawn before the adapter was checked")

    for name in ("load_model", "random_model", "load_state_into"):
        monkeypatch.setattr(neoj.api, name, boom)


def test_adapter_for_another_family_is_refused_first(gptj, neo_adapter, monkeypatch):
    refuse_heavy_work(monkeypatch)
    with pytest.raises(neoj.CheckpointError) as info:
        neoj.load(gptj.path, dtype="float32", device="cpu", adapter=neo_adapter)
    message = str(info.value)
    assert f"LoRA adapter {neo_adapter} does not fit {gptj.path}" in message
    assert "the adapter is for gpt_neo, hidden size 32, 4 layers" in message
    assert "is gptj, hidden size 32, 2 layers" in message


def test_adapter_on_random_preset_is_checked_not_ignored(neo_adapter, monkeypatch, capsys):
    from neoj.cli import main

    refuse_heavy_work(monkeypatch)
    with pytest.raises(neoj.CheckpointError) as info:
        neoj.load("random:gpt-j-6b", device="cpu", adapter=neo_adapter)
    message = str(info.value)
    assert "gpt_neo, hidden size 32, 4 layers" in message and "gptj, hidden size 4096, 28 layers" in message
    assert main(["generate", "-m", "random:gpt-neo-125m", "--adapter", str(neo_adapter), "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit random:gpt-neo-125m" in err
    assert "transformer.h.0.attn.attention.q_proj.lora_A.weight is [2, 32] where random:gpt-neo-125m needs [2, 768]" in err


def test_adapter_with_more_layers_than_the_base(zoo, neo_adapter, monkeypatch):
    base = zoo["neo_global2"]  # gpt_neo, hidden 32, 2 layers
    refuse_heavy_work(monkeypatch)
    with pytest.raises(neoj.CheckpointError) as info:
        neoj.load(base.path, dtype="float32", device="cpu", adapter=neo_adapter)
    message = str(info.value)
    assert "4 layers" in message and "2 layers" in message
    assert "has no layer transformer.h.2.attn.attention.q_proj" in message


def test_adapter_for_another_hidden_size(neo, neo_adapter, monkeypatch):
    from neoj.config import with_changes

    refuse_heavy_work(monkeypatch)
    wide = with_changes(neo.lm.config, hidden_size=64, intermediate_size=256)
    with pytest.raises(neoj.CheckpointError) as info:
        neoj.from_config(wide, dtype="float32", device="cpu", adapter=neo_adapter)
    message = str(info.value)
    assert "hidden size 32" in message and "hidden size 64" in message
    assert "is [2, 32] where random:gpt_neo needs [2, 64]" in message


def test_merge_refuses_a_mismatched_adapter(gptj, neo_adapter, tmp_path):
    from neoj.train.merge import merge_adapter

    with pytest.raises(neoj.CheckpointError, match="does not fit"):
        merge_adapter(str(gptj.path), str(neo_adapter), str(tmp_path / "merged"))


def test_missing_adapter_directory(neo, tmp_path):
    with pytest.raises(neoj.CheckpointError, match="no such adapter directory"):
        neoj.load(neo.path, dtype="float32", device="cpu", adapter=tmp_path / "nope")


def test_a_fitting_adapter_is_merged_into_random_weights(neo, neo_adapter):
    from neoj.train.lora import apply_adapter
    from neoj.weights import random_model

    lm = neoj.from_config(neo.lm.config, dtype="float32", device="cpu", seed=3, adapter=neo_adapter)
    plain = random_model(neo.lm.config, torch.float32, "cpu", seed=3)
    expected = apply_adapter(random_model(neo.lm.config, torch.float32, "cpu", seed=3), neo_adapter)
    changed = {n for n, p in lm.model.state_dict().items() if not torch.equal(p, plain.state_dict()[n])}
    assert changed == {f"blocks.{i}.{m}.weight" for i in range(4) for m in ("attn.q_proj", "attn.v_proj", "mlp.fc_in")}
    for name, tensor in expected.state_dict().items():
        assert torch.equal(lm.model.state_dict()[name], tensor), name


def test_a_fitting_adapter_still_loads(neo, neo_adapter, tokenizer):
    lm = neoj.load(neo.path, dtype="float32", device="cpu", adapter=neo_adapter)
    ids = tokenizer.encode(PROMPTS[0])
    assert not torch.equal(neoj_logits(lm, ids), neoj_logits(neo.lm, ids))


def test_written_safetensors_follow_the_umask_and_leave_no_temporary(tmp_path):
    from neoj.weights import write_safetensors

    old = os.umask(0o022)
    try:
        write_safetensors({"w": torch.ones(2, 3)}, tmp_path / "model.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644  # safetensors alone makes it 0600
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert torch.equal(load_file(tmp_path / "model.safetensors")["w"], torch.ones(2, 3))

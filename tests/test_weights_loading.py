"""The loader pipeline: each format's reader yields the same tensors, and fill_model alone decides what a
checkpoint must hold (misshaped, unused and missing tensors named), for files and random weights alike."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from neoj.weights.files import weight_files
from neoj.weights.loading import (build_meta, expected_tensors, fill_model, load_model, random_model,
                                     random_tensors)
from neoj.weights.readers import (InMemoryTensor, RowSink, map_safetensors, read_checkpoint, read_safetensors,
                                     read_torch_bin)
from neoj.errors import CheckpointError

MASK_BUFFER = "transformer.h.0.attn.attention.bias"


def values(stream) -> dict[str, torch.Tensor]:
    """Returns {key: tensor} of a reader's stream, each tensor read as stored."""
    return {stored.key: stored.read().clone() for stored in stream}


def state(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def test_every_reader_yields_the_tensors_of_the_file(neo, neo_formats):
    file = neo.path / "model.safetensors"
    want = load_file(str(file))
    plain, mapped = values(read_safetensors(file)), values(map_safetensors(file))
    binary = values(read_torch_bin(neo_formats["bin"] / "pytorch_model.bin"))
    assert MASK_BUFFER in binary  # the legacy .bin carries the causal-mask buffers too
    binary = {k: v for k, v in binary.items() if not k.endswith(("attention.bias", "attention.masked_bias"))}
    for got in (plain, mapped, binary):
        assert got.keys() == want.keys()
        for key, tensor in want.items():
            assert torch.equal(got[key], tensor) and got[key].dtype == tensor.dtype, key


def test_safetensors_and_bin_fill_identical_models(neo, neo_formats):
    # Every format, every dtype: bit-identical weights (the mask buffers of the .bin are dropped).
    for dtype in (torch.float32, torch.bfloat16):
        want = state(load_model(neo.path, dtype))
        for fmt in ("bin", "sharded_bin", "sharded_safetensors"):
            got = state(load_model(neo_formats[fmt], dtype))
            assert got.keys() == want.keys(), fmt
            assert all(torch.equal(got[n], want[n]) and got[n].dtype == dtype for n in want), (fmt, dtype)


def test_safetensors_convert_on_the_way_in_through_a_small_staging_buffer(neo, monkeypatch):
    import neoj.weights.readers

    monkeypatch.setattr(neoj.weights.readers, "STAGING_BYTES", 1000)  # many chunks per tensor
    want = load_file(str(neo.path / "model.safetensors"))
    for stored in read_safetensors(neo.path / "model.safetensors"):
        got = stored.read(torch.bfloat16)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want[stored.key].to(torch.bfloat16)), stored.key


def test_rows_stream_in_order_and_in_blocks(neo, monkeypatch):
    import neoj.weights.readers

    monkeypatch.setattr(neoj.weights.readers, "STAGING_BYTES", 3000)
    file = neo.path / "model.safetensors"
    blocks: list[tuple[int, torch.Tensor]] = []
    for stored in read_safetensors(file):  # read while the reader holds the file open
        if stored.key == "transformer.wte.weight":
            assert stored.streams_rows and len(stored.shape) == 2
            result = stored.read_rows(RowSink(lambda start, rows: blocks.append((start, rows.clone())), lambda: "done"))
            break
    assert result == "done" and len(blocks) > 2
    assert [start for start, _ in blocks] == list(range(0, stored.shape[0], blocks[0][1].shape[0]))
    assert torch.equal(torch.cat([rows for _, rows in blocks]), load_file(str(file))[stored.key])


def test_unchanged_safetensors_are_mapped_and_the_rest_read(neo):
    files = weight_files(neo.path)
    assert {type(s).__name__ for s in read_checkpoint(files, torch.float32)} == {"MappedTensor"}
    assert {type(s).__name__ for s in read_checkpoint(files, torch.bfloat16)} == {"FileTensor"}
    assert {type(s).__name__ for s in read_checkpoint(files)} == {"FileTensor"}


def tensors_of(model, **changes) -> list[InMemoryTensor]:
    """Returns the stream of a complete checkpoint for `model` (random values), with keys changed as asked:
    {key: None} drops a tensor, {key: tensor} adds or replaces one."""
    stream = {s.key: s.read() for s in random_tensors(model, torch.device("cpu"), seed=0)}
    for key, tensor in changes.items():
        stream.pop(key) if tensor is None else stream.__setitem__(key, tensor)
    return [InMemoryTensor(k, t) for k, t in stream.items()]


def test_the_report_names_unused_then_missing_tensors(neo):
    model = build_meta(neo.lm.config)
    q_proj = "transformer.h.0.attn.attention.q_proj.weight"
    extra = {f"transformer.h.0.extra{i}.weight": torch.zeros(1) for i in range(12)}
    with pytest.raises(CheckpointError, match="does not use") as info:
        fill_model(build_meta(neo.lm.config), tensors_of(model, **{q_proj: None}, **extra), torch.float32,
                   torch.device("cpu"))
    message = str(info.value)  # unused tensors first: the ten first, then " ..."
    assert "transformer.h.0.extra0.weight" in message and "extra9" in message and "extra10" not in message
    assert message.endswith(" ...") and q_proj not in message
    with pytest.raises(CheckpointError, match="missing 1 tensors") as info:
        fill_model(build_meta(neo.lm.config), tensors_of(model, **{q_proj: None}), torch.float32, torch.device("cpu"))
    assert q_proj in str(info.value) and "does it match config.json" in str(info.value)


def test_files_are_named_in_the_report(neo, tmp_path):
    from neoj.weights.writing import write_safetensors

    state_ = load_file(str(neo.path / "model.safetensors"))
    state_["transformer.h.0.attn.attention.surplus"] = torch.zeros(3)
    write_safetensors(state_, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        fill_model(build_meta(neo.lm.config), read_checkpoint([tmp_path / "model.safetensors"]), torch.float32,
                   torch.device("cpu"))
    assert str(info.value).endswith("transformer.h.0.attn.attention.surplus (in model.safetensors)")


def test_a_misshaped_tensor_is_refused_before_anything_else(neo):
    model = build_meta(neo.lm.config)
    wrong = "transformer.h.1.mlp.c_fc.weight"
    with pytest.raises(CheckpointError, match=r"has shape \[2, 2\] but the config needs \[128, 32\]") as info:
        fill_model(build_meta(neo.lm.config), tensors_of(model, **{wrong: torch.zeros(2, 2), "unused": torch.ones(1)}),
                   torch.float32, torch.device("cpu"))
    assert wrong in str(info.value)
    with pytest.raises(CheckpointError, match="expected floating point"):
        fill_model(build_meta(neo.lm.config), tensors_of(model, **{wrong: torch.zeros(128, 32, dtype=torch.int64)}),
                   torch.float32, torch.device("cpu"))


def test_mask_buffers_and_a_tied_heads_copy_are_skipped(neo):
    cfg = neo.lm.config
    assert cfg.tie_word_embeddings
    model = build_meta(cfg)
    stream = tensors_of(model, **{MASK_BUFFER: torch.ones(1, 1, 4, 4, dtype=torch.bool),
                                  "lm_head.weight": torch.full((cfg.vocab_size, cfg.hidden_size), 7.0)})
    fill_model(model, stream, torch.float32, torch.device("cpu"))
    assert model.lm_head.weight is model.wte.weight and not (model.wte.weight == 7.0).all()


def test_a_transform_sees_each_tensor_once_and_may_take_it(neo):
    model = build_meta(neo.lm.config)
    seen = []

    def transform(name, tensor):
        seen.append(name)
        return None if name == "ln_f.bias" else tensor.double()  # None: taken (here: left on meta)

    fill_model(model, tensors_of(build_meta(neo.lm.config)), torch.float32, torch.device("cpu"), transform)
    assert sorted(seen) == sorted(expected_tensors(model))
    assert model.ln_f.weight.dtype == torch.float64 and model.ln_f.bias.is_meta


def test_random_weights_are_one_more_stream(neo):
    cfg = neo.lm.config
    want = state(random_model(cfg, torch.bfloat16, "cpu", seed=5))
    model = build_meta(cfg)
    fill_model(model, random_tensors(model, torch.device("cpu"), 5), torch.bfloat16, torch.device("cpu"))
    got = state(model)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert not torch.equal(want["blocks.0.attn.q_proj.weight"], state(random_model(cfg, seed=6))[
        "blocks.0.attn.q_proj.weight"].to(torch.bfloat16))

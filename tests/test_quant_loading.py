"""Quantized loading on the one loader: neoj's quantized checkpoints read back exactly what was written, and
quantizing while streaming gives what quantizing the loaded model gives."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from neoj.weights.files import weight_files
from neoj.weights.loading import expected_tensors, load_model
from neoj.weights.names import neoj_to_hf_name
from neoj.errors import CheckpointError
from neoj.quantize.format import QuantSpec, quantize_weight
from neoj.quantize.layer import QuantLinear
from neoj.quantize.loading import QuantizedLayer, load_quantized, read_quantized
from neoj.quantize.writing import quantize_checkpoint

INT4 = QuantSpec("int4", 32)


@pytest.fixture(scope="module")
def written(tmp_path_factory, request):
    """Returns {family: (source Tiny, quantized directory)}: int4, one tensor per shard."""
    zoo = request.getfixturevalue("zoo")
    out = {}
    for name in ("neo", "gptj"):
        directory = tmp_path_factory.mktemp("q") / name
        quantize_checkpoint(zoo[name].path, directory, INT4, max_shard_bytes=1)
        out[name] = (zoo[name], directory)
    return out


@pytest.mark.parametrize("name", ["neo", "gptj"])
def test_the_reader_gathers_each_layer_and_reads_back_what_was_written(written, name):
    tiny, directory = written[name]
    source = load_model(tiny.path)
    cfg = source.config
    files = weight_files(directory)
    assert len(files) > 10  # a layer's parts lie in different shards
    layers, plain = {}, {}
    for stored in read_quantized(files, INT4):  # a full-precision tensor is read before the next one comes
        if isinstance(stored, QuantizedLayer):
            layers[stored.key] = stored
        else:
            plain[stored.key] = stored.read()
    weights = dict(source.named_parameters(remove_duplicate=False))
    quantized = [n for n in weights if INT4.quantizes(n)]
    assert sorted(layers) == sorted(neoj_to_hf_name(n, cfg.model_type) for n in quantized)
    for n in quantized:
        layer = layers[neoj_to_hf_name(n, cfg.model_type)]
        assert len({s.file for s in layer.sources}) == 3  # qweight, scales, mins: one shard each
        want = quantize_weight(weights[n], INT4)
        assert layer.read().keys() == want.keys()
        assert all(torch.equal(layer.read()[k], want[k]) for k in want), n
    rest = {neoj_to_hf_name(n, cfg.model_type): t for n, t in expected_tensors(source).items() if not INT4.quantizes(n)}
    assert plain.keys() == rest.keys()
    assert all(torch.equal(plain[k], t.to(torch.bfloat16)) for k, t in rest.items())


@pytest.mark.parametrize("name", ["neo", "gptj"])
def test_a_quantized_checkpoint_loads_as_the_streamed_quantization(written, name):
    import neoj

    tiny, directory = written[name]
    loaded = load_quantized(directory, INT4, torch.bfloat16, torch.device("cpu"), tiny.lm.config)
    streamed = neoj.load(tiny.path, quantize="int4", group_size=32, device="cpu", dtype="bfloat16",
                         check_memory=False).model
    assert isinstance(loaded.lm_head, QuantLinear) and isinstance(loaded.blocks[0].mlp.fc_in, QuantLinear)
    a, b = loaded.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def rewrite(directory, edit):
    """Copies every shard into one model.safetensors, edited by `edit(dict)`."""
    tensors = {}
    for file in weight_files(directory):
        tensors.update(load_file(str(file)))
    edit(tensors)
    return tensors


def test_broken_quantized_checkpoints_name_the_tensors(written, tmp_path):
    tiny, directory = written["neo"]
    cfg = tiny.lm.config

    def load(tensors):
        save_file(tensors, str(tmp_path / "model.safetensors"))
        return load_quantized_file(tmp_path / "model.safetensors", cfg)

    fc_in = "transformer.h.1.mlp.c_fc"
    with pytest.raises(CheckpointError, match="should not be in this int4 checkpoint") as info:
        load(rewrite(directory, lambda t: t.update({f"{fc_in}.weight": torch.zeros(128, 32)})))
    assert f"'{fc_in}.weight'" in str(info.value)
    extra = "transformer.h.7.mlp.c_fc"  # the model has 4 layers
    with pytest.raises(CheckpointError, match="does not use") as info:
        load(rewrite(directory, lambda t: t.update({f"{extra}.qweight": t[f"{fc_in}.qweight"].clone(),
                                                    f"{extra}.scales": t[f"{fc_in}.scales"].clone()})))
    assert f"{extra}.qweight (in model.safetensors), {extra}.scales (in model.safetensors)" in str(info.value)
    with pytest.raises(CheckpointError, match=f"missing 1 tensors, e.g. {fc_in}.weight"):
        load(rewrite(directory, lambda t: [t.pop(f"{fc_in}.{p}") for p in ("qweight", "scales", "mins")]))
    with pytest.raises(CheckpointError, match=f"quantized checkpoint is missing {fc_in}.mins"):
        load(rewrite(directory, lambda t: t.pop(f"{fc_in}.mins")))


def load_quantized_file(file, cfg):
    """Loads the quantized model of one safetensors file (the directory holds nothing else)."""
    cfg.save(file.parent)
    return load_quantized(file.parent, INT4, torch.bfloat16, torch.device("cpu"), cfg)

"""int8/int4 weight-only quantization: error bounds, kernels, logits, quantized checkpoints."""

import json

import pytest
import torch

import neoj
from neoj import linear
from neoj.cli import main
from neoj.devices import cpu_has_fast_bf16
from neoj.errors import CheckpointError, NeojError
from neoj.quantize import (QUANTIZATION_FILE, QuantLinear, QuantSpec, dequantize, quantize_checkpoint, quantize_model,
                           quantize_weight, unpack_int4)
from neoj.sampling import NumericalError, check_logits

INT8 = QuantSpec("int8")
INT4 = QuantSpec("int4", 32)
PROMPT = torch.tensor([[464, 1351, 2099, 318, 257, 1643, 286, 262, 3303, 13]])


def logits_of(lm, ids=PROMPT):
    with torch.no_grad():
        return lm.model.logits(lm.model(ids))


@pytest.mark.parametrize("shape", [(48, 64), (50257 % 1000, 96)])
def test_int8_error_is_at_most_half_a_step_per_row(shape):
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 3  # rows of very different ranges
    parts = quantize_weight(w, INT8)
    assert parts["qweight"].dtype == torch.int8 and parts["qweight"].abs().max() <= 127
    err = (dequantize(parts, INT8) - w).abs()
    assert (err <= parts["scales"][:, None] / 2 + 1e-6).all()
    # The largest weight of each row is represented exactly (up to fp32 rounding).
    row_max = w.abs().argmax(dim=1)
    assert torch.allclose(dequantize(parts, INT8).gather(1, row_max[:, None]), w.gather(1, row_max[:, None]), rtol=1e-5)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step_per_group(group):
    w = torch.randn(40, 256) + torch.linspace(-2, 2, 256)  # groups with offsets: asymmetric ranges
    spec = QuantSpec("int4", group)
    parts = quantize_weight(w, spec)
    assert parts["qweight"].shape == (40, 128) and parts["scales"].shape == (40, 256 // group)
    q = unpack_int4(parts["qweight"])
    assert q.min() >= 0 and q.max() <= 15
    err = (dequantize(parts, spec) - w).abs().view(40, -1, group)
    assert (err <= parts["scales"][..., None] / 2 + 1e-5).all()


def test_int4_packing_puts_the_even_column_in_the_high_nibble():
    w = torch.tensor([[0.0] * 31 + [15.0]])  # min 0, max 15: q equals the value
    w[0, 0], w[0, 1] = 3.0, 12.0
    parts = quantize_weight(w, QuantSpec("int4", 32))
    assert parts["qweight"][0, 0] == (3 << 4 | 12)
    assert unpack_int4(parts["qweight"])[0, :2].tolist() == [3, 12]


def test_bad_specs_are_refused_with_the_fix():
    with pytest.raises(NeojError, match="int8 or int4"):
        QuantSpec("int3")
    with pytest.raises(NeojError, match="group size 100"):
        QuantSpec("int4", 100)
    with pytest.raises(NeojError, match="multiple of the group size"):
        quantize_weight(torch.randn(8, 48), QuantSpec("int4", 32))


@pytest.mark.parametrize("spec", [INT8, INT4], ids=["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 16, 80])  # decode rows, small batches, and the prefill path
def test_quant_linear_matches_its_dequantized_weight(spec, rows):
    torch.manual_seed(rows)
    w, b = torch.randn(72, 128) * 0.1, torch.randn(72)  # 72 rows: int4 pads to 80 and slices back
    layer = QuantLinear(quantize_weight(w, spec), spec, torch.nn.Parameter(b))
    # int4 keeps neoj's portable form where neoj's int4 kernel is the faster path (AVX2), else tinygemm's
    int4_form = "dequantize" if linear.int4_kernel_on_cpu() else "int4pack_cpu"
    assert layer.kernel == ("int8pack" if spec.scheme == "int8" else int4_form)
    x = torch.randn(rows, 128)
    want = x @ dequantize(quantize_weight(w, spec), spec).t() + b
    got = layer(x)
    assert got.shape == (rows, 72) and got.dtype == torch.float32
    # Activations go through bf16 for the kernels: ~3 significant digits.
    torch.testing.assert_close(got, want, atol=0.02 * want.abs().max().item(), rtol=0.02)
    assert layer(x.view(1, rows, 128)).shape == (1, rows, 72)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_logits_match_fp32_with_the_same_rounded_weights(family, scheme):
    """The kernels and loading are exact up to their activations' rounding: compare with an fp32 model whose
    weights are the dequantized values. (How far rounding moves a random tiny model is no test of anything.)"""
    spec = QuantSpec(scheme, 32)
    lm = neoj.load(family.path, quantize=scheme, group_size=32, device="cpu")
    # Activations: bf16 where the CPU has bf16 instructions, fp32 elsewhere (neoj.devices.resolve_dtype).
    assert lm.quantization == spec and lm.dtype == (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    assert all(isinstance(getattr(b.attn, n), QuantLinear) for b in lm.model.blocks for n in ("q_proj", "v_proj"))
    assert isinstance(lm.model.lm_head, QuantLinear) and not any(type(m) is torch.nn.Linear for m in lm.model.modules())
    ref_lm = neoj.load(family.path, dtype="float32", device="cpu")
    with torch.no_grad():
        for name, module in list(ref_lm.model.named_modules()):
            if isinstance(module, torch.nn.Linear) and spec.quantizes(name + ".weight"):
                rounded = dequantize(quantize_weight(module.weight, spec), spec)
                module.weight = torch.nn.Parameter(rounded, requires_grad=False)  # unties a tied head, as intended
    ref, got = logits_of(ref_lm), logits_of(lm)
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    assert rel < 0.1, rel  # bf16 activations alone move these wide-init tiny models by 1-4%
    assert (got[0].argmax(-1) == ref[0].argmax(-1)).float().mean() >= 0.8


def test_int8_logits_stay_close_to_fp32(family):
    ref = logits_of(family.lm)
    got = logits_of(neoj.load(family.path, quantize="int8", device="cpu"))
    assert ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max() < 0.1
    assert (got[0].argmax(-1) == ref[0].argmax(-1)).float().mean() >= 0.8


@pytest.mark.parametrize("block_bytes", [16 << 20, 3000])  # whole tensors, and a few rows per block
@pytest.mark.parametrize("spec", [INT8, INT4], ids=["int8", "int4"])
def test_quantizing_while_streaming_equals_quantizing_the_loaded_model(zoo, monkeypatch, spec, block_bytes):
    import neoj.weights.readers
    monkeypatch.setattr(neoj.weights.readers, "STAGING_BYTES", block_bytes)  # linear weights arrive in row blocks
    for name in ("neo", "gptj"):  # tied head (from the embedding) and untied head with bias
        tiny = zoo[name]
        for dtype in (torch.bfloat16, torch.float32):
            streamed = neoj.load(tiny.path, quantize=spec.scheme, group_size=spec.group_size, device="cpu",
                                 dtype=dtype)
            whole = neoj.load(tiny.path, dtype="float32", device="cpu")
            quantized = quantize_model(whole.model, spec).eval()  # new layers start in training mode
            if dtype != torch.float32:
                quantized.to(dtype)  # (int4's scales stay bf16 in fp32 models: the loader keeps them so)
            assert torch.equal(logits_of(streamed), logits_of(whole)), (name, dtype)


def test_random_models_quantize_as_they_are_drawn():
    lm = neoj.from_config("gpt-neo-125m", quantize="int4", device="cpu")
    assert isinstance(lm.model.blocks[11].mlp.fc_out, QuantLinear) and isinstance(lm.model.lm_head, QuantLinear)
    assert not any(isinstance(m, torch.nn.Linear) for m in lm.model.modules())
    assert lm.generate("The list type", max_new_tokens=4, temperature=0)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_checkpoint_roundtrip(family, scheme, tmp_path):
    out = tmp_path / "q"
    spec = QuantSpec(scheme, 32)
    files = quantize_checkpoint(family.path, out, spec, max_shard_bytes=200_000)  # forces several shards
    assert "model.safetensors.index.json" in files and len(files) > 3
    assert json.loads((out / QUANTIZATION_FILE).read_text())["scheme"] == scheme
    assert (out / "config.json").exists()
    # The checkpoint keeps the unquantized tensors in bf16: in bf16 the two models are the same bit for bit.
    loaded = neoj.load(out, device="cpu", dtype="bfloat16")  # no quantize=: the checkpoint says it
    assert loaded.quantization == spec
    streamed = neoj.load(family.path, quantize=scheme, group_size=32, device="cpu", dtype="bfloat16")
    assert torch.equal(logits_of(loaded), logits_of(streamed))
    assert loaded.generate("def f(x):", max_new_tokens=8, temperature=0) == \
        streamed.generate("def f(x):", max_new_tokens=8, temperature=0)
    # In the dtype auto picks (fp32 on CPUs without bf16 instructions) they differ by those tensors' rounding.
    auto_loaded, auto_streamed = neoj.load(out, device="cpu"), neoj.load(family.path, quantize=scheme, group_size=32,
                                                                          device="cpu")
    ref, got = logits_of(auto_streamed), logits_of(auto_loaded)
    assert ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max() < 0.1  # wide-init tiny models: 1-4%
    # Smaller than the fp32 source (these tiny models are mostly embedding, which stays bf16).
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert size < sum(p.stat().st_size for p in family.path.glob("*.safetensors")) * 0.8


def test_quantize_refuses_to_overwrite_or_requantize(neo, tmp_path):
    out = tmp_path / "q"
    quantize_checkpoint(neo.path, out, INT8)
    with pytest.raises(NeojError, match="not empty"):
        quantize_checkpoint(neo.path, out, INT8)
    with pytest.raises(NeojError, match="already quantized"):
        quantize_checkpoint(out, tmp_path / "again", INT8)
    with pytest.raises(NeojError, match="already quantized"):
        neoj.load(out, quantize="int4", device="cpu")
    assert neoj.load(out, quantize="int8", device="cpu").quantization == INT8  # the same scheme is fine


def test_broken_quantized_checkpoints_get_clear_errors(neo, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "q"
    quantize_checkpoint(neo.path, out, INT8)
    tensors = load_file(out / "model.safetensors")
    missing = dict(tensors)
    del missing["transformer.h.1.mlp.c_fc.scales"]
    save_file(missing, out / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing transformer.h.1.mlp.c_fc.scales"):
        neoj.load(out, device="cpu")
    bad = dict(tensors)
    bad["transformer.h.0.attn.attention.q_proj.qweight"] = torch.zeros(32, 16, dtype=torch.int8)
    save_file(bad, out / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"q_proj.qweight has shape \[32, 16\]"):
        neoj.load(out, device="cpu")
    (out / QUANTIZATION_FILE).write_text('{"quant_method": "gptq"}')
    with pytest.raises(CheckpointError, match="not a neoj quantization file"):
        neoj.load(out, device="cpu")


def test_nan_and_inf_logits_are_reported_not_sampled(neo):
    check_logits(torch.tensor([[0.0, float("-inf"), 1.0]]))  # masked rows are fine
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NumericalError, match=r"NaN/inf logits \(batch rows \[1\]\)"):
            check_logits(torch.tensor([[0.0, 1.0, 2.0], [0.0, bad, 1.0]]))
    with pytest.raises(NumericalError):
        check_logits(torch.full((1, 3), float("-inf")))
    lm = neoj.load(neo.path, dtype="float32", device="cpu")
    with torch.no_grad():
        lm.model.blocks[1].mlp.fc_in.weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="dtype bfloat16 or float32"):
        lm.generate("hello", max_new_tokens=3)


def test_cli_quantize_generate_and_info(neo, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", str(neo.path), "--out", str(out), "-q", "int4", "--group-size", "32"]) == 0
    assert "wrote int4 checkpoint" in capsys.readouterr().out
    assert main(["generate", "--model", str(out), "The list", "-n", "5", "-t", "0"]) == 0
    from_checkpoint = capsys.readouterr().out
    assert main(["generate", "--model", str(neo.path), "-q", "int4", "--group-size", "32", "The list", "-n", "5",
                 "-t", "0"]) == 0
    assert capsys.readouterr().out == from_checkpoint
    assert main(["quantize", str(neo.path), "--out", str(out), "-q", "int8"]) == 1
    assert "not empty" in capsys.readouterr().err
    assert main(["info", "gpt-j-6b", "--json"]) == 0
    rows = {r["dtype"]: r for r in json.loads(capsys.readouterr().out)["memory"]}
    assert set(rows) == {"float32", "bfloat16", "float16", "int8 (bfloat16)", "int4 (bfloat16)"}
    assert rows["int4 (bfloat16)"]["weights_bytes"] < rows["int8 (bfloat16)"]["weights_bytes"] < \
        rows["bfloat16"]["weights_bytes"] / 1.9


def test_eval_perplexity_of_a_quantized_model_matches_its_logits(neo, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The list type is a mutable sequence. " * 12)
    assert main(["eval", "perplexity", "--model", str(neo.path), "-q", "int8", "--data", str(text), "--json",
                 "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out)
    from neoj.train.evaluate import file_tokens

    lm = neoj.load(neo.path, quantize="int8", device="cpu")
    ids, _ = file_tokens([text], lm.tokenizer)
    assert ids.numel() < lm.config.n_positions  # one window: every token but the first scored once
    with torch.no_grad():
        logp = torch.log_softmax(lm.model.logits(lm.model(ids[None]))[0, :-1], dim=-1)
    nll = -logp.gather(1, ids[1:, None]).mean().item()
    assert got["tokens"] == ids.numel() - 1
    assert abs(got["perplexity"] - torch.tensor(nll).exp().item()) < 1e-3 * got["perplexity"]


def test_a_quantized_model_serves_the_same_tokens_as_it_generates(neo):
    import httpx

    from neoj.server import run_in_thread

    lm = neoj.load(neo.path, quantize="int4", group_size=32, device="cpu")
    want = lm.generate("The list type", max_new_tokens=8, temperature=0)
    with run_in_thread(lm, model_id="tiny-int4") as server:
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny-int4", "prompt": "The list type",
                                                              "max_tokens": 8, "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want

"""LoRA: exact at injection, merge equals no merge, only adapters train, and PEFT reads neoj's adapters."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPTNeoConfig, GPTNeoForCausalLM

import neoj
from neoj.cli import main
from neoj.train import TrainArgs, train
from neoj.train.lora import LoraConfig, adapter_state_dict, inject, lora_modules, merge, save_adapter
from neoj.weights import load_model

IDS = torch.tensor([[464, 1351, 2099, 318, 257, 2099, 286, 8379, 13, 383, 318, 257]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny transformers GPT-Neo with global and local layers, saved with save_pretrained."""
    torch.manual_seed(0)
    cfg = GPTNeoConfig(vocab_size=50257, max_position_embeddings=64, hidden_size=32, num_heads=4, num_layers=2,
                       attention_types=[[["global", "local"], 1]], window_size=8, initializer_range=0.1)
    hf = GPTNeoForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("lora-base")
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora-data") / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"Item {i} costs {i * 5} euros."}) + "\n" for i in range(12)))
    return path


def logits(model, ids=IDS):
    with torch.no_grad():
        return model.logits(model(ids))


def randomize_b(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.3)


def test_injection_leaves_the_output_unchanged(base):
    model = load_model(base)
    before = logits(model)
    names = inject(model, LoraConfig(r=4, alpha=8, dropout=0.1))
    model.eval()
    assert names == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj", "blocks.1.attn.q_proj", "blocks.1.attn.v_proj"]
    assert torch.equal(logits(model), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_targets_match_neoj_or_transformers_names(base):
    model = load_model(base)
    names = inject(model, LoraConfig(target_modules=["c_fc", "out_proj"]))
    assert names == ["blocks.0.attn.out_proj", "blocks.0.mlp.fc_in", "blocks.1.attn.out_proj", "blocks.1.mlp.fc_in"]
    with pytest.raises(neoj.ConfigError, match="match no linear layer"):
        inject(load_model(base), LoraConfig(target_modules=["nope"]))


def test_merged_equals_unmerged(base):
    model = load_model(base)
    inject(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "c_fc"]))
    randomize_b(model)
    model.eval()
    unmerged = logits(model)
    assert not torch.allclose(unmerged, logits(load_model(base)), atol=1e-3)
    merge(model)
    assert not lora_modules(model)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=1e-5)


def test_lora_training_lowers_the_loss_and_touches_only_adapters(base, data, tmp_path):
    out = tmp_path / "adapter"
    train(TrainArgs(data=[str(data)], out=str(out), model=str(base), lora=True, lora_r=8, lora_alpha=32,
                    lora_dropout=0.0, lora_targets=["q_proj", "v_proj", "c_fc"], seq_len=16, batch_size=2,
                    max_steps=20, lr=2e-2, save_every=0, log_every=1, progress=False, val_fraction=0))
    log = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1] < log[0] - 0.5, log
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 32
    assert config["target_modules"] == ["c_fc", "q_proj", "v_proj"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert "base_model.model.transformer.h.0.attn.attention.q_proj.lora_A.weight" in tensors
    assert "base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight" in tensors
    assert len(tensors) == 12 and not (out / "model.safetensors").exists()
    # The checkpoint holds only the adapters; the base weights never moved.
    state = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    assert all(".lora_" in k for k in state)
    adapted = neoj.load(base, dtype="float32", device="cpu", adapter=out).model
    plain = load_model(base)
    changed = {n for n, p in adapted.state_dict().items() if not torch.equal(p, plain.state_dict()[n])}
    assert changed == {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.q_proj", "attn.v_proj", "mlp.fc_in")}


def test_peft_loads_a_neoj_adapter_with_the_same_logits(base, tmp_path):
    from peft import PeftModel

    model = load_model(base)
    cfg = LoraConfig(r=4, alpha=12, dropout=0.0, target_modules=["q_proj", "v_proj", "c_proj"])
    inject(model, cfg)
    randomize_b(model, seed=1)
    model.eval()
    expected = logits(model)
    save_adapter(model, cfg, tmp_path / "a", base_model=str(base))
    hf = PeftModel.from_pretrained(GPTNeoForCausalLM.from_pretrained(base), tmp_path / "a").eval()
    with torch.no_grad():
        got = hf(IDS).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    merged = neoj.load(base, dtype="float32", device="cpu", adapter=tmp_path / "a").model
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=1e-5)


def test_neoj_loads_a_peft_adapter(base, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    hf = GPTNeoForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(hf, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "out_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(IDS).logits
    peft_model.save_pretrained(tmp_path / "p")
    lm = neoj.load(base, dtype="float32", device="cpu", adapter=tmp_path / "p")
    torch.testing.assert_close(logits(lm.model), expected, atol=1e-5, rtol=1e-5)


def test_merge_command_and_generate_with_adapter(base, tmp_path, capsys):
    model = load_model(base)
    cfg = LoraConfig(r=2, alpha=4)
    inject(model, cfg)
    randomize_b(model, seed=2)
    save_adapter(model, cfg, tmp_path / "a")
    assert main(["merge", str(base), str(tmp_path / "a"), "--out", str(tmp_path / "m")]) == 0
    merged = neoj.load(tmp_path / "m", dtype="float32", device="cpu")
    adapted = neoj.load(base, dtype="float32", device="cpu", adapter=tmp_path / "a")
    torch.testing.assert_close(logits(merged.model), logits(adapted.model), atol=1e-5, rtol=1e-5)
    assert (tmp_path / "m" / "vocab.json").exists()
    capsys.readouterr()
    assert main(["generate", "-m", str(base), "--adapter", str(tmp_path / "a"), "Hello", "-n", "5", "-t", "0"]) == 0
    assert capsys.readouterr().out == merged.generate("Hello", max_new_tokens=5, temperature=0) + "\n"
    assert set(adapter_state_dict(model)) == set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))


def test_lora_run_with_dropout_resumes_exactly(base, data, tmp_path):
    import os
    import signal

    def args(out, resume=False):
        return TrainArgs(data=[str(data)], out=str(out), model=str(base), lora=True, lora_dropout=0.2, seq_len=16,
                         batch_size=2, max_steps=5, lr=1e-2, save_every=0, log_every=1, progress=False,
                         val_fraction=0, resume=resume)

    def stop_at_2(event):
        if event["event"] == "step" and event["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    train(args(tmp_path / "ref"))
    assert train(args(tmp_path / "b"), on_event=stop_at_2).interrupted
    train(args(tmp_path / "b", resume=True))
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ref", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "ref" / "train_log.jsonl").read_text() != ""
    ref_log = [json.loads(x)["loss"] for x in (tmp_path / "ref" / "train_log.jsonl").read_text().splitlines()]
    b_log = [json.loads(x)["loss"] for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert ref_log == b_log

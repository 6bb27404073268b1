"""The model shipped inside neoj: small enough, loadable by transformers unchanged, the CLI default, and
reachable everywhere a model is named as `builtin`."""

import json
import shutil

import pytest
import torch

import neoj
from neoj.api import builtin_model_dir
from neoj.cli import main
from neoj.weights import read_safetensors_header

BUILTIN = builtin_model_dir()
pytestmark = pytest.mark.skipif(BUILTIN is None, reason="this checkout has no built-in model yet")


def test_builtin_is_a_small_alternating_gpt_neo_in_fp16():
    config = json.loads((BUILTIN / "config.json").read_text())
    assert config["model_type"] == "gpt_neo"
    cfg = neoj.load_config(BUILTIN)
    assert set(cfg.attention_layers) == {"global", "local"} and cfg.attention_layers[:2] == ("global", "local")
    assert cfg.num_parameters() <= 20_000_000
    weights = BUILTIN / "model.safetensors"
    assert weights.stat().st_size <= 40 * 2**20
    header, _ = read_safetensors_header(weights)
    assert {e["dtype"] for e in header.values()} == {"F16"}
    for name in ("vocab.json", "merges.txt", "MODEL_CARD.md"):
        assert (BUILTIN / name).exists()
    card = (BUILTIN / "MODEL_CARD.md").read_text()
    assert "neoj train" in card and "perplexity" in card.lower()


def test_transformers_loads_it_unchanged_with_the_same_logits():
    from transformers import AutoTokenizer, GPTNeoForCausalLM

    hf = GPTNeoForCausalLM.from_pretrained(BUILTIN, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(BUILTIN)("The list type", return_tensors="pt").input_ids
    lm = neoj.load(dtype="float32", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(lm.model.logits(lm.model(ids)), hf(ids).logits, atol=2e-4, rtol=2e-4)


def test_generate_with_no_model_uses_it(capsys):
    assert main(["generate", "The list type", "-n", "12", "-t", "0"]) == 0
    out = capsys.readouterr().out
    assert out == neoj.load().generate("The list type", max_new_tokens=12, temperature=0) + "\n"
    assert len(out.strip()) > 0


# ---------------------------------------------------------------------------------------------
# Its name: builtin


def test_load_builtin_by_name_is_the_default_model():
    from neoj.weights import resolve_model_dir

    assert resolve_model_dir("builtin") == BUILTIN
    named, default = neoj.load("builtin", dtype="float32", device="cpu"), neoj.load(dtype="float32", device="cpu")
    assert named.name == default.name == "builtin"  # never the install path
    ids = torch.tensor([[464, 1351, 2099, 318]])
    with torch.no_grad():
        assert torch.equal(named.model.logits(named.model(ids)), default.model.logits(default.model(ids)))


def test_info_builtin(capsys):
    assert main(["info", "builtin"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("builtin  (gpt_neo, ")
    assert main(["info", "builtin", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == "builtin" and info["source"] == str(BUILTIN)
    assert info["hidden_size"] == neoj.load_config(BUILTIN).hidden_size


def test_quantize_builtin_by_name(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "builtin", "--out", str(out), "-q", "int8"]) == 0
    assert "wrote int8 checkpoint" in capsys.readouterr().out
    lm = neoj.load(out, device="cpu")
    assert lm.quantization.scheme == "int8" and lm.config == neoj.load_config(BUILTIN)


def test_a_directory_named_builtin_in_the_cwd_wins(zoo, tmp_path, monkeypatch):
    # As for any name: an existing local directory is what the user means; the built-in model stays
    # reachable as builtin from anywhere else.
    shutil.copytree(zoo["neo_global2"].path, tmp_path / "builtin")
    monkeypatch.chdir(tmp_path)
    lm = neoj.load("builtin", dtype="float32", device="cpu")
    assert lm.config.n_layers == 2 and lm.config.hidden_size == 32
    assert lm.config != neoj.load_config(BUILTIN)

"""The neoj command line, run in-process through main() and once as a real subprocess."""

import subprocess
import sys

import pytest

import neoj
from neoj.cli import main
from neoj.config import from_hf_dict
from neoj.weights import random_model, save_checkpoint

TINY = {"model_type": "gpt_neo", "vocab_size": 50257, "max_position_embeddings": 128, "hidden_size": 32,
        "num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]], "window_size": 8}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-model")
    save_checkpoint(random_model(from_hf_dict(TINY), seed=3), path)
    return path


def test_generate_greedy_matches_api(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "Hello there", "-n", "12", "-t", "0"]) == 0
    out = capsys.readouterr().out
    expected = neoj.load(tiny_dir).generate("Hello there", max_new_tokens=12, temperature=0)
    assert out == expected + "\n"


def test_generate_reads_stdin_and_echoes(tiny_dir, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("From stdin"))
    assert main(["generate", "-m", str(tiny_dir), "-", "-n", "5", "-t", "0", "--echo"]) == 0
    expected = neoj.load(tiny_dir).generate("From stdin", max_new_tokens=5, temperature=0)
    assert capsys.readouterr().out == "From stdin" + expected + "\n"


def test_generate_seed_is_reproducible_and_sequences_are_listed(tiny_dir, capsys):
    args = ["generate", "-m", str(tiny_dir), "abc", "-n", "6", "--seed", "7", "--num-return-sequences", "2"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first
    assert "--- sequence 1 ---" in first and "--- sequence 2 ---" in first


def test_context_overflow_is_a_clear_error(tiny_dir, capsys):
    assert main(["generate", "-m", str(tiny_dir), "word " * 200, "-n", "10"]) == 1
    err = capsys.readouterr().err
    assert "201 tokens" in err and "128" in err and "--truncate" in err  # "word " x 200 plus the final space
    assert main(["generate", "-m", str(tiny_dir), "word " * 200, "-n", "4", "--truncate", "-t", "0"]) == 0


def test_missing_model_and_bad_option_errors(tmp_path, capsys):
    assert main(["generate", "-m", str(tmp_path / "nope"), "hi"]) == 1
    assert "neither a local directory nor a Hub id" in capsys.readouterr().err
    assert main(["generate", "-m", str(tmp_path), "hi"]) == 1
    assert "config.json" in capsys.readouterr().err
    # Checked before the model is built, and blamed on the option as typed.
    assert main(["generate", "-m", "random:gpt-neo-125m", "hi", "--top-p", "3"]) == 1
    assert capsys.readouterr().err == "neoj: error: --top-p must be in (0, 1] (got 3.0)\n"


def test_info_reports_shape_and_memory(tiny_dir, capsys):
    assert main(["info", "gpt-j-6b"]) == 0
    out = capsys.readouterr().out
    assert "6,050.9M parameters" in out and "rotary (first 64 dims per head)" in out
    assert "22.5 GiB" in out  # fp32 weights
    assert main(["info", str(tiny_dir), "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["attention_layers"] == "GL" and info["window_size"] == 8
    assert info["parameters"] == neoj.load(tiny_dir).model.num_parameters()


def test_help_everywhere_and_python_dash_m():
    for cmd in ([], ["generate"], ["download"], ["info"]):
        with pytest.raises(SystemExit) as exit_:
            main(cmd + ["--help"])
        assert exit_.value.code == 0
    proc = subprocess.run([sys.executable, "-m", "neoj", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "generate" in proc.stdout and "download" in proc.stdout


def test_generate_speculative_flags_keep_the_greedy_text(tiny_dir, capsys):
    """--prompt-lookup, --draft-model (a checkpoint, or the model itself quantized) and --prefix-cache-mb 0
    change the speed, never the greedy text."""
    base = ["generate", "-m", str(tiny_dir), "a b c a b c a b c", "-n", "12", "-t", "0"]
    assert main(base) == 0
    expected = capsys.readouterr().out
    for extra in (["--prompt-lookup"], ["--prompt-lookup", "--num-speculative-tokens", "2"],
                  ["--draft-model", str(tiny_dir)], ["--draft-model", "self", "--draft-quantize", "int8"],
                  ["--prefix-cache-mb", "0"]):
        assert main(base + extra) == 0, extra
        assert capsys.readouterr().out == expected, extra


def test_generate_speculative_flag_errors(tiny_dir, tmp_path, capsys):
    base = ["generate", "-m", str(tiny_dir), "hi", "-n", "2"]
    assert main(base + ["--draft-model", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"neoj: error: --draft-model {tmp_path / 'nope'}: cannot load it: ") and err.count("\n") == 1
    # int4 of a 32-wide model needs --group-size 32: the loader's reason, blamed on the draft.
    assert main(base + ["--draft-model", "self"]) == 1
    assert "--draft-model self: cannot load it: int4 needs" in capsys.readouterr().err
    assert main(base + ["--draft-model", "self", "--group-size", "32"]) == 0
    capsys.readouterr()
    assert main(base + ["--prompt-lookup", "--num-speculative-tokens", "99"]) == 1
    assert capsys.readouterr().err == "neoj: error: --num-speculative-tokens must be between 1 and 16 (got 99)\n"
    with pytest.raises(SystemExit):
        main(base + ["--prompt-lookup", "--draft-model", "builtin"])
    assert "--draft-model: not allowed with argument --prompt-lookup" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "serve", "chat", "summarize", "ask", "translate", "complete-code",
                                     "batch"])
def test_generating_commands_take_the_speculative_options(command):
    from neoj.cli import build_parser

    required = {"batch": ["-i", "in.jsonl", "-o", "out.jsonl"], "translate": ["hi", "--to", "fr"],
                "summarize": ["f.txt"], "ask": ["why?"], "complete-code": ["f.py"]}.get(command, [])
    args = build_parser().parse_args([command, *required, "--prefix-cache-mb", "64", "--draft-model", "self",
                                      "--draft-quantize", "int8", "--num-speculative-tokens", "3"])
    assert (args.prefix_cache_mb, args.draft_model, args.draft_quantize, args.num_speculative_tokens) == \
        (64, "self", "int8", 3)
    assert build_parser().parse_args([command, *required, "--prompt-lookup"]).prompt_lookup


def test_load_from_args_sets_the_prefix_cache_and_speculation(tiny_dir):
    from neoj.cli import build_parser
    from neoj.cli_options import load_from_args

    args = build_parser().parse_args(["generate", "-m", str(tiny_dir), "hi", "--prefix-cache-mb", "1",
                                      "--draft-model", str(tiny_dir), "--num-speculative-tokens", "2"])
    lm = load_from_args(args)
    assert lm.prefix_cache.max_bytes == 2**20
    assert lm.speculative.method == "draft" and lm.speculative.num_tokens == 2
    assert lm.speculative.draft.config == lm.config
    lm = load_from_args(build_parser().parse_args(["generate", "-m", str(tiny_dir), "hi", "--prefix-cache-mb", "0"]))
    assert lm.prefix_cache is None and lm.speculative is None

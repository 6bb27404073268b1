"""The options every generating command shares (neoj.cli_options): their checks name the option at fault."""

from __future__ import annotations

import argparse

import pytest

from neoj.cli_options import (add_model_args, add_sampling_args, check_generation_options, sampling_options,
                              stop_text)
from neoj.errors import NeojError


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_model_args(p)
    add_sampling_args(p)
    return p.parse_args(list(argv))


def test_defaults_become_generation_params():
    options = sampling_options(parse())
    assert options["max_new_tokens"] == 128 and options["stop_at_eos"] is True and options["stop"] == []
    assert sampling_options(parse("--ignore-eos", "-t", "0"))["stop_at_eos"] is False


@pytest.mark.parametrize("argv, message", [
    (("--top-p", "1.5"), "--top-p must"),
    (("--temperature", "-1"), "--temperature must"),
    (("--max-new-tokens", "-3"), "--max-new-tokens must"),
])
def test_an_out_of_range_option_is_named(argv, message):
    with pytest.raises(NeojError, match=message):
        check_generation_options(parse(*argv))


def test_stop_text_decodes_escapes_and_refuses_bad_ones():
    assert stop_text(r"\n\n") == "\n\n" and stop_text(r"\x41") == "A" and stop_text(r"\q") == r"\q"
    with pytest.raises(argparse.ArgumentTypeError, match="names no character"):
        stop_text(r"\ud800")  # a lone surrogate


# ---- prefix caching and speculative decoding ----

def parse_speculative(*argv: str) -> argparse.Namespace:
    from neoj.cli_options import add_speculative_args

    p = argparse.ArgumentParser()
    add_model_args(p)
    add_speculative_args(p)
    return p.parse_args(list(argv))


def test_speculative_defaults_and_prompt_lookup():
    from neoj.cli_options import speculative_from_args

    args = parse_speculative()
    assert args.prefix_cache_mb == 512 and not args.prompt_lookup and args.draft_model is None
    assert args.draft_quantize is None and args.num_speculative_tokens is None
    assert speculative_from_args(args, None) is None
    spec = speculative_from_args(parse_speculative("--prompt-lookup"), None)
    assert spec.method == "prompt_lookup" and spec.num_tokens == spec.DEFAULT_TOKENS["prompt_lookup"]
    assert speculative_from_args(parse_speculative("--prompt-lookup", "--num-speculative-tokens", "3"), None).num_tokens == 3


def test_prompt_lookup_and_draft_model_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        parse_speculative("--prompt-lookup", "--draft-model", "builtin")
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (("--prompt-lookup", "--num-speculative-tokens", "0"), "--num-speculative-tokens must be between 1 and 16 \\(got 0\\)"),
    (("--draft-model", "x", "--num-speculative-tokens", "17"), "--num-speculative-tokens must be between 1 and 16"),
    (("--num-speculative-tokens", "3",), "--num-speculative-tokens needs --prompt-lookup or --draft-model"),
    (("--draft-quantize", "int4", "--prompt-lookup"), "--draft-quantize needs --draft-model"),
    (("--prefix-cache-mb", "-1"), "--prefix-cache-mb must be 0 \\(off\\) or a positive size"),
    (("--prefix-cache-mb", "nan"), "--prefix-cache-mb must be"),
])
def test_speculative_option_errors_name_the_option(argv, message):
    from neoj.cli_options import check_speculative_args

    with pytest.raises(NeojError, match=message):
        check_speculative_args(parse_speculative(*argv))
    with pytest.raises(NeojError, match=message):  # every generating command checks them with its other options
        check_generation_options(parse_speculative(*argv))


def test_a_draft_with_a_smaller_vocabulary_is_refused():
    import neoj
    from neoj.cli_options import check_draft
    from neoj.config import from_hf_dict

    shape = {"model_type": "gpt_neo", "max_position_embeddings": 64, "hidden_size": 32, "num_layers": 2,
             "num_heads": 4, "attention_types": [[["global", "local"], 1]], "window_size": 8}
    target = neoj.from_config(from_hf_dict({**shape, "vocab_size": 50400}), dtype="float32", device="cpu")
    check_draft(neoj.from_config(from_hf_dict({**shape, "vocab_size": 50257}), dtype="float32", device="cpu"), target)
    small = neoj.from_config(from_hf_dict({**shape, "vocab_size": 1000}), dtype="float32", device="cpu")
    with pytest.raises(NeojError, match="vocabulary has 1000 token ids, but the model's tokenizer has 50257"):
        check_draft(small, target, "--draft-model small")

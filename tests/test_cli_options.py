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

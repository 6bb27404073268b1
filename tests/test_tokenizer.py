"""neoj's GPT-2 tokenizer against transformers' GPT2TokenizerFast, and the UTF-8-safe stream decoder."""

from __future__ import annotations

import shutil

import pytest
from conftest import GPT2_DIR

import neoj
from neoj.tokenizer import StreamDecoder

TEXTS = [
    "Hello world",
    "  leading spaces, trailing spaces   ",
    "runs of spaces:     and\n\n\nnewlines\r\n\tand tabs\t\t",
    "emoji: 😀👍🏽 👨‍👩‍👧‍👦 🇯🇵 — and a snake 🐍",
    "CJK: 日本語のテキスト、中文文本，한국어 텍스트",
    "accents: café naïve façade Ångström Øresund crème brûlée",
    "code:\ndef f(x):\n    return {'a': [x ** 2 for _ in range(3)]}  # ok?\n",
    "first document<|endoftext|>second document <|endoftext|> third",
    "<|endoftext|>",
    "numbers 1234567890 3.14159 -42 1e-5 and punctuation !?.,;:'\"()[]{}",
    "contractions: I'm you're it's we'll they've don't",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_bundled_tokenizer_matches_transformers(tokenizer, hf_tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text)
    assert tokenizer.decode(ids) == hf_tokenizer.decode(ids) == text


def test_known_gpt2_ids(tokenizer):
    """Checks the bundled files themselves, independently of any reference copy."""
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.encode("<|endoftext|>") == [50256]
    assert tokenizer.vocab_size == 50257
    assert tokenizer.eos_token_id == 50256


def test_encode_batch_equals_encode(tokenizer):
    assert tokenizer.encode_batch(TEXTS) == [tokenizer.encode(t) for t in TEXTS]


def test_skip_special_tokens(tokenizer):
    ids = tokenizer.encode("a<|endoftext|>b")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"
    assert tokenizer.decode(ids) == "a<|endoftext|>b"


def test_from_dir_with_vocab_and_merges(tmp_path, hf_tokenizer):
    shutil.copy(GPT2_DIR / "vocab.json", tmp_path)
    shutil.copy(GPT2_DIR / "merges.txt", tmp_path)
    tok = neoj.Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == hf_tokenizer.encode(text)


def test_from_dir_with_tokenizer_json(tmp_path, hf_tokenizer):
    """A checkpoint's tokenizer.json wins over the bundled files: an added token proves it was read."""
    ref = neoj.Tokenizer.from_dir()  # an untouched copy: the session fixture must stay unchanged
    ref.backend.add_tokens(["<|extra|>"])
    ref.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]
    tok = neoj.Tokenizer.from_dir(tmp_path)
    assert tok.encode("x<|extra|>y") == [87, 50257, 88]
    assert tok.vocab_size == 50258
    for text in TEXTS:
        assert tok.encode(text) == hf_tokenizer.encode(text)


def test_from_dir_with_transformers_tokenizer_json(tmp_path, hf_tokenizer):
    hf_tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    tok = neoj.Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == hf_tokenizer.encode(text)
        assert tok.decode(tok.encode(text)) == text


def test_from_dir_without_tokenizer_files_uses_bundled(tmp_path, tokenizer):
    assert neoj.Tokenizer.from_dir(tmp_path).encode(TEXTS[4]) == tokenizer.encode(TEXTS[4])


def test_bad_tokenizer_json_raises(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(neoj.CheckpointError, match="tokenizer.json"):
        neoj.Tokenizer.from_dir(tmp_path)


def stream(tokenizer, ids, skip=False) -> list[str]:
    """Returns the pieces a StreamDecoder emits for ids pushed one at a time, flush last."""
    decoder = StreamDecoder(tokenizer, skip_special_tokens=skip)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("text", [t for t in TEXTS if t])
def test_stream_decoder_never_emits_half_characters(tokenizer, text):
    ids = tokenizer.encode(text)
    pieces = stream(tokenizer, ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == text


def test_stream_decoder_test_texts_split_characters_across_tokens(tokenizer):
    """Guards the test above: some tokens of these texts are fragments of a multi-byte character."""
    split = [t for t in TEXTS if any("\ufffd" in tokenizer.token_text(i) for i in tokenizer.encode(t))]
    assert len(split) >= 3


def test_stream_decoder_holds_a_split_character_until_complete(tokenizer):
    ids = tokenizer.encode("🐍")
    assert len(ids) > 1
    pieces = stream(tokenizer, ids)
    assert pieces[:-2] == [""] * (len(ids) - 1)
    assert pieces[-2] == "🐍"


def test_stream_decoder_flush_returns_an_incomplete_tail(tokenizer):
    ids = tokenizer.encode("ok 😀")
    decoder = StreamDecoder(tokenizer)
    emitted = "".join(decoder.push(i) for i in ids[:-1])
    assert emitted == "ok"
    assert decoder.flush() == tokenizer.decode(ids[:-1])[len("ok"):]


def test_stream_decoder_skips_special_tokens(tokenizer):
    ids = tokenizer.encode("a<|endoftext|>b 東京")
    assert "".join(stream(tokenizer, ids, skip=True)) == "ab 東京"

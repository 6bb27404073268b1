"""Training data: reading .txt / .jsonl, the errors for bad records, packing, the split and the order."""

import json

import pytest
import torch

from neoj.cli import main
from neoj.tokenizer import Tokenizer
from neoj.train.data import BlockOrder, DataError, load_dataset, pack, read_documents, tokenize

EOS = 50256


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir()


def write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", "", "empty.jsonl: file is empty"),
    ("blank.txt", "\n  \n", "blank.txt: file is empty"),
    ("bad.jsonl", '{"text": "fine"}\n{"text": "oops"\n', "bad.jsonl:2: invalid JSON"),
    ("missing.jsonl", '{"text": "a"}\n\n{"txt": "b"}\n', "missing.jsonl:3: missing field \"text\""),
    ("pairs.jsonl", '{"prompt": "p", "completion": "c"}\n{"prompt": "q"}\n', "pairs.jsonl:2: missing field \"completion\""),
    ("none.jsonl", '{"body": "x"}\n', "none.jsonl:1: missing field \"text\""),
    ("type.jsonl", '{"text": 3}\n', "type.jsonl:1: field \"text\" must be a string"),
    ("array.jsonl", '[1, 2]\n', "array.jsonl:1: expected a JSON object"),
    ("latin.txt", "line one\ncaf\xe9 au lait\n".encode("latin-1"), "latin.txt:2: not UTF-8"),
    ("latin.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "latin.jsonl:2: not UTF-8"),
    ("data.csv", "a,b\n", "unknown data format"),
])
def test_bad_data_is_named_by_file_and_line(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError) as err:
        read_documents(path)
    assert message in str(err.value)


def test_bad_data_fails_before_training_through_the_cli(tmp_path, capsys):
    data = write(tmp_path / "d.jsonl", '{"text": "fine"}\n{"text": "fine"}\nnot json\n')
    out = tmp_path / "out"
    code = main(["train", "--config", "gpt-neo-125m", "--data", str(data), "--out", str(out), "--max-steps", "1"])
    assert code == 1
    assert f"{data}:3: invalid JSON" in capsys.readouterr().err
    assert not out.exists()


def test_formats_and_packing(tmp_path, tok):
    txt = write(tmp_path / "a.txt", "Hello world")
    pairs = write(tmp_path / "p.jsonl", json.dumps({"prompt": "Q: 2+2?", "completion": " A: 4"}) + "\n")
    docs = read_documents(txt) + read_documents(pairs)
    assert [d.prompt for d in docs] == [None, "Q: 2+2?"]
    examples = tokenize(docs, tok)
    hello, q, a = tok.encode("Hello world"), tok.encode("Q: 2+2?"), tok.encode(" A: 4")
    assert examples[0] == (hello + [EOS], None)
    assert examples[1] == (q + a + [EOS], [0] * len(q) + [1] * (len(a) + 1))
    blocks = pack(examples, 4, EOS)
    stream = hello + [EOS] + q + a + [EOS]
    assert blocks.ids.flatten().tolist()[: len(stream)] == stream
    weights = blocks.weights.flatten().tolist()
    assert weights[: len(stream)] == [1] * (len(hello) + 1) + [0] * len(q) + [1] * (len(a) + 1)
    assert weights[len(stream):] == [0] * (blocks.ids.numel() - len(stream))  # padding never counts


def test_validation_split_is_seeded_and_disjoint(tmp_path, tok):
    lines = [json.dumps({"text": f"document number {i} says {i * 7}"}) for i in range(40)]
    data = write(tmp_path / "d.jsonl", "\n".join(lines))
    a = load_dataset([data], tok, 8, val_fraction=0.1, seed=1)
    b = load_dataset([data], tok, 8, val_fraction=0.1, seed=1)
    c = load_dataset([data], tok, 8, val_fraction=0.1, seed=2)
    assert (a.documents, a.val_documents) == (36, 4)
    assert torch.equal(a.val.ids, b.val.ids) and not torch.equal(a.val.ids, c.val.ids)
    train_text = tok.decode(a.train.ids.flatten().tolist())
    val_text = tok.decode(a.val.ids.flatten().tolist())
    for i in range(40):
        assert (f"number {i} says" in train_text) != (f"number {i} says" in val_text)


def test_single_document_holds_out_its_last_blocks(tmp_path, tok):
    data = write(tmp_path / "book.txt", " ".join(f"word{i}" for i in range(200)))
    ds = load_dataset([data], tok, 16, val_fraction=0.1)
    assert len(ds.val) >= 1 and len(ds.train) + len(ds.val) == pack(tokenize(read_documents(data), tok), 16, EOS).ids.shape[0]


def test_block_order_is_a_permutation_per_epoch_and_addressable():
    order = BlockOrder(10, seed=3)
    first = order.indices(0, 10).tolist()
    assert sorted(first) == list(range(10)) and first != list(range(10))
    assert sorted(order.indices(10, 10).tolist()) == list(range(10))
    assert order.indices(7, 6).tolist() == order.indices(0, 20).tolist()[7:13]
    assert BlockOrder(10, seed=3).indices(13, 4).tolist() == order.indices(13, 4).tolist()

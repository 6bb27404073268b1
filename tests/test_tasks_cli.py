"""The task commands end to end through neoj's main(): the built-in model, and a tiny random one for speed."""

import io
import json
import sys

import pytest

from neoj.api import builtin_model_dir
from neoj.cli import main
from neoj.config import from_hf_dict
from neoj.weights import random_model, save_checkpoint

TINY = {"model_type": "gpt_neo", "vocab_size": 50257, "max_position_embeddings": 128, "hidden_size": 32,
        "num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]], "window_size": 8}
COMMANDS = ["summarize", "ask", "translate", "classify", "complete-code", "chat", "batch"]
DOC = "\n\n".join(f"The list type {i} supports append, insert and sort. Lists are mutable sequences. "
                  f"Section {i} explains slicing, which returns a new list." for i in range(40))

needs_builtin = pytest.mark.skipif(builtin_model_dir() is None, reason="this install has no built-in model")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tasks-cli-model")
    save_checkpoint(random_model(from_hf_dict(TINY), seed=3), path)
    return str(path)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_each_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--prompts" in out and "built-in model" in out
    if command != "classify":  # classification scores labels; it generates nothing
        assert "--max-new-tokens" in out


@needs_builtin
def test_builtin_summarize_ask_translate(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    code, out, err = run(capsys, "summarize", str(doc), "--length", "short", "--json", "--no-progress")
    assert code == 0, err
    result = json.loads(out)
    assert result["chunks"] > 1 and len(result["rounds"][0]) == result["chunks"] and isinstance(result["summary"], str)
    code, out, err = run(capsys, "ask", "What does slicing return?", "--context", str(doc), "--json", "-n", "16")
    assert code == 0, err
    answer = json.loads(out)
    assert answer["passages_total"] > 1 and answer["passages"] and isinstance(answer["answer"], str)
    code, out, err = run(capsys, "ask", "What is a list?", "-n", "16")
    assert code == 0 and out.endswith("\n")
    code, out, err = run(capsys, "translate", "--to", "fr", "Good morning.\n\nThank you.", "-n", "12")
    assert code == 0, err
    assert out.count("\n") == 3  # the blank line between the two lines is kept


@needs_builtin
def test_builtin_classify_text_and_file(tmp_path, capsys):
    code, out, err = run(capsys, "classify", "This works wonderfully, thank you!")
    assert code == 0 and out.strip() in ("positive", "negative") and "log-likelihood" in err
    texts = tmp_path / "texts.txt"
    texts.write_text("I love it\nI hate it\n\nIt is fine\n")
    code, out, err = run(capsys, "classify", "--file", str(texts), "--labels", "good,bad,neutral", "--no-progress")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["text"] for r in rows] == ["I love it", "I hate it", "It is fine"]
    for r in rows:
        assert set(r["probabilities"]) == {"good", "bad", "neutral"}
        assert sum(r["probabilities"].values()) == pytest.approx(1.0)
    examples = tmp_path / "ex.jsonl"
    examples.write_text('{"text": "Superb", "label": "good"}\n{"text": "Dreadful", "label": "bad"}\n')
    code, out, _ = run(capsys, "classify", "Lovely", "-l", "good,bad", "--examples", str(examples), "--json")
    assert code == 0 and json.loads(out)["label"] in ("good", "bad")


@needs_builtin
def test_builtin_complete_code_stays_in_the_function(tmp_path, capsys):
    src = tmp_path / "code.py"
    src.write_text("import os\n\n\ndef list_python_files(path):\n")
    code, out, err = run(capsys, "complete-code", str(src), "-n", "48", "--echo")
    assert code == 0, err
    completion = out[len(src.read_text()) :].rstrip("\n")
    assert out.startswith("import os")
    for line in completion.split("\n"):
        assert not line.strip() or line[0] in " \t"


@needs_builtin
def test_builtin_chat_reads_stdin_with_commands(tmp_path, capsys, monkeypatch):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    script = f"Hello there\n/save {a}\n/reset\nWhat is a tuple?\n/save {b}\n/bogus\n/exit\nnever read\n/save {c}\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code, out, err = run(capsys, "chat", "-n", "24", "--seed", "1", "--system", "You explain Python.")
    assert code == 0, err
    assert out.endswith("\n") and "conversation reset" in err and "/reset" in err  # /bogus gets the help line
    first, second = json.loads(a.read_text()), json.loads(b.read_text())
    assert first["system"] == "You explain Python." and [m["role"] for m in first["messages"]] == ["user", "assistant"]
    assert first["messages"][0]["content"] == "Hello there"
    assert [m["content"] for m in second["messages"]][0] == "What is a tuple?" and len(second["messages"]) == 2
    assert first["messages"][1]["content"] in out and second["messages"][1]["content"] in out  # streamed replies
    assert not c.exists()  # /exit ended the session


def test_tiny_summarize_stdin_and_batch(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(DOC))
    code, out, err = run(capsys, "summarize", "-", "-m", tiny_dir, "-n", "12", "--no-progress")
    assert code == 0, err
    inp, outp = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": f"Idea {i}:"}) + "\n" for i in range(5)))
    code, _, err = run(capsys, "batch", "-m", tiny_dir, "-i", str(inp), "-o", str(outp), "-n", "4", "--no-progress")
    assert code == 0 and "5 records written" in err
    assert sorted(json.loads(line)["id"] for line in outp.read_text().splitlines()) == list(range(5))
    code, _, err = run(capsys, "batch", "-m", tiny_dir, "-i", str(inp), "-o", str(outp), "-n", "4", "--no-progress")
    assert code == 0 and "0 records written" in err and "5 already there" in err


def test_clear_errors(tiny_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    cases = [
        (["summarize", str(tmp_path / "missing.txt")], "does not exist"),
        (["summarize", str(empty), "-m", tiny_dir], "empty"),
        (["summarize", str(tmp_path), "-m", tiny_dir], "is a directory"),
        (["classify", "text", "--labels", "only", "-m", tiny_dir], "at least 2 labels"),
        (["classify", "-m", tiny_dir], "give a TEXT"),
        (["ask", "q", "--context", str(tmp_path / "nope.txt"), "-m", tiny_dir], "does not exist"),
        (["summarize", str(empty), "-m", tiny_dir, "--prompts", str(tmp_path / "p.json")], "cannot read prompts"),
        (["batch", "-m", tiny_dir, "-i", str(empty), "-o", str(tmp_path / "o.jsonl")], "no records"),
    ]
    for argv, words in cases:
        code, _, err = run(capsys, *argv)
        assert code == 1 and words in err, (argv, err)


def test_prompts_file_changes_the_prompt(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"classify_header": "", "classify": "{text} =>", "classify_label": " {label}"}))
    code, out, _ = run(capsys, "classify", "nice", "-m", tiny_dir, "--json")
    default = json.loads(out)["logprobs"]
    code, out, _ = run(capsys, "classify", "nice", "-m", tiny_dir, "--json", "--prompts", str(prompts))
    assert code == 0 and json.loads(out)["logprobs"] != default
    prompts.write_text(json.dumps({"classify": "no text field"}))
    code, _, err = run(capsys, "classify", "nice", "-m", tiny_dir, "--prompts", str(prompts))
    assert code == 1 and "must contain {text}" in err

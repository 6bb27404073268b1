"""Bad command-line input gives one line, `neoj: error: ...`, and never a traceback; a user's model is never replaced.

Most cases run in-process through main(); real non-UTF-8 bytes in sys.argv and on standard input, which
only a real process receives as the shell passes them, go through `python -m neoj`.
"""

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from neoj.api import builtin_model_dir
from neoj.checks import decode_escapes
from neoj.cli import build_parser, main
from neoj.config import from_hf_dict
from neoj.errors import NeojError
from neoj.tasks.batch import EngineRunner
from neoj.weights import random_model, save_checkpoint

TINY = {"model_type": "gpt_neo", "vocab_size": 50257, "max_position_embeddings": 128, "hidden_size": 32,
        "num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]], "window_size": 8}
CONVERT = "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
FAST_RUN = ["--seq-len", "8", "--batch-size", "1", "--max-steps", "2", "--save-every", "1", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("errors-model")
    save_checkpoint(random_model(from_hf_dict(TINY), seed=3), path)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("errors-data") / "d.txt"
    path.write_text("The list type supports append and sort. Lists are mutable sequences.\n" * 4)
    return str(path)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def snapshot(directory):
    """Returns {name: (bytes, mtime_ns)} of every file in a directory, to prove a refused command left it alone."""
    from pathlib import Path

    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(directory).iterdir()) if p.is_file()}


def stdin_bytes(monkeypatch, data: bytes):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


# ---- 1. text that is not UTF-8 ----

def test_non_utf8_argument_and_stdin_from_a_real_shell(tmp_path):
    """sys.argv and stdin as a real process gets them: surrogate-escaped bytes, then a strict UTF-8 decode."""
    neoj = [sys.executable, "-m", "neoj"]
    proc = subprocess.run(neoj + ["generate", b"caf\xe9", "-n", "2"], capture_output=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == b""
    assert proc.stderr.decode() == ("neoj: error: the PROMPT argument is not UTF-8 text (byte 0xe9 at offset 3 of "
                                    f"'caf\\xe9'); {CONVERT}\n")
    proc = subprocess.run(neoj + ["translate", "-", "--to", "French"], input=b"Un caf\xe9 noir", capture_output=True,
                          timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.decode() == f"neoj: error: standard input is not UTF-8 text (byte 0xe9 at offset 6); {CONVERT}\n"


def test_every_command_reading_stdin_names_it(tiny_dir, tmp_path, capsys, monkeypatch):
    commands = [["generate", "-", "-n", "2"], ["translate", "-", "--to", "fr"], ["summarize", "-"], ["classify", "-"],
                ["complete-code", "-"], ["ask", "what?", "--context", "-"], ["chat"]]
    for argv in commands:
        stdin_bytes(monkeypatch, b"na\xefve\nok line\n")
        code, out, err = run(capsys, *argv, "-m", tiny_dir)
        assert code == 1 and out == "", argv
        assert err == f"neoj: error: standard input is not UTF-8 text (byte 0xef at offset 2); {CONVERT}\n", argv
    stdin_bytes(monkeypatch, "naïve\r\n".encode())  # good UTF-8 still works, newlines as a file read would give them
    code, out, err = run(capsys, "generate", "-", "-m", tiny_dir, "-n", "2", "--echo", "-t", "0")
    assert code == 0 and out.startswith("naïve\n")


def test_every_text_argument_is_checked_but_paths_are_not(tiny_dir, tmp_path, capsys):
    bad = "caf\udce9"  # how Linux hands Python the bytes caf\xe9
    cases = [(["generate", "hi", "--stop", bad], "the --stop argument"),
             (["translate", bad, "--to", "fr"], "the TEXT argument"),
             (["translate", "hi", "--to", "fr", "--from", bad], "the --from argument"),
             (["ask", bad], "the QUESTION argument"), (["classify", bad], "the TEXT argument"),
             (["classify", "hi", "--labels", f"a,{bad}"], "the --labels argument"),
             (["chat", "--system", bad], "the --system argument"),
             (["batch", "-i", "x.jsonl", "-o", "y.jsonl", "--stop", bad], "the --stop argument")]
    for argv, where in cases:
        code, _, err = run(capsys, *argv, "-m", tiny_dir)
        assert code == 1 and err.startswith(f"neoj: error: {where} is not UTF-8 text (byte 0xe9 at offset"), argv
        assert err.endswith(f"{CONVERT}\n") and err.count("\n") == 1
    # A file name is any bytes: a missing non-UTF-8 file is reported as missing, not as bad text.
    code, _, err = run(capsys, "summarize", str(tmp_path / bad), "-m", tiny_dir)
    assert code == 1 and "does not exist" in err
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9\n")
    code, _, err = run(capsys, "summarize", str(latin1), "-m", tiny_dir)
    assert code == 1
    assert err == f"neoj: error: input {str(latin1)!r} is not UTF-8 text (byte 0xe9 at offset 3); {CONVERT}\n"


def test_debug_shows_the_traceback_and_unexpected_errors_are_one_line(tiny_dir, capsys, monkeypatch):
    with pytest.raises(NeojError, match="PROMPT argument is not UTF-8"):
        main(["--debug", "generate", "caf\udce9"])

    def broken(args):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr("neoj.cli.cmd_info", broken)
    code, _, err = run(capsys, "info", tiny_dir)
    assert code == 1 and err == ("neoj: error: unexpected RuntimeError: something inside broke; this is a bug in neoj: "
                                 "run the command again as neoj --debug ... to see where, and report it\n")
    with pytest.raises(RuntimeError):
        main(["--debug", "info", tiny_dir])


# ---- 2 and 3. outputs that cannot be written, or hold a user's files ----

def test_bad_out_fails_before_any_model_is_read(tmp_path, capsys):
    """The model named does not even exist: the --out error coming first shows nothing was loaded."""
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.md").write_text("keep me")
    before = snapshot(full), a_file.stat().st_mtime_ns
    missing = str(tmp_path / "no-such-model")
    commands = [["quantize", missing, "-q", "int8"], ["merge", missing, missing],
                ["finetune", "-m", missing, "--data", missing], ["train", "-c", "gpt-neo-125m", "--data", missing]]
    expected = {"/proc/x": "--out /proc/x cannot be created (No such file or directory); choose a directory you "
                           "can write to (nothing was written)",
                str(a_file): f"--out {a_file} is a file, not a directory; choose a new directory (nothing was written)",
                str(full): f"--out {full} already exists and is not empty; choose a new directory, or pass --overwrite "
                           "to replace the model files in it (nothing was written)"}
    for argv in commands:
        for out, message in expected.items():
            code, _, err = run(capsys, *argv, "--out", out)
            assert (code, err) == (1, f"neoj: error: {message}\n"), argv
    assert (snapshot(full), a_file.stat().st_mtime_ns) == before
    # A good --out passes the check, and is not left behind when the model then turns out to be missing.
    for argv in commands[:2]:
        code, _, err = run(capsys, *argv, "--out", str(tmp_path / "new" / "deeper"))
        assert code == 1 and "no-such-model" in err and not (tmp_path / "new").exists()


def test_merge_never_replaces_a_model_unless_told(tiny_dir, tmp_path, capsys):
    from neoj.train.lora import LoraConfig, inject, save_adapter
    from neoj.weights import load_model

    model = load_model(tiny_dir)
    inject(model, LoraConfig(r=2, alpha=4))
    save_adapter(model, LoraConfig(r=2, alpha=4), tmp_path / "adapter")
    target = tmp_path / "existing"
    save_checkpoint(random_model(from_hf_dict(TINY), seed=5), target)
    (target / "model-00002-of-00002.safetensors").write_bytes(b"stale shard")
    (target / "README.md").write_text("my notes")
    before = snapshot(target)
    code, _, err = run(capsys, "merge", tiny_dir, str(tmp_path / "adapter"), "--out", str(target))
    assert code == 1 and "already exists and is not empty" in err and "--overwrite" in err
    assert snapshot(target) == before
    for out, what in ((tiny_dir, "base model"), (str(tmp_path / "adapter"), "adapter")):
        code, _, err = run(capsys, "merge", tiny_dir, str(tmp_path / "adapter"), "--out", out, "--overwrite")
        assert (code, err) == (1, f"neoj: error: --out {out} is the {what}; write the merged model to a new "
                               "directory\n")
    code, out, err = run(capsys, "merge", tiny_dir, str(tmp_path / "adapter"), "--out", str(target), "--overwrite")
    assert code == 0 and "written to" in out
    after = snapshot(target)
    assert after["model.safetensors"] != before["model.safetensors"]
    assert "model-00002-of-00002.safetensors" not in after  # no stale shard beside the new weights
    assert after["README.md"] == before["README.md"]  # a file neoj does not write is kept


def test_finetune_refuses_a_model_dir_and_its_own_finished_run(tiny_dir, data, tmp_path, capsys):
    model_copy = tmp_path / "a-model"
    save_checkpoint(random_model(from_hf_dict(TINY), seed=5), model_copy)
    before = snapshot(model_copy)
    for extra in ([], ["--lora"], ["--resume"]):
        code, _, err = run(capsys, "finetune", "-m", tiny_dir, "--data", data, "--out", str(model_copy), *FAST_RUN,
                           *extra)
        assert code == 1 and err.count("\n") == 1, extra
        assert ("holds no checkpoint.pt to resume from" if extra == ["--resume"] else "is not empty") in err
    assert snapshot(model_copy) == before
    code, _, err = run(capsys, "finetune", "-m", tiny_dir, "--data", data, "--out", tiny_dir, "--overwrite", *FAST_RUN)
    assert code == 1 and "is the model being trained" in err

    run_dir = str(tmp_path / "run")
    assert run(capsys, "finetune", "-m", tiny_dir, "--data", data, "--out", run_dir, *FAST_RUN)[0] == 0
    finished = snapshot(run_dir)
    code, _, err = run(capsys, "finetune", "-m", tiny_dir, "--data", data, "--out", run_dir, *FAST_RUN)
    assert (code, err) == (1, f"neoj: error: --out {run_dir} holds an earlier training run (checkpoint.pt); "
                              "pass --resume to continue it, or --overwrite to start a new run there "
                              "(nothing was written)\n")
    code, _, err = run(capsys, "finetune", "-m", tiny_dir, "--data", data, "--out", run_dir, *FAST_RUN, "--resume",
                       "--overwrite")
    assert code == 1 and "not both" in err
    assert snapshot(run_dir) == finished
    # --resume continues the run (here already at its last step), --overwrite starts a new one.
    assert run(capsys, "finetune", "-m", tiny_dir, "--data", data, "--out", run_dir, *FAST_RUN, "--resume")[0] == 0
    code, _, err = run(capsys, "finetune", "-m", tiny_dir, "--data", data, "--out", run_dir, *FAST_RUN, "--lora",
                       "--overwrite")
    assert code == 0, err
    names = {p.name for p in os.scandir(run_dir)}
    assert "adapter_model.safetensors" in names and "model.safetensors" not in names  # not mixed with the old model


def test_lora_finetune_into_a_quantized_checkpoint_is_refused(tiny_dir, data, tmp_path, capsys):
    quantized = tmp_path / "q"
    assert run(capsys, "quantize", tiny_dir, "--out", str(quantized), "-q", "int8")[0] == 0
    before = snapshot(quantized)
    code, _, err = run(capsys, "finetune", "-m", tiny_dir, "--data", data, "--out", str(quantized), "--lora", *FAST_RUN)
    assert code == 1 and "already exists and is not empty" in err
    code, _, err = run(capsys, "quantize", tiny_dir, "--out", str(quantized), "-q", "int4", "--group-size", "32")
    assert code == 1 and "already exists and is not empty" in err
    assert snapshot(quantized) == before
    code, out, _ = run(capsys, "quantize", tiny_dir, "--out", str(quantized), "-q", "int4", "--group-size", "32",
                       "--overwrite")
    assert code == 0 and json.loads((quantized / "quantization.json").read_text())["scheme"] == "int4"


# ---- 4. batch ----

def test_batch_checks_options_and_output_before_creating_anything(tiny_dir, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "r0", "prompt": "Hello"}\n')
    cases = [(["-n", "-1"], "--max-new-tokens must be >= 0 (got -1)"),
             (["--top-p", "2"], "--top-p must be in (0, 1] (got 2.0)"),
             (["-b", "0"], "--batch-size must be at least 1 (got 0)")]
    for argv, message in cases:
        code, _, err = run(capsys, "batch", "-m", tiny_dir, "-i", str(inp), "-o", str(out), *argv)
        assert (code, err) == (1, f"neoj: error: {message}\n")
        assert not out.exists()
    code, _, err = run(capsys, "batch", "-m", tiny_dir, "-i", str(inp), "-o", "/proc/x.jsonl")  # progress bar on
    assert (code, err) == (1, "neoj: error: --output /proc/x.jsonl cannot be created (No such file or directory); "
                              "choose a file in a directory you can write to\n")


def test_batch_ctrl_c_says_what_was_written_and_a_rerun_resumes(tiny_dir, tmp_path, capsys, monkeypatch):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Idea {i}:"}) + "\n" for i in range(5)))
    original, calls = EngineRunner.generate_each, []

    def interrupted_second_time(self, jobs):
        calls.append(len(jobs))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, jobs)

    monkeypatch.setattr(EngineRunner, "generate_each", interrupted_second_time)
    argv = ["batch", "-m", tiny_dir, "-i", str(inp), "-o", str(out), "-n", "3", "-b", "2"]
    code, _, err = run(capsys, *argv)
    assert code == 130
    assert f"\nneoj: interrupted after 2 of 5 records (2 written by this run) in {out}. Run the same command again " \
           "to do the rest.\n" in "\n" + err
    monkeypatch.setattr(EngineRunner, "generate_each", original)
    code, _, err = run(capsys, *argv, "--no-progress")
    assert code == 0 and "3 records written" in err and "2 already there" in err
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == [f"r{i}" for i in range(5)]


# ---- 5. --stop escapes ----

def test_stop_escapes_are_decoded_carefully(capsys):
    assert decode_escapes(r"\n\n") == "\n\n"
    assert decode_escapes(r"a\\nb") == "a\\nb"  # \\ is one backslash: this stop is a, backslash, n, b
    assert decode_escapes(r"\t\r\x41\u00e9\U0001F600") == "\t\rAé😀"
    assert decode_escapes("café → 東京\\n") == "café → 東京\n"  # non-ASCII text is kept as it is
    assert decode_escapes(r"C:\dir\ trailing\\") == r"C:\dir\ trailing" + "\\"  # unknown escapes stay
    with pytest.raises(ValueError, match="names no character"):
        decode_escapes(r"\ud800")
    parser = build_parser()
    assert parser.parse_args(["generate", "x", "--stop", r"\n\n", "--stop", "é\\t"]).stop == ["\n\n", "é\t"]
    assert parser.parse_args(["batch", "-i", "a", "-o", "b", "--stop", "\\\\"]).stop == ["\\"]
    for command in ("generate", "batch"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert r"--stop '\n\n' stops at a blank line" in " ".join(capsys.readouterr().out.split())


@pytest.mark.skipif(builtin_model_dir() is None, reason="this install has no built-in model")
def test_stop_blank_line_from_a_shell_stops_at_a_blank_line(capsys):
    argv = ["generate", "Sorting", "-n", "20", "-t", "0", "--dtype", "float32"]
    code, full, _ = run(capsys, *argv)
    assert code == 0 and "\n\n" in full[:-1]  # the text, then a blank line (the last newline is the command's)
    code, stopped, _ = run(capsys, *argv, "--stop", r"\n\n")  # what bash passes for --stop "\n\n"
    assert code == 0 and stopped == full[: full.index("\n\n")] + "\n"


def test_serve_refuses_a_bad_or_busy_port_before_loading(capsys, monkeypatch):
    import neoj.cli

    def never_load(args):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(neoj.cli, "load_from_args", never_load)
    for port in ("99999", "-1"):
        code, _, err = run(capsys, "serve", "--port", port)
        assert code == 1 and f"--port {port} is not a TCP port" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, _, err = run(capsys, "serve", "--port", str(port))
    assert code == 1 and f"port {port} on 127.0.0.1 is already in use" in err


def test_serve_names_the_builtin_model_builtin(tmp_path):
    with socket.socket() as probe:  # a free port, released for the server to take
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "neoj", "serve", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        models = None
        for _ in range(240):  # up to a minute for the model to load
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as reply:
                    models = json.load(reply)
                break
            except OSError:
                if server.poll() is not None:
                    raise AssertionError(server.stderr.read().decode())
                time.sleep(0.25)
        assert models is not None and [m["id"] for m in models["data"]] == ["builtin"]
    finally:
        server.terminate()
        server.wait(30)


def test_threads_option_applies_to_every_command(capsys):
    code, _, err = run(capsys, "--threads", "0", "generate", "x")
    assert code == 1 and "--threads must be at least 1, not 0" in err
    code, out, _ = run(capsys, "--threads", "1", "info", "builtin")
    assert code == 0 and out.startswith("builtin")


def test_serve_applies_adapter_and_names_a_missing_one(capsys, tmp_path):
    code, _, err = run(capsys, "serve", "--port", "0", "--adapter", str(tmp_path / "no-adapter"))
    assert code == 1 and "no such adapter directory" in err

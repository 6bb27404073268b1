"""Model names resolve the same way everywhere (neoj.load, --model, neoj info, neoj quantize, neoj download),
and a name that is not a model is one line naming it and saying what is accepted, without asking the Hub."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest

import neoj
from neoj.cli import main
from neoj.weights import local_model_dir, looks_like_path

PATHS = ["./missing-dir", "../missing-dir", "/nonexistent-neoj/model", "~/missing-neoj-model", "models/neo/125m",
         "missing-dir/"]
NOT_MODELS = ["bogus", "Foo/--bad", "a/b c", "gpt-neo-125m", "random-gpt-neo-125m", "EleutherAI/gpt-neo-125m.."]
# What every "not a model" message lists.
FORMS = ("checkpoint directory", "Hub id", "EleutherAI/gpt-neo-125m", "builtin", "random:PRESET", "gpt-j-6b")


@pytest.fixture(autouse=True)
def no_hub(monkeypatch, tmp_path):
    """Fails the test if anything asks the Hub: bad names must be refused before any request."""
    def refuse(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", refuse)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.chdir(tmp_path)  # relative names resolve against an empty directory


def run(argv: list[str], capsys) -> tuple[int, str]:
    """Returns (exit code, stderr) of `neoj ARGV`, asserting nothing went to stdout."""
    code = main(argv)
    captured = capsys.readouterr()
    assert captured.out == ""
    return code, captured.err


def assert_one_line(err: str, *parts: str) -> None:
    assert err.startswith("neoj: error: ") and err.count("\n") == 1, err
    for part in parts:
        assert part in err, (part, err)


@pytest.mark.parametrize("name", PATHS)
def test_looks_like_path(name):
    assert looks_like_path(name)


@pytest.mark.parametrize("name", ["EleutherAI/gpt-neo-125m", "builtin", "random:gpt-j-6b", "bogus"])
def test_does_not_look_like_path(name):
    assert not looks_like_path(name)


@pytest.mark.parametrize("name", PATHS)
def test_missing_path_is_no_such_directory_everywhere(name, capsys):
    with pytest.raises(neoj.CheckpointError) as info:
        neoj.load(name, device="cpu")
    assert str(info.value).startswith(f"no such directory: {name!r}")
    for argv in (["info", name], ["generate", "-m", name, "hi"], ["quantize", name, "-o", "q", "-q", "int8"]):
        code, err = run(argv, capsys)
        assert code == 1
        assert_one_line(err, f"no such directory: {name!r}", *FORMS)


def test_a_path_object_is_never_a_hub_id():
    with pytest.raises(neoj.CheckpointError, match="no such directory: 'someorg/somemodel'"):
        neoj.load(Path("someorg/somemodel"))


@pytest.mark.parametrize("name", NOT_MODELS)
def test_a_name_that_is_no_model_lists_what_is_accepted(name, capsys):
    with pytest.raises(neoj.CheckpointError) as info:
        neoj.load(name, device="cpu")
    assert str(info.value).startswith(f"unknown model {name!r}")
    for argv in (["generate", "-m", name, "hi"], ["quantize", name, "-o", "q", "-q", "int8"]):
        code, err = run(argv, capsys)
        assert code == 1
        assert_one_line(err, f"unknown model {name!r}", *FORMS)


def test_a_preset_name_points_at_random_preset(capsys):
    code, err = run(["generate", "-m", "gpt-neo-125m", "hi"], capsys)
    assert code == 1
    assert_one_line(err, "random:gpt-neo-125m gives random weights of its shape")
    assert main(["info", "gpt-neo-125m"]) == 0  # info takes bare preset names too
    assert "gpt_neo" in capsys.readouterr().out


def test_info_rejects_names_that_are_no_model(capsys):
    code, err = run(["info", "bogus"], capsys)
    assert code == 1
    assert_one_line(err, "unknown model 'bogus'", *FORMS)
    code, err = run(["info", "random:gpt-neo-7b"], capsys)
    assert code == 1
    assert_one_line(err, "unknown preset 'gpt-neo-7b'", "gpt-neo-125m", "gpt-j-6b")


def test_empty_name(capsys):
    with pytest.raises(neoj.CheckpointError, match="the model name is empty"):
        local_model_dir("")
    code, err = run(["generate", "-m", "", "hi"], capsys)
    assert code == 1
    assert_one_line(err, "the model name is empty", *FORMS)


def test_random_preset_has_no_checkpoint_to_quantize(capsys):
    code, err = run(["quantize", "random:gpt-neo-125m", "-o", "q", "-q", "int8"], capsys)
    assert code == 1
    assert_one_line(err, "'random:gpt-neo-125m' has random weights and no checkpoint to read")


def test_a_file_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    code, err = run(["generate", "-m", "model.safetensors", "hi"], capsys)
    assert code == 1
    assert_one_line(err, "model.safetensors is a file; pass the checkpoint directory")


@pytest.mark.parametrize("name", ["./x", "bogus", "a/b/c"])
def test_download_takes_only_hub_ids(name, capsys):
    code, err = run(["download", name], capsys)
    assert code == 1
    assert_one_line(err, f"{name!r} is not a valid Hub id", "owner/name")


def test_the_reported_command_prints_no_traceback(tmp_path):
    # The command of the issue, as a user runs it.
    proc = subprocess.run([sys.executable, "-m", "neoj", "info", "./missing-dir"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "Traceback" not in proc.stderr and "HFValidationError" not in proc.stderr
    assert proc.stderr.startswith("neoj: error: no such directory: './missing-dir'") and proc.stderr.count("\n") == 1

"""neoj batch: resumable JSONL generation that never loses or duplicates a record, even after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

import neoj
from neoj.config import from_hf_dict
from neoj.tasks import TaskError, run_batch
from neoj.weights import random_model, save_checkpoint

TINY = {"model_type": "gpt_neo", "vocab_size": 50257, "max_position_embeddings": 128, "hidden_size": 32,
        "num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]], "window_size": 8}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("batch-model")
    save_checkpoint(random_model(from_hf_dict(TINY), seed=3), path)
    return path


@pytest.fixture(scope="module")
def lm(model_dir):
    return neoj.load(model_dir, dtype="float32", device="cpu")


def write_inputs(path, n, ids=True):
    with open(path, "w") as f:
        for i in range(n):
            rec = {"prompt": f"Write a line about topic {i}:", "label": i % 3}
            if ids:
                rec["id"] = f"rec-{i}"
            f.write(json.dumps(rec) + "\n")
    return path


def read_output(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_batch_writes_each_record_once_and_resumes(lm, tmp_path):
    inp, out = write_inputs(tmp_path / "in.jsonl", 10), tmp_path / "out.jsonl"
    result = run_batch(lm, inp, out, batch_size=3, max_new_tokens=6, temperature=0)
    assert (result.total, result.skipped, result.written) == (10, 0, 10)
    records = read_output(out)
    assert [r["id"] for r in records] == [f"rec-{i}" for i in range(10)]
    assert all(r["label"] == i % 3 and r["completion_tokens"] <= 6 and isinstance(r["text"], str)
               for i, r in enumerate(records))
    full = out.read_bytes()
    assert run_batch(lm, inp, out, batch_size=3, max_new_tokens=6, temperature=0).written == 0
    # A kill mid-write leaves a partial last line: it is cut off and that record written again, whole.
    lines = full.split(b"\n")
    out.write_bytes(b"\n".join(lines[:4]) + b"\n" + lines[4][: len(lines[4]) // 2])
    result = run_batch(lm, inp, out, batch_size=3, max_new_tokens=6, temperature=0)
    assert (result.skipped, result.written) == (4, 6)
    assert out.read_bytes() == full  # greedy: exactly what the uninterrupted run wrote


def test_seeded_sampling_is_per_record(lm, tmp_path):
    inp = write_inputs(tmp_path / "in.jsonl", 6)
    outs = []
    for bs in (1, 4):
        out = tmp_path / f"out{bs}.jsonl"
        run_batch(lm, inp, out, batch_size=bs, max_new_tokens=8, temperature=0.9, seed=5)
        outs.append([r["text"] for r in read_output(out)])
    assert outs[0] == outs[1]  # a record's sample does not depend on its batch mates
    assert len(set(outs[0])) == 6
    out = tmp_path / "n.jsonl"
    run_batch(lm, inp, out, max_new_tokens=4, num_return_sequences=2, seed=1)
    assert all(len(r["texts"]) == 2 and len(r["finish_reason"]) == 2 for r in read_output(out))


def test_line_keys_record_options_and_errors(lm, tmp_path):
    inp = tmp_path / "lines.jsonl"
    inp.write_text('{"prompt": "a"}\n\n{"prompt": "b", "max_new_tokens": 3, "stop": "zzz"}\n'
                   + json.dumps({"prompt": "long " * 200}) + "\n")
    out = tmp_path / "o.jsonl"
    run_batch(lm, inp, out, max_new_tokens=5, temperature=0)
    records = read_output(out)
    assert [r["line"] for r in records] == [1, 3, 4]  # keyed by line number; blank lines count
    assert records[1]["completion_tokens"] <= 3
    assert "context is 128 tokens" in records[2]["error"] and "truncate" in records[2]["error"]
    bad = [('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', "already appears on line 1"),
           ('{"id": 1, "prompt": "a"}\n{"prompt": "b"}\n', "no \"id\""),
           ('{"prompt": ""}\n', "non-empty string"), ("not json\n", "not a JSON object"), ("\n", "no records")]
    for text, words in bad:
        inp.write_text(text)
        with pytest.raises(TaskError, match=words):
            run_batch(lm, inp, tmp_path / "x.jsonl")
    with pytest.raises(TaskError, match="cannot read input"):
        run_batch(lm, tmp_path / "missing.jsonl", tmp_path / "x.jsonl")


def test_sigkill_mid_run_then_rerun_yields_each_record_exactly_once(lm, model_dir, tmp_path):
    n = 40
    inp, out = write_inputs(tmp_path / "in.jsonl", n), tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "neoj", "batch", "-m", str(model_dir), "--dtype", "float32", "--device", "cpu",
           "-i", str(inp), "-o", str(out), "-n", "16", "-b", "2", "-t", "0", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 6:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_with = out.read_bytes().count(b"\n")
    assert proc.returncode == -signal.SIGKILL and 0 < killed_with < n, proc.stderr.read().decode()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{n - killed_with} records written" in rerun.stderr and f"({killed_with} already there" in rerun.stderr
    counts = Counter(r["id"] for r in read_output(out))
    assert counts == Counter({f"rec-{i}": 1 for i in range(n)})
    # And the records are what one uninterrupted run writes.
    ref = tmp_path / "ref.jsonl"
    run_batch(lm, inp, ref, batch_size=2, max_new_tokens=16, temperature=0)
    assert sorted(read_output(out), key=lambda r: r["id"]) == sorted(read_output(ref), key=lambda r: r["id"])

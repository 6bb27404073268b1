"""neoj batch over several processes: torchrun ranks split the records, write part files, and one merge gives
exactly what one process writes (same seed), however the ranks were killed and re-run."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import neoj
from neoj.cli import main
from neoj.config import from_hf_dict
from neoj.tasks import TaskError, run_batch
from neoj.tasks.batch import batch_layout, merge_batch
from neoj.weights import random_model, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"model_type": "gpt_neo", "vocab_size": 50257, "max_position_embeddings": 128, "hidden_size": 32,
        "num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]], "window_size": 8}
RECORDS = 24
SHARE = RECORDS // 2  # each of 2 ranks' records on a fresh run
GEN = ["--seed", "7", "--temperature", "0.8", "-n", "12", "--batch-size", "2"]
GEN_KW = dict(seed=7, temperature=0.8, max_new_tokens=12, batch_size=2)
TIMEOUT = 180


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Returns (model directory, prompts file, reference output bytes written by one process)."""
    root = tmp_path_factory.mktemp("batch-dist")
    save_checkpoint(random_model(from_hf_dict(TINY), seed=3), root / "model")
    inp = root / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"rec-{i}", "prompt": f"Write a line about topic {i}:", "label": i % 3})
                           + "\n" for i in range(RECORDS)))
    lm = neoj.load(root / "model", dtype="float32", device="cpu")
    run_batch(lm, inp, root / "ref.jsonl", **GEN_KW)
    return root / "model", inp, (root / "ref.jsonl").read_bytes()


@pytest.fixture(scope="module")
def lm(setup):
    return neoj.load(setup[0], dtype="float32", device="cpu")


def batch_cmd(model, inp, out, nproc):
    """Returns the command line of `neoj batch` on nproc processes (torchrun for more than one)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    return [*launcher, "-m", "neoj", "--threads", "1", "batch", "--model", str(model), "--dtype", "float32",
            "--device", "cpu", "-i", str(inp), "-o", str(out), "--no-progress", *GEN]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_cmd(cmd):
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    neoj_lines = [line for line in proc.stderr.splitlines() if line.startswith("neoj:") or "Error" in line]
    assert proc.returncode == 0, "\n".join(neoj_lines[:20]) + "\n...\n" + proc.stderr[-2000:]
    return proc


def ids(data: bytes):
    return [json.loads(line)["id"] for line in data.splitlines()]


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def child_with_rank(parent: int, rank: int) -> int | None:
    """Returns the pid of the child of `parent` that torchrun started as `rank` (from /proc), or None."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0") if ppid == parent else []
        except (OSError, ValueError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_two_gloo_processes_write_what_one_writes(setup, tmp_path):
    model, inp, ref = setup
    out = tmp_path / "out"
    proc = run_cmd(batch_cmd(model, inp, f"{out}/", 2))
    assert (out / "output.jsonl").read_bytes() == ref  # same records, same bytes, in input order
    assert sorted(p.name for p in out.iterdir()) == ["output.jsonl"]  # the parts are gone once merged
    assert f"{RECORDS} records written by 2 processes" in proc.stderr
    # Again: nothing left to do; ranks with an empty share load no model and the output stays as it is.
    proc = run_cmd(batch_cmd(model, inp, out, 2))
    assert "0 records written" in proc.stderr and (out / "output.jsonl").read_bytes() == ref


@pytest.mark.parametrize("output, rerun_with", [("out.jsonl", 2), ("out/", 1)])
def test_sigkill_of_one_rank_then_rerun_loses_and_repeats_nothing(setup, tmp_path, output, rerun_with):
    model, inp, ref = setup
    out = tmp_path / output
    layout = batch_layout(out if output.endswith(".jsonl") else f"{out}/")
    with open(tmp_path / "torchrun.log", "wb") as log:
        proc = subprocess.Popen(batch_cmd(model, inp, f"{out}/" if output.endswith("/") else out, 2), env=ENV,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None and lines(layout.part(1)) < 1:
            time.sleep(0.005)
        pid = child_with_rank(proc.pid, 1)
        assert pid is not None, (tmp_path / "torchrun.log").read_text()[-3000:]
        os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    killed_with = lines(layout.part(1))
    assert proc.returncode != 0 and 0 < killed_with < SHARE  # killed in the middle of its share
    assert not layout.output.exists()  # no merge without every record
    rerun = run_cmd(batch_cmd(model, inp, f"{out}/" if output.endswith("/") else out, rerun_with))
    merged = layout.output.read_bytes()
    assert Counter(ids(merged)) == Counter({f"rec-{i}": 1 for i in range(RECORDS)})
    assert merged == ref  # what one uninterrupted process writes
    assert not layout.part_files() and (layout.directory or not layout.parts.exists())
    assert "records written by" in rerun.stderr


def split_reference(ref: bytes, parts: Path, owners: list[int]) -> list[bytes]:
    """Writes the reference records into part files, record i into part owners[i]; returns the lines."""
    parts.mkdir(parents=True, exist_ok=True)
    ref_lines = ref.splitlines(keepends=True)
    for rank in sorted(set(owners)):
        (parts / f"part-{rank:05d}.jsonl").write_bytes(b"".join(
            line for line, owner in zip(ref_lines, owners) if owner == rank))
    return ref_lines


def test_merge_complete_parts(setup, tmp_path, capsys):
    _, inp, ref = setup
    out = tmp_path / "out"
    ref_lines = split_reference(ref, out, [i % 3 for i in range(RECORDS)])
    with open(out / "part-00002.jsonl", "ab") as f:  # a record twice (same text), then a kill's partial line
        f.write(ref_lines[0] + ref_lines[1][:20])
    assert main(["batch", "--merge", "-i", str(inp), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"{RECORDS} of {RECORDS} records from 3 part files" in err and "1 duplicate records dropped (0 with" in err
    assert (out / "output.jsonl").read_bytes() == ref and not batch_layout(out).part_files()
    # Nothing left to merge: the output is left as it is.
    assert main(["batch", "--merge", "-i", str(inp), "-o", str(out)]) == 0
    assert "nothing to merge" in capsys.readouterr().err and (out / "output.jsonl").read_bytes() == ref


def test_merge_incomplete_parts_refuses_or_writes_what_there_is(setup, tmp_path, capsys):
    _, inp, ref = setup
    out = tmp_path / "out.jsonl"
    parts = batch_layout(out).parts
    ref_lines = split_reference(ref, parts, [i % 2 for i in range(RECORDS)])
    (parts / "part-00001.jsonl").write_bytes(b"".join(ref_lines[1:-2:2]))  # rec-23 missing
    assert main(["batch", "--merge", "-i", str(inp), "-o", str(out)]) == 1
    assert "1 of 24 records are not generated yet (the first: id 'rec-23')" in capsys.readouterr().err
    assert not out.exists()
    assert main(["batch", "--merge", "--allow-partial", "-i", str(inp), "-o", str(out)]) == 0
    assert "1 not generated yet: the part files are kept" in capsys.readouterr().err
    assert out.read_bytes() == b"".join(ref_lines[:-1]) and len(batch_layout(out).part_files()) == 2
    # A conflicting copy (another seed, say): reported, the first (the output's, then by part name) kept.
    other = json.loads(ref_lines[23])
    (parts / "part-00003.jsonl").write_bytes(ref_lines[23] + json.dumps({**other, "text": "else"}).encode() + b"\n")
    result = merge_batch(inp, out)
    assert (result.merged, result.missing, result.duplicates, result.conflicts) == (24, 0, 24, 1)
    assert out.read_bytes() == ref and not parts.exists()


def test_a_file_neoj_did_not_write_is_never_replaced(setup, tmp_path):
    _, inp, ref = setup
    out = tmp_path / "notes.txt"
    out.write_text("my notes\n")
    split_reference(ref, batch_layout(out).parts, [0] * RECORDS)
    with pytest.raises(TaskError, match="notes.txt:1: not a JSON line"):
        merge_batch(inp, out)
    assert out.read_text() == "my notes\n"
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "someone-else", "text": "x"}) + "\n")
    with pytest.raises(TaskError, match="not a record of the input"):
        merge_batch(inp, tmp_path / "other.jsonl")
    with pytest.raises(TaskError, match="must not be the input"):
        merge_batch(inp, inp)


def test_one_process_with_a_directory_or_leftover_parts(setup, lm, tmp_path):
    _, inp, ref = setup
    result = run_batch(lm, inp, f"{tmp_path / 'd'}/", **GEN_KW)
    assert (result.total, result.skipped, result.written) == (RECORDS, 0, RECORDS)
    assert (tmp_path / "d" / "output.jsonl").read_bytes() == ref and os.listdir(tmp_path / "d") == ["output.jsonl"]
    # Half the records in an output written directly, a parts directory left by a run on several processes
    # with a few more: one process finishes in the parts and merges all three into the output.
    out = tmp_path / "out.jsonl"
    ref_lines = ref.splitlines(keepends=True)
    out.write_bytes(b"".join(ref_lines[:12]) + ref_lines[12][:9])
    split_reference(b"".join(ref_lines[12:16]), batch_layout(out).parts, [0, 1, 0, 1])
    result = run_batch(lm, inp, out, **GEN_KW)
    assert (result.skipped, result.written) == (16, 8)
    assert out.read_bytes() == ref and not batch_layout(out).parts.exists()
    # Without parts, one process appends to the output directly, as it always did.
    out.write_bytes(b"".join(ref_lines[:5]))
    assert run_batch(lm, inp, out, **GEN_KW).written == RECORDS - 5
    assert out.read_bytes() == ref and not batch_layout(out).parts.exists()

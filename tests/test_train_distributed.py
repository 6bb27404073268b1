"""torchrun with 2 gloo processes on CPU trains exactly like 1 process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neoj.config import from_hf_dict
from neoj.train import TrainArgs, train
from neoj.weights import random_model, save_checkpoint

TINY = {"model_type": "gpt_neo", "vocab_size": 50257, "max_position_embeddings": 64, "hidden_size": 32,
        "num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]], "window_size": 8}
STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    save_checkpoint(random_model(from_hf_dict(TINY), seed=5), root / "model")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"Line {i}: {'ab' * i} and {i * i}."}) + "\n" for i in range(20)))
    ref = root / "ref"
    train(TrainArgs(data=[str(data)], out=str(ref), model=str(root / "model"), seq_len=16, batch_size=4,
                    max_steps=STEPS, lr=1e-2, save_every=2, log_every=1, progress=False, val_fraction=0.1))
    return root, data, ref


def log(out):
    return [json.loads(x) for x in (Path(out) / "train_log.jsonl").read_text().splitlines()]


def torchrun(root, data, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "neoj",
           "finetune", "--model", str(root / "model"), "--data", str(data), "--out", str(out), "--seq-len", "16",
           "--batch-size", "2", "--max-steps", str(STEPS), "--lr", "1e-2", "--save-every", "2", "--log-every", "1",
           "--val-fraction", "0.1", "--threads", "1", "--no-progress", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_same_run(out, ref):
    a, b = log(out), log(ref)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        if "val_loss" in y:
            assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-5)
    wa, wb = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_processes_equal_one(setup, tmp_path, mode):
    root, data, ref = setup
    out = tmp_path / mode
    proc = torchrun(root, data, out, *(["--fsdp"] if mode == "fsdp" else []))
    assert proc.stdout.count("trained 4 steps") == 1  # only rank 0 reports
    assert torch.load(out / "checkpoint.pt", weights_only=False)["args"]["world_size"] == 2
    assert_same_run(out, ref)


def test_validation_with_fewer_blocks_than_processes_times_batch(setup, tmp_path):
    # Validation rounds hand each process `batch` blocks; with fewer blocks than that in all, the second
    # process's share is empty (it once asked for a range starting past the end and crashed).
    root, data, _ = setup
    out = tmp_path / "few-val"
    torchrun(root, data, out, "--batch-size", "8")
    assert any("val_loss" in record for record in log(out))

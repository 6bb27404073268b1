"""The training loop: it learns, it writes a transformers checkpoint, and it never loses work."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import neoj
from neoj.config import from_hf_dict
from neoj.train import TrainArgs, TrainError, train
from neoj.train import checkpoint as ckpt
from neoj.train.loss import linear_cross_entropy
from neoj.weights import random_model, save_checkpoint

TINY = {"model_type": "gpt_neo", "vocab_size": 50257, "max_position_embeddings": 64, "hidden_size": 32,
        "num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]], "window_size": 8}
TINY_J = {"model_type": "gptj", "vocab_size": 50400, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4,
          "rotary_dim": 4, "tie_word_embeddings": False}
FACTS = [f"Fact {i}: the {c} box holds {i * 3} marbles." for i, c in enumerate(["red", "blue", "green", "gold"] * 3)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-neo")
    save_checkpoint(random_model(from_hf_dict(TINY), seed=1), path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "facts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in FACTS))
    return path


def args_for(model, data, out, **kw):
    base = dict(data=[str(data)], out=str(out), model=str(model), seq_len=16, batch_size=2, max_steps=6,
                lr=1e-2, save_every=2, eval_blocks=2, log_every=1, progress=False, val_fraction=0.2)
    return TrainArgs(**{**base, **kw})


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(out) / "train_log.jsonl").read_text().splitlines())}


def test_fused_loss_equals_cross_entropy():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=True)
    h = torch.randn(40, 16, requires_grad=True)
    t = torch.randint(0, 300, (40,))
    w = (torch.rand(40) > 0.3).float() / 7
    got = linear_cross_entropy(h, head, t, w)
    got.backward()
    grads = [h.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    h.grad = None
    head.zero_grad()
    ref = (F.cross_entropy(head(h), t, reduction="none") * w).sum()
    ref.backward()
    torch.testing.assert_close(got, ref)
    for a, b in zip(grads, [h.grad, head.weight.grad, head.bias.grad]):
        torch.testing.assert_close(a, b)


def test_a_few_steps_memorise_a_tiny_dataset(tiny, data, tmp_path):
    result = train(args_for(tiny, data, tmp_path / "o", max_steps=25, save_every=0, val_fraction=0))
    log = losses(tmp_path / "o")
    assert log[25] < log[1] - 3.0, log
    assert result.step == 25 and not result.interrupted


def test_output_is_a_transformers_checkpoint(tiny, data, tmp_path):
    from transformers import AutoTokenizer, GPTNeoForCausalLM

    out = tmp_path / "o"
    result = train(args_for(tiny, data, out, max_steps=2))
    assert result.val_loss is not None and result.val_perplexity == pytest.approx(2.718281828 ** result.val_loss)
    hf = GPTNeoForCausalLM.from_pretrained(out).eval()
    ids = AutoTokenizer.from_pretrained(out)("Fact 2: the green box", return_tensors="pt").input_ids
    lm = neoj.load(out, dtype="float32", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(lm.model.logits(lm.model(ids)), hf(ids).logits, atol=1e-4, rtol=1e-4)
    assert json.loads((out / "train_results.json").read_text())["step"] == 2


def test_sigkill_then_resume_ends_exactly_where_an_uninterrupted_run_does(tiny, data, tmp_path):
    ref = tmp_path / "ref"
    train(args_for(tiny, data, ref, max_steps=7, save_every=3))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "neoj", "finetune", "--model", str(tiny), "--data", str(data), "--out", str(out),
           "--seq-len", "16", "--batch-size", "2", "--max-steps", "7", "--lr", "1e-2", "--save-every", "3",
           "--eval-blocks", "2", "--log-every", "1", "--val-fraction", "0.2", "--threads", "1", "--no-progress"]
    env = {**os.environ, "NEOJ_TEST_KILL_AT_STEP": "5", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert torch.load(out / ckpt.CHECKPOINT, weights_only=False)["step"] == 3
    assert max(losses(out)) == 5  # the killed run got past its last checkpoint
    result = train(args_for(tiny, data, out, max_steps=7, save_every=3, resume=True))
    assert result.step == 7
    assert losses(out) == losses(ref)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_checkpoint_write_leaves_the_previous_one(tiny, data, tmp_path, monkeypatch):
    real = ckpt._serialize
    calls = []

    def flaky(obj, f):
        calls.append(obj["step"])
        if obj["step"] == 4:
            f.write(b"partial bytes")
            raise OSError(28, "No space left on device")
        real(obj, f)

    monkeypatch.setattr(ckpt, "_serialize", flaky)
    events = []
    out = tmp_path / "o"
    train(args_for(tiny, data, out, max_steps=5, save_every=2), on_event=events.append)
    failed = [e for e in events if e["event"] == "checkpoint_failed"]
    assert len(failed) == 1 and "disk full" in failed[0]["error"]
    assert calls == [2, 4, 5]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp file left
    # Had the run died right after the failed write, the step-2 checkpoint would still be whole.
    monkeypatch.setattr(ckpt, "_serialize", real)
    out2 = tmp_path / "o2"

    def fail_at_4(obj, f):
        if obj["step"] == 4:
            raise OSError(5, "Input/output error")
        real(obj, f)

    monkeypatch.setattr(ckpt, "_serialize", fail_at_4)
    train(args_for(tiny, data, out2, max_steps=4, save_every=2))
    assert torch.load(out2 / ckpt.CHECKPOINT, weights_only=False)["step"] == 2


def test_ctrl_c_saves_a_checkpoint_and_stops_cleanly(tiny, data, tmp_path):
    def on_event(event):
        if event["event"] == "step" and event["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "o"
    result = train(args_for(tiny, data, out, max_steps=8, save_every=100), on_event=on_event)
    assert result.interrupted and result.step == 3
    assert torch.load(out / ckpt.CHECKPOINT, weights_only=False)["step"] == 3
    assert not (out / "model.safetensors").exists()
    assert train(args_for(tiny, data, out, max_steps=8, save_every=100, resume=True)).step == 8


def test_resume_refuses_changed_options_and_fresh_runs_refuse_old_checkpoints(tiny, data, tmp_path):
    out = tmp_path / "o"
    train(args_for(tiny, data, out, max_steps=2))
    with pytest.raises(TrainError, match="lr: checkpoint 0.01, now 0.02"):
        train(args_for(tiny, data, out, max_steps=2, lr=2e-2, resume=True))
    with pytest.raises(TrainError, match="--resume"):
        train(args_for(tiny, data, out, max_steps=2))


def test_gradient_checkpointing_gives_the_same_training(tiny, data, tmp_path):
    train(args_for(tiny, data, tmp_path / "a", max_steps=3))
    train(args_for(tiny, data, tmp_path / "b", max_steps=3, grad_checkpointing=True))
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-5)


def test_grad_accumulation_equals_a_bigger_batch(tiny, data, tmp_path):
    train(args_for(tiny, data, tmp_path / "a", max_steps=3, batch_size=4))
    train(args_for(tiny, data, tmp_path / "b", max_steps=3, batch_size=1, grad_accum=4))
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-4)


def test_train_from_scratch_gptj_and_prompt_completion(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_J))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": f" answer {i}"}) + "\n" for i in range(8)))
    out = tmp_path / "o"
    result = train(TrainArgs(data=[str(pairs)], out=str(out), config=str(cfg), seq_len=16, batch_size=2, max_steps=3,
                             lr=1e-3, progress=False, val_fraction=0.25))
    assert result.step == 3 and result.val_loss is not None
    from transformers import GPTJForCausalLM

    hf = GPTJForCausalLM.from_pretrained(out)
    assert hf.config.n_layer == 2
    assert neoj.load(out, dtype="float32", device="cpu").generate("Q1:", max_new_tokens=3, temperature=0) is not None


def test_bf16_autocast_trains_close_to_fp32(tiny, data, tmp_path):
    train(args_for(tiny, data, tmp_path / "a", max_steps=3))
    train(args_for(tiny, data, tmp_path / "b", max_steps=3, autocast="bf16"))
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert a.keys() == b.keys() and a != b
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=2e-2)

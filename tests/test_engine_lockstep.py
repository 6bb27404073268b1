"""Engines in lockstep (neoj.engine.lockstep): rank 0's server engine leads, rank 1's follows, over 2 gloo processes.

Each rank here holds the whole model (marked as split over the two processes, without splitting it), so the test
checks the protocol alone: the follower, seeing only the leader's rounds, must generate exactly the sequences
the leader's clients get — concurrent requests with different options, seeded and unseeded sampling, a client
that disconnects mid-stream, a max_time deadline, an idle gap longer than the heartbeat — and work that runs
outside the rounds (embeddings) is refused with 501. test_server_tp.py runs the real tensor-parallel server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

WORKER = textwrap.dedent('''
    import json, sys, threading, time
    import httpx, torch
    from neoj.api import from_config
    from neoj.config import ModelConfig
    from neoj.distributed import join_processes, leave_processes
    from neoj.engine import Engine
    from neoj.server import run_in_thread
    from neoj.server.app import server_engine

    torch.set_num_threads(1)
    processes = join_processes("cpu")
    cfg = ModelConfig(model_type="gpt_neo", vocab_size=50257, n_positions=256, hidden_size=64, n_layers=2,
                      n_heads=4, intermediate_size=256, attention_layers=("global", "local"), window_size=8)
    lm = from_config(cfg, dtype="float32", device="cpu", seed=3)
    lm.model.tensor_parallel = processes  # every rank has the whole model: the engines' protocol alone is tested
    torch.manual_seed(7)  # unseeded requests draw their seeds on the leader only: the followers are sent them
    out = sys.argv[1]

    def lead():
        results = {}
        with run_in_thread(lm, max_batch=3) as server:
            model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]

            def complete(name, **body):
                r = httpx.post(server.url + "/v1/completions", json={"model": model, **body}, timeout=60)
                choice = r.json()["choices"][0]
                results[name] = [choice["text"], choice["finish_reason"]]

            jobs = [threading.Thread(target=complete, args=(f"r{i}",),
                                     kwargs=dict(prompt=f"Prompt {i} " * (i + 1), max_tokens=10 + i,
                                                 temperature=0.9 if i % 2 else 0, seed=i if i % 3 else None))
                    for i in range(6)]
            for job in jobs:
                job.start()
            with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                              json={"model": model, "prompt": "A stream that is left", "max_tokens": 200,
                                    "stream": True, "ignore_eos": True, "temperature": 0}) as r:
                for n, _ in enumerate(r.iter_lines()):
                    if n == 3:
                        break  # the client leaves: the request is cancelled on every rank
            for job in jobs:
                job.join()
            complete("deadline", prompt="x", max_tokens=200, max_time=0.05, ignore_eos=True, temperature=0)
            results["embeddings"] = httpx.post(server.url + "/v1/embeddings", json={"model": model, "input": "x"},
                                               timeout=60).status_code
            time.sleep(6)  # longer than the heartbeat: the follower keeps waiting for rounds
            complete("after_idle", prompt="after an idle gap", max_tokens=5, temperature=0)
        return results

    def follow():
        finished = []
        finish = Engine._finish

        def record(self, seq, event):
            finish(self, seq, event)
            if seq.finish_reason != "cancelled":
                finished.append([lm.tokenizer.decode(seq.token_ids), seq.completion().finish_reason])
        Engine._finish = record
        server_engine(lm, max_batch=3).follow()
        return finished

    result = lead() if processes.rank == 0 else follow()
    with open(f"{out}.{processes.rank}", "w") as f:
        json.dump(result, f)
    leave_processes()  # as neoj's CLI does: a process exiting with gloo's threads still running can abort
''')


def test_follower_generates_what_the_leader_serves(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "result"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(out)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads((tmp_path / "result.0").read_text())
    followed = json.loads((tmp_path / "result.1").read_text())
    assert served.pop("embeddings") == 501
    assert served["deadline"][1] == "length"  # max_time ends it ("time", which OpenAI calls length)
    assert all(reason in ("length", "stop") for _, reason in served.values())
    # The follower made every sequence the clients got, token for token (the left stream aside).
    assert sorted(served.values()) == sorted(followed)

"""neoj.threads: OpenMP threads sleep at barriers when other work holds a core, unless the user chose otherwise; the
thread count is settable."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from neoj import threads
from neoj.errors import NeojError
from neoj.threads import set_thread_count

PRINT_POLICY = "import os, sys; {first}; print(os.environ.get('OMP_WAIT_POLICY'))"


def _policy_after(first: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", PRINT_POLICY.format(first=first)], env={**clean, **env},
                         capture_output=True, text=True, check=True).stdout
    return out.strip()


def spinning_process() -> subprocess.Popen:
    """Another program holding a core: a plain Python loop."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def test_importing_neoj_first_beside_a_busy_program_makes_openmp_threads_sleep():
    busy = spinning_process()
    try:
        time.sleep(0.3)
        assert _policy_after("import neoj") == "PASSIVE"
    finally:
        busy.kill()
        busy.wait()


def test_busy_cores_counts_another_programs_core():
    busy = spinning_process()
    try:
        time.sleep(0.3)
        assert threads.busy_cores(0.2) >= 0.7
    finally:
        busy.kill()
        busy.wait()


@pytest.mark.parametrize("busy,policy", [(0.0, None), (0.3, None), (1.0, "PASSIVE"), (None, "PASSIVE")])
def test_sleeping_threads_only_when_other_work_holds_about_a_core(monkeypatch, busy, policy):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delitem(sys.modules, "torch")  # as before torch's first import
    monkeypatch.setattr(threads, "busy_cores", lambda: busy)
    threads.prefer_sleeping_openmp_threads()
    assert os.environ.get("OMP_WAIT_POLICY") == policy


def test_a_policy_the_user_set_is_kept():
    assert _policy_after("import neoj", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"


def test_nothing_is_changed_once_torch_has_started_its_runtime():
    assert _policy_after("import torch; import neoj") == "None"


def test_thread_count_is_applied_and_refused_below_one():
    before = torch.get_num_threads()
    try:
        set_thread_count(1)
        assert torch.get_num_threads() == 1
        set_thread_count(None)
        assert torch.get_num_threads() == 1
        with pytest.raises(NeojError, match="--threads must be at least 1, not 0"):
            set_thread_count(0)
    finally:
        torch.set_num_threads(before)

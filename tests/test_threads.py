"""neoj.threads: OpenMP threads sleep at barriers unless the user chose otherwise; the thread count is settable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from neoj.errors import NeojError
from neoj.threads import set_thread_count

PRINT_POLICY = "import os, sys; {first}; print(os.environ.get('OMP_WAIT_POLICY'))"


def _policy_after(first: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", PRINT_POLICY.format(first=first)], env={**clean, **env},
                         capture_output=True, text=True, check=True).stdout
    return out.strip()


def test_importing_neoj_first_makes_openmp_threads_sleep():
    assert _policy_after("import neoj") == "PASSIVE"


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

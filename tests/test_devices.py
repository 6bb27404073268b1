"""neoj.devices: the dtype "auto" picks for each device and CPU, and explicit dtypes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from neoj import devices
from neoj.config import ModelConfig
from neoj.errors import NeojError
from neoj.quantize import QuantSpec

CPU = torch.device("cpu")
CFG = ModelConfig(model_type="gpt_neo", vocab_size=1000, n_positions=64, hidden_size=64, n_layers=2, n_heads=4,
                  intermediate_size=256, attention_layers=("global", "local"), window_size=8)


@pytest.fixture(params=[True, False], ids=["bf16-cpu", "no-bf16-cpu"])
def fast_bf16(request, monkeypatch):
    """Runs the test as on a CPU with bf16 instructions (AVX512-BF16 / AMX) and as on one without."""
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: request.param)
    return request.param


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_models_run_bf16_only_where_the_cpu_multiplies_bf16(fast_bf16, scheme):
    # Without bf16 instructions bf16 attention and elementwise ops are emulated (3-5x slower than fp32).
    got = devices.resolve_dtype("auto", CPU, CFG, QuantSpec(scheme, 32))
    assert got == (torch.bfloat16 if fast_bf16 else torch.float32)


def test_plain_models_run_bf16_where_the_cpu_multiplies_bf16_and_fp32_where_it_fits(fast_bf16):
    assert devices.resolve_dtype(None, CPU, CFG) == (torch.bfloat16 if fast_bf16 else torch.float32)


def test_plain_models_too_big_for_fp32_fall_back_to_bf16(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(devices, "available_memory", lambda device: CFG.num_parameters() * 4)  # < 1 / 0.8 of it
    assert devices.resolve_dtype("auto", CPU, CFG) == torch.bfloat16


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_an_explicit_dtype_is_kept_whatever_the_cpu(fast_bf16, name):
    assert devices.resolve_dtype(name, CPU, CFG, QuantSpec("int8", 32)) == getattr(torch, name)
    assert devices.resolve_dtype(getattr(torch, name), CPU, CFG) == getattr(torch, name)


def test_an_unknown_dtype_names_the_ones_there_are():
    with pytest.raises(NeojError, match="unknown dtype 'fp8'.*float32"):
        devices.resolve_dtype("fp8", CPU, CFG)


def test_pytorch_held_to_avx2_means_no_fast_bf16():
    """ATEN_CPU_CAPABILITY=avx2 (an AVX2-only CPU, or one made to act as one) turns PyTorch's bf16 instructions
    off, so "auto" must not pick bf16 even on a CPU that has them."""
    code = ("import torch, neoj.devices as d; from neoj.quantize import QuantSpec; from test_devices import CFG; "
            "print(d.cpu_has_fast_bf16(), d.resolve_dtype('auto', torch.device('cpu'), CFG, QuantSpec('int8', 32)))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "PYTHONPATH": os.path.dirname(__file__)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "torch.float32"]

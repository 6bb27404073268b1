"""neoj.gpu_kernels' Triton int8 kernel against an fp64 reference: on the GPU where there is one, and in
Triton's interpreter on CPU tensors everywhere else (a subprocess: TRITON_INTERPRET is read when the
kernel is defined)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

CUDA = torch.cuda.is_available()
HAVE_TRITON = importlib.util.find_spec("triton") is not None
# (rows, out, in, bias, dtype): 1-16 rows; widths that are and are not multiples of the blocks.
CASES = [(1, 40, 300, True, "bfloat16"), (1, 24, 2048, False, "float32"), (2, 64, 512, False, "float32"),
         (3, 33, 256, True, "float16"), (8, 48, 1000, True, "bfloat16"), (16, 17, 256, False, "bfloat16"),
         (5, 100, 4096, True, "bfloat16")]
# Triton's interpreter holds bf16 as raw 16-bit integers, so its tl.dot on bf16 tiles is meaningless: there
# the 2-16-row kernel is checked in fp16 and fp32 (same code path), and in bf16 on the GPU.
INTERPRETER_CASES = [c for c in CASES if c[0] == 1 or c[4] != "bfloat16"] + [(4, 40, 700, True, "float16")]
TOL = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 2e-3}  # relative to the largest output: the final rounding

CHECK = textwrap.dedent("""
    import json, sys, torch
    from neoj.gpu_kernels import int8_matmul
    device, cases = sys.argv[1], json.loads(sys.argv[2])
    errors = []
    for i, (rows, out, inn, bias, dtype) in enumerate(cases):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(rows, inn, generator=g).to(getattr(torch, dtype))
        q = torch.randint(-127, 128, (out, inn), dtype=torch.int8, generator=g)
        s = torch.rand(out, generator=g) / 50
        b = torch.randn(out, generator=g).to(x.dtype) if bias else None
        y = int8_matmul(x.to(device), q.to(device), s.to(device), None if b is None else b.to(device)).cpu()
        ref = (x.double() @ q.double().T) * s.double() + (b.double() if bias else 0)
        assert y.dtype == x.dtype and y.shape == ref.shape
        errors.append(((y.double() - ref).abs().max() / ref.abs().max()).item())
    print(json.dumps(errors))
""")


def relative_errors(device: str, env: dict, cases: list) -> list[float]:
    out = subprocess.run([sys.executable, "-c", CHECK, device, json.dumps(cases)], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (it comes with PyTorch's CUDA builds and "
                                            "neoj's [test] extra on Linux x86-64)")
def test_int8_kernel_in_the_triton_interpreter():
    for case, err in zip(INTERPRETER_CASES, relative_errors("cpu", {"TRITON_INTERPRET": "1"}, INTERPRETER_CASES)):
        assert err < TOL[case[4]], (case, err)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run on a GPU machine)")
def test_int8_kernel_on_the_gpu():
    for case, err in zip(CASES, relative_errors("cuda", {"TRITON_INTERPRET": "0"}, CASES)):
        assert err < TOL[case[4]], (case, err)


def test_int8_matmul_rejects_a_mismatched_weight_or_too_many_rows():
    from neoj.gpu_kernels import int8_matmul

    with pytest.raises(ValueError, match="contiguous int8"):
        int8_matmul(torch.zeros(1, 8), torch.zeros(4, 6, dtype=torch.int8), torch.ones(4))
    with pytest.raises(ValueError, match="1-16 rows"):
        int8_matmul(torch.zeros(17, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4))

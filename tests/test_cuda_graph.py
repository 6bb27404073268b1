"""The static-shape decode step (neoj.cuda_graph): the same logits as the eager step, on CPU here and
recorded as a CUDA graph where a GPU is present (tests/test_cuda.py has the rest of the GPU checks)."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, WINDOW, left_pad

from neoj.cuda_graph import DecodeStep, GraphedDecodeStep, graphs_enabled
from neoj.generate import generate_batch
from neoj.kv_cache import KVCache
from neoj.model import positions_from_valid
from neoj.sampling import GenerationParams

CUDA = torch.cuda.is_available()
STEPS = WINDOW * 2 + 3  # past the local window, so local layers mask their oldest keys


@torch.inference_mode()
def step_logits(model, rows: list[list[int]], forced: torch.Tensor, make_step) -> torch.Tensor:
    """Returns (STEPS, B, V) logits of the decode steps after a prefill, teacher-forcing `forced` (B, STEPS)."""
    device = model.wte.weight.device
    ids, valid = left_pad(rows, device)
    positions = positions_from_valid(valid)
    cache = KVCache.for_model(model, len(rows), ids.shape[1] + STEPS)
    model(ids, positions, cache, None if bool(valid.all()) else valid)
    step = make_step(model, cache)
    next_pos = positions[:, -1:] + 1
    out = []
    for s in range(STEPS):
        out.append(step(forced[:, s].to(device), next_pos).float().cpu().clone())
        next_pos = next_pos + 1
    return torch.stack(out)


def rows_for(tokenizer, batch: int) -> list[list[int]]:
    return [tokenizer.encode(p)[: 5 + 7 * i] for i, p in enumerate(PROMPTS[:batch])]


@pytest.mark.parametrize("batch", [1, 3])
def test_static_step_equals_eager_on_cpu(family, tokenizer, batch):
    """Writing at a slot tensor and masking all max_len slots gives the eager step's logits: both families,
    left padding (batch 3), local layers past their window."""
    model = family.model
    rows = rows_for(tokenizer, batch)
    forced = torch.randint(0, 50000, (batch, STEPS), generator=torch.Generator().manual_seed(batch))
    eager = step_logits(model, rows, forced, DecodeStep)
    static = step_logits(model, rows, forced, lambda m, c: GraphedDecodeStep(m, c, capture=False))
    torch.testing.assert_close(static, eager, atol=1e-5, rtol=1e-5)


def test_graphs_only_on_cuda(monkeypatch):
    assert not graphs_enabled(torch.device("cpu"))
    assert graphs_enabled(torch.device("cuda"))
    monkeypatch.setenv("NEOJ_CUDA_GRAPHS", "0")
    assert not graphs_enabled(torch.device("cuda"))


def test_static_step_refuses_past_the_cache(gptj):
    model = gptj.model
    cache = KVCache.for_model(model, 1, 4)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), None, cache)
        step = GraphedDecodeStep(model, cache, capture=False)
        step(torch.tensor([4]), torch.tensor([[3]]))
        with pytest.raises(ValueError, match="KV cache holds 4 tokens"):
            step(torch.tensor([5]), torch.tensor([[4]]))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run on a GPU machine)")
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_graph_replay_equals_cpu_eager(family, tokenizer, batch):
    """The recorded graph, replayed step after step on the GPU, gives the CPU's eager logits (fp32)."""
    rows = rows_for(tokenizer, batch)
    forced = torch.randint(0, 50000, (batch, STEPS), generator=torch.Generator().manual_seed(batch))
    cpu = step_logits(family.model, rows, forced, DecodeStep)
    gpu_model = family.model.to("cuda")
    try:
        graphed = step_logits(gpu_model, rows, forced, GraphedDecodeStep)
    finally:
        family.model.to("cpu")
    torch.testing.assert_close(graphed, cpu, atol=2e-4, rtol=2e-4)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run on a GPU machine)")
def test_cuda_generation_with_and_without_graphs_equals_cpu(family, tokenizer, monkeypatch):
    rows = rows_for(tokenizer, 3)
    params = GenerationParams(max_new_tokens=STEPS, temperature=0, stop_at_eos=False)
    cpu = [c.token_ids for c in generate_batch(family.model, tokenizer, rows, params)]
    family.model.to("cuda")
    try:
        graphed = [c.token_ids for c in generate_batch(family.model, tokenizer, rows, params)]
        monkeypatch.setenv("NEOJ_CUDA_GRAPHS", "0")
        eager = [c.token_ids for c in generate_batch(family.model, tokenizer, rows, params)]
    finally:
        family.model.to("cpu")
    assert graphed == cpu
    assert eager == cpu

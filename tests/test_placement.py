"""Device maps (neoj.placement): the planner's decisions for given memory budgets (pure, no devices needed), map
parsing and its errors, and a split model computing exactly what the unsplit one does: logits, greedy and sampled
generations through the engine, prefix cache hits and speculative decoding, with the KV cache really in pieces.

On a CPU-only machine the split runs as "0-1:cpu,2-3:cpu": two ranges on one device still keep two cache pieces,
so every split code path runs; the CUDA tests at the end run where two GPUs (or one GPU and the CPU) are lent.
"""

import pytest
import torch

import neoj
from neoj.cli import main
from neoj.config import from_hf_dict, preset
from neoj.cuda_graph import DecodeStep, GraphedDecodeStep
from neoj.engine import BatchCache, Engine, PrefixCache, Speculative
from neoj.errors import NeojError
from neoj.kv_cache import KVCache, LayerSplit
from neoj.memory import GIB, RUNTIME_BYTES, MemoryPlanError, kv_cache_bytes, weight_bytes
from neoj.sampling import GenerationParams
from neoj.placement import (DEVICE_RESERVE_BYTES, DeviceMapError, Placement, load_placed, parse_device_map,
                            plan_device_map, plan_placement, plan_with_advice, sizes)

from conftest import PROMPTS, SHORT_PROMPT, WINDOW

pytestmark = pytest.mark.usefixtures("one_thread")

GPU0, GPU1, CPU = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")
GPTJ = preset("gpt-j-6b")
SPLITS = {"neo": "0-1:cpu,2-3:cpu", "gptj": "0-0:cpu,1-1:cpu"}  # the zoo's 4-layer GPT-Neo, 2-layer GPT-J
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
ONE_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def layers_on(placement: Placement, device: torch.device) -> int:
    """Returns how many blocks the placement puts on `device`."""
    return sum(d == device for d in placement.blocks)


def assert_within(placement: Placement, budgets: dict, need) -> None:
    """Asserts each device holds no more than its budget and the blocks run in order, one device after another."""
    for device, free in budgets.items():
        base = need.home if device == placement.home else DEVICE_RESERVE_BYTES
        n = layers_on(placement, device)
        assert n == 0 or base + n * need.layer <= free
    order = [placement.blocks[0]] + [b for a, b in zip(placement.blocks, placement.blocks[1:]) if a != b]
    assert len(order) == len(set(order))


# ---------------------------------------------------------------------------------------------------------
# The planner, for given budgets


def test_gptj_fp16_splits_over_two_12gb_gpus():
    budgets = {GPU0: int(11.5 * GIB), GPU1: int(11.5 * GIB)}
    placement = plan_with_advice(GPTJ, list(budgets.items()), torch.float16)
    assert placement.home == GPU0 and placement.blocks[0] == GPU0 and placement.blocks[-1] == GPU1
    assert len(placement.blocks) == 28 and placement.split
    assert_within(placement, budgets, sizes(GPTJ, torch.float16))
    # Greedy: the first GPU is filled as far as it goes.
    need = sizes(GPTJ, torch.float16)
    assert layers_on(placement, GPU0) == (budgets[GPU0] - need.home) // need.layer
    assert placement.describe() == f"0-{layers_on(placement, GPU0) - 1}:cuda:0,{layers_on(placement, GPU0)}-27:cuda:1"


def test_gpu_plus_cpu_memory():
    budgets = {GPU0: 8 * GIB, CPU: 32 * GIB}
    placement = plan_with_advice(GPTJ, list(budgets.items()), torch.bfloat16)
    assert placement.home == GPU0 and 0 < layers_on(placement, GPU0) < 28
    assert layers_on(placement, CPU) == 28 - layers_on(placement, GPU0)
    assert_within(placement, budgets, sizes(GPTJ, torch.bfloat16))


def test_a_model_that_fits_the_first_device_is_not_split():
    placement = plan_with_advice(GPTJ, [(GPU0, 24 * GIB), (GPU1, 24 * GIB), (CPU, 64 * GIB)], torch.float16)
    assert set(placement.blocks) == {GPU0} and not placement.split


def test_kv_cache_is_counted_with_its_layers():
    budgets = [(GPU0, 11 * GIB), (GPU1, 12 * GIB)]
    short = plan_with_advice(GPTJ, budgets, torch.float16, context=256)
    long = plan_with_advice(GPTJ, budgets, torch.float16, context=2048, batch=4)
    assert layers_on(long, GPU0) < layers_on(short, GPU0)
    need = sizes(GPTJ, torch.float16, context=2048, batch=4)
    assert need.layer - sizes(GPTJ, torch.float16, context=2048).layer == 3 * kv_cache_bytes(GPTJ, 2048, 1, 2) // 28


def test_sizes_add_up_to_the_memory_plan():
    for cfg in (GPTJ, preset("gpt-neo-125m"), preset("gpt-neo-1.3b")):
        for dtype, quantize, size in ((torch.float32, None, 4), (torch.bfloat16, None, 2), (torch.bfloat16, "int8", 2),
                                      (torch.bfloat16, "int4", 2)):
            need = sizes(cfg, dtype, quantize, 128, 1024, 2)
            total = weight_bytes(cfg, size, quantize) + kv_cache_bytes(cfg, 1024, 2, size) + RUNTIME_BYTES
            assert abs(need.home + cfg.n_layers * need.layer - total) < cfg.n_layers  # KV rounded per layer


def test_nothing_fits_names_the_shortfall_and_the_quantization_that_fits():
    budgets = [(GPU0, 5 * GIB), (GPU1, 5 * GIB)]
    with pytest.raises(MemoryPlanError) as err:
        plan_with_advice(GPTJ, budgets, torch.float16)
    msg = str(err.value)
    assert "\n" not in msg and "GiB short" in msg and "cuda:0 5.0 GiB, cuda:1 5.0 GiB" in msg
    assert "--quantize int8" in msg and "--quantize int4" in msg and "--device-map 0-" in msg


def test_int8_fits_where_fp16_does_not():
    budgets = [(GPU0, 8 * GIB)]
    with pytest.raises(MemoryPlanError, match="--quantize int8"):
        plan_with_advice(GPTJ, budgets, torch.float16)
    placement = plan_with_advice(GPTJ, budgets, torch.bfloat16, "int8")
    assert set(placement.blocks) == {GPU0}


def test_nothing_at_all_fits():
    with pytest.raises(MemoryPlanError, match="No dtype or quantization fits"):
        plan_with_advice(GPTJ, [(CPU, 1 * GIB)], torch.float32)


def test_float32_is_advised_bfloat16_first():
    with pytest.raises(MemoryPlanError) as err:
        plan_with_advice(GPTJ, [(GPU0, 16 * GIB)], torch.float32)
    assert str(err.value).index("--dtype bfloat16") < str(err.value).index("--quantize int8")


def test_home_is_the_first_device_that_holds_the_embeddings_and_head():
    placement = plan_with_advice(GPTJ, [(GPU0, GIB // 2), (GPU1, 20 * GIB)], torch.float16)
    assert placement.home == GPU1 and set(placement.blocks) == {GPU1}


def test_overflow_goes_to_the_last_device_when_not_checking():
    need = sizes(GPTJ, torch.float16)
    placement = plan_placement(GPTJ, [(GPU0, 4 * GIB), (CPU, 2 * GIB)], need, overflow=True)
    assert len(placement.blocks) == 28 and placement.blocks[-1] == CPU and placement.home == GPU0


def test_auto_on_a_cpu_only_machine_places_everything_on_the_cpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA devices: auto fills them first")
    placement = plan_device_map("auto", preset("gpt-neo-125m"), torch.float32)
    assert placement.home == CPU and set(placement.blocks) == {CPU} and not placement.split


def test_auto_refuses_with_advice_when_memory_is_short(monkeypatch):
    monkeypatch.setenv("NEOJ_MEMORY_LIMIT", "200MB")
    with pytest.raises(MemoryPlanError, match="short"):
        plan_device_map("auto", preset("gpt-neo-125m"), torch.float32)
    placement = plan_device_map("auto", preset("gpt-neo-125m"), torch.float32, check=False)
    assert len(placement.blocks) == 12


def test_an_explicit_map_is_checked_against_its_devices(monkeypatch):
    monkeypatch.setenv("NEOJ_MEMORY_LIMIT", "700MB")
    cfg = preset("gpt-neo-125m")
    with pytest.raises(MemoryPlanError) as err:
        plan_device_map("0-5:cpu,6-11:cpu", cfg, torch.float32)
    assert "'0-5:cpu,6-11:cpu' asks cpu" in str(err.value) and "\n" not in str(err.value)
    assert plan_device_map("0-5:cpu,6-11:cpu", cfg, torch.float32, check=False).ranges == (range(0, 6), range(6, 12))


# ---------------------------------------------------------------------------------------------------------
# Parsing


def test_maps_parse_as_strings_and_dicts():
    want = (range(0, 14), range(14, 28))
    for device_map in ("0-13:cuda:0,14-27:cuda:1", " 0 - 13 : cuda:0 , 14-27:cuda:1 ",
                       {"0-13": "cuda:0", "14-27": torch.device("cuda", 1)}):
        placement = parse_device_map(device_map, 28, cuda_devices=2)
        assert placement.ranges == want and placement.home == GPU0
        assert placement.blocks == (GPU0,) * 14 + (GPU1,) * 14
        assert placement.describe() == "0-13:cuda:0,14-27:cuda:1"
    one = parse_device_map({0: "cuda", "1-3": "cpu"}, 4, cuda_devices=1)
    assert one.blocks == (GPU0, CPU, CPU, CPU) and one.describe() == "0:cuda:0,1-3:cpu"
    same = parse_device_map("0-1:cpu,2-3:cpu", 4, cuda_devices=0)
    assert same.split and same.ranges == (range(0, 2), range(2, 4)) and set(same.blocks) == {CPU}


@pytest.mark.parametrize("device_map, cuda, says", [
    ("0-12:cpu,14-27:cpu", 0, "leaves layer 13 unplaced"),
    ("0-13:cpu,13-27:cpu", 0, "places layer 13 twice"),
    ("0-13:cpu", 0, "leaves layers 14-27 unplaced"),
    ("0-28:cpu", 0, "layer 28 is out of range"),
    ("14-27:cpu,0-13:cpu", 0, "leaves layers 0-13 unplaced"),
    ("0-13:gpu,14-27:cpu", 0, "unknown device 'gpu'"),
    ("0-13:tpu:0,14-27:cpu", 0, "unknown device 'tpu:0'"),
    ("0-13:cuda:0,14-27:cpu", 0, "no CUDA device"),
    ("0-13:cuda,14-27:cpu", 0, "no CUDA device"),
    ("0-13:cuda:0,14-27:cuda:2", 2, "only 2 CUDA devices"),
    ("13-0:cpu", 0, "ends before it starts"),
    ("0-27", 0, "is not LAYERS:DEVICE"),
    ("a-b:cpu", 0, "is not a layer range"),
    ("", 0, "names no layers"),
    (28, 0, "neither a string nor a dict"),
])
def test_bad_maps_are_one_line_errors(device_map, cuda, says):
    with pytest.raises(DeviceMapError) as err:
        parse_device_map(device_map, 28, cuda_devices=cuda)
    msg = str(err.value)
    assert says in msg and "\n" not in msg
    assert isinstance(err.value, NeojError)
    if isinstance(device_map, str) and device_map:
        assert repr(device_map) in msg  # the map, as written


def test_a_bad_map_fails_the_load_before_any_weight():
    with pytest.raises(DeviceMapError, match="leaves layer 3 unplaced"):
        neoj.from_config(from_hf_dict(NEO), device_map="0-2:cpu")


# ---------------------------------------------------------------------------------------------------------
# LayerSplit: the indexing the cache's users do, against one plain tensor


def test_layer_split_indexes_like_one_tensor():
    torch.manual_seed(0)
    ref = torch.randn(4, 3, 2, 7, 5)
    split = LayerSplit([ref[:1].clone(), ref[1:].clone()])
    assert split.shape == ref.shape and split.numel() == ref.numel() and split.dtype == ref.dtype
    assert split.sizes == [1, 3] and split.device == CPU
    assert torch.equal(split[2], ref[2]) and torch.equal(split[-1, :, :, :4], ref[-1, :, :, :4])
    assert torch.equal(split[0, ...], ref[0]) and torch.equal(split[:, 1, :, 2:5].whole(), ref[:, 1, :, 2:5])
    value = torch.randn(2, 2, 3, 5)
    split[3, 1:, :, 1:4], ref[3, 1:, :, 1:4] = value[:1], value[:1]
    block = torch.randn(4, 2, 3, 5)
    split[:, 2, :, 4:7], ref[:, 2, :, 4:7] = block, block
    split[:, 0, :, :3] = split[:, 1, :, 2:5].clone()
    ref[:, 0, :, :3] = ref[:, 1, :, 2:5].clone()
    assert torch.equal(split.whole(), ref)
    index = torch.randint(0, 7, (4, 3, 2, 7, 5))
    assert torch.equal(split.gather(3, index).whole(), ref.gather(3, index))
    kv = torch.stack((split[:, 0, :, :4], split[:, 1, :, :4]))  # a prefix cache block: (2, layers, H, n, D)
    assert kv.layer_dim == 1 and kv.shape == (2, 4, 2, 4, 5)
    joined = torch.cat([kv, kv], dim=3)[:, :, :, :6]
    assert torch.equal(joined[1].whole(), torch.cat([ref[:, 1, :, :4]] * 2, dim=2)[:, :, :6])
    with pytest.raises(TypeError, match="LayerSplit"):
        torch.matmul(split, split)
    with pytest.raises(IndexError, match="one layer or all"):
        split[1:3]


# ---------------------------------------------------------------------------------------------------------
# A split model on the CPU computes what the unsplit one does

NEO = {"model_type": "gpt_neo", "vocab_size": 50257, "max_position_embeddings": 128, "hidden_size": 32,
       "num_layers": 4, "num_heads": 4, "attention_types": [[["global", "local"], 2]], "window_size": WINDOW}
REPEATING = ["one two three one two three one two three one two", "a b c d e f a b c d e f a b", SHORT_PROMPT]


@pytest.fixture(scope="module", params=["neo", "gptj"])
def pair(request, zoo):
    """Returns (unsplit, split) loads of a zoo checkpoint, neither with a prefix cache."""
    tiny = zoo[request.param]
    whole = neoj.load(tiny.path, dtype="float32", device="cpu")
    split = neoj.load(tiny.path, dtype="float32", device_map=SPLITS[request.param])
    whole.prefix_cache = split.prefix_cache = None
    return whole, split


def test_the_kv_cache_is_split_in_two_pieces(pair):
    whole, split = pair
    assert split.model.block_devices == [CPU] * split.config.n_layers and whole.model.block_devices is None
    for cache in (KVCache.for_model(split.model, 2, 16), BatchCache(split.model, 4)):
        assert isinstance(cache.k, LayerSplit) and isinstance(cache.v, LayerSplit) and len(cache.k.pieces) == 2
        assert sum(cache.k.sizes) == split.config.n_layers
    assert isinstance(KVCache.for_model(whole.model, 2, 16).k, torch.Tensor)
    assert isinstance(BatchCache(whole.model, 4).k, torch.Tensor)


@torch.inference_mode()
def test_logits_equal_the_unsplit_model_past_the_window(pair, tokenizer):
    whole, split = pair
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    assert ids.shape[1] > 2 * WINDOW
    torch.testing.assert_close(split.model.logits(split.model(ids)), whole.model.logits(whole.model(ids)),
                               rtol=0, atol=1e-6)
    # Token by token through a split cache, as decoding runs.
    cache = KVCache.for_model(split.model, 1, ids.shape[1])
    steps = [split.model.logits(split.model(ids[:, :5], cache=cache))[:, -1]]
    steps += [split.model.logits(split.model(ids[:, t : t + 1], cache=cache))[:, -1] for t in range(5, ids.shape[1])]
    full = whole.model.logits(whole.model(ids))[0, 4:]
    torch.testing.assert_close(torch.cat(steps), full, rtol=0, atol=1e-5)


def test_greedy_generations_through_the_engine_are_identical(pair):
    whole, split = pair
    prompts = PROMPTS + [SHORT_PROMPT, PROMPTS[1][:20]]  # different lengths: rows padded and spliced in
    kw = dict(max_new_tokens=24, temperature=0, stop_at_eos=False)
    assert split.generate(prompts, **kw) == whole.generate(prompts, **kw)
    assert split.generate(SHORT_PROMPT, **kw) == whole.generate(SHORT_PROMPT, **kw)


def drive(lm, jobs, **engine_kw) -> list:
    """Returns each (ids, params) job's token ids from one engine of three rows run on this thread: rows join as
    others leave (spliced into the running cache, moved, compacted), as in tests/test_engine.py."""
    eng = Engine(lm.model, lm.tokenizer, max_batch=3, **engine_kw)
    reqs = [eng.submit([ids], params, lambda e: None) for ids, params in jobs]
    eng.run_until_done()
    return [[s.token_ids for s in r.seqs] for r in reqs]


def test_rows_joining_and_leaving_a_split_batch_are_identical(pair, tokenizer):
    whole, split = pair
    texts = PROMPTS + [SHORT_PROMPT] + REPEATING
    jobs = [(tokenizer.encode(t), GenerationParams(max_new_tokens=5 + 7 * i, temperature=0, stop_at_eos=False))
            for i, t in enumerate(texts)]
    jobs.append((tokenizer.encode(PROMPTS[0]), GenerationParams(max_new_tokens=15, temperature=0.8, seed=2,
                                                                num_return_sequences=2)))
    assert drive(split, jobs) == drive(whole, jobs)
    spec = Speculative.of("prompt_lookup")
    assert drive(split, jobs, speculative=spec) == drive(whole, jobs)


def test_sampled_generations_are_identical(pair):
    whole, split = pair
    kw = dict(max_new_tokens=16, temperature=0.9, top_k=50, seed=7, num_return_sequences=2)
    assert split.generate(PROMPTS[:2], **kw) == whole.generate(PROMPTS[:2], **kw)


def test_prefix_cache_hits_stay_exact(pair, tokenizer):
    whole, split = pair
    split.prefix_cache = PrefixCache(1 << 20, block_size=4)
    try:
        kw = dict(max_new_tokens=12, temperature=0, stop_at_eos=False)
        first = PROMPTS[0]
        second = first[:40] + " and then something else entirely"
        assert split.generate(first, **kw) == whole.generate(first, **kw)
        got = split.complete([second, first], **kw)
        assert [c.text for c in got] == whole.generate([second, first], **kw)
        assert all(c.cached_tokens > 0 for c in got)
        block = next(iter(split.prefix_cache._blocks.values())).kv
        assert isinstance(block, LayerSplit) and len(block.pieces) == 2  # stored with their layers
    finally:
        split.prefix_cache = None


def test_prompt_lookup_speculation_is_identical(pair):
    whole, split = pair
    kw = dict(max_new_tokens=24, temperature=0, stop_at_eos=False)
    got = split.complete(REPEATING, speculative="prompt_lookup", **kw)
    assert [c.text for c in got] == whole.generate(REPEATING, **kw)
    assert sum(c.drafted_tokens for c in got) > 0


def test_a_split_cache_is_never_graphed(pair, monkeypatch):
    whole, split = pair
    monkeypatch.setattr("neoj.cuda_graph.graphs_enabled", lambda device: True)
    assert type(DecodeStep.for_cache(split.model, KVCache.for_model(split.model, 1, 8))) is DecodeStep
    assert type(DecodeStep.for_cache(whole.model, KVCache.for_model(whole.model, 1, 8))) is GraphedDecodeStep


@torch.inference_mode()
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_random_weights_placed_equal_unplaced(quantize):
    cfg = from_hf_dict(NEO)
    whole = neoj.from_config(cfg, dtype="float32", device="cpu", seed=3, quantize=quantize)
    split = neoj.from_config(cfg, dtype="float32", seed=3, quantize=quantize, device_map={"0-2": "cpu", 3: "cpu"})
    assert split.model.block_ranges == (range(0, 3), range(3, 4))
    ids = torch.arange(100, 130)[None]
    torch.testing.assert_close(split.model.logits(split.model(ids)), whole.model.logits(whole.model(ids)),
                               rtol=0, atol=1e-6)


def test_load_placed_fills_each_block_on_its_device():
    cfg = from_hf_dict(NEO)
    placement = parse_device_map("0-1:cpu,2-3:cpu", 4)
    model = load_placed(None, cfg, torch.bfloat16, placement, seed=1)
    assert all(p.device == CPU and p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.block_devices == [CPU] * 4 and model.lm_head.weight is model.wte.weight


def test_cli_generate_accepts_a_device_map(zoo, capsys):
    path = str(zoo["neo"].path)
    args = ["generate", "--model", path, "--dtype", "float32", "--device", "cpu", "--temperature", "0", "-n", "5",
            PROMPTS[0]]
    assert main(args) == 0
    plain = capsys.readouterr().out
    placed = [a for a in args if a not in ("--device", "cpu")]  # a device map says where everything goes
    assert main(placed[:1] + ["--device-map", "0-1:cpu,2-3:cpu"] + placed[1:]) == 0
    assert capsys.readouterr().out == plain


def test_a_device_and_a_device_map_together_are_refused(zoo, capsys):
    path = str(zoo["neo"].path)
    assert main(["generate", "--model", path, "--device", "cpu", "--device-map", "auto", "-n", "2", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give only --device-map" in err


def test_cli_bad_map_is_one_line(zoo, capsys):
    path = str(zoo["neo"].path)
    assert main(["generate", "--model", path, "--device-map", "0-1:cpu,3-3:cpu", "-n", "2", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("neoj: error: device map '0-1:cpu,3-3:cpu' leaves layer 2")


# ---------------------------------------------------------------------------------------------------------
# On CUDA devices, where lent


def _compare_on(tiny, device_map: str, ref_device: str, pieces: list) -> None:
    """Asserts a zoo model placed by `device_map` matches it unplaced on `ref_device`: logits, greedy and speculative
    generations, prefix hits; and that its caches are split into `pieces` devices."""
    whole = neoj.load(tiny.path, dtype="float32", device=ref_device)
    split = neoj.load(tiny.path, dtype="float32", device_map=device_map)
    whole.prefix_cache, split.prefix_cache = None, PrefixCache(1 << 20, block_size=4)
    assert KVCache.for_model(split.model, 1, 8).k.devices == pieces
    assert BatchCache(split.model, 2).k.devices == pieces
    home = split.device
    ids = torch.arange(100, 140, device=home)[None]
    with torch.inference_mode():
        torch.testing.assert_close(split.model.logits(split.model(ids)), whole.model.logits(whole.model(ids)),
                                   rtol=1e-4, atol=1e-4)
    kw = dict(max_new_tokens=16, temperature=0, stop_at_eos=False)
    prompts = PROMPTS + [SHORT_PROMPT]
    assert split.generate(prompts, **kw) == whole.generate(prompts, **kw)
    assert split.generate(prompts, **kw) == whole.generate(prompts, **kw)  # prefix hits now
    assert split.prefix_cache.hit_tokens > 0
    assert split.generate(REPEATING, speculative="prompt_lookup", **kw) == whole.generate(REPEATING, **kw)


@TWO_GPUS
def test_split_over_two_gpus(zoo):
    _compare_on(zoo["neo"], "0-1:cuda:0,2-3:cuda:1", "cuda:0", [GPU0, GPU1])
    _compare_on(zoo["gptj"], "0:cuda:0,1:cuda:1", "cuda:0", [GPU0, GPU1])


@ONE_GPU
def test_split_over_a_gpu_and_the_cpu(zoo):
    _compare_on(zoo["neo"], "0-1:cuda:0,2-3:cpu", "cuda:0", [GPU0, CPU])
    _compare_on(zoo["gptj"], "0:cuda:0,1:cpu", "cuda:0", [GPU0, CPU])


@ONE_GPU
def test_auto_puts_a_small_model_on_the_first_gpu():
    placement = plan_device_map("auto", preset("gpt-neo-125m"), torch.float32)
    assert placement.home == GPU0 and set(placement.blocks) == {GPU0} and not placement.split

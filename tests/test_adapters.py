"""Many LoRA adapters served over one base (neoj.adapters): each row of a mixed batch gives what the merged
model gives alone, logits equal PEFT's, base rows equal the base model exactly, bad adapters are refused."""

from __future__ import annotations

import copy

import pytest
import torch

import neoj
from neoj.adapters import routed, split_adapter_specs
from neoj.cuda_graph import GraphedDecodeStep
from neoj.engine import Engine
from neoj.errors import GenerationError, NeojError
from neoj.sampling import GenerationParams
from neoj.server import create_app

PROMPTS = ["The quick brown fox jumps over", "def add(a, b):", "Hello there", "In the beginning was the word"]
# name -> (rank, alpha, GPT-Neo targets, GPT-J targets, rsLoRA): different ranks, targets and scales.
ADAPTERS = {
    "one": (4, 8, ["q_proj", "v_proj"], ["q_proj", "v_proj"], False),
    "two": (8, 4, ["c_fc", "c_proj", "out_proj"], ["fc_in", "fc_out", "out_proj"], False),
    "three": (2, 6, ["k_proj", "v_proj"], ["k_proj", "v_proj"], True),
}
ROWS = ["one", "two", None, "one", "three"]  # the adapter of row i of the mixed batch (prompt i % 4)


@pytest.fixture(scope="module", params=["neo", "gptj"])
def tiny(request, zoo):
    return zoo[request.param]


@pytest.fixture(scope="module")
def adapter_dirs(tiny, tmp_path_factory):
    """Returns {name: directory} of PEFT adapters made with peft on the transformers model, B random."""
    from peft import LoraConfig, get_peft_model

    out = {}
    for i, (name, (r, alpha, neo_targets, gptj_targets, rslora)) in enumerate(ADAPTERS.items()):
        targets = neo_targets if tiny.name == "neo" else gptj_targets
        peft_model = get_peft_model(copy.deepcopy(tiny.hf), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                                         use_rslora=rslora))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        out[name] = tmp_path_factory.mktemp(f"{tiny.name}-{name}")
        peft_model.save_pretrained(out[name])
    return out


@pytest.fixture(scope="module")
def served(tiny, adapter_dirs):
    """A fresh fp32 load of the tiny model serving every adapter by name."""
    lm = neoj.load(tiny.path, dtype="float32", device="cpu")
    for name, directory in adapter_dirs.items():
        lm.load_adapter(name, directory)
    return lm


def greedy(adapter=None, n=12):
    return GenerationParams(max_new_tokens=n, temperature=0, stop_at_eos=False, adapter=adapter)


def mixed_batch(lm, make_step=None) -> list[list[int]]:
    """Returns the tokens of ROWS submitted together to one engine (one prefill, decoded in one batch)."""
    engine = Engine(lm.model, lm.tokenizer, max_batch=8, **({"make_step": make_step} if make_step else {}))
    requests = [engine.submit([lm.tokenizer.encode(PROMPTS[i % 4])], greedy(name), lambda e: None)
                for i, name in enumerate(ROWS)]
    engine.run_until_done()
    assert engine.stats.steps == 11  # every row decoded in the same steps: one batch
    return [req.seqs[0].completion().token_ids for req in requests]


def merged_model(tiny, adapter_dirs, name) -> neoj.LanguageModel:
    """Returns the tiny model with adapter `name` merged into its weights (neoj merge's way), or the base."""
    return neoj.load(tiny.path, dtype="float32", device="cpu", adapter=adapter_dirs[name] if name else None)


def test_mixed_batch_rows_equal_the_merged_model_alone(tiny, adapter_dirs, served):
    got = mixed_batch(served)
    refs = {}
    for name in set(ROWS):
        lm = merged_model(tiny, adapter_dirs, name)
        refs[name] = [lm.complete(p, max_new_tokens=12, temperature=0, stop_at_eos=False)[0].token_ids for p in PROMPTS]
    assert got == [refs[name][i % 4] for i, name in enumerate(ROWS)]
    assert all(refs[name] != refs[None] for name in ADAPTERS)  # each adapter changes what the model writes
    assert served.generate(PROMPTS[1], max_new_tokens=12, temperature=0, stop_at_eos=False, adapter="two") == \
        served.tokenizer.decode(got[1])


def test_rows_joining_a_running_batch_keep_their_adapter(tiny, adapter_dirs, served):
    """Prompts prefilled apart from the batch (it is running) and spliced in keep their own adapter."""
    engine = Engine(served.model, served.tokenizer, max_batch=8)
    first = engine.submit([served.tokenizer.encode(PROMPTS[0])], greedy("one", n=16), lambda e: None)
    for _ in range(3):
        engine.step()
    joining = ((1, "two"), (2, None), (3, "three"))
    later = [engine.submit([served.tokenizer.encode(PROMPTS[i])], greedy(name), lambda e: None) for i, name in joining]
    engine.run_until_done()
    jobs = [(0, "one", 16, first)] + [(i, name, 12, req) for (i, name), req in zip(joining, later)]
    for i, name, n, req in jobs:
        ref = merged_model(tiny, adapter_dirs, name).complete(PROMPTS[i], max_new_tokens=n, temperature=0,
                                                              stop_at_eos=False)[0]
        assert req.seqs[0].completion().token_ids == ref.token_ids, name


def test_one_adapter_beside_base_rows_equals_the_merged_model(tiny, adapter_dirs, served):
    """One adapter on some rows of a batch (the gather-and-add path; several adapters take the stacked one)."""
    rows = ["one", None, "one", None]
    engine = Engine(served.model, served.tokenizer, max_batch=8)
    requests = [engine.submit([served.tokenizer.encode(PROMPTS[i])], greedy(name), lambda e: None)
                for i, name in enumerate(rows)]
    engine.run_until_done()
    for i, (name, req) in enumerate(zip(rows, requests)):
        ref = merged_model(tiny, adapter_dirs, name).complete(PROMPTS[i], max_new_tokens=12, temperature=0,
                                                              stop_at_eos=False)[0]
        assert req.seqs[0].completion().token_ids == ref.token_ids, (i, name)


def test_fixed_buffer_step_equals_eager(served):
    """The graph-safe path (per-row slots in a fixed buffer, rank-padded stacks) gives the eager path's tokens."""
    static = mixed_batch(served, make_step=lambda m, c: GraphedDecodeStep(m, c, capture=False))
    assert static == mixed_batch(served)


@torch.inference_mode()
def test_logits_equal_peft_and_base_rows_equal_the_base(tiny, adapter_dirs, served):
    from peft import PeftModel

    ids = torch.tensor([served.tokenizer.encode(PROMPTS[0])] * 4)
    names = ["one", None, "two", "three"]
    with routed(served.model, names):
        got = served.model.logits(served.model(ids))
    base = tiny.lm.model.logits(tiny.lm.model(ids[:1]))[0]
    assert torch.equal(got[1], base)  # no adapter: exactly the base model
    for row, name in enumerate(names):
        if name is not None:
            peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny.hf), adapter_dirs[name]).eval()
            expected = peft_model(ids[:1]).logits[0, :, : got.shape[-1]]
            torch.testing.assert_close(got[row], expected, atol=1e-4, rtol=1e-4)
            assert not torch.allclose(got[row], base, atol=1e-2)
    assert torch.equal(served.model.logits(served.model(ids[:1]))[0], base)  # outside `routed`: the base


def test_unknown_adapter_is_refused_at_submit(tiny, served):
    engine = Engine(served.model, served.tokenizer)
    with pytest.raises(GenerationError, match="unknown adapter 'nope': the served adapters are one, two, three"):
        engine.submit([[1, 2]], greedy("nope"), lambda e: None)
    with pytest.raises(GenerationError, match="serves no adapters"):
        tiny.lm.generate("Hi", max_new_tokens=2, adapter="one")


def test_bad_adapters_are_refused_and_leave_the_model_usable(tiny, adapter_dirs, served, zoo, tmp_path):
    before = mixed_batch(served)
    other = zoo["gptj" if tiny.name == "neo" else "neo"]
    from peft import LoraConfig, get_peft_model

    get_peft_model(copy.deepcopy(other.hf), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "x")
    cases = [("four", tmp_path / "x", "does not fit"), ("four", tmp_path / "missing", "no such adapter directory"),
             ("one", adapter_dirs["two"], "already loaded"), (served.name, adapter_dirs["two"], "base model's id"),
             ("a b", adapter_dirs["two"], "without spaces")]
    for name, directory, message in cases:
        with pytest.raises(NeojError, match=message) as err:
            served.load_adapter(name, directory)
        assert "\n" not in str(err.value)
    with pytest.raises(NeojError, match="does not fit"):
        create_app(served, adapters={"four": tmp_path / "x"})
    create_app(served, adapters={"one": adapter_dirs["one"]})  # the same adapter again: kept
    assert served.adapter_names == ["one", "two", "three"]
    assert mixed_batch(served) == before


def test_quantized_base_with_adapters(tiny, adapter_dirs):
    """int8 weights: adapter rows move the logits as PEFT's adapter moves the fp32 model's; base rows stay."""
    from peft import PeftModel

    lm = neoj.load(tiny.path, dtype="float32", device="cpu", quantize="int8")
    ids = torch.tensor([lm.tokenizer.encode(PROMPTS[3])] * 2)
    with torch.inference_mode():
        base = lm.model.logits(lm.model(ids))
        lm.load_adapter("two", adapter_dirs["two"])
        with routed(lm.model, [None, "two"]):
            got = lm.model.logits(lm.model(ids))
        peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny.hf), adapter_dirs["two"]).eval()
        shift = peft_model(ids[:1]).logits[0, :, : got.shape[-1]] - tiny.hf(ids[:1]).logits[0, :, : got.shape[-1]]
    assert torch.equal(got[0], base[0])
    assert torch.nn.functional.cosine_similarity((got[1] - base[1]).flatten(), shift.flatten(), dim=0) > 0.95


def test_adapter_specs_split_merge_from_named(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b=c").mkdir()
    assert split_adapter_specs([f"x={tmp_path / 'a'}", str(tmp_path / "b=c")]) == (str(tmp_path / "b=c"),
                                                                                   {"x": str(tmp_path / "a")})
    with pytest.raises(NeojError, match="only one adapter can be merged"):
        split_adapter_specs([str(tmp_path / "a"), str(tmp_path / "b=c")])
    with pytest.raises(NeojError, match="no such adapter directory"):
        split_adapter_specs([f"x={tmp_path / 'nope'}"])
    with pytest.raises(NeojError, match="already given"):
        split_adapter_specs([f"x={tmp_path / 'a'}", f"x={tmp_path / 'a'}"])


def test_serve_command_merges_dir_and_serves_name_dir(tiny, adapter_dirs, monkeypatch):
    import neoj.server
    from neoj.cli import main

    seen = {}

    def fake_serve(lm, **options):  # what `neoj serve` would serve, without binding a server to it
        create_app(lm, model_id=options["model_id"], adapters=options["adapters"])
        seen.update(lm=lm, adapters=options["adapters"])

    monkeypatch.setattr(neoj.server, "serve", fake_serve)
    argv = ["serve", "--port", "0", "-m", str(tiny.path), "--dtype", "float32", "--device", "cpu",
            "--adapter", f"one={adapter_dirs['one']}", "--adapter", str(adapter_dirs["two"])]
    assert main(argv) == 0
    lm = seen["lm"]
    assert seen["adapters"] == {"one": str(adapter_dirs["one"])} and lm.adapter_names == ["one"]
    merged = merged_model(tiny, adapter_dirs, "two")  # the plain DIR is merged into the served base
    options = dict(max_new_tokens=8, temperature=0, stop_at_eos=False)
    assert lm.generate(PROMPTS[0], **options) == merged.generate(PROMPTS[0], **options)
    assert lm.generate(PROMPTS[0], adapter="one", **options) != lm.generate(PROMPTS[0], **options)

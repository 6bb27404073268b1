"""Structured output: every constrained row's text matches its constraint, whatever the model (a tiny random one
that writes garbage unless constrained, the built-in one), greedy or sampled, mixed in batches with free rows.

Schemas and regular expressions are generated: 100+ of each, decoded together in one batch per model, and
checked with a small validator for the JSON-schema subset generated here (no jsonschema dependency).
"""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch

import neoj
from neoj import constraint_matcher
from neoj.cli import main
from neoj.constraint import Constraint, ConstraintError
from neoj.constraint_matcher import disallowed_tokens
from neoj.engine import Engine
from neoj.sampling import GenerationParams

EOS = 50256
WORD = {"type": "string", "pattern": "^[a-z]{1,5}$"}


@pytest.fixture(scope="module")
def builtin() -> neoj.LanguageModel:
    return neoj.load("builtin", dtype="float32", device="cpu")


# ---- generated constraints and their checks ----

def make_schema(rng: random.Random, depth: int = 0) -> dict:
    """Returns a random object schema: required string/int/bool/enum/array/nested properties, all bounded."""
    props = {}
    for i in range(rng.randint(1, 3 if depth else 4)):
        kind = rng.choice(["string", "int", "bool", "enum", "array"] + (["object"] if depth < 1 else []))
        props[f"{kind[0]}{i}"] = {
            "string": lambda: dict(WORD),
            "int": lambda: {"type": "integer", "minimum": -rng.randint(0, 50), "maximum": rng.randint(0, 999)},
            "bool": lambda: {"type": "boolean"},
            "enum": lambda: {"enum": rng.sample(["red", "green", "blue", "cyan", "x y", "7"], rng.randint(1, 4))},
            "array": lambda: {"type": "array", "items": rng.choice([dict(WORD), {"type": "boolean"}]),
                              "minItems": rng.randint(0, 1), "maxItems": rng.randint(1, 3)},
            "object": lambda: make_schema(rng, depth + 1),
        }[kind]()
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def valid(value, schema: dict) -> bool:
    """Returns whether value is valid under a schema of the subset make_schema generates."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema["type"]
    if kind == "object":
        return (isinstance(value, dict) and set(value) == set(schema["properties"])
                and all(valid(value[k], s) for k, s in schema["properties"].items()))
    if kind == "array":
        return (isinstance(value, list) and schema["minItems"] <= len(value) <= schema["maxItems"]
                and all(valid(v, schema["items"]) for v in value))
    if kind == "string":
        return isinstance(value, str) and re.fullmatch(schema["pattern"].strip("^$"), value) is not None
    if kind == "integer":
        return type(value) is int and schema["minimum"] <= value <= schema["maximum"]
    return type(value) is bool


# Digits as [0-9]: llguidance's \d (Rust's regex) is every Unicode decimal digit, and Python's re knows fewer of them.
REGEX_PIECES = [r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}", r"[0-9]{1,3}(\.[0-9]{1,3}){3}",
                r"(cat|dog|bird)s?", r"[A-Z][a-z]{2,5}", r"0x[0-9a-f]{1,4}", r"[a-z]{1,4}@[a-z]{1,4}\.(com|org)",
                r"(yes|no|maybe)", r"-?[0-9]{1,3}\.[0-9]{2}", r"[A-Z]{2}[0-9]{2} ?[A-Z]{3}",
                r"v[0-9]\.[0-9]{1,2}(-beta)?"]


def make_regexes(n: int) -> list[str]:
    """Returns n regular expressions: each piece alone, then random joins of two or three."""
    rng = random.Random(5)
    out = list(REGEX_PIECES)
    while len(out) < n:
        out.append(rng.choice([" ", "/", ":", ""]).join(rng.sample(REGEX_PIECES, rng.randint(2, 3))))
    return out


def run_rows(lm: neoj.LanguageModel, rows: list[tuple[str, GenerationParams]]):
    """Returns the Completion of each (prompt, params) row, all decoded together in one engine batch."""
    engine = Engine(lm.model, lm.tokenizer, max_batch=len(rows), max_queue=len(rows))
    reqs = [engine.submit([lm.tokenizer.encode(p)], params, lambda event: None) for p, params in rows]
    engine.run_until_done()
    return [r.seqs[0].completion() for r in reqs]


def params(constraint=None, **kw) -> GenerationParams:
    return GenerationParams(**{"max_new_tokens": 80, "temperature": 0, "constraint": constraint, **kw})


SCHEMAS = [make_schema(random.Random(i)) for i in range(110)]
REGEXES = make_regexes(110)


def temperature(i: int) -> float:
    """Returns row i's temperature: greedy and sampled rows alternate."""
    return 0.9 if i % 2 else 0.0


def check_json_rows(lm) -> None:
    rows = [("Data:", params(Constraint("json_schema", s), max_new_tokens=140, temperature=temperature(i), seed=i))
            for i, s in enumerate(SCHEMAS)]
    outs = run_rows(lm, rows)
    for schema, out in zip(SCHEMAS, outs):
        assert out.finish_reason == "stop", (schema, out.text)  # complete: ended by the constraint or EOS
        assert valid(json.loads(out.text), schema), (schema, out.text)


def check_regex_rows(lm) -> None:
    rows = [("Value:", params(Constraint("regex", r), max_new_tokens=60, temperature=temperature(i), seed=i))
            for i, r in enumerate(REGEXES)]
    for regex, out in zip(REGEXES, run_rows(lm, rows)):
        assert out.finish_reason == "stop" and re.fullmatch(regex, out.text), (regex, out.text)


def test_schemas_on_a_random_model_give_valid_json(neo):
    check_json_rows(neo.lm)


def test_schemas_on_the_builtin_model_give_valid_json(builtin):
    check_json_rows(builtin)


def test_regexes_match_on_a_random_model(neo):
    check_regex_rows(neo.lm)


def test_regexes_match_on_the_builtin_model(builtin):
    check_regex_rows(builtin)


def test_the_validator_refuses_what_it_should():
    schema = make_schema(random.Random(3))
    assert not valid({}, schema) and not valid([], {"type": "array", "items": WORD, "minItems": 1, "maxItems": 2})
    assert not valid(True, {"type": "integer", "minimum": 0, "maximum": 3}) and not valid("A", WORD)


# ---- batches mixing constrained and free rows ----

@pytest.mark.parametrize("temperature", [0, 1.0])
def test_free_rows_are_unchanged_by_constrained_neighbours(neo, temperature):
    free = [(p, params(temperature=temperature, seed=10 + i, max_new_tokens=20, stop_at_eos=False))
            for i, p in enumerate(["Hello", "The list type", "x = 1"])]
    constrained = [("Data:", params(Constraint("json_schema", s), temperature=temperature, seed=i))
                   for i, s in enumerate(SCHEMAS[:5])]
    mixed = run_rows(neo.lm, [free[0], constrained[0], free[1], *constrained[1:], free[2]])
    alone = run_rows(neo.lm, free)
    assert [mixed[0].token_ids, mixed[2].token_ids, mixed[-1].token_ids] == [c.token_ids for c in alone]
    assert all(valid(json.loads(c.text), s) for c, s in zip([mixed[1], *mixed[3:-1]], SCHEMAS[:5]))


def test_prefetched_masks_give_the_same_tokens(neo, monkeypatch):
    rows = [("Data:", params(Constraint("json_schema", s), temperature=temperature(i), seed=i))
            for i, s in enumerate(SCHEMAS[:12])]
    monkeypatch.setattr(constraint_matcher, "PREFETCH", True)
    prefetched = run_rows(neo.lm, rows)
    monkeypatch.setattr(constraint_matcher, "PREFETCH", False)
    assert [c.token_ids for c in prefetched] == [c.token_ids for c in run_rows(neo.lm, rows)]


def test_eos_only_where_the_text_is_complete(gptj):
    """With EOS pushed to the top of every distribution, a constrained row takes it as soon as its text is
    complete, never before; a free row ends at once."""
    bias = gptj.model.lm_head.bias
    old = bias[EOS].item()
    unbounded = [r"[0-9]+", r"-?[0-9]+(\.[0-9]+)?", r"[a-z]+( [a-z]+)*"]  # complete early, never done: EOS ends them
    bounded = [r"[0-9]{3}-[0-9]{2}", r"(cat|dog)s?", r"[a-z]{2,4}"]
    rows = [("Hi", params(Constraint("regex", r), temperature=t, seed=1)) for r in unbounded + bounded for t in (0, 1)]
    rows += [("Hi", params(Constraint("json_schema", s), temperature=1.0, seed=2)) for s in SCHEMAS[:6]]
    try:
        with torch.no_grad():
            bias[EOS] = 1e4
        outs = run_rows(gptj.lm, rows + [("Hi", params())])
    finally:
        with torch.no_grad():
            bias[EOS] = old
    for (_, p), out in zip(rows, outs):  # ended by EOS, or by the constraint where nothing else may follow
        c = p.constraint
        assert out.finish_reason == "stop" and EOS not in out.token_ids[:-1], out
        assert re.fullmatch(c.value, out.text) if c.kind == "regex" else valid(json.loads(out.text), c.value)
    assert all(out.token_ids[-1] == EOS for out in outs[: 2 * len(unbounded)])
    assert outs[-1].token_ids == [EOS]


def test_the_padded_vocabulary_stays_masked(zoo):
    """gptj_padded_top's biases favour the rows past the tokenizer (50257..50399): never chosen, constrained or not."""
    lm = zoo["gptj_padded_top"].lm
    outs = run_rows(lm, [("A", params(Constraint("regex", r"[a-z ]{1,30}"), temperature=1.0, seed=3)),
                         ("B", params(Constraint("json"), max_new_tokens=20))])
    assert all(t < 50257 for c in outs for t in c.token_ids)
    assert re.fullmatch(r"[a-z ]{1,30}", outs[0].text)


# ---- choices, grammars, limits, stop strings, the library API ----

@pytest.mark.parametrize("temperature", [0, 1.0])
def test_choice_gives_exactly_one_choice(neo, builtin, temperature):
    sets = [["yes", "no"], ["positive", "negative", "neutral"], ["a", "ab", "abc"], ["New York", "New Delhi", "Oslo"]]
    for lm in (neo.lm, builtin):
        rows = [("Answer:", params(Constraint("choice", s), temperature=temperature, seed=i))
                for i, s in enumerate(sets * 3)]
        for (_, p), out in zip(rows, run_rows(lm, rows)):
            assert out.text in p.constraint.value and out.finish_reason == "stop", (p.constraint.value, out.text)


def test_lark_and_gbnf_grammars(neo):
    lark = 'start: greeting " " NAME\ngreeting: "hello" | "hi"\nNAME: /[A-Z][a-z]{1,6}/\n'
    gbnf = 'root ::= item ("," item){0,2}\nitem ::= [0-9]{1,2} | "x"\n'
    outs = run_rows(neo.lm, [("G:", params(Constraint("lark", lark), temperature=1.0, seed=s)) for s in range(4)] +
                    [("G:", params(Constraint("gbnf", gbnf), temperature=1.0, seed=s)) for s in range(4)])
    assert all(re.fullmatch(r"(hello|hi) [A-Z][a-z]{1,6}", o.text) for o in outs[:4]), outs[:4]
    assert all(re.fullmatch(r"([0-9]{1,2}|x)(,([0-9]{1,2}|x)){0,2}", o.text) for o in outs[4:]), outs[4:]


def test_too_few_tokens_end_with_length(neo):
    out = neo.lm.complete("Data:", constraint=Constraint("json_schema", SCHEMAS[0]), max_new_tokens=3,
                          temperature=0)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3 and out.text.startswith("{")


def test_stop_strings_still_apply(neo):
    out = neo.lm.complete("x", constraint=Constraint("regex", r"ab,cd,ef"), stop=[","], temperature=0)[0]
    assert out.text == "ab" and out.finish_reason == "stop"


def test_generate_and_stream_agree(builtin):
    c = Constraint("json_schema", SCHEMAS[1])
    text = builtin.generate("Data:", constraint=c, max_new_tokens=100, temperature=0)
    assert "".join(builtin.stream("Data:", constraint=c, max_new_tokens=100, temperature=0)) == text
    assert valid(json.loads(text), SCHEMAS[1])
    for seed in range(3):  # any JSON object: unbounded, so a row may also run out of tokens
        out = builtin.complete("Data:", constraint=Constraint("json"), temperature=0.7, seed=seed, max_new_tokens=60)[0]
        assert isinstance(json.loads(out.text), dict) if out.finish_reason == "stop" else out.text.startswith("{")


# ---- refused constraints and API requests ----

@pytest.mark.parametrize("kind, value, words", [
    ("regex", "a(b", "unclosed group"),
    ("regex", "[z-a]", "regular expression"),
    ("json_schema", {"type": "foo"}, "foo"),
    ("json_schema", {"$ref": "#/definitions/missing"}, "missing"),
    ("json_schema", "not a dict", "must be an object"),
    ("lark", "start: nothing_here", "nothing_here"),
    ("gbnf", 'root ::= "a" | undefined-rule', "undefined"),
    ("choice", [], "non-empty"),
    ("choice", "yes", "non-empty list"),
    ("yaml", "a: 1", "one of"),
])
def test_refused_constraints_raise_with_the_problem_named(kind, value, words):
    with pytest.raises(ConstraintError, match=re.escape(words)) as info:
        Constraint(kind, value)
    assert "\n" not in str(info.value)


def test_openai_and_tgi_requests():
    assert Constraint.from_openai_response_format({"type": "text"}) is None
    assert Constraint.from_openai_response_format({"type": "json_object"}) == Constraint("json")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert Constraint.from_openai_response_format(rf) == Constraint("json_schema", schema)
    tgi = Constraint.from_tgi_grammar({"type": "json", "value": json.dumps(schema)})
    assert tgi == Constraint("json_schema", schema)
    assert Constraint.from_tgi_grammar({"type": "json_object", "value": schema}).value == schema
    assert Constraint.from_tgi_grammar({"type": "regex", "value": "[ab]+"}) == Constraint("regex", "[ab]+")
    for bad in ({"type": "xml"}, {"type": "json_schema"}, "json", {}):
        with pytest.raises(ConstraintError):
            Constraint.from_openai_response_format(bad)
    for bad in ({"type": "json", "value": "{not json"}, {"type": "regex", "value": "(("}, {"value": "x"}):
        with pytest.raises(ConstraintError):
            Constraint.from_tgi_grammar(bad)


def test_bitmask_unpacking_matches_numpy():
    words = torch.randint(-2**31, 2**31 - 1, (3, 1572), dtype=torch.int32)
    expected = np.unpackbits(words.numpy().view(np.uint8), bitorder="little").reshape(3, -1).astype(bool)
    assert torch.equal(~disallowed_tokens(words, 50257), torch.from_numpy(expected[:, :50257]))
    assert disallowed_tokens(words, 50400)[:, 50304:].all()


# ---- the command line ----

def test_cli_constraints(tmp_path, capsys):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMAS[2]))
    grammar = tmp_path / "g.gbnf"
    grammar.write_text('root ::= "on" | "off"\n')
    base = ["generate", "-m", "builtin", "Data:", "-t", "0", "-n", "120"]
    for extra, check in [(["--json-schema", str(schema)], lambda t: valid(json.loads(t), SCHEMAS[2])),
                         (["--json"], lambda t: t.startswith("{")),
                         (["--regex", r"[0-9]{3}-[0-9]{4}"], lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t)),
                         (["--choice", "red", "--choice", "blue"], lambda t: t in ("red", "blue")),
                         (["--grammar", str(grammar)], lambda t: t in ("on", "off"))]:
        assert main(base + extra) == 0
        assert check(capsys.readouterr().out[:-1]), extra


def test_cli_bad_constraints_are_one_line_naming_the_input(tmp_path, capsys):
    bad_json, bad_schema, bad_lark = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.lark"
    bad_json.write_text("{oops")
    bad_schema.write_text('{"type": "nonsense"}')
    bad_lark.write_text("start: missing_rule\n")
    cases = [(["--json-schema", str(tmp_path / "none.json")], "none.json: cannot read it"),
             (["--json-schema", str(bad_json)], "a.json: not JSON"), (["--json-schema", str(bad_schema)], "nonsense"),
             (["--grammar", str(bad_lark)], "missing_rule"), (["--regex", "a(b"], "--regex: invalid regular"),
             (["--min-p", "nan"], "--min-p")]
    for extra, words in cases:
        assert main(["generate", "-m", "builtin", "x", *extra]) != 0
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


def test_objects_listing_properties_allow_no_others_unless_the_schema_says_so(builtin):
    from neoj.constraint import closed_objects

    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}},
                                               "c": {"type": "array", "items": {"properties": {"d": {}}}}},
              "$defs": {"e": {"properties": {"f": {}}, "additionalProperties": True}}, "anyOf": [{"properties": {}}]}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False and "additionalProperties" not in schema  # a copy
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["c"]["items"]["additionalProperties"] is False
    assert closed["$defs"]["e"]["additionalProperties"] is True and closed["anyOf"][0]["additionalProperties"] is False
    assert closed_objects({"type": "object"}) == {"type": "object"}  # any object: keys stay free
    ok = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    for seed in range(3):
        text = builtin.generate("JSON:", constraint=Constraint("json_schema", ok), max_new_tokens=30, seed=seed,
                                temperature=1.0)
        assert list(json.loads(text)) == ["ok"], text

"""neoj.tasks in-process: prompts, chunking, classification by likelihood, chat trimming, code stops, map-reduce."""

import json
import math

import pytest
import torch

import neoj
from neoj.config import from_hf_dict
from neoj.errors import ContextLengthError, NeojError
from neoj.tasks import (ChatSession, LocalRunner, Prompts, Runner, TaskError, ask, classify, complete_code,
                        continuation_logprobs, fit_history, split_text, summarize, translate)
from neoj.tasks.chunking import PARAGRAPH, boundary_levels, token_offsets
from neoj.tasks.classify import classification_prompt
from neoj.tasks.code import BraceStop, IndentStop, detect_language, stop_indent

# A 128-token context makes every document "long".
TINY = {"model_type": "gpt_neo", "vocab_size": 50257, "max_position_embeddings": 128, "hidden_size": 32,
        "num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]], "window_size": 8}

DOC = "\n\n".join(
    " ".join(f"Paragraph {p} sentence {s} says that item {p * 10 + s} costs {p + s} euros, café included."
             for s in range(6))
    for p in range(12)) + "\n\n" + "a long run without any punctuation " * 40 + "\n\n東京 ünïcødé 🙂 end."


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return neoj.from_config(from_hf_dict(TINY), dtype="float32", device="cpu")


class Spy(LocalRunner):
    """A LocalRunner that records every prompt and its max_new_tokens."""

    def __init__(self, lm):
        super().__init__(lm)
        self.calls = []

    def generate(self, prompts, params):
        self.calls += [(p, params.max_new_tokens) for p in prompts]
        return super().generate(prompts, params)


class Scripted(Runner):
    """Streams a fixed text in fixed-size pieces, as a model would; records whether it was stopped early."""

    def __init__(self, lm, text, piece=3):
        super().__init__(lm)
        self.text, self.piece, self.closed_early = text, piece, False

    def stream(self, prompt, params):
        sent = 0
        try:
            for i in range(0, len(self.text), self.piece):
                sent = i + self.piece
                yield self.text[i : i + self.piece]
        finally:
            self.closed_early = sent < len(self.text)


# ---- prompts ----

def test_prompts_override_and_validation(tmp_path):
    p = Prompts().replace(summarize="Text: {text}\nSummary:")
    assert p.render("summarize", text="abc") == "Text: abc\nSummary:"
    with pytest.raises(NeojError, match=r"unknown field\(s\) \['txt'\].*\{text\}"):
        Prompts(summarize="{txt}")
    with pytest.raises(NeojError, match="must contain {text}"):
        Prompts(summarize="no field")
    with pytest.raises(NeojError, match="unknown prompt name"):
        Prompts().replace(summarise="{text}")
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"ask": "Question: {question}\nAnswer:", "ask_stop": ["\n\n"],
                                "translation_examples": {"Swedish": ["a", "b", "c"]}}))
    loaded = Prompts.load(path)
    assert loaded.ask.startswith("Question:") and loaded.ask_stop == ("\n\n",)
    assert "Swedish" in loaded.translation_examples and "French" in loaded.translation_examples
    toml = tmp_path / "p.toml"
    toml.write_text('classify_label = " [{label}]"\n')
    assert Prompts.load(toml).classify_label == " [{label}]"
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(NeojError, match="not valid JSON"):
        Prompts.load(bad)
    with pytest.raises(NeojError, match="cannot read prompts file"):
        Prompts.load(tmp_path / "missing.json")


# ---- chunking ----

def test_chunking_covers_every_token_with_overlap(tiny):
    tok = tiny.tokenizer
    ids, starts = token_offsets(tok, DOC)
    for max_tokens, overlap in [(100, 16), (64, 0), (40, 12), (17, 3)]:
        chunks = split_text(DOC, tok, max_tokens, overlap)
        assert len(chunks) > 3
        assert chunks[0].start == 0 and chunks[-1].end == len(ids)
        assert chunks[0].char_start == 0 and chunks[-1].char_end == len(DOC)
        covered = set()
        for a, b in zip(chunks, chunks[1:]):
            assert a.start < b.start <= a.end  # no gap, always progress
            assert a.end - b.start <= overlap  # at most the overlap is shared
            assert b.char_start <= a.char_end
        for c in chunks:
            covered.update(range(c.start, c.end))
            assert 0 < len(tok.encode(c.text)) <= max_tokens  # the text itself fits, re-tokenized
            assert c.text == DOC[c.char_start : c.char_end]
        assert covered == set(range(len(ids)))
        assert "".join(c.text[(prev.char_end - c.char_start) if i else 0 :]
                       for i, (prev, c) in enumerate(zip([chunks[0]] + chunks, chunks))) == DOC
    # Cuts prefer paragraph starts when one is in the back half of the budget.
    levels = boundary_levels(DOC, starts)
    chunks = split_text(DOC, tok, 100, 0)
    assert sum(levels[c.start] == PARAGRAPH for c in chunks[1:]) >= len(chunks) // 2
    assert split_text("short text", tok, 50, 10)[0].text == "short text"
    assert split_text("", tok, 50) == []
    with pytest.raises(TaskError, match="overlap"):
        split_text(DOC, tok, 20, 10)


# ---- classification ----

@torch.inference_mode()
def _hand_logprob(lm, prompt: str, label: str) -> float:
    ctx, cont = lm.tokenizer.encode(prompt), lm.tokenizer.encode(" " + label)
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(lm.model.logits(lm.model(ids))[0].float(), dim=-1)
    return sum(float(logp[len(ctx) + i - 1, t]) for i, t in enumerate(cont))


@pytest.mark.parametrize("name", ["neo", "gptj"])
def test_classify_probabilities_match_hand_computed_loglikelihoods(zoo, name):
    lm = zoo[name].lm
    labels = ["positive", "negative", "very mixed feelings"]  # a multi-token label too
    texts = ["I loved every minute of it.", "Terrible food, slow service, never again!"]
    results = classify(lm, texts, labels, examples=[("Great!", "positive")])
    for text, r in zip(texts, results):
        prompt = classification_prompt(Prompts(), text, tuple(labels), [("Great!", "positive")])
        hand = {x: _hand_logprob(lm, prompt, x) for x in labels}
        for x in labels:
            assert r.logprobs[x] == pytest.approx(hand[x], abs=1e-4)
        z = sum(math.exp(v) for v in hand.values())
        assert sum(r.probabilities.values()) == pytest.approx(1.0, abs=1e-9)
        for x in labels:
            assert r.probabilities[x] == pytest.approx(math.exp(hand[x]) / z, rel=1e-4)
        assert r.label == max(hand, key=hand.get)
    single = classify(lm, texts[1], labels, examples=[("Great!", "positive")])
    assert single.logprobs == pytest.approx(results[1].logprobs, abs=1e-4)
    mean = classify(lm, texts[0], labels, normalize="mean")
    assert sum(mean.probabilities.values()) == pytest.approx(1.0)


def test_classify_errors_and_default_labels(tiny):
    r = classify(tiny, "fine")
    assert set(r.probabilities) == {"positive", "negative"}
    assert set(classify(tiny, "fine", "yes, no ,maybe").probabilities) == {"yes", "no", "maybe"}
    for labels, match in [(["only"], "at least 2 labels"), ("a,,b", "empty"), (["a", "a"], "more than once")]:
        with pytest.raises(TaskError, match=match):
            classify(tiny, "text", labels)
    with pytest.raises(TaskError, match="empty"):
        classify(tiny, "   ")
    with pytest.raises(TaskError, match="not one of the labels"):
        classify(tiny, "x", ["a", "b"], examples=[("y", "c")])


def test_continuation_logprobs_batched_equals_single_and_keeps_context_end(tiny):
    tok = tiny.tokenizer
    pairs = [(tok.encode("word " * n), tok.encode(" cat")) for n in (1, 7, 30, 200)]  # the last exceeds 128
    batched = continuation_logprobs(LocalRunner(tiny), pairs, batch_tokens=10_000)
    single = [continuation_logprobs(LocalRunner(tiny), [p])[0] for p in pairs]
    assert batched == pytest.approx(single, abs=1e-4)
    ctx, cont = pairs[3]
    assert batched[3] == pytest.approx(continuation_logprobs(LocalRunner(tiny), [(ctx[-(128 - len(cont)) :], cont)])[0],
                                       abs=1e-4)


# ---- chat ----

def test_chat_history_never_exceeds_the_window(tiny):
    chat = ChatSession(tiny, system="You are terse.", max_new_tokens=24, temperature=0)
    dropped = []
    for i in range(12):
        reply = chat.send(f"message number {i}: tell me about the number {i * 7} please")
        assert isinstance(reply, str)
        ids, left_out = chat.prompt_ids()
        assert chat.last.prompt_tokens + 24 <= 128
        dropped.append(chat.last.dropped)
    assert len(chat.messages) == 24  # nothing is forgotten, only left out of the prompt
    assert dropped[0] == 0 and dropped[-1] > dropped[3] > 0 and dropped == sorted(dropped)
    # The prompt holds the persona and the newest messages, oldest left out first.
    tok, p = tiny.tokenizer, Prompts()
    msgs = [("user" if i % 2 == 0 else "assistant", f"turn {i} " + "blah " * 5) for i in range(20)]
    ids, start = fit_history(tok, p, "Persona.", msgs, 100)
    text = tok.decode(ids)
    assert len(ids) <= 100 and text.startswith("Persona.\n\n") and text.endswith("Assistant:")
    assert f"turn {start} " in text and f"turn {start - 1} " not in text and "turn 19 " in text
    with pytest.raises(ContextLengthError, match="shorten the message"):
        fit_history(tok, p, "Persona.", [("user", "long " * 200)], 100)
    chat.reset()
    assert chat.messages == [] and chat.prompt_ids()[1] == 0


def test_chat_save_and_load(tiny, tmp_path):
    chat = ChatSession(tiny, system="S", max_new_tokens=4, temperature=0)
    chat.send("hello")
    path = chat.save(tmp_path / "c.json")
    other = ChatSession(tiny, max_new_tokens=4)
    other.load(path)
    assert other.system == "S" and other.messages == chat.messages
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(NeojError, match="not a saved chat"):
        other.load(tmp_path / "bad.json")


# ---- code ----

def test_python_stop_indent():
    code = "class A:\n    def f(self, x):\n        if x:\n            y = 1\n"
    assert stop_indent(code, "function") == 4 and stop_indent(code, "block") == 8
    assert stop_indent("def f():\n", "function") == 0
    assert stop_indent("x = 1\n", "function") is None
    assert stop_indent("for i in r:\n    x = i\n", "function") == 0  # no function: the outermost block
    assert detect_language("int main() {\n", None) == "braces" and detect_language("", "a.py") == "python"


@pytest.mark.parametrize("piece", [1, 3, 7])
def test_code_stops_at_the_end_of_the_function(tiny, piece):
    code = "import os\n\ndef add(a, b):\n"
    generated = '    """Adds."""\n    total = a + b\n\n    return total\n\n\ndef sub(a, b):\n    return a - b\n'
    runner = Scripted(tiny, generated, piece)
    assert complete_code(runner, code) == '    """Adds."""\n    total = a + b\n\n    return total'
    assert runner.closed_early
    # Mid-line cursor: the line is finished first; block scope stops at the if's level.
    code = "def f(x):\n    if x:\n        y = comp"
    out = complete_code(Scripted(tiny, "ute(x)\n        y += 1\n    return y\n"), code, scope="block")
    assert out == "ute(x)\n        y += 1"
    assert complete_code(Scripted(tiny, "ute(x)\n        y += 1\n    return y\n"), code) == \
        "ute(x)\n        y += 1\n    return y"
    # Top level: up to the first blank line.
    assert complete_code(Scripted(tiny, "import sys\nimport re\n\nx = 1\n"), "import os\n") == "import sys\nimport re"


def test_brace_languages_stop_at_the_closing_brace(tiny):
    code = "int add(int a, int b) {\n"
    gen = '    char *s = "}";  // } not this one\n    return a + b;\n}\n\nint sub(int a) {\n'
    assert complete_code(Scripted(tiny, gen), code, language="braces") == \
        '    char *s = "}";  // } not this one\n    return a + b;\n}'
    watcher = BraceStop("function f() {\n  if (x) {\n", "block")
    assert watcher.feed("    y();\n  });\n  z();\n") == "    y();\n  });" and watcher.done
    top = IndentStop("x = 1\n", "function")
    assert top.feed("\n\ny = 2\n\nz") == "\n\ny = 2" and top.done  # leading blank lines, then one block
    top = IndentStop("x = 1\n", "function")
    assert top.feed("y = 2\n") == "y = 2" and not top.done and top.feed("\nz") == "" and top.done


def test_complete_code_real_model_stays_in_the_function(tiny):
    out = complete_code(tiny, "def f(x):\n", max_new_tokens=40)
    for line in out.split("\n"):
        assert not line.strip() or line.startswith((" ", "\t"))  # nothing at the def's level or left of it
    with pytest.raises(TaskError, match="empty"):
        complete_code(tiny, "  \n")


# ---- summarize, ask, translate ----

def test_summarize_map_reduce_prompts_fit_the_window(tiny):
    spy = Spy(tiny)
    s = summarize(spy, DOC, max_new_tokens=16, overlap=8)
    assert len(s.rounds) >= 1 and s.chunks == len(s.rounds[0]) > 5
    for prompt, max_new in spy.calls:
        assert len(prompt) + max_new <= 128
    assert len(spy.calls) == sum(len(r) for r in s.rounds) + 1  # every chunk of every round, then the final one
    # The first round's chunks cover the whole document, in order, with overlap.
    texts = [tiny.tokenizer.decode(p) for p, _ in spy.calls[: s.chunks]]
    assert all(t.endswith("TL;DR:") for t in texts)
    assert "Paragraph 0 sentence 0" in texts[0] and "🙂 end." in texts[-1]
    assert s.text == spy.generate([spy.calls[-1][0]], neoj.GenerationParams(max_new_tokens=16, temperature=0,
                                                                            stop=["\n\n"]))[0].text.strip()
    with pytest.raises(TaskError, match="empty"):
        summarize(tiny, " \n ")
    with pytest.raises(TaskError, match="twice its summary"):
        summarize(tiny, DOC, max_new_tokens=60)


def test_ask_places_the_best_passages_in_the_window(tiny):
    spy = Spy(tiny)
    a = ask(spy, "What does item 57 cost?", DOC, max_new_tokens=8)
    assert a.passages_total > 3 and a.passages
    assert [p.start for p in a.passages] == sorted(p.start for p in a.passages)  # document order
    prompt, max_new = spy.calls[-1]
    assert len(prompt) + max_new <= 128
    text = tiny.tokenizer.decode(prompt)
    assert all(p.text in text for p in a.passages) and text.endswith("Q: What does item 57 cost?\nA:")
    emb = ask(tiny, "What does item 57 cost?", DOC, max_new_tokens=8, rank="embedding")
    assert emb.passages and all(p.score is not None and -1.001 <= p.score <= 1.001 for p in emb.passages)
    short = ask(spy, "Why?", "Because it is.", max_new_tokens=8)
    assert [p.text for p in short.passages] == ["Because it is."] and short.passages_total == 1
    alone = ask(spy, "Why?", max_new_tokens=8)
    assert alone.passages == [] and tiny.tokenizer.decode(spy.calls[-1][0]) == "Q: Why?\nA:"
    with pytest.raises(TaskError, match="question is empty"):
        ask(tiny, " ")


def test_translate_few_shot_line_by_line(tiny):
    spy = Spy(tiny)
    out = translate(spy, "Good morning.\n\nSee you tomorrow.", to="fr", max_new_tokens=6)
    assert out.count("\n") == 2 and out.split("\n")[1] == ""  # the blank line is kept
    prompt = tiny.tokenizer.decode(spy.calls[0][0])
    assert prompt.startswith("Translate English to French.\n\nEnglish: Where is the train station?\nFrench: Où est")
    assert prompt.endswith("English: Good morning.\nFrench:") and len(spy.calls) == 2
    translate(spy, "Hi", to="Klingon", max_new_tokens=4)  # no examples: zero-shot
    assert tiny.tokenizer.decode(spy.calls[-1][0]) == "Translate English to Klingon.\n\nEnglish: Hi\nKlingon:"
    with pytest.raises(TaskError, match="empty"):
        translate(tiny, "", to="fr")


def test_drain_reads_events_until_every_sequence_finished():
    import queue
    from types import SimpleNamespace

    from neoj.errors import GenerationError
    from neoj.engine.events import Countdown, drain

    def event(text, finish=None, error=None):
        return SimpleNamespace(text=text, finish_reason=finish, error=error)

    events: queue.Queue = queue.Queue()
    for ev in (event("a"), event("b", "eos"), event("c"), event("d", "length"), event("never read")):
        events.put(ev)
    count = Countdown(2)
    assert [ev.text for ev in drain(events, count, lambda: None, 0.01)] == ["a", "b", "c", "d"]
    assert count.left == 0 and events.qsize() == 1
    idle = []

    def stop():
        idle.append(1)
        raise TaskError("cancelled")

    with pytest.raises(TaskError):  # nothing comes: idle() runs, and may stop the wait
        list(drain(queue.Queue(), Countdown(1), stop, 0.01))
    assert idle == [1]
    failed: queue.Queue = queue.Queue()
    failed.put(event("", "error", "boom"))
    with pytest.raises(GenerationError, match="generation failed: boom"):
        list(drain(failed, Countdown(1), lambda: None, 0.01))

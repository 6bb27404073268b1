"""POST /v1/tasks/* on a real server (httpx, loopback): same results as the library, bounded, authenticated."""

import threading
import time

import httpx
import pytest

from neoj.tasks import ask, chat_reply, classify, complete_code, summarize, translate

KEY = "task-key"
LONG = " ".join(f"Sentence {i} tells that box {i} holds {i * 3} red marbles." for i in range(150))


@pytest.fixture(scope="module")
def server(serve_tiny):
    return serve_tiny(model_id="tiny-neo", api_key=KEY)


@pytest.fixture(scope="module")
def lm(server):
    return server.lm


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def test_every_task_matches_the_library(lm, http):
    r = http.post("/v1/tasks/summarize", json={"text": LONG, "max_tokens": 12, "model": "tiny-neo"})
    assert r.status_code == 200, r.text
    ref = summarize(lm, LONG, max_new_tokens=12)
    assert r.json()["summary"] == ref.text and r.json()["chunks"] == ref.chunks > 1
    assert r.json()["rounds"] == ref.rounds

    r = http.post("/v1/tasks/ask", json={"question": "How many marbles are in box 42?", "context": LONG,
                                         "max_tokens": 8})
    ref = ask(lm, "How many marbles are in box 42?", LONG, max_new_tokens=8)
    assert r.status_code == 200 and r.json()["answer"] == ref.text
    assert [p["start"] for p in r.json()["passages"]] == [p.start for p in ref.passages]

    r = http.post("/v1/tasks/translate", json={"text": "Good morning.\nGood night.", "to": "de", "from": "en",
                                               "max_tokens": 6})
    assert r.json()["translation"] == translate(lm, "Good morning.\nGood night.", to="de", max_new_tokens=6)

    r = http.post("/v1/tasks/classify", json={"text": ["lovely", "awful"], "labels": ["good", "bad", "so-so"]})
    refs = classify(lm, ["lovely", "awful"], ["good", "bad", "so-so"])
    for got, want in zip(r.json()["results"], refs):
        assert got["label"] == want.label and sum(got["probabilities"].values()) == pytest.approx(1.0)
        assert got["logprobs"] == pytest.approx(want.logprobs, abs=1e-4)

    code = "def area(w, h):\n"
    r = http.post("/v1/tasks/complete-code", json={"code": code, "max_tokens": 24})
    assert r.json()["completion"] == complete_code(lm, code, max_new_tokens=24)

    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "how are you?"}]
    r = http.post("/v1/tasks/chat", json={"messages": msgs, "system": "Be brief.", "max_tokens": 10,
                                          "temperature": 0})
    ref = chat_reply(lm, [(m["role"], m["content"]) for m in msgs], "Be brief.", max_new_tokens=10, temperature=0)
    assert r.json()["reply"] == ref.text and r.json()["dropped_messages"] == 0


def test_chat_history_is_trimmed_to_the_window(http):
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " + "words " * 8}
            for i in range(21)]
    r = http.post("/v1/tasks/chat", json={"messages": msgs, "max_tokens": 32, "temperature": 0})
    body = r.json()
    assert r.status_code == 200 and body["dropped_messages"] > 0
    assert body["prompt_tokens"] + 32 <= 128


def test_prompt_overrides_per_request(lm, http):
    prompts = {"classify": "Review: {text}\nVerdict:", "classify_label": " {label}!"}
    r = http.post("/v1/tasks/classify", json={"text": "great", "prompts": prompts})
    ref = classify(lm, "great", prompts=prompts)
    assert r.json()["results"][0]["logprobs"] == pytest.approx(ref.logprobs, abs=1e-4)
    r = http.post("/v1/tasks/classify", json={"text": "great", "prompts": {"classify": "{nope}"}})
    assert r.status_code == 422 and "unknown field" in r.json()["error"]["message"]


def test_errors_and_bounds(server, http):
    assert httpx.post(server.url + "/v1/tasks/classify", json={"text": "x"}).status_code == 401
    cases = [
        ("classify", {"text": "x", "labels": ["only"]}, 422, "at least 2"),
        ("classify", {"text": "x", "labels": ["a", "a"]}, 422, "more than once"),
        ("summarize", {"text": " \n "}, 422, "empty"),
        ("summarize", {"text": "x" * 200_001}, 422, "at most 200000"),
        ("summarize", {"text": LONG, "max_tokens": 60}, 422, "twice its summary"),
        ("ask", {"question": "why " * 100, "max_tokens": 100}, 400, "context is 128"),
        ("ask", {"question": "why", "max_tokens": 5000}, 422, "less than or equal to 2048"),
        ("translate", {"text": "hi"}, 422, "to"),
        ("chat", {"messages": [{"role": "assistant", "content": "hi"}]}, 422, "the user's"),
        ("complete-code", {"code": "x", "model": "other"}, 404, "not served"),
        ("complete-code", {"code": "x", "scope": "file"}, 422, "scope"),
    ]
    for path, body, status, words in cases:
        r = http.post(f"/v1/tasks/{path}", json=body)
        assert r.status_code == status, (path, body, r.text)
        assert words in r.json()["error"]["message"], r.text


def test_a_long_task_does_not_block_the_server(http):
    done = threading.Event()

    def long_task():
        http.post("/v1/tasks/summarize", json={"text": LONG * 3, "max_tokens": 24})
        done.set()

    worker = threading.Thread(target=long_task)
    worker.start()
    time.sleep(0.3)
    t0 = time.perf_counter()
    health = http.get("/health")
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "temperature": 0})
    elapsed = time.perf_counter() - t0
    still_running = not done.is_set()
    worker.join()
    assert health.status_code == 200 and r.status_code == 200
    if still_running:  # the other requests were served while the task ran
        assert elapsed < 5

"""The OpenAI API: /v1/completions, /v1/chat/completions, /v1/models and /v1/embeddings."""

from __future__ import annotations

import base64
import struct
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..constraint import Constraint
from ..engine import OPENAI_FINISH_REASONS, Sequence
from ..errors import GenerationError
from ..sampling import GenerationParams
from .chat import get_template
from ..engine.events import failure
from .bodies import parse, read_json
from .common import (APIError, ClientGone, EventStream, Generation, ServerState, best_first, check_context,
                     encode_prompts, room_for, speculation, sse)
from .embeddings import check_count, check_dimensions, check_lengths, embed
from .openapi import GENERATION_ERRORS, describe
from .schemas import ChatRequest, CompletionRequest, EmbeddingRequest

router = APIRouter()
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 512  # shrunk to what the prompt leaves of the context

def _state(request: Request) -> ServerState:
    return request.app.state.neoj


def _unsupported(body, **names) -> None:
    for name, why in names.items():
        value = getattr(body, name)
        if value:
            raise APIError(422, f"{name} is not supported: {why}", param=name)


def _params(body, adapter: str | None, max_new: int, n: int, logprobs: int | None,
            stops: list[str]) -> GenerationParams:
    return GenerationParams(
        max_new_tokens=max_new, temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
        min_p=body.min_p or 0.0, typical_p=1.0 if body.typical_p is None else body.typical_p,
        repetition_penalty=body.repetition_penalty or 1.0, presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0, stop=stops, stop_at_eos=not body.ignore_eos,
        seed=body.seed, num_return_sequences=n, logprobs=logprobs, truncate=bool(body.truncate),
        logit_bias=body.logit_bias, constraint=_response_format(body.response_format),
        adapter=adapter, speculative=body.speculative is not False)


def _response_format(value: dict | None) -> Constraint | None:
    """Returns the constraint OpenAI's response_format asks for (None for plain text), or a 400 naming why not."""
    if not value:
        return None
    try:
        return Constraint.from_openai_response_format(value)
    except GenerationError as exc:
        raise APIError(400, f"response_format: {exc}", param="response_format") from None


def _stops(stop) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _usage(seqs: list[Sequence]) -> dict:
    """Returns OpenAI's usage: token counts, prompt_tokens_details.cached_tokens (prompt tokens reused from the
    prefix cache, counted once per prompt as prompt_tokens are), and the neoj extension "speculative"
    (drafted_tokens, accepted_tokens, acceptance_rate over every sequence) when speculation drafted anything."""
    firsts = [s for s in seqs if s.index % s.params.num_return_sequences == 0]
    prompt = sum(len(s.prompt_ids) for s in firsts)
    completion = sum(len(s.token_ids) for s in seqs)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
             "prompt_tokens_details": {"cached_tokens": sum(s.cached_tokens for s in firsts)}}
    spec = speculation(seqs)
    if spec["drafted_tokens"]:
        usage["speculative"] = spec
    return usage


@router.get("/v1/models", **describe("/v1/models"))
async def list_models(request: Request):
    """Returns the served model (OpenAI's model list)."""
    st = _state(request)
    return {"object": "list", "data": [_model_card(st)] + [_adapter_card(st, name) for name in st.adapter_names]}


@router.get("/v1/models/{model_id:path}", **describe("/v1/models", errors=(401, 404)))
async def get_model(model_id: str, request: Request):
    """Returns the served model if model_id names it, else 404."""
    st = _state(request)
    adapter = st.check_model(model_id)
    return _model_card(st) if adapter is None else _adapter_card(st, adapter)


def _model_card(st: ServerState) -> dict:
    return {"id": st.model_id, "object": "model", "created": st.created, "owned_by": "neoj",
            "max_model_len": st.n_positions, "aliases": list(st.aliases)}


def _adapter_card(st: ServerState, name: str) -> dict:
    """A served LoRA adapter, as vLLM lists one: its own id, with the base model as its parent."""
    return {"id": name, "object": "model", "created": st.created, "owned_by": "neoj", "root": name,
            "parent": st.model_id, "max_model_len": st.n_positions}


# ---- /v1/completions ----

class _CompletionLogprobs:
    """Builds OpenAI's legacy logprobs object (tokens, token_logprobs, top_logprobs, text_offset)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.offset = 0

    def build(self, entries) -> dict:
        """Returns the object for (token id, logprob, top dict or None) entries, continuing text offsets."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, lp, top in entries:
            text = self.tok.token_text(tid)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if top is None else {self.tok.token_text(t): v for t, v in top.items()})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


def _prompt_entries(seq: Sequence):
    lps = seq.prompt_logprobs or [(None, None)] * len(seq.prompt_ids)
    return [(t, lp, top) for t, (lp, top) in zip(seq.prompt_ids, lps)]


def _token_entries(seq: Sequence, start: int = 0, end: int | None = None):
    ids = seq.token_ids[start:end]
    tops = seq.top_logprobs[start:end] if seq.top_logprobs is not None else [None] * len(ids)
    return list(zip(ids, seq.logprobs[start:end], tops))


def _echo_text(st: ServerState, seq: Sequence, texts: list[str | None], prompts: list[list[int]]) -> str:
    original = texts[seq.prompt_index]
    if original is not None and len(seq.prompt_ids) == len(prompts[seq.prompt_index]):
        return original
    return st.lm.tokenizer.decode(seq.prompt_ids)


@router.post("/v1/completions", **describe("/v1/completions", body=CompletionRequest,
                                                errors=(*GENERATION_ERRORS, 404), stream=True))
async def completions(request: Request):
    """Returns a text completion per prompt and n, or streams them as server-sent events."""
    st = _state(request)
    body = parse(CompletionRequest, await read_json(request))
    adapter = st.check_model(body.model)
    _unsupported(body, suffix="GPT-Neo and GPT-J cannot insert text")
    n = body.n or 1
    best_of = _best_of(body, n)
    prompts, texts = encode_prompts(st, body.prompt)
    max_new = body.max_tokens if body.max_tokens is not None else room_for(st, prompts, COMPLETION_DEFAULT_MAX_TOKENS)
    check_context(st, prompts, max_new, bool(body.truncate), "max_tokens")
    ranked = body.logprobs if body.logprobs is not None or best_of == n else 0  # best_of ranks by logprobs
    params = _params(body, adapter, max_new, best_of, ranked, _stops(body.stop))
    echo_lp = body.logprobs if body.echo and body.logprobs is not None else None
    gen = Generation(st, prompts, params, max_time=body.max_time, prompt_logprobs=echo_lp, route="/v1/completions",
                     priority=body.priority or 0)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return EventStream(_stream_completions(st, gen, body, cid, created, texts, prompts), gen)
    try:
        seqs = await gen.wait(request)
    except ClientGone:
        return Response(status_code=499)
    choices = []
    for index, seq in _best(seqs, n, best_of):
        text, logprobs = seq.text, None
        builder = _CompletionLogprobs(st.lm.tokenizer)
        if body.echo:
            text = _echo_text(st, seq, texts, prompts) + text
        if body.logprobs is not None:
            entries = (_prompt_entries(seq) if body.echo else []) + _token_entries(seq)
            logprobs = builder.build(entries)
        choices.append({"text": text, "index": index, "logprobs": logprobs,
                        "finish_reason": OPENAI_FINISH_REASONS[seq.finish_reason]})
    return {"id": cid, "object": "text_completion", "created": created, "model": st.model_id,
            "choices": choices, "usage": _usage(seqs)}


async def _stream_completions(st, gen: Generation, body: CompletionRequest, cid, created, texts, prompts):
    def chunk(index, text, logprobs=None, finish=None):
        return sse({"id": cid, "object": "text_completion", "created": created, "model": st.model_id,
                    "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}]})

    builders = {s.index: _CompletionLogprobs(st.lm.tokenizer) for s in gen.seqs}
    echoed: set[int] = set()
    want_lp = body.logprobs is not None
    async for ev in gen.events():
        seq = ev.seq
        if failure(ev) is not None:
            yield sse({"error": {"message": failure(ev), "type": "server_error"}})
            continue
        if body.echo and seq.index not in echoed:
            echoed.add(seq.index)
            lp = builders[seq.index].build(_prompt_entries(seq)) if want_lp else None
            yield chunk(seq.index, _echo_text(st, seq, texts, prompts), lp)
        lp = None
        if want_lp and ev.token_id is not None:
            lp = builders[seq.index].build([(ev.token_id, ev.logprob, ev.top_logprobs)])
        finish = OPENAI_FINISH_REASONS.get(ev.finish_reason) if ev.finish_reason else None
        if ev.text or lp or finish:
            yield chunk(seq.index, ev.text, lp, finish)
    if body.stream_options and body.stream_options.include_usage:
        yield sse({"id": cid, "object": "text_completion", "created": created, "model": st.model_id,
                   "choices": [], "usage": _usage(gen.seqs)})
    yield sse("[DONE]")


def _best_of(body: CompletionRequest, n: int) -> int:
    """Returns how many completions to generate per prompt: best_of (at least n), checked as OpenAI does."""
    best_of = body.best_of or n
    if best_of < n:
        raise APIError(422, f"best_of={best_of} must be at least n={n}", param="best_of")
    if best_of > n and body.stream:
        raise APIError(422, "best_of cannot be used with stream: the best completions are known only at the end",
                       param="best_of")
    return best_of


def _best(seqs: list[Sequence], n: int, best_of: int) -> list[tuple[int, Sequence]]:
    """Returns (choice index, sequence): per prompt, the n of best_of sequences with the highest mean token
    log-probability (OpenAI's "best"), in that order; every sequence when best_of == n."""
    if best_of == n:
        return [(s.index, s) for s in seqs]
    return [(prompt * n + j, s) for prompt, ranked in enumerate(best_first(seqs, best_of))
            for j, s in enumerate(ranked[:n])]


# ---- /v1/chat/completions ----

def _chat_logprob(tok, tid: int, lp: float, top: dict | None) -> dict:
    text = tok.token_text(tid)
    entry = {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
    entry["top_logprobs"] = [{"token": (t := tok.token_text(i)), "logprob": v, "bytes": list(t.encode("utf-8"))}
                             for i, v in (top or {}).items()]
    return entry


class _LeadingSpace:
    """Drops the whitespace a reply starts with ("Assistant: Hi" generates " Hi")."""

    def __init__(self):
        self.started = False

    def __call__(self, text: str) -> str:
        if self.started:
            return text
        text = text.lstrip()
        self.started = bool(text)
        return text


@router.post("/v1/chat/completions", **describe("/v1/chat/completions", body=ChatRequest,
                                                     errors=(*GENERATION_ERRORS, 404), stream=True))
async def chat_completions(request: Request):
    """Returns the assistant's reply to the messages (rendered by the chat template), or streams it."""
    st = _state(request)
    body = parse(ChatRequest, await read_json(request))
    adapter = st.check_model(body.model)
    _unsupported(body, tools="base models have no tool calling")
    try:
        template = get_template(body.chat_template) if body.chat_template else st.chat_template
    except ValueError as exc:
        raise APIError(422, str(exc), param="chat_template") from None
    prompt = template.render([(m.role, m.text()) for m in body.messages])
    prompts = [st.lm.tokenizer.encode(prompt)]
    n = body.n or 1
    asked = body.max_completion_tokens or body.max_tokens
    max_new = asked if asked is not None else room_for(st, prompts, CHAT_DEFAULT_MAX_TOKENS)
    check_context(st, prompts, max_new, bool(body.truncate), "max_tokens")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = _params(body, adapter, max_new, n, logprobs, list(template.stop) + _stops(body.stop))
    gen = Generation(st, prompts, params, max_time=body.max_time, route="/v1/chat/completions",
                     priority=body.priority or 0)
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return EventStream(_stream_chat(st, gen, body, cid, created), gen)
    try:
        seqs = await gen.wait(request)
    except ClientGone:
        return Response(status_code=499)
    tok = st.lm.tokenizer
    choices = []
    for seq in seqs:
        lp = None
        if body.logprobs:
            lp = {"content": [_chat_logprob(tok, *e) for e in _token_entries(seq)]}
        choices.append({"index": seq.index, "message": {"role": "assistant", "content": seq.text.lstrip()},
                        "logprobs": lp, "finish_reason": OPENAI_FINISH_REASONS[seq.finish_reason]})
    return {"id": cid, "object": "chat.completion", "created": created, "model": st.model_id,
            "choices": choices, "usage": _usage(seqs)}


async def _stream_chat(st, gen: Generation, body: ChatRequest, cid, created):
    tok = st.lm.tokenizer

    def chunk(index, delta, logprobs=None, finish=None):
        return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": st.model_id,
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

    for seq in gen.seqs:
        yield chunk(seq.index, {"role": "assistant", "content": ""})
    strip = {s.index: _LeadingSpace() for s in gen.seqs}
    async for ev in gen.events():
        i = ev.seq.index
        if failure(ev) is not None:
            yield sse({"error": {"message": failure(ev), "type": "server_error"}})
            continue
        text = strip[i](ev.text)
        lp = None
        if body.logprobs and ev.token_id is not None:
            lp = {"content": [_chat_logprob(tok, ev.token_id, ev.logprob, ev.top_logprobs)]}
        if text or lp:
            yield chunk(i, {"content": text}, lp)
        if ev.finish_reason:
            yield chunk(i, {}, None, OPENAI_FINISH_REASONS.get(ev.finish_reason, "stop"))
    if body.stream_options and body.stream_options.include_usage:
        yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": st.model_id,
                   "choices": [], "usage": _usage(gen.seqs)})
    yield sse("[DONE]")


# ---- /v1/embeddings ----

@router.post("/v1/embeddings", **describe("/v1/embeddings", body=EmbeddingRequest, errors=(*GENERATION_ERRORS, 404)))
async def embeddings(request: Request):
    """Returns one mean-pooled final hidden state per input (at most MAX_INPUTS inputs, each within the context).

    The inputs are embedded in pieces between decode steps, so running streams keep flowing meanwhile.
    """
    st = _state(request)
    body = parse(EmbeddingRequest, await read_json(request))
    st.check_base_model(body.model, "embeddings")
    check_dimensions(st, body.dimensions)
    check_count(body.input, "input")
    inputs, _ = encode_prompts(st, body.input, "input")
    check_lengths(st, inputs, "input")
    try:
        vectors = await embed(st, request, inputs)
    except ClientGone:
        return Response(status_code=499)
    data = []
    for i, vec in enumerate(vectors):
        emb = vec if body.encoding_format == "float" else \
            base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": emb})
    tokens = sum(len(ids) for ids in inputs)
    return JSONResponse({"object": "list", "data": data, "model": st.model_id,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

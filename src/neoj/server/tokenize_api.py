"""Tokenization routes: vLLM's POST /tokenize and /detokenize, and TGI's POST /tokenize.

Both servers answer /tokenize, in different shapes; the body says which is meant. TGI's client sends
{"inputs": text, "parameters": {...}} and reads [{"id", "text", "start", "stop"}] (character offsets into
the input); vLLM's sends {"prompt": text} or {"messages": [...]} and reads {"count", "max_model_len",
"tokens", "token_strs"}. Chat messages are rendered with the server's chat template, as /v1/chat/completions
renders them. Token ids out of the vocabulary are a 422, never an exception.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from .bodies import parse, read_json
from .common import APIError, ServerState
from .openapi import describe
from .schemas import DetokenizeRequest, TokenizeRequest

router = APIRouter()
PATHS: tuple[str, ...] = ("/tokenize", "/detokenize")


def _state(request: Request) -> ServerState:
    return request.app.state.neoj


@router.post("/tokenize", **describe("/tokenize", body=TokenizeRequest, errors=(400, 401, 404, 413, 422)))
async def tokenize(request: Request):
    """Returns a text's tokens: TGI's list of {"id", "text", "start", "stop"} for {"inputs": text}, vLLM's
    {"count", "max_model_len", "tokens", "token_strs"} for {"prompt": text} or {"messages": [...]}."""
    st = _state(request)
    body = parse(TokenizeRequest, await read_json(request))
    st.check_model(body.model)
    tok = st.lm.tokenizer
    given = [name for name in ("inputs", "prompt", "messages") if getattr(body, name) is not None]
    if len(given) != 1:
        raise APIError(422, 'send exactly one of "prompt" or "messages" (vLLM) or "inputs" (TGI)', param="prompt")
    if body.inputs is not None:
        spans = await asyncio.to_thread(tok.encode_with_offsets, body.inputs)
        return [{"id": tid, "text": body.inputs[start:end], "start": start, "stop": end} for tid, start, end in spans]
    text = body.prompt
    if body.messages is not None:
        messages = [(m.role, m.text()) for m in body.messages]
        text = st.chat_template.render(messages)
    ids = await asyncio.to_thread(tok.encode, text)
    strs = [tok.token_text(t) for t in ids] if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": st.n_positions, "tokens": ids, "token_strs": strs}


@router.post("/detokenize", **describe("/detokenize", body=DetokenizeRequest, errors=(400, 401, 404, 413, 422)))
async def detokenize(request: Request):
    """vLLM's /detokenize: {"tokens": [int, ...]} -> {"prompt": text}."""
    st = _state(request)
    body = parse(DetokenizeRequest, await read_json(request))
    st.check_model(body.model)
    vocab = st.lm.tokenizer.vocab_size
    bad = [t for t in body.tokens if t >= vocab]
    if bad:
        raise APIError(422, f"tokens: id {bad[0]} is not in the vocabulary (0..{vocab - 1})", param="tokens")
    return {"prompt": await asyncio.to_thread(st.lm.tokenizer.decode, body.tokens)}

"""Hugging Face's APIs: the Inference API (POST /models/{id}), text-generation-inference (POST /, /generate,
/generate_stream, GET /info) and feature extraction (the Inference API's pipeline routes, TEI's POST /embed),
as huggingface_hub's InferenceClient and curl call them.

Generation differs only in defaults. /models/{id} follows the Inference API: sampling on (temperature 1),
50 new tokens, the prompt returned with the text. /, /generate and /generate_stream follow TGI: greedy
unless do_sample or a sampling parameter is given, 100 new tokens, only the new text returned.

POST / is TGI's compat_generate, as on an Inference Endpoint: InferenceClient(base_url).text_generation
posts {"inputs", "parameters", "stream"} there. InferenceClient(base_url).feature_extraction posts to the
same URL, {"inputs", ...options} without "parameters" or "stream", as text-embeddings-inference's POST /
takes it: such a body gets embeddings, never generated text. Feature extraction answers one mean-pooled
vector per input, [[float, ...], ...] (TEI's /embed shape, which InferenceClient returns as an (N, hidden)
array), equal to LanguageModel.embed.
Errors are {"error": message, "error_type": kind}, which huggingface_hub turns into its own exceptions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .. import __version__
from ..constraint import Constraint
from ..engine import Sequence
from ..errors import GenerationError
from ..sampling import GenerationParams
from ..engine.events import failure
from .bodies import parse, read_json
from .common import (APIError, ClientGone, EventStream, Generation, ServerState, best_first, check_context,
                     encode_prompts, room_for, speculation, sse)
from .embeddings import MAX_INPUTS, check_count, check_dimensions, check_lengths, embed
from .openapi import GENERATION_ERRORS, describe
from .schemas import MAX_N, FeatureExtractionRequest, HFParameters, HFRequest

router = APIRouter()
TGI_FINISH = {"eos": "eos_token", "stop": "stop_sequence", "length": "length", "time": "length",
              "cancelled": "length"}


@dataclass
class Flavor:
    """Defaults of one API."""

    name: str
    do_sample: bool | None  # None: TGI's rule, sample when any sampling parameter is given
    max_new_tokens: int
    return_full_text: bool


INFERENCE_API = Flavor("inference", True, 50, True)
TGI = Flavor("tgi", None, 100, False)


def _state(request: Request) -> ServerState:
    return request.app.state.neoj


@dataclass
class Job:
    """A parsed HF/TGI request, ready for the engine."""

    prompts: list[list[int]]
    texts: list[str]
    params: GenerationParams
    max_time: float | None
    prompt_logprobs: int | None
    full_text: bool
    details: bool
    top_n: int
    best_of: int = 1


def _job(st: ServerState, body: HFRequest, flavor: Flavor, adapter: str | None = None) -> Job:
    options: HFParameters = body.parameters
    if options.adapter_id is not None:
        adapter = st.check_model(options.adapter_id)
    prompts, texts = encode_prompts(st, body.inputs, "inputs")
    if isinstance(options.truncate, int) and not isinstance(options.truncate, bool):
        prompts = [ids[-options.truncate :] for ids in prompts]
    fit = options.truncate is True
    if options.max_new_tokens is not None:
        max_new, param = options.max_new_tokens, "max_new_tokens"
    elif options.max_length is not None:
        longest = max(len(ids) for ids in prompts)
        if options.max_length <= longest:
            raise APIError(422, f"max_length={options.max_length} must exceed the prompt's {longest} tokens (it counts "
                           "the prompt and the new tokens); or use max_new_tokens", param="max_length")
        max_new, param = options.max_length - longest, "max_length"
    else:
        max_new, param = room_for(st, prompts, flavor.max_new_tokens), "max_new_tokens"
    check_context(st, prompts, max_new, fit, param, truncate_hint='"truncate" to a token count')
    sampling_given = any(v is not None for v in (options.temperature, options.top_k, options.top_p,
                                                 options.typical_p)) and not (
        options.temperature in (None, 1.0) and not options.top_k and options.top_p in (None, 1.0)
        and options.typical_p in (None, 1.0))
    do_sample = options.do_sample if options.do_sample is not None else (
        flavor.do_sample if flavor.do_sample is not None else sampling_given)
    temperature = (1.0 if options.temperature is None else options.temperature) if do_sample else 0.0
    stop = options.stop if options.stop is not None else options.stop_sequences
    details = bool(options.details)
    top_n = options.top_n_tokens or 0
    best_of = _best_of(options, do_sample)
    params = GenerationParams(
        max_new_tokens=max_new, temperature=temperature, top_k=options.top_k or 0, top_p=options.top_p or 1.0,
        typical_p=options.typical_p or 1.0, repetition_penalty=options.repetition_penalty or options.penalty or 1.0,
        frequency_penalty=options.frequency_penalty or 0.0, stop=[stop] if isinstance(stop, str) else list(stop or []),
        seed=options.seed, num_return_sequences=best_of * (options.num_return_sequences or 1),
        logprobs=top_n if (details or top_n or best_of > 1) else None, truncate=fit,
        constraint=_grammar(options), adapter=adapter, speculative=options.speculative is not False)
    full = options.return_full_text if options.return_full_text is not None else (
        not options.remove_input if options.remove_input is not None else flavor.return_full_text)
    texts = [t if t is not None else st.lm.tokenizer.decode(ids) for t, ids in zip(texts, prompts)]
    return Job(prompts, texts, params, options.max_time, 0 if options.decoder_input_details else None, full,
               bool(options.details), top_n, best_of)


def _best_of(options: HFParameters, do_sample: bool) -> int:
    """Returns TGI's best_of (sequences sampled per input, the best returned), checked as TGI checks it."""
    best_of = options.best_of or 1
    if best_of > 1 and not do_sample:
        raise APIError(422, "best_of > 1 needs sampling: set do_sample or a sampling parameter", param="best_of")
    if best_of > 1 and (options.num_return_sequences or 1) > 1:
        raise APIError(422, "best_of and num_return_sequences cannot be combined", param="best_of")
    return best_of


def _grammar(options: HFParameters) -> Constraint | None:
    """Returns the constraint TGI's "grammar" parameter asks for, or a 400 naming what is wrong with it."""
    if options.grammar is None:
        return None
    try:
        return Constraint.from_tgi_grammar(options.grammar.model_dump())
    except GenerationError as exc:
        raise APIError(400, f"grammar: {exc}", param="grammar") from None


def _ranked(job: Job, seqs: list[Sequence]) -> list[tuple[Sequence, list[Sequence]]]:
    """Returns (the sequence to answer, the other best_of candidates) per answer: with best_of, the sample with
    the highest mean token log-probability of its input's candidates, as TGI picks it."""
    if job.best_of == 1:
        return [(s, []) for s in seqs]
    return [(ranked[0], ranked[1:]) for ranked in best_first(seqs, job.best_of)]


def _token(tok, tid: int, lp: float | None, text: str | None = None) -> dict:
    return {"id": tid, "text": tok.token_text(tid) if text is None else text, "logprob": lp,
            "special": tid == tok.eos_token_id}


def _details(st: ServerState, job: Job, seq: Sequence, others: list[Sequence] = ()) -> dict:
    tok = st.lm.tokenizer
    out = {"finish_reason": TGI_FINISH[seq.finish_reason], "generated_tokens": len(seq.token_ids),
           "seed": seq.seed if not seq.params.greedy else None,
           "prefill": [], "tokens": [], "top_tokens": None, "best_of_sequences": None}
    if seq.prompt_logprobs is not None:
        out["prefill"] = [_token(tok, t, lp) for t, (lp, _) in zip(seq.prompt_ids, seq.prompt_logprobs)]
    lps = seq.logprobs or [None] * len(seq.token_ids)
    out["tokens"] = [_token(tok, t, lp) for t, lp in zip(seq.token_ids, lps)]
    if job.top_n and seq.top_logprobs is not None:
        out["top_tokens"] = [[_token(tok, t, v) for t, v in (top or {}).items()] for top in seq.top_logprobs]
    out.update(_engine_details(seq))
    if others:
        out["best_of_sequences"] = [{"generated_text": _generated(job, o), **_details(st, job, o)} for o in others]
        for other in out["best_of_sequences"]:
            del other["best_of_sequences"]
    return out


def _generated(job: Job, seq: Sequence) -> str:
    return (job.texts[seq.prompt_index] if job.full_text else "") + seq.text


async def _run(st: ServerState, request: Request, job: Job, route: str) -> list[Sequence] | Response:
    gen = Generation(st, job.prompts, job.params, job.max_time, job.prompt_logprobs, route=route)
    try:
        return await gen.wait(request)
    except ClientGone:
        return Response(status_code=499)


def _outputs(st: ServerState, job: Job, seqs: list[Sequence], nested: bool):
    """Returns [{"generated_text"}, ...] per prompt (a list of those lists when `nested`)."""
    per_prompt: list[list[dict]] = [[] for _ in job.prompts]
    for seq, others in _ranked(job, seqs):
        item = {"generated_text": _generated(job, seq)}
        if job.details:
            item["details"] = _details(st, job, seq, others)
        per_prompt[seq.prompt_index].append(item)
    return per_prompt if nested else per_prompt[0]


# Top-level fields only a feature-extraction body has (generation's options live under "parameters").
FEATURE_FIELDS = ("normalize", "prompt_name", "truncate", "truncation_direction", "dimensions", "encoding_format")


def wants_features(data: object, bare_is_features: bool) -> bool:
    """Returns True when a body at a shared route asks for feature extraction rather than generation.

    Generation clients always send "parameters" or "stream" (huggingface_hub's text_generation sends both);
    InferenceClient.feature_extraction sends neither, only "inputs" and its options at the top level. A bare
    {"inputs"} is feature extraction at POST / (as TEI's, and what feature_extraction sends with no options),
    and generation at POST /models/{id} (the Inference API's text-generation form).
    """
    if not isinstance(data, dict) or "parameters" in data or "stream" in data:
        return False
    return bare_is_features or any(k in data for k in FEATURE_FIELDS)


async def _features(st: ServerState, request: Request, data: object):
    body = parse(FeatureExtractionRequest, data)
    if body.prompt_name is not None:
        raise APIError(422, "prompt_name is not supported: a GPT model has no sentence-transformers prompts",
                       param="prompt_name")
    check_dimensions(st, body.dimensions)
    check_count(body.inputs, "inputs")
    inputs, _ = encode_prompts(st, body.inputs, "inputs")
    if body.truncate:
        limit = st.n_positions
        left = (body.truncation_direction or "right").lower() == "left"
        inputs = [ids[-limit:] if left else ids[:limit] for ids in inputs]
    check_lengths(st, inputs, "inputs", hint='; set "truncate": true to embed its first tokens')
    try:
        vectors = await embed(st, request, inputs)
    except ClientGone:
        return Response(status_code=499)
    if body.normalize:
        vectors = torch.nn.functional.normalize(torch.tensor(vectors), dim=-1).tolist()
    return JSONResponse(vectors)


@router.post("/models/{model_id:path}/pipeline/feature-extraction",
             **describe("/models", body=FeatureExtractionRequest, errors=(*GENERATION_ERRORS, 404)))
async def inference_api_features(model_id: str, request: Request):
    """The Inference API's feature extraction: {"inputs": str | [str], "normalize"?, "truncate"?} ->
    [[float, ...]] one mean-pooled vector per input (huggingface_hub's URL for a model id)."""
    st = _state(request)
    st.check_base_model(model_id, "embeddings")
    return await _features(st, request, await read_json(request))


@router.post("/pipeline/feature-extraction/{model_id:path}",
             **describe("/pipeline", body=FeatureExtractionRequest, errors=(*GENERATION_ERRORS, 404)))
async def pipeline_features(model_id: str, request: Request):
    """The older Inference API URL of feature extraction; the same as /models/{id}/pipeline/feature-extraction."""
    st = _state(request)
    st.check_base_model(model_id, "embeddings")
    return await _features(st, request, await read_json(request))


@router.post("/embed", **describe("/embed", body=FeatureExtractionRequest, errors=GENERATION_ERRORS))
async def tei_embed(request: Request):
    """text-embeddings-inference's /embed: {"inputs", "normalize"?, "truncate"?} -> [[float, ...]] per input."""
    st = _state(request)
    return await _features(st, request, await read_json(request))


@router.post("/models/{model_id:path}", **describe("/models", body=(HFRequest, FeatureExtractionRequest),
                                                      errors=(*GENERATION_ERRORS, 404), stream=True))
async def inference_api(model_id: str, request: Request):
    """The HF Inference API: POST /models/EleutherAI/gpt-j-6B {"inputs": ...} -> [{"generated_text": ...}].

    Sampling on, 50 new tokens, the prompt returned (return_full_text). A body with feature-extraction options
    at the top level and no "parameters" (e.g. {"inputs", "normalize"}) gets embeddings instead.
    """
    st = _state(request)
    adapter = st.check_model(model_id)
    data = await read_json(request)
    if wants_features(data, bare_is_features=False):
        st.check_base_model(model_id, "embeddings")
        return await _features(st, request, data)
    body = parse(HFRequest, data)
    if body.stream:
        return await _stream(st, request, body, "/models/{model_id}", adapter)
    job = _job(st, body, INFERENCE_API, adapter)
    seqs = await _run(st, request, job, "/models/{model_id}")
    return seqs if isinstance(seqs, Response) else _outputs(st, job, seqs, nested=isinstance(body.inputs, list))


@router.post("/", **describe("/", body=(HFRequest, FeatureExtractionRequest), errors=GENERATION_ERRORS, stream=True,
                             summary="TGI's compat_generate (/generate or /generate_stream by \"stream\"); feature "
                                     "extraction for a body without \"parameters\" and \"stream\""))
async def root(request: Request):
    """TGI's compat_generate, as an Inference Endpoint serves it: generation when the body has "parameters" or
    "stream" (huggingface_hub's InferenceClient(base_url).text_generation), feature extraction otherwise
    (InferenceClient(base_url).feature_extraction, TEI's POST /).

    Generation has TGI's defaults (greedy unless a sampling parameter is given, 100 new tokens, the prompt not
    returned) and shapes: "stream": true answers /generate_stream's events, otherwise a list with one
    {"generated_text", "details"?} per sequence (a list of those per input for a list of inputs).
    """
    st = _state(request)
    data = await read_json(request)
    if wants_features(data, bare_is_features=True):
        return await _features(st, request, data)
    body = parse(HFRequest, data)
    if body.stream:
        return await _stream(st, request, body, "/")
    job = _job(st, body, TGI)
    seqs = await _run(st, request, job, "/")
    return seqs if isinstance(seqs, Response) else _outputs(st, job, seqs, nested=isinstance(body.inputs, list))


@router.post("/generate", **describe("/generate", body=HFRequest, errors=GENERATION_ERRORS))
async def generate(request: Request):
    """TGI: {"inputs": str, "parameters": {...}} -> {"generated_text": ..., "details": ...}."""
    st = _state(request)
    body = parse(HFRequest, await read_json(request))
    _single(body)
    job = _job(st, body, TGI)
    seqs = await _run(st, request, job, "/generate")
    if isinstance(seqs, Response):
        return seqs
    (best, others), = _ranked(job, seqs)
    out = {"generated_text": _generated(job, best)}
    if job.details:
        out["details"] = _details(st, job, best, others)
    return out


@router.post("/generate_stream", response_class=EventStream, status_code=200,
             **describe("/generate_stream", body=HFRequest, errors=GENERATION_ERRORS))
async def generate_stream(request: Request):
    """TGI: server-sent events, one per token; the last carries generated_text and details."""
    st = _state(request)
    body = parse(HFRequest, await read_json(request))
    return await _stream(st, request, body, "/generate_stream")


def _single(body: HFRequest) -> None:
    if not isinstance(body.inputs, str):
        raise APIError(422, "inputs must be a single string on this route", param="inputs")
    if (body.parameters.num_return_sequences or 1) > 1:
        raise APIError(422, "num_return_sequences > 1 is not supported on this route; use POST /models/{id}",
                       param="num_return_sequences")


async def _stream(st: ServerState, request: Request, body: HFRequest, route: str, adapter: str | None = None):
    _single(body)
    if (body.parameters.best_of or 1) > 1:
        raise APIError(422, "best_of > 1 cannot be streamed", param="best_of")
    job = _job(st, body, TGI if route != "/models/{model_id}" else INFERENCE_API, adapter)
    job.params.logprobs = job.top_n  # every streamed token carries its logprob, as TGI's do
    gen = Generation(st, job.prompts, job.params, job.max_time, job.prompt_logprobs, route=route)
    tok = st.lm.tokenizer

    async def events():
        index = 0
        async for ev in gen.events():
            if failure(ev) is not None:
                yield sse({"error": failure(ev), "error_type": "generation"})
                continue
            if ev.token_id is None:  # max_new_tokens=0: nothing generated
                yield sse({"index": index, "token": None, "generated_text": _generated(job, ev.seq),
                           "details": _stream_details(job, ev.seq)})
                continue
            index += 1
            out = {"index": index, "token": _token(tok, ev.token_id, ev.logprob, ev.text), "generated_text": None,
                   "details": None, "top_tokens": None}
            if job.top_n and ev.top_logprobs:
                out["top_tokens"] = [_token(tok, t, v) for t, v in ev.top_logprobs.items()]
            if ev.finish_reason:
                out["generated_text"] = _generated(job, ev.seq)
                out["details"] = _stream_details(job, ev.seq)
            yield sse(out)

    return EventStream(events(), gen)


def _stream_details(job: Job, seq: Sequence) -> dict:
    return {"finish_reason": TGI_FINISH[seq.finish_reason], "generated_tokens": len(seq.token_ids),
            "seed": seq.seed if not seq.params.greedy else None, "input_length": len(seq.prompt_ids),
            **_engine_details(seq)}


def _engine_details(seq: Sequence) -> dict:
    """Returns the neoj extensions of TGI's details: cached_tokens (prompt tokens reused from the prefix cache)
    and drafted_tokens, accepted_tokens, acceptance_rate (speculative decoding; 0, 0, null without it)."""
    return {"cached_tokens": seq.cached_tokens, **speculation([seq])}


@router.get("/info", **describe("/info"))
async def info(request: Request):
    """TGI's /info: what is served and the server's limits."""
    st = _state(request)
    eng = st.engine
    return {"model_id": st.model_id, "model_sha": None, "model_dtype": str(st.lm.dtype).replace("torch.", ""),
            "model_device_type": st.lm.device.type, "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": eng.max_batch + eng.max_queue, "max_best_of": MAX_N,
            "max_stop_sequences": 16, "max_input_tokens": st.n_positions - 1, "max_input_length": st.n_positions - 1,
            "max_total_tokens": st.n_positions, "max_batch_size": eng.max_batch, "max_queue": eng.max_queue,
            "validation_workers": 1, "max_client_batch_size": MAX_INPUTS, "router": "neoj", "version": __version__,
            "sha": None, "docker_label": None, "started": st.created, "uptime_seconds": int(time.time()) - st.created}

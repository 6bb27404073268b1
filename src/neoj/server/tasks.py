"""The task routes: POST /v1/tasks/{summarize,ask,translate,classify,complete-code,chat}, over neoj.tasks.

Each route validates its body (bounded text, token and list sizes), then runs the same function the
`neoj` command and the Python API run, in a worker thread with an EngineRunner: generation goes through
the engine's continuous batching beside every other request, and scoring runs on the engine's thread
between decode steps, so the event loop never waits on the model. A client that disconnects cancels its
task at the next step. Bodies may override prompt templates by name ("prompts": {...}); the server never
opens a file a request names. Errors have the OpenAI shape of every /v1 route: 400 a prompt that cannot
fit the context, 422 bad input (empty text, bad labels, out-of-range options), 503 when busy.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Callable, Literal, Union

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import Field, StrictStr, field_validator

from ..engine import QueueFull
from ..engine.lockstep import NotReplicated
from ..errors import ContextLengthError, NeojError
from ..tasks import ask, chat_reply, classify, complete_code, summarize, translate
from ..tasks.classify import MAX_LABELS, SENTIMENT
from ..tasks.prompts import Prompts
from ..tasks.runner import Cancelled, EngineRunner, Runner
from .bodies import parse, read_json
from .common import APIError, ServerState
from .openapi import GENERATION_ERRORS, describe
from .schemas import Seed, Strict, TopK, TopP, RepetitionPenalty

router = APIRouter()
PATHS = ("/v1/tasks/summarize", "/v1/tasks/ask", "/v1/tasks/translate", "/v1/tasks/classify",
         "/v1/tasks/complete-code", "/v1/tasks/chat")

MAX_TASKS = 16  # tasks running at once; each holds a worker thread while its generations wait in the engine
MAX_DOCUMENT_CHARS = 200_000  # summarize and ask --context: about 50k tokens
MAX_TEXT_CHARS = 20_000
MAX_MAX_TOKENS = 2048
_executor = ThreadPoolExecutor(max_workers=MAX_TASKS, thread_name_prefix="neoj-task")

Document = Annotated[StrictStr, Field(min_length=1, max_length=MAX_DOCUMENT_CHARS)]
Text = Annotated[StrictStr, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
Short = Annotated[StrictStr, Field(min_length=1, max_length=200)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_MAX_TOKENS, strict=True)]
PromptValue = Union[Annotated[StrictStr, Field(max_length=10_000)],
                    Annotated[list[Annotated[StrictStr, Field(max_length=1000)]], Field(max_length=16)]]


class TaskRequest(Strict):
    """Fields every task accepts: the model name (checked), sampling options and prompt overrides."""

    model: StrictStr | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    seed: Seed | None = None
    prompts: Annotated[dict[StrictStr, PromptValue], Field(max_length=40)] | None = None

    def options(self) -> dict:
        """Returns the generation options that were given."""
        names = ("temperature", "top_p", "top_k", "repetition_penalty", "seed")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def prompt_set(self) -> Prompts | None:
        """Returns the defaults with this request's overrides, or None; a bad template is a 422."""
        if not self.prompts:
            return None
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in self.prompts.items()}
        if "translation_examples" in overrides:
            raise APIError(422, "translation_examples cannot be overridden per request", param="prompts")
        try:
            return Prompts().replace(**overrides)
        except NeojError as exc:
            raise APIError(422, str(exc), param="prompts") from None


class SummarizeRequest(TaskRequest):
    text: Document
    length: Literal["short", "medium", "long"] = "medium"
    max_tokens: MaxTokens | None = None
    overlap: Annotated[int, Field(ge=0, le=512, strict=True)] | None = None


class AskRequest(TaskRequest):
    question: Annotated[StrictStr, Field(min_length=1, max_length=4000)]
    context: Document | None = None
    max_tokens: MaxTokens = 64
    rank: Literal["likelihood", "embedding"] = "likelihood"
    passage_tokens: Annotated[int, Field(ge=16, le=2048, strict=True)] | None = None


class TranslateRequest(TaskRequest):
    text: Text
    to: Short
    source: Short = Field("English", alias="from")
    shots: Annotated[int, Field(ge=0, le=16, strict=True)] = 3
    max_tokens: MaxTokens | None = None


class ClassifyExample(Strict):
    text: Text
    label: Short


class ClassifyRequest(TaskRequest):
    text: Union[Text, Annotated[list[Text], Field(min_length=1, max_length=64)]]
    labels: Annotated[list[Short], Field(min_length=2, max_length=MAX_LABELS)] = list(SENTIMENT)
    examples: Annotated[list[ClassifyExample], Field(max_length=32)] | None = None
    normalize: Literal["sum", "mean"] = "sum"


class CodeRequest(TaskRequest):
    code: Annotated[StrictStr, Field(min_length=1, max_length=100_000)]
    scope: Literal["function", "block"] = "function"
    language: Literal["python", "braces"] | None = None
    filename: Annotated[StrictStr, Field(max_length=255)] | None = None  # only its suffix is read
    max_tokens: MaxTokens = 256


class TaskMessage(Strict):
    role: Literal["user", "assistant"]
    content: Text


class ChatTaskRequest(TaskRequest):
    messages: Annotated[list[TaskMessage], Field(min_length=1, max_length=256)]
    system: Annotated[StrictStr, Field(max_length=10_000)] | None = None
    max_tokens: MaxTokens = 256

    @field_validator("messages")
    @classmethod
    def _last_is_user(cls, value):
        if value[-1].role != "user":
            raise ValueError("the last message must be the user's")
        return value


def _state(request: Request) -> ServerState:
    return request.app.state.neoj


async def _run(request: Request, body: TaskRequest, fn: Callable[[Runner, Prompts | None, dict], dict]):
    """Returns fn(runner, prompts, options), run in a worker thread; errors become API errors, a gone client 499."""
    st = _state(request)
    st.check_base_model(body.model, "the tasks")
    prompts = body.prompt_set()
    app_state = request.app.state
    busy = getattr(app_state, "neoj_tasks_busy", 0)  # only the event loop's thread counts: no lock needed
    if busy >= MAX_TASKS:
        st.metrics.rejected.inc()
        raise APIError(503, f"the server is busy: {busy} tasks are running; retry later", headers={"Retry-After": "5"})
    app_state.neoj_tasks_busy = busy + 1
    runner = EngineRunner(st.lm, st.engine)
    work = asyncio.get_running_loop().run_in_executor(_executor, fn, runner, prompts, body.options())
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            runner.cancel()  # the worker stops at its next check and frees its engine rows
            return Response(status_code=499)
        try:
            result = work.result()
        except QueueFull as exc:
            st.metrics.rejected.inc()
            raise APIError(503, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
        except ContextLengthError as exc:
            raise APIError(400, str(exc)) from None
        except Cancelled:
            return Response(status_code=499)
        except NotReplicated as exc:
            raise APIError(501, str(exc)) from None
        except NeojError as exc:  # TaskError, GenerationError, bad prompts: the input's fault
            raise APIError(422, str(exc)) from None
        return {"model": st.model_id, **result}
    finally:
        watcher.cancel()
        if not work.done():
            runner.cancel()
        app_state.neoj_tasks_busy -= 1


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post("/v1/tasks/summarize", **describe("/v1/tasks", body=SummarizeRequest, errors=(*GENERATION_ERRORS, 404)))
async def summarize_route(request: Request):
    """Returns the summary of a document of any length (map-reduce over chunks)."""
    body = parse(SummarizeRequest, await read_json(request))

    def work(runner, prompts, options):
        s = summarize(runner, body.text, length=body.length, max_new_tokens=body.max_tokens, overlap=body.overlap,
                      prompts=prompts, batch_size=32, **options)
        return {"summary": s.text, "chunks": s.chunks, "rounds": s.rounds}

    return await _run(request, body, work)


@router.post("/v1/tasks/ask", **describe("/v1/tasks", body=AskRequest, errors=(*GENERATION_ERRORS, 404)))
async def ask_route(request: Request):
    """Returns the answer to a question, from the model alone or from the best passages of a document."""
    body = parse(AskRequest, await read_json(request))

    def work(runner, prompts, options):
        a = ask(runner, body.question, body.context, max_new_tokens=body.max_tokens, rank=body.rank,
                passage_tokens=body.passage_tokens, prompts=prompts, **options)
        return {"answer": a.text, "finish_reason": a.finish_reason, "passages_total": a.passages_total,
                "passages": [vars(p) for p in a.passages]}

    return await _run(request, body, work)


@router.post("/v1/tasks/translate", **describe("/v1/tasks", body=TranslateRequest, errors=(*GENERATION_ERRORS, 404)))
async def translate_route(request: Request):
    """Returns the text translated by few-shot prompting, line by line."""
    body = parse(TranslateRequest, await read_json(request))

    def work(runner, prompts, options):
        return {"translation": translate(runner, body.text, to=body.to, source=body.source, shots=body.shots,
                                         max_new_tokens=body.max_tokens, prompts=prompts, batch_size=32, **options)}

    return await _run(request, body, work)


@router.post("/v1/tasks/classify", **describe("/v1/tasks", body=ClassifyRequest, errors=(*GENERATION_ERRORS, 404)))
async def classify_route(request: Request):
    """Returns the label probabilities of a text (or of each text of a list), by likelihood."""
    body = parse(ClassifyRequest, await read_json(request))

    def work(runner, prompts, options):
        texts = [body.text] if isinstance(body.text, str) else body.text
        examples = [(e.text, e.label) for e in body.examples or []]
        results = classify(runner, texts, body.labels, examples=examples, normalize=body.normalize, prompts=prompts)
        return {"results": [r.to_dict() for r in results]}

    return await _run(request, body, work)


@router.post("/v1/tasks/complete-code", **describe("/v1/tasks", body=CodeRequest, errors=(*GENERATION_ERRORS, 404)))
async def complete_code_route(request: Request):
    """Returns the completion of code up to the end of its current function or block."""
    body = parse(CodeRequest, await read_json(request))

    def work(runner, prompts, options):
        return {"completion": complete_code(runner, body.code, scope=body.scope, language=body.language,
                                            filename=body.filename, max_new_tokens=body.max_tokens, prompts=prompts,
                                            **options)}

    return await _run(request, body, work)


@router.post("/v1/tasks/chat", **describe("/v1/tasks", body=ChatTaskRequest, errors=(*GENERATION_ERRORS, 404)))
async def chat_route(request: Request):
    """Returns the reply to a conversation, with a persona and the history trimmed to the context."""
    body = parse(ChatTaskRequest, await read_json(request))

    def work(runner, prompts, options):
        r = chat_reply(runner, [(m.role, m.content) for m in body.messages], body.system,
                       max_new_tokens=body.max_tokens, prompts=prompts, **options)
        return {"reply": r.text, "prompt_tokens": r.prompt_tokens, "dropped_messages": r.dropped}

    return await _run(request, body, work)


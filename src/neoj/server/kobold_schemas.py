"""Request bodies of the KoboldAI API (/api/v1/generate, koboldcpp's /api/extra routes), the table of the
fields neoj accepts but does not act on, and how a generate request becomes a prompt and GenerationParams
(plan; the semantics are listed in neoj.server.kobold_api's docstring).

KoboldAI's own server validates with marshmallow, which takes numbers written as strings ("0.7") and ints for
floats; clients (SillyTavern, KoboldAI Lite, TavernAI, scripts) rely on that, so these models use pydantic's lax
mode for scalars. Wrong types that cannot be read as the field's type ("hot" for a temperature, a number for
the prompt), out-of-range values, NaN and infinity are 422s. Unknown fields are ignored: Lite and SillyTavern
send every sampler their koboldcpp version knows (mirostat, DRY, XTC, dynatemp, images...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from ..constraint import Constraint
from ..errors import GenerationError
from ..sampling import GenerationParams
from .common import APIError, ServerState
from .schemas import MAX_SEED as NEOJ_MAX_SEED

MAX_STOP_SEQUENCES = 32  # koboldcpp's stop_token_max
MAX_N = 5  # KoboldAI's bound on n
MAX_LOGIT_BIAS = 300  # entries, as OpenAI's (koboldcpp keeps 32 and drops the rest silently)
MAX_SEED = 2**64 - 1  # KoboldAI's sampler_seed range; -1 means a random seed, as in koboldcpp
DEFAULT_MAX_LENGTH = 180  # koboldcpp's default new tokens (capped at half the context)
DEFAULTS = {"temperature": 0.7, "top_k": 100, "top_p": 0.92}  # koboldcpp's, for fields a request leaves out
MIN_PROMPT = 16  # tokens of context max_length always leaves to the prompt (koboldcpp's min_remain)
BIAS_LIMIT = 100.0  # koboldcpp clamps biases to +-100; -100 bans a token (OpenAI's convention)

Count = Annotated[int, Field(ge=1, le=2**31 - 1)]
Unit = Annotated[float, Field(ge=0, le=1)]


class Lax(BaseModel):
    """Lax scalar types (as marshmallow reads them), no NaN or infinity, unknown fields ignored."""

    model_config = ConfigDict(strict=False, extra="ignore", allow_inf_nan=False)


class KoboldGenerateRequest(Lax):
    """POST /api/v1/generate and /api/extra/generate/stream: KoboldAI United 1.2.5 and koboldcpp's fields."""

    prompt: str
    memory: str | None = None  # koboldcpp: kept in front of the prompt, never truncated away before it
    max_context_length: Count | None = None
    max_length: Count | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    temperature: Annotated[float, Field(ge=0, le=100)] | None = None
    top_k: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    top_p: Unit | None = None
    min_p: Unit | None = None
    typical: Unit | None = None
    tfs: Unit | None = None
    top_a: Annotated[float, Field(ge=0, le=100)] | None = None
    rep_pen: Annotated[float, Field(gt=0, le=100)] | None = None
    rep_pen_range: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    rep_pen_slope: Annotated[float, Field(ge=0, le=100)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    sampler_order: Annotated[list[int], Field(max_length=16)] | None = None
    sampler_seed: Annotated[int, Field(ge=-1, le=MAX_SEED)] | None = None
    singleline: bool | None = None
    use_default_badwordsids: bool | None = None
    ban_eos_token: bool | None = None  # koboldcpp's name for use_default_badwordsids
    bypass_eos: bool | None = None
    stop_sequence: Annotated[list[str | None], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    trim_stop: bool | None = None
    grammar: str | None = None
    grammar_retain_state: bool | None = None
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-1e9, le=1e9)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    banned_tokens: Annotated[list[str], Field(max_length=256)] | None = None
    genkey: Annotated[str, Field(max_length=256)] | None = None
    quiet: bool | None = None
    use_story: bool | None = None
    use_memory: bool | None = None
    use_authors_note: bool | None = None
    use_world_info: bool | None = None
    use_userscripts: bool | None = None


# Fields neoj reads (their types and ranges are checked) but does not act on, and why. Anything else not in
# KoboldGenerateRequest is ignored unread.
IGNORED = {
    "tfs": "tail-free sampling is not implemented",
    "top_a": "top-a sampling is not implemented",
    "rep_pen_range": "neoj's repetition penalty covers the whole prompt and output (as transformers')",
    "rep_pen_slope": "the same: no per-distance penalty",
    "sampler_order": "neoj applies its samplers in one fixed order (penalties, top-k, temperature, top-p, ...)",
    "banned_tokens": "koboldcpp's banned phrases need backtracking, which neoj's engine does not do",
    "grammar_retain_state": "each request starts its grammar afresh",
    "quiet": "neoj never prints prompts or outputs",
    "use_story": "there is no KoboldAI GUI story here; the prompt is the whole story",
    "use_memory": "the same (koboldcpp's `memory` field is supported)",
    "use_authors_note": "the same",
    "use_world_info": "the same",
    "use_userscripts": "the same",
}


class KoboldTokenCountRequest(Lax):
    """POST /api/extra/tokencount (koboldcpp): the prompt's token count and ids."""

    prompt: str
    special: bool | None = None  # GPT-2's tokenizer adds no special tokens either way


class KoboldGenkeyRequest(Lax):
    """POST /api/extra/abort and /api/extra/generate/check: which generation (none: the caller's latest)."""

    genkey: Annotated[str, Field(max_length=256)] | None = None


# ---- a generate request as neoj's GenerationParams ----

@dataclass
class Plan:
    """A parsed generate request, ready for the engine."""

    prompt: list[int]
    params: GenerationParams
    user_stops: list[str]
    trim_stop: bool


def default_max_length(st: ServerState) -> int:
    """Returns max_length when a request leaves it out: koboldcpp's 180, at most half the model's context."""
    return min(DEFAULT_MAX_LENGTH, st.n_positions // 2)


def _fit(st: ServerState, body: KoboldGenerateRequest) -> tuple[list[int], int]:
    """Returns (memory + the prompt's last tokens, max_length) fitted to max_context_length and the model."""
    tok = st.lm.tokenizer
    context = min(body.max_context_length or st.n_positions, st.n_positions)
    wanted = body.max_length or default_max_length(st)
    max_length = min(wanted, context - min(MIN_PROMPT, max(1, context - 4)))
    if max_length < 1:
        raise APIError(422, f"max_context_length={body.max_context_length} leaves no room to generate",
                       param="max_context_length")
    budget = context - max_length
    memory = tok.encode(body.memory)[-budget:] if body.memory else []
    prompt = tok.encode(body.prompt) if body.prompt else []
    room = budget - len(memory)
    ids = memory + (prompt[-room:] if room > 0 else [])
    return ids or [tok.eos_token_id], max_length


def _logit_bias(st: ServerState, body: KoboldGenerateRequest) -> dict[int, float] | None:
    """Returns koboldcpp's logit_bias keyed by token id (clamped to +-100), with EOS banned when asked."""
    vocab = st.lm.tokenizer.vocab_size
    out: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        digits = key.strip()
        if not (digits.isascii() and digits.isdigit()) or int(digits) >= vocab:
            raise APIError(422, f"logit_bias key {key!r} is not a token id (0..{vocab - 1})", param="logit_bias")
        out[int(digits)] = max(-BIAS_LIMIT, min(BIAS_LIMIT, value))
    if body.use_default_badwordsids or body.ban_eos_token:
        out[st.lm.tokenizer.eos_token_id] = -BIAS_LIMIT
    return out or None


def _grammar(text: str | None) -> Constraint | None:
    """Returns the GBNF grammar's constraint (none for an empty grammar, as SillyTavern sends), or a 400."""
    if not text or not text.strip():
        return None
    try:
        return Constraint("gbnf", text)
    except GenerationError as exc:
        raise APIError(400, f"grammar: {exc}", param="grammar") from None


def _given(body: KoboldGenerateRequest, name: str) -> float:
    """Returns the request's value of a sampler field, or koboldcpp's default when it leaves it out."""
    value = getattr(body, name)
    return DEFAULTS[name] if value is None else value


def plan(st: ServerState, body: KoboldGenerateRequest, stream: bool) -> Plan:
    """Returns the request's prompt and GenerationParams, KoboldAI's fields mapped to neoj's."""
    if stream and (body.n or 1) > 1:
        raise APIError(422, "n > 1 is not supported when streaming; use /api/v1/generate", param="n")
    prompt, max_length = _fit(st, body)
    top_p, top_k = _given(body, "top_p"), _given(body, "top_k")
    if top_p == 0:  # llama.cpp keeps its one best token
        top_p, top_k = 1.0, 1
    typical = body.typical if body.typical is not None and 0 < body.typical < 1 else 1.0
    user_stops = [s for s in body.stop_sequence or [] if s]
    stops = user_stops + (["\n"] if body.singleline and "\n" not in user_stops else [])
    # KoboldAI's seeds go up to 2**64 - 1 (MAX_SEED); they fold onto neoj's range.
    seed = None if body.sampler_seed in (None, -1) else body.sampler_seed % (NEOJ_MAX_SEED + 1)
    params = GenerationParams(
        max_new_tokens=max_length, temperature=_given(body, "temperature"), top_k=top_k, top_p=top_p,
        min_p=body.min_p or 0.0, typical_p=typical, repetition_penalty=body.rep_pen or 1.0,
        presence_penalty=body.presence_penalty or 0.0, stop=stops, stop_at_eos=not body.bypass_eos, seed=seed,
        num_return_sequences=body.n or 1, logit_bias=_logit_bias(st, body), constraint=_grammar(body.grammar))
    return Plan(prompt, params, user_stops, bool(body.trim_stop))

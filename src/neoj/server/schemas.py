"""Request bodies of every API the server speaks, validated strictly: wrong types and out-of-range values are 422s.

Field names, defaults and ranges follow each API's own documentation; neoj's extensions are marked.
Unknown fields are ignored, as clients send fields for features a base model has no use for.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

MAX_N = 64  # sequences per prompt (n, num_return_sequences)
MAX_STOPS = 16
MAX_LOGPROBS = 20
MAX_SEED = 2**63 - 1 - MAX_N

Seed = Annotated[int, Field(ge=0, le=MAX_SEED, strict=True)]
Temperature = Annotated[float, Field(ge=0, le=100)]
TopP = Annotated[float, Field(gt=0, le=1)]
TopK = Annotated[int, Field(ge=0, strict=True)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
RepetitionPenalty = Annotated[float, Field(gt=0, le=100)]
MaxTime = Annotated[float, Field(gt=0, le=3600)]
TokenIds = Annotated[list[StrictInt], Field(min_length=1)]
# A prompt: text, texts, token ids, or lists of token ids (as lm-eval's local-completions sends).
PromptInput = Union[StrictStr, list[StrictStr], TokenIds, list[TokenIds]]
Stop = Union[StrictStr, Annotated[list[StrictStr], Field(max_length=MAX_STOPS)], None]
MinP = Annotated[float, Field(ge=0, le=1)]
# OpenAI's logit_bias: token id (a JSON key, so a string) -> bias in [-100, 100], at most 300 entries.
LogitBias = Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=300)]
Priority = Annotated[int, Field(ge=-(2**31), le=2**31 - 1, strict=True)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def check_stop(value):
    """Rejects empty stop strings, which would end every generation at once."""
    stops = [value] if isinstance(value, str) else value or []
    if any(s == "" for s in stops):
        raise ValueError("stop strings must be non-empty")
    return value


class StreamOptions(Strict):
    include_usage: StrictBool | None = None


class CompletionRequest(Strict):
    """POST /v1/completions (OpenAI)."""

    model: StrictStr | None = None
    prompt: PromptInput
    max_tokens: Annotated[int, Field(ge=0, strict=True)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: TopP | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N, strict=True)] | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N, strict=True)] | None = None
    stop: Stop = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS, strict=True)] | None = None
    echo: StrictBool | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    suffix: StrictStr | None = None
    user: StrictStr | None = None
    response_format: dict | None = None  # as on chat (vLLM accepts it on completions too)
    # extensions (vLLM's names)
    top_k: TopK | None = None
    min_p: MinP | None = None
    typical_p: TopP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    ignore_eos: StrictBool | None = None
    priority: Priority | None = None
    # neoj extensions
    truncate: StrictBool | None = None
    max_time: MaxTime | None = None
    speculative: StrictBool | None = None  # false: no speculative decoding for this request (neoj extension)

    _stop = field_validator("stop")(check_stop)


class ContentPart(Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        """Returns the message's text (text parts joined)."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Strict):
    """POST /v1/chat/completions (OpenAI)."""

    model: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, strict=True)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, strict=True)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: TopP | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N, strict=True)] | None = None
    stop: Stop = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS, strict=True)] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    tools: list | None = None
    response_format: dict | None = None
    user: StrictStr | None = None
    # extensions (vLLM's names)
    top_k: TopK | None = None
    min_p: MinP | None = None
    typical_p: TopP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    ignore_eos: StrictBool | None = None
    priority: Priority | None = None
    # neoj extensions
    truncate: StrictBool | None = None
    max_time: MaxTime | None = None
    chat_template: StrictStr | None = None
    speculative: StrictBool | None = None  # false: no speculative decoding for this request (neoj extension)

    _stop = field_validator("stop")(check_stop)


class EmbeddingRequest(Strict):
    """POST /v1/embeddings (OpenAI)."""

    model: StrictStr | None = None
    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1, strict=True)] | None = None
    user: StrictStr | None = None


class TGIGrammar(Strict):
    """TGI's structured output: a JSON schema (or a JSON string of one) or a regular expression."""

    type: Literal["json", "json_object", "regex"]
    value: Union[dict, StrictStr]


class HFParameters(Strict):
    """The "parameters" of the HF Inference API and of TGI (a superset of both)."""

    max_new_tokens: Annotated[int, Field(ge=0, strict=True)] | None = None
    max_length: Annotated[int, Field(ge=1, strict=True)] | None = None  # total length, as transformers'
    temperature: Temperature | None = None
    top_k: TopK | None = None
    top_p: TopP | None = None
    typical_p: TopP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    penalty: RepetitionPenalty | None = None  # the Neuro API's name for repetition_penalty
    frequency_penalty: Penalty | None = None
    do_sample: StrictBool | None = None
    num_return_sequences: Annotated[int, Field(ge=1, le=MAX_N, strict=True)] | None = None
    return_full_text: StrictBool | None = None
    remove_input: StrictBool | None = None  # the Neuro API's inverse of return_full_text
    max_time: MaxTime | None = None
    stop: Stop = None
    stop_sequences: Stop = None  # the old TGI name
    seed: Seed | None = None
    truncate: Annotated[int, Field(ge=1, strict=True)] | StrictBool | None = None
    details: StrictBool | None = None
    decoder_input_details: StrictBool | None = None
    top_n_tokens: Annotated[int, Field(ge=0, le=MAX_LOGPROBS, strict=True)] | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N, strict=True)] | None = None
    watermark: Literal[False] | None = None
    grammar: TGIGrammar | None = None
    adapter_id: StrictStr | None = None
    speculative: StrictBool | None = None  # false: no speculative decoding for this request (neoj extension)

    _stop = field_validator("stop", "stop_sequences")(check_stop)


class HFOptions(Strict):
    use_cache: StrictBool | None = None  # neoj always computes; accepted for compatibility
    wait_for_model: StrictBool | None = None  # the model is always loaded


class HFRequest(Strict):
    """POST /models/{id} and POST / (HF Inference API), POST /generate and /generate_stream (TGI)."""

    inputs: Union[StrictStr, Annotated[list[StrictStr], Field(min_length=1)]]
    parameters: HFParameters = Field(default_factory=HFParameters)
    options: HFOptions = Field(default_factory=HFOptions)
    stream: StrictBool | None = None


class FeatureExtractionRequest(Strict):
    """Feature extraction, as text-embeddings-inference's POST /embed takes it and huggingface_hub's
    InferenceClient.feature_extraction sends it (options at the top level, no "parameters").

    neoj's vectors are mean-pooled final hidden states, left as they are unless normalize is true (so that
    they equal LanguageModel.embed and /v1/embeddings); TEI normalizes by default.
    """

    inputs: Union[StrictStr, Annotated[list[StrictStr], Field(min_length=1)]]
    normalize: StrictBool | None = None
    truncate: StrictBool | None = None  # keep the first tokens (or the last, truncation_direction "left")
    truncation_direction: Literal["left", "right", "Left", "Right"] | None = None
    prompt_name: StrictStr | None = None  # sentence-transformers prompts: a GPT model has none (422)
    dimensions: Annotated[int, Field(ge=1, strict=True)] | None = None  # must be the hidden size
    encoding_format: Literal["float"] | None = None
    options: HFOptions = Field(default_factory=HFOptions)


class TokenizeRequest(Strict):
    """POST /tokenize in vLLM's shape (a prompt or chat messages) or TGI's ({"inputs": ...})."""

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: StrictBool | None = None  # GPT-2's tokenizer adds none either way
    add_generation_prompt: StrictBool | None = None
    return_token_strs: StrictBool | None = None
    inputs: StrictStr | None = None  # TGI
    parameters: dict | None = None  # TGI sends generation parameters; tokenizing ignores them


class DetokenizeRequest(Strict):
    """POST /detokenize (vLLM)."""

    model: StrictStr | None = None
    tokens: Annotated[list[Annotated[int, Field(ge=0, strict=True)]], Field(max_length=1_000_000)]


# ---- error bodies, for the OpenAPI schema (the handlers build them as dicts, see app.error_body) ----

class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """Errors under /v1, in OpenAI's shape."""

    error: OpenAIErrorDetail


class HFError(BaseModel):
    """Errors of the Hugging Face and TGI routes, in their shape (huggingface_hub raises on it)."""

    error: str
    error_type: str


class KoboldErrorDetail(BaseModel):
    msg: str
    type: str


class KoboldError(BaseModel):
    """Errors under /api, in KoboldAI's shape: {"detail": {"msg", "type"}} (SillyTavern shows detail.msg; Lite
    offers to abort on type "service_unavailable")."""

    detail: KoboldErrorDetail

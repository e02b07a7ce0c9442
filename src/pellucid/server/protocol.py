"""Request bodies of the HTTP API (pydantic), checked before anything runs.

Unknown fields are an error naming the field, never silently ignored, except a few that
change nothing here (`user`, `store`, `metadata`, `service_tier`). pellucid's extras
(the sampling controls OpenAI lacks, such as top_k, min_p and repetition_penalty, and
min_tokens, stop_token_ids, ignore_eos, processed_logprobs) ride along as extra body
fields; OpenAI's client sends them with `extra_body={...}`. Ranges are checked once, by SamplingParams, whose errors name the
field and the allowed range.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from pellucid.sampling.params import KNOBS


class _Body(BaseModel):
    # strict: "4" is not the integer 4 and "yes" is not true (a client sending them has a bug to hear about);
    # an integer is still a valid float
    model_config = ConfigDict(extra="forbid", strict=True)


class _ExtraFields(_Body):
    """pellucid's extras beside the numeric controls, shared by every generation endpoint."""

    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    processed_logprobs: bool | None = None
    # the residual stream (pellucid.steering), checked by the request builder
    steer: Any = None
    capture: dict[str, Any] | None = None


# the numeric controls that OpenAI's and Anthropic's bodies lack, from their declaration
# (sampling.params.KNOBS): a new control is an extra field of every body without a line here
_Extras = create_model(
    "_Extras", __base__=_ExtraFields, **{name: (k.kind | None, None) for name, k in KNOBS.items() if k.extra}
)  # fmt: skip


STREAM_FIELDS = ("steer", "capture")


def extras(body: _Extras) -> dict[str, Any]:
    """The sampling extras a body holds, by their SamplingParams names (None: not given)."""
    return {name: getattr(body, name) for name in _Extras.model_fields if name not in STREAM_FIELDS}


class ActivationsRequest(_Body):
    """POST /v1/activations: the residual stream of a batch of texts, for probes."""

    model: str | None = None
    input: str | list[str] | list[list[int]]
    layers: int | list[int] | str
    positions: str | list[int] = "last"
    steer: Any = None
    format: str = "safetensors"


class StreamOptions(_Body):
    include_usage: bool = False


class _OpenAISampling(_Extras):
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    response_format: dict[str, Any] | None = None
    # Accepted and ignored: they change nothing on a local server.
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None


class ChatCompletionRequest(_OpenAISampling):
    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # tool calling: checked by pellucid.text.tools, whose errors name the field
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


class ResponsesRequest(_Extras):
    """OpenAI's Responses API (POST /v1/responses): input items, instructions, function tools,
    text.format; pellucid's sampling extras ride along as on chat completions."""

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    include: list[str] | None = None
    stream: bool | None = False
    previous_response_id: str | None = None
    store: bool | None = None
    # beyond OpenAI's own, as on chat completions
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # Accepted: they change nothing on a local server (truncation "auto" or "disabled": a prompt
    # that does not fit is refused either way; reasoning: no reasoning model here)
    metadata: dict[str, Any] | None = None
    user: str | None = None
    service_tier: str | None = None
    truncation: str | None = None
    reasoning: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    stream_options: dict[str, Any] | None = None
    max_tool_calls: int | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None


class CompletionRequest(_OpenAISampling):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # legacy: how many top alternatives, 0..20
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


class AnthropicOutputConfig(_Body):
    """Anthropic's structured outputs (the SDK's messages.parse): format is
    {"type": "json_schema", "schema": {...}}, checked in pellucid.server.anthropic."""

    format: dict[str, Any] | None = None
    effort: str | None = None  # accepted: how long a reasoning model thinks; no reasoning model here


class AnthropicMessagesRequest(_Extras):
    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = False
    metadata: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: dict[str, Any] | None = None
    output_config: AnthropicOutputConfig | None = None
    # pellucid's extras beyond Anthropic's own (OpenAI-style penalties, seed)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None


class AnthropicCountTokensRequest(_Body):
    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[Any] | None = None
    tool_choice: dict[str, Any] | None = None
    output_config: AnthropicOutputConfig | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True  # the model's BOS, where it uses one (raw prompts only)
    add_generation_prompt: bool = True  # chat messages only


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class InfillFile(_Body):
    filename: str = ""
    text: str


class InfillRequest(_Body):
    """llama-server's /infill: the code before and after the gap, other files for context."""

    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[InfillFile] | None = None
    prompt: str | None = None  # text right before the cursor, after input_prefix
    n_predict: int | None = None  # -1 or absent: the default (128)
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    model: str | None = None
    cache_prompt: bool | None = None  # accepted: the prefix cache always applies where exact

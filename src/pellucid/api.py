"""The Python API: `LLM("smollm2-135m-instruct").chat([...])`.

Every door (this API, the CLI, the HTTP server) drives the same Engine and consumes the
same stream of RequestOutputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from pellucid import registry, runtime, steering
from pellucid.engine.engine import Engine
from pellucid.engine.request import Request, RequestOutput, TokenLogprob
from pellucid.engine.speculative import from_option
from pellucid.errors import PellucidError
from pellucid.loading import LoadedModel, load_model
from pellucid.models.layers import ForwardContext
from pellucid.prompts.chat_session import ChatSession
from pellucid.prompts.compose import with_system
from pellucid.sampling.constraints import (
    Constraint,
    check_output,
    instruction,
    is_incomplete,
    pop_constraint,
)
from pellucid.sampling.params import SamplingParams, build_params
from pellucid.text.tools import (
    Tool,
    ToolList,
    add_to_system,
    call_format,
    parse_answer,
    parse_tool_choice,
    parse_tools,
    repeat_watch,
)
from pellucid.text.tools import constraint as tool_constraint


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt: str | None = None
    incomplete: bool = False  # structured output cut before the grammar was complete: not valid
    tool_calls: list = field(default_factory=list)  # pellucid.text.tools.ToolCall, when tools were given
    schema_error: str | None = None  # a finished output that does not validate (oneOf generated as anyOf, strict=False)
    activations: dict[int, torch.Tensor] | None = None  # with capture=: layer -> (positions, E) residual stream
    capture_positions: list[int] = field(default_factory=list)  # the prompt positions those rows are

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class LLM:
    """A loaded model with its tokenizer, chat template and engine."""

    def __init__(self, model: str = registry.DEFAULT_MODEL, *, dtype: str = runtime.DEFAULT_DTYPE, device: str = "cpu",
                 max_batch: int = runtime.ENGINE.max_batch, max_len: int | None = None, use_cache: bool = True,
                 loaded: LoadedModel | None = None, quant: str | None = runtime.DEFAULT_QUANT,
                 speculative: Any = None, prefix_cache: bool | None = None,
                 prefix_cache_mib: int = runtime.ENGINE.prefix_cache_mib, kv_cache_mib: int | None = None,
                 prefill_chunk: int = runtime.ENGINE.prefill_chunk,
                 step_tokens: int = runtime.ENGINE.step_tokens, progress: Any = None, steering_dir: Any = None):  # fmt: skip
        """The defaults are the CLI's and the server's (pellucid.runtime): the file's quantized
        blocks (quant="int4"), activations in the dtype "auto" picks. quant: "int8", "int4"
        or "none"; speculative: "ngram", "model", a dict or SpeculativeConfig: single requests
        (not batches, not structured output) decode speculatively (engine/speculative/).
        prefix_cache: reuse the cached keys and values of earlier prompts that start the same
        way (default: on where that leaves outputs unchanged, the fused CPU path), keeping up
        to prefix_cache_mib MiB of finished requests' caches (engine/engine.py). max_len: the
        context window (default: the model's); kv_cache_mib: the memory every request's keys and
        values share (default: a quarter of what is available; engine/kv_cache.py). progress: a
        pellucid.progress.Progress told each phase of the load. steering_dir: the folder of named
        steering vectors (default $PELLUCID_HOME/steering; pellucid.steering)."""
        self.loaded = loaded or load_model(model, dtype=dtype, device=device, max_len=max_len, quant=quant, progress=progress)
        self.model_name = str(model)
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.chat_template = self.loaded.chat_template
        self.config = self.loaded.config
        self.engine = Engine(self.loaded, max_batch=max_batch, max_len=max_len, use_cache=use_cache, device=device,
                             prefix_cache=prefix_cache, prefix_cache_mib=prefix_cache_mib, kv_cache_mib=kv_cache_mib,
                             prefill_chunk=prefill_chunk, step_tokens=step_tokens)  # fmt: skip
        self.steering = steering.SteeringLibrary(steering_dir)  # named vectors (pellucid steer make)
        self.speculative = None
        if speculative is not None:

            self.speculative = from_option(self.loaded, speculative, max_len=self.engine.max_len)

    # -- prompts ----------------------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                    system: Any = None, style: Any = None, tools: list | None = None,
                    constraint: Constraint | None = None) -> str:  # fmt: skip
        """The prompt text for `messages`; `system` (text, SystemPrompt, PromptFile or a NAME@VERSION
        reference) and `style` (pellucid.prompts.Style) go first, few-shot examples as prior turns.
        tools (pellucid.text.tools.Tool list) are shown as the template renders them or in the
        default tools section; a constraint is stated in the system message ("answer in JSON ...")."""
        if system is not None or style is not None:

            messages = with_system(messages, system, style)
        if constraint is not None and not tools:
            messages = add_to_system(messages, instruction(constraint))
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)

    def tool_constraint(self, tools: Any, tool_choice: Any = None, parallel_tool_calls: bool | None = None,
                        **names: str) -> tuple[list[Tool], list[Tool] | None, Constraint | None]:  # fmt: skip
        """(all tools, the tools to show the model, the constraint) for tools in OpenAI's or
        Anthropic's shape and a tool_choice (pellucid.text.tools); `names` rename the fields
        in errors (tools=, tool_choice=)."""
        tmpl = self.chat_template
        all_tools = ToolList(parse_tools(tools, param=names.get("tools", "tools")), call_format(tmpl.source, tmpl.supports_tools))
        choice = parse_tool_choice(tool_choice, all_tools, parallel=parallel_tool_calls, param=names.get("tool_choice", "tool_choice"))
        c = tool_constraint(self.tokenizer, all_tools, choice, vocab_size=self.config.vocab_size)
        return all_tools, (all_tools if choice.mode != "none" else None), c

    def count_tokens(self, text_or_messages: str | list[dict[str, Any]], *, system: Any = None, style: Any = None) -> int:
        """Tokens the engine feeds the model: for a text, as a raw prompt; for messages, through
        the chat template (with `system` and `style` as in `chat`)."""
        if isinstance(text_or_messages, str) and system is None and style is None:
            return len(self.tokenizer.encode(text_or_messages))
        if isinstance(text_or_messages, str):
            text_or_messages = [{"role": "user", "content": text_or_messages}]
        return len(self.tokenizer.encode(self.render_chat(text_or_messages, system=system, style=style)))

    def session(self, system: Any = None, style: Any = None, **kw: Any):
        """A multi-turn ChatSession that keeps the conversation inside the context window
        (pellucid.prompts.chat_session: window=, reserve=, params=, limits=)."""

        return ChatSession(self, system=system, style=style, **kw)

    @torch.inference_mode()
    def prompt_logprobs(self, prompt: str | list[int], top: int = 0, *, chunk: int = 256,
                        steer: Any = None) -> list[TokenLogprob | None]:  # fmt: skip
        """Each prompt token's log-probability given the tokens before it (None for the first),
        with the `top` most likely alternatives: what a completion with echo and logprobs
        returns, and what evaluation harnesses score answers by. One forward over the prompt
        (the readable path, float32 log-softmax of the raw logits), the head in `chunk`-row pieces;
        `steer` as in `generate`, on every position."""
        ids = self.encode_prompt(prompt)
        if not 0 <= top <= 20:
            raise PellucidError(f"top = {top} is out of range; allowed: 0 to 20", param="logprobs")
        x = torch.tensor([ids], device=self.engine.device)
        ctx = ForwardContext.full(x)
        s = steering.resolve(steer, self.config, self.steering, dtype=self.engine_dtype, device=self.engine.device)
        if s is not None:
            rows = torch.arange(len(ids), device=x.device)
            ctx.steer = {i: (rows, v.expand(len(ids), -1)) for i, v in s.layers.items()}
        hidden = self.model.final_hidden(x, ctx)[0]  # (T, E), after the final norm
        out: list[TokenLogprob | None] = [None]
        for a in range(0, len(ids) - 1, chunk):
            logp = torch.log_softmax(self.model.unembed(hidden[a : min(a + chunk, len(ids) - 1)]).float(), dim=-1)  # (n, V)
            nxt = torch.tensor(ids[a + 1 : a + 1 + logp.shape[0]], device=logp.device)
            chosen = logp.gather(1, nxt[:, None])[:, 0].tolist()
            alts = logp.topk(top, dim=-1) if top else None
            for i, lp in enumerate(chosen):
                alt = list(zip(alts.indices[i].tolist(), alts.values[i].tolist(), strict=True)) if alts is not None else []
                out.append(TokenLogprob(ids[a + 1 + i], lp, alt))
        return out

    def encode_prompt(self, prompt: str | list[int], *, limit: int | None = None) -> list[int]:
        """Token ids of a prompt. With `limit` (the server's context window), a text too long to fit
        however it tokenizes is refused before tokenizing (a hostile 5 MB body costs no tokenizer time)."""
        if isinstance(prompt, str):
            if limit is not None:
                at_least = len(prompt.encode("utf-8", errors="replace")) // self.tokenizer.max_token_bytes
                if at_least > limit:
                    raise PellucidError(
                        f"This model's context window is {limit} tokens; the prompt has at least {at_least} tokens "
                        f"({len(prompt):,} characters). Shorten the prompt.", param="messages", code="context_length_exceeded",
                    )  # fmt: skip
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(i, int) for i in prompt):
            return list(prompt)
        raise PellucidError("prompt must be a string or a list of token ids", param="prompt")

    def request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                constraint=None, *, steer: Any = None, capture: Any = None) -> Request:  # fmt: skip
        """steer: steering items, 'NAME[:scale][@layers]' or a SteeringVector (pellucid.steering.resolve);
        capture: {layers, positions} of the residual stream to read (pellucid.steering.parse_capture)."""
        ids = self.encode_prompt(prompt)
        s = steering.resolve(steer, self.config, self.steering, dtype=self.engine_dtype, device=self.engine.device)
        c = steering.parse_capture(capture, self.config)
        return self.engine.make_request(ids, params, request_id, constraint, steer=s, capture=c)

    @property
    def engine_dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    # -- the residual stream ------------------------------------------------------------------
    def activations(self, texts: list[str] | list[list[int]], capture: Any, *, progress: Any = None,
                    steer: Any = None) -> list[dict[int, torch.Tensor]]:  # fmt: skip
        """The residual stream of each text after `capture`'s layers at its positions:
        per text {layer: (positions, E) float32}. Runs through the engine in batches (the served
        format, the fused path); `progress`: a pellucid.progress.Progress."""
        cap = steering.parse_capture(capture, self.config)
        if cap is None:
            raise PellucidError("activations need capture={layers, positions}", param="capture")
        params = SamplingParams(max_tokens=1, temperature=0.0)
        out: list[dict[int, torch.Tensor]] = []
        step = max(1, self.engine.max_batch)
        if progress is not None:
            progress.start("reading the residual stream", len(texts))
        for at in range(0, len(texts), step):
            reqs = [self.request(t, params, steer=steer, capture=cap) for t in texts[at : at + step]]
            self._run_batch(reqs, prompts=[None] * len(reqs))
            out += [r.activations() for r in reqs]
            if progress is not None:
                progress.advance(len(reqs))
        return out

    def make_steering_vector(self, positive: list[str], negative: list[str], *, layers: Any = None,
                             position: str = "mean", name: str = "", progress: Any = None) -> steering.SteeringVector:  # fmt: skip
        """A steering vector from contrasting examples: the mean residual stream of `positive`
        minus that of `negative`, per layer (pellucid.steering.make_vector); `.save(path)` writes
        llama.cpp's control-vector GGUF."""
        if isinstance(layers, str):
            layers = steering.parse_layers(layers)
        return steering.make_vector(self, positive, negative, layers=layers, position=position, name=name, progress=progress)

    # -- generation ---------------------------------------------------------------------------
    def stream_request(self, req: Request) -> Iterator[RequestOutput]:
        if self.speculates(req):
            return self.speculative.run(req)
        return self.engine.run(req)

    def speculates(self, req: Request) -> bool:
        """Whether `req` decodes speculatively: single, unconstrained, unsteered, nothing captured."""
        return (self.speculative is not None and req.constraint is None and req.params.n == 1
                and req.steer is None and req.capture is None)  # fmt: skip

    def structured(self, kw: dict[str, Any]) -> Constraint | None:
        """Pop the structured-output keywords (response_format, json, json_schema, regex,
        choice, grammar, strict, constraint) from `kw` and build their constraint."""
        return pop_constraint(self.tokenizer, kw, vocab_size=self.config.vocab_size)

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None, *, steer: Any = None,
               **kw: Any) -> Iterator[str]:  # fmt: skip
        """Raw completion, streamed as text pieces."""
        c = self.structured(kw)
        req = self.request(prompt, build_params(params, kw), constraint=c.copy() if c else None, steer=steer)
        for out in self.stream_request(req):
            if out.new_text:
                yield out.new_text

    def stream_chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None, *, system: Any = None,
                    style: Any = None, **kw: Any) -> Iterator[str]:  # fmt: skip
        return self.stream(self.render_chat(messages, system=system, style=style), params, **kw)

    def generate(self, prompt: str | list[int] | list[str], params: SamplingParams | None = None, *, steer: Any = None,
                 capture: Any = None, **kw: Any):  # fmt: skip
        """Raw completion of one prompt (-> Completion) or of a list of prompts, batched (-> list).

        Structured output: json=True, json_schema=..., regex=..., choice=[...], grammar=...,
        or response_format={...} (OpenAI's); see pellucid.sampling.constraints. steer: add
        steering vectors to the residual stream ("NAME[:scale][@layers]", a SteeringVector or
        [{vector, layers, scale}]); capture: {layers, positions} read into Completion.activations."""
        c = self.structured(kw)
        p = build_params(params, kw)
        if isinstance(prompt, list) and prompt and all(isinstance(x, str) for x in prompt):
            reqs = [self.request(x, p, constraint=c.copy() if c else None, steer=steer, capture=capture) for x in prompt]
            return self._run_batch(reqs, prompts=prompt)
        req = self.request(prompt, p, constraint=c.copy() if c else None, steer=steer, capture=capture)
        return self._run_batch([req], prompts=[prompt if isinstance(prompt, str) else None])[0]

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None, *, system: Any = None,
             style: Any = None, tools: list | None = None, tool_choice: Any = None,
             parallel_tool_calls: bool | None = None, steer: Any = None, capture: Any = None, **kw: Any) -> Completion:  # fmt: skip
        """Chat completion; `system` and `style` as in `render_chat`.

        tools: OpenAI's or Anthropic's tool list; tool_choice "auto" (default), "none",
        "required" or a named tool; the answer's calls are in `Completion.tool_calls`
        (finish_reason "tool_calls"), any text in `text` (pellucid.text.tools)."""
        c = self.structured(kw)
        shown = all_tools = None
        if tools is not None:
            if c is not None:
                raise PellucidError("give tools or a structured-output constraint, not both", param="tools")
            all_tools, shown, c = self.tool_constraint(tools, tool_choice, parallel_tool_calls)
        text = self.render_chat(messages, system=system, style=style, tools=shown, constraint=c)
        req = self.request(text, build_params(params, kw), constraint=c.copy() if c else None, steer=steer, capture=capture)
        if all_tools is not None:
            req.stop_when = repeat_watch(all_tools)  # a model that repeats its call is done
        out = self._run_batch([req], prompts=[text])[0]
        if all_tools is not None:
            out.text, out.tool_calls, complete = parse_answer(out.text, all_tools)
            if out.tool_calls and complete and out.finish_reason == "stop":
                out.finish_reason = "tool_calls"
        elif out.finish_reason == "stop" and not out.incomplete:
            out.schema_error = check_output(c, out.text)
        return out

    def _run_batch(self, reqs: list[Request], prompts: list) -> list[Completion]:
        logprobs: dict[str, list[TokenLogprob]] = {r.request_id: [] for r in reqs}
        if len(reqs) == 1 and self.speculates(reqs[0]):
            for o in self.stream_request(reqs[0]):  # runs it to the end: the engine below has nothing to do
                logprobs[o.request_id] += o.logprobs
        for r in reqs:
            if not r.finished:
                self.engine.add_request(r)
        try:
            while not all(r.finished for r in reqs):
                for o in self.engine.step():
                    if o.request_id in logprobs:
                        logprobs[o.request_id] += o.logprobs
        finally:
            for r in reqs:
                if not r.finished:
                    self.engine.abort(r.request_id)
        failed = next((r for r in reqs if r.error), None)
        if failed is not None:
            raise PellucidError(failed.error, status=500, code="engine_error")
        return [
            Completion(r.text, list(r.output_ids), r.finish_reason, r.stop_reason, len(r.prompt_ids),
                       len(r.output_ids), logprobs[r.request_id], prompt,
                       is_incomplete(r.constraint, r.finish_reason, r.stop_reason),
                       activations=r.activations() if r.capture is not None else None,
                       capture_positions=r.capture_positions)  # fmt: skip
            for r, prompt in zip(reqs, prompts, strict=True)
        ]

"""pellucid generate / chat."""

from __future__ import annotations

import sys
import time

import typer
from rich.console import Console

from pellucid.cli import app
from pellucid.cli.common import (
    DEFAULT_DTYPE, DEFAULT_MODEL, Dtype, FrequencyPenalty, MaxTokens, MinP, Model, PresencePenalty,
    RepetitionPenalty, Seed, Stop, Temperature, TopK, TopP,
)  # fmt: skip

err = Console(stderr=True)


def _params(**kw):
    from pellucid.sampling.params import SamplingParams

    kw["stop"] = list(kw.get("stop") or [])
    return SamplingParams(**kw)


def _load(model: str, dtype: str):
    from pellucid.api import LLM

    t = time.perf_counter()
    with err.status(f"loading {model} ({dtype})"):
        llm = LLM(model, dtype=dtype)
    err.print(f"[dim]loaded {model} in {time.perf_counter() - t:.1f} s[/]")
    return llm


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="Text to continue (raw completion, no chat template)."),
    model: Model = DEFAULT_MODEL,
    dtype: Dtype = DEFAULT_DTYPE,
    max_tokens: MaxTokens = 128,
    temperature: Temperature = 0.0,
    seed: Seed = None,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    frequency_penalty: FrequencyPenalty = 0.0,
    presence_penalty: PresencePenalty = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    stop: Stop = None,
) -> None:
    """Continue PROMPT; prints only the continuation, streamed."""
    params = _params(max_tokens=max_tokens, temperature=temperature, seed=seed, top_k=top_k, top_p=top_p, min_p=min_p,
                     frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                     repetition_penalty=repetition_penalty, stop=stop)  # fmt: skip
    llm = _load(model, dtype)
    for piece in llm.stream(prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command()
def chat(
    model: Model = DEFAULT_MODEL,
    dtype: Dtype = DEFAULT_DTYPE,
    system: str | None = typer.Option(None, "--system", "-s", help="System prompt."),
    once: str | None = typer.Option(None, "--once", help="Answer this one message and exit."),
    max_tokens: MaxTokens = 512,
    temperature: Temperature = 0.0,
    seed: Seed = None,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    frequency_penalty: FrequencyPenalty = 0.0,
    presence_penalty: PresencePenalty = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    stop: Stop = None,
) -> None:
    """Talk to the model, multi-turn, streaming tokens as they come. Ctrl-D or /exit ends."""
    params = _params(max_tokens=max_tokens, temperature=temperature, seed=seed, top_k=top_k, top_p=top_p, min_p=min_p,
                     frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                     repetition_penalty=repetition_penalty, stop=stop)  # fmt: skip
    llm = _load(model, dtype)
    messages = [{"role": "system", "content": system}] if system else []
    interactive = once is None
    while True:
        if interactive:
            try:
                user = input("> " if sys.stdin.isatty() else "")
            except EOFError:
                break
            if user.strip() in ("/exit", "/quit"):
                break
            if not user.strip():
                continue
        else:
            user = once
        messages.append({"role": "user", "content": user})
        reply = []
        for piece in llm.stream_chat(messages, params):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
        if not interactive:
            break

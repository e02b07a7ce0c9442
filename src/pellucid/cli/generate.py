"""pellucid generate / chat."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from pellucid.cli import app
from pellucid.cli.common import (
    DEFAULT_DTYPE,
    ConfigFile,
    Dtype,
    FrequencyPenalty,
    IgnoreEos,
    LogitBias,
    MaxTokens,
    MinP,
    MinTokens,
    Model,
    PresencePenalty,
    RepetitionPenalty,
    Seed,
    Stop,
    StopTokenId,
    Temperature,
    TopK,
    TopP,
    build_params,
    fit_context,
    load_llm,
    model_name,
    read_config,
    sampling_flags,
)
from pellucid.cli.prompts import (
    CtxSize,
    Depth,
    Formality,
    FormatSkeleton,
    Length,
    MaxWords,
    Persona,
    PromptFileRef,
    ShowPrompt,
    Structure,
    chat_loop,
    choose_system,
    make_store,
    make_style,
)

err = Console(stderr=True)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="Text to continue (raw completion, no chat template)."),
    model: Model = None,
    dtype: Dtype = DEFAULT_DTYPE,
    config: ConfigFile = None,
    max_tokens: MaxTokens = None,
    min_tokens: MinTokens = None,
    temperature: Temperature = None,
    seed: Seed = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    frequency_penalty: FrequencyPenalty = None,
    presence_penalty: PresencePenalty = None,
    repetition_penalty: RepetitionPenalty = None,
    logit_bias: LogitBias = None,
    stop: Stop = None,
    stop_token_id: StopTokenId = None,
    ignore_eos: IgnoreEos = False,
) -> None:
    """Continue PROMPT; prints only the continuation, streamed.

    Defaults: greedy (temperature 0), 128 tokens; a --config file overrides them and the
    flags you give override the config.
    """
    flags = sampling_flags(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                           frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                           repetition_penalty=repetition_penalty, logit_bias=logit_bias, stop=stop,
                           stop_token_id=stop_token_id, max_tokens=max_tokens, min_tokens=min_tokens,
                           seed=seed, ignore_eos=ignore_eos)  # fmt: skip
    defaults = {"max_tokens": 128, "temperature": 0.0}
    cfg = read_config(config)
    build_params(defaults, cfg, flags, None, without_bias=True)  # bad values fail before the load
    if cfg is not None and cfg.system_prompt:
        err.print("[dim]note: the config's system_prompt is used by `pellucid chat`; generate is raw completion[/]")
    llm = load_llm(model_name(model, cfg), dtype)
    params = build_params(defaults, cfg, flags, llm.tokenizer)
    fit_context(llm, len(llm.encode_prompt(prompt)), params.max_tokens)
    for piece in llm.stream(prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command()
def chat(
    model: Model = None,
    dtype: Dtype = DEFAULT_DTYPE,
    config: ConfigFile = None,
    system: str | None = typer.Option(None, "--system", "-s", help="System prompt (default: the config's system_prompt)."),
    prompt_file: PromptFileRef = None,
    once: str | None = typer.Option(None, "--once", help="Answer this one message and exit."),
    show_prompt: ShowPrompt = False,
    ctx_size: CtxSize = None,
    length: Length = None, formality: Formality = None, structure: Structure = None, persona: Persona = None,
    depth: Depth = None, max_words: MaxWords = None, format_skeleton: FormatSkeleton = None,
    max_tokens: MaxTokens = None,
    min_tokens: MinTokens = None,
    temperature: Temperature = None,
    seed: Seed = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    frequency_penalty: FrequencyPenalty = None,
    presence_penalty: PresencePenalty = None,
    repetition_penalty: RepetitionPenalty = None,
    logit_bias: LogitBias = None,
    stop: Stop = None,
    stop_token_id: StopTokenId = None,
    ignore_eos: IgnoreEos = False,
) -> None:
    """Talk to the model, multi-turn, streaming tokens as they come. Ctrl-D or /exit ends.

    Defaults: greedy (temperature 0), 512 tokens a reply; a --config file overrides them
    and the flags you give override the config. The conversation stays inside the context
    window (--ctx-size, default the model's): the oldest turns are dropped first, with a
    note on stderr; the system prompt and the new message never are.
    """
    flags = sampling_flags(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                           frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                           repetition_penalty=repetition_penalty, logit_bias=logit_bias, stop=stop,
                           stop_token_id=stop_token_id, max_tokens=max_tokens, min_tokens=min_tokens,
                           seed=seed, ignore_eos=ignore_eos)  # fmt: skip
    defaults = {"max_tokens": 512, "temperature": 0.0}
    cfg = read_config(config)
    build_params(defaults, cfg, flags, None, without_bias=True)
    style = make_style(length, formality, structure, persona, depth, max_words, format_skeleton)
    chosen = choose_system(system, prompt_file, cfg, make_store(None, cfg))  # before the load: errors early
    llm = load_llm(model_name(model, cfg), dtype)
    params = build_params(defaults, cfg, flags, llm.tokenizer)
    chat_loop(llm, params, system=chosen, style=style, window=ctx_size, show_prompt=show_prompt, once=once)

"""pellucid generate / chat."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from pellucid.cli import app
from pellucid.cli.common import (
    DEFAULT_DTYPE,
    DEFAULT_QUANT,
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
    Quant,
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

JsonMode = typer.Option(False, "--json", help="Structured output: any JSON object.")
JsonSchema = typer.Option(None, "--json-schema", help="Structured output: JSON that validates against the schema in FILE.", metavar="FILE")
Regex = typer.Option(None, "--regex", help="Structured output: text that matches the regular expression.")
Choice = typer.Option(None, "--choice", help="Structured output: exactly one of these strings (repeatable).")
Grammar = typer.Option(None, "--grammar", help="Structured output: text of the Lark (or GBNF) grammar in FILE.", metavar="FILE")
Strict = typer.Option(True, "--strict/--no-strict", help="--no-strict: ignore schema keywords that cannot be enforced.")


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="Text to continue (raw completion, no chat template)."),
    model: Model = None,
    dtype: Dtype = DEFAULT_DTYPE,
    quant: Quant = DEFAULT_QUANT,
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
    json_mode: bool = JsonMode,
    json_schema: str | None = JsonSchema,
    regex: str | None = Regex,
    choice: list[str] | None = Choice,
    grammar: str | None = Grammar,
    strict: bool = Strict,
) -> None:
    """Continue PROMPT; prints only the continuation, streamed.

    Defaults: greedy (temperature 0), 128 tokens; a --config file overrides them and the
    flags you give override the config. With --json, --json-schema, --regex, --choice or
    --grammar (or the config's control.response_format) the output is constrained to it;
    an output cut by --max-tokens is reported as incomplete (exit code 1).
    """
    from pellucid.sampling.constraints import from_cli, from_response_format, is_incomplete

    flags = sampling_flags(locals())
    defaults = {"max_tokens": 128, "temperature": 0.0}
    cfg = read_config(config)
    build_params(defaults, cfg, flags, None, without_bias=True)  # bad values fail before the load
    structured = dict(json=json_mode, json_schema=json_schema, regex=regex, choice=choice, grammar=grammar, strict=strict)
    from_cli(None, **structured)  # a bad schema or grammar fails before the load too
    if cfg is not None and cfg.system_prompt:
        err.print("[dim]note: the config's system_prompt is used by `pellucid chat`; generate is raw completion[/]")
    llm = load_llm(model_name(model, cfg), dtype, quant)
    params = build_params(defaults, cfg, flags, llm.tokenizer)
    fit_context(llm, len(llm.encode_prompt(prompt)), params.max_tokens)
    constraint = from_cli(llm.tokenizer, **structured, vocab_size=llm.config.vocab_size)
    if constraint is None and cfg is not None and cfg.response_format:
        constraint = from_response_format(llm.tokenizer, cfg.response_format, vocab_size=llm.config.vocab_size)
    req = llm.request(prompt, params, constraint=constraint)
    for out in llm.stream_request(req):
        sys.stdout.write(out.new_text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if is_incomplete(constraint, req.finish_reason, req.stop_reason):
        err.print(f"[yellow]incomplete: the output ended ({req.finish_reason}) before the {constraint.kind} constraint "
                  f"was satisfied; it is not valid. Raise --max-tokens.[/]")  # fmt: skip
        raise typer.Exit(1)


@app.command()
def chat(
    model: Model = None,
    dtype: Dtype = DEFAULT_DTYPE,
    quant: Quant = DEFAULT_QUANT,
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
    flags = sampling_flags(locals())
    defaults = {"max_tokens": 512, "temperature": 0.0}
    cfg = read_config(config)
    build_params(defaults, cfg, flags, None, without_bias=True)
    style = make_style(length, formality, structure, persona, depth, max_words, format_skeleton)
    chosen = choose_system(system, prompt_file, cfg, make_store(None, cfg))  # before the load: errors early
    llm = load_llm(model_name(model, cfg), dtype, quant)
    params = build_params(defaults, cfg, flags, llm.tokenizer)
    chat_loop(llm, params, system=chosen, style=style, window=ctx_size, show_prompt=show_prompt, once=once)

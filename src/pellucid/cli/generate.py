"""pellucid generate / chat."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from pellucid.cli import app
from pellucid.cli.common import (
    DEFAULT_DTYPE,
    DEFAULT_QUANT,
    ConfigFile,
    Dtype,
    Model,
    Quant,
    Threads,
    check_params,
    command_params,
    load_llm,
    model_name,
    read_config,
    sampling_options,
    structured_options,
)
from pellucid.cli.display import SizedAtUse
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
from pellucid.cli.steer import SteerOpt, steer_items
from pellucid.errors import PellucidError
from pellucid.sampling.constraints import from_cli, from_response_format, is_incomplete
from pellucid.text.tools import parse_tools

err = SizedAtUse(stderr=True)

Tools = typer.Option(None, "--tools", help="Tool calling: the tools in FILE (JSON: a list in OpenAI's or Anthropic's shape).", metavar="FILE")
ToolChoiceOpt = typer.Option("auto", "--tool-choice", help="auto, none, required, or a tool's name.")


@app.command()
@sampling_options()
@structured_options
def generate(
    prompt: str = typer.Argument(..., help="Text to continue (raw completion, no chat template)."),
    model: Model = None,
    dtype: Dtype = DEFAULT_DTYPE,
    quant: Quant = DEFAULT_QUANT,
    threads: Threads = None,
    config: ConfigFile = None,
    steer: list[str] | None = SteerOpt,
    flags: dict = None,
    structured: dict = None,
) -> None:
    """Continue PROMPT; prints only the continuation, streamed.

    Defaults: greedy (temperature 0), 128 tokens; a --config file overrides them and the
    flags you give override the config. With --json, --json-schema, --regex, --choice or
    --grammar (or the config's control.response_format) the output is constrained to it;
    an output cut by --max-tokens is reported as incomplete (exit code 1).
    """

    defaults = {"max_tokens": 128, "temperature": 0.0}
    if not prompt.strip():
        raise PellucidError(f"the prompt {prompt!r} is empty or only whitespace: give the text to continue", param="PROMPT")
    cfg = read_config(config)
    name = model_name(model, cfg)
    check_params(defaults, cfg, flags, name)  # bad values fail before the load
    from_cli(None, **structured)  # a bad schema or grammar fails before the load too
    items = steer_items(steer)
    if cfg is not None and cfg.system_prompt:
        err.print("[dim]note: the config's system_prompt is used by `pellucid chat`; generate is raw completion[/]")
    llm = load_llm(name, dtype, quant, threads=threads)
    params = command_params(defaults, cfg, flags, llm.tokenizer)
    constraint = from_cli(llm.tokenizer, **structured, vocab_size=llm.config.vocab_size)
    if constraint is None and cfg is not None and cfg.response_format:
        constraint = from_response_format(llm.tokenizer, cfg.response_format, vocab_size=llm.config.vocab_size)
    req = llm.request(prompt, params, constraint=constraint, steer=items)
    for out in llm.stream_request(req):
        sys.stdout.write(out.new_text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if req.finish_reason == "length" and constraint is None:
        err.print(f"[dim]cut at --max-tokens {params.max_tokens}[/]")
    if is_incomplete(constraint, req.finish_reason, req.stop_reason):
        err.print(f"[yellow]incomplete: the output ended ({req.finish_reason}) before the {constraint.kind} constraint "
                  f"was satisfied; it is not valid. Raise --max-tokens.[/]")  # fmt: skip
        raise typer.Exit(1)


@app.command()
@sampling_options()
@structured_options
def chat(
    model: Model = None,
    dtype: Dtype = DEFAULT_DTYPE,
    quant: Quant = DEFAULT_QUANT,
    threads: Threads = None,
    config: ConfigFile = None,
    system: str | None = typer.Option(None, "--system", "-s", help="System prompt (default: the config's system_prompt)."),
    prompt_file: PromptFileRef = None,
    once: str | None = typer.Option(None, "--once", help="Answer this one message and exit."),
    show_prompt: ShowPrompt = False,
    ctx_size: CtxSize = None,
    length: Length = None, formality: Formality = None, structure: Structure = None, persona: Persona = None,
    depth: Depth = None, max_words: MaxWords = None, format_skeleton: FormatSkeleton = None,
    flags: dict = None,
    structured: dict = None,
    tools: str | None = Tools,
    tool_choice: str = ToolChoiceOpt,
    steer: list[str] | None = SteerOpt,
) -> None:
    """Talk to the model, multi-turn, streaming tokens as they come. Ctrl-D or /exit ends.

    Defaults: greedy (temperature 0), 512 tokens a reply; a --config file overrides them
    and the flags you give override the config. The conversation stays inside the context
    window (--ctx-size, default the model's): the oldest turns are dropped first, with a
    note on stderr; the system prompt and the new message never are.

    --json, --json-schema, --regex, --choice, --grammar (or the config's
    control.response_format): every reply is constrained, and the system message says so
    ("answer in JSON ..."). --tools FILE: the model may call them (--tool-choice), one
    call a reply, printed as a JSON line; the next line you type is that call's result.
    """

    defaults = {"max_tokens": 512, "temperature": 0.0}
    if once is not None and not once.strip():
        raise PellucidError(f"--once {once!r} is empty or only whitespace: give the message to answer", param="--once")
    cfg = read_config(config)
    name = model_name(model, cfg)
    check_params(defaults, cfg, flags, name)
    style = make_style(length, formality, structure, persona, depth, max_words, format_skeleton)
    chosen = choose_system(system, prompt_file, cfg, make_store(None, cfg))  # before the load: errors early
    from_cli(None, **structured)
    tool_list = _read_tools(tools) if tools else None
    items = steer_items(steer)
    llm = load_llm(name, dtype, quant, threads=threads)
    params = command_params(defaults, cfg, flags, llm.tokenizer)
    constraint = from_cli(llm.tokenizer, **structured, vocab_size=llm.config.vocab_size)
    if constraint is None and tool_list is None and cfg is not None and cfg.response_format:

        constraint = from_response_format(llm.tokenizer, cfg.response_format, vocab_size=llm.config.vocab_size)
    if constraint is None and tool_list is None:
        chat_loop(llm, params, system=chosen, style=style, window=ctx_size, show_prompt=show_prompt, once=once, steer=items)
        return
    if constraint is not None and tool_list is not None:
        raise PellucidError("give --tools or a structured-output flag (--json, ...), not both", param="--tools")
    choice_value = tool_choice if tool_choice in ("auto", "none", "required") else {"type": "function", "function": {"name": tool_choice}}
    structured_chat(llm, params, system=chosen, style=style, once=once, constraint=constraint, tools=tool_list,
                    tool_choice=choice_value, show_prompt=show_prompt, steer=items)  # fmt: skip


def _read_tools(path: str) -> list:

    p = Path(path).expanduser()
    if not p.is_file():
        raise PellucidError(f"--tools {path!r}: no such file", param="--tools")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise PellucidError(f"--tools {path}: not valid JSON: {e}", param="--tools") from None
    data = data.get("tools") if isinstance(data, dict) else data

    parse_tools(data, param="--tools")  # errors before the load
    return data


def structured_chat(llm, params, *, system=None, style=None, once: str | None = None, constraint=None, tools=None,
                    tool_choice=None, show_prompt: bool = False, lines=None, steer=None) -> None:  # fmt: skip
    """The chat loop for constrained replies and tool calls: each reply whole, then checked.
    After tool calls, the next line read is each call's result (role tool)."""

    stdin = lines if lines is not None else sys.stdin
    messages: list[dict] = []
    pending: list = []  # calls waiting for their results

    def read(prompt: str) -> str | None:
        if stdin is sys.stdin and sys.stdin.isatty():
            try:
                return input(prompt)
            except EOFError:
                return None
        line = stdin.readline()
        return None if not line else line.rstrip("\n")

    while True:
        if pending:
            call = pending.pop(0)
            result = read(f"result of {call.name}> ")
            if result is None:
                break
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
            if pending:
                continue
        else:
            user = once if once is not None and not messages else read("> ")
            if user is None or user.strip() in ("/exit", "/quit"):
                break
            if not user.strip():
                continue
            messages.append({"role": "user", "content": user})
        kw = {"tools": tools, "tool_choice": tool_choice, "parallel_tool_calls": False} if tools is not None else {"constraint": constraint}
        if show_prompt:
            shown = llm.tool_constraint(tools, tool_choice, False)[1] if tools is not None else None
            sys.stderr.write(llm.render_chat(messages, system=system, style=style, tools=shown, constraint=constraint) + "\n")
        out = llm.chat(messages, params, system=system, style=style, steer=steer, **kw)
        if out.text:
            sys.stdout.write(out.text + "\n")
        done = out.finish_reason == "tool_calls"
        for call in out.tool_calls:
            args = call.args if done else call.arguments  # (a call cut short is not JSON yet)
            sys.stdout.write(json.dumps({"id": call.id, "name": call.name, "arguments": args}, ensure_ascii=False) + "\n")
        sys.stdout.flush()
        reply = {"role": "assistant", "content": out.text}
        messages.append({**reply, "tool_calls": [c.openai() for c in out.tool_calls]} if done else reply)
        if out.incomplete or (out.tool_calls and not done):
            err.print(f"[yellow]incomplete: the reply ended ({out.finish_reason}) before its "
                      f"{'answer to the tools' if tools is not None else constraint.kind} was complete; it is not valid. Raise --max-tokens.[/]")  # fmt: skip
            if once is not None:
                raise typer.Exit(1)
        if out.schema_error:
            err.print(f"[yellow]the reply does not match the schema: {out.schema_error}[/]")
            if once is not None:
                raise typer.Exit(1)
        pending = list(out.tool_calls) if done and once is None else []
        if once is not None:
            break

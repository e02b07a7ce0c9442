"""pellucid prompt (list, show, diff, save), render, count and budget; the chat loop.

render, count and budget need only the model's tokenizer and chat template, which they
read from the model file's metadata: no weights are loaded. They render with the same
template as the engine (pellucid.text.gguf.gguf_text), so they show what the model receives.

pellucid.prompts (pydantic, yaml: about 0.3 s) and pellucid.text (jinja2) are imported
inside the commands, so that `pellucid --help` and the other commands do not pay for them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from pellucid.cli import app
from pellucid.cli.common import ConfigFile, Model, model_name, read_config
from pellucid.cli.display import SECTION, Col, SizedAtUse, show_table
from pellucid.errors import PellucidError

err = SizedAtUse(stderr=True, highlight=False)
out = SizedAtUse(highlight=False)

prompt_app = typer.Typer(
    help="Versioned prompt files: list, show, diff, save.", no_args_is_help=True, add_completion=False
)
app.add_typer(prompt_app, name="prompt")

# -- shared options --------------------------------------------------------------------------
PromptDirs = Annotated[list[Path] | None, typer.Option("--dir", "-d", help="Also look for prompt files in this folder (repeatable; searched first).")]
SystemText = Annotated[str | None, typer.Option("--system", "-s", help="System prompt text (or a NAME@VERSION prompt-file reference).")]
PromptFileRef = Annotated[str | None, typer.Option("--prompt-file", "-p", help="System prompt from a prompt file: NAME (latest version), NAME@VERSION, FILE or FILE@VERSION.")]
Length = Annotated[str | None, typer.Option("--length", help="Style: concise, detailed or exhaustive.")]
Formality = Annotated[str | None, typer.Option("--formality", help="Style: casual, professional or academic.")]
Structure = Annotated[str | None, typer.Option("--structure", help="Style: prose, lists, tables or code.")]
Persona = Annotated[str | None, typer.Option("--persona", help="Style: neutral, friendly or expert.")]
Depth = Annotated[str | None, typer.Option("--depth", help="Style: eli5, technical or expert.")]
MaxWords = Annotated[int | None, typer.Option("--max-words", help="Style: keep replies under this many words (checked after each reply).")]
FormatSkeleton = Annotated[str | None, typer.Option("--format-skeleton", help="Style: a response layout, e.g. summary-details-next-steps or answer-explanation (checked after each reply).")]
CtxSize = Annotated[int | None, typer.Option("--ctx-size", help="Context window for the budget, in tokens (default: the model's context length).")]
ShowPrompt = Annotated[bool, typer.Option("--show-prompt", help="Print the exact prompt the model receives (on stderr) before each answer.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def make_style(length=None, formality=None, structure=None, persona=None, depth=None, max_words=None,
               format_skeleton=None):  # fmt: skip
    """A Style from the style flags, or None when no flag was given."""
    from pellucid.prompts.styles import Style

    values = dict(length=length, formality=formality, structure=structure, persona=persona, depth=depth,
                  max_words=max_words, skeleton=format_skeleton)  # fmt: skip
    if all(v is None for v in values.values()):
        return None
    try:
        return Style(**values)
    except PellucidError as e:
        flag = "--format-skeleton" if "skeleton" in (e.param or "") else "--" + (e.param or "").split(".")[-1].replace("_", "-")
        raise PellucidError(f"{flag}: {e.message}", param=e.param) from None


def make_store(dirs: list[Path] | None = None, config=None):
    """The prompt store: --dir folders first, then the config file's folder, the user's, built-ins."""
    from pellucid.prompts.store import PromptStore

    paths = list(dirs or [])
    if config is not None and Path(config.source).is_file():
        paths.append(Path(config.source).parent)
    return PromptStore(paths)


def choose_system(system: str | None, prompt_file: str | None, config=None, store=None):
    """The system prompt from --system or --prompt-file, else the config's system_prompt."""
    from pellucid.prompts.compose import load_prompt

    if system is not None and prompt_file is not None:
        raise PellucidError("give --system or --prompt-file, not both", param="system")
    if prompt_file is not None:
        return load_prompt(prompt_file, store)
    if system is not None:
        return system
    if config is not None and (value := config.values.get("system_prompt")):
        from pellucid.prompts.compose import resolve_system_value

        try:  # a prompt file keeps its few-shot examples as real turns
            return resolve_system_value(value, config.base_dir)
        except PellucidError as e:
            raise PellucidError(f"{config.where('system_prompt')}: system_prompt: {e.message}",
                                param="system_prompt") from None  # fmt: skip
    return None


def load_counter(model: str | None, config=None, quiet: bool = False):
    """The model's tokenizer and chat template (metadata only: no weights)."""
    from pellucid.prompts.counting import TokenCounter

    name = model_name(model, config)
    with Console(stderr=True, quiet=quiet).status(f"reading the tokenizer of {name}"):
        return TokenCounter.for_model(name)


def read_messages(path: Path, what: str = "--messages") -> list[dict[str, Any]]:
    """A JSON file holding a list of {role, content}, or an object with "messages"."""
    from pellucid.prompts.counting import read_text
    from pellucid.text.chat_template import validate_messages

    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PellucidError(f"{what} {path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}",
                            param=what.lstrip("-")) from None  # fmt: skip
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    if not isinstance(data, list):
        raise PellucidError(f"{what} {path}: expected a JSON list of messages {{role, content}} "
                            f"(or an object with \"messages\"), got {type(data).__name__}", param=what.lstrip("-"))  # fmt: skip
    if not data:
        return []
    try:
        return validate_messages(data)
    except PellucidError as e:
        raise PellucidError(f"{what} {path}: {e.message}", param=e.param) from None


def _echo(text: str) -> None:
    """Write text exactly as it is (no markup), ending the line."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


# -- pellucid prompt ...  --------------------------------------------------------------------
@prompt_app.command("list")
def prompt_list(dirs: PromptDirs = None, json_out: JsonOut = False) -> None:
    """Every prompt version found: --dir folders, $PELLUCID_HOME/prompts, the built-ins."""
    store = make_store(dirs)
    prompts, errors = store.scan()
    for e in errors:
        err.print(f"[yellow]warning:[/] {escape(e.message)}", markup=True)
    if json_out:
        rows = [{"name": p.name, "version": p.version, "sha256": p.sha256, "description": p.description,
                 "path": str(p.path)} for p in prompts]  # fmt: skip
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    show_table(out, [Col("name"), Col("version"), Col("sha256"), Col("description", wrap=True)],
               [[p.name, p.version, p.short_hash, p.description] for p in prompts],
               title="prompts", caption="searched: " + ", ".join(str(d) for d in store.dirs))  # fmt: skip


@prompt_app.command("show")
def prompt_show(
    ref: str = typer.Argument(..., help="NAME (latest version), NAME@VERSION, or a prompt file: FILE or FILE@VERSION."),
    dirs: PromptDirs = None,
    yaml_out: bool = typer.Option(False, "--yaml", help="Print the prompt file itself (normalized YAML)."),
    json_out: JsonOut = False,
) -> None:
    """A prompt's version, content hash, source file, rendered system text and examples."""
    from pellucid.prompts.compose import load_prompt

    p = load_prompt(ref, make_store(dirs))
    if yaml_out:
        _echo(p.to_yaml())
        return
    if json_out:
        data = {"name": p.name, "version": p.version, "sha256": p.sha256, "path": str(p.path) if p.path else None,
                "description": p.description, "system": p.prompt.render(),
                "examples": [{"user": e.user, "assistant": e.assistant} for e in p.prompt.examples],
                "messages": p.prompt.prefix_messages()}  # fmt: skip
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    lines = [p.ref, f"  version      {p.version}", f"  sha256       {p.sha256}", f"  file         {p.path or '(not from a file)'}"]
    if p.description:
        lines.append(f"  description  {p.description}")
    _echo("\n".join(lines))
    out.rule("system prompt", style="dim")
    _echo(p.prompt.render() or "(empty)")
    if p.prompt.examples:
        out.rule(f"few-shot examples ({len(p.prompt.examples)}, sent as prior turns)", style="dim")
        _echo("\n\n".join(f"User: {e.user}\nAssistant: {e.assistant}" for e in p.prompt.examples))


@prompt_app.command("diff")
def prompt_diff(
    a: str = typer.Argument(..., help="The older prompt: NAME@VERSION, FILE or FILE@VERSION."),
    b: str = typer.Argument(..., help="The newer prompt: NAME@VERSION, FILE or FILE@VERSION."),
    dirs: PromptDirs = None,
    json_out: JsonOut = False,
) -> None:
    """What changed from A to B: field by field, then a unified diff of the rendered prompts."""
    from pellucid.prompts.compose import load_prompt
    from pellucid.prompts.diff import diff

    store = make_store(dirs)
    d = diff(load_prompt(a, store), load_prompt(b, store))
    if json_out:
        data = {"a": d.a, "b": d.b, "a_sha256": d.a_hash, "b_sha256": d.b_hash, "same_content": d.same_content,
                "fields": [{"field": c.field, "before": c.before, "after": c.after} for c in d.fields],
                "unified": d.unified}  # fmt: skip
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    for line in d.render().splitlines():
        style = "green" if line.startswith("+") else "red" if line.startswith("-") else "cyan" if line.startswith("@@") else None
        out.print(line, style=style, markup=False, soft_wrap=True)


@prompt_app.command("save")
def prompt_save(
    file: Path = typer.Argument(..., help="A prompt file (YAML) to check and add to the store."),
    to: Path | None = typer.Option(None, "--to", help="Folder to save into (default: $PELLUCID_HOME/prompts)."),
) -> None:
    """Check a prompt file (any file name) and save each version in it as NAME@VERSION.yaml.

    A version that is already saved with the same content is left alone; different content
    under an existing NAME@VERSION is refused: give it a new version.
    """
    from pellucid.prompts.files import load_file

    store = make_store()
    for p in load_file(file):
        where = store.save(p, to)
        out.print(f"{p.ref}  sha256:{p.short_hash}  {where}", markup=False, soft_wrap=True)


# -- pellucid render --------------------------------------------------------------------------
def _conversation(message: str | None, messages: Path | None, system: str | None, prompt_file: str | None,
                  dirs, cfg, style) -> list[dict[str, Any]]:  # fmt: skip
    from pellucid.prompts.compose import with_system

    msgs = read_messages(messages) if messages is not None else []
    if message is not None:
        msgs.append({"role": "user", "content": message})
    chosen = choose_system(system, prompt_file, cfg, make_store(dirs, cfg))
    if chosen is not None and msgs and msgs[0]["role"] == "system" and system is None and prompt_file is None:
        chosen = None  # the messages' own system message beats the config's
    msgs = with_system(msgs, chosen, style, store=make_store(dirs, cfg))
    if not msgs:
        raise PellucidError("nothing to render: give a MESSAGE, --messages FILE or a system prompt", param="messages")
    return msgs


@app.command()
def render(
    message: str | None = typer.Argument(None, help="The user's message (added after --messages)."),
    messages: Path | None = typer.Option(None, "--messages", help="JSON file: a list of {role, content}, or an object with \"messages\"."),
    system: SystemText = None,
    prompt_file: PromptFileRef = None,
    dirs: PromptDirs = None,
    length: Length = None, formality: Formality = None, structure: Structure = None, persona: Persona = None,
    depth: Depth = None, max_words: MaxWords = None, format_skeleton: FormatSkeleton = None,
    no_generation_prompt: bool = typer.Option(False, "--no-generation-prompt", help="Leave out the assistant header at the end."),
    tokens: bool = typer.Option(False, "--tokens", help="Also list the token ids and pieces (on stderr)."),
    model: Model = None,
    config: ConfigFile = None,
    json_out: JsonOut = False,
) -> None:  # fmt: skip
    """Show the exact prompt text the model receives, through its chat template, and its
    token count. A template without a system role gets the system text in the first user turn.
    """
    cfg = read_config(config)
    style = make_style(length, formality, structure, persona, depth, max_words, format_skeleton)
    msgs = _conversation(message, messages, system, prompt_file, dirs, cfg, style)
    counter = load_counter(model, cfg, quiet=json_out)
    text = counter.render(msgs, add_generation_prompt=not no_generation_prompt)
    ids = counter.encode(text)
    if json_out:
        data = {"model": counter.name, "prompt": text, "tokens": len(ids), "token_ids": ids, "messages": msgs,
                "system_role": counter.chat_template.supports_system}  # fmt: skip
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    sys.stdout.write(text)
    if not text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    note = "" if counter.chat_template.supports_system else "; no system role: system text folded into the first user turn"
    err.print(f"{len(ids):,} tokens ({counter.name}, {len(msgs)} messages{note})", style="dim", markup=False)
    if tokens:
        pieces = " ".join(f"{i}:{counter.tokenizer.piece(i)!r}" for i in ids)
        err.print(pieces, markup=False, soft_wrap=True)


# -- pellucid count ---------------------------------------------------------------------------
@app.command()
def count(
    text: str | None = typer.Argument(None, help="Text to count (as a raw completion prompt)."),
    file: Annotated[list[Path] | None, typer.Option("--file", "-f", help="Count a UTF-8 file (repeatable).")] = None,
    messages: Path | None = typer.Option(None, "--messages", help="Count chat messages (JSON list of {role, content}), template included."),
    tokens: bool = typer.Option(False, "--tokens", help="List the token ids and pieces of TEXT."),
    model: Model = None,
    config: ConfigFile = None,
    json_out: JsonOut = False,
) -> None:  # fmt: skip
    """Count tokens with the model's own tokenizer: TEXT, --file F, or --messages JSON-FILE
    (per message and in total, chat template overhead included: what the engine feeds the model).
    """
    given = sum(x is not None for x in (text, file or None, messages))
    if given != 1:
        raise PellucidError("give exactly one of TEXT, --file FILE or --messages FILE", param="text")
    cfg = read_config(config)
    msgs = read_messages(messages) if messages is not None else None
    if msgs is not None and not msgs:
        raise PellucidError(f"--messages {messages}: the list of messages is empty", param="messages")
    counter = load_counter(model, cfg, quiet=json_out)
    if text is not None:
        ids = counter.encode(text)
        if json_out:
            typer.echo(json.dumps({"model": counter.name, "tokens": len(ids), "token_ids": ids}))
            return
        out.print(f"{len(ids):,} tokens", markup=False)
        if tokens:
            out.print(" ".join(f"{i}:{counter.tokenizer.piece(i)!r}" for i in ids), markup=False, soft_wrap=True)
        return
    if file:
        counts = [(str(f), counter.count_file(f)) for f in file]
        total = sum(n for _, n in counts)
        if json_out:
            typer.echo(json.dumps({"model": counter.name, "files": [{"file": f, "tokens": n} for f, n in counts],
                                   "total": total}))  # fmt: skip
            return
        rows = [[f, f"{n:,}"] for f, n in counts] + ([SECTION, ["total", f"{total:,}"]] if len(counts) > 1 else [])
        show_table(out, [Col("file"), Col("tokens", "right")], rows, title=f"tokens ({counter.name})")
        return
    assert msgs is not None
    c = counter.count_conversation(msgs)
    if json_out:
        data = {"model": counter.name, "total": c.total, "content": c.content, "overhead": c.overhead,
                "generation_prompt": c.generation_prompt,
                "messages": [{"index": r.index, "role": r.role, "content": r.content, "tokens": r.tokens,
                              "overhead": r.overhead} for r in c.rows]}  # fmt: skip
        typer.echo(json.dumps(data, indent=2))
        return
    show_message_counts(out, c, counter.name)


def show_message_counts(con, c, name: str = "") -> None:
    """Per-message counts: content alone, with its template markup, and the difference."""
    rows = [[str(r.index), r.role, f"{r.content:,}", f"{r.overhead:,}", f"{r.tokens:,}"] for r in c.rows]
    if c.rows:
        rows.append(["", "generation prompt", "", f"{c.generation_prompt:,}", f"{c.generation_prompt:,}"])
    rows += [SECTION, ["", "total", f"{c.content:,}", f"{c.overhead:,}", f"{c.total:,}"]]
    show_table(con, [Col("#", "right"), Col("role"), *(Col(h, "right") for h in ("content", "overhead", "tokens"))], rows,
               title=f"chat tokens ({name})" if name else "chat tokens", key=1,
               caption="tokens: what adding the message costs, template markup included")  # fmt: skip


# -- pellucid budget --------------------------------------------------------------------------
@app.command()
def budget(
    message: str = typer.Argument(..., help="The current user message (never dropped)."),
    window: int | None = typer.Option(None, "--window", "-w", help="Context window in tokens (default: the model's context length)."),
    reserve: int = typer.Option(512, "--reserve", "-r", help="Tokens kept free for the response."),
    system: SystemText = None,
    prompt_file: PromptFileRef = None,
    dirs: PromptDirs = None,
    history: Path | None = typer.Option(None, "--history", help="Earlier turns: JSON list of {role, content}; oldest turns are dropped first."),
    retrieved: Annotated[list[Path] | None, typer.Option("--retrieved", help="A retrieved-context file, one chunk each (repeatable; most relevant first: the last is dropped first).")] = None,
    limit_system: int | None = typer.Option(None, "--limit-system", help="Most tokens for the system prompt (a check: it is never cut)."),
    limit_retrieved: int | None = typer.Option(None, "--limit-retrieved", help="Most tokens for retrieved context."),
    limit_history: int | None = typer.Option(None, "--limit-history", help="Most tokens for conversation history."),
    limit_current: int | None = typer.Option(None, "--limit-current", help="Most tokens for the current message (a check: it is never cut)."),
    drop_first: str = typer.Option("history", "--drop-first", help="Which gives way first when both compete: history or retrieved."),
    context_in: str = typer.Option("system", "--context-in", help="Where retrieved context goes: system or user (before the message)."),
    no_truncate: bool = typer.Option(False, "--no-truncate", help="Drop a retrieved chunk that does not fit instead of cutting it."),
    length: Length = None, formality: Formality = None, structure: Structure = None, persona: Persona = None,
    depth: Depth = None, max_words: MaxWords = None, format_skeleton: FormatSkeleton = None,
    show_prompt: bool = typer.Option(False, "--show-prompt", help="Also print the fitted prompt as the model receives it."),
    save: Path | None = typer.Option(None, "--save", help="Write the fitted messages to this JSON file."),
    model: Model = None,
    config: ConfigFile = None,
    json_out: JsonOut = False,
) -> None:  # fmt: skip
    """Fit a conversation into the context window and show the allocation, like the concept
    note's "Context Window Budget": system prompt, retrieved context, history, the current
    message and the reserve. Never dropped: the system prompt and the current message; when
    they do not fit with the reserve, it is an error with the numbers.
    """
    from pellucid.prompts.budget import Chunk, Limits
    from pellucid.prompts.compose import system_messages
    from pellucid.prompts.counting import read_text

    cfg = read_config(config)
    style = make_style(length, formality, structure, persona, depth, max_words, format_skeleton)
    store = make_store(dirs, cfg)
    hist = read_messages(history, "--history") if history is not None else []
    if hist and hist[0]["role"] == "system":
        raise PellucidError(f"--history {history}: starts with a system message; give it with --system", param="history")
    chunks = [Chunk(read_text(f), source=str(f)) for f in retrieved or []]
    prefix = system_messages(choose_system(system, prompt_file, cfg, store), style, store=store)
    counter = load_counter(model, cfg, quiet=json_out)
    if window is not None and counter.context_length and window > counter.context_length:
        err.print(f"[yellow]note:[/] --window {window:,} is over the model's context length of "
                  f"{counter.context_length:,}", markup=True)  # fmt: skip
    limits = Limits(system=limit_system, retrieved=limit_retrieved, history=limit_history, current=limit_current)
    b = counter.budget(window, reserve, limits=limits, drop_first=drop_first, context_placement=context_in,
                       truncate=None if no_truncate else counter.truncate)  # fmt: skip
    alloc = b.fit(message, system=prefix, history=hist, retrieved=chunks)
    if save is not None:
        save.write_text(json.dumps(alloc.messages, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if json_out:
        data = {"model": counter.name, "window": alloc.window, "reserve": alloc.reserve,
                "prompt_tokens": alloc.prompt_tokens, "total": alloc.total, "free": alloc.free,
                "sections": [vars(s) for s in alloc.sections],
                "retrieved": [{"source": c.source, "status": s} for c, s in zip(chunks, alloc.chunk_status, strict=True)],
                "history_dropped": alloc.history_dropped, "messages": alloc.messages}  # fmt: skip
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    out.print(alloc.table())
    out.print(budget_diagram(alloc, width=max(10, min(50, out.width - 34))), markup=False)
    for line in budget_notes(alloc, chunks, len(hist)):
        out.print(line, markup=False)
    if show_prompt:
        out.rule(f"prompt ({alloc.prompt_tokens:,} tokens)", style="dim")
        _echo(counter.render(alloc.messages))
    if save is not None:
        out.print(f"fitted messages: {save}", markup=False)


def budget_diagram(alloc, width: int = 50) -> str:
    """The allocation as bars, one per section, scaled to the window (the note's diagram)."""
    lines = []
    name_w = max(len(s.name) for s in alloc.sections)
    for s in alloc.sections:
        n = round(width * s.tokens / alloc.window)
        bar = "█" * n if n or not s.tokens else "▏"
        lines.append(f"{s.name:<{name_w}}  {bar:<{width}}  {s.tokens:>7,}")
    n = round(width * alloc.free / alloc.window)
    lines.append(f"{'free':<{name_w}}  {'░' * n:<{width}}  {alloc.free:>7,}")
    lines.append(f"{'window':<{name_w}}  {'':<{width}}  {alloc.window:>7,}")
    return "\n".join(lines)


def budget_notes(alloc, chunks, n_history: int) -> list[str]:
    """What was kept, cut and dropped, in words."""
    notes = []
    if chunks:
        parts = []
        for c, status in zip(chunks, alloc.chunk_status, strict=True):
            parts.append(f"{c.source or 'chunk'} {status}")
        notes.append("retrieved: " + ", ".join(parts))
    if n_history:
        kept = n_history - alloc.history_dropped
        from pellucid.prompts.budget import group_turns

        notes.append(f"history: kept the newest {kept} of {n_history} messages ({len(group_turns(alloc.history))} turns)"
                     + (f"; dropped the oldest {alloc.history_dropped}" if alloc.history_dropped else ""))  # fmt: skip
    notes.append(f"the reply may use up to {alloc.max_new_tokens:,} tokens ({alloc.reserve:,} reserved)")
    return notes


# -- the chat loop (used by `pellucid chat`) ------------------------------------------------------
def chat_loop(llm, params, *, system=None, style=None, window: int | None = None, show_prompt: bool = False,
              once: str | None = None, lines=None, steer=None) -> None:  # fmt: skip
    """Talk to the model, keeping the conversation inside the context window.

    `system` is text, a prompt file (or reference) or None; `window` defaults to the model's
    context length. Turns dropped to fit are reported on stderr, as are the style checks of
    each reply (word limit, structure, format skeleton) when the style implies any.
    """
    from pellucid.prompts.chat_session import ChatSession
    from pellucid.prompts.counting import model_window

    if window is None:
        window = model_window(llm.config, llm.model)
    session = ChatSession(llm, system=system, style=style, params=params, window=window, steer=steer)
    interactive = once is None
    stdin = lines if lines is not None else sys.stdin
    while True:
        if interactive:
            if stdin is sys.stdin and sys.stdin.isatty():
                try:
                    user = input("> ")
                except EOFError:
                    break
            else:
                line = stdin.readline()
                if not line:
                    break
                user = line.rstrip("\n")
            if user.strip() in ("/exit", "/quit"):
                break
            if not user.strip():
                continue
        else:
            user = once
        try:
            turn = session.prepare(user)
        except PellucidError as e:
            if not interactive:
                raise
            err.print(f"[bold red]error:[/] {escape(e.message)}", markup=True)
            continue
        if turn.dropped_messages:
            err.print(f"[yellow]context:[/] dropped the oldest {turn.dropped_turns} turn(s) "
                      f"({turn.dropped_messages} messages) to fit the {session.window:,}-token window "
                      f"({turn.prompt_tokens:,} prompt + {session.reserve:,} reserved); "
                      f"{session.dropped_total} dropped so far", markup=True, soft_wrap=True)  # fmt: skip
        if show_prompt:
            err.rule(f"prompt: {turn.prompt_tokens:,} tokens", style="dim")
            sys.stderr.write(turn.prompt if turn.prompt.endswith("\n") else turn.prompt + "\n")  # exact: no wrapping
            sys.stderr.flush()
            err.rule(style="dim")
        shown, gen = [], session.stream(turn)
        try:
            for piece in gen:
                sys.stdout.write(piece)
                sys.stdout.flush()
                shown.append(piece)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the conversation
            gen.close()  # the request is aborted
            session.keep_partial(turn, "".join(shown))
            if not interactive:
                raise
            sys.stdout.write("\n")
            err.print("[yellow]stopped[/] [dim](the reply so far stays in the conversation; Ctrl-C at the prompt or Ctrl-D ends it)[/]", markup=True)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        if turn.finish_reason == "length":
            err.print(f"[dim]reply cut at {turn.completion_tokens:,} tokens (--max-tokens, or the context window)[/]", markup=True)
        if turn.report is not None:
            for c in turn.report.checks:
                mark = "[green]ok[/]" if c.ok else "[red]FAIL[/]"
                err.print(f"[dim]check {c.name}:[/] {mark} [dim]{escape(c.detail)}[/]", markup=True, soft_wrap=True)
        if not interactive:
            break


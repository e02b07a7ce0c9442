"""pellucid next-token: the next-token distribution after each step of the sampler chain."""

from __future__ import annotations

import json

import typer
from rich.markup import escape

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
)
from pellucid.cli.display import SECTION, Col, console, show_table


@app.command("next-token")
@sampling_options(without=("max_tokens", "stop"))
def next_token(
    prompt: str = typer.Argument(..., help="Text whose next token to show (raw; --chat wraps it as a user message)."),
    model: Model = None,
    dtype: Dtype = DEFAULT_DTYPE,
    quant: Quant = DEFAULT_QUANT,
    threads: Threads = None,
    config: ConfigFile = None,
    chat: bool = typer.Option(False, "--chat", help="Apply the chat template, PROMPT as the user's message."),
    top: int = typer.Option(10, "--top", help="How many candidate tokens to show.", min=1, max=200),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
    flags: dict = None,
) -> None:
    """Show the top candidates and their probabilities after each step of the sampler:
    raw, after bias and penalties, after temperature, top-k, top-p and min-p, and the draw.

    Defaults: temperature 1, every filter off. A removed token shows as "cut".
    """
    from pellucid.sampling.explain import explain_next_token

    defaults = {"max_tokens": None}
    cfg = read_config(config)
    name = model_name(model, cfg)
    check_params(defaults, cfg, flags, name)
    llm = load_llm(name, dtype, quant, quiet=json_out, threads=threads)
    params = command_params(defaults, cfg, flags, llm.tokenizer)
    stages = explain_next_token(llm, prompt, params, top=top, chat=chat)
    drawn = next(c for c in stages[-1].candidates if c.kept)
    if json_out:
        out = {
            "model": name, "prompt": prompt, "chat": chat,
            "params": {k: v for k, v in vars(params).items() if k not in ("stop", "n", "logprobs", "top_logprobs", "processed_logprobs")},
            "stages": [s.to_dict() for s in stages],
            "chosen": {"id": drawn.id, "text": drawn.text},
        }  # fmt: skip
        out["params"]["logit_bias"] = {str(k): v for k, v in params.logit_bias.items()}
        typer.echo(json.dumps(out, indent=2, ensure_ascii=False))
        return
    show_stages(prompt, stages)
    console().print(f"chosen: [bold]{escape(repr(drawn.text))}[/] (id {drawn.id}), {stages[-1].title} ({stages[-1].setting})")


SHORT = {"raw": "raw", "bias_penalties": "bias+pen", "temperature": "temp", "top_k": "top-k", "top_p": "top-p",
         "min_p": "min-p", "greedy": "greedy", "draw": "draw"}  # fmt: skip


def show_stages(prompt: str, stages) -> None:
    """Candidates as rows, the steps of the chain as columns; probabilities in percent."""
    cols = [Col("token (id)")] + [Col(f"{SHORT.get(s.name, s.name)} {_short(s)}".strip(), "right") for s in stages]
    rows = [[f"{c.text!r} {c.id}"] + [_pct(s.candidates[i].prob) if s.candidates[i].kept else "cut" for s in stages]
            for i, c in enumerate(stages[0].candidates)]  # fmt: skip
    rows += [SECTION, ["tokens kept", *[str(s.kept) for s in stages]]]
    caption = "; ".join(f"{SHORT.get(s.name, s.name)} = {s.title}" + (f" ({s.setting})" if s.setting != "-" else "") for s in stages)
    show_table(console(), cols, rows, title=f"next token after {prompt!r}", caption=caption, side_ok=False)


def _short(stage) -> str:
    """The setting in at most 6 characters (the caption has it in full)."""
    if stage.setting in ("-", "off") or stage.setting.startswith("off"):
        return "off" if stage.name != "raw" else ""
    if stage.name in ("draw", "bias_penalties"):
        return "on" if stage.name == "bias_penalties" else ""
    return stage.setting.split("=")[-1][:6]


def _pct(p: float) -> str:
    if p >= 0.001:
        return f"{100 * p:.1f}%"
    return f"{100 * p:.2g}%"

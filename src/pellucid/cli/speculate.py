"""pellucid speculate: speculative decoding of one prompt, with its trace and its speed-up."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
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
from pellucid.cli.display import show_kv

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

Draft = Annotated[str, typer.Option("--draft", help="ngram (prompt lookup) or model (a draft model).")]
DraftModel = Annotated[str | None, typer.Option("--draft-model", help="Draft model: registry name or path (default: the target's own file).")]
DraftQuant = Annotated[str | None, typer.Option("--draft-quant", help="Load the draft model as int8 or int4 (default with --draft model and no other draft option: int4).")]
DraftDtype = Annotated[str | None, typer.Option("--draft-dtype", help="Draft model dtype (default: the target's).")]
DraftLayers = Annotated[int | None, typer.Option("--draft-layers", help="Run only the first N blocks of the draft model (early exit).")]
NumDraft = Annotated[int, typer.Option("--num-draft", "-k", help="Tokens drafted per round (1..64).")]


def piece(tokenizer, tok: int) -> str:
    """A token as a quoted, escaped string: ' mat', '\\n'."""
    return repr(tokenizer.decode([tok]))


def render_round(tokenizer, r) -> str:
    """The concept note's picture of one round, as rich markup."""
    p = lambda t: escape(piece(tokenizer, t))  # noqa: E731
    lines = [f"[bold]round {r.index + 1}[/]"]
    if not r.drafted:
        lines.append(f"  [dim]no draft[/]   target: [bold cyan]{p(r.token)}[/]")
        return "\n".join(lines)
    draft = [f"[green]{p(t)}[/]" if i < r.accepted else f"[red strike]{p(t)}[/]" if i == r.accepted else f"[dim]{p(t)}[/]"
             for i, t in enumerate(r.drafted)]  # fmt: skip
    verify = [f"[green]{p(t)}[/]" for t in r.drafted[: r.accepted]] + [f"[bold cyan]{p(r.token)}[/]"]
    lines.append("  Draft:  [" + ", ".join(draft) + "]")
    lines.append("  Verify: [" + ", ".join(verify) + "]")
    if r.rejected is not None:
        lines.append(f"  Accept {r.accepted}, reject [red]{p(r.rejected)}[/] -> [bold cyan]{p(r.token)}[/]")
    else:
        lines.append(f"  Accept {r.accepted} (all), bonus [bold cyan]{p(r.token)}[/]")
    if len(r.emitted) < r.accepted + 1:
        lines.append(f"  [dim](stopped after {len(r.emitted)} of them)[/]")
    return "\n".join(lines)


@app.command()
@sampling_options()
def speculate(
    prompt: str = typer.Argument(..., help="The prompt: raw text, or a user message with --chat."),
    chat: bool = typer.Option(False, "--chat", help="Wrap PROMPT as a user message in the model's chat template."),
    draft: Draft = "ngram",
    draft_model: DraftModel = None,
    draft_quant: DraftQuant = None,
    draft_dtype: DraftDtype = None,
    draft_layers: DraftLayers = None,
    num_draft: NumDraft = 4,
    show_speculation: bool = typer.Option(False, "--show-speculation", help="Print every round: draft, verify, accept/reject."),
    compare: bool = typer.Option(False, "--compare", help="Also decode plainly in the same run and report the speed-up."),
    json_out: bool = typer.Option(False, "--json", help="Print the text and figures as JSON instead."),
    model: Model = None,
    dtype: Dtype = DEFAULT_DTYPE,
    quant: Quant = DEFAULT_QUANT,
    threads: Threads = None,
    config: ConfigFile = None,
    flags: dict = None,
) -> None:
    """Generate with speculative decoding: a drafter proposes k tokens, the model checks
    them in one forward and keeps the prefix it agrees with. Greedy output is exactly the
    plain output; sampled output has exactly the plain distribution.

    Prints the text, then the acceptance rate, accepted tokens per round and tok/s; with
    --compare, plain decoding of the same request too, and the speed-up.
    """
    from pellucid.engine.speculative import (
        SpeculativeConfig,
        SpeculativeDecoder,
        make_drafter,
        measure_plain,
    )

    spec = SpeculativeConfig(draft=draft, num_draft=num_draft, draft_model=draft_model, draft_quant=draft_quant,
                             draft_dtype=draft_dtype, draft_layers=draft_layers)  # fmt: skip
    defaults = {"max_tokens": 128, "temperature": 0.0}
    cfg = read_config(config)
    name = model_name(model, cfg)
    check_params(defaults, cfg, flags, name)  # bad values fail before the load
    llm = load_llm(name, dtype, quant, threads=threads)
    params = command_params(defaults, cfg, flags, llm.tokenizer)
    text = llm.render_chat([{"role": "user", "content": prompt}]) if chat else prompt
    ids = llm.encode_prompt(text)
    with err.status(f"preparing the {spec.draft} drafter"):
        drafter = make_drafter(spec, llm.loaded, max_len=llm.engine.max_len)
    dec = SpeculativeDecoder(llm.loaded, drafter, num_draft=num_draft, max_len=llm.engine.max_len)
    req = llm.engine.make_request(ids, params)

    show = (lambda r: out.print(render_round(llm.tokenizer, r))) if show_speculation and not json_out else None
    for o in dec.run(req, on_round=show):
        if not show_speculation and not json_out:
            sys.stdout.write(o.new_text)
            sys.stdout.flush()
    s = dec.stats
    if show_speculation and not json_out:
        out.rule("text")
        sys.stdout.write(req.text)
    if not json_out:
        sys.stdout.write("\n")
        sys.stdout.flush()

    plain = None
    if compare:
        with err.status("plain decoding of the same request, for the speed-up"):
            plain = measure_plain(llm, ids, params)
    result = {
        "text": req.text, "finish_reason": req.finish_reason, "draft": drafter.name, "num_draft": num_draft,
        "prompt_tokens": len(ids), "generated_tokens": s.generated, "rounds": s.rounds,
        "acceptance_rate": s.acceptance_rate, "mean_accepted": s.mean_accepted,
        "tokens_per_round": s.tokens_per_round, "decode_tok_s": s.decode_tok_s,
        "draft_seconds": s.draft_seconds, "verify_seconds": s.verify_seconds,
    }  # fmt: skip
    if plain is not None:
        result.update(plain_decode_tok_s=plain.decode_tok_s, speedup=s.decode_tok_s / plain.decode_tok_s if plain.decode_tok_s else None,
                      identical=plain.token_ids == req.output_ids)  # fmt: skip
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    pairs = [("generated tokens", f"{s.generated} in {s.rounds} rounds ({s.tokens_per_round:.2f} per target forward)"),
             ("acceptance rate", f"{s.acceptance_rate:.1%} ({s.accepted} of {s.drafted} drafted)"),
             ("mean accepted per round", f"{s.mean_accepted:.2f}"),
             ("decode", f"{s.decode_tok_s:.1f} tok/s (drafting {s.draft_seconds:.2f} s, verifying {s.verify_seconds:.2f} s)")]  # fmt: skip
    if plain is not None:
        same = "yes" if result["identical"] else ("no" if params.temperature == 0 else "n/a (sampled)")
        pairs += [("plain decode", f"{plain.decode_tok_s:.1f} tok/s"), ("speed-up", f"{result['speedup']:.2f}x"),
                  ("same tokens as plain", same)]  # fmt: skip
    else:
        pairs.append(("speed-up", "run with --compare to measure plain decoding too"))
    show_kv(err, pairs, title=f"speculative decoding ({drafter.name}, k = {num_draft})")

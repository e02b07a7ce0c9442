"""pellucid inspect / params / attention / lens / ablate: the model's internals, formatted.

The work is done by pellucid.inspect (functions returning dataclasses); this module only
parses options, calls them, and prints tables or writes pictures.

Every `pellucid` run imports this module to register the commands, so pellucid.inspect
(the model loaders, matplotlib: ~1 s) is imported inside the commands that use it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from pellucid.cli import app
from pellucid.cli.common import DEFAULT_MODEL, Model, Threads
from pellucid.cli.display import (
    SECTION,
    Col,
    console,
    fits,
    paragraph,
    print_json,
    show_kv,
    show_table,
)
from pellucid.errors import PellucidError

Json = Annotated[bool, typer.Option("--json", help="Print JSON for machines instead of tables.")]
OutDir = Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNG pictures.")]
NoPlot = Annotated[bool, typer.Option("--no-plot", help="Write no pictures.")]
Chat = Annotated[
    bool,
    typer.Option(
        "--chat", help="Wrap the prompt in the model's chat template (default: raw text)."
    ),
]
InspectDtype = Annotated[
    str, typer.Option("--dtype", help="Activations: auto (as generate and serve run the model), float32, bfloat16 or float16.")
]
InspectQuant = Annotated[
    str, typer.Option("--quant", help="Weights: auto (the served format: the file's blocks where they lie), int8, or none (a float copy, at --dtype).")
]

# Published parameter counts of the concept note's rows, for comparison with the calculator.
PUBLISHED = {
    "gpt2-xl": (1_557_611_200, "HF gpt2-xl, num_parameters() (the note: 1.5B)"),
    "llama-7b": (6_738_415_616, "HF huggyllama/llama-7b (the note: 7B)"),
    "llama-70b": (68_976_648_192, "HF meta-llama/Llama-2-70b-hf (the note: 70B)"),
    "smollm2-135m": (134_515_008, "HF HuggingFaceTB/SmolLM2-135M"),
    "gemma3-270m": (268_098_176, "GGUF gemma-3-270m tensors"),
}
PRECISIONS = ("fp32", "fp16", "int8", "int4")  # the note's quantization table


def human(n: float, unit: str = "B") -> str:
    """Decimal units: 1.5 GB for bytes; 1.558 B, 134.5 M for counts (unit "")."""
    names = (
        ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
        if unit
        else ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k"))
    )
    for scale, suffix in names:
        if abs(n) >= scale:
            return f"{n / scale:.1f} {suffix}{unit}" if unit else f"{n / scale:.3f} {suffix}"
    return f"{n:.0f} {unit}" if unit else f"{n:.0f}"


def _shape(s: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in s)


def _load(model: str, dtype: str, quant: str, threads: int | None = None):
    from pellucid.cli.common import set_threads
    from pellucid.inspect.subject import load_subject
    from pellucid.progress import Progress

    if threads is not None:
        set_threads(threads)
    err = console(stderr=True)
    progress = Progress(f"loading {model}")
    subject = load_subject(model, dtype=dtype, quant=None if quant in ("", "none") else quant, progress=progress)
    err.print(f"[dim]loaded {model} in {progress.finish():.1f} s: {subject.format}[/]")
    return subject


def _pictures(paths: list[Path]) -> None:
    for p in paths:  # plain print: a path must not be wrapped
        print(f"wrote {p}", flush=True)


def _token(piece: str) -> str:
    from pellucid.inspect.plots import token_label

    return token_label(piece, 24)


# -- inspect ----------------------------------------------------------------------------------


@app.command("inspect")
def inspect_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help="Registry name, .gguf file or HF folder."),
    per_layer: bool = typer.Option(
        False, "--per-layer", help="One group per layer instead of blocks.0-N (xN)."
    ),
    dtype: str = typer.Option(
        "bfloat16", "--dtype", help="Compute dtype for the in-memory column."
    ),
    as_json: Json = False,
) -> None:
    """Architecture and weights: shapes, storage types, parameter counts and bytes."""
    from pellucid.inspect.weights_table import weights_report

    report = weights_report(model, dtype=dtype)
    if as_json:
        print_json(report.to_dict(per_layer), indent=1)
        return
    out = console()
    a = report.arch
    show_kv(out, [
        ("architecture", a.architecture), ("layers", a.n_layers), ("d_model", a.d_model),
        ("heads / KV heads", f"{a.n_heads} / {a.n_kv_heads}" + ("  (grouped-query)" if a.n_kv_heads < a.n_heads else "")),
        ("head dim", a.head_dim), ("d_ff", a.d_ff), ("vocabulary", f"{a.vocab_size:,}"),
        ("context length", f"{a.context_length:,}"), ("positions", a.positions), ("norm", a.norm),
        ("activation", a.activation), ("tied embeddings", "yes" if a.tied_embeddings else "no"),
        ("file", Path(report.path)), ("file size", f"{human(report.file_bytes)} ({report.format})"),
    ], title=f"{report.model}  ({a.name or a.architecture})")  # fmt: skip
    out.print()

    short = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}
    cols = [Col("group / weight"), Col("shape"), Col("type", wrap=True), Col("params", "right"),
            Col("stored", "right"), Col(f"mem {short.get(report.memory_dtype, report.memory_dtype)}", "right")]  # fmt: skip
    abbrev = {"attention": "attn ", "feed-forward": "ffn ", "norms": "", "other": ""}
    rows, names = [], []
    for g in report.groups(per_layer):
        rows.append(
            [
                f"[bold]{g.label}[/]",
                "",
                "",
                f"[bold]{g.params:,}[/]",
                human(g.stored_bytes),
                human(g.memory_bytes),
            ]
        )
        names.append("")
        for r in g.rows:
            label = f"  {abbrev.get(r.part, '')}{r.component}"
            if r.tied_to:
                rows.append([label, _shape(r.shape), "tied", "0", "0 B", "0 B"])
                names.append(f"{r.name} = {r.tied_to}")
                continue
            rows.append(
                [
                    label,
                    _shape(r.shape),
                    r.storage,
                    f"{r.params:,}",
                    human(r.stored_bytes),
                    human(r.memory_bytes),
                ]
            )
            names.append(r.name)
    rows.append(SECTION)
    rows.append(["[bold]total[/]", "", "", f"[bold]{report.total_params:,}[/]", f"[bold]{human(report.total_stored_bytes)}[/]",
                 f"[bold]{human(report.total_memory_bytes)}[/]"])  # fmt: skip
    names.append("")
    caption = "shapes are per layer; params and bytes are summed over the group's layers"
    # the checkpoint's parameter names where the line has room for them (always in --json)
    named = [*cols, Col("parameter", style="dim")]
    named_rows = [
        r if r is SECTION else [*r, n]
        for r, n in zip(rows, [*names[:-1], None, names[-1]], strict=True)
    ]
    if fits(out, named, named_rows):
        show_table(out, named, named_rows, title="Weights", caption=caption, side_ok=False)
    else:
        show_table(out, cols, rows, title="Weights", side_ok=False,
                   caption=caption + " (parameter names: a wider terminal, or --json)")  # fmt: skip
    parts = report.by_part()
    total = report.total_params or 1
    paragraph(out, "  ".join(f"{k}: {v:,} ({v / total:.1%})" for k, v in parts.items() if v))


# -- params -----------------------------------------------------------------------------------


def _spec_from_model(model: str):
    """(ParamSpec, parameters the file's tensors hold, label) of a model, built on the meta
    device: no weights are read."""
    from pellucid import registry
    from pellucid.inspect.param_count import spec_from_model
    from pellucid.inspect.weights_table import weights_report

    path = registry.resolve(model)
    report = weights_report(model) if path.is_file() else None
    if report is None:  # an HF folder: config.json, counted from the safetensors headers
        from pellucid.loading import build_meta
        from pellucid.loading.hf import architecture_key, read_json
        from pellucid.models import architecture
        from pellucid.weights.safetensors import SafetensorsCheckpoint

        config = read_json(path / "config.json", "config.json")
        mod = architecture(architecture_key(config, path))
        cfg = mod.config_from_hf(config)
        meta = build_meta(mod, cfg, None)
        ckpt = SafetensorsCheckpoint(path)
        total = sum(math.prod(ckpt.shape(n)) for n in ckpt.keys())
        return spec_from_model(meta, cfg), total, str(model)
    from pellucid.loading import build_meta, gguf_architecture
    from pellucid.weights.gguf import GGUFFile

    f = GGUFFile(path)
    mod, cfg = gguf_architecture(f)
    return spec_from_model(build_meta(mod, cfg, None), cfg), report.total_params, str(model)


def _spec_from_file(path: Path):
    from pellucid.inspect.param_count import ParamSpec, spec_from_hf_config

    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PellucidError(f"cannot read config {str(path)!r}: {e.strerror or e}", param="config") from None
    if raw[:4] == b"GGUF":
        raise PellucidError(f"{str(path)!r} is a model file, not a config: count it with `pellucid params {path}`", param="config")
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise PellucidError(f"config {str(path)!r} is not a JSON file ({type(e).__name__}: {str(e)[:80]}); give a transformers "
                            "config.json, ParamSpec fields as JSON, or the model itself: `pellucid params MODEL`", param="config") from None  # fmt: skip
    if not isinstance(cfg, dict):
        raise PellucidError(f"config {str(path)!r} must be a JSON object", param="config")
    if "model_type" in cfg:
        return spec_from_hf_config(cfg)
    try:
        return ParamSpec(**cfg)
    except TypeError as e:
        raise PellucidError(f"config {str(path)!r}: {e} (a transformers config.json with model_type, "
                            "or ParamSpec fields: vocab_size, d_model, n_layers, n_heads, d_ff, ...)", param="config") from None  # fmt: skip


@app.command()
def params(
    model: str | None = typer.Argument(None, help="Count a model: a registry name, a .gguf file or an HF folder (no weights are loaded)."),
    preset: str | None = typer.Option(
        None, "--preset", "-p", help="gpt2-xl, llama-7b, llama-70b, smollm2-135m, gemma3-270m."
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="A transformers config.json (or ParamSpec fields as JSON)."
    ),
    as_json: Json = False,
) -> None:
    """Parameter count from hyperparameters alone, and memory at FP32 / FP16 / INT8 / INT4.

    With MODEL: its hyperparameters read from the file (no weights loaded), the formula's
    count beside the count of the tensors the file holds. Without MODEL, --preset or
    --config: the concept note's table, for every preset.
    """

    from pellucid.inspect.param_count import PRESETS, count_params, memory_bytes

    if sum(x is not None for x in (model, preset, config)) > 1:
        raise PellucidError("give one of MODEL, --preset or --config", param="preset")
    file_count = None
    if model is not None:
        spec, file_count, source = _spec_from_model(model)
        preset = None
    if model is None and preset is None and config is None:
        rows = []
        for name, spec in PRESETS.items():
            c = count_params(spec)
            pub = PUBLISHED.get(name, (None, ""))
            rows.append({"preset": name, "total": c.total, "n_layers": spec.n_layers, "d_model": spec.d_model,
                         "n_heads": spec.n_heads, "n_kv_heads": spec.n_kv_heads, "published": pub[0], "source": pub[1]})  # fmt: skip
        if as_json:
            print_json(rows, indent=1)
            return
        out = console()
        cols = [
            Col("preset"),
            *(
                Col(h, "right")
                for h in ("computed", "published", "diff", "layers", "d_model", "heads (KV)")
            ),
        ]
        table = []
        for r in rows:
            pub = r["published"]
            table.append([r["preset"], human(r["total"], ""), human(pub, "") if pub else "",
                          f"{(r['total'] - pub) / pub:+.2%}" if pub else "", str(r["n_layers"]), str(r["d_model"]),
                          f"{r['n_heads']} ({r['n_kv_heads']})"])  # fmt: skip
        show_table(
            out,
            cols,
            table,
            title="Parameter counts from hyperparameters (the note's table, computed)",
        )
        paragraph(
            out,
            "published: " + "; ".join(f"{k}: {v[1]}" for k, v in PUBLISHED.items()),
            style="dim",
        )
        return
    if model is not None:
        pass
    elif preset is not None:
        if preset not in PRESETS:
            raise PellucidError(
                f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}", param="preset"
            )
        spec, source = PRESETS[preset], preset
    else:
        spec, source = _spec_from_file(config), str(config)
    c = count_params(spec)
    memory = {p: memory_bytes(c.total, p) for p in PRECISIONS}
    if as_json:
        print_json({"source": source, "spec": asdict(spec), "breakdown": c.breakdown, "per_layer": c.per_layer,
                    "per_layer_total": c.per_layer_total, "coarse": c.coarse(), "total": c.total,
                    "memory_bytes": memory, "file_tensors_total": file_count}, indent=1)  # fmt: skip
        return
    out = console()
    s = spec
    paragraph(out, f"{source}: {s.n_layers} layers, d_model {s.d_model}, {s.n_heads} heads ({s.n_kv_heads} KV, "
                   f"head dim {s.head_dim}), d_ff {s.d_ff}, vocab {s.vocab_size:,}, "
                   f"{'gated' if s.gated_mlp else 'plain'} MLP, {s.norm} norm, embeddings {'tied' if s.tied_embeddings else 'untied'}")  # fmt: skip
    rows: list = []
    for group, n in c.breakdown.items():
        per = c.per_layer.get(group)
        rows.append([group, f"{per:,}" if per is not None else "", f"{n:,}", f"{n / c.total:.1%}"])
    rows += [SECTION, ["[bold]total[/]", f"{c.per_layer_total:,}", f"[bold]{c.total:,}[/]", "100%"]]
    show_table(out, [Col("group"), Col("per layer", "right"), Col("all layers", "right"), Col("share", "right")], rows,
               title="Parameters", side_ok=False)  # fmt: skip
    from pellucid.inspect.param_count import BYTES_PER_PARAM

    show_table(out, [Col("precision"), Col("bytes/param", "right"), Col("memory", "right")],
               [[p.upper(), f"{BYTES_PER_PARAM[p]:g}", f"{human(memory[p])}  ({memory[p] / 2**30:.2f} GiB)"] for p in PRECISIONS],
               title="Weights in memory (no KV cache, no quantization scales)")  # fmt: skip
    if file_count is not None:
        same = "equal" if file_count == c.total else f"the formula {c.total - file_count:+,}"
        paragraph(out, f"the file's tensors: {file_count:,} parameters ({same}; tied tables counted once)")
    pub = PUBLISHED.get(preset or "")
    if pub:
        paragraph(
            out, f"published: {pub[0]:,} ({pub[1]}); calculator {(c.total - pub[0]) / pub[0]:+.3%}"
        )


def _where(a, layer: int | None, head: int | None) -> str:
    if layer is None and head is None:
        return f"averaged over {a.n_layers} layers and {a.n_heads} heads"
    if layer is None:
        return f"head {head}, averaged over {a.n_layers} layers"
    return f"layer {layer}, " + (
        f"head {head}" if head is not None else f"averaged over {a.n_heads} heads"
    )


# -- attention --------------------------------------------------------------------------------


@app.command()
def attention(
    prompt: str = typer.Argument(..., help="Text to look at (raw unless --chat)."),
    model: Model = DEFAULT_MODEL,
    dtype: InspectDtype = "auto",
    quant: InspectQuant = "auto",
    threads: Threads = None,
    layer: int | None = typer.Option(
        None, "--layer", "-l", help="One layer (default: average over layers)."
    ),
    head: int | None = typer.Option(None, "--head", help="One head (default: average over heads)."),
    top: int = typer.Option(3, "--top", "-k", help="Most attended tokens to list per token."),
    include_first: bool = typer.Option(
        False,
        "--include-first",
        help="Rank the first token too (it takes most attention: the 'attention sink').",
    ),
    chat: Chat = False,
    out_dir: OutDir = Path("."),
    no_plot: NoPlot = False,
    as_json: Json = False,
) -> None:
    """For each token, the tokens it attends to most; PNG heatmaps of every layer and head."""
    from pellucid.inspect import plots
    from pellucid.inspect.attention import attention_patterns

    subject = _load(model, dtype, quant, threads)
    a = attention_patterns(subject, prompt, chat=chat)
    sel = a.select(layer, head)  # validates layer and head
    where = _where(a, layer, head)
    pictures = []
    if not no_plot:
        pictures.append(plots.attention_grid(a.patterns, a.str_tokens, out_dir / "attention_grid.png",
                                             f"Attention patterns of {subject.name} ({subject.format}), all {a.n_layers} layers x {a.n_heads} heads (row: query, column: key)"))  # fmt: skip
        tag = f"{'L' + str(layer) if layer is not None else 'Lavg'}_{'H' + str(head) if head is not None else 'Havg'}"
        pictures.append(plots.attention_heatmap(sel, a.str_tokens, out_dir / f"attention_{tag}.png",
                                                f"Attention, {where}"))  # fmt: skip
    if as_json:
        d = a.to_dict(layer, head, top, skip_first=not include_first)
        d["pictures"] = [str(p) for p in pictures]
        print_json(d, indent=None)
        return
    cols = [
        Col("pos", "right"),
        Col("token"),
        Col("attends most to" + ("" if include_first else " (after the first token)"), wrap=True),
    ]
    if not include_first:
        cols.append(Col(f"→ {_token(a.str_tokens[0])!s} (first)", "right"))
    rows = []
    for ta in a.top(layer, head, top, skip_first=not include_first):
        shown = [x for x in ta.top if include_first or x.pos > 0]
        links = ", ".join(f"'{_token(x.token)}' ({x.weight:.2f})" for x in shown) or "—"
        row = [str(ta.pos), _cell(_token(ta.token)), _cell(links)]
        if not include_first:
            row.append(f"{float(sel[ta.pos, 0]):.2f}")
        rows.append(row)
    show_table(
        console(),
        cols,
        rows,
        title=f"Attention on {prompt!r} ({len(a.tokens)} tokens), {where}; {subject.format}",
        side_ok=False,
    )
    _pictures(pictures)


def _cell(text: str) -> Text:
    """A table cell shown as it is (token text may contain [brackets] that are not markup)."""
    return Text(text)


# -- logit lens -------------------------------------------------------------------------------


@app.command()
def lens(
    prompt: str = typer.Argument(..., help="Text to look at (raw unless --chat)."),
    model: Model = DEFAULT_MODEL,
    dtype: InspectDtype = "auto",
    quant: InspectQuant = "auto",
    threads: Threads = None,
    target: str | None = typer.Option(
        None,
        "--target",
        help="Answer token to follow (default: the model's own top-1), e.g. ' Paris'.",
    ),
    top: int = typer.Option(3, "--top", "-k", help="Top tokens to show per layer."),
    grid: bool = typer.Option(
        False, "--grid", help="Also print the top-1 token at every layer and position."
    ),
    chat: Chat = False,
    out_dir: OutDir = Path("."),
    no_plot: NoPlot = False,
    as_json: Json = False,
) -> None:
    """Logit lens (each layer's residual stream read as output) and residual-stream norms."""
    from pellucid.inspect import plots
    from pellucid.inspect.logit_lens import lens_report

    subject = _load(model, dtype, quant, threads)
    r = lens_report(subject, prompt, target=target, k=max(top, 1), chat=chat)
    pictures = []
    if not no_plot:
        pictures = [plots.lens_heatmap(r, out_dir / "lens_heatmap.png"), plots.lens_target_plot(r, out_dir / "lens_target.png"),
                    plots.residual_norms_plot(r, out_dir / "residual_norms.png")]  # fmt: skip
    if as_json:
        d = r.to_dict()
        d["pictures"] = [str(p) for p in pictures]
        print_json(d, indent=None)
        return
    out = console()
    tgt = _token(r.target_token)
    who = "the model's own top-1" if r.target_from == "model" else "given"
    cols = [Col("after layer", "right"), Col(f"top {top}", wrap=True), Col(f"P('{tgt}')", "right"), Col("rank", "right"),
            Col("‖attn out‖", "right"), Col("‖mlp out‖", "right"), Col("‖resid‖", "right")]  # fmt: skip
    rows = []
    for s, label in enumerate(r.labels):
        tops = ", ".join(
            f"'{_token(tok)}' {float(p):.2f}"
            for tok, p in zip(r.top_tokens[s][-1][:top], r.top_probs[s][-1][:top], strict=True)
        )
        layer = s - 1
        attn = f"{float(r.attn_norm[layer, -1]):.1f}" if layer >= 0 else ""
        mlp = f"{float(r.mlp_norm[layer, -1]):.1f}" if layer >= 0 else ""
        p = float(r.target_prob[s])
        rows.append([label, _cell(tops), f"{p:.3f}" if p >= 1e-3 else f"{p:.0e}", str(int(r.target_rank[s]) + 1), attn,
                     mlp, f"{float(r.resid_norm[s, -1]):.1f}"])  # fmt: skip
    show_table(out, cols, rows, side_ok=False,
               title=f"Logit lens at the last token {_token(r.str_tokens[-1])!r} of {prompt!r}; target {tgt!r} ({who}); {subject.format}")  # fmt: skip
    first = r.first_layer_top1()
    paragraph(out, f"{tgt!r} is the top prediction from layer {first} on." if first is not None
              else f"{tgt!r} never becomes the top prediction.")  # fmt: skip
    if grid:
        gcols = [Col("layer", "right"), *(Col(_token(p)) for p in r.str_tokens)]
        grows = [[label, *(_cell(f"{_token(r.top_tokens[s][i][0])} {float(r.top_probs[s][i][0]):.2f}")
                           for i in range(len(r.str_tokens)))] for s, label in enumerate(r.labels)]  # fmt: skip
        show_table(
            out,
            gcols,
            grows,
            title="Top-1 token at each layer (rows) and position (columns)",
            side_ok=False,
        )
    _pictures(pictures)


# -- ablation ---------------------------------------------------------------------------------


@app.command()
def ablate(
    model: Model = DEFAULT_MODEL,
    dtype: InspectDtype = "auto",
    quant: InspectQuant = "auto",
    threads: Threads = None,
    text: str | None = typer.Option(
        None, "--text", help="Text to measure the loss on (default: a built-in paragraph)."
    ),
    file: Path | None = typer.Option(None, "--file", "-f", help="Read the text from this file."),
    chars: int = typer.Option(
        2000, "--chars", help="Use the first this many characters of --file."
    ),
    mode: str = typer.Option(
        "zero", "--mode", help="zero: replace the output by zeros; mean: by its mean over the text."
    ),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Cut the text to this many tokens."),
    component: list[str] | None = typer.Option(
        None, "--component", "-c", help="attn or mlp (repeatable; default both)."
    ),
    out_dir: OutDir = Path("."),
    no_plot: NoPlot = False,
    as_json: Json = False,
) -> None:
    """Knock out each layer's attention or MLP in turn; report the change in next-token loss."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pellucid.inspect import plots
    from pellucid.inspect.ablate import DEFAULT_TEXT, ablate_layers

    if text is not None and file is not None:
        raise PellucidError("give --text or --file, not both", param="text")
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8", errors="replace")[:chars]
        except OSError as e:
            raise PellucidError(f"cannot read {str(file)!r}: {e}", param="file") from None
    text = DEFAULT_TEXT if text is None else text
    subject = _load(model, dtype, quant, threads)
    n = len(subject.model.blocks)
    components = tuple(component or ("attn", "mlp"))
    with Progress(TextColumn("ablating {task.fields[what]:>8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console(stderr=True), transient=True) as bar:  # fmt: skip
        task = bar.add_task("ablate", total=len(components) * n, what="baseline")
        res = ablate_layers(subject, text, mode=mode, max_tokens=max_tokens, components=components,
                            progress=lambda done, what: bar.update(task, advance=done, what=what))  # fmt: skip
    pictures = [] if no_plot else [plots.ablation_plot(res, out_dir / f"ablation_{mode}.png")]
    if as_json:
        d = res.to_dict()
        d["pictures"] = [str(p) for p in pictures]
        print_json(d, indent=None)
        return
    out = console()
    cut = f", cut from {res.truncated_from}" if res.truncated_from else ""
    names = {"attn": "attention", "mlp": "MLP"}
    worst = {(c, i) for c, i, _ in res.ranking(5)}
    rows = []
    for i in range(res.n_layers):
        cells = []
        for c in components:
            d = res.delta(c)[i]
            cells.append(f"[bold red]{d:+.3f}[/]" if (c, i) in worst else f"{d:+.3f}")
        rows.append([str(i), *cells])
    show_table(out, [Col("layer", "right"), *(Col(f"Δ loss, {names[c]}", "right") for c in components)], rows,
               title=f"{mode.capitalize()}-ablation on {res.n_tokens} tokens{cut}: baseline loss {res.base_loss:.3f} nats/token; {subject.format}",
               side_ok=False)  # fmt: skip
    paragraph(
        out, "Largest: " + ", ".join(f"{names[c]} {i} ({d:+.3f})" for c, i, d in res.ranking(5))
    )
    _pictures(pictures)

"""pellucid quantize-report: size and quality of every weight format, against float32."""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer
from rich.progress import Progress

from pellucid import registry
from pellucid.cli import app
from pellucid.cli.display import Col, SizedAtUse, show_table
from pellucid.cli.display import console as out_console
from pellucid.errors import PellucidError
from pellucid.registry import DEFAULT_MODEL
from pellucid.runtime import FLOAT_FORMATS, FORMATS

console = SizedAtUse(stderr=True)


def split_format(label: str) -> tuple[str | None, str]:
    """'int4' -> ('int4', 'float32'); 'int4@bfloat16' -> ('int4', 'bfloat16'); 'bfloat16' -> (None, 'bfloat16').

    A quantized format's activations (residual stream, norms, attention) default to float32.
    """
    fmt, _, act = label.partition("@")
    if fmt.startswith("int"):
        return fmt, act or "float32"
    return None, fmt


@app.command("quantize-report")
def quantize_report(
    model: str = typer.Argument(DEFAULT_MODEL, help="Registry name, .gguf file or HF folder."),
    text: Path = typer.Option(None, "--text", help="Evaluation text (default: $PELLUCID_EVAL_TEXT, else the WikiText-2 excerpt shipped with pellucid, ~24k tokens)."),
    tokens: int = typer.Option(16384, "--tokens", help="Tokens of the text to score (from its start)."),
    window: int = typer.Option(512, "--window", help="Tokens per window (non-overlapping)."),
    formats: str = typer.Option("float32,bfloat16,float16,int8,int4", "--formats",
                                help="Formats to compare (float32 is the reference); int8/int4 run float32 activations, int4@bfloat16 bfloat16 ones."),  # fmt: skip
    peer_python: str | None = typer.Option(os.environ.get("PELLUCID_PEER_PYTHON"), "--peer-python",
                                           help="An interpreter with llama-cpp-python, to score llama.cpp on the same windows."),  # fmt: skip
    peer_tokens: int = typer.Option(8192, "--peer-tokens", help="Tokens scored through llama.cpp (a prefix of --tokens)."),
    threads: int = typer.Option(2, "--threads"),
    out: Path = typer.Option(Path("."), "--out", help="Folder for the PNG and JSON."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Bytes per parameter, memory, perplexity, KL and top-1 agreement vs float32, per format."""
    # (imported here: every `pellucid` start imports this module, and weightless commands never import torch)
    import torch

    from pellucid.loading import load_model
    from pellucid.quantization import report as qr
    from pellucid.quantization.apply import model_nbytes

    torch.set_num_threads(threads)
    text = Path(text or qr.default_text())
    if not text.is_file():
        raise PellucidError(f"evaluation text {str(text)!r} does not exist; pass --text FILE", param="text")
    fmts = _formats(formats)
    path = registry.resolve(model)
    with console.status("loading the formats"):
        loaded = {f: load_model(path, dtype=split_format(f)[1], quant=split_format(f)[0]) for f in fmts}
    models = {f: lm.model for f, lm in loaded.items()}
    windows = qr.text_windows(loaded["float32"].tokenizer, text, tokens, window)
    if not windows:
        raise PellucidError(f"{text}: fewer than {window} tokens", param="text")
    n_params = qr.count_params(models["float32"])
    rep = qr.Report(str(model), str(text), len(windows) * window, window, n_params)
    peer, peer_version, n_peer, peer_seconds = None, "", 0, 0.0
    if peer_python and path.suffix == ".gguf":
        n_peer = min(len(windows), max(1, peer_tokens // window))
        with console.status(f"llama.cpp on {n_peer} windows ({peer_python})"):
            t = time.perf_counter()
            peer, peer_version = qr.peer_logits(peer_python, path, windows[:n_peer], threads)
            peer_seconds = time.perf_counter() - t
    with Progress(console=console.now()) as prog:
        task = prog.add_task("scoring windows", total=len(windows))
        acc, seconds = qr.score(models, windows, peer=peer, n_peer=n_peer, on_window=lambda: prog.advance(task))
    rep.rows = [qr.row(f, model_nbytes(m), n_params, acc[f], seconds[f]) for f, m in models.items()]
    if peer is not None:
        rep.rows.append(qr.row(f"llama.cpp ({peer_version})", path.stat().st_size, n_params, acc["llama.cpp"], peer_seconds,
                               note=f"file as stored; first {n_peer * window} tokens"))  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    png = qr.plot_report(rep, out / "quantize_report.png")
    (out / "quantize_report.json").write_text(rep.to_json())
    if json_out:
        typer.echo(rep.to_json())
        return
    _show_table(rep, model, text)
    console.print(f"[dim]{n_params:,} parameters; KL(p_float32 || p_format) per scored token[/]")
    typer.echo(str(png))
    typer.echo(str(out / "quantize_report.json"))


def _formats(formats: str) -> list[str]:
    """The --formats list, float32 (the reference) first; unknown formats are errors."""
    fmts = [f.strip() for f in formats.split(",") if f.strip()]
    bad = [f for f in fmts if not _known(f)]
    if bad:
        raise PellucidError(f"format {bad[0]!r} is not one of {', '.join(FORMATS)} (int4-g64, ...; '-a8' after int4 "
                            "or int8 for 8-bit activations; '@bfloat16' for a quantized format's activation type)",
                            param="formats")  # fmt: skip
    return ["float32", *(f for f in fmts if f != "float32")]


def _known(label: str) -> bool:
    from pellucid.quantization.apply import parse_quant

    quant, act = split_format(label)
    if act not in FLOAT_FORMATS:
        return False
    try:
        return quant is None or parse_quant(quant)[0] is not None
    except PellucidError:
        return False


def _show_table(rep, model: str, text: Path) -> None:
    cols = [Col("format")] + [Col(c, "right") for c in ("bytes/param", "weights MiB", "perplexity", "mean KL", "KL p99",
                                                         "top-1 agree", "tokens", "seconds")]  # fmt: skip
    rows = [[r.label, f"{r.bytes_per_param:.3f}", f"{r.weights_mib:.1f}", f"{r.perplexity:.3f}", f"{r.kl_mean:.5f}",
             f"{r.kl_p99:.4f}", f"{100 * r.top1_agreement:.2f}%", f"{r.n_tokens:,}", f"{r.seconds:.0f}"] for r in rep.rows]  # fmt: skip
    show_table(out_console(), cols, rows, title=f"{model}: {rep.n_tokens:,} tokens of {text.name}, {rep.window}-token windows, vs float32")

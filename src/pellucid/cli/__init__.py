"""The `pellucid` command. One module per command group; each registers on `app`."""

from __future__ import annotations

import importlib
import os
import sys

import typer

app = typer.Typer(
    name="pellucid",
    help="An LLM inference engine you can see through.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module adds its commands to `app` on import.
COMMAND_MODULES = ["models", "generate", "inspect", "sampling", "serve", "prompts", "bench", "quant", "speculate"]


def _register() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"pellucid.cli.{name}")


def main() -> None:
    from pellucid.errors import PellucidError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _register()
    try:
        app()
    except PellucidError as e:
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {e.message}", highlight=False, markup=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)

"""The `pellucid` command. One module per command group; each registers on `app`.

`_register` imports them and gives every command the same help: docstrings reflowed into
paragraphs, option types as words (TEXT, INTEGER) and none on flags, arguments in capitals
(`pellucid generate [OPTIONS] PROMPT`), and `-h` / `--version` everywhere.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
import sys
from inspect import cleandoc
from typing import Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

# -- help text ------------------------------------------------------------------------------

# a paragraph with list items or indented (code) lines keeps its line breaks
_BLOCK = re.compile(r"^\s*([-*•] |\d+[.)] |\$ |>>> )|^\s{2,}\S")


def reflow(doc: str | None) -> str | None:
    """A docstring as help text: dedented, each hard-wrapped paragraph joined into one line
    (so the terminal, not the source file, decides where lines break). Paragraphs with list
    items or indented lines keep their line breaks."""
    if not doc:
        return doc
    out = []
    for para in re.split(r"\n\s*\n", cleandoc(doc)):
        lines = para.splitlines()
        if para.startswith("\b") or any(_BLOCK.match(ln) for ln in lines):
            out.append(para)
        else:
            out.append(" ".join(ln.strip() for ln in lines))
    return "\n\n".join(out)


_TYPE_WORDS = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH", "file": "FILE",
               "directory": "DIR", "bool": "BOOLEAN"}  # fmt: skip


class _Option(TyperOption):
    """A flag shows no type; other options show theirs as a word: --max-tokens INTEGER."""

    def display_type_rich(self, ctx: Any) -> str | None:
        if self.is_flag or self.count:
            return None
        if self.metavar is not None:
            return self.metavar
        label = str(super().display_type_rich(ctx) or "").strip("<>.")
        label = re.sub(r"^list\[(.*)\]$", r"\1", label)
        word = _TYPE_WORDS.get(label, label.upper() if "|" not in label else f"[{label}]")
        return word + ("..." if self.nargs != 1 else "")


class _Argument(TyperArgument):
    """An argument is named in capitals, PROMPT, or [MODEL] in the usage line when optional."""

    @property
    def display_name_raw(self) -> str:
        return self.metavar or (self.name or "").upper()

    def display_type_rich(self, ctx: Any) -> str | None:
        return None  # the name says it; the help says the rest

    def _usage_display_name(self) -> str:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name + ("..." if self.nargs != 1 else "")

    def get_usage_pieces(self, ctx: Any) -> list[str]:
        return [self._usage_display_name()]


def _show_version(value: bool) -> None:
    if value:
        from pellucid import __version__

        typer.echo(f"pellucid {__version__}")
        raise typer.Exit()


_VERSION_HELP = "Show pellucid's version and exit."


def _version_option() -> TyperOption:
    """The --version flag as a parameter that can be added to any command."""
    mini = typer.Typer(add_completion=False)

    @mini.command()
    def _v(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                        expose_value=False, help=_VERSION_HELP)) -> None:  # fmt: skip
        pass

    (opt,) = [p for p in typer.main.get_command(mini).params if p.name == "version"]
    return opt


_VERSION: TyperOption | None = None


def _polish(params: list) -> list:
    for p in params:
        if type(p) is TyperOption:
            p.__class__ = _Option
        elif type(p) is TyperArgument:
            p.__class__ = _Argument
    return params


class Command(TyperCommand):
    """Every pellucid command: reflowed help, --version, and the parameter display above."""

    def __init__(
        self, *args: Any, help: str | None = None, params: list | None = None, **kwargs: Any
    ) -> None:
        global _VERSION
        params = list(params or [])
        if not any(p.name == "version" for p in params):
            _VERSION = _VERSION or _version_option()
            params.append(copy.copy(_VERSION))
        super().__init__(*args, help=reflow(help), params=_polish(params), **kwargs)

    def get_params(self, ctx: Any) -> list:
        return _polish(super().get_params(ctx))  # the help option is made here, lazily


class Group(TyperGroup):
    def __init__(
        self, *args: Any, help: str | None = None, params: list | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, help=reflow(help), params=_polish(list(params or [])), **kwargs)

    def get_params(self, ctx: Any) -> list:
        return _polish(super().get_params(ctx))


app = typer.Typer(
    name="pellucid",
    help="An LLM inference engine you can see through.",
    cls=Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help=_VERSION_HELP
    ),
) -> None:
    """An LLM inference engine you can see through."""


# Each module adds its commands to `app` on import.
COMMAND_MODULES = [
    "models",
    "generate",
    "inspect",
    "sampling",
    "serve",
    "prompts",
    "bench",
    "quant",
    "speculate",
    "steer",
]


def _use_our_classes(t: typer.Typer) -> None:
    """Commands and sub-groups registered by any module (on `app` or a sub-app) use Command/Group."""
    for info in t.registered_commands:
        if info.cls in (None, TyperCommand):
            info.cls = Command
    for g in t.registered_groups:
        if g.typer_instance is not None:
            if not isinstance(g.cls, type) and not isinstance(g.typer_instance.info.cls, type):
                g.cls = Group  # unset (typer's DefaultPlaceholder)
            _use_our_classes(g.typer_instance)


def _register() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"pellucid.cli.{name}")
    _use_our_classes(app)


def main() -> None:
    from pellucid import runtime
    from pellucid.errors import PellucidError

    runtime.quick_start()  # until a model is loaded (cli.common.load_llm) or the command ends

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Other libraries' warnings (matplotlib's missing glyphs, torch's deprecations) are for their
    # developers, not for someone running a command; pellucid's own still show.
    import warnings

    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"pellucid(\.|$)")
    _register()
    try:
        app()
    except PellucidError as e:
        from rich.console import Console
        from rich.markup import escape

        # one line, never wrapped here: a path or URI in the message stays whole
        Console(stderr=True).print(
            f"[bold red]error:[/] {escape(e.message)}", highlight=False, soft_wrap=True
        )
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)

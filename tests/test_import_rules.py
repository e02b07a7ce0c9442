"""The package's layers, as its import graph: lower layers never import higher ones.

Every import counts, at the top of a module or inside a function (a function-local import
is still a dependency). The rules: models never import engine, server, cli or loading;
weights (file readers) never import models, quantization, loading, engine, server or cli;
engine never imports server or cli; kernels (the C++ ops and their build) import no other
layer; nothing below the front doors imports cli.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from paths import ROOT

SRC = ROOT / "src" / "pellucid"

RULES = {  # package -> packages it must never import
    "models": {"engine", "server", "cli", "loading", "api"},
    "weights": {"models", "quantization", "loading", "engine", "server", "cli", "api", "text"},
    "engine": {"server", "cli"},
    "sampling": {"server", "cli", "engine"},
    "text": {"models", "engine", "server", "cli", "loading"},
    "quantization": {"engine", "server", "cli"},
    "loading": {"engine", "server", "cli", "api"},
    "server": {"cli"},
    "kernels": {"models", "quantization", "loading", "engine", "server", "cli", "api", "weights", "text", "sampling"},
}


def imports(path: Path) -> set[str]:
    """The pellucid subpackages `path` imports (first component after `pellucid.`)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "pellucid"]
        for n in names:
            parts = n.split(".")
            if parts[0] == "pellucid" and len(parts) > 1:
                out.add(parts[1])
    return out


def modules(package: str) -> list[Path]:
    return sorted((SRC / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(RULES))
def test_layer_imports_nothing_above_it(package):
    assert modules(package), f"no modules in pellucid.{package}"
    bad = {str(p.relative_to(SRC)): sorted(imports(p) & RULES[package]) for p in modules(package)}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"pellucid.{package} imports what it must not: {bad}"


def test_the_checker_sees_function_local_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from pellucid.engine.engine import Engine\n    import pellucid.cli\n")
    assert imports(f) == {"engine", "cli"}


@pytest.mark.parametrize("argv", [["--help"], ["count", "hello world"], ["render", "hi"], ["prompt", "list"],
                                  ["models"], ["generate", "--help"]])  # fmt: skip
def test_commands_that_need_no_weights_import_no_torch(argv):
    """torch costs about a second to import: a command that reads no weights never pays it."""
    import subprocess
    import sys

    code = ("import sys\nfrom pellucid.cli import main\nsys.argv = ['pellucid', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules, file=sys.stderr)")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert r.stderr.strip().splitlines()[-1] == "False", (argv, r.stderr[-2000:])

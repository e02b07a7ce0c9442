"""pellucid steer make / list / show: steering vectors made on the served model (pellucid.steering)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pellucid.cli import app
from pellucid.cli.common import (
    DEFAULT_DTYPE,
    DEFAULT_QUANT,
    Dtype,
    Model,
    Quant,
    Threads,
    load_llm,
    model_name,
)
from pellucid.errors import PellucidError

steer_app = typer.Typer(help="Steering vectors: make one from contrasting examples, list them, show one.", no_args_is_help=True)
app.add_typer(steer_app, name="steer")

out = Console()
SteerDir = Annotated[Path | None, typer.Option("--dir", help="The folder of named vectors (default: $PELLUCID_HOME/steering).")]
SteerOpt = typer.Option(None, "--steer", metavar="NAME[:scale][@layers]",
                        help="Add a steering vector to the residual stream: a name (pellucid steer list) or a .gguf "
                             "control vector, its scale (default 1) and layers (6, 4-8 or 4,6,8; default its own). "
                             "Repeat to add several.")  # fmt: skip


def _folder(folder: Path | None) -> Path:
    from pellucid.steering import default_dir

    return Path(folder).expanduser() if folder is not None else default_dir()


def _name(name: str) -> str:
    if not name or "/" in name or "\\" in name or name.startswith(".") or len(name) > 100:
        raise PellucidError(f"steering vector name {name!r} must be a plain file name (no '/', not starting with '.')", param="NAME")
    return name


def steer_items(specs: list[str] | None) -> list | None:
    """--steer values -> steer items; a .gguf path becomes its vector (read now: errors before the load)."""
    from pellucid.steering import SteeringVector, parse_spec

    if not specs:
        return None
    items = []
    for spec in specs:
        item = parse_spec(spec)
        if str(item["vector"]).endswith(".gguf"):
            item["vector"] = SteeringVector.load(Path(item["vector"]).expanduser())
        items.append(item)
    return items


@steer_app.command("make")
def make(
    name: str = typer.Argument(..., help="The vector's name (it is saved as NAME.gguf in the steering folder)."),
    positive: Path = typer.Option(..., "--positive", help="Examples that show the property, one per line (\\n for a newline)."),
    negative: Path = typer.Option(..., "--negative", help="Examples that do not, one per line."),
    layers: str | None = typer.Option(None, "--layers", help="Layers to make it for: 6, 4-8 or 4,6,8 (default: every layer but 0)."),
    position: str = typer.Option("mean", "--position", help="Each example's stream: 'mean' over its tokens or its 'last' token."),
    model: Model = None,
    dtype: Dtype = DEFAULT_DTYPE,
    quant: Quant = DEFAULT_QUANT,
    threads: Threads = None,
    folder: SteerDir = None,
    plot: Path | None = typer.Option(None, "--plot", help="Also write the per-layer separation and norms as a PNG here."),
) -> None:
    """Make a steering vector from contrasting examples on the model: the mean residual
    stream of the positive examples minus that of the negative ones, per layer."""
    from pellucid.progress import Progress
    from pellucid.steering import parse_layers, read_examples

    _name(name)
    pos, neg = read_examples(positive), read_examples(negative)
    chosen = parse_layers(layers, what="--layers") if layers else None
    if position not in ("mean", "last"):
        raise PellucidError(f"--position {position!r} must be 'mean' or 'last'", param="--position")
    mname = model_name(model, None)
    llm = load_llm(mname, dtype, quant, threads=threads, max_batch=8)
    progress = Progress(f"steer make {name}")
    vec = llm.make_steering_vector(pos, neg, layers=chosen, position=position, name=name, progress=progress)
    progress.finish()
    path = vec.save(_folder(folder) / f"{name}.gguf")
    out.print(f"saved {path} ({len(vec.layers)} layers, width {vec.d_model}, from {len(pos)} positive and {len(neg)} negative examples)")
    _show(vec, plot)


@steer_app.command("list")
def list_(folder: SteerDir = None) -> None:
    """The named steering vectors in the folder."""
    from pellucid.steering import SteeringLibrary

    lib = SteeringLibrary(_folder(folder))
    entries = lib.describe()
    if not entries:
        out.print(f"no steering vectors in {lib.folder} (make one: pellucid steer make NAME --positive F --negative F)")
        return
    t = Table("name", "layers", "width", "made on", "method")
    for e in entries:
        t.add_row(e["name"], _layer_text(e["layers"]), str(e["d_model"]), str(e["model"] or e["model_hint"]), str(e["method"] or "-"))
    out.print(t)


@steer_app.command("show")
def show(
    name: str = typer.Argument(..., help="A vector's name in the folder, or a .gguf control-vector file."),
    folder: SteerDir = None,
    plot: Path | None = typer.Option(None, "--plot", help="Write the per-layer separation and norms as a PNG here."),
) -> None:
    """A steering vector's layers, norms and (for one pellucid made) how well each layer separates its examples."""
    from pellucid.steering import SteeringLibrary, SteeringVector

    vec = SteeringVector.load(Path(name).expanduser()) if name.endswith(".gguf") else SteeringLibrary(_folder(folder)).get(name)
    _show(vec, plot)


def _show(vec, plot: Path | None) -> None:
    meta = vec.meta
    out.print(f"[bold]{vec.name}[/]: width {vec.d_model}, layers {_layer_text(vec.layers)}, made for "
              f"{meta.get('model') or vec.model_hint or '?'} ({meta.get('method', 'unknown method')}"
              f"{', position ' + str(meta['position']) if 'position' in meta else ''})")  # fmt: skip
    sep = dict(zip([int(i) for i in meta.get("separation_layers", [])], meta.get("separation", []), strict=False))
    t = Table("layer", "norm", *(["separation"] if sep else []))
    for i, n in vec.norms().items():
        t.add_row(str(i), f"{n:.3f}", *([f"{sep[i]:.2f}" if i in sep else "-"] if sep else []))
    out.print(t)
    if sep:
        best = max(sep, key=sep.get)
        out.print(f"[dim]the examples separate most after layer {best} ({sep[best]:.2f} pooled standard deviations)[/]")
    if plot is not None:
        from pellucid.inspect.plots import steering_plot

        out.print(f"wrote {steering_plot(vec, plot)}")


def _layer_text(layers: list[int]) -> str:
    from pellucid.steering import ranges

    return ranges(layers)

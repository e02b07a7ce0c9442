"""Hook points: identity modules named by their path, TransformerLens style.

`blocks.3.attn.hook_pattern` is simply the module at that path. A hook point returns its
input untouched until a hook is attached; a hook may read the activation or return a
replacement. Nothing is stored and nothing is computed until someone attaches a hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

Hook = Callable[[torch.Tensor, "HookPoint"], torch.Tensor | None]


class HookPoint(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.name = ""  # filled in by `name_hook_points`
        self.fns: list[Hook] = []

    @property
    def active(self) -> bool:
        return bool(self.fns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self.fns:
            out = fn(x, self)
            if out is not None:
                assert out.shape == x.shape, f"hook on {self.name} returned {tuple(out.shape)}, expected {tuple(x.shape)}"
                x = out
        return x


def name_hook_points(model: nn.Module) -> dict[str, HookPoint]:
    points = {}
    for name, mod in model.named_modules():
        if isinstance(mod, HookPoint):
            mod.name = name
            points[name] = mod
    return points


class HookedMixin:
    """Gives a model `hook_points`, `hooks(...)` and `run_with_cache(...)`."""

    _hook_points: dict[str, HookPoint]

    @property
    def hook_points(self) -> dict[str, HookPoint]:
        if not getattr(self, "_hook_points", None):
            self._hook_points = name_hook_points(self)  # type: ignore[arg-type]
        return self._hook_points

    def resolve_hook_names(self, names: Iterable[str] | str | Callable[[str], bool] | None) -> list[str]:
        """Names, a single name, a predicate, or None (all) -> a list of hook point names."""
        points = self.hook_points
        if names is None:
            return list(points)
        if callable(names):
            return [n for n in points if names(n)]
        if isinstance(names, str):
            names = [names]
        out = []
        for n in names:
            if n not in points:
                near = [p for p in points if p.endswith(n.split(".")[-1])][:5]
                raise KeyError(f"no hook point {n!r}; e.g. {near or list(points)[:5]}")
            out.append(n)
        return out

    @contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[str, Hook]]) -> Iterator[None]:
        """Attach (name, fn) pairs for the duration of a `with` block."""
        attached = []
        try:
            for name, fn in fwd_hooks:
                for n in self.resolve_hook_names(name):
                    self.hook_points[n].fns.append(fn)
                    attached.append((n, fn))
            yield
        finally:
            for n, fn in attached:
                self.hook_points[n].fns.remove(fn)

    def reset_hooks(self) -> None:
        for p in self.hook_points.values():
            p.fns.clear()

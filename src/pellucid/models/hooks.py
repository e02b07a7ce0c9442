"""Hook points: identity modules named by their path, TransformerLens style.

`blocks.3.attn.hook_pattern` is simply the module at that path. A hook point returns its
input untouched until a hook is attached; a hook may read the activation or return a
replacement. Nothing is stored and nothing is computed until someone attaches a hook.

Names every architecture provides (shapes as in models/layers.py):
  hook_embed                     (B, T, E) token embeddings (after any scaling)
  blocks.{L}.hook_resid_pre      (B, T, E) residual stream entering layer L
  blocks.{L}.attn.hook_q/k/v     (B, T, H|K, D) after rotary
  blocks.{L}.attn.hook_pattern   (B, H, T, L) attention probabilities
  blocks.{L}.attn.hook_z         (B, T, H, D) per-head outputs before Wo
  blocks.{L}.hook_attn_out       (B, T, E) what attention adds to the stream
  blocks.{L}.hook_resid_mid      (B, T, E) after attention's add
  blocks.{L}.mlp.hook_post       (B, T, F) activations before the down projection
  blocks.{L}.hook_mlp_out        (B, T, E) what the MLP adds to the stream
  blocks.{L}.hook_resid_post     (B, T, E) residual stream leaving layer L
`run_with_cache` records any of them into an `ActivationCache`; its `logit_lens` and
`accumulated_resid` read the stream through the model's own final norm and unembedding
(`model.norm`, `model.unembed`), so they work on every architecture that has those.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

Hook = Callable[[torch.Tensor, "HookPoint"], torch.Tensor | None]
Names = Iterable[str] | str | Callable[[str], bool] | None


class HookPoint(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.name = ""  # filled in by `name_hook_points`
        self.fns: list[Hook] = []

    @property
    def active(self) -> bool:
        return bool(self.fns)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Skips nn.Module's call machinery: an idle hook point costs one attribute test.
        return self.forward(x) if self.fns else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self.fns:
            out = fn(x, self)
            if out is not None:
                assert out.shape == x.shape, (
                    f"hook on {self.name} returned {tuple(out.shape)}, expected {tuple(x.shape)}"
                )
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

    def resolve_hook_names(self, names: Names) -> list[str]:
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
    def hooks(
        self, fwd_hooks: Iterable[tuple[str | Callable[[str], bool], Hook]]
    ) -> Iterator[None]:
        """Attach (name, fn) pairs for the duration of a `with` block (name may be a predicate)."""
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

    def run_with_cache(self, tokens: torch.Tensor | list[int], names: Names = None, *,
                       hooks: Iterable[tuple[str, Hook]] = ()) -> ActivationCache:  # fmt: skip
        """One full forward (no KV cache) recording the activations at `names` (None: all).

        `hooks` are attached before the recording ones, so the cache sees their edits.
        Returns an ActivationCache; the logits are `cache.logits` (B, T, V).
        """
        tokens = as_batch(tokens, next(self.parameters()).device)  # type: ignore[attr-defined]
        store: dict[str, torch.Tensor] = {}

        def save(x: torch.Tensor, hook: HookPoint) -> None:
            store[hook.name] = x.detach()

        names = self.resolve_hook_names(names)
        with torch.no_grad(), self.hooks([*hooks, *((n, save) for n in names)]):
            logits = self(tokens)  # type: ignore[operator]
        return ActivationCache(store, self, tokens=tokens, logits=logits)  # type: ignore[arg-type]


def as_batch(
    tokens: torch.Tensor | list[int], device: torch.device | str | None = None
) -> torch.Tensor:
    """A list of ids, (T,) or (B, T) -> a (B, T) int64 tensor."""
    t = torch.as_tensor(tokens, dtype=torch.long, device=device)
    if t.dim() == 1:
        t = t[None]
    assert t.dim() == 2 and t.shape[1] > 0, (
        f"tokens must be (T,) or (B, T) with T > 0, got {tuple(t.shape)}"
    )
    return t


class ActivationCache(Mapping[str, torch.Tensor]):
    """Activations by hook name, plus views of the residual stream.

    `cache["blocks.3.hook_resid_post"]`, or the short form `cache["resid_post", 3]`
    (also "pattern", "z", "q", "attn_out", "mlp_out", "post", ...). Tensors keep the batch
    dimension. `logits` (B, T, V) float32, `tokens` (B, T), `str_tokens` when known.
    """

    def __init__(self, store: dict[str, torch.Tensor], model: nn.Module, *, tokens: torch.Tensor | None = None,
                 logits: torch.Tensor | None = None, str_tokens: list[str] | None = None):  # fmt: skip
        self._store = store
        self.model = model
        self.tokens = tokens
        self.logits = logits
        self.str_tokens = str_tokens

    # -- mapping ---------------------------------------------------------------------
    def _key(self, key: str | tuple[str, int]) -> str:
        if isinstance(key, str):
            return key
        short, layer = key
        short = short.removeprefix("hook_")
        for name in (
            f"blocks.{layer}.hook_{short}",
            f"blocks.{layer}.attn.hook_{short}",
            f"blocks.{layer}.mlp.hook_{short}",
        ):
            if name in self._store:
                return name
        return f"blocks.{layer}.hook_{short}"

    def __getitem__(self, key: str | tuple[str, int]) -> torch.Tensor:  # type: ignore[override]
        name = self._key(key)
        if name not in self._store:
            raise KeyError(
                f"{name!r} was not recorded; pass it in run_with_cache(names=...) (recorded: {len(self._store)} hook points)"
            )
        return self._store[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self._store)} hook points, tokens {tuple(self.tokens.shape) if self.tokens is not None else None})"

    @property
    def n_layers(self) -> int:
        return len(self.model.blocks)  # type: ignore[arg-type]

    # -- the residual stream -------------------------------------------------------------
    def accumulated_resid(
        self, *, incl_mid: bool = False, pos: int | slice | None = None
    ) -> tuple[torch.Tensor, list[str]]:
        """The stream after each stage: (n, B, T, E) and labels.

        Labels: "embed" (entering layer 0), then "0", "1", ... (leaving each layer), with
        "0_mid", ... (after attention's add) in between when `incl_mid`. The last entry is
        what the final norm and the unembedding turn into the model's logits.
        """
        rows, labels = [self["resid_pre", 0]], ["embed"]
        for i in range(self.n_layers):
            if incl_mid:
                rows.append(self["resid_mid", i])
                labels.append(f"{i}_mid")
            rows.append(self["resid_post", i])
            labels.append(str(i))
        stack = torch.stack(rows)  # (n, B, T, E)
        return (stack if pos is None else stack[:, :, pos]), labels

    def decompose_resid(self, *, pos: int | slice | None = None) -> tuple[torch.Tensor, list[str]]:
        """The stream's summands: embedding, then each layer's attention and MLP outputs.

        (n, B, T, E) and labels ("embed", "0_attn", "0_mlp", ...); they sum to the final
        residual stream (up to float rounding).
        """
        rows, labels = [self["resid_pre", 0]], ["embed"]
        for i in range(self.n_layers):
            rows += [self["attn_out", i], self["mlp_out", i]]
            labels += [f"{i}_attn", f"{i}_mlp"]
        stack = torch.stack(rows)
        return (stack if pos is None else stack[:, :, pos]), labels

    def apply_final_norm(self, resid: torch.Tensor) -> torch.Tensor:
        """The model's final norm over the last dimension of any stack of residuals."""
        with torch.no_grad():
            return self.model.norm(resid)  # type: ignore[operator]

    def unembed_resid(self, resid: torch.Tensor) -> torch.Tensor:
        """Residual(s) (..., E) -> float32 logits (..., V) through final norm and unembedding."""
        with torch.no_grad():
            return self.model.unembed(self.model.norm(resid))  # type: ignore[operator]

    def logit_lens(
        self, *, incl_mid: bool = False, pos: int | slice | None = -1
    ) -> tuple[torch.Tensor, list[str]]:
        """Each stage's residual read as if it were the last: logits (n, B, [T,] V) and labels.

        `pos` picks positions (default the last; None: all, which is n x B x T x V floats).
        The last row equals the model's own logits at those positions.
        """
        resid, labels = self.accumulated_resid(incl_mid=incl_mid, pos=pos)
        # one stage at a time: the same shapes as the model's own forward, so the last
        # row is bit-identical to its logits
        return torch.stack([self.unembed_resid(r) for r in resid]), labels

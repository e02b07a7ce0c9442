"""PNG pictures of the internals (matplotlib, Agg): every axis labelled with tokens or
layers, every colour with a scale. Each function takes the data object and a path, and
returns the path it wrote."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import PowerNorm  # noqa: E402

plt.rcParams.update({"font.size": 9})

CMAP = "viridis"


def token_label(piece: str, width: int = 12) -> str:
    """A token as it should read on an axis: visible spaces and newlines, cut to `width`."""
    s = piece.replace("\n", "↵").replace("\t", "\\t").replace("\r", "\\r")
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)  # control characters as \x04
    if s.strip() == "":
        s = s.replace(" ", "␣")
    return s if len(s) <= width else s[: width - 1] + "…"


def _label(piece: str, width: int = 12) -> str:
    """token_label for matplotlib: a '$' would start mathtext."""
    return token_label(piece, width).replace("$", r"\$")


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _tick_every(n: int, most: int) -> int:
    return max(1, int(np.ceil(n / most)))


# -- attention ----------------------------------------------------------------------------


def attention_grid(
    patterns: torch.Tensor, pieces: list[str], path: str | Path, title: str = ""
) -> Path:
    """All heads of all layers: rows are layers, columns heads; each panel query x key.

    Drawn as one mosaic image (one imshow, not L x H axes): quick even for 30 x 9 panels.
    """
    from matplotlib.patches import Rectangle

    L, H, T, _ = patterns.shape
    labels = [_label(p, 8) for p in pieces]
    gap = max(1, round(T * 0.12))
    S = T + gap  # panel pitch in cells
    data = np.full((L * S - gap, H * S - gap), np.nan)
    tri = np.tril(np.ones((T, T), dtype=bool))  # future keys are not attendable: left blank
    p = patterns.float().numpy()
    for i in range(L):
        for h in range(H):
            block = np.where(tri, p[i, h], np.nan)
            data[i * S : i * S + T, h * S : h * S + T] = block
    cell = 1.25 / T if T <= 12 else 1.6 / T  # inches per cell: a panel is 1.25-1.6 inches
    fig_w, fig_h = data.shape[1] * cell + 2.6, data.shape[0] * cell + 1.6
    fig = plt.figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((1.3 / fig_w, 0.9 / fig_h, 1 - 2.3 / fig_w, 1 - 1.6 / fig_h))
    cmap = plt.get_cmap(CMAP).with_extremes(bad="white")
    im = ax.imshow(
        data, cmap=cmap, norm=PowerNorm(gamma=0.5, vmin=0, vmax=1), interpolation="nearest"
    )
    for i in range(L):
        for h in range(H):
            ax.add_patch(
                Rectangle((h * S - 0.5, i * S - 0.5), T, T, fill=False, lw=0.4, ec="#999999")
            )
    step = _tick_every(T, 8)
    ticks = list(range(0, T, step))
    ax.set_xticks([h * S + t for h in range(H) for t in ticks])
    ax.set_xticklabels([labels[t] for _ in range(H) for t in ticks], rotation=90, fontsize=6)
    ax.set_yticks([i * S + t for i in range(L) for t in ticks])
    ax.set_yticklabels([labels[t] for _ in range(L) for t in ticks], fontsize=6)
    ax.tick_params(length=0, pad=1)
    for side in ax.spines.values():
        side.set_visible(False)
    for h in range(H):
        ax.text(h * S + (T - 1) / 2, -gap - 0.3, f"head {h}", ha="center", va="bottom", fontsize=9)
    for i in range(L):
        ax.annotate(f"layer {i}", (0, i * S + (T - 1) / 2), xycoords=("axes fraction", "data"),
                    xytext=(-0.55 * 72, 0), textcoords="offset points", ha="right", va="center", fontsize=9)  # fmt: skip
    title = title or "Attention patterns (rows: query token, columns: key token)"
    fig.suptitle(title, fontsize=12, y=1 - 0.15 / fig_h, va="top")
    bar = min(0.4, 6 / fig_h)
    cax = fig.add_axes((1 - 0.85 / fig_w, 1 - 0.7 / fig_h - bar, 0.15 / fig_w, bar))
    fig.colorbar(im, cax=cax, label="attention probability (sqrt scale)")
    return _save(fig, path)


def attention_heatmap(
    pattern: torch.Tensor, pieces: list[str], path: str | Path, title: str
) -> Path:
    """One (T, T) pattern, large, with the probabilities written in the cells when they fit."""
    T = pattern.shape[0]
    labels = [_label(p) for p in pieces]
    size = min(max(5.0, 0.55 * T + 2.5), 22.0)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    data = pattern.float().numpy().copy()
    data[np.triu_indices(T, 1)] = np.nan
    cmap = plt.get_cmap(CMAP).with_extremes(bad="#f0f0f0")
    im = ax.imshow(data, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    step = _tick_every(T, 40)
    ax.set_xticks(range(0, T, step))
    ax.set_yticks(range(0, T, step))
    ax.set_xticklabels(labels[::step], rotation=60, ha="right")
    ax.set_yticklabels(labels[::step])
    ax.set_xlabel("key: token attended to")
    ax.set_ylabel("query: token attending")
    if T <= 16:
        for q in range(T):
            for k in range(q + 1):
                v = data[q, k]
                ax.text(
                    k,
                    q,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="black" if v > 0.6 else "white",
                )
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attention probability")
    return _save(fig, path)


# -- logit lens and residual stream ----------------------------------------------------------


def lens_heatmap(lens, path: str | Path) -> Path:
    """Stages (rows) x positions (columns), coloured by the top-1 probability, token in the cell."""
    n, T = len(lens.labels), len(lens.str_tokens)
    probs = lens.top_probs[:, :, 0].float().numpy()
    fig, ax = plt.subplots(figsize=(min(1.3 * T + 2.8, 40), 0.32 * n + 2.0))
    im = ax.imshow(probs, cmap=CMAP, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    for s in range(n):
        for t in range(T):
            v = probs[s, t]
            ax.text(t, s, _label(lens.top_tokens[s][t][0], 10), ha="center", va="center", fontsize=9,
                    color="black" if v > 0.6 else "white")  # fmt: skip
    ax.set_xticks(range(T))
    ax.set_xticklabels([_label(p) for p in lens.str_tokens], rotation=45, ha="right")
    ax.set_yticks(range(n))
    ax.set_yticklabels(
        [("embeddings" if lbl == "embed" else f"after layer {lbl}") for lbl in lens.labels],
        fontsize=8,
    )
    ax.set_xlabel("input token (the cell is the prediction for the token after it)")
    ax.set_ylabel("residual stream read at")
    ax.set_title("Logit lens: most likely next token at each layer and position")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="probability of the top token")
    return _save(fig, path)


def lens_target_plot(lens, path: str | Path) -> Path:
    """P(target) and its rank at the last position, by layer."""
    x = np.arange(len(lens.labels))
    p = lens.target_prob.float().numpy()
    rank = lens.target_rank.numpy() + 1
    fig, (ax1, ax2) = plt.subplots(
        2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    ax1.plot(x, p, marker="o", ms=4, color="tab:blue")
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_ylabel(f"P('{_label(lens.target_token)}')")
    ax1.grid(alpha=0.3)
    last = _label(lens.str_tokens[-1])
    who = "the model's own answer" if lens.target_from == "model" else "given target"
    ax1.set_title(
        f"Logit lens: probability of '{_label(lens.target_token)}' ({who}) after '{last}', by layer"
    )
    ax2.semilogy(x, rank, marker="o", ms=4, color="tab:orange")
    ax2.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax2.invert_yaxis()
    ax2.set_ylabel("rank (1 = top)")
    ax2.grid(alpha=0.3, which="both")
    step = _tick_every(len(x), 32)
    ax2.set_xticks(x[::step])
    ax2.set_xticklabels(
        [("emb" if lbl == "embed" else lbl) for lbl in lens.labels][::step], fontsize=8
    )
    ax2.set_xlabel("residual stream after layer (emb = embeddings)")
    return _save(fig, path)


def residual_norms_plot(lens, path: str | Path, pos: int = -1) -> Path:
    """The stream's norm after each layer, and what attention and the MLP add to it."""
    N = lens.n_layers
    x = np.arange(N)
    attn = lens.attn_norm[:, pos].float().numpy()
    mlp = lens.mlp_norm[:, pos].float().numpy()
    resid = lens.resid_norm[:, pos].float().numpy()  # (N + 1,) embed, then after each layer
    fig, ax = plt.subplots(figsize=(max(8, 0.32 * N + 3), 5))
    w = 0.4
    ax.bar(x - w / 2, attn, w, label="‖attention output‖", color="tab:blue")
    ax.bar(x + w / 2, mlp, w, label="‖MLP output‖", color="tab:orange")
    ax.plot(
        np.arange(-1, N),
        resid,
        marker="o",
        ms=3,
        color="black",
        label="‖residual stream‖ after the layer",
    )
    ax.set_xticks(np.arange(-1, N))
    ax.set_xticklabels(["emb"] + [str(i) for i in x], fontsize=8)
    ax.set_xlabel("layer (emb = token embeddings entering layer 0)")
    ax.set_ylabel("L2 norm")
    tok = _label(lens.str_tokens[pos])
    ax.set_title(f"Residual stream at token '{tok}' (position {pos % len(lens.str_tokens)}): "
                 "each layer adds attention, then MLP output")  # fmt: skip
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(fig, path)


# -- ablation -----------------------------------------------------------------------------------


def ablation_plot(result, path: str | Path) -> Path:
    """Change in next-token loss with each layer's attention / MLP knocked out."""
    N = result.n_layers
    x = np.arange(N)
    names = {"attn": "attention", "mlp": "MLP"}
    colors = {"attn": "tab:blue", "mlp": "tab:orange"}
    comps = list(result.loss)
    w = 0.8 / len(comps)
    fig, ax = plt.subplots(figsize=(max(8, 0.35 * N + 3), 5))
    deltas = {c: np.array(result.delta(c)) for c in comps}
    for j, c in enumerate(comps):
        ax.bar(
            x + (j - (len(comps) - 1) / 2) * w,
            deltas[c],
            w,
            label=names.get(c, c),
            color=colors.get(c),
        )
    every = np.concatenate(list(deltas.values()))
    if every.max() > 20 * max(np.median(np.abs(every)), 1e-3):
        ax.set_yscale("symlog", linthresh=max(0.05, float(np.median(np.abs(every)))))
    offset = {c: (j - (len(comps) - 1) / 2) * w for j, c in enumerate(comps)}
    for c, i, d in result.ranking(5):  # the five that matter most, with their values
        ax.annotate(f"{d:+.2f}", (i + offset[c], d), ha="center", va="bottom", fontsize=7,
                    xytext=(0, 2), textcoords="offset points")  # fmt: skip
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels([str(i) for i in x], fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel("Δ loss (nats per token)" + (" [symlog]" if ax.get_yscale() == "symlog" else ""))
    ax.set_title(f"{result.mode.capitalize()}-ablation of each layer's output on {result.n_tokens} tokens "
                 f"(baseline loss {result.base_loss:.3f})")  # fmt: skip
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(fig, path)


# -- steering -----------------------------------------------------------------------------------


def steering_plot(vector, path: str | Path) -> Path:
    """A steering vector by layer: how far its two example sets lie apart along it (bars), and its norm (line)."""
    layers = vector.layers
    norms = [vector.norms()[i] for i in layers]
    sep = dict(zip([int(i) for i in vector.meta.get("separation_layers", [])], vector.meta.get("separation", []), strict=False))
    fig, ax = plt.subplots(figsize=(max(7, 0.3 * len(layers) + 3), 4.5))
    if sep:
        ax.bar(layers, [sep.get(i, 0.0) for i in layers], color="tab:blue", label="separation (difference of mean projections / pooled std)")
        ax.set_ylabel("separation of positive and negative examples")
    ax2 = ax.twinx()
    ax2.plot(layers, norms, marker="o", ms=3, color="black", label="‖direction‖")
    ax2.set_ylabel("L2 norm of the direction")
    ax.set_xlabel("layer (the direction is added after this block)")
    what = vector.meta.get("positives"), vector.meta.get("negatives")
    made = f" from {what[0]} positive / {what[1]} negative examples" if all(what) else ""
    ax.set_title(f"Steering vector '{vector.name}'{made}")
    ax.set_xticks(layers)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8)
    return _save(fig, path)

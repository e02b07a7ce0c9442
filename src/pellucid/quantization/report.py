"""Quality and size of each weight format, measured against the float32 model.

For every format: bytes per parameter and total weight memory (counted from the
tensors), perplexity on a fixed slice of a text, and, against the float32 model on the
same windows, the mean KL divergence KL(p_fp32 || p_format) and the teacher-forced top-1
agreement (how often both pick the same next token). Windows are non-overlapping, of
`window` tokens, and every position after the first of a window is scored.
llama.cpp can be measured the same way through another interpreter (`peer_logits`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pellucid.quantization.apply import quantized_layers
from pellucid.quantization.embedding import RowEmbedding


@dataclass
class FormatQuality:
    label: str
    bytes_per_param: float
    weights_mib: float
    perplexity: float
    kl_mean: float = 0.0  # vs float32, nats per token
    kl_p99: float = 0.0
    top1_agreement: float = 1.0
    n_tokens: int = 0
    seconds: float = 0.0
    note: str = ""


@dataclass
class Report:
    model: str
    text: str
    n_tokens: int
    window: int
    n_params: int
    rows: list[FormatQuality] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({**{k: v for k, v in asdict(self).items() if k != "rows"}, "rows": [asdict(r) for r in self.rows]}, indent=2)


def text_windows(tokenizer, path: str | Path, n_tokens: int, window: int) -> list[list[int]]:
    """The first `n_tokens` tokens of the file, cut into windows of `window` tokens."""
    text = Path(path).read_text(encoding="utf-8")
    # the tokenizer sees enough text for n_tokens (about 4 characters per token), not the whole file
    ids = tokenizer.encode(text[: max(4096, n_tokens * 8)], add_bos=False)
    n = min(len(ids), n_tokens) // window * window
    return [ids[i : i + window] for i in range(0, n, window)]


def count_params(model: torch.nn.Module) -> int:
    """Parameters of the model as its float version holds them (tied weights once)."""

    n = sum(p.numel() for p in model.parameters())
    for m in quantized_layers(model).values():
        n += m.in_features * m.out_features
    return n + sum(m.weight.numel() for m in model.modules() if isinstance(m, RowEmbedding))


class Accumulator:
    """Running NLL, KL and top-1 agreement of one format against the reference."""

    def __init__(self) -> None:
        self.nll, self.n, self.agree = 0.0, 0, 0
        self.kls: list[np.ndarray] = []

    def add(self, logp: torch.Tensor, targets: torch.Tensor, ref_logp: torch.Tensor | None) -> None:
        """logp, ref_logp (T, V) log-probabilities predicting targets (T,)."""
        self.nll -= logp.gather(1, targets[:, None]).sum().item()
        self.n += targets.shape[0]
        if ref_logp is not None:
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # (T,)
            self.kls.append(kl.clamp(min=0).numpy())
            self.agree += (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()

    def result(self) -> dict:
        kl = np.concatenate(self.kls) if self.kls else np.zeros(1)
        return {"perplexity": math.exp(self.nll / max(1, self.n)), "kl_mean": float(kl.mean()),
                "kl_p99": float(np.percentile(kl, 99)), "top1_agreement": self.agree / max(1, self.n) if self.kls else 1.0,
                "n_tokens": self.n}  # fmt: skip


DEFAULT_TEXT = Path(__file__).parent / "data" / "wikitext-2-test-excerpt.txt"  # shipped: data/README.md


def default_text() -> Path:
    """$PELLUCID_EVAL_TEXT, else the WikiText-2 excerpt shipped with pellucid."""
    return Path(os.environ.get("PELLUCID_EVAL_TEXT") or DEFAULT_TEXT)


def score(models: dict[str, torch.nn.Module], windows: list[list[int]], *, peer: np.ndarray | None = None,
          n_peer: int = 0, on_window=None) -> tuple[dict[str, Accumulator], dict[str, float]]:  # fmt: skip
    """Teacher-forced scores of every format on the same windows, against models["float32"].

    `peer`: llama.cpp's logits for the first `n_peer` windows (peer_logits), scored as
    "llama.cpp". Returns the accumulators and the seconds each format's forwards took.
    """
    acc = {f: Accumulator() for f in models}
    seconds = dict.fromkeys(models, 0.0)
    if peer is not None:
        acc["llama.cpp"] = Accumulator()
    for i, w in enumerate(windows):
        targets = torch.tensor(w[1:])
        ref = None
        for f, model in models.items():
            t = time.perf_counter()
            logp = window_logp(model, w)
            seconds[f] += time.perf_counter() - t
            if f == "float32":
                ref = logp
            acc[f].add(logp, targets, None if f == "float32" else ref)
        if peer is not None and i < n_peer:
            logp = torch.log_softmax(torch.from_numpy(np.array(peer[i])), dim=-1)
            acc["llama.cpp"].add(logp, targets[: logp.shape[0]], ref)
        if on_window is not None:
            on_window()
    return acc, seconds


def row(label: str, nbytes: int, n_params: int, acc: Accumulator, seconds: float, note: str = "") -> FormatQuality:
    """One format's line of the report."""
    r = acc.result()
    return FormatQuality(label, nbytes / n_params, nbytes / 2**20, r["perplexity"], r["kl_mean"], r["kl_p99"],
                         r["top1_agreement"], r["n_tokens"], seconds, note=note)  # fmt: skip


@torch.inference_mode()
def window_logp(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """float32 log-probabilities (T-1, V) predicting tokens 1..T-1 of the window."""
    logits = model(torch.tensor([ids]))[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


PEER_SCRIPT = r"""
import json, sys, numpy as np
from llama_cpp import Llama
job = json.loads(sys.argv[1])
windows = np.load(job["windows"])
n, T = windows.shape
llm = Llama(model_path=job["model"], n_ctx=T, n_batch=T, n_ubatch=T, logits_all=True, n_threads=job["threads"], verbose=False)
out = np.lib.format.open_memmap(job["out"], mode="w+", dtype=np.float32, shape=(n, T - 1, llm.n_vocab()))
for i in range(n):
    llm.reset()
    llm.eval([int(t) for t in windows[i]])
    out[i] = np.asarray(llm.scores[: T - 1], dtype=np.float32)
out.flush()
import llama_cpp
print(json.dumps({"version": llama_cpp.__version__}))
"""


def peer_logits(python: str, gguf: str | Path, windows: list[list[int]], threads: int = 2) -> tuple[np.ndarray, str]:
    """Run llama-cpp-python (in interpreter `python`) over the windows; returns logits (n, T-1, V), version."""
    tmp = Path(tempfile.mkdtemp(prefix="pellucid-peer-"))
    np.save(tmp / "windows.npy", np.asarray(windows, dtype=np.int32))
    job = {"windows": str(tmp / "windows.npy"), "model": str(gguf), "out": str(tmp / "logits.npy"), "threads": threads}
    p = subprocess.run([python, "-c", PEER_SCRIPT, json.dumps(job)], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS=str(threads)))  # fmt: skip
    if p.returncode != 0:
        raise RuntimeError(f"llama.cpp run failed: {p.stderr[-2000:]}")
    version = json.loads(p.stdout.strip().splitlines()[-1])["version"]
    return np.load(tmp / "logits.npy", mmap_mode="r"), version


def plot_report(rep: Report, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rep.rows
    labels = [r.label for r in rows]
    colors = ["#6baed6" if not r.label.startswith("llama.cpp") else "#fd8d3c" for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.6), dpi=110)
    panels = [
        ("weight memory (MiB)", [r.weights_mib for r in rows], "{:.0f}"),
        ("perplexity (lower is better)", [r.perplexity for r in rows], "{:.2f}"),
        ("mean KL vs float32 (nats/token)", [max(r.kl_mean, 1e-6) for r in rows], "{:.4f}"),
        ("top-1 agreement with float32 (%)", [100 * r.top1_agreement for r in rows], "{:.1f}"),
    ]
    for ax, (title, vals, fmt) in zip(axes, panels, strict=True):
        bars = ax.bar(range(len(rows)), vals, color=colors)
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right")
        ax.set_title(title, fontsize=10)
        for b, v in zip(bars, vals, strict=True):
            ax.annotate(fmt.format(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
        if "KL" in title:
            ax.set_yscale("log")
        if "top-1" in title:
            ax.set_ylim(min(vals) - 3, 100.5)
        if "perplexity" in title:
            lo = min(vals)
            ax.set_ylim(lo * 0.95, max(vals) * 1.02)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{rep.model}: weight formats on the first {rep.n_tokens:,} tokens of {Path(rep.text).name} "
                 f"({rep.window}-token windows)", fontsize=11)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

"""pellucid bench: prefill and decode speed, latency, load time and memory of one format.

Each configuration runs in a fresh Python process (`python -m pellucid.cli.bench
--worker JSON`), so its peak RSS (getrusage ru_maxrss) is its own. The workload is a
fixed 128-token prompt and 128 greedy tokens (EOS ignored), a warm-up run and then
`--repeat` measured runs. `--kv-curve` plots per-token decode latency against position
with and without the KV cache.

Every `pellucid` run imports this module to register the command, so what only a run of
it needs (pellucid.api ~0.3 s, matplotlib ~0.8 s) is imported inside the functions.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import typer
from rich.console import Console

from pellucid import __version__, registry, runtime
from pellucid.cli import app
from pellucid.cli.display import Col, SizedAtUse, paragraph, path_line, print_json, show_table
from pellucid.cli.display import console as make_console
from pellucid.errors import PellucidError
from pellucid.registry import DEFAULT_MODEL
from pellucid.sampling.params import SamplingParams

console = SizedAtUse(stderr=True)

# A fixed text for prompts, so every engine sees the same token ids (cycled to any length).
PROMPT_TEXT = (
    "The river town woke slowly. Fishermen pulled their boats onto the gravel, the baker opened "
    "his shutters, and the school bell rang twice across the square. In the library, an old map "
    "showed the valley before the dam: farms along both banks, a mill, a wooden bridge, and a "
    "road that climbed into the hills towards the mines. Nobody alive remembered the mill "
    "working, but every child knew the story of the winter when the river froze so hard that "
    "carts crossed it for a month, and the miller's daughter skated to the next town to fetch a "
    "doctor for her brother. "
)


@dataclass
class BenchConfig:
    model: str = DEFAULT_MODEL
    dtype: str = runtime.DEFAULT_DTYPE
    quant: str | None = runtime.DEFAULT_QUANT
    use_cache: bool = True
    prompt_tokens: int = 128
    gen_tokens: int = 128
    threads: int = 2
    batch: int = 1
    repeat: int = 3
    max_len: int = 512  # the context window the KV cache is allocated for (llama.cpp's n_ctx in the comparison)

    @property
    def label(self) -> str:
        """The format in words, "auto" resolved for this model: int4@float32, bfloat16, ..."""
        quant = runtime.resolve_quant(self.quant, self.model)[0] if self.quant else None
        dtype = runtime.resolve_dtype(self.dtype, quant) if self.dtype == "auto" else self.dtype
        fmt = f"{quant}@{dtype}" if quant else dtype
        return fmt + ("" if self.use_cache else " no-kv-cache")


@dataclass
class BenchResult:
    config: dict
    load_seconds: float = 0.0  # load_model: file -> model in memory
    import_seconds: float = 0.0  # python + torch + pellucid imports, before the load
    first_token_seconds: float = 0.0  # first request after load (cold): prefill + first draw
    ttft_seconds: float = 0.0  # warm, median over runs
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    peak_rss_mib: float = 0.0
    weights_mib: float = 0.0
    kv_bytes_per_token: int = 0
    tokens: list[int] = field(default_factory=list)  # the greedy output of the last run (for cross-checks)
    versions: dict = field(default_factory=dict)


def prompt_ids(tokenizer, n: int, variant: int = 0) -> list[int]:
    """n token ids of the fixed text; each `variant` starts differently ("(1) The river...", "(2) ..."),
    so runs with different variants share no prefix and the prefix cache answers none of them."""
    head = f"({variant}) " if variant else ""
    ids = tokenizer.encode(head + PROMPT_TEXT * (1 + n // 60), add_bos=False)
    return ids[:n]


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return 0.0
    i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[i]


def _peak_rss_mib() -> float:

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _run_once(llm, ids: list[list[int]], gen: int) -> tuple[float, list[float], list[int]]:
    """Run the requests together; returns (seconds to the first token, per-step decode latencies, tokens of row 0)."""

    eng = llm.engine
    params = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)
    reqs = [eng.make_request(x, params) for x in ids]
    n_lat = len(eng.stats.token_latency)
    t0 = time.perf_counter()
    for r in reqs:
        eng.add_request(r)
    first = None
    while not all(r.finished for r in reqs):
        eng.step()
        if first is None and reqs[0].output_ids:
            first = time.perf_counter() - t0
    lat = eng.stats.token_latency[n_lat:]
    return first or 0.0, lat, list(reqs[0].output_ids)


def phase(text: str) -> None:
    """Tell the parent `pellucid bench` which phase the worker is in (a line on stderr)."""
    sys.stderr.write(f"@phase {text}\n")
    sys.stderr.flush()


def measure(cfg: BenchConfig, t_start: float | None = None) -> BenchResult:
    """Measure one configuration in this process (call it in a fresh one for a clean RSS)."""
    phase(f"loading {cfg.model}")
    t_imp = time.perf_counter()
    import torch

    from pellucid.api import LLM
    from pellucid.quantization.apply import model_nbytes

    torch.set_num_threads(cfg.threads)
    import_s = time.perf_counter() - (t_start if t_start is not None else t_imp)
    llm = LLM(cfg.model, dtype=cfg.dtype, quant=cfg.quant, max_batch=cfg.batch,
              max_len=cfg.max_len, use_cache=cfg.use_cache)  # fmt: skip
    res = BenchResult(asdict(cfg), load_seconds=llm.loaded.load_seconds, import_seconds=import_s)
    # Every run's prompts are their own variants of the text: prefill is measured, never a prefix-cache hit.
    variants = iter(range(10_000))

    def rows() -> list[list[int]]:
        return [prompt_ids(llm.tokenizer, cfg.prompt_tokens, next(variants)) for _ in range(cfg.batch)]

    # cold: the first request after the load (what a user waits for)
    phase("the first token after the load")
    res.first_token_seconds, _, _ = _run_once(llm, rows()[:1], 1)
    phase("warm-up")
    _run_once(llm, rows(), min(cfg.gen_tokens, 16))  # warm-up
    ttfts, lats, decode_rates = [], [], []
    tokens: list[int] = []
    for k in range(cfg.repeat):
        phase(f"run {k + 1} of {cfg.repeat}: {cfg.prompt_tokens}-token prompt, then {cfg.gen_tokens} tokens x {cfg.batch}")
        ttft, lat, tokens = _run_once(llm, rows(), cfg.gen_tokens)
        ttfts.append(ttft)
        lats += lat
        if lat:
            decode_rates.append(cfg.batch * len(lat) / sum(lat))
    res.ttft_seconds = statistics.median(ttfts)
    res.prefill_tok_s = cfg.prompt_tokens / res.ttft_seconds if cfg.batch == 1 else 0.0
    res.decode_tok_s = statistics.median(decode_rates) if decode_rates else 0.0
    res.latency_p50_ms = _percentile(lats, 50) * 1e3
    res.latency_p99_ms = _percentile(lats, 99) * 1e3
    res.weights_mib = model_nbytes(llm.model) / 2**20
    kv_dtype_bytes = llm.engine.cache.k.element_size() if llm.engine.cache is not None else 2
    res.kv_bytes_per_token = llm.config.kv_bytes_per_token(kv_dtype_bytes)
    res.tokens = tokens
    res.versions = versions()
    res.peak_rss_mib = _peak_rss_mib()
    return res


def kv_curve(cfg: BenchConfig, max_pos: int = 2048, nocache_positions: tuple[int, ...] | None = None) -> dict:
    """Per-token decode latency by position: every step with the cache, sampled lengths without."""
    import torch

    from pellucid.api import LLM

    torch.set_num_threads(cfg.threads)
    out: dict = {"config": asdict(cfg), "max_pos": max_pos}
    llm = LLM(cfg.model, dtype=cfg.dtype, quant=cfg.quant, max_batch=1, max_len=max_pos + 8)
    eng = llm.engine
    start = CURVE_START
    ids = prompt_ids(llm.tokenizer, max(start, max(nocache_positions or (0,)) + 1))
    _run_once(llm, [ids[:start]], 32)  # warm-up
    p = SamplingParams(max_tokens=max_pos - start, temperature=0.0, ignore_eos=True)
    req = eng.make_request(ids[:start], p)
    n0 = len(eng.stats.token_latency)
    for _ in eng.run(req):
        pass
    lat = eng.stats.token_latency[n0:]
    # decode step i processes the token at position start + i
    out["cached"] = {"positions": [start + i for i in range(len(lat))], "ms": [x * 1e3 for x in lat]}
    out["kv_bytes_per_token"] = eng.cache.bytes_per_token
    del llm, eng
    nocache_positions = nocache_positions or tuple(x for x in (16, 32, 64, 100, 128, 256, 512, 768, 1024, 1536, 2000) if x < max_pos)
    llm = LLM(cfg.model, dtype=cfg.dtype, quant=cfg.quant, max_batch=1, max_len=max_pos + 8, use_cache=False)
    eng = llm.engine
    ids = ids if len(ids) > max(nocache_positions) else prompt_ids(llm.tokenizer, max(nocache_positions) + 1)
    xs, ys = [], []
    for pos in nocache_positions:
        req = eng.make_request(ids[:pos], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        n0 = len(eng.stats.token_latency)
        for _ in eng.run(req):
            pass
        lat = eng.stats.token_latency[n0:]
        xs.append(pos + 1)
        ys.append(statistics.median(lat) * 1e3)
    out["nocache"] = {"positions": xs, "ms": ys}
    out["versions"] = versions()
    return out


CURVE_START = 16  # the --kv-curve's prompt length: the cached curve starts at this position
WINDOW = 16  # half-width of the window whose median latency is reported at a position


def summary_positions(max_pos: int) -> tuple[int, int]:
    """Two positions to report --kv-curve's cached latency at, both with a full window inside
    the curve (CURVE_START .. max_pos - 1): 100 and 2000 by default, closer in for a short curve."""
    hi = min(2000, max_pos - 1 - WINDOW)
    lo = min(100, max(CURVE_START + WINDOW, hi // 4))
    return lo, hi


def window_median(positions: list[int], ms: list[float], at: int, half: int = WINDOW) -> float:
    vals = [m for p, m in zip(positions, ms, strict=True) if abs(p - at) <= half]
    return statistics.median(vals) if vals else float("nan")


def plot_kv_curve(data: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, n = data["cached"], data["nocache"]
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    ax.plot(c["positions"], c["ms"], color="#9ecae1", lw=0.6, label="_raw")
    # a running median makes the cached line readable through scheduler noise
    w = 15
    sm = [statistics.median(c["ms"][max(0, i - w) : i + w + 1]) for i in range(len(c["ms"]))]
    ax.plot(c["positions"], sm, color="#08519c", lw=2.2, label="with KV cache (running median)")
    ax.plot(n["positions"], n["ms"], "o-", color="#d94801", lw=2.2, ms=6, label="without KV cache (recompute all)")
    ax.set_yscale("log")
    ax.set_xlabel("position of the token being generated")
    ax.set_ylabel("decode latency per token (ms, log scale)")
    cfg = data["config"]
    fmt = cfg.get("quant") or cfg.get("dtype")
    lo, hi = summary_positions(data["max_pos"])
    a, b = window_median(c["positions"], c["ms"], lo), window_median(c["positions"], c["ms"], hi)
    title = f"{cfg['model']} {fmt}, {cfg['threads']} threads"
    ax.set_title(title)
    kvb = data["kv_bytes_per_token"]
    note = f"KV cache: {kvb:,} bytes per token ({kvb / 1024:.1f} KiB)"
    if b == b:  # not NaN
        note += f"\nwith cache: {a:.1f} ms at {lo}, {b:.1f} ms at {hi} (x{b / a:.2f})"
    ax.text(0.02, 0.97, note, transform=ax.transAxes, va="top", fontsize=10,
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "#cccccc"})  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def versions() -> dict:

    import torch


    model_name = ""
    try:
        with open("/proc/cpuinfo") as f:
            model_name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"pellucid": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "cpu": model_name, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "logical_cpus": os.cpu_count(), "kernels": runtime.kernels(),
            "cpu_flags": " ".join(sorted(f for f in runtime.cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c"))))}  # fmt: skip


def run_isolated(cfg: BenchConfig, mode: str = "measure", timeout: float = 1800, on_phase=None, **kw) -> dict:
    """Run `measure` (or `kv_curve`) in a fresh interpreter and return its JSON result;
    `on_phase(text)` hears each phase the worker reports."""
    import threading

    payload = json.dumps({"mode": mode, "config": asdict(cfg), "kw": kw})
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(cfg.threads))
    p = subprocess.Popen([sys.executable, "-m", "pellucid.cli.bench", "--worker", payload], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    err_lines: list[str] = []

    def read_err() -> None:
        for line in p.stderr:
            if line.startswith("@phase "):
                if on_phase is not None:
                    on_phase(line[len("@phase ") :].rstrip("\n"))
            else:
                err_lines.append(line)

    reader = threading.Thread(target=read_err, daemon=True)
    reader.start()
    try:
        out = p.stdout.read()
        p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
    reader.join(5)
    if p.returncode != 0:
        raise RuntimeError(f"bench worker failed ({cfg.label}):\n{''.join(err_lines)[-4000:]}")
    return json.loads(out.strip().splitlines()[-1])


def _worker(payload: str, t_start: float) -> None:
    job = json.loads(payload)
    cfg = BenchConfig(**job["config"])
    if job["mode"] == "kv_curve":
        kw = job.get("kw") or {}
        if kw.get("nocache_positions"):
            kw["nocache_positions"] = tuple(kw["nocache_positions"])
        out = kv_curve(cfg, **kw)
    else:
        out = asdict(measure(cfg, t_start))
    sys.stdout.write(json.dumps(out) + "\n")


TABLE = ["format", "load s", "first token s", "TTFT ms", "prefill tok/s", "decode tok/s", "p50 ms", "p99 ms",
         "peak RSS MiB", "weights MiB"]  # fmt: skip


def table_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        cfg = BenchConfig(**r["config"])
        rows.append([cfg.label, f"{r['load_seconds']:.2f}", f"{r['load_seconds'] + r['first_token_seconds']:.2f}",
                     f"{r['ttft_seconds'] * 1e3:.0f}", f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}",
                     f"{r['latency_p50_ms']:.2f}", f"{r['latency_p99_ms']:.2f}", f"{r['peak_rss_mib']:.0f}",
                     f"{r['weights_mib']:.0f}"])  # fmt: skip
    return rows


def print_results(con: Console, results: list[dict]) -> None:
    cols = [Col(TABLE[0]), *(Col(h, "right") for h in TABLE[1:])]
    show_table(con, cols, table_rows(results), title="pellucid bench")


@app.command()
def bench(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Registry name, .gguf file or HF folder."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: the CLI default)."),
    quant: str | None = typer.Option(None, "--quant", help="none, int8 or int4 (default: the CLI default)."),
    no_kv_cache: bool = typer.Option(False, "--no-kv-cache", help="Recompute the whole sequence for every token."),
    formats: str | None = typer.Option(None, "--formats", help="Several formats, e.g. float32,bfloat16,int8,int4 (each in its own process)."),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens"),
    gen_tokens: int = typer.Option(128, "--gen-tokens"),
    threads: int = typer.Option(2, "--threads"),
    batch: int = typer.Option(1, "--batch", help="Sequences decoded together."),
    repeat: int = typer.Option(3, "--repeat", help="Measured runs after one warm-up."),
    kv_curve_: bool = typer.Option(False, "--kv-curve", help="Plot per-token latency against position, with and without the KV cache."),
    max_pos: int = typer.Option(2048, "--max-pos", help="Last position of --kv-curve (64 or more)."),
    out: Path = typer.Option(Path("."), "--out", help="Folder for the PNG and JSON."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Measure prefill and decode speed, per-token latency, load time and peak memory."""

    registry.resolve(model)  # a bad name fails here, in one line, not in the worker process
    quant = runtime.DEFAULT_QUANT if quant is None else (None if quant == "none" else quant)
    dtype = dtype or runtime.DEFAULT_DTYPE
    base = BenchConfig(model=model, dtype=dtype, quant=quant, use_cache=not no_kv_cache,
                       prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, threads=threads, batch=batch,
                       repeat=repeat, max_len=max(512, prompt_tokens + gen_tokens + 8))  # fmt: skip
    if kv_curve_:
        if max_pos < 4 * WINDOW:
            raise PellucidError(f"--max-pos = {max_pos} is too short for a curve; allowed: {4 * WINDOW} or more",
                                param="--max-pos")  # fmt: skip
        with console.status(f"kv curve: {base.label}, positions up to {max_pos}"):
            data = run_isolated(base, "kv_curve", max_pos=max_pos)
        out.mkdir(parents=True, exist_ok=True)
        png = plot_kv_curve(data, out / "kv_curve.png")
        (out / "kv_curve.json").write_text(json.dumps(data))
        c = data["cached"]
        lo, hi = summary_positions(max_pos)
        a, b = window_median(c["positions"], c["ms"], lo), window_median(c["positions"], c["ms"], hi)
        if json_out:
            print_json({"png": str(png), "kv_bytes_per_token": data["kv_bytes_per_token"],
                        "cached_ms_at": {str(lo): a, str(hi): b}, "nocache": data["nocache"]}, indent=None)  # fmt: skip
        else:
            paragraph(make_console(stderr=True), f"KV cache: {data['kv_bytes_per_token']:,} bytes per token; with cache {a:.2f} ms "
                               f"at position {lo}, {b:.2f} ms at {hi} (x{b / a:.2f})")  # fmt: skip
            path_line(make_console(), "", png)
        return
    configs = [base]
    if formats:
        configs = []
        for f in formats.split(","):
            f = f.strip()
            q = f if f.startswith("int") else None
            configs.append(BenchConfig(**{**asdict(base), "dtype": base.dtype if q else f, "quant": q}))
    from pellucid.progress import Progress

    results = []
    for c in configs:
        shown = Progress(f"bench {c.label} ({c.threads} threads)")
        results.append(run_isolated(c, on_phase=shown.start))
        shown.finish()
    if json_out:
        print_json(results if len(results) > 1 else results[0])
        return
    print_results(make_console(), results)
    r0, v = results[0], results[0]["versions"]
    paragraph(make_console(stderr=True), f"KV cache {r0['kv_bytes_per_token']:,} bytes/token; torch {v['torch']}, {v['cpu']} "
                       f"({v['cpu_capability']}); kernels: {v['kernels']}", style="dim")  # fmt: skip


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2], time.perf_counter())

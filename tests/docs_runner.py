"""Runs the examples of README.md and docs/*.md (issue 21, "Docs that run").

A fenced block runs when the line just before its fence is a marker (an HTML comment,
invisible on GitHub):

    <!-- run -->                      run the block; every command must exit 0
    <!-- run: expect "Paris" -->      ... and its output must contain "Paris" (repeatable)
    <!-- run: exit 1 -->              every command of the block must exit 1
    <!-- run: stdin "Hi" -->          feed this text to each command's stdin (interactive chat)
    <!-- run: skip "--replicas" -->   run the block but not its lines that contain this text
    <!-- run: continue -->            Python: run in the namespace of the file's previous Python block
    <!-- output -->                   this block is what the previous run block prints (checked)
    <!-- file: inference.yaml -->     this block is written to that file for later blocks
    <!-- no-run: REASON -->           not run, and why (a Ray cluster, an illustration, ...)

Every fenced block carries one of these markers (a test checks it), so an example
cannot be added without deciding whether it runs.

Shell blocks: each line is one command (`\\` continues it, `# ...` is a comment); `$ ` lines
in a block make it a transcript, the lines after each `$` command being its output. Python
blocks are executed in a fresh namespace. Output is checked line by line, in order: box
characters and runs of spaces are ignored, `...` matches anything, a line of only `...`
(or a table row with a `...` cell) stands for any number of lines. A table row
may leave out columns on the right, and a table shown without borders matches one with them.

Substitutions, so that examples run here quickly:
- `127.0.0.1:8000` / `localhost:8000` become the live test server's address; a
  `pellucid serve` line gets a free `--port` and runs until its `/health` answers ready.
- `generate`, `chat` and `speculate` without `--max-tokens` get `--max-tokens 24` (96 for
  structured output or tools); `bench`
  runs 16 prompt tokens, 8 generated, one repeat (`--max-pos 64` for `--kv-curve`), and a `bench`
  line that an earlier block ran already is not run again;
  `quantize-report` scores 256 tokens in 128-token windows; `ablate` cuts its text to 48
  tokens. A transcript's output is checked only where its command ran unchanged.
- `LLM(...)` with the same arguments returns the instance loaded earlier in the session.
- Example files a doc names but does not show (`conv.json`, `history.json`, ...) are
  written by `FILES` below into the block's working directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]

MARKER = re.compile(r"^\s*<!--\s*(run|output|file|no-run)\s*(?::\s*(.*?))?\s*-->\s*$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)\s*$")
MAX_TOKENS, MAX_TOKENS_STRUCTURED = "24", "96"  # a JSON answer or a tool call must end


@dataclass
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    kind: str | None  # run | output | file | None (not marked)
    opts: dict = field(default_factory=dict)
    output: Block | None = None  # the <!-- output --> block that follows a run block

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def parse_options(text: str | None, kind: str) -> dict:
    """`expect "a" expect "b" exit 1 continue` -> {"expect": ["a", "b"], "exit": 1, "continue": True}."""
    opts: dict = {"expect": [], "skip": [], "exit": 0, "stdin": None, "continue": False}
    if not text:
        return opts
    if kind in ("file", "no-run"):
        return {"name": text.strip()}
    words = shlex.split(text)
    i = 0
    while i < len(words):
        key = words[i]
        if key == "continue":
            opts["continue"] = True
            i += 1
            continue
        if i + 1 >= len(words):
            raise ValueError(f"marker option {key!r} needs a value: {text!r}")
        value = words[i + 1]
        if key in ("expect", "skip"):
            opts[key].append(value)
        elif key == "exit":
            opts["exit"] = int(value)
        elif key == "stdin":
            opts["stdin"] = value.replace("\\n", "\n")
        else:
            raise ValueError(f"unknown marker option {key!r} in {text!r}")
        i += 2
    return opts


def parse_doc(doc: str) -> list[Block]:
    """Every fenced block of a Markdown file, with its marker; output blocks attached."""
    lines = (ROOT / doc).read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        body, j = [], i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence[0] * len(fence)) and
                                      lines[j].strip().strip(fence[0]) == ""):  # fmt: skip
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        marker = MARKER.match(lines[i - 1]) if i > 0 else None
        kind = marker.group(1) if marker else None
        block = Block(
            doc,
            i + 1,
            lang,
            "\n".join(body) + "\n",
            kind,
            parse_options(marker and marker.group(2), kind or ""),
        )
        if kind == "output":
            runs = [b for b in blocks if b.kind == "run"]
            assert runs and runs[-1] is blocks[-1], (
                f"{block.id}: an output block must follow a run block"
            )
            runs[-1].output = block
        blocks.append(block)
        i = j + 1
    return blocks


# -- shell blocks -------------------------------------------------------------------------------
@dataclass
class Command:
    words: list[str]
    line: str
    expected: list[str] = field(default_factory=list)  # transcript output after a `$` line


def commands(text: str) -> list[Command]:
    """The commands of a shell block: one a line, `\\` continues, `$` lines make a transcript."""
    joined, cur = [], ""
    for raw in text.splitlines():
        cur += raw.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        joined.append(cur)
        cur = ""
    transcript = any(line.startswith("$ ") for line in joined)
    out: list[Command] = []
    for line in joined:
        if transcript and not line.startswith("$ "):
            if out:
                out[-1].expected.append(line)
            continue
        line = line[2:] if transcript else line
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        out.append(Command(shlex.split(line, comments=True), line))
    return out


def has_flag(words: list[str], *flags: str) -> bool:
    return any(w in flags or any(w.startswith(f + "=") for f in flags) for w in words)


def substitute(words: list[str]) -> list[str]:
    """Smaller token limits for the commands that generate or measure (see the module doc)."""
    if len(words) < 2 or words[0] != "pellucid":
        return words
    cmd, w = words[1], list(words)
    if cmd in ("generate", "chat", "speculate") and not has_flag(w, "--max-tokens", "-n"):
        structured = has_flag(
            w, "--json", "--json-schema", "--regex", "--choice", "--grammar", "--tools"
        )
        w += ["--max-tokens", MAX_TOKENS_STRUCTURED if structured else MAX_TOKENS]
    if cmd == "bench":
        for flag, value in (("--prompt-tokens", "16"), ("--gen-tokens", "8"), ("--repeat", "1")):
            if not has_flag(w, flag):
                w += [flag, value]
        if "--kv-curve" in w:
            w = (
                [*w[: w.index("--max-pos")], *w[w.index("--max-pos") + 2 :]]
                if "--max-pos" in w
                else w
            )
            w += ["--max-pos", "64"]
    if cmd == "ablate" and not has_flag(w, "--max-tokens"):
        w += ["--max-tokens", "48"]
    if cmd == "quantize-report":
        for flag, value in (("--tokens", "256"), ("--window", "128")):
            if not has_flag(w, flag):
                w += [flag, value]
    return w


def with_server(text: str, url: str | None) -> str:
    if url is None:
        return text
    host = url.split("://", 1)[1]
    return re.sub(r"(?:127\.0\.0\.1|localhost):8000", host, text)


@dataclass
class Result:
    exit_code: int
    output: str


def run_cli(words: list[str], stdin: str | None) -> Result:
    """`pellucid ...` in-process on `pellucid.cli.app`, its models kept loaded between commands."""
    from typer.testing import CliRunner

    from pellucid.cli import _register, app
    from pellucid.errors import PellucidError

    _register()
    r = CliRunner().invoke(app, words[1:], input=stdin, env={"COLUMNS": "160", "NO_COLOR": "1"})
    output = r.output
    code = r.exit_code
    if isinstance(r.exception, PellucidError):  # what `pellucid` itself prints (cli.main)
        output += f"error: {r.exception.message}\n"
        code = 1
    elif r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        output += "".join(traceback.format_exception(r.exception))
    return Result(code, output)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_serve(words: list[str], cwd: Path, timeout: float = 120) -> Result:
    """`pellucid serve ...` as its own process on a free port: up until /health says ready, then Ctrl-C."""
    import signal

    w = list(words[1:])
    if has_flag(w, "--port", "-p"):
        k = next(i for i, x in enumerate(w) if x in ("--port", "-p"))
        del w[k : k + 2]
    port = free_port()
    w += ["--port", str(port)]
    code = "import sys; from pellucid.cli import main; sys.argv[0] = 'pellucid'; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, *w], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    status, t = None, time.monotonic()
    while proc.poll() is None and time.monotonic() - t < timeout:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                status = r.status
        except OSError:
            status = None
        if status == 200:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    if status != 200:
        return Result(1, out + f"\n(/health never answered ready on port {port})")
    return Result(proc.returncode, out)


def run_process(words: list[str], cwd: Path, stdin: str | None) -> Result:
    p = subprocess.run(words, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=120)
    return Result(p.returncode, p.stdout + p.stderr)


# -- output checks -------------------------------------------------------------------------------
BOX = "│┃║┆"
BORDER = re.compile(r"^[\s━─┏┓┗┛┡┩└┘┌┐├┤┬┴┼╇╈═╭╮╰╯+\-|]*$")


def normalize(line: str) -> str:
    """A line without box characters and runs of spaces: table rows compare by their cells."""
    for c in BOX:
        line = line.replace(c, "|")
    cells = [c.strip() for c in line.split("|")]
    if len(cells) > 1:
        cells = [c for c in cells[1:-1]] if not cells[0] and not cells[-1] else cells
        line = " | ".join(cells)
    return re.sub(r"\s+", " ", line).strip()


def check_output(expected: list[str], actual: str) -> str | None:
    """None if every expected line appears in `actual`, in order; else what is missing."""
    got = [normalize(x) for x in actual.splitlines()]
    got = [x for x in got if x]
    pos = 0
    for want in expected:
        if BORDER.match(want) or not normalize(want):
            continue
        n = normalize(want)
        if "..." in n.split(" | "):  # an elided line, or a table row that stands for several
            continue
        pattern = re.compile(".*".join(re.escape(p.strip()) for p in n.split("...")))
        row = re.compile(pattern.pattern + r" \|.*")  # a table shown without its right-hand columns
        for k in range(pos, len(got)):
            bare = re.sub(r"\s*\|\s*", " ", got[k]).strip()  # ... or without its borders
            if any(p.fullmatch(g) for p in (pattern, row) for g in (got[k], bare)):
                pos = k + 1
                break
        else:
            return f"expected line not found (in order): {want!r}"
    return None


# -- the session ---------------------------------------------------------------------------------
class Session:
    """What examples share: a working directory with the example files, a live server, loaded models."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.server = None
        self.namespaces: dict[str, dict] = {}
        self.served: dict[tuple[str, ...], Result] = {}

    def url(self) -> str:
        if self.server is None:
            from pellucid.server.app import ServerThread, create_app
            from pellucid.server.state import ServerConfig

            self.server = ServerThread(create_app(ServerConfig(max_batch=4, max_len=2048))).start()
            assert self.server.wait_ready(180), self.server.state.error
        return self.server.url

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()

    def run(self, block: Block) -> str | None:
        """None if the block ran as documented; else why not."""
        os.chdir(self.workdir)
        if block.kind == "file":
            (self.workdir / block.opts["name"]).write_text(block.text)
            return None
        if block.lang == "python":
            return self.run_python(block)
        return self.run_shell(block)

    def run_shell(self, block: Block) -> str | None:
        outputs = []
        for cmd in commands(block.text):
            if any(s in cmd.line for s in block.opts["skip"]):
                continue
            words = run_words = cmd.words
            if words[:1] == ["curl"]:
                words = shlex.split(with_server(shlex.join(words), self.url()))
                r = run_process(words, self.workdir, block.opts["stdin"])
            elif words[:2] == ["pellucid", "serve"]:
                key = tuple(words)
                if key not in self.served:
                    self.served[key] = run_serve(words, self.workdir)
                r = self.served[key]
            elif words[:2] == ["pellucid", "bench"]:  # minutes of fresh processes: once a session
                run_words = substitute(words)
                key = tuple(run_words)
                if key not in self.served:
                    self.served[key] = run_cli(run_words, None)
                r = self.served[key]
            elif words[:1] == ["pellucid"]:
                run_words = substitute(words)
                r = run_cli(run_words, block.opts["stdin"])
            else:
                return f"cannot run {cmd.line!r}: only pellucid and curl commands run"
            outputs.append(r.output)
            if r.exit_code != block.opts["exit"]:
                return f"{cmd.line!r} exited {r.exit_code}, expected {block.opts['exit']}:\n{r.output[-3000:]}"
            if (
                cmd.expected
                and words == run_words
                and (why := check_output(cmd.expected, r.output))
            ):
                return f"{cmd.line!r}: {why}\noutput:\n{r.output[-3000:]}"
        return self.check(block, "".join(outputs))

    def run_python(self, block: Block) -> str | None:
        code = block.text
        if "8000" in code:
            code = with_server(code, self.url())
        if block.opts["continue"] and block.doc not in self.namespaces:  # its predecessor ran on another worker
            before = [b for b in parse_doc(block.doc) if b.kind == "run" and b.lang == "python" and b.line < block.line]
            if before and (why := self.run_python(before[-1])):
                return f"the Python block it continues ({before[-1].id}) failed: {why}"
        ns = self.namespaces.get(block.doc, {}) if block.opts["continue"] else {}
        ns.setdefault("__name__", "__docs__")
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, block.id, "exec"), ns)  # noqa: S102 - the documentation's own example
        except Exception as e:
            import traceback

            return f"raised {type(e).__name__}: {e}\n{''.join(traceback.format_exception(e))[-3000:]}\n{out.getvalue()}"
        self.namespaces[block.doc] = ns
        return self.check(block, out.getvalue())

    def check(self, block: Block, output: str) -> str | None:
        for text in block.opts["expect"]:
            if text not in output:
                return f"expected {text!r} in the output:\n{output[-3000:]}"
        if block.output is not None and (
            why := check_output(block.output.text.splitlines(), output)
        ):
            return f"{why}\noutput:\n{output[-3000:]}"
        return None


# -- files the docs name without showing them -----------------------------------------------------
CONV = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Germany?"}]  # fmt: skip
HISTORY = [m for q, a in [("Which river flows through Paris?", "The Seine."), ("How long is it?", "About 777 km."),
                          ("Where does it start?", "On the Langres plateau in Burgundy."),
                          ("Where does it end?", "In the English Channel at Le Havre."),
                          ("Which cities does it cross?", "Troyes, Paris, Rouen and Le Havre, among others."),
                          ("What is the capital of France?", "Paris.")]
           for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]  # fmt: skip
SEINE = ("The Seine is a 777-kilometre-long river in northern France. Its drainage basin, in the Paris Basin, "
         "covers most of northern France. It rises at Source-Seine, 30 kilometres northwest of Dijon in "
         "northeastern France in the Langres plateau, flowing through Paris and into the English Channel at "
         "Le Havre. It is navigable by ocean-going vessels as far as Rouen, 120 kilometres from the sea. "
         "Over 60 percent of its length, as far as Burgundy, is negotiable by commercial riverboats, and "
         "nearly its whole length is available for recreational boating; excursion boats offer sightseeing "
         "tours of the river banks in the capital city, Paris.\n")  # fmt: skip
FACTS = ("Berlin is the capital and largest city of Germany, by both area and population. Its more than 3.85 "
         "million inhabitants make it the most populous city of the European Union. The city is also one of "
         "the states of Germany, and is the third smallest state in the country by area. Berlin is surrounded "
         "by the state of Brandenburg, and Brandenburg's capital Potsdam is nearby. The urban area of Berlin "
         "has a population of over 4.5 million and is therefore the most populous urban area in Germany. "
         "The Berlin-Brandenburg capital region has around 6.2 million inhabitants and is Germany's second-"
         "largest metropolitan region after the Rhine-Ruhr region. The Spree river flows through the city.\n")  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip
PROMPT_V1 = """name: greeter
version: "1.0.0"
description: Greets the user.
role: a friendly receptionist
objective: greet visitors and point them to the right desk
guidelines:
  - "Always greet the visitor by name when you know it."
style:
  length: concise
"""
PROMPT_V2 = PROMPT_V1.replace('"1.0.0"', '"1.1.0"').replace("concise", "detailed")
SERVE_YAML = """model:
  name: smollm2-135m-instruct
sampling:
  temperature: 0.7
system_prompt: |
  You are a helpful assistant.
"""

FILES = {
    "conv.json": json.dumps(CONV, indent=1),
    "history.json": json.dumps(HISTORY, indent=1),
    "seine.txt": SEINE,
    "facts.txt": FACTS,
    "notes.md": "# Notes\n\nThe KV cache keeps the keys and values of earlier tokens.\n",
    "a.txt": "Hello world\n",
    "tools.json": json.dumps(TOOLS, indent=1),
    "old.yaml": PROMPT_V1,
    "new.yaml": PROMPT_V2,
    "my-prompt.yaml": PROMPT_V1.replace("greeter", "my-prompt"),
    "serve.yaml": SERVE_YAML,
}


def write_files(workdir: Path) -> None:
    """The example files, the model file under the name the docs use, tiny HF folders, the eval text."""
    from pellucid import registry

    for name, text in FILES.items():
        (workdir / name).write_text(text)
    (workdir / "my-model.gguf").symlink_to(registry.resolve(registry.DEFAULT_MODEL))
    excerpt = ROOT / "src" / "pellucid" / "quantization" / "data" / "wikitext-2-test-excerpt.txt"
    (workdir / "wikitext-2-test-excerpt.txt").write_text(excerpt.read_text()[:4000])
    (workdir / "prompts").mkdir()
    (workdir / "prompts" / "greeter@1.0.0.yaml").write_text(PROMPT_V1.replace("concise", "brief"))
    from tiny_hf import save_hf, tiny_gpt2, tiny_qwen2

    save_hf(tiny_qwen2(), workdir / "my-qwen2-folder")
    save_hf(tiny_gpt2(), workdir / "gpt2")


def all_blocks() -> list[Block]:
    return [b for doc in DOCS for b in parse_doc(doc)]

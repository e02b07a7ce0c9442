"""Make tests/data/tokenizer_cases_*.json: llama.cpp's tokenization of a corpus, per model.

llama.cpp is the reference tokenizer for GGUF files. This script runs only in the peer
virtualenv that has llama-cpp-python (never a pellucid dependency):

    python3.11 -m venv /work/peer-venv
    CMAKE_BUILD_PARALLEL_LEVEL=2 /work/peer-venv/bin/pip install llama-cpp-python==0.3.36
    /work/peer-venv/bin/python benchmarks/make_tokenizer_cases.py \\
        --sdist llama_cpp_python-0.3.36.tar.gz \\
        --smollm2 SmolLM2-135M-Instruct.Q4_1.gguf --gemma3 gemma-3-270m-q4_k_m.gguf \\
        --qwen2.5-coder qwen2.5-coder-1.5b-instruct-q4_k_m.gguf

The corpus is the union (deduplicated, first occurrence kept) of
1. llama.cpp's own tokenizer test inputs, `vendor/llama.cpp/models/ggml-vocab-NAME.gguf.inp`
   inside the llama-cpp-python sdist, for the NAMEs in INP_NAMES (cases are separated by
   "\\n__ggml_vocab_test__\\n", split the way tests/test-tokenizer-0.cpp splits them);
2. OWN_CASES below (prose, code, numerals, emoji, scripts, whitespace, chat-template text);
3. the first 40 non-empty lines of WikiText-2 raw test, each without its newline.

Each case is tokenized with `Llama(path, vocab_only=True).tokenize(text, add_bos=False,
special=...)` twice: special=True (special-token text such as "<|im_start|>" becomes its
control token) and special=False (it is plain text). `detok_*` is llama.cpp's
`detokenize(ids, special=True)` of each id list, decoded as UTF-8 with errors="replace".
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import sys
import tarfile
from pathlib import Path

INP_NAMES = [
    "llama-bpe",
    "starcoder",
    "gpt-2",
    "qwen2",
    "qwen35",
    "command-r",
    "llama-spm",
    "gemma-4",
]
SEP = "\n__ggml_vocab_test__\n"
WIKITEXT = Path("/work/shared/data/wikitext-2-raw-test.txt")
WIKITEXT_LINES = 40

PY_CODE = '''import math


class Circle:
    """A circle."""

    def __init__(self, r: float) -> None:
        self.r = r

    def area(self) -> float:
        if self.r < 0:
            raise ValueError(f"negative radius: {self.r!r}")
        return math.pi * self.r ** 2
'''

JS_CODE = """function fib(n) {
  if (n <= 1) {
    return n;
  }
\treturn fib(n - 1) + fib(n - 2);
}

const xs = [1, 2, 3].map((x) => x * 2);  // [2, 4, 6]
console.log(`fib(10) = ${fib(10)}`);
"""

OWN_CASES = [
    # English prose
    "The quick brown fox jumps over the lazy dog.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, "
    "it was the age of foolishness...",
    "I'm sure you're right; they'll know, we've seen it, she'd go, it's DON'T and I'LL.",
    "Mr. O'Neil said: \"Hello!\" — then left (quietly) at 5 p.m.; nobody noticed…",
    "A KV cache stores the keys and values of past tokens so that each decoding step only "
    "computes attention for the newest token.",
    # code
    PY_CODE,
    JS_CODE,
    "def f(x):\n\treturn x\n",
    "    if x:\n        return [i for i in range(10) if i % 2 == 0]\n",
    '{"name": "pellucid", "version": "0.1.0", "tags": ["llm", "inference"], "ok": true}',
    '{"città": "Zürich", "数量": [1, 2.5e-3, null], "emoji": "😀", "nested": {"a": {"b": [true, false]}}}',
    "def größe(länge: int) -> float:\n    π = 3.14159\n    return länge * π  # 面积\n",
    "let Δx = x₁ - x₀; const имя = 'значение'; var 変数 = 42;",
    "<div class=\"a\"><p>Hello&nbsp;world</p></div>",
    "# Title\n\n- item one\n- item two\n\n```python\nprint('hi')\n```\n",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "https://example.com/path?q=1&lang=en#frag user@example.org",
    "x += 1; y -= 2; z **= 3; a != b && c || !d",
    # numbers and numerals
    "4 ½",
    "3.14159",
    "1,234,567",
    "٣",
    "Ⅻ",
    "0123456789",
    "12345678901234567890",
    "-42 +7 1e-9 6.02e23 0x1F 0b1010",
    "$1,000.00 €20 £5 ¥100 50% 2024-01-15 10:30:00",
    "१२३ ٠١٢٣٤٥٦٧٨٩ 一二三 ①②③ ¼ ¾ ² ³",
    # emoji: single, skin tone, ZWJ sequences, flags, keycaps, variation selectors
    "😀",
    "👍🏽 👋🏿",
    "👨‍👩‍👧‍👦",
    "🏳️‍🌈 🏴‍☠️",
    "👩🏽‍💻 🧑‍🚀",
    "🇺🇸🇯🇵🇩🇪🇫🇷",
    "1️⃣ #️⃣ ❤️ ♥",
    "I love pizza 🍕🍕🍕!",
    # scripts
    "你好，世界！今天天气很好。",
    "日本語のテキスト、カタカナとひらがな。",
    "안녕하세요 세계",
    "مرحبا بالعالم، كيف حالك؟",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "Привет, мир! Ёлка.",
    "Γειά σου Κόσμε",
    "Crème brûlée à la française, naïve café, Ærøskøbing, Straße, Łódź, São Paulo",
    "e\u0301 vs \u00e9",  # decomposed vs precomposed
    "ﬁ ﬂ Ａｂｃ",  # ligatures, fullwidth
    "mixed 中文 and English and عربي",
    # whitespace
    "a b",
    "a  b",
    "a   b",
    "a" + " " * 8 + "b",
    " " * 16,
    " " * 17 + "x",
    "\t",
    "\t\t\tx",
    "a\tb\tc",
    " \t \t ",
    "line1\r\nline2\r\n",
    "\r\n\r\n",
    "a\rb",
    "\r",
    "\n" * 10,
    "x\n\n\n\ny",
    " \n \n ",
    " hello",
    "  hello  ",
    "hello   ",
    "\u00a0nbsp\u00a0",
    "zero\u200bwidth\ufeffbom",
    "soft\u00adhyphen",
    "\x1b[31mred\x1b[0m \x07",
    # special-token text
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "What is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nhi<end_of_turn>",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<|endoftext|>",
    "Hello<|endoftext|>World",
    " <|im_start|> ",
    "<|im_start|",
    "<bos>",
    "<eos>",
    "<s> </s>",
    "<pad><unk><mask>",
    "<start_of_image>",
    "<|im_end|><|im_end|>",
    # repetition and punctuation
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "ab" * 200,
    "!!!!!! ??? ... --- ___ *** ###",
    "— – - ‐ « » „ “ ” ‘ ’",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "HTTPServerErrorXMLParser camelCaseName snake_case_name kebab-case-name",
]


def read_inp_cases(sdist: Path) -> dict[str, list[str]]:
    """Cases of each ggml-vocab-NAME.gguf.inp in the sdist, split like test-tokenizer-0.cpp."""
    out: dict[str, list[str]] = {}
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
        for name in INP_NAMES:
            member = members[f"vendor/llama.cpp/models/ggml-vocab-{name}.gguf.inp"]
            raw = tar.extractfile(member).read().decode("utf-8")
            cases, pos = [], 0
            while pos < len(raw):
                nxt = raw.find(SEP, pos)
                if nxt == -1:
                    cases.append(raw[pos:])
                    break
                cases.append(raw[pos:nxt])
                pos = nxt + len(SEP)
            out[name] = cases
    return out


def wikitext_lines(path: Path, n: int) -> list[str]:
    lines = [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    return lines[:n]


def corpus(sdist: Path, wikitext: Path) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """(text, source) pairs, first occurrence wins, and the number of cases per .inp file."""
    seen: set[str] = set()
    cases: list[tuple[str, str]] = []

    def add(text: str, source: str) -> None:
        if text not in seen:
            seen.add(text)
            cases.append((text, source))

    inp = read_inp_cases(sdist)
    for name, texts in inp.items():
        for t in texts:
            add(t, f"llama.cpp:{name}")
    for t in OWN_CASES:
        add(t, "own")
    for t in wikitext_lines(wikitext, WIKITEXT_LINES):
        add(t, "wikitext-2-raw-test")
    return cases, {name: len(texts) for name, texts in inp.items()}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenize_all(model: Path, cases: list[tuple[str, str]], meta: dict) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)

    def detok(ids: list[int]) -> str:
        return llm.detokenize(ids, special=True).decode("utf-8", errors="replace")

    out_cases = []
    for text, source in cases:
        data = text.encode("utf-8")
        ids_special = llm.tokenize(data, add_bos=False, special=True)
        ids_plain = llm.tokenize(data, add_bos=False, special=False)
        out_cases.append(
            {
                "text": text,
                "source": source,
                "ids_special": ids_special,
                "ids_plain": ids_plain,
                "detok_special": detok(ids_special),
                "detok_plain": detok(ids_plain),
            }
        )
    hello_default = llm.tokenize(b"Hello", add_bos=True, special=True)
    return {
        **meta,
        "model_file": model.name,
        "model_file_sha256": sha256(model),
        "n_vocab": llm.n_vocab(),
        "bos_token_id": llm.token_bos(),
        "eos_token_id": llm.token_eos(),
        "adds_bos_by_default": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "adds_eos_by_default": bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
        "example_hello_with_add_bos": hello_default,
        "cases": out_cases,
    }


def write_json(path: Path, doc: dict) -> None:
    """One case per line, so diffs stay readable."""
    head = {k: v for k, v in doc.items() if k != "cases"}
    lines = json.dumps(head, ensure_ascii=False, indent=1)[:-2]
    body = ",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in doc["cases"])
    path.write_text(f'{lines},\n "cases": [\n{body}\n ]\n}}\n', encoding="utf-8")
    json.loads(path.read_text(encoding="utf-8"))  # still valid JSON


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sdist", type=Path, required=True, help="llama_cpp_python-*.tar.gz")
    ap.add_argument("--smollm2", type=Path, required=True)
    ap.add_argument("--gemma3", type=Path, required=True)
    ap.add_argument("--qwen2.5-coder", dest="qwen", type=Path, required=True)
    ap.add_argument("--wikitext", type=Path, default=WIKITEXT)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "tests" / "data")
    args = ap.parse_args()

    cases, inp_counts = corpus(args.sdist, args.wikitext)
    meta = {
        "made_by": "benchmarks/make_tokenizer_cases.py",
        "llama_cpp_python_version": importlib.metadata.version("llama-cpp-python"),
        "llama_cpp_sdist": args.sdist.name,
        "llama_cpp_sdist_sha256": sha256(args.sdist),
        "inp_files": {f"ggml-vocab-{k}.gguf.inp": v for k, v in inp_counts.items()},
        "settings": "tokenize(text, add_bos=False, special=True|False); "
        "detokenize(ids, special=True)",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for key, model in (("smollm2", args.smollm2), ("gemma3", args.gemma3), ("qwen2.5-coder", args.qwen)):
        doc = tokenize_all(model, cases, meta)
        path = args.out / f"tokenizer_cases_{key}.json"
        write_json(path, doc)
        n_diff = sum(c["ids_special"] != c["ids_plain"] for c in doc["cases"])
        print(
            f"{path}: {len(doc['cases'])} cases, {n_diff} differ special/plain, "
            f"add_bos={doc['adds_bos_by_default']}, {path.stat().st_size:,} bytes",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()

"""The model's own tokenizer, built with the `tokenizers` library from the model file.

From GGUF: the vocabulary, merges and token types in the file's metadata, with the
pre-tokenizer that `tokenizer.ggml.pre` names. From an HF folder: tokenizer.json.
Special tokens (GGUF token types CONTROL and USER_DEFINED) are matched in text by
default, as llama.cpp does for chat prompts; `parse_special=False` encodes them as text.
Only control tokens (BOS, EOS, turn markers) are `special_ids`, the ones output text
skips: user-defined pieces (Gemma's newline and whitespace runs) are text.
"""

from __future__ import annotations

import json
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from pellucid.errors import PellucidError

# Token texts that end a generation wherever they exist (llama.cpp keeps a similar list).
END_OF_GENERATION_TEXTS = (
    "<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|end_of_text|>",
    "<|eom_id|>", "</s>", "<eos>",
)  # fmt: skip

# GGUF token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes, by the name in `tokenizer.ggml.pre` (patterns are facts of each model).
_LLAMA3 = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_QWEN2 = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_DIGITS_FIRST = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_SUPPORTED_PRE = sorted(_DIGITS_FIRST | {"default", "gpt-2", "llama-bpe", "llama3", "qwen2", "deepseek-r1-qwen"})


def _pre_tokenizer(pre: str):
    if pre in _DIGITS_FIRST:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r"\p{N}"), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    if pre in ("default", "gpt-2", ""):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("llama-bpe", "llama3"):
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_LLAMA3), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_QWEN2), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    raise PellucidError(f"Unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre). Supported: {', '.join(_SUPPORTED_PRE)}.")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes, inverted: char -> byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class Tokenizer:
    """encode / decode, special tokens, and the raw bytes of every token."""

    def __init__(self, tok: HFTokenizer, *, bos_id: int | None, eos_id: int | None, add_bos: bool,
                 special_ids: set[int], token_bytes: list[bytes], eot_id: int | None = None,
                 add_space_prefix: bool = False):  # fmt: skip
        self._tok = tok
        self.bos_id, self.eos_id, self.eot_id = bos_id, eos_id, eot_id
        self.add_bos = add_bos
        self.add_space_prefix = add_space_prefix
        self.special_ids = special_ids
        self._bytes = token_bytes
        self.vocab_size = len(token_bytes)
        eog = {i for i in (eos_id, eot_id) if i is not None}
        for t in END_OF_GENERATION_TEXTS:
            i = tok.token_to_id(t)
            if i is not None and i in special_ids:
                eog.add(i)
        self.eog_ids: frozenset[int] = frozenset(eog)

    # -- encode / decode ---------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise PellucidError(f"text to encode must be a string, got {type(text).__name__}")
        self._tok.encode_special_tokens = not parse_special
        # encode_batch lets go of the GIL while it works (encode does not): a server thread tokenizing a
        # huge prompt must not stop the event loop
        ids = self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        # a text that already starts with BOS (a chat template wrote it) does not get a second one
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def encode_batch(self, texts: list[str], *, parse_special: bool = True) -> list[list[int]]:
        self._tok.encode_special_tokens = not parse_special
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], *, skip_special: bool = False) -> str:
        return b"".join(self.token_bytes(i) for i in ids if not (skip_special and i in self.special_ids)).decode(
            "utf-8", errors="replace"
        )

    def check_ids(self, ids: list[int], what: str = "token id") -> None:
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise PellucidError(f"{what} {i!r} is not a valid token id (0..{self.vocab_size - 1})", param=what)

    @cached_property
    def max_token_bytes(self) -> int:
        """The longest token, in bytes: a text of n bytes is at least n / this many tokens."""
        return max(1, max(len(b) for b in self._bytes))

    def token_bytes(self, i: int) -> bytes:
        """The exact bytes token `i` stands for (a special token: its text)."""
        return self._bytes[i]

    def piece(self, i: int) -> str:
        """A readable form of one token, for tables: its text, or <0xAB> for a partial byte."""
        b = self._bytes[i]
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "".join(f"<0x{x:02X}>" for x in b)

    def token_to_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    def single_token_id(self, text: str) -> int:
        """The id of a text that is exactly one token (for logit_bias by text)."""
        i = self._tok.token_to_id(text)
        if i is None:
            ids = self.encode(text, parse_special=True)
            if len(ids) != 1:
                pieces = [self.piece(x) for x in ids]
                raise PellucidError(f"{text!r} is not a single token: it encodes to {len(ids)} tokens {pieces}")
            i = ids[0]
        return i

    # Fill-in-the-middle token texts, by family: (prefix, suffix, middle). llama.cpp finds them
    # by text too where a file does not name them.
    FIM_FAMILIES = (("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"), ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"))

    @cached_property
    def fim_ids(self) -> tuple[int, int, int] | None:
        """(prefix, suffix, middle) token ids of a model trained to fill in the middle, or None."""
        for names in self.FIM_FAMILIES:
            ids = tuple(self._tok.token_to_id(t) for t in names)
            if all(i is not None for i in ids):
                return ids  # type: ignore[return-value]
        return None

    def fim_prompt(self, prefix: str, suffix: str, extra: list[tuple[str, str]] = ()) -> list[int]:
        """Ids of a fill-in-the-middle prompt (prefix, suffix, then the middle to write); `extra`:
        (file name, text) of other files, before it, where the vocabulary has a file separator.
        User text is encoded as text: a special-token string in it stays text."""
        if self.fim_ids is None:
            raise PellucidError("this model has no fill-in-the-middle tokens (<|fim_prefix|>, <|fim_suffix|>, <|fim_middle|>)",
                                param="suffix")  # fmt: skip
        pre, suf, mid = self.fim_ids
        ids: list[int] = []
        sep = self._tok.token_to_id("<|file_sep|>")
        for name, text in extra:
            if sep is None:
                ids += self.encode(f"{name}\n{text}\n", add_bos=False, parse_special=False)
            else:
                ids += [sep, *self.encode(f"{name}\n{text}\n", add_bos=False, parse_special=False)]
        enc = lambda t: self.encode(t, add_bos=False, parse_special=False) if t else []  # noqa: E731
        return [*ids, pre, *enc(prefix), suf, *enc(suffix), mid]

    def save_hf(self, folder: str | Path) -> Path:
        """Write this tokenizer as a Hugging Face tokenizer folder (tokenizer.json and
        tokenizer_config.json), for tools that load one by path (lm-evaluation-harness,
        transformers' AutoTokenizer), so they tokenize exactly as pellucid does."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / "tokenizer.json"))
        cfg = self.hf_config(1 << 30)
        (folder / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
        return folder

    def hf_config(self, max_length: int) -> dict[str, Any]:
        """The special tokens and settings in Hugging Face's tokenizer_config shape (None: the model has none)."""
        text = lambda i: self.piece(i) if i is not None else None  # noqa: E731
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": text(self.bos_id), "eos_token": text(self.eos_id),
                "pad_token": None, "add_bos_token": self.add_bos, "clean_up_tokenization_spaces": False,
                "model_max_length": max_length}  # fmt: skip

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, meta: dict) -> Tokenizer:
        model = meta.get("tokenizer.ggml.model")
        tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
        if not tokens:
            raise PellucidError("the GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
        raw_types = meta.get("tokenizer.ggml.token_type")
        tarr = np.full(len(tokens), NORMAL, dtype=np.int64) if raw_types is None else np.asarray(raw_types, dtype=np.int64)
        types: list[int] = tarr.tolist()
        bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
        eot = meta.get("tokenizer.ggml.eot_token_id")
        if model == "gpt2":
            tok, tbytes = _byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges") or [], str(meta.get("tokenizer.ggml.pre", "default")))
            add_bos_default = False
        elif model == "llama":
            from pellucid.text.spm import sentencepiece_bpe

            tok, tbytes = sentencepiece_bpe(tokens, types, meta)
            add_bos_default = True
        else:
            raise PellucidError(f"Unsupported tokenizer model {model!r} (tokenizer.ggml.model). Supported: gpt2 (byte-level BPE), llama (SentencePiece BPE).")
        eog_texts = {i for t in set(END_OF_GENERATION_TEXTS).intersection(tokens) for i in _indices(tokens, t)}
        special = sorted(set(np.flatnonzero((tarr == CONTROL) | (tarr == USER_DEFINED)).tolist()) | eog_texts)
        # llama.cpp makes end-of-generation texts control tokens, whatever their type (Gemma's
        # user-defined "</s>", Qwen2.5's normal one)
        control = {i for i in special if types[i] == CONTROL or i in eog_texts}
        tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special if i in control])
        # user-defined tokens are matched even with parse_special=False (add_special_tokens would hide them)
        tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in special if i not in control])
        for i in special:
            tbytes[i] = tokens[i].encode("utf-8")
        return cls(
            tok,
            bos_id=None if bos is None else int(bos),
            eos_id=None if eos is None else int(eos),
            eot_id=None if eot is None else int(eot),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
            add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
            special_ids=control,  # only control tokens are left out of output text; user-defined pieces ("\n\n") are text
            token_bytes=tbytes,
        )

    @classmethod
    def from_hf_folder(cls, folder: Path) -> Tokenizer:
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise PellucidError(f"{folder}: no tokenizer.json")
        tok = HFTokenizer.from_file(str(path))
        cfg_path = Path(folder) / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        vocab = tok.get_vocab(with_added_tokens=True)
        size = max(vocab.values()) + 1
        inv = {i: t for t, i in vocab.items()}
        added = {i for i, a in tok.get_added_tokens_decoder().items() if a.special}
        byte_level = "ByteLevel" in json.dumps(json.loads(tok.to_str()).get("decoder") or {})
        dec = _byte_decoder()
        tbytes = []
        for i in range(size):
            t = inv.get(i, "")
            if i in added or not byte_level:
                tbytes.append(_spm_piece_bytes(t) if not byte_level and i not in added else t.encode("utf-8"))
            else:
                tbytes.append(bytes(dec.get(c, 0) for c in t))

        def tid(key):
            v = cfg.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            return tok.token_to_id(v) if v else None

        add_bos = cfg.get("add_bos_token")
        if add_bos is None:  # transformers 5 leaves it to tokenizer.json's post-processor
            add_bos = _post_processor_prepends(json.loads(tok.to_str()).get("post_processor"), cfg.get("bos_token"))
        return cls(tok, bos_id=tid("bos_token"), eos_id=tid("eos_token"), add_bos=bool(add_bos),
                   special_ids=added, token_bytes=tbytes)  # fmt: skip


def _indices(items: list[str], x: str) -> list[int]:
    """Every index of x in items (list.index's C scan, for a value known to be there)."""
    out, i = [], -1
    try:
        while True:
            i = items.index(x, i + 1)
            out.append(i)
    except ValueError:
        return out


def _post_processor_prepends(pp: dict | None, bos) -> bool:
    """Whether tokenizer.json's post-processor puts the BOS token first in a single sequence."""
    bos = bos.get("content") if isinstance(bos, dict) else bos
    if not pp or not bos:
        return False
    if pp.get("type") == "Sequence":
        return any(_post_processor_prepends(p, bos) for p in pp.get("processors") or [])
    single = pp.get("single") or [] if pp.get("type") == "TemplateProcessing" else []
    return bool(single) and (single[0].get("SpecialToken") or {}).get("id") == bos


def _spm_piece_bytes(t: str) -> bytes:
    if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
        return bytes([int(t[3:5], 16)])
    return t.replace("▁", " ").encode("utf-8")


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> tuple[HFTokenizer, list[bytes]]:
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        a, _, b = m.partition(" ")
        pairs.append((a, b))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False, ignore_merges=pre in ("llama-bpe", "llama3")))
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    table = _stand_in_table()
    return tok, [_piece_bytes(t, table) for t in tokens]


def _stand_in_table() -> dict[int, str]:
    """str.translate's table for byte-level pieces: each of GPT-2's stand-ins becomes the char
    of its byte value, any other char below 256 becomes U+FFFF (which latin-1 refuses)."""
    table = {c: "\uffff" for c in range(256)}
    table.update({ord(c): chr(b) for c, b in _byte_decoder().items()})
    return table


def _piece_bytes(t: str, table: dict[int, str]) -> bytes:
    """A byte-level piece's bytes (each char GPT-2's stand-in for one byte); a piece with any
    other char is its own UTF-8: one translate, and latin-1 refuses all but pure stand-ins."""
    try:
        return t.translate(table).encode("latin-1")
    except UnicodeEncodeError:
        return t.encode("utf-8")

"""SentencePiece-style BPE vocabularies from GGUF (`tokenizer.ggml.model == "llama"`).

Such a vocabulary has pieces with scores and no merge list: SentencePiece's BPE joins,
again and again, the adjacent pair whose joined piece is in the vocabulary with the
highest score, then spells what is left as byte tokens <0xNN>. The `tokenizers` BPE model
does the same when given, as its merge list, every split of every piece into two pieces,
ranked by the joined piece's score; spaces become U+2581 before it runs.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers

SPACE = "\u2581"  # SentencePiece's stand-in for a space
BYTE = 6  # GGUF token type of <0xNN> tokens


def piece_bytes(piece: str, token_type: int) -> bytes:
    """The bytes one piece stands for."""
    if token_type == BYTE and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace(SPACE, " ").encode("utf-8")


def merges_from_scores(tokens: list[str], scores: np.ndarray, types: list[int]) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a piece, best-scored result first."""
    vocab = {}
    for i, t in enumerate(tokens):
        if types[i] != BYTE:
            vocab.setdefault(t, i)
    ranked = []
    for piece, i in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            li, ri = vocab.get(left), vocab.get(right)
            if li is not None and ri is not None:
                ranked.append((-float(scores[i]), i, li, ri, left, right))
    ranked.sort()
    return [(r[4], r[5]) for r in ranked]


def ranked_pairs(tokens: list[str], scores: np.ndarray, types: list[int]) -> np.ndarray:
    """merges_from_scores as token ids, (n, 2) int32, computed once per vocabulary and kept in
    $PELLUCID_HOME/cache/spm/ (deriving them takes ~1.8 s for Gemma's 262,144 pieces; reading them back ~0.1 s)."""
    from pellucid.registry import home

    h = hashlib.sha256()
    h.update(np.asarray(scores, dtype=np.float32).tobytes())
    h.update(np.asarray(types, dtype=np.int32).tobytes())
    h.update("\0".join(tokens).encode("utf-8", "surrogatepass"))
    path = home() / "cache" / "spm" / f"{h.hexdigest()[:32]}.npy"
    try:
        pairs = np.load(path, allow_pickle=False)
        if pairs.ndim == 2 and pairs.shape[1] == 2 and pairs.dtype == np.int32 and (pairs.size == 0 or 0 <= pairs.min() and pairs.max() < len(tokens)):
            return pairs
    except (OSError, ValueError):
        pass  # no cache yet, or a damaged one: derive again
    ids = {t: i for i, t in enumerate(tokens)}
    merges = merges_from_scores(tokens, scores, types)
    pairs = np.array([(ids[a], ids[b]) for a, b in merges], dtype=np.int32).reshape(-1, 2)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, pairs, allow_pickle=False)
        os.replace(tmp, path)  # complete or absent, never half-written
    except OSError:
        pass  # a read-only home: derive every time
    return pairs


def sentencepiece_bpe(tokens: list[str], types: list[int], meta: dict) -> tuple[HFTokenizer, list[bytes]]:
    """A `tokenizers` BPE equivalent to the GGUF vocabulary, and each token's bytes.

    Special tokens (CONTROL, USER_DEFINED) are added by the caller; a space prefix is
    prepended only when the file says `tokenizer.ggml.add_space_prefix`.
    """
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        scores = np.zeros(len(tokens), dtype=np.float32)
    # a repeated piece keeps its first id (the last write, going backwards); later ones stay decodable
    vocab: dict[str, int] = dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1), strict=True))
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    has_bytes = BYTE in types
    pairs = ranked_pairs(tokens, np.asarray(scores), types)
    pieces = np.array(tokens, dtype=object)  # the pairs' pieces by fancy indexing: 3x faster than a loop over ids
    model = models.BPE(
        vocab=vocab,
        merges=list(zip(pieces[pairs[:, 0]].tolist(), pieces[pairs[:, 1]].tolist(), strict=True)),
        unk_token=tokens[int(unk)] if unk is not None and not has_bytes else None,
        fuse_unk=True,
        byte_fallback=has_bytes,
    )
    tok = HFTokenizer(model)
    steps = [normalizers.Replace(" ", SPACE)]
    if meta.get("tokenizer.ggml.add_space_prefix", False):
        steps.insert(0, normalizers.Prepend(SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tbytes = [t.replace(SPACE, " ").encode("utf-8") for t in tokens]  # piece_bytes, but for <0xNN>
    for i in np.flatnonzero(np.asarray(types) == BYTE).tolist():
        tbytes[i] = piece_bytes(tokens[i], BYTE)
    return tok, tbytes

"""Speculative decoding for one request: draft, verify in one forward, accept a prefix.

A round, as the concept note draws it:

    Draft  (cheap):         ["The", "cat", "sat", "on", "mat"]
    Verify (one forward):   ["The", "cat", "sat", "on", "the", ...]
    Accept 4, reject "mat"; the target's own "the" replaces it.

1. A drafter proposes up to k tokens after the context: prompt lookup (the tokens that
   followed the latest earlier occurrence of the context's last n-gram) or a draft model
   (any model over the same vocabulary, e.g. a quantized or truncated copy of the target).
   -> drafters.py
2. The target runs once over [last token, d1 .. dk] at their positions with the KV cache,
   giving k + 1 rows of logits: row i is the target's next-token distribution after d1..di.
   -> decoder.py
3. The request's sampling chain turns each row into p_i. Draft token d_i is accepted with
   probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection a token is drawn from
   norm(max(0, p_i - q_i)) and the round ends; if all k are accepted, one more is drawn
   from p_k. For prompt lookup q_i is a point mass. This rule leaves the output
   distributed exactly as the target's own sampling (Leviathan et al. 2023, Chen et al.
   2023); with temperature 0 it reduces to "accept while the draft equals the argmax", so
   greedy output is the target's greedy output, token for token. -> rule.py
4. Rollback is free: the cache keeps what the rejected drafts wrote, but the next round
   overwrites those positions before anything attends to them (attention reads positions
   < kv_len, masked to those at or before each query's own).

Every round costs one target forward and yields between 1 and k + 1 tokens. config.py
builds all of it from names (`LLM(speculative=...)`, the CLI) and measures the plain
baseline.
"""

from pellucid.engine.speculative.config import (
    PlainRun,
    SpeculativeConfig,
    check_same_vocabulary,
    from_option,
    make_drafter,
    measure_plain,
)
from pellucid.engine.speculative.decoder import SpecRound, SpecStats, SpeculativeDecoder
from pellucid.engine.speculative.drafters import Drafter, ModelDrafter, NgramDrafter, truncated
from pellucid.engine.speculative.rule import (
    ChainOutput,
    Draft,
    DraftChain,
    accept_reject,
    apply_chain,
)

__all__ = [
    "ChainOutput", "Draft", "DraftChain", "Drafter", "ModelDrafter", "NgramDrafter", "PlainRun", "SpecRound", "SpecStats",
    "SpeculativeConfig", "SpeculativeDecoder", "accept_reject", "apply_chain", "check_same_vocabulary", "from_option",
    "make_drafter", "measure_plain", "truncated",
]  # fmt: skip

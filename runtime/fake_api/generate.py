"""Reply text: a deterministic function of the prompt, with an exact token count in the model's family.

Same system + messages -> same text (whatever max_tokens, stream or metadata say). Words are drawn from a fixed
vocabulary by a hash of the prompt, so ``count_text(reply, family)`` equals the reported ``output_tokens``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from runtime.fake_api.tokenizer import count_text

_VOCAB = (
    "the of and to in is it that for on as with was be by at this are from or an have not but which one "
    "all can had were has more when will there their would what about if out up so some into than them only "
    "other time its two may then these like also any new most such over used first where much well after "
    "model token cache batch queue limit price actor cluster request answer system value state lease budget "
    "routing fallback latency retry ledger record window bucket refill output input prompt result signal "
    "careful summary context pattern example detail measure storage network balance "
    "a I we do go no me my us ok"
).split()

# draw order is a fixed permutation of the vocabulary, so consecutive draws vary
_STRIDE = 37
MIN_NATURAL = 16
MAX_NATURAL = 128


def prompt_seed(body: dict) -> int:
    raw = orjson.dumps([body.get("system"), body.get("messages")], option=orjson.OPT_SORT_KEYS)
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def natural_length(seed: int) -> int:
    """How many tokens the 'model' wants to say, in [16, 128]."""
    return MIN_NATURAL + seed % (MAX_NATURAL - MIN_NATURAL + 1)


class _Vocab:
    def __init__(self, family: str) -> None:
        self.family = family
        self.words = _VOCAB
        self.cost = tuple(count_text(w, family) for w in _VOCAB)
        self.short = tuple(i for i, c in enumerate(self.cost) if c == 1)


_VOCABS = {f: _Vocab(f) for f in ("v1", "v2")}


def reply_text(seed: int, tokens: int, family: str) -> str:
    """Text of exactly ``tokens`` tokens (>= 1) in ``family``: sentences of vocabulary words ending in '.'."""
    v = _VOCABS.get(family) or _VOCABS["v2"]
    words, cost, short = v.words, v.cost, v.short
    n = len(words)
    out: list[str] = []
    left = tokens - 1  # the final '.' is one token
    i = seed % n
    k = 0
    cap = True
    while left > 0:
        j = i % n
        c = cost[j]
        if c > left:
            j = short[i % len(short)]
            c = 1
        w = words[j]
        k += 1
        # a full stop every 9 words when there is room for it
        if cap:
            w = w[:1].upper() + w[1:]
        cap = k % 9 == 0 and left - c >= 2
        if cap:
            out.append(w + ".")
            left -= c + 1
        else:
            out.append(w)
            left -= c
        i += _STRIDE
    return " ".join(out) + "."


def generate(body: dict, max_tokens: int, family: str, fixed_tokens: int | None = None,
             seed: int | None = None) -> tuple[str, int, str, str | None]:
    """(text, output_tokens, stop_reason, stop_sequence) for a validated request."""
    if seed is None:
        seed = prompt_seed(body)
    want = fixed_tokens if fixed_tokens is not None else natural_length(seed)
    want = max(1, want)
    if want > max_tokens:
        n, stop = max_tokens, "max_tokens"
    else:
        n, stop = want, "end_turn"
    text = reply_text(seed, n, family)
    stop_seq: str | None = None
    seqs: Any = body.get("stop_sequences")
    if seqs:
        cut = -1
        for s in seqs:
            if s:
                p = text.find(s)
                if p >= 0 and (cut < 0 or p < cut):
                    cut, stop_seq = p, s
        if stop_seq is not None:
            text = text[:cut]
            n = count_text(text, family)
            stop = "stop_sequence"
    return text, n, stop, stop_seq

"""Hand-written question pairs for the semantic cache benchmark.

ADVERSARIAL: pairs whose wording is close (high cosine under MiniLM) but whose right answers differ. Not one of
them may ever be served from the other's cache entry. Categories: negation, swapped entities/roles, changed
numbers, different units, on/off-type antonyms, different programming languages / libraries, different
natural languages, different names, quoted strings.

PARAPHRASES: pairs a user would accept the same answer for; the cache should hit them (recall on questions,
which STS-B's captions and headlines do not measure).

Written for this project; not taken from a data set. Each entry: (query, cached prompt, category).

``load_pairs`` reads the larger set in benchmarks/data/cache_pairs.tsv: near misses by category (who, when,
where, which way, how much, modality, object, negation) and paraphrases written as prompts to an assistant, each
in a fixed tune or test half; and benchmarks/data/cache_pairs_holdout.tsv, a fresh set written once the guard
and verifier were final and never used to tune them.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import NamedTuple

PAIRS_FILE = Path(__file__).resolve().parent / "data" / "cache_pairs.tsv"
HOLDOUT_FILE = Path(__file__).resolve().parent / "data" / "cache_pairs_holdout.tsv"


class Pair(NamedTuple):
    query: str
    cached: str
    category: str  # "paraphrase" for the same question, else the kind of near miss
    split: str  # "tune" | "test" | "holdout"

    @property
    def same(self) -> bool:
        return self.category == "paraphrase"


def load_pairs(split: str | None = None) -> list[Pair]:
    """The pairs of one half ("tune" or "test"), the fresh "holdout" set, or (None) tune and test."""
    if split not in (None, "tune", "test", "holdout"):
        raise ValueError(f"split must be 'tune', 'test' or 'holdout', not {split!r}")
    with open(HOLDOUT_FILE if split == "holdout" else PAIRS_FILE, newline="", encoding="utf-8") as f:
        lines = [line for line in f if not line.startswith("#")]
    rows = [Pair(r["query"], r["cached"], r["category"], r["split"])
            for r in csv.DictReader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return [r for r in rows if split is None or r.split == split]

"""What an embedder hands back: the shape every embedding backend agrees on (numpy only, no torch).

    enc = embedder.encode(["how do I sort a list?"], tokens=True)
    enc.vectors          # (1, 384) float32, unit rows: the sentence embeddings
    enc.tokens[0]        # (n_tokens, 384) float32, unit rows: one per word piece, [CLS]/[SEP]/padding removed
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Encoded:
    vectors: np.ndarray  # (n, dim) float32, unit rows
    tokens: list[np.ndarray] | None = None  # per text (n_tokens_i, dim) float32 unit rows; None unless asked

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2:
            raise ValueError(f"vectors must be 2-D, got shape {self.vectors.shape}")
        if self.tokens is not None and len(self.tokens) != self.vectors.shape[0]:
            raise ValueError("one token matrix per text")

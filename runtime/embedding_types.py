"""What an embedding call returns, shared by the model side (runtime.embedding) and its callers.

numpy only: a caller process imports this to receive embeddings without ever importing torch.

    enc = embedder.encode(["how do I sort a list?", "hi"], tokens=True)   # or: await pool_client.encode(...)
    enc.vectors          # (2, 384) float32, unit-length rows: one sentence embedding per text
    enc.tokens[0]        # (n_tokens_0, 384) float32, unit rows; [CLS], [SEP] and padding removed
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIM = 384  # all-MiniLM-L6-v2


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; compare fields with numpy
class Encoded:
    vectors: np.ndarray
    tokens: list[np.ndarray] | None = None  # per text (n_tokens_i, dim) float32 unit rows; None unless asked

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2:
            raise ValueError(f"vectors must be 2-D, got shape {self.vectors.shape}")
        if self.tokens is not None and len(self.tokens) != self.vectors.shape[0]:
            raise ValueError("one token matrix per text")

    def __len__(self) -> int:
        return int(self.vectors.shape[0])


class EmbeddingUnavailable(RuntimeError):
    """The embedding pool did not answer in time (down, restarting, or overloaded). Internal: the cache turns it
    into a ``bypass`` of the semantic lookup; it never reaches a user."""

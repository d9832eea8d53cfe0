"""The cache's second opinion: does a cached prompt ask the same thing as the new one? Pure numpy, no I/O
beyond reading its model file from the package once.

A cosine threshold alone trades recall for safety; the guard (runtime.cache_guard) vetoes the differences it
can name. The verifier judges what is left, for every candidate above a loose cosine threshold, from:

* the cosine of the two sentence embeddings;
* BERTScore-style greedy alignment of the two prompts' MiniLM token embeddings, both directions (each token
  to its most similar token on the other side): the means, and the worst-aligned tokens on each side;
* content words on one side only, weighted by IDF (learned from STS-B train): each side, the larger and the
  smaller share (a word swapped for another shows on both sides, a word added on one), counts;
* the guard's tolerated differences (``cache_guard.signals``): negations, numbers, names, places, direction;
* the length ratio.

Small gradient-boosted trees (depth 2, evaluated in numpy) turn them into a log-odds margin, which a Platt
scaling makes a probability; a candidate is the same question when that probability reaches the threshold
stored with the model (chosen on training data only, see ``runtime.cache_train``, which also says why trees
and not a logistic regression). The model is a versioned JSON file shipped in the package
(``runtime/data/verifier_v2.json``; v1, trained with 5 folds and the guard before the first holdout's fixes, is
in git history): feature names, trees, calibration, threshold, IDF table, training
metadata.

    v = Verifier()                          # the packaged model and its threshold
    p = v.score(query, q_tokens, cached_prompt, c_tokens, cosine)
    ok = p >= v.threshold
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from runtime import cache_guard

MODEL_FILE = "verifier_v2.json"
FEATURES = (
    "cosine",
    "align_p", "align_r", "align_f", "align_min", "worst_q", "worst_c", "worst2_q", "worst2_c", "low_q", "low_c",
    "idf_only_q", "idf_only_c", "idf_only_max", "idf_only_min", "idf_only_top", "n_only_q", "n_only_c",
    "negation_diff", "numbers_diff", "names_one_sided", "category_one_sided", "places_diff", "direction",
    "quoted_diff",
    "length_ratio",
)
_LOW_ALIGN = 0.5  # a token whose best match on the other side is below this has no counterpart there

_WORD = re.compile(r"[a-z0-9]+")
stem = cache_guard.stem  # the same content word for the guard and the verifier's features


@lru_cache(maxsize=1)
def _function_words() -> frozenset[str]:
    """Function words and request-framing words (runtime/data/guard/names.txt): never content."""
    text = (resources.files("runtime") / "data" / "guard" / "names.txt").read_text(encoding="utf-8")
    words: set[str] = set()
    for line in text.splitlines():
        if line.strip() and not line.startswith(("#", "[")):
            words |= {w.strip() for w in line.split(",") if w.strip()}
    return frozenset(words)


@lru_cache(maxsize=8192)
def content_stems(text: str) -> tuple[str, ...]:
    """The prompt's content words, lower-cased and stemmed, in order (function words dropped)."""
    fw = _function_words()
    return tuple(stem(w) for w in _WORD.findall(text.lower().replace("'", "").replace("’", "")) if w not in fw)


@dataclass(frozen=True)
class VerifierModel:
    """Gradient-boosted trees of one fixed depth, stored as complete binary trees: node ``i``'s children are
    ``2i+1`` (feature <= threshold) and ``2i+2``; a node that did not split has threshold +inf."""

    version: str
    features: tuple[str, ...]
    depth: int
    base: float  # the log-odds every margin starts from
    split_feature: np.ndarray  # (trees, 2**depth - 1) int
    split_value: np.ndarray  # (trees, 2**depth - 1) float
    leaf: np.ndarray  # (trees, 2**depth) float: the learning rate is folded in
    calib_a: float  # calibrated probability = sigmoid(calib_a * margin + calib_b)
    calib_b: float
    threshold: float  # on the calibrated probability
    idf: dict[str, float]
    idf_default: float  # for words never (or once) seen in training: rare, so weighty
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version, "kind": "gradient-boosted trees", "features": list(self.features),
            "threshold": self.threshold, "calibration": {"a": self.calib_a, "b": self.calib_b},
            "metadata": self.metadata,
            # 7 significant digits: far below any difference the features can make, a third of the file
            "trees": {"depth": self.depth, "base": self.base, "split_feature": self.split_feature.tolist(),
                      "split_value": [[float(f"{v:.7g}") if math.isfinite(v) else None for v in row]
                                      for row in self.split_value.tolist()],
                      "leaf": [[float(f"{v:.7g}") for v in row] for row in self.leaf.tolist()]},
            "idf_default": self.idf_default, "idf": dict(sorted(self.idf.items())),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VerifierModel:
        feats = tuple(d["features"])
        if feats != FEATURES:
            raise ValueError(f"verifier model {d.get('version')!r} was trained on other features: {feats}")
        t = d["trees"]
        values = np.array([[math.inf if v is None else v for v in row] for row in t["split_value"]],
                          dtype=np.float64)
        return cls(version=str(d["version"]), features=feats, depth=int(t["depth"]), base=float(t["base"]),
                   split_feature=np.asarray(t["split_feature"], dtype=np.int64), split_value=values,
                   leaf=np.asarray(t["leaf"], dtype=np.float64),
                   calib_a=float(d["calibration"]["a"]), calib_b=float(d["calibration"]["b"]),
                   threshold=float(d["threshold"]), idf={str(k): float(v) for k, v in d["idf"].items()},
                   idf_default=float(d["idf_default"]), metadata=dict(d.get("metadata") or {}))


@lru_cache(maxsize=4)
def _leaf_of_code(depth: int) -> np.ndarray:
    """For a complete tree of ``depth``, the leaf reached for every combination of its nodes' decisions (bit
    ``i`` of the code: node ``i`` goes right)."""
    nodes = 2 ** depth - 1
    out = np.empty(2 ** nodes, dtype=np.int64)
    for code in range(2 ** nodes):
        node = 0
        for _ in range(depth):
            node = 2 * node + 1 + ((code >> node) & 1)
        out[code] = node - nodes
    return out


def tree_margins(x: np.ndarray, split_feature: np.ndarray, split_value: np.ndarray, leaf: np.ndarray,
                 depth: int) -> np.ndarray:
    """Sum of the trees' leaf values for each row of ``x`` (n, features): all trees walked at once."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    if depth <= 4:
        # every node's decision in one gather and compare, then each tree's leaf from a table of decision codes:
        # the same leaves as the walk below (which gathers three times per level), for one row in a third of
        # its time (1,500 trees of depth 3: 0.066 -> ~0.02 ms)
        nodes = 2 ** depth - 1
        trees = split_feature.shape[0]
        right = (x.take(split_feature.reshape(-1), axis=1) > split_value.reshape(-1)).reshape(-1, trees, nodes)
        if nodes <= 8:  # a code fits a byte
            code = right.view(np.uint8) @ (np.uint8(1) << np.arange(nodes, dtype=np.uint8))
        else:
            code = right @ (np.int64(1) << np.arange(nodes, dtype=np.int64))
        at = _leaf_of_code(depth)[code]                              # (n, trees)
        return leaf.reshape(-1).take(at + np.arange(trees) * leaf.shape[1]).sum(axis=1)
    return _walk_margins(x, split_feature, split_value, leaf, depth)


def _walk_margins(x: np.ndarray, split_feature: np.ndarray, split_value: np.ndarray, leaf: np.ndarray,
                  depth: int) -> np.ndarray:
    """``tree_margins`` by walking every tree level by level (any depth; 2-D ``x``)."""
    trees = np.arange(split_feature.shape[0])
    rows = np.arange(x.shape[0])[:, None]
    node = np.zeros((x.shape[0], len(trees)), dtype=np.int64)
    for _ in range(depth):
        right = x[rows, split_feature[trees, node]] > split_value[trees, node]
        node = 2 * node + 1 + right
    return leaf[trees, node - (2 ** depth - 1)].sum(axis=1)


def default_model_path() -> Path:
    return Path(str(resources.files("runtime") / "data" / MODEL_FILE))


@lru_cache(maxsize=4)
def load_model(path: str | None = None) -> VerifierModel:
    """The verifier model from ``path``, or the one shipped in the package. Cached per path."""
    p = Path(path) if path else default_model_path()
    return VerifierModel.from_json(json.loads(p.read_text(encoding="utf-8")))


def _as_tokens(tokens: Any) -> np.ndarray:
    t = np.asarray(tokens, dtype=np.float32)
    return t.reshape(-1, t.shape[-1]) if t.size else np.zeros((0, 1), dtype=np.float32)


def features(query: str, q_tokens: Any, candidate: str, c_tokens: Any, cosine: float,
             idf: dict[str, float], idf_default: float) -> np.ndarray:
    """The feature vector (order: ``FEATURES``) for one pair. Token matrices: unit rows, one per word piece,
    special tokens removed (``Encoded.tokens``); float16 is fine."""
    qt, ct = _as_tokens(q_tokens), _as_tokens(c_tokens)
    if qt.shape[0] and ct.shape[0] and qt.shape[1] == ct.shape[1]:
        sim = qt @ ct.T
        best_q, best_c = np.sort(sim.max(axis=1)), np.sort(sim.max(axis=0))
        align = [float(best_q.mean()), float(best_c.mean()), float(best_q[0]), float(best_c[0]),
                 float(best_q[:2].mean()), float(best_c[:2].mean()),
                 float((best_q < _LOW_ALIGN).mean()), float((best_c < _LOW_ALIGN).mean())]
    else:
        align = [0.0] * 6 + [1.0, 1.0]
    p, r = align[0], align[1]
    f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0

    qset, cset = set(content_stems(query)), set(content_stems(candidate))

    def w(s: str) -> float:
        return idf.get(s, idf_default)

    only_q, only_c = [w(s) for s in qset - cset], [w(s) for s in cset - qset]
    idf_q = sum(only_q) / (sum(w(s) for s in qset) or 1.0)
    idf_c = sum(only_c) / (sum(w(s) for s in cset) or 1.0)

    sig = cache_guard.signals(query, candidate)
    nq, nc = len(query.split()), len(candidate.split())
    return np.array([
        cosine,
        p, r, f1, min(p, r), *align[2:],
        idf_q, idf_c, max(idf_q, idf_c), min(idf_q, idf_c), max(only_q + only_c, default=0.0) / idf_default,
        len(only_q), len(only_c),
        sig["negation_diff"], sig["numbers_diff"], sig["names_one_sided"], sig["category_one_sided"],
        sig["places_diff"], sig["direction"], sig["quoted_diff"],
        min(nq, nc) / max(nq, nc, 1),
    ], dtype=np.float64)


def margin(model: VerifierModel, x: np.ndarray) -> np.ndarray:
    """The trees' log-odds for feature rows ``x`` (before calibration)."""
    return model.base + tree_margins(x, model.split_feature, model.split_value, model.leaf, model.depth)


def calibrated(model: VerifierModel, m: Any) -> Any:
    z = model.calib_a * np.asarray(m, dtype=np.float64) + model.calib_b
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


class Verifier:
    """Scores candidate pairs with one model; ``threshold`` is the model's own unless overridden."""

    def __init__(self, model: VerifierModel | None = None, threshold: float | None = None) -> None:
        self.model = model or load_model()
        self.threshold = self.model.threshold if threshold is None else float(threshold)
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"verifier threshold must be in (0, 1], got {self.threshold}")

    def score(self, query: str, q_tokens: Any, candidate: str, c_tokens: Any, cosine: float) -> float:
        """The calibrated probability that ``candidate`` asks what ``query`` asks."""
        if query.strip() == candidate.strip():
            return 1.0
        x = features(query, q_tokens, candidate, c_tokens, float(cosine), self.model.idf, self.model.idf_default)
        return float(calibrated(self.model, margin(self.model, x))[0])

    def accepts(self, query: str, q_tokens: Any, candidate: str, c_tokens: Any, cosine: float,
                min_score: float | None = None) -> tuple[bool, float]:
        """(accepted, score): the score must reach the threshold, and ``min_score`` (a per-entry threshold
        raised by feedback) when there is one."""
        s = self.score(query, q_tokens, candidate, c_tokens, cosine)
        need = max(self.threshold, min_score or 0.0)
        return s >= need, s


# -- storage and feedback helpers (pure) --------------------------------------------------------------------------

def pack_tokens(tokens: Any) -> bytes | None:
    """A prompt's token matrix as compact float16 bytes (n x dim, row-major) for the cache table."""
    if tokens is None:
        return None
    return np.ascontiguousarray(np.asarray(tokens, dtype=np.float16)).tobytes()


def unpack_tokens(blob: Any, dim: int = 384) -> np.ndarray | None:
    """``pack_tokens``' bytes back to an (n, dim) float32 matrix; arrays pass through; None stays None."""
    if blob is None:
        return None
    if isinstance(blob, np.ndarray):
        return blob.astype(np.float32, copy=False)
    return np.frombuffer(blob, dtype=np.float16).reshape(-1, dim).astype(np.float32)


def pack_vector(vector: Any) -> bytes:
    return np.asarray(vector, dtype=np.float16).reshape(-1).tobytes()


def unpack_vector(blob: Any) -> np.ndarray:
    if isinstance(blob, (bytes, bytearray, memoryview)):
        return np.frombuffer(blob, dtype=np.float16).astype(np.float32)
    return np.asarray(blob, dtype=np.float32).reshape(-1)


def for_settings(cache_settings: Any) -> Verifier:
    """The verifier a cache configuration asks for: its model file (default: the packaged one) and its
    threshold override, if any."""
    path = getattr(cache_settings, "verifier_model", None)
    return Verifier(load_model(str(path) if path else None), getattr(cache_settings, "verifier_threshold", None))


def judge(verifier: Verifier | None, query: str, q_tokens: Any, candidate: dict[str, Any],
          similarity_threshold: float) -> tuple[bool, float]:
    """(accepted, score) for one candidate row (prompt, tokens, similarity, min_score) that the guard let
    through. Rows stored without token embeddings, or no verifier: the cosine alone against
    ``similarity_threshold`` (the rule before the verifier), raised by the row's own threshold."""
    sim = float(candidate["similarity"])
    c_tokens = unpack_tokens(candidate.get("tokens"))
    own = float(candidate.get("min_score") or 0.0)
    if verifier is None or c_tokens is None or q_tokens is None:
        return sim >= max(similarity_threshold, own), sim
    return verifier.accepts(query, q_tokens, candidate["prompt"], c_tokens, sim, own)


def tightened(verifier: Verifier, query: str, q_tokens: Any, neighbours: list[dict[str, Any]], *,
              floor: float | None, margin: float) -> dict[str, float]:
    """Per-entry thresholds after a wrong answer to ``query``: each neighbour's rises above the score the
    query gets against it (so the same question no longer reaches it) and above ``floor``, the wrong
    match's own score (this neighbourhood showed that such a score can be wrong). Only raises; capped at
    1.0, which leaves a neighbour to exact matches. {key: new threshold} for the neighbours that change."""
    out: dict[str, float] = {}
    for n in neighbours:
        _, score = judge(verifier, query, q_tokens, n, 0.0)
        need = min(1.0, max(score, floor or 0.0) + margin)
        if need > float(n.get("min_score") or 0.0):
            out[n["key"]] = round(need, 6)
    return out

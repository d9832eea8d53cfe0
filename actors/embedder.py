"""The embedding pool: replicas ``embedder-<i>`` (in the runtime's namespace, ``settings.embedding.namespace``;
detached, restarted by Ray) own the model; every caller asks them through an ``EmbeddingPoolClient`` and never loads torch.

    start_pool(settings)                                   # runtime.start: the floor, model loaded, ready
    pool = EmbeddingPoolClient(settings)                   # in any process: a caller, the cache actor, a driver
    enc = await pool.encode(["how do I sort a list?"], tokens=True)   # runtime.embedding_types.Encoded
    vec = await pool.embed_async("how do I sort a list?")  # one (384,) vector
    stop_pool(settings)                                    # Runtime.shutdown

Batching happens twice. In a client, concurrent requests' texts share one send (runtime.groupsubmit, waiting
``linger_s`` for it to fill, at most ``max_batch`` texts); in a replica, sends from every caller that arrive while
the model is busy share its next model call. Failure is a value, not an outage: a request whose embedding misses
``deadline_s``, or finds no replica up, gets ``EmbeddingUnavailable`` (counted and logged here) and the cache goes
on without its semantic part. A replica that fails a send is taken out of rotation and probed in the background
(its ``ready`` answers once a restarted replica has loaded the model); the others carry on meanwhile.

This module imports numpy and ray only: the model is imported inside the replica's constructor.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from typing import Any

import numpy as np
import ray

from runtime import embedding_pool as policy
from runtime.embedding_types import DIM, EmbeddingUnavailable, Encoded
from runtime.groupsubmit import GroupSubmitter

log = logging.getLogger(__name__)

NAMESPACE = "claude_runtime"
PREFIX = "embedder-"
DISCOVER_EVERY_S = 10.0  # look for replicas other callers started
PROBE_RETRY_S = 0.5
START_TIMEOUT_S = 180.0  # model load on a busy node takes tens of seconds
CHECK_TIMEOUT_S = 0.5  # a live replica answers ready() in milliseconds, even while its model is busy


def replica_name(index: int) -> str:
    return f"{PREFIX}{index}"


def pool_namespace(settings: Any) -> str:
    return settings.embedding.namespace or NAMESPACE


# -- the replica (model side) ------------------------------------------------------------------------------------

class EmbedderReplica:
    def __init__(self, settings: Any, index: int) -> None:
        from runtime.embedding import Embedder  # torch: here only, never in a client

        s = settings.embedding
        self._s = s
        self._index = index
        self._emb = Embedder(settings.cache.embedding_model, max_batch=s.max_batch, lru_size=s.lru_size,
                             device=s.device, threads=s.threads)
        self._life = f"{os.getpid()}-{time.time_ns()}"
        self._last_call = time.monotonic()
        self._active = 0
        self._calls = 0
        self._texts = 0
        self._watch: asyncio.Task[None] | None = None

    def _touch(self) -> None:
        self._last_call = time.monotonic()
        if self._watch is None and self._index >= self._s.min_replicas:
            self._watch = asyncio.get_running_loop().create_task(self._idle_watch())

    async def encode(self, texts: list[str], *, tokens: bool = False) -> Encoded:
        """The model-side call for any holder of a replica handle (Embedder.encode, batched with everyone)."""
        self._touch()
        self._active += 1
        try:
            self._calls += 1
            self._texts += len(texts)
            return await self._emb.encode_async(list(texts), tokens=tokens)
        finally:
            self._active -= 1
            self._last_call = time.monotonic()

    async def encode_batch(self, texts: list[str], want_tokens: list[bool]
                           ) -> tuple[np.ndarray, list[np.ndarray | None], int]:
        """A pool client's send: texts of many requests, token embeddings only where asked. Returns the vectors,
        the token arrays (None where not asked) and this replica's backlog, the pool's demand signal."""
        self._touch()
        self._active += 1
        try:
            self._calls += 1
            self._texts += len(texts)
            answers = await self._emb.encode_each_async(list(texts), list(want_tokens))
            vectors = np.stack([v for v, _ in answers]).astype(np.float32, copy=False)
            tokens = [t for _, t in answers]
            return vectors, tokens, self._emb.backlog
        finally:
            self._active -= 1
            self._last_call = time.monotonic()

    async def ready(self) -> dict[str, Any]:
        """Answers once the model is loaded; ``life`` changes when Ray restarts the replica."""
        self._touch()
        return {"index": self._index, "life": self._life, "pid": os.getpid(), "device": self._emb.device,
                "traced": self._emb.traced}

    async def stats(self) -> dict[str, Any]:
        return {"index": self._index, "life": self._life, "calls": self._calls, "texts": self._texts,
                "model_calls": self._emb.batches, "model_texts": self._emb.texts, "backlog": self._emb.backlog,
                "idle_s": time.monotonic() - self._last_call, "rss_bytes": _rss_bytes()}

    async def clear_lru(self) -> None:
        """Benchmarks: measure cold embeddings."""
        self._emb._lru.clear()

    async def _idle_watch(self) -> None:
        every = max(0.5, min(30.0, self._s.idle_exit_s / 4))
        while True:
            await asyncio.sleep(every)
            if self._active == 0 and policy.should_exit(self._index, time.monotonic() - self._last_call, self._s):
                log.info("embedder-%d idle for %.0f s: leaving the pool", self._index,
                         time.monotonic() - self._last_call)
                # no_restart: an idle exit is deliberate, Ray must not bring it back
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


EmbedderActor = ray.remote(max_restarts=-1, max_concurrency=1_000)(EmbedderReplica)


def create_replica(settings: Any, index: int, **options: Any) -> Any:
    """``embedder-<index>``, or the live one of that name; never blocks on the model load."""
    s = settings.embedding
    public = settings.without_secrets() if hasattr(settings, "without_secrets") else settings  # no API key
    return EmbedderActor.options(name=replica_name(index), namespace=pool_namespace(settings), lifetime="detached",
                                 get_if_exists=True, num_cpus=s.num_cpus, num_gpus=s.num_gpus,
                                 **options).remote(public, index)


def start_pool(settings: Any, *, timeout_s: float = START_TIMEOUT_S, **options: Any) -> list[Any]:
    """The floor of the pool (``min_replicas``), waited for until each has its model loaded, or ``timeout_s``:
    a replica the cluster cannot place yet (no free CPU or GPU) must not stop the runtime from starting; until
    it serves, lookups go on without their semantic part."""
    handles = [create_replica(settings, i, **options) for i in range(settings.embedding.min_replicas)]
    refs = [h.ready.remote() for h in handles]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if len(ready) < len(refs):
        s = settings.embedding
        log.warning("%d of %d embedding replicas not ready after %.0f s (each needs num_cpus=%s, num_gpus=%s): "
                    "semantic lookups are bypassed until they are", len(refs) - len(ready), len(refs), timeout_s,
                    s.num_cpus, s.num_gpus)
    else:
        ray.get(ready)  # a replica that failed to start says why here
    return handles


def find_replicas(settings: Any) -> dict[int, Any]:
    out = {}
    for i in range(settings.embedding.max_replicas):
        try:
            out[i] = ray.get_actor(replica_name(i), namespace=pool_namespace(settings))
        except ValueError:
            pass
    return out


def stop_pool(settings: Any) -> None:
    for h in find_replicas(settings).values():
        ray.kill(h, no_restart=True)


# -- the client (caller side): numpy and ray only -------------------------------------------------------------

class _Replica(policy.ReplicaView):
    def __init__(self, handle: Any, up: bool = True) -> None:
        super().__init__(up=up)
        self.handle = handle
        self.probe: asyncio.Task[None] | None = None


class EmbeddingPoolClient:
    """One per process. ``encode`` / ``embed_async`` from any coroutine on the process's event loop."""

    def __init__(self, settings: Any, *, handles: dict[int, Any] | None = None) -> None:
        s = settings.embedding
        self._settings = settings
        self._s = s
        self._replicas: dict[int, _Replica] = {i: _Replica(h) for i, h in (handles or {}).items()}
        # items: (text, tokens wanted, monotonic time past which nobody waits for it)
        self._group: GroupSubmitter[tuple[str, bool, float], tuple[np.ndarray, np.ndarray | None]] = (
            GroupSubmitter(self._send, max_batch=s.max_batch, max_inflight=2 * s.max_replicas,
                           busy_linger_s=s.linger_s, name="embedding-pool"))
        self._scale = policy.ScaleUp(s)
        self._discovered_at = float("-inf")
        self._last_log = float("-inf")
        self._metric: Any = None
        self.stats = {"requests": 0, "texts": 0, "sends": 0, "unavailable": 0, "replica_errors": 0,
                      "scale_ups": 0}

    # -- public -------------------------------------------------------------------------------------------
    async def encode(self, texts: list[str], *, tokens: bool = False, deadline_s: float | None = None
                     ) -> Encoded:
        """Sentence embeddings (and token embeddings with ``tokens``) for ``texts``. Raises
        ``EmbeddingUnavailable`` when no replica answers within ``deadline_s`` (default: the settings'; pass
        ``math.inf`` for bulk work that should wait)."""
        texts = [str(t) for t in texts]
        if not texts:
            return Encoded(np.zeros((0, DIM), dtype=np.float32), [] if tokens else None)
        self.stats["requests"] += 1
        self.stats["texts"] += len(texts)
        deadline = self._s.deadline_s if deadline_s is None else deadline_s
        expires = time.monotonic() + deadline
        waits = asyncio.gather(*(self._group.submit((t, tokens, expires)) for t in texts))
        try:
            answers = await asyncio.wait_for(waits, None if math.isinf(deadline) else deadline)
        except asyncio.TimeoutError:
            self._unavailable("deadline", f"no answer within {deadline:.3g} s")
            raise EmbeddingUnavailable(f"embedding pool: no answer within {deadline:.3g} s") from None
        except EmbeddingUnavailable as exc:
            self._unavailable("down", str(exc))
            raise
        except Exception as exc:  # noqa: BLE001 - a replica's bug must not become the request's failure
            self._unavailable("error", type(exc).__name__)
            raise EmbeddingUnavailable(f"embedding pool: {type(exc).__name__}") from exc
        vectors = np.stack([v for v, _ in answers]).astype(np.float32, copy=False)
        return Encoded(vectors, [t for _, t in answers] if tokens else None)  # type: ignore[misc]

    async def encode_async(self, texts: list[str], *, tokens: bool = False) -> Encoded:
        """``encode`` under the name an in-process ``runtime.embedding.Embedder`` gives it (the CacheClient's
        call, so either serves it)."""
        return await self.encode(texts, tokens=tokens)

    async def embed_async(self, text: str) -> np.ndarray:
        """One text's (384,) unit vector."""
        return (await self.encode([text])).vectors[0]

    def discover(self) -> int:
        """Look up the pool's replicas by name (blocking GCS lookups, ~1 ms each): new ones join the rotation,
        ones whose name is gone (left idle, or stopped) leave it. Returns how many are known."""
        self._discovered_at = time.monotonic()
        found = find_replicas(self._settings)
        for i, h in found.items():
            if i not in self._replicas:
                self._replicas[i] = _Replica(h)
        for i in [i for i, r in self._replicas.items() if i not in found and r.up]:
            del self._replicas[i]  # a replica still probed is left to its probe
        return len(self._replicas)

    def replicas(self) -> dict[int, dict[str, Any]]:
        return {i: {"up": r.up, "inflight": r.inflight, "backlog": r.backlog} for i, r in self._replicas.items()}

    # -- internals ----------------------------------------------------------------------------------------
    def _maybe_discover(self) -> None:
        since = time.monotonic() - self._discovered_at
        none_up = not any(r.up for r in self._replicas.values())
        if since >= DISCOVER_EVERY_S or (none_up and since >= 1.0):
            self.discover()

    async def _send(self, items: list[tuple[str, bool, float]]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        self._maybe_discover()
        texts = [t for t, _, _ in items]
        flags = [w for _, w, _ in items]
        # a send is given up when every waiter has (a replica that hangs must not hold a send slot forever)
        expires = max(e for _, _, e in items)
        tried: set[int] = set()
        last: BaseException | None = None
        for _ in range(2):  # one retry on another replica: a replica dying mid-send costs no request
            idx = policy.pick(self._replicas, tried)
            left = expires - time.monotonic()
            if idx is None or left <= 0:
                break
            tried.add(idx)
            r = self._replicas[idx]
            r.inflight += len(items)
            self.stats["sends"] += 1
            try:
                vectors, tokens, backlog = await asyncio.wait_for(r.handle.encode_batch.remote(texts, flags),
                                                                  None if math.isinf(left) else left + 0.05)
            except ray.exceptions.RayActorError as exc:
                last = exc
                self._take_down(idx, r, exc)
                continue
            except asyncio.TimeoutError as exc:
                # slow is not down: an overloaded replica stays in rotation (its waiters bypassed at their
                # deadline); one that does not even answer ready() soon is restarting or stuck
                last = exc
                self.stats["replica_errors"] += 1
                if r.probe is None or r.probe.done():
                    r.probe = asyncio.get_running_loop().create_task(self._check(idx, r))
                continue
            finally:
                r.inflight -= len(items)
            r.backlog = int(backlog)
            self._maybe_scale()
            return list(zip(vectors, tokens))
        why = f"{type(last).__name__} from a replica" if last is not None else "no embedding replica is up"
        raise EmbeddingUnavailable(why)

    def _take_down(self, idx: int, r: _Replica, exc: BaseException) -> None:
        self.stats["replica_errors"] += 1
        if not r.up:
            return
        r.up = False
        log.warning("%s out of rotation after %s; probing it", replica_name(idx), type(exc).__name__)
        r.probe = asyncio.get_running_loop().create_task(self._probe(idx, r))

    async def _check(self, idx: int, r: _Replica) -> None:
        try:
            await asyncio.wait_for(r.handle.ready.remote(), max(CHECK_TIMEOUT_S, self._s.deadline_s))
        except (ray.exceptions.RayActorError, asyncio.TimeoutError) as exc:
            if r.up:
                r.up = False
                log.warning("%s out of rotation: ready() failed after a send timed out (%s); probing it",
                            replica_name(idx), type(exc).__name__)
                await self._probe(idx, r)

    async def _probe(self, idx: int, r: _Replica) -> None:
        """Back in rotation once ``ready`` answers (a restarted replica answers after loading the model);
        forgotten once its name is gone (killed for good, or left idle)."""
        while True:
            try:
                await r.handle.ready.remote()
            except ray.exceptions.RayActorError:
                if not await asyncio.to_thread(self._exists, idx, pool_namespace(self._settings)):
                    if self._replicas.get(idx) is r:
                        del self._replicas[idx]
                    return
                await asyncio.sleep(PROBE_RETRY_S)
                continue
            except Exception:  # noqa: BLE001
                await asyncio.sleep(PROBE_RETRY_S)
                continue
            r.up = True
            log.info("%s back in rotation", replica_name(idx))
            return

    @staticmethod
    def _exists(idx: int, namespace: str) -> bool:
        try:
            ray.get_actor(replica_name(idx), namespace=namespace)
            return True
        except ValueError:
            return False

    def _maybe_scale(self) -> None:
        backlogs = [r.backlog for r in self._replicas.values() if r.up]
        if not self._scale.want_more(backlogs, len(self._replicas)):
            return
        idx = policy.free_index(set(self._replicas), self._s)
        if idx is None:
            return
        try:
            handle = create_replica(self._settings, idx)
        except Exception as exc:  # noqa: BLE001 - scaling is best effort
            log.warning("could not start %s: %s", replica_name(idx), type(exc).__name__)
            return
        self.stats["scale_ups"] += 1
        log.info("embedding backlog %s: starting %s", backlogs, replica_name(idx))
        r = self._replicas[idx] = _Replica(handle, up=False)
        r.probe = asyncio.get_running_loop().create_task(self._probe(idx, r))

    def _unavailable(self, reason: str, detail: str) -> None:
        self.stats["unavailable"] += 1
        try:
            if self._metric is None:
                from ray.util.metrics import Counter

                self._metric = Counter("claude_runtime_embedding_unavailable",
                                       description="lookups whose semantic part was bypassed: no embedding",
                                       tag_keys=("reason",))
            self._metric.inc(1.0, tags={"reason": reason})
        except Exception:  # noqa: BLE001 - a metrics backend problem must not touch the request
            pass
        now = time.monotonic()
        if now - self._last_log >= 10.0:  # one line per 10 s, with the running count, not one per request
            self._last_log = now
            log.warning("embedding pool unavailable (%s: %s): semantic lookup bypassed (%d so far in this "
                        "process)", reason, detail, self.stats["unavailable"])

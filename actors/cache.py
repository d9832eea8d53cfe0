"""The response cache: one LanceDB table on disk, owned by one detached actor, asked by every caller.

    cache = get_or_create_cache(settings)              # the "cache" singleton in namespace claude_runtime
    client = CacheClient(cache, settings)              # inside a caller actor
    out = await client.lookup(params, model, tenant)   # "exact" | "semantic" | "miss" | "bypass"
    if out.kind in ("exact", "semantic"):
        return out.message                             # $0, no limiter capacity
    try:
        msg = await call_the_api(...)
    except Exception:
        await client.release(out)                      # waiters on this key try themselves
        raise
    client.store_later(out, msg, model_used, cost_usd) # sent just after; client.drain() waits for it

Division of labour: the actor stores and finds rows (exact dict, scope-filtered vector search, single-flight
claims, TTL, size cap, ANN index, a byte-capped in-memory mirror); it never judges whether a neighbour is the
same question. The client, in the caller's process, has the prompt embedded by the shared embedding pool
(actors/embedder.py: sentence vector and token embeddings from one forward pass; the model is never loaded in
a caller), or by the actor itself with ``cache.embed_in_actor``, and applies runtime.cache_policy (bypass,
guard) and runtime.cache_verifier (the learned judge, on every candidate from the loose cosine up), and the
actor stays a fast state owner. No embedding within the
pool's deadline: the lookup goes on as ``bypass`` after its exact part (an exact hit is still served), and the
answer is not stored. The one judgement the actor makes is after a user's "that answer was wrong"
(``feedback``): it evicts the entry and raises its neighbours' own thresholds, with the same pure verifier.

Round trips on a miss: the exact lookup (beside the embedding), then one ``probe`` (the exact key again, the
candidates, and the single-flight claim taken before the client judges them; a client that finds a hit hands
the claim back without waiting). With ``cache.embed_in_actor`` the actor also holds the model, and a lookup is
one trip (``CacheService.lookup``: the exact key, else the prompt embedded here and then the probe), falling
back to the pool and a probe when the actor's model is busy or not loaded. The request path sends its answer's
put just after the answer goes back, without waiting for it: waiters on the key get the row when it lands, and a
put that fails releases the claim.

Persistence: a put returns only after its row is in the LanceDB table on disk, so a restarted actor
(max_restarts=-1, no state carried by Ray) rebuilds its exact-key dict from the table and serves the entry.
Hit counters in the stats are per actor life; the ledger, not the cache, is the record of money saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from runtime import cache_policy as policy
from runtime import cache_verifier
from runtime.embedding_types import EmbeddingUnavailable
from runtime.groupsubmit import GroupSubmitter
from runtime.scope_vectors import ScopeVectors
from runtime.settings import is_uri, redact_url

log = logging.getLogger(__name__)

NAMESPACE = "claude_runtime"
ACTOR_NAME = "cache"
TABLE = "entries"
DIM = 384

SCHEMA = pa.schema([
    pa.field("key", pa.string()),
    pa.field("scope_id", pa.string()),
    pa.field("tenant", pa.string()),
    pa.field("model", pa.string()),
    pa.field("kind", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("vector", pa.list_(pa.float32(), DIM)),
    pa.field("response", pa.string()),
    pa.field("cost_usd", pa.float64()),
    pa.field("created_at", pa.float64()),
    pa.field("expires_at", pa.float64()),
    pa.field("hits", pa.int64()),
    # the prompt's word-piece embeddings (float16, n x 384, row-major) for the verifier; null in old rows
    pa.field("tokens", pa.binary()),
    pa.field("min_score", pa.float64()),  # per-entry verifier threshold, raised by wrong-answer feedback
])
_PAYLOAD_COLS = ["prompt", "response", "tokens"]  # held in memory only while the byte cap allows
_INDEX_COLS = [f.name for f in SCHEMA if f.name != "vector" and f.name not in _PAYLOAD_COLS]
_TABLE_COLS = _INDEX_COLS + _PAYLOAD_COLS
# what the mirror costs per row, estimated for the byte cap: an index row's dict, a vector with its array
_ROW_BYTES = 700
_VEC_BYTES = DIM * 4 * 2  # a row of its scope's matrix (runtime/scope_vectors.py), and room to grow as much again
_HEX = re.compile(r"^[0-9a-f]{8,64}$")
_EMBED_HERE_MAX = 8  # lookups embedded by the cache actor at once (embed_in_actor); more go to the pool
_STORE_LATER_S = 0.002  # long enough for the caller's thread to take its answer (and the GIL) first
# a scope this small is searched on the actor's loop (a 5,000 x 384 matmul: ~0.06 ms; a thread hop costs more)
_QUICK_SEARCH_MAX = 5_000
_LANDING_WAIT_S = 2.0  # a lookup waits at most this long for its scope's puts in flight (a stuck write: go on)


def _now(now: float | None) -> float:
    return time.time() if now is None else float(now)


class CacheStore:
    """The table (the durable truth) plus an in-memory mirror capped by bytes (``mirror_max_bytes``).

    The mirror always holds every live row's index fields (key, scope, times, hits, per-entry threshold: the
    exact path, TTL and eviction need them). Within the cap it also holds, per scope, the rows' vectors: a
    scope of at most ``flat_scope_max`` rows is searched exactly in memory (a matmul over the scope: no
    approximation, no query overhead); a bigger scope, or one whose vectors did not fit, is searched in
    LanceDB (through the IVF-PQ index once the table has one, with exact re-scoring). Prompts, answers and
    token embeddings are held in a least-recently-used cache within what is left of the cap, and read from
    the table by key when needed. Synchronous; the actor serialises writes."""

    def __init__(self, path: str | Path, *, max_entries: int = 1_000_000, index_min_rows: int = 100_000,
                 flat_scope_max: int = 20_000, scalar_index_min_rows: int = 1_000,
                 mirror_max_bytes: int = 2 << 30, storage_options: dict[str, str] | None = None) -> None:
        import lancedb

        # a filesystem path, or a URI LanceDB connects to itself (s3://, gs://, az://, file://, memory://)
        self.uri = path if is_uri(path) else str(Path(path))
        self.path = None if is_uri(path) else Path(path)
        if self.path is not None:
            self.path.mkdir(parents=True, exist_ok=True)
        self.max_entries = max_entries
        self.index_min_rows = index_min_rows
        # scopes at most this big are searched exactly (flat over the scope's rows through the scope_id
        # index); an IVF index would probe partitions that may hold none of a small scope's rows
        self.flat_scope_max = flat_scope_max
        self.scalar_index_min_rows = scalar_index_min_rows
        self.mirror_max_bytes = mirror_max_bytes
        self._db = lancedb.connect(self.uri, storage_options=storage_options or None)
        try:
            self.table = self._db.open_table(TABLE)  # a table from an older schema opens as it is, then migrates
        except ValueError:  # not found
            self.table = self._db.create_table(TABLE, schema=SCHEMA, exist_ok=True)
        self._migrate()
        self.rows: dict[str, dict[str, Any]] = {}  # index fields only (_INDEX_COLS)
        self.scope_counts: dict[str, int] = {}
        # vectors of live rows, per warm scope, for exact in-memory search of scopes up to flat_scope_max
        # rows (a LanceDB query costs ~20 ms of fixed overhead here; a 2k x 384 matmul well under 1 ms)
        self._scope_vecs: dict[str, ScopeVectors] = {}
        self._scope_use: OrderedDict[str, None] = OrderedDict()  # warm scopes, least recently searched first
        self._cold: set[str] = set()  # scopes whose vectors the cap left on disk
        self._vec_count = 0
        self._payload: OrderedDict[str, dict[str, Any]] = OrderedDict()  # prompt/response/tokens, LRU
        self._payload_bytes = 0
        self.dirty_hits: set[str] = set()
        self.vector_indexed = False
        self.scope_indexed = False
        self.key_indexed = False
        self._load()

    # -- startup ---------------------------------------------------------------------------------------------
    def _migrate(self) -> None:
        """Tables written before token embeddings and per-entry thresholds get the columns, empty: their rows
        are judged by cosine alone until they are replaced."""
        have = set(self.table.schema.names)
        missing = [f for f in SCHEMA if f.name not in have]
        if missing:
            self.table.add_columns(missing)

    def _load(self) -> None:
        names = {getattr(ix, "name", "") for ix in self.table.list_indices()}
        cols = {tuple(getattr(ix, "columns", ()) or ()) for ix in self.table.list_indices()}
        self.vector_indexed = any("vector" in c for c in cols) or any("vector" in n for n in names)
        self.scope_indexed = any("scope_id" in c for c in cols) or any("scope_id" in n for n in names)
        self.key_indexed = any(c == ("key",) for c in cols) or any(n.startswith("key_") for n in names)
        if self.table.count_rows() == 0:
            return
        # index fields and vectors only: payloads are read back on demand
        data = self.table.search().select(_INDEX_COLS + ["vector"]).limit(None).to_arrow()
        vecs = data.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vecs = np.asarray(vecs, dtype=np.float32).reshape(-1, DIM)
        latest: dict[str, tuple[dict[str, Any], np.ndarray]] = {}
        for row, vec in zip(data.drop_columns(["vector"]).to_pylist(), vecs):
            prev = latest.get(row["key"])
            if prev is None or row["created_at"] >= prev[0]["created_at"]:
                latest[row["key"]] = (row, vec)
        self.apply([{**row, "vector": vec} for row, vec in latest.values()])

    # -- memory ----------------------------------------------------------------------------------------------
    def mirror_bytes(self) -> int:
        """What the mirror holds, estimated: index rows, vectors of warm scopes, cached payloads."""
        return len(self.rows) * _ROW_BYTES + self._vec_count * _VEC_BYTES + self._payload_bytes

    def _trim(self) -> None:
        """Down to the cap: least recently used payloads first, then the vectors of the least recently
        searched scopes (those scopes are then searched in LanceDB)."""
        while self.mirror_bytes() > self.mirror_max_bytes and self._payload:
            _, p = self._payload.popitem(last=False)
            self._payload_bytes -= p["_bytes"]
        while self.mirror_bytes() > self.mirror_max_bytes and self._scope_use:
            sid, _ = self._scope_use.popitem(last=False)
            self._vec_count -= len(self._scope_vecs.pop(sid, ()))
            self._cold.add(sid)

    def _keep_payload(self, key: str, row: dict[str, Any]) -> None:
        old = self._payload.pop(key, None)
        if old is not None:
            self._payload_bytes -= old["_bytes"]
        tokens = row.get("tokens")
        size = 200 + len(row.get("prompt") or "") + len(row.get("response") or "") + len(tokens or b"")
        self._payload[key] = {"prompt": row.get("prompt") or "", "response": row.get("response") or "",
                              "tokens": tokens, "created_at": row["created_at"], "_bytes": size}
        self._payload_bytes += size

    def _payloads(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        """Prompt, response and tokens of live ``keys``: from the mirror, else from the table (I/O)."""
        out: dict[str, dict[str, Any]] = {}
        missing = []
        for k in keys:
            p = self._payload.get(k)
            if p is not None:
                self._payload.move_to_end(k)
                out[k] = p
            elif k in self.rows:
                missing.append(k)
        for i in range(0, len(missing), 500):
            chunk = missing[i:i + 500]
            if any(not _HEX.match(k) for k in chunk):
                raise ValueError("cache keys must be hex digests")
            found = (self.table.search().where("key IN (" + ",".join(f"'{k}'" for k in chunk) + ")")
                     .select(["key", "created_at", *_PAYLOAD_COLS]).limit(None).to_list())
            for row in found:
                live = self.rows.get(row["key"])
                if live is None or live["created_at"] != row["created_at"]:
                    continue  # an older version of a replaced row, or evicted since
                self._keep_payload(row["key"], row)
                out[row["key"]] = self._payload[row["key"]]
        if missing:
            self._trim()
        return out

    def has_payload(self, key: str) -> bool:
        return key in self._payload

    def _dec_scope(self, scope_id: str, key: str) -> None:
        n = self.scope_counts.get(scope_id, 0) - 1
        if n <= 0:
            self.scope_counts.pop(scope_id, None)
            self._cold.discard(scope_id)
            self._scope_use.pop(scope_id, None)
        else:
            self.scope_counts[scope_id] = n
        vecs = self._scope_vecs.get(scope_id)
        if vecs is not None:
            if vecs.pop(key):
                self._vec_count -= 1
            if not len(vecs):
                self._scope_vecs.pop(scope_id, None)

    # -- reads -------------------------------------------------------------------------------------------------
    def live(self, key: str, now: float) -> dict[str, Any] | None:
        """The index row of a live entry (no payload, no I/O)."""
        row = self.rows.get(key)
        if row is None or row["expires_at"] <= now:
            return None
        return row

    def row(self, key: str, *, tokens: bool = False) -> dict[str, Any] | None:
        """The whole row of ``key`` whatever its expiry (payload read back from the table if the mirror let it
        go); tokens only when asked for."""
        if key not in self.rows:
            return None
        p = self._payloads([key]).get(key)
        if p is None:
            return None
        out = {**self.rows[key], "prompt": p["prompt"], "response": p["response"]}
        if tokens:
            out["tokens"] = p["tokens"]
        return out

    def lookup_exact(self, key: str, now: float) -> dict[str, Any] | None:
        return self.row(key) if self.live(key, now) is not None else None

    def vector(self, key: str) -> np.ndarray | None:
        """The entry's unit vector: from a warm scope, else from the table (I/O)."""
        row = self.rows.get(key)
        if row is None:
            return None
        vecs = self._scope_vecs.get(row["scope_id"])
        held = vecs.get(key) if vecs is not None else None
        if held is not None:
            return held
        found = (self.table.search().where(f"key = '{key}'").select(["created_at", "vector"]).limit(None)
                 .to_list()) if _HEX.match(key) else []
        for r in found:
            if r["created_at"] == row["created_at"]:
                v = np.asarray(r["vector"], dtype=np.float32)
                return v / (np.linalg.norm(v) or 1.0)
        return None

    def search_quick(self, vector: Any, scope_id: str, k: int, now: float, min_similarity: float = -1.0
                     ) -> list[dict[str, Any]] | None:
        """``search`` where it is a small matmul and nothing to read: the scope's vectors are in memory, at most
        ``_QUICK_SEARCH_MAX`` of them, and every found row's payload is held. None where it is not: then
        ``search`` (which may read the table) answers."""
        if self.scope_counts.get(scope_id, 0) == 0:
            return []
        if scope_id not in self._scope_vecs or self.scope_counts[scope_id] > self.flat_scope_max:
            return None
        if len(self._scope_vecs[scope_id]) > _QUICK_SEARCH_MAX:
            return None
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(q))
        if norm == 0 or q.shape[0] != DIM:
            return []
        found = self._search_memory(q / norm, scope_id, k, now, min_similarity)
        if any(r["key"] not in self._payload for r in found):
            return None
        self._scope_use.move_to_end(scope_id)
        payloads = self._payloads([r["key"] for r in found])
        return [{**r, **{c: payloads[r["key"]][c] for c in _PAYLOAD_COLS}} for r in found]

    def search(self, vector: Any, scope_id: str, k: int, now: float, min_similarity: float = -1.0
               ) -> list[dict[str, Any]]:
        """Up to ``k`` live rows of ``scope_id`` most similar to ``vector`` with similarity >=
        ``min_similarity``, best first, each with its prompt, response, tokens and ``similarity``."""
        if not _HEX.match(scope_id or ""):
            raise ValueError("scope_id must be a hex digest")  # it is spliced into a filter expression
        if self.scope_counts.get(scope_id, 0) == 0:
            return []
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(q))
        if norm == 0 or q.shape[0] != DIM:
            return []
        q = q / norm
        if scope_id in self._scope_vecs and self.scope_counts.get(scope_id, 0) <= self.flat_scope_max:
            self._scope_use.move_to_end(scope_id)
            found = self._search_memory(q, scope_id, k, now, min_similarity)
            payloads = self._payloads([r["key"] for r in found])
            return [{**r, **{c: payloads[r["key"]][c] for c in _PAYLOAD_COLS}} for r in found
                    if r["key"] in payloads]
        query = (self.table.search(q).distance_type("cosine")
                 .where(f"scope_id = '{scope_id}' AND expires_at > {float(now)!r}", prefilter=True)
                 .select(_TABLE_COLS + ["vector", "_distance"]).limit(k))
        if self.vector_indexed and self.scope_counts.get(scope_id, 0) > self.flat_scope_max:
            query = query.nprobes(32).refine_factor(4)
        else:
            query = query.bypass_vector_index()
        out = []
        for row in query.to_list():
            if row["scope_id"] != scope_id or row["expires_at"] <= now:
                continue  # the filter is the guarantee; this is the belt to its braces
            vec = np.asarray(row.pop("vector"), dtype=np.float32)
            row.pop("_distance", None)
            # exact cosine from the stored vector, whatever approximation the index used to find it
            row["similarity"] = float(np.dot(q, vec) / (np.linalg.norm(vec) or 1.0))
            live = self.rows.get(row["key"])
            if live is None or live["created_at"] != row["created_at"] or row["similarity"] < min_similarity:
                continue  # evicted or replaced since the table version we read, or not similar enough
            self._keep_payload(row["key"], row)
            out.append({**row, **live})  # the mirror's hits and threshold are newer than the table's
        self._trim()
        out.sort(key=lambda r: -r["similarity"])
        return out

    def _search_memory(self, q: np.ndarray, scope_id: str, k: int, now: float, min_similarity: float
                       ) -> list[dict[str, Any]]:
        out = []
        for key, sim in self._scope_vecs[scope_id].ranked(q, min_similarity):
            row = self.rows.get(key)
            if row is None or row["scope_id"] != scope_id or row["expires_at"] <= now:
                continue
            out.append({**row, "similarity": sim})
            if len(out) >= k:
                break
        return out

    # -- writes ------------------------------------------------------------------------------------------------
    def write(self, entries: list[dict[str, Any]]) -> None:
        """Rows to disk; replaces rows with the same key. Call apply() after it returns."""
        if not entries:
            return
        latest: dict[str, dict[str, Any]] = {}
        for e in entries:
            latest[e["key"]] = e
        rows = list(latest.values())
        replaced = [k for k in latest if k in self.rows]
        if replaced:
            self._delete_keys(replaced)
        vectors = np.asarray([r["vector"] for r in rows], dtype=np.float32).reshape(len(rows), DIM)
        arrays = {name: pa.array([r.get(name) for r in rows], type=SCHEMA.field(name).type) for name in _TABLE_COLS}
        arrays["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), DIM)
        self.table.add(pa.table({f.name: arrays[f.name] for f in SCHEMA}, schema=SCHEMA))

    def apply(self, entries: list[dict[str, Any]]) -> None:
        for e in entries:
            key, sid = e["key"], e["scope_id"]
            prev = self.rows.get(key)
            if prev is not None:
                self._dec_scope(prev["scope_id"], key)
            self.rows[key] = {name: e.get(name) for name in _INDEX_COLS}
            self.rows[key]["min_score"] = float(e.get("min_score") or 0.0)
            self.scope_counts[sid] = self.scope_counts.get(sid, 0) + 1
            if sid not in self._cold:
                vec = np.asarray(e["vector"], dtype=np.float32).reshape(-1)
                vecs = self._scope_vecs.get(sid)
                if vecs is None:
                    vecs = self._scope_vecs[sid] = ScopeVectors(DIM)
                vecs.put(key, vec / (np.linalg.norm(vec) or 1.0))
                self._vec_count += 1
                self._scope_use[sid] = None
            if "response" in e:
                self._keep_payload(key, e)  # a fresh answer: the likeliest to be asked for next
            else:
                old = self._payload.pop(key, None)
                if old is not None:
                    self._payload_bytes -= old["_bytes"]
        self._trim()

    def _delete_keys(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            if any(not _HEX.match(k) for k in chunk):
                raise ValueError("cache keys must be hex digests")
            self.table.delete("key IN (" + ",".join(f"'{k}'" for k in chunk) + ")")

    def forget(self, keys: list[str]) -> None:
        for k in keys:
            row = self.rows.pop(k, None)
            if row is not None:
                self._dec_scope(row["scope_id"], k)
            p = self._payload.pop(k, None)
            if p is not None:
                self._payload_bytes -= p["_bytes"]
            self.dirty_hits.discard(k)

    def expired_keys(self, now: float) -> list[str]:
        return [k for k, r in self.rows.items() if r["expires_at"] <= now]

    def over_cap_keys(self) -> list[str]:
        """Victims past max_entries: least hit first, oldest among equals; down to 90 % so eviction runs in
        batches rather than on every put."""
        excess = len(self.rows) - self.max_entries
        if excess <= 0:
            return []
        target = len(self.rows) - int(self.max_entries * 0.9)
        ranked = sorted(self.rows.values(), key=lambda r: (r["hits"], r["created_at"]))
        return [r["key"] for r in ranked[:target]]

    def delete(self, keys: list[str]) -> None:
        if keys:
            self._delete_keys(keys)

    def _update_by_value(self, column: str, values: dict[str, Any]) -> None:
        by_value: dict[Any, list[str]] = {}
        for k, v in values.items():
            by_value.setdefault(v, []).append(k)
        for v, keys in by_value.items():
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                self.table.update(where="key IN (" + ",".join(f"'{k}'" for k in chunk) + ")", values={column: v})

    def flush_hits(self) -> int:
        """Persist hit counts, one update per distinct count (counts cluster, so few updates)."""
        counts = {k: int(self.rows[k]["hits"]) for k in list(self.dirty_hits) if k in self.rows}
        self.dirty_hits.clear()
        self._update_by_value("hits", counts)
        return len(counts)

    def set_min_scores(self, scores: dict[str, float]) -> None:
        """Raise per-entry verifier thresholds (feedback), in the mirror and durably in the table."""
        live = {k: float(v) for k, v in scores.items() if k in self.rows}
        for k, v in live.items():
            self.rows[k]["min_score"] = v
        self._update_by_value("min_score", live)

    # -- upkeep ------------------------------------------------------------------------------------------------
    def maintain(self) -> dict[str, Any]:
        """Indexes past their row thresholds, compaction of the small fragments each put leaves, and
        cleanup of old table versions. Slow: run it off the event loop."""
        from lancedb.index import BTree

        did: dict[str, Any] = {}
        n = self.table.count_rows()
        if not self.scope_indexed and n >= self.scalar_index_min_rows:
            self.table.create_index("scope_id", config=BTree())
            self.scope_indexed = True
            did["scope_index"] = True
        if not self.key_indexed and n >= self.scalar_index_min_rows:
            # payloads the mirror let go are read back by key
            self.table.create_index("key", config=BTree())
            self.key_indexed = True
            did["key_index"] = True
        if not self.vector_indexed and n >= self.index_min_rows:
            t0 = time.perf_counter()
            self.build_vector_index(n)
            did["vector_index_s"] = round(time.perf_counter() - t0, 2)
        stats = self.table.stats()
        frags = (stats.get("fragment_stats") or {}).get("num_fragments", 0) if isinstance(stats, dict) else 0
        if frags > 16:
            # compacts fragments, folds new rows into existing indexes, drops versions older than a minute
            self.table.optimize(cleanup_older_than=timedelta(minutes=1))
            did["optimized_fragments"] = frags
        return did

    def build_vector_index(self, n: int | None = None) -> None:
        from lancedb.index import IvfPq

        n = n or self.table.count_rows()
        self.table.create_index("vector", config=IvfPq(distance_type="cosine",
                                                       num_partitions=max(1, int(math.sqrt(n))),
                                                       num_sub_vectors=48))
        self.vector_indexed = True

    def memory(self) -> dict[str, Any]:
        return {"mirror_bytes": self.mirror_bytes(), "mirror_max_bytes": self.mirror_max_bytes,
                "payloads_held": len(self._payload), "payload_bytes": self._payload_bytes,
                "vectors_held": self._vec_count, "cold_scopes": len(self._cold)}

    def disk_bytes(self) -> int | None:
        """Bytes on local disk; None for an object store (ask the store)."""
        if self.path is None:
            return None
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


def _same_caller_restarted(old: str, new: str) -> bool:
    """Owners are "caller|life|execution": the same caller in a new life means the old process is gone (Ray
    restarted the actor), so its claim can be taken over at once instead of lapsing."""
    a, b = old.split("|"), new.split("|")
    return len(a) == 3 and len(b) == 3 and a[0] == b[0] and a[1] != b[1]


@dataclass
class _Claim:
    """A single-flight leader's claim on a key: held by ``owner`` until ``expires`` (monotonic) unless the
    leader renews it, so waiters never wait on a leader whose caller died."""

    owner: str
    expires: float
    event: asyncio.Event = field(default_factory=asyncio.Event)


class CacheService:
    """The cache actor's logic (async; Ray-free, so it can be driven directly) around CacheStore. Writes are
    coalesced: puts that arrive while a write is on disk go out together in the next one, so insert
    throughput grows with load while each put still returns only once its row is durable."""

    def __init__(self, settings: Any, *, index_min_rows: int = 100_000, maintenance_interval_s: float = 30.0,
                 claim_lease_s: float = 15.0) -> None:
        self._settings = settings
        self._store = CacheStore(settings.cache_path, max_entries=settings.cache.max_entries,
                                 index_min_rows=index_min_rows, mirror_max_bytes=settings.cache.mirror_max_bytes,
                                 storage_options=settings.cache.storage_options)
        # request id -> what answered it (key, scope; for a semantic hit the query and its score), so a user's
        # "that answer was wrong" can evict the entry and tighten its neighbourhood; the newest few thousand
        self._served: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._verifier: Any = None  # built on first feedback: the actor never judges a lookup
        # a leader that stops renewing (its caller died) frees its key after this long
        self._claim_lease_s = claim_lease_s
        self._life = f"{os.getpid()}-{time.time_ns()}"
        self._claims: dict[str, _Claim] = {}
        self._waiting = 0
        # puts that arrive while a write is on disk go out together in the next one
        self._puts: GroupSubmitter[dict[str, Any], None] = GroupSubmitter(
            self._write_puts, max_batch=2_048, max_inflight=1, name="cache-puts")
        self._write_lock = asyncio.Lock()  # writes, deletes and compaction never overlap
        # per scope, the puts received and not yet searchable: a lookup in that scope waits for them (callers
        # send an answer's put without waiting, and a paraphrase asked right after that answer must find it)
        self._landing: dict[str, list[tuple[asyncio.Future, str, np.ndarray]]] = {}
        self._counters = {"hits_exact": 0, "hits_semantic": 0, "misses": 0, "bypasses": 0, "evictions": 0,
                          "saved_usd": 0.0, "puts": 0, "writes": 0, "feedback_wrong": 0, "feedback_ok": 0,
                          "tightened": 0}
        self._interval = maintenance_interval_s
        self._maint_task: asyncio.Task[None] | None = None
        self._last_maintenance: dict[str, Any] = {}
        # settings.cache.embed_in_actor: this actor embeds a lookup's prompt itself, so the search runs where
        # the vector is made (one round trip on a miss instead of two). The model loads in the background, and
        # until it has, or while _EMBED_HERE_MAX lookups already wait for it, callers use the embedding pool.
        # Lookups that arrive together share one model call, run off the loop
        self._embedder: Any = None
        self._embedding = 0   # lookups being embedded here now
        self._embed_counts = {"embedded_here": 0, "sent_to_pool": 0}
        self._embed_thread: ThreadPoolExecutor | None = None
        self._embed_group: GroupSubmitter[str, tuple[np.ndarray, np.ndarray | None]] = GroupSubmitter(
            self._encode_batch, max_batch=_EMBED_HERE_MAX, max_inflight=1, name="cache-embed")
        if settings.cache.embed_in_actor:
            self._embed_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-embed")
            self._embed_thread.submit(self._load_embedder)

    def _load_embedder(self) -> None:
        try:
            from runtime.embedding import Embedder  # torch: only in an actor told to embed

            s = self._settings
            self._embedder = Embedder(s.cache.embedding_model, max_batch=_EMBED_HERE_MAX, lru_size=0,
                                      device=s.embedding.device, threads=s.embedding.threads)
        except Exception:  # noqa: BLE001 - the pool embeds every lookup instead
            log.exception("cache actor could not load the embedding model; lookups use the embedding pool")

    async def _encode_batch(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        emb = self._embedder
        enc = await asyncio.get_running_loop().run_in_executor(self._embed_thread,
                                                               lambda: emb.encode(texts, tokens=True))
        return [(enc.vectors[i], enc.tokens[i] if enc.tokens else None) for i in range(len(texts))]

    def _ensure_maintenance(self) -> None:
        if self._maint_task is None and self._interval > 0:
            self._maint_task = asyncio.get_running_loop().create_task(self._maintenance_loop())

    async def _maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.maintain()
            except Exception:  # upkeep must never take the cache down; the next round retries
                log.exception("cache maintenance failed")

    # -- reads -----------------------------------------------------------------------------------------------
    async def lookup_exact(self, key: str, now: float | None = None) -> dict[str, Any] | None:
        self._ensure_maintenance()
        if self._store.live(key, _now(now)) is None:
            return None
        if self._store.has_payload(key):
            return self._store.row(key)
        return await asyncio.to_thread(self._store.row, key)  # the mirror let it go: read it back

    async def _landed(self, scope_id: str, vector: Any, min_similarity: float, key: str | None = None) -> None:
        """Wait for this scope's puts still landing that this lookup could find: the same key, or a vector at
        least ``min_similarity`` from ``vector`` (others do not hold it up: under load a scope always has some)."""
        pending = self._landing.get(scope_id)
        if not pending:
            return
        q = None
        if vector is not None:
            q = np.asarray(vector, dtype=np.float32).reshape(-1)
            q = q / (float(np.linalg.norm(q)) or 1.0)
        wait = [f for f, k, v in pending
                if k == key or (q is not None and q.shape == v.shape and float(np.dot(q, v)) >= min_similarity)]
        if wait:
            await asyncio.wait(wait, timeout=_LANDING_WAIT_S)

    async def search(self, vector: Any, scope_id: str, k: int = 5, now: float | None = None,
                     min_similarity: float = -1.0) -> list[dict[str, Any]]:
        """Candidates (prompt, response, tokens, similarity, min_score) of at least ``min_similarity``."""
        self._ensure_maintenance()
        await self._landed(scope_id, vector, min_similarity)
        return await asyncio.to_thread(self._store.search, vector, scope_id, k, _now(now), min_similarity)

    async def probe(self, key: str, vector: Any, scope_id: str, k: int = 5, now: float | None = None,
                    min_similarity: float = -1.0, owner: str = "", lease_s: float | None = None
                    ) -> dict[str, Any]:
        """The miss path's one round trip after the embedding: ``key``'s row if it is live now (a leader may
        have stored it since the caller's exact lookup), else the candidates (as ``search``) and whether the
        caller now leads ``key`` (as ``claim``). The claim is taken before the caller judges the candidates,
        so a miss needs no second trip; a caller that finds a hit gives it back."""
        self._ensure_maintenance()
        await self._landed(scope_id, vector if k > 0 else None, min_similarity, key)
        t = _now(now)
        row = await self.lookup_exact(key, t)
        if row is not None:
            return {"exact": row, "rows": [], "leader": False}
        leader = await self.claim(key, t, owner, lease_s)  # checks the key's row again, atomically with the claim
        rows = []
        if k > 0 and vector is not None:
            # on the loop where it is a small matmul (a thread hop costs more than the search), else off it
            rows = self._store.search_quick(vector, scope_id, k, t, min_similarity)
            if rows is None:
                rows = await asyncio.to_thread(self._store.search, vector, scope_id, k, t, min_similarity)
        return {"exact": None, "rows": rows, "leader": leader}

    async def lookup(self, key: str, text: str, scope_id: str, k: int = 5, now: float | None = None,
                     min_similarity: float = -1.0, owner: str = "", lease_s: float | None = None
                     ) -> dict[str, Any]:
        """A lookup in one round trip, where the actor embeds (``settings.cache.embed_in_actor``): ``key``'s row
        if live (nothing embedded); else ``text`` embedded here, then ``probe``: its candidates and the claim,
        with the ``vector`` and token embeddings (``tokens``) the caller judges and stores with. ``embedded``
        False: nothing was embedded or claimed (no model here yet, _EMBED_HERE_MAX lookups already waiting for
        it, or it failed), and the caller embeds through the pool and probes. ``k`` 0: only the exact key may
        match."""
        self._ensure_maintenance()
        t = _now(now)
        row = await self.lookup_exact(key, t)
        if row is not None:
            return {"exact": row, "rows": [], "leader": False, "embedded": False}
        embedded = await self._embed_here(text)
        if embedded is None:
            self._embed_counts["sent_to_pool"] += 1
            return {"exact": None, "rows": [], "leader": False, "embedded": False}
        self._embed_counts["embedded_here"] += 1
        vector, tokens = embedded
        got = await self.probe(key, vector if k > 0 else None, scope_id, k, t, min_similarity, owner, lease_s)
        return {**got, "embedded": True, "vector": vector, "tokens": tokens}

    async def lookup_packed(self, ask: tuple) -> dict[str, Any]:
        """``lookup(*ask)``: the miss path's call, its eight arguments sent as one (Ray serialises each argument
        on its own: ~0.1 ms more per call for eight than for one, measured on a no-op method)."""
        return await self.lookup(*ask)

    async def probe_packed(self, ask: tuple) -> dict[str, Any]:
        """``probe(*ask)``, likewise."""
        return await self.probe(*ask)

    async def embed(self, text: str) -> dict[str, Any] | None:
        """``text`` embedded as a lookup here embeds it (``vector`` and token embeddings ``tokens``), or None
        where this actor does not embed (not ``embed_in_actor``, model not loaded yet, busy). What the miss path
        pays for its embedding, measured on the model copy that serves it (benchmarks/overhead.py: another
        copy's floor would leave this one out of the CPU's cache)."""
        embedded = await self._embed_here(text)
        return None if embedded is None else {"vector": embedded[0], "tokens": embedded[1]}

    async def _embed_here(self, text: str) -> tuple[np.ndarray, np.ndarray | None] | None:
        if self._embedder is None or self._embedding >= _EMBED_HERE_MAX:
            # a deeper queue here would be throughput bought with the singletons' CPU: that is the pool's job
            return None
        self._embedding += 1
        try:
            return await self._embed_group.submit(str(text))
        except Exception as exc:  # noqa: BLE001 - the caller goes to the pool instead
            log.warning("cache actor embedding failed: %s", type(exc).__name__)
            return None
        finally:
            self._embedding -= 1

    # -- writes ----------------------------------------------------------------------------------------------
    async def put(self, entry: dict[str, Any]) -> None:
        self._ensure_maintenance()
        row = self._validate(entry)
        if entry.get("request_id"):
            self._remember(str(entry["request_id"]), {"key": row["key"], "scope_id": row["scope_id"],
                                                      "kind": "stored"})
        scope = row["scope_id"]
        landed = asyncio.get_running_loop().create_future()
        vec = row["vector"] / (float(np.linalg.norm(row["vector"])) or 1.0)
        entry_landing = (landed, row["key"], vec)
        self._landing.setdefault(scope, []).append(entry_landing)
        try:
            await self._puts.submit(row)
        finally:
            pending = [p for p in self._landing[scope] if p is not entry_landing]
            if pending:
                self._landing[scope] = pending
            else:
                del self._landing[scope]
            landed.set_result(None)

    async def put_many(self, entries: list[dict[str, Any]]) -> int:
        """Bulk load (benchmarks, warm-up): one write for the lot."""
        rows = [self._validate(e) for e in entries]
        async with self._write_lock:
            await asyncio.to_thread(self._store.write, rows)
            self._store.apply(rows)
        self._counters["puts"] += len(rows)
        self._counters["writes"] += 1
        await self._enforce_cap()
        return len(rows)

    @staticmethod
    def _validate(entry: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        row = {
            "key": str(entry["key"]), "scope_id": str(entry["scope_id"]),
            "tenant": str(entry.get("tenant") or ""), "model": str(entry.get("model") or ""),
            "kind": str(entry.get("kind") or "factual"), "prompt": str(entry.get("prompt") or ""),
            "response": entry["response"] if isinstance(entry["response"], str) else json.dumps(
                entry["response"], default=str),
            "cost_usd": float(entry.get("cost_usd") or 0.0),
            "created_at": float(entry.get("created_at") or now),
            "expires_at": float(entry["expires_at"]),
            "hits": int(entry.get("hits") or 0),
            "tokens": entry.get("tokens"), "min_score": float(entry.get("min_score") or 0.0),
        }
        if not _HEX.match(row["key"]) or not _HEX.match(row["scope_id"]):
            raise ValueError("key and scope_id must be hex digests (runtime.cache_policy)")
        if row["tokens"] is not None and (not isinstance(row["tokens"], bytes)
                                          or len(row["tokens"]) % (2 * DIM)):
            raise ValueError(f"tokens must be float16 bytes of an n x {DIM} matrix (cache_verifier.pack_tokens)")
        vec = np.asarray(entry["vector"], dtype=np.float32).reshape(-1)
        if vec.shape[0] != DIM:
            raise ValueError(f"vector must have {DIM} dimensions, got {vec.shape[0]}")
        row["vector"] = vec
        return row

    async def _write_puts(self, rows: list[dict[str, Any]]) -> list[None]:
        try:
            async with self._write_lock:
                await asyncio.to_thread(self._store.write, rows)
                self._store.apply(rows)
        finally:
            # stored or not, this key's waiters wake: they find the row, or go to the API themselves
            for r in rows:
                self._wake(r["key"])
        self._counters["puts"] += len(rows)
        self._counters["writes"] += 1
        try:
            await self._enforce_cap()
        except Exception:  # noqa: BLE001 - a failed eviction must not fail the puts that are stored
            log.exception("cache size-cap eviction failed")
        return [None] * len(rows)

    async def _enforce_cap(self) -> None:
        victims = self._store.over_cap_keys()
        if victims:
            await self._delete(victims)

    async def _delete(self, keys: list[str]) -> None:
        async with self._write_lock:
            self._store.forget(keys)  # forget first: a lookup racing the delete must not serve the row
            await asyncio.to_thread(self._store.delete, keys)
        self._counters["evictions"] += len(keys)

    async def evict_expired(self, now: float | None = None) -> int:
        keys = self._store.expired_keys(_now(now))
        if keys:
            await self._delete(keys)
        return len(keys)

    # -- single flight ---------------------------------------------------------------------------------------
    async def claim(self, key: str, now: float | None = None, owner: str = "", lease_s: float | None = None
                    ) -> bool:
        """True: the caller leads (calls the API for this key). False: someone else already does, or already
        did: a leader may have stored its answer between this caller's exact lookup and its claim."""
        if self._store.live(key, _now(now)) is not None:
            return False
        c = self._claims.get(key)
        mono = time.monotonic()
        if c is not None and c.expires > mono and c.owner != owner and not _same_caller_restarted(c.owner, owner):
            return False
        if c is not None and c.owner != owner:
            c.event.set()  # a lapsed leader's waiters stop waiting for it
        self._claims[key] = _Claim(owner, mono + (lease_s or self._claim_lease_s))
        return True

    async def renew(self, key: str, owner: str = "", lease_s: float | None = None) -> bool:
        """The leader is still working: keep its claim. False if the claim lapsed or was taken over."""
        c = self._claims.get(key)
        if c is None or c.owner != owner:
            return False
        c.expires = time.monotonic() + (lease_s or self._claim_lease_s)
        return True

    async def wait(self, key: str, timeout_s: float = 60.0) -> dict[str, Any] | None:
        """The leader's stored row, or None if it failed, released, let its claim lapse, or did not finish
        within ``timeout_s`` (the waiter's own deadline)."""
        row = self._store.lookup_exact(key, time.time())
        if row is not None:
            return dict(row)
        c = self._claims.get(key)
        if c is None:
            return None
        give_up = time.monotonic() + max(0.0, timeout_s)
        self._waiting += 1
        try:
            while not c.event.is_set():
                mono = time.monotonic()
                left = min(give_up, c.expires) - mono
                if left <= 0:
                    return None  # the waiter's deadline, or a leader that stopped renewing (died)
                try:
                    await asyncio.wait_for(c.event.wait(), timeout=left)
                except asyncio.TimeoutError:
                    continue
        finally:
            self._waiting -= 1
        return await asyncio.to_thread(self._store.row, key)

    async def release(self, key: str, owner: str | None = None) -> None:
        c = self._claims.get(key)
        if c is not None and owner is not None and c.owner != owner:
            return  # not ours to release: a newer leader holds it
        self._wake(key)

    def _wake(self, key: str) -> None:
        c = self._claims.pop(key, None)
        if c is not None:
            c.event.set()

    # -- accounting ------------------------------------------------------------------------------------------
    async def record(self, kind: str, saved_usd: float = 0.0, key: str | None = None,
                     request_id: str | None = None, query: dict[str, Any] | None = None, n: int = 1) -> None:
        """Count an outcome (``n`` of them: callers send bypasses in batches). For a hit, ``request_id``
        remembers which entry answered that request, and a semantic hit's ``query`` (prompt, vector, tokens,
        score) what it was asked, for ``feedback``."""
        counter = {"exact": "hits_exact", "semantic": "hits_semantic", "miss": "misses",
                   "bypass": "bypasses"}.get(kind)
        if counter is None:
            raise ValueError(f"unknown cache outcome {kind!r}")
        self._counters[counter] += max(1, int(n))
        self._counters["saved_usd"] += float(saved_usd)
        if key and kind in ("exact", "semantic"):
            row = self._store.rows.get(key)
            if row is not None:
                row["hits"] = int(row["hits"]) + 1
                self._store.dirty_hits.add(key)
                if request_id:
                    self._remember(request_id, {"key": key, "scope_id": row["scope_id"], "kind": kind,
                                                **(query or {})})

    def _remember(self, request_id: str, served: dict[str, Any]) -> None:
        self._served[request_id] = served
        self._served.move_to_end(request_id)
        while len(self._served) > self._settings.cache.feedback_window:
            self._served.popitem(last=False)

    async def feedback(self, request_id: str, wrong: bool = True, now: float | None = None) -> dict[str, Any]:
        """A user's verdict on the answer ``request_id`` got from (or stored into) the cache. Wrong: the entry
        is evicted, and each neighbour that the same question would reach (same scope, above the loose
        cosine) gets a per-entry threshold above the score that question gets against it, and above the
        wrong match's own score: a neighbourhood that produced a wrong answer at some score must beat it."""
        served = self._served.get(request_id)
        out: dict[str, Any] = {"request_id": request_id, "found": served is not None, "evicted": None,
                               "tightened": 0}
        if served is None:
            return out
        if not wrong:
            self._counters["feedback_ok"] += 1
            return out
        self._counters["feedback_wrong"] += 1
        self._served.pop(request_id, None)
        key, scope_id = served["key"], served["scope_id"]
        entry = await asyncio.to_thread(self._store.row, key, tokens=True)
        vector = self._store.vector(key)
        # what was asked: a semantic hit's query, else the entry's own prompt (an exact hit, or the answer
        # this request stored)
        prompt, tokens, q_vec = served.get("prompt"), served.get("tokens"), served.get("vector")
        if prompt is None and entry is not None:
            prompt, tokens, q_vec = entry["prompt"], entry.get("tokens"), vector
        if entry is not None:
            await self._delete([key])
            out["evicted"] = key
        if prompt and q_vec is not None:
            cs = self._settings.cache
            neighbours = await asyncio.to_thread(self._store.search, cache_verifier.unpack_vector(q_vec), scope_id,
                                                 50, _now(now), cs.verify_min_similarity)
            raised = cache_verifier.tightened(self._get_verifier(), prompt, cache_verifier.unpack_tokens(tokens),
                                              neighbours, floor=served.get("score"), margin=cs.feedback_margin)
            if raised:
                async with self._write_lock:
                    await asyncio.to_thread(self._store.set_min_scores, raised)
            out["tightened"] = len(raised)
            self._counters["tightened"] += len(raised)
        return out

    def _get_verifier(self) -> Any:
        if self._verifier is None:
            self._verifier = cache_verifier.for_settings(self._settings.cache)
        return self._verifier

    async def stats(self) -> dict[str, Any]:
        lookups = self._counters["hits_exact"] + self._counters["hits_semantic"] + self._counters["misses"]
        return {
            **self._counters,
            "entries": len(self._store.rows),
            "scopes": len(self._store.scope_counts),
            "hit_rate": ((self._counters["hits_exact"] + self._counters["hits_semantic"]) / lookups
                         if lookups else 0.0),
            "vector_indexed": self._store.vector_indexed,
            "memory": self._store.memory(),
            "feedback_window": len(self._served),
            "claims": len(self._claims),
            "waiting": self._waiting,
            "last_maintenance": self._last_maintenance,
            "location": redact_url(self._store.uri),
            "embedding": {"in_actor": self._embed_thread is not None, "loaded": self._embedder is not None,
                          **self._embed_counts},
        }

    async def maintain(self, now: float | None = None) -> dict[str, Any]:
        """One upkeep round (the background loop runs it every maintenance_interval_s)."""
        evicted = await self.evict_expired(now)
        async with self._write_lock:
            flushed = await asyncio.to_thread(self._store.flush_hits)
            did = await asyncio.to_thread(self._store.maintain)
        stale = [k for k, c in self._claims.items() if c.expires <= time.monotonic()]
        for k in stale:
            self._wake(k)
        self._last_maintenance = {"evicted": evicted, "hits_flushed": flushed, **did}
        return self._last_maintenance

    async def build_index(self) -> float:
        """Build the ANN index now, whatever the row count (benchmarks); returns seconds taken."""
        t0 = time.perf_counter()
        async with self._write_lock:
            await asyncio.to_thread(self._store.build_vector_index)
        return time.perf_counter() - t0

    async def disk_bytes(self) -> int:
        return await asyncio.to_thread(self._store.disk_bytes)

    async def ping(self) -> str:
        """This actor life's id: it changes when Ray restarts the actor."""
        return self._life


# the Ray actor: CPU-free so it fits beside work; thousands of concurrent calls because waiters park in wait()
CacheActor = ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=10_000)(CacheService)


def get_or_create_cache(settings: Any, *, scheduling_strategy: Any = None, namespace: str = NAMESPACE,
                        **kwargs: Any) -> Any:
    """The cluster's cache singleton; many racing creators get one actor."""
    return CacheActor.options(name=ACTOR_NAME, namespace=namespace, lifetime="detached",
                              get_if_exists=True, scheduling_strategy=scheduling_strategy
                              ).remote(settings, **kwargs)


# -- the caller side -------------------------------------------------------------------------------------------

@dataclass
class CacheOutcome:
    kind: str  # "exact" | "semantic" | "miss" | "bypass"
    message: dict[str, Any] | None
    saved_usd: float
    key: str
    scope_id: str
    vector: Any
    leader: bool
    reason: str | None
    prompt: str
    owner: str = ""  # the single-flight claim's owner, when leading
    tenant: str = ""
    max_tokens: int | None = None
    similarity: float | None = None
    score: float | None = None  # the verifier's, for a semantic hit
    tokens: Any = None  # the prompt's token embeddings, stored with its answer
    request_id: str | None = None
    model: str = ""  # the model the key and scope were built for

    @property
    def hit(self) -> bool:
        return self.kind in ("exact", "semantic")


_COUNTS_FLUSH_S = 1.0


class CacheClient:
    """The only cache surface a caller touches. ``embedder``: anything with ``async encode_async(texts,
    tokens=True)`` returning an ``Encoded`` (an in-process ``runtime.embedding.Embedder`` in tests and
    benchmarks); by default a client of the shared embedding pool."""

    def __init__(self, actor_handle: Any, settings: Any, embedder: Any = None, *, k: int = 5) -> None:
        self._actor = actor_handle
        self._settings = settings
        self._embedder = embedder
        self._k = k
        self.wait_timeout_s = settings.retry.request_timeout_s + settings.limiter.max_wait_s
        self.claim_lease_s = 15.0
        self._verifier: Any = None
        self._counts: dict[str, int] = {}   # bypasses and misses counted here, not yet sent (see _record)
        self._counts_flush: Any = None
        self._puts: set[asyncio.Future] = set()   # writes sent by store(wait=False), not yet done
        # store_later writes not sent yet: id -> (timer handle, what to store)
        self._unsent: dict[int, tuple[asyncio.TimerHandle, tuple[CacheOutcome, Any, str, float]]] = {}

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from actors.embedder import EmbeddingPoolClient

            self._embedder = EmbeddingPoolClient(self._settings)
        return self._embedder

    @property
    def verifier(self) -> cache_verifier.Verifier | None:
        """The semantic-hit judge (model file loaded once per caller); None when settings turn it off."""
        if self._verifier is None and self._settings.cache.verifier:
            self._verifier = cache_verifier.for_settings(self._settings.cache)
        return self._verifier

    async def _embed(self, text: str) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The text's vector and token embeddings, or None when embedding failed or missed its deadline (the
        pool client counts and logs why): no request fails because embedding failed."""
        try:
            enc = await self.embedder.encode_async([text], tokens=True)
        except Exception as exc:  # noqa: BLE001
            if not isinstance(exc, EmbeddingUnavailable):
                log.warning("embedding failed, semantic lookup bypassed: %s", type(exc).__name__)
            return None
        return enc.vectors[0], (enc.tokens[0] if enc.tokens else None)

    def _record(self, kind: str, saved: float = 0.0, key: str | None = None, request_id: str | None = None,
                query: dict[str, Any] | None = None) -> None:
        # fire and forget: statistics must not add a round trip to the hit path
        if kind in ("bypass", "miss") and not (saved or key or request_id or query):
            # a bypass or a miss is only a count, and even submitting a Ray call costs ~0.5 ms on this loop: a
            # request should not pay that for statistics, so these are sent once a second, summed
            self._counts[kind] = self._counts.get(kind, 0) + 1
            if self._counts_flush is None:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    self._send_counts()
                    return
                self._counts_flush = loop.call_later(_COUNTS_FLUSH_S, self._send_counts)
            return
        self._actor.record.remote(kind, saved, key, request_id, query)

    def _send_counts(self) -> list[Any]:
        if self._counts_flush is not None:
            self._counts_flush.cancel()
            self._counts_flush = None
        counts, self._counts = self._counts, {}
        return [self._actor.record.remote(kind, 0.0, None, None, None, n) for kind, n in counts.items() if n]

    async def flush_counts(self) -> None:
        """Send the counts kept here now, and return once the cache actor has them."""
        for ref in self._send_counts():
            await ref

    async def lookup(self, params: dict, model: str, tenant: str | None, cache_enabled: bool = True,
                     now: float | None = None, *, owner: str | None = None, wait_s: float | None = None,
                     request_id: str | None = None) -> CacheOutcome:
        """``owner`` names the single-flight claim if this lookup leads; ``wait_s`` caps how long it waits for
        another leader's answer (the request's own deadline); ``request_id`` lets ``Runtime.cache_feedback``
        find the entry that answered (or that this request's answer becomes)."""
        try:
            return await self._lookup(params, model, tenant, cache_enabled, now, owner or uuid.uuid4().hex,
                                      self.wait_timeout_s if wait_s is None else min(wait_s, self.wait_timeout_s),
                                      request_id)
        except Exception as exc:  # noqa: BLE001
            # the cache is an optimisation: while its actor restarts, requests go to the API uncached
            log.warning("cache unavailable, treating as a miss: %s", type(exc).__name__)
            return CacheOutcome("miss", None, 0.0, "", "", None, False, "cache unavailable",
                                policy.last_user_text(params), tenant=tenant or "",
                                max_tokens=params.get("max_tokens"))

    async def _lookup(self, params: dict, model: str, tenant: str | None, cache_enabled: bool,
                      now: float | None, owner: str, wait_s: float, request_id: str | None) -> CacheOutcome:
        cs = self._settings.cache
        if self._unsent:
            self._send_unsent()  # an answer given just before this lookup: its write goes first
        max_tokens = params.get("max_tokens")
        reason = policy.bypass_reason(params, cs, cache_enabled)
        if reason is not None:
            self._record("bypass")
            return CacheOutcome("bypass", None, 0.0, "", "", None, False, reason, "", tenant=tenant or "",
                                max_tokens=max_tokens)
        prompt = policy.last_user_text(params)
        key = policy.exact_key(params, model, tenant)
        scope_id = policy.scope_for(params, model, tenant).scope_id()
        base = dict(key=key, scope_id=scope_id, prompt=prompt, tenant=tenant or "", max_tokens=max_tokens,
                    model=model, request_id=request_id)

        judge = self.verifier
        # with the verifier, every candidate from the loose cosine up is judged; without it, the cosine decides
        floor = cs.verify_min_similarity if judge is not None else cs.similarity_threshold
        eligible = policy.semantic_eligible(prompt)
        # past the embedding window two different prompts embed alike: only the exact key may match
        rejected = None if eligible else "too long for a semantic match"
        k = self._k if eligible else 0
        got: dict[str, Any] | None = None

        def meanwhile() -> None:
            # what judging needs of the prompt alone, done while the round trip is out rather than after it
            if eligible:
                policy.prepare_judging(prompt)
                if judge is not None:
                    cache_verifier.content_stems(prompt)

        if cs.embed_in_actor:
            # one trip: the exact key, else the prompt embedded where the rows are, its candidates and the claim
            ref = self._actor.lookup_packed.remote((key, prompt, scope_id, k, now, floor, owner,
                                                    self.claim_lease_s))
            meanwhile()
            got = await ref
            hit = self._as_hit(got["exact"], "exact", max_tokens, base)
            if hit is not None:
                return hit
            if not got["embedded"]:
                got = None  # its model is busy or absent: the pool embeds, and a probe follows
        if got is None:
            encoded = await self._embed_beside_exact(prompt, key, now, max_tokens, base,
                                                     exact_done=cs.embed_in_actor,
                                                     meanwhile=None if cs.embed_in_actor else meanwhile)
            if isinstance(encoded, CacheOutcome):
                return encoded  # an exact hit
            if encoded is None:  # the exact part ran; without a vector neither search nor a storable row
                self._record("bypass")
                return CacheOutcome("bypass", None, 0.0, "", "", None, False, "embedding unavailable", prompt,
                                    tenant=tenant or "", max_tokens=max_tokens, model=model)
            vector, q_tokens = encoded
            # one trip for the candidates and the single-flight claim: on a miss (most lookups that get this
            # far) the claim is already ours; on a hit it is handed back without waiting
            got = await self._actor.probe_packed.remote((key, vector if eligible else None, scope_id, k, now,
                                                         floor, owner, self.claim_lease_s))
        else:
            vector, q_tokens = got["vector"], got["tokens"]
        if got["exact"] is not None:  # a leader stored it since the exact lookup
            hit = self._as_hit(got["exact"], "exact", max_tokens, {**base, "vector": vector})
            if hit is not None:
                return hit
        rows, leader = got["rows"], got["leader"]
        for cand in rows:  # best first
            if cand["scope_id"] != scope_id:
                continue
            if cand["similarity"] < floor:
                rejected = rejected or f"best similarity {cand['similarity']:.3f} below threshold"
                break
            why = policy.guard(prompt, cand["prompt"])
            if why is not None:
                rejected = rejected or f"guard: {why} (similarity {cand['similarity']:.3f})"
                continue
            ok, score = cache_verifier.judge(judge, prompt, q_tokens, cand, cs.similarity_threshold)
            if not ok:
                rejected = rejected or f"verifier: {score:.3f} (similarity {cand['similarity']:.3f})"
                continue
            query = {"prompt": prompt, "vector": cache_verifier.pack_vector(vector),
                     "tokens": cache_verifier.pack_tokens(q_tokens), "score": score} if request_id else None
            hit = self._as_hit(cand, "semantic", max_tokens, {**base, "vector": vector}, score, query)
            if hit is not None:
                if leader:
                    self._actor.release.remote(key, owner)  # not awaited: the hit goes back now
                return hit
            rejected = rejected or "cached answer longer than max_tokens"

        if not leader and got["exact"] is None:
            waited = await self._actor.wait.remote(key, wait_s)
            hit = self._as_hit(waited, "exact", max_tokens, {**base, "vector": vector})
            if hit is not None:
                return hit
            # the leader failed, lapsed or its answer does not fit this request: go ourselves
            leader = await self._actor.claim.remote(key, now, owner, self.claim_lease_s)
        self._record("miss")
        return CacheOutcome("miss", None, 0.0, vector=vector, leader=leader, reason=rejected, owner=owner,
                            tokens=q_tokens, **base)

    async def _embed_beside_exact(self, prompt: str, key: str, now: float | None, max_tokens: Any,
                                  base: dict[str, Any], *, exact_done: bool, meanwhile: Any = None
                                  ) -> CacheOutcome | tuple[np.ndarray, np.ndarray | None] | None:
        """The prompt's vector and token embeddings from the pool (None: unavailable), with the exact lookup
        beside it unless ``exact_done``; an exact hit is returned instead (its embedding cancelled: never sent,
        if the pool client was still filling a batch). ``meanwhile()`` runs while the embedding is out."""
        embedding = asyncio.ensure_future(self._embed(prompt))
        if not exact_done:
            try:
                row = await self._actor.lookup_exact.remote(key, now)
                hit = self._as_hit(row, "exact", max_tokens, base)
            except BaseException:
                embedding.cancel()
                raise
            if hit is not None:
                embedding.cancel()
                return hit
        if meanwhile is not None:
            meanwhile()
        return await embedding

    def _as_hit(self, row: dict[str, Any] | None, kind: str, max_tokens: Any, base: dict[str, Any],
                score: float | None = None, query: dict[str, Any] | None = None) -> CacheOutcome | None:
        if row is None:
            return None
        message = json.loads(row["response"])
        if not policy.answer_fits(message, max_tokens):
            return None
        saved = float(row.get("cost_usd") or 0.0)
        self._record(kind, saved, row["key"], base.get("request_id"), query)
        fields = {"vector": None, **base}
        return CacheOutcome(kind, message, saved, leader=False, reason=None,
                            similarity=row.get("similarity"), score=score, **fields)

    async def store(self, outcome: CacheOutcome, message: dict, model_used: str, cost_usd: float,
                    now: float | None = None, *, wait: bool = True) -> bool:
        """Put a fresh answer in the cache (and hand it to this key's waiters). False when not stored.
        ``wait=False``: returns once the write is sent, not done, so the answer does not wait out the cache's
        write; a write that fails then releases the claim, and ``drain`` waits for them all."""
        if outcome.kind != "miss" or not outcome.key:
            return False
        vector, tokens = outcome.vector, outcome.tokens
        if vector is None and model_used == outcome.model and policy.is_storable(message):
            encoded = await self._embed(outcome.prompt)
            if encoded is None:
                await self.release(outcome, wait=wait)
                return False
            vector, tokens = encoded
        stored, ref = self._send_put(outcome, message, model_used, cost_usd, now, vector, tokens)
        if not stored:
            if wait and ref is not None:
                with contextlib.suppress(Exception):  # a restarted actor holds no claims to release
                    await ref
            return False
        if not wait:
            self._track(self._put_done(ref, outcome))
            return True
        try:
            await ref
        except Exception as exc:  # noqa: BLE001 - the answer is paid for and goes back to the user regardless
            log.warning("cache unavailable, answer not stored: %s", type(exc).__name__)
            await self.release(outcome)
            return False
        return True

    def _send_put(self, outcome: CacheOutcome, message: dict, model_used: str, cost_usd: float,
                  now: float | None, vector: Any, tokens: Any) -> tuple[bool, Any]:
        """Sends the answer's put: (True, its ref); or, for an answer not to store, the claim's release:
        (False, its ref or None). Never suspends, so a caller knows the send happened when it returns."""
        if model_used != outcome.model or not policy.is_storable(message) or vector is None:
            # a fallback or budget downgrade answered (that answer must not sit under the routed model's key),
            # or an answer not to keep (truncated, a refusal): its waiters go to the API themselves
            return False, self._release_now(outcome)
        t = _now(now)
        kind = policy.classify(outcome.prompt)
        entry = {
            "key": outcome.key, "scope_id": outcome.scope_id, "tenant": outcome.tenant, "model": model_used,
            "kind": kind, "prompt": outcome.prompt, "vector": np.asarray(vector, dtype=np.float32),
            "response": json.dumps(message, default=str), "cost_usd": float(cost_usd), "created_at": t,
            "expires_at": t + policy.ttl_for(kind, self._settings.cache), "hits": 0,
            "tokens": cache_verifier.pack_tokens(tokens), "request_id": outcome.request_id,
        }
        try:
            return True, self._actor.put.remote(entry)
        except Exception as exc:  # noqa: BLE001 - the answer is paid for and goes back to the user regardless
            log.warning("cache unavailable, answer not stored: %s", type(exc).__name__)
            return False, self._release_now(outcome)

    def _track(self, work: Any) -> None:
        """Run ``work`` (a write's completion, or a whole store) as a task ``drain`` waits for."""
        task = asyncio.ensure_future(work)
        self._puts.add(task)
        task.add_done_callback(self._puts.discard)

    def store_later(self, outcome: CacheOutcome, message: Any, model_used: str, cost_usd: float) -> None:
        """``store(..., wait=False)`` a moment later (call inside the loop): the request path hands its answer
        back first, and the answer (a dict, or the SDK's Message: dumped then) is serialised and its write sent
        once the caller has it (~0.6 ms of work that would otherwise hold the GIL while the caller's thread
        waits for it). A lookup or ``drain`` of this client that comes first sends it first, so a paraphrase
        asked right after its answer still finds it landing."""
        pending = (outcome, message, model_used, cost_usd)
        handle = asyncio.get_running_loop().call_later(_STORE_LATER_S, self._store_pending, pending)
        self._unsent[id(pending)] = (handle, pending)

    def _store_pending(self, pending: tuple[CacheOutcome, Any, str, float]) -> None:
        self._unsent.pop(id(pending), None)
        outcome, message, model_used, cost_usd = pending
        try:
            if outcome.kind != "miss" or not outcome.key:
                return
            if not isinstance(message, dict):
                message = message.model_dump(mode="json")
            if outcome.vector is None:  # the prompt must be embedded first: the task tracks its own put
                self._track(self.store(outcome, message, model_used, cost_usd, wait=False))
                return
            stored, ref = self._send_put(outcome, message, model_used, cost_usd, None, outcome.vector,
                                         outcome.tokens)
            if stored:
                self._track(self._put_done(ref, outcome))
        except Exception as exc:  # noqa: BLE001 - the answer went back already; its waiters must not hang
            log.warning("cache store failed: %s", type(exc).__name__)
            self._release_now(outcome)

    def _send_unsent(self) -> None:
        """Send every ``store_later`` write still waiting for its moment, now."""
        for handle, pending in list(self._unsent.values()):
            handle.cancel()
            self._store_pending(pending)

    async def _put_done(self, ref: Any, outcome: CacheOutcome) -> None:
        try:
            await ref
        except Exception as exc:  # noqa: BLE001 - the answer went back already; its waiters must not hang
            log.warning("cache unavailable, answer not stored: %s", type(exc).__name__)
            await self.release(outcome)

    async def drain(self) -> None:
        """Every write sent so far is done (or failed and released), and every count kept here is sent."""
        self._send_unsent()
        while self._puts:
            await asyncio.gather(*list(self._puts), return_exceptions=True)
        await self.flush_counts()

    async def release(self, outcome: CacheOutcome, *, wait: bool = True) -> None:
        """The leader failed: wake this key's waiters so each tries for itself (``wait=False``: sent, not
        waited for)."""
        ref = self._release_now(outcome)
        if wait and ref is not None:
            try:
                await ref
            except Exception:  # noqa: BLE001
                pass  # a restarted actor holds no claims: nobody is waiting on this one any more

    def _release_now(self, outcome: CacheOutcome) -> Any:
        if outcome.kind == "miss" and outcome.key:
            try:
                return self._actor.release.remote(outcome.key, outcome.owner)
            except Exception:  # noqa: BLE001
                pass
        return None

    @contextlib.asynccontextmanager
    async def holding(self, outcome: CacheOutcome):
        """Keep a leader's claim alive while its request runs (admission waits and long answers included);
        if this process dies the renewals stop and the claim lapses within ``claim_lease_s``."""
        if not (outcome.kind == "miss" and outcome.leader and outcome.key):
            yield
            return

        async def renew() -> None:
            while True:
                await asyncio.sleep(self.claim_lease_s / 3)
                try:
                    await self._actor.renew.remote(outcome.key, outcome.owner, self.claim_lease_s)
                except Exception:  # noqa: BLE001 - a restarted cache holds no claims; nothing to keep
                    return

        task = asyncio.ensure_future(renew())
        try:
            yield
        finally:
            task.cancel()

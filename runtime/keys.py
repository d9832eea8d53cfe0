"""The front door's API keys: who may call it, as whom, with what budget and request rate.

A key is ``crk_<key id>_<secret>``: the id finds the entry in one dict lookup, the secret (32 random bytes,
base64url) proves it. Only a salted SHA-256 of the whole key is stored. A slow hash (scrypt, bcrypt) protects
low-entropy passwords against guessing from a stolen file; a 256-bit random secret cannot be guessed either way,
and a fast hash keeps authentication off the request's latency. The salt is per store, so equal keys in two
stores (or a precomputed table) do not match.

The store is one JSON file under ``data_dir`` (``frontdoor_keys.json``), written whole to a temporary file and
renamed over the old one (a reader never sees half a file), under an exclusive lock for the read-modify-write of
``create`` / ``revoke``. Readers (the front door's replicas) reload it when its modification time or size
changes, so a revocation takes effect on the next request without a restart.

Keys never reach logs, the ledger or the error texts: ``KeyEntry`` holds the hash, and the key itself is shown
once, by ``create``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from runtime.errors import ConfigurationError

KEYS_FILE = "frontdoor_keys.json"
PREFIX = "crk"
_KEY_RE = re.compile(r"crk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_NAME_RE = re.compile(r"[^\x00-\x1f\x7f]{1,256}")


@dataclass(frozen=True)
class KeyEntry:
    key_id: str
    user_id: str
    tenant: str | None
    budget_usd: float | None      # per UTC day; None: no budget of its own (the runtime's budgets still apply)
    rpm: int | None               # requests per minute; None: no cap of its own
    created_at: float
    key_hash: str
    revoked_at: float | None = None
    label: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def public(self) -> dict:
        """What ``keys list`` shows: everything but the hash."""
        d = asdict(self)
        d.pop("key_hash")
        return d


def _hash(salt: bytes, key: str) -> str:
    return hashlib.sha256(salt + key.encode()).hexdigest()


def key_id_of(key: str) -> str | None:
    """The id part of a well-formed key, or None (a malformed key is simply unknown)."""
    m = _KEY_RE.fullmatch(key) if isinstance(key, str) else None
    return m.group(1) if m else None


class KeyStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._salt = b""
        self._entries: dict[str, KeyEntry] = {}
        self._seen: tuple[int, int] | None = None

    @classmethod
    def in_dir(cls, data_dir: str | Path) -> "KeyStore":
        return cls(Path(data_dir) / KEYS_FILE)

    # -- reading ---------------------------------------------------------------------------------------------
    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def refresh(self) -> None:
        """Reload when the file changed since the last read (a stat per call: cheap beside a request)."""
        stamp = self._stamp()
        if stamp == self._seen:
            return
        self._load()
        self._seen = stamp

    def _load(self) -> None:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            self._salt, self._entries = b"", {}
            return
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"the key store {self.path} is unreadable ({type(exc).__name__})") from None
        self._salt = base64.b64decode(doc["salt"])
        self._entries = {e["key_id"]: KeyEntry(**e) for e in doc.get("keys", [])}

    def authenticate(self, key: str | None) -> KeyEntry | None:
        """The active entry this key belongs to, or None (unknown, malformed or revoked)."""
        if not key:
            return None
        kid = key_id_of(key)
        if kid is None:
            return None
        self.refresh()
        entry = self._entries.get(kid)
        if entry is None or not entry.active:
            return None
        if not hmac.compare_digest(entry.key_hash, _hash(self._salt, key)):
            return None
        return entry

    def list(self, include_revoked: bool = True) -> list[KeyEntry]:
        self.refresh()
        return [e for e in self._entries.values() if include_revoked or e.active]

    def get(self, key_id: str) -> KeyEntry | None:
        self.refresh()
        return self._entries.get(key_id)

    # -- writing ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                self._load()
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _save(self) -> None:
        doc = {"version": 1, "salt": base64.b64encode(self._salt).decode(),
               "keys": [asdict(e) for e in self._entries.values()]}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".keys-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(doc, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o600)  # hashes only, but nobody else needs to read them
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._seen = self._stamp()

    def create(self, user_id: str, tenant: str | None = None, *, budget_usd: float | None = None,
               rpm: int | None = None, label: str | None = None) -> tuple[str, KeyEntry]:
        """A new key for ``user_id`` (and ``tenant``); returns (the key, shown only now, and its entry)."""
        for name, value in (("user", user_id), ("tenant", tenant), ("label", label)):
            if value is not None and not (isinstance(value, str) and _NAME_RE.fullmatch(value)):
                raise ConfigurationError(f"{name} must be 1-256 printable characters", field=name)
        if not user_id:
            raise ConfigurationError("a key needs a user", field="user")
        if budget_usd is not None and not (budget_usd > 0):
            raise ConfigurationError("budget_usd must be > 0", field="budget_usd")
        if rpm is not None and not (isinstance(rpm, int) and rpm > 0):
            raise ConfigurationError("rpm must be a positive integer", field="rpm")
        with self._locked():
            if not self._salt:
                self._salt = secrets.token_bytes(16)
            kid = secrets.token_hex(6)
            while kid in self._entries:
                kid = secrets.token_hex(6)
            key = f"{PREFIX}_{kid}_{secrets.token_urlsafe(32)}"
            entry = KeyEntry(key_id=kid, user_id=user_id, tenant=tenant, budget_usd=budget_usd, rpm=rpm,
                             created_at=time.time(), key_hash=_hash(self._salt, key), label=label)
            self._entries[kid] = entry
            self._save()
        return key, entry

    def revoke(self, key_id: str) -> bool:
        """Revoke by key id (or by the key itself); False when there is no such active key."""
        kid = key_id_of(key_id) or key_id
        with self._locked():
            entry = self._entries.get(kid)
            if entry is None or not entry.active:
                return False
            self._entries[kid] = KeyEntry(**{**asdict(entry), "revoked_at": time.time()})
            self._save()
        return True

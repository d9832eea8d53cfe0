"""Cluster-wide admission: Anthropic's three buckets per model class, per-user caps, priority floors.

Pure logic with an injected clock; ``actors/limiter.py`` owns one instance for the whole cluster. A decision
never blocks: it is a ``Grant`` (capacity taken now; when it frees only within ``schedule_ahead_s``, the grant
carries a ``delay_s`` to wait before sending, so no capacity idles between a refusal and a retry) or a
``RetryAfter`` (how long until asking again is worthwhile) that the caller sleeps on without holding anything::

    clock = ManualClock()
    adm = Admission({"sonnet": ClassLimits(rpm=50, itpm=30_000, otpm=8_000)}, UserLimits(), LimiterSettings(),
                    clock=clock)
    g = adm.acquire(Estimate("r1", "sonnet", "u1", "normal", input_tokens=1_000, max_output_tokens=500))
    ...call the API...
    adm.reconcile(Outcome(g.lease_id, usage, 200, headers, time.time()))   # give back what was not used

The buckets mirror the server's: capacity C refills at C per minute, continuously. Our capacity is the
configured limit less a safety margin, because grants reach the API slightly out of step with our clock.
OTPM is charged from ``max_output_tokens`` at grant (as the server does) and the unused part is returned on
reconcile; ITPM is charged from the estimate and corrected to the actual count.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterable

from runtime.buckets import Clock, TokenBucket
from runtime.settings import ClassLimits, LimiterSettings, UserLimits, user_caps
from runtime.usage import Usage

INF = float("inf")
BUCKETS: tuple[str, ...] = ("rpm", "itpm", "otpm")
# response header stem -> our bucket name
_HEADER_BUCKET = {"requests": "rpm", "input-tokens": "itpm", "output-tokens": "otpm"}
# outcomes the server answered without processing: it charged no tokens (the request slot was still spent)
REFUND_STATUSES = frozenset({429, 529, 500})
# Outcome.status for a grant whose request was never sent (the caller changed model, was refused a budget,
# gave up while waiting, or could not connect): everything comes back, the request slot included
NOT_SENT = -1
# Outcome.status 0: the request went out and no answer came back (a timeout after the send, a dropped
# connection). The server may be processing it: nothing is refunded.
SENT_NO_ANSWER = 0
_PERIOD = 60.0
COUNT_TOKENS_CLASS = "count_tokens"
# buckets are per (limit group, model class): an upstream's workspace or platform has limits of its own
DEFAULT_GROUP = "default"


def class_key(group: str, model_class: str) -> str:
    """The name of a (group, class) bucket set: the bare class for the default group."""
    return model_class if group == DEFAULT_GROUP else f"{group}/{model_class}"


@dataclass(frozen=True)
class Estimate:
    request_id: str
    model_class: str
    user_id: str | None
    priority: str  # "critical" | "normal" | "bulk"
    input_tokens: int
    max_output_tokens: int
    # the limit groups that could carry the request (its model's upstreams); the limiter grants on the one
    # with the most headroom. Empty: the default group
    groups: tuple[str, ...] = ()
    tenant: str | None = None  # for per-tenant user caps


@dataclass(frozen=True)
class Grant:
    lease_id: str
    request_id: str
    model_class: str
    input_tokens: int
    max_output_tokens: int
    user_id: str | None
    # send no earlier than this many seconds from the decision: the capacity is already set aside for it
    delay_s: float = 0.0
    group: str = DEFAULT_GROUP  # the limit group whose buckets carry this grant


@dataclass(frozen=True)
class RetryAfter:
    request_id: str
    seconds: float  # inf: the request can never fit the configured limits
    reason: str     # the binding bucket, e.g. "sonnet:otpm", "user:u1:tpm", "sonnet:paused"


@dataclass(frozen=True)
class Outcome:
    lease_id: str
    usage: Usage | None  # None: never reached the API or refused before processing
    status: int          # HTTP status; 0 for a connection error
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased ratelimit-* and retry-after
    received_at: float = 0.0  # unix time the response arrived (0: unknown, treat as now)


@dataclass
class _Lease:
    model_class: str  # the (group, class) bucket set's key
    user_id: str | None
    input_tokens: int
    max_output_tokens: int
    granted_at: float
    # each bucket's take number for this grant: a refund is capped by how high the bucket got since
    seqs: dict[str, int] = field(default_factory=dict)


@dataclass
class _CapLease:
    key: str                   # the (group, class) bucket set
    amounts: dict[str, float]  # taken from each bucket
    seqs: dict[str, int]       # each bucket's take number (refunds are capped by peaks since)
    expires: float             # never returned by then (its caller died): dropped without a refund


@dataclass
class _Hold:
    """The first request refused on a bucket keeps later, smaller ones from taking the refill it waits for."""

    request_id: str
    amount: float
    rank: int
    expires: float


_RANK = {"critical": 0, "normal": 1, "bulk": 2}


class _ClassState:
    __slots__ = ("limits", "buckets", "paused_until", "holds")

    def __init__(self, limits: ClassLimits, margin: float, clock: Clock) -> None:
        self.limits = {"rpm": limits.rpm, "itpm": limits.itpm, "otpm": limits.otpm}
        self.buckets = {b: TokenBucket(v * (1.0 - margin), _PERIOD, clock, track=True)
                        for b, v in self.limits.items()}
        self.paused_until = -INF
        self.holds: dict[str, _Hold] = {}


class _UserState:
    __slots__ = ("rpm", "tpm", "last_used", "tenant")

    def __init__(self, limits: UserLimits, clock: Clock, margin: float = 0.0, tenant: str | None = None) -> None:
        self.tenant = tenant
        # user caps are our own policy, so nothing in flight needs absorbing, but a scheduled grant is taken at
        # its decision and sent up to one horizon later: the same margin that keeps class buckets under the
        # server's limit keeps sends under the cap
        self.rpm = TokenBucket(limits.rpm * (1 - margin), _PERIOD, clock, track=True) if limits.rpm else None
        self.tpm = TokenBucket(limits.tpm * (1 - margin), _PERIOD, clock, track=True) if limits.tpm else None
        self.last_used = clock()

    def idle_and_full(self) -> bool:
        return all(b is None or b.level >= b.capacity - 1e-9 for b in (self.rpm, self.tpm))


class Admission:
    """Admission decisions over per-class and per-user token buckets; see the module docstring."""

    def __init__(self, limits: dict[str, ClassLimits], user_limits: dict[str, UserLimits] | UserLimits,
                 limiter: LimiterSettings, clock: Clock = time.monotonic, *, wall_clock: Clock = time.time,
                 lease_timeout_s: float = 600.0, user_sweep_s: float = 60.0,
                 groups: dict[str, dict[str, ClassLimits]] | None = None,
                 group_weights: dict[str, float] | None = None) -> None:
        self._clock = clock
        # converts a response's unix received_at into "seconds ago" for header learning
        self._wall = wall_clock
        self._settings = limiter
        self._user_limits = _caps_table(user_limits)
        self._classes: dict[str, _ClassState] = {}
        self._weights: dict[str, float] = dict(group_weights or {})
        self._add_group(DEFAULT_GROUP, limits)
        for g, lims in (groups or {}).items():
            self._add_group(g, lims)
        self._users: dict[str, _UserState] = {}
        # insertion order is grant order, so expiry pops from the front
        self._leases: dict[str, _Lease] = {}
        self._cap_leases: dict[str, _CapLease] = {}
        self._lease_timeout = lease_timeout_s
        self._user_sweep_s = user_sweep_s
        self._next_user_sweep = clock() + user_sweep_s
        # a fresh prefix per instance: leases granted before an actor restart are unknown afterwards
        self._prefix = uuid.uuid4().hex[:10]
        self._seq = 0
        self.stats = {"granted": 0, "refused": 0, "impossible": 0, "reconciled": 0, "expired": 0,
                      "ignored_outcomes": 0, "limits_learned": 0, "clamps": 0, "pauses": 0}

    # -- admission ----------------------------------------------------------------------------------------
    def _floor_frac(self, priority: str) -> float | None:
        if priority == "critical":
            return 0.0
        if priority == "normal":
            return self._settings.critical_reserve
        if priority == "bulk":
            return self._settings.critical_reserve + self._settings.bulk_headroom
        return None

    def _add_group(self, group: str, limits: dict[str, ClassLimits]) -> None:
        margin = self._settings.safety_margin
        for c, lim in limits.items():
            self._classes[class_key(group, c)] = _ClassState(lim, margin, self._clock)
        # messages.count_tokens has a request limit of its own, admitted like a model class
        key = class_key(group, COUNT_TOKENS_CLASS)
        if key not in self._classes:
            self._classes[key] = _ClassState(
                ClassLimits(rpm=self._settings.count_tokens_rpm, itpm=10**12, otpm=10**12), margin, self._clock)

    def _user(self, user_id: str, tenant: str | None) -> _UserState | None:
        u = self._users.get(user_id)
        if u is None:
            caps = user_caps(self._user_limits, user_id, tenant)
            if caps is None or not (caps.rpm or caps.tpm):
                return None  # nothing configured for this user: no buckets to keep
            u = self._users[user_id] = _UserState(caps, self._clock, self._settings.safety_margin, tenant)
        return u

    def acquire(self, e: Estimate) -> Grant | RetryAfter:
        now = self._clock()
        self._housekeep(now)
        frac = self._floor_frac(e.priority)
        if frac is None:
            return self._impossible(e, f"unknown priority {e.priority!r}")
        if e.input_tokens < 0 or e.max_output_tokens < 0:
            return self._impossible(e, "negative token estimate")
        rank = _RANK[e.priority]
        horizon = min(self._settings.schedule_ahead_s, self._settings.safety_margin * _PERIOD)
        # each candidate group's plan; the grant goes to the soonest, then to the one with the most headroom
        best = None
        impossible = None
        for group in (e.groups or (DEFAULT_GROUP,)):
            key = class_key(group, e.model_class)
            cls = self._classes.get(key)
            if cls is None:
                impossible = impossible or f"unknown model class {key!r}"
                continue
            plan = self._plan(e, key, cls, frac, rank, now)
            if isinstance(plan, str):
                impossible = impossible or plan
                continue
            needs, wait, reason, headroom = plan
            score = (max(wait, 0.0) if wait <= horizon else wait, -headroom * self._weights.get(group, 1.0))
            if best is None or score < best[0]:
                best = (score, group, key, cls, needs, wait, reason)
        if best is None:
            return self._impossible(e, impossible or "no limit group")
        _, group, key, cls, needs, wait, reason = best
        if wait > horizon or (wait > 0.0 and cls.paused_until > now):
            self.stats["refused"] += 1
            if not math.isinf(wait):
                self._hold(cls, e, rank, needs, now + wait + max(1.0, 0.25 * wait))
            # come back when the wait has shrunk to the scheduling horizon; the grant then carries the rest
            return RetryAfter(e.request_id, max(0.001, wait - horizon) if horizon > 0 else wait, reason)
        # wait <= horizon: take the capacity now and tell the caller when to send (the bucket runs into a debt
        # that the refill repays by then). Callers then never sleep past the moment capacity frees, so the
        # pipeline stays full without a retry round trip per request.
        seqs: dict[str, int] = {}
        for label, b, amount, _ in needs:
            # a bucket that is not the binding one would refill past its capacity before the send: the server
            # loses that refill to its cap, so it must not be counted on here either. Taking it now as well
            # leaves the bucket exactly where taking ``amount`` at the send time would.
            lost = max(0.0, b.level + b.rate * wait - b.capacity) if wait > 0.0 else 0.0
            name = label.rsplit(":", 1)[1]
            seqs[f"user_{name}" if label.startswith("user:") else name] = b.take(amount + lost)
        for name in [n for n, h in cls.holds.items() if h.request_id == e.request_id]:
            del cls.holds[name]
        self._seq += 1
        lease_id = f"{self._prefix}-{self._seq}"
        self._leases[lease_id] = _Lease(key, e.user_id, e.input_tokens, e.max_output_tokens, now, seqs)
        self.stats["granted"] += 1
        return Grant(lease_id, e.request_id, e.model_class, e.input_tokens, e.max_output_tokens, e.user_id,
                     delay_s=wait, group=group)

    def _plan(self, e: Estimate, key: str, cls: _ClassState, frac: float, rank: int, now: float):
        """What granting ``e`` on one bucket set needs: (needs, wait, binding reason, headroom) or, when it can
        never fit, the reason as a string."""
        needs: list[tuple[str, TokenBucket, float, float]] = []
        headroom = 1.0
        for name, amount in (("rpm", 1.0), ("itpm", float(e.input_tokens)), ("otpm", float(e.max_output_tokens))):
            b = cls.buckets[name]
            if amount > b.capacity + 1e-9:
                return f"{key}:{name} needs {amount:g} > capacity {b.capacity:g}"
            floor = frac * b.capacity
            hold = cls.holds.get(name)
            if hold is not None:
                if hold.expires <= now:
                    del cls.holds[name]
                elif hold.request_id != e.request_id and rank >= hold.rank:
                    floor += hold.amount
            # a request too big to fit above its floor waits for a full bucket rather than never running: it
            # may then dip into the reserve, once
            needs.append((f"{key}:{name}", b, amount, min(floor, b.capacity - amount)))
            headroom = min(headroom, (b.level - floor) / b.capacity)
        if e.user_id is not None:
            u = self._user(e.user_id, e.tenant)
            if u is not None:
                u.last_used = now
                for name, b, amount in (("rpm", u.rpm, 1.0),
                                        ("tpm", u.tpm, float(e.input_tokens + e.max_output_tokens))):
                    if b is None:
                        continue
                    if amount > b.capacity + 1e-9:
                        return f"user:{e.user_id}:{name} needs {amount:g} > cap {b.capacity:g}"
                    needs.append((f"user:{e.user_id}:{name}", b, amount, 0.0))
        wait, reason = 0.0, ""
        if cls.paused_until > now:
            wait, reason = cls.paused_until - now, f"{key}:paused"
        for label, b, amount, floor in needs:
            w = b.wait_time(amount, floor)
            if w > wait:
                wait, reason = w, label
        return needs, wait, reason, headroom

    @staticmethod
    def _hold(cls: _ClassState, e: Estimate, rank: int, needs: list, expires: float) -> None:
        # without a hold a large request starves behind a stream of small ones that each fit the refill;
        # the grace covers the caller's jittered sleep. One hold per bucket: the oldest waiter's.
        for label, b, amount, floor in needs[:3]:
            name = label.rsplit(":", 1)[1]
            h = cls.holds.get(name)
            if h is not None and h.request_id == e.request_id:
                h.expires = expires
            elif h is None and b.wait_time(amount, floor) > 0.0:
                cls.holds[name] = _Hold(e.request_id, amount, rank, expires)

    def _impossible(self, e: Estimate, reason: str) -> RetryAfter:
        self.stats["impossible"] += 1
        return RetryAfter(e.request_id, INF, reason)

    def acquire_many(self, estimates: Iterable[Estimate]) -> list[Grant | RetryAfter]:
        # in order: a refused large request does not hold back smaller ones behind it (no head-of-line blocking)
        return [self.acquire(e) for e in estimates]

    # -- reconcile ----------------------------------------------------------------------------------------
    def reconcile(self, o: Outcome) -> None:
        lease = self._leases.pop(o.lease_id, None)
        if lease is None:
            # reconciled already, expired, or granted before a restart: applying it again would double-refund
            self.stats["ignored_outcomes"] += 1
            return
        self.stats["reconciled"] += 1
        cls = self._classes.get(lease.model_class)
        user = self._users.get(lease.user_id) if lease.user_id is not None else None
        if cls is not None:
            self._settle(cls, user, lease, o)
            if o.headers:
                self._learn(lease.model_class, cls, o)

    def reconcile_many(self, outcomes: Iterable[Outcome]) -> None:
        for o in outcomes:
            self.reconcile(o)

    # -- capacity leases (runtime/leases.py) ------------------------------------------------------------------
    def lease(self, req) -> "object | None":
        """A slice of one bucket set for a caller to admit requests on by itself, or None (near a limit, or
        paused, or the class unknown). Only capacity above every priority floor is leased, and at most
        ``lease_share`` of it, split among the leases already out; it is taken like a grant."""
        from runtime.leases import CapacityLease

        now = self._clock()
        self._housekeep(now)
        key = class_key(req.group, req.model_class)
        cls = self._classes.get(key)
        if cls is None or cls.paused_until > now or req.requests < 1 or cls.holds:
            return None  # a held bucket has a waiter the lease would starve
        floor = self._settings.critical_reserve + self._settings.bulk_headroom
        out_now = sum(1 for le in self._cap_leases.values() if le.key == key)
        frac = 1.0
        for name, want in (("rpm", req.requests), ("itpm", req.input_tokens), ("otpm", req.output_tokens)):
            b = cls.buckets[name]
            spare = (b.level - floor * b.capacity) * self._settings.lease_share / (out_now + 1)
            if spare <= 0:
                return None
            if want > 0:
                frac = min(frac, spare / want)
        n = int(req.requests * frac)
        if n < 1:
            return None
        amounts = {"rpm": float(n), "itpm": float(int(req.input_tokens * n / req.requests)),
                   "otpm": float(int(req.output_tokens * n / req.requests))}
        term = self._settings.lease_term_s
        seqs = {}
        for name, v in amounts.items():
            b = cls.buckets[name]
            # leased capacity may be sent at any time in the term; the server loses refill to its cap meanwhile,
            # so this bucket must not count that refill either (as for a scheduled grant): taking it now leaves
            # the bucket where sending everything at the end of the term would
            lost = max(0.0, b.level + b.rate * term - b.capacity)
            seqs[name] = b.take(v + lost)
        self._seq += 1
        lease_id = f"{self._prefix}-L{self._seq}"
        self._cap_leases[lease_id] = _CapLease(key, amounts, seqs, now + 2 * term + self._lease_timeout)
        self.stats["leases"] = self.stats.get("leases", 0) + 1
        return CapacityLease(lease_id, req.group, req.model_class, n, int(amounts["itpm"]), int(amounts["otpm"]),
                             term)

    def lease_many(self, reqs: Iterable) -> list:
        return [self.lease(r) for r in reqs]

    def return_lease(self, ret) -> None:
        """A lease handed back with what was really used: the rest is refunded (capped by the buckets' peaks
        since it was taken, as any refund), and the responses' headers are learned from."""
        le = self._cap_leases.pop(ret.lease_id, None)
        if le is None:
            self.stats["ignored_outcomes"] += 1
            return
        cls = self._classes.get(le.key)
        if cls is None:
            return
        for name, used in (("rpm", ret.requests_used), ("itpm", ret.input_used), ("otpm", ret.output_used)):
            self._adjust(cls.buckets[name], float(used) - le.amounts[name], le.seqs[name])
        self.stats["leases_returned"] = self.stats.get("leases_returned", 0) + 1
        if ret.headers:
            self._learn(le.key, cls, Outcome(ret.lease_id, None, 200, ret.headers, ret.received_at))

    def return_many(self, rets: Iterable) -> None:
        for r in rets:
            self.return_lease(r)

    def report(self, group: str, model_class: str, status: int, headers: dict[str, str], received_at: float) -> None:
        """A response seen under a lease that the limiter must hear at once (a 429: pause the class)."""
        key = class_key(group, model_class)
        cls = self._classes.get(key)
        if cls is not None and headers:
            self._learn(key, cls, Outcome("", None, status, headers, received_at))

    @staticmethod
    def _adjust(bucket: TokenBucket | None, delta: float, seq: int | None) -> None:
        """delta > 0: the request used more than reserved (a debt); delta < 0: give the excess back, as much
        of it as the bucket can have lost no refill over (see TokenBucket.give_back)."""
        if bucket is None or delta == 0:
            return
        if delta > 0:
            bucket.take(delta)
        elif seq is None:
            bucket.give(-delta)
        else:
            bucket.give_back(-delta, seq)

    def _settle(self, cls: _ClassState, user: _UserState | None, lease: _Lease, o: Outcome) -> None:
        if o.usage is not None:
            d_in = o.usage.itpm_tokens - lease.input_tokens
            d_out = o.usage.output_tokens - lease.max_output_tokens
        else:
            # input is refunded only where the server certainly did not process it; a request sent without an
            # answer back may still be generating, so it keeps its output tokens too
            d_out = 0 if o.status == SENT_NO_ANSWER else -lease.max_output_tokens
            d_in = -lease.input_tokens if o.status in REFUND_STATUSES or o.status == NOT_SENT else 0
            if o.status == NOT_SENT:
                self._adjust(cls.buckets["rpm"], -1.0, lease.seqs.get("rpm"))
                if user is not None:
                    self._adjust(user.rpm, -1.0, lease.seqs.get("user_rpm"))
        self._adjust(cls.buckets["itpm"], d_in, lease.seqs.get("itpm"))
        self._adjust(cls.buckets["otpm"], d_out, lease.seqs.get("otpm"))
        if user is not None:
            self._adjust(user.tpm, d_in + d_out, lease.seqs.get("user_tpm"))

    def _learn(self, model_class: str, cls: _ClassState, o: Outcome) -> None:
        h = o.headers
        margin = self._settings.safety_margin
        now = self._clock()
        age = max(0.0, self._wall() - o.received_at) if o.received_at > 0 else 0.0
        for stem, name in _HEADER_BUCKET.items():
            b = cls.buckets[name]
            limit = _num(h.get(f"anthropic-ratelimit-{stem}-limit"))
            # learn downward always (the key may be shared, or the tier lowered); upward only when allowed:
            # a configured limit below the server's is deliberate (another service uses the same key)
            if (limit is not None and limit > 0 and int(limit) != cls.limits[name]
                    and (int(limit) < cls.limits[name] or self._settings.learn_upward)):
                cls.limits[name] = int(limit)
                b.set_capacity(limit * (1.0 - margin))
                self.stats["limits_learned"] += 1
            remaining = _num(h.get(f"anthropic-ratelimit-{stem}-remaining"))
            if remaining is not None:
                server_limit = cls.limits[name]
                # the server's deficit, carried into our margin-reduced bucket and refilled since it was sent
                level = remaining - margin * server_limit + age * server_limit / _PERIOD
                if level < b.level - 1e-9:
                    b.clamp(level)
                    self.stats["clamps"] += 1
        if o.status == 429:
            ra = _num(h.get("retry-after"))
            if ra is not None and ra > age:
                until = now + ra - age
                if until > cls.paused_until:
                    cls.paused_until = until
                    self.stats["pauses"] += 1

    # -- housekeeping -------------------------------------------------------------------------------------
    def _housekeep(self, now: float) -> None:
        for lid in [lid for lid, le in self._cap_leases.items() if le.expires <= now]:
            del self._cap_leases[lid]  # its caller died: its capacity has long refilled
            self.stats["expired"] += 1
        cutoff = now - self._lease_timeout
        leases = self._leases
        while leases:
            first = next(iter(leases))
            if leases[first].granted_at > cutoff:
                break
            # refunding now would be pointless: the buckets refilled long ago; only the record leaks
            del leases[first]
            self.stats["expired"] += 1
        if now >= self._next_user_sweep:
            self._next_user_sweep = now + self._user_sweep_s
            idle_before = now - self._user_sweep_s
            users_with_leases = {le.user_id for le in leases.values()}
            for uid in [uid for uid, u in self._users.items()
                        if u.last_used < idle_before and uid not in users_with_leases and u.idle_and_full()]:
                del self._users[uid]

    def expire(self) -> None:
        """Run housekeeping now (lease expiry, idle user buckets); acquire does it as it goes."""
        now = self._clock()
        self._next_user_sweep = min(self._next_user_sweep, now)
        self._housekeep(now)

    # -- configuration and views --------------------------------------------------------------------------
    def set_limits(self, limits: dict[str, ClassLimits] | None = None,
                   user_limits: dict[str, UserLimits] | UserLimits | None = None,
                   limiter: LimiterSettings | None = None, groups: dict[str, dict[str, ClassLimits]] | None = None,
                   group_weights: dict[str, float] | None = None) -> None:
        """Change limits live; levels keep their absolute deficit, new classes and groups start full."""
        if limiter is not None:
            self._settings = limiter
            for st in self._classes.values():
                for name, b in st.buckets.items():
                    b.set_capacity(st.limits[name] * (1.0 - limiter.safety_margin))
        margin = self._settings.safety_margin
        if group_weights is not None:
            self._weights = dict(group_weights)
        for group, lims in [(DEFAULT_GROUP, limits or {}), *((groups or {}).items())]:
            for c, lim in lims.items():
                key = class_key(group, c)
                st = self._classes.get(key)
                if st is None:
                    self._classes[key] = _ClassState(lim, margin, self._clock)
                    continue
                for name, v in (("rpm", lim.rpm), ("itpm", lim.itpm), ("otpm", lim.otpm)):
                    st.limits[name] = v
                    st.buckets[name].set_capacity(v * (1.0 - margin))
            if group != DEFAULT_GROUP:
                self._add_group(group, {})
        if user_limits is not None:
            self._user_limits = _caps_table(user_limits)
            m = 1.0 - self._settings.safety_margin
            for uid, u in list(self._users.items()):
                caps = user_caps(self._user_limits, uid, u.tenant) or UserLimits()
                u.rpm = _recap(u.rpm, caps.rpm * m, self._clock)
                u.tpm = _recap(u.tpm, caps.tpm * m, self._clock)

    def snapshot(self) -> dict:
        now = self._clock()
        classes = {}
        for c, st in self._classes.items():
            d = {name: {"limit": st.limits[name], "capacity": b.capacity, "level": b.level}
                 for name, b in st.buckets.items()}
            d["paused_for_s"] = max(0.0, st.paused_until - now)
            classes[c] = d
        in_flight: dict[str, dict[str, int]] = {}
        for le in self._leases.values():
            f = in_flight.setdefault(le.model_class, {"leases": 0, "input_tokens": 0, "max_output_tokens": 0})
            f["leases"] += 1
            f["input_tokens"] += le.input_tokens
            f["max_output_tokens"] += le.max_output_tokens
        return {"classes": classes, "in_flight": in_flight, "leases": len(self._leases),
                "users": len(self._users), "stats": dict(self.stats)}

    def user_levels(self, user_id: str) -> dict[str, float] | None:
        u = self._users.get(user_id)
        if u is None:
            return None
        return {name: b.level for name, b in (("rpm", u.rpm), ("tpm", u.tpm)) if b is not None}


def _recap(b: TokenBucket | None, cap: float, clock: Clock) -> TokenBucket | None:
    if not cap:
        return None
    if b is None:
        return TokenBucket(cap, _PERIOD, clock, track=True)
    b.set_capacity(cap)
    return b


def _num(v: str | None) -> float | None:
    if v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None  # e.g. an HTTP-date retry-after: not worth a parser, the fallback backoff covers it
    return x if math.isfinite(x) else None


def _caps_table(user_limits: dict[str, UserLimits] | UserLimits | None) -> dict[str, UserLimits]:
    if user_limits is None:
        return {}
    if isinstance(user_limits, UserLimits):
        return {"*": user_limits}
    return dict(user_limits)

"""The caller-local ledger port (actors/local_ledger.py) against an in-memory ledger: no Ray."""

import asyncio

from actors.journal import Journal
from actors.local_ledger import LocalLedgerClient


class _Method:
    def __init__(self, fn):
        self._fn = fn

    def remote(self, *args):
        return self._fn(*args)


class FakeLedger:
    """The few ledger calls the budget lease makes, recorded."""

    def __init__(self) -> None:
        self.granted: list[str] = []
        self.returned: list[tuple[str, float]] = []
        self.applied: list[dict] = []
        self.budget_lease = _Method(self._lease)
        self.budget_lease_return = _Method(self._return)
        self.apply_journal = _Method(self._apply)

    async def _lease(self, owner, wanted):
        await asyncio.sleep(0)  # an actor call: the drain loop runs meanwhile
        lease_id = f"lease-{len(self.granted)}"
        self.granted.append(lease_id)
        return lease_id, 0.2

    async def _return(self, lease_id, keep):
        self.returned.append((lease_id, keep))

    async def _apply(self, batch):
        self.applied += batch
        return len(batch)


async def _until(cond, timeout_s: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not cond():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.005)
    return True


def test_a_lease_granted_after_the_drain_loop_stopped_is_still_handed_back(tmp_path):
    async def scenario():
        ledger = FakeLedger()
        client = LocalLedgerClient(ledger, Journal(tmp_path / "journal"), owner="caller-0|life", budgeted=True,
                                   drain_interval_s=0.01)
        # nothing journaled, so no drain loop runs; a request found no lease and asked for one
        client._want_lease()
        assert await _until(lambda: ledger.granted)
        # nobody uses the slice: it must go back by itself, or queued requests wait for it until their deadline
        assert await _until(lambda: ledger.returned), "the idle lease was never handed back"
        assert ledger.returned[0] == ("lease-0", 0.0)
        assert client._lease is None

    asyncio.run(scenario())

"""The caller's journal (actors/journal.py): what is written survives a reopen, one fdatasync covers every write
before it, a write-ahead entry is readable before its sync, and a disk that refuses fails the append."""

from __future__ import annotations

import asyncio
import os

import pytest

from actors.journal import Journal


def entry(i: int) -> dict:
    return {"k": "intent", "request_id": f"r{i}", "attempt": 1}


def test_appended_entries_are_pending_after_a_reopen_until_acknowledged(tmp_path):
    path = tmp_path / "caller.jsonl"

    async def go():
        j = Journal(path)
        await j.append([entry(0), entry(1)])
        await j.append([entry(2)])
        j.acknowledge(1)
        j.close()

    asyncio.run(go())
    again = Journal(path)
    assert [e["request_id"] for e in again.pending()] == ["r1", "r2"]


def test_a_write_ahead_entry_is_in_the_file_before_its_sync(tmp_path):
    # what a killed process leaves: the entry was handed to the kernel, so the next life reads it
    path = tmp_path / "caller.jsonl"
    j = Journal(path)
    n = j.write([entry(7)])
    assert n == 1
    assert [e["request_id"] for e in Journal(path).pending()] == ["r7"]


def test_concurrent_appends_share_syncs_and_all_wait_for_one(tmp_path, monkeypatch):
    path = tmp_path / "caller.jsonl"
    real = os.fdatasync
    calls = []

    def counting(fd):
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)

    async def go():
        j = Journal(path)
        await asyncio.gather(*(j.append([entry(i)]) for i in range(64)))
        return j

    j = asyncio.run(go())
    assert len(j.pending()) == 64
    assert 1 <= len(calls) < 64  # group commit: far fewer syncs than appends
    assert j._synced == j._written == 64


def test_the_record_s_sync_covers_the_intent_written_before_it(tmp_path, monkeypatch):
    path = tmp_path / "caller.jsonl"
    synced_sizes = []
    real = os.fdatasync

    def watching(fd):
        synced_sizes.append(os.fstat(fd).st_size)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", watching)

    async def go():
        j = Journal(path)
        j.write([entry(1)])                    # the intent: not waited for
        await j.append([{"k": "record", "row": {"request_id": "r1"}}])
        return j

    asyncio.run(go())
    assert synced_sizes and synced_sizes[-1] == path.stat().st_size  # the last sync saw both lines


def test_a_disk_that_refuses_the_sync_fails_the_append(tmp_path, monkeypatch):
    def refusing(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", refusing)

    async def go():
        j = Journal(tmp_path / "caller.jsonl")
        await j.append([entry(1)])

    with pytest.raises(OSError):
        asyncio.run(go())


def test_a_lone_append_syncs_inline_and_a_busy_one_shares_the_thread(tmp_path, monkeypatch):
    import threading

    path = tmp_path / "caller.jsonl"
    threads = []
    real = os.fdatasync

    def watching(fd):
        threads.append(threading.current_thread().name)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", watching)

    async def go():
        j = Journal(path)
        await j.append([entry(1)], alone=True)
        loop_thread = threading.current_thread().name
        await asyncio.gather(*(j.append([entry(i)]) for i in range(2, 6)))
        return j, loop_thread

    j, loop_thread = asyncio.run(go())
    assert threads[0] == loop_thread          # alone: synced right on the loop
    assert all(t != loop_thread for t in threads[1:])  # concurrent: in a worker thread, shared
    assert j._synced == j._written

"""The embedding pool's pure decisions (runtime/embedding_pool.py) and its settings."""

import os

import numpy as np
import pytest
from pydantic import ValidationError

from runtime.embedding_pool import ReplicaView, ScaleUp, free_index, pick, should_exit
from runtime.embedding_types import DIM, Encoded
from runtime.settings import EmbeddingSettings, Settings


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_pick_prefers_the_least_loaded_up_replica():
    reps = {0: ReplicaView(inflight=64), 1: ReplicaView(backlog=10), 2: ReplicaView(up=False)}
    assert pick(reps) == 1
    assert pick(reps, exclude={1}) == 0
    assert pick({0: ReplicaView(up=False)}) is None
    assert pick({}) is None
    assert pick({3: ReplicaView(), 1: ReplicaView()}) == 1  # ties: lowest index


def test_scale_up_needs_backlog_beyond_the_threshold_and_waits_out_the_cooldown():
    s = EmbeddingSettings(min_replicas=1, max_replicas=3, max_batch=10, scale_up_backlog=2.0,
                          scale_up_cooldown_s=5.0)
    clock = Clock()
    up = ScaleUp(s, clock)
    assert not up.want_more([20], replicas=1)  # exactly two batches waiting: enough
    assert up.want_more([21], replicas=1)
    assert not up.want_more([100], replicas=2)  # cooldown: the new one is still loading
    clock.t += 5.0
    assert up.want_more([100, 0], replicas=2)  # the mean counts: 50 per replica
    clock.t += 5.0
    assert not up.want_more([100, 100, 100], replicas=3)  # ceiling
    assert not up.want_more([], replicas=1)  # no up replica reported: nothing to go on
    assert not up.want_more([100], replicas=0)  # no pool at all: clients never create the floor


def test_only_replicas_above_the_floor_leave_when_idle():
    s = EmbeddingSettings(min_replicas=2, max_replicas=4, idle_exit_s=60)
    assert not should_exit(1, 1_000.0, s)
    assert not should_exit(2, 59.0, s)
    assert should_exit(2, 60.0, s)


def test_free_index_fills_gaps_below_the_ceiling():
    s = EmbeddingSettings(min_replicas=1, max_replicas=3)
    assert free_index({0, 2}, s) == 1
    assert free_index({0, 1, 2}, s) is None


def test_settings_floor_ceiling_device_threads():
    with pytest.raises(ValidationError):
        EmbeddingSettings(min_replicas=3, max_replicas=2)
    # a lone sentence is ~30 % faster on two torch threads than on one: two where the node has them
    assert EmbeddingSettings().device == "cpu" and EmbeddingSettings().threads == min(2, os.cpu_count() or 1)
    gpu = EmbeddingSettings(num_gpus=0.5, num_cpus=2.5)
    assert gpu.device == "cuda" and gpu.threads == 3
    assert EmbeddingSettings(torch_threads=4).threads == 4
    s = Settings(embedding={"max_replicas": 8, "deadline_s": 0.2})
    assert s.embedding.max_replicas == 8 and s.embedding.deadline_s == 0.2


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("CLAUDE_RUNTIME_EMBEDDING__NUM_GPUS", "1")
    monkeypatch.setenv("CLAUDE_RUNTIME_EMBEDDING__LINGER_S", "0.004")
    s = Settings()
    assert s.embedding.device == "cuda" and s.embedding.linger_s == 0.004


def test_encoded_is_frozen_and_sized():
    enc = Encoded(np.zeros((3, DIM), np.float32))
    assert len(enc) == 3 and enc.tokens is None
    with pytest.raises(AttributeError):
        enc.vectors = np.zeros((1, DIM))  # type: ignore[misc]

"""A scope's vector matrix kept row by row: whatever the puts and removals, a search ranks exactly the rows a
fresh stack of the current vectors would, in the same order."""

import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from runtime.scope_vectors import ScopeVectors

DIM = 8


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def reference(current: dict[str, np.ndarray], q: np.ndarray, floor: float) -> list[tuple[str, float]]:
    keys = list(current)  # a dict keeps first-put order, and an overwrite keeps its place
    if not keys:
        return []
    sims = np.stack([current[k] for k in keys]) @ q
    order = sorted((i for i in range(len(keys)) if sims[i] >= floor), key=lambda i: -sims[i])  # stable
    return [(keys[i], float(sims[i])) for i in order]


ops = st.lists(st.tuples(st.sampled_from(["put", "pop"]), st.integers(0, 30), st.integers(0, 5)), max_size=200)


@hsettings(max_examples=300, deadline=None)
@given(ops, st.integers(0, 1000), st.sampled_from([-1.0, -0.2, 0.0, 0.3]))
def test_ranked_matches_a_fresh_stack_after_any_puts_and_removals(seq, qseed, floor):
    sv = ScopeVectors(DIM, capacity=2)
    current: dict[str, np.ndarray] = {}
    for op, k, vseed in seq:
        key = f"k{k}"
        if op == "put":
            v = unit(vseed)  # few distinct vectors: ties are common
            sv.put(key, v)
            current[key] = v
        else:
            assert sv.pop(key) == (key in current)
            current.pop(key, None)
    assert len(sv) == len(current)
    q = unit(10_000 + qseed)
    got = list(sv.ranked(q, floor))
    want = reference(current, q, floor)
    assert [k for k, _ in got] == [k for k, _ in want]
    assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-5)
    for key, v in current.items():
        assert np.allclose(sv.get(key), v)


def test_a_removed_row_is_never_found_even_below_a_zero_floor():
    sv = ScopeVectors(DIM)
    sv.put("a", unit(1))
    sv.put("b", unit(2))
    sv.pop("a")
    assert [k for k, _ in sv.ranked(unit(3), -1.0)] == ["b"]
    assert "a" not in sv and sv.get("a") is None


def test_wrong_dimension_is_refused():
    with pytest.raises(ValueError):
        ScopeVectors(DIM).put("a", np.ones(DIM + 1))


def test_get_returns_a_copy_that_survives_the_rows_moving():
    sv = ScopeVectors(DIM, capacity=1)
    for i in range(10):
        sv.put(f"k{i}", unit(i))
    kept = sv.get("k9")
    for i in range(8):
        sv.pop(f"k{i}")  # closes the gaps: k9's row moves
    assert np.allclose(kept, unit(9)) and np.allclose(sv.get("k9"), unit(9))

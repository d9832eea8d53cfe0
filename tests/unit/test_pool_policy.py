"""The caller pool's sizing policy (runtime/pool.py): grow at once, shrink after a sustained lull, drain before
stopping, take draining callers back first, names stay dense."""

import pytest

from runtime.pool import CallerLoad, PoolPolicy, free_names, index_of


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def policy(clock, floor=1, ceiling=4, target=10, down=5.0, grace=2.0):
    return PoolPolicy(floor=floor, ceiling=ceiling, target_in_flight=target, scale_down_after_s=down,
                      drain_grace_s=grace, clock=clock)


def loads(*in_flight, draining=()):
    return [CallerLoad(f"caller-{i}", n, f"caller-{i}" in draining) for i, n in enumerate(in_flight)]


def test_grows_at_once_to_demand_within_the_ceiling():
    c = Clock()
    p = policy(c)
    d = p.decide(loads(25))
    assert (d.target, d.spawn, d.drain) == (3, 2, ())
    d = p.decide(loads(100, 0, 0))
    assert (d.target, d.spawn) == (4, 1)   # 10 wanted, ceiling 4


def test_never_below_the_floor():
    p = policy(Clock(), floor=2)
    d = p.decide(loads(0, 0))
    assert (d.target, d.spawn, d.drain) == (2, 0, ())
    assert p.decide(loads(0)).spawn == 1   # a lost caller is replaced up to the floor


def test_shrinks_only_after_a_sustained_lull_and_drains_the_highest_names():
    c = Clock()
    p = policy(c, down=5.0)
    assert p.decide(loads(3, 2, 0, 0)).drain == ()     # wants 1: the lull starts now
    c.t += 4.9
    assert p.decide(loads(3, 2, 0, 0)).drain == ()
    c.t += 0.2
    d = p.decide(loads(3, 2, 0, 0))
    assert d.drain == ("caller-1", "caller-2", "caller-3") and d.target == 1


def test_a_burst_inside_the_lull_restarts_the_wait():
    c = Clock()
    p = policy(c, down=5.0)
    p.decide(loads(1, 0, 0))
    c.t += 4.0
    p.decide(loads(30, 0, 0))            # demand is back: the lull is over
    c.t += 2.0
    assert p.decide(loads(1, 0, 0)).drain == ()  # a new lull, 0 s old


def test_a_drained_caller_stops_only_empty_and_after_the_grace():
    c = Clock()
    p = policy(c, down=0.0, grace=2.0)
    assert p.decide(loads(1, 0)).drain == ("caller-1",)
    # still holding a request: drains on, past the grace
    c.t += 5
    assert p.decide(loads(1, 2, draining={"caller-1"})).stop == ()
    # empty, but only now: the grace counts from when the drain began, which was 5 s ago
    assert p.decide(loads(1, 0, draining={"caller-1"})).stop == ("caller-1",)


def test_an_empty_drained_caller_waits_for_the_grace_period():
    c = Clock()
    p = policy(c, down=0.0, grace=2.0)
    p.decide(loads(0, 0))
    c.t += 1.0
    assert p.decide(loads(0, 0, draining={"caller-1"})).stop == ()   # handles may still route to it
    c.t += 1.5
    assert p.decide(loads(0, 0, draining={"caller-1"})).stop == ("caller-1",)


def test_an_unreachable_draining_caller_is_never_stopped_blind():
    c = Clock()
    p = policy(c, down=0.0, grace=0.1)
    p.decide(loads(0, 0))
    c.t += 10
    unreachable = [CallerLoad("caller-0", 0), CallerLoad("caller-1", 0, True, reachable=False)]
    assert p.decide(unreachable).stop == ()


def test_demand_returning_takes_draining_callers_back_before_spawning():
    c = Clock()
    p = policy(c, down=0.0)
    p.decide(loads(0, 0, 0))
    d = p.decide(loads(35, 0, 0, draining={"caller-1", "caller-2"}))
    assert d.undrain == ("caller-1", "caller-2") and d.spawn == 1 and d.target == 4
    c.t += 100
    assert d.stop == ()


def test_demand_counts_the_draining_callers_requests():
    p = policy(Clock(), down=0.0)
    d = p.decide(loads(5, 25, draining={"caller-1"}))
    assert d.in_flight == 30 and d.target == 3


def test_a_lower_ceiling_drains_at_once():
    c = Clock()
    p = policy(c, ceiling=4, down=600)
    p.reconfigure(1, 2, 10, 600, 2.0)
    assert p.decide(loads(40, 40, 40, 40)).drain == ("caller-2", "caller-3")


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError):
        PoolPolicy(floor=3, ceiling=2, target_in_flight=1)
    with pytest.raises(ValueError):
        PoolPolicy(floor=0, ceiling=2, target_in_flight=1)


def test_names_are_dense_and_reused():
    assert free_names({"caller-0", "caller-2"}, 3, "caller-") == ["caller-1", "caller-3", "caller-4"]
    assert sorted(["caller-10", "caller-2", "caller-1"], key=index_of) == ["caller-1", "caller-2", "caller-10"]

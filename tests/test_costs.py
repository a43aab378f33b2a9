"""provider/costs.py: compute seconds learned per key and per class type, bounded."""

import pytest

from provider import costs
from provider.costs import ComputeCosts


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_finish_returns_the_seconds_since_start_and_learns_them() -> None:
    clock = Clock()
    c = ComputeCosts(clock)
    assert c.expected("KSampler", "k1") is None
    c.start("k1", "KSampler")
    clock.now += 4.0
    assert c.finish("k1") == 4.0
    assert c.finish("k1") is None  # once
    assert c.expected("KSampler", "k1") == 4.0
    assert c.expected("KSampler", "other") == 4.0  # the class type's figure for a key never seen
    assert c.expected("Blur", "other") is None


def test_a_key_keeps_its_own_figure_and_the_class_mean_moves_by_a_weight() -> None:
    clock = Clock()
    c = ComputeCosts(clock)
    for key, seconds in (("a", 10.0), ("b", 20.0)):
        c.start(key, "K")
        clock.now += seconds
        c.finish(key)
    assert c.expected("K", "a") == 10.0
    assert c.expected("K", "b") == 20.0
    assert c.expected("K") == 10.0 + costs.WEIGHT * 10.0


def test_cancel_forgets_a_started_computation() -> None:
    c = ComputeCosts(Clock())
    c.start("k", "K")
    c.cancel("k")
    assert c.finish("k") is None
    assert c.expected("K") is None


def test_memory_is_bounded(monkeypatch) -> None:
    monkeypatch.setattr(costs, "MAX_KEYS", 3)
    monkeypatch.setattr(costs, "MAX_PENDING", 2)
    clock = Clock()
    c = ComputeCosts(clock)
    for i in range(5):
        c.start(f"p{i}", "K")
    assert c.finish("p0") is None and c.finish("p4") == 0.0  # the oldest started one was forgotten
    for i in range(5):
        c.start(f"k{i}", "K")
        c.finish(f"k{i}")
    assert len(c._by_key) == 3 and "k0" not in c._by_key


def test_the_ceiling_of_a_class_is_its_longest_recent_figure() -> None:
    """One class type, very different times (a blur of 3 s and one of none): a wait bound from the mean would
    give up on the slow one; the ceiling does not."""
    clock = Clock()
    c = ComputeCosts(clock)
    for key, seconds in (("slow", 3.0), ("fast", 0.01), ("fast2", 0.01)):
        c.start(key, "Blur")
        clock.now += seconds
        c.finish(key)
    assert c.expected("Blur") < 1.5
    assert c.ceiling("Blur") == 3.0
    assert c.ceiling("Blur", "fast") == pytest.approx(0.01)  # a key's own figure first
    assert c.ceiling("Other") is None
    for i in range(costs.RECENT):
        c.start(f"k{i}", "Blur")
        clock.now += 0.5
        c.finish(f"k{i}")
    assert c.ceiling("Blur") == 0.5  # recent figures only

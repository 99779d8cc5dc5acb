"""Pipeline schedules: the orders of GPipe, 1F1B and interleaved decode, and their simulated timelines."""

from __future__ import annotations

import pytest

from kiln.errors import ConfigError
from kiln.parallel.schedule import (
    GPipe,
    InterleavedDecode,
    OneFOneB,
    Schedule,
    bubble_fraction,
    get_schedule,
    simulate,
)


def names(schedule: Schedule, stage: int, p: int, m: int) -> str:
    return " ".join(str(a) for a in schedule.order(stage, p, m))


def test_gpipe_order_is_fill_then_flush() -> None:
    assert names(GPipe(), 1, 4, 3) == "F0 F1 F2 B0 B1 B2"


def test_1f1b_orders_match_pipedream_flush() -> None:
    # 4 stages, 6 micro-batches: stage s warms up with p - s - 1 forwards (Megatron-LM's schedule)
    assert names(OneFOneB(), 0, 4, 6) == "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5"
    assert names(OneFOneB(), 1, 4, 6) == "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 B4 B5"
    assert names(OneFOneB(), 3, 4, 6) == "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5"
    # fewer micro-batches than the warm-up: all forwards first
    assert names(OneFOneB(), 0, 4, 2) == "F0 F1 B0 B1"


@pytest.mark.parametrize("schedule", [GPipe(), OneFOneB()], ids=lambda s: s.name)
def test_every_stage_runs_each_microbatch_once_forward_then_release(schedule: Schedule) -> None:
    for p, m in [(1, 1), (2, 5), (4, 3), (3, 8)]:
        for s in range(p):
            order = [str(a) for a in schedule.order(s, p, m)]
            assert sorted(order) == sorted([f"F{i}" for i in range(m)] + [f"B{i}" for i in range(m)])
            assert all(order.index(f"B{i}") > order.index(f"F{i}") for i in range(m))


@pytest.mark.parametrize("p,m", [(2, 1), (2, 4), (4, 1), (4, 4), (4, 8)])
def test_simulated_bubble_and_in_flight_bound(p: int, m: int) -> None:
    gpipe, one = simulate(GPipe(), p, m), simulate(OneFOneB(), p, m)
    assert gpipe.bubble == pytest.approx(bubble_fraction(p, m))
    assert one.bubble == pytest.approx(bubble_fraction(p, m))  # forward only: the same bubble ...
    assert gpipe.peak_in_flight == [m] * p
    assert one.peak_in_flight == [min(m, p - s) for s in range(p)]  # ... but at most p - s micro-batches held
    assert one.makespan == pytest.approx(m + p - 1)


def test_unbalanced_stages_wait_on_the_slowest() -> None:
    t = simulate(GPipe(), 2, 4, durations=[1.0, 2.0])
    assert t.makespan == pytest.approx(1 + 4 * 2)  # stage 1 is the bottleneck after the first forward
    assert t.bubble > bubble_fraction(2, 4)


def test_interleaved_decode_keeps_the_ring_full_with_enough_groups() -> None:
    assert names(InterleavedDecode(2), 0, 2, 3) == "F0 F1 F2 F0.1 F1.1 F2.1"
    steps = 6
    full = simulate(InterleavedDecode(steps), 4, 4)
    assert full.bubble == pytest.approx(3 / (steps * 4 + 3))  # only fill and drain
    starved = simulate(InterleavedDecode(steps), 4, 2)  # 2 groups on 4 stages: half the ring is empty
    assert starved.bubble > 0.45


def test_an_order_that_deadlocks_is_detected() -> None:
    class Reversed(Schedule):
        name = "reversed"

        def order(self, stage, num_stages, num_microbatches):  # noqa: ANN001, ANN201
            out = GPipe().order(stage, num_stages, num_microbatches)
            return out[::-1] if stage == 1 else out  # stage 1 releases before computing

    with pytest.raises(ConfigError, match="deadlocks"):
        simulate(Reversed(), 2, 2)


def test_schedule_names_and_errors() -> None:
    assert isinstance(get_schedule("1f1b"), OneFOneB) and isinstance(get_schedule("gpipe"), GPipe)
    with pytest.raises(ConfigError, match="unknown pipeline schedule"):
        get_schedule("zero-bubble")
    with pytest.raises(ConfigError, match="stage 4"):
        GPipe().order(4, 4, 2)
    with pytest.raises(ConfigError, match="num_microbatches"):
        OneFOneB().order(0, 2, 0)

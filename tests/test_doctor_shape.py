"""The memory-shape classifier on series recorded from real runs, including
ones a loaded host distorted (these run without an engine: the samples are the
engine's, kept as they came)."""

from __future__ import annotations

from tierbox.doctor.memory import shape

#: gVisor, `memshape spike 1000 100` next to a full test suite: the 100 MiB
#: memset showed in bursts with a 0.5 s stall, over 13 samples (1.3 s)
GVISOR_STALLED_SPIKE = [
    16.9, 17.1, 17.1, 17.1, 17.1, 17.1, 17.3, 17.3, 17.3, 17.3, 17.3,
    24.3, 33.3, 43.8, 43.8, 43.8, 43.8, 43.8, 44.1, 44.3, 45.1, 57.8,
]  # fmt: skip
STEADY_1S = GVISOR_STALLED_SPIKE[:10]


def _series(mib: list[float], end: tuple[float, float] | None = None) -> list[tuple[float, float]]:
    pts = [(round(0.1 * i, 3), v) for i, v in enumerate(mib)]
    return pts + ([end] if end else [])


def test_a_spike_shown_in_bursts_is_still_a_spike() -> None:
    # the same bursts after 2 s of steady running (what `spike 2000 100` gives)
    got = shape(_series(STEADY_1S + GVISOR_STALLED_SPIKE, (3.26, 67.8)), 64)
    assert got.kind == "spike", got.to_dict()
    assert "jumped by" in got.reason


def test_a_rise_longer_than_the_steady_phase_is_not_called_a_spike() -> None:
    # after only 1 s of steady running the 1.3 s rise could be loading, not one
    # allocation: doctor says working set rather than guess
    got = shape(_series(GVISOR_STALLED_SPIKE, (2.26, 67.8)), 64)
    assert got.kind == "working_set", got.to_dict()


def test_a_steady_climb_is_a_leak() -> None:
    got = shape(_series([2.0 + 4 * i for i in range(16)]), 64)
    assert got.kind == "leak", got.to_dict()


def test_loading_from_the_start_is_a_working_set() -> None:
    got = shape(_series([1.0, 9.0, 17.0, 33.0, 49.0, 57.0, 64.0]), 64)
    assert got.kind == "working_set", got.to_dict()


def test_a_late_slow_even_climb_is_not_a_spike() -> None:
    # steady 0.5 s, then a 2 s climb a line fits: a leak, not one allocation
    got = shape(_series([5.0] * 5 + [5.0 + 3 * i for i in range(1, 21)]), 64)
    assert got.kind == "leak", got.to_dict()


def test_a_long_stepwise_rise_after_a_long_steady_phase_is_not_a_spike() -> None:
    # steady 10 s, then three uneven steps over 5.6 s: no line fits them, but
    # no single allocation takes that long
    steady = [8.0] * 100
    stairs = [32.0] * 30 + [46.0] * 25 + [64.0] * 5
    got = shape(_series(steady + stairs), 64)
    assert got.kind != "spike", got.to_dict()

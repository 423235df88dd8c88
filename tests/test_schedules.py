import pytest

from spectra.capture.schedules import Every, LogSpaced, Steps, make_schedule


def _members(schedule, upto):
    return [s for s in range(upto + 1) if s in schedule]


def test_every():
    assert _members(make_schedule(every=5), 21) == [0, 5, 10, 15, 20]
    assert _members(make_schedule(), 3) == [0, 1, 2, 3]


def test_log_spaced_is_dense_early_and_sparse_late():
    assert _members(make_schedule(schedule="log"), 100) == [
        0, 1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50, 63, 79, 100]
    capped = _members(LogSpaced(per_decade=5, max_every=300), 1000)
    assert capped == [0, 1, 2, 3, 4, 6, 10, 16, 25, 40, 63, 100, 158, 251, 300, 398, 600, 631, 900, 1000]


def test_explicit_steps():
    assert _members(make_schedule(schedule=[0, 3, 7]), 10) == [0, 3, 7]
    with pytest.raises(ValueError, match="strictly increase; got 7 then 3 at position 2"):
        make_schedule(schedule=[0, 7, 3])
    with pytest.raises(ValueError, match=">= 0"):
        Steps([-1, 2])


def test_bad_arguments():
    with pytest.raises(ValueError, match="either every= or schedule="):
        make_schedule(every=2, schedule="log")
    with pytest.raises(ValueError, match="every=0"):
        Every(0)
    with pytest.raises(ValueError, match="accepted: 'log'"):
        make_schedule(schedule="linear")

import pytest

from lightning_norm import ConfigurationError, StepSchedule


def brute_force_due(step: int, n: int, p: int) -> bool:
    """Log-spaced rule written out: octave j covers [p*n*2**j, p*n*2**(j+1)), interval n*2**j."""
    if step < p * n:
        return step % n == 0
    j = 0
    while step >= p * n * 2 ** (j + 1):
        j += 1
    return step % (n * 2**j) == 0


def test_linear_schedule_every_n():
    s = StepSchedule(every_n_steps=3)
    assert [i for i in range(10) if s.is_due(i)] == [0, 3, 6, 9]
    assert s(6) and not s(7)


@pytest.mark.parametrize("n,p", [(1, 10), (2, 5), (5, 3), (1, 1)])
def test_log_spaced_matches_brute_force(n, p):
    s = StepSchedule(every_n_steps=n, log_spaced=True, points_per_octave=p)
    for step in range(5000):
        assert s.is_due(step) == brute_force_due(step, n, p), step


def test_log_spaced_has_points_per_octave():
    s = StepSchedule(every_n_steps=1, log_spaced=True, points_per_octave=10)
    due = [i for i in range(10 * 2**10) if s(i)]
    # 10 points in [0, 10), then 10 per octave [10*2**j, 10*2**(j+1)) for j = 0..9.
    assert len(due) == 10 + 10 * 10
    assert due[:3] == [0, 1, 2]
    assert 20 in due and 21 not in due and 22 in due


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_bad_every_n_steps_raises_with_fix(bad):
    with pytest.raises(ConfigurationError, match="every_n_steps"):
        StepSchedule(every_n_steps=bad)


def test_bad_points_per_octave_raises():
    with pytest.raises(ConfigurationError, match="points_per_octave"):
        StepSchedule(log_spaced=True, points_per_octave=0)


def test_negative_step_is_never_due():
    assert not StepSchedule().is_due(-1)

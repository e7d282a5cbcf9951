"""The shared sparsity schedule: hand-computed values at t0, midpoint and t1."""
import pytest

from adamwprune.pruning.schedule import is_update_step, last_update_step, sparsity_at


def test_cubic_schedule_hand_computed_at_start_mid_end():
    # s(t) = sf + (s0 - sf) (1 - (t - t0)/(t1 - t0))^3 with s0 = 0, sf = 0.9, t0 = 100, t1 = 200
    assert sparsity_at(100, 0.9, 100, 200) == 0.0
    assert sparsity_at(150, 0.9, 100, 200) == pytest.approx(0.9 - 0.9 * 0.5 ** 3)  # 0.7875
    assert sparsity_at(175, 0.9, 100, 200) == pytest.approx(0.9 - 0.9 * 0.25 ** 3)
    assert sparsity_at(200, 0.9, 100, 200) == 0.9


def test_cubic_schedule_with_initial_sparsity():
    assert sparsity_at(100, 0.9, 100, 200, initial=0.1) == pytest.approx(0.1)
    assert sparsity_at(150, 0.9, 100, 200, initial=0.1) == pytest.approx(0.9 - 0.8 * 0.125)  # 0.8
    assert sparsity_at(200, 0.9, 100, 200, initial=0.1) == 0.9


def test_linear_schedule_hand_computed_at_start_mid_end():
    assert sparsity_at(100, 0.9, 100, 200, "linear") == 0.0
    assert sparsity_at(125, 0.9, 100, 200, "linear") == pytest.approx(0.225)
    assert sparsity_at(150, 0.9, 100, 200, "linear") == pytest.approx(0.45)
    assert sparsity_at(200, 0.9, 100, 200, "linear") == 0.9
    assert sparsity_at(150, 0.5, 100, 200, "linear", initial=0.1) == pytest.approx(0.3)


@pytest.mark.parametrize("schedule", ["cubic", "linear"])
def test_schedule_is_initial_before_start_and_target_after_end(schedule):
    assert sparsity_at(0, 0.7, 10, 20, schedule) == 0.0
    assert sparsity_at(9, 0.7, 10, 20, schedule, initial=0.2) == 0.2
    assert sparsity_at(21, 0.7, 10, 20, schedule) == 0.7
    assert sparsity_at(10_000, 0.7, 10, 20, schedule) == 0.7


@pytest.mark.parametrize("schedule", ["cubic", "linear"])
def test_schedule_is_monotone_non_decreasing(schedule):
    values = [sparsity_at(t, 0.8, 5, 55, schedule) for t in range(70)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_equal_start_and_end_jumps_to_target_at_start():
    assert sparsity_at(49, 0.5, 50, 50) == 0.0
    assert sparsity_at(50, 0.5, 50, 50) == 0.5
    assert sparsity_at(51, 0.5, 50, 50, "linear") == 0.5
    assert is_update_step(50, 50, 50, 10)


def test_update_steps_every_interval_and_at_end():
    updates = [t for t in range(60) if is_update_step(t, 10, 35, 10)]
    assert updates == [10, 20, 30, 35]


def test_last_update_step_matches_update_steps():
    for t in range(60):
        done = [u for u in range(t + 1) if is_update_step(u, 10, 35, 10)]
        assert last_update_step(t, 10, 35, 10) == (done[-1] if done else None)


@pytest.mark.parametrize("kwargs", [
    dict(schedule="exponential"),
    dict(target=1.5),
    dict(target=-0.1),
    dict(target=float("nan")),
    dict(initial=2.0),
    dict(start=-1),
    dict(start=30, end=20),
    dict(start=1.5),
])
def test_invalid_schedule_arguments_raise_value_error(kwargs):
    args = dict(target=0.5, start=10, end=20, schedule="cubic", initial=0.0)
    args.update(kwargs)
    with pytest.raises(ValueError):
        sparsity_at(15, args["target"], args["start"], args["end"], args["schedule"],
                    args["initial"])


@pytest.mark.parametrize("start,end,interval", [(0, 10, 0), (0, 10, -3), (5, 4, 1), (-1, 4, 1)])
def test_invalid_update_arguments_raise_value_error(start, end, interval):
    with pytest.raises(ValueError):
        is_update_step(3, start, end, interval)

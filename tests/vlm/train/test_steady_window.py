"""The steady-state rate of `vlm train`: the window after warm-up and after the last compile."""

from __future__ import annotations

import pytest

from vlm.train.trainer import steady_rate

# (step, seconds since the first step began, tokens so far, data wait so far), as the step clock writes
CLOCK = [(1, 10.0, 100, 0.0), (2, 11.0, 200, 0.0), (3, 12.0, 300, 0.0), (4, 20.0, 400, 0.0),
         (5, 21.0, 500, 0.0), (6, 22.0, 600, 0.0), (7, 23.0, 700, 0.0)]


def test_window_starts_after_the_given_step():
    assert steady_rate(CLOCK, 2) == pytest.approx(500 / 12.0)   # steps 3..7, step 4 recompiled (8 s)
    assert steady_rate(CLOCK, 4) == pytest.approx(100.0)       # after the recompile: 300 tokens in 3 s


def test_no_rate_without_two_steps_after_the_window_start():
    assert steady_rate(CLOCK, 6) is None
    assert steady_rate(CLOCK, 7) is None
    assert steady_rate([], 2) is None


def test_window_start_past_the_first_recorded_step_of_a_resumed_segment():
    resumed = [(e[0] + 10, *e[1:]) for e in CLOCK]   # steps 11..17
    assert steady_rate(resumed, 2) is None               # nothing of this segment at or before step 2
    assert steady_rate(resumed, 12) == pytest.approx(500 / 12.0)   # the recipe's start: resumed step + 2
    assert steady_rate(resumed, 14) == pytest.approx(100.0)

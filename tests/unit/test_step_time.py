"""The trainer's step times come from marks made behind each step (an event behind its kernels on a
GPU, the host's clock on CPU), not from when the host reads the results: the loop reads step N after
launching step N+1, and the last step at once, so reading times made the last step look a tenth as
long (seen on an H200, conf=small). Marks here are points on one clock, in ms."""

from types import SimpleNamespace

import pytest

from train.trainer import Trainer


class Event:
    """A CUDA event recorded at `ms` on the GPU's clock."""

    def __init__(self, ms: float):
        self.ms = ms

    def elapsed_time(self, end: "Event") -> float:
        assert end.ms >= self.ms, "CUDA does not promise a time for events out of order"
        return end.ms - self.ms


def steps_timed(step_ends: list[float], restarts: dict[int, list[float]], on_gpu: bool = True) -> list[float]:
    """Each step's time in s; `restarts[i]`: the clock restarted at these times before step i was
    read. The host makes the marks in the GPU's order (one stream), so one clock serves both; on
    CPU the marks carry no events and the host's times count."""
    trainer = SimpleNamespace(_clock_marks=[(0.0, Event(0.0) if on_gpu else None)])
    times = []
    for index, end in enumerate(step_ends):
        for restart in restarts.get(index, []):
            trainer._clock_marks.append((restart / 1e3, Event(restart) if on_gpu else None))
        pending = SimpleNamespace(finished_event=Event(end) if on_gpu else None, finished_recorded=end / 1e3)
        times.append(Trainer._step_time(trainer, pending))
    return times


@pytest.mark.parametrize("on_gpu", [True, False])
def test_steps_are_timed_between_their_ends(on_gpu):
    assert steps_timed([900.0, 1500.0, 2100.0], {}, on_gpu) == pytest.approx([0.9, 0.6, 0.6])


def test_a_restart_after_a_checkpoint_starts_the_next_step():
    assert steps_timed([900.0, 1500.0, 2400.0], {2: [1800.0]}) == pytest.approx([0.9, 0.6, 0.6])


def test_a_restart_while_a_step_is_in_flight_starts_the_step_after_it():
    """A profile's export restarts the clock while the step before it is still unread."""
    assert steps_timed([900.0, 1500.0, 2100.0], {1: [1700.0]}) == pytest.approx([0.9, 0.6, 0.4])


def test_two_restarts_before_a_read_each_start_their_own_step():
    """A checkpoint after step 1, then a profile's export while step 2 runs: neither the save nor
    the export is counted in a step."""
    times = steps_timed([900.0, 1500.0, 2200.0, 2900.0], {2: [1600.0, 2300.0]})
    assert times == pytest.approx([0.9, 0.6, 0.6, 0.6])

"""The trainer's step times on a GPU come from events behind each step's kernels, not from when the
host reads the results: the loop reads step N after launching step N+1, and the last step at once,
so reading times would make the last step look a tenth as long (seen on an H200, conf=small). Events
stand in here as points on a clock."""

from types import SimpleNamespace

from train.trainer import Trainer


class Event:
    """A CUDA event recorded at `ms` on the GPU's clock."""

    def __init__(self, ms: float):
        self.ms = ms

    def elapsed_time(self, end: "Event") -> float:
        assert end.ms >= self.ms, "CUDA does not promise a time for events out of order"
        return end.ms - self.ms


def steps_timed(clock_restarts: dict[int, float], step_ends: list[float]) -> list[float]:
    """Each step's time; the host records its events in the GPU's order (one stream), so the GPU
    times double as the host's recording times."""
    trainer = SimpleNamespace(step_clock=0.0, _last_finished_event=None)
    trainer._step_clock_event, trainer._step_clock_recorded = Event(0.0), 0.0
    times = []
    for index, end in enumerate(step_ends):
        if index in clock_restarts:  # restarted before this step's results were read
            restart = clock_restarts[index]
            trainer._step_clock_event, trainer._step_clock_recorded = Event(restart), restart
        pending = SimpleNamespace(finished_event=Event(end), finished_recorded=end)
        times.append(Trainer._step_time(trainer, pending))
    return times


def test_steps_are_timed_between_the_gpus_step_ends():
    assert steps_timed({}, [900.0, 1500.0, 2100.0]) == [0.9, 0.6, 0.6]


def test_a_restart_after_a_checkpoint_starts_the_next_step():
    assert steps_timed({2: 1800.0}, [900.0, 1500.0, 2400.0]) == [0.9, 0.6, 0.6]


def test_a_restart_after_the_steps_end_leaves_the_step_its_own_time():
    """A profile's export restarts the clock while the step before it is still unread."""
    assert steps_timed({1: 1700.0}, [900.0, 1500.0, 2100.0]) == [0.9, 0.6, 0.4]

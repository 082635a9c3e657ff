"""Load shapes: fixed concurrency for a set time, or a step ramp to find saturation."""

from __future__ import annotations

from e2v.loadtest.spec import Ramp
from locust import LoadTestShape


class FixedUsers(LoadTestShape):
    """`users` closed-loop users for `duration_s` seconds, all started at once."""

    abstract = True  # takes arguments: Locust's locustfile loader must not instantiate it

    def __init__(self, users: int, duration_s: float):
        super().__init__()
        self.users, self.duration_s = users, duration_s

    def tick(self) -> tuple[int, float] | None:
        if self.get_run_time() >= self.duration_s:
            return None
        return self.users, float(self.users)


class StepRamp(LoadTestShape):
    """The users of `ramp.levels`, one level per `ramp.step_s` seconds, then stop."""

    abstract = True

    def __init__(self, ramp: Ramp):
        super().__init__()
        self.ramp = ramp

    def tick(self) -> tuple[int, float] | None:
        level = int(self.get_run_time() // self.ramp.step_s)
        if level >= len(self.ramp.levels):
            return None
        users = self.ramp.levels[level]
        return users, float(users)

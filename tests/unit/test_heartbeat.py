from datetime import timedelta

from services.dispatcher.sweep import sweep_heartbeat
from shared.health import OK, Heartbeat


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_heartbeat_is_ok_until_max_age_passes_without_a_beat():
    clock = Clock()
    heartbeat = Heartbeat(max_age=90, monotonic=clock)
    assert heartbeat.check() == "not started"
    heartbeat.start()
    clock.now += 90
    assert heartbeat.check() == OK
    clock.now += 1
    assert heartbeat.check() == "no pass completed for 91 s (the limit is 90 s)"
    heartbeat.beat()
    assert heartbeat.check() == OK


def test_the_sweep_may_miss_three_intervals():
    assert sweep_heartbeat(timedelta(seconds=30)).max_age == 90

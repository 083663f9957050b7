"""The pending scenario's loaded follow-ups and the steady scenario run on top of them."""

from __future__ import annotations

from bench.pending import loaded_key


def test_no_loaded_follow_up_shares_a_key_with_a_request_of_the_steady_run_on_top():
    # The steady part publishes `pending-<i>`; a shared key would make the scheduler ignore
    # its requests as repeats of loaded follow-ups, and nothing would be sent.
    steady = {f"pending-{i}" for i in range(2_000)}
    assert steady.isdisjoint(loaded_key(n) for n in range(2_000))

"""The ratio columns: ours / the peer's row of the same scenario in the same run."""

from __future__ import annotations

from bench.report import Row, is_peer, peer_ratios, ratio, summary, table
from bench.stats import call_split, spread


def row(scenario: str, backend: str, lateness: list[float], throughput: float, cpu: float) -> Row:
    found = Row(scenario, backend, expected=len(lateness), sent=len(lateness))
    found.lateness_ms = spread(lateness)
    found.throughput = throughput
    found.cpu_ms_per_followup = cpu
    return found


def test_ratio_is_ours_over_the_peers_and_missing_when_either_is():
    assert ratio(2.0, 8.0) == 0.25
    assert ratio(None, 8.0) is None
    assert ratio(2.0, None) is None
    assert ratio(2.0, 0.0) is None


def test_each_row_is_compared_with_the_peer_row_of_its_own_scenario():
    ours = row("steady", "levels", [1.0, 2.0, 10.0], 100.0, 20.0)
    burst = row("burst", "levels", [1.0], 400.0, 10.0)
    peer = row("steady", "bullmq (peer)", [40.0, 40.0, 100.0], 50.0, 5.0)
    rows = [ours, burst, peer]
    found = peer_ratios(ours, rows)
    assert found is not None
    assert found.p50 == 2.0 / 40.0
    assert found.p99 == 10.0 / 100.0
    assert found.throughput == 2.0
    assert found.cpu == 4.0
    assert peer_ratios(burst, rows) is None  # no peer row for burst
    assert peer_ratios(peer, rows) is None  # the peer is not compared with itself
    assert is_peer(peer)
    assert not is_peer(ours)


def test_the_table_shows_the_ratios_beside_our_row():
    rows = [
        row("steady", "levels", [1.0, 2.0, 10.0], 100.0, 20.0),
        row("steady", "bullmq (peer)", [40.0, 40.0, 100.0], 50.0, 5.0),
    ]
    grid = table(rows)
    columns = {column.header: list(column.cells) for column in grid.columns}
    assert columns["p99 ×peer"] == ["0.10×", "-"]
    assert columns["thru ×peer"] == ["2.00×", "-"]
    assert columns["CPU ×peer"] == ["4.00×", "-"]
    assert columns["CPU ms/fu"] == ["20.00", "5.00"]


def test_the_summary_line_says_how_much_of_the_tail_came_before_the_call_and_in_it():
    found = row("steady", "levels", [5.0, 42.0], 100.0, 10.0)
    found.extra["lateness_split"] = call_split([(10.0, 10.002, 10.005), (10.5, 10.53, 10.542)])
    line = summary(found)
    assert "p99 before the call 30.0 ms, in the call 12.0 ms" in line
    assert "before the call" not in summary(row("steady", "levels", [5.0], 100.0, 10.0))

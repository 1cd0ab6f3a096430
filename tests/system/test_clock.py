"""The virtual clock: a client's duration from its bytes and MACs, partial work, and the round
rules (sync, deadline, over-selection), checked against hand computations."""

from __future__ import annotations

import math

import pytest

from fedsim.system import clock
from fedsim.system.clock import Candidate, Device

PHONE = Device(compute_macs_per_s=1e8, uplink_bytes_per_s=1e5, downlink_bytes_per_s=1e6, latency_s=0.1)


def test_duration_is_latency_download_compute_latency_upload():
    # 0.1 + 2e6 / 1e6 + 3e8 / 1e8 + 0.1 + 5e5 / 1e5 = 0.1 + 2 + 3 + 0.1 + 5
    assert clock.duration(PHONE, 2_000_000, 300_000_000, 500_000) == pytest.approx(10.2, abs=1e-12)


def test_a_direction_with_no_bytes_costs_no_latency():
    assert clock.duration(PHONE, 0, 300_000_000, 0) == pytest.approx(3.0, abs=1e-12)
    assert clock.duration(PHONE, 1_000_000, 0, 0) == pytest.approx(1.1, abs=1e-12)


@pytest.mark.parametrize(
    "n,bs,steps,expected",
    [
        (10, 4, 0, 0),
        (10, 4, 1, 4),
        (10, 4, 2, 8),
        (10, 4, 3, 10),  # the epoch's last batch holds 2
        (10, 4, 4, 14),  # second epoch, first batch
        (10, 4, 6, 20),
        (8, 4, 3, 12),
        (3, 32, 2, 6),
    ],
)
def test_examples_in_steps_follows_the_epoch_batching(n, bs, steps, expected):
    assert clock.examples_in_steps(n, bs, steps) == expected


def test_steps_that_fit_is_the_largest_count_within_the_budget():
    dev = Device(1000.0, 1e9, 1e9, 0.0)  # 1,000 MACs a second; no bytes: no message terms
    # 10 examples, batch 4, 2 epochs = 6 steps; 100 MACs per example: steps cost 400, 400, 200, ...
    cum = [0, 400, 800, 1000, 1400, 1800, 2000]
    for budget_s in (0.0, 0.39, 0.4, 0.95, 1.0, 1.39, 1.99, 2.0, 5.0):
        expected = max(s for s in range(7) if cum[s] / 1000.0 <= budget_s)
        assert clock.steps_that_fit(dev, budget_s, 0, 0, 10, 4, 6, 100) == expected, budget_s


def test_steps_that_fit_is_zero_when_the_messages_alone_overrun():
    dev = Device(1e12, 1.0, 1.0, 0.0)  # 1 byte a second
    assert clock.steps_that_fit(dev, 5.0, 3, 3, 10, 4, 6, 100) == 0


def cands(*rows):
    return [Candidate(c, 0.0, d, off, partial) for c, d, off, partial in rows]


def test_sync_ends_with_the_last_arrival_and_drops_clients_that_go_offline_first():
    times = clock.sync_round(
        0.0, cands((1, 5.0, math.inf, None), (2, 9.0, math.inf, None), (3, 4.0, 3.0, None))
    )
    outcome = {d.client_id: d.outcome for d in times.decisions}
    assert outcome == {1: "aggregated", 2: "aggregated", 3: "dropped_offline"}
    assert times.end_s == 9.0


def test_deadline_drops_late_clients_and_ends_at_the_deadline():
    times = clock.deadline_round(
        10.0, 6.0, [Candidate(1, 10.0, 5.0, math.inf), Candidate(2, 10.0, 7.0, math.inf)]
    )
    assert [d.outcome for d in times.decisions] == ["aggregated", "dropped_deadline"]
    assert times.end_s == 16.0
    everyone = clock.deadline_round(10.0, 6.0, [Candidate(1, 10.0, 5.0, math.inf)])
    assert everyone.end_s == 15.0  # every client arrived: no need to wait for the deadline


def test_deadline_with_partial_work_keeps_a_late_client_with_its_steps():
    times = clock.deadline_round(0.0, 6.0, [Candidate(1, 0.0, 9.0, math.inf, partial=(3, 5.5))])
    (d,) = times.decisions
    assert (d.outcome, d.max_steps, d.arrival_s) == ("aggregated", 3, 5.5)
    none_fit = clock.deadline_round(0.0, 6.0, [Candidate(1, 0.0, 9.0, math.inf, partial=(0, 0.5))])
    assert none_fit.decisions[0].outcome == "dropped_deadline"


def test_overselect_aggregates_exactly_the_first_k_arrivals_with_ties_by_client_id():
    rows = [(5, 3.0), (1, 2.0), (4, 2.0), (2, 7.0), (3, 1.0), (6, 0.5)]
    cs = [Candidate(c, 0.0, d, math.inf if c != 6 else 0.2) for c, d in rows]  # client 6 goes offline
    times = clock.overselect_round(0.0, 3, cs)
    outcome = {d.client_id: d.outcome for d in times.decisions}
    assert outcome == {
        3: "aggregated",
        1: "aggregated",
        4: "aggregated",  # 1 and 4 tie at 2.0; both fit in k = 3
        5: "overselected_unused",
        2: "overselected_unused",
        6: "dropped_offline",
    }
    assert times.end_s == 2.0
    tie = clock.overselect_round(0.0, 2, [Candidate(c, 0.0, d, math.inf) for c, d in rows[:3]])
    assert {d.client_id for d in tie.decisions if d.outcome == "aggregated"} == {1, 4}  # 4 before 5


def test_overselected_sample_size_is_the_ceiling():
    assert clock.overselected(10, 1.3) == 13
    assert clock.overselected(10, 1.25) == 13
    assert clock.overselected(7, 1.0) == 7

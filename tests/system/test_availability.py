"""Availability is a pure function of (client, time): any query order gives the same answers, and
the three queries agree with one another and with hand computations."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fedsim.config import AvailabilityConfig
from fedsim.errors import FedsimError
from fedsim.system.availability import DailyCycle, build_availability


def test_daily_cycle_by_hand():
    av = DailyCycle(np.array([0.0, 30.0]), on_fraction=0.25, period_s=100.0)
    # client 0: online on [0, 25) + 100 k; client 1 (phase 30): online while (t + 30) mod 100 < 25,
    # i.e. on [70, 95) + 100 k
    assert [av.online(0, t) for t in (0, 24.9, 25, 99, 100)] == [True, True, False, False, True]
    assert [av.online(1, t) for t in (0, 69.9, 70, 94.9, 95)] == [False, False, True, True, False]
    assert av.offline_at(0, 10.0) == pytest.approx(25.0)
    assert av.offline_at(0, 30.0) == 30.0
    assert av.next_online(1, 10.0) == pytest.approx(70.0)
    assert av.next_online(1, 80.0) == 80.0


def trace_file(tmp_path, rows):
    path = tmp_path / "avail.parquet"
    pd.DataFrame(rows, columns=["trace_id", "start_s", "end_s", "period_s"]).to_parquet(path)
    return str(path)


def worlds(tmp_path):
    yield build_availability(AvailabilityConfig(kind="daily", on_fraction=0.4, period_s=500.0), 30, seed=4)
    rows = [
        ("a", 10.0, 50.0, 200.0),
        ("a", 120.0, 200.0, 200.0),
        ("b", 0.0, 30.0, None),
        ("b", 60.0, 90.0, None),
    ]
    yield build_availability(AvailabilityConfig(kind="trace", trace=trace_file(tmp_path, rows)), 30, seed=4)


def test_lookups_are_pure_any_query_order_gives_the_same_answers(tmp_path):
    for av in worlds(tmp_path):
        queries = [(c, float(t)) for c in range(30) for t in np.linspace(0, 1500, 61)]
        forward = [(av.online(c, t), av.offline_at(c, t), av.next_online(c, t)) for c, t in queries]
        order = np.random.default_rng(0).permutation(len(queries))
        shuffled = {
            i: (av.online(*queries[i]), av.offline_at(*queries[i]), av.next_online(*queries[i]))
            for i in order
        }
        assert forward == [shuffled[i] for i in range(len(queries))]
        assert forward == [(av.online(c, t), av.offline_at(c, t), av.next_online(c, t)) for c, t in queries]


def test_the_three_queries_agree(tmp_path):
    for av in worlds(tmp_path):
        for t in np.linspace(0, 1500, 31):
            mask = av.online_mask(float(t), 30)
            for c in range(30):
                on = av.online(c, float(t))
                assert mask[c] == on
                off, nxt = av.offline_at(c, float(t)), av.next_online(c, float(t))
                if on:
                    assert nxt == t and off > t
                    if not math.isinf(off):
                        assert not av.online(c, off) and av.online(c, off - 1e-6)
                else:
                    assert off == t and nxt > t
                    if not math.isinf(nxt):
                        assert av.online(c, nxt) and not av.online(c, nxt - 1e-6)


def test_a_periodic_trace_repeats_and_a_one_off_trace_ends(tmp_path):
    rows = [("a", 10.0, 50.0, 200.0), ("b", 0.0, 30.0, None)]
    av = build_availability(AvailabilityConfig(kind="trace", trace=trace_file(tmp_path, rows)), 40, seed=0)
    a = next(c for c in range(40) if av.describe(c)["availability_trace"] == "a")
    b = next(c for c in range(40) if av.describe(c)["availability_trace"] == "b")
    assert av.online(a, 215.0) and not av.online(a, 255.0) and av.next_online(a, 60.0) == 210.0
    assert av.online(b, 5.0) and not av.online(b, 205.0) and math.isinf(av.next_online(b, 40.0))


def test_a_malformed_trace_is_one_clear_error(tmp_path):
    bad = trace_file(tmp_path, [("a", 50.0, 10.0, None)])
    with pytest.raises(FedsimError, match="end <= start"):
        build_availability(AvailabilityConfig(kind="trace", trace=bad), 3, seed=0)
    path = tmp_path / "cols.parquet"
    pd.DataFrame({"trace_id": ["a"], "start_s": [0.0]}).to_parquet(path)
    with pytest.raises(FedsimError, match="lacks column"):
        build_availability(AvailabilityConfig(kind="trace", trace=str(path)), 3, seed=0)

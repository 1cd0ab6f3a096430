"""Device tables: pure functions of (seed, client), exact tier counts, traces read with their
units checked."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedsim import config
from fedsim.errors import FedsimError
from fedsim.system.devices import build_devices, tier_counts


def devices_cfg(**d):
    return config.parse({"runs": [{"algorithm": "fedavg"}], "system": {"devices": d}}).system.devices


LOGNORMAL = {"distribution": "lognormal", "median": 1e9, "sigma": 0.5}


def test_a_clients_device_does_not_depend_on_the_population_size():
    cfg = devices_cfg(
        compute_macs_per_s=LOGNORMAL, uplink_bytes_per_s={"distribution": "uniform", "low": 1e5, "high": 1e6}
    )
    small, large = build_devices(cfg, 10, seed=1), build_devices(cfg, 300, seed=1)
    np.testing.assert_array_equal(small.compute_macs_per_s, large.compute_macs_per_s[:10])
    np.testing.assert_array_equal(small.uplink_bytes_per_s, large.uplink_bytes_per_s[:10])
    assert not np.array_equal(build_devices(cfg, 10, seed=2).compute_macs_per_s, small.compute_macs_per_s)


def test_lognormal_draws_have_the_stated_median_and_spread():
    d = build_devices(devices_cfg(compute_macs_per_s=LOGNORMAL), 4000, seed=0).compute_macs_per_s
    assert np.median(d) == pytest.approx(1e9, rel=0.05)
    assert np.std(np.log(d)) == pytest.approx(0.5, rel=0.05)


def test_uniform_draws_stay_in_their_bounds_and_a_number_is_a_constant():
    d = build_devices(
        devices_cfg(latency_s={"distribution": "uniform", "low": 0.01, "high": 0.2}, compute_macs_per_s=5e8),
        500,
        0,
    )
    assert d.latency_s.min() >= 0.01 and d.latency_s.max() <= 0.2
    assert (d.compute_macs_per_s == 5e8).all()


def test_tiers_have_exact_counts():
    assert tier_counts([0.7, 0.3], 10).tolist() == [7, 3]
    # floors 3, 1, 1 leave 2 clients; remainders .5, .75, .75: one each to tiers 1 and 2
    assert tier_counts([0.5, 0.25, 0.25], 7).tolist() == [3, 2, 2]
    assert tier_counts([0.5, 0.5], 3).tolist() == [2, 1]  # a tie goes to the earlier tier
    tiers = [
        {
            "name": "fast",
            "fraction": 0.7,
            "compute_macs_per_s": 2e9,
            "uplink_bytes_per_s": 1e6,
            "downlink_bytes_per_s": 5e6,
        },
        {
            "name": "slow",
            "fraction": 0.3,
            "compute_macs_per_s": 2e8,
            "uplink_bytes_per_s": 1e5,
            "downlink_bytes_per_s": 5e5,
        },
    ]
    d = build_devices(devices_cfg(tiers=tiers), 20, seed=3)
    assert sorted(d.device_id).count("slow") == 6
    assert set(d.compute_macs_per_s[d.device_id == "slow"]) == {2e8}


def write(tmp_path, **cols):
    path = tmp_path / "devices.parquet"
    pd.DataFrame(cols).to_parquet(path)
    return str(path)


def test_a_trace_maps_clients_to_profiles_by_a_seeded_draw_not_by_id(tmp_path):
    path = write(
        tmp_path,
        device_id=["p0", "p1", "p2"],
        compute_macs_per_s=[1e8, 2e8, 3e8],
        uplink_bytes_per_s=[1e5, 1e5, 1e5],
        downlink_bytes_per_s=[1e6, 1e6, 1e6],
        latency_s=[0.0, 0.1, 0.2],
    )
    d = build_devices(devices_cfg(trace=path), 60, seed=0)
    assert set(d.device_id) == {"p0", "p1", "p2"}
    assert list(d.device_id[:9]) != ["p0", "p1", "p2"] * 3
    by_name = dict(zip(d.device_id, d.compute_macs_per_s))
    assert by_name == {"p0": 1e8, "p1": 2e8, "p2": 3e8}


def test_a_trace_with_missing_columns_or_other_units_is_refused(tmp_path):
    missing = write(tmp_path, device_id=["a"], compute_macs_per_s=[1e9])
    with pytest.raises(FedsimError, match="lacks column"):
        build_devices(devices_cfg(trace=missing), 2, 0)
    fedscale = write(tmp_path, device_id=["a"], computation=[30.0], communication=[5000.0])
    with pytest.raises(FedsimError, match=r"fedsim\.system\.fedscale"):
        build_devices(devices_cfg(trace=fedscale), 2, 0)
    negative = write(
        tmp_path,
        device_id=["a"],
        compute_macs_per_s=[-1.0],
        uplink_bytes_per_s=[1.0],
        downlink_bytes_per_s=[1.0],
        latency_s=[0.0],
    )
    with pytest.raises(FedsimError, match="compute_macs_per_s"):
        build_devices(devices_cfg(trace=negative), 2, 0)


def test_fedscale_traces_convert_with_their_units_and_load(tmp_path):
    """A small file in FedScale's published format: ms per sample and kbit/s in, MAC/s and bytes/s
    out; a behave trace's intervals repeat every finish_time."""
    import pickle

    from fedsim.system import fedscale
    from fedsim.system.availability import build_availability

    cap = {
        1: {"computation": 20.0, "communication": 8000.0},
        2: {"computation": 50.0, "communication": 800.0},
    }
    behave = {1: {"active": [0, 100], "inactive": [50, 150], "finish_time": 200, "duration": 200}}
    (tmp_path / "cap").write_bytes(pickle.dumps(cap))
    (tmp_path / "beh").write_bytes(pickle.dumps(behave))
    dev_out, av_out = tmp_path / "d.parquet", tmp_path / "a.parquet"
    assert (
        fedscale.main(["devices", str(tmp_path / "cap"), "--reference-macs", "1e8", "--out", str(dev_out)])
        == 0
    )
    assert fedscale.main(["availability", str(tmp_path / "beh"), "--out", str(av_out)]) == 0
    d = pd.read_parquet(dev_out).set_index("device_id")
    assert d.loc["1", "compute_macs_per_s"] == pytest.approx(1e8 / 0.020)  # 5e9 MAC/s
    assert d.loc["2", "uplink_bytes_per_s"] == pytest.approx(100_000.0)  # 800 kbit/s = 1e5 B/s
    table = build_devices(devices_cfg(trace=str(dev_out)), 5, seed=0)
    assert set(table.device_id) <= {"1", "2"}
    av = build_availability(config.AvailabilityConfig(kind="trace", trace=str(av_out)), 3, seed=0)
    assert [av.online(0, t) for t in (10, 60, 120, 210, 260, 310)] == [True, False, True, True, False, True]
    assert (
        fedscale.main(["devices", str(tmp_path / "beh"), "--reference-macs", "1e8", "--out", str(dev_out)])
        == 2
    )

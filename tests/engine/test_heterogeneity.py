"""System heterogeneity on the virtual clock (docs/heterogeneity.md): the logged times are the
clock's formula applied to the logged bytes and MACs, the round rules keep whom they should, and
the clock changes nothing of an ideal federation's tables."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from fedsim import config
from fedsim.engine import api
from fedsim.engine.backends import SequentialBackend
from fedsim.engine.loop import run_experiment
from fedsim.io.runlog import CLIENTS_SCHEMA, ROUNDS_SCHEMA
from tests.helpers import WIDTHS, resumed_equals_uninterrupted, tables

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = {"algorithm": "fedavg", "rounds": 3, "local_epochs": 2, "lr": 0.05, "batch_size": 16}
TIERS = [
    {
        "name": "fast",
        "fraction": 0.6,
        "compute_macs_per_s": 2e8,
        "uplink_bytes_per_s": 1e6,
        "downlink_bytes_per_s": 4e6,
        "latency_s": 0.05,
    },
    {
        "name": "slow",
        "fraction": 0.4,
        "compute_macs_per_s": 1e7,
        "uplink_bytes_per_s": 5e4,
        "downlink_bytes_per_s": 2e5,
        "latency_s": 0.3,
    },
]
WORLD = {"devices": {"tiers": TIERS}, "availability": {"kind": "daily", "on_fraction": 0.6, "period_s": 40.0}}


def raw(runs, system=WORLD, clients=12, per_round=5, **engine):
    out = {
        "name": "het",
        "seed": 5,
        "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "num_clients": clients},
        "model": {"name": "digits_cnn", "widths": WIDTHS},
        "engine": {"backend": "sequential", "clients_per_round": per_round, **engine},
        "runs": runs,
    }
    if system is not None:
        out["system"] = system
    return out


def run(raw_cfg, out):
    cfg = config.parse(raw_cfg)
    ds = api.prepare(cfg)
    run_dir = api.new_run_dir(out, cfg.name)
    list(api.execute(cfg, ds, run_dir))
    return {n: pd.read_parquet(run_dir / f"{n}.parquet") for n in ("runs", "rounds", "clients", "devices")}


@pytest.fixture(scope="module")
def het(tmp_path_factory):
    runs = [
        {**RUN, "name": "sync"},
        {**RUN, "name": "deadline", "system": {"mode": "deadline", "deadline_s": 1.0}},
        {**RUN, "name": "partial", "system": {"mode": "deadline", "deadline_s": 1.0, "partial_work": True}},
        {**RUN, "name": "over", "system": {"mode": "overselect", "overselect": 1.6}},
    ]
    return run(raw(runs), tmp_path_factory.mktemp("het"))


def with_devices(t):
    return t["clients"].merge(t["devices"], on="client_id")


def test_zero_heterogeneity_gives_todays_tables_bit_for_bit(tmp_path):
    runs = [RUN, {**RUN, "algorithm": "fedprox", "mu": 0.01}]
    cfg_a, cfg_b = config.parse(raw(runs, system=None)), config.parse(raw(runs, system={}))
    ds = api.prepare(cfg_a)
    for cfg, d in ((cfg_a, tmp_path / "a"), (cfg_b, tmp_path / "b")):
        list(run_experiment(cfg, ds, str(d), SequentialBackend(cfg, ds)))
    a, b = tables(tmp_path / "a"), tables(tmp_path / "b")
    old_rounds = [c for c in ROUNDS_SCHEMA.names if c not in ("sim_time_s", "wall_seconds")]
    old_clients = [
        c for c in CLIENTS_SCHEMA.names if c not in ("macs", "sim_dispatch_s", "sim_arrival_s", "outcome")
    ]
    old_clients = [c for c in old_clients if c in a["clients"].columns]
    pd.testing.assert_frame_equal(a["rounds"][old_rounds], b["rounds"][old_rounds], check_exact=True)
    pd.testing.assert_frame_equal(a["clients"][old_clients], b["clients"][old_clients], check_exact=True)
    pd.testing.assert_frame_equal(a["clients"][["macs", "outcome"]], b["clients"][["macs", "outcome"]])
    assert a["rounds"]["sim_time_s"].isna().all() and b["rounds"]["sim_time_s"].notna().all()
    assert not (tmp_path / "a" / "devices.parquet").exists() and (tmp_path / "b" / "devices.parquet").exists()


def test_logged_times_are_the_formula_on_the_logged_bytes_macs_and_device(het):
    c = with_devices(het)
    agg = c[c["outcome"] == "aggregated"]
    assert len(agg) > 20
    by_hand = (
        agg["latency_s"]
        + agg["bytes_down"] / agg["downlink_bytes_per_s"]
        + agg["macs"] / agg["compute_macs_per_s"]
        + agg["latency_s"]
        + agg["bytes_up"] / agg["uplink_bytes_per_s"]
    )
    np.testing.assert_allclose(agg["sim_arrival_s"] - agg["sim_dispatch_s"], by_hand, rtol=0, atol=1e-9)
    # MACs: examples x epochs x 3F for a full update, F from a client of the run (same model)
    f = agg["macs"] / (agg["n_examples"] * 2 * 3)
    full = agg[agg["local_steps"] == 2 * np.ceil(agg["n_examples"] / 16)]
    assert (f[full.index] == f[full.index].iloc[0]).all() and f[full.index].iloc[0] == int(
        f[full.index].iloc[0]
    )


def test_each_round_starts_when_the_previous_model_is_ready_and_ends_at_its_rule(het):
    rounds, clients = het["rounds"], het["clients"]
    for run_id, g in clients.groupby("run_id"):
        times = rounds[rounds["run_id"] == run_id].set_index("round")["sim_time_s"]
        for r, rows in g.groupby("round"):
            start = 0.0 if r == 0 else times[r - 1]
            assert (rows["sim_dispatch_s"] >= start).all() and rows["sim_dispatch_s"].nunique() == 1
            agg = rows[rows["outcome"] == "aggregated"]
            if run_id == "sync":
                assert times[r] == agg["sim_arrival_s"].max()
            if run_id in ("deadline", "partial"):
                limit = rows["sim_dispatch_s"].iloc[0] + 1.0
                assert (agg["sim_arrival_s"] <= limit + 1e-12).all()
                late = rows[rows["outcome"] == "dropped_deadline"]
                assert (late["sim_arrival_s"] > limit).all() and (late["bytes_up"] == 0).all()
                assert (late["bytes_down"] > 0).all() and (late["local_steps"] == 0).all()
                assert times[r] == (limit if len(agg) < len(rows) else agg["sim_arrival_s"].max())
    assert set(clients.loc[clients.run_id == "deadline", "outcome"]) >= {"aggregated", "dropped_deadline"}


def test_offline_clients_are_never_sampled_and_a_client_that_goes_offline_is_dropped(het):
    c = with_devices(het)
    start = c["sim_dispatch_s"]
    pos = np.fmod(start + c["availability_phase_s"], c["availability_period_s"])
    assert (pos < c["availability_on_fraction"] * c["availability_period_s"]).all()  # online at dispatch
    off = c[c["outcome"] == "dropped_offline"]
    on_until = start[off.index] + (
        off["availability_on_fraction"] * off["availability_period_s"] - pos[off.index]
    )
    assert (on_until < off["sim_arrival_s"]).all()
    agg = c[c["outcome"] == "aggregated"]
    agg_until = start[agg.index] + (
        agg["availability_on_fraction"] * agg["availability_period_s"] - pos[agg.index]
    )
    assert (agg_until >= agg["sim_arrival_s"] - 1e-9).all()


def test_partial_work_trains_the_steps_a_hand_computation_fits(het):
    c = with_devices(het)
    part = c[(c["run_id"] == "partial") & (c["outcome"] == "aggregated")]
    f = 3 * WIDTHS_F(c)
    cut = 0
    for _, x in part.iterrows():
        n, total = int(x["n_examples"]), 2 * math.ceil(x["n_examples"] / 16)

        def examples(s, n=n):
            per_epoch = math.ceil(n / 16)
            return (s // per_epoch) * n + (s % per_epoch) * 16

        def fits(s, x=x):
            t = x["latency_s"] + x["bytes_down"] / x["downlink_bytes_per_s"]
            t = t + examples(s) * f / x["compute_macs_per_s"]
            return t + x["latency_s"] + x["bytes_up"] / x["uplink_bytes_per_s"] <= 1.0

        expected = max(s for s in range(total + 1) if fits(s))
        assert x["local_steps"] == expected
        assert x["macs"] == examples(expected) * f
        cut += expected < total
    assert cut > 0  # some clients really did partial work


def WIDTHS_F(c) -> int:
    """F of the run's model from a full-work FedAvg client: MACs / (examples x epochs x 3)."""
    full = c[(c["run_id"] == "sync") & (c["outcome"] == "aggregated")].iloc[0]
    return int(full["macs"] // (full["n_examples"] * 2 * 3))


def test_overselection_aggregates_exactly_the_first_k_arrivals(het):
    c, dev = het["clients"], het["devices"]
    over = c[c["run_id"] == "over"]
    for _, rows in over.groupby("round"):
        t = rows["sim_dispatch_s"].iloc[0]
        pos = np.fmod(t + dev["availability_phase_s"], dev["availability_period_s"])
        online = int((pos < dev["availability_on_fraction"] * dev["availability_period_s"]).sum())
        assert len(rows) == min(8, online)  # ceil(1.6 x 5) sampled from the clients online
        alive = rows[rows["outcome"] != "dropped_offline"].sort_values(["sim_arrival_s", "client_id"])
        assert alive["outcome"].tolist()[:5] == ["aggregated"] * min(5, len(alive))
        assert set(alive["outcome"].tolist()[5:]) <= {"overselected_unused"}
        unused = rows[rows["outcome"] == "overselected_unused"]
        assert (
            (unused["bytes_up"] == 0).all()
            and (unused["macs"] == 0).all()
            and (unused["bytes_down"] > 0).all()
        )


def test_ray_and_stacking_give_the_same_times_and_outcomes(het, ray_local, tmp_path):
    runs = [
        {**RUN, "name": "partial", "system": {"mode": "deadline", "deadline_s": 1.0, "partial_work": True}},
        {**RUN, "name": "over", "system": {"mode": "overselect", "overselect": 1.6}},
    ]
    keys = [
        "run_id",
        "round",
        "client_id",
        "local_steps",
        "bytes_up",
        "bytes_down",
        "macs",
        "sim_dispatch_s",
        "sim_arrival_s",
        "outcome",
    ]
    seq = het["clients"][het["clients"]["run_id"].isin(["partial", "over"])][keys].reset_index(drop=True)
    ray2 = run(raw(runs, backend="ray", num_workers=2, vectorize="always"), tmp_path / "ray")
    pd.testing.assert_frame_equal(seq, ray2["clients"][keys].reset_index(drop=True), check_exact=True)
    one = run(raw(runs, num_workers=1, vectorize="never"), tmp_path / "seq1")
    pd.testing.assert_frame_equal(seq, one["clients"][keys].reset_index(drop=True), check_exact=True)
    pd.testing.assert_frame_equal(
        het["rounds"][het["rounds"]["run_id"].isin(["partial", "over"])][["sim_time_s"]].reset_index(
            drop=True
        ),
        ray2["rounds"][["sim_time_s"]],
        check_exact=True,
    )


def test_a_resumed_heterogeneous_run_equals_an_uninterrupted_one(tmp_path):
    cfg = config.parse(
        raw([{**RUN, "system": {"mode": "deadline", "deadline_s": 1.0, "partial_work": True}}])
    )
    ds = api.prepare(cfg)
    resumed_equals_uninterrupted(cfg, ds, tmp_path)  # asserts the tables, sim columns included


def test_fedma_waits_for_every_client_to_be_online_long_enough(tmp_path):
    fedma = {
        "algorithm": "fedma",
        "rounds": 1,
        "local_epochs": 1,
        "retrain_epochs": 1,
        "lr": 0.05,
        "batch_size": 16,
    }
    t = run(raw([fedma], clients=6, per_round=6), tmp_path)
    c = with_devices(t)
    assert (c["outcome"] == "aggregated").all()
    pos = np.fmod(c["sim_dispatch_s"] + c["availability_phase_s"], c["availability_period_s"])
    on = c["availability_on_fraction"] * c["availability_period_s"]
    assert (pos < on).all()
    assert (
        c["sim_dispatch_s"] + (on - pos) >= c["sim_arrival_s"] - 1e-9
    ).all()  # stays online until it arrives
    for r, rows in c.groupby("round"):
        assert (
            t["rounds"].set_index(["run_id", "round"])["sim_time_s"][("fedma", r)]
            == rows["sim_arrival_s"].max()
        )


def cli(tmp_path, raw_cfg):
    import yaml

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw_cfg))
    out = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "run", str(path), "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return p, out


@pytest.mark.parametrize(
    "system,runs,match",
    [
        ({"devices": {"compute_macs_per_s": -5}}, [RUN], "system.devices.compute_macs_per_s"),
        (
            {"devices": {"uplink_bytes_per_s": {"distribution": "pareto"}}},
            [RUN],
            "'constant', 'lognormal' or 'uniform'",
        ),
        ({"mode": "deadline", "deadline_s": 1e-6}, [RUN], "no client of run 'fedavg' can meet"),
        (
            {"mode": "deadline", "deadline_s": 5},
            [{**RUN, "algorithm": "fedma", "rounds": 1}],
            "needs every client",
        ),
        ({"devices": {"trace": "missing.parquet"}}, [RUN], "does not exist"),
    ],
)
def test_bad_system_input_is_one_line_exit_2_nothing_written(tmp_path, system, runs, match):
    r = raw(runs, system=system)
    if runs[0]["algorithm"] == "fedma":
        r["engine"]["clients_per_round"] = r["data"]["num_clients"]
    p, out = cli(tmp_path, r)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsim: error:") and match in lines[0], p.stderr
    assert not out.exists() or not any(out.iterdir())


def test_the_dry_run_projects_the_simulated_times_a_run_logs(tmp_path):
    from fedsim import dryrun

    runs = [
        {**RUN, "name": "partial", "system": {"mode": "deadline", "deadline_s": 1.0, "partial_work": True}},
        {**RUN, "name": "over", "system": {"mode": "overselect", "overselect": 1.6}},
    ]
    r = raw(runs)
    r["data"] = {"dataset": "digits", "partition": "iid", "num_clients": 12}  # exact sizes for the dry run
    cfg = config.parse(r)
    sizes, projected = dryrun.project_experiment(cfg)
    assert sizes.exact
    logged = run(r, tmp_path)["rounds"]
    for p in projected:
        got = logged[logged["run_id"] == p.run_id]
        assert [x.sim_time_s for x in p.rounds] == pytest.approx(got["sim_time_s"].tolist(), abs=1e-9)
        assert [x.bytes_up for x in p.rounds] == got["bytes_up"].tolist()
        assert [x.flops for x in p.rounds] == got["flops"].tolist()


def test_server_time_adds_aggregation_and_evaluation_at_the_servers_speed(tmp_path):
    speed = 1e6  # multiply-accumulates per second: a slow server, so its time shows
    t = run(raw([RUN], system={**WORLD, "server_macs_per_s": speed}), tmp_path)
    c, r = t["clients"], t["rounds"]
    n_test = 359  # digits' test split
    agg = c[c["outcome"] == "aggregated"]
    f = WIDTHS_F(c.assign(run_id="sync"))
    params = agg["bytes_up"].iloc[0] // 4  # float32 uploads: one multiply-accumulate per scalar
    for rnd, rows in agg.groupby("round"):
        served = len(rows) * params + n_test * f  # every round is evaluated (eval_every 1)
        assert r.set_index("round")["sim_time_s"][rnd] == pytest.approx(
            rows["sim_arrival_s"].max() + served / speed
        )

"""Codecs and secure aggregation on the virtual clock: a client's simulated time is the clock's
formula applied to the bytes that really cross the wire (encoded, with secure aggregation's
messages), the rule decides from them, and the dry run projects what the run logs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedsim import config
from fedsim.wire import secagg
from tests.engine.test_heterogeneity import RUN, raw, run

pytestmark = pytest.mark.usefixtures("one_thread")

K = 2  # secagg_plus neighbours
RUNS = [
    {
        **RUN,
        "name": "topk",
        "uplink": {"codec": "topk", "fraction": 0.05, "error_feedback": True},
        "downlink": {"codec": "fp16"},
        "system": {"mode": "deadline", "deadline_s": 1.0, "partial_work": True},
    },
    {
        **RUN,
        "name": "secagg",
        "secure_aggregation": {"protocol": "secagg_plus", "neighbours": K, "bits": 8},
        "system": {"mode": "deadline", "deadline_s": 1.0},
    },
    {
        **RUN,
        "name": "scaffold4",
        "algorithm": "scaffold",
        "uplink": {"codec": "quantize", "bits": 4},
        "system": {"mode": "overselect", "overselect": 1.6},
    },
]


def iid(runs):
    r = raw(runs)
    r["data"] = {"dataset": "digits", "partition": "iid", "num_clients": 12}  # exact sizes for the dry run
    return r


@pytest.fixture(scope="module")
def tabs(tmp_path_factory):
    return run(iid(RUNS), tmp_path_factory.mktemp("wireclock"))


def test_simulated_time_is_the_formula_on_the_encoded_bytes(tabs):
    c = tabs["clients"].merge(tabs["devices"], on="client_id")
    agg = c[c["outcome"] == "aggregated"]
    assert set(agg["run_id"]) == {"topk", "secagg", "scaffold4"}
    # the bytes the clock used are the wire's, not the uncompressed ones
    assert (agg["bytes_up"] < agg["bytes_up_raw"]).all()
    by_hand = (
        2 * agg["latency_s"]
        + agg["bytes_down"] / agg["downlink_bytes_per_s"]
        + agg["macs"] / agg["compute_macs_per_s"]
        + agg["bytes_up"] / agg["uplink_bytes_per_s"]
    )
    np.testing.assert_allclose(agg["sim_arrival_s"] - agg["sim_dispatch_s"], by_hand, rtol=0, atol=1e-9)


def test_the_deadline_keeps_a_client_the_uncompressed_upload_would_have_made_late(tabs):
    """With the raw bytes some aggregated clients of the top-k run would miss the 1 s deadline:
    the rule decided from the encoded ones."""
    c = tabs["clients"].merge(tabs["devices"], on="client_id")
    agg = c[(c["outcome"] == "aggregated") & (c["run_id"] == "topk")]
    raw_time = (
        2 * agg["latency_s"]
        + agg["bytes_down_raw"] / agg["downlink_bytes_per_s"]
        + agg["macs"] / agg["compute_macs_per_s"]
        + agg["bytes_up_raw"] / agg["uplink_bytes_per_s"]
    )
    assert (agg["sim_arrival_s"] - agg["sim_dispatch_s"] <= 1.0 + 1e-9).all()
    assert (raw_time > 1.0).any()


def test_a_client_the_rule_does_not_train_is_billed_its_encoded_download_only(tabs):
    c = tabs["clients"]
    for run_id, g in c.groupby("run_id"):
        left = g[g["outcome"] != "aggregated"]
        agg = g[g["outcome"] == "aggregated"]
        assert len(left) > 0, run_id
        assert (left["bytes_up"] == 0).all() and (left["bytes_secagg"] == 0).all()
        if run_id == "secagg":
            # the protocol's messages down (172 N bytes with N = K neighbours, by the wire format
            # of fedsim.wire.secagg's table: 68 N keys + 100 N shares + 4 N survivor ids) are
            # billed only to the clients that took part
            assert (agg["bytes_down"] - left["bytes_down"].iloc[0] == 172 * K).all()
            assert (left["bytes_down"] == left["bytes_down_raw"]).all()
        else:
            assert (left["bytes_down"] == agg["bytes_down"].iloc[0]).all()
        if run_id == "topk":  # the fp16 broadcast: half the float32 model plus 2 + 4 ndim bytes a tensor
            assert (left["bytes_down"] < 0.55 * left["bytes_down_raw"]).all()


def test_secure_aggregation_bills_the_protocol_to_every_aggregated_client(tabs):
    c = tabs["clients"]
    agg = c[(c["run_id"] == "secagg") & (c["outcome"] == "aggregated")]
    # 64 + 136 N up and 172 N down (fedsim.wire.secagg's table), N = min(K, n - 1)
    assert (agg["bytes_secagg"] == 64 + 136 * K + 172 * K).all()
    n = 5  # clients_per_round
    ring = secagg.ring_bits(8, n)
    assert ring == 8 + 3
    assert (agg["bytes_up"] - (64 + 136 * K) < agg["bytes_up_raw"] * ring / 32 + 64).all()


def test_the_dry_run_projects_every_wire_column_and_the_simulated_time(tabs):
    from fedsim import dryrun

    cfg = config.parse(iid(RUNS))
    sizes, projected = dryrun.project_experiment(cfg)
    assert sizes.exact
    logged = tabs["rounds"]
    cols = ["bytes_up", "bytes_down", "bytes_up_raw", "bytes_down_raw", "bytes_secagg", "flops"]
    for p in projected:
        got = logged[logged["run_id"] == p.run_id].reset_index(drop=True)
        dry = pd.DataFrame([{k: getattr(x, k) for k in cols} for x in p.rounds])
        pd.testing.assert_frame_equal(dry, got[cols], check_dtype=False)
        assert [x.sim_time_s for x in p.rounds] == pytest.approx(got["sim_time_s"].tolist(), abs=1e-9)


def test_an_asynchronous_run_with_a_codec_is_refused_in_one_line():
    r = raw([{"algorithm": "fedbuff", "rounds": 2, "buffer_size": 2, "uplink": {"codec": "fp16"}}])
    with pytest.raises(config.FedsimError, match=r"runs\.0\.uplink.*asynchronous") as err:
        config.parse(r)
    assert "\n" not in str(err.value)

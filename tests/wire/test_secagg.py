"""Secure aggregation's cost model: its bytes by hand, its fixed-point arithmetic, the engine."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedsim.errors import FedsimError
from fedsim.wire import secagg
from tests.helpers import cfg_for, run_all, toy


def test_protocol_bytes_by_hand():
    # secagg, n = 3 -> N = 2 neighbours.
    # up: 2 keys (64) + 2 encrypted shares (28 + 2 x 4 ids + 2 x 32 shares = 100 each) + 2 x (4 + 32)
    # down: 2 x (4 + 64) keys + 2 x 100 ciphertexts + 2 x 4 survivor ids
    assert secagg.protocol_bytes("secagg", None, 3) == (64 + 200 + 72, 136 + 200 + 8)
    # secagg_plus with k = 1 in a cohort of 5: one neighbour; k is capped at n - 1
    assert secagg.protocol_bytes("secagg_plus", 1, 5) == (64 + 100 + 36, 68 + 100 + 4)
    assert secagg.protocol_bytes("secagg_plus", 9, 5) == secagg.protocol_bytes("secagg", None, 5)


@pytest.mark.parametrize(
    ("bits", "n", "ring"), [(16, 1, 16), (16, 2, 17), (16, 10, 20), (8, 1024, 18), (8, 1025, 19)]
)
def test_ring_is_wide_enough_for_the_sum_never_to_wrap(bits, n, ring):
    assert secagg.ring_bits(bits, n) == ring
    assert n * (2**bits - 1) < 2**ring  # the largest possible sum fits


def test_masked_vector_bytes():
    tensors = {"w": np.zeros((3, 5)), "b": np.zeros(3)}  # 15 and 3 coordinates at R = 20 bits
    assert secagg.masked_bytes(tensors, 20) == 38 + 8


def test_fixed_point_is_unbiased_inside_the_range_and_counts_clipping():
    x = np.array([-0.9, -0.25, 0.0, 0.3, 0.77, 1.5, -3.0], np.float32)
    draws = []
    for i in range(3000):
        out, clipped = secagg.clip_quantize(x, 1.0, 3, np.random.default_rng(i))
        assert clipped == 2
        draws.append(out)
    draws = np.array(draws, dtype=np.float64)
    grid = -1 + 2 * np.arange(8) / 7
    assert np.all(np.min(np.abs(draws[..., None] - grid), axis=-1) < 1e-6)  # on the 3-bit grid
    se = draws.std(axis=0) / np.sqrt(len(draws))
    inside = np.abs(x) <= 1
    assert np.all(np.abs(draws.mean(axis=0) - np.clip(x, -1, 1))[inside] <= 5 * se[inside] + 1e-6)
    assert np.all(draws[:, ~inside] == np.sign(x[~inside]))  # clipped values sit on the range's ends


@pytest.mark.parametrize(
    ("run", "match"),
    [
        (
            {"algorithm": "fedavg", "secure_aggregation": {"protocol": "secagg_plus"}},
            "neighbours' must be >= 1",
        ),
        (
            {"algorithm": "fedavg", "secure_aggregation": {"protocol": "secagg", "neighbours": 3}},
            "does not apply to secagg",
        ),
        (
            {"algorithm": "fedavg", "secure_aggregation": {"protocol": "secagg", "bits": 0}},
            "bits' must be 1..16",
        ),
        (
            {"algorithm": "fedavg", "secure_aggregation": {"protocol": "secagg", "clip": 0.0}},
            "clip' must be > 0",
        ),
        (
            {
                "algorithm": "fedavg",
                "uplink": {"codec": "fp16"},
                "secure_aggregation": {"protocol": "secagg"},
            },
            "cannot carry an uplink codec",
        ),
        ({"algorithm": "fedma", "secure_aggregation": {"protocol": "secagg"}}, "cannot serve fedma"),
        ({"algorithm": "ensemble", "secure_aggregation": {"protocol": "secagg"}}, "cannot serve ensemble"),
    ],
)
def test_bad_secure_aggregation_settings_are_one_line_errors(run, match):
    with pytest.raises(FedsimError, match=match) as err:
        cfg_for(run)
    assert "\n" not in str(err.value)


def test_logged_secure_aggregation_bytes_equal_the_projection(tmp_path):
    """Projected == logged, and each client's bytes by hand: 3 clients of the digits CNN
    (38,282 parameters in 8 tensors), 16 bits, R = 16 + ceil(log2 3) = 18."""
    from fedsim import dryrun
    from fedsim.io.runlog import RunLog

    runs = [
        {"algorithm": "fedavg", "rounds": 2, "secure_aggregation": {"protocol": "secagg", "clip": 1e-4}},
        {
            "algorithm": "scaffold",
            "rounds": 2,
            "secure_aggregation": {"protocol": "secagg_plus", "neighbours": 1},
        },
    ]
    cfg = cfg_for(runs[0], clients=3)
    cfg = cfg.model_copy(update={"runs": tuple(cfg_for(r, clients=3).runs[0] for r in runs)})
    _, projected = dryrun.project_experiment(cfg)
    dryrun.write_run_dir(cfg, projected, tmp_path / "dry")
    run_all(cfg, toy(n_clients=3), tmp_path / "real")
    cols = ["run_id", "round", "bytes_up", "bytes_down", "bytes_up_raw", "bytes_down_raw", "bytes_secagg"]
    dry = pd.DataFrame(RunLog.read(tmp_path / "dry").rows["rounds"])[cols]
    real = pd.DataFrame(RunLog.read(tmp_path / "real").rows["rounds"])[cols]
    pd.testing.assert_frame_equal(dry, real)
    clients = pd.read_parquet(tmp_path / "real" / "clients.parquet")
    fedavg = clients[clients["run_id"] == "fedavg"]
    shapes = [(16, 1, 3, 3), (16,), (32, 16, 3, 3), (32,), (64, 512), (64,), (10, 64), (10,)]
    masked = sum(-(-int(np.prod(s)) * 18 // 8) for s in shapes)
    assert (fedavg["bytes_up"] == masked + 64 + 136 * 2).all()
    assert (fedavg["bytes_down"] == fedavg["bytes_down_raw"] + 172 * 2).all()
    assert (fedavg["bytes_secagg"] == 64 + 136 * 2 + 172 * 2).all()
    assert (fedavg["secagg_clipped"] > 0).all() and (fedavg["secagg_overflow"] == 0).all()

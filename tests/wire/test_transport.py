"""Encoding a client's upload: deltas, error feedback, bytes; and the engine with a codec on."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedsim import config
from fedsim.engine import api
from fedsim.errors import FedsimError
from fedsim.wire import CODECS, REFUSED, decode_upload, encode_upload, make_codec, upload_bytes
from fedsim.wire.transport import residual_norm
from tests.helpers import cfg_for, resumed_equals_uninterrupted, run_all, tables, tiny_experiment, toy
from tests.wire.test_codecs import PARAMS

LOSSY = [n for n in sorted(PARAMS) if not CODECS[n].lossless]


def upload_and_reference(seed=0):
    rng = np.random.default_rng(seed)
    ref = {
        "w": rng.standard_normal((6, 5)).astype(np.float32),
        "b": rng.standard_normal(6).astype(np.float32),
    }
    up = {
        "w": ref["w"] + 0.1 * rng.standard_normal((6, 5)).astype(np.float32),
        "b": ref["b"] + 0.1 * rng.standard_normal(6).astype(np.float32),
        "count": np.array(7, dtype=np.int64),
        "dc": rng.standard_normal(4).astype(np.float32),  # not in the reference: a delta already
    }
    return up, ref


@pytest.mark.parametrize("name", LOSSY)
def test_upload_bytes_equal_the_encoded_lengths(name):
    codec = make_codec(name, **PARAMS[name])
    up, ref = upload_and_reference()
    encoded, _ = encode_upload(codec, up, ref, np.random.default_rng(0))
    assert sum(m.size for m in encoded.values()) == upload_bytes(codec, up)
    assert all(m.dtype == np.uint8 and m.ndim == 1 for m in encoded.values())


def test_fp16_upload_decodes_to_reference_plus_cast_delta_and_integers_exactly():
    codec = make_codec("fp16")
    up, ref = upload_and_reference()
    encoded, memory = encode_upload(codec, up, ref, np.random.default_rng(0))
    out = decode_upload(codec, encoded, ref)
    assert memory is None
    assert out["count"].dtype == np.int64 and out["count"] == 7
    np.testing.assert_array_equal(
        out["w"], ref["w"] + (up["w"] - ref["w"]).astype(np.float16).astype(np.float32)
    )
    np.testing.assert_array_equal(out["dc"], up["dc"].astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("name", [n for n in LOSSY if CODECS[n].biased])
def test_error_feedback_conserves_the_sum_of_updates(name):
    """Over 6 rounds: sum of transmitted (decoded) deltas + final residual == sum of uncompressed
    deltas, up to float32 rounding (Karimireddy et al. 2019, EF-SGD's e_t recursion)."""
    codec = make_codec(name, **PARAMS[name])
    memory, sent, true = None, {}, {}
    for r in range(6):
        up, ref = upload_and_reference(seed=r)
        encoded, memory = encode_upload(codec, up, ref, np.random.default_rng(r), memory, error_feedback=True)
        out = decode_upload(codec, encoded, ref)
        for k in ("w", "b", "dc"):
            delta = up[k] - ref.get(k, 0)
            true[k] = true.get(k, 0) + delta.astype(np.float64)
            sent[k] = sent.get(k, 0) + (out[k] - ref.get(k, 0)).astype(np.float64)
    for k in true:
        np.testing.assert_allclose(sent[k] + memory["residual"][k], true[k], atol=1e-5)
    assert residual_norm(memory) > 0


def test_without_error_feedback_topk_loses_what_it_drops():
    codec = make_codec("topk", fraction=0.1)
    up, ref = upload_and_reference()
    encoded, memory = encode_upload(codec, up, ref, np.random.default_rng(0))
    out = decode_upload(codec, encoded, ref)
    assert memory is None and np.count_nonzero(out["w"] - ref["w"]) == 3  # k = ceil(0.1 x 30)


def test_powersgd_keeps_its_factors_without_error_feedback():
    codec = make_codec("powersgd", rank=1)
    up, ref = upload_and_reference()
    _, memory = encode_upload(codec, up, ref, np.random.default_rng(0))
    assert set(memory) == {"warm"} and memory["warm"]["w"].shape == (5, 1)


# ---------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("uplink", "match"),
    [
        ({"codec": "quantize", "bits": 0}, r"uplink.bits' must be 1..16"),
        ({"codec": "quantize", "bits": 17}, r"uplink.bits' must be 1..16"),
        ({"codec": "topk", "fraction": 0.0}, r"uplink.fraction' must be in \(0, 1\]"),
        ({"codec": "randk", "fraction": 1.5}, r"uplink.fraction' must be in \(0, 1\]"),
        ({"codec": "powersgd", "rank": 0}, r"uplink.rank' must be >= 1"),
        ({"codec": "qsgd"}, r"uplink.levels' is required"),
        ({"codec": "sign", "bits": 4}, r"uplink.bits' does not apply to codec sign"),
        ({"codec": "quantize", "bits": 4, "error_feedback": True}, r"unbiased"),
        ({"codec": "gzip"}, r"uplink.codec'"),
        (
            {"codec": "topk", "fraction": 0.1, "rotation": True},
            r"uplink.rotation' applies to codecs quantize",
        ),
    ],
)
def test_bad_codec_settings_are_one_line_errors(uplink, match):
    with pytest.raises(FedsimError, match=match) as err:
        cfg_for({"algorithm": "fedavg", "uplink": uplink})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("algorithm", sorted(REFUSED))
def test_codec_on_an_algorithm_it_cannot_serve_is_refused(algorithm):
    with pytest.raises(FedsimError, match=f"a codec cannot serve {algorithm}") as err:
        cfg_for({"algorithm": algorithm, "uplink": {"codec": "fp16"}})
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------ engine


def run_tables(tmp_path, run, name="x"):
    cfg = cfg_for({"rounds": 2, "local_epochs": 1, "batch_size": 8, **run}, clients=2)
    ds = toy()
    run_all(cfg, ds, tmp_path / name)
    return tables(tmp_path / name)


def test_without_a_codec_the_raw_columns_equal_the_wire_columns(tmp_path):
    t = run_tables(tmp_path, {"algorithm": "fedavg"})
    c, r = t["clients"], t["rounds"]
    assert (c["bytes_up_raw"] == c["bytes_up"]).all() and (c["bytes_down_raw"] == c["bytes_down"]).all()
    assert (r["bytes_up_raw"] == r["bytes_up"]).all() and (r["bytes_secagg"] == 0).all()
    assert c["residual_norm"].isna().all()
    assert '"uplink"' not in t["runs"]["config_json"][0]  # a run without a codec dumps as before


@pytest.mark.parametrize("name", LOSSY)
def test_logged_bytes_equal_the_projection_for_every_codec(tmp_path, name):
    run = {"algorithm": "fedavg", "uplink": {"codec": name, **PARAMS[name]}}
    t = run_tables(tmp_path, run)
    plain = run_tables(tmp_path, {"algorithm": "fedavg"}, name="plain")
    from fedsim.algorithms.base import Algorithm  # noqa: F401  (torch is loaded by the run)
    from fedsim.models import build_model

    ds = toy()
    state = build_model("digits_cnn", num_classes=10, input_shape=tuple(ds.input_shape)).state_dict()
    per_client = upload_bytes(make_codec(name, **PARAMS[name]), state)
    c = t["clients"]
    assert (c["bytes_up"] == per_client).all()
    assert (c["bytes_up_raw"] == plain["clients"]["bytes_up"]).all()
    assert (t["rounds"]["bytes_up"] == 2 * per_client).all()
    assert (t["rounds"]["bytes_up_raw"] == plain["rounds"]["bytes_up"]).all()
    pd.testing.assert_series_equal(c["bytes_down"], plain["clients"]["bytes_down"])


def test_fp16_run_differs_from_plain_fedavg_only_by_the_cast(tmp_path):
    a = run_tables(tmp_path, {"algorithm": "fedavg"}, name="a")["rounds"]
    b = run_tables(tmp_path, {"algorithm": "fedavg", "uplink": {"codec": "fp16"}}, name="b")["rounds"]
    assert b["test_accuracy"].iloc[-1] == pytest.approx(a["test_accuracy"].iloc[-1], abs=0.05)
    assert (b["bytes_up"] < a["bytes_up"] * 0.51).all()


@pytest.mark.parametrize(
    "run",
    [
        {"algorithm": "fedavg", "uplink": {"codec": "topk", "fraction": 0.05, "error_feedback": True}},
        {"algorithm": "scaffold", "uplink": {"codec": "powersgd", "rank": 1, "error_feedback": True}},
    ],
)
def test_error_feedback_run_resumes_to_the_uninterrupted_tables(tmp_path, run):
    cfg = cfg_for({"rounds": 3, "local_epochs": 1, "batch_size": 8, **run}, clients=2)
    clean, resumed = resumed_equals_uninterrupted(cfg, toy(), tmp_path)
    for c in (0, 1):  # the residual is in the checkpointed store, and resumed from there
        residual = clean["store"][c]["wire"]["residual"]
        assert any(v.abs().sum() > 0 for v in residual.values())
        for k, v in residual.items():
            assert v.equal(resumed["store"][c]["wire"]["residual"][k])


def test_without_a_codec_the_engine_passes_results_through_untouched():
    """No codec: the worker's and the driver's wire calls return the very same list, so every
    existing column (the accounting ones and the rest) is what it was before codecs existed."""
    from fedsim.wire import decode_results, encode_results

    cfg = cfg_for({"algorithm": "fedavg"})
    results = [object()]
    assert encode_results(cfg.runs[0], 0, [], {}, [], results, object) is results
    assert decode_results(cfg.runs[0], {}, results) is results


def test_dry_run_projects_the_logged_encoded_bytes(tmp_path):
    """Projected == logged for the encoded and the raw bytes, for full rounds (FedAvg), partial
    rounds (FedPart: only the active group is encoded, here rotated), SCAFFOLD's control-variate
    deltas and a rotated 8-bit downlink."""
    from fedsim import dryrun
    from fedsim.io.runlog import RunLog

    runs = [
        {
            "algorithm": "fedavg",
            "rounds": 2,
            "uplink": {"codec": "topk", "fraction": 0.1, "error_feedback": True},
        },
        {
            "algorithm": "fedpart",
            "optimizer": "sgd",
            "lr": 0.05,
            "warmup_rounds": 1,
            "rounds_per_group": 1,
            "uplink": {"codec": "quantize", "bits": 4, "rotation": True},
        },
        {"algorithm": "scaffold", "rounds": 2, "uplink": {"codec": "sign"}, "downlink": {"codec": "bf16"}},
        {
            "algorithm": "fedavg",
            "name": "down",
            "rounds": 2,
            "downlink": {"codec": "quantize", "bits": 8, "rotation": True},
            "uplink": {"codec": "fp16"},
        },
    ]
    cfg = cfg_for(runs[0], clients=2)
    cfg = cfg.model_copy(update={"runs": tuple(cfg_for(r, clients=2).runs[0] for r in runs)})
    _, projected = dryrun.project_experiment(cfg)
    dryrun.write_run_dir(cfg, projected, tmp_path / "dry")
    run_all(cfg, toy(), tmp_path / "real")
    cols = ["run_id", "round", "bytes_up", "bytes_down", "bytes_up_raw", "bytes_down_raw", "bytes_secagg"]
    dry = pd.DataFrame(RunLog.read(tmp_path / "dry").rows["rounds"])[cols]
    real = pd.DataFrame(RunLog.read(tmp_path / "real").rows["rounds"])[cols]
    assert len(real) == 2 + 5 + 2 + 2
    pd.testing.assert_frame_equal(dry, real)
    assert (real["bytes_up"] < real["bytes_up_raw"]).all()
    downlinked = real["run_id"].isin(["scaffold", "down"])
    assert (real["bytes_down"][downlinked] < real["bytes_down_raw"][downlinked]).all()
    assert (real["bytes_down"][~downlinked] == real["bytes_down_raw"][~downlinked]).all()


def test_ray_backend_with_a_codec_equals_the_sequential_backend(ray_local, tmp_path):
    """The encoded broadcast travels to the Ray workers, the encoded uploads back (in the packed
    upload buffer) and the residuals through Ray's object store: both backends log the same
    tables."""
    run = {
        "algorithm": "fedavg",
        "rounds": 2,
        "batch_size": 32,
        "uplink": {"codec": "topk", "fraction": 0.05, "error_feedback": True},
        "downlink": {"codec": "quantize", "bits": 8},
    }
    out = {}
    for backend in ("sequential", "ray"):
        engine = {
            "backend": backend,
            "clients_per_round": 2,
            **({"num_workers": 2} if backend == "ray" else {}),
        }
        cfg = config.parse(tiny_experiment(runs=[run], engine=engine))
        ds = api.prepare(cfg)
        run_dir = tmp_path / backend
        run_dir.mkdir()
        list(api.execute(cfg, ds, run_dir))
        out[backend] = tables(run_dir)
    for name in ("rounds", "clients"):
        pd.testing.assert_frame_equal(out["sequential"][name], out["ray"][name], obj=name)
    assert out["ray"]["clients"]["residual_norm"].notna().all()


def test_downlink_sends_the_model_itself_cast_and_the_integers_exactly():
    from fedsim.wire import decode_broadcast, encode_broadcast

    run = cfg_for({"algorithm": "fedavg", "downlink": {"codec": "fp16"}}).runs[0]
    up, _ = upload_and_reference()
    sent = encode_broadcast(run, 0, 0, up)
    got = decode_broadcast(run, sent)
    assert sum(m.size for m in sent.values()) == upload_bytes(make_codec("fp16"), up)
    np.testing.assert_array_equal(got["w"], up["w"].astype(np.float16).astype(np.float32))
    assert got["count"] == 7 and got["count"].dtype == np.int64


@pytest.mark.parametrize(
    ("downlink", "match"),
    [
        ({"codec": "topk", "fraction": 0.1}, "downlink.codec': the downlink sends the model itself"),
        ({"codec": "sign"}, "downlink.codec'"),
        ({"codec": "fp16", "error_feedback": True}, "downlink.error_feedback' does not apply"),
        ({"codec": "quantize", "bits": 20}, "downlink.bits' must be 1..16"),
    ],
)
def test_bad_downlink_settings_are_one_line_errors(downlink, match):
    with pytest.raises(FedsimError, match=match) as err:
        cfg_for({"algorithm": "fedavg", "downlink": downlink})
    assert "\n" not in str(err.value)

"""``init: independent``: the FedMA paper's FedAvg/FedProx baselines "without a shared
initialisation" (Wang et al., ICLR 2020, App. A; IBM/FedMA main.py: ``local_train`` from each
client's own init, ``averaged_weights``, then ``fedavg_comm``). In round 0 every client trains its
own initialisation, the server sends nothing, and the aggregate averages the independently trained
models; later rounds are ordinary. The default, ``init: shared``, is unchanged.

Starting weights are read from the model each client trains, just before its local update (the
engine's own path: downlink -> client_weights -> load); expected values are rebuilt here from the
seeded random streams and averaged here in numpy, not by calling the code under test.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from fedsim import config, dryrun
from fedsim import params as P
from fedsim.algorithms.base import Algorithm
from fedsim.cli import main
from fedsim.engine import api
from fedsim.engine.backends import SequentialBackend
from fedsim.engine.client import ClientRunner
from fedsim.engine.loop import run_experiment
from fedsim.errors import FedsimError
from fedsim.io import checkpoint
from fedsim.io.runlog import RunLog
from fedsim.models import build_model
from fedsim.rng import torch_rng
from tests.helpers import ACCOUNTING, dataset

SEED = 4
WIDTHS = {"conv1": 4, "conv2": 4, "fc1": 8}
SIZES = (5, 12, 20, 9)  # unequal, so an example-weighted mean differs from a plain one
COMPARED = ["run_id", "round", "phase", "layer", *ACCOUNTING]


def experiment(run: dict, model: str = "digits_cnn", clients_per_round: int = 4) -> dict:
    return {
        "name": "init",
        "seed": SEED,
        "data": {"dataset": "digits", "partition": "iid", "num_clients": len(SIZES)},
        "model": {"name": model, "widths": WIDTHS},
        # the spies of run_recording watch the per-client path (the stacked path equals it:
        # tests/engine/test_vectorize.py)
        "engine": {"backend": "sequential", "clients_per_round": clients_per_round, "vectorize": "never"},
        "runs": [{"local_epochs": 1, "batch_size": 8, "lr": 0.1, **run}],
    }


def fresh_weights(model: str, *stream) -> dict[str, torch.Tensor]:
    """The state_dict of a model built from the (SEED, "init", *stream) generator."""
    return build_model(
        model,
        num_classes=10,
        input_shape=(1, 8, 8),
        widths=WIDTHS,
        generator=torch_rng(SEED, "init", *stream),
    ).state_dict()


def run_recording(raw: dict, tmp_path, monkeypatch, name: str = "run"):
    """Run ``raw`` on :func:`unequal_dataset` with the sequential backend; returns
    ({(round, client): starting state_dict}, {(round, client): (upload, n_examples)}, run dir)."""
    starts, uploads, current = {}, {}, {}
    run_client, local_update = ClientRunner.run, Algorithm.local_update

    def run_spy(self, run, task, *args, **kwargs):
        current["key"] = (task.round, task.client_id)
        return run_client(self, run, task, *args, **kwargs)

    def update_spy(self, ctx):
        starts[current["key"]] = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        upload, loss = local_update(self, ctx)
        uploads[current["key"]] = ({k: v.detach().clone() for k, v in upload.items()}, len(ctx.y))
        return upload, loss

    monkeypatch.setattr(ClientRunner, "run", run_spy)
    monkeypatch.setattr(Algorithm, "local_update", update_spy)  # MOON's calls it through super()
    cfg = config.parse(raw)
    ds = dataset(SIZES)
    out = tmp_path / name
    list(run_experiment(cfg, ds, str(out), SequentialBackend(cfg, ds)))
    monkeypatch.undo()
    return starts, uploads, out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


RUNS = {
    "fedavg": ({"algorithm": "fedavg", "rounds": 1}, "digits_cnn"),
    "fedprox": ({"algorithm": "fedprox", "rounds": 1, "mu": 1.0}, "digits_cnn"),
    "moon": ({"algorithm": "moon", "rounds": 1}, "digits_cnn+moon"),
    # round 0 is FedPart's full-network warm-up; the inner objective's client side must honour init
    "fedpart": (
        {
            "algorithm": "fedpart",
            "warmup_rounds": 1,
            "rounds_per_group": 1,
            "local_objective": "fedprox",
            "lr": 0.01,
        },
        "digits_cnn",
    ),
}


@pytest.mark.parametrize("algorithm", list(RUNS))
def test_round_0_starts_from_each_clients_own_init_only_when_independent(algorithm, tmp_path, monkeypatch):
    run, model = RUNS[algorithm]
    global_init = fresh_weights(model)  # the engine's global model: the (seed, "init", 0, 0) stream
    own = {c: fresh_weights(model, 0, c + 1) for c in range(len(SIZES))}  # FedMA's clients' stream
    starts, _, _ = run_recording(
        experiment({**run, "init": "independent"}, model), tmp_path, monkeypatch, "ind"
    )
    for c in range(len(SIZES)):
        assert same(starts[0, c], own[c]), c
        assert not same(starts[0, c], global_init), c
        for d in range(c):
            assert not same(starts[0, c], starts[0, d]), (c, d)
    shared, _, _ = run_recording(
        experiment({**run, "init": "shared"}, model), tmp_path, monkeypatch, "shared"
    )
    for c in range(len(SIZES)):
        assert same(shared[0, c], global_init), c


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox"])
def test_round_0_aggregate_is_the_example_weighted_mean_of_independent_models(
    algorithm, tmp_path, monkeypatch
):
    # FedMA App. A / IBM/FedMA main.py averaged_weights: sum_j n_j / n * w_j over the locally
    # trained models; round 1 starts every client from it, as ordinary FedAvg/FedProx
    run = {
        "algorithm": algorithm,
        "rounds": 2,
        "init": "independent",
        **({"mu": 1.0} if algorithm == "fedprox" else {}),
    }
    starts, uploads, out = run_recording(experiment(run), tmp_path, monkeypatch)
    cohort = range(len(SIZES))
    n = np.array([uploads[0, c][1] for c in cohort], dtype=np.float64)
    assert n.tolist() == list(SIZES)
    for key in uploads[0, 0][0]:
        stack = np.stack([uploads[0, c][0][key].numpy().astype(np.float64) for c in cohort])  # (J, *shape)
        weighted = np.tensordot(n / n.sum(), stack, axes=1)
        plain = stack.mean(0)
        assert np.abs(weighted - plain).max() > 1e-4, key  # the weighting is visible
        for c in cohort:  # what every client of round 1 received and started from
            np.testing.assert_allclose(starts[1, c][key].numpy(), weighted, rtol=1e-6, atol=1e-7, err_msg=key)
    rounds = pd.read_parquet(out / "rounds.parquet")
    assert rounds["bytes_down"].tolist() == [0, len(SIZES) * P.nbytes(P.to_numpy(uploads[0, 0][0]))]
    if algorithm == "fedprox":
        # nothing was received in round 0, so no proximal anchor: the plain cross-entropy of the
        # authors' local_train (train_net), i.e. exactly FedAvg's round-0 uploads
        _, fedavg, _ = run_recording(
            experiment({"algorithm": "fedavg", "rounds": 1, "init": "independent"}),
            tmp_path,
            monkeypatch,
            "fedavg",
        )
        for c in cohort:
            assert same(uploads[0, c][0], fedavg[0, c][0]), c


def test_round_0_sends_nothing_down_and_the_dry_run_projects_what_the_engine_logs(tmp_path):
    raw = {
        "name": "ind",
        "seed": 3,
        "data": {"dataset": "digits", "partition": "iid", "num_clients": 4},
        "model": {"name": "digits_cnn+moon", "widths": WIDTHS},
        "engine": {"backend": "sequential", "clients_per_round": 3},
        "runs": [
            {"algorithm": a, "init": "independent", "local_epochs": 1, "batch_size": 64, **x}
            for a, x in (
                ("fedavg", {"rounds": 2}),
                ("fedprox", {"rounds": 2}),
                ("moon", {"rounds": 3}),
                ("fedpart", {"warmup_rounds": 1, "rounds_per_group": 1}),
            )
        ]
        + [{"algorithm": "fedavg", "name": "shared", "rounds": 2, "local_epochs": 1, "batch_size": 64}],
    }
    cfg = config.parse(raw)
    _, projected = dryrun.project_experiment(cfg)
    dryrun.write_run_dir(cfg, projected, tmp_path / "dry")
    (tmp_path / "real").mkdir()
    for _ in api.execute(cfg, api.prepare(cfg), tmp_path / "real"):
        pass
    real_log = RunLog.read(tmp_path / "real")
    dry, real = (
        pd.DataFrame(RunLog.read(d).rows["rounds"])[COMPARED] for d in (tmp_path / "dry", tmp_path / "real")
    )
    pd.testing.assert_frame_equal(dry, real)
    state_bytes = P.nbytes(
        build_model("digits_cnn+moon", num_classes=10, input_shape=(1, 8, 8), widths=WIDTHS).state_dict()
    )
    for run_id, rows in real.groupby("run_id", sort=False):
        down = rows["bytes_down"].tolist()
        if run_id == "shared":
            assert down == [3 * state_bytes] * 2
        else:
            assert down == [0] + [3 * state_bytes] * (len(down) - 1), run_id
    clients = pd.DataFrame(real_log.rows["clients"])
    first = clients[(clients["round"] == 0) & (clients["run_id"] != "shared")]
    assert len(first) == 4 * 3 and (first["bytes_down"] == 0).all()
    # the key is logged with each run's config
    logged = {r["run_id"]: json.loads(r["config_json"])["runs"][0]["init"] for r in real_log.rows["runs"]}
    assert logged == {
        "fedavg": "independent",
        "fedprox": "independent",
        "moon": "independent",
        "fedpart": "independent",
        "shared": "shared",
    }


def _write(tmp_path, run: dict) -> str:
    raw = experiment(run, clients_per_round=len(SIZES))
    p = tmp_path / "x.yaml"
    p.write_text(json.dumps(raw))  # JSON is YAML
    return str(p)


@pytest.mark.parametrize("algorithm", ["fedma", "pfnm", "ensemble", "entire_data", "local"])
@pytest.mark.parametrize("init", ["independent", "shared"])
def test_algorithms_with_fixed_init_semantics_reject_the_key(algorithm, init, tmp_path, capsys):
    run = {"algorithm": algorithm, "init": init}
    with pytest.raises(FedsimError, match=r"unknown config key 'runs\.0\.init'; remove it"):
        config.parse(experiment(run, clients_per_round=len(SIZES)))
    # the CLI's bad-input path: a one-line message and exit code 2, before anything runs
    assert main(["run", "--dry-run", _write(tmp_path, run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "runs.0.init" in err
    assert not (tmp_path / "out").exists()
    # without the key they validate, and their stored config has no init, so it reads back (resume)
    cfg = config.parse(experiment({"algorithm": algorithm}, clients_per_round=len(SIZES)))
    assert "init" not in cfg.to_dict()["runs"][0]
    assert config.parse(cfg.to_dict()) == cfg


def test_fedpart_needs_a_warm_up_round_for_independent_init_and_values_are_checked():
    with pytest.raises(FedsimError, match=r"runs\.0\.init'.*warmup_rounds >= 1"):
        config.parse(experiment({"algorithm": "fedpart", "warmup_rounds": 0, "init": "independent"}))
    config.parse(experiment({"algorithm": "fedpart", "warmup_rounds": 0}))
    with pytest.raises(FedsimError, match=r"runs\.0\.init'.*'shared' or 'independent'"):
        config.parse(experiment({"algorithm": "fedavg", "init": "own"}))


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "moon", "fedpart"])
def test_default_is_shared_and_round_trips(algorithm):
    cfg = config.parse(experiment({"algorithm": algorithm}))
    assert cfg.runs[0].init == "shared" and cfg.to_dict()["runs"][0]["init"] == "shared"
    again = config.parse(cfg.to_dict())
    assert again == cfg and again.runs[0].init == "shared"
    indep = config.parse(experiment({"algorithm": algorithm, "init": "independent"}))
    assert config.parse(indep.to_dict()).runs[0].init == "independent" and indep != cfg


def test_a_shared_run_is_bit_identical_to_one_without_the_key(tmp_path):
    base = {"algorithm": "fedprox", "rounds": 2, "mu": 0.5}
    dirs = []
    for name, run in (
        ("omitted", base),
        ("shared", {**base, "init": "shared"}),
        ("independent", {**base, "init": "independent"}),
    ):
        cfg = config.parse(experiment(run))
        ds = dataset(SIZES)
        list(run_experiment(cfg, ds, str(tmp_path / name), SequentialBackend(cfg, ds)))
        dirs.append(tmp_path / name)
    timing = ["wall_seconds", "seconds", "worker", "started_at", "finished_at"]
    tables = []
    for d in dirs:
        rounds = pd.read_parquet(d / "rounds.parquet").drop(columns=timing, errors="ignore")
        clients = pd.read_parquet(d / "clients.parquet").drop(columns=timing, errors="ignore")
        params = checkpoint.load(d, "fedprox")["params"]
        tables.append((rounds, clients, params))
    (r0, c0, p0), (r1, c1, p1), (r2, _, p2) = tables
    pd.testing.assert_frame_equal(r0, r1)
    pd.testing.assert_frame_equal(c0, c1)
    assert same(p0, p1)
    # and the key matters: the independent run differs from the first round on
    assert r2["bytes_down"].iloc[0] == 0 and r0["bytes_down"].iloc[0] > 0
    assert r2["train_loss"].iloc[0] != r0["train_loss"].iloc[0] and not same(p0, p2)

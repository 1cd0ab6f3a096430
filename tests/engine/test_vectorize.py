"""Vectorised cohorts (fedsim.engine.vectorize): stacked local training equals the per-client path
up to floating-point reassociation for every algorithm that allows it, masks clients with fewer
steps (1, 7 and 40 examples, momentum and weight decay on), does not depend on how clients are
grouped or chunked, and falls back to one-by-one training where it cannot stack."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fedsim import config
from fedsim.algorithms import ALGORITHMS, ClientTask
from fedsim.engine import vectorize
from fedsim.engine.backends import SequentialBackend
from fedsim.engine.client import ClientRunner
from fedsim.engine.loop import run_experiment
from fedsim.io import checkpoint
from fedsim.models import MODELS, build_model
from fedsim.models.digits_cnn import DigitsCNN
from tests.helpers import dataset, digits_cnn

SIZES = [1, 7, 40, 13]  # batch 10: 1, 1, 4 and 2 steps per epoch


class DropoutCNN(DigitsCNN):
    """The digits CNN with channel dropout after conv1 and dropout after fc1 (no built-in model
    has dropout)."""

    def build(self, generator: torch.Generator) -> None:
        super().build(generator)
        self.drop_conv = torch.nn.Dropout2d(0.25)
        self.drop_fc = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop_conv(F.relu(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(1)
        return self.fc2(self.drop_fc(F.relu(self.fc1(x))))


class BatchCentredCNN(DigitsCNN):
    """The digits CNN with fc1's activations centred on their batch mean: a layer through which
    examples see each other that no list of module types names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2).flatten(1)
        h = F.relu(self.fc1(x))
        return self.fc2(h - h.mean(0, keepdim=True))


@pytest.fixture(autouse=True)
def test_models(monkeypatch):
    monkeypatch.setitem(MODELS, "digits_cnn_dropout", DropoutCNN)
    monkeypatch.setitem(MODELS, "digits_cnn_centred", BatchCentredCNN)


SMALL_RESNET = {"name": "resnet8", "widths": {"layer1": 4, "layer2": 8, "layer3": 8}}  # BatchNorm
FEDPART = {"warmup_rounds": 1, "rounds_per_group": 1, "cycles": 1}

#: (case id, run keys, model, rounds are set by the run, cohort size): the equality test's cases
CASES = {
    **{name: ({"algorithm": name}, "digits_cnn", 4) for name in ["fedavg", "fedavgm", "fedadam", "fedyogi"]},
    **{name: ({"algorithm": name}, "digits_cnn", 4) for name in ["fedadagrad", "fednova", "fedmedian"]},
    "fedprox": ({"algorithm": "fedprox", "mu": 0.1}, "digits_cnn", 4),
    # a cohort of 3 of 4 clients over 3 rounds: first and returning clients stacked together
    "scaffold": ({"algorithm": "scaffold", "rounds": 3}, "digits_cnn", 3),
    "moon": ({"algorithm": "moon", "rounds": 3, "mu": 1.0}, "digits_cnn+moon", 3),
    "fedavg-batch-centred": ({"algorithm": "fedavg"}, "digits_cnn_centred", 4),
    "fedavg-dropout": ({"algorithm": "fedavg"}, "digits_cnn_dropout", 4),
    "moon-dropout": ({"algorithm": "moon", "rounds": 3, "mu": 1.0}, "digits_cnn_dropout+moon", 3),
    "fedavg-adam": ({"algorithm": "fedavg", "optimizer": "adam", "lr": 0.01}, "digits_cnn", 4),
    "fedpart-sgd": ({"algorithm": "fedpart", "optimizer": "sgd", "lr": 0.05, **FEDPART}, "digits_cnn", 4),
    "fedavg-batchnorm": ({"algorithm": "fedavg"}, SMALL_RESNET, 4),
    "fedavg-batchnorm-local": ({"algorithm": "fedavg", "bn_stats": "local"}, SMALL_RESNET, 3),
    "fedpart-adam-batchnorm": ({"algorithm": "fedpart", "lr": 0.01, **FEDPART}, SMALL_RESNET, 4),
}


def experiment(
    run_keys: dict, vectorize: str, model="digits_cnn", cohort=4, **engine
) -> config.ExperimentConfig:
    run = {
        "rounds": 2,
        "local_epochs": 2,
        "batch_size": 10,
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 1e-3,
    }
    run.update(run_keys)
    if run["algorithm"] == "fedpart":
        run.pop("rounds")
    if run.get("optimizer") == "adam":
        run.pop("momentum")
    return config.parse(
        {
            "name": "vec",
            "seed": 1,
            "data": {"dataset": "digits", "num_clients": len(SIZES)},
            "model": model if isinstance(model, dict) else {"name": model},
            "engine": {
                "backend": "sequential",
                "clients_per_round": cohort,
                "vectorize": vectorize,
                **engine,
            },
            "runs": [run],
        }
    )


def shape_of(cfg) -> tuple[int, ...]:
    return (3, 32, 32) if cfg.model.name.startswith("resnet") else (1, 8, 8)


def run(cfg, tmp_path, tag):
    ds = dataset(SIZES, shape=shape_of(cfg))
    out = tmp_path / tag
    list(run_experiment(cfg, ds, str(out), SequentialBackend(cfg, ds)))
    return (
        pd.read_parquet(out / "clients.parquet"),
        pd.read_parquet(out / "rounds.parquet"),
        checkpoint.load(out, cfg.runs[0].label)["params"],
    )


def test_the_algorithms_that_stack_are_those_with_a_functional_local_update():
    direct = sorted(n for n, cls in ALGORITHMS.items() if cls.vectorizable is True)
    assert direct == sorted(
        ["fedadagrad", "fedadam", "fedavg", "fedavgm", "fedmedian", "fednova", "fedprox", "fedyogi"]
        + ["moon", "scaffold"]
    )
    for objective in ["fedavg", "fedprox", "moon"]:  # FedPart stacks whatever its local objective does
        model = "digits_cnn+moon" if objective == "moon" else "digits_cnn"
        cfg = experiment({"algorithm": "fedpart", "local_objective": objective, **FEDPART}, "auto", model)
        assert ClientRunner(cfg, dataset(SIZES)).algorithm(cfg.runs[0]).vectorizable


def assert_arrays_close(got: dict, want: dict, adam_lr: float | None, steps: int, what: str) -> None:
    """SGD: allclose at rtol 1e-5 (atol 1e-6). Adam divides each gradient element by sqrt(v): an
    element whose gradient is ~0 up to reassociation noise may step by up to lr either way (a
    measured case: 2.6e-5 at lr 0.01 on one of 288 weights after 4 steps). So under Adam every
    element is within steps * lr, and at most 1% of each tensor's elements (and at most 3) lie
    outside the SGD tolerance."""
    assert got.keys() == want.keys(), what
    for k in want:
        g, w = np.asarray(got[k], dtype=np.float64), np.asarray(want[k], dtype=np.float64)
        if adam_lr is None:
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=f"{what} {k}")
            continue
        d = np.abs(g - w)
        assert (d <= steps * adam_lr + 1e-6).all(), f"{what} {k}"
        off = int((d > 1e-6 + 1e-5 * np.abs(w)).sum())
        assert off <= max(3, w.size // 100), f"{what} {k}: {off} of {w.size} elements off"


def test_a_subclass_with_its_own_per_client_loss_is_not_stacked_unless_it_says_so():
    from fedsim.algorithms import FedAvg

    class OwnLoss(FedAvg):
        def batch_loss(self, ctx, x, y):
            objective, ce = super().batch_loss(ctx, x, y)
            return 2 * objective, ce

    class OwnLossStacked(OwnLoss):
        vectorizable = True

        def stacked_loss(self, sctx, tensors, x, y, w, aux):
            objective, ce = super().stacked_loss(sctx, tensors, x, y, w, aux)
            return 2 * objective, ce

    class OnlyAggregates(FedAvg):
        pass

    assert FedAvg.vectorizable and OnlyAggregates.vectorizable
    assert not OwnLoss.vectorizable and OwnLossStacked.vectorizable


@pytest.mark.parametrize("case", list(CASES))
def test_stacked_training_equals_the_per_client_path(case, tmp_path, monkeypatch):
    """Every stacked call of a run is checked against the same clients trained one by one from
    the same inputs (broadcast and stored states): uploads, losses, counts and new states."""
    run_keys, model, cohort = CASES[case]
    cfg = experiment(run_keys, "auto", model, cohort)
    adam = cfg.runs[0].optimizer == "adam"
    checked = []
    real = vectorize.train_stacked

    def both(runner, run_cfg, algo, tasks, received, states=None):
        stacked = real(runner, run_cfg, algo, tasks, received, states)
        for task, got, state in zip(tasks, stacked, states or [None] * len(tasks)):
            want = runner.run(run_cfg, task, received, state)
            what = f"round {task.round} client {task.client_id}"
            lr = task.plan.lr if adam else None
            assert_arrays_close(got.upload, want.upload, lr, want.local_steps, what)
            np.testing.assert_allclose(got.train_loss, want.train_loss, rtol=1e-5, err_msg=what)
            for field in ["n_examples", "local_steps", "bytes_up", "bytes_down", "macs", "trainable_params"]:
                assert getattr(got, field) == getattr(want, field), (what, field)
            assert type(got.state) is type(want.state), what
            for name, value in (vars(want.state) if want.state is not None else {}).items():
                if value is None:
                    assert getattr(got.state, name) is None, (what, name)
                else:
                    assert_arrays_close(
                        getattr(got.state, name), value, lr, want.local_steps, f"{what} {name}"
                    )
            checked.append((task.round, task.client_id))
        return stacked

    monkeypatch.setattr(vectorize, "train_stacked", both)
    _, rounds, _ = run(cfg, tmp_path, "auto")
    assert {r for r, _ in checked} == set(rounds["round"]), "the stacked path was not taken in every round"
    assert len(checked) == cohort * len(rounds)


def _runner_and_tasks(cfg):
    ds = dataset(SIZES, shape=shape_of(cfg))
    runner = ClientRunner(cfg, ds)
    algo = runner.algorithm(cfg.runs[0])
    model = algo.reference_model()
    state = algo.init_state({k: v.detach() for k, v in model.state_dict().items()})
    plan = algo.plan_round(state, 0, tuple(range(len(SIZES))))
    received = {k: v.numpy() for k, v in state.params.items()}
    tasks = [ClientTask("fedavg", 0, c, plan) for c in plan.cohort]
    return runner, algo, tasks, received


def test_a_client_with_fewer_steps_is_masked_not_moved_by_momentum_or_weight_decay():
    cfg = experiment({"algorithm": "fedavg"}, "auto")
    runner, algo, tasks, received = _runner_and_tasks(cfg)
    stacked = vectorize.train_stacked(runner, cfg.runs[0], algo, tasks, received)
    for task, res in zip(tasks, stacked):  # each against the client trained alone, one by one
        alone = runner.run(cfg.runs[0], task, received)
        assert res.local_steps == alone.local_steps and res.n_examples == alone.n_examples
        for k in alone.upload:
            np.testing.assert_allclose(res.upload[k], alone.upload[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("model", ["digits_cnn", "resnet8", "digits_cnn_dropout"])
def test_results_do_not_depend_on_how_clients_are_grouped_or_chunked(model):
    model = SMALL_RESNET if model == "resnet8" else model
    cfg = experiment({"algorithm": "fedprox", "mu": 0.1}, "auto", model)
    runner, algo, tasks, received = _runner_and_tasks(cfg)
    together = vectorize.train_stacked(runner, cfg.runs[0], algo, tasks, received)
    apart = vectorize.train_stacked(runner, cfg.runs[0], algo, tasks[:1], received) + vectorize.train_stacked(
        runner, cfg.runs[0], algo, tasks[1:], received
    )
    for limit in [1, 2]:  # chunks of one client (stacked with its copy) and of two
        chunked_cfg = experiment(
            {"algorithm": "fedprox", "mu": 0.1}, "auto", model, vectorize_max_clients=limit
        )
        r2, a2, t2, rec2 = _runner_and_tasks(chunked_cfg)
        chunked = vectorize.train_stacked(r2, chunked_cfg.runs[0], a2, t2, rec2)
        for x, y, z in zip(together, apart, chunked):
            assert x.train_loss == y.train_loss == z.train_loss
            for k in x.upload:
                assert np.array_equal(x.upload[k], y.upload[k]) and np.array_equal(
                    x.upload[k], z.upload[k]
                ), k


def test_a_chunk_that_runs_out_of_gpu_memory_is_trained_in_halves_with_the_same_results(monkeypatch):
    cfg = experiment({"algorithm": "fedprox", "mu": 0.1}, "auto")
    runner, algo, tasks, received = _runner_and_tasks(cfg)
    whole = vectorize.train_stacked(runner, cfg.runs[0], algo, tasks, received)
    real, sizes = vectorize._train_chunk, []

    def small_gpu(runner, run, algo, chunk, *rest):  # pretend only one client fits at a time
        sizes.append(len(chunk))
        if len(chunk) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(runner, run, algo, chunk, *rest)

    monkeypatch.setattr(vectorize, "_train_chunk", small_gpu)
    halved = vectorize.train_stacked(runner, cfg.runs[0], algo, tasks, received)
    assert sizes == [4, 2, 1, 1, 2, 1, 1]
    for x, y in zip(whole, halved):
        assert x.client_id == y.client_id and x.train_loss == y.train_loss
        assert all(np.array_equal(x.upload[k], y.upload[k]) for k in x.upload)


def test_recurrent_and_alpha_dropout_models_are_not_stacked_and_batchnorm_batches_are_not_padded():
    resnet = build_model("resnet8", num_classes=10, input_shape=(3, 32, 32))
    lstm = build_model("char_lstm", num_classes=80, input_shape=(80,))
    assert vectorize.model_stackable(digits_cnn()) and vectorize.model_stackable(resnet)
    assert vectorize.model_stackable(build_model("digits_cnn_dropout", num_classes=10, input_shape=(1, 8, 8)))
    assert not vectorize.model_stackable(lstm)  # no vmap rule for aten::lstm
    assert not vectorize.model_stackable(
        torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.AlphaDropout(0.5))
    )
    assert vectorize.mixes_batch(resnet) and not vectorize.mixes_batch(digits_cnn())


def test_the_probe_finds_layers_that_mix_a_batch_and_stops_padding_for_them():
    for model, exact in [("digits_cnn", False), ("digits_cnn_centred", True), (SMALL_RESNET, True)]:
        cfg = experiment({"algorithm": "fedavg"}, "always", model)
        runner, *_ = _runner_and_tasks(cfg)
        assert vectorize.template(runner, runner.model(None)).exact is exact, model


def test_a_model_without_a_vmap_rule_trains_one_by_one():
    cfg = experiment({"algorithm": "fedavg"}, "auto")
    runner, algo, tasks, _ = _runner_and_tasks(cfg)
    assert vectorize.stackable(runner, cfg.runs[0], algo, tasks, [None] * 4, [None] * 4)

    class NoRule(torch.nn.Module):  # .item() inside forward: a data-dependent op vmap refuses
        def forward(self, x):
            return x * float(x.sum().item() > 0)

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10), NoRule())
    assert vectorize.template(runner, model) is None


def test_always_on_an_algorithm_that_cannot_stack_says_so_once_and_trains_one_by_one(tmp_path, capsys):
    cfg = experiment({"algorithm": "fedavg"}, "always")
    cfg = cfg.model_copy(update={"runs": (config.parse({"runs": [{"algorithm": "ensemble"}]}).runs[0],)})
    ds = dataset(SIZES)
    list(run_experiment(cfg, ds, str(tmp_path), SequentialBackend(cfg, ds)))
    err = capsys.readouterr().err
    assert err.count("engine.vectorize is always") == 1 and "one by one" in err
    assert "ensemble's clients cannot be stacked" in err


def test_always_on_a_recurrent_model_says_so_once_and_trains_one_by_one(tmp_path, capsys, monkeypatch):
    class WithLSTM(DigitsCNN):  # an LSTM layer (unused in forward) is enough to refuse stacking
        def build(self, generator):
            super().build(generator)
            self.rnn = torch.nn.LSTM(4, 4)

    monkeypatch.setitem(MODELS, "digits_cnn_lstm", WithLSTM)
    calls = []
    real = vectorize.train_stacked
    monkeypatch.setattr(vectorize, "train_stacked", lambda *a: calls.append(1) or real(*a))
    cfg = experiment({"algorithm": "fedavg"}, "always", "digits_cnn_lstm")
    ds = dataset(SIZES)
    list(run_experiment(cfg, ds, str(tmp_path), SequentialBackend(cfg, ds)))
    err = capsys.readouterr().err
    assert err.count("engine.vectorize is always") == 1 and "recurrent" in err and not calls


def test_ray_backend_gives_the_sequential_tables_with_stacking_on(ray_local, tmp_path):
    from fedsim.engine import api

    seq = experiment({"algorithm": "fedavgm"}, "auto")
    _, r0, w0 = run(seq, tmp_path, "seq")
    ray_cfg = experiment({"algorithm": "fedavgm"}, "auto", backend="ray", num_workers=2)
    ds = dataset(SIZES)
    (tmp_path / "ray").mkdir()
    list(api.execute(ray_cfg, ds, tmp_path / "ray"))
    r1 = pd.read_parquet(tmp_path / "ray" / "rounds.parquet")
    w1 = checkpoint.load(tmp_path / "ray", "fedavgm")["params"]
    cols = ["round", "test_accuracy", "test_loss", "train_loss", "bytes_up", "bytes_down", "flops"]
    pd.testing.assert_frame_equal(r1[cols], r0[cols])
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_auto_is_the_default_and_on_a_cpu_stacks_only_small_models():
    assert config.parse({"runs": [{"algorithm": "fedavg"}]}).engine.vectorize == "auto"
    wide = {"name": "digits_cnn", "widths": {"conv1": 64, "conv2": 128, "fc1": 256}}
    decided = {}
    for mode in ["auto", "always"]:
        for model in ["digits_cnn", wide]:
            cfg = experiment({"algorithm": "fedavg"}, mode, model)
            runner, algo, tasks, _ = _runner_and_tasks(cfg)
            macs = runner.forward_macs(None, runner.model(None))
            key = (mode, macs > vectorize.AUTO_MAX_MACS)
            decided[key] = vectorize.stackable(runner, cfg.runs[0], algo, tasks, [None] * 4, [None] * 4)
    assert decided == {
        ("auto", False): True,
        ("auto", True): False,
        ("always", False): True,
        ("always", True): True,
    }


def test_vectorize_max_clients_must_be_positive():
    from fedsim.errors import FedsimError

    with pytest.raises(FedsimError, match="vectorize_max_clients must be >= 1"):
        experiment({"algorithm": "fedavg"}, "auto", vectorize_max_clients=0)


def test_moon_stacks_states_restored_from_a_checkpoint_as_tensors():
    """A checkpoint restores client state as tensors where it stored arrays
    (fedsim.io.checkpoint); MOON's stacked update reads both alike, BatchNorm statistics included."""
    from fedsim.algorithms import StackedContext
    from fedsim.algorithms.moon import MoonClientState

    cfg = experiment(
        {"algorithm": "moon", "bn_stats": "local"}, "auto", {**SMALL_RESNET, "name": "resnet8+moon"}
    )
    runner, algo, tasks, received = _runner_and_tasks(cfg)
    model = runner.model(None)
    down = runner.tensors(received)
    sctx = StackedContext(model=model, received=down, plan=tasks[0].plan, trainable=())
    weights = {k: v.detach() + 1.0 for k, v in model.state_dict().items()}
    bn = {k: weights[k] for k in algo.bn_keys}
    as_arrays = MoonClientState(
        bn={k: v.numpy() for k, v in bn.items()}, prev={k: v.numpy() for k, v in weights.items()}
    )
    as_tensors = MoonClientState(bn=bn, prev=weights)
    a = algo.stacked_begin(sctx, [as_arrays, None])
    b = algo.stacked_begin(sctx, [as_tensors, None])
    assert a.keys() == b.keys() and any(k.startswith("glob:") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k

"""Helpers shared by the tests: tiny experiment configs, toy datasets, the digits CNN, running an
experiment on the sequential backend and reading its tables back."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd

from fedsim import config
from fedsim import params as P
from fedsim.algorithms import ALGORITHMS, ClientResult
from fedsim.data.base import FederatedDataset, Split
from fedsim.engine.backends import SequentialBackend
from fedsim.engine.loop import run_experiment
from fedsim.io import checkpoint
from fedsim.models import build_model
from fedsim.rng import torch_rng


def tiny_experiment(**over):
    """A raw experiment dict: digits, 6 clients, 3 per round, 2 short rounds, sequential backend."""
    raw = {
        "name": "tiny",
        "seed": 3,
        "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "num_clients": 6},
        "model": {"name": "digits_cnn"},
        "engine": {"backend": "sequential", "clients_per_round": 3},
        "runs": [{"algorithm": "fedavg", "rounds": 2, "local_epochs": 1, "lr": 0.05, "batch_size": 32}],
    }
    for k, v in over.items():
        raw[k] = v
    return raw


def digits_cnn(seed: int | None = None, widths: dict[str, int] | None = None, **kw):
    """The digits CNN for 8x8 images and 10 classes; ``seed``: initialised from the (seed, "init")
    stream, None: from torch's default initialisation."""
    generator = None if seed is None else torch_rng(seed, "init")
    return build_model(
        "digits_cnn", num_classes=10, input_shape=(1, 8, 8), widths=widths, generator=generator, **kw
    )


WIDTHS = {"conv1": 4, "conv2": 4, "fc1": 8}
VOLATILE = ["wall_seconds", "seconds", "worker", "started_at", "finished_at", "versions_json"]


# ------------------------------------------------------------------------------------ helpers


def dataset(sizes, shape=(1, 8, 8), seed=0, n_test=20) -> FederatedDataset:
    """Random 'images' of ``shape``, 10 classes, client j holding sizes[j] contiguous examples,
    ``n_test`` test examples; drawn in the order train x, train y, test x, test y."""
    g = np.random.default_rng(seed)
    n = sum(sizes)
    train = Split(x=g.normal(size=(n, *shape)).astype(np.float32), y=g.integers(0, 10, n).astype(np.int64))
    test = Split(
        x=g.normal(size=(n_test, *shape)).astype(np.float32), y=g.integers(0, 10, n_test).astype(np.int64)
    )
    ends = np.cumsum((0, *sizes))
    idx = [np.arange(ends[j], ends[j + 1]) for j in range(len(sizes))]
    counts = np.stack([np.bincount(train.y[i], minlength=10) for i in idx])
    return FederatedDataset("toy", train, test, 10, shape, idx, counts)


def experiment(
    runs: list[dict], clients: int, per_round: int | None = None, **engine
) -> config.ExperimentConfig:
    """A sequential experiment on ``clients`` clients of a small digits CNN (``WIDTHS``)."""
    return config.parse(
        {
            "name": "opt",
            "seed": 2,
            "data": {"dataset": "digits", "partition": "iid", "num_clients": clients},
            "model": {"name": "digits_cnn", "widths": WIDTHS},
            "engine": {"backend": "sequential", "clients_per_round": per_round or clients, **engine},
            "runs": [{"local_epochs": 1, "batch_size": 8, "lr": 0.1, **r} for r in runs],
        }
    )


def run_all(cfg, ds, out) -> dict[str, dict]:
    """Run ``cfg`` on ``ds`` (sequential backend); run id -> its final checkpoint."""
    list(run_experiment(cfg, ds, str(out), SequentialBackend(cfg, ds)))
    return {r.label: checkpoint.load(out, r.label) for r in cfg.runs}


def tables(run_dir) -> dict[str, pd.DataFrame]:
    out = {}
    for name in ("runs", "rounds", "clients"):
        df = pd.read_parquet(run_dir / f"{name}.parquet")
        out[name] = df.drop(columns=[c for c in VOLATILE if c in df.columns]).reset_index(drop=True)
    return out


def resumed_equals_uninterrupted(cfg, ds, tmp_path) -> tuple[dict, dict]:
    """Run ``cfg`` (one run, 3 rounds, checkpoint_every 1) uninterrupted, and again stopped after
    round 1 and resumed from its checkpoint; asserts the tables agree and returns both final
    checkpoints (uninterrupted, resumed)."""
    (run,) = cfg.runs
    clean = run_all(cfg, ds, tmp_path / "clean")[run.label]
    crashed = tmp_path / "crashed"
    events = run_experiment(cfg, ds, str(crashed), SequentialBackend(cfg, ds))
    for event in events:
        if event["kind"] == "round" and event["round"] == 1:
            break
    events.close()
    assert int(checkpoint.load(crashed, run.label)["round"]) == 1
    list(run_experiment(cfg, ds, str(crashed), SequentialBackend(cfg, ds), resume=True))
    a, b = tables(tmp_path / "clean"), tables(crashed)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_dtype=False, obj=name)
    return clean, checkpoint.load(crashed, run.label)


def result(j: int, upload: dict, n: int, steps: int = 0) -> ClientResult:
    return ClientResult(
        client_id=j,
        round=0,
        upload=P.to_numpy(upload),
        n_examples=n,
        train_loss=0.0,
        bytes_up=0,
        bytes_down=0,
        seconds=0.0,
        local_steps=steps,
    )


def algorithm(name: str, **keys):
    cfg = config.parse(tiny_experiment(runs=[{"algorithm": name, **keys}]))
    return ALGORITHMS[name](cfg.runs[0], cfg)


def make_cifar10(root, per_batch=4, n_test=6):
    """Write a tiny CIFAR-10 in the python-pickle layout under ``root``; returns (train rows
    uint8 (N, 3072), train labels, test rows, test labels)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    g = np.random.default_rng(1)
    train_rows, train_labels = [], []
    for b in range(1, 6):
        rows = g.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in g.integers(0, 10, size=per_batch)]
        with open(folder / f"data_batch_{b}", "wb") as f:
            pickle.dump({"batch_label": f"batch {b}", "data": rows, "labels": labels}, f)
        train_rows.append(rows)
        train_labels += labels
    te_rows = g.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    te_labels = [int(v) for v in g.integers(0, 10, size=n_test)]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "test", "data": te_rows, "labels": te_labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}, f)
    return np.concatenate(train_rows), np.array(train_labels), te_rows, np.array(te_labels)


def toy(shape=(1, 8, 8), n_clients=2, per_client=12, seed=0, n_test=16) -> FederatedDataset:
    return dataset([per_client] * n_clients, shape, seed, n_test)


def cfg_for(run: dict, model="digits_cnn", clients=2):
    return config.parse(
        tiny_experiment(
            data={"dataset": "digits", "num_clients": clients},
            model={"name": model},
            engine={"backend": "sequential", "clients_per_round": clients},
            runs=[run],
        )
    )

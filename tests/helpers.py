"""Helpers shared by the tests (fixtures live in tests/conftest.py).

* experiment configs: :func:`tiny_experiment` (a raw dict), :func:`experiment` (a parsed config
  over the small digits CNN ``WIDTHS``), :func:`cfg_for` (one run on 2 digits clients);
* data: :func:`dataset` and :func:`toy` (random toy datasets), :func:`make_cifar10` (a tiny
  CIFAR-10 on disk);
* models: :func:`digits_cnn`, :func:`gen`, :func:`n_params`, :func:`leaf_calls`,
  :func:`group_modules`;
* running and reading back: :func:`run_all`, :func:`tables` (without the ``VOLATILE`` columns),
  :func:`resumed_equals_uninterrupted`, :func:`only_dir`;
* algorithms: :func:`algorithm` (one built from :func:`tiny_experiment`), :func:`result` (a
  hand-made :class:`ClientResult`).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from fedsim import config
from fedsim import params as P
from fedsim.algorithms import ALGORITHMS, ClientResult
from fedsim.data.base import FederatedDataset, Split
from fedsim.engine.backends import SequentialBackend
from fedsim.engine.loop import run_experiment
from fedsim.io import checkpoint
from fedsim.models import build_model
from fedsim.rng import torch_rng

#: small widths of the digits CNN, for fast runs
WIDTHS = {"conv1": 4, "conv2": 4, "fc1": 8}
#: columns that hold wall-clock times, worker names or the software versions
VOLATILE = ["wall_seconds", "seconds", "worker", "started_at", "finished_at", "versions_json"]
#: rounds.parquet's accounting columns: what a round sent, computed and trained
ACCOUNTING = [
    "bytes_up",
    "bytes_down",
    "cum_bytes_up",
    "cum_bytes_down",
    "cum_bytes",
    "flops",
    "clients",
    "trainable_params",
    "global_params",
]


# ------------------------------------------------------------------------ experiment configs


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


def cfg_for(run: dict, model="digits_cnn", clients=2):
    """:func:`tiny_experiment` with the one run ``run`` on ``clients`` digits clients, all in every
    round, parsed."""
    return config.parse(
        tiny_experiment(
            data={"dataset": "digits", "num_clients": clients},
            model={"name": model},
            engine={"backend": "sequential", "clients_per_round": clients},
            runs=[run],
        )
    )


# ------------------------------------------------------------------------------------- data


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


def toy(shape=(1, 8, 8), n_clients=2, per_client=12, seed=0, n_test=16) -> FederatedDataset:
    """:func:`dataset` with ``n_clients`` clients of ``per_client`` examples each (16 test ones)."""
    return dataset([per_client] * n_clients, shape, seed, n_test)


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


# ----------------------------------------------------------------------------------- models


def digits_cnn(seed: int | None = None, widths: dict[str, int] | None = None, **kw):
    """The digits CNN for 8x8 images and 10 classes; ``seed``: initialised from the (seed, "init")
    stream, None: from torch's default initialisation."""
    generator = None if seed is None else torch_rng(seed, "init")
    return build_model(
        "digits_cnn", num_classes=10, input_shape=(1, 8, 8), widths=widths, generator=generator, **kw
    )


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def leaf_calls(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the parametrised modules in the order the forward pass calls them."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o: calls.append(names[mod]))
        for m in model.modules()
        if any(True for _ in m.parameters(recurse=False))
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return calls


def group_modules(model) -> list[str]:
    """Module names owning each group's tensors, group by group, in order of first appearance."""
    out: list[str] = []
    for g in model.layer_groups():
        for k in g.tensors:
            mod = k.rsplit(".", 1)[0]
            if mod not in out:
                out.append(mod)
    return out


# ------------------------------------------------------------------ running and reading back


def run_all(cfg, ds, out) -> dict[str, dict]:
    """Run ``cfg`` on ``ds`` (sequential backend); run id -> its final checkpoint."""
    list(run_experiment(cfg, ds, str(out), SequentialBackend(cfg, ds)))
    return {r.label: checkpoint.load(out, r.label) for r in cfg.runs}


def tables(run_dir) -> dict[str, pd.DataFrame]:
    """The runs, rounds and clients tables of ``run_dir`` without the ``VOLATILE`` columns."""
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


def only_dir(parent) -> Path:
    """The one directory in ``parent`` (an experiment's run directory); asserts there is exactly one."""
    dirs = [p for p in parent.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


# ------------------------------------------------------------------------------- algorithms


def algorithm(name: str, **keys):
    """The algorithm ``name`` with run keys ``keys``, built on :func:`tiny_experiment`."""
    cfg = config.parse(tiny_experiment(runs=[{"algorithm": name, **keys}]))
    return ALGORITHMS[name](cfg.runs[0], cfg)


def result(j: int, upload: dict, n: int, steps: int = 0) -> ClientResult:
    """A client result of client ``j`` for round 0 carrying ``upload`` and ``n`` examples."""
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

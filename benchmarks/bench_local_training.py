"""Local training alone, stacked against one by one (not a test).

Times ``fedsim.engine.backends.run_tasks`` (what a worker runs for its share of a round) on one
process, without Ray, for ``engine.vectorize: never`` and ``always``: FedAvg, one local epoch,
random inputs of the model's shape. Each figure is the mean of ``--calls`` calls after 3 warm-up
calls. Models: ``digits_cnn`` (8x8 digits), ``moon_cnn`` on 3x32x32 inputs at three widths up to
conv 32/64, fc 512 (a CIFAR-sized CNN), and ``resnet8`` at small widths (BatchNorm: batches are
not padded, so the last batches of an epoch make extra calls). Each row prints the model's
forward multiply-accumulates per example (F, thop's count), which sets where stacking stops
paying on a CPU (the ``engine.vectorize: auto`` rule, ``fedsim.engine.vectorize.AUTO_MAX_MACS``).

Run: ``python benchmarks/bench_local_training.py [--threads 1] [--calls 10]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fedsim import config
from fedsim.algorithms import ClientTask
from fedsim.data.base import FederatedDataset, Split
from fedsim.engine.backends import run_tasks
from fedsim.engine.client import ClientRunner

MODELS = {
    "digits_cnn": ({"name": "digits_cnn"}, (1, 8, 8)),
    "moon_cnn 4/8/64": ({"name": "moon_cnn", "widths": {"conv1": 4, "conv2": 8, "fc1": 64}}, (3, 32, 32)),
    "moon_cnn 8/16/128": ({"name": "moon_cnn", "widths": {"conv1": 8, "conv2": 16, "fc1": 128}}, (3, 32, 32)),
    "moon_cnn 32/64/512": (
        {"name": "moon_cnn", "widths": {"conv1": 32, "conv2": 64, "fc1": 512}},
        (3, 32, 32),
    ),
    "resnet8 8/16/32": (
        {"name": "resnet8", "widths": {"layer1": 8, "layer2": 16, "layer3": 32}},
        (3, 32, 32),
    ),
}
SHAPES = [(5, 14, 16), (10, 29, 10), (25, 50, 10)]  # clients, examples each, batch size


def toy(clients: int, examples: int, shape) -> FederatedDataset:
    g = np.random.default_rng(0)
    n = clients * examples
    train = Split(x=g.normal(size=(n, *shape)).astype(np.float32), y=g.integers(0, 10, n).astype(np.int64))
    test = Split(x=train.x[:10], y=train.y[:10])
    idx = [np.arange(i * examples, (i + 1) * examples) for i in range(clients)]
    return FederatedDataset(
        "toy", train, test, 10, shape, idx, np.stack([np.bincount(train.y[i], minlength=10) for i in idx])
    )


def seconds(
    model: dict, shape, clients: int, examples: int, batch: int, mode: str, calls: int
) -> tuple[float, int]:
    """Mean seconds of one ``run_tasks`` call, and the model's forward MACs per example."""
    ds = toy(clients, examples, shape)
    cfg = config.parse(
        {
            "name": "local",
            "data": {"dataset": "digits", "num_clients": clients},
            "model": model,
            "engine": {"backend": "sequential", "clients_per_round": clients, "vectorize": mode},
            "runs": [{"algorithm": "fedavg", "rounds": 1, "batch_size": batch}],
        }
    )
    runner, run = ClientRunner(cfg, ds), cfg.runs[0]
    algo = runner.algorithm(run)
    state = algo.init_state({k: v.detach() for k, v in runner.model(None).state_dict().items()})
    plan = algo.plan_round(state, 0, tuple(range(clients)))
    received = {k: v.numpy().copy() for k, v in state.params.items()}
    tasks = [ClientTask("local", 0, c, plan) for c in plan.cohort]
    none = [None] * clients
    for _ in range(3):
        run_tasks(runner, run, tasks, received, none, none)
    t0 = time.perf_counter()
    for _ in range(calls):
        run_tasks(runner, run, tasks, received, none, none)
    return (time.perf_counter() - t0) / calls, runner.forward_macs(None, runner.model(None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} torch thread(s); mean of {args.calls} calls after 3 warm-up calls")
    print(
        f"{'model':20s} {'F (MACs)':>10s} {'clients x examples, batch':>26s} {'one by one':>11s} "
        f"{'stacked':>9s} {'ratio':>6s}"
    )
    for name, (model, shape) in MODELS.items():
        for clients, examples, batch in SHAPES:
            one, macs = seconds(model, shape, clients, examples, batch, "never", args.calls)
            stacked, _ = seconds(model, shape, clients, examples, batch, "always", args.calls)
            print(
                f"{name:20s} {macs:10,d} {f'{clients} x {examples}, {batch}':>26s} {one * 1e3:9.1f}ms "
                f"{stacked * 1e3:7.1f}ms {stacked / one:6.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

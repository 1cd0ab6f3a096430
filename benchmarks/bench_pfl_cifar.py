"""Vectorised cohorts on pfl-research's CIFAR-10 benchmark shape (not a test).

Shape (pfl-research, Granqvist et al. 2024, its CIFAR-10 simulation benchmark): 1,000 clients x
50 images, cohort 50, 1 local epoch, batch 10 (5 local steps per client), FedAvg. The images are
CIFAR-shaped synthetic tensors (3 x 32 x 32, normal noise, 10 random labels): no dataset can be
downloaded here, and the timing does not depend on the pixels. The model is fedsim's
``moon_cnn`` at widths conv1 32, conv2 64, fc1 512 (5x5 convolutions with max-pooling, then
fully connected layers): the shape of pfl's small CIFAR CNN, not its exact layers; fedsim has no
model of that exact architecture.

Each configuration runs in its own process on the sequential backend (``engine.backend:
sequential``, every client of a round in one call, torch with ``--threads`` threads), so the
peak resident memory of the process (``ru_maxrss``) is its own. Reported: the median seconds per
round over rounds 1..R-1 (round 0 includes the first call's warm-up), for ``engine.vectorize:
never`` (one client after another) and ``always`` (the cohort stacked, in chunks of
``--max-clients``; ``auto`` would not stack this model on a CPU, see ``AUTO_MAX_MACS`` in
``fedsim/engine/vectorize.py``), and their ratio. Repeats are interleaved.

Run: ``python benchmarks/bench_pfl_cifar.py [--rounds 4] [--repeats 2] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

CLIENTS, PER_CLIENT, COHORT, BATCH = 1000, 50, 50, 10


def one(mode: str, rounds: int, threads: int, max_clients: int) -> dict:
    import numpy as np
    import torch

    from fedsim import config
    from fedsim.data.base import FederatedDataset, Split
    from fedsim.engine.backends import SequentialBackend
    from fedsim.engine.loop import run_experiment

    torch.set_num_threads(threads)
    g = np.random.default_rng(0)
    n = CLIENTS * PER_CLIENT
    train = Split(x=g.normal(size=(n, 3, 32, 32)).astype(np.float32), y=g.integers(0, 10, n).astype(np.int64))
    test = Split(
        x=g.normal(size=(500, 3, 32, 32)).astype(np.float32), y=g.integers(0, 10, 500).astype(np.int64)
    )
    idx = [np.arange(i * PER_CLIENT, (i + 1) * PER_CLIENT) for i in range(CLIENTS)]
    counts = np.stack([np.bincount(train.y[i], minlength=10) for i in idx])
    ds = FederatedDataset("cifar-shaped", train, test, 10, (3, 32, 32), idx, counts)
    cfg = config.parse(
        {
            "name": "pfl-cifar",
            "seed": 0,
            "data": {"dataset": "digits", "num_clients": CLIENTS},
            "model": {"name": "moon_cnn", "widths": {"conv1": 32, "conv2": 64, "fc1": 512}},
            "engine": {
                "backend": "sequential",
                "clients_per_round": COHORT,
                "eval_every": rounds,
                "vectorize": mode,
                "vectorize_max_clients": max_clients,
            },
            "runs": [
                {"algorithm": "fedavg", "rounds": rounds, "local_epochs": 1, "batch_size": BATCH, "lr": 0.05}
            ],
        }
    )
    stamps = []
    with tempfile.TemporaryDirectory() as out:
        for event in run_experiment(cfg, ds, out, SequentialBackend(cfg, ds)):
            if event["kind"] == "round":
                stamps.append((time.perf_counter(), event["wall_seconds"], event["test_loss"]))
    per_round = [w for _, w, _ in stamps[1:]]
    return {
        "mode": mode,
        "round_s": statistics.median(per_round),
        "loss": stamps[-1][2],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-clients", type=int, default=64)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.rounds, args.threads, args.max_clients)))
        return
    runs = {"never": [], "always": []}
    for _ in range(args.repeats):
        for mode in runs:
            cmd = [sys.executable, __file__, "--one", mode, "--rounds", str(args.rounds)]
            cmd += ["--threads", str(args.threads), "--max-clients", str(args.max_clients)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"pfl-research CIFAR-10 shape: {CLIENTS} clients x {PER_CLIENT} images, cohort {COHORT}, 1 epoch, "
        f"batch {BATCH}; moon_cnn at conv 32/64, fc 512; {args.threads} torch threads; "
        f"medians of {args.repeats} runs of rounds 1..{args.rounds - 1}"
    )
    med = {}
    for mode, rs in runs.items():
        med[mode] = statistics.median(r["round_s"] for r in rs)
        print(
            f"engine.vectorize: {mode:5s}  {med[mode]:.3f} s/round  peak RSS {max(r['peak_rss_mb'] for r in rs):.0f} MB  "
            f"final test loss {rs[0]['loss']:.6f}"
        )
    print(f"per-client / vectorised: {med['never'] / med['always']:.2f}x")


if __name__ == "__main__":
    main()

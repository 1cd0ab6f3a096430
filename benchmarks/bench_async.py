"""Asynchronous against synchronous wall time per client update (not a test).

FedBuff (concurrency 10, buffer 10) and synchronous FedAvg (10 clients a round) on the same 30
digits clients and the same heterogeneous world (two device tiers, as jobs/async_digits.yaml),
Ray backend with 2 workers, stacked training on (``engine.vectorize: always``), 2 local epochs,
batch 16. Both aggregate 10 client updates per row of rounds.parquet. The wall time per client
update is measured from the outside, from the first round's (server step's) event to the last,
divided by the updates aggregated in between, so start-up is left out and evaluation and writing
are in for both. Runs alternate, sync first, and the medians over ``--repeats`` are compared.

Target (docs/performance.md): asynchronous <= 1.2 x synchronous per client update, so the event
simulation does not serialise training.

Run: ``python benchmarks/bench_async.py [--rounds 30] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import pandas as pd
from _common import timed_fedsim_run

TARGET = 1.2

WORLD = {
    "devices": {
        "tiers": [
            {
                "name": "fast",
                "fraction": 0.7,
                "compute_macs_per_s": 1.0e8,
                "uplink_bytes_per_s": 1.25e6,
                "downlink_bytes_per_s": 6.25e6,
                "latency_s": 0.05,
            },
            {
                "name": "slow",
                "fraction": 0.3,
                "compute_macs_per_s": 1.0e7,
                "uplink_bytes_per_s": 1.25e5,
                "downlink_bytes_per_s": 6.25e5,
                "latency_s": 0.2,
            },
        ]
    }
}


def config(run: dict):
    from fedsim import config as C

    return C.parse(
        {
            "name": "bench-async",
            "seed": 0,
            "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "num_clients": 30},
            "model": {"name": "digits_cnn"},
            "engine": {"backend": "ray", "clients_per_round": 10, "num_workers": 2, "vectorize": "always"},
            "system": WORLD,
            "runs": [{"local_epochs": 2, "lr": 0.05, "batch_size": 16, **run}],
        }
    )


def per_update(run: dict) -> float:
    """Wall seconds per aggregated client update between the first and the last row's event."""
    from fedsim.engine import api

    cfg = config(run)
    ds = api.prepare(cfg)
    with tempfile.TemporaryDirectory() as out:
        t = timed_fedsim_run(cfg, ds, out)
        rounds = pd.read_parquet(f"{t['run_dir']}/rounds.parquet")
    updates = int(rounds["clients"].iloc[1:].sum())
    return (t["t_round"][-1] - t["t_round"][0]) / updates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from fedsim.engine import api

    api.start_ray(config({"algorithm": "fedavg"}))
    sync, asyn = [], []
    for _ in range(args.repeats):
        sync.append(per_update({"algorithm": "fedavg", "rounds": args.rounds}))
        asyn.append(
            per_update({"algorithm": "fedbuff", "rounds": args.rounds, "concurrency": 10, "buffer_size": 10})
        )
        print(f"sync {sync[-1] * 1e3:.1f} ms/update, async {asyn[-1] * 1e3:.1f} ms/update", flush=True)
    a, s = statistics.median(asyn), statistics.median(sync)
    print(
        f"median of {args.repeats}: async {a * 1e3:.1f} ms per client update, sync {s * 1e3:.1f} ms: "
        f"{a / s:.2f}x (target <= {TARGET}x: {'met' if a / s <= TARGET else 'NOT met'})"
    )


if __name__ == "__main__":
    main()

"""The virtual clock's cost per round (not a test): what the clock adds to a round's wall time.

Two measurements, both on FedAvg with the digits CNN, 10 clients a round, 2 local epochs, batch 16,
the sequential backend (the clock's code runs on the driver whatever the backend):

* inside the run: the clock's own calls in each round (``RunClock.cohort``, ``project`` and
  ``complete``) are wrapped with timers, and their seconds are divided by the rounds' wall seconds
  (``rounds.parquet``). This share is what the target bounds. Building the world (every client's
  device and availability phase, once per experiment) is timed apart: a start-up cost, not a
  round's.
* back to back: the same experiment without a ``system:`` section, median seconds per round of
  both (noisy on a shared machine; the share above is the robust figure).

The world: log-normal compute speeds and uplinks, a daily availability cycle and a deadline with
partial work, over ``--clients`` clients (default 30 and 10,000: the cohort sampler looks at every
client's availability each round).

Target (docs/performance.md): the clock adds under 5% to a round's wall time.

Run: ``python benchmarks/bench_clock.py [--clients 30 10000] [--rounds 20] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

TARGET = 0.05

WORLD = {
    "devices": {
        "compute_macs_per_s": {"distribution": "lognormal", "median": 1.0e8, "sigma": 1.0},
        "uplink_bytes_per_s": {"distribution": "lognormal", "median": 1.25e6, "sigma": 1.0},
        "downlink_bytes_per_s": 6.25e6,
        "latency_s": 0.05,
    },
    "availability": {"kind": "daily", "on_fraction": 0.5, "period_s": 86400.0},
    "mode": "deadline",
    "deadline_s": 5.0,
    "partial_work": True,
}


def config(clients: int, rounds: int, system: bool):
    from fedsim import config as C

    raw = {
        "name": "bench-clock",
        "seed": 0,
        "data": {
            "dataset": "synthetic",
            "partition": "natural",
            "num_clients": clients,
            "examples_per_client": 40,
        }
        if clients > 1000
        else {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "num_clients": clients},
        "model": {"name": "logreg" if clients > 1000 else "digits_cnn"},
        "engine": {"backend": "sequential", "clients_per_round": 10},
        "runs": [{"algorithm": "fedavg", "rounds": rounds, "local_epochs": 2, "lr": 0.05, "batch_size": 16}],
    }
    if system:
        raw["system"] = WORLD
    return C.parse(raw)


def measure(clients: int, rounds: int, system: bool) -> tuple[float, float, float]:
    """(median wall seconds per round over rounds 1.., the clock's seconds in rounds / the rounds'
    wall seconds, seconds to build the world)."""
    import pandas as pd

    from fedsim.engine import api, timing
    from fedsim.system import world as W

    spent, built = [0.0], [0.0]

    def timed(fn, into=spent):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                into[0] += time.perf_counter() - t0

        return wrapper

    originals = {
        (timing.RunClock, n): getattr(timing.RunClock, n)
        for n in ("cohort", "project", "complete", "time_logged")
    }
    for (cls, n), fn in originals.items():
        setattr(cls, n, timed(fn))
    build = W.build_world
    import fedsim.engine.loop as loop

    loop.build_world = timed(build, built)
    try:
        cfg = config(clients, rounds, system)
        ds = api.prepare(cfg)  # its deadline check projects every client once: not a round's cost
        spent[0] = 0.0
        with tempfile.TemporaryDirectory() as out:
            run_dir = api.new_run_dir(out, cfg.name)
            list(api.execute(cfg, ds, run_dir))
            r = pd.read_parquet(Path(run_dir) / "rounds.parquet")
    finally:
        for (cls, n), fn in originals.items():
            setattr(cls, n, fn)
        loop.build_world = build
    wall = r["wall_seconds"].to_numpy()
    return float(statistics.median(wall[1:])), spent[0] / float(wall.sum()), built[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[30, 10000])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    for n in args.clients:
        shares, with_s, without_s, builds = [], [], [], []
        for _ in range(args.repeats):
            per_round, share, build = measure(n, args.rounds, True)
            with_s.append(per_round)
            shares.append(share)
            builds.append(build)
            without_s.append(measure(n, args.rounds, False)[0])
        share = statistics.median(shares)
        a, b = statistics.median(with_s), statistics.median(without_s)
        print(
            f"{n:>6,} clients | clock's calls: {100 * share:.2f}% of round wall time (median of {args.repeats}; "
            f"target < {100 * TARGET:.0f}%: {'met' if share < TARGET else 'NOT met'}) | "
            f"s/round with the clock {a * 1e3:.1f} ms, without {b * 1e3:.1f} ms ({a / b:.3f}x) | "
            f"world built once in {statistics.median(builds):.2f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()

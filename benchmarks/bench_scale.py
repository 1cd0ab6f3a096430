"""Scale: Synthetic(1, 1) with 10 / 100 / 1,000 / 10,000 clients at a fixed cohort (not a test).

For each client count J, a fresh Python process (so nothing is shared between sizes) generates
the data (``fedsim.data.load_federated("synthetic", ...)``), starts a local Ray and runs FedAvg with
the ``logreg`` model through fedsim's public API (``fedsim.engine.api``): 10 clients per round,
1 local epoch, batch 10, lr 0.01 (FedProx's synthetic settings, with 1 epoch instead of 20),
``num_workers: auto`` (one 1-CPU worker per core), 20 rounds. It prints, per J:

* peak memory of the whole process tree, summed PSS and summed RSS (see ``_common.py``: the driver,
  Ray's processes and the ClientWorker processes, sampled every 0.2 s);
* start-up: data generation, ``ray.init``, and the time until round 0 ends (driver actor and
  workers starting, then round 0);
* seconds per round (median over rounds 1..R-1, timed from the outside) and the examples trained
  per round (client sizes are log-normal, so rounds differ in work; the cohorts of larger
  populations can hold much larger clients).

The flat-memory target (docs/performance.md): peak PSS with 10,000 clients <= 1.2 x peak PSS with 10 clients.

``--heterogeneous`` adds a ``system:`` section (docs/heterogeneity.md): log-normal compute speeds
and uplinks, a daily availability cycle, and a deadline with partial work, so every client has a
device and an availability and every round runs the clock; the same target holds for it (issue:
a 10,000-client heterogeneous population within 1.2x the memory of a 10-client one).

Run: ``python benchmarks/bench_scale.py [--clients 10 100 1000 10000] [--rounds 20]
[--examples-per-client N] [--heterogeneous]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import TreeSampler, mb, median, timed_fedsim_run

TARGET = 1.2


HETEROGENEOUS = {
    "devices": {
        "compute_macs_per_s": {"distribution": "lognormal", "median": 1.0e7, "sigma": 1.0},
        "uplink_bytes_per_s": {"distribution": "lognormal", "median": 1.25e5, "sigma": 1.0},
        "downlink_bytes_per_s": 1.25e6,
        "latency_s": {"distribution": "uniform", "low": 0.02, "high": 0.3},
    },
    "availability": {"kind": "daily", "on_fraction": 0.5, "period_s": 600.0},
    "mode": "deadline",
    "deadline_s": 0.05,
    "partial_work": True,
}


def experiment(num_clients: int, rounds: int, epc: int | None, heterogeneous: bool = False):
    from fedsim import config

    data = {
        "dataset": "synthetic",
        "partition": "natural",
        "num_clients": num_clients,
        "synthetic_alpha": 1.0,
        "synthetic_beta": 1.0,
    }
    if epc is not None:
        data["examples_per_client"] = epc
    return config.parse(
        {
            "name": f"bench-scale-{num_clients}",
            "seed": 0,
            "data": data,
            "model": {"name": "logreg"},
            "engine": {"backend": "ray", "clients_per_round": 10, "num_workers": "auto"},
            "runs": [
                {"algorithm": "fedavg", "rounds": rounds, "local_epochs": 1, "lr": 0.01, "batch_size": 10}
            ],
            **({"system": HETEROGENEOUS} if heterogeneous else {}),
        }
    )


def one(num_clients: int, rounds: int, epc: int | None, heterogeneous: bool = False) -> dict:
    """Measure one client count in this process; returns the figures as a dict."""
    import pandas as pd

    from fedsim.data import load_federated
    from fedsim.engine import api

    with TreeSampler(interval=0.2) as mem:
        cfg = experiment(num_clients, rounds, epc, heterogeneous)
        t0 = time.perf_counter()
        d = cfg.data
        ds = load_federated(
            "synthetic",
            partition="natural",
            num_clients=d.num_clients,
            alpha=None,
            data_dir=None,
            seed=cfg.seed,
            examples_per_client=d.examples_per_client,
            synthetic_alpha=d.synthetic_alpha,
            synthetic_beta=d.synthetic_beta,
        )
        data_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        api.start_ray(cfg)
        ray_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as out:
            t = timed_fedsim_run(cfg, ds, out)
            clients = pd.read_parquet(Path(t["run_dir"]) / "clients.parquet")
    gaps = [b - a for a, b in zip(t["t_round"], t["t_round"][1:])]
    per_round = clients.groupby("round")["n_examples"].sum()
    return {
        "clients": num_clients,
        "examples": len(ds.train),
        "data_s": data_s,
        "ray_init_s": ray_s,
        "to_round0_s": t["t_round"][0] - t["t_start"],
        "s_per_round": median(gaps),
        "examples_per_round": float(per_round.iloc[1:].median()),
        "peak_pss": mem.peak_pss,
        "peak_rss": mem.peak_rss,
        "procs": mem.peak_procs,
        "accuracy": t["rounds"][-1]["test_accuracy"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000, 10000])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument(
        "--examples-per-client",
        type=int,
        default=None,
        help="fixed client size instead of FedProx's log-normal sizes",
    )
    ap.add_argument("--heterogeneous", action="store_true", help="devices, availability and a deadline")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.one is not None:
        print(
            "RESULT " + json.dumps(one(args.one, args.rounds, args.examples_per_client, args.heterogeneous))
        )
        return

    rows = []
    for n in args.clients:
        cmd = [sys.executable, __file__, "--one", str(n), "--rounds", str(args.rounds)]
        if args.examples_per_client is not None:
            cmd += ["--examples-per-client", str(args.examples_per_client)]
        if args.heterogeneous:
            cmd.append("--heterogeneous")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"bench_scale: the run with {n} clients failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len("RESULT ") :]))
        r = rows[-1]
        print(
            f"{r['clients']:>6,} clients {r['examples']:>10,} examples | peak PSS {mb(r['peak_pss']):>10s} "
            f"RSS {mb(r['peak_rss']):>10s} ({r['procs']} procs) | start-up: data {r['data_s']:5.2f}s "
            f"ray.init {r['ray_init_s']:5.2f}s to end of round 0 {r['to_round0_s']:5.2f}s | "
            f"{r['s_per_round']:6.3f} s/round ({r['examples_per_round']:,.0f} examples/round) | "
            f"acc {r['accuracy']:.3f}",
            flush=True,
        )
    small = min(rows, key=lambda r: r["clients"])
    large = max(rows, key=lambda r: r["clients"])
    ratio = large["peak_pss"] / small["peak_pss"]
    print(
        f"peak PSS {large['clients']:,} / {small['clients']:,} clients: {ratio:.2f}x "
        f"(target <= {TARGET}x: {'met' if ratio <= TARGET else 'NOT met'}); "
        f"RSS ratio {large['peak_rss'] / small['peak_rss']:.2f}x"
    )


if __name__ == "__main__":
    main()

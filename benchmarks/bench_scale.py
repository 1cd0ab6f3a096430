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

``--nodes 1 3`` measures scale across Ray nodes instead (issue: hundreds of clients spread over
nodes). For each node count, a fresh process starts a local multi-node cluster with
``ray.cluster_utils.Cluster`` (every node a raylet with its own object store, all on this machine):
``--cluster-cpus`` CPUs in all (default 3), on one node or split evenly over the nodes (3 nodes: a
head and two nodes of 1 CPU each, the shape of docs/cluster.md's tests), 256 MiB of object store
per node. fedsim joins it through ``engine.ray_address`` (so Ray's default inline limit,
100 KiB, applies on both shapes), with ``num_workers: auto`` (one 1-CPU worker per CPU, Ray
placing them on whichever node has a free CPU) and the driver actor on the head. The workload is
the same Synthetic(1, 1) logistic regression, by default 1,000 clients and a cohort of 100. It
prints, per node count:

* client tasks per second: cohort x (R - 1) / seconds of rounds 2..R;
* bytes moved between nodes: the sum over the nodes of the bytes their object managers received
  from other nodes (Ray's ``ray_object_manager_bytes{Type="Received"}`` counter, read from each
  node's metrics endpoint), i.e. objects pulled between object stores (the dataset, and any
  argument or result over the inline limit); objects that travel inside a call's message are
  not counted there. Beside it, the
  bytes fedsim logs for the clients (``clients.parquet`` ``bytes_down`` + ``bytes_up``: what
  the simulated clients send and receive) and the share of the workers not on the head node;
* the driver's memory: the peak RSS and PSS of the driver actor's process (``ray::Driver``), and
  of the submitting process; the whole cluster's peak PSS.

Run: ``python benchmarks/bench_scale.py [--clients 10 100 1000 10000] [--rounds 20]
[--examples-per-client N] [--heterogeneous]``; across nodes:
``python benchmarks/bench_scale.py --nodes 1 3 [--clients 1000] [--cohort 100] [--rounds 10]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
from _common import Poller, TreeSampler, mb, median, timed_fedsim_run

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


def experiment(
    num_clients: int,
    rounds: int,
    epc: int | None,
    heterogeneous: bool = False,
    cohort: int = 10,
    ray_address: str | None = None,
):
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
            "engine": {
                "backend": "ray",
                "clients_per_round": cohort,
                "num_workers": "auto",
                "ray_address": ray_address,
            },
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


NODE_STORE_BYTES = 256 << 20
"""Object store of each node of the ``--nodes`` cluster (bytes)."""

METRICS_INTERVAL_MS = 1000
"""How often each node of the ``--nodes`` cluster reports its metrics (Ray's default: 10 s)."""


class DriverSampler(Poller):
    """Peak RSS and PSS (bytes) of this process and of the driver actor's process (``ray::Driver``,
    found among this process's descendants: a ``Cluster``'s raylets are its children)."""

    def __init__(self, interval: float = 0.2):
        super().__init__(interval)
        self.peak = {"driver_rss": 0, "driver_pss": 0, "submitter_rss": 0, "submitter_pss": 0}

    def poll(self) -> None:
        me = psutil.Process()
        procs = [("submitter", me)]
        for p in me.children(recursive=True):
            try:
                if p.name().startswith("ray::Driver"):
                    procs.append(("driver", p))
            except psutil.Error:
                pass
        for who, p in procs:
            try:
                m = p.memory_full_info()
            except psutil.Error:
                continue
            self.peak[f"{who}_rss"] = max(self.peak[f"{who}_rss"], m.rss)
            self.peak[f"{who}_pss"] = max(self.peak[f"{who}_pss"], m.pss)


def free_port() -> int:
    """A TCP port nothing listens on now (for a node's metrics endpoint)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bytes_received(metrics_ports: list[int]) -> int:
    """Bytes the object managers of the nodes received from other nodes: the sum of Ray's
    ``ray_object_manager_bytes{Type="Received"}`` counters, read from each node's Prometheus
    endpoint (its ``metrics_export_port``)."""
    total = 0.0
    for port in metrics_ports:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        for line in text.splitlines():
            if line.startswith("ray_object_manager_bytes{") and 'Type="Received"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return int(total)


def one_cluster(num_clients: int, rounds: int, epc: int | None, nodes: int, cpus: int, cohort: int) -> dict:
    """Measure ``num_clients`` clients on a local ``nodes``-node cluster of ``cpus`` CPUs in all."""
    import pandas as pd
    import ray
    from ray.cluster_utils import Cluster

    from fedsim.engine import api

    if cpus % nodes:
        raise SystemExit(f"bench_scale: --cluster-cpus {cpus} does not split evenly over {nodes} nodes")
    per_node = cpus // nodes
    ports = [free_port() for _ in range(nodes)]
    node = {"num_cpus": per_node, "object_store_memory": NODE_STORE_BYTES}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **node,
            "metrics_export_port": ports[0],
            "_system_config": {"metrics_report_interval_ms": METRICS_INTERVAL_MS},
        },
    )
    for port in ports[1:]:
        cluster.add_node(**node, metrics_export_port=port)
    cluster.wait_for_nodes()
    cfg = experiment(num_clients, rounds, epc, cohort=cohort, ray_address=cluster.address)
    ds = api.load_data(cfg)
    with TreeSampler(interval=0.5) as tree, DriverSampler() as drv:
        api.start_ray(cfg)
        with tempfile.TemporaryDirectory() as out:
            t = timed_fedsim_run(cfg, ds, out)
            clients = pd.read_parquet(Path(t["run_dir"]) / "clients.parquet")
    time.sleep(3 * METRICS_INTERVAL_MS / 1000)  # every node's counters reported again
    moved = bytes_received(ports)
    ray.shutdown()
    cluster.shutdown()
    rounds_s = t["t_round"][-1] - t["t_round"][0]
    return {
        "nodes": nodes,
        "clients": num_clients,
        "cohort": cohort,
        "workers": int(clients["worker"].nunique()),
        "tasks_per_s": cohort * (rounds - 1) / rounds_s,
        "s_per_round": median([b - a for a, b in zip(t["t_round"], t["t_round"][1:])]),
        "to_round0_s": t["t_round"][0] - t["t_start"],
        "object_bytes_between_nodes": moved,
        "dataset_bytes": int(ds.train.x.nbytes + ds.train.y.nbytes + ds.test.x.nbytes + ds.test.y.nbytes),
        "fedsim_client_bytes": int(clients["bytes_down"].sum() + clients["bytes_up"].sum()),
        "remote_share": (nodes - 1) / nodes,  # one worker per CPU, the same CPUs on every node
        **drv.peak,
        "tree_pss": tree.peak_pss,
        "accuracy": t["rounds"][-1]["test_accuracy"],
    }


def main_nodes(args: argparse.Namespace) -> None:
    for n in args.clients:
        for nodes in args.nodes:
            cmd = [sys.executable, __file__, "--one-cluster", str(n), "--rounds", str(args.rounds)]
            cmd += [
                "--nodes",
                str(nodes),
                "--cluster-cpus",
                str(args.cluster_cpus),
                "--cohort",
                str(args.cohort),
            ]
            if args.examples_per_client is not None:
                cmd += ["--examples-per-client", str(args.examples_per_client)]
            load = os.getloadavg()[0]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"bench_scale: {n} clients on {nodes} node(s) failed:\n{proc.stderr[-3000:]}")
            r = json.loads(lines[-1][len("RESULT ") :])
            print(
                f"{r['nodes']} node(s), {args.cluster_cpus} CPUs, {r['workers']} workers | "
                f"{r['clients']:,} clients, cohort {r['cohort']} | {r['tasks_per_s']:6.1f} client tasks/s, "
                f"{r['s_per_round']:.3f} s/round (round 0 done {r['to_round0_s']:.1f} s after start) | "
                f"between nodes: {r['object_bytes_between_nodes'] / 1e6:.2f} MB of objects "
                f"(dataset {r['dataset_bytes'] / 1e6:.2f} MB); "
                f"fedsim-logged client bytes {r['fedsim_client_bytes'] / 1e6:.2f} MB, "
                f"{r['remote_share']:.0%} of workers off the head | driver actor peak RSS "
                f"{mb(r['driver_rss'])} PSS {mb(r['driver_pss'])}, submitter RSS {mb(r['submitter_rss'])}, "
                f"cluster PSS {mb(r['tree_pss'])} | acc {r['accuracy']:.3f} | load {load:.1f} before, "
                f"{os.getloadavg()[0]:.1f} after",
                flush=True,
            )


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
    ap.add_argument(
        "--nodes", type=int, nargs="+", default=None, help="scale across nodes: node counts, e.g. 1 3"
    )
    ap.add_argument("--cluster-cpus", type=int, default=3, help="--nodes: CPUs of the whole cluster")
    ap.add_argument("--cohort", type=int, default=None, help="clients per round (10; with --nodes 100)")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--one-cluster", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.one_cluster is not None:
        r = one_cluster(
            args.one_cluster,
            args.rounds,
            args.examples_per_client,
            args.nodes[0],
            args.cluster_cpus,
            args.cohort,
        )
        print("RESULT " + json.dumps(r))
        return
    if args.nodes:
        if args.clients == ap.get_default("clients"):
            args.clients = [1000]
        if args.rounds == ap.get_default("rounds"):
            args.rounds = 10
        args.cohort = args.cohort or 100
        main_nodes(args)
        return
    if args.cohort not in (None, 10):
        ap.error("--cohort is for --nodes; the flat-memory sizes use a cohort of 10")
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

"""GPU packing: client tasks per second for VGG-9 at several ``gpus_per_worker`` on one GPU (not a test).

Issue 6 asks, for one GPU and ``gpus_per_worker`` 1, 0.5, 0.25 and 0.125, for the client tasks per
second of VGG-9 on CIFAR-shaped data, the GPU memory per worker, and the fraction that maximises
throughput. For each fraction f, a fresh Python process starts a local Ray that offers the machine's
CPUs and one GPU, and runs FedAvg through fedsim's public API (``fedsim.engine.api``) on random
CIFAR-shaped tensors (throughput does not depend on the pixels): ``vgg9``, ``--clients`` clients of
``--examples`` examples, a cohort of ``--cohort`` per round, 1 local epoch of SGD with batch
``--batch``, ``--rounds`` rounds, ``num_workers: auto`` (so 1/f workers share the GPU), 1 CPU and
1 torch thread per worker, the global model evaluated once, after the last round.

Printed per fraction: the workers, client tasks per second over rounds 1..R-1 (cohort x rounds /
their wall time; round 0 includes CUDA start-up and is left out), seconds per round, and the peak
GPU memory of each worker process as ``nvidia-smi`` reports it (its CUDA context plus what torch's
caching allocator holds: what limits how many workers fit), the mean and largest over workers and
their sum, sampled every 0.2 s. Then the fraction with the highest throughput.

Vectorised cohorts: every fraction runs once per ``--vectorize`` mode (default ``never`` and
``always``: each worker trains its share of the cohort one client after another, or as one stacked
model), so the table compares them at equal packing. ``--workload pfl`` swaps VGG-9 for
pfl-research's CIFAR-10 benchmark shape (1,000 clients x 50 images, cohort 50, batch 10, 1 epoch;
fedsim's ``moon_cnn`` at conv 32/64, fc 512, as ``bench_pfl_cifar.py`` uses).

``--cpu`` runs the same pipeline with CPU workers (1/f workers of 1 CPU each, no GPU, no memory
column) to check the script where no GPU is available; its figures are not the GPU table.

Run: ``python benchmarks/bench_gpu.py [--workload vgg9|pfl] [--vectorize never always]
[--fractions 1 0.5 0.25 0.125] [--rounds 6] [--clients 64] [--examples 250] [--cohort 32]
[--batch 64] [--cpu]`` (``--workload pfl`` sets clients, examples, cohort and batch to its shape).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from _common import Poller, median, timed_fedsim_run


def cifar_shaped(num_clients: int, per_client: int, seed: int = 0):
    """Random CIFAR-10-shaped data: ``per_client`` float32 (3, 32, 32) images per client, 10 classes."""
    import numpy as np

    from fedsim.data.base import FederatedDataset, Split

    g = np.random.default_rng(seed)
    n = num_clients * per_client
    train = Split(x=g.standard_normal((n, 3, 32, 32), dtype=np.float32), y=g.integers(0, 10, n))
    test = Split(x=g.standard_normal((256, 3, 32, 32), dtype=np.float32), y=g.integers(0, 10, 256))
    parts = [np.arange(j * per_client, (j + 1) * per_client, dtype=np.int64) for j in range(num_clients)]
    counts = np.stack([np.bincount(train.y[p], minlength=10) for p in parts]).astype(np.int64)
    return FederatedDataset(
        name="cifar10",
        train=train,
        test=test,
        num_classes=10,
        input_shape=(3, 32, 32),
        client_indices=parts,
        class_counts=counts,
        augment=None,
        client_names=[],
    )


class GpuMemory(Poller):
    """Peak GPU memory per process (MiB) from ``nvidia-smi``, polled while in a ``with``."""

    def __init__(self, interval: float = 0.2):
        super().__init__(interval)
        self.peak: dict[int, int] = {}

    def poll(self) -> None:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
        ).stdout
        for line in out.splitlines():
            pid, used = (x.strip() for x in line.split(","))
            if used.isdigit():
                self.peak[int(pid)] = max(self.peak.get(int(pid), 0), int(used))


WORKLOADS = {
    "vgg9": {"name": "vgg9"},
    "pfl": {"name": "moon_cnn", "widths": {"conv1": 32, "conv2": 64, "fc1": 512}},
}
PFL_SHAPE = {"clients": 1000, "examples": 50, "cohort": 50, "batch": 10}


def one(fraction: float, mode: str, args) -> dict:
    """Measure one fraction and ``engine.vectorize`` mode in this process; returns the figures."""
    from fedsim import config
    from fedsim.engine import api

    cfg = config.parse(
        {
            "name": f"bench-gpu-{fraction}",
            "seed": 0,
            "data": {
                "dataset": "cifar10",
                "partition": "iid",
                "num_clients": args.clients,
                "examples_per_client": args.examples,
                "data_dir": "/nonexistent",
            },
            "model": WORKLOADS[args.workload],
            "engine": {
                "backend": "ray",
                "clients_per_round": args.cohort,
                "num_workers": "auto",
                "cpus_per_worker": 1,
                "gpus_per_worker": 0 if args.cpu else fraction,
                "eval_every": args.rounds,
                "vectorize": mode,
            },
            "runs": [
                {
                    "algorithm": "fedavg",
                    "rounds": args.rounds,
                    "local_epochs": 1,
                    "lr": 0.01,
                    "batch_size": args.batch,
                }
            ],
        }
    )
    dataset = cifar_shaped(args.clients, args.examples)
    api.start_ray(cfg, num_cpus=round(1 / fraction) if args.cpu else None)
    import ray

    from fedsim.engine.pool import pool_size

    workers = pool_size(cfg, ray.cluster_resources())  # 1/f per GPU the local Ray offers
    sampler = GpuMemory() if not args.cpu and shutil.which("nvidia-smi") else None
    with tempfile.TemporaryDirectory() as out:
        if sampler is None:
            t = timed_fedsim_run(cfg, dataset, out)
        else:
            with sampler:
                t = timed_fedsim_run(cfg, dataset, out)
    used = sorted(sampler.peak.values()) if sampler else []
    gaps = [b - a for a, b in zip(t["t_round"], t["t_round"][1:])]
    return {
        "fraction": fraction,
        "mode": mode,
        "workers": workers,
        "gpu": ray.cluster_resources().get("GPU", 0.0),
        "tasks_per_s": args.cohort * len(gaps) / (t["t_round"][-1] - t["t_round"][0]),
        "s_per_round": median(gaps),
        "mem_mib": used,
    }


def gpu_name() -> str:
    if not shutil.which("nvidia-smi"):
        return "no nvidia-smi"
    out = (
        subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()
    )
    return out[0] if out else "no GPU listed by nvidia-smi"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="vgg9")
    ap.add_argument(
        "--vectorize", nargs="+", choices=["never", "always", "auto"], default=["never", "always"]
    )
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--examples", type=int, default=250, help="examples per client")
    ap.add_argument("--cohort", type=int, default=32, help="clients per round")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument(
        "--cpu", action="store_true", help="CPU workers instead of GPU fractions (a check of the script)"
    )
    ap.add_argument("--one", type=float, default=None, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--mode", default="never", help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.workload == "pfl" and args.one is None:
        for k, v in PFL_SHAPE.items():
            setattr(args, k, v)
    if args.rounds < 2:
        ap.error("--rounds must be >= 2 (round 0 is left out of the throughput)")
    if any(not 0 < f <= 1 for f in args.fractions):
        ap.error("--fractions must lie in (0, 1]")
    if args.one is not None:
        print("RESULT " + json.dumps(one(args.one, args.mode, args)))
        return

    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            ap.exit(
                2,
                "bench_gpu: torch sees no GPU on this machine; run it on a machine with one GPU, "
                "or pass --cpu to check the script with CPU workers\n",
            )
    device = "CPU workers (--cpu: a check of the script, not GPU figures)" if args.cpu else gpu_name()
    print(
        f"workload: FedAvg, {args.workload} ({WORKLOADS[args.workload]['name']}), random CIFAR-shaped data, {args.clients} clients x {args.examples} examples, "
        f"cohort {args.cohort}, 1 epoch, batch {args.batch}, {args.rounds} rounds; device: {device}",
        flush=True,
    )
    rows = []
    for f, mode in [(f, m) for f in args.fractions for m in args.vectorize]:
        cmd = [sys.executable, __file__, "--one", str(f), "--mode", mode, "--workload", args.workload] + [
            x
            for k in ("rounds", "clients", "examples", "cohort", "batch")
            for x in (f"--{k}", str(getattr(args, k)))
        ]
        proc = subprocess.run(
            cmd + (["--cpu"] if args.cpu else []),
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(
                f"bench_gpu: the run at gpus_per_worker {f}, vectorize {mode} failed:\n{proc.stderr[-3000:]}"
            )
        r = json.loads(lines[-1][len("RESULT ") :])
        rows.append(r)
        mem = (
            f"GPU memory per worker mean {sum(r['mem_mib']) / len(r['mem_mib']):,.0f} MiB, "
            f"max {max(r['mem_mib']):,} MiB, all {sum(r['mem_mib']):,} MiB ({len(r['mem_mib'])} processes)"
            if r["mem_mib"]
            else "GPU memory n/a"
        )
        label = "cpu workers" if args.cpu else f"gpus_per_worker {f:<5}"
        print(
            f"{label} vectorize {mode:6s} {r['workers']:>2} workers | {r['tasks_per_s']:7.2f} client tasks/s | "
            f"{r['s_per_round']:7.3f} s/round | {mem}",
            flush=True,
        )
    base = next((r for r in rows if r["workers"] == 1), rows[0])
    for mode in args.vectorize:
        best = max((r for r in rows if r["mode"] == mode), key=lambda r: r["tasks_per_s"])
        print(
            f"vectorize {mode}: highest throughput {best['workers']} workers (gpus_per_worker "
            f"{best['fraction']}), {best['tasks_per_s']:.2f} client tasks/s = "
            f"{best['tasks_per_s'] / base['tasks_per_s']:.2f}x {base['workers']} worker(s), vectorize {base['mode']}"
        )


if __name__ == "__main__":
    main()

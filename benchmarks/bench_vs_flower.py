"""fedsim against Flower 1.42's simulation on the same FedAvg workload (not a test).

Workload (the targets in docs/performance.md): sklearn digits, 100 clients with a Dirichlet(0.5) class mixture each
(14 images per client: ``data.examples_per_client: 14``, because digits is too small for FedMA's
hetero-dir recipe at 100 clients; see bench_overhead.py), 10 clients per round, 100 rounds,
FedAvg with 1 local epoch of plain SGD (batch 16, lr 0.05), fedsim's ``digits_cnn`` model, the
global model evaluated on the digits test set after every round. Both frameworks get:

* the same data (``fedsim.data.load_federated``), the same initial weights
  (``build_model(..., generator=torch_rng(0, "init"))``), the same cohorts
  (``fedsim.engine.loop.sample_cohort``: Flower's FedAvg is subclassed so ``configure_train``
  sends round r to the nodes holding those partitions; a one-off query message learns which node
  holds which partition, outside the timed rounds) and the same per-client shuffles and batches
  (``torch_rng(0, "shuffle", round, client)``), so they do the same arithmetic except the
  aggregation (Flower averages in float32 in reply order, fedsim in float64 in cohort order) and
  reach (nearly) the same accuracy;
* a fresh local Ray with 2 CPUs in its own process, and 2 workers of 1 CPU with 1 torch thread
  each (fedsim: ``num_workers: auto``, ``cpus_per_worker: 1``; Flower: ``client_resources
  {num_cpus: 1}``, which Flower turns into 2 Ray actors).

Flower's ClientApp is written as Flower's PyTorch quickstart writes it: each call builds the model,
loads the received weights, trains and returns ``ArrayRecord(model.state_dict())`` with
``num-examples``; the client's data comes from a per-process cache (loaded once per actor).

Printed for each: wall time (from the start of the framework's process, as psutil reports it, to
the run's end: Python, the imports of torch and of the framework, the data, Ray, every round),
the imports among it (until torch, the framework and what the script uses from fedsim are
imported; the script computes fedsim's cohorts for Flower in the parent process, so Flower's
process imports only fedsim's data, model and seed helpers), start-up (from process start until
round 1 is done), the seconds of rounds 2..R, per-round p50 and p95 (rounds 2..R, from
the round-end times: fedsim's event stream, Flower's ``evaluate_fn`` calls), peak memory of the
process tree (summed PSS and RSS, see ``_common.py``; sampled every 0.5 s by the parent process)
and the final test accuracy; then the ratios Flower / fedsim. fedsim runs twice: as configured by
default (``engine.vectorize: auto``, which stacks each worker's clients into one model for this
small CNN; target 6x) and training clients one by one (``engine.vectorize: never``; target 3x).
Each configuration runs ``--repeats`` times (default 1), alternating.

Needs the ``bench`` extra (flwr 1.42). Run: ``python benchmarks/bench_vs_flower.py
[--rounds 100] [--repeats 1]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from _common import TreeSampler, fedsim_child_result, mb, median

SEED, CLIENTS, COHORT, EPC = 0, 100, 10, 14
LR, BATCH, EPOCHS = 0.05, 16, 1
TARGET = 3.0  # fedsim training clients one by one (engine.vectorize: never)
VECTOR_TARGET = 6.0  # fedsim with vectorised cohorts (the default, engine.vectorize: auto)
#: fedsim's configurations: the label in the table -> engine.vectorize
FEDSIM = {"fedsim": "auto", "fedsim never": "never"}
MEMORY_INTERVAL_S = 0.5
"""Seconds between memory samples. One sample of a run's ~12 processes costs 50-60 ms of CPU
(``/proc/PID/smaps_rollup`` of processes that map libtorch); it is taken by the parent, not the
timed process, and every 0.5 s rather than 0.2 s, so that the measuring takes about 11% of one of
the two cores instead of 28%, and none of the timed process's GIL (Flower's server loop runs in it)."""


def load_data():
    from fedsim.data import load_federated

    return load_federated(
        "digits",
        partition="dirichlet",
        num_clients=CLIENTS,
        alpha=0.5,
        data_dir=None,
        seed=SEED,
        examples_per_client=EPC,
    )


def init_ray(cpus: int) -> None:
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)


# ---------------------------------------------------------------- fedsim


def run_fedsim(rounds: int, cpus: int, vectorize: str = "auto") -> dict:
    import importlib

    from fedsim import config
    from fedsim.engine import api

    importlib.import_module("fedsim.data")  # load_data's import, with torch (counted as imports)
    t0 = time.perf_counter()  # imports done
    cfg = config.parse(
        {
            "name": "bench-vs-flower",
            "seed": SEED,
            "data": {
                "dataset": "digits",
                "partition": "dirichlet",
                "alpha": 0.5,
                "num_clients": CLIENTS,
                "examples_per_client": EPC,
            },
            "model": {"name": "digits_cnn"},
            "engine": {
                "backend": "ray",
                "clients_per_round": COHORT,
                "num_workers": "auto",
                "cpus_per_worker": 1,
                "vectorize": vectorize,
            },
            "runs": [
                {
                    "algorithm": "fedavg",
                    "rounds": rounds,
                    "local_epochs": EPOCHS,
                    "lr": LR,
                    "batch_size": BATCH,
                }
            ],
        }
    )
    dataset = load_data()
    api.start_ray(cfg, num_cpus=cpus)  # a local Ray as `fedsim run` starts it
    return fedsim_child_result(cfg, dataset, t0)


# ---------------------------------------------------------------- Flower


def run_flower(rounds: int, cpus: int, cohorts: list[list[int]]) -> dict:
    import torch
    import torch.nn.functional as F
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from fedsim.models import build_model
    from fedsim.rng import torch_rng

    def new_model(init: bool = False):
        return build_model(
            "digits_cnn",
            num_classes=10,
            input_shape=(1, 8, 8),
            generator=torch_rng(SEED, "init") if init else None,
        )

    t0 = time.perf_counter()  # imports done
    cache: dict = {}  # per process: the Ray actor loads the partition data once

    client = ClientApp()

    @client.query()
    def where(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        return Message(RecordDict({"config": ConfigRecord({"partition-id": pid})}), reply_to=msg)

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        if "data" not in cache:
            torch.set_num_threads(1)
            cache["data"] = load_data()
        ds = cache["data"]
        pid = int(context.node_config["partition-id"])
        r = int(msg.content["config"]["server-round"]) - 1
        model = new_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=float(msg.content["config"]["lr"]))
        idx = ds.client_indices[pid]
        x, y = torch.from_numpy(ds.train.inputs(idx)), torch.from_numpy(ds.train.y[idx])
        g = torch_rng(SEED, "shuffle", r, pid)
        model.train()
        for _ in range(EPOCHS):
            order = torch.randperm(len(idx), generator=g)
            for s in range(0, len(idx), BATCH):
                b = order[s : s + BATCH]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[b]), y[b]).backward()
                opt.step()
        content = RecordDict(
            {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": len(idx)})}
        )
        return Message(content=content, reply_to=msg)

    class SameCohorts(FedAvg):
        """FedAvg whose round r trains fedsim's cohort of round r."""

        node_of: dict[int, int] = {}

        def configure_train(self, server_round, arrays, config, grid):
            config["server-round"] = server_round
            nodes = [self.node_of[p] for p in cohorts[server_round - 1]]
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
            return self._construct_messages(record, nodes, MessageType.TRAIN)

    out: dict = {"round_ends": [], "accuracy": None}
    test = load_data().test
    eval_model = new_model()

    @torch.no_grad()
    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        eval_model.load_state_dict(arrays.to_torch_state_dict())
        eval_model.eval()
        acc = float((eval_model(torch.from_numpy(test.x)).argmax(1).numpy() == test.y).mean())
        if server_round > 0:
            out["round_ends"].append(time.perf_counter())
            out["accuracy"] = acc
        return MetricRecord({"accuracy": acc})

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        while len(list(grid.get_node_ids())) < CLIENTS:
            time.sleep(0.05)
        ask = [
            Message(RecordDict({"config": ConfigRecord({})}), message_type=MessageType.QUERY, dst_node_id=n)
            for n in grid.get_node_ids()
        ]
        SameCohorts.node_of = {
            int(m.content["config"]["partition-id"]): m.metadata.src_node_id
            for m in grid.send_and_receive(ask)
        }
        strategy = SameCohorts(
            fraction_train=COHORT / CLIENTS, fraction_evaluate=0.0, min_available_nodes=CLIENTS
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(new_model(init=True).state_dict()),
            num_rounds=rounds,
            train_config=ConfigRecord({"lr": LR}),
            evaluate_fn=evaluate,
        )

    torch.set_num_threads(1)
    init_ray(cpus)
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    return {
        "t0": t0,
        "round_ends": out["round_ends"],
        "t_end": time.perf_counter(),
        "accuracy": out["accuracy"],
    }


# ---------------------------------------------------------------- driver


def process_start() -> float:
    """When this process started, on the ``time.perf_counter`` clock (psutil's creation time:
    10 ms resolution)."""
    import psutil

    return time.perf_counter() - (time.time() - psutil.Process().create_time())


def child(framework: str, rounds: int, cpus: int, cohorts_file: str | None) -> dict:
    start = process_start()
    if framework in FEDSIM:
        res = run_fedsim(rounds, cpus, FEDSIM[framework])
    else:
        with open(cohorts_file) as f:
            res = run_flower(rounds, cpus, json.load(f))
    ends = res["round_ends"]
    gaps = np.diff(ends)  # rounds 2..R
    return {
        "framework": framework,
        "wall": res["t_end"] - start,
        "imports": res["t0"] - start,
        "startup": ends[0] - start,
        "rounds_2_to_R": ends[-1] - ends[0],
        "p50": float(np.percentile(gaps, 50)),
        "p95": float(np.percentile(gaps, 95)),
        "rounds": len(ends),
        "accuracy": res["accuracy"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of each local Ray (= workers of 1 CPU)")
    ap.add_argument("--child", choices=[*FEDSIM, "flower"], help=argparse.SUPPRESS)
    ap.add_argument("--cohorts", help=argparse.SUPPRESS)  # JSON file of the rounds' cohorts (Flower's child)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.rounds, args.cpus, args.cohorts)), flush=True)
        return

    # fedsim's cohorts, computed here so that Flower's process does not import fedsim's engine
    # (which its timed wall time would include)
    from fedsim.engine.loop import sample_cohort

    cohorts = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    with cohorts:
        json.dump([list(sample_cohort(SEED, r, CLIENTS, COHORT)) for r in range(args.rounds)], cohorts)
    results: dict[str, list[dict]] = {fw: [] for fw in [*FEDSIM, "flower"]}
    for _ in range(args.repeats):
        for fw in results:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                fw,
                "--rounds",
                str(args.rounds),
                "--cpus",
                str(args.cpus),
                "--cohorts",
                cohorts.name,
            ]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            with TreeSampler(
                root=proc.pid, interval=MEMORY_INTERVAL_S
            ) as mem:  # from outside the timed process
                stdout, stderr = proc.communicate()
            lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"bench_vs_flower: the {fw} run failed:\n{stderr[-4000:]}\n{stdout[-2000:]}")
            results[fw].append(
                {
                    **json.loads(lines[-1][len("RESULT ") :]),
                    "peak_pss": mem.peak_pss,
                    "peak_rss": mem.peak_rss,
                }
            )

    def med(fw: str, key: str) -> float:
        return median([r[key] for r in results[fw]])

    print(
        f"workload: FedAvg, digits, digits_cnn, {CLIENTS} clients ({EPC} images each, Dir(0.5) classes), "
        f"cohort {COHORT}, {args.rounds} rounds, 1 epoch, batch {BATCH}; {args.cpus} workers x 1 thread; "
        f"medians of {args.repeats} run(s)"
    )
    print(
        f"{'':13s} {'wall':>8s} {'imports':>8s} {'start-up+r1':>12s} {'rounds 2..R':>12s} {'p50/round':>10s} "
        f"{'p95/round':>10s} {'peak PSS':>10s} {'peak RSS':>10s} {'final acc':>9s}"
    )
    for fw in results:
        print(
            f"{fw:13s} {med(fw, 'wall'):7.1f}s {med(fw, 'imports'):7.1f}s {med(fw, 'startup'):11.1f}s "
            f"{med(fw, 'rounds_2_to_R'):11.1f}s "
            f"{med(fw, 'p50') * 1e3:8.1f}ms {med(fw, 'p95') * 1e3:8.1f}ms {mb(med(fw, 'peak_pss')):>10s} "
            f"{mb(med(fw, 'peak_rss')):>10s} {med(fw, 'accuracy'):9.4f}"
        )
    os.unlink(cohorts.name)
    walls = {fw: ", ".join(f"{r['wall']:.1f}" for r in results[fw]) for fw in results}
    print("wall per repeat (s): " + "; ".join(f"{fw} {w}" for fw, w in walls.items()))
    for fw, target in [("fedsim", VECTOR_TARGET), ("fedsim never", TARGET)]:
        wall = med("flower", "wall") / med(fw, "wall")
        rounds = med("flower", "rounds_2_to_R") / med(fw, "rounds_2_to_R")
        print(
            f"Flower / {fw} (engine.vectorize: {FEDSIM[fw]}): wall {wall:.2f}x, rounds 2..R {rounds:.2f}x, "
            f"p50 {med('flower', 'p50') / med(fw, 'p50'):.2f}x, peak PSS "
            f"{med('flower', 'peak_pss') / med(fw, 'peak_pss'):.2f}x; accuracy difference "
            f"{abs(med('flower', 'accuracy') - med(fw, 'accuracy')):.4f} "
            f"(target: >= {target}x faster: {'met' if wall >= target else 'NOT met'} on wall time)"
        )


if __name__ == "__main__":
    main()

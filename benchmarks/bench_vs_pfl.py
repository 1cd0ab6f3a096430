"""fedsim against pfl-research 0.6's PyTorch simulation on the same FedAvg workload (not a test).

Workload (bench_vs_flower's digits workload, IID): sklearn digits, 50 IID clients
(``fedsim.data.load_federated("digits", partition="iid")``: pixels standardised as fedsim's
loader does), cohort 10, 100 rounds, FedAvg with 1 local epoch of plain SGD (batch 10, lr 0.05),
fedsim's ``digits_cnn`` model, the global model evaluated on the digits test set after every
round. Both get identical inputs: the same arrays (pfl's process loads them with fedsim's loader),
the same initial weights (``build_model(..., generator=torch_rng(0, "init"))``) and the same
cohorts (``fedsim.engine.loop.sample_cohort``, fed to pfl through its ``user_sampler``). They
differ in the order of each client's minibatches (fedsim shuffles per (seed, round, client); pfl
0.6's ``Dataset`` batches a client's examples in order) and in the aggregation (pfl averages the
clients' model deltas with weight 1 each, fedsim weights them by their examples; IID clients
hold 28-29 each), so the accuracies are close, not equal.

pfl runs as its benchmarks run it: one process, its ``SimulatedBackend``, torch with 1 thread.
fedsim runs as ``fedsim run`` runs it: a local Ray with 2 CPUs, 2 workers of 1 CPU with 1 torch
thread each, ``engine.vectorize: auto``.

pfl lives in its own virtual environment, so fedsim's dependencies do not change:
``--setup`` creates ``benchmarks/.pfl-venv`` on top of this interpreter's packages (a ``.pth``
file adds them after the venv's own, so torch is shared and pfl's pins, e.g. ``packaging<25.1``,
stay in the venv) and runs ``pip install "pfl[pytorch]==0.6.0"`` there.

Printed for each, medians of ``--repeats`` interleaved runs: wall time (from the process's start,
as psutil reports it, to the run's end), start-up (process start to round 1 done), the seconds of
rounds 2..R, per-round p50 (rounds 2..R), peak memory of the process tree (summed PSS and RSS,
``_common.TreeSampler``) and final test accuracy; then the ratios pfl / fedsim.

Run: ``python benchmarks/bench_vs_pfl.py --setup`` once, then
``python benchmarks/bench_vs_pfl.py [--rounds 100] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import TreeSampler, mb, median, timed_fedsim_run

SEED, CLIENTS, COHORT = 0, 50, 10
LR, BATCH, EPOCHS = 0.05, 10, 1
PFL = "pfl[pytorch]==0.6.0"
ROOT = Path(__file__).resolve().parents[1]
VENV = Path(__file__).resolve().parent / ".pfl-venv"
MEMORY_INTERVAL_S = 0.5  # as bench_vs_flower.py (one sample costs ~50 ms of CPU)


def setup() -> None:
    """Create ``benchmarks/.pfl-venv`` over this interpreter's packages and install pfl there."""
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    site = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "_fedsim_parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", PFL], check=True)


def process_start() -> float:
    """When this process started, on the ``time.perf_counter`` clock (10 ms resolution)."""
    import psutil

    return time.perf_counter() - (time.time() - psutil.Process().create_time())


def load_data():
    from fedsim.data import load_federated

    return load_federated("digits", partition="iid", num_clients=CLIENTS, alpha=0.5, data_dir=None, seed=SEED)


# ---------------------------------------------------------------- fedsim


def run_fedsim(rounds: int) -> dict:
    from fedsim import config
    from fedsim.engine import api

    t0 = time.perf_counter()
    cfg = config.parse(
        {
            "name": "bench-vs-pfl",
            "seed": SEED,
            "data": {"dataset": "digits", "partition": "iid", "num_clients": CLIENTS},
            "model": {"name": "digits_cnn"},
            "engine": {"backend": "ray", "clients_per_round": COHORT, "num_workers": 2, "cpus_per_worker": 1},
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
    api.start_ray(cfg, num_cpus=2)  # a local Ray as `fedsim run` starts it
    with tempfile.TemporaryDirectory() as out:
        t = timed_fedsim_run(cfg, dataset, out)
    return {
        "t0": t0,
        "round_ends": t["t_round"],
        "t_end": time.perf_counter(),
        "accuracy": t["rounds"][-1]["test_accuracy"],
    }


# ---------------------------------------------------------------- pfl


def run_pfl(rounds: int, cohorts: list[list[int]]) -> dict:
    import torch
    import torch.nn.functional as F
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.callback.central_evaluation import CentralEvaluationCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel

    from fedsim.models import build_model
    from fedsim.rng import torch_rng

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ds = load_data()

    class Net(torch.nn.Module):
        """fedsim's digits CNN with the ``loss`` and ``metrics`` that pfl's PyTorchModel calls."""

        def __init__(self):
            super().__init__()
            self.net = build_model(
                "digits_cnn", num_classes=10, input_shape=(1, 8, 8), generator=torch_rng(SEED, "init")
            )

        def forward(self, x):
            return self.net(x)

        def loss(self, x, y, eval=False):
            return F.cross_entropy(self(x), y)

        @torch.no_grad()
        def metrics(self, x, y, eval=False):
            logits = self(x)
            n = len(y)
            return {
                "loss": Weighted(F.cross_entropy(logits, y, reduction="sum").item(), n),
                "accuracy": Weighted((logits.argmax(1) == y).sum().item(), n),
            }

    x, y = torch.from_numpy(ds.train.x), torch.from_numpy(ds.train.y)
    users = {c: Dataset(raw_data=[x[idx], y[idx]], user_id=str(c)) for c, idx in enumerate(ds.client_indices)}
    order = iter([c for cohort in cohorts for c in cohort])  # fedsim's cohorts, round by round
    train = FederatedDataset(lambda c: users[c], lambda: next(order))
    test = Dataset(raw_data=[torch.from_numpy(ds.test.x), torch.from_numpy(ds.test.y)])
    net = Net()
    model = PyTorchModel(
        model=net,
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
    )
    ends: list[float] = []
    accuracy: list[float] = []

    class RoundEnds(TrainingProcessCallback):
        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            ends.append(time.perf_counter())
            accuracy.extend(v.overall_value for k, v in aggregate_metrics if "accuracy" in str(k))
            return False, Metrics()

    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=rounds, evaluation_frequency=1, train_cohort_size=COHORT, val_cohort_size=0
        ),
        backend=SimulatedBackend(training_data=train, val_data=train),
        model=model,
        model_train_params=NNTrainHyperParams(
            local_num_epochs=EPOCHS, local_learning_rate=LR, local_batch_size=BATCH
        ),
        model_eval_params=NNEvalHyperParams(local_batch_size=1000),
        callbacks=[
            CentralEvaluationCallback(test, model_eval_params=NNEvalHyperParams(local_batch_size=1000)),
            RoundEnds(),
        ],
    )
    return {"t0": t0, "round_ends": ends, "t_end": time.perf_counter(), "accuracy": accuracy[-1]}


# ---------------------------------------------------------------- both


def child(framework: str, rounds: int, cohorts_file: str | None) -> dict:
    start = process_start()
    if framework == "fedsim":
        res = run_fedsim(rounds)
    else:
        with open(cohorts_file) as f:
            res = run_pfl(rounds, json.load(f))
    ends = res["round_ends"]
    return {
        "framework": framework,
        "wall": res["t_end"] - start,
        "startup": ends[0] - start,
        "rounds_2_to_R": ends[-1] - ends[0],
        "p50": float(np.percentile(np.diff(ends), 50)),
        "rounds": len(ends),
        "accuracy": res["accuracy"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setup", action="store_true", help=f"create {VENV.name} and install {PFL} there")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=["fedsim", "pfl"], help=argparse.SUPPRESS)
    ap.add_argument("--cohorts", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.setup:
        setup()
        return
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.rounds, args.cohorts)), flush=True)
        return
    if not (VENV / "bin" / "python").exists():
        sys.exit(f"bench_vs_pfl: no {VENV}; run 'python {__file__} --setup' first")
    from fedsim.engine.loop import sample_cohort

    cohorts = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    with cohorts:
        json.dump([list(sample_cohort(SEED, r, CLIENTS, COHORT)) for r in range(args.rounds)], cohorts)
    python = {"fedsim": sys.executable, "pfl": str(VENV / "bin" / "python")}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
    results: dict[str, list[dict]] = {"fedsim": [], "pfl": []}
    for _ in range(args.repeats):
        for fw in results:
            cmd = [
                python[fw],
                __file__,
                "--child",
                fw,
                "--rounds",
                str(args.rounds),
                "--cohorts",
                cohorts.name,
            ]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            with TreeSampler(root=proc.pid, interval=MEMORY_INTERVAL_S) as mem:
                stdout, stderr = proc.communicate()
            lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"bench_vs_pfl: the {fw} run failed:\n{stderr[-4000:]}\n{stdout[-2000:]}")
            results[fw].append(
                {
                    **json.loads(lines[-1][len("RESULT ") :]),
                    "peak_pss": mem.peak_pss,
                    "peak_rss": mem.peak_rss,
                }
            )
    os.unlink(cohorts.name)

    def med(fw: str, key: str) -> float:
        return median([r[key] for r in results[fw]])

    print(
        f"workload: FedAvg, digits, digits_cnn, {CLIENTS} IID clients, cohort {COHORT}, {args.rounds} rounds, "
        f"{EPOCHS} epoch, batch {BATCH}, lr {LR}; medians of {args.repeats} run(s)"
    )
    print(
        f"{'':8s} {'wall':>8s} {'start-up+r1':>12s} {'rounds 2..R':>12s} {'p50/round':>10s} "
        f"{'peak PSS':>10s} {'peak RSS':>10s} {'final acc':>9s}"
    )
    for fw in results:
        print(
            f"{fw:8s} {med(fw, 'wall'):7.1f}s {med(fw, 'startup'):11.1f}s {med(fw, 'rounds_2_to_R'):11.1f}s "
            f"{med(fw, 'p50') * 1e3:8.1f}ms {mb(med(fw, 'peak_pss')):>10s} {mb(med(fw, 'peak_rss')):>10s} "
            f"{med(fw, 'accuracy'):9.4f}"
        )
    print(
        "wall per repeat (s): "
        + "; ".join(f"{fw} " + ", ".join(f"{r['wall']:.1f}" for r in rs) for fw, rs in results.items())
    )
    print(
        f"pfl / fedsim: wall {med('pfl', 'wall') / med('fedsim', 'wall'):.2f}x, start-up "
        f"{med('pfl', 'startup') / med('fedsim', 'startup'):.2f}x, rounds 2..R "
        f"{med('pfl', 'rounds_2_to_R') / med('fedsim', 'rounds_2_to_R'):.2f}x (above 1: fedsim faster)"
    )


if __name__ == "__main__":
    main()

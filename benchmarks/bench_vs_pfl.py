"""fedsim against pfl-research 0.6's PyTorch simulation on the same FedAvg workloads (not a test).

Two workloads, both FedAvg with 1 local epoch of plain SGD at batch 10, the global model evaluated
on a test set after every round:

* ``digits`` (bench_vs_flower's digits workload, IID): sklearn digits, 50 IID clients
  (``fedsim.data.load_federated("digits", partition="iid")``: pixels standardised as fedsim's
  loader does), cohort 10, 100 rounds, lr 0.05, fedsim's ``digits_cnn``.
* ``cifar`` (pfl-research's own CIFAR-10 benchmark shape, Granqvist et al. 2024, at fewer rounds):
  1,000 clients x 50 images, cohort 50, lr 0.05, 5 rounds by default, fedsim's ``moon_cnn`` at
  widths conv1 32, conv2 64, fc1 512 (the shape of pfl's small CIFAR CNN, not its exact layers, as
  in bench_pfl_cifar.py). The images are synthetic CIFAR-shaped tensors (nothing can be downloaded
  here): float32 3 x 32 x 32 standard normal noise plus a fixed coarse random pattern per class
  (scale :data:`CIFAR_SIGNAL`), 10 classes drawn uniformly, so that accuracy rises above chance and
  can be compared; 1,000 test images made the same way.

Both frameworks get identical inputs: the same arrays (pfl's process builds them with this
script's loaders, which use fedsim's), the same initial weights
(``build_model(..., generator=torch_rng(0, "init"))``) and the same cohorts
(``fedsim.engine.loop.sample_cohort``, fed to pfl through its ``user_sampler``). They differ in
the order of each client's minibatches (fedsim shuffles per (seed, round, client); pfl 0.6's
``Dataset`` batches a client's examples in order) and in the aggregation (pfl averages the
clients' model deltas with weight 1 each, fedsim weights them by their examples; the digits
clients hold 28-29 each, the CIFAR-shaped ones 50), so the accuracies are close, not equal.

pfl runs as its benchmarks run it: one process, its ``SimulatedBackend``, torch with 1 thread.
fedsim runs as ``fedsim run`` runs it: a local Ray with 2 CPUs, 2 workers of 1 CPU with 1 torch
thread each, ``engine.vectorize: auto``. With ``--sequential``, a third line runs fedsim in one
process as pfl does (``engine.backend: sequential``, 1 torch thread).

pfl lives in its own virtual environment, so fedsim's dependencies do not change:
``--setup`` creates ``benchmarks/.pfl-venv`` on top of this interpreter's packages (a ``.pth``
file adds them after the venv's own, so torch is shared and pfl's pins, e.g. ``packaging<25.1``,
stay in the venv) and runs ``pip install "pfl[pytorch]==0.6.0"`` there.

Printed for each workload and framework, medians of ``--repeats`` interleaved runs: wall time
(from the process's start, as psutil reports it, to the run's end), start-up (process start to
round 1 done), the seconds of rounds 2..R, per-round p50 (rounds 2..R), peak memory of the
process tree (summed PSS and RSS, ``_common.TreeSampler``) and final test accuracy; then the
ratios pfl / fedsim.

Run: ``python benchmarks/bench_vs_pfl.py --setup`` once, then
``python benchmarks/bench_vs_pfl.py [--workloads digits cifar] [--rounds 100] [--cifar-rounds 5]
[--repeats 3] [--sequential]``.
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
from _common import TreeSampler, fedsim_child_result, mb, median

SEED, LR, BATCH, EPOCHS = 0, 0.05, 10, 1
WORKLOADS = {
    "digits": {"clients": 50, "cohort": 10, "model": "digits_cnn", "widths": None},
    "cifar": {
        "clients": 1000,
        "cohort": 50,
        "model": "moon_cnn",
        "widths": {"conv1": 32, "conv2": 64, "fc1": 512},
    },
}
CIFAR_PER_CLIENT, CIFAR_TEST = 50, 1000
CIFAR_SIGNAL = 1.0
"""Scale of the per-class pattern added to the CIFAR-shaped noise (the noise has scale 1)."""
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


def load_data(workload: str):
    """The workload's fedsim ``FederatedDataset`` (numpy arrays), built the same way in every process."""
    if workload == "digits":
        from fedsim.data import load_federated

        n = WORKLOADS["digits"]["clients"]
        return load_federated("digits", partition="iid", num_clients=n, alpha=0.5, data_dir=None, seed=SEED)
    return cifar_data()


def cifar_data():
    """CIFAR-shaped synthetic data: 1,000 clients x 50 train images and 1,000 test images, float32
    (N, 3, 32, 32), label y's pattern (``CIFAR_SIGNAL`` x a fixed standard normal 3 x 4 x 4 image,
    each value repeated over an 8 x 8 block) added to standard normal noise; labels int64 uniform
    over 10 classes; client j holds images 50 j .. 50 j + 49."""
    from fedsim.data.base import FederatedDataset, Split

    clients = WORKLOADS["cifar"]["clients"]
    g = np.random.default_rng(SEED)
    coarse = g.standard_normal((10, 3, 4, 4), dtype=np.float32)  # 8 x 8 blocks: what convolutions see
    pattern = CIFAR_SIGNAL * np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)

    def split(n: int) -> Split:
        y = g.integers(0, 10, n).astype(np.int64)
        x = g.standard_normal((n, 3, 32, 32), dtype=np.float32)
        x += pattern[y]
        return Split(x=x, y=y)

    train, test = split(clients * CIFAR_PER_CLIENT), split(CIFAR_TEST)
    idx = [np.arange(i * CIFAR_PER_CLIENT, (i + 1) * CIFAR_PER_CLIENT) for i in range(clients)]
    counts = np.stack([np.bincount(train.y[i], minlength=10) for i in idx])
    return FederatedDataset("cifar-shaped", train, test, 10, (3, 32, 32), idx, counts)


# ---------------------------------------------------------------- fedsim


def run_fedsim(workload: str, rounds: int, backend: str) -> dict:
    from fedsim import config
    from fedsim.engine import api

    w = WORKLOADS[workload]
    t0 = time.perf_counter()
    model = {"name": w["model"], **({"widths": w["widths"]} if w["widths"] else {})}
    engine = {"backend": backend, "clients_per_round": w["cohort"], "cpus_per_worker": 1}
    if backend == "ray":
        engine["num_workers"] = 2
    cfg = config.parse(
        {
            "name": f"bench-vs-pfl-{workload}",
            "seed": SEED,
            # the digits loader's settings; the CIFAR-shaped dataset is passed to execute() directly
            "data": {"dataset": "digits", "partition": "iid", "num_clients": w["clients"]},
            "model": model,
            "engine": engine,
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
    dataset = load_data(workload)
    if backend == "ray":
        api.start_ray(cfg, num_cpus=2)  # a local Ray as `fedsim run` starts it
    return fedsim_child_result(cfg, dataset, t0)


# ---------------------------------------------------------------- pfl


def run_pfl(workload: str, rounds: int, cohorts: list[list[int]]) -> dict:
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
    w = WORKLOADS[workload]
    ds = load_data(workload)

    class Net(torch.nn.Module):
        """fedsim's digits CNN with the ``loss`` and ``metrics`` that pfl's PyTorchModel calls."""

        def __init__(self):
            super().__init__()
            self.net = build_model(
                w["model"],
                num_classes=ds.num_classes,
                input_shape=ds.input_shape,
                widths=w["widths"],
                generator=torch_rng(SEED, "init"),
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

    def user(c: int) -> Dataset:  # made when sampled, as pfl's own benchmarks make theirs
        idx = torch.from_numpy(ds.client_indices[c])
        return Dataset(raw_data=[x[idx], y[idx]], user_id=str(c))

    order = iter([c for cohort in cohorts for c in cohort])  # fedsim's cohorts, round by round
    train = FederatedDataset(user, lambda: next(order))
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
            central_num_iterations=rounds,
            evaluation_frequency=1,
            train_cohort_size=w["cohort"],
            val_cohort_size=0,
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


FRAMEWORKS = {"fedsim": "ray", "fedsim-1proc": "sequential", "pfl": None}  # fedsim: its backend


def child(framework: str, workload: str, rounds: int, cohorts_file: str | None) -> dict:
    start = process_start()
    if framework == "pfl":
        with open(cohorts_file) as f:
            res = run_pfl(workload, rounds, json.load(f))
    else:
        res = run_fedsim(workload, rounds, FRAMEWORKS[framework])
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


def measure(framework: str, workload: str, rounds: int, cohorts_file: str) -> dict:
    """One run of ``framework`` on ``workload`` in a fresh process; its figures and peak memory."""
    python = str(VENV / "bin" / "python") if framework == "pfl" else sys.executable
    cmd = [python, __file__, "--child", framework, "--workload", workload, "--rounds", str(rounds)]
    cmd += ["--cohorts", cohorts_file]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with TreeSampler(root=proc.pid, interval=MEMORY_INTERVAL_S) as mem:
        stdout, stderr = proc.communicate()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(
            f"bench_vs_pfl: the {framework} run on {workload} failed:\n{stderr[-4000:]}\n{stdout[-2000:]}"
        )
    return {**json.loads(lines[-1][len("RESULT ") :]), "peak_pss": mem.peak_pss, "peak_rss": mem.peak_rss}


def report(workload: str, rounds: int, repeats: int, results: dict[str, list[dict]], load: list) -> None:
    w = WORKLOADS[workload]

    def med(fw: str, key: str) -> float:
        return median([r[key] for r in results[fw]])

    print(
        f"workload {workload}: FedAvg, {w['model']}, {w['clients']} clients, cohort {w['cohort']}, "
        f"{rounds} rounds, {EPOCHS} epoch, batch {BATCH}, lr {LR}; medians of {repeats} run(s); "
        f"1-min load average {load[0]:.1f} before, {load[1]:.1f} after"
    )
    print(
        f"{'':13s} {'wall':>8s} {'start-up+r1':>12s} {'rounds 2..R':>12s} {'p50/round':>10s} "
        f"{'peak PSS':>10s} {'peak RSS':>10s} {'final acc':>9s}"
    )
    for fw in results:
        print(
            f"{fw:13s} {med(fw, 'wall'):7.1f}s {med(fw, 'startup'):11.1f}s {med(fw, 'rounds_2_to_R'):11.1f}s "
            f"{med(fw, 'p50') * 1e3:8.1f}ms {mb(med(fw, 'peak_pss')):>10s} {mb(med(fw, 'peak_rss')):>10s} "
            f"{med(fw, 'accuracy'):9.4f}"
        )
    print(
        "wall per repeat (s): "
        + "; ".join(f"{fw} " + ", ".join(f"{r['wall']:.1f}" for r in rs) for fw, rs in results.items())
    )
    for fw in results:
        if fw != "pfl":
            print(
                f"pfl / {fw}: wall {med('pfl', 'wall') / med(fw, 'wall'):.2f}x, start-up "
                f"{med('pfl', 'startup') / med(fw, 'startup'):.2f}x, rounds 2..R "
                f"{med('pfl', 'rounds_2_to_R') / med(fw, 'rounds_2_to_R'):.2f}x (above 1: {fw} faster)"
            )
    print(flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setup", action="store_true", help=f"create {VENV.name} and install {PFL} there")
    ap.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=100, help="rounds of the digits workload")
    ap.add_argument("--cifar-rounds", type=int, default=5, help="rounds of the CIFAR-shaped workload")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sequential", action="store_true", help="also fedsim in one process (fedsim-1proc)")
    ap.add_argument("--child", choices=list(FRAMEWORKS), help=argparse.SUPPRESS)
    ap.add_argument("--workload", choices=list(WORKLOADS), help=argparse.SUPPRESS)
    ap.add_argument("--cohorts", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.setup:
        setup()
        return
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.workload, args.rounds, args.cohorts)), flush=True)
        return
    if not (VENV / "bin" / "python").exists():
        sys.exit(f"bench_vs_pfl: no {VENV}; run 'python {__file__} --setup' first")
    from fedsim.engine.loop import sample_cohort

    frameworks = ["fedsim", *(["fedsim-1proc"] if args.sequential else []), "pfl"]
    for workload in args.workloads:
        w = WORKLOADS[workload]
        rounds = args.rounds if workload == "digits" else args.cifar_rounds
        cohorts = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        with cohorts:
            json.dump(
                [list(sample_cohort(SEED, r, w["clients"], w["cohort"])) for r in range(rounds)], cohorts
            )
        results: dict[str, list[dict]] = {fw: [] for fw in frameworks}
        load = [os.getloadavg()[0]]
        for _ in range(args.repeats):
            for fw in frameworks:
                results[fw].append(measure(fw, workload, rounds, cohorts.name))
        os.unlink(cohorts.name)
        report(workload, rounds, args.repeats, results, [*load, os.getloadavg()[0]])


if __name__ == "__main__":
    main()

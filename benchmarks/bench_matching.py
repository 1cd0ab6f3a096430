"""Benchmark of fedsim.matching.bbp_map on a FedMA-sized layer (not a test).

Default case: J = 16 clients, L_j = 512 neurons each, D = 4,097 (a 4,096-input layer plus bias),
5 sweeps, float32. The atoms imitate trained weights: one shared set of L prototypes with the
scale of a trained layer (std 2/sqrt(D), about 0.03 for D = 4,097), a per-client random permutation
of the rows and per-client noise (30% of the prototype scale by default), so the matching has real
structure. Hyper-parameters are the authors' CNN defaults: sigma^2 = sigma0^2 = 1, gamma = 7.
The authors' reference code (IBM/FedMA, row-by-row cost in float32) takes about 88 s for this case.

Run: ``python benchmarks/bench_matching.py [--clients J] [--neurons L] [--dim D]
[--iterations N] [--device cpu|cuda] [--noise F] [--sigma2 S] [--repeat R]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    from fedsim.matching import bbp_map
except ModuleNotFoundError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fedsim.matching import bbp_map

AUTHORS_SECONDS = 88.0


def make_atoms(
    J: int, L: int, D: int, weight_std: float, noise: float, seed: int, device: str
) -> list[torch.Tensor]:
    """J float32 (L, D) tensors: shared prototypes (std weight_std), permuted per client, plus noise."""
    rng = np.random.default_rng(seed)
    scale = weight_std
    protos = rng.normal(0.0, scale, size=(L, D)).astype(np.float32)
    out = []
    for _ in range(J):
        perm = rng.permutation(L)
        w = protos[perm] + rng.normal(0.0, noise * scale, size=(L, D)).astype(np.float32)
        out.append(torch.as_tensor(w, device=device))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", "-J", type=int, default=16)
    ap.add_argument("--neurons", "-L", type=int, default=512)
    ap.add_argument("--dim", "-D", type=int, default=4097)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weight-std", type=float, default=None, help="prototype std; default 2/sqrt(D)")
    ap.add_argument("--noise", type=float, default=0.3, help="noise std relative to prototype std")
    ap.add_argument("--sigma2", type=float, default=1.0)
    ap.add_argument("--sigma0-2", type=float, default=1.0)
    ap.add_argument("--gamma", type=float, default=7.0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    weight_std = args.weight_std if args.weight_std is not None else 2.0 / np.sqrt(args.dim)
    atoms = make_atoms(args.clients, args.neurons, args.dim, weight_std, args.noise, args.seed, args.device)
    sigma2, sigma0_2 = args.sigma2, args.sigma0_2
    print(
        f"problem: J={args.clients} clients x L_j={args.neurons} neurons, D={args.dim}, "
        f"{args.iterations} sweeps, float32, device={args.device}, "
        f"torch threads={torch.get_num_threads()}, sigma2={sigma2:g}, sigma0_2={sigma0_2:g}, "
        f"gamma={args.gamma:g}, weight std {weight_std:.3g}, noise {args.noise:g}x"
    )
    times, cpu = [], []
    for _ in range(args.repeat):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        c0 = time.process_time()
        t0 = time.perf_counter()
        res = bbp_map(
            atoms,
            sigma2=sigma2,
            sigma0_2=sigma0_2,
            gamma=args.gamma,
            iterations=args.iterations,
            seed=args.seed,
        )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    best = min(times)
    print(f"seconds: {best:.2f} (best of {len(times)}: {', '.join(f'{t:.2f}' for t in times)})")
    # CPU seconds of this process: on a busy machine wall time exceeds cpu / threads
    print(f"process cpu seconds: {', '.join(f'{c:.2f}' for c in cpu)}")
    print(
        f"global neurons L = {res.n_global} (per-client {args.neurons}); "
        f"counts min {res.counts.min()} max {res.counts.max()}"
    )
    print(f"speed-up vs authors' ~{AUTHORS_SECONDS:.0f} s: x{AUTHORS_SECONDS / best:.1f}")


if __name__ == "__main__":
    main()

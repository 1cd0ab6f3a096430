"""Encode and decode time of every uplink codec, per MB of float32 input, and bytes per client;
with ``--rounds``, what each codec adds to a whole round's wall time at the digits scale.

Codec times: two inputs, one flat 1 MB tensor (262,144 float32 values), and the digits CNN's
state_dict (the digits jobs' model, 38,282 values, 153,128 bytes) encoded as one client's upload
by :func:`fedsim.wire.encode_upload` and decoded by :func:`fedsim.wire.decode_upload` (error
feedback on for the biased codecs). Times are medians over ``--repeats`` runs, in milliseconds
per MB of raw float32 input (1 MB = 2^20 bytes).

Round overhead (``--rounds R``): the FedAvg run of jobs/compression_digits.yaml (10 digits
clients, all in every round, 2 local epochs, batch 16) for R rounds under no codec and under
each codec, on the sequential backend, so that every client's encoding and the server's decoding
run in this one process, on the round's critical path (the Ray backend encodes on the workers,
in parallel). Each repeat runs every configuration once, in a rotated order. Two figures:

* **share**: the seconds spent in the wire calls (every client's encoding, ``encode_results``;
  the server's decoding, ``decode_results``; the broadcast's, ``encode_broadcast`` /
  ``decode_broadcast``), timed inside the run's own rounds, over the rest of those rounds' wall
  time: what the codec adds to a round. Both are measured in the same rounds, so a loaded
  machine inflates both alike and the share stays meaningful;
* **A/B**: the median ``wall_seconds`` of rounds 1..R-1 (round 0 carries first-use costs) over
  all repeats, and its ratio to the run without a codec. It is only meaningful on a quiet
  machine: on a shared one, the spread between runs exceeds the codecs' cost.

Run::

    python benchmarks/bench_codecs.py [--repeats 7]
    python benchmarks/bench_codecs.py --rounds 6 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import ROOT  # noqa: F401  (puts the checkout on sys.path)

CODECS = [
    ("fp16", {}),
    ("bf16", {}),
    ("quantize", {"bits": 8}),
    ("quantize", {"bits": 4}),
    ("quantize", {"bits": 4, "rotation": True}),
    ("qsgd", {"levels": 15}),
    ("qsgd", {"levels": 15, "rotation": True}),
    ("topk", {"fraction": 0.01}),
    ("topk", {"fraction": 0.1}),
    ("randk", {"fraction": 0.1}),
    ("sign", {}),
    ("powersgd", {"rank": 2}),
]


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    import numpy as np

    from fedsim import params as P
    from fedsim.models import build_model
    from fedsim.wire import make_codec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=0, help="measure whole rounds instead (R >= 2)")
    args = ap.parse_args()
    if args.rounds:
        rounds_overhead(args.rounds, args.repeats)
        return
    mb = 2**20
    flat = np.random.default_rng(0).standard_normal(mb // 4).astype(np.float32).reshape(512, 512)
    model = P.to_numpy(build_model("digits_cnn", num_classes=10, input_shape=(1, 8, 8)).state_dict())
    raw = P.nbytes(model)
    print(
        f"{'codec':<32}{'enc ms/MB':>10}{'dec ms/MB':>10}{'cnn enc ms':>11}{'cnn dec ms':>11}{'cnn bytes':>10}{'ratio':>7}"
    )
    for name, params in CODECS:
        enc, dec, cnn_enc, cnn_dec, size = _measure(make_codec(name, **params), flat, model, args.repeats)
        label = _label(name, params)
        print(
            f"{label:<32}{enc:>10.2f}{dec:>10.2f}{cnn_enc:>11.2f}{cnn_dec:>11.2f}{size:>10}{raw / size:>7.1f}"
        )


def _measure(codec, flat, model, repeats: int) -> tuple[float, float, float, float, int]:
    """(encode and decode ms per MB of ``flat``, encode and decode ms of the ``model`` upload with
    error feedback for a biased codec, its encoded bytes)."""
    import numpy as np

    from fedsim.wire import decode_upload, encode_upload

    mb = flat.nbytes / 2**20
    rng = np.random.default_rng(1)
    ref = {k: np.zeros_like(v) for k, v in model.items()}
    data = codec.encode(flat, rng)
    enc = _median_ms(lambda: codec.encode(flat, rng), repeats) / mb
    dec = _median_ms(lambda: codec.decode(data), repeats) / mb
    encoded, _ = encode_upload(codec, model, ref, rng, None, codec.biased)
    cnn_enc = _median_ms(lambda: encode_upload(codec, model, ref, rng, None, codec.biased), repeats)
    cnn_dec = _median_ms(lambda: decode_upload(codec, encoded, ref), repeats)
    return enc, dec, cnn_enc, cnn_dec, sum(m.size for m in encoded.values())


def rounds_overhead(rounds: int, repeats: int) -> None:
    """Print the median round wall time of the digits FedAvg run under each codec and its ratio
    to the run without one (see the module docstring)."""
    import tempfile

    import pandas as pd

    from fedsim import config
    from fedsim.engine import api

    if rounds < 2:
        raise SystemExit("bench_codecs.py: --rounds must be >= 2 (round 0 is left out)")
    run = {"algorithm": "fedavg", "rounds": rounds, "local_epochs": 2, "lr": 0.05, "batch_size": 16}
    confs = [("none", None)] + [(_label(n, p), {"codec": n, **p}) for n, p in CODECS]
    raw = {
        "name": "bench-codecs",
        "seed": 0,
        "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "num_clients": 10},
        "model": {"name": "digits_cnn"},
        "engine": {"backend": "sequential", "clients_per_round": 10},
    }
    times: dict[str, list[float]] = {label: [] for label, _ in confs}
    wall = dict.fromkeys(times, 0.0)
    spent = _time_wire_calls()
    with tempfile.TemporaryDirectory() as out:
        for rep in range(repeats):
            order = confs[rep % len(confs) :] + confs[: rep % len(confs)]
            runs = [{**run, "name": label, **({} if up is None else {"uplink": up})} for label, up in order]
            cfg = config.parse({**raw, "runs": runs})
            ds = api.prepare(cfg)
            run_dir = api.new_run_dir(out, f"{cfg.name}-{rep}")
            list(api.execute(cfg, ds, run_dir))
            r = pd.read_parquet(f"{run_dir}/rounds.parquet")
            for label, g in r.groupby("run_id"):
                times[label] += g[g["round"] >= 1]["wall_seconds"].tolist()
                wall[label] += float(g["wall_seconds"].sum())
    base = statistics.median(times["none"])
    print(f"digits FedAvg, 10 clients a round, sequential backend, {rounds} rounds x {repeats} repeats")
    print("share: seconds in the wire calls / the rest of the rounds' wall time (all rounds);")
    print(f"A/B: median round wall time, rounds 1..{rounds - 1}, and its ratio to no codec")
    print(f"{'codec':<32}{'wire s/round':>13}{'share':>8}{'A/B round s':>12}{'A/B ratio':>10}")
    n = rounds * repeats
    for label, _ in confs:
        t, w = statistics.median(times[label]), spent.get(label, 0.0)
        print(f"{label:<32}{w / n:>13.4f}{w / (wall[label] - w):>+8.1%}{t:>12.3f}{t / base:>10.3f}")


def _time_wire_calls() -> dict[str, float]:
    """Wrap the engine's four wire calls (where the loop and the sequential backend look them up)
    with timers; returns run label -> seconds spent in them, filled as runs go."""
    from fedsim.engine import backends, loop

    spent: dict[str, float] = {}

    def timed(fn):
        def wrapper(run, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(run, *args, **kwargs)
            finally:
                spent[run.label] = spent.get(run.label, 0.0) + time.perf_counter() - t0

        return wrapper

    for module, names in (
        (backends, ("encode_results", "decode_broadcast")),
        (loop, ("decode_results", "encode_broadcast", "decode_broadcast")),
    ):
        for name in names:
            setattr(module, name, timed(getattr(module, name)))
    return spent


def _label(name: str, params: dict) -> str:
    return name + "".join(f" {k}={v}" for k, v in params.items())


if __name__ == "__main__":
    main()

"""Encode and decode time of every uplink codec, per MB of float32 input, and bytes per client.

Two inputs: one flat 1 MB tensor (262,144 float32 values), and the digits CNN's state_dict (the
digits jobs' model, 38,282 values, 153,128 bytes) encoded as one client's upload by
:func:`fedsim.wire.encode_upload` and decoded by :func:`fedsim.wire.decode_upload` (error
feedback on for the biased codecs). Times are medians over ``--repeats`` runs, in milliseconds
per MB of raw float32 input (1 MB = 2^20 bytes). Run::

    python benchmarks/bench_codecs.py [--repeats 7]
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
    ("qsgd", {"levels": 15}),
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
    args = ap.parse_args()
    mb = 2**20
    flat = np.random.default_rng(0).standard_normal(mb // 4).astype(np.float32).reshape(512, 512)
    model = P.to_numpy(build_model("digits_cnn", num_classes=10, input_shape=(1, 8, 8)).state_dict())
    raw = P.nbytes(model)
    print(
        f"{'codec':<22}{'enc ms/MB':>10}{'dec ms/MB':>10}{'cnn enc ms':>11}{'cnn dec ms':>11}{'cnn bytes':>10}{'ratio':>7}"
    )
    for name, params in CODECS:
        enc, dec, cnn_enc, cnn_dec, size = _measure(make_codec(name, **params), flat, model, args.repeats)
        label = name + (f" {params}" if params else "")
        print(
            f"{label:<22}{enc:>10.2f}{dec:>10.2f}{cnn_enc:>11.2f}{cnn_dec:>11.2f}{size:>10}{raw / size:>7.1f}"
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


if __name__ == "__main__":
    main()

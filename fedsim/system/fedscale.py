"""Convert FedScale's published client traces into fedsim's device and availability tables.

FedScale (Lai et al., ICML 2022; github.com/SymbioticLab/FedScale) ships two pickled dicts:

* ``client_device_capacity``: client id -> ``{"computation": ms, "communication": kbit/s}``. The
  compute figure is a model's inference latency per sample in milliseconds, measured with AI
  Benchmark; FedScale bills training as 3 x that per sample (forward plus a backward pass of about
  twice the cost, ``fedscale/cloud/internal/client_metadata.py``, ``get_completion_time``). The
  communication figure is a bandwidth in kbit/s from MobiPerf, used for both directions.
* ``client_behave_trace``: client id -> ``{"active": [...], "inactive": [...], "finish_time": s,
  ...}``: the i-th online interval runs from ``active[i]`` to ``inactive[i]`` seconds, and the
  pattern repeats every ``finish_time`` seconds (FedScale's ``is_active`` takes the time modulo
  ``finish_time``). It comes from the FLASH study of 136k users over a week.

The conversion, with its units:

* ``compute_macs_per_s = reference_macs / (ms / 1000)``: a device that runs one forward pass of a
  model of ``reference_macs`` multiply-accumulates per sample in ``ms`` milliseconds. fedsim then
  bills training as 3F per example, the same factor 3 FedScale applies, so a model of exactly
  ``reference_macs`` trains in FedScale's time; a model of other size scales with its MACs
  (FedScale's time does not: its issue #6). The reference model is not recorded in the trace:
  state the one you assume (FedScale's benchmarks train ShuffleNet and ResNet-scale models).
* ``uplink_bytes_per_s = downlink_bytes_per_s = kbit/s x 1000 / 8``.
* ``latency_s``: not in the trace; ``--latency-s`` (default 0).
* availability: intervals [active[i], inactive[i]) with ``period_s = finish_time``; intervals
  beyond ``finish_time`` are clipped and empty ones dropped.

Usage::

    python -m fedsim.system.fedscale devices client_device_capacity --reference-macs 1.5e8 --out devices.parquet
    python -m fedsim.system.fedscale availability client_behave_trace --out availability.parquet

Pickles can execute code when loaded: convert only files from a source you trust.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fedsim.errors import FedsimError


def _load(path: str | Path, what: str) -> dict[Any, Any]:
    p = Path(path)
    if not p.is_file():
        raise FedsimError(f"{what}: {str(p)!r} does not exist; give the path of FedScale's pickled trace")
    try:
        with open(p, "rb") as f:
            data = pickle.load(f)
    except Exception as err:  # pickle raises many types for a file that is not a pickle
        raise FedsimError(f"{what}: {str(p)!r} is not a pickled dict ({type(err).__name__})") from None
    if not isinstance(data, dict) or not data:
        raise FedsimError(f"{what}: {str(p)!r} holds no client dict; is it FedScale's {what} file?")
    return data


def devices_table(
    capacity: dict[Any, dict[str, float]], reference_macs: float, latency_s: float = 0.0
) -> pd.DataFrame:
    """fedsim's device trace (:data:`fedsim.system.devices.TRACE_COLUMNS`) from FedScale's
    ``client_device_capacity`` dict, one row per client in the dict's key order.

    Args:
        capacity: client id -> ``{"computation": ms per sample, "communication": kbit/s}``.
        reference_macs: forward multiply-accumulates per sample of the model the latencies were
            measured on (> 0).
        latency_s: one-way message latency to give every device, seconds (>= 0).

    Raises:
        FedsimError: ``reference_macs`` or ``latency_s`` out of range, a record without both keys,
            or a non-positive latency or bandwidth.
    """
    if not reference_macs > 0 or not latency_s >= 0:
        raise FedsimError("--reference-macs must be > 0 and --latency-s >= 0")
    rows = []
    for cid, rec in capacity.items():
        try:
            ms, kbps = float(rec["computation"]), float(rec["communication"])
        except (KeyError, TypeError, ValueError):
            raise FedsimError(
                f"client_device_capacity: client {cid!r} lacks numeric 'computation' (ms per sample) and "
                "'communication' (kbit/s)"
            ) from None
        if not ms > 0 or not kbps > 0:
            raise FedsimError(
                f"client_device_capacity: client {cid!r} has {ms} ms per sample and {kbps} kbit/s"
            )
        bps = kbps * 1000.0 / 8.0
        rows.append((str(cid), reference_macs / (ms / 1000.0), bps, bps, float(latency_s)))
    return pd.DataFrame(
        rows,
        columns=[
            "device_id",
            "compute_macs_per_s",
            "uplink_bytes_per_s",
            "downlink_bytes_per_s",
            "latency_s",
        ],
    )


def availability_table(behave: dict[Any, dict[str, Any]]) -> pd.DataFrame:
    """fedsim's availability trace (:data:`fedsim.system.availability.TRACE_COLUMNS`) from
    FedScale's ``client_behave_trace`` dict: one row per online interval, ``period_s`` the client's
    ``finish_time``.

    Raises:
        FedsimError: a record without ``active``, ``inactive`` and ``finish_time``, or with lists
            of different lengths.
    """
    rows = []
    for cid, rec in behave.items():
        try:
            active, inactive, period = list(rec["active"]), list(rec["inactive"]), float(rec["finish_time"])
        except (KeyError, TypeError, ValueError):
            raise FedsimError(
                f"client_behave_trace: client {cid!r} lacks 'active', 'inactive' and 'finish_time'"
            ) from None
        if len(active) != len(inactive):
            raise FedsimError(
                f"client_behave_trace: client {cid!r} has {len(active)} starts but {len(inactive)} ends"
            )
        for a, b in zip(active, inactive):
            a, b = max(0.0, float(a)), min(float(b), period)
            if b > a:
                rows.append((str(cid), a, b, period))
    return pd.DataFrame(rows, columns=["trace_id", "start_s", "end_s", "period_s"])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedsim.system.fedscale devices|availability PICKLE --out PARQUET``; exit 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m fedsim.system.fedscale", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="kind", required=True)
    dev = sub.add_parser("devices", help="client_device_capacity -> a device trace")
    dev.add_argument("pickle")
    dev.add_argument(
        "--reference-macs", type=float, required=True, help="forward MACs per sample of the measured model"
    )
    dev.add_argument("--latency-s", type=float, default=0.0, help="one-way latency of every device, seconds")
    dev.add_argument("--out", required=True)
    av = sub.add_parser("availability", help="client_behave_trace -> an availability trace")
    av.add_argument("pickle")
    av.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.kind == "devices":
            table = devices_table(
                _load(args.pickle, "client_device_capacity"), args.reference_macs, args.latency_s
            )
        else:
            table = availability_table(_load(args.pickle, "client_behave_trace"))
    except FedsimError as err:
        print(f"fedsim: error: {err}", file=sys.stderr)
        return 2
    table.to_parquet(args.out, index=False)
    print(f"wrote {len(table)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

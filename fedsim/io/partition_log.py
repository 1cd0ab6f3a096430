"""``partition.parquet``: how the training set was split, written once per experiment directory.

One row per (client, class) with at least one example; the clients' sizes are the sums over
their rows. ``fedsim report`` draws it (clients by classes, and the clients' sizes), so a run's
data heterogeneity is on record beside its results. A separate file, not a column of the
runs/rounds/clients tables: it describes the dataset, which every run of an experiment shares.

Columns: ``client`` (int64, the engine's client id 0..J-1), ``client_name`` (string: the natural
id such as a writer or a play and role, or empty), ``label`` (int64 class), ``examples`` (int64,
training examples of that class the client holds).
"""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedsim.data.base import FederatedDataset
from fedsim.io import storage

#: The file's name in the experiment directory.
PARTITION_FILE = "partition.parquet"

SCHEMA = pa.schema(
    [("client", pa.int64()), ("client_name", pa.string()), ("label", pa.int64()), ("examples", pa.int64())]
)


def partition_table(dataset: FederatedDataset) -> pa.Table:
    """The nonzero entries of ``dataset.class_counts`` ((J, K) int64) as a :data:`SCHEMA` table,
    ordered by client then label."""
    counts = np.asarray(dataset.class_counts, dtype=np.int64)
    client, label = np.nonzero(counts)
    names = list(dataset.client_names) or [""] * counts.shape[0]
    return pa.table(
        {
            "client": client.astype(np.int64),
            "client_name": [names[j] for j in client],
            "label": label.astype(np.int64),
            "examples": counts[client, label],
        },
        schema=SCHEMA,
    )


def write_partition(run_dir: str | os.PathLike, dataset: FederatedDataset) -> None:
    """Write :func:`partition_table` to ``<run_dir>/partition.parquet`` (replacing it atomically).

    Raises:
        OSError: the file cannot be written.
    """
    buf = io.BytesIO()
    pq.write_table(partition_table(dataset), buf)
    storage.write_bytes(storage.join(run_dir, PARTITION_FILE), buf.getvalue())

"""partition.parquet: the (client, class) counts of a FederatedDataset, nonzero entries only."""

import numpy as np
import pyarrow.parquet as pq

from fedsim.data.base import FederatedDataset, Split
from fedsim.io.partition_log import PARTITION_FILE, partition_table, write_partition


def _dataset(names):
    y = np.array([0, 0, 1, 2, 2, 2])
    parts = [np.array([0, 1, 2]), np.array([3, 4, 5])]
    counts = np.array([[2, 1, 0], [0, 0, 3]])
    split = Split(x=np.zeros((6, 1), np.float32), y=y)
    return FederatedDataset("toy", split, split, 3, (1,), parts, counts, client_names=names)


def test_partition_table_lists_the_nonzero_client_class_counts(tmp_path):
    table = partition_table(_dataset(["a", "b"])).to_pydict()
    assert table == {
        "client": [0, 0, 1],
        "client_name": ["a", "a", "b"],
        "label": [0, 1, 2],
        "examples": [2, 1, 3],
    }
    write_partition(tmp_path, _dataset([]))
    back = pq.read_table(tmp_path / PARTITION_FILE).to_pydict()
    assert back["client_name"] == ["", "", ""] and back["examples"] == [2, 1, 3]

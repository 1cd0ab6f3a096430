"""fedsim's partitioners against Flower Datasets 0.6's own, on the same rows and seed.

Index for index (the same example sets per client, client by client), given a Flower partitioner
seeded with s and fedsim's function given ``np.random.default_rng(s)`` on the same row order:
natural_id, grouped_natural_id (every mode, sorted or not), flwr_dirichlet (with and without self_balancing), shard (every way of sizing shards),
pathological (all three class-assignment modes). The size partitioners (linear, square,
exponential, power law through IdToSizeFncPartitioner) and iid cut rows in order, so Flower's are
applied after ``Dataset.shuffle(seed=s)`` (what its FederatedDataset does) and match fedsim's,
which draws that permutation from the same generator. Only the order inside a partition differs
(Flower shuffles it; fedsim's arrays are sorted). Skipped where flwr-datasets is not installed.
"""

import os

import numpy as np
import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower Datasets posts telemetry otherwise
P = pytest.importorskip("flwr_datasets.partitioner")
datasets = pytest.importorskip("datasets")

from fedsim.data import partition as F  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

N, J = 600, 6


@pytest.fixture(scope="module")
def table():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, N)
    ids = np.array([f"w{v:02d}" for v in rng.integers(0, 15, N)])
    ds = datasets.Dataset.from_dict({"label": labels, "writer": ids, "row": np.arange(N)})
    return labels, ids, ds


def _flwr(partitioner, ds):
    partitioner.dataset = ds
    return [sorted(partitioner.load_partition(j)["row"]) for j in range(partitioner.num_partitions)]


def _same(flwr_parts, ours):
    assert len(flwr_parts) == len(ours)
    for a, b in zip(flwr_parts, ours, strict=True):
        assert list(a) == b.tolist()


@pytest.mark.parametrize("seed", [1, 42])
@pytest.mark.parametrize("self_balancing", [False, True])
@pytest.mark.parametrize("min_size", [10, 60])
def test_dirichlet_matches_flower_index_for_index(table, seed, self_balancing, min_size):
    labels, _, ds = table
    try:
        theirs = _flwr(P.DirichletPartitioner(J, "label", 0.3, min_size, self_balancing, seed=seed), ds)
    except ValueError:  # Flower gave up after its 11 draws: fedsim must give up too
        with pytest.raises(F.FedsimError):
            F.flwr_dirichlet(labels, J, 0.3, np.random.default_rng(seed), min_size, self_balancing)
        return
    _same(theirs, F.flwr_dirichlet(labels, J, 0.3, np.random.default_rng(seed), min_size, self_balancing))


@pytest.mark.parametrize("seed", [1, 42])
@pytest.mark.parametrize(
    "kw",
    [
        {"num_shards_per_partition": 2},
        {"num_shards_per_partition": 2, "keep_incomplete_shard": True},
        {"num_shards_per_partition": 3, "shard_size": 20},
        {"shard_size": 35},
        {"shard_size": 35, "keep_incomplete_shard": True},
    ],
)
def test_shard_matches_flower_index_for_index(table, seed, kw):
    labels, _, ds = table
    ours = F.shard(
        labels,
        J,
        np.random.default_rng(seed),
        kw.get("num_shards_per_partition"),
        kw.get("shard_size"),
        kw.get("keep_incomplete_shard", False),
    )
    _same(_flwr(P.ShardPartitioner(J, "label", seed=seed, **kw), ds), ours)


@pytest.mark.parametrize("seed", [1, 42])
@pytest.mark.parametrize("mode", F.CLASS_ASSIGNMENT_MODES)
def test_pathological_matches_flower_index_for_index(table, seed, mode):
    labels, _, ds = table
    ours = F.pathological(labels, J, np.random.default_rng(seed), 3, mode)
    _same(_flwr(P.PathologicalPartitioner(J, "label", 3, mode, seed=seed), ds), ours)


@pytest.mark.parametrize("seed", [1, 42])
@pytest.mark.parametrize("law", ["linear", "square", "exponential", "power_law", "iid"])
def test_size_partitioners_and_iid_match_flower_after_its_shuffle(table, seed, law):
    _, _, ds = table
    shuffled = ds.shuffle(seed=seed)  # Flower's FederatedDataset shuffles each split so
    theirs = {
        "linear": lambda: P.LinearPartitioner(J),
        "square": lambda: P.SquarePartitioner(J),
        "exponential": lambda: P.ExponentialPartitioner(J),
        "power_law": lambda: P.IdToSizeFncPartitioner(J, lambda x: np.power(x, 1.5)),
        "iid": lambda: P.IidPartitioner(J),
    }[law]()
    rng = np.random.default_rng(seed)
    ours = F.iid(N, J, rng) if law == "iid" else F.size_skewed(N, J, rng, law, 1.5)
    _same(_flwr(theirs, shuffled), ours)


def test_natural_id_matches_flower(table):
    _, ids, ds = table
    p = P.NaturalIdPartitioner("writer")
    theirs = _flwr(p, ds)
    ours, names = F.natural_id(ids)
    _same(theirs, ours)
    assert list(p.partition_id_to_natural_id.values()) == names.tolist()


@pytest.mark.parametrize("mode", F.GROUP_MODES)
@pytest.mark.parametrize("sort_ids", [False, True])
def test_grouped_natural_id_matches_flower(table, mode, sort_ids):
    _, ids, ds = table
    size = 5 if mode == "strict" else 4  # 15 writers
    p = P.GroupedNaturalIdPartitioner("writer", size, mode, sort_ids)
    theirs = _flwr(p, ds)
    ours, names = F.grouped_natural_id(ids, size, mode, sort_ids)
    _same(theirs, ours)
    assert ["+".join(g) for g in p.partition_id_to_natural_ids.values()] == names

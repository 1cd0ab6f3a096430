"""The partitioner registry's contract, and each partitioner's own stated properties.

One contract test runs every registered partitioner: disjoint sorted int64 arrays, complete where
the partitioner says so (else capped: a subset), non-empty clients, J of them, class counts that
add up, and the same output for the same seed. The per-partitioner tests check sizes and class
counts worked out by hand from the definitions.
"""

import numpy as np
import pytest

from fedsim.config import DataConfig
from fedsim.data import partition as F
from fedsim.errors import FedsimError
from fedsim.rng import numpy_rng

K, N, J = 10, 1000, 8
LABELS = np.repeat(np.arange(K), N // K)[np.random.default_rng(5).permutation(N)]  # 100 per class
IDS = np.array([f"user{v:02d}" for v in np.random.default_rng(6).integers(0, 20, N)])

#: options making each partitioner run, and whether its union is every example
CASES = {
    "iid": ({}, True),
    "dirichlet": ({}, True),
    "natural": ({"num_clients": None}, True),
    "grouped_natural": ({"num_clients": None, "group_size": 3, "group_mode": "drop-reminder"}, False),
    "flwr_dirichlet": ({"alpha": 1.0, "self_balancing": True}, True),
    "shard": ({"shards_per_client": 2, "shard_size": 50}, False),
    "pathological": ({"classes_per_client": 2}, False),
    "linear": ({}, True),
    "square": ({}, True),
    "exponential": ({"num_clients": 5}, True),  # e^1 / sum e^1..e^8 of 1000 rounds to 0
    "power_law": ({}, True),
}


def _run(name, seed=0):
    opts, _ = CASES[name]
    d = DataConfig(partition=name, **{"num_clients": J, **opts})
    return F.PARTITIONERS[name](LABELS, IDS, d.num_clients, numpy_rng(seed, "partition"), d)


def test_every_registered_partitioner_has_a_contract_case():
    assert set(F.PARTITIONERS) <= set(CASES), "add the new partitioner to CASES"


@pytest.mark.parametrize("name", sorted(F.PARTITIONERS))
def test_partitioner_contract(name):
    parts = _run(name)
    opts, complete = CASES[name]
    want_j = {"natural": 20, "grouped_natural": 6}.get(
        name, opts.get("num_clients", J)
    )  # 20 ids, 6 groups of 3
    assert len(parts) == want_j
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1 and p.shape[0] > 0
        assert np.all(np.diff(p) > 0)  # sorted, no repeats
    union = np.concatenate(parts)
    assert np.unique(union).shape[0] == union.shape[0]  # disjoint
    assert union.min() >= 0 and union.max() < N
    if complete:
        np.testing.assert_array_equal(np.sort(union), np.arange(N))
    counts = F.class_counts(LABELS, parts, K)
    np.testing.assert_array_equal(counts.sum(axis=1), [p.shape[0] for p in parts])
    again = _run(name)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))  # same seed, same split
    if name not in ("natural", "grouped_natural"):  # nothing random
        other = _run(name, seed=1)
        assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_natural_id_is_one_client_per_sorted_id_and_caps_at_num_clients():
    ids = np.array(["b", "a", "b", "c", "a"])
    parts, names = F.natural_id(ids)
    assert names.tolist() == ["a", "b", "c"]
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2], [3]]
    parts, names = F.natural_id(ids, 2)
    assert names.tolist() == ["a", "b"] and [p.tolist() for p in parts] == [[1, 4], [0, 2]]
    with pytest.raises(FedsimError, match="at most 3 clients"):
        F.natural_id(ids, 4)
    with pytest.raises(FedsimError, match="partition_by"):
        F.natural_id(np.array(["x", "x"]))


def test_grouped_natural_id_modes_on_seven_ids_in_groups_of_three():
    ids = np.array(list("gabcdefg"))  # distinct in order of first appearance: g a b c d e f
    sizes = {
        "allow-smaller": ["g+a+b", "c+d+e", "f"],
        "allow-bigger": ["g+a+b+c", "d+e+f"],
        "drop-reminder": ["g+a+b", "c+d+e"],
    }
    for mode, want in sizes.items():
        parts, names = F.grouped_natural_id(ids, 3, mode)
        assert names == want, mode
        for p, name in zip(parts, names, strict=True):
            assert sorted(ids[p]) == sorted(c for c in ids if c in name.split("+"))
    assert F.grouped_natural_id(ids, 3, sort_ids=True)[1] == ["a+b+c", "d+e+f", "g"]
    assert F.grouped_natural_id(ids, 3, num_clients=2)[1] == ["g+a+b", "c+d+e"]
    assert F.grouped_natural_id(ids, 9)[1] == ["g+a+b+c+d+e+f"]  # allow-smaller: one group of all
    with pytest.raises(FedsimError, match="strict"):
        F.grouped_natural_id(ids, 3, "strict")
    with pytest.raises(FedsimError, match="exceeds the 7 distinct ids"):
        F.grouped_natural_id(ids, 9, "allow-bigger")


def test_shard_gives_each_client_two_single_class_shards():
    # 100 examples per class, shards of 50: every shard holds one class, so a client of two
    # shards holds 100 examples of one or two classes, 50 or 100 of each
    parts = _run("shard")
    counts = F.class_counts(LABELS, parts, K)
    assert [p.shape[0] for p in parts] == [100] * J
    assert set(np.unique(counts)) <= {0, 50, 100}
    assert all(1 <= (row > 0).sum() <= 2 for row in counts)


def test_shard_sizes_without_shards_per_client_deal_the_remainder_first():
    # 1000 / 70 -> 14 complete shards (+1 incomplete of 20); 8 clients: 1 each, first 6 get 2
    parts = F.shard(LABELS, J, np.random.default_rng(0), shard_size=70)
    assert [p.shape[0] for p in parts] == [140] * 6 + [70] * 2
    parts = F.shard(LABELS, J, np.random.default_rng(0), shard_size=70, keep_incomplete_shard=True)
    assert sum(p.shape[0] for p in parts) == N
    with pytest.raises(FedsimError, match="exceeds"):
        F.shard(LABELS, J, np.random.default_rng(0), shards_per_client=3, shard_size=50)


def test_pathological_deterministic_gives_client_j_classes_j_to_j_plus_k_minus_1():
    parts = F.pathological(LABELS, 4, np.random.default_rng(0), 2, "deterministic")
    counts = F.class_counts(LABELS, parts, K)
    # class 0 only client 0 holds: all 100; classes 1..3 two clients each: 50 and 50; class 4
    # only client 3: 100; classes 5..9 nobody (capped)
    want = np.zeros((4, K), dtype=np.int64)
    want[0, 0], want[3, 4] = 100, 100
    for j, c in ((0, 1), (1, 1), (1, 2), (2, 2), (2, 3), (3, 3)):
        want[j, c] = 50
    np.testing.assert_array_equal(counts, want)


@pytest.mark.parametrize("mode", ["random", "first-deterministic"])
def test_pathological_every_client_holds_exactly_k_classes(mode):
    counts = F.class_counts(LABELS, F.pathological(LABELS, J, np.random.default_rng(3), 3, mode), K)
    assert ((counts > 0).sum(axis=1) == 3).all()
    if mode == "first-deterministic":
        assert all(counts[j, j % K] > 0 for j in range(J))


@pytest.mark.parametrize(
    "law, exponent, sizes",
    [
        ("linear", 1.0, [10, 20, 30, 40]),  # 1:2:3:4 of 100
        ("square", 1.0, [3, 13, 30, 54]),  # 1:4:9:16 -> 3.3, 13.3, 30, 53.3; remainder to the last
        ("power_law", 2.0, [3, 13, 30, 54]),  # j ** 2 is the square law
        ("exponential", 1.0, [3, 8, 23, 66]),  # e^j / sum: .032, .087, .237, .644
    ],
)
def test_size_skewed_sizes(law, exponent, sizes):
    parts = F.size_skewed(100, 4, np.random.default_rng(0), law, exponent)
    assert [p.shape[0] for p in parts] == sizes


def test_size_skewed_leaving_a_client_empty_is_an_error():
    with pytest.raises(FedsimError, match="without examples"):
        F.size_skewed(100, 40, np.random.default_rng(0), "exponential")


def test_flwr_dirichlet_min_partition_size_and_give_up():
    parts = F.flwr_dirichlet(LABELS, J, 0.5, np.random.default_rng(0), min_partition_size=40)
    assert min(p.shape[0] for p in parts) >= 40
    with pytest.raises(FedsimError, match="11 tries"):
        F.flwr_dirichlet(LABELS, J, 0.05, np.random.default_rng(0), min_partition_size=120)


def test_flwr_dirichlet_self_balancing_stops_feeding_clients_above_the_average():
    # with balancing a client can pass N/J only through the class that pushed it over, so it
    # ends below N/J + the largest class (100); without balancing nothing bounds it
    for seed in range(5):
        parts = F.flwr_dirichlet(LABELS, J, 0.2, np.random.default_rng(seed), 0, self_balancing=True)
        assert max(p.shape[0] for p in parts) <= N / J + 100


def test_existing_dirichlet_reads_min_partition_size():
    d = DataConfig(partition="dirichlet", num_clients=J, min_partition_size=60)
    parts = F.PARTITIONERS["dirichlet"](LABELS, None, J, numpy_rng(0, "partition"), d)
    assert min(p.shape[0] for p in parts) >= 60
    default = F.PARTITIONERS["dirichlet"](LABELS, None, J, numpy_rng(0, "partition"), DataConfig())
    old = F.dirichlet(LABELS, J, 0.5, numpy_rng(0, "partition"))
    assert all(np.array_equal(a, b) for a, b in zip(default, old, strict=True))


def test_register_partitioner_refuses_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        F.register_partitioner("iid")(lambda *a: [])

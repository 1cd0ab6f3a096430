"""``dataset: hf``: tiny local datasets with the Hub schemas, read through the ``datasets`` library.

FEMNIST's schema (flwrlabs/femnist: ``image`` PIL greyscale 28 x 28, ``writer_id`` string,
``character`` ClassLabel of 62) saved with ``save_to_disk``; CIFAR-10's (uoft-cs/cifar10: ``img``
RGB 32 x 32, ``label`` ClassLabel of 10, train and test splits) as a directory of Parquet files.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

datasets = pytest.importorskip("datasets")
from PIL import Image  # noqa: E402

from fedsim import config  # noqa: E402
from fedsim.cli import main  # noqa: E402
from fedsim.data import load_federated  # noqa: E402
from fedsim.errors import FedsimError  # noqa: E402
from tests.helpers import only_dir  # noqa: E402

WRITERS = {"f0102_31": 14, "f0007_02": 11, "f0050_10": 9, "f0003_44": 6}  # id -> examples


def _femnist_rows(seed=0):
    rng = np.random.default_rng(seed)
    rows = {"image": [], "writer_id": [], "character": []}
    for writer, n in WRITERS.items():
        for _ in range(n):
            label = int(rng.integers(0, 62))
            pixels = np.full((28, 28), 0, dtype=np.uint8)
            pixels[label % 28, :] = 255  # a class-dependent stroke; pixel 0 -> -1, 255 -> +1
            rows["image"].append(Image.fromarray(pixels, mode="L"))
            rows["writer_id"].append(writer)
            rows["character"].append(label)
    return rows


@pytest.fixture(scope="module")
def femnist(tmp_path_factory):
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "writer_id": datasets.Value("string"),
            "character": datasets.ClassLabel(names=[f"c{i}" for i in range(62)]),
        }
    )
    path = tmp_path_factory.mktemp("hf") / "femnist"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(_femnist_rows(), features=features)}
    ).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def cifar_parquet(tmp_path_factory):
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    root = tmp_path_factory.mktemp("hf") / "cifar10"
    (root / "plain_text").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for split, n in (("train", 40), ("test", 10)):
        imgs = [
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), mode="RGB") for _ in range(n)
        ]
        ds = datasets.Dataset.from_dict({"img": imgs, "label": [i % 10 for i in range(n)]}, features=features)
        ds.to_parquet(str(root / "plain_text" / f"{split}-00000-of-00001.parquet"))
    return root


def _data(path, **keys):
    raw = {
        "dataset": "hf",
        "path": str(path),
        "image_column": "image",
        "label_column": "character",
        "partition": "natural",
        "partition_by": "writer_id",
        "num_clients": None,
        **keys,
    }
    return config.DataConfig(**raw)


def _load(d: config.DataConfig, seed=0):
    return load_federated(
        d.dataset,
        partition=d.partition,
        num_clients=d.num_clients,
        alpha=d.alpha,
        data_dir=d.data_dir,
        seed=seed,
        train_fraction=d.train_fraction,
        examples_per_client=d.examples_per_client,
        options=d,
    )


def test_femnist_schema_natural_ids_give_one_client_per_sorted_writer(femnist):
    ds = _load(_data(femnist))
    assert ds.client_names == sorted(WRITERS)
    assert ds.num_classes == 62 and ds.input_shape == (1, 28, 28)
    # LEAF's per-client split: floor(0.8 n_j) for training, the rest to the test set
    sizes = [WRITERS[w] for w in sorted(WRITERS)]
    assert [p.shape[0] for p in ds.client_indices] == [int(0.8 * n) for n in sizes]
    assert len(ds.test) == sum(n - int(0.8 * n) for n in sizes)
    assert len(ds.train) == sum(int(0.8 * n) for n in sizes)
    # pixels: 0 -> -1, 255 -> +1; the stroke sits on row label % 28
    assert set(np.unique(ds.train.x)) == {-1.0, 1.0}
    rows = ds.train.x[:, 0].max(axis=2).argmax(axis=1)
    np.testing.assert_array_equal(rows, ds.train.y % 28)
    # every client's examples are its writer's: rebuilt from the raw rows
    raw = _femnist_rows()
    for name, idx in zip(ds.client_names, ds.client_indices, strict=True):
        want = sorted(c for w, c in zip(raw["writer_id"], raw["character"], strict=True) if w == name)
        got = ds.train.y[idx].tolist()
        assert set(got) <= set(want) and len(got) == int(0.8 * WRITERS[name])


def test_natural_num_clients_takes_the_first_ids_in_sorted_order(femnist):
    ds = _load(_data(femnist, num_clients=2))
    assert ds.client_names == sorted(WRITERS)[:2]


def test_label_partitioners_run_on_hf_data(femnist):
    ds = _load(_data(femnist, partition="shard", shards_per_client=2, num_clients=4, partition_by=None))
    assert ds.num_clients == 4 and ds.client_names == []


def test_cifar_schema_from_parquet_with_a_test_split(cifar_parquet):
    d = _data(cifar_parquet, image_column=None, label_column="label", partition="iid", partition_by=None)
    d = d.model_copy(update={"num_clients": 4, "test_split": "test"})
    ds = _load(d)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert len(ds.train) == 40 and len(ds.test) == 10
    assert sum(p.shape[0] for p in ds.client_indices) == 40
    assert ds.train.x.min() >= -1.0 and ds.train.x.max() <= 1.0


@pytest.mark.parametrize(
    "keys, match",
    [
        ({"label_column": "nope"}, "data.label_column='nope' is not a column"),
        ({"image_column": "writer_id"}, "image"),
        ({"label_column": "writer_id"}, "not integer class labels"),
        ({"partition_by": "missing"}, "data.partition_by='missing' is not a column"),
        ({"test_split": "test"}, "single split|not a split"),
        ({"train_split": "validation"}, "not a split"),
        ({"num_clients": 5}, "at most 4 clients"),
    ],
)
def test_bad_hf_input_is_one_line_naming_the_key(femnist, keys, match):
    with pytest.raises(FedsimError, match=match) as err:
        _load(_data(femnist, **keys))
    assert "\n" not in str(err.value)


def test_a_natural_id_column_with_one_id_is_refused(tmp_path):
    rows = _femnist_rows()
    rows["writer_id"] = ["same"] * len(rows["writer_id"])
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(FedsimError, match="1 distinct id"):
        _load(_data(tmp_path / "one"))


def test_a_missing_dataset_offline_is_one_line_saying_how_to_get_it(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FedsimError, match="save_to_disk") as err:
        _load(_data("flwrlabs/not-a-dataset-here"))
    assert "\n" not in str(err.value)
    with pytest.raises(FedsimError, match="not a directory"):
        _load(_data(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedsimError, match="as a save_to_disk or Parquet directory") as err:
        _load(_data(tmp_path / "empty"))
    assert "\n" not in str(err.value)


def _experiment(path, out_name, runs):
    return {
        "name": out_name,
        "seed": 0,
        "data": {
            "dataset": "hf",
            "path": str(path),
            "image_column": "image",
            "label_column": "character",
            "partition": "natural",
            "partition_by": "writer_id",
            "num_clients": None,
        },
        "model": {"name": "lenet", "widths": {"conv1": 4, "conv2": 6, "fc1": 16}},
        "engine": {"backend": "sequential", "clients_per_round": 4},
        "runs": runs,
    }


def test_femnist_schema_runs_fedavg_and_fedma_end_to_end(femnist, tmp_path):
    runs = [
        {"algorithm": "fedavg", "rounds": 2, "local_epochs": 1, "lr": 0.05, "batch_size": 8},
        {
            "algorithm": "fedma",
            "rounds": 1,
            "local_epochs": 1,
            "lr": 0.05,
            "batch_size": 8,
            "growth_budget": 8,
        },
    ]
    cfg_file = tmp_path / "femnist.yaml"
    cfg_file.write_text(yaml.safe_dump(_experiment(femnist, "femnist-tiny", runs)))
    assert main(["run", str(cfg_file), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    run_dir = only_dir(tmp_path / "out")
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    assert set(rounds.run_id) == {"fedavg", "fedma"}
    final = rounds.sort_values("round").groupby("run_id").test_accuracy.last()
    assert final.notna().all()  # both runs trained and were evaluated at the end
    clients = pd.read_parquet(run_dir / "clients.parquet")
    assert set(clients.client_id) == {0, 1, 2, 3}  # num_clients null: one client per writer
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["data"]["num_clients"] == 4
    # the partition is on record: per writer (client order = sorted ids) its training labels
    part = pd.read_parquet(run_dir / "partition.parquet")
    assert part.groupby("client").client_name.first().tolist() == sorted(WRITERS)
    sizes = part.groupby("client").examples.sum().tolist()
    assert sizes == [int(0.8 * WRITERS[w]) for w in sorted(WRITERS)]
    assert main(["report", str(run_dir), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "partition.png").stat().st_size > 0
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "### Partition of" in summary and "4 clients" in summary


def test_fedma_with_fewer_clients_per_round_than_writers_is_refused_before_running(femnist, tmp_path):
    exp = _experiment(femnist, "femnist-bad", [{"algorithm": "fedma", "rounds": 1}])
    exp["engine"]["clients_per_round"] = 3
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(yaml.safe_dump(exp))
    assert main(["run", str(cfg_file), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------- text: flwrlabs/shakespeare's schema

LINES = {
    "HAMLET_HAMLET": "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "MACBETH_WITCH": "Fair is foul, and foul is fair: hover through the fog and filthy air. When shall we",
    "KING_LEAR_LEAR": "Nothing will come of nothing: speak again. Blow, winds, and crack your cheeks! rage",
}


@pytest.fixture(scope="module")
def shakespeare_parquet(tmp_path_factory):
    rows = {"character_id": [], "x": [], "y": []}
    for role, text in LINES.items():
        text = text.replace("Blow", "Blöw")  # a character outside the vocabulary: ö -> o
        for i in range(len(text) - 81 + 1):
            rows["character_id"].append(role)
            rows["x"].append(text[i : i + 80])
            rows["y"].append(text[i + 80])
    root = tmp_path_factory.mktemp("hf") / "shakespeare"
    root.mkdir()
    datasets.Dataset.from_dict(rows).to_parquet(str(root / "train-00000-of-00001.parquet"))
    return root, rows


def test_shakespeare_schema_is_tokenised_into_windows(shakespeare_parquet):
    from fedsim.data.shakespeare import NUM_CLASSES, decode

    root, rows = shakespeare_parquet
    d = _data(root, image_column=None, text_column="x", label_column="y", partition_by="character_id")
    ds = _load(d)
    assert ds.input_shape == (80,) and ds.num_classes == NUM_CLASSES
    assert ds.client_names == sorted(LINES)
    # every training window decodes to its row's text (ö -> o) and its label to the next character
    want = {x.replace("ö", "o"): y for x, y in zip(rows["x"], rows["y"], strict=True)}
    inputs = ds.train.inputs(np.arange(len(ds.train)))
    assert inputs.shape == (len(ds.train), 80) and inputs.dtype == np.int64
    for window, label in zip(inputs, ds.train.y, strict=True):
        assert want[decode(window)] == decode(np.array([label]))


def test_shakespeare_schema_runs_fedavg_with_the_char_lstm(shakespeare_parquet, tmp_path):
    root, _ = shakespeare_parquet
    exp = _experiment(root, "shakespeare-tiny", [{"algorithm": "fedavg", "rounds": 1, "batch_size": 4}])
    exp["data"].update(
        {"image_column": None, "text_column": "x", "label_column": "y", "partition_by": "character_id"}
    )
    exp["model"] = {"name": "char_lstm", "widths": {"embedding": 4, "lstm": 8}}
    exp["engine"]["clients_per_round"] = 3
    cfg_file = tmp_path / "shakespeare.yaml"
    cfg_file.write_text(yaml.safe_dump(exp))
    assert main(["run", str(cfg_file), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    rounds = pd.read_parquet(only_dir(tmp_path / "out") / "rounds.parquet")
    assert rounds.test_accuracy.notna().all()

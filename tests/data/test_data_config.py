"""The data keys issue 30 added: bad combinations are one line naming the key, exit 2, nothing
written (checked by fedsim.config.validate before any data is read)."""

from __future__ import annotations

import pytest

from fedsim import config
from fedsim.cli import main
from fedsim.errors import FedsimError
from tests.helpers import tiny_experiment


def _parse(**data):
    return config.parse(tiny_experiment(data={"dataset": "digits", "num_clients": 6, **data}))


@pytest.mark.parametrize(
    "data, key",
    [
        ({"partition": "iid", "num_clients": None}, "data.num_clients"),
        ({"partition": "shard"}, "data.shards_per_client"),
        ({"partition": "shard", "shards_per_client": 0}, "data.shards_per_client"),
        (
            {"partition": "shard", "shards_per_client": 1, "shard_size": 5, "keep_incomplete_shard": True},
            "data.keep_incomplete_shard",
        ),
        ({"partition": "pathological"}, "data.classes_per_client"),
        ({"partition": "power_law", "power_law_exponent": 0.0}, "data.power_law_exponent"),
        ({"partition": "flwr_dirichlet", "alpha": 0.0}, "data.alpha"),
        ({"partition": "linear", "examples_per_client": 5}, "data.examples_per_client"),
        (
            {
                "dataset": "hf",
                "path": "x/y",
                "partition": "natural",
                "partition_by": "w",
                "examples_per_client": 5,
            },
            "data.examples_per_client",
        ),
        ({"dataset": "hf", "partition": "iid"}, "data.path"),
        ({"dataset": "hf", "path": "x/y", "partition": "natural"}, "data.partition_by"),
        ({"partition": "dirichlet", "min_partition_size": -1}, "data.min_partition_size"),
    ],
)
def test_bad_data_keys_name_the_key(data, key):
    with pytest.raises(FedsimError, match=key.replace(".", r"\.")) as err:
        _parse(**data)
    assert "\n" not in str(err.value)


def test_partition_literal_lists_every_registered_partitioner():
    from fedsim.data import PARTITIONS

    literal = config.DataConfig.model_fields["partition"].annotation.__args__
    assert set(literal) == set(PARTITIONS)


def test_bad_partition_on_the_cli_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "run",
            "--set",
            "data.partition=pathological",
            "--set",
            "data.classes_per_client=11",
            "--out",
            str(out),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.classes_per_client=11" in err[0]
    assert not out.exists() or not any(out.iterdir())

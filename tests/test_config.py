"""Strict config loading: unknown keys and wrong types name the key; overrides; defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedsim import config
from fedsim.errors import FedsimError
from tests.helpers import tiny_experiment

ROOT = Path(__file__).resolve().parents[1]


def test_job_file_digits_is_the_builtin_default():
    assert config.load(ROOT / "jobs" / "digits.yaml") == config.load(None)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("data.foo=1", "unknown config key 'data.foo'"),
        ("engine.num_workers=many", "config key 'engine.num_workers'"),
        ("data.num_clients=ten", "config key 'data.num_clients'"),
        ("runs.0.lr=fast", "config key 'runs.0.lr'"),
        ("runs.0.mu=0.1", "unknown config key 'runs.0.mu'"),  # mu is FedProx's, not FedAvg's
        ("runs.0.rounds=true", "config key 'runs.0.rounds'"),  # a bool is not an int
        ("bogus=1", "unknown config key 'bogus'"),
    ],
)
def test_bad_key_or_type_names_the_key(override, needle):
    with pytest.raises(FedsimError, match=re.escape(needle)):
        config.parse(tiny_experiment(), [override])


def test_set_overrides_index_lists_and_parse_values_as_yaml():
    cfg = config.parse(
        tiny_experiment(), ["data.num_clients=5", "runs.0.rounds=7", "runs.0.lr=0.5", "engine.num_workers=2"]
    )
    assert (cfg.data.num_clients, cfg.runs[0].rounds, cfg.runs[0].lr, cfg.engine.num_workers) == (
        5,
        7,
        0.5,
        2,
    )


def test_set_past_the_end_of_runs_is_an_error():
    with pytest.raises(FedsimError, match="has 1 entries"):
        config.parse(tiny_experiment(), ["runs.3.rounds=2"])


def test_fedprox_takes_mu_and_rejects_negative():
    raw = tiny_experiment(runs=[{"algorithm": "fedprox", "mu": 0.1}])
    assert config.parse(raw).runs[0].mu == 0.1
    with pytest.raises(FedsimError, match=r"runs\.0\.mu"):
        config.parse(tiny_experiment(runs=[{"algorithm": "fedprox", "mu": -1.0}]))


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"data": {"dataset": "digits", "alpha": 0.0}}, "data.alpha must be > 0"),
        ({"data": {"dataset": "digits", "alpha": -2.0}}, "data.alpha must be > 0"),
        ({"engine": {"clients_per_round": 20}}, "clients_per_round"),
        ({"runs": [{"algorithm": "fedsgd"}]}, "unknown algorithm 'fedsgd'"),
        ({"runs": []}, "no runs"),
        ({"runs": [{"algorithm": "fedavg"}, {"algorithm": "fedavg"}]}, "distinct 'name:'"),
        ({"runs": [{"algorithm": "fedavg", "lr": 0.0}]}, r"runs\.0\.lr"),
        ({"runs": [{"algorithm": "fedavg", "momentum": -1.0}]}, r"runs\.0\.momentum' must be >= 0"),
        ({"runs": [{"algorithm": "fedavg", "weight_decay": -0.1}]}, r"runs\.0\.weight_decay' must be >= 0"),
        ({"seed": -1}, "'seed' must be >= 0"),
        ({"engine": {"clients_per_round": 3, "eval_batch_size": 0}}, "eval_batch_size must be >= 1"),
    ],
)
def test_out_of_range_values_are_rejected(over, needle):
    with pytest.raises(FedsimError, match=needle):
        config.parse(tiny_experiment(**over))


@pytest.mark.parametrize(
    "over,key",
    [
        ({"name": "../escape"}, "name"),
        ({"name": "a/b"}, "name"),
        ({"name": ".hidden"}, "name"),
        ({"name": ""}, "name"),
        ({"name": "a\\b"}, "name"),
        ({"runs": [{"algorithm": "fedavg", "name": "a/b"}]}, "runs.0.name"),
        ({"runs": [{"algorithm": "fedavg", "name": ".."}]}, "runs.0.name"),
    ],
)
def test_names_that_would_leave_or_hide_their_directory_are_rejected(over, key):
    # the experiment's name becomes <output_dir>/<name>-<time>/, a run's checkpoints/<name>.pt
    with pytest.raises(FedsimError, match=re.escape(f"config key '{key}' is")):
        config.parse(tiny_experiment(**over))


def test_a_misspelt_runs_key_is_named_not_reported_as_missing_runs():
    raw = {k: v for k, v in tiny_experiment().items() if k != "runs"}
    with pytest.raises(FedsimError, match="unknown config key 'runss'"):
        config.parse({**raw, "runss": [{"algorithm": "fedavg"}]})


def test_exponent_floats_without_a_dot_are_numbers_in_files_and_overrides(tmp_path):
    # YAML 1.2 (and PyYAML's YAML 1.1 only with a dot): 1e-3 is the float 0.001, not a string
    p = tmp_path / "x.yaml"
    p.write_text("runs:\n  - {algorithm: fedprox, lr: 1e-3, mu: 5E-2, weight_decay: 1e-4}\n")
    run = config.load(p).runs[0]
    assert (run.lr, run.mu, run.weight_decay) == (0.001, 0.05, 0.0001)
    assert config.parse(tiny_experiment(), ["runs.0.lr=2e-2"]).runs[0].lr == 0.02
    assert config.load_yaml("a: '1e-3'\nb: 1e\nc: 10") == {"a": "1e-3", "b": "1e", "c": 10}


def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(FedsimError, match="must be a YAML mapping"):
        config.load(p)


def test_resolved_config_round_trips_through_json_dict():
    cfg = config.parse(tiny_experiment(runs=[{"algorithm": "fedprox", "mu": 0.5}]))
    again = config.parse(cfg.to_dict())
    assert again == cfg and again.runs[0].mu == 0.5


def test_every_algorithm_validates_with_its_own_run_config():
    from fedsim.algorithms import ALGORITHMS

    assert set(config.RUN_CONFIGS) <= set(ALGORITHMS)  # the torch-free table lists built-ins only
    assert set(config.run_configs()) == set(ALGORITHMS)
    for name, cls in ALGORITHMS.items():
        assert config.run_configs()[name] is cls.Config, name
        raw = tiny_experiment(
            runs=[{"algorithm": name, **cls.quick}],
            model={"name": "digits_cnn" + cls.model_suffix},
            engine={"backend": "sequential", "clients_per_round": 6},
        )
        assert type(config.parse(raw).runs[0]) is cls.Config, name


def test_validating_every_shipped_job_imports_no_torch():
    """A typo in a config file must fail fast: validation may not pay torch's multi-second import."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = (
        "import json, sys\nfrom pathlib import Path\nfrom fedsim import config\n"
        "cfgs = [config.load(None)] + [config.load(p) for p in sorted(Path('jobs').glob('*.yaml'))]\n"
        "print(json.dumps([sorted({r.algorithm for c in cfgs for r in c.runs}), 'torch' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    algorithms, torch_loaded = json.loads(out.stdout)
    assert not torch_loaded
    assert {"fedavg", "fedprox", "moon", "fedpart", "fedma", "pfnm"} <= set(algorithms)

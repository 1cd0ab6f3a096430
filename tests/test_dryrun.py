"""``fedsim run --dry-run``: FedPart's cost table reproduced from the job file alone (no dataset
files), skipped runs, and projections that equal what the engine logs when the runs really train."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedsim import config, dryrun
from fedsim.accounting import thop_macs
from fedsim.cli import main
from fedsim.data.base import FederatedDataset, Split
from fedsim.io.runlog import RunLog
from tests.helpers import ACCOUNTING, digits_cnn, only_dir

ROOT = Path(__file__).resolve().parents[1]
RESNET8_PARAMS = 1_235_274  # ResNet-8 for 10 classes (FedPart's table; tests/test_accounting.py)
RESNET8_F = 14_606_080  # its thop-convention forward MACs on 3x32x32, counted by hand there


def fedsim(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEDSIM_DEBUG": ""}
    return subprocess.run(
        [sys.executable, "-m", "fedsim.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def comparison_rows(stdout: str) -> dict[str, list[str]]:
    """run id -> the cells of its row in the printed comparison table."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("comparison"))
    header = lines[start + 1].split()
    rows = {}
    for line in lines[start + 2 :]:
        if line.startswith("results:"):
            break
        cells = line.split()
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_dry_run_of_the_fedpart_job_reproduces_the_papers_table_without_data(tmp_path):
    missing = Path("/nonexistent")
    assert not missing.exists()
    out = fedsim(
        "run",
        "--dry-run",
        "jobs/fedpart_cifar10_resnet8.yaml",
        "--set",
        f"data.data_dir={missing}",
        "--out",
        str(tmp_path),
    )
    assert out.returncode == 0, out.stderr
    assert not missing.exists()  # download: true in the job, yet nothing was fetched or read
    # the printed totals: exact bytes (paper's arithmetic) and their "GB" = bytes / 1e6 / 1024
    full_up, part_up = 25 * 40 * RESNET8_PARAMS * 4, (5 + 2) * 40 * RESNET8_PARAMS * 4
    assert f"bytes up:   {full_up:,} (4.83 GB)" in out.stdout
    assert f"bytes up:   {part_up:,} (1.35 GB)" in out.stdout
    assert "rounds 0-4 full; 5-6 group 0 (conv1); 7-8 group 1 (layer1.0.conv1);" in out.stdout
    table = comparison_rows(out.stdout)
    assert (table["fedavg"]["GB_up"], table["fedpart"]["GB_up"]) == ("4.83", "1.35")
    assert float(table["fedavg"]["MACs/client"]) == pytest.approx(4.38e12, rel=0.02)
    assert float(table["fedpart"]["MACs/client"]) == pytest.approx(3.21e12, rel=0.02)
    assert round(float(table["fedpart"]["up_ratio"]), 2) == 0.28
    assert round(float(table["fedpart"]["MACs_ratio"]), 3) == 0.733

    run_dir = only_dir(tmp_path)
    runs = pd.read_parquet(run_dir / "runs.parquet")
    assert list(runs["run_id"]) == ["fedavg", "fedprox", "fedpart", "fedpart_fedprox"]
    assert runs["dry_run"].tolist() == [True] * 4 and set(runs["status"]) == {"dry_run"}
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    assert rounds["test_accuracy"].isna().all()
    totals = {}
    for run_id, rows in rounds.groupby("run_id"):
        assert list(rows["round"]) == list(range(25))  # one row per round
        assert rows["cum_bytes_up"].iloc[-1] == rows["bytes_up"].sum()
        totals[run_id] = (rows["bytes_up"].sum(), rows["flops"].sum() / 40)
    for run_id in ("fedpart", "fedpart_fedprox"):
        rows = rounds[rounds["run_id"] == run_id]
        assert list(rows["phase"]) == ["full"] * 5 + ["partial"] * 20
        assert list(rows["layer"].iloc[5:].astype(int)) == [g for g in range(10) for _ in range(2)]
        assert rows["layer"].iloc[:5].isna().all()
    (full_bytes, full_macs), (part_bytes, part_macs) = totals["fedavg"], totals["fedpart"]
    assert (full_bytes, part_bytes) == (full_up, part_up)
    assert round(full_bytes / 1e6 / 1024, 2) == 4.83 and round(part_bytes / 1e6 / 1024, 2) == 1.35
    assert round(full_macs / 1e12, 2) == 4.38 and round(part_macs / 1e12, 2) == 3.21
    assert abs(full_macs - 4.38e12) <= 0.02 * 4.38e12 and abs(part_macs - 3.21e12) <= 0.02 * 3.21e12
    assert full_macs == 25 * 8 * 500 * 3 * RESNET8_F and part_macs == (5 * 3 + 20 * 2) * 8 * 500 * RESNET8_F
    assert round(part_bytes / full_bytes, 2) == 0.28 and round(part_macs / full_macs, 3) == 0.733


def test_fedma_is_skipped_with_a_note_and_uniform_estimates_are_labelled(tmp_path):
    out = fedsim("run", "--dry-run", "jobs/fedma_digits.yaml", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "run fedma (fedma)\n  not projectable: the global model's size depends on matching" in out.stdout
    assert "uniform estimate" in out.stdout  # Dirichlet without examples_per_client
    run_dir = only_dir(tmp_path)
    runs = pd.read_parquet(run_dir / "runs.parquet").set_index("run_id")
    assert runs.loc["fedma", "message"].startswith("not projectable") and runs.loc["fedma", "dry_run"]
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    assert "fedma" not in set(rounds["run_id"]) and set(rounds["run_id"]) == set(runs.index) - {"fedma"}


def test_bad_input_exits_2_and_writes_nothing(capsys, tmp_path):
    assert main(["run", "--dry-run", "--resume", "somewhere"]) == 2
    assert "--dry-run and --resume" in capsys.readouterr().err
    assert (
        main(
            [
                "run",
                "--dry-run",
                "jobs/fedpart_digits.yaml",
                "--set",
                "model.name=resnet8",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "cannot take the dataset's input shape" in capsys.readouterr().err
    assert (
        main(
            [
                "run",
                "--dry-run",
                "jobs/fedpart_digits.yaml",
                "--set",
                "data.num_clients=2000",
                "--set",
                "engine.clients_per_round=8",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "more than the 1438 training examples" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_schedule_text_names_segments_and_folds_identical_cycles():
    def row(r, layer=None):
        return dryrun.RoundRow(
            r,
            "full" if layer is None else "partial",
            layer,
            None if layer is None else f"g{layer}",
            0,
            0,
            0,
            1,
            1,
            1,
        )

    one = [row(0), row(1), row(2, 0), row(3, 0), row(4, 1), row(5, 1)]
    assert dryrun.describe_schedule(one, 6) == "rounds 0-1 full; 2-3 group 0 (g0); 4-5 group 1 (g1)"
    two = one + [row(6), row(7), row(8, 0), row(9, 0), row(10, 1), row(11, 1)]
    assert dryrun.describe_schedule(two, 6) == (
        "rounds 0-1 full; 2-3 group 0 (g0); 4-5 group 1 (g1); the same 6-round cycle 2 times (12 rounds)"
    )
    shuffled = one + [row(6), row(7), row(8, 1), row(9, 1), row(10, 0), row(11, 0)]
    assert dryrun.describe_schedule(shuffled, 6).endswith("8-9 group 1 (g1); 10-11 group 0 (g0)")
    assert dryrun.describe_schedule([row(0)]) == "round 0 full"


def test_client_sizes_equal_the_loaders_without_reading_their_files():
    from fedsim.data import load_federated

    cases = [
        {"dataset": "digits", "partition": "iid", "num_clients": 7},
        {"dataset": "digits", "partition": "dirichlet", "num_clients": 5, "examples_per_client": 40},
        {"dataset": "shakespeare", "partition": "natural", "num_clients": 4, "examples_per_client": 20_000},
        {"dataset": "synthetic", "partition": "natural", "num_clients": 6},
    ]
    for data in cases:
        cfg = config.parse(
            {
                "seed": 4,
                "data": data,
                "model": {"name": "logreg"},
                "engine": {"clients_per_round": 1},
                "runs": [{"algorithm": "fedavg"}],
            }
        )
        sizes = dryrun.client_sizes(cfg)
        d = cfg.data
        real = load_federated(
            d.dataset,
            partition=d.partition,
            num_clients=d.num_clients,
            alpha=d.alpha,
            data_dir=None,
            seed=4,
            examples_per_client=d.examples_per_client,
        )
        assert sizes.exact, data
        assert sizes.sizes.tolist() == [len(i) for i in real.client_indices], data
        facts = dryrun.DATASET_FACTS[d.dataset]
        assert (facts.input_shape, facts.num_classes) == (tuple(real.input_shape), real.num_classes)
    assert dryrun.DATASET_FACTS["digits"].train_examples == 1_438  # fedsim's fixed 80/20 split of 1,797


def _cifar_like(num_clients: int, per_client: int, seed: int = 0) -> FederatedDataset:
    """Random CIFAR-shaped data, ``per_client`` examples each (the dry run's sizes when
    data.examples_per_client is set), so ResNet-8 (with BatchNorm) trains in the real engine."""
    g = np.random.default_rng(seed)
    n = num_clients * per_client
    train = Split(x=g.standard_normal((n, 3, 32, 32)).astype(np.float32), y=g.integers(0, 10, n))
    test = Split(x=g.standard_normal((16, 3, 32, 32)).astype(np.float32), y=g.integers(0, 10, 16))
    parts = [np.arange(j * per_client, (j + 1) * per_client, dtype=np.int64) for j in range(num_clients)]
    counts = np.stack([np.bincount(train.y[p], minlength=10) for p in parts]).astype(np.int64)
    return FederatedDataset(
        name="cifar10",
        train=train,
        test=test,
        num_classes=10,
        input_shape=(3, 32, 32),
        client_indices=parts,
        class_counts=counts,
        augment=None,
        client_names=[],
    )


COMPARED = ["round", "phase", "layer", *ACCOUNTING]


def test_projection_equals_what_the_engine_logs(tmp_path):
    from fedsim.engine import api

    raw = {
        "name": "check",
        "seed": 5,
        "data": {
            "dataset": "cifar10",
            "partition": "iid",
            "num_clients": 4,
            "examples_per_client": 6,
            "data_dir": "/nonexistent",
        },
        "model": {"name": "resnet8"},
        "engine": {"backend": "sequential", "clients_per_round": 2, "checkpoint_every": 100},
        "runs": [
            # BatchNorm statistics shared: uploaded with their layers
            {"algorithm": "fedavg", "rounds": 2, "local_epochs": 1, "batch_size": 8},
            # kept local: never uploaded, yet broadcast with the state_dict; a fresh order per cycle
            {
                "algorithm": "fedpart",
                "cycles": 2,
                "warmup_rounds": 1,
                "rounds_per_group": 1,
                "order": "random",
                "local_epochs": 2,
                "batch_size": 8,
                "bn_stats": "local",
            },
            {"algorithm": "ensemble", "local_epochs": 1, "batch_size": 8},
            {"algorithm": "entire_data", "rounds": 1, "local_epochs": 1, "batch_size": 8},
        ],
    }
    cfg = config.parse(raw)
    _, projected = dryrun.project_experiment(cfg)
    dry_dir = tmp_path / "dry"
    dryrun.write_run_dir(cfg, projected, dry_dir)
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    for _ in api.execute(cfg, _cifar_like(4, 6), real_dir):
        pass
    dry, real = RunLog.read(dry_dir), RunLog.read(real_dir)
    assert [r["dry_run"] for r in real.rows["runs"]] == [False] * 4
    assert [r["status"] for r in real.rows["runs"]] == ["finished"] * 4
    dry_rounds = pd.DataFrame(dry.rows["rounds"])[["run_id", *COMPARED]]
    real_rounds = pd.DataFrame(real.rows["rounds"])[["run_id", *COMPARED]]
    assert len(real_rounds) == 2 + 2 * (1 + 10) + 1 + 1
    pd.testing.assert_frame_equal(dry_rounds, real_rounds)
    # the random order really differs between the two cycles, and both runs agree on it
    layers = real_rounds[real_rounds["run_id"] == "fedpart"]["layer"].tolist()
    assert layers[1:11] != layers[12:22]


def test_pfnm_uploads_each_model_and_its_class_counts_like_the_engine(tmp_path):
    from fedsim.engine import api

    raw = {
        "name": "pfnm",
        "seed": 1,
        "data": {"dataset": "digits", "partition": "iid", "num_clients": 2},
        "model": {"name": "digits_cnn", "widths": {"conv1": 4, "conv2": 4, "fc1": 8}},
        "engine": {"backend": "sequential", "clients_per_round": 2},
        "runs": [{"algorithm": "pfnm", "local_epochs": 1, "batch_size": 64, "iterations": 1}],
    }
    cfg = config.parse(raw)
    _, (projected,) = dryrun.project_experiment(cfg)
    for _ in api.execute(cfg, api.prepare(cfg), tmp_path):
        pass
    (real,) = RunLog.read(tmp_path).rows["rounds"]
    (row,) = projected.rounds
    assert (row.phase, row.bytes_down, row.clients) == ("one-shot", 0, 2)
    assert (real["phase"], real["bytes_down"], real["clients"]) == ("one-shot", 0, 2)
    assert row.bytes_up == real["bytes_up"]
    # both clients train the digits CNN at the configured widths: 3F per example over all 1,438
    local = digits_cnn(widths=cfg.model.widths)
    assert row.bytes_up == 2 * (sum(p.numel() for p in local.parameters()) * 4 + 10 * 8)
    assert row.flops == 1_438 * 1 * 3 * thop_macs(local, (1, 8, 8))
    assert row.global_params is None  # matching decides it


def test_projection_of_moon_counts_frozen_forwards_like_the_engine(tmp_path):
    """MOON's loss (alone or as FedPart's local objective) adds 2F per example for returning
    clients; the dry run must know who returns from the same cohort sampling as the engine."""
    from fedsim.engine import api

    raw = {
        "name": "moon-flops",
        "seed": 3,
        "data": {"dataset": "digits", "partition": "iid", "num_clients": 4},
        "model": {"name": "digits_cnn+moon", "widths": {"conv1": 4, "conv2": 4, "fc1": 8}},
        "engine": {"backend": "sequential", "clients_per_round": 2},
        "runs": [
            {"algorithm": "moon", "rounds": 4, "local_epochs": 1, "batch_size": 64},
            {
                "algorithm": "fedpart",
                "local_objective": "moon",
                "warmup_rounds": 1,
                "rounds_per_group": 1,
                "local_epochs": 1,
                "batch_size": 64,
            },
            {"algorithm": "fedavg", "rounds": 4, "local_epochs": 1, "batch_size": 64},
        ],
    }
    cfg = config.parse(raw)
    _, projected = dryrun.project_experiment(cfg)
    dry_dir = tmp_path / "dry"
    dryrun.write_run_dir(cfg, projected, dry_dir)
    (tmp_path / "real").mkdir()
    for _ in api.execute(cfg, api.prepare(cfg), tmp_path / "real"):
        pass
    dry, real = (
        pd.DataFrame(RunLog.read(d).rows["rounds"])[["run_id", *COMPARED]]
        for d in (dry_dir, tmp_path / "real")
    )
    pd.testing.assert_frame_equal(dry, real)
    # the same cohorts cost more under MOON from the first round in which a client returns
    moon, fedavg = (real[real["run_id"] == r]["flops"].to_numpy() for r in ("moon", "fedavg"))
    assert moon[0] == fedavg[0] and (moon >= fedavg).all() and (moon > fedavg).any()

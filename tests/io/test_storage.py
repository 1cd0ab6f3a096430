"""Output locations: local paths and pyarrow URIs (file://, mock://), atomic whole-file writes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from fedsim import config
from fedsim.engine import api
from fedsim.errors import FedsimError
from fedsim.io import storage
from fedsim.io.runlog import CLIENTS_SCHEMA, ROUNDS_SCHEMA, RUNS_SCHEMA, RunLog
from tests.helpers import tiny_experiment

ROOT = Path(__file__).resolve().parents[2]
TABLES = {"runs": RUNS_SCHEMA, "rounds": ROUNDS_SCHEMA, "clients": CLIENTS_SCHEMA}
FILES = {"clients.parquet", "config.yaml", "rounds.parquet", "runs.parquet"}


def _run(out: str) -> str | Path:
    cfg = config.parse(tiny_experiment())  # sequential backend: everything in this process
    run_dir = api.new_run_dir(out, cfg.name)
    events = list(api.execute(cfg, api.prepare(cfg), run_dir))
    assert [e["kind"] for e in events].count("end") == 1
    return run_dir


def test_join_keeps_the_kind_of_location_and_the_uri_query():
    assert (
        storage.join("s3://bucket/runs?region=us-west-2", "e-1", "rounds.parquet")
        == "s3://bucket/runs/e-1/rounds.parquet?region=us-west-2"
    )
    assert storage.join("mock://", "a") == "mock:///a"
    assert storage.join("file:///tmp/x/", "a") == "file:///tmp/x/a"
    assert storage.join("runs", "a") == Path("runs/a")
    assert (
        storage.local_path("file:///tmp/a%20b") == Path("/tmp/a b") and storage.local_path("gs://b/p") is None
    )


def test_a_run_to_a_file_uri_writes_the_three_tables_and_the_config(tmp_path):
    run_dir = _run(f"file://{tmp_path}/out")
    assert isinstance(run_dir, str) and run_dir.startswith(f"file://{tmp_path}/out/tiny-")
    local = Path(run_dir[len("file://") :])
    names = {p.name for p in local.rglob("*")}
    assert FILES <= names and not any(".tmp" in n or n.startswith(".") for n in names), names
    for name, schema in TABLES.items():
        assert pd.read_parquet(f"{run_dir}/{name}.parquet").columns.tolist() == schema.names
    assert pd.read_parquet(f"{run_dir}/rounds.parquet")["round"].tolist() == [0, 1]
    assert config.parse(__import__("yaml").safe_load((local / "config.yaml").read_text())).name == "tiny"


def test_a_run_to_an_in_memory_object_store_writes_readable_tables_without_temporaries():
    # pyarrow's mock:// filesystem stands in for S3/GCS: the non-local branch (one output stream per
    # file, no rename) with a filesystem object shared by every location of the same root.
    run_dir = _run("mock:///bucket/fedsim")
    assert run_dir == storage.join("mock:///bucket/fedsim", Path(str(run_dir)).name)
    fs, path = storage.filesystem(run_dir)
    assert isinstance(fs, pafs._MockFileSystem)
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))}
    assert FILES <= names and not any(".tmp" in n or n.startswith(".") for n in names), names
    for name, schema in TABLES.items():
        assert pq.read_table(f"{path}/{name}.parquet", filesystem=fs).schema.names == schema.names
    runs = pq.read_table(f"{path}/runs.parquet", filesystem=fs).to_pandas()
    assert runs["status"].tolist() == ["finished"]


def test_run_directories_get_a_suffix_when_the_name_is_taken(tmp_path):
    for parent in (str(tmp_path), "mock:///taken"):
        first = storage.make_unique_dir(parent, "exp-1")
        second = storage.make_unique_dir(parent, "exp-1")
        assert str(first) == str(storage.join(parent, "exp-1"))
        assert str(second) == str(storage.join(parent, "exp-1-2"))
        assert storage.exists(first) and storage.exists(second)


def test_a_failed_local_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "rounds.parquet"
    old = pa.table({"round": [0]})
    storage.write_table(old, target)

    def crash(src, dst):  # the process dies between writing the temporary file and the rename
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(storage.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        storage.write_table(pa.table({"round": [0, 1]}), target)
    assert pq.read_table(target).equals(old)
    assert [p.name for p in tmp_path.iterdir()] == ["rounds.parquet"]


def test_runlog_flushes_to_a_uri_with_its_api_unchanged():
    log = RunLog("mock:///runlog/e")
    log.add("runs", {"run_id": "a", "algorithm": "fedavg", "status": "running", "seed": 1})
    log.flush()
    log.update_run("a", status="finished")
    log.flush()
    fs, path = storage.filesystem("mock:///runlog/e")
    runs = pq.read_table(f"{path}/runs.parquet", filesystem=fs)
    assert runs.schema == RUNS_SCHEMA and runs.column("status").to_pylist() == ["finished"]
    with pytest.raises(KeyError):
        log.add("rounds", {"rnd": 1})


@pytest.mark.parametrize(
    "out,needle", [("nosuchscheme://x/y", "nosuchscheme://x/y"), ("file://otherhost/x", "file://otherhost/x")]
)
def test_an_unusable_output_uri_is_one_line_naming_it(out, needle):
    with pytest.raises(FedsimError) as err:
        api.new_run_dir(out, "e")
    assert needle in str(err.value) and "--out" in str(err.value) and "\n" not in str(err.value)


def test_cli_run_accepts_a_file_uri_for_out(tmp_path):
    out = f"file://{tmp_path}/res"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsim.cli",
            "run",
            "--set",
            "engine.backend=sequential",
            "--set",
            "runs=[{algorithm: fedavg, rounds: 1, local_epochs: 2, lr: 0.05, batch_size: 16}, {algorithm: fedprox, rounds: 1, local_epochs: 2, lr: 0.05, batch_size: 16, mu: 0.01}]",
            "--set",
            "data.num_clients=4",
            "--set",
            "engine.clients_per_round=2",
            "--out",
            out,
            "--no-progress",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    run_dir = re.search(r"^results: (file://\S+)$", r.stdout, re.MULTILINE).group(1)
    assert run_dir.startswith(out + "/digits-")
    assert pd.read_parquet(f"{run_dir}/runs.parquet")["algorithm"].tolist() == ["fedavg", "fedprox"]

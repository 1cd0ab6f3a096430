"""Bad input through the real CLI in subprocesses: exit code 2, one line naming the problem and
the fix, no traceback, nothing created or overwritten.

The cases run concurrently (a module fixture starts every subprocess at once) because each one
pays torch's import; every case is still its own test with its own assertions.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _mnist_truncated(root: Path) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, dims in (
        ("train-images-idx3-ubyte", (4, 28, 28)),
        ("t10k-images-idx3-ubyte", (2, 28, 28)),
        ("train-labels-idx1-ubyte", (4,)),
        ("t10k-labels-idx1-ubyte", (2,)),
    ):
        header = struct.pack(">I", 0x0800 + len(dims)) + b"".join(struct.pack(">I", d) for d in dims)
        (raw / name).write_bytes(header + b"\x00" * 10)  # far fewer bytes than the header promises
    return root


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _fake_run_dir(root: Path) -> Path:
    d = root / "not-a-run"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    return d


def _real_run_dir(root: Path) -> Path:
    """A finished tiny run, made once, to resume with a different config."""
    out = root / "done"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsim.cli",
            "run",
            "--no-progress",
            "--out",
            str(out),
            "--set",
            "engine.backend=sequential",
            "--set",
            "runs=[{algorithm: fedavg, rounds: 1, local_epochs: 2, lr: 0.05, batch_size: 16}, {algorithm: fedprox, rounds: 1, local_epochs: 2, lr: 0.05, batch_size: 16, mu: 0.01}]",
            "--set",
            "data.num_clients=3",
            "--set",
            "engine.clients_per_round=3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return next(out.iterdir())


# (id, argv after "fedsim run" -- may use {tmp}, {mnist}, {file}, {notrun}, {run}, {badyaml}, {list};
# a literal brace is doubled, as str.format reads them), needle
CASES = [
    ("unknown-dataset", ["--set", "data.dataset=imagenet"], "imagenet"),
    ("unknown-model", ["--set", "model.name=resnet1000"], "resnet1000"),
    ("unknown-algorithm", ["--set", "runs.0.algorithm=fedsgd"], "fedsgd"),
    ("unknown-key", ["--set", "data.colour=blue"], "data.colour"),
    ("unknown-run-key", ["--set", "runs.0.mu=0.1"], "runs.0.mu"),
    ("wrong-type", ["--set", "runs.0.lr=fast"], "runs.0.lr"),
    ("bool-for-int", ["--set", "runs.0.rounds=yes"], "runs.0.rounds"),
    ("alpha-zero", ["--set", "data.alpha=0"], "data.alpha"),
    ("alpha-negative", ["--set", "data.alpha=-1"], "data.alpha"),
    ("lr-negative", ["--set", "runs.0.lr=-0.1"], "runs.0.lr"),
    (
        "too-many-clients",
        ["--set", "data.num_clients=5000", "--set", "engine.clients_per_round=10"],
        "clients",
    ),
    ("cohort-too-big", ["--set", "engine.clients_per_round=11"], "clients_per_round"),
    (
        "gpu-without-gpu",
        ["--set", "engine.gpus_per_worker=0.5", "--set", "engine.backend=sequential"],
        "gpus_per_worker",
    ),
    ("bad-timeout-policy", ["--set", "engine.timeout_policy=panic"], "engine.timeout_policy"),
    ("zero-max-attempts", ["--set", "engine.max_attempts=0"], "engine.max_attempts"),
    (
        "missing-data-dir",
        ["--set", "data.dataset=mnist", "--set", "data.data_dir=/nonexistent/fedsim-data"],
        "data_dir",
    ),
    ("data-dir-is-a-file", ["--set", "data.dataset=mnist", "--set", "data.data_dir={file}"], "data_dir"),
    ("truncated-mnist", ["--set", "data.dataset=mnist", "--set", "data.data_dir={mnist}"], "MNIST"),
    ("natural-on-digits", ["--set", "data.partition=natural"], "natural"),
    (
        "lenet-on-shakespeare",
        [
            "--set",
            "data.dataset=shakespeare",
            "--set",
            "data.partition=natural",
            "--set",
            "data.num_clients=2",
            "--set",
            "engine.clients_per_round=2",
            "--set",
            "model.name=lenet",
        ],
        "lenet",
    ),
    ("fedma-on-resnet", ["{fedma}", "--set", "model.name=resnet8"], "resnet8"),
    ("fedma-partial-cohort", ["{fedma}", "--set", "engine.clients_per_round=5"], "clients_per_round"),
    (
        "pfnm-two-rounds",
        ["{fedma}", "--set", "runs.0.algorithm=pfnm", "--set", "runs.0.rounds=2"],
        "one-shot",
    ),
    ("run-not-a-mapping", ["--set", "runs.0=3"], "runs.0"),
    ("run-index-past-end", ["--set", "runs.9.rounds=1"], "runs"),
    ("set-without-equals", ["--set", "noequals"], "key=value"),
    ("config-missing", ["missing-file.yaml"], "missing-file.yaml"),
    ("config-not-yaml", ["{badyaml}"], "not valid YAML"),
    ("config-not-a-mapping", ["{list}"], "mapping"),
    ("out-is-a-file", ["--out", "{file}"], "not a directory"),
    ("resume-not-a-run", ["--resume", "{notrun}"], "not a fedsim run directory"),
    ("resume-other-config", ["--resume", "{run}", "--set", "seed=99"], "different experiment config"),
    ("unknown-flag", ["--bogus-flag"], "bogus"),
    ("codec-bits-17", ["--set", "runs.0.uplink={{codec: quantize, bits: 17}}"], "runs.0.uplink.bits"),
    (
        "codec-fraction-1.5",
        ["--set", "runs.0.uplink={{codec: topk, fraction: 1.5}}"],
        "runs.0.uplink.fraction",
    ),
    ("codec-rank-0", ["--set", "runs.0.uplink={{codec: powersgd, rank: 0}}"], "runs.0.uplink.rank"),
    (
        "codec-on-fedmedian",
        ["--set", "runs.0.algorithm=fedmedian", "--set", "runs.0.uplink={{codec: sign}}"],
        "cannot serve fedmedian",
    ),
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    paths = {
        "tmp": tmp,
        "mnist": _mnist_truncated(tmp / "mnist"),
        "file": _write(tmp / "plain.txt", "x"),
        "notrun": _fake_run_dir(tmp),
        "run": _real_run_dir(tmp),
        "badyaml": _write(tmp / "bad.yaml", "name: [unclosed\n"),
        "list": _write(tmp / "list.yaml", "- a\n- b\n"),
        "fedma": _write(
            tmp / "fedma.yaml",
            "data: {num_clients: 6}\nengine: {clients_per_round: 6}\nruns: [{algorithm: fedma, rounds: 1}]\n",
        ),
    }

    def snapshot(p):  # every file below p: relative path, content hash and modification time
        return sorted(
            (str(x.relative_to(p)), hashlib.sha256(x.read_bytes()).hexdigest(), x.stat().st_mtime_ns)
            for x in p.rglob("*")
            if x.is_file()
        )

    before = {p: snapshot(p) for p in (paths["notrun"], paths["run"])}
    plain_before = paths["file"].read_text()

    def one(case):
        cid, argv, _ = case
        argv = [a.format(**paths) for a in argv]
        out = tmp / f"out-{cid}"
        extra = [] if "--out" in argv or "--resume" in argv else ["--out", str(out)]
        r = subprocess.run(
            [sys.executable, "-m", "fedsim.cli", "run", *argv, *extra],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        return cid, (r, out)

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = dict(pool.map(one, CASES))
    results["__untouched__"] = (
        before == {p: snapshot(p) for p in before} and paths["file"].read_text() == plain_before
    )
    return results


def test_the_table_has_at_least_25_cases():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("cid,needle", [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(outcomes, cid, needle):
    r, out = outcomes[cid]
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedsim: error:"), r.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert not out.exists() or not any(out.iterdir())


def test_existing_directories_and_files_are_left_untouched(outcomes):
    assert outcomes["__untouched__"]

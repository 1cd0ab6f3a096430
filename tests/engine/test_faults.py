"""Real faults, not mocks: a SIGKILLed driver resumed from its checkpoint, a SIGKILLed worker
whose tasks are retried, round timeouts, and checkpoints that load without unpickling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import torch

from fedsim import config
from fedsim.engine import api
from fedsim.engine.backends import SequentialBackend
from fedsim.engine.loop import run_experiment
from fedsim.io import checkpoint
from tests.helpers import tables, tiny_experiment

ROOT = Path(__file__).resolve().parents[2]

# A stateful FedMA run (its client store and assignments must survive) followed by FedAvg.
RESUMABLE = """
name: resumable
seed: 5
data: {dataset: digits, partition: dirichlet, alpha: 0.5, num_clients: 4}
model: {name: digits_cnn}
engine: {backend: sequential, clients_per_round: 4}
runs:
  - {algorithm: fedma, rounds: 2, local_epochs: 2, retrain_epochs: 1, lr: 0.05, batch_size: 16, iterations: 1}
  - {algorithm: fedavg, rounds: 2, local_epochs: 2, lr: 0.05, batch_size: 16}
"""


def _cli(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "fedsim.cli", "run", "--no-progress", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_sigkilled_driver_resumes_to_the_uninterrupted_results(tmp_path):
    cfg_file = tmp_path / "resumable.yaml"
    cfg_file.write_text(RESUMABLE)
    clean_dir, clean_events = _ray_run(
        config.load_yaml(RESUMABLE), tmp_path / "clean"
    )  # in-process, uninterrupted
    list(clean_events)

    proc = _cli(str(cfg_file), "--out", str(tmp_path / "killed"))
    deadline = time.monotonic() + 600
    rounds_file = None
    while time.monotonic() < deadline:  # kill in FedMA's second round, mid layer-wise pass
        dirs = list((tmp_path / "killed").glob("*")) if (tmp_path / "killed").exists() else []
        rounds_file = dirs[0] / "rounds.parquet" if dirs else None
        if rounds_file and rounds_file.exists():
            try:
                if len(pd.read_parquet(rounds_file)) >= 6:
                    break
            except Exception:  # the file is replaced atomically, but may vanish between checks
                pass
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    killed_dir = rounds_file.parent
    before = pd.read_parquet(killed_dir / "rounds.parquet")
    assert len(before) < 8, "FedMA's run finished before it could be killed"
    assert (pd.read_parquet(killed_dir / "runs.parquet")["status"] == "running").any()

    resumed = _cli("--resume", str(killed_dir))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    a, b = tables(clean_dir), tables(killed_dir)
    for name in ("runs", "rounds", "clients"):
        pd.testing.assert_frame_equal(a[name], b[name], check_dtype=False, obj=name)
    rounds = b["rounds"]
    assert not rounds.duplicated(["run_id", "round"]).any()
    assert rounds.groupby("run_id")["round"].apply(list).to_dict() == {
        "fedma": list(range(8)),
        "fedavg": list(range(2)),
    }


def test_checkpoints_load_with_weights_only_and_refuse_pickled_objects(tmp_path):
    path = checkpoint.save(
        tmp_path,
        "r",
        {
            "round": 3,
            "params": {"w": torch.ones(2)},
            "extra": {"a": [1, 2]},
            "store": {},
            "cum_up": 1,
            "cum_down": 2,
        },
    )
    assert checkpoint.load(tmp_path, "r")["round"] == 3

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"round": 1, "evil": Evil()}, path)  # a tampered file
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        checkpoint.load(tmp_path, "r")


def _ray_run(raw, out: Path):
    cfg = config.parse(raw)
    ds = api.prepare(cfg)
    run_dir = api.new_run_dir(out, cfg.name)
    return run_dir, api.execute(cfg, ds, run_dir)


def _client_worker_processes() -> list[psutil.Process]:
    return [
        p for p in psutil.process_iter(["cmdline"]) if "ClientWorker" in " ".join(p.info["cmdline"] or [])
    ]


# top-k with error feedback: the killed worker's clients are retried from the residuals in the
# driver's store, so the tables still match a clean run (docs/compression.md)
SLOW = [
    {
        "algorithm": "fedavg",
        "rounds": 2,
        "local_epochs": 15,
        "lr": 0.05,
        "batch_size": 8,
        "uplink": {"codec": "topk", "fraction": 0.1, "error_feedback": True},
    }
]


def test_sigkilled_worker_is_replaced_and_the_run_matches_a_clean_one(ray_local, tmp_path):
    raw = tiny_experiment(runs=SLOW, engine={"backend": "ray", "clients_per_round": 3, "num_workers": 2})
    run_dir, events = _ray_run(raw, tmp_path / "faulty")
    # Ray titles an actor's process after its class. Workers of earlier tests may linger, and this
    # run's may be Ray's pre-started idle processes (older than the run), so exclude by pid.
    earlier = {p.pid for p in _client_worker_processes()}
    killed = None
    for e in events:
        if e["kind"] == "round" and e["round"] == 0 and killed is None:
            workers = [p for p in _client_worker_processes() if p.pid not in earlier]
            assert workers, "no ClientWorker process found"
            killed = workers[0].pid
            os.kill(killed, signal.SIGKILL)
    faulty = tables(run_dir)
    clean_raw = tiny_experiment(runs=SLOW, engine={"backend": "sequential", "clients_per_round": 3})
    clean_dir, clean_events = _ray_run(clean_raw, tmp_path / "clean")
    list(clean_events)
    clean = tables(clean_dir)
    pd.testing.assert_frame_equal(clean["rounds"], faulty["rounds"], check_dtype=False)
    cols = [c for c in clean["clients"].columns if c != "attempt"]
    pd.testing.assert_frame_equal(clean["clients"][cols], faulty["clients"][cols], check_dtype=False)
    assert faulty["clients"]["attempt"].max() >= 1  # the lost task was retried and recorded
    assert faulty["clients"]["residual_norm"].notna().all()  # error feedback was on throughout


def test_round_timeout_drop_records_late_clients_and_fail_stops_only_that_run(ray_local, tmp_path):
    runs = [
        {"algorithm": "fedavg", "name": "late", "rounds": 1, "local_epochs": 30, "batch_size": 4},
        {"algorithm": "fedavg", "name": "next", "rounds": 1, "local_epochs": 1},
    ]
    raw = tiny_experiment(
        runs=runs,
        engine={
            "backend": "ray",
            "clients_per_round": 3,
            "num_workers": 2,
            "round_timeout_s": 0.05,
            "timeout_policy": "drop",
        },
    )
    run_dir, events = _ray_run(raw, tmp_path / "drop")
    list(events)
    t = tables(run_dir)
    late = t["clients"][t["clients"].run_id == "late"]
    assert late["dropped"].all() and (late["bytes_up"] == 0).all() and (late["bytes_down"] > 0).all()
    assert t["rounds"].set_index("run_id").loc["late", "clients"] == 0

    raw["engine"]["timeout_policy"] = "fail"
    run_dir, events = _ray_run(raw, tmp_path / "fail")
    list(events)
    runs_t = pd.read_parquet(run_dir / "runs.parquet").set_index("run_id")
    assert runs_t.loc["late", "status"] == "failed" and "round_timeout_s" in runs_t.loc["late", "message"]
    assert runs_t.loc["next", "status"] in ("finished", "failed")  # the next run still ran


def _stand_in_worker_class(replacement_start_s: float, late_s: float = 60.0):
    """A Ray actor with ClientWorker's calls whose clients behave on cue: client 1 takes ``late_s``,
    client 5 kills its worker process on its first attempt, clients 7 and up on every attempt;
    the others answer at once with an upload that names them. A replacement (started by the
    backend, with ClientWorker's arguments) takes ``replacement_start_s`` to start, as a real one
    takes seconds to import torch; the first pool starts at once."""
    import ray

    from fedsim.algorithms import ClientResult
    from fedsim.engine.backends import pack_uploads

    @ray.remote(num_cpus=0)
    class StandIn:
        def __init__(self, *args, start_s: float = replacement_start_s):
            time.sleep(start_s)

        def pid(self):
            return os.getpid()

        def run(self, run, tasks, received, states, extras):
            for t in tasks:
                if t.client_id >= 7 or (t.client_id == 5 and t.attempt == 0):
                    os._exit(1)
                if t.client_id == 1:
                    time.sleep(late_s)
            return pack_uploads(
                [
                    ClientResult(
                        client_id=t.client_id,
                        round=t.round,
                        n_examples=10,
                        upload={"w": np.full(3, t.client_id, dtype=np.float32)},
                        train_loss=0.5,
                        bytes_up=12,
                        bytes_down=12,
                        seconds=0.0,
                        worker="w",
                        attempt=t.attempt,
                    )
                    for t in tasks
                ]
            )

    return StandIn


def _stand_in_backend(engine: dict, replacement_start_s: float = 0.0, late_s: float = 60.0):
    import ray

    from fedsim.engine.backends import RayBackend

    cfg = config.parse(tiny_experiment(engine={"backend": "ray", **engine}))
    cls = _stand_in_worker_class(replacement_start_s, late_s)
    pool = [cls.remote(start_s=0.0) for _ in range(engine["num_workers"])]
    ray.get([w.pid.remote() for w in pool])
    backend = RayBackend(cfg, ray.put(None), workers=pool)
    backend._worker_cls = cls  # replacements are stand-ins too
    return cfg, backend, pool


def _round(cfg, backend, r: int, clients) -> list:
    from fedsim.algorithms import ClientTask

    tasks = [ClientTask(run_id="r", round=r, client_id=c, plan=None) for c in clients]
    n = len(tasks)
    return backend.collect(backend.submit(cfg.runs[0], tasks, {}, [None] * n, [None] * n))


DROP = {"clients_per_round": 3, "num_workers": 2, "round_timeout_s": 2, "timeout_policy": "drop"}
SLOW_START_S = 4.0  # a replacement's start, longer than DROP's deadline


def test_drop_policy_keeps_the_clients_on_time_and_replaces_the_worker_of_a_late_one_whose_start_is_not_counted(
    ray_local,
):
    import ray

    cfg, backend, pool = _stand_in_backend(DROP, SLOW_START_S)
    try:
        t0 = time.monotonic()
        results = _round(cfg, backend, 0, (0, 1, 2))
        waited = time.monotonic() - t0
        assert [x.client_id for x in results] == [0, 1, 2]
        assert [x.dropped for x in results] == [False, True, False]
        assert [x.upload["w"].tolist() for x in (results[0], results[2])] == [[0.0] * 3, [2.0] * 3]
        assert results[1].n_examples == 0 and results[1].bytes_up == 0 and results[1].upload == {}
        assert waited < 30, f"the round waited {waited:.0f} s for its late client"
        gone = [w for w in pool if w not in backend.workers]
        assert len(gone) == 1 and len(backend.workers) == 2  # the late client's worker, replaced
        assert results[1].worker == backend._names[gone[0]._actor_id.hex()]
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(gone[0].run.remote(cfg.runs[0], [], {}, [], []), timeout=30)

        # The next round's deadline (2 s) counts from when the replacement has started (4 s).
        results = _round(cfg, backend, 1, (2, 3, 4))
        assert [(x.client_id, x.dropped) for x in results] == [(2, False), (3, False), (4, False)]
    finally:
        backend.close()


def test_a_client_retried_after_its_worker_died_mid_round_is_not_late_for_the_replacements_start(ray_local):
    cfg, backend, _ = _stand_in_backend(DROP, SLOW_START_S)
    try:  # client 5's worker dies; its replacement takes 4 s to start, the round's deadline is 2 s
        results = _round(cfg, backend, 0, (4, 5, 6))
        assert [(x.client_id, x.dropped, x.attempt) for x in results] == [
            (4, False, 0),
            (5, False, 1),
            (6, False, 0),
        ]
        assert results[1].upload["w"].tolist() == [5.0] * 3
    finally:
        backend.close()


def test_a_replacement_that_cannot_be_placed_never_holds_up_a_round(ray_local):
    # The lost worker's node is gone with its resources: the replacement asks for a resource no
    # node has any more ("lost_node"; the first pool was started without it), so it never starts.
    engine = {"clients_per_round": 3, "num_workers": 2, "worker_resources": {"lost_node": 1}}
    cfg, backend, _ = _stand_in_backend(engine)
    try:  # client 5 kills its worker on its first attempt
        results = _round(cfg, backend, 0, (4, 5, 6))
        assert [(x.client_id, x.attempt) for x in results] == [(4, 0), (5, 1), (6, 0)]
        assert [x.upload["w"].tolist() for x in results] == [[4.0] * 3, [5.0] * 3, [6.0] * 3]
        (replacement,) = [w for w in backend.workers if w._actor_id.hex() in backend._joining]
        results = _round(cfg, backend, 1, (2, 3, 4))  # the next round runs on the survivor alone
        assert [(x.client_id, x.attempt) for x in results] == [(2, 0), (3, 0), (4, 0)]
        assert not backend._joined(replacement)  # still waiting for resources
    finally:
        backend.close()


@pytest.mark.timeout(120, method="thread")  # before the fix it waited for ever, in ray.wait
def test_a_round_timeout_never_waits_for_a_replacement_that_cannot_be_placed(ray_local):
    # As above, under a round deadline: the replacement's start is not counted against the
    # deadline, but once the cluster no longer has its resources it is not waited for either.
    engine = {
        "clients_per_round": 3,
        "num_workers": 2,
        "worker_resources": {"lost_node": 1},
        "round_timeout_s": 30,
        "timeout_policy": "fail",
    }
    cfg, backend, _ = _stand_in_backend(engine)
    try:  # client 5 kills its worker on its first attempt
        t0 = time.monotonic()
        results = _round(cfg, backend, 0, (4, 5, 6))
        assert [(x.client_id, x.attempt, x.dropped) for x in results] == [
            (4, 0, False),
            (5, 1, False),
            (6, 0, False),
        ]
        results = _round(cfg, backend, 1, (2, 3, 4))  # the next round runs on the survivor alone
        assert [(x.client_id, x.attempt, x.dropped) for x in results] == [
            (2, 0, False),
            (3, 0, False),
            (4, 0, False),
        ]
        assert time.monotonic() - t0 < 30  # no deadline was reached
    finally:
        backend.close()


def test_wait_policy_keeps_a_late_client_and_its_worker(ray_local):
    wait = {"clients_per_round": 3, "num_workers": 2, "round_timeout_s": 1, "timeout_policy": "wait"}
    cfg, backend, pool = _stand_in_backend(wait, late_s=3.0)
    try:  # client 1 takes 3 s against a 1 s deadline
        t0 = time.monotonic()
        results = _round(cfg, backend, 0, (0, 1, 2))
        assert time.monotonic() - t0 >= 3.0
        assert [(x.client_id, x.dropped) for x in results] == [(0, False), (1, False), (2, False)]
        assert results[1].upload["w"].tolist() == [1.0] * 3
        assert backend.workers == pool and backend._spawned == len(pool)  # nobody replaced
    finally:
        backend.close()


def test_clients_that_lose_their_worker_max_attempts_times_stop_the_round_with_a_message(ray_local):
    cfg, backend, _ = _stand_in_backend({"clients_per_round": 2, "num_workers": 1, "max_attempts": 2})
    try:
        with pytest.raises(RuntimeError, match=r"client 7 of round 4 \(run 'r'\) lost its worker 2 times"):
            _round(cfg, backend, 4, (7, 9))
        assert backend._spawned == 2  # the first worker and one replacement: two attempts, no third
    finally:
        backend.close()


class _RecordingBackend(SequentialBackend):
    """The sequential backend, recording the round of every client task it trains."""

    def __init__(self, cfg, ds):
        super().__init__(cfg, ds)
        self.trained: list[int] = []

    def collect(self, pending):
        self.trained += [t.round for t in pending[1]]
        return super().collect(pending)


@pytest.mark.parametrize(
    "algorithm,stop_after,ckpt_round",
    [
        ("fedavg", 4, 3),  # checkpoints after rounds 1 and 3; round 4 is written but not checkpointed
        ("fedma", 4, 3),  # 4 communication rounds per FedMA round: resumed at the second pass's start
        ("fedma", 6, 5),  # ... and in the middle of the second pass
    ],
    ids=["fedavg", "fedma-pass-boundary", "fedma-mid-pass"],
)
def test_resume_continues_from_the_last_checkpoint_and_recomputes_only_the_rounds_after_it(
    tmp_path, algorithm, stop_after, ckpt_round
):
    run = (
        {"algorithm": "fedavg", "rounds": 6, "local_epochs": 1, "lr": 0.05, "batch_size": 16}
        if algorithm == "fedavg"
        else {
            "algorithm": "fedma",
            "rounds": 2,
            "local_epochs": 1,
            "retrain_epochs": 1,
            "lr": 0.05,
            "batch_size": 16,
            "iterations": 1,
        }
    )
    cfg = config.parse(
        tiny_experiment(
            data={"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "num_clients": 3},
            engine={"backend": "sequential", "clients_per_round": 3, "checkpoint_every": 2},
            runs=[run],
        )
    )
    ds = api.prepare(cfg)
    list(run_experiment(cfg, ds, str(tmp_path / "clean"), SequentialBackend(cfg, ds)))

    crashed = tmp_path / "crashed"
    events = run_experiment(cfg, ds, str(crashed), SequentialBackend(cfg, ds))
    for event in events:
        if event["kind"] == "round" and event["round"] == stop_after:
            break
    events.close()  # the driver stops here: nothing more is written
    before = pd.read_parquet(crashed / "rounds.parquet")
    assert before["round"].tolist() == list(range(stop_after + 1))
    assert int(checkpoint.load(crashed, run["algorithm"])["round"]) == ckpt_round

    backend = _RecordingBackend(cfg, ds)
    resumed = list(run_experiment(cfg, ds, str(crashed), backend, resume=True))
    total = 6 if algorithm == "fedavg" else 8
    assert sorted(set(backend.trained)) == list(range(ckpt_round + 1, total))  # nothing before it retrained
    assert [e["round"] for e in resumed if e["kind"] == "round"] == list(range(total))
    after = pd.read_parquet(crashed / "rounds.parquet")
    kept = after[after["round"] <= ckpt_round]
    assert kept["wall_seconds"].tolist() == before[before["round"] <= ckpt_round]["wall_seconds"].tolist()
    clean = tables(tmp_path / "clean")
    for name, df in tables(crashed).items():
        pd.testing.assert_frame_equal(clean[name], df, check_dtype=False, obj=name)

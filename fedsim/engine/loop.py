"""The only round loop in fedsim (docs/design.md, "Data flow of one run").

For each run of an experiment and each communication round: sample the cohort (a pure function of
(seed, round), identical for every algorithm) -> ``plan_round`` -> ``downlink`` (stored once) ->
clients on the backend -> ``aggregate`` (in cohort order) -> evaluate the global model on the
global test set -> append Parquet rows and flush them atomically -> yield a progress event.

A round's global model is evaluated, and its rows and checkpoint written, right after the next
round's clients are submitted, so this work overlaps their training instead of adding to the
round's time (``wall_seconds`` covers sampling to aggregation). A completed round is still never
lost: it is written before the next round's results are awaited, and the round that ends a run is
written before the run's status changes. A test loss of NaN/Inf marks the run diverged at that
round, as before; the round already submitted after it is abandoned.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

import fedsim
from fedsim import params as P
from fedsim.algorithms import Algorithm, ClientTask, ServerState
from fedsim.algorithms.base import from_plain, to_plain
from fedsim.config import ExperimentConfig, RunConfig
from fedsim.data.base import FederatedDataset
from fedsim.engine.backends import RoundTimeout
from fedsim.engine.client import make_algorithm, trainable_count
from fedsim.evaluation import evaluate, evaluate_probs  # noqa: F401  (re-exported)
from fedsim.io import checkpoint
from fedsim.io.runlog import RunLog
from fedsim.models import build_model
from fedsim.rng import numpy_rng, sample_cohort, torch_rng  # noqa: F401  (re-exported)


def versions() -> dict[str, str]:
    """Versions recorded with every run."""
    import ray

    return {
        "fedsim": fedsim.__version__,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _now() -> datetime:
    return datetime.now(timezone.utc)


def run_experiment(
    cfg: ExperimentConfig, dataset: FederatedDataset, run_dir: str, backend: Any, resume: bool = False
) -> Iterator[dict]:
    """Run every run of ``cfg`` on ``backend``, writing Parquet rows to ``run_dir``.

    With ``resume``, the tables already in ``run_dir`` are read back: runs that ended are replayed
    as events and skipped, and a run that was interrupted continues from its last checkpoint
    (rows after the checkpoint's round are discarded and recomputed, so no round is missing or
    duplicated, and every column but the wall-clock ones comes out as in an uninterrupted run).

    Yields progress events (dicts): ``{"kind": "start", "run", "rounds"}``, one
    ``{"kind": "round", ...the rounds.parquet row}`` per round, and
    ``{"kind": "end", "run", "status", "message"}``.
    """
    log = RunLog.read(run_dir) if resume else RunLog(run_dir)
    for run in cfg.runs:
        yield from _run_one(cfg, run, dataset, backend, log)


def _logged_rounds(log: RunLog, run: RunConfig, rounds: int) -> Iterator[dict]:
    """Progress events for the rounds of ``run`` already in the log (a resumed experiment)."""
    for r in log.rows["rounds"]:
        if r["run_id"] == run.label:
            yield {"kind": "round", **r, "rounds": rounds}


def _replay(log: RunLog, run: RunConfig, rounds: int) -> Iterator[dict]:
    row = log.run_row(run.label)
    yield {"kind": "start", "run": run.label, "rounds": rounds}
    yield from _logged_rounds(log, run, rounds)
    yield {"kind": "end", "run": run.label, "status": row["status"], "message": row["message"] or ""}


def _restore(log: RunLog, run: RunConfig, algo: Algorithm, state: Any, backend: Any):
    """(state, first round, cumulative bytes up and down, client store) from the run's checkpoint;
    rows after the checkpointed round are dropped. Without a checkpoint the run restarts."""
    ckpt = checkpoint.load(log.dir, run.label)
    last = -1 if ckpt is None else int(ckpt["round"])
    log.truncate(run.label, after_round=last)
    if ckpt is None:
        return state, 0, 0, 0, {}
    client_state = algo.client_state_type()
    store = {int(c): backend.put_state(from_plain(client_state, v)) for c, v in ckpt["store"].items()}
    return (
        ServerState(params=ckpt["params"], algo_state=from_plain(algo.AlgoState, ckpt["algo_state"])),
        last + 1,
        int(ckpt["cum_up"]),
        int(ckpt["cum_down"]),
        store,
    )


def _save(
    log: RunLog, run: RunConfig, r: int, state: Any, store: dict, backend: Any, cum_up: int, cum_down: int
) -> None:
    checkpoint.save(
        log.dir,
        run.label,
        {
            "round": r,
            "params": state.params,
            "algo_state": to_plain(state.algo_state),
            "cum_up": cum_up,
            "cum_down": cum_down,
            "store": {c: to_plain(backend.get_state(h)) for c, h in store.items()},
        },
    )


def _evaluate_bn_local(
    algo: Algorithm,
    state: Any,
    model: torch.nn.Module,
    dataset: FederatedDataset,
    store: dict,
    backend: Any,
    cfg: ExperimentConfig,
) -> tuple[Any, Any, Any]:
    """With ``bn_stats: local`` the global model has no BatchNorm statistics of its own: evaluate
    the global weights with each client's statistics. Returns (accuracy and loss of client 0's
    model, the paper's choice; the mean accuracy over every client that has trained so far)."""
    accs, first = [], (None, None)
    for c in sorted(store):
        bn = backend.get_state(store[c]).bn
        model.load_state_dict({**algo.global_params(state), **P.from_numpy(bn)})
        acc, loss = evaluate(model, dataset.test, cfg.engine.eval_batch_size)
        accs.append(acc)
        if c == 0:
            first = (acc, loss)
    return first[0], first[1], (float(np.mean(accs)) if accs else None)


def _run_one(
    cfg: ExperimentConfig, run: RunConfig, dataset: FederatedDataset, backend: Any, log: RunLog
) -> Iterator[dict]:
    algo: Algorithm = make_algorithm(run, cfg, dataset)
    rounds = algo.num_rounds()
    previous = log.run_row(run.label)
    if previous is not None and previous["status"] != "running":
        yield from _replay(log, run, rounds)
        return
    model = build_model(
        cfg.model.name,
        num_classes=dataset.num_classes,
        input_shape=dataset.input_shape,
        widths=cfg.model.widths,
        generator=torch_rng(cfg.seed, "init"),
    )
    state = algo.init_state(P.clone(model.state_dict()))
    store: dict[int, Any] = {}  # client id -> backend handle of its state (stateful algorithms only)
    first, cum_up, cum_down = 0, 0, 0
    if previous is None:
        log.add(
            "runs",
            {
                "run_id": run.label,
                "experiment": cfg.name,
                "algorithm": run.algorithm,
                "config_json": json.dumps(
                    {**cfg.to_dict(), "runs": [run.model_dump(mode="json")]}, sort_keys=True
                ),
                "seed": cfg.seed,
                "fedsim_version": fedsim.__version__,
                "versions_json": json.dumps(versions(), sort_keys=True),
                "status": "running",
                "started_at": _now(),
            },
        )
        log.flush()
    else:
        state, first, cum_up, cum_down, store = _restore(log, run, algo, state, backend)
    yield {"kind": "start", "run": run.label, "rounds": rounds}
    yield from _logged_rounds(log, run, rounds)
    status, message = "finished", ""
    # The last aggregated round, not yet evaluated and written: (row, results, whether to
    # evaluate, then what its checkpoint holds).
    done: tuple | None = None

    def diverged(r: int) -> str:
        return (
            f"round {r}: the loss or the global weights became NaN/Inf; lower runs.lr "
            "or check the data; rounds before it are kept"
        )

    def commit() -> dict | None:
        """Evaluate round ``done``'s global model if due, write its rows (and checkpoint); its
        progress event, or None when the test loss came out NaN/Inf (nothing is written)."""
        row, results, due, state_r, store_r, up_r, down_r = done
        r = row["round"]
        if due:
            model = algo.reference_model(algo.model_widths(state_r))
            if algo.keeps_bn_local:
                acc, loss, acc_mean = _evaluate_bn_local(algo, state_r, model, dataset, store_r, backend, cfg)
            else:
                (acc, loss), acc_mean = (
                    algo.evaluate(state_r, model, dataset.test, cfg.engine.eval_batch_size),
                    None,
                )
            if loss is not None and not np.isfinite(loss):
                return None
            row = {**row, "test_accuracy": acc, "test_loss": loss, "test_accuracy_clients_mean": acc_mean}
        for x in results:
            log.add(
                "clients",
                {
                    "run_id": run.label,
                    "round": r,
                    "client_id": x.client_id,
                    "n_examples": x.n_examples,
                    "local_steps": x.local_steps,
                    "train_loss": None if x.dropped else x.train_loss,
                    "bytes_up": x.bytes_up,
                    "bytes_down": x.bytes_down,
                    "seconds": x.seconds,
                    "worker": x.worker,
                    "attempt": x.attempt,
                    "dropped": x.dropped,
                },
            )
        log.add("rounds", row)
        log.flush()
        if (r + 1) % cfg.engine.checkpoint_every == 0 or r == rounds - 1:
            _save(log, run, r, state_r, store_r, backend, up_r, down_r)
        return {"kind": "round", **row, "rounds": rounds}

    for r in range(first, rounds):
        t0 = time.perf_counter()
        cohort = sample_cohort(cfg.seed, r, dataset.num_clients, cfg.engine.clients_per_round)
        plan = algo.plan_round(state, r, cohort)
        broadcast = P.to_numpy(algo.downlink(state, plan))
        handle = backend.broadcast(broadcast)
        tasks = [ClientTask(run_id=run.label, round=r, client_id=c, plan=plan) for c in plan.cohort]
        states = [store.get(c) if algo.stateful else None for c in plan.cohort]
        extras = [algo.client_downlink(state, plan, c) for c in plan.cohort]
        extras = [None if e is None else P.to_numpy(e) for e in extras]
        pending = backend.submit(run, tasks, handle, states, extras)
        if done is not None:  # the previous round is evaluated and written while this one trains
            event, done = commit(), None
            if event is None:  # round r - 1's test loss is NaN/Inf: round r is abandoned
                status, message = "diverged", diverged(r - 1)
                break
            yield event
        try:
            results = backend.collect(pending)
        except RoundTimeout as err:
            status, message = "failed", str(err)
            break
        results = [
            x
            if not x.dropped
            else replace(x, bytes_down=0 if plan.pooled else P.nbytes(broadcast) + P.nbytes(e or {}))
            for x, e in zip(results, extras)
        ]
        kept = [x for x in results if not x.dropped]
        if algo.stateful:
            store = {**store, **{x.client_id: backend.put_state(x.state) for x in kept}}
        if kept:
            state = algo.aggregate(state, plan, kept)
        up, down = sum(x.bytes_up for x in results), sum(x.bytes_down for x in results)
        cum_up, cum_down = cum_up + up, cum_down + down
        weights = np.array([x.n_examples for x in kept], dtype=np.float64)
        train_loss = float(np.dot(weights, [x.train_loss for x in kept]) / weights.sum()) if kept else None
        if not (P.all_finite(algo.global_params(state)) and (train_loss is None or np.isfinite(train_loss))):
            status, message = "diverged", diverged(r)
            break
        model = algo.reference_model(algo.model_widths(state))  # global widths (FedMA's grow)
        row = {
            "run_id": run.label,
            "algorithm": run.algorithm,
            "round": r,
            "phase": plan.phase,
            "layer": plan.layer,
            "test_accuracy": None,
            "test_loss": None,
            "train_loss": train_loss,
            "bytes_up": up,
            "bytes_down": down,
            "cum_bytes_up": cum_up,
            "cum_bytes_down": cum_down,
            "cum_bytes": cum_up + cum_down,
            "global_params": algo.global_size(state, model),
            # what a client trained, on its own model (FedMA's local widths differ from the global)
            "trainable_params": (
                max(x.trainable_params for x in kept) if kept else trainable_count(model, plan.trainable)
            ),
            "clients": len(kept),
            "flops": int(sum(x.macs for x in kept)),
            "test_accuracy_clients_mean": None,
            "wall_seconds": time.perf_counter() - t0,
        }
        due = plan.evaluate and ((r + 1) % cfg.engine.eval_every == 0 or r == rounds - 1)
        done = (row, results, due, state, store, cum_up, cum_down)
    if done is not None:
        event = commit()
        if event is None:
            status, message = "diverged", diverged(done[0]["round"])
        else:
            yield event
    log.update_run(run.label, status=status, message=message, finished_at=_now())
    log.flush()
    yield {"kind": "end", "run": run.label, "status": status, "message": message}

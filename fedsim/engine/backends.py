"""Where client tasks run: in-process (sequential) or on a pool of Ray ClientWorker actors.

Both backends expose the same three calls, so the round loop and the algorithms cannot tell them
apart (DESIGN.md decision 6):

* ``broadcast(received)`` -> a handle to the round's downlink tensors, stored once per round
  (Ray: one ``ray.put``; workers read it zero-copy);
* ``put_state(value)`` -> a handle to one client's persistent state, ``get_state(handle)`` -> the
  value back (for checkpoints);
* ``run_round(run, tasks, handle, states, extras)`` -> the :class:`ClientResult` s in task order
  (``extras[i]``: tensors sent to task i's client alone, or None).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from typing import Any

from fedsim.algorithms import ClientResult, ClientTask
from fedsim.config import ExperimentConfig, RunConfig
from fedsim.data.base import FederatedDataset
from fedsim.engine.client import ClientRunner, set_threads, warm_up
from fedsim.errors import FedsimError


class SequentialBackend:
    """Runs every client in this process, one after another (for debugging and tests).

    torch threads are set to ``engine.cpus_per_worker``, as on a Ray worker, so both backends
    compute with the same thread count and give bit-identical results on CPU.
    """

    name = "sequential"

    def __init__(self, experiment: ExperimentConfig, dataset: FederatedDataset):
        set_threads(experiment.engine.cpus_per_worker)
        device = "cuda" if experiment.engine.gpus_per_worker > 0 else "cpu"
        self.runner = ClientRunner(experiment, dataset, device=device, worker_id="local")
        self.num_workers = 1

    def broadcast(self, received: dict[str, Any]) -> Any:
        return received

    def put_state(self, value: Any) -> Any:
        return value

    def get_state(self, handle: Any) -> Any:
        return handle

    def run_round(self, run: RunConfig, tasks: list[ClientTask], handle: Any, states: list[Any],
                  extras: list[Any]) -> list[ClientResult]:
        out = []
        for task, state, extra in zip(tasks, states, extras):
            try:
                out.append(self.runner.run(run, task, handle, state, extra))
            except FedsimError:
                raise
            except Exception as err:  # name the client and stage, like FedJAX's debug backend
                raise RuntimeError(f"client {task.client_id} failed in round {task.round} of run "
                                   f"{task.run_id!r} during local training: {err!r}") from err
        return out

    def close(self) -> None:
        pass


def pool_size(experiment: ExperimentConfig, resources: dict[str, float]) -> int:
    """Number of ClientWorker actors: ``engine.num_workers``, or with ``auto`` as many as the
    cluster's CPUs (or GPU fractions, when ``gpus_per_worker > 0``, and ``worker_resources``) fit,
    capped at the cohort size.

    Args:
        resources: ``ray.cluster_resources()``-style totals, e.g. ``{"CPU": 2.0, "GPU": 1.0}``.
    """
    e = experiment.engine
    if e.num_workers != "auto":
        return int(e.num_workers)
    fit = math.floor(resources.get("CPU", 1.0) / e.cpus_per_worker + 1e-9)
    if e.gpus_per_worker > 0:
        fit = min(fit, math.floor(resources.get("GPU", 0.0) / e.gpus_per_worker + 1e-9))
    for key, amount in (e.worker_resources or {}).items():  # custom placement resources
        fit = min(fit, math.floor(resources.get(key, 0.0) / amount + 1e-9))
    return max(1, min(fit, e.clients_per_round))


def _make_worker_class():
    import ray

    @ray.remote
    class ClientWorker:
        """A Ray actor that runs client tasks with a :class:`ClientRunner` it keeps for its life."""

        def __init__(self, experiment: ExperimentConfig, dataset_box: list, worker_id: str):
            gpus = experiment.engine.gpus_per_worker
            if gpus == 0:
                os.environ["CUDA_VISIBLE_DEVICES"] = ""  # keep CPU-only workers off every GPU
            set_threads(experiment.engine.cpus_per_worker)
            warm_up()
            dataset = ray.get(dataset_box[0])  # numpy arrays, zero-copy views of the object store
            self.runner = ClientRunner(experiment, dataset, device="cuda" if gpus > 0 else "cpu",
                                       worker_id=worker_id)

        def run(self, run: RunConfig, task: ClientTask, received: dict, state: Any, extra: Any) -> ClientResult:
            return self.runner.run(run, task, received, state, extra)

        def pid(self) -> int:
            return os.getpid()

    return ClientWorker


TASKS_IN_FLIGHT = 2


def _spawn_worker(worker_cls: Any, experiment: ExperimentConfig, dataset_ref: Any, name: str) -> Any:
    e = experiment.engine
    return worker_cls.options(num_cpus=e.cpus_per_worker, num_gpus=e.gpus_per_worker,
                              resources=dict(e.worker_resources or {})).remote(experiment, [dataset_ref], name)


class RoundTimeout(RuntimeError):
    """A round passed ``engine.round_timeout_s`` under ``timeout_policy: fail``."""


def dropped_result(task: ClientTask, worker: str, seconds: float) -> ClientResult:
    """The record of a client dropped for lateness: nothing uploaded, recorded in clients.parquet."""
    return ClientResult(client_id=task.client_id, round=task.round, upload={}, n_examples=0,
                        train_loss=float("nan"), bytes_up=0, bytes_down=0, seconds=seconds, worker=worker,
                        attempt=task.attempt, dropped=True)


class RayBackend:
    """A pool of ClientWorker actors sized from the cluster's resources, never one per client.

    Each actor requests ``engine.cpus_per_worker`` CPUs and ``engine.gpus_per_worker`` GPUs
    (fractional: 0.25 puts four workers on one GPU). Tasks go to whichever worker is idle next
    (``ray.wait``), so uneven client sizes balance across the pool.

    Faults: when a worker process dies (preemption, OOM kill), its task is retried on a fresh
    worker, up to ``engine.max_attempts`` attempts per client and round; the result is identical
    because a client's work depends only on (seed, round, client) and what it received. A round
    that passes ``engine.round_timeout_s`` follows ``engine.timeout_policy``: ``wait`` (keep
    waiting), ``drop`` (aggregate the clients that finished; late ones are recorded as dropped and
    their workers replaced) or ``fail`` (stop the run with a message).
    """

    name = "ray"

    def __init__(self, experiment: ExperimentConfig, dataset_ref: Any, workers: list[Any] | None = None):
        """Args: the experiment; the object-store ref of the dataset; optionally the pool's actors,
        already started by :meth:`start_workers` (so they start while the driver does)."""
        import ray

        self._ray = ray
        self.experiment = experiment
        self._dataset_ref = dataset_ref
        self._spawned = 0
        self._names: dict[str, str] = {}
        self._replaced: dict[str, Any] = {}
        self._worker_cls = _make_worker_class()
        if workers is None:
            workers = self.start_workers(experiment, dataset_ref)
        self.workers = list(workers)
        for w in self.workers:
            self._names[w._actor_id.hex()] = f"worker-{self._spawned}"
            self._spawned += 1
        self.num_workers = len(self.workers)

    @staticmethod
    def start_workers(experiment: ExperimentConfig, dataset_ref: Any) -> list[Any]:
        """Start the pool's ClientWorker actors (:func:`pool_size` of them), named worker-0.. in order."""
        import ray

        cls = _make_worker_class()
        return [_spawn_worker(cls, experiment, dataset_ref, f"worker-{i}")
                for i in range(pool_size(experiment, ray.cluster_resources()))]

    def _spawn(self) -> Any:
        name = f"worker-{self._spawned}"
        self._spawned += 1
        w = _spawn_worker(self._worker_cls, self.experiment, self._dataset_ref, name)
        self._names[w._actor_id.hex()] = name
        return w

    def _replace(self, worker: Any) -> Any:
        """A fresh worker in place of ``worker`` (the same one for every call about one worker)."""
        key = worker._actor_id.hex()
        if key not in self._replaced:
            self._ray.kill(worker, no_restart=True)
            self.workers = [w for w in self.workers if w._actor_id.hex() != key]
            self._replaced[key] = self._spawn()
            self.workers.append(self._replaced[key])
        return self._replaced[key]

    def broadcast(self, received: dict[str, Any]) -> Any:
        return self._ray.put(received)

    def put_state(self, value: Any) -> Any:
        return None if value is None else self._ray.put(value)

    def get_state(self, handle: Any) -> Any:
        return None if handle is None else self._ray.get(handle)

    def run_round(self, run: RunConfig, tasks: list[ClientTask], handle: Any, states: list[Any],
                  extras: list[Any]) -> list[ClientResult]:
        ray, e = self._ray, self.experiment.engine
        results: list[ClientResult | None] = [None] * len(tasks)
        tasks = list(tasks)
        queue = list(range(len(tasks)))
        # Two tasks in flight per worker: the next client is queued on the worker while the
        # current one trains, so no worker waits for a driver round trip between clients.
        idle = [w for _ in range(TASKS_IN_FLIGHT) for w in self.workers]
        pending: dict[Any, tuple[Any, int, float]] = {}
        deadline = None if e.round_timeout_s is None else time.monotonic() + e.round_timeout_s
        while queue or pending:
            while queue and idle:
                worker, i = idle.pop(), queue.pop(0)
                ref = worker.run.remote(run, tasks[i], handle, states[i], extras[i])
                pending[ref] = (worker, i, time.monotonic())
            wait_s = None if deadline is None or e.timeout_policy == "wait" else max(0.0, deadline - time.monotonic())
            done, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
            if not done:  # past the round's deadline
                late = sorted({tasks[i].client_id for _, i, _ in pending.values()} |
                              {tasks[i].client_id for i in queue})
                if e.timeout_policy == "fail":
                    raise RoundTimeout(f"round {tasks[0].round} of run {tasks[0].run_id!r} passed "
                                       f"engine.round_timeout_s={e.round_timeout_s} with clients {late} unfinished; "
                                       "raise the timeout or use engine.timeout_policy: drop")
                for worker, i, t0 in pending.values():
                    results[i] = dropped_result(tasks[i], self._names.get(worker._actor_id.hex(), "?"), time.monotonic() - t0)
                    self._replace(worker)
                for i in queue:
                    results[i] = dropped_result(tasks[i], "", 0.0)
                break
            for ref in done:
                worker, i, _ = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayActorError:  # the worker process died: retry elsewhere
                    t = tasks[i]
                    if t.attempt + 1 >= e.max_attempts:
                        raise RuntimeError(f"client {t.client_id} of round {t.round} (run {t.run_id!r}) lost its "
                                           f"worker {e.max_attempts} times; check the workers' memory and logs "
                                           "or raise engine.max_attempts") from None
                    tasks[i] = replace(t, attempt=t.attempt + 1)
                    queue.insert(0, i)
                    idle.append(self._replace(worker))
                    continue
                except ray.exceptions.RayTaskError as err:
                    t = tasks[i]
                    raise RuntimeError(f"client {t.client_id} failed in round {t.round} of run {t.run_id!r} "
                                       f"on a worker: {err.cause!r}") from None
                idle.append(worker)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for w in self.workers:
            self._ray.kill(w)
        self.workers = []

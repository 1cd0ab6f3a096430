"""Where client tasks run: in-process (sequential) or on a pool of Ray ClientWorker actors.

Both backends expose the same three calls, so the round loop and the algorithms cannot tell them
apart (DESIGN.md decision 6):

* ``broadcast(received)`` -> a handle to the round's downlink tensors, stored once per round
  (Ray: one ``ray.put``; workers read it zero-copy);
* ``put_state(value)`` -> a handle to one client's persistent state;
* ``run_round(run, tasks, handle, states)`` -> the :class:`ClientResult` s in task order.
"""

from __future__ import annotations

import math
import os
from typing import Any

from fedsim.algorithms import ClientResult, ClientTask
from fedsim.config import ExperimentConfig, RunConfig
from fedsim.data.base import FederatedDataset
from fedsim.engine.client import ClientRunner, set_threads
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

    def run_round(self, run: RunConfig, tasks: list[ClientTask], handle: Any, states: list[Any]) -> list[ClientResult]:
        out = []
        for task, state in zip(tasks, states):
            try:
                out.append(self.runner.run(run, task, handle, state))
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
    cluster's CPUs (or GPU fractions, when ``gpus_per_worker > 0``) fit, capped at the cohort size.

    Args:
        resources: ``ray.cluster_resources()``-style totals, e.g. ``{"CPU": 2.0, "GPU": 1.0}``.
    """
    e = experiment.engine
    if e.num_workers != "auto":
        return int(e.num_workers)
    fit = math.floor(resources.get("CPU", 1.0) / e.cpus_per_worker + 1e-9)
    if e.gpus_per_worker > 0:
        fit = min(fit, math.floor(resources.get("GPU", 0.0) / e.gpus_per_worker + 1e-9))
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
            dataset = ray.get(dataset_box[0])  # numpy arrays, zero-copy views of the object store
            self.runner = ClientRunner(experiment, dataset, device="cuda" if gpus > 0 else "cpu",
                                       worker_id=worker_id)

        def run(self, run: RunConfig, task: ClientTask, received: dict, state: Any) -> ClientResult:
            return self.runner.run(run, task, received, state)

        def pid(self) -> int:
            return os.getpid()

    return ClientWorker


class RayBackend:
    """A pool of ClientWorker actors sized from the cluster's resources, never one per client.

    Each actor requests ``engine.cpus_per_worker`` CPUs and ``engine.gpus_per_worker`` GPUs
    (fractional: 0.25 puts four workers on one GPU). Tasks go to whichever worker is idle next
    (``ray.wait``), so uneven client sizes balance across the pool.
    """

    name = "ray"

    def __init__(self, experiment: ExperimentConfig, dataset_ref: Any):
        import ray

        self._ray = ray
        e = experiment.engine
        self.num_workers = pool_size(experiment, ray.cluster_resources())
        worker_cls = _make_worker_class()
        self.workers = [
            worker_cls.options(num_cpus=e.cpus_per_worker, num_gpus=e.gpus_per_worker).remote(
                experiment, [dataset_ref], f"worker-{i}")
            for i in range(self.num_workers)
        ]

    def broadcast(self, received: dict[str, Any]) -> Any:
        return self._ray.put(received)

    def put_state(self, value: Any) -> Any:
        return None if value is None else self._ray.put(value)

    def run_round(self, run: RunConfig, tasks: list[ClientTask], handle: Any, states: list[Any]) -> list[ClientResult]:
        ray = self._ray
        results: list[ClientResult | None] = [None] * len(tasks)
        queue = list(range(len(tasks)))
        idle = list(self.workers)
        pending: dict[Any, tuple[Any, int]] = {}
        while queue or pending:
            while queue and idle:
                worker, i = idle.pop(), queue.pop(0)
                pending[worker.run.remote(run, tasks[i], handle, states[i])] = (worker, i)
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                worker, i = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
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

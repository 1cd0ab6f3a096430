"""The ClientWorker pool as the process that submits an experiment sees it: how many workers,
their actor class, and starting them. Importing this module imports neither torch nor the rest
of the engine (a worker imports them when it starts), so a Ray-backend run's own process,
which only loads the data, starts Ray and the actors and reads the driver's events, never
imports torch: that import took a second, and a process holding torch starts Ray more slowly
(docs/performance.md, "Start-up").
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from fedsim.config import ExperimentConfig, RunConfig

if TYPE_CHECKING:
    from fedsim.algorithms import ClientResult, ClientTask


RAY_INLINE_BYTES = 100 * 1024
"""Ray's default ``max_direct_call_object_size`` (bytes): a call's arguments and return values up
to this size travel inside the call's message; larger ones go through the object store."""

LOCAL_INLINE_BYTES = 4 << 20
"""``max_direct_call_object_size`` (bytes) of a local Ray instance that fedsim starts
(:func:`fedsim.engine.api.start_ray`): a worker's results for a round of a small model (five
digits-CNN clients: 0.75 MB) return inside the call's reply instead of through the shared-memory
object store (its create, seal, get and release). A cluster keeps its own setting
(``ray start --system-config``; see docs/performance.md, which also has the measurements)."""


def workers_fit(experiment: ExperimentConfig, resources: dict[str, float]) -> int:
    """How many ClientWorker actors ``resources`` hold: the CPUs over ``engine.cpus_per_worker``,
    the GPUs over ``engine.gpus_per_worker`` (when > 0) and each ``engine.worker_resources``
    amount, whichever fits fewest (no cap; may be 0).

    Args:
        resources: ``ray.cluster_resources()``-style totals, e.g. ``{"CPU": 2.0, "GPU": 1.0}``.
    """
    e = experiment.engine
    fit = math.floor(resources.get("CPU", 1.0) / e.cpus_per_worker + 1e-9)
    if e.gpus_per_worker > 0:
        fit = min(fit, math.floor(resources.get("GPU", 0.0) / e.gpus_per_worker + 1e-9))
    for key, amount in (e.worker_resources or {}).items():  # custom placement resources
        fit = min(fit, math.floor(resources.get(key, 0.0) / amount + 1e-9))
    return fit


def pool_size(experiment: ExperimentConfig, resources: dict[str, float]) -> int:
    """Number of ClientWorker actors: ``engine.num_workers``, or with ``auto`` as many as the
    cluster's resources fit (:func:`workers_fit`), at least 1 and at most the cohort size.

    Args:
        resources: ``ray.cluster_resources()``-style totals, e.g. ``{"CPU": 2.0, "GPU": 1.0}``.
    """
    e = experiment.engine
    if e.num_workers != "auto":
        return int(e.num_workers)
    return max(1, min(workers_fit(experiment, resources), e.clients_per_round))


def in_placement_group() -> bool:
    """Whether this process runs inside a Ray placement group (a ``fedsim sweep`` trial), whose
    bundles then hold the pool's workers."""
    from ray.util.placement_group import get_current_placement_group

    return get_current_placement_group() is not None


def room_for(experiment: ExperimentConfig, workers: int) -> bool:
    """Whether the resources for a pool of ``workers`` ClientWorkers are there now: inside a
    placement group (a ``fedsim sweep`` trial), whether every bundle of the group is placed (Ray
    re-places a lost node's bundles, the group ``RESCHEDULING`` meanwhile); elsewhere, whether the
    cluster's resources fit them (:func:`workers_fit`). A lost node's CPUs leave the totals once
    Ray has noticed the node gone (seconds)."""
    import ray
    from ray.util.placement_group import get_current_placement_group, placement_group_table

    group = get_current_placement_group()
    if group is not None:
        return placement_group_table(group).get("state") == "CREATED"
    return workers_fit(experiment, ray.cluster_resources()) >= workers


def make_worker_class():
    """The ClientWorker actor class (defined on first use: ``ray`` is imported only then)."""
    import ray

    @ray.remote
    class ClientWorker:
        """A Ray actor that runs client tasks with a :class:`ClientRunner` it keeps for its life."""

        def __init__(self, experiment: ExperimentConfig, dataset_box: list, worker_id: str):
            gpus = experiment.engine.gpus_per_worker
            if gpus == 0:
                os.environ["CUDA_VISIBLE_DEVICES"] = ""  # keep CPU-only workers off every GPU
            from fedsim.engine.client import ClientRunner, freeze_startup_objects, set_threads, warm_up

            set_threads(experiment.engine.cpus_per_worker)
            warm_up()
            dataset = ray.get(dataset_box[0])  # numpy arrays, zero-copy views of the object store
            self.runner = ClientRunner(
                experiment, dataset, device="cuda" if gpus > 0 else "cpu", worker_id=worker_id
            )
            freeze_startup_objects()

        def run(
            self,
            run: RunConfig,
            tasks: list[ClientTask],
            received: dict,
            states: list[Any],
            extras: list[Any],
        ) -> list[ClientResult]:
            """Train ``tasks`` one after another; ``states`` holds object refs (or None)."""
            from fedsim.engine.backends import pack_uploads, run_tasks

            refs = [i for i, h in enumerate(states) if isinstance(h, ray.ObjectRef)]
            states = list(states)
            for i, value in zip(refs, ray.get([states[i] for i in refs])):
                states[i] = value
            return pack_uploads(run_tasks(self.runner, run, tasks, received, states, extras))

        def pid(self) -> int:
            return os.getpid()

        def node_id(self) -> str:
            """The hex id of the Ray node this worker runs on."""
            return ray.get_runtime_context().get_node_id()

    return ClientWorker


def spawn_worker(worker_cls: Any, experiment: ExperimentConfig, dataset_ref: Any, name: str) -> Any:
    """One ClientWorker actor named ``name`` with the experiment's CPUs, GPU fraction and
    placement resources.

    Placement rule: the workers are spread over the cluster's nodes with Ray's ``SPREAD``
    strategy (best effort: the nodes in turn, the next one with the resources free; Ray's
    ``src/ray/raylet/scheduling/policy/spread_scheduling_policy.cc``), so that every node's
    CPUs and object store are used and a node lost takes as few workers as possible; Ray's
    default would fill the local node first. The driver stays on the node of the process that
    started the run
    (:func:`fedsim.engine.api.execute`). Inside a placement group (a ``fedsim sweep`` trial) the
    group's bundles decide instead: the worker is left to the group, which captures it.
    """
    e = experiment.engine
    options: dict[str, Any] = {
        "num_cpus": e.cpus_per_worker,
        "num_gpus": e.gpus_per_worker,
        "resources": dict(e.worker_resources or {}),
    }
    if not in_placement_group():
        options["scheduling_strategy"] = "SPREAD"
    return worker_cls.options(**options).remote(experiment, [dataset_ref], name)


def start_workers(experiment: ExperimentConfig, dataset_ref: Any) -> list[Any]:
    """Start the pool's ClientWorker actors (:func:`pool_size` of them), named worker-0.. in order."""
    import ray

    cls = make_worker_class()
    return [
        spawn_worker(cls, experiment, dataset_ref, f"worker-{i}")
        for i in range(pool_size(experiment, ray.cluster_resources()))
    ]

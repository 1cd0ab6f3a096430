"""Running an experiment end to end: checks, output directory, backend, driver actor.

Every check that can fail on user input (config, dataset files, model/dataset fit, GPUs) runs
before the output directory is created, so bad input never leaves a half-written run behind.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from fedsim.config import ExperimentConfig
from fedsim.data import load_federated
from fedsim.data.base import FederatedDataset
from fedsim.errors import FedsimError
from fedsim.models import build_model


def prepare(cfg: ExperimentConfig) -> FederatedDataset:
    """Load and partition the dataset and check that the model fits it.

    Raises:
        FedsimError: unreadable or missing data, an impossible partition, a model that does not
            fit the dataset's inputs.
    """
    d = cfg.data
    dataset = load_federated(d.dataset, partition=d.partition, num_clients=d.num_clients, alpha=d.alpha,
                             data_dir=d.data_dir, seed=cfg.seed, download=d.download,
                             train_fraction=d.train_fraction, min_samples=d.min_samples,
                             examples_per_client=d.examples_per_client)
    build_model(cfg.model.name, num_classes=dataset.num_classes, input_shape=dataset.input_shape,
                widths=cfg.model.widths)
    return dataset


def start_ray(cfg: ExperimentConfig) -> None:
    """Connect to Ray (``engine.ray_address``, ``RAY_ADDRESS`` as set by Ray Jobs, or a new local
    instance) and check that the cluster can host the requested workers.

    Raises:
        FedsimError: GPUs requested on a local Ray instance that has none.
    """
    import ray

    started_here = False
    if not ray.is_initialized():
        started_here = cfg.engine.ray_address is None and "RAY_ADDRESS" not in os.environ
        ray.init(address=cfg.engine.ray_address, include_dashboard=False, logging_level=logging.WARNING,
                 configure_logging=True)
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if cfg.engine.gpus_per_worker > 0 and gpus == 0 and (started_here or not cfg.engine.ray_address):
        raise FedsimError(f"engine.gpus_per_worker is {cfg.engine.gpus_per_worker} but Ray sees no GPU; "
                          "set engine.gpus_per_worker: 0 or run on a machine or cluster with GPUs")


def check_sequential(cfg: ExperimentConfig) -> None:
    """Raises FedsimError when the sequential backend is asked for a GPU that torch cannot see."""
    import torch

    if cfg.engine.gpus_per_worker > 0 and not torch.cuda.is_available():
        raise FedsimError(f"engine.gpus_per_worker is {cfg.engine.gpus_per_worker} but torch sees no GPU; "
                          "set engine.gpus_per_worker: 0")


def new_run_dir(out: str | Path, name: str) -> Path:
    """Create ``<out>/<name>-<YYYYmmdd-HHMMSS>/`` (a ``-N`` suffix if it exists) and return it.

    Raises:
        FedsimError: ``out`` exists and is not a directory, or cannot be written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FedsimError(f"output location {str(out)!r} exists and is not a directory; pass --out with a "
                          "directory path")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = out / f"{name}-{stamp}"
    path, k = base, 1
    try:
        out.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                path.mkdir()
                return path
            except FileExistsError:
                k += 1
                path = base.with_name(f"{base.name}-{k}")
    except PermissionError:
        raise FedsimError(f"cannot create a run directory under {str(out)!r} (permission denied); pass "
                          "--out with a writable directory") from None


def _driver_class():
    import ray

    @ray.remote(num_cpus=0)
    class Driver:
        """The Ray actor that owns the round loop of an experiment."""

        def run(self, cfg: ExperimentConfig, box: list, run_dir: str):
            from fedsim.engine.backends import RayBackend
            from fedsim.engine.client import set_threads
            from fedsim.engine.loop import run_experiment

            set_threads(cfg.engine.cpus_per_worker)
            dataset = ray.get(box[0])
            backend = RayBackend(cfg, box[0])
            try:
                yield from run_experiment(cfg, dataset, run_dir, backend)
            finally:
                backend.close()

    return Driver


def execute(cfg: ExperimentConfig, dataset: FederatedDataset, run_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Run the experiment on its configured backend, yielding the loop's progress events.

    With the Ray backend, the dataset is put in the object store once, and a driver actor pinned to
    this node (so the run directory is on this machine's disk) runs the loop and streams events.

    Raises:
        FedsimError: bad input detected inside the driver.
        RuntimeError: a client's local training failed (the message names client and round).
    """
    from fedsim.engine.loop import run_experiment

    (Path(run_dir) / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if cfg.engine.backend == "sequential":
        from fedsim.engine.backends import SequentialBackend

        yield from run_experiment(cfg, dataset, str(run_dir), SequentialBackend(cfg, dataset))
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    box = [ray.put(dataset)]
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    driver = _driver_class().options(scheduling_strategy=here).remote()
    try:
        for ref in driver.run.options(num_returns="streaming").remote(cfg, box, str(run_dir)):
            try:
                yield ray.get(ref)
            except ray.exceptions.RayTaskError as err:
                if isinstance(err.cause, (FedsimError, RuntimeError)):
                    raise err.cause from None
                raise
    finally:
        ray.kill(driver)

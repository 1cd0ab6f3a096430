"""Running an experiment end to end: checks, output directory, backend, driver actor.

Every check that can fail on user input (config, dataset files, model/dataset fit, GPUs) runs
before the output directory is created, so bad input never leaves a half-written run behind.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fedsim.config import ExperimentConfig
from fedsim.errors import FedsimError
from fedsim.io import storage

if TYPE_CHECKING:  # torch loads with the data, so a bad --out or --resume fails before it does
    from fedsim.data.base import FederatedDataset


def prepare(cfg: ExperimentConfig) -> FederatedDataset:
    """Load and partition the dataset and check that the model and the algorithms fit it
    (:func:`load_data`, then :func:`check_fit`).

    Raises:
        FedsimError: unreadable or missing data, an impossible partition, a model that does not
            fit the dataset's inputs, an algorithm that cannot run on it.
    """
    dataset = load_data(cfg)
    check_fit(cfg, dataset)
    return dataset


def load_data(cfg: ExperimentConfig) -> FederatedDataset:
    """Load and partition the experiment's dataset (numpy arrays). For the bundled and synthetic
    datasets this imports no torch (torchvision's datasets do).

    Raises:
        FedsimError: unreadable or missing data, an impossible partition.
    """
    from fedsim.data import load_federated

    d = cfg.data
    return load_federated(
        d.dataset,
        partition=d.partition,
        num_clients=d.num_clients,
        alpha=d.alpha,
        data_dir=d.data_dir,
        seed=cfg.seed,
        download=d.download,
        train_fraction=d.train_fraction,
        min_samples=d.min_samples,
        examples_per_client=d.examples_per_client,
        synthetic_alpha=d.synthetic_alpha,
        synthetic_beta=d.synthetic_beta,
        options=d,
    )


def with_dataset_clients(cfg: ExperimentConfig, dataset: FederatedDataset) -> ExperimentConfig:
    """``cfg`` with ``data.num_clients`` set to the dataset's client count where it was null
    (``partition: natural`` on an id column takes every id), checked again as a whole; ``cfg``
    itself otherwise.

    Raises:
        FedsimError: a check that needs the count fails (e.g. clients_per_round above it).
    """
    if cfg.data.num_clients is not None:
        return cfg
    from fedsim.config import validate

    data = cfg.data.model_copy(update={"num_clients": dataset.num_clients})
    resolved = cfg.model_copy(update={"data": data})
    validate(resolved)
    return resolved


def check_fit(cfg: ExperimentConfig, dataset: FederatedDataset) -> None:
    """Build the model and every run's algorithm once for ``dataset`` (imports torch).

    Raises:
        FedsimError: a model that does not fit the dataset's inputs, an algorithm that cannot run
            on it (e.g. FedMA on a model without matchable layers), a check of
            :func:`with_dataset_clients`, an unreadable device or availability trace, a deadline
            no client can meet.
    """
    from fedsim.engine.client import make_algorithm
    from fedsim.models import build_model

    cfg = with_dataset_clients(cfg, dataset)
    build_model(
        cfg.model.name,
        num_classes=dataset.num_classes,
        input_shape=dataset.input_shape,
        widths=cfg.model.widths,
    )
    for run in cfg.runs:
        make_algorithm(run, cfg, dataset)
    if cfg.system is not None:  # the devices and traces are readable, and every deadline can be met
        from fedsim.engine.timing import check_deadlines
        from fedsim.system.world import build_world

        check_deadlines(cfg, dataset, build_world(cfg.system, dataset.num_clients, cfg.seed))


WORKER_PRELOAD = ["torch"]
"""Modules every Python worker process of a local Ray that :func:`start_ray` starts imports as it
starts (Ray's ``preload_python_modules``), before it is given an actor: Ray prestarts a worker
per CPU as soon as it is up, so the driver actor's and the ClientWorkers' torch import (about
1.3 CPU-seconds each) overlaps the rest of Ray's start instead of following it
(docs/performance.md, "Start-up"). Only torch, which is installed wherever fedsim is: fedsim's
own modules are imported when an actor starts, from the ``sys.path`` of its job."""

_started_ray: str | None = None  # GCS address of the local Ray instance start_ray started, if any

CONNECT_TIMEOUT_S = 3.0
"""Seconds :func:`check_ray_target` waits for a TCP connection to ``engine.ray_address``."""


def _starts_local_ray(cfg: ExperimentConfig) -> bool:
    """True when :func:`start_ray` would start a new local Ray instance (no address, no
    ``RAY_ADDRESS``, Ray not yet initialized in this process)."""
    import ray

    return cfg.engine.ray_address is None and not os.environ.get("RAY_ADDRESS") and not ray.is_initialized()


def _target_address(cfg: ExperimentConfig) -> tuple[str, str] | None:
    """(address, where it came from) of the cluster :func:`start_ray` would connect to:
    ``engine.ray_address``, else ``RAY_ADDRESS``; ``auto`` resolved to the cluster that
    ``ray start`` last recorded on this machine (Ray's ``ray_current_cluster`` file). None when a
    new local instance is started."""
    address, source = cfg.engine.ray_address, "engine.ray_address"
    if address is None and os.environ.get("RAY_ADDRESS"):
        address, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    if address is None:
        return None
    if address == "auto":
        try:
            from ray._private.utils import read_ray_address  # Ray's reader of ray_current_cluster
        except ImportError:  # a private helper: without it Ray reports the address itself
            return None
        recorded = read_ray_address()
        if recorded is None:
            raise FedsimError(
                f"{source} is 'auto' but no cluster started with `ray start` is recorded on this "
                "machine; start one with `ray start --head`, or pass its address"
            )
        return recorded, f"{source} ('auto': the cluster `ray start` recorded)"
    return address, source


def _local_cpus(num_cpus: int | None) -> float:
    """CPUs a new local Ray instance will offer: ``num_cpus``, else what Ray detects (cgroup
    limits included)."""
    if num_cpus is not None:
        return float(num_cpus)
    try:
        from ray._private.utils import get_num_cpus

        return float(get_num_cpus())
    except (ImportError, AttributeError):  # a private helper; os.cpu_count() is its fallback too
        return float(os.cpu_count() or 1)


def check_local_pool(cfg: ExperimentConfig, resources: dict[str, float]) -> None:
    """Refuse a worker pool that a local Ray instance with ``resources`` (``{"CPU": 2.0, ...}``)
    cannot place: Ray would wait forever for the actors that do not fit. (A cluster is not
    checked: its autoscaler may add nodes.)

    Raises:
        FedsimError: one worker needs more of a resource than the instance has, or an explicit
            ``engine.num_workers`` times a worker's share exceeds it.
    """
    e = cfg.engine
    wants = {
        "CPU": ("engine.cpus_per_worker", e.cpus_per_worker),
        "GPU": ("engine.gpus_per_worker", e.gpus_per_worker),
        **{k: (f"engine.worker_resources.{k}", v) for k, v in (e.worker_resources or {}).items()},
    }
    for res, (key, amount) in wants.items():
        have = resources.get(res, 0.0)
        if amount <= 0 or have <= 0:  # none asked for; none at all is refused by check_gpus/start_ray
            continue
        if amount > have + 1e-9:
            raise FedsimError(
                f"{key} is {amount:g} but this machine's local Ray has {have:g} {res}, so no "
                f"worker fits; set {key} to at most {have:g}, or pass engine.ray_address of a "
                "cluster with larger nodes"
            )
        if e.num_workers != "auto" and e.num_workers * amount > have + 1e-9:
            fit = int(have / amount + 1e-9)
            raise FedsimError(
                f"engine.num_workers={e.num_workers} x {key}={amount:g} needs "
                f"{e.num_workers * amount:g} {res} but this machine's local Ray has {have:g}; "
                f"set engine.num_workers to auto or at most {fit}, lower {key}, or pass "
                "engine.ray_address of a cluster"
            )


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of ``host:port``, ``[v6]:port`` or ``ray://host:port``; None for ``auto``,
    ``local`` or anything without a port (Ray itself then reports it)."""
    rest = address[len("ray://") :] if address.startswith("ray://") else address
    if "://" in rest:
        return None
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_ray_target(cfg: ExperimentConfig, num_cpus: int | None = None) -> None:
    """Fast checks, before Ray starts or connects, of what would otherwise hang: nothing accepts
    TCP connections at ``engine.ray_address`` (Ray retries for minutes), or a new local Ray
    cannot place the worker pool (:func:`check_local_pool` with the CPUs Ray will detect).

    Raises:
        FedsimError: the address refuses or times out, or the pool does not fit this machine.
    """
    import socket

    found = _target_address(cfg)
    target = _host_port(found[0]) if found is not None else None
    if target is not None:
        address, source = found
        try:
            socket.create_connection(target, timeout=CONNECT_TIMEOUT_S).close()
        except OSError as err:
            why = err.strerror or type(err).__name__
            fix = (
                "unset RAY_ADDRESS for a local Ray"
                if source == "RAY_ADDRESS"
                else "set engine.ray_address: null for a local Ray"
            )
            raise FedsimError(
                f"nothing accepts connections at {source} {address!r} ({why}); start the cluster "
                f"(`ray start --head` prints its address) and pass that, or {fix}"
            ) from None
    if _starts_local_ray(cfg):
        check_local_pool(cfg, {"CPU": _local_cpus(num_cpus)})


@contextmanager
def _signals_kept(shield: bool) -> Iterator[None]:
    """Around ``ray.init``: the SIGTERM handler that was there before is put back after it (Ray
    sets its own, and its C++ core worker one that dumps a stack and aborts), and with
    ``shield`` the local Ray's processes are started with SIGTERM blocked (a signal mask is
    inherited by child processes; Ray blocks SIGINT in them the same way), so a SIGTERM sent to
    the whole process group (Slurm's ``scancel``, ``kill -TERM -PGID``) reaches only this
    process. Otherwise it would stop the raylet at once, and a driver whose raylet dies exits with
    code 1 before it can stop the run cleanly. This process then stops Ray itself
    (:func:`stop_ray`); Ray's processes also die with it (``PR_SET_PDEATHSIG``). Outside the
    main thread nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}) if shield else None
    try:
        yield
    finally:
        if callable(before):
            signal.signal(signal.SIGTERM, before)
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a SIGTERM held meanwhile arrives now


def start_ray(cfg: ExperimentConfig, num_cpus: int | None = None) -> None:
    """Connect to Ray (``engine.ray_address``, ``RAY_ADDRESS`` as set by Ray Jobs, or a new local
    instance) and check that the cluster can host the requested workers.

    Args:
        num_cpus: CPUs a new local instance offers (default: the machine's); ignored when
            connecting to a running cluster.

    Raises:
        FedsimError: nothing listens at ``engine.ray_address``; GPUs, or an
            ``engine.worker_resources`` resource, requested on a local Ray instance that has none;
            a worker pool that the local instance cannot place (:func:`check_local_pool`).
    """
    import ray

    global _started_ray
    started_here = False
    if not ray.is_initialized():
        check_ray_target(cfg, num_cpus)
        started_here = _starts_local_ray(cfg)
        # ERROR: Ray's driver-side warnings (e.g. that token authentication is on) are not the
        # user's business here; worker errors still reach the run as exceptions.
        # A local Ray started here returns objects up to LOCAL_INLINE_BYTES in the reply of the
        # call that made them, instead of through the object store (Ray's default: 100 KiB).
        from fedsim.engine.pool import LOCAL_INLINE_BYTES

        # Its worker processes import WORKER_PRELOAD as they start, while Ray and this process
        # still start up, instead of when the driver actor and the workers are created.
        system = {"max_direct_call_object_size": LOCAL_INLINE_BYTES, "preload_python_modules": WORKER_PRELOAD}
        local = {"num_cpus": num_cpus, "_system_config": system} if started_here else {}
        with _signals_kept(shield=started_here):
            ray.init(
                # "local": a new instance even where Ray's record of a cluster (ray_current_cluster
                # in its temp directory) survives a cluster that died without `ray stop`; with
                # None, Ray would try to join that cluster (and refuse _system_config when it does)
                address="local" if started_here else cfg.engine.ray_address,
                include_dashboard=False,
                logging_level=logging.ERROR,
                configure_logging=True,
                **local,
            )
        _started_ray = ray.get_runtime_context().gcs_address if started_here else None
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if cfg.engine.gpus_per_worker > 0 and gpus == 0 and started_here:  # a cluster may still add GPU nodes
        raise FedsimError(
            f"engine.gpus_per_worker is {cfg.engine.gpus_per_worker} but Ray sees no GPU; "
            "set engine.gpus_per_worker: 0 or run on a machine or cluster with GPUs"
        )
    missing = [k for k in (cfg.engine.worker_resources or {}) if ray.cluster_resources().get(k, 0.0) == 0]
    if missing and started_here:  # a cluster's autoscaler may still add nodes that advertise it
        raise FedsimError(
            f"engine.worker_resources asks for {missing[0]!r} but this local Ray has none; "
            "remove engine.worker_resources or run on a cluster whose nodes advertise it"
        )
    if started_here:
        check_local_pool(cfg, ray.cluster_resources())


def check_gpus(cfg: ExperimentConfig) -> None:
    """Refuse GPU workers where none can exist: the sequential backend, or a local Ray that this
    process would start, on a machine where torch sees no GPU. (A cluster is checked by
    :func:`start_ray`; an autoscaling one may add GPU nodes later.)

    Raises:
        FedsimError: ``engine.gpus_per_worker > 0`` and no GPU.
    """
    e = cfg.engine
    local = e.backend == "sequential" or (e.ray_address is None and "RAY_ADDRESS" not in os.environ)
    if e.gpus_per_worker <= 0 or not local:
        return
    import torch  # only here: a CPU run's own process never imports torch (fedsim.engine.pool)

    if not torch.cuda.is_available():
        raise FedsimError(
            f"engine.gpus_per_worker is {e.gpus_per_worker} but this machine has no GPU; "
            "set engine.gpus_per_worker: 0 or run on a machine or cluster with GPUs"
        )


def remove_if_empty(run_dir: str | Path) -> None:
    """Remove a run directory that nothing was written to (after a failed start)."""
    path = storage.local_path(run_dir)
    if path is not None and path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def remove_run_dir(run_dir: str | Path) -> None:
    """Remove a run directory and everything in it (a run interrupted before its first round:
    nothing in it can be resumed). A local path or a URI."""
    import shutil

    path = storage.local_path(run_dir)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, p = storage.filesystem(run_dir)
    try:
        fs.delete_dir(p)
    except FileNotFoundError:
        pass


def completed_rounds(run_dir: str | Path) -> int:
    """Number of rows in ``run_dir``'s rounds.parquet (0 when it is missing or unreadable)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        data = storage.read_bytes(storage.join(run_dir, "rounds.parquet"))
        return pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
    except (OSError, ValueError):  # missing (FileNotFoundError), or half-written by a killed writer
        return 0


_OUT_IS_A_FILE = "output location {!r} exists and is not a directory; pass --out with a directory path or URI"


def check_output(out: str | Path) -> None:
    """Refuse a local output location that exists and is not a directory, before anything is
    computed or created (:func:`new_run_dir` makes the full check when it creates the directory).

    Raises:
        FedsimError: ``out`` is an existing plain file.
    """
    try:
        path = storage.local_path(out)
    except ValueError:  # a file:// URI naming a host: new_run_dir reports it
        return
    if path is not None and path.exists() and not path.is_dir():
        raise FedsimError(_OUT_IS_A_FILE.format(str(out)))


def new_run_dir(out: str | Path, name: str) -> str | Path:
    """Create ``<out>/<name>-<YYYYmmdd-HHMMSS>/`` (a ``-N`` suffix if it exists) and return it.

    ``out`` is a local directory or a URI that pyarrow's filesystem layer understands
    (``s3://bucket/prefix``, ``gs://...``, ``file:///shared/runs``); see :mod:`fedsim.io.storage`.

    Returns:
        A :class:`~pathlib.Path` for a plain local path, else the run directory's URI.

    Raises:
        FedsimError: ``out`` exists and is not a directory, has an unknown URI scheme, or cannot
            be opened or written.
    """
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        return storage.make_unique_dir(out, f"{name}-{stamp}")
    except (NotADirectoryError, FileExistsError):
        raise FedsimError(_OUT_IS_A_FILE.format(str(out))) from None
    except PermissionError:
        raise FedsimError(
            f"cannot create a run directory under {str(out)!r} (permission denied); pass "
            "--out with a writable directory"
        ) from None
    except (OSError, ValueError) as err:  # pyarrow.ArrowInvalid is a ValueError
        why = " ".join(str(err).split())[:200]
        raise FedsimError(
            f"cannot open output location {str(out)!r} ({why}); pass --out with a local "
            "directory or a pyarrow URI such as s3://bucket/prefix?region=us-west-2 that "
            "this machine can reach"
        ) from None


def _runs_rows(run_dir: str | Path) -> list[dict[str, Any]] | None:
    """The rows of ``run_dir``'s runs.parquet (status, dry_run, ...), or None when it is missing
    or unreadable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(
            pa.BufferReader(storage.read_bytes(storage.join(run_dir, "runs.parquet")))
        ).to_pylist()
    except (OSError, ValueError):
        return None


RESUMABLE = ("running", "interrupted")
"""runs.parquet statuses that ``--resume`` continues: ``running`` (the process died without a
word: killed, or its machine lost) and ``interrupted`` (stopped by hand, :func:`mark_interrupted`);
finished, diverged and failed runs are kept as they are."""


def unfinished_runs(run_dir: str | Path, cfg: ExperimentConfig) -> list[str]:
    """Labels of the runs of ``cfg`` that ``fedsim run --resume run_dir`` would train: those with
    no runs row yet or with a :data:`RESUMABLE` status."""
    ended = {r["run_id"] for r in _runs_rows(run_dir) or [] if r.get("status") not in RESUMABLE}
    return [run.label for run in cfg.runs if run.label not in ended]


def mark_interrupted(run_dir: str | Path, message: str) -> list[str]:
    """Mark the runs of ``run_dir`` still ``running`` as ``interrupted``, with ``message`` and the
    time in ``finished_at`` (runs.parquet rewritten atomically; rounds and clients untouched).
    Call it only once nothing else writes to ``run_dir`` (the driver is dead).

    Returns:
        The run ids marked (none when the directory holds no complete tables).
    """
    from fedsim.io.runlog import RunLog

    try:
        log = RunLog.read(run_dir)
    except (OSError, ValueError):  # stopped before its first round: no tables to mark
        return []
    marked = [r["run_id"] for r in log.rows["runs"] if r["status"] == "running"]
    for run_id in marked:
        log.update_run(run_id, status="interrupted", message=message, finished_at=datetime.now(timezone.utc))
    if marked:
        log.flush()
    return marked


def _reopen(run_dir: str | Path) -> None:
    """Before a resume: runs marked ``interrupted`` are ``running`` again (message and
    ``finished_at`` cleared), as the round loop expects of a run it continues."""
    from fedsim.io.runlog import RunLog

    log = RunLog.read(run_dir)
    stopped = [r["run_id"] for r in log.rows["runs"] if r["status"] == "interrupted"]
    for run_id in stopped:
        log.update_run(run_id, status="running", message=None, finished_at=None)
    if stopped:
        log.flush()


def open_for_resume(
    run_dir: str | Path, config_path: str | None, overrides: list[str]
) -> tuple[str | Path, ExperimentConfig]:
    """The run directory and its stored experiment config, for ``fedsim run --resume RUN_DIR``.

    A CONFIG or ``--set`` given with ``--resume`` must resolve to the stored config.

    Raises:
        FedsimError: ``run_dir`` is not a fedsim run directory (or is a dry-run projection, or
            holds only the config of a run stopped before its first round), or the given config
            differs.
    """
    from fedsim import config

    run_dir = run_dir if storage.is_uri(run_dir) else Path(run_dir)
    needed = ("config.yaml", "runs.parquet", "rounds.parquet", "clients.parquet")
    missing = [n for n in needed if not storage.exists(storage.join(run_dir, n))]
    if "config.yaml" in missing and any(r.get("dry_run") for r in _runs_rows(run_dir) or []):
        raise FedsimError(
            f"{str(run_dir)!r} holds a dry-run projection, which trained nothing and cannot be "
            "resumed; run the experiment with 'fedsim run CONFIG' (without --dry-run)"
        )
    if missing == ["runs.parquet", "rounds.parquet", "clients.parquet"]:
        raise FedsimError(
            f"{str(run_dir)!r} holds no completed round (it stopped before its first round "
            "ended), so there is nothing to resume; start a new run with 'fedsim run'"
        )
    if missing:
        raise FedsimError(
            f"{str(run_dir)!r} is not a fedsim run directory (no {missing[0]}); pass the directory "
            "that 'fedsim run' printed after 'results:'"
        )
    try:
        raw = config.load_yaml(storage.read_bytes(storage.join(run_dir, "config.yaml")))
        stored = config.parse(raw)
    except (yaml.YAMLError, FedsimError):
        raise FedsimError(
            f"the config.yaml in {str(run_dir)!r} is damaged or from another fedsim version; "
            "start a new run instead of resuming"
        ) from None
    if config_path is not None or overrides:
        given = (
            config.load(config_path, overrides) if config_path is not None else config.parse(raw, overrides)
        )
        if given != stored:
            a, b = stored.to_dict(), given.to_dict()
            key = next((k for k in a if a[k] != b.get(k)), "runs")
            raise FedsimError(
                f"{str(run_dir)!r} was written by a different experiment config (it differs in "
                f"'{key}'); resume with no CONFIG or --set, or start a new run"
            )
    return run_dir, stored


DRIVER_NICE = 10
"""Niceness the driver actor's loop thread adds to itself. A round's evaluation and writing run
while the workers train (see :mod:`fedsim.engine.loop`); where the driver shares cores with
workers (a laptop, a cluster's head node) they then take only CPU the workers leave, and at worst
finish after the workers do. The rest of a round (collecting,
aggregating, submitting) runs while the workers wait, so niceness does not slow it."""


def _driver_placement():
    """Where the driver actor runs: on this node (a local run directory is on this machine's disk).

    Inside a placement group (a sweep trial: Ray Tune starts the trial in its group's bundle 0,
    on this node), the driver goes into bundle 0 of that group and captures its child tasks, so
    a ClientWorker it starts to replace a dead one is placed in the trial's group too, in the
    resources the dead worker released, instead of outside the trial's reservation. Elsewhere it
    is pinned to this node with a hard node affinity.
    """
    import ray
    from ray.util.placement_group import get_current_placement_group
    from ray.util.scheduling_strategies import (
        NodeAffinitySchedulingStrategy,
        PlacementGroupSchedulingStrategy,
    )

    group = get_current_placement_group()
    if group is not None:
        return PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
        )
    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def _driver_class():
    import ray

    @ray.remote(num_cpus=0)
    class Driver:
        """The Ray actor that owns the round loop of an experiment."""

        def check(self, cfg: ExperimentConfig, box: list) -> None:
            """:func:`check_fit` here, where torch is needed anyway, so that the submitting
            process never imports it (FedsimError as :func:`check_fit`)."""
            check_fit(cfg, ray.get(box[0]))

        def run(
            self,
            cfg: ExperimentConfig,
            box: list,
            run_dir: str,
            resume: bool,
            workers: list,
            inline_bytes: int,
        ):
            from fedsim.engine.backends import RayBackend
            from fedsim.engine.client import freeze_startup_objects, set_threads
            from fedsim.engine.loop import run_experiment

            set_threads(cfg.engine.cpus_per_worker)
            os.nice(DRIVER_NICE)
            freeze_startup_objects()
            dataset = ray.get(box[0])
            backend = RayBackend(cfg, box[0], workers, [len(i) for i in dataset.client_indices], inline_bytes)
            try:
                yield from run_experiment(cfg, dataset, run_dir, backend, resume)
            finally:
                backend.close()

    return Driver


def execute(
    cfg: ExperimentConfig, dataset: FederatedDataset, run_dir: str | Path, resume: bool = False
) -> Iterator[dict[str, Any]]:
    """Run the experiment on its configured backend, yielding the loop's progress events.

    With the Ray backend, the dataset is put in the object store once, and a driver actor pinned to
    this node (so a local run directory is on this machine's disk; a URI is reachable from any
    node) first checks that the model and algorithms fit the dataset (:func:`check_fit`, so this
    process never imports torch), then runs the loop and streams events. ``run_dir`` is a local
    path or a URI. A new (not resumed) experiment first writes ``config.yaml``
    (``data.num_clients`` resolved by :func:`with_dataset_clients`) and ``partition.parquet``
    (:mod:`fedsim.io.partition_log`).

    Raises:
        FedsimError: bad input detected inside the driver (with the Ray backend, a failed
            :func:`check_fit`, before anything is written).
        RuntimeError: a client's local training failed (the message names client and round).
    """
    cfg = with_dataset_clients(cfg, dataset)
    if cfg.engine.backend == "sequential":
        from fedsim.engine.backends import SequentialBackend
        from fedsim.engine.loop import run_experiment

        _begin(cfg, dataset, run_dir, resume)
        yield from run_experiment(cfg, dataset, str(run_dir), SequentialBackend(cfg, dataset), resume)
        return
    import ray

    from fedsim.engine import pool

    # Ray's inline limit: fedsim's own on a local Ray that start_ray started, else Ray's default
    # (a cluster's setting cannot be read from Python, so nothing larger is assumed).
    ours = _started_ray is not None and ray.get_runtime_context().gcs_address == _started_ray
    inline_bytes = pool.LOCAL_INLINE_BYTES if ours else pool.RAY_INLINE_BYTES
    box = [ray.put(dataset)]
    workers = pool.start_workers(cfg, box[0])  # they import torch while the driver starts
    driver = _driver_class().options(scheduling_strategy=_driver_placement()).remote()
    driver_pid = driver.__ray_call__.remote(_pid)  # runs before the loop: known if it is stopped

    def get(ref: Any) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, (FedsimError, RuntimeError)):
                raise err.cause from None
            raise

    try:
        get(driver.check.remote(cfg, box))  # the model and algorithms fit: nothing written before
        _begin(cfg, dataset, run_dir, resume)
        for ref in driver.run.options(num_returns="streaming").remote(
            cfg, box, str(run_dir), resume, workers, inline_bytes
        ):
            yield get(ref)
    except BaseException:  # stopped (a signal, the generator closed) or failed: wait for the driver
        stop_actors(driver, workers, driver_pid)
        raise
    stop_actors(driver, workers)  # the loop has ended: nothing to wait for


def _begin(cfg: ExperimentConfig, dataset: FederatedDataset, run_dir: str | Path, resume: bool) -> None:
    """What :func:`execute` writes before the first round: a new experiment's ``config.yaml`` and
    ``partition.parquet``; a resumed one's interrupted runs reopened (:func:`_reopen`)."""
    if resume:
        _reopen(run_dir)
        return
    from fedsim.io.partition_log import write_partition

    storage.write_bytes(
        storage.join(run_dir, "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode()
    )
    write_partition(run_dir, dataset)


def quiet_ray() -> None:
    """Stop printing what Ray's processes write (Ray forwards their output to this process):
    after a stop signal sent to the whole process group they print tracebacks of their own
    SIGTERM, which are not the user's business; fedsim's line says what happened."""
    try:
        from ray._private.worker import global_worker, global_worker_stdstream_dispatcher

        global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
        global_worker.threads_stopped.set()  # the thread that prints the raylet's error messages
    except Exception:  # private names (Ray 2.40-2.60); without them the output stays
        pass


STOP_TIMEOUT_S = 10.0
"""Seconds :func:`stop_actors` and :func:`stop_ray` wait for killed processes to end."""


def _pid(actor_self: Any) -> int:
    """The process id of the actor whose ``self`` is ``actor_self`` (through ``__ray_call__``)."""
    return os.getpid()


def stop_actors(driver: Any, workers: list, driver_pid: Any = None) -> None:
    """Kill the driver actor and the pool (started by this process, so owned by it); with
    ``driver_pid`` (an object ref of the driver's process id), also wait until the driver's
    process has ended, so that it writes nothing more to the run directory and
    :func:`mark_interrupted` can rewrite runs.parquet.

    ``ray.kill`` only asks for the kill. The driver's process is on this node
    (:func:`_driver_placement`); if it has not ended after :data:`STOP_TIMEOUT_S` (Ray could not
    deliver the kill) it is killed directly: its writes are atomic, so a kill at any moment loses
    no completed round. Errors are ignored (Ray may be going down)."""
    import psutil
    import ray

    for a in (driver, *workers):
        try:
            ray.kill(a)
        except Exception:
            pass
    if driver_pid is None:
        return
    try:
        proc = psutil.Process(ray.get(driver_pid, timeout=1.0))
        if proc.name().startswith("ray::"):  # still the actor's process, not a reused pid
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except psutil.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
    except Exception:  # no pid (the driver never started), or its process already ended
        pass


def stop_ray() -> bool:
    """Stop the Ray that this process uses: at the end of a command, or after a stop signal.

    A local instance that :func:`start_ray` started is killed at once, with every process it
    started (GCS, raylet, agents, workers: this process's descendants, killed with SIGKILL and
    waited for), instead of ``ray.shutdown()``'s graceful stop, which gives each process a second
    to react to a SIGTERM that :func:`start_ray` blocked in them. Nothing is lost: the run's
    tables and checkpoints are written by then, and Ray's shared memory is unlinked as it is
    created. From a cluster, this process only disconnects (a job's actors stop with it).

    Returns:
        True when a local instance was killed (:func:`killed_ray`).
    """
    import psutil
    import ray

    global _started_ray
    if not ray.is_initialized():
        return False
    if _started_ray is None:  # connected to a cluster (or to a Ray this process did not start)
        ray.shutdown()
        return False
    quiet_ray()
    procs = psutil.Process().children(recursive=True)
    procs.sort(key=lambda p: _name(p) not in ("raylet", "gcs_server"))  # first: none reports the rest
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=STOP_TIMEOUT_S)
    _started_ray = None
    global _killed_ray
    _killed_ray = True
    return True


def _name(proc: Any) -> str:
    """A process's name, or "" once it has ended."""
    try:
        return proc.name()
    except Exception:  # psutil.NoSuchProcess
        return ""


_killed_ray = False  # stop_ray killed the local instance; Ray in this process is unusable


def owns_local_ray() -> bool:
    """Whether this process is connected to a local Ray instance that :func:`start_ray` started."""
    import ray

    return _started_ray is not None and ray.is_initialized()


def killed_ray() -> bool:
    """Whether :func:`stop_ray` killed the local Ray instance of this process (then Ray's
    ``atexit`` shutdown would wait seconds for its dead raylet: a command exits with ``os._exit``,
    an in-process caller calls ``ray.shutdown()``)."""
    return _killed_ray

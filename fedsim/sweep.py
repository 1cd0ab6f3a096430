"""``fedsim sweep``: a grid of experiments (config values x seeds), each a Ray Tune trial.

``fedsim sweep CONFIG --grid KEY=V1,V2 [--grid ...] [--seeds 0,1,2] [--max-concurrent N] [--out DIR]``
(or the experiment file's ``sweep:`` section, :class:`fedsim.config.SweepConfig`) runs one trial
per combination of grid values and seed. A trial is one whole experiment (all its runs, on the
same clients and cohorts) with the combination's values and the seed applied as ``--set``
overrides: it writes exactly what ``fedsim run CONFIG --set KEY=V ... --set seed=S`` writes (the
file's ``sweep:`` section is dropped from the trial's config, as ``--set sweep=null`` would).

Layout of a sweep directory ``<out>/<name>-sweep-<YYYYmmdd-HHMMSS>/``:

* ``sweep.yaml``: the base experiment (``--set`` applied), the grid, the seeds and the cap on
  concurrent trials: what ``--resume`` rebuilds the trials from;
* ``sweep.parquet``: one row per trial, rewritten atomically whenever a trial starts or ends
  (:data:`INDEX_COLUMNS` plus one column per grid key);
* ``trial-00/``, ``trial-01/``, ...: one fedsim experiment directory per trial;
* ``tune/``: Ray Tune's own experiment state (nothing of fedsim's).

Execution: a ``ray.tune.Tuner`` over ``tune.grid_search`` of the trial ids, with a function
trainable (:func:`run_trial`) that runs the experiment through :mod:`fedsim.engine.api`
(``prepare`` then ``execute``) as ``fedsim run`` does. Each trial reserves a placement group
(:func:`trial_bundles`): one bundle for the trial's driver (0 CPUs: fedsim's driver actor asks for
none, as under ``fedsim run``; Ray Tune drops such an empty bundle and places the trainable, with
no resources, at the first worker bundle's index) and one per ClientWorker of the pool. Ray Tune starts the trainable
inside that group with ``placement_group_capture_child_tasks``, so the pool that ``execute``
starts from the trainable lands in the group's bundles. Trials run as many at a time as the
cluster fits (``--max-concurrent`` caps it). The driver actor joins the group too
(:func:`fedsim.engine.api.execute`), so a worker that replaces a dead one stays in the trial's
reservation.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedsim import interrupt
from fedsim.errors import FedsimError

INDEX = "sweep.parquet"
SPEC = "sweep.yaml"
TUNE_DIR = "tune"
SPEC_VERSION = 1

INDEX_COLUMNS = ("trial_id", "seed", "status", "message", "experiment_dir", "wall_seconds", "overrides")
"""sweep.parquet's fixed columns (the grid's columns, named by their keys, follow ``trial_id``):
``trial_id`` (str), ``seed`` (int), ``status`` (pending / running / finished / diverged / failed /
interrupted), ``message`` (str: why a trial did not finish, else empty), ``experiment_dir`` (the
trial's experiment directory relative to the sweep directory), ``wall_seconds`` (float, seconds
from the trial's start to its end in this sweep command, null until it ends), ``overrides`` (JSON
list of the trial's ``--set`` strings)."""

ENDED = ("finished", "diverged", "failed")
"""Trial statuses that ``--resume`` keeps."""

TRIAL_RESTARTS = 2
"""Times a trial whose process died (its node lost with it, or the process killed: Ray Tune
reports the trial's actor dead) is started again; it resumes from the checkpoints of its
experiment directory (:func:`run_trial`). A trial's own failures (bad input, a client's training
failing) are results, never restarted."""

DRIVER_CPUS = 0.0
"""CPUs of a trial's driver bundle. fedsim's driver actor asks Ray for none (``fedsim run``'s
does not either: it is niced and overlaps its evaluation with the workers' training, see
:data:`fedsim.engine.api.DRIVER_NICE`), so a trial reserves exactly its worker pool and trials
pack as ``fedsim run``'s pools do."""

RESERVED_KEYS = {
    "seed": "give seeds with --seeds (or sweep.seeds), which adds the seed column to the index",
    "output_dir": "the trials are written inside the sweep directory; pass --out",
    "sweep": "a trial's own config has no sweep section",
    "engine.ray_address": "every trial runs on the Ray the sweep connects to; set it in the base config",
}
"""Grid keys a sweep refuses, with the fix."""


# --------------------------------------------------------------------------- planning (no torch)


def split_values(text: str) -> list[str]:
    """``"0.01,0.05,[1, 2]"`` -> ``["0.01", "0.05", "[1, 2]"]``: commas inside brackets, braces or
    quotes do not split."""
    out, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return [v.strip() for v in out]


def parse_grid_option(item: str) -> tuple[str, list[Any]]:
    """``--grid KEY=V1,V2,...`` -> (KEY, [V1, V2, ...]), each value read as YAML (as ``--set`` reads it).

    Raises:
        FedsimError: no ``=``, no key, a value missing (``KEY=``, ``KEY=a,,b``) or not YAML.
    """
    from fedsim import config

    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise FedsimError(f"--grid expects KEY=V1,V2,... (got {item!r}); e.g. --grid runs.0.lr=0.01,0.05")
    texts = split_values(text) if text.strip() else []
    if not texts or any(t == "" for t in texts):
        raise FedsimError(
            f"--grid {item!r} has an empty value list or an empty value; list the values "
            "separated by commas, e.g. --grid runs.0.lr=0.01,0.05"
        )
    values = []
    for t in texts:
        try:
            values.append(config.load_yaml(t))
        except yaml.YAMLError:
            raise FedsimError(
                f"--grid {key}: value {t!r} is not valid YAML; quote strings that hold YAML syntax"
            ) from None
    return key, values


def parse_seeds_option(text: str) -> list[int]:
    """``--seeds 0,1,2`` -> [0, 1, 2].

    Raises:
        FedsimError: a value that is not an integer.
    """
    parts = [p.strip() for p in text.split(",")]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise FedsimError(
            f"--seeds expects comma-separated integers (got {text!r}); e.g. --seeds 0,1,2"
        ) from None


def value_text(value: Any) -> str:
    """A grid value as ``--set`` text: YAML flow style that :func:`fedsim.config.load_yaml` reads
    back to the same value (``0.05``, ``adam``, ``{fc1: 64}``, ``null``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf, sort_keys=False).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")].strip()
    elif text.endswith("..."):
        text = text[: -len("...")].strip()
    return text


@dataclass(frozen=True)
class Trial:
    """One trial: a grid cell and a seed.

    Attributes:
        trial_id: ``trial-00``, ``trial-01``, ...; also its experiment directory's name.
        cell: (key, value) per grid key, in grid order.
        seed: the experiment's seed.
        overrides: the ``--set`` strings that make the trial's config from the base.
    """

    trial_id: str
    cell: tuple[tuple[str, Any], ...]
    seed: int
    overrides: tuple[str, ...]

    @property
    def label(self) -> str:
        """``runs.0.lr=0.01 data.alpha=0.1 seed=0``."""
        return " ".join(self.overrides)


@dataclass(frozen=True)
class Plan:
    """A validated sweep: what ``fedsim sweep`` runs.

    Attributes:
        base: the base experiment as a raw mapping (``--set`` applied, ``sweep`` removed).
        grid: grid key -> values, in order.
        seeds: the seeds, in order.
        max_concurrent: cap on trials running at once, or None (as many as fit).
        trials: grid cells (first key slowest) x seeds (fastest).
        configs: trial id -> the trial's validated config.
    """

    base: dict[str, Any]
    grid: dict[str, list[Any]]
    seeds: list[int]
    max_concurrent: int | None
    trials: tuple[Trial, ...]
    configs: dict[str, Any] = field(repr=False)

    @property
    def name(self) -> str:
        return next(iter(self.configs.values())).name

    def spec(self) -> dict[str, Any]:
        """What sweep.yaml stores (plain YAML types)."""
        return {
            "fedsim_sweep": SPEC_VERSION,
            "base": self.base,
            "grid": self.grid,
            "seeds": self.seeds,
            "max_concurrent": self.max_concurrent,
        }


def _check_sweep(
    grid: dict[str, list[Any]], seeds: list[int], explicit_seeds: bool, max_concurrent: int | None
) -> None:
    if not grid and not explicit_seeds:
        raise FedsimError(
            "the sweep's grid is empty; give one or more --grid KEY=V1,V2 (or a sweep: grid: "
            "section), e.g. --grid runs.0.lr=0.01,0.05"
        )
    for key, values in grid.items():
        root = key.split(".")[0]
        reserved = RESERVED_KEYS.get(key) or (RESERVED_KEYS["sweep"] if root == "sweep" else None)
        if reserved:
            raise FedsimError(f"grid key {key!r} cannot be swept: {reserved}")
        if not values:
            raise FedsimError(f"grid key {key!r} has no values; list at least one, e.g. {key}=V1,V2")
        texts = [value_text(v) for v in values]
        dup = next((t for i, t in enumerate(texts) if t in texts[:i]), None)
        if dup is not None:
            raise FedsimError(f"grid key {key!r} lists {dup} twice; list each value once")
    if not seeds:
        raise FedsimError(
            "the sweep's seed list is empty; give --seeds 0,1,2 or leave it out (the experiment's seed)"
        )
    if any(s < 0 for s in seeds):
        raise FedsimError(f"sweep seeds must be >= 0 (got {seeds})")
    if len(set(seeds)) != len(seeds):
        raise FedsimError(f"sweep seeds repeat a value (got {seeds}); list each seed once")
    if max_concurrent is not None and max_concurrent < 1:
        raise FedsimError(f"--max-concurrent (sweep.max_concurrent) must be >= 1 (got {max_concurrent})")


def build_plan(
    base: dict[str, Any],
    grid: dict[str, list[Any]],
    seeds: list[int],
    max_concurrent: int | None,
    explicit_seeds: bool = True,
) -> Plan:
    """Validate a sweep and every trial's config (:func:`fedsim.config.parse`), in trial order.

    Raises:
        FedsimError: an empty grid, a key with no values or a repeated value, a reserved key
            (:data:`RESERVED_KEYS`), bad seeds or cap, or a trial whose config is invalid (unknown
            key, wrong type, out of range, e.g. clients_per_round > num_clients); the message
            names the trial's overrides.
    """
    from fedsim import config

    base = copy.deepcopy(base)
    base.pop("sweep", None)
    _check_sweep(grid, seeds, explicit_seeds, max_concurrent)
    keys = list(grid)
    cells = list(itertools.product(*(grid[k] for k in keys)))
    n = len(cells) * len(seeds)
    width = max(2, len(str(n - 1)))
    trials, configs = [], {}
    for cell in cells:
        for seed in seeds:
            sets = tuple(f"{k}={value_text(v)}" for k, v in zip(keys, cell)) + (f"seed={seed}",)
            trial = Trial(f"trial-{len(trials):0{width}d}", tuple(zip(keys, cell)), int(seed), sets)
            for k, v in zip(keys, cell):
                back = config.load_yaml(value_text(v))
                if back != v or type(back) is not type(v):
                    raise FedsimError(
                        f"grid value {v!r} of {k!r} does not survive as --set text; use a "
                        "number, string, boolean, null, list or mapping"
                    )
            try:
                configs[trial.trial_id] = config.parse(base, list(sets))
            except FedsimError as err:
                raise FedsimError(f"sweep trial {trial.label}: {err}") from None
            trials.append(trial)
    return Plan(
        base, {k: list(v) for k, v in grid.items()}, list(seeds), max_concurrent, tuple(trials), configs
    )


def _raw_experiment(config_path: str | None) -> dict[str, Any]:
    from fedsim import config

    if config_path is None:
        return copy.deepcopy(config.DEFAULT_EXPERIMENT)
    return config.load_yaml(Path(config_path).read_text())


def plan(
    config_path: str | None,
    overrides: list[str] | None = None,
    grid: list[tuple[str, list[Any]]] | None = None,
    seeds: list[int] | None = None,
    max_concurrent: int | None = None,
) -> Plan:
    """The sweep of an experiment file: its ``sweep:`` section, with ``grid`` (if given) replacing
    the section's grid and ``seeds`` / ``max_concurrent`` (if given) replacing its values.

    Args:
        config_path: experiment YAML, or None for the built-in experiment.
        overrides: ``--set`` strings applied to the base before the grid.
        grid: (key, values) pairs, e.g. from :func:`parse_grid_option`.
        seeds: the seeds; default the section's, else the experiment's ``seed``.
        max_concurrent: cap on trials running at once.

    Raises:
        FedsimError: the base config is invalid (:func:`fedsim.config.load`), or see :func:`build_plan`.
    """
    from fedsim import config

    overrides = list(overrides or [])
    cfg = config.load(config_path, overrides)  # the base, sweep section included, strictly checked
    raw = config.apply_overrides(_raw_experiment(config_path), overrides)
    section = cfg.sweep
    if grid is not None:
        keys = [k for k, _ in grid]
        dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
        if dup is not None:
            raise FedsimError(f"--grid {dup} is given twice; list all its values in one --grid {dup}=V1,V2")
        grid_d = {k: list(v) for k, v in grid}
    else:
        grid_d = {k: list(v) for k, v in (section.grid if section else {}).items()}
    explicit = seeds is not None or (section is not None and section.seeds is not None)
    seeds = list(seeds) if seeds is not None else list(section.seeds) if explicit else [cfg.seed]
    if max_concurrent is None and section is not None:
        max_concurrent = section.max_concurrent
    return build_plan(raw, grid_d, seeds, max_concurrent, explicit)


def load_plan(sweep_dir: str | os.PathLike) -> Plan:
    """The plan stored in a sweep directory's sweep.yaml (for ``--resume``).

    Raises:
        FedsimError: ``sweep_dir`` has no readable sweep.yaml written by ``fedsim sweep``.
    """
    from fedsim import config
    from fedsim.io import storage

    try:
        spec = config.load_yaml(storage.read_bytes(storage.join(sweep_dir, SPEC)))
    except (OSError, ValueError, yaml.YAMLError):
        raise FedsimError(
            f"{str(sweep_dir)!r} is not a fedsim sweep directory (no readable {SPEC}); pass the "
            "directory that 'fedsim sweep' printed after 'results:'"
        ) from None
    parts = ("base", "grid", "seeds", "max_concurrent")
    if (
        not isinstance(spec, dict)
        or spec.get("fedsim_sweep") != SPEC_VERSION
        or any(k not in spec for k in parts)
        or not isinstance(spec["base"], dict)
        or not isinstance(spec["grid"], dict)
        or not isinstance(spec["seeds"], list)
    ):
        raise FedsimError(
            f"the {SPEC} in {str(sweep_dir)!r} is damaged or from another fedsim version; start a new sweep"
        )
    return build_plan(spec["base"], spec["grid"], spec["seeds"], spec["max_concurrent"])


def distinct(configs, part) -> list:
    """The configs of ``configs`` that differ in ``part(cfg)`` (first of each)."""
    seen, out = set(), []
    for cfg in configs:
        key = json.dumps(part(cfg), sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(cfg)
    return out


def check_trials(plan: Plan) -> None:
    """The checks ``fedsim run`` makes before writing anything, for every distinct trial
    config: the engine's resources (GPUs; a pool that a local Ray this process would start cannot
    place; an ``engine.ray_address`` that refuses) and the data and models
    (:func:`fedsim.engine.api.prepare`, once per distinct data/model/runs).

    Raises:
        FedsimError: the first problem found, prefixed with the trial's overrides.
    """
    from fedsim.engine import api

    configs = list(plan.configs.values())
    label = {id(c): t.label for t, c in zip(plan.trials, configs)}
    try:
        for cfg in distinct(configs, lambda c: c.engine.model_dump(mode="json")):
            where = label[id(cfg)]
            api.check_gpus(cfg)
            if cfg.engine.backend == "ray":
                api.check_ray_target(cfg)
        for cfg in distinct(
            configs,
            lambda c: [
                c.data.model_dump(mode="json"),
                c.model.model_dump(mode="json"),
                [r.model_dump(mode="json") for r in c.runs],
            ],
        ):
            where = label[id(cfg)]
            api.prepare(cfg)
    except FedsimError as err:
        raise FedsimError(f"sweep trial {where}: {err}") from None


def trial_bundles(cfg, resources: dict[str, float]) -> list[dict[str, float]]:
    """The placement-group bundles a trial of ``cfg`` reserves.

    Ray backend: ``[{"CPU": DRIVER_CPUS}]`` for the driver, then one bundle per ClientWorker of
    the pool that :func:`fedsim.engine.pool.start_workers` will start
    (:func:`fedsim.engine.pool.pool_size` with ``resources``: ``engine.num_workers``, or with
    ``auto`` what the cluster fits), each ``{"CPU": cpus_per_worker, "GPU": gpus_per_worker,
    **worker_resources}``. Sequential backend: one bundle of one worker's resources, since the
    trainable trains in its own process. Zero amounts are dropped by Ray Tune (an all-zero driver
    bundle makes the trainable take no resources of its own).

    Args:
        resources: ``ray.cluster_resources()`` of the cluster the trials will run on.
    """
    from fedsim.engine.pool import pool_size

    e = cfg.engine
    worker = {
        "CPU": float(e.cpus_per_worker),
        "GPU": float(e.gpus_per_worker),
        **{k: float(v) for k, v in (e.worker_resources or {}).items()},
    }
    if e.backend == "sequential":
        return [worker]
    return [{"CPU": DRIVER_CPUS}] + [dict(worker) for _ in range(pool_size(cfg, resources))]


# --------------------------------------------------------------------------- one trial


def experiment_status(run_dir: str | os.PathLike) -> tuple[str, str]:
    """(status, message) of an experiment directory from its runs.parquet: ``failed`` if a run
    failed (or none was logged), else ``diverged`` if one diverged, else ``finished``; the message
    names each run that did not finish and why."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fedsim.io import storage

    try:
        rows = pq.read_table(
            pa.BufferReader(storage.read_bytes(storage.join(run_dir, "runs.parquet")))
        ).to_pylist()
    except (OSError, ValueError):
        return "failed", "the experiment wrote no runs table"
    bad = [r for r in rows if r["status"] != "finished"]
    status = (
        "failed"
        if not rows or any(r["status"] in ("failed", "running", "interrupted") for r in rows)
        else "diverged"
        if bad
        else "finished"
    )
    message = "; ".join(
        f"run {r['run_id']!r} {r['status']}" + (f": {r['message']}" if r["message"] else "") for r in bad
    )
    return status, message


def run_trial(
    base: dict[str, Any], overrides: list[str], run_dir: str | os.PathLike, workers: int | None = None
) -> tuple[str, str]:
    """Run one trial's experiment into ``run_dir`` through :mod:`fedsim.engine.api`, as
    ``fedsim run --set ...`` would (on the Ray this process is connected to, for the Ray backend).

    A directory in which a round completed is resumed from its checkpoints
    (:func:`fedsim.engine.api.open_for_resume`, ``execute(..., resume=True)``); one in which none
    did is removed and started again.

    Args:
        base: the base experiment (raw mapping); overrides: the trial's ``--set`` strings.
        run_dir: the trial's experiment directory (local path or URI).
        workers: the pool size the trial reserved bundles for, checked against what the engine
            will start (None: not checked).

    Returns:
        (status, message) as :func:`experiment_status`.

    Raises:
        FedsimError: bad input (config, data, a resumed directory written by another config, a
            pool that no longer matches the reservation).
        RuntimeError: a client's training failed beyond the engine's retries.
    """
    from fedsim import config
    from fedsim.engine import api
    from fedsim.io import storage

    cfg = config.parse(base, list(overrides))
    resume = api.completed_rounds(run_dir) > 0
    if resume:
        run_dir, stored = api.open_for_resume(run_dir, None, [])
        if stored != cfg:
            raise FedsimError(
                f"{str(run_dir)!r} was written by another config than this trial's; remove it "
                "to run the trial again"
            )
        if not api.unfinished_runs(run_dir, cfg):
            return experiment_status(run_dir)
    else:
        if storage.exists(run_dir):  # a start that completed no round: nothing to keep
            api.remove_run_dir(run_dir)
        storage.make_dirs(run_dir)
    if cfg.engine.backend == "ray" and workers is not None:
        import ray

        from fedsim.engine.pool import pool_size

        now = pool_size(cfg, ray.cluster_resources())
        if now != workers:
            raise FedsimError(
                f"the trial reserved {workers} worker(s), but the cluster's resources now make "
                f"engine.num_workers: auto start {now}; set engine.num_workers explicitly"
            )
    dataset = api.prepare(cfg)
    for _ in api.execute(cfg, dataset, run_dir, resume=resume):
        pass
    return experiment_status(run_dir)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if not isinstance(err, FedsimError) else text


def _trainable(config: dict[str, Any], specs: dict[str, dict[str, Any]], cwd: str) -> dict[str, Any]:
    """Ray Tune's function trainable: one trial (``config["trial_id"]``). Never raises: a failure
    is the result ``{"status": "failed", "message": ...}``, so the sweep records it and goes on."""
    spec = specs[config["trial_id"]]
    os.chdir(cwd)  # relative paths of the config (data.data_dir) mean what they mean to the sweep
    t0 = time.monotonic()
    try:
        status, message = run_trial(spec["base"], spec["overrides"], spec["run_dir"], spec["workers"])
    except Exception as err:
        status, message = "failed", _one_line(err)
    return {"status": status, "message": message, "wall_seconds": time.monotonic() - t0}


# --------------------------------------------------------------------------- the index


class Index:
    """sweep.parquet, kept in memory and rewritten atomically (temporary file + rename) on change."""

    def __init__(self, sweep_dir: str | os.PathLike, plan: Plan, previous: dict[str, dict] | None = None):
        self.sweep_dir = sweep_dir
        self.keys = list(plan.grid)
        self.rows: dict[str, dict[str, Any]] = {}
        for t in plan.trials:
            row = {
                "trial_id": t.trial_id,
                **dict(t.cell),
                "seed": t.seed,
                "status": "pending",
                "message": "",
                "experiment_dir": t.trial_id,
                "wall_seconds": None,
                "overrides": json.dumps(list(t.overrides)),
            }
            old = (previous or {}).get(t.trial_id)
            if old is not None:
                row.update({k: old.get(k) for k in ("status", "message", "wall_seconds")})
                row["message"] = row["message"] or ""
            self.rows[t.trial_id] = row

    @staticmethod
    def read(sweep_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
        """The rows of a sweep directory's sweep.parquet by trial id ({} when missing or unreadable)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from fedsim.io import storage

        try:
            rows = pq.read_table(
                pa.BufferReader(storage.read_bytes(storage.join(sweep_dir, INDEX)))
            ).to_pylist()
        except (OSError, ValueError):
            return {}
        return {r["trial_id"]: r for r in rows}

    def update(self, trial_id: str, **fields: Any) -> None:
        self.rows[trial_id].update(fields)
        self.write()

    def _column(self, values: list[Any]):
        import pyarrow as pa

        try:
            arr = pa.array(values)
            if (
                pa.types.is_boolean(arr.type)
                or pa.types.is_integer(arr.type)
                or pa.types.is_floating(arr.type)
                or pa.types.is_string(arr.type)
                or pa.types.is_null(arr.type)
            ):
                return arr
        except (pa.ArrowException, TypeError, ValueError):
            pass
        return pa.array([json.dumps(v, sort_keys=True) for v in values], pa.string())

    def table(self):
        import pyarrow as pa

        rows = list(self.rows.values())
        cols = {"trial_id": pa.array([r["trial_id"] for r in rows], pa.string())}
        for k in self.keys:
            cols[k] = self._column([r[k] for r in rows])
        cols["seed"] = pa.array([r["seed"] for r in rows], pa.int64())
        for k in ("status", "message", "experiment_dir", "overrides"):
            cols[k] = pa.array([r[k] for r in rows], pa.string())
        cols["wall_seconds"] = pa.array([r["wall_seconds"] for r in rows], pa.float64())
        order = [
            "trial_id",
            *self.keys,
            "seed",
            "status",
            "message",
            "experiment_dir",
            "wall_seconds",
            "overrides",
        ]
        return pa.table(
            {k: cols[k] for k in order}, metadata={"fedsim.sweep.grid_keys": json.dumps(self.keys)}
        )

    def write(self) -> None:
        from fedsim.io import storage

        storage.write_table(self.table(), storage.join(self.sweep_dir, INDEX))


# --------------------------------------------------------------------------- running


def _progress_callback(index: Index, plan: Plan, bar, done: dict[str, float]):
    from ray import tune
    from tqdm import tqdm

    labels = {t.trial_id: t.label for t in plan.trials}

    def say(text: str) -> None:
        tqdm.write(text, file=sys.stderr)

    class Progress(tune.Callback):
        """One line per trial as it starts and ends; the bar counts ended trials; the index follows."""

        def on_trial_start(self, iteration, trials, trial, **info):
            tid = trial.config["trial_id"]
            index.update(tid, status="running", message="", wall_seconds=None)
            say(f"fedsim: {tid} started: {labels[tid]}")

        def _end(self, tid: str, status: str, message: str, wall: float | None) -> None:
            if tid in done:
                return
            done[tid] = wall or 0.0
            index.update(tid, status=status, message=message, wall_seconds=wall)
            took = f" in {wall:.1f} s" if wall is not None else ""
            say(f"fedsim: {tid} {status}{took}" + (f": {message}" if message else ""))
            bar.update(1)

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            self._end(
                trial.config["trial_id"],
                r.get("status", "failed"),
                r.get("message", "the trial reported no result"),
                r.get("wall_seconds"),
            )

        def on_trial_recover(self, iteration, trials, trial, **info):
            say(f"fedsim: {trial.config['trial_id']}'s process died; starting it again from its checkpoints")

        def on_trial_error(self, iteration, trials, trial, **info):
            err = trial.get_error()
            text = (
                " ".join(str(err).split()).replace("\x1b[36m", "").replace("\x1b[39m", "")[:300]
                if err
                else ""
            )
            self._end(trial.config["trial_id"], "failed", f"the trial's process failed: {text}", None)

    return Progress()


def _summary(index: Index, sweep_dir) -> object:
    import pandas as pd

    from fedsim.io import storage

    rows = []
    for r in index.rows.values():
        row = {
            "trial": r["trial_id"],
            **{k: value_text(r[k]) for k in index.keys},
            "seed": r["seed"],
            "status": r["status"],
            "wall_s": None if r["wall_seconds"] is None else round(r["wall_seconds"], 1),
        }
        try:
            import io

            rounds = pd.read_parquet(
                io.BytesIO(storage.read_bytes(storage.join(sweep_dir, r["experiment_dir"], "rounds.parquet")))
            )
            acc = (
                rounds.dropna(subset=["test_accuracy"]).groupby("run_id", sort=False)["test_accuracy"].last()
            )
            row.update({f"acc:{k}": v for k, v in acc.items()})
        except (OSError, ValueError, KeyError):
            pass
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def execute_sweep(
    plan: Plan,
    sweep_dir: str | os.PathLike,
    *,
    progress: bool = True,
    previous: dict[str, dict] | None = None,
) -> tuple[Index, bool]:
    """Run the plan's trials that have not ended (``previous``: the index rows of an earlier
    command on ``sweep_dir``) as Ray Tune trials on the Ray this process is connected to, keeping
    sweep.parquet current. Prints one line per trial as it starts and ends on stderr, under a
    progress bar of trials.

    Returns:
        (the index, whether every trial ended: False when the command was interrupted).

    Raises:
        KeyboardInterrupt: Ctrl-C (the index marks the trials it stopped ``interrupted``; those
            not started stay ``pending``).
    """
    import logging

    os.environ.setdefault(
        "RAY_AIR_NEW_OUTPUT", "0"
    )  # Tune's progress tables off (verbose=0 silences the rest)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no result.json/progress.csv per trial
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C interrupts fit(), as in fedsim run
    import ray
    from ray import tune
    from tqdm import tqdm

    from fedsim.io import storage

    index = Index(sweep_dir, plan, previous)
    todo = [t for t in plan.trials if index.rows[t.trial_id]["status"] not in ENDED]
    for t in todo:
        index.rows[t.trial_id].update(status="pending", message="", wall_seconds=None)
    index.write()
    if not todo:
        return index, True
    resources = ray.cluster_resources()
    bundles = {t.trial_id: trial_bundles(plan.configs[t.trial_id], resources) for t in todo}
    specs = {
        t.trial_id: {
            "base": plan.base,
            "overrides": list(t.overrides),
            "run_dir": str(storage.join(sweep_dir, t.trial_id)),
            "workers": (
                len(bundles[t.trial_id]) - 1 if plan.configs[t.trial_id].engine.backend == "ray" else None
            ),
        }
        for t in todo
    }
    factories = {tid: tune.PlacementGroupFactory(b) for tid, b in bundles.items()}
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, specs=specs, cwd=os.getcwd()), lambda c: factories[c["trial_id"]]
    )
    local = storage.local_path(sweep_dir)
    tune_root = str((local.resolve() / TUNE_DIR) if local is not None else storage.join(sweep_dir, TUNE_DIR))
    name = time.strftime("fit-%Y%m%d-%H%M%S")
    done: dict[str, float] = {}
    bar = tqdm(
        total=len(plan.trials),
        initial=len(plan.trials) - len(todo),
        desc=plan.name,
        unit="trial",
        disable=not progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"trial_id": tune.grid_search([t.trial_id for t in todo])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=plan.max_concurrent,
            trial_name_creator=lambda tr: tr.config["trial_id"],
            trial_dirname_creator=lambda tr: tr.config["trial_id"],
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=tune_root,
            verbose=0,
            log_to_file=False,
            callbacks=[_progress_callback(index, plan, bar, done)],
            failure_config=tune.FailureConfig(max_failures=TRIAL_RESTARTS),
        ),
    )
    tune_logger = logging.getLogger("ray.tune")
    level = tune_logger.level
    tune_logger.setLevel(logging.CRITICAL)  # a trial process that dies is recorded in the index instead
    try:
        tuner.fit()
    except KeyboardInterrupt:
        _mark_interrupted(index)
        raise
    finally:
        tune_logger.setLevel(level)
        bar.close()
    missing = [t.trial_id for t in todo if t.trial_id not in done]
    if missing:
        _mark_interrupted(index)
    return index, not missing


def _mark_interrupted(index: Index) -> None:
    """Trials stopped while running become ``interrupted`` (those not started stay ``pending``)."""
    for row in index.rows.values():
        if row["status"] == "running":
            row["status"] = "interrupted"
    index.write()


def project(plan: Plan) -> str:
    """The dry-run projection of a whole sweep (:func:`fedsim.dryrun.project_experiment` per
    trial): the number of trials, then per trial and for the whole sweep the bytes up and down
    (bytes, both of every run of the trial) and the multiply-accumulates of local training, over
    the runs that can be projected (FedMA's cannot: its model's size depends on matching).

    Raises:
        FedsimError: a trial that the dry run cannot project (unknown dataset, model that does
            not fit it), naming the trial.
    """
    import pandas as pd

    from fedsim import dryrun

    rows, skipped = [], set()
    for t in plan.trials:
        try:
            _, runs = dryrun.project_experiment(plan.configs[t.trial_id])
        except FedsimError as err:
            raise FedsimError(f"sweep trial {t.label}: {err}") from None
        done = [r for r in runs if r.projectable]
        skipped.update(f"{r.run_id} ({r.algorithm})" for r in runs if not r.projectable)
        rows.append(
            {
                "trial": t.trial_id,
                **{k: value_text(v) for k, v in t.cell},
                "seed": t.seed,
                "bytes_up": sum(r.bytes_up for r in done),
                "bytes_down": sum(r.bytes_down for r in done),
                "MACs": sum(r.flops for r in done),
            }
        )
    table = pd.DataFrame(rows)
    cells = len(plan.trials) // len(plan.seeds)
    cap = f", at most {plan.max_concurrent} at a time" if plan.max_concurrent else ""
    up, down, macs = int(table["bytes_up"].sum()), int(table["bytes_down"].sum()), int(table["MACs"].sum())
    shown = table.assign(MACs=table["MACs"].map(lambda v: f"{v:.4e}"))
    lines = [
        f"sweep: {len(plan.trials)} trials ({cells} grid cell(s) x {len(plan.seeds)} seed(s)){cap}; "
        "'fedsim sweep' with this file runs them",
        shown.to_string(index=False),
        f"whole sweep: bytes up {up:,} ({up / 1e9:.3g} GB), bytes down {down:,} ({down / 1e9:.3g} GB), "
        f"compute {macs:.4e} MACs",
    ]
    if skipped:
        lines.append(f"not projected (matching decides the model's size): {', '.join(sorted(skipped))}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fedsim sweep`` options."""
    parser.add_argument("config", nargs="?", help="experiment YAML (default: the built-in digits experiment)")
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a grid dimension: a config key and its values (YAML, comma-separated), e.g. "
        "--grid runs.0.lr=0.01,0.05; repeat for more keys (replaces the file's sweep.grid)",
    )
    parser.add_argument(
        "--seeds",
        metavar="S1,S2,...",
        help="seeds to run every grid cell with, e.g. 0,1,2 "
        "(default: sweep.seeds, else the experiment's seed)",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        metavar="N",
        help="run at most N trials at a time (default: as many as the cluster fits)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the base experiment, e.g. --set engine.num_workers=1",
    )
    parser.add_argument(
        "--out", help="directory or URI under which the sweep directory is created (default: output_dir)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--resume",
        metavar="SWEEP_DIR",
        help="continue an interrupted sweep: keep ended trials, resume interrupted ones from "
        "their checkpoints, run missing ones",
    )


def cmd_sweep(args: argparse.Namespace) -> int:
    """``fedsim sweep``: validate every trial, then run them (exit 0: every trial finished; 1: some
    failed or diverged; 2: bad input, nothing written; 130 or 143: stopped by SIGINT or SIGTERM).

    Raises:
        FedsimError: bad input (the CLI prints it as one line and exits 2).
    """
    from fedsim.engine import api
    from fedsim.io import storage

    if args.resume:
        given = [
            o
            for o, v in (
                ("CONFIG", args.config),
                ("--grid", args.grid),
                ("--seeds", args.seeds),
                ("--set", args.set),
                ("--out", args.out),
            )
            if v
        ]
        if given:
            raise FedsimError(
                f"{given[0]} and --resume cannot be combined: a resumed sweep runs the trials in its "
                "sweep.yaml; drop it"
            )
        sweep_dir = args.resume if storage.is_uri(args.resume) else Path(args.resume)
        the_plan = load_plan(sweep_dir)
        if args.max_concurrent is not None:
            _check_sweep(the_plan.grid, the_plan.seeds, True, args.max_concurrent)
            the_plan = Plan(
                the_plan.base,
                the_plan.grid,
                the_plan.seeds,
                args.max_concurrent,
                the_plan.trials,
                the_plan.configs,
            )
        previous = Index.read(sweep_dir)
        if previous and all(previous.get(t.trial_id, {}).get("status") in ENDED for t in the_plan.trials):
            print(
                f"fedsim: nothing to resume: every trial in {sweep_dir} has ended; sweep.parquet is unchanged",
                file=sys.stderr,
            )
            return 0
    else:
        grid = [parse_grid_option(g) for g in args.grid] if args.grid else None
        seeds = parse_seeds_option(args.seeds) if args.seeds is not None else None
        the_plan = plan(args.config, args.set, grid, seeds, args.max_concurrent)
        first = next(iter(the_plan.configs.values()))
        api.check_output(args.out or first.output_dir)
        previous = None
    check_trials(the_plan)
    first = next(iter(the_plan.configs.values()))
    api.start_ray(first)  # trials run as Tune trials on Ray whatever their backend (sequential: in the trial)
    created = False
    if not args.resume:
        sweep_dir = api.new_run_dir(args.out or first.output_dir, f"{the_plan.name}-sweep")
        created = True
        storage.write_bytes(
            storage.join(sweep_dir, SPEC), yaml.safe_dump(the_plan.spec(), sort_keys=False).encode()
        )
    cells = len(the_plan.trials) // len(the_plan.seeds)
    cap = f", at most {the_plan.max_concurrent} at a time" if the_plan.max_concurrent else ""
    print(
        f"fedsim: sweep of {the_plan.name!r}: {len(the_plan.trials)} trials ({cells} grid cell(s) x "
        f"{len(the_plan.seeds)} seed(s)){cap}; {'resuming' if args.resume else 'writing'} {sweep_dir}",
        file=sys.stderr,
    )
    stopped: BaseException = KeyboardInterrupt()
    try:
        index, complete = execute_sweep(the_plan, sweep_dir, progress=not args.no_progress, previous=previous)
    except KeyboardInterrupt as err:  # SIGINT or SIGTERM (fedsim.interrupt)
        complete, index, stopped = False, None, err
    if not complete:
        api.quiet_ray()
        if api.owns_local_ray():  # the trials' drivers stop with it (on a cluster: when this job ends)
            api.stop_ray()
        name = interrupt.signal_name(stopped)
        for t in the_plan.trials:
            api.mark_interrupted(
                storage.join(sweep_dir, t.trial_id),
                f"stopped by {name}; continue with 'fedsim sweep --resume {sweep_dir}'",
            )
        if created and not any(
            api.completed_rounds(storage.join(sweep_dir, t.trial_id)) for t in the_plan.trials
        ):
            api.remove_run_dir(sweep_dir)
            print(
                f"fedsim: stopped by {name} before any trial completed a round; removed {sweep_dir}",
                file=sys.stderr,
            )
        else:
            print(
                f"fedsim: stopped by {name}; ended trials and completed rounds are in {sweep_dir}; "
                f"continue with 'fedsim sweep --resume {sweep_dir}'",
                file=sys.stderr,
            )
        return interrupt.exit_code(stopped)
    table = _summary(index, sweep_dir)
    formats = {c: _fmt for c in table.columns if c.startswith("acc:")}
    formats["wall_s"] = lambda v: "-" if v is None or v != v else f"{v:.1f}"
    print(table.to_string(index=False, formatters=formats, na_rep="-"))
    print(f"results: {sweep_dir}")
    return 0 if all(r["status"] == "finished" for r in index.rows.values()) else 1

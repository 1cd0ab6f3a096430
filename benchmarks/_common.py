"""Helpers shared by the benchmark scripts: process-tree memory sampling, timed fedsim runs, stats.

Memory of a Ray run is spread over many processes: the driver (this script), the processes a
local ``ray.init`` starts (gcs_server, raylet, dashboard and log monitors, agents), and the
worker processes raylet forks for actors. :class:`TreeSampler` sums over all of them:

* the tree: this process and every descendant (a local ``ray.init`` makes gcs_server and raylet
  children of the driver, and raylet forks every worker, so workers are grandchildren); plus,
  when the driver joined an existing cluster, every process whose command line names this Ray
  session's directory (raylet, gcs_server, agents) and their descendants (the workers, whose
  command lines are renamed ``ray::ClassName`` and so never name the session);
* per process, both RSS and PSS (``/proc/PID/smaps_rollup``). RSS counts a shared page in every
  process that maps it (libtorch's code, Ray's shared-memory object store), so the sum of RSS
  overstates the tree's footprint; PSS charges each shared page 1/k to each of its k users, so
  the sum of PSS is the memory the tree really occupies. Both are reported; the flat-memory
  target is judged on PSS.

Samples are taken every ``interval`` seconds from a background thread; a spike shorter than the
interval can be missed.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))


def ray_session_dir() -> str | None:
    """The current Ray session's directory (e.g. /tmp/ray/session_...), or None."""
    try:
        import ray

        node = ray._private.worker._global_node  # no public API exposes the session directory
        return None if node is None else node.get_session_dir_path()
    except Exception:  # pragma: no cover - best effort only
        return None


def tree_processes(root: int, session_dir: str | None = None) -> list[psutil.Process]:
    """The processes of a run: ``root``, its descendants, and (when ``session_dir`` is given)
    every process whose command line contains it, with their descendants; each once."""
    found: dict[int, psutil.Process] = {}

    def add(p: psutil.Process) -> None:
        found[p.pid] = p
        try:
            for c in p.children(recursive=True):
                found[c.pid] = c
        except psutil.Error:
            pass

    try:
        add(psutil.Process(root))
    except psutil.Error:
        pass
    if session_dir:
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmd = p.info.get("cmdline") or []
            if p.info["pid"] not in found and any(session_dir in part for part in cmd):
                add(p)
    return list(found.values())


class Poller:
    """Calls :meth:`poll` every ``interval`` seconds in a daemon thread while used as a context
    manager, and once more on exit while everything measured is still alive."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def poll(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()


class TreeSampler(Poller):
    """Background sampler of the summed RSS and PSS (bytes) of a run's processes.

    Use as a context manager; after it exits, ``peak_pss`` and ``peak_rss`` hold the largest sums
    seen (bytes), ``peak_procs`` the process count at the PSS peak, ``samples`` the count.
    """

    def __init__(self, root: int | None = None, interval: float = 0.2):
        super().__init__(interval)
        self.root = os.getpid() if root is None else root
        self.peak_pss = self.peak_rss = 0
        self.peak_procs = self.samples = 0

    def sample(self) -> tuple[int, int, int]:
        """One sample now: (sum of PSS, sum of RSS, number of processes)."""
        pss = rss = n = 0
        for p in tree_processes(self.root, ray_session_dir()):
            try:
                m = p.memory_full_info()
            except psutil.Error:
                continue
            pss += m.pss
            rss += m.rss
            n += 1
        return pss, rss, n

    def poll(self) -> None:
        pss, rss, n = self.sample()
        if pss > self.peak_pss:
            self.peak_pss, self.peak_procs = pss, n
        self.peak_rss = max(self.peak_rss, rss)
        self.samples += 1


def timed_fedsim_run(cfg, dataset, out_dir) -> dict:
    """Run ``cfg`` on ``dataset`` through fedsim's public API (:func:`fedsim.engine.api.execute`)
    and time it from the outside.

    Returns a dict: ``t_start`` (seconds, perf_counter) when execute() was called, ``t_round``
    (list, perf_counter when each round's event arrived), ``t_end``, ``rounds`` (the round
    events: accuracy, loss, in-driver ``wall_seconds``), ``run_dir``.
    """
    from fedsim.engine import api

    run_dir = api.new_run_dir(out_dir, cfg.name)
    out = {"t_start": time.perf_counter(), "t_round": [], "rounds": [], "run_dir": str(run_dir)}
    for event in api.execute(cfg, dataset, run_dir):
        if event["kind"] == "round":
            out["t_round"].append(time.perf_counter())
            out["rounds"].append(event)
        elif event["kind"] == "end" and event["status"] != "finished":
            raise RuntimeError(f"run {event['run']} {event['status']}: {event['message']}")
    out["t_end"] = time.perf_counter()
    return out


def fedsim_child_result(cfg, dataset, t0: float) -> dict:
    """A bench_vs_* child's result for one fedsim run of ``cfg`` on ``dataset`` (in a temporary
    directory, :func:`timed_fedsim_run`): ``t0`` (perf_counter when its imports were done),
    ``round_ends`` (perf_counter at each round's event), ``t_end`` and the final ``accuracy``."""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        t = timed_fedsim_run(cfg, dataset, out)
    return {
        "t0": t0,
        "round_ends": t["t_round"],
        "t_end": time.perf_counter(),
        "accuracy": t["rounds"][-1]["test_accuracy"],
    }


def median(xs) -> float:
    return float(statistics.median(xs))


def mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f} MiB"

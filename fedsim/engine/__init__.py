"""The engine: one round loop, a sequential backend and a Ray worker pool with a driver actor."""

from fedsim.engine.api import execute, new_run_dir, prepare, start_ray

__all__ = ["execute", "new_run_dir", "prepare", "start_ray"]

"""Run directories and Parquet run logs."""

from fedsim.io.runlog import CLIENTS_SCHEMA, ROUNDS_SCHEMA, RUNS_SCHEMA, RunLog

__all__ = ["CLIENTS_SCHEMA", "ROUNDS_SCHEMA", "RUNS_SCHEMA", "RunLog"]

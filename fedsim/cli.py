"""The ``fedsim`` command line.

``fedsim run [CONFIG] [--set key=value ...] [--out DIR] [--no-progress]`` runs an experiment (the
built-in digits experiment when CONFIG is omitted), shows a progress bar per run, then prints a
summary table and the run directory. Bad input prints one line ``fedsim: error: ...`` on stderr and
exits with code 2, with no traceback and no output directory left behind. ``--dry-run`` trains
nothing: it prints and writes the projected schedule, bytes and compute (:mod:`fedsim.dryrun`);
``--resume RUN_DIR`` continues an interrupted experiment from its checkpoints. Ctrl-C (SIGINT) or
SIGTERM stops a run within a round (exit 130 or 143; :mod:`fedsim.interrupt`): a run directory in
which a round completed is kept, its unfinished runs marked ``interrupted``, and one line names the
``--resume`` command; one in which none did is removed. A second signal exits at once.

``fedsim sweep CONFIG --grid KEY=V1,V2 [--seeds 0,1] [--max-concurrent N]`` runs one experiment per
grid cell and seed as Ray Tune trials (:mod:`fedsim.sweep`); ``--resume SWEEP_DIR`` continues one.
``fedsim report RUN_DIR...`` writes plots and a Markdown summary (:mod:`analysis.report`; of a sweep
directory: mean and std over seeds per grid cell); ``fedsim submit CONFIG`` runs an experiment as a
Ray job on a cluster, ``--sweep`` the file's ``sweep:`` section (:mod:`fedsim.submit`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from fedsim import interrupt
from fedsim.errors import FedsimError

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line naming its own help: ``fedsim --help`` or
    ``fedsim run --help`` (``prog`` is "fedsim" or "fedsim run")."""

    commands: dict[str, argparse.ArgumentParser] | None = None  # the top-level parser's subcommands

    def error(self, message: str):  # one line, exit 2 (argparse prints usage + message by default)
        self.exit(EXIT_BAD_INPUT, f"fedsim: error: {message}; see '{self.prog} --help'\n")

    def parse_args(self, args=None, namespace=None):
        # argparse reports a subcommand's unrecognized arguments from the top-level parser; let
        # the subcommand's parser report them, so the hint names its help.
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            (self.commands or {}).get(getattr(parsed, "command", None), self).error(
                f"unrecognized arguments: {' '.join(extra)}"
            )
        return parsed


def _summary(events: list[dict]) -> object:
    import pandas as pd

    rows = {}
    for e in events:
        if e["kind"] == "start":
            rows[e["run"]] = {
                "run": e["run"],
                "final_acc": None,
                "best_acc": None,
                "MB_up": 0.0,
                "MB_down": 0.0,
                "wall_s": 0.0,
                "status": "running",
            }
        elif e["kind"] == "round":
            r = rows[e["run_id"]]
            if e["test_accuracy"] is not None:
                r["final_acc"] = e["test_accuracy"]
                r["best_acc"] = max(r["best_acc"] or 0.0, e["test_accuracy"])
            r["MB_up"], r["MB_down"] = e["cum_bytes_up"] / 1e6, e["cum_bytes_down"] / 1e6
            r["wall_s"] += e["wall_seconds"]
        elif e["kind"] == "end":
            rows[e["run"]]["status"] = e["status"]
    return pd.DataFrame(list(rows.values()))


def _interrupted(run_dir: str | os.PathLike | None, created: bool, err: KeyboardInterrupt) -> int:
    """After SIGINT or SIGTERM stopped ``fedsim run`` (the driver and workers already stopped,
    :func:`fedsim.engine.api.stop_actors`; :func:`main` stops a local Ray): mark the runs left
    ``running`` as ``interrupted`` in runs.parquet, and say in one line what was kept and the
    ``--resume`` command. A run directory this command created is removed when no round completed in it
    (nothing there could be resumed). Returns the exit code, 128 + the signal (130, 143)."""
    from fedsim.engine import api

    name = interrupt.signal_name(err)
    if run_dir is None:
        print(f"fedsim: stopped by {name}; nothing was written", file=sys.stderr)
    elif created and api.completed_rounds(run_dir) == 0:
        api.remove_run_dir(run_dir)
        print(f"fedsim: stopped by {name} before any round completed; removed {run_dir}", file=sys.stderr)
    else:
        resume = f"fedsim run --resume {run_dir}"
        api.mark_interrupted(run_dir, f"stopped by {name}; continue with '{resume}'")
        print(
            f"fedsim: stopped by {name}; completed rounds are in {run_dir}; continue with '{resume}'",
            file=sys.stderr,
        )
    return interrupt.exit_code(err)


def cmd_run(args: argparse.Namespace) -> int:
    from fedsim import config

    if getattr(args, "dry_run", False):
        if args.resume:
            raise FedsimError("--dry-run and --resume cannot be combined: a dry run trains nothing; drop one")
        from fedsim import dryrun

        swept = config.load(args.config, args.set).sweep is not None
        if swept:  # a bad sweep fails before the projection is printed or written
            from fedsim import sweep

            the_plan = sweep.plan(args.config, args.set)
        code = dryrun.run_cli(args.config, args.set, args.out)
        if swept:
            print(sweep.project(the_plan))
        return code
    if args.resume:
        if args.out:
            raise FedsimError(
                "--out and --resume cannot be combined: a resumed run continues in its own directory"
            )
    else:
        cfg = config.load(
            args.config, args.set
        )  # imports no torch: a bad config fails in well under a second
        if cfg.sweep is not None:
            print(
                "fedsim: note: this experiment has a sweep: section; 'fedsim run' runs the experiment once "
                "without it, 'fedsim sweep' runs the sweep",
                file=sys.stderr,
            )
    from tqdm import tqdm

    from fedsim.engine import api

    if args.resume:
        run_dir, cfg = api.open_for_resume(args.resume, args.config, args.set)
        if not api.unfinished_runs(run_dir, cfg):
            print(
                f"fedsim: nothing to resume: every run in {run_dir} has already ended; its tables are "
                "unchanged",
                file=sys.stderr,
            )
            return 0
    else:
        run_dir = None
        api.check_output(args.out or cfg.output_dir)
    created = False  # whether run_dir is a directory this command made
    events: list[dict] = []
    bar = stream = None
    try:
        dataset = api.load_data(cfg)
        api.check_gpus(cfg)
        if cfg.engine.backend == "sequential":
            api.check_fit(cfg, dataset)
        if not args.resume:
            run_dir, created = api.new_run_dir(args.out or cfg.output_dir, cfg.name), True
        if cfg.engine.backend == "ray":
            # the model and algorithms are checked in the driver actor (api.execute), before
            # anything is written: this process never imports torch (docs/performance.md)
            api.start_ray(cfg)
        stream = api.execute(cfg, dataset, run_dir, resume=bool(args.resume))
        for e in stream:
            if not events:  # the checks have passed
                print(
                    f"fedsim: experiment {cfg.name!r}: {len(cfg.runs)} run(s), {dataset.num_clients} clients "
                    f"of {dataset.name}, {cfg.engine.clients_per_round} per round, backend "
                    f"{cfg.engine.backend}; {'resuming' if args.resume else 'writing'} {run_dir}",
                    file=sys.stderr,
                )
            events.append(e)
            if e["kind"] == "start":
                bar = tqdm(
                    total=e["rounds"],
                    desc=e["run"],
                    unit="round",
                    disable=args.no_progress,
                    dynamic_ncols=True,
                    file=sys.stderr,
                )
            elif e["kind"] == "round":
                acc = e["test_accuracy"]
                bar.set_postfix_str(
                    f"acc={'-' if acc is None else f'{acc:.3f}'} MB={e['cum_bytes'] / 1e6:.2f}", refresh=False
                )
                bar.update(1)
            elif e["kind"] == "end":
                bar.close()
                if e["status"] != "finished":
                    print(f"fedsim: run {e['run']!r} {e['status']}: {e['message']}", file=sys.stderr)
    except KeyboardInterrupt as err:  # SIGINT or SIGTERM (fedsim.interrupt)
        if cfg.engine.backend == "ray":
            api.quiet_ray()
        if bar is not None:
            bar.close()
        if stream is not None:  # stop the driver (and its writes) before judging what it left
            stream.close()
        return _interrupted(run_dir, created, err)
    except BaseException:
        if created:  # e.g. Ray could not start: leave no empty run directory behind
            api.remove_if_empty(run_dir)
        raise
    finally:
        if bar is not None:
            bar.close()
    table = _summary(events)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"results: {run_dir}")
    return 0 if all(table["status"] == "finished") else 1


def cmd_report(args: argparse.Namespace) -> int:
    from analysis import report
    from analysis.errors import AnalysisError

    try:
        report.run(args.run_dirs, args.out)
    except AnalysisError as err:
        raise FedsimError(str(err)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedsim", description="Federated-learning simulation on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parser.commands = sub.choices
    run = sub.add_parser("run", help="run an experiment (the built-in digits experiment if no CONFIG)")
    run.add_argument("config", nargs="?", help="experiment YAML, e.g. jobs/digits.yaml")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set data.num_clients=50 --set runs.0.rounds=3",
    )
    run.add_argument(
        "--out",
        help="directory or URI (s3://bucket/prefix, file:///path) under which the run "
        "directory is created (default: output_dir)",
    )
    run.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted experiment in RUN_DIR from its last checkpoint",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="train nothing: print each run's round schedule and projected bytes and compute, "
        "and write them as Parquet rows (dry_run = true); reads no dataset files",
    )
    run.set_defaults(func=cmd_run)
    from fedsim import submit

    sbm = sub.add_parser("submit", help="run an experiment as a Ray job on a cluster and follow it")
    submit.add_arguments(sbm)
    sbm.set_defaults(func=submit.cmd_submit)
    from fedsim import sweep

    swp = sub.add_parser(
        "sweep", help="run an experiment over a grid of config values and seeds (Ray Tune trials)"
    )
    sweep.add_arguments(swp)
    swp.set_defaults(func=sweep.cmd_sweep)
    rep = sub.add_parser("report", help="plots and a Markdown summary of experiment or sweep directories")
    rep.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="experiment directories (or pyarrow URIs), or one sweep directory",
    )
    rep.add_argument("--out", help="report directory (default: the first RUN_DIR/report)")
    rep.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedsim`` console script; returns the process exit code.

    Called as the command (``argv`` None), a command that started its own local Ray ends by
    killing Ray's processes (:func:`fedsim.engine.api.stop_ray`) and exiting with ``os._exit``:
    everything is written by then, and Ray's ``atexit`` shutdown would spend seconds on a graceful
    stop (a second per process whose SIGTERM fedsim blocks, see
    :func:`fedsim.engine.api.start_ray`). An in-process caller (a test) keeps its Ray, unless a
    stop signal killed it: then Ray is shut down for it."""
    args = build_parser().parse_args(argv)
    try:
        code = _main(args)
    finally:
        api = sys.modules.get("fedsim.engine.api")  # loaded by every command that starts Ray
        if api is not None and api.killed_ray() and argv is not None:
            import ray

            ray.shutdown()  # an in-process caller gets a usable state back
            api._killed_ray = False
    if argv is None and api is not None and (api.owns_local_ray() or api.killed_ray()):
        api.stop_ray()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(args: argparse.Namespace) -> int:
    try:
        with interrupt.handled():  # SIGTERM stops a command as Ctrl-C does (exit 143, 130)
            return args.func(args)
    except FedsimError as err:
        print(f"fedsim: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (
        KeyboardInterrupt
    ) as err:  # fedsim run says what it kept (cmd_run); elsewhere nothing is half-written
        print(f"fedsim: stopped by {interrupt.signal_name(err)}", file=sys.stderr)
        return interrupt.exit_code(err)
    except RuntimeError as err:
        if os.environ.get("FEDSIM_DEBUG"):
            raise
        print(f"fedsim: failed: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

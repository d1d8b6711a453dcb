"""``csl-search``: run, resume and compare searches over the CSL design space.

    csl-search run SPACE.yaml [--scheduler asha|hyperband|pbt|fifo] [--searcher optuna|random|grid]
                              [--num-samples N] [--max-concurrent N] [--cpus-per-trial C] [--gpus-per-trial G]
                              [--storage DIR_OR_URI] [--name NAME] [--address HOST:PORT] [--num-cpus N]
                              [--seed S] [--max-failures K] [--mlflow-uri URI] [--experiment NAME]
                              [--register-model NAME] [-q | -v] [--progress-every S] [--no-system-metrics]
    csl-search resume EXPERIMENT_FOLDER [--address HOST:PORT] [--num-cpus N] [--rebuild] [--register-model NAME]
                                        [-q | -v] [--progress-every S]
    csl-search compare (--experiment NAME | --parent-run ID) [--mlflow-uri URI | --storage DIR] [--top N]
    csl-search report TARGET [...]
    csl-search export RUN_OR_DIR --out DIR [--mlflow-uri URI | --storage DIR]
    (each with --debug: a traceback instead of the one-line error)

Exit codes: 0 done; 1 the search could not run (tracking store unreachable, a folder that cannot be resumed as it
is, a Ray error); 2 bad input (a space file that does not load, an unknown option, a storage folder that cannot be
written), reported in one line before Ray is started; 130 interrupted (Ctrl-C, SIGTERM): every trial is kept and
``csl-search resume DIR`` continues.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from search.errors import EXIT_INTERRUPTED, UsageError, report
from search.run import DEFAULT_STORAGE, SEARCHERS
from search.schedulers import SCHEDULERS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csl-search", description="Run, resume and compare searches over the CSL design space (Ray Tune + MLflow)."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a search over a space file", parents=[common])
    run.add_argument("space", help="search space YAML file (spaces/*.yaml)")
    run.add_argument("--scheduler", choices=SCHEDULERS, default="asha", help="trial scheduler (default: asha)")
    run.add_argument("--searcher", choices=SEARCHERS, default="optuna", help="config proposer (default: optuna)")
    run.add_argument("--num-samples", type=int, help="trials to run (default: whole grid / budget / 8)")
    run.add_argument("--max-concurrent", type=int, help="at most this many trials at once")
    run.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs each trial holds (default: 1); of a "
                     "trial of several workers, each worker's")
    run.add_argument("--workers-per-trial", type=int, default=None, help="Ray Train workers per trial, each on its "
                     "shard of the global batch (default: the space's fixed.workers_per_trial, else 1)")
    run.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial, fractions allowed (0.25)")
    run.add_argument("--storage", default=DEFAULT_STORAGE, help="folder or URI (s3://, gs://, file://) for results")
    run.add_argument("--name", help="experiment folder name (default: <space>-<date>-<time>)")
    run.add_argument("--address", help="connect to this Ray cluster (host:port) instead of starting one")
    run.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    run.add_argument("--seed", type=int, default=0, help="seed of the searcher (default: 0)")
    run.add_argument("--max-failures", type=int, default=2, help="retries of a failing trial (default: 2)")
    run.add_argument("--mlflow-uri", help="tracking server or store (default: sqlite:///<storage>/mlflow.db)")
    run.add_argument("--experiment", help="MLflow experiment name (default: the space's name)")
    _output_arguments(run)
    run.add_argument("--no-system-metrics", action="store_true",
                     help="do not log MLflow system metrics (CPU, memory, GPU) on the trials' runs")
    run.add_argument("--register-model", metavar="NAME", help="register the best model in MLflow's model registry")

    resume = sub.add_parser("resume", help="continue an interrupted search, keeping its completed trials",
                            parents=[common])  # fmt: skip
    resume.add_argument("path", help="the experiment folder (<storage>/<name>)")
    resume.add_argument("--address", help="connect to this Ray cluster (default: the one the search used)")
    resume.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: as before)")
    resume.add_argument("--rebuild", action="store_true",
                        help="continue from the ledger and MLflow when Tune's snapshot is damaged (it is set aside)")
    resume.add_argument("--register-model", metavar="NAME", help="register the best model in MLflow's model registry")
    _output_arguments(resume)

    compare = sub.add_parser("compare", help="rank a search's trials and the effect of each design choice",
                             parents=[common])  # fmt: skip
    which = compare.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", help="MLflow experiment name (its latest search)")
    which.add_argument("--parent-run", help="MLflow run id of the search")
    compare.add_argument("--mlflow-uri", help="tracking server or store (default: sqlite:///<storage>/mlflow.db)")
    compare.add_argument("--storage", default=DEFAULT_STORAGE, help="where the default store lives (default: runs)")
    compare.add_argument("--metric", help="metric to compare (default: the search's)")
    compare.add_argument("--top", type=int, default=10, help="configurations to list (default: 10)")
    export = sub.add_parser("export", help="write a search's or a run's best encoder as a state_dict and its config",
                            parents=[common])  # fmt: skip
    export.add_argument("target", metavar="RUN_OR_DIR", help="experiment folder, or MLflow run id / runs:/<id>")
    export.add_argument("--out", required=True, help="folder to write encoder.pt and config.json into")
    export.add_argument("--mlflow-uri", help="store of a run (default: sqlite:///<storage>/mlflow.db)")
    export.add_argument("--storage", default=DEFAULT_STORAGE, help="where the default store lives (default: runs)")
    from search.report.cli import add_arguments as report_arguments

    report_arguments(sub.add_parser("report", help="Markdown report and plots of a search or study, from MLflow",
                                    parents=[common]))  # fmt: skip
    return parser


def _output_arguments(parser: argparse.ArgumentParser) -> None:
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true", help="no progress line: the final table only")
    loud.add_argument("-v", "--verbose", action="store_true", help="Ray Tune's trial tables too")
    parser.add_argument("--progress-every", type=float, default=None, metavar="S",
                        help="seconds between progress lines when stderr is not a terminal (default: 30)")


def _verbosity(args: argparse.Namespace) -> int:
    return 0 if args.quiet else 2 if args.verbose else 1


def _error(message: str, code: int) -> int:
    print(f"csl-search: error: {message}", file=sys.stderr)
    return code


def _finished(outcome: Any) -> int:
    """Print a search's outcome; 130 when a signal stopped it, 1 when planned trials are missing, else 0."""
    print(outcome.report())
    if outcome.interrupted:
        print(f"interrupted: every trial is kept; continue with: csl-search resume {outcome.experiment_path}",
              file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    if outcome.problems:
        return _error(f"{outcome.experiment_path}: {outcome.problems[0]}; csl-search resume "
                      f"{outcome.experiment_path} continues it", 1)  # fmt: skip
    return 0


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from search.space import load_space

    space = load_space(args.space)
    for flag, value in (("--num-samples", args.num_samples), ("--max-concurrent", args.max_concurrent),
                        ("--num-cpus", args.num_cpus), ("--workers-per-trial", args.workers_per_trial)):  # fmt: skip
        if value is not None and value < 1:
            return _error(f"{flag}: must be at least 1, got {value}; allowed: an int >= 1", 2)
    if args.max_failures < 0:
        return _error(f"--max-failures: must be at least 0, got {args.max_failures}; allowed: an int >= 0", 2)
    if args.progress_every is not None and not args.progress_every > 0:
        return _error(f"--progress-every: must be > 0, got {args.progress_every}; allowed: seconds > 0", 2)
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0:
        return _error("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0", 2)

    from search.run import SearchOptions, run_search

    options = SearchOptions(
        scheduler=args.scheduler,
        searcher=args.searcher,
        num_samples=args.num_samples,
        max_concurrent=args.max_concurrent,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        storage=args.storage,
        name=args.name,
        address=args.address,
        num_cpus=args.num_cpus,
        seed=args.seed,
        max_failures=args.max_failures,
        workers_per_trial=args.workers_per_trial,
        mlflow_uri=args.mlflow_uri,
        experiment=args.experiment,
        verbose=_verbosity(args),
        system_metrics=not args.no_system_metrics,
        progress_every_s=args.progress_every or 30.0,
        register_model=args.register_model,
    )
    command = "csl-search " + " ".join(shlex.quote(a) for a in argv)
    return _finished(run_search(space, options, command=command))


def _resume(args: argparse.Namespace) -> int:
    from search.run import resume_search

    if args.progress_every is not None and not args.progress_every > 0:
        return _error(f"--progress-every: must be > 0, got {args.progress_every}; allowed: seconds > 0", 2)
    verbose = _verbosity(args) if args.quiet or args.verbose else None  # else as the search was started
    return _finished(resume_search(args.path, address=args.address, num_cpus=args.num_cpus, rebuild=args.rebuild,
                                   verbose=verbose, progress_every_s=args.progress_every,
                                   register_model=args.register_model))  # fmt: skip


def _default_store(args: argparse.Namespace) -> str:
    """The store ``compare`` reads: --mlflow-uri, else the SQLite file of --storage, which must exist (reading
    must not create an empty store in the wrong folder)."""
    from search.tracking import local_tracking_uri

    if args.mlflow_uri:
        return args.mlflow_uri
    uri = local_tracking_uri(args.storage)
    if not Path(uri[len("sqlite:///") :]).is_file():
        raise UsageError(f"--storage {args.storage}: no MLflow store there ({uri}); allowed: the --storage of a "
                         "search, or --mlflow-uri URI")  # fmt: skip
    return uri


def _compare(args: argparse.Namespace) -> int:
    from search.compare import load
    from search.tracking import check_reachable

    uri = _default_store(args)
    check_reachable(uri, given=bool(args.mlflow_uri))
    comparison = load(uri, experiment=args.experiment, parent_run=args.parent_run, metric=args.metric)
    print(comparison.text(top=args.top))
    return 0


def _export(args: argparse.Namespace) -> int:
    from search import storage
    from search.models import export

    uri = None
    if not Path(args.target).exists() and not storage.is_uri(args.target):
        uri = _default_store(args)  # a run: the store it is in
    print(export(args.target, args.out, tracking_uri=uri))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args, argv)
        if args.command == "resume":
            return _resume(args)
        if args.command == "report":
            from search.report.cli import run as write_report

            return write_report(args)
        if args.command == "export":
            return _export(args)
        return _compare(args)
    except (Exception, KeyboardInterrupt) as exc:  # every error is one line unless --debug asks for the traceback
        if args.debug:
            raise
        return report("csl-search", exc)


if __name__ == "__main__":
    raise SystemExit(main())

"""Command line of the report: ``csl-search report`` (search/cli.py forwards to ``add_arguments`` / ``run``) and
``python -m experiments.report`` (``main``). Exit codes: 1 when the tracking store cannot be reached, 2 when the
target holds nothing to report.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from experiments.report.build import write_report
from experiments.report.mlflow_io import ReportError
from experiments.stats import DEFAULT_RESAMPLES


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("target", help="experiment name (its latest study or search) or a study/search run id")
    parser.add_argument("--mlflow-uri", help="tracking server or store (default: sqlite:///<storage>/mlflow.db)")
    parser.add_argument("--storage", default="runs", help="where the default store lives (default: runs)")
    parser.add_argument("--out", help="folder for report.md and the plots (default: <study folder>/report)")
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap resamples (10000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap RNG seed (default: 0)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to the MLflow run")
    return parser


def run(args: argparse.Namespace) -> int:
    from search.tracking import TrackingUnavailable, check_reachable, local_tracking_uri

    uri = args.mlflow_uri or local_tracking_uri(args.storage)
    try:
        check_reachable(uri)
        result = write_report(uri, args.target, args.out, n_resamples=args.resamples, seed=args.seed,
                              log_to_mlflow=not args.no_log)
    except TrackingUnavailable as exc:
        print(f"csl-search: error: {exc}", file=sys.stderr)
        return 1
    except ReportError as exc:
        print(f"csl-search: error: {exc}", file=sys.stderr)
        return 2
    print(result.headline)
    print(f"\nreport: {result.path}" + ("" if args.no_log else f" (logged to run {result.run_id} under report/)"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    import experiments.report as package  # its docstring is the command's description

    parser = argparse.ArgumentParser(prog="csl-search report", description=package.__doc__.split("\n\n")[0])
    return run(add_arguments(parser).parse_args(argv))

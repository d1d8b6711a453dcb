"""``csl-search report <target>``: the arguments and the run of the report command (``search/cli.py`` adds them
as its ``report`` subcommand). Exit codes: 1 when the tracking store cannot be reached, 2 when the target holds
nothing to report.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from typing import Any

from search.report.stats import DEFAULT_RESAMPLES


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("target", help="experiment name (its latest search or study) or a search/study run id")
    parser.add_argument("--mlflow-uri", help="tracking server or store (default: sqlite:///<storage>/mlflow.db)")
    parser.add_argument("--storage", default="runs", help="where the default store lives (default: runs)")
    parser.add_argument("--out", help="folder for report.md and the plots (default: <run folder>/report)")
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES,
                        help=f"bootstrap resamples (default: {DEFAULT_RESAMPLES})")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap RNG seed (default: 0)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to the MLflow run")
    return parser


def run(args: argparse.Namespace, reporters: Mapping[str, Callable[..., Any]] | None = None) -> int:
    """Write the report ``args`` ask for; ``reporters``: report plugins beside the installed ones."""
    from search.report.build import write_report
    from search.report.mlflow_io import ReportError
    from search.report.plugins import installed
    from search.tracking import TrackingUnavailable, check_reachable, local_tracking_uri

    uri = args.mlflow_uri or local_tracking_uri(args.storage)
    if args.resamples < 1:
        print(f"csl-search: error: --resamples must be at least 1, got {args.resamples}", file=sys.stderr)
        return 2
    try:
        check_reachable(uri)
        result = write_report(uri, args.target, args.out, n_resamples=args.resamples, seed=args.seed,
                              log_to_mlflow=not args.no_log, reporters={**installed(), **(reporters or {})})
    except (TrackingUnavailable, ReportError) as exc:
        print(f"csl-search: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, TrackingUnavailable) else 2
    print(result.headline)
    print(f"\nreport: {result.path}" + ("" if args.no_log else f" (logged to run {result.run_id} under report/)"))
    return 0

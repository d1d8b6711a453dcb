"""``python -m experiments.report <target>``: ``csl-search report`` with the study plugin given directly, so it
reports study runs (and searches) in a checkout whose entry points are not installed."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from experiments.report.build import REPORTERS
from search.report.cli import add_arguments, run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.report",
                                     description="Markdown report and plots of a study or search, from MLflow.")
    return run(add_arguments(parser).parse_args(argv), reporters=REPORTERS)

"""``python -m experiments.report <target>``: the same as ``csl-search report <target>``."""

from experiments.report.cli import main

raise SystemExit(main())

"""``python -m search`` = ``csl-search``."""

from search.cli import main

raise SystemExit(main())

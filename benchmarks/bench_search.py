"""How many epochs ASHA needs to find a configuration within 1 accuracy point of the exhaustive grid's best.

    .venv/bin/python benchmarks/bench_search.py                      # from the repository root, a few minutes
    .venv/bin/python benchmarks/bench_search.py --reverse-choices     # the same 8 configs in the opposite order
    .venv/bin/python benchmarks/bench_search.py --searcher random --seed 1
    .venv/bin/python benchmarks/bench_search.py --epochs 8 --train-limit 512 --test-limit 1000 \
        --reduction-factor 2 --grace-period 1 --searcher grid --max-concurrent 2 --cpus-per-trial 1 --num-cpus 2 \
        [--storage DIR] [--space spaces/bench_grid.yaml] [--tolerance 0.01] [--reverse-choices]

The space (``spaces/bench_grid.yaml``: augment {simclr, amdim} x similarity {cosine, dot} x loss {infonce,
triplet} = 8 configs, a 1/16-wide ResNet-18 on the embedded cifar10-mini, one fixed ``seed``) is copied into the
storage folder with ``--epochs`` / ``--reduction-factor`` / ``--grace-period`` / ``--train-limit`` /
``--test-limit`` applied, and searched twice through the public path ``csl-search run`` uses
(``search.space.load_space`` + ``search.run.run_search(space, SearchOptions(...))``), each search with its own
storage folder and MLflow store (``<storage>/grid``, ``<storage>/asha``):

1. the exhaustive grid: searcher ``grid``, scheduler ``fifo``: every config trains all E epochs, configs x E
   epochs in all. Its target is the best value of the metric at a trial's final epoch (E).
2. ASHA: scheduler ``asha`` (grace period, reduction factor as given), searcher ``grid`` by default (the same 8
   configs, in the same order; ``--searcher random|optuna`` draws as many samples as the grid has configs, random
   with replacement).

With searcher ``grid`` both searches take the configs in the grid's order, so the figure depends on where the
best config sits in it (the grid itself, run in that order, is printed as a reference); ``--reverse-choices``
reverses every choice list, which reverses the order, to see how much.

Every reported epoch is one epoch trained. Reports are put in the order the driver received them (the
millisecond timestamps the MLflow callback gives each epoch's metrics; the history table's timestamps break
ties), and the epochs are counted cumulatively, over all trials, until

- **final** (the fair figure, the headline): a trial *ends* (stopped by ASHA or finished) with a value at its last
  epoch within ``--tolerance`` (0.01 = 1 point) of the grid's target: the config a search of this length would
  hand back is then within 1 point;
- **any epoch** (optimistic, for reference): any report, at any epoch, is within the tolerance.

It prints the grid's best, ASHA's best, both epochs-to-within-1-point figures, ASHA's total epochs, the grid's
epochs, the ratio epochs-to-within / grid epochs (target <= 25%), the gap to the grid's best in points, and how
big a point is in test images (knn_acc is a share of ``test_limit`` images). The defaults (E = 8, all 1000 test
images: 1 point = 10 images) replace an earlier 4 epochs on 256 test images, where 1 point was 2.6 images, all
8 configs ended within 2.3 points of each other, and the figure depended on where the best config sat in the
grid's order (25% in one order, 47% in the reverse); with the defaults both orders gave 23.4%. Since both
searches use the same fixed seed, a config trained in both should give the same value at the same epoch; the
largest difference seen is printed as a check of that.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script from anywhere, without installing the package

DEFAULT_SPACE = REPO / "spaces" / "bench_grid.yaml"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default=str(DEFAULT_SPACE), help="space file (default: spaces/bench_grid.yaml)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per config, E (default: 8)")
    parser.add_argument("--train-limit", type=int, default=512, help="training images (default: 512)")
    parser.add_argument("--test-limit", type=int, default=1000,
                        help="test images of the kNN metric (default: 1000, all of cifar10-mini's)")
    parser.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA reduction factor (default: 2)")
    parser.add_argument("--grace-period", type=int, default=1, help="ASHA grace period in epochs (default: 1)")
    parser.add_argument("--searcher", choices=("grid", "random", "optuna"), default="grid",
                        help="ASHA's config proposer (default: grid, the grid's configs in the grid's order)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the searcher (default: 0)")
    parser.add_argument("--reverse-choices", action="store_true",
                        help="reverse every choice list of the space, so the grid's order (and ASHA's, with searcher "
                        "grid) runs last what runs first by default: how much the figure owes to the order")
    parser.add_argument("--tolerance", type=float, default=0.01, help="'within' = this far from the grid's best "
                        "(default: 0.01, one accuracy point)")
    parser.add_argument("--max-concurrent", type=int, default=2, help="trials at once (default: 2)")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (default: 1)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance (default: 2)")
    parser.add_argument("--storage", help="folder for both searches (default: a new temporary folder)")
    parser.add_argument("-v", "--verbose", action="store_true", help="Ray Tune's progress tables")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.train_limit < 1 or args.test_limit < 1:
        parser.error("--epochs, --train-limit and --test-limit must be at least 1")
    if not 1 <= args.grace_period <= args.epochs:
        parser.error("--grace-period must be from 1 to --epochs")
    if args.reduction_factor <= 1:
        parser.error("--reduction-factor must be > 1")
    return args


# ------------------------------------------------------------------------------------------------------ the space


def write_space(args: argparse.Namespace, folder: Path) -> Path:
    """The space file with the flags applied, written into ``folder`` (what both searches load)."""
    import yaml

    data = yaml.safe_load(Path(args.space).read_text())
    data.setdefault("budget", {})
    data["budget"].update(epochs=args.epochs, grace_period=args.grace_period, reduction_factor=args.reduction_factor)
    data.setdefault("fixed", {})
    data["fixed"].update(train_limit=args.train_limit, test_limit=args.test_limit)
    if args.reverse_choices:
        for spec in (data.get("params") or {}).values():
            if isinstance(spec, dict) and isinstance(spec.get("choice"), list):
                spec["choice"] = spec["choice"][::-1]
    path = folder / Path(args.space).name
    path.write_text(f"# {Path(args.space).name} with the flags of benchmarks/bench_search.py applied\n"
                    + yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------- the searches


def search(space: Any, *, scheduler: str, searcher: str, num_samples: int | None, storage: Path, name: str,
           args: argparse.Namespace) -> Any:
    from search.run import SearchOptions, run_search

    options = SearchOptions(
        scheduler=scheduler, searcher=searcher, num_samples=num_samples, max_concurrent=args.max_concurrent,
        cpus_per_trial=args.cpus_per_trial, storage=str(storage), name=name, num_cpus=args.num_cpus,
        seed=args.seed, verbose=1 if args.verbose else 0,
    )  # fmt: skip
    return run_search(space, options, command=f"benchmarks/bench_search.py ({name}: {searcher} + {scheduler})")


def reports(outcome: Any, metric: str) -> list[dict[str, Any]]:
    """Every reported epoch of the search, in the order the driver received them.

    Each row: trial_id, epoch, value (the metric), order (ms), last (the trial's final report).
    """
    import pyarrow.parquet as pq
    from mlflow import MlflowClient

    history = pq.read_table(outcome.history_path).to_pylist()
    run_of = {row["trial_id"]: row.get("mlflow_run_id") for row in outcome.trials}
    client = MlflowClient(tracking_uri=outcome.tracking_uri)
    logged: dict[tuple[str, int], int] = {}  # (trial, epoch) -> ms the driver logged the epoch's metrics
    for trial_id, run_id in run_of.items():
        if not run_id:
            continue
        for point in client.get_metric_history(run_id, metric):
            logged[(trial_id, int(point.step))] = int(point.timestamp)
    rows = []
    for row in history:
        key = (row["trial_id"], int(row["epoch"]))
        stamp = logged.get(key)
        if stamp is None:  # not in MLflow (e.g. no finite value): the trial's own clock, in ms
            stamp = int((row.get("timestamp") or 0) * 1000)
        rows.append({"trial_id": row["trial_id"], "epoch": int(row["epoch"]), "value": row.get(metric),
                     "order": (stamp, row.get("timestamp") or 0, row.get("time_total_s") or 0.0)})
    rows.sort(key=lambda r: r["order"])
    final_epoch: dict[str, int] = {}
    for r in rows:
        final_epoch[r["trial_id"]] = max(final_epoch.get(r["trial_id"], 0), r["epoch"])
    for r in rows:
        r["last"] = r["epoch"] == final_epoch[r["trial_id"]]
    return rows


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def within(value: Any, target: float, tolerance: float, mode: str) -> bool:
    if not finite(value):
        return False
    gap = target - value if mode == "max" else value - target
    return gap <= tolerance + 1e-9


def epochs_to_within(rows: Sequence[Mapping[str, Any]], target: float, tolerance: float, mode: str,
                     *, final_only: bool) -> tuple[int | None, Mapping[str, Any] | None]:
    """Cumulative epochs (all trials, in report order) up to and with the first qualifying report."""
    for count, row in enumerate(rows, start=1):
        if (row["last"] or not final_only) and within(row["value"], target, tolerance, mode):
            return count, row
    return None, None


def final_values(rows: Sequence[Mapping[str, Any]]) -> dict[str, tuple[int, Any]]:
    """trial_id -> (its last epoch, value there)."""
    return {r["trial_id"]: (r["epoch"], r["value"]) for r in rows if r["last"]}


def best_final(rows: Sequence[Mapping[str, Any]], mode: str) -> tuple[float | None, str | None]:
    best, who = None, None
    for trial_id, (_, value) in final_values(rows).items():
        if finite(value) and (best is None or better(value, best, mode)):
            best, who = float(value), trial_id
    return best, who


def best_any(rows: Sequence[Mapping[str, Any]], mode: str) -> float | None:
    values = [float(r["value"]) for r in rows if finite(r["value"])]
    return (max if mode == "max" else min)(values) if values else None


# ----------------------------------------------------------------------------------------------------- printing


def label_of(outcome: Any, space: Any) -> dict[str, str]:
    keys = list(space.dimensions)
    return {row["trial_id"]: " ".join(f"{k}={row.get(k)}" for k in keys) for row in outcome.trials}


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def describe(row: Mapping[str, Any] | None, labels: Mapping[str, str]) -> str:
    if row is None:
        return ""
    return f"  ({labels.get(row['trial_id'], row['trial_id'])}, epoch {row['epoch']}: {pct(row['value'])})"


def per_config(space: Any, grid: Any, asha: Any, grid_rows: list[dict], asha_rows: list[dict], epochs: int) -> None:
    """One line per config: grid value per epoch, ASHA's epochs and final value, and whether the two agree."""
    keys = list(space.dimensions)

    def key_of(row: Mapping[str, Any]) -> tuple:
        return tuple(row.get(k) for k in keys)

    config_of = {r["trial_id"]: key_of(r) for r in (*grid.trials, *asha.trials)}
    grid_at: dict[tuple, dict[int, Any]] = {}
    for r in grid_rows:
        grid_at.setdefault(config_of[r["trial_id"]], {})[r["epoch"]] = r["value"]
    asha_at: dict[tuple, dict[int, Any]] = {}
    for r in asha_rows:
        asha_at.setdefault(config_of[r["trial_id"]], {})[r["epoch"]] = r["value"]
    width = max(len(" ".join(f"{k}={v}" for k, v in zip(keys, c))) for c in grid_at) if grid_at else 10
    header = "  ".join(f"ep{e:<5}" for e in range(1, epochs + 1))
    print(f"\n  {'config':<{width}}  grid: {header}  ASHA: epochs  final")
    diffs = []
    for config in sorted(grid_at, key=lambda c: -(grid_at[c].get(epochs) or -1.0)):
        name = " ".join(f"{k}={v}" for k, v in zip(keys, config))
        values = "  ".join(f"{100 * grid_at[config][e]:6.2f}" if finite(grid_at[config].get(e)) else "     -"
                           for e in range(1, epochs + 1))
        ran = asha_at.get(config, {})
        if ran:
            last = max(ran)
            asha_text = f"{last:>6}  {100 * ran[last]:6.2f}" if finite(ran[last]) else f"{last:>6}       -"
        else:
            asha_text = "     0       -"
        print(f"  {name:<{width}}        {values}        {asha_text}")
        for e, v in ran.items():
            if finite(v) and finite(grid_at[config].get(e)):
                diffs.append(abs(v - grid_at[config][e]))
    if diffs:
        print(f"  same config, same epoch, grid vs ASHA: {len(diffs)} pairs, largest difference "
              f"{100 * max(diffs):.2f} points ({'identical' if max(diffs) == 0 else 'not identical'})")


# -------------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from search.space import load_space

    storage = Path(args.storage or tempfile.mkdtemp(prefix="csl-bench-search-")).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    space = load_space(write_space(args, storage))
    metric, mode, epochs = space.metric, space.mode, int(space.budget["epochs"])
    configs = len(space.grid())
    print(f"space {space.name}: {configs} configs ({' x '.join(space.dimensions)}), {epochs} epochs each, "
          f"{args.train_limit} train / {args.test_limit} test images, metric {metric} ({mode}); storage {storage}"
          + ("; choice lists reversed" if args.reverse_choices else ""),
          flush=True)

    started = time.perf_counter()
    print("\n[1/2] exhaustive grid: searcher grid, scheduler fifo ...", flush=True)
    grid = search(space, scheduler="fifo", searcher="grid", num_samples=None, storage=storage / "grid", name="grid",
                  args=args)
    grid_wall = time.perf_counter() - started
    print(f"[1/2] done in {grid_wall:.0f} s: {grid.counts()}", flush=True)

    print(f"\n[2/2] ASHA: searcher {args.searcher}, scheduler asha (grace period {args.grace_period}, reduction "
          f"factor {args.reduction_factor:g}), {configs} samples ...", flush=True)
    started = time.perf_counter()
    asha = search(space, scheduler="asha", searcher=args.searcher, num_samples=configs, storage=storage / "asha",
                  name="asha", args=args)
    asha_wall = time.perf_counter() - started
    print(f"[2/2] done in {asha_wall:.0f} s: {asha.counts()}", flush=True)

    grid_rows, asha_rows = reports(grid, metric), reports(asha, metric)
    grid_labels, asha_labels = label_of(grid, space), label_of(asha, space)
    per_config(space, grid, asha, grid_rows, asha_rows, epochs)

    target, target_trial = best_final(grid_rows, mode)
    if target is None:
        print(f"\nthe grid reported no finite {metric}: nothing to compare", file=sys.stderr)
        return 1
    grid_epochs = len(grid_rows)
    planned = configs * epochs
    asha_best, asha_trial = best_final(asha_rows, mode)
    asha_total = len(asha_rows)
    tol = args.tolerance
    final_n, final_row = epochs_to_within(asha_rows, target, tol, mode, final_only=True)
    any_n, any_row = epochs_to_within(asha_rows, target, tol, mode, final_only=False)
    grid_n, grid_row = epochs_to_within(grid_rows, target, tol, mode, final_only=True)
    image = 100.0 / args.test_limit  # points per test image

    def ratio(n: int | None) -> str:
        return "not reached" if n is None else f"{n} epochs = {100 * n / grid_epochs:.1f}% of the grid's"

    print(f"\n{metric} is the share of {args.test_limit} test images the kNN classifier gets right: one image = "
          f"{image:.2f} points, 1 point = {args.test_limit / 100:.2f} images; tolerance {100 * tol:g} point(s).")
    print(f"grid best ({metric} at a trial's final epoch {epochs}):  {pct(target)}  ({grid_labels[target_trial]})"
          f"   [best at any epoch: {pct(best_any(grid_rows, mode))}]")
    gap = None if asha_best is None else (target - asha_best if mode == "max" else asha_best - target)
    gap_text = "-" if gap is None else f"{100 * gap:+.2f} points ({gap / (image / 100):+.1f} test images)"
    asha_cfg = asha_labels.get(asha_trial, "") if asha_trial else ""
    print(f"ASHA best (at a trial's final epoch, stopped or finished): {pct(asha_best)}  ({asha_cfg}); "
          f"gap to the grid's best: {gap_text}")
    within_text = f"epochs to within {100 * tol:g} point(s)"
    print(f"{within_text}, final value (fair):  {ratio(final_n)}{describe(final_row, asha_labels)}")
    print(f"{within_text}, any epoch (optimistic): {ratio(any_n)}{describe(any_row, asha_labels)}")
    print(f"  (for reference, the grid itself in its fifo order: {ratio(grid_n)}{describe(grid_row, grid_labels)})")
    print(f"ASHA total epochs: {asha_total} = {100 * asha_total / grid_epochs:.1f}% of the grid's; "
          f"trials that reached epoch {epochs}: {sum(1 for e, _ in final_values(asha_rows).values() if e == epochs)}"
          f" of {len(final_values(asha_rows))}")
    print(f"grid epochs: {grid_epochs} (configs x E = {configs} x {epochs} = {planned})")
    verdict = "n/a" if final_n is None else ("met" if final_n <= 0.25 * grid_epochs else "missed")
    print(f"ratio epochs-to-within-1-point / grid epochs: "
          f"{'-' if final_n is None else f'{100 * final_n / grid_epochs:.1f}%'} (target <= 25%: {verdict})")
    print(f"wall time: grid {grid_wall:.0f} s, ASHA {asha_wall:.0f} s")
    print(f"tables: {grid.results_path}, {asha.results_path}")
    print(f"MLflow: {grid.tracking_uri} and {asha.tracking_uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

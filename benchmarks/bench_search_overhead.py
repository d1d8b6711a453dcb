"""What Ray Tune and MLflow cost a search: wall time against the time the trials themselves took.

    .venv/bin/python benchmarks/bench_search_overhead.py                      # from the repository root
    .venv/bin/python benchmarks/bench_search_overhead.py --trials 4 --epochs 3 --train-limit 1536 \
        --cpus-per-trial 1 --num-cpus 2 [--mlflow-uri http://127.0.0.1:5000] [--gpus-per-trial 0.25]

It writes a space file (a 1/8-wide ResNet-18 SimCLR on ``--train-limit`` images of the embedded cifar10-mini,
``--trials`` configs drawn from two temperatures and a learning-rate range), runs the whole ``csl-search run``
path (``search.run.run_search``: Ray start, Tuner with FIFO so every trial runs every epoch, MLflow parent and
child runs, per-epoch checkpoints, results tables) and prints

    overhead = search wall time / (sum of trial times / concurrent slots)

where a trial's time is Tune's ``time_total_s`` (the trainable's own time: data, model, epochs, reports and
checkpoints inside the trial) and the slots are ``min(trials, num_cpus // cpus_per_trial)`` (GPUs likewise when
``--gpus-per-trial`` is set). 1.00 would be a free scheduler; what is above it is Ray start-up, worker start-up
(torch import), MLflow calls on the driver, the tail when fewer trials than slots are left, and result writing.
The defaults give trials of 30 s or more on a 2-core CPU; shrink ``--train-limit`` on a faster machine until
``min trial`` still shows >= 30 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SPACE = """\
name: bench_overhead
metric: knn_acc
mode: max
budget: {{epochs: {epochs}, grace_period: 1, reduction_factor: 2, num_samples: {trials}}}
fixed:
  method: simclr
  encoder: resnet18
  width: 0.125
  proj_dim: 64
  proj_hidden: 128
  batch_size: 64
  data: cifar10-mini
  train_limit: {train_limit}
  test_limit: 256
  seed: 0
params:
  temperature: {{choice: [0.2, 0.5]}}
  lr: {{loguniform: [3.0e-4, 3.0e-3]}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=1536)
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument("--gpus-per-trial", type=float, default=0.0)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--mlflow-uri", help="tracking server (default: SQLite in the temporary storage folder)")
    parser.add_argument("--storage", help="where the search writes (default: a temporary folder)")
    args = parser.parse_args()

    from search.run import SearchOptions, run_search
    from search.space import load_space

    storage = Path(args.storage or tempfile.mkdtemp(prefix="csl-bench-search-"))
    storage.mkdir(parents=True, exist_ok=True)
    space_file = storage / "bench_overhead.yaml"
    space_file.write_text(SPACE.format(epochs=args.epochs, trials=args.trials, train_limit=args.train_limit))
    space = load_space(space_file)
    options = SearchOptions(
        scheduler="fifo", searcher="random", num_samples=args.trials, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, storage=str(storage), num_cpus=args.num_cpus,
        mlflow_uri=args.mlflow_uri, verbose=0,
    )  # fmt: skip

    started, started_epoch = time.perf_counter(), time.time()
    outcome = run_search(space, options, command="benchmarks/bench_search_overhead.py")
    wall = time.perf_counter() - started
    ended_epoch = started_epoch + wall

    times = [r["wall_time_s"] for r in outcome.trials if r["wall_time_s"]]
    slots = min(args.trials, int(args.num_cpus // args.cpus_per_trial))
    if args.gpus_per_trial:
        import torch

        slots = min(slots, int(torch.cuda.device_count() // args.gpus_per_trial))
    ideal = sum(times) / slots
    print(f"trials: {len(times)} of {args.trials} ({outcome.counts()}), {args.epochs} epochs on {args.train_limit}"
          " images each")
    print(f"trial time: min {min(times):.1f} s, median {statistics.median(times):.1f} s, sum {sum(times):.1f} s")
    print(f"concurrent slots: {slots} ({args.num_cpus} CPUs / {args.cpus_per_trial} per trial)")
    print(f"search wall time: {wall:.1f} s (ideal {ideal:.1f} s)")
    print(f"overhead = wall / (sum of trial times / slots) = {wall / ideal:.2f}")
    import pyarrow.parquet as pq

    history = pq.read_table(outcome.history_path).to_pylist()
    if history:  # a trial starts at (its first report) - (its time then); reports carry a Unix timestamp
        first = min(h["timestamp"] - h["time_total_s"] for h in history if h["timestamp"] and h["time_total_s"])
        last = max(h["timestamp"] for h in history)
        print(f"  before the first trial started: {first - started_epoch:.1f} s (Ray start, MLflow parent run, worker"
              f" start-up); after the last report: {ended_epoch - last:.1f} s (shutdown, tables, MLflow)")
    if min(times) < 30:
        print("note: some trials took under 30 s; raise --train-limit or --epochs for a fair figure")
    print(f"MLflow: {outcome.tracking_uri} (parent run {outcome.parent_run_id}); results: {outcome.results_path}")


if __name__ == "__main__":
    main()
